"""What `unime-ray judge-agree` reports: the typed result of one comparison, written as agree.json
(`AgreeResult.to_json`), as a Markdown table (`markdown`) and as a scatter plot of the two settings'
scores (`scatter`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from unime_ray.io import atomic_path, write_json
from unime_ray.mining.agree.cost import SettingProjection
from unime_ray.mining.agree.replay import Agreement, QueryAgreement, Rules
from unime_ray.mining.agree.sample import SampleCounts
from unime_ray.mining.agree.settings import Setting
from unime_ray.mining.agree.stats import TwoWay


@dataclass
class AgreeResult:
    """One comparison of settings A and B on a seeded sample of the run's queries."""

    seed: int
    run: str
    sample: SampleCounts
    rules: Rules
    differences: list[str]
    settings: dict[str, Setting]
    agreement: Agreement
    per_query: list[QueryAgreement]

    def to_json(self) -> dict:
        """agree.json's object."""
        return {
            "seed": self.seed,
            "run": self.run,
            "sample": asdict(self.sample),
            "rules": asdict(self.rules),
            "differences": self.differences,
            "settings": {label: s.to_json() for label, s in self.settings.items()},
            "agreement": asdict(self.agreement),
            "per_query": [asdict(r) for r in self.per_query],
        }


def write_report(result: AgreeResult, scores: pa.Table, out: Path) -> None:
    """agree.json, agree.md and scatter.png of `result` into `out`; `scores` as `scatter` takes them."""
    write_json(result.to_json(), out / "agree.json")
    with atomic_path(out / "agree.md") as tmp:
        Path(tmp).write_text(markdown(result))
    labels = (result.settings["A"].describe, result.settings["B"].describe)
    scatter(
        scores.sort_by([("query_id", "ascending"), ("rank", "ascending")]),
        result.per_query,
        labels,
        out / "scatter.png",
    )


def _fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:,.{digits}f}" if isinstance(x, float) else f"{x:,}"


def _decision_row(label: str, d: TwoWay) -> str:
    counts = " | ".join(str(c) for c in (d.both, d.a_only, d.b_only, d.neither))
    return f"| {label} | {counts} | {_fmt(d.agreement)} | {_fmt(d.kappa)} |"


TOKEN_ROWS = [
    ("prompt tokens per call", "prompt_tokens_per_call", 1),
    ("computed tokens per call", "computed_tokens_per_call", 1),
    ("image tokens per call", "image_tokens_per_call", 1),
    ("share of prompt tokens from the prefix cache", "cache_hit_rate", 3),
    ("judge busy seconds", "seconds", 1),
    ("judge calls per busy second", "calls_per_s", 1),
    ("wall seconds (model start included)", "wall_seconds", 1),
]
PROJECTION_ROWS: list[tuple[str, Callable[[SettingProjection], float | int | None], int]] = [
    ("image tokens per image", lambda p: p.image_tokens_per_image, 0),
    ("prompt tokens per call", lambda p: p.prompt_tokens_per_call, 1),
    ("share from the prefix cache", lambda p: p.cache_hit_rate, 3),
    ("computed tokens per call", lambda p: p.cost.computed_tokens_per_call, 1),
    ("H100-hours", lambda p: p.cost.gpu_hours, 1),
]


def _setting_rows(a: Setting, b: Setting) -> list[str]:
    """The per-setting table's rows: measured tokens, the replay check, the projection."""
    lines = [
        f"| {label} | {_fmt(a.tokens.get(k), d)} | {_fmt(b.tokens.get(k), d)} |" for label, k, d in TOKEN_ROWS
    ]
    checks = [x.simulated_as_measured for x in (a, b)]
    if any(checks):
        cells = [_fmt(c["cache_hit_rate"]) if c else "—" for c in checks]
        lines.append(f"| simulated prefix cache at the measured size (check) | {cells[0]} | {cells[1]} |")
    first = a.projection or b.projection
    if first:
        assumed = first.cost.assumptions
        lines.append(
            f"| **projection** to {first.cost.calls:,.0f} calls, KV blocks of {first.block_size} tokens, "
            f"{assumed.llm_params_b:g}B + {assumed.vision_params_b:g}B vision parameters | | |"
        )
        for label, value, digits in PROJECTION_ROWS:
            va, vb = (value(p) if p else None for p in (a.projection, b.projection))
            lines.append(f"| {label} | {_fmt(va, digits)} | {_fmt(vb, digits)} |")
    return lines


