"""Readers for MMEB-style data: training pairs (`read_pairs`) and evaluation queries (`read_eval`), one
file or a folder of files (`read_folder`), into the PAIRS and EVAL tables of `unime_ray.data.schemas`.

Formats: `.parquet`, `.jsonl` (one JSON object per line, blank lines ignored) and `.json` (a JSON list of
objects). Nothing is unpickled; JSON is parsed only with the `json` module.

- Train records: `qry`, `qry_image_path`, `pos_text`, `pos_image_path`; optional `neg_text`,
  `neg_image_path`, `id`, `dataset`.
- Eval records: `qry_text`, `qry_img_path`, `tgt_text` (list), `tgt_img_path` (list), the correct target
  first; optional `id`, `dataset`.

A row's dataset is the `dataset` argument, else the record's own `dataset`, else the file stem (in a
folder: always the file stem). Its id is the record's `id` as a string, else `<dataset>/<row>`, where row
is the 0-based record index in the file, so ids are stable across runs.

Error policy. A file that cannot be read as a whole raises `DataError` naming the file, the row (`line N`,
1-based, for JSONL; `row N`, 0-based, otherwise) and the field: invalid JSON, a record that is not an
object, a missing required field, a field of the wrong type. Nulls in optional fields read as "".
A readable row whose data is unusable is never dropped silently: it goes to the quarantine table
(QUARANTINE schema) with the first offending field and one reason:
`bad_image_path` (absolute, unless allowed, or escaping the image root with `..`),
`image_outside_root` (inside the root by name, but a symlink on the way leads out of it),
`missing_image` (no file at image_root/path), `corrupt_image` (PIL cannot open and verify it; only
with `check_images`),
`empty_query` / `empty_positive` (no image and blank text; `empty_positive` also for any eval target),
`length_mismatch` (eval: no targets, or `tgt_text` and `tgt_img_path` differ in length),
`duplicate_id` (an id already seen earlier in the same read).
"""

from __future__ import annotations

import itertools
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from unime_ray.data.images import open_image
from unime_ray.data.schemas import EVAL, PAIRS, QUARANTINE, DataError
from unime_ray.io import write_parquet

DATA_SUFFIXES = (".parquet", ".jsonl", ".json")
MAX_LINE_BYTES = 16 << 20  # a JSONL record longer than this is refused (records hold paths and texts)

Problem = tuple[str, str]  # (field, reason)
IMAGE_PROBLEMS = {  # each image quarantine reason, said in words
    "bad_image_path": "leaves the image root ('..'; or absolute, allowed by data.allow_absolute_images=true)",
    "image_outside_root": "a symlink on its way leads out of the image root",
    "missing_image": "no such file",
    "corrupt_image": "not an image PIL can open",
}


@dataclass
class ReadResult:
    table: pa.Table
    quarantine: pa.Table

    def counts(self) -> dict[str, int]:
        """Rows read, rows kept, and the number of quarantined rows per reason."""
        rows_out = self.table.num_rows
        counts = {"rows_in": rows_out + self.quarantine.num_rows, "rows_out": rows_out}
        counts.update(Counter(self.quarantine.column("reason").to_pylist()))
        return counts

    def write_quarantine(self, path: str | Path) -> Path:
        return write_parquet(self.quarantine, path)

    @classmethod
    def concat(cls, results: list[ReadResult]) -> ReadResult:
        """One result holding the kept and the quarantined rows of all `results`, in order."""
        return cls(
            pa.concat_tables([r.table for r in results]), pa.concat_tables([r.quarantine for r in results])
        )


class ReadState:
    """What one read shares across its rows and files: seen ids and the per-path image verdicts.

    Share one instance across every file of a read (as `read_folder` does) so ids are unique across
    them and each image path is checked once. `image_root` is the folder image paths are relative to;
    with `check_images`, an existing image must also open and verify with PIL. A path that leaves the
    root (`..`, a symlink pointing out) is refused before anything is opened, so a data file cannot
    make the tools read other files of the machine; absolute paths only with `allow_absolute`.
    """

    def __init__(self, image_root: str | Path, check_images: bool, allow_absolute: bool = False) -> None:
        self.image_root = Path(image_root)
        self.check_images = check_images
        self.allow_absolute = allow_absolute
        self.seen_ids: set[str] = set()
        self.image_problems: dict[str, str | None] = {}

    def image_problem(self, rel: str) -> str | None:
        """The quarantine reason of image path `rel` (`bad_image_path`, `missing_image`,
        `corrupt_image`), or None when it is usable; computed once per path and cached."""
        if rel not in self.image_problems:
            self.image_problems[rel] = self._find_image_problem(rel)
        return self.image_problems[rel]

    def require_image(self, rel: str, where: str, field: str = "image") -> None:
        """For files read whole (retrieval and compositional eval), where a bad row fails the file: the
        same checks as `image_problem`, a problem raised as a DataError naming the row and the field."""
        problem = self.image_problem(rel)
        if problem is not None:
            raise DataError(
                f"{where}: field {field!r}: {rel!r} under {self.image_root}: {IMAGE_PROBLEMS[problem]}"
            )

    def _find_image_problem(self, rel: str) -> str | None:
        if Path(rel).is_absolute():
            if not self.allow_absolute:
                return "bad_image_path"
        elif os.path.normpath(rel).split(os.sep)[0] == "..":
            return "bad_image_path"
        elif not (self.image_root / rel).resolve().is_relative_to(self.image_root.resolve()):
            return "image_outside_root"
        full = self.image_root / rel
        if not full.is_file():
            return "missing_image"
        if self.check_images:
            try:
                with open_image(full) as image:
                    image.verify()
            except Exception:
                return "corrupt_image"
        return None


