"""UniME-V2-Reranker at inference: rerank an embedding top-K (paper: top-10) for one query.

- listwise (the paper's pipeline): one prompt with the query and its K candidates numbered (1)..(K);
  the model answers "Ans: (n)"; candidate n moves to the top, the others keep their embedding order.
  An answer that names no valid candidate leaves the embedding order as it was, and is counted.
- pointwise: the Yes-probability of each (query, candidate) with the judge prompt, optionally fused
  with the embedding similarity: `alpha * p_yes + (1 - alpha) * cos`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from unime_ray.config import ModelConfig
from unime_ray.models.embedder import Record, load_image
from unime_ray.models.judge import TransformersJudge
from unime_ray.models.prompts import listwise_content, parse_listwise_answer, render


class Reranker(TransformersJudge):
    def __init__(self, cfg: ModelConfig, image_root: str | Path = "", model=None, max_new_tokens: int = 8):
        super().__init__(cfg, image_root, model)
        self.max_new_tokens = max_new_tokens

    def pointwise(self, query: Record, cands: Sequence[Record]) -> np.ndarray:
        return self.score(
            [(query["text"], query.get("image") or "", c["text"], c.get("image") or "") for c in cands]
        )

    def listwise_prompt(self, query: Record, cands: Sequence[Record]) -> tuple[str, list]:
        content = listwise_content(
            query["text"], bool(query.get("image")), [(c["text"], bool(c.get("image"))) for c in cands]
        )
        images = [
            load_image(r["image"], self.image_root, self.model_cfg.image_size)
            for r in [query, *cands]
            if r.get("image")
        ]
        return render(self.tokenizer, content), images

    @torch.no_grad()
    def listwise(self, queries: Sequence[Record], cand_lists: Sequence[Sequence[Record]]) -> list[int | None]:
        """For each query, the 0-based position of the candidate the model picks (None: no valid answer)."""
        pairs = zip(queries, cand_lists, strict=True)
        prompts, images = zip(*(self.listwise_prompt(q, c) for q, c in pairs), strict=True)
        flat = [im for ims in images for im in ims]
        batch = self.processor(text=list(prompts), images=flat or None, return_tensors="pt", padding=True)
        batch = {k: v.to(self.model.device) for k, v in batch.items()}
        out = self.model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False)
        texts = self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        return [parse_listwise_answer(t, len(c)) for t, c in zip(texts, cand_lists, strict=True)]


def apply_listwise(order: Sequence[int], pick: int | None) -> list[int]:
    """Embedding order `order` (candidate ids or indices) with the picked position moved to the front."""
    if pick is None:
        return list(order)
    return [order[pick]] + [x for i, x in enumerate(order) if i != pick]


def fuse(p_yes: np.ndarray, cos: np.ndarray, alpha: float) -> np.ndarray:
    """Pointwise score fusion: alpha = 1 ranks by the reranker alone, 0 by the embedding alone."""
    return alpha * p_yes + (1.0 - alpha) * cos