def _agreement_rows(s: Agreement) -> list[str]:
    """The per-query agreement table and the decision table."""
    lines = [
        "| agreement per query | median | IQR | mean | queries (undefined) |",
        "|---|---|---|---|---|",
    ]
    for label, v in [
        ("Spearman", s.spearman),
        ("Kendall tau-b", s.kendall),
        ("hard negatives, Jaccard", s.hard_negatives_jaccard),
    ]:
        iqr = f"{_fmt(v.p25)} – {_fmt(v.p75)}" if v.n else "—"
        lines.append(f"| {label} | {_fmt(v.median)} | {iqr} | {_fmt(v.mean)} | {v.n} ({v.undefined}) |")
    return lines + [
        "",
        "| decision | both | A only | B only | neither | agreement | kappa |",
        "|---|---|---|---|---|---|---|",
        _decision_row("candidate dropped as a false negative", s.false_negative_filter),
        _decision_row("query falls back (no survivor)", s.fallback),
    ]


def markdown(result: AgreeResult) -> str:
    """The comparison as Markdown: the settings, their costs side by side, then their agreement."""
    s, a, b, sample = result.agreement, result.settings["A"], result.settings["B"], result.sample
    lines = [
        "# Judge agreement",
        "",
        f"- A: {a.describe}",
        f"- B: {b.describe}",
        f"- differences: {'; '.join(result.differences) or 'none'}",
        f"- {sample.queries} queries (seed {result.seed}) of {sample.run_queries}, "
        f"{sample.calls} judge calls per setting; sampling rules: {asdict(result.rules)}",
        "",
        "| per setting | A | B |",
        "|---|---|---|",
        *_setting_rows(a, b),
        "",
        *_agreement_rows(s),
        "",
        f"Identical hard-negative sets: {s.identical_hard_negatives} of {s.queries} queries.",
    ]
    if s.queries_with_failed_calls:
        lines.append(f"Left out: {len(s.queries_with_failed_calls)} queries with a failed judge call (NaN).")
    return "\n".join(lines) + "\n"


def scatter(table: pa.Table, per_query: list[QueryAgreement], labels: tuple[str, str], path: Path) -> None:
    """B's score against A's for every judged pair: positives, candidates both settings treat alike, and
    candidates the false-negative filter drops under one setting only."""
    fig = Figure(figsize=(6.5, 6.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    a, b = table["score_a"].to_numpy(), table["score_b"].to_numpy()
    pos = table["is_positive"].to_numpy(zero_copy_only=False)
    split = {(r.query_id, c) for r in per_query for c in set(r.dropped_a) ^ set(r.dropped_b)}
    keys = zip(table["query_id"].to_pylist(), table["cand_id"].to_pylist(), strict=True)
    one = np.array([k in split for k in keys], bool)
    for mask, label, color in [
        (~pos & ~one, "candidates", "tab:gray"),
        (one, "dropped as false negative by one setting only", "tab:red"),
        (pos, "positives", "tab:green"),
    ]:
        if mask.any():
            ax.scatter(a[mask], b[mask], s=8, alpha=0.6, color=color, label=f"{label} (n={int(mask.sum())})")
    low = float(min(a.min(), b.min(), 0.0)) if len(a) else 0.0
    high = float(max(a.max(), b.max(), 1.0)) if len(a) else 1.0
    ax.plot([low, high], [low, high], color="black", linewidth=0.8, alpha=0.5)
    ax.set_xlim(low, high)
    ax.set_ylim(low, high)
    ax.set_xlabel(f"A: {labels[0]}"[:90])
    ax.set_ylabel(f"B: {labels[1]}"[:90])
    ax.set_title(f"Judge scores of {len(a)} pairs, A against B")
    ax.grid(alpha=0.3)
    if len(a):
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
