"""Retrieve stage (paper eq. 1): FAISS top-k against numpy brute force, the exclusion rules on
hand-worked 2-d cases, ivf recall, and run_retrieve's per-dataset files, resume and input errors."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from unime_ray.config import SEARCH_QUERY_BLOCK, MiningConfig
from unime_ray.data.schemas import CANDIDATES, EMBEDDINGS, QUERIES
from unime_ray.engine.index import PoolIndex, search_topk
from unime_ray.mining.retrieve import SEARCH_MARGIN, STATS_KEY, retrieve_candidates, run_retrieve

no_gpu = pytest.mark.skipif(faiss.get_num_gpus() == 0, reason="FAISS sees no GPU")


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_topk(queries: np.ndarray, pool: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference: full score matrix, stable sort by score descending (so ties by row ascending)."""
    sims = queries @ pool.T
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, idx, axis=1), idx


def at_angle(x: float) -> list[float]:
    """A unit 2-d vector whose inner product with (1, 0) is exactly x (float32)."""
    x = float(np.float32(x))
    return [x, float(np.sqrt(1 - x * x))]


def stats(table: pa.Table) -> dict:
    import json

    return json.loads(table.schema.metadata[STATS_KEY])


def rows_of(table: pa.Table) -> list[tuple[str, str, int]]:
    return list(zip(table["query_id"].to_pylist(), table["cand_id"].to_pylist(), table["rank"].to_pylist()))


# ---- search_topk ------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size, k", [(10_000, 50), (700, 50), (700, 1500), (256, 300)])
def test_exact_search_equals_brute_force(chunk_size, k):
    rng = np.random.default_rng(0)
    pool, queries = unit(rng, 3000, 32), unit(rng, 97, 32)
    scores, idx = search_topk(queries, pool, k, chunk_size=chunk_size, query_block=40)
    ref_scores, ref_idx = brute_topk(queries, pool, k + 1)
    assert idx.shape == scores.shape == (97, k)
    np.testing.assert_allclose(scores, ref_scores[:, :k], atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(queries @ pool.T, idx, axis=1), scores, atol=1e-5)
    # FAISS and numpy round differently, so only neighbours closer than rounding may swap places.
    gap = np.diff(ref_scores, axis=1)
    near_tie = np.minimum(np.abs(gap[:, :k]), np.abs(np.pad(gap, ((0, 0), (1, 0)), constant_values=1)[:, :k]))
    assert ((idx == ref_idx[:, :k]) | (near_tie < 1e-5)).all()
    assert (idx == ref_idx[:, :k]).mean() > 0.99


@pytest.mark.parametrize("chunk_size", [5000, 333])
@pytest.mark.parametrize("k", [10, 150, 1000])
def test_exact_search_breaks_ties_by_row(chunk_size, k):
    # Small integer vectors: every inner product is exact, so equal scores are truly equal, in large
    # groups that straddle the k-th position (where FAISS alone keeps arbitrary members).
    rng = np.random.default_rng(1)
    pool = rng.integers(0, 3, (5000, 8)).astype(np.float32)
    queries = rng.integers(0, 3, (64, 8)).astype(np.float32)
    scores, idx = search_topk(queries, pool, k, chunk_size=chunk_size)
    ref_scores, ref_idx = brute_topk(queries, pool, k)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(scores, ref_scores)


def test_search_pads_when_k_exceeds_pool():
    pool = np.eye(3, dtype=np.float32)
    scores, idx = search_topk(np.array([[0.0, 1.0, 0.5]], dtype=np.float32), pool, 5, chunk_size=2)
    np.testing.assert_array_equal(idx, [[1, 2, 0, -1, -1]])
    np.testing.assert_array_equal(scores, [[1.0, 0.5, 0.0, -np.inf, -np.inf]])


def clustered(
    rng: np.random.Generator, n: int, d: int = 32, centers: int = 40, noise: float = 0.25
) -> np.ndarray:
    c = unit(rng, centers, d)
    x = c[rng.integers(0, centers, n)] + noise * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def recall(idx: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(idx, ref)]))


def test_ivf_recall_against_exact():
    rng = np.random.default_rng(2)
    data = clustered(rng, 4200)
    pool, queries = data[:4000], data[4000:]
    assert PoolIndex(pool, index="ivf").ivf is not None  # really ivf, not the small-pool fallback
    _, idx = search_topk(queries, pool, 50, index="ivf")
    _, ref = brute_topk(queries, pool, 50)
    assert recall(idx, ref) >= 0.9


