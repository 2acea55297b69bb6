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
a task's memory holds one file plus its datasets' row indices and scores; the report's score populations
reach the driver as files, summarised one at a time (`score_stats.py`).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from unime_ray.config import MiningConfig
from unime_ray.data.mmeb import DataError
from unime_ray.data.schemas import HARD_NEGATIVES, JUDGE_SCORES, QUARANTINE
from unime_ray.engine.lookup import index_in_many
from unime_ray.engine.tasks import run_tasks
from unime_ray.io import (
    MERGE_ROWS,
    PART_ROWS,
    atomic_path,
    merge_order,
    merge_sorted,
    parquet_batches,
    parquet_datasets,
    write_json,
    write_parquet,
)
from unime_ray.keyed import key_rng as query_rng  # one query's fallback draw
from unime_ray.mining.score_stats import POPULATIONS, plot_scores, save_scores, score_stats

SCORE_COLUMNS = ["query_id", "cand_id", "is_positive", "rank", "score"]
LOOKUP_ROWS = 1 << 20  # score rows whose ids are looked up at once (`_FilesSampler.sample_files`)


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


def survives(pos_score: float, scores: np.ndarray, beta: float) -> np.ndarray:
    """Rule 1, the false-negative filter: True for each candidate kept (s <= s_pos - beta, in float64)."""
    return np.asarray(scores, dtype=np.float64) <= np.float64(pos_score) - beta


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
    _check_settings(interval, min_negatives, num_negatives)

    survivors = np.flatnonzero(survives(pos_score, scores, beta))
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


def _check_settings(interval: int, min_negatives: int, num_negatives: int) -> None:
    if min(interval, min_negatives, num_negatives) < 1:
        raise ValueError(
            f"interval, min_negatives, num_negatives must be >= 1: {interval, min_negatives, num_negatives}"
        )


def _slot_starts(lengths: np.ndarray) -> np.ndarray:
    """Where each query's slots start in the flat slot arrays, plus the total at the end."""
    return np.r_[0, np.cumsum(lengths)].astype(np.int64)


