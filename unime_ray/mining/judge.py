"""Judge stage: score (query, positive) and (query, candidate) for every potential hard negative.

Request shards hold whole queries (positive first, then candidates by retrieval rank), so the ~51
prompts of a query travel together and share their prefix in vLLM's cache; shards are the unit of
resume (see `shards.py`). Backends: `vllm`, `transformers` (both through a Ray Data actor pool), or
`precomputed`: scores from a user's own file (`query_id`, `cand_id`, `score`, Parquet or JSONL),
validated against the requests by id, for users who judged elsewhere.

The model backends also write each call's token counts (JUDGE_COSTS: prompt tokens, those served from
vLLM's prefix cache, image tokens among each, the call's share of its batch's time) into its row; the
stage's report sums them (`token_report`): the measured input of the cost model in docs/mining.md.

A batch that fails is retried row by row; a row that still fails gets score NaN and is counted, so one
bad row never kills a 9-hour run (the sample stage quarantines what it cannot use).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson
import pyarrow.parquet as pq
import ray

from unime_ray.config import JudgeConfig, MiningConfig, config_from_dict
from unime_ray.data.schemas import (
    JUDGE_COSTS,
    JUDGE_REQUEST_IDS,
    JUDGE_REQUESTS,
    JUDGE_SCORES,
    USER_SCORES,
    check_parquet_types,
    parquet_errors,
)
from unime_ray.engine.actors import map_with_actors
from unime_ray.engine.lookup import rows_named
from unime_ray.engine.shards import PATH_COL, group_starts, requests_once, run_shards, write_request_shards
from unime_ray.engine.tasks import run_tasks
from unime_ray.io import finished_parquet, parquet_batches, parquet_datasets, write_parquet

log = logging.getLogger(__name__)
TOKEN_COLUMNS = [n for n in JUDGE_COSTS.names if n.endswith("_tokens")]  # as models.judge.score_tokens


class JudgeActor:
    """`map_batches` callable owning one judge model (a vLLM engine or a transformers model)."""

    def __init__(self, judge: dict, image_root: str):
        from unime_ray.models.judge import make_judge

        self.judge = make_judge(config_from_dict(JudgeConfig, judge), image_root)

    def _score(self, batch: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Scores, per-row token counts (TOKEN_COLUMNS; -1 where the row failed) and per-row seconds."""
        pairs = list(
            zip(
                *(batch[c].to_pylist() for c in ("qry_text", "qry_image", "cand_text", "cand_image")),
                strict=True,
            )
        )
        start = time.perf_counter()
        try:
            scores, tokens = self.judge.score_tokens(pairs)
            return scores, tokens, np.full(len(pairs), (time.perf_counter() - start) / max(len(pairs), 1))
        except Exception:
            log.exception("judge batch failed; retrying its %d rows one by one", len(pairs))
        scores = np.full(len(pairs), np.nan, dtype=np.float32)
        tokens = np.full((len(pairs), len(TOKEN_COLUMNS)), -1, dtype=np.int64)
        seconds = np.full(len(pairs), np.nan)
        for i, pair in enumerate(pairs):
            start = time.perf_counter()
            try:
                one, counts = self.judge.score_tokens([pair])
                scores[i], tokens[i], seconds[i] = one[0], counts[0], time.perf_counter() - start
            except Exception:
                log.exception("judge row failed: query %s cand %s", batch["query_id"][i], batch["cand_id"][i])
        return scores, tokens, seconds

    def __call__(self, batch: pa.Table) -> pa.Table:
        keep = [*JUDGE_REQUEST_IDS.names, PATH_COL]
        scores, tokens, seconds = self._score(batch)
        out = batch.select(keep).append_column("score", pa.array(scores, pa.float32()))
        for j, name in enumerate(TOKEN_COLUMNS):
            out = out.append_column(name, pa.array(tokens[:, j], pa.int32(), mask=tokens[:, j] < 0))
        return out.append_column("seconds", pa.array(seconds, pa.float32(), mask=np.isnan(seconds)))


