"""The embedder: one class used by mining, training, evaluation and serving.

A record is `{"text": str, "image": str | PIL.Image | None}` (image paths relative to `image_root`,
"" for none). Prompting follows VLM2Vec/UniME-V2: the record's own text (which carries the task
instruction in MMEB) with the Phi-3.5-V image token `<|image_1|>` replaced by the backbone's image
placeholder, no chat template. The embedding is the final hidden state of the last real token,
L2-normalised. Padding is on the left so that token is the last column, but pooling finds it from the
attention mask, so right padding gives the same vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from unime_ray.config import ModelConfig
from unime_ray.data.images import open_image
from unime_ray.models.backbone import IMAGE_PLACEHOLDER, detect_arch, load_model, load_processor

PHI3_IMAGE_TOKEN = "<|image_1|>"
Record = dict[str, Any]


def format_text(text: str, has_image: bool, placeholder: str) -> str:
    """MMEB text -> backbone text. The image token becomes the backbone's placeholder; a record with an
    image but no token gets the placeholder in front (MMEB's convention); a token without an image is
    dropped (there is nothing to put there)."""
    if not has_image:
        return text.replace(PHI3_IMAGE_TOKEN, "").strip()
    if PHI3_IMAGE_TOKEN in text:
        return text.replace(PHI3_IMAGE_TOKEN, placeholder, 1).replace(PHI3_IMAGE_TOKEN, "")
    return f"{placeholder}\n{text}" if text else placeholder


def load_image(image: str | Image.Image, image_root: str | Path, size: int) -> Image.Image:
    """Open (path relative to image_root) and resize to size x size, RGB, as the official code does."""
    img = image if isinstance(image, Image.Image) else open_image(Path(image_root) / image)
    return img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)


def last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """hidden [b, t, d], mask [b, t] -> hidden state at each row's last position whose mask is 1."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (attention_mask.long() * positions).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class Embedder:
    """Backbone (+ optional peft adapter) that turns records into unit vectors."""

    def __init__(self, cfg: ModelConfig, image_root: str | Path = "", model=None, device: str | None = None):
        self.cfg = cfg
        self.image_root = image_root
        self.arch = detect_arch(cfg.path)
        self.placeholder = IMAGE_PLACEHOLDER[self.arch]
        self.processor = load_processor(cfg.path, padding_side="left")
        # Training passes its own (peft-wrapped) model; inference loads one.
        self.model = model if model is not None else load_model(cfg.path, cfg.dtype, cfg.adapter, device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def collate(self, records: Sequence[Record]) -> dict[str, torch.Tensor]:
        """Tokenise a mixed batch (text-only and image records together) for ONE forward pass."""
        texts, images = [], []
        for r in records:
            image = r.get("image") or None
            texts.append(format_text(r.get("text") or "", image is not None, self.placeholder))
            if image is not None:
                images.append(load_image(image, self.image_root, self.cfg.image_size))
        # Text-only batches are truncated to max_length; image batches are not, since a cut could fall
        # inside the image tokens (MMEB image prompts are short anyway).
        limit = {} if images else {"truncation": True, "max_length": self.cfg.max_length}
        batch = self.processor(text=texts, images=images or None, return_tensors="pt", padding=True, **limit)
        return dict(batch)

    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forward with gradients (training): [b, d] L2-normalised float32."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        # logits_to_keep=1: pooling reads hidden states only, and full-vocabulary logits for every
        # position were most of a large-vocabulary model's activation memory (docs/benchmarks.md)
        out = self.model(**batch, output_hidden_states=True, return_dict=True, logits_to_keep=1)
        pooled = last_token_pool(out.hidden_states[-1], batch["attention_mask"])
        return F.normalize(pooled.float(), dim=-1)

    @torch.no_grad()
    def embed(self, records: Sequence[Record], batch_size: int | None = None) -> np.ndarray:
        """Records -> float32 [n, d] unit vectors, in input order."""
        bs = batch_size or self.cfg.batch_size
        chunks = [
            self.encode(self.collate(records[i : i + bs])).cpu().numpy() for i in range(0, len(records), bs)
        ]
        if not chunks:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(chunks).astype(np.float32)

    @property
    def dim(self) -> int:
        cfg = self.model.config
        return getattr(cfg, "text_config", cfg).hidden_size