def read_pairs(
    path: str | Path, *, dataset: str | None = None, image_root: str | Path = "", check_images: bool = True
) -> ReadResult:
    """Read one MMEB-train style file into a PAIRS table plus its quarantine."""
    return read_file(Path(path), "pairs", dataset, ReadState(image_root, check_images))


def read_eval(
    path: str | Path, *, dataset: str | None = None, image_root: str | Path = "", check_images: bool = True
) -> ReadResult:
    """Read one MMEB-eval style file into an EVAL table plus its quarantine."""
    return read_file(Path(path), "eval", dataset, ReadState(image_root, check_images))


def read_folder(
    folder: str | Path,
    kind: Literal["pairs", "eval"],
    *,
    datasets: list[str] | None = None,
    image_root: str | Path = "",
    check_images: bool = True,
    allow_absolute_images: bool = False,
) -> ReadResult:
    """Read every data file of `folder`, one dataset per file named by its stem (`datasets`: a subset).

    Ids must be unique across the whole folder; generated ids contain the dataset, so only explicit ids
    can collide. Absolute image paths are quarantined unless `allow_absolute_images`.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be 'pairs' or 'eval', got {kind!r}")
    files = data_files(folder, datasets)
    state = ReadState(image_root, check_images, allow_absolute_images)
    return ReadResult.concat([read_file(path, kind, name, state) for name, path in files.items()])


def data_files(folder: str | Path, datasets: list[str] | None = None) -> dict[str, Path]:
    """{dataset: file} of the data files of `folder` (a dataset per file, named by its stem), in
    `datasets` order when given (a subset), else sorted; an unknown name or an empty folder is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix in DATA_SUFFIXES and path.is_file():
            if path.stem in files:
                raise DataError(
                    f"{folder}: dataset {path.stem!r} has two files: {files[path.stem].name}, {path.name}"
                )
            files[path.stem] = path
    if not files:
        raise DataError(f"{folder}: no data files ({', '.join('*' + s for s in DATA_SUFFIXES)})")
    selected = list(files) if datasets is None else list(dict.fromkeys(datasets))
    unknown = [name for name in selected if name not in files]
    if unknown or not selected:
        raise DataError(f"{folder}: unknown or no datasets {unknown}; available: {', '.join(files)}")
    return {name: files[name] for name in selected}


def read_file(path: Path, kind: str, dataset: str | None, state: ReadState) -> ReadResult:
    """One file of `kind` ("pairs" | "eval") read with a shared `state` (see `ReadState`)."""
    schema, parse, find_problem = _KINDS[kind]
    # Parse the whole file first: a file-level error raises before any (slow) image check.
    rows = [parse(record, where) for where, record in load_records(path)]
    kept, quarantined = [], []
    for index, row in enumerate(rows):
        row["dataset"] = dataset or row["dataset"] or path.stem
        row["id"] = row["id"] or f"{row['dataset']}/{index}"
        problem = ("id", "duplicate_id") if row["id"] in state.seen_ids else find_problem(row, state)
        state.seen_ids.add(row["id"])
        if problem is None:
            kept.append(row)
        else:
            field, reason = problem
            quarantined.append(
                {"source": str(path), "row": index, "id": row["id"], "field": field, "reason": reason}
            )
    return ReadResult(
        pa.Table.from_pylist(kept, schema=schema), pa.Table.from_pylist(quarantined, schema=QUARANTINE)
    )


def load_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """The records of one `.parquet`, `.jsonl` or `.json` file, in file order, each paired with its
    location for error messages (`<file>: line N`, 1-based, for JSONL; `<file>: row N`, 0-based,
    otherwise).

    Raises `DataError` for an unsupported suffix, an unreadable or non-UTF-8 file, invalid JSON, a
    `.json` document that is not a list, or a record that is not an object.
    """
    try:
        if path.suffix == ".parquet":
            items = [(f"{path}: row {i}", item) for i, item in enumerate(pq.read_table(path).to_pylist())]
        elif path.suffix == ".jsonl":
            items = [(where, parse_json(line, where)) for where, line in jsonl_lines(path) if line.strip()]
        elif path.suffix == ".json":
            document = parse_json(path.read_text(encoding="utf-8"), str(path))
            if not isinstance(document, list):
                raise DataError(f"{path}: expected a JSON list of objects, got {_type_name(document)}")
            items = [(f"{path}: row {i}", item) for i, item in enumerate(document)]
        else:
            raise DataError(f"{path}: unsupported file type (expected one of {', '.join(DATA_SUFFIXES)})")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error})") from error
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: cannot read ({error})") from error
    for where, item in items:
        if not isinstance(item, dict):
            raise DataError(f"{where}: expected a JSON object, got {_type_name(item)}")
    return items