def _lookup(table: pa.Table, ids: pa.ChunkedArray | pa.Array, what: str) -> pa.Array:
    """Row of each id in `table`; an id not there is an error naming it."""
    rows = pc.index_in(ids, value_set=table["id"])
    if rows.null_count:
        missing = pc.filter(ids, pc.is_null(rows))[0].as_py()
        raise ValueError(f"{what} {missing!r} is not in the {what} table")
    return rows


def _request_ids(candidates: pa.Table, queries: pa.Table, pool: pa.Table | None = None) -> pa.Table:
    """The id columns of the judge requests: per query with candidates, its positive (rank -1) and then
    its candidates by rank; queries in id order. Each row also carries the row of its query in `queries`
    (`_qrow`) and, given a `pool`, of its candidate there (`_crow`): each table is hashed once, so that
    filling a shard's columns is a take. (A lookup per shard hashed the dataset's whole queries table
    for every shard of it, and the judge stage grew with the square of the dataset's size.)"""
    cands = candidates.select(["query_id", "cand_id", "rank", "sim"])
    qids = pc.unique(cands["query_id"])
    pos = queries["pos_id"].take(_lookup(queries, qids, "query"))
    positives = pa.table(
        {
            "query_id": qids,
            "cand_id": pos,
            "rank": pa.repeat(pa.scalar(-1, pa.int32()), len(qids)),
            "sim": pa.repeat(pa.scalar(float("nan"), pa.float32()), len(qids)),
        }
    )
    flags = [pa.repeat(pa.scalar(flag), n) for flag, n in ((True, len(qids)), (False, cands.num_rows))]
    rows = pa.concat_tables([positives, cands.cast(positives.schema)])
    rows = rows.append_column("is_positive", pa.concat_arrays(flags))
    rows = rows.sort_by([("query_id", "ascending"), ("rank", "ascending")])
    rows = rows.append_column("_qrow", _lookup(queries, rows["query_id"], "query"))
    if pool is not None:
        rows = rows.append_column("_crow", _lookup(pool, rows["cand_id"], "candidate"))
    return rows


def _with_texts(ids: pa.Table, queries: pa.Table, pool: pa.Table) -> pa.Table:
    """JUDGE_REQUESTS rows: the id columns (`_request_ids` with a pool) with the query's and the
    candidate's texts and images."""
    q, c = queries.take(ids["_qrow"]), pool.take(ids["_crow"])
    columns = {
        "query_id": ids["query_id"],
        "dataset": q["dataset"],
        "cand_id": ids["cand_id"],
        "is_positive": ids["is_positive"],
        "rank": ids["rank"],
        "sim": ids["sim"],
        "qry_text": q["text"],
        "qry_image": q["image"],
        "cand_text": c["text"],
        "cand_image": c["image"],
    }
    return pa.table(columns, schema=JUDGE_REQUESTS)


def _with_dataset(ids: pa.Table, queries: pa.Table) -> pa.Table:
    """The id columns with the query's dataset: all a bring-your-own score is joined on (the JUDGE_SCORES
    columns but the score). Only a model judge reads the texts, and writing them is most of the bytes."""
    dataset = queries["dataset"].take(ids["_qrow"])
    columns = {name: dataset if name == "dataset" else ids[name] for name in JUDGE_REQUEST_IDS.names}
    return pa.table(columns, schema=JUDGE_REQUEST_IDS)


def build_requests(candidates: pa.Table, queries: pa.Table, pool: pa.Table) -> pa.Table:
    """CANDIDATES rows -> JUDGE_REQUESTS rows, ordered by query id, each query's positive first."""
    return _with_texts(_request_ids(candidates, queries, pool), queries, pool)


REQUEST_BLOCK_ROWS = 1 << 20  # candidate rows read at once to write request shards (~0.1 GB a copy)


