"""What a runner returns (per-op records + separately measured end-to-end latency), and the
per-op and summary tables built from it. Column meanings: latency_tables/README.md."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mobilehv.profile.attribution import Scope, categorise
from mobilehv.taxonomy import CATEGORIES

OP_COLUMNS = ("model", "runtime", "layout", "op_index", "op_name", "op_type", "module_path",
              "module_class", "category", "output_shape", "median_us", "share_pct", "measure")
KEY = ("model", "runtime", "layout")


@dataclass
class OpRecord:
    """One op of one run: `samples_us` are its times over the repeats (one value for estimates)."""

    op_name: str
    op_type: str
    scopes: tuple[Scope, ...]  # root first; empty = no module known
    output_shape: str
    samples_us: list[float]
    measure: str = "measured"  # or "estimated" (Core ML compute plan)

    @property
    def median_us(self) -> float:
        return float(np.median(self.samples_us)) if self.samples_us else 0.0


@dataclass
class RunResult:
    """Output of one runner on one (model, layout): ops plus whole-model latencies in ms."""

    model: str
    runtime: str
    layout: str
    resolution: int
    ops: list[OpRecord]
    e2e_ms: list[float]
    method: str  # one line: how per-op times were obtained
    artifact: str = ""
    extra: dict = field(default_factory=dict)


def ops_frame(run: RunResult):
    import pandas as pd

    rows = []
    total = sum(op.median_us for op in run.ops) or 1.0
    for i, op in enumerate(run.ops):
        inner = op.scopes[-1] if op.scopes else None
        rows.append({
            "model": run.model, "runtime": run.runtime, "layout": run.layout, "op_index": i,
            "op_name": op.op_name, "op_type": op.op_type,
            "module_path": inner.path if inner else None,
            "module_class": inner.short_cls if inner else None,
            "category": categorise(op.op_type, op.scopes),
            "output_shape": op.output_shape, "median_us": round(op.median_us, 3),
            "share_pct": round(100 * op.median_us / total, 3), "measure": op.measure,
        })
    return pd.DataFrame(rows, columns=list(OP_COLUMNS))


def per_repeat_us(run: RunResult) -> np.ndarray:
    """(ops, repeats): every op's time in each repeat. ORT and torch time all ops within the same
    runs; LiteRT times each op alone, so its k-th timings are paired; an op with one value (a
    Core ML estimate) has it in every repeat."""
    repeats = max((len(op.samples_us) for op in run.ops), default=1)
    rows = []
    for op in run.ops:
        if len(op.samples_us) not in (repeats, 0, 1):
            raise ValueError(f"{run.model}: op {op.op_name} has {len(op.samples_us)} times, expected {repeats}")
        rows.append(op.samples_us if len(op.samples_us) == repeats else [op.median_us] * repeats)
    return np.asarray(rows, dtype=float).reshape(len(run.ops), repeats)


def summary_row(run: RunResult, ops, *, machine: str, threads: int, warmup: int, repeats: int) -> dict:
    """One summary row: e2e (median, p10, p90), the sum of ops next to it, category ms and %.

    A category's ms is the median over repeats of its total in a repeat, and the sum of ops adds
    those up. Per-op medians would add up lower: op times are skewed to the right (a cache miss,
    an interrupt), so an op's median sits below its mean. On Mobile-Former-26M's 873 ORT nodes
    that is 6% of the whole model, and every model measured came out lower.
    """
    e2e = np.asarray(run.e2e_ms, dtype=float)
    times = per_repeat_us(run)
    by_cat = {cat: float(np.median(times[(ops["category"] == cat).to_numpy()].sum(axis=0))) / 1000
              for cat in CATEGORIES}
    ops_ms = sum(by_cat.values())
    median = float(np.median(e2e))
    attributed = ops.loc[ops["module_class"].notna(), "median_us"].sum() / max(ops["median_us"].sum(), 1e-9)
    other = sorted(set(ops.loc[ops["category"] == "other", "op_type"]))
    row = {
        "machine": machine, "model": run.model, "runtime": run.runtime, "layout": run.layout,
        "resolution": run.resolution, "threads": threads, "warmup": warmup, "repeats": repeats,
        "e2e_median_ms": round(median, 4), "e2e_p10_ms": round(float(np.percentile(e2e, 10)), 4),
        "e2e_p90_ms": round(float(np.percentile(e2e, 90)), 4), "ops_sum_ms": round(ops_ms, 4),
        "ops_vs_e2e_pct": round(100 * (ops_ms / median - 1), 2),
        "attributed_pct": round(100 * float(attributed), 2), "n_ops": len(ops),
    }
    for cat, ms in by_cat.items():
        row[f"{cat}_ms"] = round(ms, 4)
        row[f"{cat}_pct"] = round(100 * ms / ops_ms, 2) if ops_ms else 0.0
    row["other_op_types"] = " ".join(other)
    row["method"] = run.method
    row["artifact"] = run.artifact
    return row


def summary_columns() -> list[str]:
    head = ["machine", "model", "runtime", "layout", "resolution", "threads", "warmup", "repeats",
            "e2e_median_ms", "e2e_p10_ms", "e2e_p90_ms", "ops_sum_ms", "ops_vs_e2e_pct",
            "attributed_pct", "n_ops"]
    cats = [f"{c}_{u}" for c in CATEGORIES for u in ("ms", "pct")]
    return head + cats + ["other_op_types", "method", "artifact"]


def share_spread(a, b):
    """Absolute difference, in percentage points, of each category's share between two
    summaries of the same (model, runtime, layout) rows: the repeatability measure."""
    cols = [f"{c}_pct" for c in CATEGORIES]
    left = a.set_index(list(KEY))[cols]
    right = b.set_index(list(KEY))[cols].reindex(left.index)
    return (left - right).abs().max(axis=0).rename(lambda c: c.removesuffix("_pct"))
