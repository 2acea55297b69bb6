"""Real-data worlds built from registry packages, in the synthetic world's formats and layout.

`unime-ray make-world OUT --source NAME` writes, under OUT, what `unime_ray.data.synthetic` writes for
its MMEB part: `images/{train,eval}/NNNNN.png`, `train/<Dataset>.jsonl` (MMEB-train), `eval/<Dataset>.jsonl`
(MMEB-eval, the correct target first) and `world.json`, plus `LICENSE` (the package's licence text) and
`README.md` (what was built: package, version, licence, counts, chance). The readers of
`unime_ray.data.mmeb` load these files; the extra fields (`label`, `category`, `subcategory`, and their
`qry_`/`tgt_` forms in eval rows) are ignored by them and record what makes two items a true match.

Sources (the package is fetched once with the registry's own client and cached, `fetch`):

- `fashion-mnist`: Debian `dataset-fashion-mnist` (MIT), 28x28 grey product photos in 10 classes. One
  classification dataset: image -> its class caption; eval ranks all 10 captions (chance 1/10) for
  images of the package's test split whose pixels are not those of any train image.
- `emoji`: npm `emoji-datasource-google` (MIT package; Google's images are Apache-2.0): 64x64 emoji
  with names. Image -> name and name -> image datasets, split by emoji; eval candidates are the positive
  plus N-1 distractors of OTHER categories (chance 1/N).
- `synthetic` (the default): the shapes world of `unime_ray.data.synthetic`, unchanged.

Every world is a function of the package contents and the seed: the same seed gives byte-identical
files. `oracle_scores(run_dir, world_dir)` writes the judge scores a judge that knows the labels would
give (1.0 same label, 0.0 otherwise) for a mining run's retrieved candidates.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from unime_ray.data.synthetic import CLS_QUERY, I2T_QUERY, IMAGE_TARGET, T2I_QUERY, write_truth_scores
from unime_ray.io import atomic_path, write_json

CLIENT_TOOLS = {"apt": ("apt-get", "dpkg"), "npm": ("npm",)}


class FetchError(RuntimeError):
    """A package could not be fetched: the message names the package and the command to run by hand."""


@dataclass(frozen=True)
class Package:
    """A registry package: `client` is "apt" (a Debian package) or "npm"; `keep` limits an npm archive
    to members under these prefixes (the rest is never unpacked)."""

    client: str
    name: str
    keep: tuple[str, ...] = ()

    def by_hand(self, dest: Path) -> str:
        """The shell commands that put the unpacked package where `fetch` looks for it."""
        if self.client == "apt":
            return f"apt-get download {self.name} && dpkg -x {self.name}_*.deb {dest}"
        return f"npm pack {self.name} && mkdir -p {dest} && tar -xzf {self.name}-*.tgz -C {dest}"


def cache_dir() -> Path:
    """Where fetched packages are kept: $UNIME_RAY_CACHE, else ~/.cache/unime_ray."""
    return Path(os.environ.get("UNIME_RAY_CACHE") or Path.home() / ".cache" / "unime_ray")


def fetch(package: Package, cache: str | Path | None = None) -> Path:
    """The unpacked package folder `<cache>/packages/<name>`, fetched with the registry's client on first
    use (`apt-get download` + `dpkg -x`, or `npm pack` + tar) and reused afterwards. The folder appears
    only complete (unpacked beside it, then renamed). Raises FetchError naming the package and the
    command to run by hand when the client is missing or fails."""
    dest = Path(cache or cache_dir()) / "packages" / package.name
    if dest.is_dir():
        return dest
    missing = [tool for tool in CLIENT_TOOLS[package.client] if shutil.which(tool) is None]
    if missing:
        raise FetchError(
            f"cannot fetch the {package.client} package {package.name!r}: {' and '.join(missing)} not found "
            f"on PATH. Install the client, or fetch the package by hand:\n  {package.by_hand(dest)}"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{package.name}.") as tmp:
        work, unpacked = Path(tmp), Path(tmp) / "unpacked"
        if package.client == "apt":
            _run(package, ["apt-get", "download", package.name], work, dest)
            _run(package, ["dpkg", "-x", str(_one(work, "*.deb", package)), str(unpacked)], work, dest)
        else:
            _run(package, ["npm", "pack", package.name], work, dest)
            with tarfile.open(_one(work, "*.tgz", package)) as archive:
                members = [m for m in archive.getmembers() if m.name.startswith(package.keep)]
                archive.extractall(unpacked, members=members, filter="data")
        os.replace(unpacked, dest)
    return dest


def _run(package: Package, command: list[str], cwd: Path, dest: Path) -> None:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip()[-800:]
        raise FetchError(
            f"fetching the {package.client} package {package.name!r}: `{' '.join(command)}` failed "
            f"(exit {done.returncode}): {tail}\nFetch it by hand:\n  {package.by_hand(dest)}"
        )


def _one(folder: Path, pattern: str, package: Package) -> Path:
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        raise FetchError(f"fetching {package.name!r}: expected one {pattern} in {folder}, found {len(found)}")
    return found[0]


@dataclass
class Item:
    """One image and its text. `label` says what makes two items a true match (same class, same name)."""

    png: bytes
    text: str
    label: str
    category: str = ""
    subcategory: str = ""

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.png).hexdigest()

    def meta(self) -> dict[str, str]:
        return {"label": self.label, "category": self.category, "subcategory": self.subcategory}


@dataclass
class Built:
    """A source's world before writing: items, rows per dataset, and what the README states."""

    train: list[Item]
    eval: list[Item]
    train_rows: dict[str, list[dict]]
    eval_rows: dict[str, list[dict]]
    meta_tasks: dict[str, str]
    candidates: int
    licence: str
    licence_text: str
    version: str
    notes: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)


