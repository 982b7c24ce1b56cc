"""The breakdown figure: one stacked horizontal bar per model, one panel per runtime, ms on the
axis, the same colour for a category in every panel and every figure."""
from __future__ import annotations

from mobilehv.taxonomy import CATEGORIES

# fixed colours per category (tab10 order), so figures from different runs compare at a glance
COLOURS = dict(zip(CATEGORIES, ("#1f77b4", "#d62728", "#ff7f0e", "#2ca02c", "#9467bd",
                                "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")))
RUNTIME_ORDER = ("onnxruntime", "tflite", "torch", "coreml")


def breakdown_figure(summary, title: str = ""):
    """Figure from summary rows (summary.csv): bars = model[/layout], segments = category ms.

    The bar's segments sum to the sum of ops; a black tick marks the measured end-to-end median.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    runtimes = [r for r in RUNTIME_ORDER if r in set(summary["runtime"])]
    runtimes += sorted(set(summary["runtime"]) - set(runtimes))
    rows_max = max(len(summary[summary["runtime"] == r]) for r in runtimes)
    fig, axes = plt.subplots(1, len(runtimes), figsize=(5.5 * len(runtimes), 0.45 * rows_max + 1.8),
                             squeeze=False)
    for ax, runtime in zip(axes[0], runtimes):
        part = summary[summary["runtime"] == runtime].sort_values(["model", "layout"], ascending=False)
        labels = [f"{m} ({l})" if l != "nchw" else m for m, l in zip(part["model"], part["layout"])]
        left = [0.0] * len(part)
        for cat in CATEGORIES:
            ms = part[f"{cat}_ms"].fillna(0).tolist()
            ax.barh(labels, ms, left=left, color=COLOURS[cat], label=cat, height=0.7)
            left = [a + b for a, b in zip(left, ms)]
        ax.scatter(part["e2e_median_ms"], labels, marker="|", color="black", s=200, zorder=3,
                   label="e2e median")
        ax.set_title(runtime)
        ax.set_xlabel("latency (ms)")
        ax.grid(axis="x", alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=6, frameon=False, bbox_to_anchor=(0.5, -0.02))
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig
