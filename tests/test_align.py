"""LLaVA stage 1 (`unime-ray align`, train/align.py) on the tiny random LLaVA-OV and the synthetic world:
which rows it reads, that only the projector moves, that it learns, and that a rerun is keyed on its
inputs."""

import json

import torch
from safetensors.torch import load_file

from unime_ray.config import load_config
from unime_ray.models.backbone import load_model, load_processor
from unime_ray.train import align as stage1

I2T = "ShapesI2T"


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def config(world, model):
    return load_config(
        None,
        [
            f"data.train_dir={world / 'train'}",
            f"data.eval_dir={world / 'eval'}",
            f"data.image_root={world / 'images'}",
            f"train.model.path={model}",
            "train.model.image_size=28",
        ],
    )


def test_caption_pairs_are_image_queries_with_text_positives(world):
    rows, root = jsonl(world / "train" / f"{I2T}.jsonl"), str(world / "images")
    assert stage1.caption_pairs(str(world / "train"), root, "pairs", I2T) == [
        (r["qry_image_path"], r["pos_text"]) for r in rows
    ]
    # text -> image rows have no image query: all four datasets give only the three image-query ones
    every = stage1.caption_pairs(str(world / "train"), root, "pairs")
    assert len(every) == sum(
        len(jsonl(world / "train" / f"{d}.jsonl")) for d in ("ShapesCLS", I2T, "ShapesVQA")
    )
    held = stage1.caption_pairs(str(world / "eval"), root, "eval", I2T)
    assert held == [(r["qry_img_path"], r["tgt_text"][0]) for r in jsonl(world / "eval" / f"{I2T}.jsonl")]


def test_projector_learns_the_captions_and_nothing_else_moves(world, tiny_llava):
    root = str(world / "images")
    pairs = stage1.caption_pairs(str(world / "train"), root, "pairs", I2T)[:4]
    processor, model = load_processor(tiny_llava, padding_side="left"), load_model(tiny_llava, "float32")
    before_weights = {k: v.clone() for k, v in model.state_dict().items()}
    before = stage1.held_out_captions(model, processor, pairs, root, 28)
    settings = stage1.AlignSettings(steps=25, batch=4, lr=1e-2)
    curve = stage1.train_projector(model, processor, pairs, settings, root, 28)
    after = stage1.held_out_captions(model, processor, pairs, root, 28)
    assert len(curve) == 25
    assert after["loss"] < before["loss"] - 0.3, (before, after)  # the 4 captions it saw, learned
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, before_weights[k])}
    assert moved and all("multi_modal_projector" in k or "image_newline" in k for k in moved), moved


def test_rerun_is_keyed_on_its_inputs(world, tiny_llava, tmp_path):
    cfg = config(world, tiny_llava)
    settings = stage1.AlignSettings(steps=2, batch=2, held_out=2, greedy=1, datasets=I2T)
    out = tmp_path / "aligned"
    first = stage1.align(cfg, out, settings)
    weights = out / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert stage1.align(cfg, out, settings) == first and weights.stat().st_mtime_ns == stamp  # skipped
    base = load_file(tiny_llava / "model.safetensors")
    aligned = load_file(weights)
    assert all(torch.equal(base[k], aligned[k]) for k in base if "language_model" in k)
    changed = stage1.AlignSettings(steps=2, batch=2, held_out=2, greedy=1, datasets=I2T, lr=1e-4)
    second = stage1.align(cfg, out, changed)
    assert second["inputs"]["settings"]["lr"] == 1e-4 and weights.stat().st_mtime_ns != stamp
    assert len(second["greedy_captions"]) == 1 and second["train_pairs"] == len(
        jsonl(world / "train" / f"{I2T}.jsonl")
    )
