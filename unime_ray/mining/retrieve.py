"""Retrieve stage of mining: the potential hard-negative set of paper eq. 1.

For every query, among the candidate pool of its OWN dataset, keep the `top_n` candidates most similar
to it by cosine (embeddings are unit vectors, so the inner product), after excluding

* the query's own positive, matched by id (the query's `pos_id`), and
* every candidate with similarity >= `delta` (near duplicates, likely false negatives). The comparison
  is made in float32, the precision of the stored `sim`: a similarity equal to float32(delta) is
  excluded.

Exclusion happens BEFORE truncation: a query gets `top_n` results whenever its pool holds that many
qualifying candidates. The first search asks for `top_n + SEARCH_MARGIN` neighbours; the queries still
short are searched again with a doubled k until they have `top_n` or the pool is exhausted, so a
query of a small pool gets every qualifying candidate. Ranks run 0..n-1 by descending similarity;
equal similarities are ordered by candidate id ascending.

`excluded_by_delta` in the stats counts the (query, candidate) pairs, own positive aside, with
similarity >= delta. Such a candidate ranks above every kept one, so the search has always seen all of
them: with the exact index the count is exact, with ivf it counts those ivf found.

The search itself is `engine.index.PoolIndex` (exact and chunked, or ivf; FAISS on GPU when asked).
As k doubles, fewer queries are searched at once (at most SEARCH_CELLS query x neighbour cells), so
many near duplicates, or collapsed embeddings, cannot blow up memory.

`run_retrieve` runs each dataset as one Ray task (`retrieve_dataset`, spread over the nodes) that reads
only that dataset's embeddings and queries and writes `<out_dir>/<dataset>.parquet` (CANDIDATES schema)
atomically, block by block of queries, with its stats in the file's key-value metadata (key `STATS_KEY`,
`pq.read_metadata(path).metadata`); a dataset whose output exists is
not searched again (resume), and a task lost with its node is run again by Ray.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray

from unime_ray.config import IVF_NPROBE, SEARCH_CHUNK_SIZE, SEARCH_QUERY_BLOCK, MiningConfig
from unime_ray.data.schemas import CANDIDATES
from unime_ray.engine.index import PoolIndex, blocks
from unime_ray.engine.tasks import run_tasks
from unime_ray.io import atomic_path, finished_parquet

SEARCH_MARGIN = 16  # neighbours searched beyond top_n: room for the own positive and near duplicates
SEARCH_CELLS = 1 << 24  # (query, neighbour) cells searched at once: ~200 MB of scores and rows
STATS_KEY = b"unime_ray.retrieve"


def retrieve_candidates(
    query_ids: Sequence[str],
    query_vecs: np.ndarray,
    pos_ids: Sequence[str],
    pool_ids: Sequence[str],
    pool_vecs: np.ndarray,
    **settings,
) -> pa.Table:
    """The potential hard negatives of ONE dataset as a CANDIDATES table (see the module docstring):
    `candidate_blocks` gathered into one table. Rows are ordered by query (input order), then rank. The
    schema metadata under `STATS_KEY` holds the JSON of `candidate_blocks`' stats."""
    stats: dict = {}
    blocks_ = list(
        candidate_blocks(query_ids, query_vecs, pos_ids, pool_ids, pool_vecs, stats=stats, **settings)
    )
    table = pa.concat_tables(blocks_) if blocks_ else CANDIDATES.empty_table()
    return table.replace_schema_metadata({STATS_KEY: json.dumps(stats)})


