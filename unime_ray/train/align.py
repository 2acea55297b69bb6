"""`unime-ray align OUT`: LLaVA's stage 1. A model whose projector is new (FastVLM's, `make-tiny --arch
fast-vlm`) learns to turn image features into inputs its pretrained language model reads, from the
image -> text pairs of `data.train_dir`; the vision tower and the language model stay frozen.

    unime-ray align runs/fastvlm/models/fast-vlm-aligned --config jobs/configs/fastvlm.yaml
    unime-ray align /tmp/aligned --config jobs/configs/fastvlm.yaml --steps 4 --held-out 4   # tiny check

The loss is the captioning cross-entropy of the pair's text after the image and "Describe the image."
(the text tokens only). Training pairs are the rows of `data.train_dir` whose query is an image and
whose positive is text only; the held-out check uses `data.eval_dir`'s rows of that shape and their
first target (the correct one): the caption loss before and after, the share of captions the model
reproduces token for token (teacher forced), and greedy captions of a few images.

One process, no Ray: only the projector trains (about a million parameters for FastVLM), so stage 1 is
minutes of single-machine work, and the aligned folder is what every job then loads (`--set
*.path=OUT`). OUT holds the model and `align.json` (the inputs and figures); a rerun with the same
inputs is skipped, with changed inputs it recomputes.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from unime_ray.config import Config, TrainConfig, add_config_args, config_from_args
from unime_ray.data.mmeb import read_folder
from unime_ray.io import file_sha256, weight_stamps, write_json
from unime_ray.models.backbone import load_model, load_processor
from unime_ray.models.embedder import load_image
from unime_ray.models.prompts import render
from unime_ray.train.export import save_model_folder
from unime_ray.train.loop import LANGUAGE_PARAMS, keep_batch_norm_frozen, lr_lambda
from unime_ray.train.rerank import answer_batch, answer_losses

CAPTION_PROMPT = [{"type": "image"}, {"type": "text", "text": "Describe the image."}]
Pair = tuple[str, str]  # (image path under data.image_root, its text)


@dataclass
class AlignSettings:
    steps: int = field(default=200, metadata={"help": "optimizer steps"})
    batch: int = field(default=12, metadata={"help": "image-text pairs per step"})
    lr: float = field(
        default=3e-3, metadata={"help": "peak learning rate (linear warm-up over 10%, then decay)"}
    )
    train_tower: bool = field(
        default=False,
        metadata={"help": "also train the vision tower (for a random one; FastVLM's is pretrained)"},
    )
    held_out: int = field(default=64, metadata={"help": "held-out pairs measured before and after"})
    greedy: int = field(default=8, metadata={"help": "held-out images captioned greedily after training"})
    seed: int = field(default=0, metadata={"help": "order of the training pairs"})
    datasets: str = field(
        default="", metadata={"help": "comma list of the datasets whose pairs are captions (default: all)"}
    )


def caption_pairs(
    folder: str, image_root: str, kind: str, datasets: str = "", allow_absolute_images: bool = False
) -> list[Pair]:
    """(image, text) of the rows of `folder` (of `datasets`, a comma list; default all) whose query is an
    image and whose positive (eval: first target) is text only; none is an error naming the folder.
    Rows are read by the MMEB readers' rules: absolute image paths only with `allow_absolute_images`."""
    names = [d for d in datasets.split(",") if d] or None
    read = read_folder(
        folder,
        kind,
        datasets=names,
        image_root=image_root,
        check_images=False,
        allow_absolute_images=allow_absolute_images,
    )
    if read.quarantine.num_rows:  # never dropped silently: counted with their reasons
        reasons = {k: v for k, v in read.counts().items() if k not in ("rows_in", "rows_out")}
        print(f"[align] {folder}: {read.quarantine.num_rows} rows quarantined {reasons}", flush=True)
    table = read.table.to_pylist()
    if kind == "pairs":
        pairs = [(r["qry_image"], r["pos_text"]) for r in table if r["qry_image"] and not r["pos_image"]]
    else:
        pairs = [
            (r["qry_image"], r["tgt_text"][0]) for r in table if r["qry_image"] and not any(r["tgt_image"])
        ]
    if not pairs:
        raise SystemExit(f"[align] {folder}: no rows with an image query and a text-only positive")
    return pairs


