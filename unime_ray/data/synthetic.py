"""A small, deterministic multimodal world for demos and tests, in the formats of the real benchmarks.

Each scene is a white square PNG with one or two filled shapes: shape in {circle, square, triangle},
colour in six saturated colours, position in {left, right, top, bottom} (the shape sits in the middle
of that half; two shapes are always left+right or top+bottom, with different shapes and colours so
questions like "What colour is the circle?" have one answer). Captions are plain English
("a red circle on the left and a blue square on the right"). Train and eval scenes are disjoint.

`make_world` writes, under one folder: MMEB-train and MMEB-eval files for four datasets
(classification, VQA, image->text and text->image retrieval), SugarCrepe-like compositional pairs
(replace / swap / add), Karpathy-style retrieval captions, and `world.json`, a manifest that also holds
every image's true scene so captions can be checked against pixels.

    unime-ray make-world OUT_DIR --seed 0
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from unime_ray.io import atomic_path, write_json

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (230, 25, 25),
    "green": (30, 170, 50),
    "blue": (30, 80, 230),
    "yellow": (245, 210, 20),
    "purple": (140, 40, 190),
    "orange": (250, 130, 10),
}
POSITIONS = ("left", "right", "top", "bottom")
# Two-shape scenes use opposite halves, so the shapes never overlap and each is where its caption says.
LAYOUTS = (("left", "right"), ("top", "bottom"))
PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
# Centre of each position's half of the image, as fractions of the side (x, y).
CENTRES = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75)}
LABELS = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]

# Prompts as in MMEB (Phi-3.5-V image token), so MMEB readers and prompt rewriting see familiar text.
IMAGE_TOKEN = "<|image_1|>"
CLS_QUERY = f"{IMAGE_TOKEN}\nRepresent the given image for classification"
VQA_QUERY = f"{IMAGE_TOKEN}\nRepresent the given image with the following question: "
I2T_QUERY = f"{IMAGE_TOKEN}\nFind an image caption describing the given everyday image."
T2I_QUERY = "Find me an everyday image that matches the given caption: "
IMAGE_TARGET = f"{IMAGE_TOKEN}\nRepresent the given image."
DATASETS = {
    "ShapesCLS": "Classification",
    "ShapesVQA": "VQA",
    "ShapesI2T": "Retrieval",
    "ShapesT2I": "Retrieval",
}

# VQA question kinds and every answer each kind can have (the vocabularies are disjoint).
ANSWERS = {"colour": list(COLOURS), "shape": list(SHAPES), "position": list(POSITIONS), "object": LABELS}
COMPOSITIONAL = ("replace", "swap", "add")

Scene = list[dict[str, str]]  # objects {"shape", "colour", "position"}, the left or top one first


def _obj(shape: str, colour: str, position: str) -> dict[str, str]:
    return {"shape": shape, "colour": colour, "position": position}


def _all_scenes() -> tuple[list[Scene], list[Scene]]:
    """Every one-shape scene (72) and every two-shape scene (360), in a fixed order."""
    singles = [[_obj(s, c, p)] for p in POSITIONS for s in SHAPES for c in COLOURS]
    doubles = [
        [_obj(s1, c1, p1), _obj(s2, c2, p2)]
        for p1, p2 in LAYOUTS
        for s1 in SHAPES
        for s2 in SHAPES
        if s2 != s1
        for c1 in COLOURS
        for c2 in COLOURS
        if c2 != c1
    ]
    return singles, doubles


def _shuffled(rng: np.random.Generator, items: list) -> list:
    return [items[i] for i in rng.permutation(len(items))]


def _split_scenes(rng: np.random.Generator, n_train: int, n_eval: int) -> tuple[list[Scene], list[Scene]]:
    """Draw disjoint train and eval scenes, a third of each split with one shape and the rest with two
    (swap pairs need two shapes). Captions are one-to-one with scenes, so no eval caption is a train one.

    No eval two-shape scene contains an eval one-shape scene: otherwise the one-shape caption would also
    be true of the two-shape image, and retrieval distractors drawn from other eval scenes could be right.
    """
    singles, doubles = _all_scenes()
    singles, doubles = _shuffled(rng, singles), _shuffled(rng, doubles)
    single_train, single_eval = n_train // 3, n_eval // 3
    double_train, double_eval = n_train - single_train, n_eval - single_eval
    train = singles[:single_train] + doubles[:double_train]
    held_out = singles[single_train : single_train + single_eval]
    taken = [o for scene in held_out for o in scene]
    held_out += [s for s in doubles[double_train:] if not any(o in taken for o in s)][:double_eval]
    if len(train) < n_train or len(held_out) < n_eval:
        raise ValueError(
            f"n_train={n_train} + n_eval={n_eval} needs more distinct scenes than the world has "
            f"({len(singles)} with one shape, {len(doubles)} with two)"
        )
    return _shuffled(rng, train), _shuffled(rng, held_out)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _label(obj: dict[str, str]) -> str:
    """The classification label of an object, also the answer to "What is on the left?": "red circle"."""
    return f"{obj['colour']} {obj['shape']}"


def _noun(obj: dict[str, str]) -> str:
    return f"{_article(obj['colour'])} {obj['colour']} {obj['shape']}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(scene: Scene) -> str:
    """The canonical caption: 'a red circle on the left and a blue square on the right'."""
    return _join([f"{_noun(o)} {PHRASES[o['position']]}" for o in scene])


def paraphrases(scene: Scene) -> list[str]:
    """Three true captions of one scene with different word order and wording."""
    return [
        caption(scene),
        " and ".join(f"{PHRASES[o['position']]} there is {_noun(o)}" for o in scene),
        "an image showing " + caption(scene[::-1]),
    ]


def render(scene: Scene, size: int) -> Image.Image:
    """Draw the scene without anti-aliasing, so every shape pixel has exactly its colour's RGB."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    r = round(size * 0.18)  # half the shape's extent: fits in a half of the image with a margin
    for o in scene:
        fx, fy = CENTRES[o["position"]]
        cx, cy = round(fx * size), round(fy * size)
        fill = COLOURS[o["colour"]]
        if o["shape"] == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif o["shape"] == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


