"""Learning is real: on the synthetic world, the "mid" tiny Qwen2-VL (~3M random weights) trained for
minutes on CPU with the real jobs (oracle-judged hard negatives -> Ray Train with 2 workers + DeepSpeed
ZeRO-2 + LoRA, the paper's Jeffreys loss) clearly beats its untrained self on HELD-OUT data, measured by
the real evaluation job (issues #4 and #5). The oracle judge stands in for a judge MLLM that knows the world;
the tiny random judge knows nothing. The held-out split is 72 scenes (288 MMEB-style queries), not the
demo's 24: with 96 queries one P@1 reading has a standard error near 5 points, and a CI machine (other
CPU kernels, other Ray Data block order) once read 22.9 where this one read 33.3 after 160 steps.
Measured in-process over two seeds after 320 steps: held-out P@1 12.5/13.9 -> 50.4/46.6 (chance 12.5);
after 240 steps (the test since 2026-12-07, when training's order became a function of the seed alone):
12.5 -> 40.3, compositional 40.3 -> 66.7, 5 standard errors above the bar of 25.
(The reranker, which must learn image-text matching inside one forward pass, does not learn it from
random weights at this scale; see docs/experiment-log.md.)"""

import json
from pathlib import Path

import pytest

from unime_ray.config import load_config
from unime_ray.data.synthetic import make_world
from unime_ray.demo import mine_with_oracle
from unime_ray.eval.job import run_eval
from unime_ray.models.tiny import make_tiny
from unime_ray.train.loop import run_training
from unime_ray.train.run import plot_curves

ROOT = Path(__file__).parents[1]
CHANCE = 100 / 8  # the world's MMEB-style eval rows have 8 candidates
EMBED_STEPS = 240
N_EVAL = 72  # held-out scenes; see the docstring


@pytest.fixture(scope="module")
def oracle_mined(tmp_path_factory, local_ray):
    out = tmp_path_factory.mktemp("learn")
    make_world(out / "world", seed=0, n_eval=N_EVAL)  # built before mining, which then keeps it
    mid = make_tiny(out / "models" / "mid", "qwen2-vl", "mid")
    more = [
        f"train.model.path={mid}",
        f"train.steps={EMBED_STEPS}",
        "train.lr=2e-3",
        "train.num_workers=2",  # a worker of 0.5 CPU runs one torch thread: 2 workers use both cores
        f"train.checkpoint_every={EMBED_STEPS}",
    ]
    overrides = mine_with_oracle(ROOT / "jobs/configs/tiny.yaml", out, more)
    cfg = load_config(ROOT / "jobs/configs/tiny.yaml", overrides)
    assert cfg.train.loss == "jeffreys"  # the paper's loss, not the InfoNCE baseline
    return cfg, overrides, mid


def _eval(overrides: list[str], out: Path, *more: str) -> dict:
    return run_eval(
        load_config(ROOT / "jobs/configs/tiny.yaml", overrides + [f"eval.output_dir={out}", *more])
    )


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_trained_embedder_clearly_beats_untrained_on_held_out(oracle_mined, tmp_path):
    cfg, overrides, mid = oracle_mined
    embed = run_training(cfg, "embed")
    before = _eval(overrides, tmp_path / "untrained", f"embedder.path={mid}")
    after = _eval(
        overrides, tmp_path / "trained", f"embedder.path={mid}", f"embedder.adapter={embed['weights']}"
    )
    b, a = before["table3"]["embedding"], after["table3"]["embedding"]
    print(f"held-out P@1 (MMEB-style, chance {CHANCE:.1f}): untrained {b}, trained {a}")
    assert b["MMEB_Other"] < 2 * CHANCE  # the untrained model is near chance ...
    assert a["MMEB_Other"] >= max(2 * CHANCE, b["MMEB_Other"] + 10)  # ... the trained one clearly above it
    assert a["R_Other"] > b["R_Other"]  # caption retrieval over the whole gallery, both directions
    assert a["R_Compos"] >= b["R_Compos"] + 10  # true caption over its altered twin (chance 50)
    # the run really trained for its steps: per-step metrics, rising in-batch P@1, a learning-curve plot
    metrics = [json.loads(x) for x in Path(embed["metrics_path"]).read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, EMBED_STEPS + 1))
    first, last = (sum(m["p@1"] for m in ms) / len(ms) for ms in (metrics[:20], metrics[-20:]))
    assert last > first + 0.1
    png = plot_curves(Path(embed["metrics_path"]), tmp_path / "curves.png", "embedder")
    assert png.read_bytes().startswith(b"\x89PNG")