def test_ivf_falls_back_to_exact_on_a_small_pool():
    rng = np.random.default_rng(3)
    pool, queries = unit(rng, 200, 16), unit(rng, 10, 16)
    assert PoolIndex(pool, index="ivf").ivf is None
    np.testing.assert_array_equal(
        search_topk(queries, pool, 20, index="ivf")[1], brute_topk(queries, pool, 20)[1]
    )


@pytest.mark.skipif(faiss.get_num_gpus() > 0, reason="a GPU is present")
def test_use_gpu_without_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="no GPU"):
        search_topk(np.zeros((1, 4), np.float32), np.zeros((4, 4), np.float32), 2, use_gpu=True)


@no_gpu
@pytest.mark.gpu
def test_gpu_search_matches_cpu():
    rng = np.random.default_rng(4)
    pool, queries = unit(rng, 20_000, 64), unit(rng, 300, 64)
    _, ref = brute_topk(queries, pool, 50)
    _, idx = search_topk(queries, pool, 50, chunk_size=7000, use_gpu=True)
    np.testing.assert_array_equal(idx, ref)
    _, idx = search_topk(queries, pool, 3000, chunk_size=7000, use_gpu=True)  # above the GPU k limit
    np.testing.assert_array_equal(idx, brute_topk(queries, pool, 3000)[1])
    data = clustered(rng, 20_300)
    pool, queries = data[:20_000], data[20_000:]
    _, idx = search_topk(queries, pool, 50, index="ivf", use_gpu=True)
    assert recall(idx, brute_topk(queries, pool, 50)[1]) >= 0.9


# ---- retrieve_candidates: hand-worked cases ---------------------------------------------------------
# The query is (1, 0), so a candidate's similarity is exactly its first coordinate.


@pytest.mark.parametrize("delta", [0.75, 0.7])
def test_positive_and_delta_excluded_before_truncation(delta):
    pool = {
        "e": at_angle(0.5),
        "a": at_angle(1.0),  # >= delta
        "b": at_angle(delta),  # exactly delta (in float32): excluded
        "pos": at_angle(0.6),  # below delta, but the query's own positive
        "c": at_angle(0.65),
        "d": at_angle(0.5),  # ties with e: id order puts d first
        "f": at_angle(0.0),
        "g": at_angle(-0.5),
    }
    table = retrieve_candidates(
        ["q"], [[1.0, 0.0]], ["pos"], list(pool), list(pool.values()), top_n=3, delta=delta, dataset="D"
    )
    assert table.schema.equals(CANDIDATES)
    assert rows_of(table) == [("q", "c", 0), ("q", "d", 1), ("q", "e", 2)]
    np.testing.assert_array_equal(table["sim"].to_numpy(), np.float32([0.65, 0.5, 0.5]))
    assert set(table["dataset"].to_pylist()) == {"D"}
    assert stats(table) == dict(
        queries=1,
        pool=8,
        candidates=3,
        short_queries=0,
        excluded_by_delta=2,
        top_n=3,
        delta=delta,
        index="exact",
    )


def test_deeper_search_when_the_window_is_all_exclusions():
    # q1 = (1, 0) has 40 near duplicates (>= delta) above everything else, more than the first window
    # of top_n + SEARCH_MARGIN, so it needs two re-searches; q2 = (-1, 0) is done in the first round.
    n_dup = 40
    assert n_dup > 2 * (2 + SEARCH_MARGIN)
    dups = {f"dup{i:02d}": at_angle(0.999 - i * 1e-4) for i in range(n_dup)}
    lows = {f"low{i}": at_angle(0.5 - 0.1 * i) for i in range(10)}  # 0.5, 0.4, ..., -0.4
    pool = {**dups, **lows, "pos1": at_angle(0.45)}
    table = retrieve_candidates(
        ["q1", "q2"],
        [[1.0, 0.0], [-1.0, 0.0]],
        ["pos1", "low9"],
        list(pool),
        list(pool.values()),
        top_n=2,
        delta=0.99,
        dataset="D",
    )
    # Rows follow the input query order although q2 finished first.
    assert rows_of(table) == [("q1", "low0", 0), ("q1", "low1", 1), ("q2", "low8", 0), ("q2", "low7", 1)]
    assert stats(table)["excluded_by_delta"] == n_dup
    assert stats(table)["short_queries"] == 0