def _sample(rng: np.random.Generator, pool: list[str], k: int) -> list[str]:
    return [pool[i] for i in rng.choice(len(pool), size=k, replace=False)]


def _question(rng: np.random.Generator, scene: Scene) -> tuple[str, str, str]:
    """A question about one object of the scene: (kind, question, short answer)."""
    o = scene[rng.integers(len(scene))]
    kind = list(ANSWERS)[rng.integers(len(ANSWERS))]
    if kind == "colour":
        return kind, f"What colour is the {o['shape']}?", o["colour"]
    if kind == "shape":
        return kind, f"What shape is the {o['colour']} object?", o["shape"]
    if kind == "position":
        return kind, f"Where is the {o['colour']} {o['shape']}?", o["position"]
    return kind, f"What is {PHRASES[o['position']]}?", _label(o)


def _vqa_distractors(rng: np.random.Generator, kind: str, answer: str, k: int) -> list[str]:
    """Wrong answers of the same kind first; kinds with few answers (3 shapes) are topped up from others."""
    same = [a for a in ANSWERS[kind] if a != answer]
    rest = [a for other, answers in ANSWERS.items() if other != kind for a in answers]
    n_same = min(k, len(same))
    return _sample(rng, same, n_same) + _sample(rng, rest, k - n_same)


def _train_row(qry: str, qry_image: str, pos_text: str, pos_image: str) -> dict[str, str]:
    return {"qry": qry, "qry_image_path": qry_image, "pos_text": pos_text, "pos_image_path": pos_image}


def _eval_row(qry: str, qry_image: str, tgt_text: list[str], tgt_image: list[str]) -> dict[str, Any]:
    return {"qry_text": qry, "qry_img_path": qry_image, "tgt_text": tgt_text, "tgt_img_path": tgt_image}


def _train_rows(rng: np.random.Generator, scenes: list[Scene], paths: list[str]) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {name: [] for name in DATASETS}
    for scene, path in zip(scenes, paths, strict=True):
        first = scene[0]
        _, question, answer = _question(rng, scene)
        rows["ShapesCLS"].append(_train_row(CLS_QUERY, path, _label(first), ""))
        rows["ShapesVQA"].append(_train_row(VQA_QUERY + question, path, answer, ""))
        rows["ShapesI2T"].append(_train_row(I2T_QUERY, path, caption(scene), ""))
        rows["ShapesT2I"].append(_train_row(T2I_QUERY + caption(scene), "", IMAGE_TARGET, path))
    return rows


def _eval_rows(
    rng: np.random.Generator, scenes: list[Scene], paths: list[str], n_candidates: int
) -> dict[str, list[dict]]:
    k = n_candidates - 1  # distractors per row; the correct target is always at index 0
    captions = [caption(s) for s in scenes]
    no_images = [""] * n_candidates
    rows: dict[str, list[dict]] = {name: [] for name in DATASETS}
    for i, (scene, path) in enumerate(zip(scenes, paths, strict=True)):
        # the second object's label is not a distractor: it is in the image too
        present = [_label(o) for o in scene]
        labels = present[:1] + _sample(rng, [x for x in LABELS if x not in present], k)
        rows["ShapesCLS"].append(_eval_row(CLS_QUERY, path, labels, no_images))

        kind, question, answer = _question(rng, scene)
        answers = [answer] + _vqa_distractors(rng, kind, answer, k)
        rows["ShapesVQA"].append(_eval_row(VQA_QUERY + question, path, answers, no_images))

        others = [j for j in range(len(scenes)) if j != i]
        picked = [i] + [others[j] for j in rng.choice(len(others), size=k, replace=False)]
        rows["ShapesI2T"].append(_eval_row(I2T_QUERY, path, [captions[j] for j in picked], no_images))
        picked = [i] + [others[j] for j in rng.choice(len(others), size=k, replace=False)]
        rows["ShapesT2I"].append(
            _eval_row(T2I_QUERY + captions[i], "", [IMAGE_TARGET] * n_candidates, [paths[j] for j in picked])
        )
    return rows


