"""Side-by-side comparison of two evaluation result folders (e.g. a baseline and UniME-V2).

    unime-ray compare runs/baseline/eval runs/unime-v2/eval [--out DIR]

Writes `compare.md` (B's tables with `(+delta)` against A after every number, as the paper reports
its gains) and `compare.json` (every number both runs share: a, b, delta; and what only one run has).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from unime_ray.eval.report import markdown
from unime_ray.io import atomic_path, write_json


def flatten(tree: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves by dotted path (list items by index); None, strings and booleans are skipped."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in flatten(sub, f"{prefix}{key}.").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in flatten(sub, f"{prefix}{i}.").items()}
    if isinstance(tree, int | float) and not isinstance(tree, bool):
        return {prefix.rstrip("."): float(tree)}
    return {}


def compare(a_dir: str | Path, b_dir: str | Path, out_dir: str | Path | None = None) -> dict:
    a_dir, b_dir = Path(a_dir), Path(b_dir)
    a, b = (json.loads((d / "results.json").read_text()) for d in (a_dir, b_dir))
    fa, fb = flatten(a), flatten(b)
    report = {
        "a": str(a_dir),
        "b": str(b_dir),
        "deltas": {
            k: {"a": fa[k], "b": fb[k], "delta": fb[k] - fa[k]} for k in sorted(fa.keys() & fb.keys())
        },
        "only_a": sorted(fa.keys() - fb.keys()),
        "only_b": sorted(fb.keys() - fa.keys()),
    }
    out = Path(out_dir) if out_dir else b_dir / "compare"
    write_json(report, out / "compare.json")
    text = markdown(b, baseline=a, title=f"{b_dir} against {a_dir}")
    with atomic_path(out / "compare.md") as tmp:
        tmp.write_text(text + "\n")
    report["out"] = str(out)
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="unime-ray compare", description=__doc__.split("\n")[0])
    p.add_argument("a", help="baseline results folder (holds results.json)")
    p.add_argument("b", help="results folder compared against it")
    p.add_argument(
        "--out", default=None, help="where to write compare.md / compare.json (default: B/compare)"
    )
    args = p.parse_args(argv)
    report = compare(args.a, args.b, args.out)
    print((Path(report["out"]) / "compare.md").read_text())
    print(f"wrote {report['out']}/compare.md and compare.json")