def jsonl_lines(path: Path, max_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[str, str]]:
    """(`<file>: line N`, text) of each line of a JSONL file, decoded one line at a time: a line that
    is not UTF-8 raises DataError naming it, and so does a line longer than `max_bytes`, found after
    reading at most `max_bytes` of it (a 100 MB line, or a binary file without newlines, never sits in
    memory whole)."""
    with path.open("rb") as f:
        for number in itertools.count(1):
            line = f.readline(max_bytes + 1)
            if not line:
                return
            where = f"{path}: line {number}"
            if len(line) > max_bytes:
                raise DataError(f"{where}: longer than {max_bytes} bytes; not a JSONL record of this format")
            try:
                yield where, line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{where}: not UTF-8 text ({error})") from error


def parse_json(text: str, where: str) -> Any:
    """`json.loads(text)`, raising DataError naming `where` (file, line) on invalid JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: invalid JSON ({error})") from error


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def string(record: dict[str, Any], field: str, where: str, *, required: bool) -> str:
    """`record[field]` as a string. A missing or null optional field reads as ""; a missing required
    field, a null required field or a non-string value raises `DataError` naming `where` and `field`."""
    if field not in record and required:
        raise DataError(f"{where}: missing required field {field!r}")
    value = record.get(field)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {_type_name(value)}")
    return value


def strings(record: dict[str, Any], field: str, where: str) -> list[str]:
    """`record[field]`, a required list of strings (possibly empty); a missing field or any other value
    raises `DataError` naming `where` and `field`."""
    if field not in record:
        raise DataError(f"{where}: missing required field {field!r}")
    value = record[field]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise DataError(f"{where}: field {field!r} must be a list of strings, got {_type_name(value)}")
    return value


def _id(record: dict[str, Any], where: str) -> str:
    """The record's own id as a string, "" when it has none."""
    value = record.get("id")
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise DataError(f"{where}: field 'id' must be a string or an integer, got {_type_name(value)}")
    return str(value)


def _parse_pair(record: dict[str, Any], where: str) -> dict[str, Any]:
    return {
        "id": _id(record, where),
        "dataset": string(record, "dataset", where, required=False),
        "qry_text": string(record, "qry", where, required=True),
        "qry_image": string(record, "qry_image_path", where, required=True),
        "pos_text": string(record, "pos_text", where, required=True),
        "pos_image": string(record, "pos_image_path", where, required=True),
        "neg_text": string(record, "neg_text", where, required=False),
        "neg_image": string(record, "neg_image_path", where, required=False),
    }


def _parse_eval(record: dict[str, Any], where: str) -> dict[str, Any]:
    return {
        "id": _id(record, where),
        "dataset": string(record, "dataset", where, required=False),
        "qry_text": string(record, "qry_text", where, required=True),
        "qry_image": string(record, "qry_img_path", where, required=True),
        "tgt_text": strings(record, "tgt_text", where),
        "tgt_image": strings(record, "tgt_img_path", where),
    }


def _side_problem(
    state: ReadState, text: str, text_field: str, image: str, image_field: str, empty_reason: str | None
) -> Problem | None:
    """The problem of one side (query, positive, negative, target): its image first, then emptiness."""
    if image:
        reason = state.image_problem(image)
        if reason is not None:
            return image_field, reason
    elif empty_reason is not None and not text.strip():
        return text_field, empty_reason
    return None


def _pair_problem(row: dict[str, Any], state: ReadState) -> Problem | None:
    return (
        _side_problem(state, row["qry_text"], "qry", row["qry_image"], "qry_image_path", "empty_query")
        or _side_problem(
            state, row["pos_text"], "pos_text", row["pos_image"], "pos_image_path", "empty_positive"
        )
        or _side_problem(state, row["neg_text"], "neg_text", row["neg_image"], "neg_image_path", None)
    )


def _eval_problem(row: dict[str, Any], state: ReadState) -> Problem | None:
    problem = _side_problem(
        state, row["qry_text"], "qry_text", row["qry_image"], "qry_img_path", "empty_query"
    )
    if problem is not None:
        return problem
    if not row["tgt_text"] or len(row["tgt_text"]) != len(row["tgt_image"]):
        return "tgt_text", "length_mismatch"
    for i, (text, image) in enumerate(zip(row["tgt_text"], row["tgt_image"], strict=True)):
        problem = _side_problem(state, text, f"tgt_text[{i}]", image, f"tgt_img_path[{i}]", "empty_positive")
        if problem is not None:
            return problem
    return None


_KINDS: dict[str, tuple[pa.Schema, Callable[..., dict[str, Any]], Callable[..., Problem | None]]] = {
    "pairs": (PAIRS, _parse_pair, _pair_problem),
    "eval": (EVAL, _parse_eval, _eval_problem),
}