def _compositional_rows(
    rng: np.random.Generator, scenes: list[Scene], paths: list[str], n_rows: int
) -> dict[str, list[dict]]:
    """SugarCrepe-like (image, true caption, caption with one change) triples on eval images."""
    replace, add = [], []
    for scene, path in zip(scenes, paths, strict=True):
        # replace: one colour or shape of one object becomes another value of that attribute
        neg = [dict(o) for o in scene]
        target = neg[rng.integers(len(neg))]
        attribute = ("colour", "shape")[rng.integers(2)]
        values = list(COLOURS) if attribute == "colour" else list(SHAPES)
        target[attribute] = _sample(rng, [v for v in values if v != target[attribute]], 1)[0]
        replace.append({"image": path, "pos": caption(scene), "neg": caption(neg)})

        # add: an object whose colour+shape is not in the image, in a free position
        present = {(o["colour"], o["shape"]) for o in scene}
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        colour, shape = absent[rng.integers(len(absent))]
        free = [p for p in POSITIONS if p not in {o["position"] for o in scene}]
        extra = _obj(shape, colour, free[rng.integers(len(free))])
        add.append({"image": path, "pos": caption(scene), "neg": caption(scene + [extra])})

    # swap: colours or shapes exchanged between the two objects; several rows may share an image
    pairs = [(i, a) for i, s in enumerate(scenes) if len(s) == 2 for a in ("colour", "shape")]
    swap = []
    for index in sorted(rng.choice(len(pairs), size=n_rows, replace=False)):
        i, attribute = pairs[index]
        first, second = (dict(o) for o in scenes[i])
        first[attribute], second[attribute] = second[attribute], first[attribute]
        swap.append({"image": paths[i], "pos": caption(scenes[i]), "neg": caption([first, second])})
    return {"replace": replace, "swap": swap, "add": add}


