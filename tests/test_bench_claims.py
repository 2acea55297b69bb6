"""bench/method_claims.py's pure logic, without Ray or a model: the goals' verdicts from hand-made
figures (the experiment log's own, and edge cases of the seed-spread rule), the choice of the reranking
on own training photos, and the command line's --quick sizes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # the bench scripts import their siblings by name

import method_claims as mc  # noqa: E402
import soft_vs_hard  # noqa: E402


def variants(seeds: dict[str, list[float]]) -> dict:
    """soft_vs_hard's P@1 table ({variant: {dataset: {mean, spread, seeds}}}) from per-seed P@1."""
    runs = {
        v: {i: {"p@1": {"FashionMNIST": {"embedding": p}}} for i, p in enumerate(ps)}
        for v, ps in seeds.items()
    }
    return soft_vs_hard.summarise(runs)


def judge(auc: float) -> dict:
    return {
        "settings": {"out": "x"},
        "queries": 200,
        "auc_positive_vs_non_matches": auc,
        "mean_score_positive": 0.8,
        "mean_score_non_matches": 0.21,
        "stage_seconds": 443.2,
    }


# the experiment log's "The method's claims on real data": P@1 per seed, own / held-out per reranking
LOG_SEEDS = {"soft": [61.4, 62.0, 65.0], "hard": [64.8, 66.8, 65.8], "in-batch": [66.4, 66.2, 67.0]}
LOG_OWN = {"embedding": 71.4, "listwise": 71.4, "pointwise alpha 1": 64.2, "pointwise alpha 0.7": 69.4,
           "pointwise alpha 0.5": 72.2, "pointwise alpha 0.3": 74.0, "pointwise alpha 0.2": 74.0,
           "pointwise alpha 0.1": 71.8, "unparsed": 0}  # fmt: skip
LOG_HELD = {"embedding": 71.8, "listwise": 71.5, "pointwise alpha 1": 63.2, "pointwise alpha 0.7": 69.3,
            "pointwise alpha 0.5": 70.2, "pointwise alpha 0.3": 71.2, "pointwise alpha 0.2": 70.9,
            "pointwise alpha 0.1": 71.6, "unparsed": 0}  # fmt: skip


def test_the_logged_figures_get_the_logged_verdicts():
    results = {
        "args": {"quick": False},
        "judge_a": judge(0.502),
        "judge_b": judge(0.937),
        "soft_vs_hard": {"p@1": variants(LOG_SEEDS), "stage_seconds": 3000.0},
        "gain_teacher": {"own_training": LOG_OWN, "held_out": LOG_HELD, "stage_seconds": 600.4},
    }
    s = mc.summarise(results)
    assert s["judge"]["b"]["met"] is True and s["judge"]["a"]["met"] is False
    assert "settings" not in s["judge"]["b"] and s["judge"]["b"]["queries"] == 200
    v = s["soft_vs_hard"]["FashionMNIST"]
    assert v["p@1"]["soft"]["mean"] == pytest.approx(62.8) and v["p@1"]["hard"]["spread"] == pytest.approx(
        2.0
    )
    assert v["soft >= hard"] is False and v["hard > in-batch beyond spread"] is False and v["met"] is False
    assert v["margin"] == pytest.approx(2.0)  # max(hard's 2.0, in-batch's 0.8)
    r = s["rerank"]["teacher"]
    # 0.2 and 0.3 tie at 74.0 on own photos: the larger alpha is applied held-out, as the log did
    assert r["chosen"] == "pointwise alpha 0.3" and r["reranked"] == 71.2
    assert r["gain"] == pytest.approx(-0.6) and r["met"] is False
    assert "mined" not in s["rerank"] and "mining" not in s  # stages not run are left out
    assert s["seconds"] == {"judge_a": 443, "judge_b": 443, "soft_vs_hard": 3000, "gain_teacher": 600}
    table = mc.markdown(s)
    assert "| 1. judge (b), 200 held-out queries | AUC 0.937" in table
    assert table.count("**not met**") == 3 and table.count("| met |") == 1
    assert "pointwise alpha 0.3 71.2 (-0.6)" in table


