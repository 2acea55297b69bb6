"""`unime-ray <command> [args]`: one entry point; each command is a module's `main(argv)` (or the
function named after a colon), with its own `--help`."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": ("unime_ray.demo", "run the whole path on the synthetic world with tiny models (CPU)"),
    "mine": ("unime_ray.mining.pipeline", "mine hard negatives: embed, retrieve, judge, sample (resumable)"),
    "inspect": ("unime_ray.inspector", "an HTML page of what the judge did to a sample of mined queries"),
    "judge-agree": (
        "unime_ray.mining.agree",
        "two judge settings on a sample of mined queries: agreement, tokens, projected GPU-hours",
    ),
    "align": ("unime_ray.train.align", "LLaVA stage 1: align a new projector on image-text pairs"),
    "train-embed": ("unime_ray.train.run", "train the embedder (Ray Train, DeepSpeed ZeRO-2, LoRA)"),
    "train-rerank": ("unime_ray.train.run:main_rerank", "train the reranker (pairwise + listwise)"),
    "export": ("unime_ray.train.export", "merge a LoRA adapter into a standalone model folder"),
    "build-index": ("unime_ray.serve.index", "embed a corpus into a FAISS index (incremental; --rebuild)"),
    "serve": ("unime_ray.serve.app", "serve search / embed / rerank over HTTP with Ray Serve (127.0.0.1)"),
    "eval": ("unime_ray.eval.job", "MMEB / retrieval / SugarCrepe tables, with and without the reranker"),
    "compare": ("unime_ray.eval.compare", "compare two evaluation result folders (table of deltas)"),
    "config": ("unime_ray.config", "every config key with its type, value and help (--config / --set apply)"),
    "make-tiny": ("unime_ray.models.tiny", "build a tiny random-weight Qwen2-VL / LLaVA-OV model folder"),
    "make-world": (
        "unime_ray.data.real",
        "write a world in MMEB formats: the synthetic shapes (default) or real data (--source)",
    ),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:12s} {text}" for name, (_, text) in COMMANDS.items()]
        print("usage: unime-ray <command> [--help | args]\n\ncommands:\n" + "\n".join(lines))
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    module, _, func = COMMANDS[argv[0]][0].partition(":")
    getattr(importlib.import_module(module), func or "main")(argv[1:])


if __name__ == "__main__":
    main()
