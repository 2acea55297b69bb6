"""The shell blocks of the docs, as a reader copies them: which ones a test runs, and the static checks
every one of them gets.

A ```bash block is marked by the HTML comment on the line before it (invisible on the code host and
in MkDocs):
  <!-- doc-test: run -->      each command runs from the repository folder after `unime-ray demo`;
                              it must exit 0, and a `# -> PATH` comment says it writes PATH
  <!-- doc-test: serve -->    the first command starts a server that runs until Ctrl-C; the others
                              are requests to it, from a second terminal, and must exit 0
  <!-- doc-test: cluster -->  commands that run on a cluster node (bare `python`, `unime-ray`)
Unmarked blocks hold placeholders (CONFIG, RUN_DIR) or need a cluster; they are checked statically:
local commands start with `.venv/bin/`, the files they name exist, their flags parse with the
command's own parser and their `--set` keys are valid config keys."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "deploy/kuberay/README.md"]
BLOCK = re.compile(
    r"(?:<!-- doc-test: (?P<mode>run|serve|cluster) -->\n)?```bash\n(?P<body>.*?)^```", re.S | re.M
)
LOCAL = ("unime-ray", "python", "ray", "serve", "pip", "mkdocs", "pytest")
REPO_DIRS = ("jobs/", "deploy/", "scripts/", "bench/", "notebooks/", "docs/", "tests/")
CLUSTER_REPO = "/home/ray/unime_ray/"  # where the KubeRay manifests put the repo in the image


@dataclass
class Block:
    page: Path
    mode: str  # run, serve, cluster, or "" (static checks only)
    commands: list[str]


def commands(body: str) -> list[str]:
    """The block's commands as the shell reads them: a line ending in a backslash or inside an open
    quote goes on; blank and comment-only lines are dropped."""
    out, buffer = [], ""
    for line in body.splitlines():
        if line.endswith("\\"):  # a continuation: the shell drops the backslash and the newline
            buffer += line[:-1]
            continue
        buffer += line + "\n"
        try:
            shlex.split(buffer, comments=True)
        except ValueError:  # a quote still open
            continue
        if buffer.strip() and not buffer.strip().startswith("#"):
            out.append(buffer.strip())
        buffer = ""
    assert not buffer.strip(), f"unterminated command: {buffer!r}"
    return out


def blocks(pages: list[Path] = PAGES) -> list[Block]:
    return [
        Block(page, m["mode"] or "", commands(m["body"]))
        for page in pages
        for m in BLOCK.finditer(page.read_text())
    ]


def bare(command: str) -> str:
    """The command without its comment, as the shell runs it."""
    return shlex.join(shlex.split(command, comments=True))


def writes(command: str) -> str | None:
    """The file a command's `# -> PATH` comment says it writes."""
    m = re.search(r"#\s*->\s*(\S+)", command)
    return m[1] if m else None


def _repo_path(token: str) -> Path | None:
    """The repository file a token names (a cluster image's copy maps back to the repo), or None."""
    token = token.removeprefix(CLUSTER_REPO)
    if token.startswith(REPO_DIRS) or token == "cluster.yaml":
        return ROOT / token
    return None


def _entry(tokens: list[str]):
    """The `main(argv)` a `unime-ray CMD` or `python jobs/X.py` command line runs, and its arguments."""
    import importlib

    from unime_ray.cli import COMMANDS

    if tokens[0] == "unime-ray":
        module, _, func = COMMANDS[tokens[1]][0].partition(":")
        return getattr(importlib.import_module(module), func or "main"), tokens[2:]
    script = _repo_path(tokens[1])
    m = re.search(r"from (unime_ray[\w.]*) import (\w+)", script.read_text())
    return getattr(importlib.import_module(m[1]), m[2]), tokens[2:]


def check_static(command: str, mode: str) -> list[str]:
    """What is wrong with one command line, statically (an empty list when nothing is)."""
    from unime_ray.config import ConfigError, load_config
    from unime_ray.docsgen import parser_of

    problems = []
    tokens = shlex.split(command, comments=True)
    parts, current = [], []
    for token in tokens + ["&&"]:
        if token == "&&":
            parts.append(current)
            current = []
        else:
            current.append(token)
    for words in parts:
        if words and words[-1] == "&":
            words = words[:-1]
        if not words:
            continue
        local = words[0].startswith(".venv/bin/")
        words[0] = words[0].removeprefix(".venv/bin/")
        if words[0] in LOCAL and not local and mode != "cluster":
            problems.append(f"`{words[0]}` without .venv/bin/ (the docs' convention)")
        if words[:3] == ["ray", "job", "submit"] and "--" in words:
            cut = words.index("--")
            problems += check_static(shlex.join(words[cut + 1 :]), "cluster")
            words = words[:cut]
        if words[:2] == ["serve", "run"] and any(w.endswith(".yaml") for w in words):
            problems.append("`serve run FILE` never exits when the deploy fails: use `unime-ray serve`")
        for word in words:
            value = word.split("=", 1)[-1]
            path = _repo_path(value)
            if path is not None and "*" not in value and not path.exists():
                problems.append(f"names {value}, which does not exist")
        is_job = (
            words[0] == "python" and len(words) > 1 and (_repo_path(words[1]) or Path()).match("jobs/*.py")
        )
        if (words[0] == "unime-ray" and len(words) > 1) or is_job:
            main, argv = _entry(words)
            try:
                args = parser_of(main).parse_args(argv)
            except SystemExit:
                problems.append(f"arguments {argv} do not parse")
                continue
            try:
                load_config(None, getattr(args, "overrides", []) or [])
            except ConfigError as e:
                problems.append(str(e))
    return problems


def scratch_repo(run: Path, into: Path) -> Path:
    """A folder laid out as the repository after `unime-ray demo`: `runs/tiny` a copy of the finished
    run `run`, `jobs/` and `.venv/bin` links to the real ones (commands read them, never write them)."""
    import shutil
    import sys

    shutil.copytree(run, into / "runs" / "tiny", symlinks=True)
    (into / "jobs").symlink_to(ROOT / "jobs")
    (into / ".venv").mkdir()
    (into / ".venv" / "bin").symlink_to(Path(sys.executable).parent)
    return into


def on_port(command: str, port: int, serve: bool = False) -> str:
    """The command with the docs' port 8000 replaced by `port` (tests never take a fixed port); a
    `unime-ray serve` line gets `--set serve.port=PORT`."""
    command = command.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    if serve:
        head, sep, comment = command.partition("#")
        command = f"{head.rstrip()} --set serve.port={port}" + (f"  {sep}{comment}" if sep else "")
    return command
