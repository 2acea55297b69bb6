"""`unime-ray judge-agree`: the agreement metrics against hand-worked cases, the cost projection by hand,
the seeded sample, and the tool end to end on a mined run: identical transformers settings agree fully
(and count tokens as the tokenizer does), a reversed judge (1 - s) is perfectly anti-correlated, and the
drops and hard negatives it reports are the sampling rules applied by hand (tests/mined.py)."""

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from judge_tokens import tokenizer_counts
from mined import BETA, DATASETS, expected_outcomes

from unime_ray.config import load_config
from unime_ray.mining.agree import (
    Rules,
    auc,
    average_ranks,
    compare,
    jaccard,
    judge_agree,
    kendall_tau_b,
    main,
    project,
    sample_query_ids,
    simulate,
    simulate_prefix_cache,
    spearman,
    spread,
    two_way,
    write_sample,
)
from unime_ray.models.backbone import load_processor

ROOT = Path(__file__).parents[1]


def test_rank_correlations_hand_worked():
    assert list(average_ranks([10, 20, 20, 30])) == [1, 2.5, 2.5, 4]
    # one swapped neighbour pair: sum d^2 = 2, rho = 1 - 6 * 2 / (4 * 15); 5 concordant, 1 discordant pair
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert kendall_tau_b([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    # a tie in a: centred ranks (-1.5, 0, 0, 1.5) and (-1.5, -.5, .5, 1.5): 4.5 / sqrt(4.5 * 5);
    # 5 concordant pairs, none discordant, one tied in a: 5 / sqrt((6 - 1) * 6)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert kendall_tau_b([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(5 / math.sqrt(30))
    s = np.array([0.9, 0.1, 0.5, 0.7, 0.3])
    assert spearman(s, s) == pytest.approx(1) and kendall_tau_b(s, s) == pytest.approx(1)
    assert spearman(s, 1 - s) == pytest.approx(-1) and kendall_tau_b(s, 1 - s) == pytest.approx(-1)
    assert math.isnan(spearman(s, np.full(5, 0.5))) and math.isnan(kendall_tau_b(np.ones(3), [1, 2, 3]))


def test_decision_counts_overlap_and_spread_hand_worked():
    d = asdict(two_way([True, True, False, False], [True, False, True, False]))
    # agreement 1/2, and by chance (rates 1/2, 1/2) also 1/2: kappa 0
    assert d == {
        "both": 1,
        "a_only": 1,
        "b_only": 1,
        "neither": 1,
        "total": 4,
        "agreement": 0.5,
        "kappa": 0.0,
    }
    d = asdict(two_way([True, True, True, False], [True, True, False, False]))
    # agreement 3/4; chance 3/4 * 1/2 + 1/4 * 1/2 = 1/2; kappa (3/4 - 1/2) / (1 - 1/2) = 1/2
    assert (d["agreement"], d["kappa"]) == (0.75, 0.5)
    assert two_way([False, False], [False, False]).kappa is None  # chance agrees fully: undefined
    assert jaccard({1, 2, 3}, {2, 3, 4}) == 0.5 and jaccard(set(), set()) == 1.0
    v = spread([4.0, 1.0, None, 3.0, float("nan"), 2.0])
    assert asdict(v) == {"n": 4, "undefined": 2, "median": 2.5, "p25": 1.75, "p75": 3.25, "mean": 2.5}


def _pairs(query: str, pos: float, cands: list[float], b_pos: float, b_cands: list[float]) -> list[dict]:
    rows = [
        {
            "query_id": query,
            "cand_id": "pos",
            "is_positive": True,
            "rank": -1,
            "score_a": pos,
            "score_b": b_pos,
        }
    ]
    rows += [
        {"query_id": query, "cand_id": f"c{i}", "is_positive": False, "rank": i, "score_a": a, "score_b": b}
        for i, (a, b) in enumerate(zip(cands, b_cands, strict=True))
    ]
    return rows


def test_compare_hand_worked():
    """beta 0.1, interval 5, 2 negatives. q1: A keeps s <= 0.8 -> c2, c3 (picks c2, c3); B (positive 0.25)
    keeps s <= 0.15 -> c3 only (picks c3, c3): Jaccard {c2, c3} vs {c3} = 1/2. q2: B's positive is below
    every candidate: B falls back (random picks), A does not."""
    rows = _pairs("q1", 0.9, [0.95, 0.85, 0.5, 0.1], 0.25, [0.3, 0.88, 0.7, 0.05])
    rows += _pairs("q2", 0.6, [0.2, 0.4, 0.3], 0.01, [0.2, 0.4, 0.3])
    rows += _pairs("q3", 0.6, [0.2, 0.4], 0.5, [float("nan"), 0.1])  # a failed call: left out, named
    per_query, s = compare(pa.Table.from_pylist(rows), Rules(0.1, 5, 2, 2, seed=0))
    q1, q2 = (asdict(r) for r in per_query)
    s = asdict(s)
    assert (q1["dropped_a"], q1["dropped_b"]) == (["c0", "c1"], ["c0", "c1", "c2"])
    assert (q1["hard_negatives_a"], q1["hard_negatives_b"]) == (["c2", "c3"], ["c3"])
    assert q1["hard_negatives_jaccard"] == 0.5
    # q1 scores: A (0.9, 0.95, 0.85, 0.5, 0.1) ranks (4, 5, 3, 2, 1); B (0.25, 0.3, 0.88, 0.7, 0.05) ranks
    # (2, 3, 5, 4, 1): d = (2, 2, -2, -2, 0), rho = 1 - 6 * 16 / 120 = 0.2
    assert q1["spearman"] == pytest.approx(0.2)
    assert (q2["fallback_a"], q2["fallback_b"]) == (False, True) and q2["dropped_b"] == ["c0", "c1", "c2"]
    # q2: the positive moves from rank 4 to 1, the candidates keep theirs: d = (3, -1, -1, -1)
    assert q2["spearman"] == pytest.approx(1 - 6 * 12 / 60)
    # A drops c0, c1 of q1; B drops c0, c1, c2 of q1 and all three of q2
    f = s["false_negative_filter"]
    assert f == {"both": 2, "a_only": 0, "b_only": 4, "neither": 1, "total": 7} | {
        "agreement": 3 / 7,
        "kappa": pytest.approx(f["kappa"]),
    }
    # kappa: chance = 2/7 * 6/7 + 5/7 * 1/7 = 17/49; (3/7 - 17/49) / (1 - 17/49) = 4/32
    assert f["kappa"] == pytest.approx(0.125)
    assert s["fallback"]["b_only"] == 1 and s["queries"] == 2 and s["pairs"] == 9
    assert s["queries_with_failed_calls"] == ["q3"]


def test_projection_hand_worked():
    """2 calls: 200 prompt tokens (20 image), 120 from the cache (10 image)."""
    tokens = {"calls": 2, "prompt_tokens": 200, "cached_tokens": 120, "image_tokens": 20}
    tokens |= {"cached_image_tokens": 10, "computed_tokens": 80, "computed_image_tokens": 10}
    p = asdict(project(tokens, 1000, llm_params_b=1.0, vision_params_b=0.5, tflops=1.0, mfu=0.5))
    # per call 40 tokens computed, 5 of them image: 2e9 * 40 + 2e9 * 0.5 * 4 patches * 5 = 1e11 FLOPs;
    # x 1000 calls at 0.5e12 FLOP/s = 200 s
    assert p["computed_tokens_per_call"] == 40 and p["gpu_hours"] == pytest.approx(200 / 3600)
    # docs/mining.md's earlier figure: 10.4B computed tokens at 7.6B parameters, no vision term: ~110 h
    text = {"calls": 1, "computed_tokens": 10_400, "computed_image_tokens": 0}
    assert project(text, 1e6, vision_params_b=0).gpu_hours == pytest.approx(111, abs=1)
    assert project({"calls": 0}, 1e6) is None


def test_prefix_cache_replay_hand_worked():
    """Blocks of 2: a block is served only with all blocks before it, never the last token."""
    prompts = [
        list("abcdef"),  # nothing cached yet
        list("abcdxy"),  # shares "ab", "cd": 4
        list("abcdef"),  # all 6 seen, but the last token is computed: 2 whole blocks of the first 5
        list("abXdef"),  # "ab" only: "Xd" differs, and "ef" after it does not count
        list("zbcdef"),  # the first block differs: nothing
        list("abc"),  # "ab"
        [*"ab", ("image", "x.png", 0), ("image", "x.png", 1), "e"],  # "ab"; the image block is new
        [*"ab", ("image", "y.png", 0), ("image", "y.png", 1), "e"],  # another image: "ab" only
        [*"ab", ("image", "x.png", 0), ("image", "x.png", 1), "f"],  # the same image: "ab" + its block
    ]
    assert simulate_prefix_cache(prompts, 2) == [0, 4, 4, 2, 0, 2, 2, 2, 4]
    assert simulate_prefix_cache([list("abcdefgh")] * 2, 4) == [0, 4]


def test_sample_is_reproducible_from_its_seed():
    ids = [f"q{i:03d}" for i in range(200)]
    first = sample_query_ids(ids, 10, seed=7)
    assert first == sample_query_ids(list(reversed(ids)) + ids[:50], 10, seed=7)  # order, repeats: same
    assert first == sorted(first) and len(set(first)) == 10
    assert first != sample_query_ids(ids, 10, seed=8)
    assert sample_query_ids(ids[:5], 10, seed=7) == ids[:5]  # fewer ids than asked: all of them


def _cfg(run: Path, world: Path, model: Path, *extra: str):
    """tests/mined.py's run, with the tiny transformers judge as setting A."""
    return load_config(
        ROOT / "jobs/configs/tiny.yaml",
        [
            f"run.output_dir={run}",
            f"data.train_dir={world}/train",
            f"data.image_root={world}/images",
            f"data.datasets=[{','.join(DATASETS)}]",
            "data.synthetic=false",
            f"embedder.path={model}",
            f"judge.model.path={model}",
            f"mining.beta={BETA}",
            *extra,
        ],
    )


@pytest.mark.slow
def test_transformers_setting_counts_tokens_as_the_tokenizer_and_agrees_fully_with_itself(
    local_ray, mined_run, world, tiny_qwen, tmp_path
):
    """The tiny transformers judge on 3 queries, against the run's own scores (a folder); then its scores
    (a folder of score files with their token counts) against themselves: perfect agreement."""
    cfg = _cfg(mined_run, world, tiny_qwen)
    own = _cfg(
        mined_run,
        world,
        tiny_qwen,
        "judge.backend=precomputed",
        f"judge.scores_path={mined_run}/mining/judge/results",
    )
    result = judge_agree(cfg, own.judge, 3, tmp_path / "model", seed=5)
    requests = pa.concat_tables(
        pq.read_table(p) for p in sorted((tmp_path / "model/requests").glob("*.parquet"))
    )
    assert result["agreement"]["queries"] == 3 == len(set(requests["query_id"].to_pylist()))
    assert result["agreement"]["pairs"] == requests.num_rows

    expected = tokenizer_counts(requests.to_pylist(), load_processor(tiny_qwen).tokenizer, tokens_per_image=4)
    want = {(r["query_id"], r["cand_id"]): e for r, e in zip(requests.to_pylist(), expected, strict=True)}
    assert sum(e[1] for e in expected) > 0  # images are counted too
    got = pa.concat_tables(pq.read_table(p) for p in sorted((tmp_path / "model/A").glob("*.parquet")))
    assert {
        (r["query_id"], r["cand_id"]): (r["prompt_tokens"], r["image_tokens"]) for r in got.to_pylist()
    } == want
    assert pc.sum(got["cached_tokens"]).as_py() == 0  # transformers has no prefix cache
    tokens = result["settings"]["A"]["tokens"]
    assert tokens["prompt_tokens"] == sum(e[0] for e in expected) and tokens["cache_hit_rate"] == 0
    assert tokens["calls"] == requests.num_rows and tokens["seconds"] > 0
    retrieved = sum(pq.read_metadata(f).num_rows for f in (mined_run / "mining/retrieve").glob("*.parquet"))
    projection = result["settings"]["A"]["projection"]
    assert projection["calls"] == retrieved + 96  # the run's judge calls
    # replayed at the measured size, the prompts are the ones measured
    assert projection["prompt_tokens_per_call"] == pytest.approx(tokens["prompt_tokens_per_call"])
    bigger = simulate(requests, cfg.judge, 576, 16)  # 672 px images, vLLM's GPU blocks
    assert bigger["image_tokens"] == sum(e[1] for e in expected) // 4 * 576
    assert bigger["prompt_tokens"] - bigger["image_tokens"] == sum(e[0] - e[1] for e in expected)
    assert result["settings"]["B"]["tokens"]["calls"] == 0 and result["settings"]["B"]["projection"] is None

    judged = _cfg(
        mined_run, world, tiny_qwen, "judge.backend=precomputed", f"judge.scores_path={tmp_path}/model/A"
    )
    same = judge_agree(judged, judged.judge, 3, tmp_path / "same", seed=5)  # the same seed: the same queries
    s = same["agreement"]
    for key in ("spearman", "kendall", "hard_negatives_jaccard"):
        assert (s[key]["n"], s[key]["p25"], s[key]["p75"]) == (3, pytest.approx(1.0), pytest.approx(1.0)), key
    assert s["false_negative_filter"]["a_only"] == s["false_negative_filter"]["b_only"] == 0
    assert s["fallback"]["a_only"] == s["fallback"]["b_only"] == 0 and s["identical_hard_negatives"] == 3
    timing = {"wall_seconds": 0}
    assert same["settings"]["B"]["tokens"] | timing == tokens | timing  # carried along


@pytest.mark.slow
def test_reversed_judge_is_anticorrelated_with_the_drops_of_the_sampling_rules(
    local_ray, mined_run, world, tmp_path
):
    """A: the run's own judge scores (a folder); B: 1 - s (a file); through the command line."""
    own = mined_run / "mining/judge/results"
    scores = pa.concat_tables(pq.read_table(p) for p in sorted(own.glob("*.parquet")))
    reversed_file = tmp_path / "reversed.parquet"
    pq.write_table(
        scores.select(["query_id", "cand_id"]).append_column("score", pc.subtract(1.0, scores["score"])),
        reversed_file,
    )
    overrides = [
        f"run.output_dir={mined_run}",
        f"data.train_dir={world}/train",
        f"data.image_root={world}/images",
        f"data.datasets=[{','.join(DATASETS)}]",
        "data.synthetic=false",
        f"mining.beta={BETA}",
        "judge.backend=precomputed",
        f"judge.scores_path={own}",
    ]
    out = tmp_path / "out"
    main(
        ["--config", str(ROOT / "jobs/configs/tiny.yaml"), *(a for o in overrides for a in ("--set", o))]
        + ["--against", str(reversed_file), "--queries", "96", "--seed", "3", "--out", str(out)]
    )
    result = json.loads((out / "agree.json").read_text())
    assert (out / "agree.md").read_text().count("Spearman") == 1 and (out / "scatter.png").stat().st_size
    assert result["sample"]["queries"] == 96 and result["settings"]["B"]["projection"] is None
    per_query = result["per_query"]
    assert all(r["spearman"] == pytest.approx(-1) and r["kendall"] == pytest.approx(-1) for r in per_query)
    truth = expected_outcomes(mined_run, BETA)
    both = a_only = b_only = 0
    for r in per_query:
        t = truth[r["query_id"]]
        flipped = {c for c, row in t["candidates"].items() if 1 - row["score"] > (1 - t["pos_score"]) - BETA}
        assert set(r["dropped_a"]) == t["dropped"] and set(r["dropped_b"]) == flipped
        assert r["fallback_a"] == t["fallback"]
        if not t["fallback"]:
            assert r["hard_negatives_a"] == sorted(set(t["neg_ids"]))
        both += len(t["dropped"] & flipped)
        a_only += len(t["dropped"] - flipped)
        b_only += len(flipped - t["dropped"])
    f = result["agreement"]["false_negative_filter"]
    assert (f["both"], f["a_only"], f["b_only"]) == (both, a_only, b_only) and a_only > 0
    assert (
        result["agreement"]["fallback"]["both"] + result["agreement"]["fallback"]["a_only"] == 4
    )  # tests/mined.py

    # The sample is the seed's: the same seed writes the same requests, another seed other queries.
    cfg = _cfg(mined_run, world, Path(""))
    mining = Path(cfg.run.output_dir) / "mining"
    tables = [
        pa.concat_tables(pq.read_table(p) for p in write_sample(mining, 10, seed, tmp_path / f"s{i}", 4)[0])
        for i, seed in enumerate((3, 3, 4))
    ]
    assert tables[0].drop_columns(["sim"]).equals(tables[1].drop_columns(["sim"]))
    np.testing.assert_array_equal(tables[0]["sim"], tables[1]["sim"])  # NaN for the positives
    assert len(set(tables[0]["query_id"].to_pylist())) == 10
    judged = scores.filter(pc.is_in(scores["query_id"], value_set=tables[0]["query_id"]))
    assert tables[0].num_rows == judged.num_rows  # each query with its positive and all its candidates
    assert set(tables[0]["query_id"].to_pylist()) != set(tables[2]["query_id"].to_pylist())


def test_auc_counts_pairs_won_with_ties_half():
    # positives {0.9, 0.5} against negatives {0.1, 0.5}: three pairs won, one tied -> 3.5 / 4
    assert auc(np.array([0.9, 0.1, 0.5, 0.5]), np.array([True, False, True, False])) == 0.875
    assert auc(np.array([0.2, 0.8]), np.array([True, False])) == 0.0
    assert auc(np.array([0.2, 0.8]), np.array([True, True])) is None  # no negative: undefined
