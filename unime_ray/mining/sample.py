"""Sample stage of mining: judge scores -> hard negatives (paper, "Hard Negative Sampling").

Per query q with positive score s_pos = s(q, c_t) and its judged potential negatives (candidate, retrieval
rank, score s):

1. False-negative filter: drop every candidate with s > s_pos - beta. The comparison is strict and exact,
   in float64 on the stored values, so a score equal to the threshold survives. Stored scores are float32,
   so a stored 0.8 (0.80000001) lies just above a stored 0.9 (0.89999998) minus 0.1: exact ties happen
   only with values float32 holds exactly (0.75, 0.125, ...); real judge scores practically never do.
2. The survivors are ordered hardest first: score descending, ties by retrieval rank ascending (our
   reading; the paper does not say how ties break).
3. Cyclical sampling with a step of `interval` (paper: five) over that order: positions 0, 5, 10, ...,
   then 1, 6, 11, ..., up to offset interval-1. Every survivor is visited once, and the first picks
   spread over the whole score range instead of crowding at the top (the paper's "diversity").
4. Fewer than `min_negatives` survivors: the cyclical selection is repeated in order until there are
   `min_negatives` ([a, b, c] -> a b c a b c a b c a), as in the official release.
5. No survivor at all (paper: < 1% of queries): `min_negatives` distinct random candidates of the query's
   whole judged pool (all of them, in random order and padded as in 4, when the pool is smaller), each
   with score 1.0 as the paper prescribes; the row is marked `fallback`.
6. The first `num_negatives` of that list are kept (official release: 10; training uses the first 8). A
   row therefore holds between min(min_negatives, num_negatives) and num_negatives negatives; set both
   equal for a fixed count.

Randomness is used only in 5, from a generator seeded by (run seed, query id) with a stable hash, so a
re-run gives the same output and a query's draw does not depend on which other queries are in the run.

`run_sample` reads nothing but the stored JUDGE_SCORES files and the QUERIES / POOL tables, so re-sampling
with another beta, interval or count costs seconds, not another judge run. It writes into `out_dir`
(each file atomically):

- `hard_negatives.parquet` — HARD_NEGATIVES rows, sorted by query id.
- `hard_negatives.json` — the official UniME-V2 release format: a JSON list of `{query_text, query_image,
  pos_text, pos_image, query_pos_scores, hard_negatives: [[text, image], ...], hard_negatives_scores}`,
  one record per line, image "" when a side has none.
- `quarantine.parquet` — what could not be used, never dropped silently (QUARANTINE schema; `row` is the
  0-based row in the score file, -1 for a whole query; `source` is "" for a query with no score rows).
  Reasons, per row: `null_value` (a required column is null), `nan_score`, `unknown_candidate` (cand_id not
  in the pool); per query: `unknown_query` (not in QUERIES), `positive_not_in_pool`, `no_positive_score`,
  `several_positive_scores`, `no_judged_candidates`, `no_judge_scores` (in QUERIES, in no score file).
- `report.json` — query counts, fallbacks, the survivors histogram as [[num_survivors, queries], ...],
  count / mean / median of the positive scores, of all judged candidate scores and of the selected
  negative scores (as stored: with padding repeats and fallback 1.0s), quarantine counts by reason.
- `scores.png` — histograms of those three score populations.

Score files are read one at a time (a query's rows never span files; if they do, it is an error), so
memory holds one file plus, for the whole run, only row indices and float scores.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from unime_ray.config import MiningConfig
from unime_ray.data.mmeb import DataError
from unime_ray.data.schemas import HARD_NEGATIVES, JUDGE_SCORES, QUARANTINE
from unime_ray.io import atomic_path, write_json, write_parquet

SCORE_COLUMNS = ["query_id", "cand_id", "is_positive", "rank", "score"]


@dataclass
class Sampled:
    """The negatives chosen for one query."""

    indices: list[int]  # into the candidate arrays given to `sample_negatives`, in stored order
    scores: list[float]  # the judge scores of those candidates; 1.0 each on fallback
    num_survivors: int  # candidates left by the false-negative filter
    fallback: bool  # no candidate survived: random candidates with score 1.0


def cyclic_order(n: int, interval: int) -> list[int]:
    """Positions 0..n-1 visited with a step of `interval`: 0, i, 2i, ..., then 1, 1+i, ..., etc."""
    return [pos for offset in range(interval) for pos in range(offset, n, interval)]


def query_rng(seed: int, query_id: str) -> np.random.Generator:
    """The generator of one query's fallback draw; hashlib because Python salts hash() per process."""
    digest = hashlib.blake2b(query_id.encode("utf-8"), digest_size=8).digest()
    return np.random.default_rng([seed, int.from_bytes(digest, "little")])


