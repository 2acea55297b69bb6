"""docs/code-map.md's import rules hold: each room of `unime_ray/` imports only the rooms the page allows
(imports inside functions included), so the stages never depend on one another and lower rooms never
on higher ones."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "unime_ray"
BASE = {"config", "io", "keyed", "data", "models"}
JOB = {"record", "runlock", "tracking"}  # what every command that writes a run folder does around its work
ALLOWED = {
    "io": set(),
    "keyed": set(),
    "record": {"io"},
    "tracking": set(),
    "runlock": {"preflight", "io"},
    "config": {"runs", "docsgen", "record"},
    "data": {"io"},
    "models": {"config", "data"},
    "assets": {"config", "data", "models"},
    "preflight": {"config", "data", "models"},
    "engine": {"config", "io", "models"},
    "mining": BASE | JOB | {"assets", "preflight", "engine", "ray_utils", "inspector"},
    "train": BASE | JOB | {"assets", "preflight", "engine", "ray_utils", "runs"},
    "eval": BASE | JOB | {"assets", "preflight", "engine", "ray_utils"},
    "runs": {"eval"},
    "inspector": {"config", "data", "io", "keyed"},
    "serve": BASE | JOB | {"assets", "preflight", "engine", "ray_utils", "inspector", "runs"},
    "ray_utils": set(),
}


def room(parts: tuple[str, ...]) -> str:
    return parts[0].removesuffix(".py")


def imports() -> dict[str, set[str]]:
    """{room: the other rooms its modules import}."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        src = room(path.relative_to(PACKAGE).parts)
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] == "unime_ray" and len(parts) > 1 and parts[1] != src:
                    found.setdefault(src, set()).add(parts[1])
    return found


def violations(found: dict[str, set[str]], allowed: dict[str, set[str]]) -> dict[str, list[str]]:
    """{room: the rooms it imports that `allowed` does not list}, rooms without a violation left out."""
    extra = {src: sorted(dst - allowed[src]) for src, dst in found.items() if src in allowed}
    return {src: rooms for src, rooms in extra.items() if rooms}


def test_rooms_import_only_what_the_code_map_allows():
    found = imports()
    assert {"mining", "serve", "engine"} <= set(found), "imports of the stages not found: the scan is broken"
    assert violations(found, ALLOWED) == {}, "imports docs/code-map.md does not allow (fix code or page)"


def test_the_check_names_an_import_the_map_forbids():
    stricter = {**ALLOWED, "mining": ALLOWED["mining"] - {"engine"}}
    assert violations(imports(), stricter) == {"mining": ["engine"]}
