"""Inner-product top-k over a fixed pool with FAISS: exact (chunked, bounded memory) or IVF.

Exact search processes the pool in chunks of `chunk_size` vectors and the queries in blocks of
`query_block`, merging the per-chunk top-k lists, so memory stays bounded at millions of candidates.
"ivf" trains one IndexIVFFlat (approximate, holds a copy of the pool). FAISS runs on GPU when it sees
one (faiss-gpu on clusters), on CPU otherwise. Used by mining's retrieve stage and by the Serve index.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import faiss
import numpy as np

from unime_ray.config import IVF_NPROBE, SEARCH_CHUNK_SIZE, SEARCH_QUERY_BLOCK

GPU_MAX_K = 2048  # FAISS GPU k-selection limit; a larger k is searched on CPU
MIN_POINTS_PER_LIST = 39  # FAISS k-means wants at least 39 training points per centroid
MIN_NLIST = 8  # pools too small for this many inverted lists are searched exactly
MAX_NLIST = 65536
TIE_ROWS = 64  # rows recomputed at once where FAISS may have cut a group of equal scores

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
        chunk_size: int = SEARCH_CHUNK_SIZE,
        use_gpu: bool | None = None,
        nprobe: int = IVF_NPROBE,
        query_block: int = SEARCH_QUERY_BLOCK,
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
            for rows in blocks(len(queries), self.query_block):
                s, i = ivf.search(queries[rows], min(k, len(self.pool)))
                scores[rows], idx[rows] = _merge(scores[rows], idx[rows], np.where(i < 0, -np.inf, s), i, k)
            return scores, idx
        for start in range(0, len(self.pool), self.chunk_size):
            chunk = self.pool[start : start + self.chunk_size]
            kc = min(k, len(chunk))
            knn = self._chunk_knn(chunk, min(kc + 1, len(chunk)))
            for rows in blocks(len(queries), self.query_block):
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
    chunk_size: int = SEARCH_CHUNK_SIZE,
    index: str = "exact",
    use_gpu: bool | None = None,
    nprobe: int = IVF_NPROBE,
    query_block: int = SEARCH_QUERY_BLOCK,
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


def blocks(n: int, size: int) -> Iterator[slice]:
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
