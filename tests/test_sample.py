"""Sample stage: the paper's hard-negative rules on hand-worked cases, then the whole stage on hand-built
judge score files. Every expected value below was worked out by hand from the rules, not by the code."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unime_ray.config import MiningConfig
from unime_ray.data.mmeb import DataError
from unime_ray.data.schemas import HARD_NEGATIVES, JUDGE_SCORES, POOL, QUARANTINE, QUERIES
from unime_ray.mining.sample import (
    _json_floats,
    cyclic_order,
    query_rng,
    run_sample,
    sample_many,
    sample_negatives,
)

PAPER = dict(interval=5, min_negatives=10, num_negatives=10)


def test_cyclic_order():
    assert cyclic_order(12, 5) == [0, 5, 10, 1, 6, 11, 2, 7, 3, 8, 4, 9]
    assert cyclic_order(3, 5) == [0, 1, 2]
    assert cyclic_order(7, 1) == [0, 1, 2, 3, 4, 5, 6]
    assert cyclic_order(0, 5) == []


# 14 candidates of a query with s_pos = 0.9 and beta = 0.1: threshold 0.8.
HAND_SCORES = np.array(
    [0.95, 0.8000001, 0.80, 0.30, 0.70, 0.50, 0.60, 0.85, 0.10, 0.70, 0.40, 0.20, 0.65, 0.55]
)
HAND_RANKS = np.array([0, 1, 2, 3, 10, 5, 6, 7, 8, 4, 9, 11, 12, 13])
# Dropped: 0 (0.95), 1 (0.8000001), 7 (0.85). Index 2 (exactly 0.8) survives: 11 survivors.
# Hardest first, 4 and 9 tie at 0.70 and 9 has the better rank:
#   positions 0..10 = [2, 9, 4, 12, 6, 13, 5, 10, 3, 11, 8]
# cyclic_order(11, 5) = [0, 5, 10, 1, 6, 2, 7, 3, 8, 4, 9] picks these indices:
HAND_ALL = [2, 13, 8, 9, 5, 4, 10, 12, 3, 6, 11]
HAND_ALL_SCORES = [0.80, 0.55, 0.10, 0.70, 0.50, 0.70, 0.40, 0.65, 0.30, 0.60, 0.20]


def hand_sample(**kwargs):
    args = dict(beta=0.1, rng=np.random.default_rng(0), **PAPER) | kwargs
    return sample_negatives(0.9, HAND_SCORES, HAND_RANKS, **args)


def test_filter_order_and_cycle_by_hand():
    sampled = hand_sample()
    assert sampled.indices == HAND_ALL[:10]
    assert sampled.scores == HAND_ALL_SCORES[:10]
    assert sampled.num_survivors == 11
    assert not sampled.fallback
    # More room than survivors: every survivor once, no padding (11 >= min_negatives).
    assert hand_sample(num_negatives=20).indices == HAND_ALL


def test_num_negatives_keeps_a_prefix():
    assert hand_sample(num_negatives=8).indices == [2, 13, 8, 9, 5, 4, 10, 12]
    assert hand_sample(num_negatives=8).indices == hand_sample().indices[:8]


def test_padding_repeats_the_cyclical_selection():
    # s_pos 0.5, beta 0: survivors 1 (0.2), 2 (0.5, equal to the threshold), 4 (0.4) -> order [2, 4, 1].
    sampled = sample_negatives(
        0.5,
        np.array([0.9, 0.2, 0.5, 0.7, 0.4]),
        np.arange(5),
        beta=0.0,
        rng=np.random.default_rng(0),
        **PAPER,
    )
    assert sampled.indices == [2, 4, 1, 2, 4, 1, 2, 4, 1, 2]
    assert sampled.scores == [0.5, 0.4, 0.2, 0.5, 0.4, 0.2, 0.5, 0.4, 0.2, 0.5]
    assert sampled.num_survivors == 3 and not sampled.fallback


def test_fallback_takes_distinct_random_candidates_with_score_one():
    scores = np.linspace(0.35, 0.99, 50)  # all above 0.3 - 0.01

    def draw(seed, query_id):
        return sample_negatives(0.3, scores, np.arange(50), beta=0.01, rng=query_rng(seed, query_id), **PAPER)

    sampled = draw(7, "ds/q1")
    assert sampled.fallback and sampled.num_survivors == 0
    assert len(sampled.indices) == 10 and len(set(sampled.indices)) == 10
    assert set(sampled.indices) <= set(range(50))
    assert sampled.scores == [1.0] * 10
    assert draw(7, "ds/q1").indices == sampled.indices
    assert draw(7, "ds/q2").indices != sampled.indices
    assert draw(8, "ds/q1").indices != sampled.indices


def test_fallback_with_a_pool_smaller_than_ten():
    sampled = sample_negatives(
        0.1, np.array([0.5, 0.6, 0.7, 0.8]), np.arange(4), beta=0.01, rng=query_rng(0, "q"), **PAPER
    )
    assert sampled.fallback and sampled.num_survivors == 0
    assert sorted(sampled.indices[:4]) == [0, 1, 2, 3]
    assert sampled.indices == [sampled.indices[i % 4] for i in range(10)]
    assert sampled.scores == [1.0] * 10


def test_bad_input_is_an_error():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="at least one candidate"):
        sample_negatives(0.9, np.array([]), np.array([]), beta=0.1, rng=rng, **PAPER)
    with pytest.raises(ValueError, match="NaN"):
        sample_negatives(0.9, np.array([0.1, np.nan]), np.arange(2), beta=0.1, rng=rng, **PAPER)
    with pytest.raises(ValueError, match=">= 1"):
        sample_negatives(0.9, np.array([0.1]), np.arange(1), beta=0.1, rng=rng, **PAPER | {"interval": 0})


@pytest.mark.parametrize(
    "settings",
    [
        PAPER,
        dict(interval=1, min_negatives=1, num_negatives=3),
        dict(interval=7, min_negatives=12, num_negatives=4),
    ],
)
def test_sample_many_picks_what_sample_negatives_picks(settings):
    """The stage samples all queries of a file at once; each query must get the very indices the
    one-query rules (checked by hand above) give it: ties in score and in rank, pools of 1 to 60,
    padding, truncation, and no slots for a fallback query (its random draw stays with sample_negatives)."""
    rng = np.random.default_rng(5)
    sizes = rng.integers(1, 61, size=300)
    pos_scores = rng.choice(np.arange(9) / 8, size=len(sizes))  # exact in float64: ties at the threshold
    scores = rng.choice(np.arange(9) / 8, size=sizes.sum())
    ranks = np.concatenate(
        [rng.permutation(n) if k % 3 else rng.integers(0, 4, n) for k, n in enumerate(sizes)]
    )
    group = np.repeat(np.arange(len(sizes)), sizes)
    many = sample_many(pos_scores, group, scores, ranks, beta=0.125, **settings)
    starts, fallbacks = np.r_[0, np.cumsum(many.num_negatives)], 0
    for k, (lo, hi) in enumerate(zip(np.r_[0, np.cumsum(sizes)[:-1]], np.cumsum(sizes), strict=True)):
        one = sample_negatives(
            pos_scores[k], scores[lo:hi], ranks[lo:hi], beta=0.125, rng=np.random.default_rng(0), **settings
        )
        assert many.num_survivors[k] == one.num_survivors
        expected = [] if one.fallback else [lo + i for i in one.indices]
        assert many.slots[starts[k] : starts[k + 1]].tolist() == expected, k
        fallbacks += one.fallback
    assert 0 < fallbacks < len(sizes) and many.num_survivors.max() > 12  # the cases the test means to cover


def test_json_floats_are_the_shortest_decimals_of_float32():
    """The official JSON writes each stored float32 as float(str(np.float32(v))) (0.9, not 0.899999976);
    the stage computes that for whole arrays through Arrow, which must give the very same floats."""
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    edges = np.array([0, -0.0, 1, 0.9, 0.8, 1e-4, 1e-5, 5e-5, 1e-45, 3.4e38, 16777217, 0.1], np.float32)
    values = np.concatenate([rng.random(100_000).astype(np.float32), edges, bits[np.isfinite(bits)]])
    got = _json_floats(pa.array(values))
    assert [repr(v) for v in got] == [repr(float(str(np.float32(v)))) for v in values]


# ---- the stage ------------------------------------------------------------------------------------------
# Scores are multiples of 1/32 so float32 storage holds them exactly and "equal to the threshold" is exact.

Q1_CANDIDATES = {  # id: (rank, score); s_pos 0.875
    "a0": (0, 0.9375),
    "a1": (1, 0.8125),
    "a2": (2, 0.75),
    "a3": (3, 0.5),
    "a4": (4, 0.6875),
    "a5": (5, 0.5),
    "a6": (6, 0.25),
    "a7": (7, 0.375),
    "a8": (8, 0.125),
}
Q4_CANDIDATES = {"b0": (0, 0.9375)} | {f"b{i}": (i, (28 - i) / 32) for i in range(1, 12)}  # s_pos 1.0


def score_row(query_id, cand_id, rank, score, is_positive=False):
    return {
        "query_id": query_id,
        "dataset": "ds",
        "cand_id": cand_id,
        "is_positive": is_positive,
        "rank": rank,
        "sim": 0.5,
        "score": score,
    }


def image_of(id):
    return f"img/{id}.jpg" if int(id[1:]) % 2 == 0 else ""


@pytest.fixture
def stage(local_ray, tmp_path):
    ids = ["p1", "p2", "p3", "p4", "p5", *Q1_CANDIDATES, *Q4_CANDIDATES, "b12", "c0", "c1", "c2"]
    pool = pa.Table.from_pylist(
        [{"id": i, "dataset": "ds", "text": f"text of {i}", "image": image_of(i)} for i in ids], schema=POOL
    )
    queries = pa.Table.from_pylist(
        [
            {
                "id": f"q{n}",
                "dataset": "ds",
                "text": f"query {n}",
                "image": "img/q1.jpg" if n == 1 else "",
                "pos_id": f"p{n}",
            }
            for n in range(1, 6)
        ],
        schema=QUERIES,
    )
    q1 = [score_row("q1", c, r, s) for c, (r, s) in Q1_CANDIDATES.items()]
    q1 = q1[5:] + [score_row("q1", "p1", -1, 0.875, True)] + q1[:5]  # positive in the middle, ranks unsorted
    # q2: every candidate scores above 0.5 - beta -> fallback.
    q2 = [score_row("q2", "p2", -1, 0.5, True)] + [
        score_row("q2", f"c{i}", i, 0.625 + i / 8) for i in range(3)
    ]
    # File 0, row 0: a NaN score (quarantined, the rest of q4 is sampled); q3 has no positive row.
    q4 = [score_row("q4", "b12", 12, float("nan")), score_row("q4", "p4", -1, 1.0, True)]
    q4 += [score_row("q4", c, r, s) for c, (r, s) in Q4_CANDIDATES.items()]
    q3 = [score_row("q3", "a0", 0, 0.25), score_row("q3", "a1", 1, 0.5)]
    files = [tmp_path / "scores" / "part-0.parquet", tmp_path / "scores" / "part-1.parquet"]
    files[0].parent.mkdir()
    pq.write_table(pa.Table.from_pylist(q4 + q3, schema=JUDGE_SCORES), files[0])
    # File 1 holds q1 and q2: queries come out of the files as q4, q1, q2 and must be sorted.
    pq.write_table(pa.Table.from_pylist(q2 + q1, schema=JUDGE_SCORES), files[1])
    return files, queries, pool, tmp_path / "out"


def rows_by_id(out: Path) -> dict[str, dict]:
    table = pq.read_table(out / "hard_negatives.parquet")
    assert table.schema.equals(HARD_NEGATIVES)
    return {row["id"]: row for row in table.to_pylist()}


def test_run_sample_end_to_end(stage):
    files, queries, pool, out = stage
    report = run_sample(files, queries, pool, out, MiningConfig(beta=0.125), seed=0)

    table = pq.read_table(out / "hard_negatives.parquet")
    assert table["id"].to_pylist() == ["q1", "q2", "q4"]
    rows = rows_by_id(out)
    # q1: threshold 0.75; a0, a1 dropped, a2 (= 0.75) kept; 7 survivors hardest first
    # [a2, a4, a3, a5, a7, a6, a8] (a3/a5 tie, a3 ranks first); cyclic 0,5,1,6,2,3,4; padded with 0,5,1.
    q1_negs = ["a2", "a6", "a4", "a8", "a3", "a5", "a7", "a2", "a6", "a4"]
    assert rows["q1"] == {
        "id": "q1",
        "dataset": "ds",
        "qry_text": "query 1",
        "qry_image": "img/q1.jpg",
        "pos_id": "p1",
        "pos_text": "text of p1",
        "pos_image": "",
        "pos_score": 0.875,
        "neg_ids": q1_negs,
        "neg_texts": [f"text of {c}" for c in q1_negs],
        "neg_images": [
            "img/a2.jpg",
            "img/a6.jpg",
            "img/a4.jpg",
            "img/a8.jpg",
            "",
            "",
            "",
            "img/a2.jpg",
            "img/a6.jpg",
            "img/a4.jpg",
        ],
        "neg_scores": [0.75, 0.25, 0.6875, 0.125, 0.5, 0.5, 0.375, 0.75, 0.25, 0.6875],
        "neg_ranks": [2, 6, 4, 8, 3, 5, 7, 2, 6, 4],
        "num_survivors": 7,
        "fallback": False,
    }
    # q4: threshold 0.875; b0 dropped, b1..b11 kept (scores descending with the index); cyclic over 11
    # positions 0,5,10,1,6,2,7,3,8,4 (the 11th, 9 -> b10, is cut by num_negatives); b12 (NaN) never seen.
    q4_negs = ["b1", "b6", "b11", "b2", "b7", "b3", "b8", "b4", "b9", "b5"]
    assert rows["q4"]["neg_ids"] == q4_negs
    assert rows["q4"]["neg_ranks"] == [1, 6, 11, 2, 7, 3, 8, 4, 9, 5]
    assert rows["q4"]["neg_scores"] == [
        0.84375,
        0.6875,
        0.53125,
        0.8125,
        0.65625,
        0.78125,
        0.625,
        0.75,
        0.59375,
        0.71875,
    ]
    assert (rows["q4"]["num_survivors"], rows["q4"]["fallback"], rows["q4"]["pos_score"]) == (11, False, 1.0)
    # q2: fallback over its 3 candidates, in a random order repeated to 10, scores 1.0.
    q2 = rows["q2"]
    assert (q2["fallback"], q2["num_survivors"], q2["pos_score"]) == (True, 0, 0.5)
    assert sorted(q2["neg_ids"][:3]) == ["c0", "c1", "c2"]
    assert q2["neg_ids"] == [q2["neg_ids"][i % 3] for i in range(10)]
    assert q2["neg_ranks"] == [int(c[1:]) for c in q2["neg_ids"]]
    assert q2["neg_scores"] == [1.0] * 10

    official = json.loads((out / "hard_negatives.json").read_text())
    assert len(official) == 3
    assert official[0] == {
        "query_text": "query 1",
        "query_image": "img/q1.jpg",
        "pos_text": "text of p1",
        "pos_image": "",
        "query_pos_scores": 0.875,
        "hard_negatives": [
            ["text of a2", "img/a2.jpg"],
            ["text of a6", "img/a6.jpg"],
            ["text of a4", "img/a4.jpg"],
            ["text of a8", "img/a8.jpg"],
            ["text of a3", ""],
            ["text of a5", ""],
            ["text of a7", ""],
            ["text of a2", "img/a2.jpg"],
            ["text of a6", "img/a6.jpg"],
            ["text of a4", "img/a4.jpg"],
        ],
        "hard_negatives_scores": [0.75, 0.25, 0.6875, 0.125, 0.5, 0.5, 0.375, 0.75, 0.25, 0.6875],
    }
    assert [r["query_text"] for r in official] == ["query 1", "query 2", "query 4"]

    quarantine = pq.read_table(out / "quarantine.parquet")
    assert quarantine.schema.equals(QUARANTINE)
    assert sorted(quarantine.to_pylist(), key=lambda r: r["id"]) == [
        {
            "source": str(files[0]),
            "row": -1,
            "id": "q3",
            "field": "is_positive",
            "reason": "no_positive_score",
        },
        {"source": str(files[0]), "row": 0, "id": "q4", "field": "score", "reason": "nan_score"},
        {"source": "", "row": -1, "id": "q5", "field": "id", "reason": "no_judge_scores"},
    ]

    assert report == json.loads((out / "report.json").read_text())
    assert {k: report[k] for k in ["queries_in", "queries_out", "queries_quarantined", "fallback"]} == {
        "queries_in": 5,
        "queries_out": 3,
        "queries_quarantined": 2,
        "fallback": 1,
    }
    assert report["fallback_pct"] == pytest.approx(100 / 3)
    assert report["survivors_histogram"] == [[0, 1], [7, 1], [11, 1]]
    assert report["quarantine_by_reason"] == {"nan_score": 1, "no_positive_score": 1, "no_judge_scores": 1}
    # Sums by hand: positives 0.875 + 0.5 + 1.0; candidates q1 4.9375 + q2 2.25 + q4 8.5 over 24;
    # negatives q1 4.875 + q2 10 + q4 7.0 over 30. Medians from the sorted lists.
    scores = report["scores"]
    assert scores["positives"] == {"count": 3, "mean": pytest.approx(2.375 / 3), "median": 0.875}
    assert scores["candidates"] == {"count": 24, "mean": pytest.approx(15.6875 / 24), "median": 0.6875}
    assert scores["negatives"] == {"count": 30, "mean": pytest.approx(21.875 / 30), "median": 0.75}

    png = (out / "scores.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000
    assert sorted(p.name for p in out.iterdir()) == [
        "hard_negatives.json",
        "hard_negatives.parquet",
        "quarantine.parquet",
        "report.json",
        "scores.png",
    ]


def test_rerun_with_another_beta_needs_only_the_score_files(stage):
    files, queries, pool, out = stage
    run_sample(files, queries, pool, out, MiningConfig(beta=0.125), seed=0)
    q2_first = rows_by_id(out)["q2"]["neg_ids"]
    report = run_sample(files, queries, pool, out, MiningConfig(beta=0.25), seed=0)

    rows = rows_by_id(out)
    # q1: threshold 0.625 also drops a2, a4: survivors [a3, a5, a7, a6, a8], cyclic = identity, padded.
    assert rows["q1"]["neg_ids"] == ["a3", "a5", "a7", "a6", "a8", "a3", "a5", "a7", "a6", "a8"]
    assert rows["q1"]["num_survivors"] == 5
    # q4: threshold 0.75 keeps b4 (= 0.75) .. b11; cyclic over 8: 0,5,1,6,2,7,3,4, padded with 0,5.
    assert rows["q4"]["neg_ids"] == ["b4", "b9", "b5", "b10", "b6", "b11", "b7", "b8", "b4", "b9"]
    assert rows["q2"]["neg_ids"] == q2_first  # the fallback draw depends on (seed, query id) only
    assert report["beta"] == 0.25
    assert report["survivors_histogram"] == [[0, 1], [5, 1], [8, 1]]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_a_query_split_over_two_files_is_an_error(local_ray, tmp_path):
    queries = pa.Table.from_pylist(
        [{"id": "q", "dataset": "ds", "text": "t", "image": "", "pos_id": "p"}], schema=QUERIES
    )
    pool = pa.Table.from_pylist(
        [{"id": i, "dataset": "ds", "text": i, "image": ""} for i in ["p", "c"]], schema=POOL
    )
    files = [tmp_path / "a.parquet", tmp_path / "b.parquet"]
    pq.write_table(pa.Table.from_pylist([score_row("q", "p", -1, 0.9, True)], schema=JUDGE_SCORES), files[0])
    pq.write_table(pa.Table.from_pylist([score_row("q", "c", 0, 0.1)], schema=JUDGE_SCORES), files[1])
    with pytest.raises(DataError, match="all rows of a query must be in one file"):
        run_sample(files, queries, pool, tmp_path / "out", MiningConfig(), seed=0)


def _mixed_files(
    tmp_path: Path, rows_a: list[str], rows_b: list[str]
) -> tuple[pa.Table, pa.Table, list[Path]]:
    """Queries q1, q2, q5 of dataset "ds", q3 of "ds2", q4 of "ds3"; file a holds the rows of `rows_a`
    (datasets ds and ds2 when q3 is among them), file b those of `rows_b` (ds only): ds is read by two
    tasks. Each query has its positive p<n> and one candidate c<n> of its own dataset."""
    dataset = {"q1": "ds", "q2": "ds", "q3": "ds2", "q4": "ds3", "q5": "ds"}
    queries = pa.Table.from_pylist(
        [{"id": q, "dataset": d, "text": q, "image": "", "pos_id": f"p{q[1]}"} for q, d in dataset.items()],
        schema=QUERIES,
    )
    pool = pa.Table.from_pylist(
        [
            {"id": f"{k}{q[1]}", "dataset": d, "text": k, "image": ""}
            for q, d in dataset.items()
            for k in "pc"
        ],
        schema=POOL,
    )

    def rows(names: list[str]) -> pa.Table:
        out = []
        for q in names:
            out += [score_row(q, f"p{q[1]}", -1, 0.9, True), score_row(q, f"c{q[1]}", 0, 0.1)]
        return pa.Table.from_pylist(
            [{**r, "dataset": dataset[r["query_id"]]} for r in out], schema=JUDGE_SCORES
        )

    files = [tmp_path / "a.parquet", tmp_path / "b.parquet"]
    pq.write_table(rows(rows_a), files[0])
    pq.write_table(rows(rows_b), files[1])
    return queries, pool, files


def test_a_dataset_read_by_two_tasks_counts_each_query_once(local_ray, tmp_path):
    """Score files that mix datasets differently make two tasks read one dataset: a query neither of them
    saw (q5), and one of a dataset no file names (q4), are the unjudged ones, in QUERIES order; a query
    whose rows are in files of both tasks is an error."""
    queries, pool, files = _mixed_files(tmp_path, ["q1", "q3"], ["q2"])
    report = run_sample(files, queries, pool, tmp_path / "out", MiningConfig(), seed=0)
    assert (report["queries_in"], report["queries_out"]) == (5, 3)
    quarantine = pq.read_table(tmp_path / "out/quarantine.parquet").to_pylist()
    assert [(r["id"], r["reason"]) for r in quarantine] == [
        ("q4", "no_judge_scores"),
        ("q5", "no_judge_scores"),
    ]
    queries, pool, files = _mixed_files(tmp_path, ["q1", "q3"], ["q1", "q2"])
    with pytest.raises(DataError, match="all rows of a query must be in one file"):
        run_sample(files, queries, pool, tmp_path / "out2", MiningConfig(), seed=0)