def test_small_pool_returns_every_qualifying_candidate():
    pool = {"pos": at_angle(0.9), "x": at_angle(0.2), "y": at_angle(0.3)}
    table = retrieve_candidates(
        ["q"], [[1.0, 0.0]], ["pos"], list(pool), list(pool.values()), top_n=5, delta=0.95, dataset="D"
    )
    assert rows_of(table) == [("q", "y", 0), ("q", "x", 1)]
    assert stats(table)["short_queries"] == 1


def reference(query_vecs, pos_ids, pool_ids, pool_vecs, top_n, delta) -> list[list[str]]:
    """Independent per-query computation of eq. 1 with the documented rules."""
    out = []
    for q, pos in zip(query_vecs, pos_ids):
        sims = (pool_vecs @ q).astype(np.float32)
        ok = [(-s, c) for c, s in zip(pool_ids, sims) if c != pos and s < np.float32(delta)]
        out.append([c for _, c in sorted(ok)[:top_n]])
    return out


@pytest.mark.parametrize("chunk_size", [10_000, 97])
def test_retrieve_matches_reference_with_many_near_duplicates(chunk_size):
    rng = np.random.default_rng(5)
    data = clustered(rng, 660, d=8, centers=5, noise=0.15)  # tight clusters: many sims above delta
    pool_vecs, query_vecs = data[:600], data[600:]
    pool_ids = [f"c{i:04d}" for i in rng.permutation(600)]
    pos_ids = [pool_ids[i] for i in rng.integers(0, 600, 60)]
    table = retrieve_candidates(
        [f"q{i}" for i in range(60)],
        query_vecs,
        pos_ids,
        pool_ids,
        pool_vecs,
        top_n=20,
        delta=0.9,
        dataset="D",
        chunk_size=chunk_size,
        query_block=16,
    )
    expected = reference(query_vecs, pos_ids, pool_ids, pool_vecs, 20, 0.9)
    got = [[] for _ in range(60)]
    for qid, cid, rank in rows_of(table):
        assert rank == len(got[int(qid[1:])])  # ranks contiguous from 0
        got[int(qid[1:])].append(cid)
    assert got == expected
    assert stats(table)["excluded_by_delta"] > 60 * SEARCH_MARGIN  # the deeper search was needed


def test_retrieve_with_ivf_is_close_to_reference():
    rng = np.random.default_rng(6)
    data = clustered(rng, 3100, d=16, centers=20, noise=0.2)
    pool_vecs, query_vecs = data[:3000], data[3000:]
    pool_ids = [f"c{i:04d}" for i in range(3000)]
    pos_ids = pool_ids[:100]
    table = retrieve_candidates(
        [f"q{i:03d}" for i in range(100)],
        query_vecs,
        pos_ids,
        pool_ids,
        pool_vecs,
        top_n=30,
        delta=0.95,
        dataset="D",
        index="ivf",
    )
    expected = reference(query_vecs, pos_ids, pool_ids, pool_vecs, 30, 0.95)
    got = table.group_by("query_id").aggregate([("cand_id", "list")]).sort_by("query_id")
    assert got.num_rows == 100
    assert recall(got["cand_id_list"].to_pylist(), expected) >= 0.9
    assert stats(table)["index"] == "ivf"


def test_retrieve_input_errors():
    args = dict(top_n=2, delta=0.9, dataset="D")
    vec = [[1.0, 0.0]]
    with pytest.raises(ValueError, match="dataset 'D': query 'q' has no candidate pool"):
        retrieve_candidates(["q"], vec, ["p"], [], np.zeros((0, 2)), **args)
    with pytest.raises(ValueError, match="'D'.*'q'.*'p' is not in the pool"):
        retrieve_candidates(["q"], vec, ["p"], ["a"], vec, **args)
    with pytest.raises(ValueError, match="'D'.*candidate id 'a' appears more than once"):
        retrieve_candidates(["q"], vec, ["a"], ["a", "a"], vec * 2, **args)
    with pytest.raises(ValueError, match="'D'.*query id 'q' appears more than once"):
        retrieve_candidates(["q", "q"], vec * 2, ["a", "a"], ["a"], vec, **args)


# ---- run_retrieve -----------------------------------------------------------------------------------


