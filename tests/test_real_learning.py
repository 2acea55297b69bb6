"""The model that can see learns on real data: FastVLM (pretrained EfficientNet-Lite0 + SmolLM2-135M) at
96 px, aligned by `unime-ray align`'s code (LLaVA's stage 1: the projector alone trains) on the
Fashion-MNIST world's training photos and their class captions, names the classes of HELD-OUT photos it
never saw: the held-out caption loss falls and a share of their captions comes out exactly.

Measured (2026-12-06, 40 steps of 8 pairs, 200 held-out photos, chance for an exact caption about 10%):
loss 5.31 -> 0.45 and 28% exact on one machine, 5.24 -> 0.45 and 30% exact on a fresh clone. The
thresholds keep a wide margin below both.

The embedder's held-out gain on real data is not asserted here: 30 embedder steps after this stage
gave 8 -> 23 held-out P@1 in one run and 9.5 -> 11 in the fresh clone's, so a CI-sized run of it is
not reliable; 120 steps give 5.5 -> 40.5 (`bench/real_embed.py`, docs/experiment-log.md, "A model that
can see").
"""

from pathlib import Path

import pytest

from unime_ray.config import load_config
from unime_ray.data import real
from unime_ray.models.fastvlm import sized_copy
from unime_ray.train.align import AlignSettings, align

N_TRAIN, N_EVAL, SIZE = 300, 200, 96


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_aligned_fast_vlm_names_held_out_photos(fast_vlm, tmp_path):
    from test_real_world import fetched

    fetched(real.FASHION)
    world = tmp_path / "world"
    real.make_real_world(world, "fashion-mnist", seed=0, train_size=N_TRAIN, eval_size=N_EVAL)
    raw = sized_copy(fast_vlm, SIZE, tmp_path / "fast-vlm-96")
    cfg = load_config(
        Path(__file__).parents[1] / "jobs/configs/real.yaml",
        [
            f"data.train_dir={world / 'train'}",
            f"data.eval_dir={world / 'eval'}",
            f"data.image_root={world / 'images'}",
            f"train.model.path={raw}",
        ],
    )
    report = align(cfg, tmp_path / "aligned", AlignSettings(steps=40, batch=8, held_out=N_EVAL, greedy=0))
    b, a = report["held_out_before"], report["held_out_after"]
    print(f"held-out captions: loss {b['loss']:.2f} -> {a['loss']:.2f}, exact {b['exact']}% -> {a['exact']}%")
    assert b["exact"] == 0 and b["loss"] > 4  # the random projector: the photos mean nothing yet
    assert a["loss"] < b["loss"] - 3 and a["exact"] >= 15  # unseen photos' classes, named