def _query_blocks(path: Path, per_shard: int) -> Iterator[pa.Table]:
    """The rows of a candidates file in blocks of whole shards: `per_shard` x m whole queries each (the
    last block: the rest), read REQUEST_BLOCK_ROWS rows at a time. The retrieve stage writes a file in
    query-id order, so blocks sorted one by one are the file sorted whole; a file out of that order is an
    error naming it (its shards would differ from the whole file's)."""
    carry, last = None, None
    for batch in parquet_batches(path, REQUEST_BLOCK_ROWS):
        rows = pa.Table.from_batches([batch])
        rows = rows if carry is None else pa.concat_tables([carry, rows])
        qids, n = rows["query_id"], rows.num_rows
        if pc.any(pc.less(qids.slice(1), qids.slice(0, n - 1))).as_py() or (
            last is not None and qids[0].as_py() < last
        ):
            raise ValueError(f"{path}: candidates not in query-id order; rerun the retrieve stage")
        starts = group_starts(qids)
        whole = (len(starts) - 1) // per_shard * per_shard  # the last query may go on in the next batch
        cut = int(starts[whole]) if whole else 0
        if cut:
            yield rows.slice(0, cut)
            last = qids[cut - 1].as_py()
        carry = rows.slice(cut)
    if carry is not None and carry.num_rows:
        yield carry


def _dataset_requests(
    candidates: Path, queries: str, pool: str, out_dir: Path, per_shard: int, texts: bool
) -> list[Path]:
    """One Ray task of `write_requests`: the request shards of one candidates file. Only that dataset's
    queries and pool are read; the candidates are read a block of whole shards at a time (a large
    dataset's candidates, read whole and sorted, took several copies of tens of millions of rows), and
    the texts (or, without `texts`, the datasets) are joined one shard at a time."""
    names = list(parquet_datasets(candidates))
    columns = ["id", "dataset", "text", "image"] if texts else ["id", "dataset"]
    q = pq.read_table(queries, columns=[*columns, "pos_id"], filters=[("dataset", "in", names)])
    p = pq.read_table(pool, columns=columns, filters=[("dataset", "in", names)]) if texts else None
    if texts:
        fill = lambda t: _with_texts(t, q, p)  # noqa: E731
    else:
        fill = lambda t: _with_dataset(t, q)  # noqa: E731
    paths: list[Path] = []
    for block in _query_blocks(candidates, per_shard):
        ids = _request_ids(block, q, p)
        paths += write_request_shards(
            ids, out_dir, per_shard, prefix=candidates.stem, group="query_id", fill=fill, first=len(paths)
        )
    return paths


def write_requests(
    candidate_files: list[Path],
    queries: str | Path,
    pool: str | Path,
    out_dir: Path,
    cfg: MiningConfig,
    texts: bool = True,
) -> list[Path]:
    """The request shards of every candidates file (one Ray task per file, i.e. per dataset), each
    shard `judge_shard_queries` whole queries; `queries` and `pool` are the QUERIES and POOL files.
    Without `texts` the shards hold the JUDGE_SCORES columns but the score (what bring-your-own scores
    are joined on), not JUDGE_REQUESTS."""
    files = sorted(candidate_files)
    todo = [(path, str(queries), str(pool), out_dir, cfg.judge_shard_queries, texts) for path in files]
    shards: list[list[Path]] = [[] for _ in files]
    for i, paths, _ in run_tasks(_dataset_requests, todo):
        shards[i] = paths
    return [path for paths in shards for path in paths]


BUCKET_ROWS = 2_000_000  # request rows joined at once against the user's scores (~0.5 GB in a task)
CHUNK_ROWS = 1_000_000  # user rows per partitioning task


