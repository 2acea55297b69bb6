"""What a finished run folder (`run.output_dir`) holds, for the commands that start from one with
`--run RUN_DIR`: `unime-ray serve --run runs/tiny` serves the demo's index with the embedder and the
reranker that built it, `unime-ray export --run runs/tiny OUT` merges its final embedder.

A training run names its final weights in `train_<kind>/_SUCCESS.json` (`summary.weights`: the LoRA
adapter, or the model folder without LoRA), written once its last step is saved; the checkpoint folders
beside it may be several (`train.keep_checkpoints`), so nothing here guesses from their names."""

from __future__ import annotations

import json
from pathlib import Path

KINDS = ("embed", "rerank")


def final_weights(run_dir: str | Path, kind: str = "embed") -> Path:
    """The final weights of the `kind` training of the run in `run_dir`; FileNotFoundError naming the
    marker file and the command that makes it when that training has not finished."""
    marker = Path(run_dir) / f"train_{kind}" / "_SUCCESS.json"
    if not marker.is_file():
        raise FileNotFoundError(
            f"{marker} not found: {run_dir} has no finished {kind} training "
            f"(run `unime-ray train-{kind} --set run.output_dir={run_dir}`, or `unime-ray demo`)"
        )
    weights = Path(json.loads(marker.read_text())["summary"]["weights"])
    if not weights.is_dir():
        raise FileNotFoundError(f"{marker} names {weights}, which does not exist any more")
    return weights


def run_overrides(run_dir: str | Path) -> list[str]:
    """`--set` overrides that point a config at the run in `run_dir`: its output folder (so its index),
    the embedder it trained and, when it trained one, its reranker."""
    from unime_ray.eval.job import resolve_checkpoint

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    base, adapter = resolve_checkpoint(str(final_weights(run_dir, "embed")))
    out = [f"run.output_dir={run_dir}", f"embedder.path={base}", f"embedder.adapter={adapter}"]
    if (run_dir / "train_rerank" / "_SUCCESS.json").is_file():
        base, adapter = resolve_checkpoint(str(final_weights(run_dir, "rerank")))
        out += [f"reranker.model.path={base}", f"reranker.model.adapter={adapter}"]
    return out