@pytest.mark.parametrize(
    "in_batch, expected",
    [
        ([64.0, 65.0, 64.5], True),  # hard 66.0 beats in-batch 64.5 by 1.5 > the larger spread 1.0
        ([64.5, 66.5, 65.5], False),  # beats it by 0.5, within in-batch's own spread of 2.0
        ([66.0, 66.0, 66.0], False),  # a tie is not "above"
    ],
)
def test_hard_above_in_batch_must_exceed_the_seed_spread(in_batch, expected):
    p1 = variants({"soft": [66.0, 66.5, 67.0], "hard": [65.5, 66.0, 66.5], "in-batch": in_batch})
    verdict = mc.soft_hard_verdict({v: t["FashionMNIST"] for v, t in p1.items()})
    assert verdict["soft >= hard"] is True
    assert verdict["hard > in-batch beyond spread"] is expected and verdict["met"] is expected


def test_soft_below_hard_fails_and_one_seed_is_not_measurable():
    p1 = variants({"soft": [60.0, 61.0], "hard": [65.0, 65.2], "in-batch": [50.0, 50.5]})
    verdict = mc.soft_hard_verdict({v: t["FashionMNIST"] for v, t in p1.items()})
    assert verdict["soft >= hard"] is False and verdict["met"] is False
    one = variants({"soft": [70.0], "hard": [65.0], "in-batch": [50.0]})
    verdict = mc.soft_hard_verdict({v: t["FashionMNIST"] for v, t in one.items()})
    assert all(verdict[k] for k in ("soft >= hard", "hard > in-batch beyond spread"))
    assert verdict["met"] is None  # one seed: no spread to exceed
    s = mc.summarise({"soft_vs_hard": {"p@1": one, "stage_seconds": 1.0}})
    assert "not measurable (one seed)" in mc.markdown(s)


def test_the_reranking_is_chosen_on_own_photos_and_the_gain_goal_is_five_points():
    own = {"embedding": 50.0, "listwise": 60.0, "pointwise alpha 1": 60.0, "pointwise alpha 0.5": 55.0}
    assert mc.choose(own) == "pointwise alpha 1"  # a tie with listwise goes to pointwise
    assert mc.choose({**own, "listwise": 60.5}) == "listwise"
    held = {"embedding": 40.0, "listwise": 90.0, "pointwise alpha 1": 45.0, "pointwise alpha 0.5": 30.0}
    r = mc.rerank_verdict({"own_training": own, "held_out": held})
    assert (r["chosen"], r["gain"], r["met"]) == ("pointwise alpha 1", 5.0, True)  # not listwise's 90
    r = mc.rerank_verdict({"own_training": own, "held_out": {**held, "pointwise alpha 1": 44.9}})
    assert r["gain"] == pytest.approx(4.9) and r["met"] is False


def test_quick_shrinks_every_size_and_keeps_its_summary_out_of_bench_results(tmp_path):
    full = mc.parse_args(["--out", str(tmp_path)])
    assert (full.train_size, full.eval_size, full.steps, full.seeds) == (3000, 1000, 80, "0,1,2")
    assert Path(full.results) == ROOT / "bench/results/method_claims.json"
    quick = mc.parse_args(["--out", str(tmp_path), "--quick"])
    assert quick.train_rows == 60 and quick.seeds == "0" and quick.teacher_steps < 10
    assert Path(quick.results) == tmp_path / "method_claims.json"


def test_real_judge_counts_queries_with_a_non_match_at_or_above_their_positive():
    """The mining stage's figure: a class-mate (true match) scored at the positive's level does not
    count, a non-match above it does; the AUCs as counted by hand."""
    import pyarrow as pa
    import real_judge

    table = pa.table(
        {
            "query_id": [0, 0, 0, 1, 1, 1, 2, 2],
            "cand_id": [0, 1, 2, 0, 1, 2, 0, 1],
            "is_positive": [True, False, False, True, False, False, True, False],
            "score": [0.9, 0.2, 0.95, 0.5, 0.1, 0.4, 0.3, 0.3],
            "seconds": [0.1] * 8,
            "true": [1, 0, 0, 1, 0, 0, 1, 1],
        }
    )
    f = real_judge.figures(table, beta=0.01)
    assert f["queries_negative_at_or_above_positive"] == 1  # query 0's 0.95 over its 0.9
    # positives 0.9, 0.5, 0.3 against non-matches 0.2, 0.95, 0.1, 0.4: 8 of 12 pairs won
    assert f["auc_positive_vs_non_matches"] == pytest.approx(8 / 12)
    assert (f["fn_filter_dropped"], f["fn_filter_dropped_true"]) == (2, 1)