def world() -> tuple[list[dict], pa.Table]:
    """Two datasets in the same 2-d space; B/leak (sim 0.8 to A/q0) would be A/q0's best if the
    datasets leaked into each other."""
    emb = [
        {"id": "A/q0", "dataset": "A", "kind": "query", "embedding": [1.0, 0.0]},
        {"id": "A/q1", "dataset": "A", "kind": "query", "embedding": [-1.0, 0.0]},
        {"id": "A/pos0", "dataset": "A", "kind": "candidate", "embedding": at_angle(0.9)},
        {"id": "A/pos1", "dataset": "A", "kind": "candidate", "embedding": at_angle(-0.9)},
        {"id": "A/c", "dataset": "A", "kind": "candidate", "embedding": at_angle(0.3)},
        {"id": "B/q0", "dataset": "B", "kind": "query", "embedding": [1.0, 0.0]},
        {"id": "B/pos0", "dataset": "B", "kind": "candidate", "embedding": at_angle(0.1)},
        {"id": "B/leak", "dataset": "B", "kind": "candidate", "embedding": at_angle(0.8)},
    ]
    queries = pa.Table.from_pylist(
        [
            {"id": q, "dataset": q[0], "text": "", "image": "", "pos_id": p}
            for q, p in [("A/q0", "A/pos0"), ("A/q1", "A/pos1"), ("B/q0", "B/pos0")]
        ],
        schema=QUERIES,
    )
    return emb, queries


def write_embeddings(rows: list[dict], folder) -> None:
    """Two files, rows of both datasets in each, like the part files of a Ray Data write."""
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows[::2], schema=EMBEDDINGS), folder / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[1::2], schema=EMBEDDINGS), folder / "part-1.parquet")


@pytest.mark.parametrize("query_block", [SEARCH_QUERY_BLOCK, 1])
def test_run_retrieve_per_dataset_files(local_ray, tmp_path, query_block):
    emb, queries = world()
    write_embeddings(emb, tmp_path / "emb")
    cfg = MiningConfig(top_n=5, delta=0.95, query_block=query_block)
    report = run_retrieve(tmp_path / "emb", queries, tmp_path / "out", cfg)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["A.parquet", "B.parquet"]  # no temp
    a, b = pq.read_table(tmp_path / "out" / "A.parquet"), pq.read_table(tmp_path / "out" / "B.parquet")
    assert a.schema.equals(CANDIDATES) and b.schema.equals(CANDIDATES)
    assert rows_of(a) == [
        ("A/q0", "A/c", 0),
        ("A/q0", "A/pos1", 1),
        ("A/q1", "A/c", 0),
        ("A/q1", "A/pos0", 1),
    ]
    assert rows_of(b) == [("B/q0", "B/leak", 0)]
    # Written as the blocks of queries come, one row group each: A's 2 queries in blocks of 1 make 2.
    assert pq.read_metadata(tmp_path / "out" / "A.parquet").num_row_groups == (2 if query_block == 1 else 1)
    # A fresh search also reports its dimension and the Ray node that ran it (a resumed one cannot).
    assert report["A"].pop("node") and report["A"].pop("dim") == 2
    assert report["A"] == dict(
        queries=2,
        pool=3,
        candidates=4,
        short_queries=2,
        excluded_by_delta=0,
        top_n=5,
        delta=0.95,
        index="exact",
        resumed=False,
    )
    assert report["B"]["candidates"] == 1 and report["B"]["pool"] == 2


def test_run_retrieve_resumes_and_keeps_finished_work(local_ray, tmp_path):
    emb, queries = world()
    bad = [dict(r, embedding=[0.0, 1.0, 0.0]) if r["id"] == "B/leak" else r for r in emb]
    write_embeddings(bad, tmp_path / "emb")
    cfg = MiningConfig(top_n=5, delta=0.95)
    # A finishes in a run of its own first: when both run at once, B's error cancels A mid-way or not
    # depending on which task the scheduler starts first (run_tasks cancels a failed stage's others).
    run_retrieve(tmp_path / "emb", queries.filter(pc.equal(queries["dataset"], "A")), tmp_path / "out", cfg)
    a_path = tmp_path / "out" / "A.parquet"
    first = pq.read_table(a_path)
    mtime = a_path.stat().st_mtime_ns
    with pytest.raises(ValueError, match="'B'.*'B/leak'.*dimension 3"):
        run_retrieve(tmp_path / "emb", queries, tmp_path / "out", cfg)
    # The finished A is kept untouched, and nothing half-written is left for B.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["A.parquet"]
    assert a_path.stat().st_mtime_ns == mtime

    write_embeddings(emb, tmp_path / "emb")
    files = sorted((tmp_path / "emb").glob("*.parquet"))
    report = run_retrieve(files, queries, tmp_path / "out", cfg)
    assert a_path.stat().st_mtime_ns == mtime
    assert pq.read_table(a_path).equals(first)
    assert report["A"]["resumed"] and not report["B"]["resumed"]
    assert report["A"]["candidates"] == 4 and report["A"]["queries"] == 2

    again = run_retrieve(files, queries, tmp_path / "out", cfg)
    fresh = {k: v for k, v in report["B"].items() if k not in ("node", "dim")}
    assert again["B"] == dict(fresh, resumed=True)
    with pytest.raises(ValueError, match="A.parquet was written with top_n=5, delta=0.95"):
        run_retrieve(files, queries, tmp_path / "out", MiningConfig(top_n=5, delta=0.9))


