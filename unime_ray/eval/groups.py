"""Which dataset counts toward which average of the paper's tables.

- MMEB (Table 1): the 36 datasets in 4 meta-tasks, 20 in-distribution (the training subsets) and 16
  out-of-distribution. Averages are over the datasets PRESENT, with their counts reported, so a subset
  of the 36 gives a correctly labelled partial table. A dataset outside the 36 (a synthetic one, a new
  benchmark) is never merged into these averages: it gets its meta-task from a user mapping and is
  summarised separately as "other".
- Image-text retrieval (Tables 2-3): Flickr30K and COCO are short-caption, ShareGPT4V and Urban1K
  long-caption (matched by name); R_Short / R_Long average Recall@1 over both directions.
- SugarCrepe: subsets `replace_*`, `swap_*`, `add_*` average into their group; R_Compos averages the
  three groups.
"""

from __future__ import annotations

from unime_ray.eval.metrics import mean_or_none

META_TASKS: dict[str, tuple[str, ...]] = {
    "Classification": (
        "ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397",
        "Place365", "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211",
    ),
    "VQA": (
        "OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA",
        "Visual7W", "ScienceQA", "VizWiz", "GQA", "TextVQA",
    ),
    "Retrieval": (
        "VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t",
        "NIGHTS", "WebQA", "FashionIQ", "Wiki-SS-NQ", "OVEN", "EDIS",
    ),
    "Grounding": ("MSCOCO", "RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing"),
}  # fmt: skip
IND: frozenset[str] = frozenset(
    {
        "ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397",
        "OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W",
        "VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t", "NIGHTS", "WebQA",
        "MSCOCO",
    }
)  # fmt: skip
MMEB: dict[str, str] = {name: task for task, names in META_TASKS.items() for name in names}
OOD: frozenset[str] = frozenset(MMEB) - IND
# Column order of Table 1 after the meta-tasks
SPLITS = ("IND", "OOD", "Overall")

RETRIEVAL_KINDS = {"flickr": "short", "coco": "short", "sharegpt4v": "long", "urban": "long"}
COMPOSITIONAL_GROUPS = ("replace", "swap", "add")


def parse_meta_tasks(entries: list[str]) -> dict[str, str]:
    """`["ShapesCLS=Classification", ...]` -> {dataset: meta-task}; a mapping for a paper dataset must
    agree with the paper's."""
    out = {}
    for entry in entries:
        name, sep, task = entry.partition("=")
        if not sep or not name.strip() or not task.strip():
            raise ValueError(f"meta-task mapping {entry!r} must look like DATASET=META_TASK")
        name, task = name.strip(), task.strip()
        if name in MMEB and MMEB[name] != task:
            raise ValueError(f"{name} is an MMEB {MMEB[name]} dataset, not {task}")
        out[name] = task
    return out


def mmeb_summary(scores: dict[str, float | None], extra: dict[str, str] | None = None) -> dict:
    """Per-dataset P@1 -> the averages of Table 1 for the paper's datasets ("mmeb": meta-tasks, IND,
    OOD, Overall, each with its dataset count) and, separately, for any other dataset ("other": its
    meta-tasks from `extra`, "unknown" without one, and Overall)."""
    extra = extra or {}
    paper = {n: s for n, s in scores.items() if n in MMEB}
    other = {n: s for n, s in scores.items() if n not in MMEB}

    def group(names: list[str], of: dict[str, float | None]) -> dict:
        return {"score": mean_or_none([of[n] for n in names]), "datasets": len(names)}

    mmeb = {task: group([n for n in paper if MMEB[n] == task], paper) for task in META_TASKS}
    mmeb["IND"] = group([n for n in paper if n in IND], paper)
    mmeb["OOD"] = group([n for n in paper if n in OOD], paper)
    mmeb["Overall"] = group(list(paper), paper)
    present = {extra.get(n, "unknown") for n in other}
    tasks = [t for t in META_TASKS if t in present] + sorted(present - set(META_TASKS))
    summary_other = {t: group([n for n in other if extra.get(n, "unknown") == t], other) for t in tasks}
    summary_other["Overall"] = group(list(other), other)
    return {"mmeb": mmeb, "other": summary_other}


def retrieval_kind(name: str) -> str:
    """'short' (Flickr30K, COCO), 'long' (ShareGPT4V, Urban1K) or 'other', by the dataset's name."""
    low = name.lower()
    return next((kind for key, kind in RETRIEVAL_KINDS.items() if key in low), "other")


def compositional_group(name: str) -> str:
    """SugarCrepe subset -> its group: 'replace_att' -> 'replace'; a name of no group is its own group."""
    head = name.split("_")[0].lower()
    return head if head in COMPOSITIONAL_GROUPS else name
