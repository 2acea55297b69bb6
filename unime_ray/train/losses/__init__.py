"""Embedder losses, one per module, each `compute_loss_from_embeddings(q, c, scores, tau)`:
q [b, d], c [b, 1 + k, d] (positive first), scores [b, 1 + k] judge scores -> scalar.

- "jeffreys": the paper's eq. 4 as the official code computes it (symmetric KL; the default).
- "js": the true Jensen-Shannon divergence (ablation).
- "infonce": in-batch + hard-negative contrastive loss, judge scores ignored (VLM2Vec-style baseline).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from unime_ray.train.losses.infonce import compute_loss_from_embeddings as infonce_loss
from unime_ray.train.losses.jeffreys import compute_loss_from_embeddings as jeffreys_loss
from unime_ray.train.losses.js import compute_loss_from_embeddings as js_loss

LOSSES: dict[str, Callable[..., Tensor]] = {"jeffreys": jeffreys_loss, "js": js_loss, "infonce": infonce_loss}

__all__ = ["LOSSES", "infonce_loss", "jeffreys_loss", "js_loss"]