def candidate_blocks(
    query_ids: Sequence[str],
    query_vecs: np.ndarray,
    pos_ids: Sequence[str],
    pool_ids: Sequence[str],
    pool_vecs: np.ndarray,
    *,
    top_n: int,
    delta: float,
    dataset: str,
    stats: dict,
    chunk_size: int = SEARCH_CHUNK_SIZE,
    index: str = "exact",
    use_gpu: bool | None = None,
    nprobe: int = IVF_NPROBE,
    query_block: int = SEARCH_QUERY_BLOCK,
) -> Iterator[pa.Table]:
    """The potential hard negatives of ONE dataset as CANDIDATES tables, one per block of `query_block`
    queries in input order, each ordered by query, then rank: a caller that writes each block as it comes
    holds one block's candidates, never the dataset's (25M rows, ~2 GB as Arrow strings, for a pool of
    500k). `stats` is filled as the blocks come and complete after the last: queries, pool, candidates,
    short_queries (fewer than top_n results), excluded_by_delta, top_n, delta, index."""
    query_ids, pos_ids, pool_ids = (np.asarray(a, dtype=str) for a in (query_ids, pos_ids, pool_ids))
    query_vecs = np.ascontiguousarray(query_vecs, dtype=np.float32)
    pool_vecs = np.asarray(pool_vecs, dtype=np.float32)
    _check_inputs(dataset, top_n, query_ids, query_vecs, pos_ids, pool_ids, pool_vecs)
    pool_ids, pool_vecs = _pool_by_id(dataset, pool_ids, pool_vecs)
    pos = _positive_rows(dataset, query_ids, pos_ids, pool_ids)
    searcher = PoolIndex(
        pool_vecs, index=index, chunk_size=chunk_size, use_gpu=use_gpu, nprobe=nprobe, query_block=query_block
    )
    stats.update(
        queries=len(query_ids), pool=len(pool_ids), candidates=0, short_queries=0, excluded_by_delta=0
    )
    stats.update(top_n=top_n, delta=delta, index=index)
    for block in blocks(len(query_ids), query_block):
        found, short, excluded = _search(
            searcher, query_vecs, np.arange(len(query_ids))[block], pos, top_n, delta
        )
        table = _candidates_table(found, query_ids, pool_ids, dataset)
        stats["candidates"] += table.num_rows
        stats["short_queries"] += short
        stats["excluded_by_delta"] += excluded
        yield table


def _check_inputs(
    dataset: str,
    top_n: int,
    query_ids: np.ndarray,
    query_vecs: np.ndarray,
    pos_ids: np.ndarray,
    pool_ids: np.ndarray,
    pool_vecs: np.ndarray,
) -> None:
    """Raise ValueError, naming the dataset, for a top_n below 1, lengths that differ, vectors of two
    dimensions, or a query id given twice."""
    if top_n < 1:
        raise ValueError(f"top_n must be >= 1, got {top_n}")
    if not len(query_ids) == len(query_vecs) == len(pos_ids) or len(pool_ids) != len(pool_vecs):
        raise ValueError(f"dataset {dataset!r}: ids, vectors and positives differ in length")
    if len(query_ids) and len(pool_ids) and query_vecs.shape[1] != pool_vecs.shape[1]:
        raise ValueError(
            f"dataset {dataset!r}: queries have dimension {query_vecs.shape[1]}, "
            f"candidates {pool_vecs.shape[1]}"
        )
    uniq, counts = np.unique(query_ids, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"dataset {dataset!r}: query id {str(uniq[counts > 1][0])!r} appears more than once")


def _pool_by_id(dataset: str, pool_ids: np.ndarray, pool_vecs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pool in id order, so that FAISS's ties by row are ties by candidate id; a candidate id given
    twice is a ValueError."""
    if (pool_ids[1:] > pool_ids[:-1]).all():
        return pool_ids, pool_vecs
    order = np.argsort(pool_ids, kind="stable")
    pool_ids, pool_vecs = pool_ids[order], pool_vecs[order]
    dup = np.flatnonzero(pool_ids[1:] == pool_ids[:-1])
    if dup.size:
        raise ValueError(
            f"dataset {dataset!r}: candidate id {str(pool_ids[dup[0]])!r} appears more than once"
        )
    return pool_ids, pool_vecs


def _positive_rows(
    dataset: str, query_ids: np.ndarray, pos_ids: np.ndarray, pool_ids: np.ndarray
) -> np.ndarray:
    """Each query's positive as a row of the id-sorted pool; ValueError for queries without a pool, or
    a positive the pool does not hold."""
    nc = len(pool_ids)
    if len(query_ids) and not nc:
        raise ValueError(f"dataset {dataset!r}: query {str(query_ids[0])!r} has no candidate pool")
    pos = np.searchsorted(pool_ids, pos_ids).clip(max=max(nc - 1, 0))
    missing = np.flatnonzero(pool_ids[pos] != pos_ids)
    if missing.size:
        qid, pid = str(query_ids[missing[0]]), str(pos_ids[missing[0]])
        raise ValueError(f"dataset {dataset!r}: query {qid!r}: its positive {pid!r} is not in the pool")
    return pos


def _search(
    searcher: PoolIndex, query_vecs: np.ndarray, rows: np.ndarray, pos: np.ndarray, top_n: int, delta: float
) -> tuple[list[tuple[np.ndarray, ...]], int, int]:
    """([(query row, pool row, rank, sim), ...] of the kept candidates of the query `rows`, queries left
    short of top_n, pairs excluded by delta): each query searched with k = top_n + SEARCH_MARGIN, then
    with a doubled k while it has fewer than top_n qualifying candidates and the pool holds more."""
    nc, limit = len(searcher.pool), np.float32(delta)
    empty = np.empty(0, dtype=np.int64)
    parts = [(empty, empty, empty, np.empty(0, dtype=np.float32))]
    short = excluded = 0
    pending, k = rows, min(top_n + SEARCH_MARGIN, nc)
    while pending.size:
        again = []
        # As k doubles, fewer queries are searched at once: [queries, k] stays under SEARCH_CELLS,
        # however many near duplicates (or collapsed embeddings) push k towards the pool size.
        for sub in blocks(len(pending), max(1, SEARCH_CELLS // k)):
            rows_q = pending[sub]
            scores, idx = searcher.search(query_vecs[rows_q], k)
            valid = (idx >= 0) & (idx != pos[rows_q, None])
            near = valid & (scores >= limit)
            keep = valid & ~near
            # Done: enough qualify, or every reachable candidate was seen (ivf pads, or k is the pool).
            done = (keep.sum(axis=1) >= top_n) | (idx[:, -1] < 0) | (k == nc)
            rank = np.cumsum(keep, axis=1) - 1
            found_rows, cols = np.nonzero(keep & (rank < top_n) & done[:, None])
            parts.append(
                (rows_q[found_rows], idx[found_rows, cols], rank[found_rows, cols], scores[found_rows, cols])
            )
            short += int((keep[done].sum(axis=1) < top_n).sum())
            excluded += int(near[done].sum())
            again.append(rows_q[~done])
        pending = np.concatenate(again)
        k = min(2 * k, nc)
    return parts, short, excluded


def _candidates_table(
    parts: list[tuple[np.ndarray, ...]], query_ids: np.ndarray, pool_ids: np.ndarray, dataset: str
) -> pa.Table:
    """The found (query row, pool row, rank, sim) as CANDIDATES rows, by query (input order), then rank."""
    q_row, cand, rank, sim = (np.concatenate(column) for column in zip(*parts, strict=True))
    order = np.lexsort((rank, q_row))
    return pa.table(
        {
            "query_id": pa.array(query_ids).take(q_row[order]),
            "dataset": pa.repeat(pa.scalar(dataset, pa.string()), len(order)),
            "cand_id": pa.array(pool_ids).take(cand[order]),
            "rank": pa.array(rank[order], pa.int32()),
            "sim": pa.array(sim[order], pa.float32()),
        },
        schema=CANDIDATES,
    )


def dataset_embeddings(embeddings: str | list[str], name: str) -> tuple[pa.Table, pa.Table]:
    """The query and the pool rows (id, kind, embedding; each sorted by id) of dataset `name` in an
    EMBEDDINGS file, folder or list of files; row groups of other datasets are skipped by their
    statistics. An embedding kind other than query or candidate is a ValueError. Each kind is read by a
    scan of its own, so only one kind's rows are ever held twice (while sorted), never both kinds'."""
    source = pads.dataset(embeddings, format="parquet")
    in_dataset = pc.field("dataset") == name
    kinds = source.to_table(columns=["kind"], filter=in_dataset)["kind"]
    unknown = set(pc.unique(kinds).to_pylist()) - {"query", "candidate"}
    if unknown:
        raise ValueError(f"dataset {name!r}: unknown embedding kind {sorted(unknown, key=str)}")
    columns = ["id", "kind", "embedding"]
    return tuple(
        source.to_table(columns=columns, filter=in_dataset & (pc.field("kind") == kind)).sort_by("id")
        for kind in ("query", "candidate")
    )


def retrieve_dataset(
    embeddings: str | list[str], queries: pa.Table | str, name: str, path: Path, cfg: MiningConfig
) -> dict:
    """Retrieve the candidates of dataset `name` into `path` (a Ray task of `run_retrieve`): reads only
    that dataset's embeddings (row groups of other datasets are skipped by their statistics) and its
    queries, and writes the candidates block by block (`candidate_blocks`), so the memory of one task is
    one dataset's vectors and index and one block's candidates, never the run's."""
    query_rows, pool_rows = dataset_embeddings(embeddings, name)
    if isinstance(queries, pa.Table):
        mine = queries.filter(pc.equal(queries["dataset"], name)).select(["id", "pos_id"])
    else:
        mine = pq.read_table(queries, columns=["id", "pos_id"], filters=[("dataset", "=", name)])
    pos_ids = _positives(query_rows["id"], mine, name)
    query_vecs = _matrix(query_rows, name, None)
    pool_vecs = _matrix(pool_rows, name, query_vecs.shape[1] if len(query_vecs) else None)
    query_ids, pool_ids = query_rows["id"].to_numpy(), pool_rows["id"].to_numpy()
    del query_rows, pool_rows, mine  # the vectors live on in the matrices
    pa.default_memory_pool().release_unused()  # the scans' and sorts' buffers, which Arrow's pool keeps
    stats: dict = {}
    found = candidate_blocks(
        query_ids,
        query_vecs,
        pos_ids,
        pool_ids,
        pool_vecs,
        top_n=cfg.top_n,
        delta=cfg.delta,
        dataset=name,
        stats=stats,
        chunk_size=cfg.chunk_size,
        index=cfg.index,
        use_gpu=cfg.faiss_gpu,
        nprobe=cfg.ivf_nprobe,
        query_block=cfg.query_block,
    )
    needs = f"about {len(query_ids) * cfg.top_n * 40:,} bytes (40 a candidate)"
    with atomic_path(path, needs) as tmp, pq.ParquetWriter(tmp, CANDIDATES) as writer:
        for table in found:
            writer.write_table(table)
        writer.add_key_value_metadata({STATS_KEY: json.dumps(stats)})
    pa.default_memory_pool().release_unused()  # the blocks' buffers: the worker goes on to other tasks
    dim = int(query_vecs.shape[1]) if len(query_vecs) else 0
    return {**stats, "resumed": False, "dim": dim}


def run_retrieve(
    embeddings: str | Path | Sequence[str | Path],
    queries: pa.Table | str | Path,
    out_dir: str | Path,
    cfg: MiningConfig,
) -> dict[str, dict]:
    """Retrieve the potential hard negatives of every dataset of `queries` (QUERIES table or parquet file).

    `embeddings` is an EMBEDDINGS parquet file, a folder of them, or a list of files. Each dataset is one
    Ray task (`retrieve_dataset`, on a GPU when `faiss_gpu` is true), spread over the cluster's nodes;
    it writes `<out_dir>/<dataset>.parquet`. Returns {dataset: stats} (see `retrieve_candidates`) with
    `resumed` telling whether the file already existed and `node`, the Ray node that searched it; an
    existing file is reported from its metadata (a file written by another tool reports only its row
    count as `candidates`), and raises if it was made with another top_n or delta. Raises ValueError,
    naming the dataset and id, for an embedding of the wrong dimension or with non-finite values, a
    query without embedding (or the reverse), embeddings of two dimensions across datasets, or a
    query whose dataset has no pool.
    """
    paths = str(embeddings) if isinstance(embeddings, str | Path) else [str(p) for p in embeddings]
    source = pads.dataset(paths, format="parquet")
    absent = {"id", "dataset", "kind", "embedding"} - set(source.schema.names)
    if absent:
        raise ValueError(f"{embeddings}: embeddings lack the columns {sorted(absent)}")
    if not isinstance(queries, pa.Table):
        queries = str(queries)
        names = pc.unique(pq.read_table(queries, columns=["dataset"])["dataset"]).to_pylist()
    else:
        names = pc.unique(queries["dataset"]).to_pylist()
    out_dir = Path(out_dir)
    report: dict[str, dict] = {}
    todo = []
    for name in sorted(names):
        path = out_dir / f"{name}.parquet"
        if finished_parquet(path):
            report[name] = _resumed_stats(path, cfg)
        else:
            todo.append((paths, queries, name, path, cfg))
    # Ray hides the GPUs from a task that asks for none, so "when FAISS sees a GPU" means asking for one.
    auto = cfg.faiss_gpu is None and ray.cluster_resources().get("GPU", 0) > 0
    gpus = 1 if cfg.faiss_gpu or auto else 0
    for i, stats, node in run_tasks(retrieve_dataset, todo, num_gpus=gpus):
        report[todo[i][2]] = {**stats, "node": node}
    dims = {s["dim"] for s in report.values() if s.get("dim")}
    if len(dims) > 1:
        raise ValueError(f"embeddings of several dimensions across datasets: {sorted(dims)}")
    return dict(sorted(report.items()))


def _resumed_stats(path: Path, cfg: MiningConfig) -> dict:
    footer = pq.read_metadata(path)
    meta = footer.metadata or {}  # the file's key-value metadata (retrieve_dataset)
    if STATS_KEY not in meta:
        return {"candidates": footer.num_rows, "resumed": True}
    stats = json.loads(meta[STATS_KEY])
    if (stats["top_n"], stats["delta"]) != (cfg.top_n, cfg.delta):
        raise ValueError(
            f"{path} was written with top_n={stats['top_n']}, delta={stats['delta']}; the config says "
            f"top_n={cfg.top_n}, delta={cfg.delta}: remove the file or write elsewhere"
        )
    return {**stats, "resumed": True}


def _positives(embedded_ids: pa.ChunkedArray, queries: pa.Table, dataset: str) -> np.ndarray:
    """The pos_id of every embedded query, in the order of `embedded_ids`."""
    missing = queries.filter(pc.invert(pc.is_in(queries["id"], value_set=embedded_ids)))
    if missing.num_rows:
        raise ValueError(f"dataset {dataset!r}: query {missing['id'][0].as_py()!r} has no embedding")
    where = pc.index_in(embedded_ids, value_set=queries["id"])
    if where.null_count:
        orphan = embedded_ids.filter(pc.is_null(where))[0].as_py()
        raise ValueError(f"dataset {dataset!r}: query embedding {orphan!r} has no row in the queries table")
    return queries["pos_id"].take(where).to_numpy()


def _matrix(rows: pa.Table, dataset: str, dim: int | None) -> np.ndarray:
    """The `embedding` column as a float32 [n, dim] matrix; `dim=None` takes the first row's."""
    column = rows["embedding"].combine_chunks()
    lengths = pc.list_value_length(column).fill_null(-1).to_numpy()
    if len(lengths) and dim is None:
        dim = int(lengths[0])
    bad = np.flatnonzero(lengths != dim)
    if bad.size:
        raise ValueError(
            f"dataset {dataset!r}: embedding of {rows['id'][int(bad[0])].as_py()!r} has dimension "
            f"{lengths[bad[0]]} (null = -1), expected {dim}"
        )
    matrix = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    matrix = matrix.reshape(len(rows), dim or 0)
    bad = np.flatnonzero(~np.isfinite(matrix).all(axis=1))
    if bad.size:
        raise ValueError(
            f"dataset {dataset!r}: embedding of {rows['id'][int(bad[0])].as_py()!r} is not finite"
        )
    return matrix