def _write_jsonl(rows: list[dict], path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _write_png(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def make_world(
    out_dir: str | Path,
    seed: int = 0,
    n_train: int = 48,
    n_eval: int = 24,
    n_candidates: int = 8,
    image_size: int = 64,
) -> dict[str, Any]:
    """Write the synthetic world under `out_dir` and return its manifest (also `out_dir/world.json`).

    The same arguments always give byte-identical files. Image paths in every record are relative to
    `out_dir/images`; record files are relative to `out_dir`.
    """
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
    if n_train < 1 or n_eval < 1:
        raise ValueError(f"n_train and n_eval must be at least 1, got {n_train} and {n_eval}")
    # Distractors come from the other eval scenes (retrieval) and from the 18 labels minus the up to two
    # in the image (classification).
    max_candidates = min(n_eval, len(LABELS) - 1)
    if not 2 <= n_candidates <= max_candidates:
        raise ValueError(f"n_candidates must be between 2 and {max_candidates}, got {n_candidates}")
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    train_scenes, eval_scenes = _split_scenes(rng, n_train, n_eval)
    train_paths = [f"train/{i:05d}.png" for i in range(n_train)]
    eval_paths = [f"eval/{i:05d}.png" for i in range(n_eval)]
    for scene, path in zip(train_scenes + eval_scenes, train_paths + eval_paths, strict=True):
        _write_png(render(scene, image_size), out / "images" / path)

    train_rows = _train_rows(rng, train_scenes, train_paths)
    eval_rows = _eval_rows(rng, eval_scenes, eval_paths, n_candidates)
    datasets = {}
    for name, meta_task in DATASETS.items():
        datasets[name] = {
            "meta_task": meta_task,
            "train": f"train/{name}.jsonl",
            "eval": f"eval/{name}.jsonl",
            "rows_train": n_train,
            "rows_eval": n_eval,
        }
        _write_jsonl(train_rows[name], out / datasets[name]["train"])
        _write_jsonl(eval_rows[name], out / datasets[name]["eval"])

    compositional = {kind: f"compositional/{kind}.jsonl" for kind in COMPOSITIONAL}
    for kind, rows in _compositional_rows(rng, eval_scenes, eval_paths, n_eval).items():
        _write_jsonl(rows, out / compositional[kind])

    retrieval = "retrieval/captions.jsonl"
    captions = [
        {"image": p, "captions": paraphrases(s)} for s, p in zip(eval_scenes, eval_paths, strict=True)
    ]
    _write_jsonl(captions, out / retrieval)

    manifest = {
        "seed": seed,
        "n_train": n_train,
        "n_eval": n_eval,
        "n_candidates": n_candidates,
        "image_size": image_size,
        "image_root": "images",
        "datasets": datasets,
        "compositional": compositional,
        "retrieval": retrieval,
        "scenes": dict(zip(train_paths + eval_paths, train_scenes + eval_scenes, strict=True)),
    }
    write_json(manifest, out / "world.json")
    return manifest


def _objects(scene: Scene) -> set[tuple[str, str, str]]:
    return {(o["colour"], o["shape"], o["position"]) for o in scene}


def oracle_truth(world: dict[str, Any]) -> Callable[[str, dict[str, str], dict[str, str]], bool]:
    """`true_of(dataset, query, cand)`: whether candidate `cand` meets `query` ({"text", "image"} each) in
    this world, as a judge that sees the scenes would say. `world` is the manifest (`world.json`), whose
    `scenes` map image paths to objects; captions are one-to-one with scenes.

    - classification: the label names ANY object in the image (the positive names the first one);
    - image -> caption, caption -> image: every object the caption names is in the image, so a one-shape
      caption is true of a two-shape image that contains its object;
    - VQA: a question has one right answer, which is the positive itself, so no other candidate is true.
    """
    scenes = world["scenes"]
    by_caption = {caption(scene): scene for scene in scenes.values()}

    def true_of(dataset: str, query: dict[str, str], cand: dict[str, str]) -> bool:
        if dataset == "ShapesCLS":
            return cand["text"] in {_label(o) for o in scenes[query["image"]]}
        if dataset == "ShapesI2T":
            named = by_caption.get(cand["text"])
            return named is not None and _objects(named) <= _objects(scenes[query["image"]])
        if dataset == "ShapesT2I":
            named = by_caption[query["text"].removeprefix(T2I_QUERY)]
            return _objects(named) <= _objects(scenes[cand["image"]])
        if dataset == "ShapesVQA":
            return False
        raise ValueError(f"{dataset!r} is not a dataset of the synthetic world ({', '.join(DATASETS)})")

    return true_of


def write_oracle_scores(candidate_files: list[Path], ingest_dir: Path, world: Path, out: str | Path) -> Path:
    """A stand-in for a capable judge on this world, where a random-weight tiny judge knows nothing:
    score 1.0 for each query's own positive and for every retrieved candidate that is TRUE of the query
    (`oracle_truth`: the other object's label, a caption of part of the image), 0.0 for the rest. The
    mining's false-negative filter then drops the true ones, as it would with a real judge (scored 0,
    they would be trained on as negatives: docs/experiment-log.md). Input: the mining run's
    `retrieve/*.parquet`, its ingest folder (QUERIES and POOL) and the world's `world.json`; feed the
    output to the judge stage with `judge.backend=precomputed`."""
    true_of = oracle_truth(json.loads(Path(world).read_text()))
    return write_truth_scores(true_of, candidate_files, ingest_dir, out)


def write_truth_scores(
    true_of: Callable[[str, dict[str, str], dict[str, str]], bool],
    candidate_files: list[Path],
    ingest_dir: Path,
    out: str | Path,
) -> Path:
    """The judge score file (`query_id, cand_id, score`, what `judge.backend=precomputed` reads) of a
    judge that knows the truth: 1.0 for each query's own positive and for every retrieved candidate of
    `candidate_files` (the run's `retrieve/*.parquet`) that `true_of(dataset, query, cand)` holds, 0.0 for
    the rest. Queries and candidates are the ingest folder's QUERIES and POOL rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from unime_ray.io import write_parquet

    queries = {r["id"]: r for r in pq.read_table(Path(ingest_dir) / "queries.parquet").to_pylist()}
    pool = {r["id"]: r for r in pq.read_table(Path(ingest_dir) / "pool.parquet").to_pylist()}
    cands = pa.concat_tables([pq.read_table(p, columns=["query_id", "cand_id"]) for p in candidate_files])
    scores = [
        float(true_of(queries[q]["dataset"], queries[q], pool[c]))
        for q, c in zip(cands["query_id"].to_pylist(), cands["cand_id"].to_pylist(), strict=True)
    ]
    pos = pa.table({"query_id": list(queries), "cand_id": [r["pos_id"] for r in queries.values()]})
    table = pa.concat_tables([pos, cands]).append_column(
        "score", pa.array([1.0] * pos.num_rows + scores, pa.float32())
    )
    return write_parquet(table, out)
