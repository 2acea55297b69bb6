"""Results of an evaluation: every number in one JSON-ready dict, and Markdown tables shaped like the
paper's (Table 1: MMEB; Table 2: retrieval and compositional; Table 3: with and without reranking).

Rendering takes an optional baseline (another run's results) and then shows each number as
`value (+delta)`, the way the paper reports UniME-V2 against UniME: the comparison of two result
folders is the same tables, not a second renderer.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from unime_ray.eval.groups import COMPOSITIONAL_GROUPS, IND, META_TASKS, MMEB, mmeb_summary
from unime_ray.eval.metrics import mean_or_none, recall_at_k
from unime_ray.eval.ranking import Collection

Ranks = dict[tuple[str, str, str], np.ndarray]  # (collection key, task, method) -> ranks
TOTALS = {**{t: len(n) for t, n in META_TASKS.items()}, "IND": len(IND), "OOD": len(MMEB) - len(IND)}
TOTALS["Overall"] = len(MMEB)
KIND_COLUMNS = {"short": "R_Short", "long": "R_Long", "other": "R_Other"}
TABLE3_COLUMNS = ("MMEB", "MMEB_Other", "R_Short", "R_Long", "R_Other", "R_Compos")
SPLITS = ("IND", "OOD", "Overall")


def build_results(
    collections: list[Collection],
    ranks: Ranks,
    methods: list[str],
    unparsed: dict[tuple[str, str], int],
    meta_tasks: dict[str, str],
    recall_ks: list[int],
) -> dict[str, Any]:
    """The per-suite numbers (in %), the paper's averages, and Table 3's columns, for every method
    ("embedding" plus each rerank mode)."""

    def at_1(c: Collection, task: str) -> dict[str, float | None]:
        return {m: recall_at_k(ranks[(c.key, task, m)], 1) for m in methods}

    def with_unparsed(entry: dict, c: Collection, task: str) -> dict:
        if (c.key, task) in unparsed:
            entry["unparsed"] = unparsed[(c.key, task)]
        return entry

    mmeb, retrieval, subsets = {}, {}, {}
    for c in collections:
        if c.suite == "mmeb":
            entry = {
                "meta_task": MMEB.get(c.name, meta_tasks.get(c.name, "unknown")),
                "group": "mmeb" if c.name in MMEB else "other",
                "split": ("IND" if c.name in IND else "OOD") if c.name in MMEB else None,
                **c.info,
                "scores": at_1(c, c.name),
            }
            mmeb[c.name] = with_unparsed(entry, c, c.name)
        elif c.suite == "retrieval":
            retrieval[c.name] = dict(c.info)
            for t in c.tasks:
                r = {m: ranks[(c.key, t.name, m)] for m in methods}
                entry = {
                    "queries": len(t.queries),
                    "scores": {m: {f"R@{k}": recall_at_k(r[m], k) for k in recall_ks} for m in methods},
                    "curve": {
                        m: [recall_at_k(r[m], k) for k in range(1, max(recall_ks) + 1)] for m in methods
                    },
                }
                retrieval[c.name][t.name] = with_unparsed(entry, c, t.name)
        else:
            subsets[c.name] = with_unparsed({**c.info, "scores": at_1(c, c.name)}, c, c.name)
    groups = {
        g: {m: mean_or_none([s["scores"][m] for s in subsets.values() if s["group"] == g]) for m in methods}
        for g in sorted({s["group"] for s in subsets.values()}, key=_group_order)
    }
    summary = {m: mmeb_summary({n: d["scores"][m] for n, d in mmeb.items()}, meta_tasks) for m in methods}
    results: dict[str, Any] = {"methods": methods}
    if mmeb:
        results["mmeb"] = {"datasets": mmeb, "summary": summary}
    if retrieval:
        results["retrieval"] = retrieval
    if subsets:
        results["compositional"] = {"subsets": subsets, "groups": groups}
    results["table3"] = {m: _table3(results, m) for m in methods}
    return results


def summary_columns(names: list[str]) -> list[str]:
    """Table 1's column order — meta-tasks, any other task, IND, OOD, Overall — whatever order a dict
    (e.g. one read back from sorted JSON) holds them in."""
    known = [c for c in META_TASKS if c in names]
    return known + sorted(set(names) - set(META_TASKS) - set(SPLITS)) + [c for c in SPLITS if c in names]


def _group_order(group: str) -> tuple[int, str]:
    """SugarCrepe's groups in the paper's order (replace, swap, add), any others after them."""
    known = list(COMPOSITIONAL_GROUPS)
    return (known.index(group) if group in known else len(known), group)


def _table3(results: dict, method: str) -> dict[str, float | None]:
    """Table 3's columns for one method: MMEB Overall, R_Short / R_Long (Recall@1 averaged over both
    directions), R_Compos (mean of the replace / swap / add groups); non-paper data in their own columns."""
    row: dict[str, float | None] = {}
    if "mmeb" in results:
        summary = results["mmeb"]["summary"][method]
        row["MMEB"] = summary["mmeb"]["Overall"]["score"]
        row["MMEB_Other"] = summary["other"]["Overall"]["score"]
    for kind, column in KIND_COLUMNS.items():
        values = [
            d[t]["scores"][method]["R@1"]
            for d in results.get("retrieval", {}).values()
            if d["kind"] == kind
            for t in ("i2t", "t2i")
        ]
        row[column] = mean_or_none(values)
    groups = results.get("compositional", {}).get("groups", {})
    row["R_Compos"] = mean_or_none([groups[g][method] for g in COMPOSITIONAL_GROUPS if g in groups])
    return row


# ---- Markdown ------------------------------------------------------------------------------------------
Path_ = tuple[str, ...]


def _get(tree: Any, path: Path_) -> Any:
    for part in path:
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _cell(value: float | None, base: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.1f} ({value - base:+.1f})" if base is not None else f"{value:.1f}"


def _table(header: list[str], rows: list[list[Any]], results: dict, baseline: dict | None) -> list[str]:
    """Rows of cells: a string is printed as is, a tuple is a path into the results (and the baseline)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        cells = [
            _cell(_get(results, c), _get(baseline, c) if baseline else None) if isinstance(c, tuple) else c
            for c in row
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _used(results: dict, paths: list[Path_]) -> bool:
    return any(_get(results, p) is not None for p in paths)


def markdown(results: dict, baseline: dict | None = None, title: str = "Evaluation results") -> str:
    methods = results["methods"]
    lines = [f"# {title}", ""]
    if baseline is not None:
        lines += ["Each number is followed by its difference to the baseline in parentheses.", ""]
    lines += [f"- {key}: {value}" for key, value in results.get("settings", {}).items()] + [""]
    if "mmeb" in results:
        lines += _mmeb_tables(results, baseline, methods)
    if "retrieval" in results or "compositional" in results:
        lines += _table2(results, baseline, methods)
    if "listwise" in methods:
        lines += _unparsed(results)
    t3 = [c for c in TABLE3_COLUMNS if _used(results, [("table3", m, c) for m in methods])]
    if t3:
        lines += ["## Table 3 — with and without reranking", ""]
        rows = [[m] + [("table3", m, c) for c in t3] for m in methods]
        lines += _table(["Method"] + t3, rows, results, baseline)
    return "\n".join(lines)


def _task_order(task: str) -> int:
    """The paper's meta-task order; other tasks after them."""
    return list(META_TASKS).index(task) if task in META_TASKS else len(META_TASKS)


def _mmeb_tables(results: dict, baseline: dict | None, methods: list[str]) -> list[str]:
    lines = []
    summary = results["mmeb"]["summary"][methods[0]]
    for group, title in (
        ("mmeb", "Table 1 — MMEB (Precision@1)"),
        ("other", "MMEB-format sets outside the 36"),
    ):
        if not summary[group]["Overall"]["datasets"]:
            continue
        # the paper's layout keeps every column (an absent meta-task shows "–"); others show what exists
        columns = summary_columns([c for c, v in summary[group].items() if group == "mmeb" or v["datasets"]])
        lines += [f"## {title}", ""]
        if group == "other":
            lines += ["Reported apart: never averaged into the paper's meta-tasks.", ""]
        header = [
            f"{c} ({summary[group][c]['datasets']}/{TOTALS[c]})"
            if group == "mmeb"
            else f"{c} ({summary[group][c]['datasets']})"
            for c in columns
        ]
        rows = [[m] + [("mmeb", "summary", m, group, c, "score") for c in columns] for m in methods]
        lines += _table(["Method"] + header, rows, results, baseline)
    datasets = results["mmeb"]["datasets"]
    order = sorted(datasets, key=lambda n: (datasets[n]["group"], _task_order(datasets[n]["meta_task"]), n))
    lines += ["### MMEB per dataset (Precision@1)", ""]
    rows = [
        [n, datasets[n]["meta_task"], datasets[n]["split"] or "other", str(datasets[n]["queries"])]
        + [("mmeb", "datasets", n, "scores", m) for m in methods]
        + ([str(datasets[n].get("unparsed", 0))] if "listwise" in methods else [])
        for n in order
    ]
    extra = ["unparsed"] if "listwise" in methods else []
    return lines + _table(
        ["Dataset", "Meta-task", "Split", "Queries"] + methods + extra, rows, results, baseline
    )


def _table2(results: dict, baseline: dict | None, methods: list[str]) -> list[str]:
    retrieval = dict(sorted(results.get("retrieval", {}).items()))
    groups = sorted(results.get("compositional", {}).get("groups", {}), key=_group_order)
    arrows = {"i2t": "i→t", "t2i": "t→i"}
    header = (
        ["Method"]
        + [f"{n} {arrows[t]}" for n in retrieval for t in arrows]
        + [g.capitalize() for g in groups]
    )

    def cells(m: str) -> list[Path_]:
        return [("retrieval", n, t, "scores", m, "R@1") for n in retrieval for t in arrows] + [
            ("compositional", "groups", g, m) for g in groups
        ]

    rows = [[m] + cells(m) for m in methods]
    lines = ["## Table 2 — retrieval (Recall@1) and compositional (accuracy)", ""]
    lines += _table(header, rows, results, baseline)
    if retrieval:
        ks = sorted(next(iter(retrieval.values()))["i2t"]["scores"][methods[0]], key=lambda k: int(k[2:]))
        lines += ["### Retrieval, full gallery", ""]
        rows = [
            [name, t, str(retrieval[name][t]["queries"]), m]
            + [("retrieval", name, t, "scores", m, k) for k in ks]
            for name in retrieval
            for t in ("i2t", "t2i")
            for m in methods
        ]
        lines += _table(["Dataset", "Direction", "Queries", "Method"] + ks, rows, results, baseline)
    subsets = results.get("compositional", {}).get("subsets", {})
    if subsets:
        lines += ["### Compositional subsets (accuracy)", ""]
        rows = [
            [n, s["group"], str(s["rows"])] + [("compositional", "subsets", n, "scores", m) for m in methods]
            for n, s in sorted(subsets.items(), key=lambda kv: (_group_order(kv[1]["group"]), kv[0]))
        ]
        lines += _table(["Subset", "Group", "Rows"] + methods, rows, results, baseline)
    return lines


def _unparsed(results: dict) -> list[str]:
    """Where listwise answers named no valid candidate (the embedding order was kept)."""
    counts = [(f"MMEB {n}", d) for n, d in results.get("mmeb", {}).get("datasets", {}).items()]
    counts += [(f"{n} {t}", d[t]) for n, d in results.get("retrieval", {}).items() for t in ("i2t", "t2i")]
    counts += [
        (f"SugarCrepe-style {n}", d) for n, d in results.get("compositional", {}).get("subsets", {}).items()
    ]
    parts = [f"{label}: {d['unparsed']}/{d.get('queries', d.get('rows'))}" for label, d in counts]
    return ["Listwise answers naming no valid candidate (embedding order kept): " + ", ".join(parts), ""]
