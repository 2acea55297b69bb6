"""`judge_agree`: one comparison of two judge settings on a seeded sample of a run's queries, as a short
sequence of named steps (the package docstring says what each step measures)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from unime_ray.config import Config, JudgeConfig, MiningConfig
from unime_ray.mining.agree.cost import LLM_PARAMS_B, PROJECT_BLOCK, VISION_PARAMS_B
from unime_ray.mining.agree.replay import Rules, compare
from unime_ray.mining.agree.report import AgreeResult, write_report
from unime_ray.mining.agree.sample import write_sample
from unime_ray.mining.agree.settings import describe, differences, measure_setting, run_setting


def retrieved_run(cfg: Config) -> Path:
    """The run's `mining` folder, mined up to its retrieve stage first when that has not finished."""
    from unime_ray.mining.pipeline import run_mining

    mining = Path(cfg.run.output_dir) / "mining"
    if not (mining / "retrieve/_SUCCESS.json").is_file():
        print(f"[judge-agree] {mining} has no retrieved candidates yet: mining up to retrieve", flush=True)
        run_mining(cfg, ("retrieve",))
    return mining


def queries_per_shard(mining: MiningConfig, n: int) -> int:
    """Queries per request shard of an `n`-query sample: the run's `judge_shard_queries`, fewer when
    that would leave an actor of the pool without two shards to work on."""
    actors = max(1, mining.num_actors)
    return max(1, min(mining.judge_shard_queries, -(-n // (2 * actors))))


def paired_scores(a: pa.Table, b: pa.Table) -> pa.Table:
    """A's score rows (query_id, cand_id, is_positive, rank, score) with B's score of the same pair:
    columns ..., score_a, score_b. Both settings must have judged the same pairs."""
    keys = ["query_id", "cand_id"]
    both = a.rename_columns([*keys, "is_positive", "rank", "score_a"]).join(
        b.select([*keys, "score"]).rename_columns([*keys, "score_b"]), keys, join_type="inner"
    )
    if both.num_rows != a.num_rows:
        raise RuntimeError(f"the settings judged different pairs: {both.num_rows} of {a.num_rows} shared")
    return both


def judge_agree(
    cfg_a: Config,
    judge_b: JudgeConfig,
    n: int,
    out: Path,
    *,
    seed: int = 0,
    calls: float | None = None,
    image_sizes: tuple[int | None, int | None] = (None, None),
    llm_params_b: float = LLM_PARAMS_B,
    vision_params_b: float = VISION_PARAMS_B,
    project_block: int = PROJECT_BLOCK,
) -> dict:
    """Judge a seeded sample of `n` of the run's queries with `cfg_a.judge` and with `judge_b` and compare
    them; write agree.json, agree.md, scatter.png into `out` and return agree.json's object."""
    mining = retrieved_run(cfg_a)
    out.mkdir(parents=True, exist_ok=True)
    requests, sample = write_sample(mining, n, seed, out / "requests", queries_per_shard(cfg_a.mining, n))
    print(f"[judge-agree] {sample.queries} queries, {sample.calls} judge calls per setting", flush=True)
    table = pa.concat_tables(pq.read_table(p) for p in requests)
    settings, scores = {}, {}
    for label, judge, px in (("A", cfg_a.judge, image_sizes[0]), ("B", judge_b, image_sizes[1])):
        print(f"[judge-agree] setting {label}: {describe(judge)}", flush=True)
        scores[label], tokens = run_setting(judge, requests, out / label, cfg_a.data.image_root, cfg_a.mining)
        settings[label] = measure_setting(
            judge,
            tokens,
            table,
            sample.images,
            px,
            calls or sample.run_calls,
            project_block,
            llm_params_b=llm_params_b,
            vision_params_b=vision_params_b,
        )
    both = paired_scores(scores["A"], scores["B"])
    rules = Rules.of(cfg_a)
    per_query, summary = compare(both, rules)
    result = AgreeResult(
        seed,
        str(mining.parent),
        sample,
        rules,
        differences(cfg_a.judge, judge_b),
        settings,
        summary,
        per_query,
    )
    write_report(result, both, out)
    return result.to_json()
