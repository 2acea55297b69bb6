"""Reranker training task (paper eqs. 5-6, and a ranking term): per query, on one model,

- pairwise: (query, positive) -> "Yes" and (query, negative) -> "No" with the judge prompt, for the
  `point_negatives` distinct negatives of highest judge score (paper: 1, the hardest);
- ranking: over those same prompts, a softmax of s = logit(Yes) - logit(No) at the answer position with
  the positive as target, scaled by `rank_weight` (0: the paper's loss alone);
- listwise: the positive inserted at a random position among the top-`list_size` negatives (by judge
  score) -> "Ans: (n)" with the listwise prompt.

Why the ranking term and the summed answer loss: the paper's pair of answers can be fitted by a prior
over candidate texts (a label that is often a hard negative gets a low p(Yes) whatever the query), which
ranks at chance; the softmax over one query's candidates pays for exactly such a prior. Each answer's
loss is the SUM of its tokens' cross-entropies, not the mean: in "Ans: (3)<|im_end|>" only the number
decides, and a mean over the five trivial tokens around it would shrink its gradient five-fold
(docs/experiment-log.md, "The reranker that ranked at chance").

Negatives tied in judge score are ordered afresh every epoch (seeded by run seed, query and epoch), so a
tie at the top gives a different "hardest" negative each pass: mining orders ties by retrieval rank, and
an embedder's hubs then head many lists, a candidate-only cue for "No".

Query and candidate texts AND images reach every prompt (the official code's dataset drops the texts
through a key mismatch; see docs/method.md).

    python jobs/train_rerank.py --config jobs/configs/tiny.yaml
"""

from __future__ import annotations

import itertools
import random
from typing import NamedTuple

import torch
import torch.nn.functional as F

from unime_ray.config import Config
from unime_ray.keyed import key_int
from unime_ray.models.backbone import load_processor
from unime_ray.models.embedder import load_image
from unime_ray.models.prompts import (
    answer_token_ids,
    judge_content,
    listwise_answer,
    listwise_content,
    render,
)
from unime_ray.train.loop import keep_batch_norm_frozen, lora_model
from unime_ray.train.monitor import rank_p_at_1

END = "<|im_end|>"  # the answer is followed by the end-of-turn token, so the model learns to stop


def examples(
    row: dict, list_size: int, seed: int, epoch: int = 0, point_negatives: int = 1
) -> list[tuple[list[dict], list[str], str]]:
    """(content parts, image paths, answer) of one mined row: the positive's "Yes", then "No" for each of
    the `point_negatives` distinct negatives of highest judge score (fewer when the row has fewer), then
    the listwise prompt; deterministic per (seed, query, epoch)."""
    rng = random.Random(key_int(f"{seed}:{row['id']}:{epoch}"))
    q_text, q_image = row["qry_text"], row["qry_image"]
    pos = (row["pos_text"], row["pos_image"])
    negs = list(zip(row["neg_texts"], row["neg_images"], row["neg_scores"], strict=True))
    rng.shuffle(negs)  # the stable sort below then breaks score ties in this epoch's order
    unique = list(
        dict.fromkeys((t, i) for t, i, _ in sorted(negs, key=lambda n: -n[2]))
    )  # by score, no repeats
    if not unique:
        raise ValueError(f"query {row['id']}: no negatives to train the reranker on")
    listed = unique[:list_size]
    at = rng.randint(0, len(listed))
    listed.insert(at, pos)

    def images(*sides: tuple[str, str]) -> list[str]:
        return [im for _, im in sides if im]

    def pointwise(cand: tuple[str, str], answer: str) -> tuple[list[dict], list[str], str]:
        return (
            judge_content(q_text, bool(q_image), cand[0], bool(cand[1])),
            images((q_text, q_image), cand),
            answer,
        )

    return [
        pointwise(pos, "Yes"),
        *(pointwise(neg, "No") for neg in unique[:point_negatives]),
        (
            listwise_content(q_text, bool(q_image), [(t, bool(i)) for t, i in listed]),
            images((q_text, q_image), *listed),
            listwise_answer(at),
        ),
    ]


