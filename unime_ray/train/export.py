"""`unime-ray export ADAPTER OUT` or `unime-ray export --run RUN_DIR OUT`: merge a trained LoRA adapter
(with --run, the final one of that run's training) into its base model and write a standalone Hugging
Face folder (safetensors) that every tool here, vLLM included, loads like any checkpoint."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from unime_ray.io import WEIGHT_SUFFIXES
from unime_ray.models.backbone import load_model
from unime_ray.runs import KINDS, final_weights


def export(adapter: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    adapter, out = Path(adapter), Path(out)
    cfg_file = adapter / "adapter_config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{adapter}: no adapter_config.json; expected a peft adapter folder")
    base = Path(json.loads(cfg_file.read_text())["base_model_name_or_path"])
    merged = load_model(base, dtype, str(adapter), device="cpu").merge_and_unload()
    return save_model_folder(merged, base, out)


def save_model_folder(model, base: str | Path, out: str | Path) -> Path:
    """`model`'s weights and config plus everything else of the `base` folder (tokenizer, processor,
    chat template, processor module), so the result loads like the base; written beside `out`, then
    renamed over it."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in Path(base).iterdir():
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and not (tmp / f.name).exists():
            shutil.copy(f, tmp / f.name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="unime-ray export", description=" ".join(__doc__.split("\n\n")[0].split())
    )
    p.add_argument("adapter", nargs="?", help="peft adapter folder (a checkpoint's adapter/); or give --run")
    p.add_argument("out", help="output model folder (replaced)")
    p.add_argument(
        "--run",
        metavar="RUN_DIR",
        help="a finished run folder (run.output_dir, e.g. runs/tiny): its final adapter, as named by "
        "RUN_DIR/train_<kind>/_SUCCESS.json",
    )
    p.add_argument(
        "--kind", choices=KINDS, default="embed", help="with --run: which training (default embed)"
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    a = p.parse_args(argv)
    if (a.adapter is None) == (a.run is None):
        p.error("give either ADAPTER or --run RUN_DIR")
    try:
        adapter = final_weights(a.run, a.kind) if a.run else a.adapter
        print(f"wrote {export(adapter, a.out, a.dtype)}")
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
