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

Exact search ("exact") processes the pool in chunks of `chunk_size` vectors and the queries in blocks
of `query_block`, merging the per-chunk top-k lists, so memory stays bounded at millions of
candidates. "ivf" trains one IndexIVFFlat (approximate, holds a copy of the pool). FAISS runs on GPU
when it sees one (faiss-gpu on clusters), on CPU otherwise.

`run_retrieve` reads the EMBEDDINGS parquet, works one dataset at a time, and writes
`<out_dir>/<dataset>.parquet` (CANDIDATES schema) atomically with its stats in the schema metadata
(key `STATS_KEY`); a dataset whose output exists is not searched again (resume).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from unime_ray.config import MiningConfig
from unime_ray.data.schemas import CANDIDATES
from unime_ray.io import write_parquet

SEARCH_MARGIN = 16  # neighbours searched beyond top_n: room for the own positive and near duplicates
GPU_MAX_K = 2048  # FAISS GPU k-selection limit; a larger k is searched on CPU
MIN_POINTS_PER_LIST = 39  # FAISS k-means wants at least 39 training points per centroid
MIN_NLIST = 8  # pools too small for this many inverted lists are searched exactly
MAX_NLIST = 65536
TIE_ROWS = 64  # rows recomputed at once where FAISS may have cut a group of equal scores
STATS_KEY = b"unime_ray.retrieve"

Knn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