def sample_negatives(
    pos_score: float,
    scores: np.ndarray,
    ranks: np.ndarray,
    *,
    beta: float,
    interval: int,
    min_negatives: int,
    num_negatives: int,
    rng: np.random.Generator,
) -> Sampled:
    """Apply the paper's sampling rules (module docstring, 1-6) to one query's judged candidates."""
    scores = np.asarray(scores, dtype=np.float64)
    ranks = np.asarray(ranks)
    if len(scores) == 0 or len(scores) != len(ranks):
        raise ValueError(
            f"need one rank per score and at least one candidate, got {len(scores)}, {len(ranks)}"
        )
    # NaN compares False with everything, so a NaN would pass the filter unnoticed.
    if not np.isfinite(pos_score) or np.isnan(scores).any():
        raise ValueError(f"scores must not be NaN (positive score {pos_score})")
    if min(interval, min_negatives, num_negatives) < 1:
        raise ValueError(
            f"interval, min_negatives, num_negatives must be >= 1: {interval, min_negatives, num_negatives}"
        )

    survivors = np.flatnonzero(scores <= pos_score - beta)
    fallback = len(survivors) == 0
    if fallback:
        picks = [int(i) for i in rng.choice(len(scores), size=min(len(scores), min_negatives), replace=False)]
    else:
        # lexsort sorts by its last key first: score descending, then rank ascending.
        hardest_first = survivors[np.lexsort((ranks[survivors], -scores[survivors]))]
        picks = [int(hardest_first[pos]) for pos in cyclic_order(len(hardest_first), interval)]
    if len(picks) < min_negatives:
        picks = [picks[i % len(picks)] for i in range(min_negatives)]
    picks = picks[:num_negatives]
    picked_scores = [1.0] * len(picks) if fallback else [float(scores[i]) for i in picks]
    return Sampled(indices=picks, scores=picked_scores, num_survivors=len(survivors), fallback=fallback)


def _problem(source: Path | str, row: int, id: str | None, field: str, reason: str) -> dict:
    return {"source": str(source), "row": row, "id": id, "field": field, "reason": reason}


def _index_in(values: pa.ChunkedArray, ids: pa.ChunkedArray) -> np.ndarray:
    """Row of each value in `ids`, -1 when absent."""
    return pc.fill_null(pc.index_in(values, value_set=ids), -1).to_numpy()


