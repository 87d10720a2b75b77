"""`pvl-search eval --plot`: R@1 and latency against the rerank depth, as a PNG (needs the
plot extra: matplotlib)."""

from __future__ import annotations

import os
from pathlib import Path

from indexer.evaluate.report import EXHAUSTIVE, MIXED, MULTI, SINGLE, EvalReport


def plot_report(report: EvalReport, path: str | os.PathLike[str]) -> Path:
    """Two panels as a PNG: R@1 vs rerank K, and p50 latency vs K (log scale); multi-stream
    retrieval and exhaustive single-stream as horizontal lines, chance as a dotted one."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import NullLocator
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'pvl-search[plot]'") from None

    path = Path(path)
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    recall, speed = fig.subplots(1, 2)
    styles = {MIXED: ("tab:blue", "o"), SINGLE: ("tab:orange", "s")}
    for name, (colour, marker) in styles.items():
        points = sorted((m.k, m) for m in report.methods if m.method == name)
        if points:
            xs = [k for k, _ in points]
            recall.plot(xs, [m.metrics.r1 for _, m in points], marker=marker, color=colour, label=f"{name} rerank")
            speed.plot(xs, [m.latency_p50_ms for _, m in points], marker=marker, color=colour,
                       label=f"{name} rerank")
    lines = {MULTI: ("tab:green", "--", "multi-stream only"), EXHAUSTIVE: ("tab:red", "-.", "single, exhaustive")}
    for name, (colour, style, label) in lines.items():
        for m in report.methods:
            if m.method == name:
                recall.axhline(m.metrics.r1, color=colour, linestyle=style, label=label)
                speed.axhline(m.latency_p50_ms, color=colour, linestyle=style, label=label)
    recall.axhline(report.chance_r1, color="grey", linestyle=":", label="chance")
    ks = sorted({m.k for m in report.methods if m.k is not None})
    for ax in (recall, speed):
        ax.set_xscale("log", base=2)
        if ks:
            ax.set_xticks(ks, [str(k) for k in ks])
            ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("rerank K (segments)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    recall.set_ylabel("R@1 (%)")
    recall.set_title(f"R@1 vs K ({report.n_queries} queries, {report.n_videos} videos)")
    speed.set_yscale("log")
    speed.set_ylabel("p50 latency per query (ms)")
    speed.set_title("latency vs K")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
