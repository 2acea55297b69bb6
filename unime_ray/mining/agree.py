"""`unime-ray judge-agree`: how far two judge settings agree, and what each costs, measured on a seeded
sample of mined queries in minutes, before paying for a full mining run with either.

    unime-ray judge-agree --config A.yaml --against B.yaml --queries 200
    unime-ray judge-agree --config A.yaml --against-set judge.model.image_size=448 --queries 200
    unime-ray judge-agree --config A.yaml --against runs/x/mining/judge/results   # a run's own scores
    unime-ray judge-agree --config A.yaml --against scores.parquet                # anyone's score file

A *setting* is a `judge` config section (model, image size, prompt, candidate cap, backend: vllm or
transformers) or precomputed scores: a file of `query_id, cand_id, score` rows (Parquet or JSONL) or a
folder of judge score files (a run's `mining/judge/results`). Setting A is `--config` with `--set`;
setting B is `--against` (a config file, whose `judge` section is used, or a score file or folder) with
`--against-set` on top, or A's config with `--against-set` alone.

The queries come from A's run (`run.output_dir`): its retrieve stage (run first when missing). A seeded
random sample of `--queries` of its queries, each with its positive and its retrieved candidates, is
written as judge request shards exactly as the judge stage writes them, and each setting judges them
through the judge stage's own code (`run_judge`: a Ray Data actor pool of vLLM or transformers judges,
or the precomputed-score join). Written to `--out` (default `<run.output_dir>/judge_agree`):
`agree.json`, `agree.md` and `scatter.png` (B's score against A's for every judged pair). Reported:

- rank agreement per query: Spearman and Kendall (tau-b) between the two settings' scores of the query's
  judged pairs (its positive and its candidates); median, interquartile range and mean over queries
  (a query whose scores are constant under one setting has no rank correlation and is counted apart);
- the false-negative filter (`s > s_pos - beta`, `sample.survives`): each candidate dropped by both
  settings, by A only, by B only or by neither; their agreement and Cohen's kappa;
- the hard negatives `sample.sample_negatives` picks from each setting's scores (the run's beta, interval,
  counts and seed): their Jaccard overlap per query (distinct ids); the fallback decision of each query;
- per setting, from the token counts the backends record (`token_report`): prompt, computed and image
  tokens per call, the share served from vLLM's prefix cache, the judge's busy seconds;
- per setting, the projected GPU-hours of the full run (the run's judge calls, or `--calls`): each call's
  prompt is rebuilt with the setting's tokenizer, prompt variant and cap, its images expanded to their
  token count at `--project-image-size` (Qwen2-VL's (px/28)^2; default: the measured size), and the
  prefix cache replayed over the calls in the judge stage's order (`simulate_prefix_cache`, KV blocks of
  `--project-block-size`); the computed tokens per call then cost 2 FLOPs per parameter per token (plus
  the vision encoder's on each computed image token) at the prefill throughput docs/mining.md documents
  (989 TFLOP/s dense bf16 per H100 at 40% MFU). Where vLLM measured the cache (a set `judge.block_size`),
  the same replay at the measured size is reported next to it, as a check of the replay.
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from unime_ray.config import Config, JudgeConfig, MiningConfig, add_config_args, config_from_args, load_config
from unime_ray.data.schemas import JUDGE_COSTS, JUDGE_SCORES
from unime_ray.engine.shards import write_request_shards
from unime_ray.io import atomic_path, write_json, write_parquet
from unime_ray.mining.judge import attach_precomputed, build_requests, run_judge, token_report
from unime_ray.mining.sample import query_rng, sample_negatives, survives

# Prefill throughput of one H100 as docs/mining.md's cost model takes it.
H100_TFLOPS = 989.0  # dense bf16
PREFILL_MFU = 0.40
# Qwen2-VL / Qwen2.5-VL: 14 px patches merged 2x2, so one image token = 4 patches through the vision
# encoder, and a side of `px` pixels gives round(px / 28) ** 2 tokens.
PATCHES_PER_IMAGE_TOKEN = 4


# ---------------------------------------------------------------------------------------------- metrics


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given the mean of the ranks they span ([10, 20, 20, 30] -> [1, 2.5, 2.5, 4])."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    sorted_x = x[order]
    start = 0
    for end in range(1, len(x) + 1):
        if end == len(x) or sorted_x[end] != sorted_x[start]:
            ranks[order[start:end]] = (start + end + 1) / 2.0
            start = end
    return ranks


def auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Probability that a positive outscores a negative (ties count half): Mann-Whitney's U / (n+ n-)."""
    positive = np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return None
    ranks = average_ranks(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho: Pearson's correlation of the average ranks; NaN when a side is constant."""
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else math.nan


def kendall_tau_b(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's tau-b: (concordant - discordant) / sqrt((pairs - ties in a) (pairs - ties in b)), over
    all pairs (n is ~51 per query); NaN when a side is constant."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    upper = np.triu_indices(len(a), k=1)
    da = np.sign(a[:, None] - a[None, :])[upper]
    db = np.sign(b[:, None] - b[None, :])[upper]
    denom = math.sqrt(float(np.count_nonzero(da)) * float(np.count_nonzero(db)))
    return float((da * db).sum() / denom) if denom > 0 else math.nan


def jaccard(a: set, b: set) -> float:
    """|a & b| / |a | b|; two empty sets agree fully (1.0)."""
    return len(a & b) / len(a | b) if a | b else 1.0


def _defined(x: float | None) -> float | None:
    """NaN as None (JSON has no NaN)."""
    return None if x is None or math.isnan(x) else float(x)


def spread(values: list[float | None]) -> dict:
    """Median, interquartile range and mean of the defined values; how many were undefined (None, NaN)."""
    v = np.asarray([x for x in values if _defined(x) is not None], dtype=np.float64)
    if not len(v):
        return {"n": 0, "undefined": len(values), "median": None, "p25": None, "p75": None, "mean": None}
    p25, median, p75 = (float(q) for q in np.percentile(v, [25, 50, 75]))
    return {
        "n": len(v),
        "undefined": len(values) - len(v),
        "median": median,
        "p25": p25,
        "p75": p75,
        "mean": float(v.mean()),
    }


def two_way(a: np.ndarray, b: np.ndarray) -> dict:
    """Counts of a yes/no decision made by two settings (both, A only, B only, neither), the share on
    which they agree and Cohen's kappa (agreement beyond what the two rates give by chance; NaN when
    chance alone agrees fully)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    n = len(a)
    counts = {
        "both": int((a & b).sum()),
        "a_only": int((a & ~b).sum()),
        "b_only": int((~a & b).sum()),
        "neither": int((~a & ~b).sum()),
    }
    if not n:
        return {**counts, "total": 0, "agreement": None, "kappa": None}
    agree = (counts["both"] + counts["neither"]) / n
    pa_, pb = a.mean(), b.mean()
    chance = pa_ * pb + (1 - pa_) * (1 - pb)
    kappa = (agree - chance) / (1 - chance) if chance < 1 else math.nan
    return {**counts, "total": n, "agreement": agree, "kappa": _defined(kappa)}


@dataclass
class Rules:
    """The sampling settings both settings' scores go through (the run's `mining` section and seed)."""

    beta: float
    interval: int
    min_negatives: int
    num_negatives: int
    seed: int

    @classmethod
    def of(cls, cfg: Config) -> Rules:
        m = cfg.mining
        return cls(m.beta, m.interval, m.min_negatives, m.num_negatives, cfg.run.seed)


def compare_query(
    query_id: str,
    cand_ids: list[str],
    is_positive: np.ndarray,
    ranks: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    rules: Rules,
) -> dict:
    """One query's agreement: rank correlations over all its judged pairs, each setting's false-negative
    drops and hard negatives (the mining rules applied to its scores), and their overlap."""
    pos = np.flatnonzero(is_positive)
    if len(pos) != 1 or len(pos) == len(a):
        raise ValueError(f"query {query_id!r}: needs exactly one positive and a candidate, got {len(pos)}")
    cand = np.flatnonzero(~np.asarray(is_positive, bool))
    ids = [cand_ids[i] for i in cand]
    out: dict = {
        "query_id": query_id,
        "pairs": len(a),
        "spearman": _defined(spearman(a, b)),
        "kendall": _defined(kendall_tau_b(a, b)),
    }
    kept, picked = {}, {}
    for name, s in (("a", a), ("b", b)):
        kept[name] = survives(s[pos[0]], s[cand], rules.beta)
        sampled = sample_negatives(
            s[pos[0]],
            s[cand],
            ranks[cand],
            beta=rules.beta,
            interval=rules.interval,
            min_negatives=rules.min_negatives,
            num_negatives=rules.num_negatives,
            rng=query_rng(rules.seed, query_id),
        )
        picked[name] = {ids[i] for i in sampled.indices}
        out[f"dropped_{name}"] = [c for c, k in zip(ids, kept[name], strict=True) if not k]
        out[f"hard_negatives_{name}"] = sorted(picked[name])
        out[f"fallback_{name}"] = sampled.fallback
    out["hard_negatives_jaccard"] = jaccard(picked["a"], picked["b"])
    out["_dropped"] = (~kept["a"], ~kept["b"])
    return out


def compare(table: pa.Table, rules: Rules) -> tuple[list[dict], dict]:
    """Per-query results and their summary for `table`: one row per judged pair of both settings, columns
    query_id, cand_id, is_positive, rank, score_a, score_b."""
    table = table.sort_by([("query_id", "ascending"), ("rank", "ascending")])
    qids = table["query_id"].to_numpy(zero_copy_only=False)
    cols = {c: table[c].to_numpy(zero_copy_only=False) for c in ("is_positive", "rank", "score_a", "score_b")}
    cand_ids = table["cand_id"].to_pylist()
    starts = np.flatnonzero(np.r_[len(qids) > 0, qids[1:] != qids[:-1]]) if len(qids) else np.zeros(0, int)
    per_query, drops_a, drops_b, unscored = [], [], [], []
    for start, end in zip(starts, np.r_[starts[1:], len(qids)], strict=True):
        scores = np.r_[cols["score_a"][start:end], cols["score_b"][start:end]].astype(np.float64)
        if not np.isfinite(scores).all():  # a judge call that failed (NaN): the mining job drops the row
            unscored.append(str(qids[start]))
            continue
        row = compare_query(
            str(qids[start]),
            cand_ids[start:end],
            cols["is_positive"][start:end].astype(bool),
            cols["rank"][start:end],
            cols["score_a"][start:end].astype(np.float64),
            cols["score_b"][start:end].astype(np.float64),
            rules,
        )
        da, db = row.pop("_dropped")
        drops_a.append(da)
        drops_b.append(db)
        per_query.append(row)
    cat = (lambda parts: np.concatenate(parts)) if per_query else (lambda parts: np.zeros(0, bool))
    summary = {
        "queries": len(per_query),
        "pairs": sum(r["pairs"] for r in per_query),
        "queries_with_failed_calls": unscored,
        "spearman": spread([r["spearman"] for r in per_query]),
        "kendall": spread([r["kendall"] for r in per_query]),
        "false_negative_filter": two_way(cat(drops_a), cat(drops_b)),
        "hard_negatives_jaccard": spread([r["hard_negatives_jaccard"] for r in per_query]),
        "identical_hard_negatives": sum(r["hard_negatives_a"] == r["hard_negatives_b"] for r in per_query),
        "fallback": two_way(
            np.array([r["fallback_a"] for r in per_query], bool),
            np.array([r["fallback_b"] for r in per_query], bool),
        ),
    }
    return per_query, summary


# ------------------------------------------------------------------------------------------- projection


def image_tokens_at(px: int) -> int:
    """Image tokens of a px x px image in Qwen2-VL / Qwen2.5-VL (672 -> 576, 448 -> 256, 336 -> 144)."""
    return round(px / 28) ** 2


def simulate_prefix_cache(prompts: Iterable[Sequence], block: int) -> list[int]:
    """For each prompt in order, the tokens a prefix cache like vLLM's serves it: whole `block`-token
    blocks, each matched together with everything before it (a hash chain) against the blocks of every
    earlier prompt, stopping at the first miss and leaving at least the last token to compute. Every
    full block of a prompt is cached once it has been computed (no eviction)."""
    seen: set[int] = set()
    out = []
    for seq in prompts:
        chain, cached, hit = 0, 0, True
        limit = (len(seq) - 1) // block  # blocks that may come from the cache
        for b in range(len(seq) // block):
            chain = hash((chain, tuple(seq[b * block : (b + 1) * block])))
            if hit and b < limit and chain in seen:
                cached += block
            else:
                hit = False
            seen.add(chain)
        out.append(cached)
    return out


def prompt_tokens(requests: pa.Table, judge: JudgeConfig, image_tokens: int) -> Iterator[list]:
    """Each request's judge prompt as an engine sees it, in the order the judge stage sends them: the
    token ids of the rendered prompt (the setting's model tokenizer, prompt variant and candidate cap),
    each image's placeholder expanded to `image_tokens` tokens that stand for that image (as vLLM keys
    a block holding image tokens by the image's hash)."""
    from transformers import AutoTokenizer

    from unime_ray.models.judge import _PromptBuilder

    tokenizer = AutoTokenizer.from_pretrained(judge.model.path, local_files_only=True)
    builder = _PromptBuilder(judge.model, "", tokenizer, judge.prompt, judge.max_candidate_tokens)
    columns = ("qry_text", "qry_image", "cand_text", "cand_image")
    for pair in zip(*(requests[c].to_pylist() for c in columns), strict=True):
        images = iter([im for im in (pair[1], pair[3]) if im])
        seq: list = []
        for token in tokenizer(builder.text(pair), add_special_tokens=False).input_ids:
            if token == builder.image_token:
                image = next(images)
                seq += [("image", image, k) for k in range(image_tokens)]
            else:
                seq.append(token)
        yield seq


def simulate(requests: pa.Table, judge: JudgeConfig, image_tokens: int, block: int) -> dict:
    """The judge stage's token counts (as `token_report`) for `requests` with each image `image_tokens`
    tokens long, served by a prefix cache of `block`-token blocks (`simulate_prefix_cache`); also split
    by the candidate's kind (`by_candidate`: with an image, text only), the part of a call no cache shares."""
    from unime_ray.mining.judge import summarize_tokens

    prompts = list(prompt_tokens(requests, judge, image_tokens))
    names = ("prompt_tokens", "cached_tokens", "image_tokens", "cached_image_tokens")
    counts = np.zeros((len(prompts), len(names)), dtype=np.int64)
    for i, (seq, cached) in enumerate(zip(prompts, simulate_prefix_cache(prompts, block), strict=True)):
        is_image = [isinstance(t, tuple) for t in seq]
        counts[i] = (len(seq), cached, sum(is_image), sum(is_image[:cached]))

    def summary(rows: np.ndarray) -> dict:
        return summarize_tokens(dict(zip(names, (int(x) for x in rows.sum(axis=0)), strict=True)), len(rows))

    image = pc.not_equal(requests["cand_image"], "").to_numpy(zero_copy_only=False)
    return {
        **summary(counts),
        "by_candidate": {"image": summary(counts[image]), "text": summary(counts[~image])},
    }


def project(
    tokens: dict,
    calls: float,
    *,
    llm_params_b: float = 7.6,
    vision_params_b: float = 0.675,
    tflops: float = H100_TFLOPS,
    mfu: float = PREFILL_MFU,
) -> dict | None:
    """GPU-hours of `calls` judge calls at the computed tokens per call of `tokens` (`token_report` or
    `simulate`), at `tflops` x `mfu` per GPU: 2 FLOPs per language-model parameter per computed token,
    plus 2 per vision-encoder parameter per patch of each computed image token (Qwen2-VL: 4 patches)."""
    n = tokens.get("calls") or 0
    if not n:
        return None
    computed = tokens["computed_tokens"] / n
    image = tokens["computed_image_tokens"] / n
    flops = 2e9 * llm_params_b * computed + 2e9 * vision_params_b * PATCHES_PER_IMAGE_TOKEN * image
    return {
        "calls": calls,
        "computed_tokens_per_call": computed,
        "computed_image_tokens_per_call": image,
        "tokens_computed": calls * computed,
        "flops": calls * flops,
        "gpu_hours": calls * flops / (tflops * 1e12 * mfu) / 3600,
        "assumptions": {
            "llm_params_b": llm_params_b,
            "vision_params_b": vision_params_b,
            "tflops": tflops,
            "mfu": mfu,
            "text_tokens_per_gpu_s": tflops * 1e12 * mfu / (2e9 * llm_params_b),
        },
    }


# ---------------------------------------------------------------------------------------------- sample


def sample_query_ids(ids: list[str] | pa.Array, n: int, seed: int) -> list[str]:
    """`n` distinct query ids drawn with `seed` from the distinct ids given (in any order, with repeats):
    the same ids and seed give the same sample, in id order."""
    ordered = sorted(set(ids.to_pylist() if isinstance(ids, pa.Array | pa.ChunkedArray) else ids))
    pick = np.random.default_rng(seed).choice(len(ordered), size=min(n, len(ordered)), replace=False)
    return sorted(ordered[i] for i in pick)


def write_sample(mining: Path, n: int, seed: int, out_dir: Path, per_shard: int) -> tuple[list[Path], dict]:
    """Judge request shards for a seeded sample of `n` of the queries retrieved in `mining` (a run's
    `mining` folder): each query with its positive and candidates, as the judge stage builds them. Also
    returns counts: the run's queries and judge calls, the sample's."""
    files = sorted((mining / "retrieve").glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{mining / 'retrieve'}: no retrieved candidates")
    ids = [pc.unique(pq.read_table(f, columns=["query_id"])["query_id"]) for f in files]
    run_calls = sum(pq.read_metadata(f).num_rows for f in files) + sum(len(i) for i in ids)
    chosen = sample_query_ids(pa.chunked_array(ids, pa.string()), n, seed)
    parts = []
    for path in files:
        cands = pq.read_table(path, filters=[("query_id", "in", chosen)])
        if not cands.num_rows:
            continue
        names = pc.unique(cands["dataset"]).to_pylist()
        queries = pq.read_table(
            mining / "ingest/queries.parquet",
            columns=["id", "dataset", "text", "image", "pos_id"],
            filters=[("dataset", "in", names), ("id", "in", chosen)],
        )
        pool = pq.read_table(
            mining / "ingest/pool.parquet",
            columns=["id", "dataset", "text", "image"],
            filters=[("dataset", "in", names)],
        )
        parts.append(build_requests(cands, queries, pool))
    requests = pa.concat_tables(parts).sort_by([("query_id", "ascending"), ("rank", "ascending")])
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shards = write_request_shards(requests, out_dir, per_shard, group="query_id")
    images = int(pc.sum(pc.not_equal(requests["qry_image"], "")).as_py() or 0) + int(
        pc.sum(pc.not_equal(requests["cand_image"], "")).as_py() or 0
    )
    counts = {
        "run_queries": sum(len(i) for i in ids),
        "run_calls": run_calls,
        "queries": len(chosen),
        "calls": requests.num_rows,
        "images": images,
    }
    return shards, counts


# --------------------------------------------------------------------------------------------- settings


def _from_score_folder(folder: Path, requests: list[Path], out: Path) -> None:
    """A folder of judge score files (e.g. a run's mining/judge/results) as a setting: the rows of the
    sample's requests, with their token counts when the files have them."""
    keys = ["query_id", "cand_id"]
    req = pa.concat_tables(
        pq.read_table(p, columns=[n for n in JUDGE_SCORES.names if n != "score"]) for p in requests
    )
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
    scores = pa.concat_tables(
        pq.read_table(f, columns=["query_id", "cand_id", "is_positive", "rank", "score"]) for f in files
    )
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


# ----------------------------------------------------------------------------------------------- report


def _fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:,.{digits}f}" if isinstance(x, float) else f"{x:,}"


def _decision_row(label: str, d: dict) -> str:
    counts = " | ".join(str(d[k]) for k in ("both", "a_only", "b_only", "neither"))
    return f"| {label} | {counts} | {_fmt(d['agreement'])} | {_fmt(d['kappa'])} |"


def markdown(result: dict) -> str:
    s, a, b = result["agreement"], result["settings"]["A"], result["settings"]["B"]
    sample = result["sample"]
    lines = [
        "# Judge agreement",
        "",
        f"- A: {a['describe']}",
        f"- B: {b['describe']}",
        f"- differences: {'; '.join(result['differences']) or 'none'}",
        f"- {sample['queries']} queries (seed {result['seed']}) of {sample['run_queries']}, "
        f"{sample['calls']} judge calls per setting; sampling rules: {result['rules']}",
        "",
        "| per setting | A | B |",
        "|---|---|---|",
    ]
    rows = [
        ("prompt tokens per call", "prompt_tokens_per_call", 1),
        ("computed tokens per call", "computed_tokens_per_call", 1),
        ("image tokens per call", "image_tokens_per_call", 1),
        ("share of prompt tokens from the prefix cache", "cache_hit_rate", 3),
        ("judge busy seconds", "seconds", 1),
        ("judge calls per busy second", "calls_per_s", 1),
        ("wall seconds (model start included)", "wall_seconds", 1),
    ]
    for label, key, digits in rows:
        lines.append(
            f"| {label} | {_fmt(a['tokens'].get(key), digits)} | {_fmt(b['tokens'].get(key), digits)} |"
        )
    checks = [x.get("simulated_as_measured") for x in (a, b)]
    if any(checks):
        cells = [_fmt(c["cache_hit_rate"]) if c else "—" for c in checks]
        lines.append(f"| simulated prefix cache at the measured size (check) | {cells[0]} | {cells[1]} |")
    pa_, pb = a.get("projection"), b.get("projection")
    if pa_ or pb:
        first = pa_ or pb
        lines.append(
            f"| **projection** to {first['calls']:,.0f} calls, KV blocks of {first['block_size']} tokens, "
            f"{first['assumptions']['llm_params_b']:g}B + {first['assumptions']['vision_params_b']:g}B "
            "vision parameters | | |"
        )
        for label, key, digits in [
            ("image tokens per image", "image_tokens_per_image", 0),
            ("prompt tokens per call", "prompt_tokens_per_call", 1),
            ("share from the prefix cache", "cache_hit_rate", 3),
            ("computed tokens per call", "computed_tokens_per_call", 1),
            ("H100-hours", "gpu_hours", 1),
        ]:
            va, vb = (p.get(key) if p else None for p in (pa_, pb))
            lines.append(f"| {label} | {_fmt(va, digits)} | {_fmt(vb, digits)} |")
    lines += [
        "",
        "| agreement per query | median | IQR | mean | queries (undefined) |",
        "|---|---|---|---|---|",
    ]
    for label, key in [
        ("Spearman", "spearman"),
        ("Kendall tau-b", "kendall"),
        ("hard negatives, Jaccard", "hard_negatives_jaccard"),
    ]:
        v = s[key]
        iqr = f"{_fmt(v['p25'])} – {_fmt(v['p75'])}" if v["n"] else "—"
        lines.append(
            f"| {label} | {_fmt(v['median'])} | {iqr} | {_fmt(v['mean'])} | {v['n']} ({v['undefined']}) |"
        )
    f, fb = s["false_negative_filter"], s["fallback"]
    lines += [
        "",
        "| decision | both | A only | B only | neither | agreement | kappa |",
        "|---|---|---|---|---|---|---|",
        _decision_row("candidate dropped as a false negative", f),
        _decision_row("query falls back (no survivor)", fb),
        "",
        f"Identical hard-negative sets: {s['identical_hard_negatives']} of {s['queries']} queries.",
    ]
    if s["queries_with_failed_calls"]:
        lines.append(
            f"Left out: {len(s['queries_with_failed_calls'])} queries with a failed judge call (NaN)."
        )
    return "\n".join(lines) + "\n"


def scatter(table: pa.Table, per_query: list[dict], labels: tuple[str, str], path: Path) -> None:
    """B's score against A's for every judged pair: positives, candidates both settings treat alike, and
    candidates the false-negative filter drops under one setting only."""
    fig = Figure(figsize=(6.5, 6.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    a, b = table["score_a"].to_numpy(), table["score_b"].to_numpy()
    pos = table["is_positive"].to_numpy(zero_copy_only=False)
    split = {(r["query_id"], c) for r in per_query for c in set(r["dropped_a"]) ^ set(r["dropped_b"])}
    keys = zip(table["query_id"].to_pylist(), table["cand_id"].to_pylist(), strict=True)
    one = np.array([k in split for k in keys], bool)
    for mask, label, color in [
        (~pos & ~one, "candidates", "tab:gray"),
        (one, "dropped as false negative by one setting only", "tab:red"),
        (pos, "positives", "tab:green"),
    ]:
        if mask.any():
            ax.scatter(a[mask], b[mask], s=8, alpha=0.6, color=color, label=f"{label} (n={int(mask.sum())})")
    low = float(min(a.min(), b.min(), 0.0)) if len(a) else 0.0
    high = float(max(a.max(), b.max(), 1.0)) if len(a) else 1.0
    ax.plot([low, high], [low, high], color="black", linewidth=0.8, alpha=0.5)
    ax.set_xlim(low, high)
    ax.set_ylim(low, high)
    ax.set_xlabel(f"A: {labels[0]}"[:90])
    ax.set_ylabel(f"B: {labels[1]}"[:90])
    ax.set_title(f"Judge scores of {len(a)} pairs, A against B")
    ax.grid(alpha=0.3)
    if len(a):
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


# ----------------------------------------------------------------------------------------------- driver


def judge_agree(
    cfg_a: Config,
    judge_b: JudgeConfig,
    n: int,
    out: Path,
    *,
    seed: int = 0,
    calls: float | None = None,
    image_sizes: tuple[int | None, int | None] = (None, None),
    llm_params_b: float = 7.6,
    vision_params_b: float = 0.675,
    project_block: int = 16,
) -> dict:
    """Judge a seeded sample of `n` of the run's queries with `cfg_a.judge` and with `judge_b` and compare
    them (module docstring); write agree.json, agree.md, scatter.png into `out` and return the result."""
    from unime_ray.mining.pipeline import run_mining

    mining = Path(cfg_a.run.output_dir) / "mining"
    if not (mining / "retrieve/_SUCCESS.json").is_file():
        print(f"[judge-agree] {mining} has no retrieved candidates yet: mining up to retrieve", flush=True)
        run_mining(cfg_a, ("retrieve",))
    out.mkdir(parents=True, exist_ok=True)
    actors = max(1, cfg_a.mining.num_actors)
    per_shard = max(1, min(cfg_a.mining.judge_shard_queries, -(-n // (2 * actors))))
    requests, sample = write_sample(mining, n, seed, out / "requests", per_shard)
    print(f"[judge-agree] {sample['queries']} queries, {sample['calls']} judge calls per setting", flush=True)
    table = pa.concat_tables(pq.read_table(p) for p in requests)
    settings, scores = {}, {}
    for label, judge, px in (("A", cfg_a.judge, image_sizes[0]), ("B", judge_b, image_sizes[1])):
        print(f"[judge-agree] setting {label}: {describe(judge)}", flush=True)
        scores[label], tokens = run_setting(judge, requests, out / label, cfg_a.data.image_root, cfg_a.mining)
        entry = {"describe": describe(judge), "judge": asdict(judge), "tokens": tokens}
        measured = tokens["image_tokens"] / sample["images"] if tokens["calls"] and sample["images"] else 0
        if judge.backend == "vllm" and judge.block_size and measured == int(measured):
            # the simulated cache where the engine measured it: how far the projection can be trusted
            entry["simulated_as_measured"] = simulate(table, judge, int(measured), judge.block_size)
        entry["projection"] = None
        if tokens["calls"] and (Path(judge.model.path) / "config.json").is_file():
            size = image_tokens_at(px) if px else round(measured)
            sim = simulate(table, judge, size, project_block)
            entry["projection"] = {
                **project(
                    sim,
                    calls or sample["run_calls"],
                    llm_params_b=llm_params_b,
                    vision_params_b=vision_params_b,
                ),
                "image_size": px,
                "image_tokens_per_image": size,
                "block_size": project_block,
                "prompt_tokens_per_call": sim["prompt_tokens_per_call"],
                "cache_hit_rate": sim["cache_hit_rate"],
                "by_candidate": {
                    kind: {
                        "calls": part["calls"],
                        "prompt_tokens_per_call": part["prompt_tokens_per_call"],
                        "computed_tokens_per_call": part["computed_tokens_per_call"],
                        "computed_image_tokens_per_call": part["computed_image_tokens"] / part["calls"]
                        if part["calls"]
                        else None,
                    }
                    for kind, part in sim["by_candidate"].items()
                },
            }
        settings[label] = entry
    keys = ["query_id", "cand_id"]
    both = (
        scores["A"]
        .rename_columns(["query_id", "cand_id", "is_positive", "rank", "score_a"])
        .join(
            scores["B"].select([*keys, "score"]).rename_columns([*keys, "score_b"]), keys, join_type="inner"
        )
    )
    if both.num_rows != scores["A"].num_rows:
        raise RuntimeError(
            f"the settings judged different pairs: {both.num_rows} of {scores['A'].num_rows} shared"
        )
    rules = Rules.of(cfg_a)
    per_query, summary = compare(both, rules)
    result = {
        "seed": seed,
        "run": str(mining.parent),
        "sample": sample,
        "rules": asdict(rules),
        "differences": differences(cfg_a.judge, judge_b),
        "settings": settings,
        "agreement": summary,
        "per_query": per_query,
    }
    write_json(result, out / "agree.json")
    with atomic_path(out / "agree.md") as tmp:
        Path(tmp).write_text(markdown(result))
    scatter(
        both.sort_by([("query_id", "ascending"), ("rank", "ascending")]),
        per_query,
        (settings["A"]["describe"], settings["B"]["describe"]),
        out / "scatter.png",
    )
    return result


def _config_b(args) -> Config:
    """Setting B's config: `--against` (a config file, or A's config with B's scores) + `--against-set`."""
    against = args.against
    if against and Path(against).suffix in (".yaml", ".yml"):
        return load_config(against, args.against_set)
    overrides = [*args.overrides, *args.against_set]
    if against:
        if not Path(against).exists():
            raise SystemExit(f"[judge-agree] --against {against}: no such config, score file or folder")
        overrides += ["judge.backend=precomputed", f"judge.scores_path={Path(against).resolve()}"]
    return load_config(args.config, overrides)


def main(argv: list[str] | None = None) -> None:
    from unime_ray.assets import prepare_synthetic
    from unime_ray.ray_utils import init_ray
    from unime_ray.runlock import command_lock

    p = argparse.ArgumentParser(
        prog="unime-ray judge-agree",
        description="Judge a seeded sample of a run's mined queries with two judge settings; report their "
        "agreement (rank correlation, false-negative drops, hard-negative overlap, fallbacks) and their "
        "measured tokens, cache hits and projected GPU-hours.",
    )
    add_config_args(p, default="jobs/configs/tiny.yaml")
    p.add_argument(
        "--against",
        default="",
        help="setting B: a config file (its judge section), or a score "
        "file (query_id, cand_id, score) or folder of judge score files; default: A's config",
    )
    p.add_argument(
        "--against-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override for setting B's config, e.g. judge.model.image_size=448 (repeatable)",
    )
    p.add_argument("--queries", type=int, default=100, help="queries in the sample (default 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    p.add_argument("--out", default="", help="output folder (default <run.output_dir>/judge_agree)")
    p.add_argument(
        "--calls",
        type=float,
        default=None,
        help="judge calls of the full run to project to (default: the run's own; paper: 33.8e6)",
    )
    p.add_argument(
        "--project-image-size",
        type=int,
        nargs="+",
        default=None,
        metavar="PX",
        help="project each setting (A [B]) at images of PX x PX (Qwen2-VL tokens: (PX/28)^2)",
    )
    p.add_argument(
        "--project-block-size",
        type=int,
        default=16,
        help="KV block size of the projected run's prefix cache (default 16: vLLM's on GPUs)",
    )
    p.add_argument(
        "--llm-params-b", type=float, default=7.6, help="language model size for the projection (billions)"
    )
    p.add_argument(
        "--vision-params-b",
        type=float,
        default=0.675,
        help="vision encoder size for the projection (billions)",
    )
    args = p.parse_args(argv)
    cfg, cfg_b = config_from_args(args), _config_b(args)
    with command_lock(cfg.run.output_dir, "judge-agree"):
        prepare_synthetic(cfg)
        prepare_synthetic(cfg_b)
        px = args.project_image_size or [None]
        sizes = (px[0], px[1] if len(px) > 1 else px[0])
        init_ray(cfg.ray.address, verbose=cfg.ray.verbose)
        out = Path(args.out) if args.out else Path(cfg.run.output_dir) / "judge_agree"
        result = judge_agree(
            cfg,
            cfg_b.judge,
            args.queries,
            out,
            seed=args.seed,
            calls=args.calls,
            image_sizes=sizes,
            llm_params_b=args.llm_params_b,
            vision_params_b=args.vision_params_b,
            project_block=args.project_block_size,
        )
    print(markdown(result))
    print(f"[judge-agree] wrote {out / 'agree.json'}, {out / 'agree.md'}, {out / 'scatter.png'}")