def _user_batches(path: str, row_groups: list[int] | None) -> Iterator[pa.RecordBatch]:
    """The user's score rows as batches of USER_SCORES: a Parquet file's `row_groups`, or a whole JSONL
    file streamed (never loaded whole)."""
    try:
        if path.endswith(".parquet"):
            reader = pq.ParquetFile(path).iter_batches(
                batch_size=CHUNK_ROWS, row_groups=row_groups, columns=USER_SCORES.names
            )
        else:
            options = pajson.ParseOptions(explicit_schema=USER_SCORES, unexpected_field_behavior="ignore")
            reader = pajson.open_json(path, parse_options=options)
        for batch in reader:
            yield pa.Table.from_batches([batch]).select(USER_SCORES.names).cast(USER_SCORES).combine_chunks()
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, KeyError, OSError) as e:
        raise ValueError(
            f"{path}: not a score file of query_id (string), cand_id (string), score (number): {e}"
        ) from e


def _check_user_scores(path: str) -> list[list[int] | None]:
    """Fail fast on a file without the columns; return the partitioning tasks' row-group lists."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"judge.scores_path: no file {path}")
    if p.suffix != ".parquet":
        names = set(next(iter(pajson.open_json(path))).schema.names)
        chunks: list[list[int] | None] = [None]  # one streaming task: JSONL has no row groups
    else:
        with parquet_errors(path):
            meta = pq.ParquetFile(path).metadata
        names = set(meta.schema.to_arrow_schema().names)
        chunks, rows = [[]], 0
        for rg in range(meta.num_row_groups):
            if rows >= CHUNK_ROWS:
                chunks, rows = [*chunks, []], 0
            chunks[-1].append(rg)
            rows += meta.row_group(rg).num_rows
    missing = {"query_id", "cand_id", "score"} - names
    if missing:
        raise ValueError(f"{path}: missing column(s) {sorted(missing)}; need query_id, cand_id, score")
    if p.suffix == ".parquet":
        check_parquet_types(path, USER_SCORES)
    return chunks


def _partition_user_scores(
    path: str, row_groups: list[int] | None, chunk: int, buckets: pa.Table, out_dir: Path
) -> list[Path]:
    """One Ray task: the user's rows of `row_groups`, split by the bucket of their query into fragment
    files `b<bucket>-c<chunk>.parquet`; rows of a query no request names go to bucket -1 (unused)."""
    parts: dict[int, list[pa.Table]] = {}
    for batch in _user_batches(path, row_groups):
        named = rows_named(buckets, "query_id", batch["query_id"])  # not all the run's queries: lookup.py
        where = pc.index_in(batch["query_id"], value_set=named["query_id"])
        bucket = pc.fill_null(pc.take(named["bucket"], where), -1)
        for b in pc.unique(bucket).to_pylist():
            parts.setdefault(b, []).append(batch.filter(pc.equal(bucket, b)))
    return [
        write_parquet(pa.concat_tables(tables), out_dir / f"b{b:05d}-c{chunk:05d}.parquet")
        for b, tables in sorted(parts.items())
    ]


def _pair_keys(tables: list[pa.Table]) -> list[np.ndarray]:
    """An int64 per (query_id, cand_id) row of each table, equal exactly when both ids are: each id's
    position among the distinct ids of all `tables`. Hashing the ids once and comparing integers is what
    makes a bucket's join cheap: a join on the two string columns hashed both of them for every row of
    both sides, and its output had to be sorted back into the requests' order."""
    codes = []
    for column in ("query_id", "cand_id"):
        ids = pa.chunked_array([c for t in tables for c in t[column].chunks], pa.string())
        values = pc.unique(ids)
        codes.append((len(values), pc.index_in(ids, value_set=values).to_numpy().astype(np.int64)))
    (_, queries), (num_cands, cands) = codes
    ends = np.cumsum([t.num_rows for t in tables])[:-1]
    return np.split(queries * num_cands + cands, ends)