class PoolIndex:
    """Inner-product top-k over a fixed pool, built once and searched many times (see `search_topk`).

    Ties (equal float32 scores) are ordered by pool row ascending. Exact search guarantees it across the
    k-th position too: FAISS is asked for one neighbour more than needed, and where the k-th and the
    (k+1)-th score are equal, FAISS may have kept any members of that group, so the row is recomputed
    with numpy. ivf orders the ties it returns but, being approximate, guarantees nothing more.
    """

    def __init__(
        self,
        pool: np.ndarray,
        *,
        index: str = "exact",
        chunk_size: int = 262144,
        use_gpu: bool | None = None,
        nprobe: int = 32,
        query_block: int = 16384,
    ):
        if index not in ("exact", "ivf"):
            raise ValueError(f"index must be 'exact' or 'ivf', got {index!r}")
        if chunk_size < 1 or query_block < 1:
            raise ValueError(f"chunk_size and query_block must be >= 1, got {chunk_size}, {query_block}")
        self.pool = np.ascontiguousarray(pool, dtype=np.float32)
        if self.pool.ndim != 2:
            raise ValueError(f"pool must be a [n, d] matrix, got shape {self.pool.shape}")
        if use_gpu is None:
            use_gpu = faiss.get_num_gpus() > 0
        if use_gpu and faiss.get_num_gpus() == 0:
            raise ValueError("use_gpu=True but FAISS sees no GPU (is faiss-gpu installed?)")
        self.gpu = faiss.StandardGpuResources() if use_gpu else None
        self.chunk_size, self.query_block = chunk_size, query_block
        self.ivf = build_ivf(self.pool, nprobe, self.gpu) if index == "ivf" else None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores [nq, k] float32 descending and pool rows [nq, k] int64; -inf / -1 pad missing results."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.pool.shape[1]:
            raise ValueError(f"queries must be [n, {self.pool.shape[1]}], got shape {queries.shape}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        idx = np.full((len(queries), k), -1, dtype=np.int64)
        if self.ivf is not None:
            ivf = faiss.index_gpu_to_cpu(self.ivf) if self.gpu is not None and k > GPU_MAX_K else self.ivf
            for rows in _blocks(len(queries), self.query_block):
                s, i = ivf.search(queries[rows], min(k, len(self.pool)))
                scores[rows], idx[rows] = _merge(scores[rows], idx[rows], np.where(i < 0, -np.inf, s), i, k)
            return scores, idx
        for start in range(0, len(self.pool), self.chunk_size):
            chunk = self.pool[start : start + self.chunk_size]
            kc = min(k, len(chunk))
            knn = self._chunk_knn(chunk, min(kc + 1, len(chunk)))
            for rows in _blocks(len(queries), self.query_block):
                s, i = _cut_ties(queries[rows], chunk, *knn(queries[rows]), kc)
                scores[rows], idx[rows] = _merge(scores[rows], idx[rows], s, i + start, k)
        return scores, idx

    def _chunk_knn(self, chunk: np.ndarray, k: int) -> Knn:
        if self.gpu is not None and k <= GPU_MAX_K:
            index = faiss.index_cpu_to_gpu(self.gpu, 0, faiss.IndexFlatIP(chunk.shape[1]))
            index.add(chunk)
            return lambda q: index.search(q, k)
        return lambda q: faiss.knn(q, chunk, k, metric=faiss.METRIC_INNER_PRODUCT)


def search_topk(
    queries: np.ndarray,
    pool: np.ndarray,
    k: int,
    *,
    chunk_size: int = 262144,
    index: str = "exact",
    use_gpu: bool | None = None,
    nprobe: int = 32,
    query_block: int = 16384,
) -> tuple[np.ndarray, np.ndarray]:
    """Inner-product top-k of every query over `pool` with FAISS.

    Returns scores [nq, k] (float32, descending) and pool row indices [nq, k] (int64); ties are ordered
    by row ascending; when k exceeds the pool the tail is padded with -inf / -1. `use_gpu=None` uses a
    GPU iff FAISS sees one. `nprobe` is the number of inverted lists probed by index="ivf".
    """
    searcher = PoolIndex(
        pool, index=index, chunk_size=chunk_size, use_gpu=use_gpu, nprobe=nprobe, query_block=query_block
    )
    return searcher.search(queries, k)


def retrieve_candidates(
    query_ids: Sequence[str],
    query_vecs: np.ndarray,
    pos_ids: Sequence[str],
    pool_ids: Sequence[str],
    pool_vecs: np.ndarray,
    *,
    top_n: int,
    delta: float,
    dataset: str,
    chunk_size: int = 262144,
    index: str = "exact",
    use_gpu: bool | None = None,
    nprobe: int = 32,
    query_block: int = 16384,
) -> pa.Table:
    """The potential hard negatives of ONE dataset as a CANDIDATES table (see the module docstring).

    Rows are ordered by query (input order), then rank. The schema metadata under `STATS_KEY` holds a
    JSON object: queries, pool, candidates, short_queries (fewer than top_n results), excluded_by_delta,
    top_n, delta, index.
    """
    query_ids, pos_ids, pool_ids = (np.asarray(a, dtype=str) for a in (query_ids, pos_ids, pool_ids))
    query_vecs = np.ascontiguousarray(query_vecs, dtype=np.float32)
    pool_vecs = np.asarray(pool_vecs, dtype=np.float32)
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
    # Pool in id order, so that FAISS's ties by row are ties by candidate id.
    if not (pool_ids[1:] > pool_ids[:-1]).all():
        order = np.argsort(pool_ids, kind="stable")
        pool_ids, pool_vecs = pool_ids[order], pool_vecs[order]
        dup = np.flatnonzero(pool_ids[1:] == pool_ids[:-1])
        if dup.size:
            raise ValueError(
                f"dataset {dataset!r}: candidate id {str(pool_ids[dup[0]])!r} appears more than once"
            )
    nq, nc = len(query_ids), len(pool_ids)
    if nq and not nc:
        raise ValueError(f"dataset {dataset!r}: query {str(query_ids[0])!r} has no candidate pool")
    pos = np.searchsorted(pool_ids, pos_ids).clip(max=max(nc - 1, 0))
    missing = np.flatnonzero(pool_ids[pos] != pos_ids)
    if missing.size:
        qid, pid = str(query_ids[missing[0]]), str(pos_ids[missing[0]])
        raise ValueError(f"dataset {dataset!r}: query {qid!r}: its positive {pid!r} is not in the pool")

    searcher = PoolIndex(
        pool_vecs, index=index, chunk_size=chunk_size, use_gpu=use_gpu, nprobe=nprobe, query_block=query_block
    )
    limit = np.float32(delta)
    empty = np.empty(0, dtype=np.int64)
    parts = [(empty, empty, empty, np.empty(0, dtype=np.float32))]  # query row, pool row, rank, sim
    short = excluded = 0
    for block in _blocks(nq, query_block):
        pending = np.arange(nq)[block]
        k = min(top_n + SEARCH_MARGIN, nc)
        while pending.size:
            scores, idx = searcher.search(query_vecs[pending], k)
            valid = (idx >= 0) & (idx != pos[pending, None])
            near = valid & (scores >= limit)
            keep = valid & ~near
            # Done: enough qualify, or every reachable candidate was seen (ivf pads, or k is the pool).
            done = (keep.sum(axis=1) >= top_n) | (idx[:, -1] < 0) | (k == nc)
            rank = np.cumsum(keep, axis=1) - 1
            rows, cols = np.nonzero(keep & (rank < top_n) & done[:, None])
            parts.append((pending[rows], idx[rows, cols], rank[rows, cols], scores[rows, cols]))
            short += int((keep[done].sum(axis=1) < top_n).sum())
            excluded += int(near[done].sum())
            pending = pending[~done]
            k = min(2 * k, nc)

    q_row, cand, rank, sim = (np.concatenate(column) for column in zip(*parts, strict=True))
    order = np.lexsort((rank, q_row))
    table = pa.table(
        {
            "query_id": pa.array(query_ids).take(q_row[order]),
            "dataset": pa.repeat(pa.scalar(dataset, pa.string()), len(order)),
            "cand_id": pa.array(pool_ids).take(cand[order]),
            "rank": pa.array(rank[order], pa.int32()),
            "sim": pa.array(sim[order], pa.float32()),
        },
        schema=CANDIDATES,
    )
    stats = dict(
        queries=nq,
        pool=nc,
        candidates=table.num_rows,
        short_queries=short,
        excluded_by_delta=excluded,
        top_n=top_n,
        delta=delta,
        index=index,
    )
    return table.replace_schema_metadata({STATS_KEY: json.dumps(stats)})


def run_retrieve(
    embeddings: str | Path | Sequence[str | Path], queries: pa.Table, out_dir: str | Path, cfg: MiningConfig
) -> dict[str, dict]:
    """Retrieve the potential hard negatives of every dataset of `queries` (QUERIES schema).

    `embeddings` is an EMBEDDINGS parquet file, a folder of them, or a list of files. Writes
    `<out_dir>/<dataset>.parquet` and returns {dataset: stats} (see `retrieve_candidates`) with
    `resumed` telling whether the file already existed; an existing file is reported from its metadata
    (a file written by another tool reports only its row count as `candidates`), and raises if it was
    made with another top_n or delta. Raises ValueError, naming the dataset and id, for an embedding of
    the wrong dimension or with non-finite values, a query without embedding (or the reverse), or a
    query whose dataset has no pool.
    """
    paths = str(embeddings) if isinstance(embeddings, str | Path) else [str(p) for p in embeddings]
    source = pads.dataset(paths, format="parquet")
    absent = {"id", "dataset", "kind", "embedding"} - set(source.schema.names)
    if absent:
        raise ValueError(f"{embeddings}: embeddings lack the columns {sorted(absent)}")
    out_dir = Path(out_dir)
    report: dict[str, dict] = {}
    dim = None
    for name in sorted(pc.unique(queries["dataset"]).to_pylist()):
        path = out_dir / f"{name}.parquet"
        if path.exists():
            report[name] = _resumed_stats(path, cfg)
            continue
        rows = source.to_table(
            columns=["id", "kind", "embedding"], filter=pc.field("dataset") == name
        ).sort_by("id")
        unknown = set(pc.unique(rows["kind"]).to_pylist()) - {"query", "candidate"}
        if unknown:
            raise ValueError(f"dataset {name!r}: unknown embedding kind {sorted(unknown, key=str)}")
        query_rows = rows.filter(pc.equal(rows["kind"], "query"))
        pool_rows = rows.filter(pc.equal(rows["kind"], "candidate"))
        pos_ids = _positives(query_rows["id"], queries.filter(pc.equal(queries["dataset"], name)), name)
        query_vecs = _matrix(query_rows, name, dim)
        dim = query_vecs.shape[1]
        pool_vecs = _matrix(pool_rows, name, dim)
        table = retrieve_candidates(
            query_rows["id"].to_numpy(),
            query_vecs,
            pos_ids,
            pool_rows["id"].to_numpy(),
            pool_vecs,
            top_n=cfg.top_n,
            delta=cfg.delta,
            dataset=name,
            chunk_size=cfg.chunk_size,
            index=cfg.index,
            use_gpu=cfg.faiss_gpu,
            nprobe=cfg.ivf_nprobe,
            query_block=cfg.query_block,
        )
        write_parquet(table, path)
        report[name] = {**json.loads(table.schema.metadata[STATS_KEY]), "resumed": False}
    return report


def _resumed_stats(path: Path, cfg: MiningConfig) -> dict:
    meta = pq.read_schema(path).metadata or {}
    if STATS_KEY not in meta:
        return {"candidates": pq.read_metadata(path).num_rows, "resumed": True}
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


def build_ivf(pool: np.ndarray, nprobe: int, gpu: faiss.StandardGpuResources | None) -> faiss.Index | None:
    """An inner-product IndexIVFFlat over `pool` ([n, d] float32, C-contiguous), trained on and filled
    with the whole pool (on GPU when `gpu` is given, so the result is then a GPU index), searching
    min(`nprobe`, nlist) lists; or None when the pool is too small to train nlist ~ 4 sqrt(n) lists of
    at least MIN_POINTS_PER_LIST points each (at least MIN_NLIST lists; callers then search exactly)."""
    n, d = pool.shape
    nlist = min(int(4 * math.sqrt(n)), n // MIN_POINTS_PER_LIST, MAX_NLIST)
    if nlist < MIN_NLIST:
        return None
    index = faiss.index_factory(d, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    if gpu is not None:
        index = faiss.index_cpu_to_gpu(gpu, 0, index)
    index.train(pool)
    index.add(pool)
    index.nprobe = min(nprobe, nlist)
    return index


def _blocks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _sort(scores: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row by score descending, then index ascending."""
    order = np.lexsort((idx, -scores), axis=1)
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(idx, order, axis=1)


def _merge(
    scores: np.ndarray, idx: np.ndarray, more_scores: np.ndarray, more_idx: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    s, i = _sort(np.concatenate([scores, more_scores], axis=1), np.concatenate([idx, more_idx], axis=1))
    return s[:, :k], i[:, :k]


def _cut_ties(
    queries: np.ndarray, chunk: np.ndarray, scores: np.ndarray, idx: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """FAISS's top-(k or k+1) of a chunk, sorted and cut to k; rows whose k-th and (k+1)-th scores tie
    are recomputed exactly, since FAISS may have kept any members of that tie group."""
    scores, idx = _sort(scores, idx)
    if scores.shape[1] > k:
        tied = np.flatnonzero(scores[:, k] == scores[:, k - 1])
        for start in range(0, len(tied), TIE_ROWS):
            rows = tied[start : start + TIE_ROWS]
            scores[rows, :k], idx[rows, :k] = _exact_topk(queries[rows], chunk, k)
    return scores[:, :k], idx[:, :k]


def _exact_topk(queries: np.ndarray, pool: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy top-k (k <= pool size) with ties at the k-th score resolved to the lowest rows."""
    sims = queries @ pool.T
    kth = np.partition(sims, -k, axis=1)[:, -k, None]
    above = sims > kth
    tied = sims == kth
    take = above | (tied & (np.cumsum(tied, axis=1) <= k - above.sum(axis=1, keepdims=True)))
    cols = np.nonzero(take)[1].reshape(len(queries), k)
    return _sort(np.take_along_axis(sims, cols, axis=1), cols)
