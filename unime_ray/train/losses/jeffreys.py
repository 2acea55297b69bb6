"""UniME-V2 embedder loss as the paper writes it (eq. 4) and the official code computes it.

For each query with embedding e_q and its 1 + k candidates E_c = (e_c+, e_c1-, ..., e_ck-), positive first,
and the judge's semantic matching scores S_c = (s_q,ct, s_q,c1, ..., s_q,ck):

    P = softmax(cos(e_q, E_c) / tau)                                   (eq. 2)
    Q = softmax(S_c / tau)                                              (eq. 3)
    L = 1/2 * (1/N sum_i KL(P_i || Q_i) + 1/N sum_i KL(Q_i || P_i))     (eq. 4)

The paper calls this "JS-Divergence", but no mixture M = (P + Q) / 2 appears: it is the symmetric KL
(Jeffreys divergence J = KL(P||Q) + KL(Q||P)) halved. The official code computes exactly this,
`0.5 * (KL(softmax(judge/tau) || softmax(sim/tau)) + KL(reverse))`, with the SAME tau (0.02) on both
sides, each query scored only against its own positive and k (= 8) hard negatives (no in-batch negatives),
and the positive's target being its own judge score s_q,ct (not a fixed 1). The true Jensen-Shannon
divergence is in `js.py`; in-batch InfoNCE, the baseline, in `infonce.py`.

Shapes: q [b, d], c [b, 1 + k, d] (positive at index 0), scores [b, 1 + k]; returns a scalar. Embeddings
need not be normalised (cosine is taken here). bf16/fp16 inputs are computed in float32: dividing by
tau = 0.02 multiplies bf16's ~3-digit rounding of the cosines by 50, enough to move the logits by ~0.2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def check_shapes(q: Tensor, c: Tensor, scores: Tensor | None) -> None:
    """Raise a ValueError naming the mismatch; a silent broadcast would train on the wrong pairs."""
    if q.dim() != 2 or c.dim() != 3:
        raise ValueError(
            f"expected q [b, d] and c [b, 1+k, d], got q {tuple(q.shape)} and c {tuple(c.shape)}"
        )
    if c.shape[0] != q.shape[0] or c.shape[2] != q.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} and c {tuple(c.shape)} disagree on b or d")
    if scores is not None and tuple(scores.shape) != tuple(c.shape[:2]):
        raise ValueError(f"scores {tuple(scores.shape)} must be [b, 1+k] = {tuple(c.shape[:2])}")


def log_distributions(q: Tensor, c: Tensor, scores: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """(log P, log Q) of eqs. 2-3, [b, 1 + k] each, computed in at least float32."""
    check_shapes(q, c, scores)
    dtype = torch.promote_types(q.dtype, torch.float32)
    q = F.normalize(q.to(dtype), dim=-1)
    c = F.normalize(c.to(dtype), dim=-1)
    cos = torch.einsum("bd,bnd->bn", q, c)
    # log_softmax on both sides: at tau = 0.02 the logits span up to 100, softmax then log would underflow.
    return F.log_softmax(cos / tau, dim=-1), F.log_softmax(scores.to(dtype) / tau, dim=-1)


def compute_loss_from_embeddings(q: Tensor, c: Tensor, scores: Tensor, tau: float = 0.02) -> Tensor:
    """0.5 * mean_i (KL(P_i || Q_i) + KL(Q_i || P_i)), P from cosines, Q from judge scores, both / tau.

    q [b, d], c [b, 1 + k, d] (positive first), scores [b, 1 + k] -> scalar.
    """
    log_p, log_q = log_distributions(q, c, scores, tau)
    kl_pq = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    kl_qp = (log_q.exp() * (log_q - log_p)).sum(dim=-1)
    return 0.5 * (kl_pq + kl_qp).mean()