def retrieval_world(
    prefix: str,
    train: list[Item],
    held_out: list[Item],
    rows: dict[str, list[dict]],
    n_candidates: int,
    **rest,
) -> Built:
    """An open-vocabulary world of two datasets, `<prefix>I2T` (image -> its text) and `<prefix>T2I` (text ->
    its image), from its train items and its eval rows (`retrieval_eval`); `rest`: the README's fields."""
    return Built(
        train=train,
        eval=held_out,
        train_rows={f"{prefix}I2T": i2t_train(train, I2T_QUERY), f"{prefix}T2I": t2i_train(train)},
        eval_rows={f"{prefix}I2T": rows["I2T"], f"{prefix}T2I": rows["T2I"]},
        meta_tasks={f"{prefix}I2T": "Retrieval", f"{prefix}T2I": "Retrieval"},
        candidates=n_candidates,
        **rest,
    )


def png_bytes(image: Image.Image) -> bytes:
    """The PNG encoding of `image`: PIL's encoder is deterministic, so equal pixels give equal bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _paths(split: str, n: int) -> list[str]:
    return [f"{split}/{i:05d}.png" for i in range(n)]


def _train_row(qry: str, qry_image: str, pos_text: str, pos_image: str, item: Item) -> dict[str, str]:
    row = {"qry": qry, "qry_image_path": qry_image, "pos_text": pos_text, "pos_image_path": pos_image}
    return row | item.meta()


def _eval_row(
    qry: str, qry_image: str, tgt_text: list[str], tgt_image: list[str], query: Item, targets: list[Item]
) -> dict[str, Any]:
    row = {"qry_text": qry, "qry_img_path": qry_image, "tgt_text": tgt_text, "tgt_img_path": tgt_image}
    row |= {f"qry_{key}": value for key, value in query.meta().items()}
    return row | {
        f"tgt_{key}": [t.meta()[key] for t in targets] for key in ("label", "category", "subcategory")
    }


def i2t_train(items: list[Item], query: str) -> list[dict]:
    """Image -> text pairs: the query is the image with `query`'s instruction, the positive its text."""
    return [
        _train_row(query, p, it.text, "", it)
        for it, p in zip(items, _paths("train", len(items)), strict=True)
    ]


def t2i_train(items: list[Item]) -> list[dict]:
    """Text -> image pairs: the query is the instruction plus the text, the positive the image."""
    paths = _paths("train", len(items))
    return [
        _train_row(T2I_QUERY + it.text, "", IMAGE_TARGET, p, it) for it, p in zip(items, paths, strict=True)
    ]


