"""InfoNCE with in-batch and hard negatives: the contrastive baseline for ablations (no judge scores).

Each query's logits are its cosines with EVERY candidate of the (global) batch, over tau; the target is
its own positive; the other queries' positives and all hard negatives (its own and the others') are
negatives:

    L = -1/N sum_i log( exp(cos(e_i, e_i+)/tau) / sum_{j, n} exp(cos(e_i, c_{j,n})/tau) )

with j over all N queries of the global batch and n over their 1 + k candidates. This is VLM2Vec-style
contrastive training with hard negatives (VLM2Vec gathers queries and targets across GPUs and applies
cross-entropy to the full query x candidate matrix), the "rigid one-to-one mapping" UniME-V2 replaces
with judge-score distributions (`jeffreys.py`). The official UniME-V2 code does not use it.

Distributed: when `gather` and torch.distributed is initialised with world size W > 1, queries AND
candidates are all-gathered with gradients (torch.distributed.nn.functional.all_gather), so every rank
computes the same loss over the global batch of N = W * b queries. Query j of rank r is global query
r * b + j; its positive sits in column (r * b + j) * (1 + k) of the gathered candidates (the rank offset
r * b * (1 + k) plus its local offset). The all_gather backward SUMS the W identical per-rank gradients
onto the local inputs, so each rank's local gradient is W times the single-process one; DDP / DeepSpeed
then AVERAGE parameter gradients over the W ranks, which gives exactly the gradient of the global loss.
Every rank must pass the same b and k (all_gather needs equal shapes: drop or pad the last batch).

Shapes: q [b, d], c [b, 1 + k, d] (positive at index 0), scores ignored (kept for a common signature);
returns a scalar. Embeddings need not be normalised; bf16/fp16 inputs are computed in float32.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from unime_ray.train.losses.jeffreys import check_shapes


def _gather_with_grad(x: Tensor) -> Tensor:
    from torch.distributed.nn.functional import all_gather

    # torch >= 2.5 marks this autograd all_gather deprecated in favour of a private functional API; it is
    # still the public one that carries gradients, so keep it and keep its FutureWarning out of the logs.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(x.contiguous()), dim=0)


def compute_loss_from_embeddings(
    q: Tensor, c: Tensor, scores: Tensor | None = None, tau: float = 0.02, gather: bool = True
) -> Tensor:
    """Cross-entropy of cos(q, all candidates of the global batch)/tau against each query's positive.

    q [b, d], c [b, 1 + k, d] (positive first); scores ignored -> scalar (same value on every rank).
    """
    check_shapes(q, c, None)
    n_cand = c.shape[1]
    dtype = torch.promote_types(q.dtype, torch.float32)
    q = F.normalize(q.to(dtype), dim=-1)
    c = F.normalize(c.to(dtype), dim=-1).reshape(-1, c.shape[-1])
    if gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # Gathered in rank order, so local query j of rank r lands at row r * b + j and its positive at
        # column (r * b + j) * (1 + k): the arange below already carries the rank offset.
        q = _gather_with_grad(q)
        c = _gather_with_grad(c)
    logits = q @ c.T / tau
    target = torch.arange(q.shape[0], device=q.device) * n_cand
    return F.cross_entropy(logits, target)