class RerankTask:
    def __init__(self, cfg: Config):
        self.cfg, self.seed, self.image_root = cfg.reranker, cfg.run.seed, cfg.data.image_root
        self.model = lora_model(self.cfg.model, self.cfg.lora, self.cfg.gradient_checkpointing)
        self.processor = load_processor(self.cfg.model.path, padding_side="left")
        self.yes, self.no = answer_token_ids(self.processor.tokenizer)
        self.reranker = None  # the inference-path view of the model, built at the first `monitor`

    def batch(
        self, rows: list[dict], epoch: int = 0
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[int]]:
        """Tokenised prompt+answer sequences, labels (-100 on every prompt and padding token) and the
        number of sequences of each row (its pointwise prompts, then one listwise)."""
        prompts, answers, images, sizes = [], [], [], []
        for row in rows:
            found = examples(row, self.cfg.list_size, self.seed, epoch, self.cfg.point_negatives)
            for content, paths, answer in found:
                prompts.append(render(self.processor.tokenizer, content))
                answers.append(answer)
                images += [load_image(p, self.image_root, self.cfg.model.image_size) for p in paths]
            sizes.append(len(found))
        return (*answer_batch(self.processor, prompts, answers, images), sizes)

    def loss(self, rows: list[dict], epoch: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
        """Per query: its pointwise answers (the positive's and the mean of its negatives'), its ranking
        term and its listwise answer; averaged over the queries."""
        inputs, labels, sizes = self.batch(rows, epoch)
        out = answer_losses(self.model, inputs, labels)
        margin = out.first[:, self.yes] - out.first[:, self.no]  # s = logit(Yes) - logit(No)
        losses, yes_no, ranked, listed = [], [], [], []
        for start, size in zip(itertools.accumulate([0, *sizes]), sizes, strict=False):
            point, last = slice(start, start + size - 1), start + size - 1
            nll = out.total[point]
            rank = F.cross_entropy(
                margin[point].unsqueeze(0), torch.zeros(1, dtype=torch.long, device=margin.device)
            )
            losses.append(nll[0] + nll[1:].mean() + self.cfg.rank_weight * rank + out.total[last])
            yes_no.append(out.correct[point].float().mean())
            ranked.append((margin[point].argmax() == 0).float())
            listed.append(out.correct[last].float())
        mean = lambda xs: torch.stack(xs).mean().item()  # noqa: E731
        metrics = {"yes_no_acc": mean(yes_no), "rank_acc": mean(ranked), "list_acc": mean(listed)}
        return torch.stack(losses).mean(), metrics

    def monitor(self, samples: dict[str, list[dict]]) -> dict[str, float]:
        """Pointwise and listwise P@1 (%) of each sample of rows ({split: rows}) through the inference
        path (`Reranker` over the model being trained, dropout off), e.g. {"train_point_p@1": ...}."""
        from unime_ray.models.reranker import Reranker

        module = getattr(self.model, "module", self.model)  # the model inside the DeepSpeed engine
        if self.reranker is None:
            self.reranker = Reranker(self.cfg.model, self.image_root, model=module)
        module.eval()
        try:
            return {
                f"{split}_{name}": value
                for split, rows in samples.items()
                for name, value in rank_p_at_1(self.reranker, rows, self.cfg, self.seed).items()
            }
        finally:
            module.train()
            keep_batch_norm_frozen(module)  # a frozen BatchNorm tower stays in eval mode (FastVLM)


class AnswerLosses(NamedTuple):
    """Per sequence of an `answer_batch`: mean and summed cross-entropy of its answer tokens, whether
    every answer token is the model's argmax, and the logits at its first answer position (B x vocab)."""

    mean: torch.Tensor
    correct: torch.Tensor
    total: torch.Tensor
    first: torch.Tensor


def answer_batch(
    processor, prompts: list[str], answers: list[str], images: list
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Rendered `prompts` each followed by its answer and the end-of-turn token, tokenised with left
    padding (`images`: every prompt's images in order), and labels: the answer tokens, -100 on every
    prompt and padding token. Shared with the LLaVA stage-1 alignment of bench/smol_reranker.py."""
    full = processor(
        text=[p + a + END for p, a in zip(prompts, answers, strict=True)],
        images=images or None,
        return_tensors="pt",
        padding=True,
    )
    prompt_only = processor(text=prompts, images=images or None, return_tensors="pt", padding=True)
    # Left padding: each row's answer is its last (full length - prompt length) tokens.
    answer_len = full["attention_mask"].sum(1) - prompt_only["attention_mask"].sum(1)
    width = full["input_ids"].shape[1]
    labels = torch.where(
        torch.arange(width).unsqueeze(0) >= (width - answer_len).unsqueeze(1), full["input_ids"], -100
    )
    return dict(full), labels


def answer_losses(model, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> AnswerLosses:
    """The answer tokens' cross-entropies of each sequence of an `answer_batch` (`AnswerLosses`). Left
    padding puts every answer at the end, so only the last positions' logits are computed
    (`logits_to_keep`): the full vocabulary at every prompt position would cost ~20% of a 135M model's
    forward and gigabytes of logits, for nothing."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    keep = int((labels != -100).sum(1).max()) + 1  # the longest answer, and the position before it
    target = labels[:, -(keep - 1) :].to(device)
    logits = model(**inputs, logits_to_keep=keep).logits[:, :-1].float()
    per_token = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")
    mask = target != -100
    total = (per_token * mask).sum(1)
    first = logits[torch.arange(len(mask), device=device), mask.int().argmax(1)]  # first answer position
    with torch.no_grad():
        correct = ((logits.argmax(-1) == target) | ~mask).all(1)
    return AnswerLosses(total / mask.sum(1), correct, total, first)