def test_run_retrieve_resume_of_a_foreign_file(local_ray, tmp_path):
    emb, queries = world()
    write_embeddings(emb, tmp_path / "emb")
    foreign = pa.Table.from_pylist(
        [{"query_id": "A/q0", "dataset": "A", "cand_id": "A/c", "rank": 0, "sim": 0.3}]
    )
    (tmp_path / "out").mkdir()
    pq.write_table(foreign.cast(CANDIDATES), tmp_path / "out" / "A.parquet")
    report = run_retrieve(tmp_path / "emb", queries, tmp_path / "out", MiningConfig(top_n=5))
    assert report["A"] == {"candidates": 1, "resumed": True}


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda e, q: (e[:-1] + [dict(e[-1], embedding=[1.0])], q), "'B'.*'B/leak'.*dimension 1"),
        (lambda e, q: (e[:1] + [dict(e[1], embedding=[np.nan, 0.0])] + e[2:], q), "'A'.*'A/q1'.*not finite"),
        (lambda e, q: ([r for r in e if r["id"] != "A/q1"], q), "'A'.*query 'A/q1' has no embedding"),
        (lambda e, q: (e, q.slice(1)), "'A'.*query embedding 'A/q0' has no row"),
        (
            lambda e, q: ([r for r in e if r["id"] not in ("B/pos0", "B/leak")], q),
            "'B'.*'B/q0'.*no candidate",
        ),
        (lambda e, q: (e[:2] + [dict(e[2], kind="cand")] + e[3:], q), "'A'.*unknown embedding kind"),
    ],
    ids=["dimension", "nan", "query-without-embedding", "embedding-without-query", "no-pool", "kind"],
)
def test_run_retrieve_input_errors(local_ray, tmp_path, change, match):
    emb, queries = change(*world())
    write_embeddings(emb, tmp_path / "emb")
    with pytest.raises(ValueError, match=match):
        run_retrieve(tmp_path / "emb", queries, tmp_path / "out", MiningConfig(top_n=5, delta=0.95))


def test_collapsed_embeddings_search_in_bounded_memory(monkeypatch):
    """Every vector the same (a collapsed embedder): every candidate is within delta of every query, so k
    doubles up to the whole pool. The search then takes fewer queries at a time, so the score and row
    matrices stay near SEARCH_CELLS cells instead of queries x pool (here 200 x 10000 x 12 bytes = 24 MB
    at once, twice while merging: 217 MB peak measured); numpy reports its allocations to tracemalloc."""
    import tracemalloc

    import unime_ray.mining.retrieve as retrieve

    monkeypatch.setattr(retrieve, "SEARCH_CELLS", 1 << 16)  # <1 MB of scores and rows per search
    nq, nc = 200, 10000
    queries, pool = np.ones((nq, 8), np.float32) / np.sqrt(8), np.ones((nc, 8), np.float32) / np.sqrt(8)
    pool_ids = [f"c{i:05d}" for i in range(nc)]
    tracemalloc.start()
    try:
        table = retrieve_candidates(
            [f"q{i}" for i in range(nq)],
            queries,
            pool_ids[:nq],
            pool_ids,
            pool,
            top_n=5,
            delta=0.98,
            dataset="D",
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    stats = json.loads(table.schema.metadata[STATS_KEY])
    assert table.num_rows == 0 and stats["short_queries"] == nq
    assert stats["excluded_by_delta"] == nq * (nc - 1)  # every candidate but the own positive
    assert peak < 50e6, f"peak {peak / 1e6:.0f} MB"  # 217 MB without the bound (measured)