def _attach_bucket(shards: list[Path], fragments: list[Path], out_dir: Path, scores_path: str) -> None:
    """One Ray task: join the requests of `shards` with the user's rows of their queries (`fragments`),
    check every request has exactly one score, write each shard's JUDGE_SCORES file (the requests' rows
    in their order, each with its score)."""
    keys = ["query_id", "cand_id"]
    user = pa.concat_tables([pq.read_table(f) for f in fragments]) if fragments else USER_SCORES.empty_table()
    columns = JUDGE_REQUEST_IDS.names
    requests = [pq.read_table(shard, columns=columns) for shard in shards]
    user_key, *request_keys = _pair_keys([user, *requests])
    order = np.argsort(user_key, kind="stable")
    ranked = user_key[order]
    twice = np.flatnonzero(ranked[1:] == ranked[:-1])
    if len(twice):
        examples = user.take(order[twice[:3]]).select(keys).to_pylist()
        raise ValueError(f"{scores_path}: duplicate (query_id, cand_id) rows, e.g. {examples}")
    scores = user["score"]
    for shard, table, key in zip(shards, requests, request_keys, strict=True):
        at = np.minimum(np.searchsorted(ranked, key), max(len(ranked) - 1, 0))
        found = ranked[at] == key if len(ranked) else np.zeros(len(key), dtype=bool)
        if not found.all():
            _raise_lacking(scores_path, shard, table, found, request_keys, ranked)
        out = table.append_column("score", scores.take(order[at])).combine_chunks()
        write_parquet(out.select(JUDGE_SCORES.names).cast(JUDGE_SCORES), out_dir / shard.name)


def _raise_lacking(
    scores_path: str,
    shard: Path,
    table: pa.Table,
    found: np.ndarray,
    request_keys: list[np.ndarray],
    ranked: np.ndarray,
) -> None:
    """The error for requests without a score: the first shard that has some, a few of them, and the
    count over the whole bucket."""
    lacking = table.filter(pa.array(~found)).select(["query_id", "cand_id"])
    total = sum(int((~np.isin(key, ranked)).sum()) for key in request_keys)
    raise ValueError(
        f"{scores_path}: {lacking.num_rows} requests of {shard.name} lack a score, e.g. "
        f"{[tuple(r.values()) for r in lacking.slice(0, 3).to_pylist()]} ({total} in all)"
    )


