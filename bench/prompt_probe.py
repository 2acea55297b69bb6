"""Does the embedder's last token carry the photo's class before any embedding training, and does the
prompt matter? The `Embedder` (the inference path of mining, eval and serve) on a Fashion-MNIST world
(`make-world --source fashion-mnist`), untrained, with several query prompts:

- zero-shot P@1: each held-out photo against the 10 class captions, by cosine (chance 10%);
- nearest class centroid: the mean embedding of each class's training photos, and each held-out photo
  assigned to the nearest one (a linear read-out needing no text side: is the class in the vector?).

Prompts: `mmeb` is the world's own (VLM2Vec's instruction); `eol` the one-word summary of E5-V and UniME
on both sides; `caption` the stage-1 captioning prompt (`unime-ray align`) through the chat template,
and `caption_prefix` the same followed by "a photo of a", so that the next token is the class name.

    python bench/prompt_probe.py --model runs/fm/fast-vlm-aligned --world runs/fm/world --n 300 \
        --out bench/results/prompt_probe.json

On 2 cores a prompt costs 10-25 s per 300 photos at 96 px.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from listwise_pointing import world_rows  # bench/, this script's folder

from unime_ray.config import ModelConfig
from unime_ray.models.embedder import PHI3_IMAGE_TOKEN, Embedder
from unime_ray.models.prompts import render
from unime_ray.train.align import CAPTION_PROMPT


def prompts(embedder: Embedder) -> dict[str, tuple[str, str]]:
    """{name: (query text, candidate template)}; the query texts carry MMEB's image token."""
    chat = render(embedder.processor.tokenizer, CAPTION_PROMPT).replace(
        embedder.placeholder, PHI3_IMAGE_TOKEN
    )
    return {
        "mmeb": (f"{PHI3_IMAGE_TOKEN}\nRepresent the given image for classification", "{}"),
        "eol": (
            f"{PHI3_IMAGE_TOKEN}\nSummarize above image in one word:",
            "{}\nSummarize above sentence in one word:",
        ),
        "caption": (chat, "{}"),
        "caption_prefix": (chat + "a photo of a", "{}"),
    }


def probe(embedder: Embedder, query: str, template: str, train: list[dict], held: list[dict]) -> dict:
    """Zero-shot P@1 and nearest-centroid accuracy (%) of one prompt."""
    captions = sorted({r["pos_text"] for r in train})

    def photos(rows: list[dict]) -> np.ndarray:
        return embedder.embed([{"text": query, "image": r["qry_image_path"]} for r in rows])

    truth = np.array([captions.index(r["pos_text"]) for r in held])
    held_vecs, train_vecs = photos(held), photos(train)
    texts = embedder.embed([{"text": template.format(c), "image": None} for c in captions])
    classes = np.array([captions.index(r["pos_text"]) for r in train])
    centroids = np.stack([train_vecs[classes == c].mean(0) for c in range(len(captions))])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    return {
        "zero_shot_p1": round(100 * float(((held_vecs @ texts.T).argmax(1) == truth).mean()), 1),
        "centroid_acc": round(100 * float(((held_vecs @ centroids.T).argmax(1) == truth).mean()), 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True, help="a model folder (FastVLM after stage 1)")
    p.add_argument("--world", type=Path, required=True, help="a make-world --source fashion-mnist folder")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--n", type=int, default=300, help="training photos (centroids) and held-out photos")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    torch.set_num_threads(2)
    cfg = ModelConfig(path=str(args.model), dtype="float32", image_size=args.image_size, batch_size=16)
    embedder = Embedder(cfg, image_root=args.world / "images")
    train, held = world_rows(args.world, "train")[: args.n], world_rows(args.world, "eval")[: args.n]
    results = {}
    for name, (query, template) in prompts(embedder).items():
        results[name] = probe(embedder, query, template, train, held)
        print(name, json.dumps(results[name]), flush=True)
    settings = {k: str(v) for k, v in vars(args).items()}
    args.out.write_text(json.dumps({"settings": settings, "prompts": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