def other_category(rng: np.random.Generator, items: list[Item], i: int, k: int) -> list[int]:
    """k distinct indices of `items` whose category differs from item i's, drawn with `rng`: none of them
    can be a true match of item i, so with the positive the chance of ranking it first is 1/(k+1)."""
    others = [j for j, it in enumerate(items) if it.category != items[i].category]
    if len(others) < k:
        raise ValueError(
            f"item {i} ({items[i].text!r}) has {len(others)} items of other categories, needs {k}"
        )
    return [others[j] for j in rng.choice(len(others), size=k, replace=False)]


def retrieval_eval(rng: np.random.Generator, items: list[Item], k: int) -> dict[str, list[dict]]:
    """Image -> text and text -> image eval rows over `items`, each with the positive first and k
    distractors of other categories (`other_category`)."""
    paths = _paths("eval", len(items))
    i2t, t2i = [], []
    for i, (item, path) in enumerate(zip(items, paths, strict=True)):
        picked = [i] + other_category(rng, items, i, k)
        targets = [items[j] for j in picked]
        i2t.append(_eval_row(I2T_QUERY, path, [t.text for t in targets], [""] * (k + 1), item, targets))
        picked = [i] + other_category(rng, items, i, k)
        targets = [items[j] for j in picked]
        images = [paths[j] for j in picked]
        t2i.append(_eval_row(T2I_QUERY + item.text, "", [IMAGE_TARGET] * (k + 1), images, item, targets))
    return {"I2T": i2t, "T2I": t2i}


def dedupe(items: list[Item]) -> tuple[list[Item], Counter]:
    """`items` without any whose text or image bytes an earlier item already has (so a text or an image
    can never be on both sides of a split), and the counts of what was dropped, by reason."""
    texts, digests, kept, dropped = set(), set(), [], Counter()
    for item in items:
        if item.text in texts:
            dropped["duplicate_text"] += 1
        elif item.digest in digests:
            dropped["duplicate_image"] += 1
        else:
            kept.append(item)
            texts.add(item.text)
            digests.add(item.digest)
    return kept, dropped


# --- Fashion-MNIST ---------------------------------------------------------------------------------

FASHION = Package("apt", "dataset-fashion-mnist")
FASHION_DIR = "usr/share/datasets/fashion-mnist"
FASHION_DOC = "usr/share/doc/dataset-fashion-mnist"
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"
)  # fmt: skip
FASHION_CAPTIONS = tuple(
    f"a photo of {noun}"
    for noun in (
        "a T-shirt or top", "a pair of trousers", "a pullover", "a dress", "a coat",
        "a sandal", "a shirt", "a sneaker", "a bag", "an ankle boot",
    )
)  # fmt: skip