def attach_precomputed(requests: list[Path], out_dir: Path, scores_path: str) -> dict:
    """Join a user's scores (Parquet or JSONL: query_id, cand_id, score) onto the requests; every request
    must have exactly one score. At MMEB's size (33.8M rows) nothing is loaded whole: consecutive request
    shards form buckets of ~BUCKET_ROWS requests; Ray tasks split the user's file by the bucket of each
    row's query, then one task per bucket joins its requests with its rows. A pair's rows share its
    query, so a duplicate or a missing score is always found within one bucket."""
    chunks = _check_user_scores(scores_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups: list[list[Path]] = [[]]
    bucket_rows, ids, bucket_of = 0, [], []
    for path in requests:
        rows = pq.read_metadata(path).num_rows
        if bucket_rows and bucket_rows + rows > BUCKET_ROWS:
            groups, bucket_rows = [*groups, []], 0
        groups[-1].append(path)
        bucket_rows += rows
        qids = pc.unique(pq.read_table(path, columns=["query_id"])["query_id"])
        ids.append(qids)
        bucket_of.append(pa.repeat(pa.scalar(len(groups) - 1, pa.int32()), len(qids)))
    buckets = pa.table(
        {"query_id": pa.chunked_array(ids, pa.string()), "bucket": pa.chunked_array(bucket_of, pa.int32())}
    )
    work = out_dir / "_user_scores"
    items = [(scores_path, rgs, i, buckets, work) for i, rgs in enumerate(chunks)]
    fragments = requests_once(
        work, lambda _: [p for _, paths, _ in run_tasks(_partition_user_scores, items) for p in paths]
    )
    todo = [
        (shards, [f for f in fragments if f.name.startswith(f"b{b:05d}-")], out_dir, scores_path)
        for b, shards in enumerate(groups)
        if any(not finished_parquet(out_dir / s.name) for s in shards)
    ]
    for _ in run_tasks(_attach_bucket, todo):
        pass
    user_rows = sum(pq.read_metadata(f).num_rows for f in fragments)
    used = sum(pq.read_metadata(out_dir / s.name).num_rows for s in requests)
    shutil.rmtree(work)
    return {"rows": used, "user_rows_unused": user_rows - used}


def run_judge(
    requests: list[Path], out_dir: Path, judge: JudgeConfig, image_root: str, cfg: MiningConfig
) -> dict:
    if judge.backend == "precomputed":
        return attach_precomputed(requests, out_dir, judge.scores_path)

    def transform(ds: ray.data.Dataset) -> ray.data.Dataset:
        return map_with_actors(
            ds,
            JudgeActor,
            dict(judge=asdict(judge), image_root=str(image_root)),
            # One request shard per call, cut into the model's batches from its first row: a call's
            # batch-mates, hence its score to the last bit (padding changes the float sums), are the
            # same in every run, resumed or not; batches formed by Ray Data would depend on which
            # shards were still to do.
            batch_size=None,
            batch_format="pyarrow",
            num_actors=cfg.num_actors,
            gpus_per_actor=cfg.gpus_per_actor,
        )

    schema = pa.schema([*JUDGE_SCORES, *JUDGE_COSTS])
    report = run_shards(requests, out_dir, transform, schema, ["query_id", "cand_id"], "judge")
    scores = [pq.read_table(out_dir / p.name, columns=["score"])["score"] for p in requests]
    report["nan_scores"] = sum(int(pc.sum(pc.is_nan(col)).as_py() or 0) for col in scores)
    report["tokens"] = token_report([out_dir / p.name for p in requests])
    return report


def token_report(results: list[Path]) -> dict:
    """The JUDGE_COSTS columns of score files summed (files without them, e.g. precomputed, are left
    out), with what they say: computed = prompt - cached tokens, the prefix cache's share of the prompt
    tokens, and per-call means; `seconds` is the judge's busy time (model loading excluded)."""
    names = TOKEN_COLUMNS
    sums, calls, seconds = dict.fromkeys(names, 0), 0, 0.0
    for path in results:
        if not set(JUDGE_COSTS.names) <= set(pq.read_schema(path).names):
            continue
        table = pq.read_table(path, columns=JUDGE_COSTS.names)
        calls += table.num_rows - table["prompt_tokens"].null_count
        for name in names:
            sums[name] += int(pc.sum(table[name]).as_py() or 0)
        seconds += float(pc.sum(table["seconds"]).as_py() or 0.0)
    return {
        **summarize_tokens(sums, calls),
        "seconds": seconds,
        "calls_per_s": calls / seconds if seconds else None,
    }


def summarize_tokens(sums: dict, calls: int) -> dict:
    """Token sums (TOKEN_COLUMNS) of `calls` judge calls with what they say: computed = prompt - cached,
    the prefix cache's share of the prompt tokens, per-call means."""
    prompt, cached = sums["prompt_tokens"], sums["cached_tokens"]
    per_call = (lambda n: n / calls) if calls else (lambda n: None)
    return {
        "calls": calls,
        **{name: sums[name] for name in TOKEN_COLUMNS},
        "computed_tokens": prompt - cached,
        "computed_image_tokens": sums["image_tokens"] - sums["cached_image_tokens"],
        "cache_hit_rate": cached / prompt if prompt else None,
        "prompt_tokens_per_call": per_call(prompt),
        "computed_tokens_per_call": per_call(prompt - cached),
        "image_tokens_per_call": per_call(sums["image_tokens"]),
    }