def _usable_rows(path: Path, pool: pa.Table) -> tuple[pa.Table, list[dict]]:
    """The score rows of one file that can be sampled, each with its candidate's row in `pool`, sorted by
    query id; and a quarantine row for each of the others."""
    wanted = pa.schema([JUDGE_SCORES.field(column) for column in SCORE_COLUMNS])
    try:
        table = pq.read_table(path, columns=SCORE_COLUMNS).cast(wanted)
    except (OSError, KeyError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise DataError(f"{path}: not a judge score file with columns {wanted}: {e}") from e
    pool_row = pc.index_in(table["cand_id"], value_set=pool["id"])
    checks = [(column, "null_value", pc.is_null(table[column])) for column in SCORE_COLUMNS]
    checks.append(("score", "nan_score", pc.is_nan(table["score"])))
    # The positive's text comes from QUERIES.pos_id, so only a negative needs its own pool row.
    checks.append(
        ("cand_id", "unknown_candidate", pc.and_(pc.invert(table["is_positive"]), pc.is_null(pool_row)))
    )
    keep = np.ones(table.num_rows, dtype=bool)
    problems = []
    for field, reason, hits in checks:
        hits = pc.fill_null(hits, False).to_numpy(zero_copy_only=False) & keep
        for row in np.flatnonzero(hits):
            problems.append(_problem(path, int(row), table["query_id"][row].as_py(), field, reason))
        keep &= ~hits
    return table.append_column("pool_row", pool_row).filter(keep).sort_by("query_id"), problems


class _Collector:
    """The run's output as compact numpy chunks: row numbers into QUERIES / POOL and scores, no texts, so
    a run of 662k queries holds tens of MB here. Values are added per query and packed per file."""

    DTYPES = {
        "query": np.int64,  # row in QUERIES
        "pos_score": np.float32,
        "num_survivors": np.int32,
        "fallback": np.bool_,
        "num_negatives": np.int32,
        "neg_pool": np.int64,  # row in POOL, one per stored negative
        "neg_score": np.float32,
        "neg_rank": np.int32,
        "candidate_score": np.float32,  # every judged candidate of a sampled query, for the report
    }

    def __init__(self) -> None:
        self.chunks = {key: [np.zeros(0, dtype)] for key, dtype in self.DTYPES.items()}
        self.pending: dict[str, list[np.ndarray]] = {key: [] for key in self.DTYPES}

    def add(self, **values: object) -> None:
        for key, value in values.items():
            self.pending[key].append(np.atleast_1d(value))

    def pack(self) -> None:
        for key, dtype in self.DTYPES.items():
            if self.pending[key]:
                self.chunks[key].append(np.concatenate(self.pending[key]).astype(dtype))
                self.pending[key] = []

    def arrays(self) -> dict[str, np.ndarray]:
        self.pack()
        return {key: np.concatenate(chunks) for key, chunks in self.chunks.items()}


def _hard_negatives_table(
    out: dict[str, np.ndarray], queries: pa.Table, pool: pa.Table, pos_pool_row: np.ndarray
) -> pa.Table:
    offsets = pa.array(np.r_[0, np.cumsum(out["num_negatives"])].astype(np.int32))

    def per_negative(values: pa.Array | pa.ChunkedArray | np.ndarray) -> pa.ListArray:
        if isinstance(values, pa.ChunkedArray):
            values = values.combine_chunks()
        return pa.ListArray.from_arrays(offsets, values)

    q, pos, neg = out["query"], pos_pool_row[out["query"]], out["neg_pool"]
    columns = {
        "id": queries["id"].take(q),
        "dataset": queries["dataset"].take(q),
        "qry_text": queries["text"].take(q),
        "qry_image": queries["image"].take(q),
        "pos_id": queries["pos_id"].take(q),
        "pos_text": pool["text"].take(pos),
        "pos_image": pool["image"].take(pos),
        "pos_score": out["pos_score"],
        "neg_ids": per_negative(pool["id"].take(neg)),
        "neg_texts": per_negative(pool["text"].take(neg)),
        "neg_images": per_negative(pool["image"].take(neg)),
        "neg_scores": per_negative(out["neg_score"]),
        "neg_ranks": per_negative(out["neg_rank"]),
        "num_survivors": out["num_survivors"],
        "fallback": out["fallback"],
    }
    return pa.table(columns, schema=HARD_NEGATIVES).sort_by("id")


def _stats(values: np.ndarray) -> dict:
    if len(values) == 0:
        return {"count": 0, "mean": None, "median": None}
    return {"count": len(values), "mean": float(np.mean(values)), "median": float(np.median(values))}


def _json_float(value: float) -> float:
    """The shortest decimal that reads back as the same float32: 0.9, not 0.8999999761581421."""
    return float(str(np.float32(value)))


def _write_official_json(table: pa.Table, path: Path) -> None:
    """The official release format, streamed one record per line so memory holds one batch at a time."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write("[")
        separator = "\n"
        for batch in table.to_batches(max_chunksize=4096):
            for r in batch.to_pylist():
                record = {
                    "query_text": r["qry_text"],
                    "query_image": r["qry_image"] or "",
                    "pos_text": r["pos_text"],
                    "pos_image": r["pos_image"] or "",
                    "query_pos_scores": _json_float(r["pos_score"]),
                    "hard_negatives": [
                        [text, image or ""]
                        for text, image in zip(r["neg_texts"], r["neg_images"], strict=True)
                    ],
                    "hard_negatives_scores": [_json_float(s) for s in r["neg_scores"]],
                }
                f.write(separator + json.dumps(record, ensure_ascii=False))
                separator = ",\n"
        f.write("\n]\n")


def _plot_scores(
    positives: np.ndarray, candidates: np.ndarray, negatives: np.ndarray, beta: float, path: Path
):
    """The three score populations on one axis, as densities: their sizes differ by 10-50x."""
    # A bare Figure with an Agg canvas: no pyplot, so no global backend switch in the caller's process.
    fig = Figure(figsize=(10, 5.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    everything = np.concatenate([positives, candidates, negatives])
    # Judge scores live in [0, 1]; scores brought from elsewhere may not, and must still show.
    low = min(0.0, float(everything.min())) if len(everything) else 0.0
    high = max(1.0, float(everything.max())) if len(everything) else 1.0
    bins = np.linspace(low, high, 41)
    for values, label, color in [
        (candidates, f"all judged candidates (n={len(candidates)})", "tab:gray"),
        (negatives, f"selected negatives (n={len(negatives)}, with repeats and fallback 1.0s)", "tab:red"),
        (positives, f"positives s(q, c_t) (n={len(positives)})", "tab:green"),
    ]:
        if len(values):
            ax.hist(
                values, bins=bins, density=True, histtype="stepfilled", alpha=0.3, color=color, label=label
            )
            ax.hist(values, bins=bins, density=True, histtype="step", linewidth=1.5, color=color)
    ax.set_xlim(low, high)
    ax.set_xlabel("judge score s = e_yes / (e_yes + e_no)")
    ax.set_ylabel("density (each histogram has area 1)")
    ax.set_title(
        f"Judge scores of {len(positives)} sampled queries: {len(candidates)} judged candidates, "
        f"{len(negatives)} selected negatives (beta = {beta:g})"
    )
    ax.grid(alpha=0.3)
    if len(everything):
        ax.legend(loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def run_sample(
    score_files: list[Path], queries: pa.Table, pool: pa.Table, out_dir: Path, cfg: MiningConfig, seed: int
) -> dict:
    """Sample hard negatives for the queries of `score_files` (JUDGE_SCORES parquet) with texts and images
    from `queries` (QUERIES) and `pool` (POOL); write the outputs listed in the module docstring into
    `out_dir` and return the report."""
    out_dir = Path(out_dir)
    for name, table in [("queries", queries), ("pool", pool)]:
        if pc.count_distinct(table["id"]).as_py() != table.num_rows:
            raise DataError(f"the {name} table has duplicate ids")
    pos_pool_row = _index_in(queries["pos_id"], pool["id"])
    file_of_query = np.full(queries.num_rows, -1)  # which score file held each query's rows
    problems: list[dict] = []
    collector = _Collector()

    for file_no, path in enumerate(score_files):
        table, file_problems = _usable_rows(path, pool)
        problems += file_problems
        ids = table["query_id"].to_numpy(zero_copy_only=False)
        query_row = _index_in(table["query_id"], queries["id"])
        is_positive = table["is_positive"].to_numpy(zero_copy_only=False)
        ranks = table["rank"].to_numpy()
        scores = table["score"].to_numpy().astype(np.float64)
        pool_row = table["pool_row"].to_numpy()
        # Rows are sorted by query id, so each query is one run of rows [start, end).
        starts = np.flatnonzero(np.r_[len(ids) > 0, ids[1:] != ids[:-1]])
        for start, end in zip(starts, np.r_[starts[1:], len(ids)], strict=True):
            query_id, q = ids[start], query_row[start]
            if q < 0:
                problems.append(_problem(path, -1, query_id, "query_id", "unknown_query"))
                continue
            if file_of_query[q] >= 0:
                raise DataError(
                    f"query {query_id!r} has score rows in {score_files[file_of_query[q]]} and in {path}; "
                    "all rows of a query must be in one file"
                )
            file_of_query[q] = file_no
            positives = start + np.flatnonzero(is_positive[start:end])
            negatives = start + np.flatnonzero(~is_positive[start:end])
            if pos_pool_row[q] < 0:
                problems.append(_problem(path, -1, query_id, "pos_id", "positive_not_in_pool"))
            elif len(positives) == 0:
                problems.append(_problem(path, -1, query_id, "is_positive", "no_positive_score"))
            elif len(positives) > 1:
                problems.append(_problem(path, -1, query_id, "is_positive", "several_positive_scores"))
            elif len(negatives) == 0:
                problems.append(_problem(path, -1, query_id, "cand_id", "no_judged_candidates"))
            else:
                sampled = sample_negatives(
                    scores[positives[0]],
                    scores[negatives],
                    ranks[negatives],
                    beta=cfg.beta,
                    interval=cfg.interval,
                    min_negatives=cfg.min_negatives,
                    num_negatives=cfg.num_negatives,
                    rng=query_rng(seed, query_id),
                )
                chosen = negatives[sampled.indices]
                collector.add(
                    query=q,
                    pos_score=scores[positives[0]],
                    num_survivors=sampled.num_survivors,
                    fallback=sampled.fallback,
                    num_negatives=len(chosen),
                    neg_pool=pool_row[chosen],
                    neg_score=sampled.scores,
                    neg_rank=ranks[chosen],
                    candidate_score=scores[negatives],
                )
        collector.pack()
    for q in np.flatnonzero(file_of_query < 0):
        problems.append(_problem("", -1, queries["id"][q].as_py(), "id", "no_judge_scores"))

    out = collector.arrays()
    result = _hard_negatives_table(out, queries, pool, pos_pool_row)
    write_parquet(result, out_dir / "hard_negatives.parquet")
    _write_official_json(result, out_dir / "hard_negatives.json")
    write_parquet(pa.Table.from_pylist(problems, schema=QUARANTINE), out_dir / "quarantine.parquet")
    _plot_scores(out["pos_score"], out["candidate_score"], out["neg_score"], cfg.beta, out_dir / "scores.png")

    num_out, num_fallback = len(out["query"]), int(out["fallback"].sum())
    survivors, counts = np.unique(out["num_survivors"], return_counts=True)
    report = {
        "beta": cfg.beta,
        "interval": cfg.interval,
        "min_negatives": cfg.min_negatives,
        "num_negatives": cfg.num_negatives,
        "seed": seed,
        "score_files": [str(path) for path in score_files],
        "queries_in": queries.num_rows,
        "queries_out": num_out,
        "queries_quarantined": queries.num_rows - num_out,
        "fallback": num_fallback,
        "fallback_pct": 100.0 * num_fallback / num_out if num_out else 0.0,
        "survivors_histogram": [[int(k), int(n)] for k, n in zip(survivors, counts, strict=True)],
        "scores": {
            "positives": _stats(out["pos_score"]),
            "candidates": _stats(out["candidate_score"]),
            "negatives": _stats(out["neg_score"]),
        },
        "quarantine_by_reason": dict(Counter(problem["reason"] for problem in problems)),
    }
    write_json(report, out_dir / "report.json")
    return report
