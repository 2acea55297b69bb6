"""One judge setting of `unime-ray judge-agree`: judging the sample with it (a model through the judge
stage's own code, a score file, or a folder of a run's judge results), and saying what it is."""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from unime_ray.config import JudgeConfig, MiningConfig
from unime_ray.data.schemas import JUDGE_COSTS, JUDGE_REQUEST_IDS
from unime_ray.io import write_parquet
from unime_ray.mining.agree.cost import (
    LLM_PARAMS_B,
    VISION_PARAMS_B,
    SettingProjection,
    project_setting,
    simulate,
)
from unime_ray.mining.judge import attach_precomputed, run_judge, token_report

SCORE_COLUMNS = ["query_id", "cand_id", "is_positive", "rank", "score"]


@dataclass
class Setting:
    """What one setting measured on the sample: the setting (`describe`, its `judge` section), its token
    counts (`token_report` plus wall seconds), the prefix-cache replay at the size vLLM measured (only
    where vLLM measured a cache), and its projection to the full run (None without token counts or
    without the model's folder)."""

    describe: str
    judge: dict
    tokens: dict
    projection: SettingProjection | None
    simulated_as_measured: dict | None = None

    def to_json(self) -> dict:
        """agree.json's object of the setting; `simulated_as_measured` only where it was replayed."""
        out = {"describe": self.describe, "judge": self.judge, "tokens": self.tokens}
        if self.simulated_as_measured is not None:
            out["simulated_as_measured"] = self.simulated_as_measured
        return out | {"projection": self.projection.to_json() if self.projection else None}


def _from_score_folder(folder: Path, requests: list[Path], out: Path) -> None:
    """A folder of judge score files (e.g. a run's mining/judge/results) as a setting: the rows of the
    sample's requests, with their token counts when the files have them."""
    keys = ["query_id", "cand_id"]
    req = pa.concat_tables(pq.read_table(p, columns=JUDGE_REQUEST_IDS.names) for p in requests)
    qids = pc.unique(req["query_id"]).to_pylist()
    files = sorted(folder.glob("*.parquet"))
    costs = all(set(JUDGE_COSTS.names) <= set(pq.read_schema(f).names) for f in files) and bool(files)
    columns = [*keys, "score", *(JUDGE_COSTS.names if costs else [])]
    parts = [pq.read_table(f, columns=columns, filters=[("query_id", "in", qids)]) for f in files]
    have = pa.concat_tables(parts) if parts else pa.table({c: [] for c in columns})
    joined = req.join(have, keys, join_type="inner")
    if joined.num_rows != req.num_rows:
        raise ValueError(
            f"{folder}: {req.num_rows - joined.num_rows} of the sample's {req.num_rows} judge requests "
            "have no score there, or some have several (is it the same run's judge results?)"
        )
    write_parquet(joined, out / "scores.parquet")


def run_setting(
    judge: JudgeConfig, requests: list[Path], out: Path, image_root: str, mining: MiningConfig
) -> tuple[pa.Table, dict]:
    """Judge the sample's requests with one setting into `out` (emptied first); its scores (query_id,
    cand_id, is_positive, rank, score) and its cost report (`token_report` + wall seconds)."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    start = time.perf_counter()
    if judge.backend != "precomputed":
        run_judge(requests, out, judge, image_root, mining)
    elif Path(judge.scores_path).is_dir():
        _from_score_folder(Path(judge.scores_path), requests, out)
    else:
        attach_precomputed(requests, out, judge.scores_path)
    wall = time.perf_counter() - start
    files = sorted(out.glob("*.parquet"))
    scores = pa.concat_tables(pq.read_table(f, columns=SCORE_COLUMNS) for f in files)
    return scores, {**token_report(files), "wall_seconds": wall}


def describe(judge: JudgeConfig) -> str:
    """A setting in one line."""
    if judge.backend == "precomputed":
        return f"precomputed scores {judge.scores_path}"
    m = judge.model
    text = f"{judge.backend} {Path(m.path).name}, {m.image_size} px, prompt {judge.prompt}"
    return text + (
        f", candidate text <= {judge.max_candidate_tokens} tokens" if judge.max_candidate_tokens else ""
    )


def differences(a: JudgeConfig, b: JudgeConfig) -> list[str]:
    """`judge.key: a -> b` for every judge key whose value differs."""

    def flat(d: dict, prefix: str = "judge.") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    fa, fb = flat(asdict(a)), flat(asdict(b))
    return [f"{k}: {fa[k]!r} -> {fb[k]!r}" for k in fa if fa[k] != fb[k]]


def measure_setting(
    judge: JudgeConfig,
    tokens: dict,
    requests: pa.Table,
    images: int,
    image_size: int | None,
    calls: float,
    block: int,
    *,
    llm_params_b: float = LLM_PARAMS_B,
    vision_params_b: float = VISION_PARAMS_B,
) -> Setting:
    """What `judge` measured on the sample's `requests` (`images` images in all; `tokens` from
    `run_setting`), with the replay at the size vLLM measured (a vLLM judge with a set block size whose
    images all came out the same size) and the projection to `calls` calls (`project_setting`)."""
    measured = tokens["image_tokens"] / images if tokens["calls"] and images else 0
    setting = Setting(describe(judge), asdict(judge), tokens, projection=None)
    if judge.backend == "vllm" and judge.block_size and measured == int(measured):
        # the simulated cache where the engine measured it: how far the projection can be trusted
        setting.simulated_as_measured = simulate(requests, judge, int(measured), judge.block_size)
    if tokens["calls"] and (Path(judge.model.path) / "config.json").is_file():
        setting.projection = project_setting(
            requests,
            judge,
            image_size,
            measured,
            block,
            calls,
            llm_params_b=llm_params_b,
            vision_params_b=vision_params_b,
        )
    return setting