def caption_loss(
    model, processor, pairs: list[Pair], image_root: str, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair: the mean cross-entropy of the text's tokens after the image and the prompt, and whether
    every text token is the model's argmax (teacher forced)."""
    prompt = render(processor.tokenizer, CAPTION_PROMPT)
    images = [load_image(image, image_root, size) for image, _ in pairs]
    inputs, labels = answer_batch(processor, [prompt] * len(pairs), [t for _, t in pairs], images)
    out = answer_losses(model, inputs, labels)
    return out.mean, out.correct


@torch.no_grad()
def held_out_captions(model, processor, pairs: list[Pair], image_root: str, size: int) -> dict:
    """Mean caption loss and the % of captions reproduced exactly (teacher forced) over `pairs`."""
    chunks = [
        caption_loss(model, processor, pairs[i : i + 16], image_root, size) for i in range(0, len(pairs), 16)
    ]
    losses, exact = zip(*chunks, strict=True)
    return {"loss": float(torch.cat(losses).mean()), "exact": float(torch.cat(exact).float().mean() * 100)}


@torch.no_grad()
def greedy_captions(model, processor, pairs: list[Pair], image_root: str, size: int) -> list[dict]:
    """[{image, truth, caption}]: what the model writes for each image, greedily, up to 24 tokens."""
    prompt = render(processor.tokenizer, CAPTION_PROMPT)
    images = [load_image(image, image_root, size) for image, _ in pairs]
    inputs = processor(text=[prompt] * len(pairs), images=images, return_tensors="pt", padding=True)
    ids = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    texts = processor.tokenizer.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [{"image": i, "truth": t, "caption": c.strip()} for (i, t), c in zip(pairs, texts, strict=True)]


def freeze_all_but_projector(model, train_tower: bool) -> list[torch.nn.Parameter]:
    """Trainable: every parameter outside the language model (and outside the vision tower unless
    `train_tower`); returns them."""
    for name, param in model.named_parameters():
        param.requires_grad = not name.startswith(LANGUAGE_PARAMS) and (
            train_tower or "vision_tower" not in name
        )
    return [p for p in model.parameters() if p.requires_grad]


def train_projector(
    model, processor, train: list[Pair], s: AlignSettings, image_root: str, size: int
) -> list[float]:
    """`s.steps` AdamW steps on seeded random batches of `train`; returns the loss per step."""
    params = freeze_all_but_projector(model, s.train_tower)
    optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
    schedule = TrainConfig(lr=s.lr, warmup_steps=max(1, s.steps // 10), steps=s.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(schedule))
    rng = np.random.default_rng(s.seed)
    curve = []
    model.train()
    keep_batch_norm_frozen(model)
    for step in range(s.steps):
        batch = [train[i] for i in rng.choice(len(train), min(s.batch, len(train)), replace=False)]
        loss = caption_loss(model, processor, batch, image_root, size)[0].mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        curve.append(loss.item())
        if step % 10 == 0 or step == s.steps - 1:
            print(f"[align] step {step + 1}/{s.steps} loss {loss.item():.3f}", flush=True)
    model.eval()
    return curve


def align_inputs(cfg: Config, s: AlignSettings) -> dict:
    """Everything the aligned model depends on: the settings, the base model's weights, the data files."""
    files = {
        str(p): file_sha256(p)
        for folder in (cfg.data.train_dir, cfg.data.eval_dir)
        for p in sorted(Path(folder).iterdir())
        if p.is_file()
    }
    return {
        "settings": asdict(s),
        "model": {
            "path": cfg.train.model.path,
            "image_size": cfg.train.model.image_size,
            "weights": weight_stamps(cfg.train.model.path),
        },
        "image_root": cfg.data.image_root,
        "data": files,
        # Only when set, so the key of a run made before the setting existed stays the same.
        **({"allow_absolute_images": True} if cfg.data.allow_absolute_images else {}),
    }


def align(cfg: Config, out: str | Path, s: AlignSettings) -> dict:
    """Stage 1 of `cfg.train.model` into the model folder `out` (written atomically); returns the report
    also written to `out/align.json`. Skipped when `out` holds a report of the same inputs."""
    out, base, root, size = Path(out), cfg.train.model.path, cfg.data.image_root, cfg.train.model.image_size
    inputs = align_inputs(cfg, s)
    report_path = out / "align.json"
    if report_path.is_file() and json.loads(report_path.read_text()).get("inputs") == inputs:
        print(f"[align] done earlier with the same inputs: {out}", flush=True)
        return json.loads(report_path.read_text())
    absolute = cfg.data.allow_absolute_images
    train = caption_pairs(cfg.data.train_dir, root, "pairs", s.datasets, absolute)
    held = caption_pairs(cfg.data.eval_dir, root, "eval", s.datasets, absolute)[: s.held_out]
    processor, model = load_processor(base, padding_side="left"), load_model(base, "float32")
    print(
        f"[align] {len(train)} training pairs, {len(held)} held out; {s.steps} steps of {s.batch}", flush=True
    )
    before = held_out_captions(model, processor, held, root, size)
    start = time.perf_counter()
    curve = train_projector(model, processor, train, s, root, size)
    seconds = time.perf_counter() - start
    report = {
        "inputs": inputs,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "train_pairs": len(train),
        "seconds": round(seconds, 1),
        "train_loss_first10": float(np.mean(curve[:10])),
        "train_loss_last10": float(np.mean(curve[-10:])),
        "held_out_before": before,
        "held_out_after": held_out_captions(model, processor, held, root, size),
        "greedy_captions": greedy_captions(model, processor, held[: s.greedy], root, size)
        if s.greedy
        else [],
    }
    save_model_folder(model, base, out)
    write_json(report, report_path)
    b, a = report["held_out_before"], report["held_out_after"]
    loss, exact = f"{b['loss']:.2f} -> {a['loss']:.2f}", f"{b['exact']:.0f}% -> {a['exact']:.0f}%"
    print(f"[align] held-out caption loss {loss}, exact {exact}; wrote {out}", flush=True)
    return report


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        prog="unime-ray align", description=" ".join(__doc__.split("\n\n")[0].split())
    )
    p.add_argument("out", help="folder to write the aligned model into (replaced)")
    add_config_args(p, default="jobs/configs/fastvlm.yaml")
    for f in AlignSettings.__dataclass_fields__.values():
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            p.add_argument(flag, action="store_true", help=f.metadata["help"])
        else:
            p.add_argument(flag, type=type(f.default), default=f.default, help=f.metadata["help"])
    args = p.parse_args(argv)
    settings = AlignSettings(**{k: getattr(args, k) for k in AlignSettings.__dataclass_fields__})
    return align(config_from_args(args), args.out, settings)
