"""Can the listwise answer be learned? The reranker's own listwise prompt and answer loss
(`listwise_content`, `answer_batch`, `answer_losses`), LoRA on a FastVLM's language model, trained on
many distinct lists of 10 with nothing else in the loss, its accuracy read every `--every` steps.

Four tasks:
- `copy`: the query is a word and the positive the same word among 9 other words (single-token
  lowercase words of the tokenizer's vocabulary; 300 held out). It needs only in-context pointing: find
  the candidate equal to the query and answer its number.
- `image`: a Fashion-MNIST world (`make-world --source fashion-mnist`): the query is a training photo, the
  candidates the 10 class captions in a fresh random order. It needs seeing as well: the model must name
  the photo's class and point at that caption. `--pool` training photos are trained on; "own" is 64 of
  them, "held" 64 photos of the eval split.
- `mixed`: half of each batch from each task, read on both (the copy readings as `copy_held`, `copy_own`).
- `curriculum`: the copy task alone for `--copy-steps` steps, then the image task alone, read on both as
  `mixed` is (does pointing, once learned on text, carry over to photos?).

Accuracy is the share of lists whose whole answer ("Ans: (n)" and the end of turn) is the model's
argmax at every position: what greedy decoding of the inference path (`Reranker.listwise`) answers.

    python bench/listwise_pointing.py --model runs/fastvlm/models/fast-vlm --task copy --out /tmp/copy.json
    python bench/listwise_pointing.py --model runs/fm/fast-vlm-aligned --task image --world runs/fm/world \
        --steps 250 --every 50 --out bench/results/listwise_pointing_image.json
    python bench/listwise_pointing.py --model runs/fastvlm/models/fast-vlm --steps 2 --every 1 \
        --out /tmp/q.json   # a quick pass

On 2 cores a step of 8 lists costs ~6 s (copy) and ~8 s (image, 96 px) and each reading ~40 s.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from unime_ray.config import LoraConfig, ModelConfig
from unime_ray.models.backbone import load_processor
from unime_ray.models.embedder import load_image
from unime_ray.models.prompts import listwise_answer, listwise_content, render
from unime_ray.train.loop import keep_batch_norm_frozen, lora_model
from unime_ray.train.rerank import answer_batch, answer_losses

LIST = 10
READ = 64  # lists per reading


def vocabulary_words(tokenizer) -> list[str]:
    """Lowercase alphabetic words of 4-8 letters that are one token with a leading space, in a seeded
    order (the first 300 are held out)."""
    words = sorted(
        {
            t[1:]
            for t in tokenizer.get_vocab()
            if t.startswith("Ġ") and t[1:].isalpha() and t[1:].islower() and 4 <= len(t) - 1 <= 8
        }
    )
    random.Random(0).shuffle(words)
    return words


def copy_lists(tokenizer, pool: list[str], n: int, rng: random.Random) -> list[tuple]:
    """`n` (prompt, answer, image) lists: 10 words, the query equal to one of them."""
    out = []
    for _ in range(n):
        words, at = rng.sample(pool, LIST), rng.randrange(LIST)
        content = listwise_content(words[at], False, [(w, False) for w in words])
        out.append((render(tokenizer, content), listwise_answer(at), None))
    return out


def world_rows(world: Path, split: str) -> list[dict]:
    """The Fashion-MNIST rows of a split as {qry, qry_image_path, pos_text} (eval: the first target)."""
    rows = [json.loads(line) for line in (world / split / "FashionMNIST.jsonl").read_text().splitlines()]
    if split == "eval":
        rows = [
            {"qry": r["qry_text"], "qry_image_path": r["qry_img_path"], "pos_text": r["tgt_text"][0]}
            for r in rows
        ]
    return rows


def image_lists(
    tokenizer, world: Path, captions: list[str], pool: list[dict], n: int, rng: random.Random, size: int
) -> list[tuple]:
    """`n` lists: a photo of `pool` and the class captions, its own at a random position."""
    out = []
    for row in rng.sample(pool, n):
        listed = [c for c in captions if c != row["pos_text"]]
        rng.shuffle(listed)
        at = rng.randrange(len(captions))
        listed.insert(at, row["pos_text"])
        content = listwise_content(row["qry"], True, [(c, False) for c in listed])
        image = load_image(row["qry_image_path"], world / "images", size)
        out.append((render(tokenizer, content), listwise_answer(at), image))
    return out


def copy_task(tokenizer):
    """The copy task's readings ({name: lists}) and a function drawing `n` training lists from an rng."""
    words = vocabulary_words(tokenizer)
    held, train = words[:300], words[300:]
    reads = {
        "held": copy_lists(tokenizer, held, READ, random.Random(1)),
        "own": copy_lists(tokenizer, train, READ, random.Random(2)),
    }
    return reads, lambda n, rng: copy_lists(tokenizer, train, n, rng)


