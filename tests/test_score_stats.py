"""The sample report's score statistics, streamed over per-task files (`mining/score_stats.py`), against
numpy on the concatenation: the exact median for odd and even counts, negatives, ties and empty files."""

from pathlib import Path

import numpy as np
import pytest

from unime_ray.mining.score_stats import _sortable, _value, save_scores, score_stats


def _files(tmp_path: Path, arrays: list[np.ndarray]) -> list[Path]:
    paths = [tmp_path / f"part-{i}.npy" for i in range(len(arrays))]
    for values, path in zip(arrays, paths, strict=True):
        save_scores(values, path)
    return paths


@pytest.mark.parametrize(
    "arrays",
    [
        [np.array([0.3, 0.1, 0.2])],  # odd: 0.2
        [np.array([0.5, 0.25]), np.array([1.0, 0.75])],  # even: (0.5 + 0.75) / 2
        [np.array([], np.float32), np.array([2.0, -1.5, -0.25, 7.0, 0.0])],  # negatives, an empty file
        [np.full(1000, 0.125), np.full(999, 0.875), np.array([0.5])],  # ties, the middle one alone
        [np.random.default_rng(0).random(n).astype(np.float32) for n in (1, 4096, 333, 0, 5000)],
        [np.random.default_rng(1).normal(size=n).astype(np.float32) * 1e-3 for n in (17, 2048)],
    ],
    ids=["odd", "even", "negatives", "ties", "uniform", "small-normal"],
)
def test_stats_equal_numpy_on_the_concatenation(tmp_path, arrays):
    everything = np.concatenate([a.astype(np.float32) for a in arrays])
    got = score_stats(_files(tmp_path, arrays))
    assert got["count"] == len(everything)
    assert got["median"] == float(np.median(everything))  # exact, not approximate
    assert got["mean"] == pytest.approx(float(np.mean(everything, dtype=np.float64)), rel=1e-12, abs=1e-15)


def test_no_values_give_no_mean_or_median(tmp_path):
    assert score_stats(_files(tmp_path, [np.array([], np.float32)])) == {
        "count": 0,
        "mean": None,
        "median": None,
    }
    assert score_stats([]) == {"count": 0, "mean": None, "median": None}


def test_sortable_keys_keep_the_order_of_floats_and_invert():
    values = np.array([-np.inf, -3.5, -1e-30, 0.0, 1e-30, 0.5, 1.0, np.inf], dtype=np.float32)
    keys = _sortable(values)
    assert (np.diff(keys.astype(np.int64)) > 0).all()
    assert [_value(int(k)) for k in keys] == list(values)