def _slots_of(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(query, position within the query) of every flat slot, for queries with `lengths` slots each."""
    query = np.repeat(np.arange(len(lengths)), lengths)
    return query, np.arange(len(query)) - _slot_starts(lengths)[query]


@dataclass
class SampledMany:
    """The negatives chosen for many queries at once (`sample_many`), query after query."""

    slots: np.ndarray  # int64 indices into the candidate arrays given to `sample_many`, query after query
    num_negatives: np.ndarray  # int64 per query: its number of slots (0 for a fallback query)
    num_survivors: np.ndarray  # int64 per query


def sample_many(
    pos_scores: np.ndarray,
    group: np.ndarray,
    scores: np.ndarray,
    ranks: np.ndarray,
    *,
    beta: float,
    interval: int,
    min_negatives: int,
    num_negatives: int,
) -> SampledMany:
    """Rules 1-4 and 6 of `sample_negatives` for every query of a file in a few array passes: query g has
    positive score `pos_scores[g]` and the candidates i with `group[i] == g` (`group` non-decreasing).
    Each non-fallback query gets exactly the indices `sample_negatives` picks from its candidates, in the
    same order (tests/test_sample.py compares the two); a query with no survivor gets no slots, and its
    random fallback (rule 5) is left to `sample_negatives`, whose generator it needs."""
    _check_settings(interval, min_negatives, num_negatives)
    scores = np.asarray(scores, dtype=np.float64)
    count = len(pos_scores)
    survivors = np.flatnonzero(survives(pos_scores[group], scores, beta))
    g = group[survivors]
    # lexsort sorts by its last key first: query, then score descending, then rank ascending; it is
    # stable, so full ties keep the stored order, as in `sample_negatives`.
    hardest_first = survivors[np.lexsort((ranks[survivors], -scores[survivors], g))]
    n = np.bincount(g, minlength=count)
    first = np.r_[0, np.cumsum(n)[:-1]]
    g = group[hardest_first]
    pos = np.arange(len(hardest_first)) - first[g]  # position in the query's hardest-first order
    # Rule 3 in closed form: with n = a * interval + b, offset o holds a + 1 positions for o < b, else
    # a; so position p (offset r = p % interval) is visited after r * a + min(r, b) earlier-offset
    # positions and p // interval positions of its own offset.
    a, b, r = n[g] // interval, n[g] % interval, pos % interval
    cyclic = np.empty_like(hardest_first)
    cyclic[first[g] + pos // interval + r * a + np.minimum(r, b)] = hardest_first
    # Rules 4 and 6: slot j of a query with n survivors is its cyclic pick j % n, for j < its length.
    length = np.where(n > 0, np.minimum(np.maximum(n, min_negatives), num_negatives), 0)
    query, j = _slots_of(length)
    slots = cyclic[first[query] + j % np.maximum(n[query], 1)]
    return SampledMany(slots=slots, num_negatives=length, num_survivors=n)


def _problems(
    source: Path | str, rows: np.ndarray, ids: pa.Array | list, field: str, reason: str
) -> pa.Table:
    """Quarantine rows (QUARANTINE schema), one per row number in `rows` (-1: a whole query)."""
    n = len(rows)
    columns = {
        "source": pa.repeat(pa.scalar(str(source)), n),
        "row": pa.array(rows, pa.int64()),
        "id": pa.array(ids, pa.string()),
        "field": pa.repeat(pa.scalar(field), n),
        "reason": pa.repeat(pa.scalar(reason), n),
    }
    return pa.table(columns, schema=QUARANTINE)


def _index_in(values: pa.ChunkedArray, ids: pa.ChunkedArray) -> np.ndarray:
    """Row of each value in `ids`, -1 when absent."""
    return pc.fill_null(pc.index_in(values, value_set=ids), -1).to_numpy()


def _read_scores(path: Path) -> pa.Table:
    wanted = pa.schema([JUDGE_SCORES.field(column) for column in SCORE_COLUMNS])
    try:
        return pq.read_table(path, columns=SCORE_COLUMNS).cast(wanted)
    except (OSError, KeyError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise DataError(f"{path}: not a judge score file with columns {wanted}: {e}") from e


def _usable_rows(path: Path, table: pa.Table) -> tuple[pa.Table, list[pa.Table]]:
    """The score rows of one file (with its rows' `pool_row` and `query_row`, null where the id is
    unknown) that can be sampled, sorted by query id; and the quarantine rows of the others."""
    checks = [(column, "null_value", pc.is_null(table[column])) for column in SCORE_COLUMNS]
    checks.append(("score", "nan_score", pc.is_nan(table["score"])))
    # The positive's text comes from QUERIES.pos_id, so only a negative needs its own pool row.
    unknown = pc.and_(pc.invert(table["is_positive"]), pc.is_null(table["pool_row"]))
    checks.append(("cand_id", "unknown_candidate", unknown))
    keep = np.ones(table.num_rows, dtype=bool)
    problems = []
    for field, reason, hits in checks:
        rows = np.flatnonzero(pc.fill_null(hits, False).to_numpy(zero_copy_only=False) & keep)
        problems.append(_problems(path, rows, table["query_id"].take(rows), field, reason))
        keep[rows] = False
    return table.filter(keep).sort_by("query_id"), problems


REPORT_ARRAYS = ("num_survivors", "fallback")  # per task, for the report; the scores go to files


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


def _json_floats(values: pa.Array) -> list[float]:
    """Each float32 value as the float of its shortest decimal (0.9, not 0.8999999761581421), as
    `float(str(np.float32(v)))` gives it: Arrow formats a float32 with its shortest round-trip digits and
    reads them back as the nearest float64, in C for a whole array (the same floats on every finite
    float32 pattern tried, random bits included; tests/test_sample.py checks a sample)."""
    return pc.cast(pc.cast(values, pa.string()), pa.float64()).to_numpy(zero_copy_only=False).tolist()


def _official_lines(table: pa.Table) -> Iterator[str]:
    """The official release format of HARD_NEGATIVES rows, one JSON record per row (no newline in it:
    json.dumps escapes control characters)."""
    texts = ("qry_text", "qry_image", "pos_text", "pos_image", "neg_texts", "neg_images")
    for batch in table.to_batches(max_chunksize=4096):
        c = {name: batch[name].to_pylist() for name in texts}
        negatives = batch["neg_scores"]
        flat, ends = _json_floats(negatives.flatten()), np.cumsum(negatives.value_lengths().to_numpy())
        for i, pos_score in enumerate(_json_floats(batch["pos_score"])):
            record = {
                "query_text": c["qry_text"][i],
                "query_image": c["qry_image"][i] or "",
                "pos_text": c["pos_text"][i],
                "pos_image": c["pos_image"][i] or "",
                "query_pos_scores": pos_score,
                "hard_negatives": [
                    [text, image or ""]
                    for text, image in zip(c["neg_texts"][i], c["neg_images"][i], strict=True)
                ],
                "hard_negatives_scores": flat[ends[i] - len(c["neg_texts"][i]) : ends[i]],
            }
            yield json.dumps(record, ensure_ascii=False)


def _official_part(part: Path) -> Path:
    return part.with_suffix(".official.jsonl")


def _write_official_json(parts: list[Path], order: np.ndarray, path: Path) -> None:
    """The official release format (a JSON list, one record per line) of the merged output: the records
    the tasks wrote per part (`_official_part`), taken in the merge's `order` (the part of each row)."""
    readers = [open(_official_part(part), encoding="utf-8", newline="\n") for part in parts]
    try:
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write("[")
            separator = "\n"
            for i in order:
                f.write(separator + next(readers[i])[:-1])
                separator = ",\n"
            f.write("\n]\n")
    finally:
        for reader in readers:
            reader.close()


def _rows_of(source: pa.Table | str, datasets: list[str], columns: list[str]) -> pa.Table:
    """The rows of `datasets` in a QUERIES / POOL table or file (a file reads only their row groups)."""
    if isinstance(source, pa.Table):
        return source.filter(pc.is_in(source["dataset"], value_set=pa.array(datasets))).select(columns)
    return pq.read_table(source, columns=columns, filters=[("dataset", "in", datasets)])


def _split_query_error(query_id: str, first: str | Path, second: str | Path) -> DataError:
    """A query whose score rows span two files: sampling reads one file at a time, so it must not."""
    return DataError(
        f"query {query_id!r} has score rows in {first} and in {second}; "
        "all rows of a query must be in one file"
    )


def _query_problem(q: int, pos_pool_row: np.ndarray, num_positives: int, num_negatives: int) -> tuple | None:
    """(field, reason) why a query's score rows cannot be sampled, or None when they can."""
    if q < 0:
        return ("query_id", "unknown_query")
    if pos_pool_row[q] < 0:
        return ("pos_id", "positive_not_in_pool")
    if num_positives == 0:
        return ("is_positive", "no_positive_score")
    if num_positives > 1:
        return ("is_positive", "several_positive_scores")
    if num_negatives == 0:
        return ("cand_id", "no_judged_candidates")
    return None


class _FilesSampler:
    """One `_sample_files` task: its datasets' queries and pool, which score file held each query, the
    sampled output (`_Collector`) and the quarantined rows."""

    def __init__(self, queries: pa.Table, pool: pa.Table, cfg: MiningConfig, seed: int) -> None:
        self.queries, self.pool, self.cfg, self.seed = queries, pool, cfg, seed
        self.pos_pool_row = _index_in(queries["pos_id"], pool["id"])
        self.file_of_query = np.full(queries.num_rows, -1)
        self.problems: list[pa.Table] = []
        self.collector = _Collector()

    def sample_files(self, files: list[Path]) -> None:
        """Sample every query of `files`, in order. Their ids are looked up in the task's pool and queries
        for a chunk of files at once (LOOKUP_ROWS rows): a lookup hashes the whole pool, or all the
        queries, and once per file it grew with the square of a dataset (engine/lookup.py)."""
        chunk: list[tuple[int, pa.Table]] = []
        rows = 0
        for file_no, path in enumerate(files):
            chunk.append((file_no, _read_scores(path)))
            rows += chunk[-1][1].num_rows
            if rows >= LOOKUP_ROWS or file_no == len(files) - 1:
                tables = [t for _, t in chunk]
                pool_rows = index_in_many([t["cand_id"] for t in tables], self.pool["id"])
                query_rows = index_in_many([t["query_id"] for t in tables], self.queries["id"])
                for (no, table), pool_row, query_row in zip(chunk, pool_rows, query_rows, strict=True):
                    table = table.append_column("pool_row", pool_row).append_column("query_row", query_row)
                    self.sample_file(files, no, table)
                chunk, rows = [], 0

    def sample_file(self, files: list[Path], file_no: int, table: pa.Table) -> None:
        """Sample every query of `files[file_no]` (its rows `table`, with their `pool_row` and
        `query_row`), quarantining the rows and queries that cannot be."""
        path = files[file_no]
        table, file_problems = _usable_rows(path, table)
        self.problems += file_problems
        ids = table["query_id"].to_numpy(zero_copy_only=False)
        is_positive = table["is_positive"].to_numpy(zero_copy_only=False)
        # Rows are sorted by query id, so each query is one run of rows [start, start + size).
        starts = np.flatnonzero(np.r_[len(ids) > 0, ids[1:] != ids[:-1]])
        sizes = np.diff(np.r_[starts, len(ids)])
        group = np.repeat(np.arange(len(starts)), sizes)
        q = pc.fill_null(table["query_row"], -1).to_numpy()[starts]
        self._claim(q, ids[starts], files, file_no)
        positives = np.bincount(group, weights=is_positive.astype(np.float64), minlength=len(starts))
        positives = positives.astype(np.int64)
        usable = self._quarantine_queries(path, ids[starts], q, positives, sizes - positives)
        positive_row = np.full(len(starts), -1)
        positive_row[group[is_positive]] = np.flatnonzero(is_positive)
        candidates = np.flatnonzero(~is_positive & usable[group])
        compact = np.cumsum(usable) - 1  # group -> index among the usable queries
        columns = {
            "score": table["score"].to_numpy().astype(np.float64),
            "rank": table["rank"].to_numpy(),
            "pool_row": table["pool_row"].to_numpy(),
        }
        keep = np.flatnonzero(usable)
        self._sample_queries(
            columns, ids[starts][keep], q[keep], positive_row[keep], candidates, compact[group[candidates]]
        )
        self.collector.pack()

    def _claim(self, q: np.ndarray, query_ids: np.ndarray, files: list[Path], file_no: int) -> None:
        """Record that file `file_no` holds the queries `q` (rows in QUERIES, -1: unknown); DataError for
        a query an earlier file held."""
        known = q >= 0
        earlier = np.flatnonzero(known & (self.file_of_query[np.where(known, q, 0)] >= 0))
        if len(earlier):
            first = earlier[0]
            raise _split_query_error(query_ids[first], files[self.file_of_query[q[first]]], files[file_no])
        self.file_of_query[q[known]] = file_no

    def _quarantine_queries(
        self, path: Path, query_ids: np.ndarray, q: np.ndarray, positives: np.ndarray, negatives: np.ndarray
    ) -> np.ndarray:
        """Quarantine the queries whose rows cannot be sampled (`_query_problem`); True for the others."""
        known = q >= 0
        usable = known & (self.pos_pool_row[np.where(known, q, 0)] >= 0) & (positives == 1) & (negatives > 0)
        query_problems: dict[tuple[str, str], list[str]] = {}
        for i in np.flatnonzero(~usable):
            problem = _query_problem(q[i], self.pos_pool_row, positives[i], negatives[i])
            query_problems.setdefault(problem, []).append(query_ids[i])
        for (field, reason), qids in query_problems.items():
            self.problems.append(_problems(path, np.full(len(qids), -1), qids, field, reason))
        return usable

    def _sample_queries(
        self,
        columns: dict[str, np.ndarray],
        query_ids: np.ndarray,
        q: np.ndarray,
        positive_row: np.ndarray,
        candidates: np.ndarray,
        group: np.ndarray,
    ) -> None:
        """Sample the usable queries of a file: query k has its positive in row `positive_row[k]` of
        `columns` and its candidates in the rows `candidates[group == k]`."""
        scores, ranks, cfg = columns["score"], columns["rank"], self.cfg
        pos_scores = scores[positive_row]
        infinite = np.flatnonzero(~np.isfinite(pos_scores))
        if len(infinite):
            raise ValueError(f"scores must not be NaN (positive score {pos_scores[infinite[0]]})")
        settings = dict(
            beta=cfg.beta,
            interval=cfg.interval,
            min_negatives=cfg.min_negatives,
            num_negatives=cfg.num_negatives,
        )
        many = sample_many(pos_scores, group, scores[candidates], ranks[candidates], **settings)
        chosen, picked = candidates[many.slots], scores[candidates[many.slots]]
        lengths, fallback = many.num_negatives.copy(), many.num_survivors == 0
        if fallback.any():
            first = np.r_[0, np.cumsum(np.bincount(group, minlength=len(q)))]
            drawn = {}
            for k in np.flatnonzero(fallback):
                own = candidates[first[k] : first[k + 1]]
                rng = query_rng(self.seed, query_ids[k])
                sampled = sample_negatives(pos_scores[k], scores[own], ranks[own], rng=rng, **settings)
                drawn[k], lengths[k] = own[sampled.indices], len(sampled.indices)
            at = _slot_starts(lengths)
            rows, values = np.empty(at[-1], np.int64), np.ones(at[-1])
            query, j = _slots_of(many.num_negatives)
            rows[at[query] + j], values[at[query] + j] = chosen, picked
            for k, own in drawn.items():
                rows[at[k] : at[k + 1]] = own
            chosen, picked = rows, values
        self.collector.add(
            query=q,
            pos_score=pos_scores,
            num_survivors=many.num_survivors,
            fallback=fallback,
            num_negatives=lengths,
            neg_pool=columns["pool_row"][chosen],
            neg_score=picked,
            neg_rank=ranks[chosen],
            candidate_score=scores[candidates],
        )


def _sample_files(
    files: list[Path],
    datasets: list[str],
    shared: list[str],
    queries_src: pa.Table | str,
    pool_src: pa.Table | str,
    cfg: MiningConfig,
    seed: int,
    out: Path,
) -> dict:
    """One Ray task of `run_sample`: the score files of some datasets, against only those datasets'
    queries and pool. Writes `out` (HARD_NEGATIVES, sorted by id), `<out>.quarantine.parquet` and the
    report's score files; returns, for the run-wide checks, the ids of its queries that no score file held
    and, of the `shared` datasets (read by other tasks too), the ids it did find, with their files."""
    queries = _rows_of(queries_src, datasets, ["id", "dataset", "text", "image", "pos_id"])
    pool = _rows_of(pool_src, datasets, ["id", "dataset", "text", "image"])
    sampler = _FilesSampler(queries, pool, cfg, seed)
    sampler.sample_files(files)
    result = sampler.collector.arrays()
    table = _hard_negatives_table(result, queries, pool, sampler.pos_pool_row)
    write_parquet(table, out, PART_ROWS)
    with atomic_path(_official_part(out)) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(line + "\n" for line in _official_lines(table))
    write_parquet(
        pa.concat_tables([QUARANTINE.empty_table(), *sampler.problems]),
        out.with_suffix(".quarantine.parquet"),
    )
    for key in POPULATIONS.values():
        save_scores(result[key], _score_file(out, key))
    ids, file_of_query = queries["id"].combine_chunks(), sampler.file_of_query
    seen = file_of_query >= 0
    shared_seen = seen & pc.is_in(queries["dataset"], value_set=pa.array(shared, pa.string())).to_numpy(
        zero_copy_only=False
    )
    return {
        "unseen": ids.filter(pa.array(~seen)),
        "seen_shared": ids.filter(pa.array(shared_seen)),
        "file_of_seen_shared": pa.array([str(files[i]) for i in file_of_query[shared_seen]], pa.string()),
        **{k: result[k] for k in REPORT_ARRAYS},
    }


def _score_file(part: Path, key: str) -> Path:
    return part.with_suffix(f".{key}.npy")


def run_sample(
    score_files: list[Path],
    queries: pa.Table | str | Path,
    pool: pa.Table | str | Path,
    out_dir: Path,
    cfg: MiningConfig,
    seed: int,
) -> dict:
    """Sample hard negatives for the queries of `score_files` (JUDGE_SCORES parquet) with texts and images
    from `queries` (QUERIES) and `pool` (POOL), tables or Parquet files; write the outputs listed in the
    module docstring into `out_dir` and return the report.

    The score files are grouped by the datasets they hold and each group is one Ray task (spread over
    the nodes) that reads only its datasets' queries and pool; the driver merges the groups' outputs
    by streaming. A query whose score rows name a dataset it is not in is `unknown_query`."""
    out_dir = Path(out_dir)
    sources = _checked_sources({"queries": queries, "pool": pool})
    groups: dict[tuple[str, ...], list[Path]] = {}
    for path in score_files:
        groups.setdefault(parquet_datasets(path), []).append(Path(path))
    # A dataset is read by several tasks only when score files mix it with different datasets.
    tasks_of = Counter(name for names in groups for name in names)
    shared = sorted(name for name, n in tasks_of.items() if n > 1)
    parts_dir = out_dir / "parts"
    parts = [parts_dir / f"part-{i:05d}.parquet" for i in range(len(groups))]
    todo = [
        (files, list(names), shared, sources["queries"], sources["pool"], cfg, seed, part)
        for (names, files), part in zip(groups.items(), parts, strict=True)
    ]
    results: list[dict] = [{}] * len(todo)
    nodes = set()
    for i, result, node in run_tasks(_sample_files, todo):
        results[i] = result
        nodes.add(node)

    _check_seen_once(results)
    unjudged, num_queries = _unjudged(results, tasks_of, sources["queries"])
    order = merge_order(parts, "id")
    num_out = merge_sorted(parts, "id", out_dir / "hard_negatives.parquet", HARD_NEGATIVES, order)
    _write_official_json(parts, order, out_dir / "hard_negatives.json")
    by_reason = _merge_quarantine(parts, unjudged, out_dir / "quarantine.parquet")
    scores = {name: [_score_file(p, key) for p in parts] for name, key in POPULATIONS.items()}
    plot_scores(scores, cfg.beta, out_dir / "scores.png")
    stats = {name: score_stats(files) for name, files in scores.items()}
    shutil.rmtree(parts_dir)

    out = {
        key: np.concatenate([np.zeros(0, _Collector.DTYPES[key])] + [r[key] for r in results])
        for key in REPORT_ARRAYS
    }
    report = {
        "beta": cfg.beta,
        "interval": cfg.interval,
        "min_negatives": cfg.min_negatives,
        "num_negatives": cfg.num_negatives,
        "seed": seed,
        "score_files": [str(path) for path in score_files],
        **_counts(num_queries, num_out, out, stats),
        "quarantine_by_reason": dict(by_reason),
        "nodes": len(nodes),
    }
    write_json(report, out_dir / "report.json")
    return report


def _checked_sources(sources: dict[str, pa.Table | str | Path]) -> dict[str, pa.Table | str]:
    """{name: table or path} with unique ids, as the tasks take them: tables, and paths as strings."""
    out: dict = {}
    for name, src in sources.items():
        out[name] = src if isinstance(src, pa.Table) else str(src)
        ids = src["id"] if isinstance(src, pa.Table) else pq.read_table(src, columns=["id"])["id"]
        if pc.count_distinct(ids).as_py() != len(ids):
            raise DataError(f"the {name} table has duplicate ids")
    return out


def _check_seen_once(results: list[dict]) -> None:
    """DataError for a query that two tasks found (its rows span files of different dataset groups);
    only queries of datasets that several tasks read can be."""
    seen = pa.concat_arrays([pa.array([], pa.string())] + [r["seen_shared"] for r in results])
    seen_in = pa.concat_arrays([pa.array([], pa.string())] + [r["file_of_seen_shared"] for r in results])
    counts = pc.value_counts(seen).flatten()
    twice = pc.filter(counts[0], pc.greater(counts[1], 1))
    if len(twice):
        files = pc.filter(seen_in, pc.equal(seen, twice[0])).to_pylist()
        raise _split_query_error(twice[0].as_py(), files[0], files[1])


def _unjudged(results: list[dict], tasks_of: Counter, queries: pa.Table | str) -> tuple[pa.ChunkedArray, int]:
    """The ids of the queries no score file held, in QUERIES order, and the number of queries. A query
    is unjudged when no score file names its dataset, or when every task that read its dataset left it
    unseen; QUERIES is read a batch at a time, so the driver never holds every id."""
    unseen = pc.value_counts(
        pa.concat_arrays([pa.array([], pa.string())] + [r["unseen"] for r in results])
    ).flatten()
    names = pa.array(list(tasks_of), pa.string())
    tasks = pa.array(list(tasks_of.values()), pa.int64())
    if isinstance(queries, pa.Table):
        batches = queries.select(["id", "dataset"]).to_batches(MERGE_ROWS)
    else:
        batches = parquet_batches(queries, MERGE_ROWS, columns=["id", "dataset"])
    found, count = [], 0
    for batch in batches:
        count += batch.num_rows
        needed = pc.take(tasks, pc.index_in(batch["dataset"], value_set=names))  # null: no score file
        times = pc.fill_null(pc.take(unseen[1], pc.index_in(batch["id"], value_set=unseen[0])), 0)
        missing = pc.fill_null(pc.equal(times, needed), True)
        found.append(batch["id"].filter(missing))
    return pa.chunked_array(found, pa.string()), count


def _merge_quarantine(parts: list[Path], unjudged: pa.ChunkedArray, path: Path) -> Counter:
    """Write the tasks' quarantined rows, then the queries no score file held (`no_judge_scores`), into
    `path`, streaming; returns the count of each reason."""
    by_reason: Counter = Counter()
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, QUARANTINE) as writer:
        for part in parts:
            quarantine = pq.ParquetFile(part.with_suffix(".quarantine.parquet"))
            for batch in quarantine.iter_batches(batch_size=MERGE_ROWS):
                by_reason.update(batch["reason"].to_pylist())
                writer.write_batch(batch)
        missing = _problems("", np.full(len(unjudged), -1), unjudged, "id", "no_judge_scores")
        by_reason.update(missing["reason"].to_pylist())
        writer.write_table(missing)
    return by_reason


def _counts(num_queries: int, num_out: int, out: dict[str, np.ndarray], scores: dict[str, dict]) -> dict:
    """The report's query counts, fallbacks, survivors histogram and score statistics."""
    num_fallback = int(out["fallback"].sum())
    survivors, counts = np.unique(out["num_survivors"], return_counts=True)
    return {
        "queries_in": num_queries,
        "queries_out": num_out,
        "queries_quarantined": num_queries - num_out,
        "fallback": num_fallback,
        "fallback_pct": 100.0 * num_fallback / num_out if num_out else 0.0,
        "survivors_histogram": [[int(k), int(n)] for k, n in zip(survivors, counts, strict=True)],
        "scores": scores,
    }
