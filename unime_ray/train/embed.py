"""Embedder training task (paper eqs. 2-4): each query against its positive and k mined hard
negatives, the similarity distribution pulled toward the judge-score distribution.

    python jobs/train_embed.py --config jobs/configs/tiny.yaml

All 1 + (1 + k) x b records of a micro-batch (queries, positives, negatives; text-only and image
records mixed) go through ONE forward pass: one graph, so DDP/ZeRO see every parameter used.
"""

from __future__ import annotations

import torch

from unime_ray.config import Config
from unime_ray.models.embedder import Embedder
from unime_ray.train.loop import lora_model
from unime_ray.train.losses import LOSSES


def candidates(row: dict, k: int) -> tuple[list[dict], list[float]]:
    """The positive first, then the first k stored negatives (the official code's choice), with scores."""
    if len(row["neg_ids"]) < k:
        raise ValueError(f"query {row['id']}: {len(row['neg_ids'])} negatives, train.num_negatives={k}")
    records = [{"text": row["pos_text"], "image": row["pos_image"]}]
    records += [
        {"text": t, "image": i} for t, i in zip(row["neg_texts"][:k], row["neg_images"][:k], strict=True)
    ]
    return records, [row["pos_score"], *row["neg_scores"][:k]]


class EmbedTask:
    def __init__(self, cfg: Config):
        self.cfg = cfg.train
        self.model = lora_model(self.cfg.model, self.cfg.lora, self.cfg.gradient_checkpointing)
        self.embedder = Embedder(self.cfg.model, image_root=cfg.data.image_root, model=self.model)
        self.loss_fn = LOSSES[self.cfg.loss]

    def loss(self, rows: list[dict], epoch: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
        """The configured loss over each query's positive + k negatives (the same in every epoch)."""
        k = self.cfg.num_negatives
        queries = [{"text": r["qry_text"], "image": r["qry_image"]} for r in rows]
        cands, scores = zip(*(candidates(r, k) for r in rows), strict=True)
        self.embedder.model = self.model  # the DeepSpeed engine once the loop has wrapped the model
        emb = self.embedder.encode(self.embedder.collate(queries + [c for cs in cands for c in cs]))
        b = len(rows)
        q, c = emb[:b], emb[b:].view(b, k + 1, -1)
        target = torch.tensor(scores, dtype=torch.float32, device=emb.device)
        loss = self.loss_fn(q, c, target, self.cfg.tau)
        with torch.no_grad():
            p_at_1 = ((c @ q.unsqueeze(-1)).squeeze(-1).argmax(dim=1) == 0).float().mean().item()
        return loss, {"p@1": p_at_1}