def image_task(args, tokenizer):
    """The image task's readings and draw function, as `copy_task`."""
    train = world_rows(args.world, "train")
    captions = sorted({r["pos_text"] for r in train})
    pool = random.Random(0).sample(train, args.pool)

    def lists(rows: list[dict], n: int, rng: random.Random):
        return image_lists(tokenizer, args.world, captions, rows, n, rng, args.image_size)

    reads = {
        "held": lists(world_rows(args.world, "eval"), READ, random.Random(1)),
        "own": lists(pool[:READ], READ, random.Random(2)),
    }
    return reads, lambda n, rng: lists(pool, n, rng)


def tasks(args, tokenizer):
    """The readings and a function drawing the training batch of a step from an rng. `mixed`: half of
    each batch copy lists, half image lists; `curriculum`: copy lists before `--copy-steps`, image lists
    after."""
    if args.task == "copy":
        reads, draw = copy_task(tokenizer)
    elif args.task == "image":
        reads, draw = image_task(args, tokenizer)
    else:
        (copy_reads, copy_draw), (reads, image_draw) = copy_task(tokenizer), image_task(args, tokenizer)
        reads |= {f"copy_{name}": lists for name, lists in copy_reads.items()}
        if args.task == "curriculum":
            return reads, lambda rng, step: (image_draw if step >= args.copy_steps else copy_draw)(
                args.batch, rng
            )
        half = args.batch // 2
        return reads, lambda rng, step: copy_draw(half, rng) + image_draw(args.batch - half, rng)
    return reads, lambda rng, step: draw(args.batch, rng)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True, help="a FastVLM folder (make-tiny --arch fast-vlm)")
    p.add_argument("--task", default="copy", choices=["copy", "image", "mixed", "curriculum"])
    p.add_argument("--copy-steps", type=int, default=120, help="curriculum: copy-task steps before photos")
    p.add_argument("--world", type=Path, help="image task: a make-world --source fashion-mnist folder")
    p.add_argument("--pool", type=int, default=512, help="image task: training photos trained on")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=8, help="lists per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha 2x)")
    p.add_argument("--every", type=int, default=50, help="steps between readings")
    p.add_argument("--out", type=Path, required=True, help="results JSON, rewritten at every reading")
    args = p.parse_args()
    torch.manual_seed(0)
    processor = load_processor(str(args.model), padding_side="left")
    reads, draw = tasks(args, processor.tokenizer)
    lora = LoraConfig(rank=args.rank, alpha=2 * args.rank, dropout=0.0, use_dora=False)
    model = lora_model(
        ModelConfig(path=str(args.model), dtype="float32", image_size=args.image_size), lora, False
    )
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))  # 10 warmup steps

    def batch(lists):
        prompts, answers, images = zip(*lists, strict=True)
        return answer_batch(processor, list(prompts), list(answers), [i for i in images if i is not None])

    @torch.no_grad()
    def reading() -> dict[str, float]:
        model.eval()
        got = {}
        for name, lists in reads.items():
            correct = [
                answer_losses(model, *batch(lists[i : i + 16])).correct for i in range(0, len(lists), 16)
            ]
            got[name] = round(100 * torch.cat(correct).float().mean().item(), 1)
        model.train()
        keep_batch_norm_frozen(model)  # the pretrained eye's BatchNorm stays in eval mode
        return got

    rng, log, losses, start = random.Random(3), [], [], time.time()
    for step in range(args.steps + 1):
        if step % args.every == 0:
            mean_loss = round(sum(losses) / len(losses), 3) if losses else None
            log.append({"step": step, **reading(), "loss": mean_loss, "seconds": round(time.time() - start)})
            losses = []
            print(json.dumps(log[-1]), flush=True)
            settings = {k: str(v) for k, v in vars(args).items()}
            args.out.write_text(json.dumps({"settings": settings, "log": log}, indent=1) + "\n")
        if step == args.steps:
            break
        loss = answer_losses(model, *batch(draw(rng, step))).total.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())


if __name__ == "__main__":
    main()
