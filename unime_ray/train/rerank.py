"""Reranker training task (paper eqs. 5-6): per query three supervised answers on the same model,

- pairwise: (query, positive) -> "Yes" and (query, hardest negative) -> "No" with the judge prompt;
- listwise: the positive inserted at a random position among the top-`list_size` negatives (by judge
  score) -> "Ans: (n)" with the listwise prompt;

Negatives tied in judge score are ordered afresh every epoch (seeded by run seed, query and epoch), so
a tie at the top gives a different "hardest" negative each pass. Mining orders ties by retrieval rank,
and an embedder's hubs then head many lists: in the oracle-mined synthetic world one label was the first
negative of 129 of 300 classification/VQA queries, a candidate-only cue for "No" that the reranker
fitted instead of matching (docs/experiment-log.md).

cross-entropy on the answer tokens only (prompt tokens masked), L = L_pair + L_list. Query and
candidate texts AND images reach every prompt (the official code's dataset drops the texts through a
key mismatch; see docs/method.md).

    python jobs/train_rerank.py --config jobs/configs/tiny.yaml
"""

from __future__ import annotations

import hashlib
import random

import torch
import torch.nn.functional as F

from unime_ray.config import Config
from unime_ray.models.backbone import load_processor
from unime_ray.models.embedder import load_image
from unime_ray.models.prompts import (
    answer_token_ids,
    judge_content,
    listwise_answer,
    listwise_content,
    render,
)
from unime_ray.train.loop import lora_model

END = "<|im_end|>"  # the answer is followed by the end-of-turn token, so the model learns to stop


def examples(row: dict, list_size: int, seed: int, epoch: int = 0) -> list[tuple[list[dict], list[str], str]]:
    """The three (content parts, image paths, answer) of one mined row, deterministic per (seed, query,
    epoch)."""
    key = f"{seed}:{row['id']}:{epoch}"
    rng = random.Random(int(hashlib.blake2b(key.encode(), digest_size=8).hexdigest(), 16))
    q_text, q_image = row["qry_text"], row["qry_image"]
    pos = (row["pos_text"], row["pos_image"])
    negs = list(zip(row["neg_texts"], row["neg_images"], row["neg_scores"], strict=True))
    rng.shuffle(negs)  # the stable sort below then breaks score ties in this epoch's order
    unique = list(
        dict.fromkeys((t, i) for t, i, _ in sorted(negs, key=lambda n: -n[2]))
    )  # by score, no repeats
    if not unique:
        raise ValueError(f"query {row['id']}: no negatives to train the reranker on")
    hardest = unique[0]  # the highest judge score among the mined negatives
    listed = unique[:list_size]
    at = rng.randint(0, len(listed))
    listed.insert(at, pos)

    def images(*sides: tuple[str, str]) -> list[str]:
        return [im for _, im in sides if im]

    return [
        (judge_content(q_text, bool(q_image), pos[0], bool(pos[1])), images((q_text, q_image), pos), "Yes"),
        (
            judge_content(q_text, bool(q_image), hardest[0], bool(hardest[1])),
            images((q_text, q_image), hardest),
            "No",
        ),
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

    def batch(self, rows: list[dict], epoch: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Tokenised prompt+answer sequences and labels (-100 on every prompt and padding token)."""
        prompts, answers, images = [], [], []
        for row in rows:
            for content, paths, answer in examples(row, self.cfg.list_size, self.seed, epoch):
                prompts.append(render(self.processor.tokenizer, content))
                answers.append(answer)
                images += [load_image(p, self.image_root, self.cfg.model.image_size) for p in paths]
        return answer_batch(self.processor, prompts, answers, images)

    def loss(self, rows: list[dict], epoch: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
        inputs, labels = self.batch(rows, epoch)
        per_example, correct = answer_losses(self.model, inputs, labels)
        loss = per_example.view(len(rows), 3).sum(1).mean()  # L_pair (yes + no) + L_list, per query
        correct = correct.view(len(rows), 3).float()
        return loss, {"yes_no_acc": correct[:, :2].mean().item(), "list_acc": correct[:, 2].mean().item()}


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


def answer_losses(
    model, inputs: dict[str, torch.Tensor], labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the mean cross-entropy of its answer tokens (`answer_batch` labels), and whether
    every answer token is the model's argmax. Left padding puts every answer at the end, so only the
    last positions' logits are computed (`logits_to_keep`): the full vocabulary at every prompt position
    would cost ~20% of a 135M model's forward and gigabytes of logits, for nothing."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    keep = int((labels != -100).sum(1).max()) + 1  # the longest answer, and the position before it
    target = labels[:, -(keep - 1) :].to(device)
    logits = model(**inputs, logits_to_keep=keep).logits[:, :-1].float()
    per_token = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")
    mask = target != -100
    with torch.no_grad():
        correct = ((logits.argmax(-1) == target) | ~mask).all(1)
    return (per_token * mask).sum(1) / mask.sum(1), correct
