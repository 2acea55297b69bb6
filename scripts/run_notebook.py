"""Regenerate the committed outputs of notebooks/quickstart.ipynb: run it from scratch in its own kernel
(nbclient, as tests/test_notebook.py does) with the parameters it holds, and write it back executed, so a
reader on a code host sees its tables and plots.

    .venv/bin/python scripts/run_notebook.py            # ~10 minutes on 2 CPU cores; writes the notebook

The run's outputs go to the notebook's OUT (runs/quickstart, relative to the repository root, so no
machine path shows in the outputs). A run already there is refused: the notebook would reuse its finished
stages and show "done earlier, skipped" instead of the stages running; move it away first. The notebook
is written only when every cell ran without an error, atomically, and only after a check that no output
names an absolute path of this machine (the repository, the home or a temporary folder).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from unime_ray.io import atomic_path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks/quickstart.ipynb"
OUT = ROOT / "runs/quickstart"  # the notebook's own OUT
LIMIT_BYTES = 1_000_000


def machine_paths(nb: nbformat.NotebookNode) -> list[str]:
    """Every absolute path of this machine (the repository, home, temporary folders, /work, /root) named
    in the notebook's outputs: each as "cell N: ...path...", empty when there is none."""
    roots = {str(ROOT), str(Path.home()), tempfile.gettempdir(), "/tmp", "/work", "/root"}
    pattern = re.compile("|".join(re.escape(r) + r"(?=[/'\"\s,)]|$)" for r in sorted(roots, key=len)))
    found = []
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            text = out.get("text", "") + "".join(
                v for k, v in out.get("data", {}).items() if k.startswith("text/") and isinstance(v, str)
            )
            found += [
                f"cell {i}: ...{text[max(0, m.start() - 40) : m.end() + 40]}..."
                for m in pattern.finditer(text)
            ]
    return found


def execute(nb: nbformat.NotebookNode, folder: Path = NOTEBOOK.parent) -> None:
    """Clear the notebook's outputs, then execute it top to bottom in a new kernel started in `folder` (as
    Jupyter starts it), its outputs in place; raises nbclient's CellExecutionError at the first cell
    that fails."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = NotebookClient(
        nb,
        timeout=1800,
        startup_timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(folder)}},
    )
    client.execute()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.parse_args(argv)
    if OUT.exists():
        sys.exit(f"{OUT.relative_to(ROOT)} exists: move it away first (the notebook would reuse its stages)")
    os.environ.pop("RAY_ADDRESS", None)  # the kernel starts its own local Ray, joins none
    nb = nbformat.read(NOTEBOOK, as_version=4)
    execute(nb)
    found = machine_paths(nb)
    if found:
        rejected = OUT / "executed.ipynb"  # to look at; runs/ is not committed
        nbformat.write(nb, rejected)
        sys.exit(
            f"the outputs name machine paths, not written (see {rejected.relative_to(ROOT)}):\n"
            + "\n".join(found)
        )
    text = nbformat.writes(nb)
    if len(text.encode()) > LIMIT_BYTES:
        sys.exit(f"the executed notebook is {len(text.encode())} bytes (limit {LIMIT_BYTES}), not written")
    with atomic_path(NOTEBOOK) as tmp:
        tmp.write_text(text, encoding="utf-8")
    print(f"wrote {NOTEBOOK.relative_to(ROOT)} ({len(text.encode()) / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