def read_idx(path: Path) -> np.ndarray:
    """An array of unsigned bytes in the IDX format of (Fashion-)MNIST, gzipped: magic 0x0000 0x08 NDIM,
    then NDIM big-endian 32-bit sizes, then the data."""
    data = gzip.decompress(Path(path).read_bytes())
    if data[:3] != b"\0\0\x08":
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (magic {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, the file holds {array.size} bytes of data")
    return array.reshape(shape)


def _fashion_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    base = root / FASHION_DIR
    images, labels = (
        read_idx(base / f"{split}-images-idx3-ubyte.gz"),
        read_idx(base / f"{split}-labels-idx1-ubyte.gz"),
    )
    if len(images) != len(labels) or labels.max() >= len(FASHION_CLASSES):
        raise ValueError(
            f"{base}: {split} has {len(images)} images and {len(labels)} labels (max {labels.max()})"
        )
    return images, labels


def _fashion_item(pixels: np.ndarray, label: int) -> Item:
    name = FASHION_CLASSES[label]
    return Item(png_bytes(Image.fromarray(pixels, "L")), FASHION_CAPTIONS[label], name, name)


def _debian_version(changelog: Path) -> str:
    """The package version on the first line of a Debian changelog: `name (VERSION) dist; urgency=...`."""
    first = gzip.decompress(changelog.read_bytes()).decode().split("\n", 1)[0]
    return first.partition("(")[2].partition(")")[0] or first


def build_fashion(
    root: Path, rng: np.random.Generator, train_size: int, eval_size: int, n_candidates: int
) -> Built:
    """Train: `train_size` images of the package's train split, drawn with `rng`. Eval: `eval_size` of its
    test split whose PNG bytes are not those of a train image (counted when skipped), each ranking all 10
    class captions, the own first, the others in `rng` order."""
    if n_candidates != len(FASHION_CLASSES):
        raise ValueError(f"fashion-mnist ranks all {len(FASHION_CLASSES)} classes: n_candidates must be 10")
    x_train, y_train = _fashion_split(root, "train")
    x_test, y_test = _fashion_split(root, "t10k")
    if not (0 < train_size <= len(x_train) and 0 < eval_size <= len(x_test)):
        raise ValueError(f"train_size must be in 1..{len(x_train)} and eval_size in 1..{len(x_test)}")
    train = [
        _fashion_item(x_train[i], y_train[i]) for i in rng.choice(len(x_train), train_size, replace=False)
    ]
    seen, held_out, skipped = {it.digest for it in train}, [], Counter()
    for i in rng.permutation(len(x_test)):
        if len(held_out) == eval_size:
            break
        item = _fashion_item(x_test[i], y_test[i])
        if item.digest in seen:
            skipped["eval_image_equal_to_a_train_image"] += 1
        else:
            held_out.append(item)
    classes = [Item(b"", c, n, n) for c, n in zip(FASHION_CAPTIONS, FASHION_CLASSES, strict=True)]
    rows = []
    for item, path in zip(held_out, _paths("eval", len(held_out)), strict=True):
        own = FASHION_CLASSES.index(item.label)
        others = [j for j in rng.permutation(len(classes)) if j != own]
        targets = [classes[own]] + [classes[j] for j in others]
        rows.append(_eval_row(CLS_QUERY, path, [t.text for t in targets], [""] * len(targets), item, targets))
    doc = root / FASHION_DOC
    return Built(
        train=train,
        eval=held_out,
        train_rows={"FashionMNIST": i2t_train(train, CLS_QUERY)},
        eval_rows={"FashionMNIST": rows},
        meta_tasks={"FashionMNIST": "Classification"},
        candidates=len(classes),
        licence="MIT (Expat), Copyright 2017 Zalando SE",
        licence_text=(doc / "copyright").read_text(),
        version=_debian_version(doc / "changelog.Debian.gz"),
        notes=[
            "A class-label task: the 10 class captions repeat across rows (every image of a class has the "
            "same positive text), so 'eval texts never in train' cannot hold here; eval IMAGES are never "
            "train images (compared by PNG bytes).",
            "Candidates: all 10 class captions for every eval image.",
        ],
        skipped=dict(skipped),
    )


# --- Emoji -----------------------------------------------------------------------------------------

EMOJI_IMAGES = "package/img/google/64/"
EMOJI = Package(
    "npm",
    "emoji-datasource-google",
    keep=("package/emoji.json", "package/package.json", "package/LICENSE", "package/README.md", EMOJI_IMAGES),
)
# Not emoji of things: the skin-tone swatches and hair styles that combine with people emoji.
EMOJI_SKIPPED_CATEGORIES = ("Component",)


def on_white(image: Image.Image, size: int | None = None) -> bytes:
    """`image` centred on a white square of side `size` (default: its own size, when square), as RGB PNG
    bytes: transparent pixels would otherwise read as black once converted to RGB."""
    rgba = image.convert("RGBA")
    side = size or max(rgba.size)
    white = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    white.alpha_composite(rgba, ((side - rgba.width) // 2, (side - rgba.height) // 2))
    return png_bytes(white.convert("RGB"))


def _emoji_png(path: Path) -> bytes:
    with Image.open(path) as image:
        return on_white(image)


def emoji_items(root: Path) -> tuple[list[Item], Counter]:
    """One item per base emoji of `emoji.json` in its sort order (text and label: the lowercased name),
    without skin-tone variants, components, emoji with no Google image, and repeated names or images;
    each skip counted by reason."""
    package = root / "package"
    entries = sorted(json.loads((package / "emoji.json").read_text()), key=lambda e: e["sort_order"])
    items, skipped = [], Counter()
    for entry in entries:
        skipped["skin_tone_variant"] += len(entry.get("skin_variations") or {})
        image = root / EMOJI_IMAGES / entry["image"]
        if entry["category"] in EMOJI_SKIPPED_CATEGORIES:
            skipped[f"category_{entry['category'].lower()}"] += 1
        elif not entry.get("has_img_google") or not image.is_file():
            skipped["no_google_image"] += 1
        elif not entry.get("name"):
            skipped["no_name"] += 1
        else:
            name = entry["name"].lower()
            items.append(Item(_emoji_png(image), name, name, entry["category"], entry["subcategory"]))
    kept, dropped = dedupe(items)
    return kept, skipped + dropped


def build_emoji(
    root: Path, rng: np.random.Generator, train_size: int, eval_size: int | None, n_candidates: int
) -> Built:
    """Split the emoji (`emoji_items`: no name and no image twice) with `rng`: `train_size` for train
    (image -> name and name -> image pairs), the rest (at most `eval_size`) for eval, where each row
    ranks its positive among `n_candidates - 1` distractors of other categories (`retrieval_eval`)."""
    items, skipped = emoji_items(root)
    if not 0 < train_size < len(items) or n_candidates < 2:
        raise ValueError(
            f"emoji: train_size must be in 1..{len(items) - 1} ({len(items)} emoji), got {train_size}; "
            f"n_candidates must be at least 2, got {n_candidates}"
        )
    order = rng.permutation(len(items))
    train = [items[i] for i in order[:train_size]]
    held_out = [items[i] for i in order[train_size:]][:eval_size]
    package = root / "package"
    return retrieval_world(
        "Emoji",
        train,
        held_out,
        retrieval_eval(rng, held_out, n_candidates - 1),
        n_candidates,
        licence="MIT (the package and emoji.json, Copyright 2013 Cal Henderson); the Google/Noto emoji "
        "images are Apache-2.0, as the package's README states",
        licence_text=(package / "LICENSE").read_text()
        + "\nThe images (img/google) are Google's Noto emoji, under the Apache License 2.0 "
        "(the package's README: 'Android/Google/Noto images, are available under the Apache License 2.0').\n",
        version=json.loads((package / "package.json").read_text())["version"],
        notes=[
            "Split by emoji: no eval image and no eval name appears in train (names and images are unique "
            "across the whole world; repeats are dropped and counted).",
            f"Each eval row: the positive plus {n_candidates - 1} distractors drawn from eval emoji of OTHER "
            f"categories (seeded), so none is a true match and chance is exactly 1/{n_candidates}.",
            "Texts are the emoji names, lowercased ('grinning face', 'andorra flag').",
        ],
        skipped=dict(skipped),
    )


# --- Openclipart -----------------------------------------------------------------------------------

OPENCLIPART = Package("apt", "openclipart-svg")
OPENCLIPART_DIR = "usr/share/openclipart/svg"
SVG_NS = {"dc": "http://purl.org/dc/elements/1.1/", "cc": "http://web.resource.org/cc/"}


def svg_title(path: Path) -> str:
    """The clip's title (`cc:Work/dc:title` of its RDF metadata), stripped; "" when it has none or the
    file is not XML. Parsed with defusedxml: no entity expansion, no external fetches."""
    from defusedxml import ElementTree

    try:
        element = ElementTree.parse(path).getroot().find(".//cc:Work/dc:title", SVG_NS)
    except Exception:
        return ""
    return " ".join((element.text or "").split()) if element is not None else ""


def render_svg(path: Path, size: int) -> bytes | None:
    """The SVG rendered by cairosvg to `size` px on its longer side, centred on a white `size` square
    (RGB PNG), or None when it fails to render."""
    import cairosvg

    try:
        png = cairosvg.svg2png(url=str(path), output_width=size)
        with Image.open(io.BytesIO(png)) as image:
            if image.height > image.width:
                png = cairosvg.svg2png(url=str(path), output_height=size)
                image = Image.open(io.BytesIO(png))
            return on_white(image, size)
    except Exception:
        return None


def openclipart_clips(root: Path) -> tuple[list[tuple[Path, str]], Counter]:
    """(file, title) of every clip with a title no other clip has (compared case-insensitively; shared
    titles are mostly collection names such as "Lemon SVG theme"), in path order; links (the package's
    second names of a file), untitled and shared-title clips counted by reason."""
    base = root / OPENCLIPART_DIR
    files = sorted(base.rglob("*.svg"))
    skipped = Counter(symlink_to_another_clip=sum(p.is_symlink() for p in files))
    titled = []
    for rel, title in _titles(root, [p for p in files if not p.is_symlink()]).items():
        if title:
            titled.append((base / rel, title))
        else:
            skipped["no_title"] += 1
    counts = Counter(title.casefold() for _, title in titled)
    skipped["title_shared_with_another_clip"] = sum(n for n in counts.values() if n > 1)
    return [(p, t) for p, t in titled if counts[t.casefold()] == 1], skipped


def _titles(root: Path, files: list[Path]) -> dict[str, str]:
    """{path under the SVG folder: title} of `files`, read once per unpacked package and kept in its
    `.titles.json` (parsing every SVG of the package is slow: docs/benchmarks.md; the package never
    changes in place)."""
    index = root / ".titles.json"
    base = root / OPENCLIPART_DIR
    rels = [str(p.relative_to(base)) for p in files]
    titles = json.loads(index.read_text()) if index.is_file() else {}
    if set(titles) != set(rels):
        titles = {rel: svg_title(base / rel) for rel in rels}
        write_json(titles, index)
    return {rel: titles[rel] for rel in rels}


def render_items(root: Path, clips: list[tuple[Path, str]], need: int, size: int) -> tuple[list[Item], int]:
    """The first `need` clips of `clips` that render (in that order, two processes), and how many failed."""
    from concurrent.futures import ProcessPoolExecutor

    base, items, failed, start = root / OPENCLIPART_DIR, [], 0, 0
    with ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        while len(items) < need and start < len(clips):
            chunk = clips[start : start + need - len(items)]
            start += len(chunk)
            for (path, title), png in zip(
                chunk, pool.map(render_svg, [p for p, _ in chunk], [size] * len(chunk)), strict=True
            ):
                if png is None:
                    failed += 1
                    continue
                folder = path.parent.relative_to(base).parts
                items.append(
                    Item(png, title, title.casefold(), folder[0] if folder else "", "/".join(folder[1:]))
                )
    return items, failed


def build_openclipart(
    root: Path, rng: np.random.Generator, train_size: int, eval_size: int, n_candidates: int
) -> Built:
    """Clips with a unique title (`openclipart_clips`), shuffled with `rng`, rendered at 96 px until
    `train_size` + `eval_size` rendered (failures counted, never dropped silently); then split and
    evaluated as the emoji world (`retrieval_eval`: distractors of other top-level folders)."""
    clips, skipped = openclipart_clips(root)
    if train_size < 1 or eval_size < n_candidates or n_candidates < 2:
        raise ValueError("openclipart: need train_size >= 1 and eval_size >= n_candidates >= 2")
    order = rng.permutation(len(clips))
    items, failed = render_items(root, [clips[i] for i in order], train_size + eval_size, 96)
    items, dropped = dedupe(items)
    skipped.update(dropped)
    skipped["failed_to_render"] = failed
    if len(items) < train_size + eval_size:
        raise ValueError(
            f"openclipart: only {len(items)} clips rendered to distinct images ({failed} failed), "
            f"asked for {train_size} + {eval_size}: lower --train-size or --eval-size"
        )
    train, held_out = items[:train_size], items[train_size:]
    doc = root / "usr/share/doc/openclipart-svg"
    return retrieval_world(
        "Clipart",
        train,
        held_out,
        retrieval_eval(rng, held_out, n_candidates - 1),
        n_candidates,
        licence="public domain (Creative Commons Public Domain Dedication, the Open Clip Art Library)",
        licence_text=(doc / "copyright").read_text(),
        version=_debian_version(doc / "changelog.Debian.gz"),
        notes=[
            "Texts are the clips' titles as their authors wrote them (some Italian, some not describing "
            "the picture); clips whose title another clip shares, untitled clips and clips cairosvg cannot "
            "render are skipped and counted above.",
            f"Each eval row: the positive plus {n_candidates - 1} distractors drawn from eval clips of OTHER "
            f"top-level folders (seeded); chance 1/{n_candidates}.",
        ],
        skipped=dict(skipped),
    )


# --- Writing a world -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    package: Package
    build: Callable[[Path, np.random.Generator, int, int, int], Built]
    train_size: int
    eval_size: int | None  # None: every item left after train


SOURCES = {
    "fashion-mnist": Source(FASHION, build_fashion, train_size=3000, eval_size=1000),
    "emoji": Source(EMOJI, build_emoji, train_size=1500, eval_size=None),
    "openclipart": Source(OPENCLIPART, build_openclipart, train_size=1800, eval_size=450),
}


def _write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _write_jsonl(rows: list[dict], path: Path) -> None:
    _write_bytes(path, "".join(json.dumps(row) + "\n" for row in rows).encode())


def make_real_world(
    out_dir: str | Path,
    source: str,
    seed: int = 0,
    train_size: int | None = None,
    eval_size: int | None = None,
    n_candidates: int = 10,
    cache: str | Path | None = None,
) -> dict[str, Any]:
    """Fetch `source`'s package (cached), write its world under `out_dir` and return the manifest (also
    `out_dir/world.json`). The same package and arguments always give byte-identical files."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; known: synthetic, {', '.join(SOURCES)}")
    spec = SOURCES[source]
    root = fetch(spec.package, cache)
    train_size = spec.train_size if train_size is None else train_size
    eval_size = spec.eval_size if eval_size is None else eval_size
    built = spec.build(root, np.random.default_rng(seed), train_size, eval_size, n_candidates)
    out = Path(out_dir)
    for split, items in (("train", built.train), ("eval", built.eval)):
        for item, path in zip(items, _paths(split, len(items)), strict=True):
            _write_bytes(out / "images" / path, item.png)
    datasets = {}
    for name, meta_task in built.meta_tasks.items():
        datasets[name] = {
            "meta_task": meta_task,
            "train": f"train/{name}.jsonl",
            "eval": f"eval/{name}.jsonl",
            "rows_train": len(built.train_rows[name]),
            "rows_eval": len(built.eval_rows[name]),
            "candidates": built.candidates,
            "chance": 1 / built.candidates,
        }
        _write_jsonl(built.train_rows[name], out / datasets[name]["train"])
        _write_jsonl(built.eval_rows[name], out / datasets[name]["eval"])
    splits = [
        (it, path)
        for s, its in (("train", built.train), ("eval", built.eval))
        for it, path in zip(its, _paths(s, len(its)), strict=True)
    ]
    manifest = {
        "source": source,
        "package": {"client": spec.package.client, "name": spec.package.name, "version": built.version},
        "licence": built.licence,
        "seed": seed,
        "n_train": len(built.train),
        "n_eval": len(built.eval),
        "n_candidates": built.candidates,
        "image_root": "images",
        "datasets": datasets,
        "skipped": built.skipped,
        "items": {path: it.meta() | {"text": it.text} for it, path in splits},
        "texts": {it.text: it.label for it, _ in splits},
    }
    write_json(manifest, out / "world.json")
    _write_bytes(out / "LICENSE", built.licence_text.encode())
    _write_bytes(out / "README.md", readme(manifest, built.notes).encode())
    return manifest


def readme(manifest: dict[str, Any], notes: list[str]) -> str:
    """The README a world carries: where it came from, its licence, what it holds and its chance level."""
    pkg = manifest["package"]
    fetch_cmd = "apt-get download" if pkg["client"] == "apt" else "npm pack"
    lines = [
        f"# The {manifest['source']} world",
        "",
        f"Built by `unime-ray make-world OUT --source {manifest['source']} --seed {manifest['seed']}` "
        f"from the {pkg['client']} package `{pkg['name']}` ({pkg['version']}), fetched with "
        f"`{fetch_cmd} {pkg['name']}`.",
        "",
        f"Licence: {manifest['licence']}. The package's licence text is in `LICENSE`.",
        "",
        f"{manifest['n_train']} train images, {manifest['n_eval']} eval images (`images/`); eval images "
        "never appear in train.",
        "",
        "| dataset | meta-task | train rows | eval rows | candidates per eval row | chance (P@1) |",
        "|---|---|---|---|---|---|",
    ]
    for name, d in manifest["datasets"].items():
        lines.append(
            f"| {name} | {d['meta_task']} | {d['rows_train']} | {d['rows_eval']} | {d['candidates']} | "
            f"{d['chance']:.1%} (1/{d['candidates']}) |"
        )
    skipped = ", ".join(f"{reason}: {n}" for reason, n in sorted(manifest["skipped"].items())) or "none"
    lines += ["", f"Skipped items (counted, never dropped silently): {skipped}.", ""]
    return "\n".join(lines + [f"- {note}" for note in notes]) + "\n"


def world_truth(world: dict[str, Any]) -> Callable[[str, dict[str, str], dict[str, str]], bool]:
    """`true_of(dataset, query, cand)` for a real world (`world.json`): the two sides ({"text", "image"}
    each) carry the same label, an image through `items`, a text (with a text->image instruction
    stripped) through `texts`."""
    items, texts = world["items"], world["texts"]

    def label(side: dict[str, str]) -> str | None:
        if side["image"]:
            return items[side["image"]]["label"]
        return texts.get(side["text"].removeprefix(T2I_QUERY))

    def true_of(dataset: str, query: dict[str, str], cand: dict[str, str]) -> bool:
        own = label(query)
        return own is not None and own == label(cand)

    return true_of


def oracle_scores(run_dir: str | Path, world_dir: str | Path) -> Path:
    """Write `run_dir/oracle.parquet`: the judge scores a judge that knows the labels would give to every
    candidate the mining run in `run_dir` retrieved (1.0 same label, 0.0 otherwise; each positive 1.0),
    for `--set judge.backend=precomputed --set judge.scores_path=run_dir/oracle.parquet`. Run it after
    `unime-ray mine ... --until retrieve`."""
    run = Path(run_dir)
    candidates = sorted((run / "mining/retrieve").glob("*.parquet"))
    if not candidates:
        raise FileNotFoundError(
            f"{run}/mining/retrieve: no candidate files; run `unime-ray mine --until retrieve`"
        )
    world = json.loads((Path(world_dir) / "world.json").read_text())
    return write_truth_scores(world_truth(world), candidates, run / "mining/ingest", run / "oracle.parquet")


def main(argv: list[str] | None = None) -> None:
    """`unime-ray make-world`: the synthetic shapes world (default) or a real-data one (`--source`)."""
    from unime_ray.data import synthetic

    parser = argparse.ArgumentParser(
        prog="unime-ray make-world",
        description="Write a world in MMEB train/eval formats: the synthetic shapes (default) or real data "
        "from a registry package (--source).",
    )
    parser.add_argument("out_dir", help="folder to write into (created if missing)")
    parser.add_argument("--source", choices=["synthetic", *SOURCES], default="synthetic")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--n-candidates",
        type=int,
        default=None,
        help="targets per eval row (chance 1/N; 8 synthetic, 10 real)",
    )
    synth = parser.add_argument_group("synthetic world")
    synth.add_argument("--n-train", type=int, default=48, help="train rows per dataset")
    synth.add_argument("--n-eval", type=int, default=24, help="eval rows per dataset")
    synth.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    real = parser.add_argument_group("real-data world")
    real.add_argument("--train-size", type=int, default=None, help="train images (default: per source)")
    real.add_argument("--eval-size", type=int, default=None, help="eval images (default: per source)")
    real.add_argument(
        "--cache-dir", default=None, help="package cache (default: $UNIME_RAY_CACHE or ~/.cache/unime_ray)"
    )
    args = parser.parse_args(argv)
    if args.source == "synthetic":
        n = args.n_candidates or 8
        manifest = synthetic.make_world(
            args.out_dir, args.seed, args.n_train, args.n_eval, n, args.image_size
        )
        print(
            f"wrote {args.out_dir}: {len(manifest['scenes'])} images, {len(synthetic.DATASETS)} datasets "
            f"({args.n_train} train / {args.n_eval} eval rows each), compositional "
            f"{'/'.join(synthetic.COMPOSITIONAL)}, retrieval captions, seed {args.seed}"
        )
        return
    try:
        manifest = make_real_world(
            args.out_dir,
            args.source,
            args.seed,
            args.train_size,
            args.eval_size,
            args.n_candidates or 10,
            args.cache_dir,
        )
    except (FetchError, ValueError) as error:
        raise SystemExit(f"[make-world] {error}") from None
    counts = ", ".join(f"{n} {d['rows_train']}/{d['rows_eval']}" for n, d in manifest["datasets"].items())
    print(
        f"wrote {args.out_dir}: {manifest['n_train']} train + {manifest['n_eval']} eval images of "
        f"{manifest['package']['name']} ({manifest['licence']}); train/eval rows: {counts}; "
        f"chance 1/{manifest['n_candidates']}; seed {args.seed}"
    )


if __name__ == "__main__":
    main()
