"""How the command line shows results: rich tables and one-line summaries, built from the
library's result objects. Pure formatting: nothing here reads files, computes or prints
(cli.py prints what these return). Every column folds: a cell too long for a narrow terminal
goes on over more lines instead of ending in "…" (into a pipe or a file the console is wide
enough that nothing folds: cli_common.OutputConsole)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

SPLIT_NAMES = ("train", "val", "test")
PROBE_COLUMNS = ("colour", "shape", "size", "motion", "shape_by_time", "motion_by_time", "order", "binding")


def profile_table(rows: list[Any], title: str) -> tuple[Table, str]:
    """The `profile` rows (pvl_search.model.profiling.ProfileRow) and the factorisation line."""
    table = Table(title=title)
    for column in ("component", "params (M)", "GFLOPs", "latency ms", "note"):
        table.add_column(column, justify="left" if column in ("component", "note") else "right", overflow="fold")
    for row in rows:
        table.add_row(row.name, f"{row.params / 1e6:.1f}", f"{row.gflops:.4g}", f"{row.latency_ms:.3g}", row.note)
    by_name = {row.name: row for row in rows}
    plain, factorised = by_name["mixed decoder, plain"], by_name["mixed decoder, factorised"]
    note = (f"reranking one candidate: factorised costs {plain.gflops / factorised.gflops:.0f}x fewer FLOPs "
            "than the plain decoder")
    return table, note


def status_table(stats: Any, index_dir: Path) -> Table:
    """`status` (indexer.store.records.IndexStats)."""
    model, fingerprint = stats.model_config, stats.fingerprint
    table = Table(title=f"index {index_dir}", show_header=False)
    table.add_column("what", style="bold", overflow="fold")
    table.add_column("value", overflow="fold")
    table.add_row("videos", ", ".join(f"{k} {v}" for k, v in stats.videos.items()))
    table.add_row("segments", f"{stats.segments} searchable, {stats.removed_segments} removed")
    table.add_row("vectors", f"{stats.vectors} ({stats.faiss})")
    table.add_row("thumbnails", str(stats.thumbnails))
    rows = max(stats.rows, 1)  # store rows, removed ones included: what the files hold
    for name, size in stats.bytes.items():
        per = f", {size / rows / 1e3:.1f} kB per segment" if name.endswith(".f16") or name == "thumbnails" else ""
        table.add_row(f"  {name}", f"{size / 1e6:.2f} MB{per}")
    table.add_row("model", f"{fingerprint[:12] if fingerprint else '-'} (hidden {model.get('hidden')}, "
                  f"N={model.get('latents')}, {model.get('frames')} frames)")
    table.add_row("encoded in", (stats.encode_dtype or "not recorded").replace(",", " + "))
    windows = stats.windows
    table.add_row("windows", "not recorded (an older index)" if windows is None
                  else f"{windows.window_s:g} s every {windows.stride_s:g} s")
    return table


def search_table(result: Any, query: str, rerank: str) -> Table:
    """`search` (indexer.search.searcher.SearchResult)."""
    table = Table(title=f"{query!r} ({rerank} rerank, {result.dtype}, {result.timings_ms['total']:.0f} ms)")
    for column in ("#", "score", "retrieval", "rerank", "moment", "also", "path"):
        table.add_column(column, justify="left" if column in ("moment", "also", "path") else "right", overflow="fold")
    for hit in result.hits:
        best = hit.best
        table.add_row(
            str(hit.rank), f"{hit.score:.3f}", f"{best.retrieval_score:.3f}",
            "-" if best.rerank_score is None else f"{best.rerank_score:.2f}",
            moment_text(hit), ", ".join(_span(m.start_s, m.end_s) for m in hit.moments[1:]), hit.path,
        )
    return table


def _span(start: float, end: float) -> str:
    return f"{start:.1f}-{end:.1f} s"


def moment_text(hit: Any) -> str:
    """A hit's best moment (its best segment when it has none)."""
    best = hit.moments[0] if hit.moments else hit.best
    return _span(best.start_s, best.end_s)


def example_table(query: str, wanted: str, hits: list[Any], span: tuple[float, float] | None = None) -> Table:
    """One demo query: its top videos, the wanted one (and, in a long video, its time) marked."""
    at = "" if span is None else f" at {_span(*span)}"
    table = Table(title=f"{query!r}  (wanted: {Path(wanted).name}{at})")
    for column in ("#", "score", "moment", "video"):
        table.add_column(column, overflow="fold")
    for hit in hits:
        mark = " <- wanted" if hit.path == wanted else ""
        table.add_row(str(hit.rank), f"{hit.score:.2f}", moment_text(hit), Path(hit.path).name + mark)
    return table


def synth_table(summary: Any) -> Table:
    """`synth` (pvl_search.data.synth.CorpusSummary): videos and hard-negative kinds per split."""
    table = Table(title=f"{summary.videos} videos in {summary.out_dir} ({summary.bytes_on_disk / 1e6:.1f} MB)")
    table.add_column("", overflow="fold")
    for split in SPLIT_NAMES:
        table.add_column(split, justify="right", overflow="fold")
    table.add_row("videos", *(str(summary.splits.get(sp, 0)) for sp in SPLIT_NAMES))
    for factor, counts in summary.factors.items():
        table.add_row(factor, *(str(counts.get(sp, 0)) for sp in SPLIT_NAMES))
    return table


def probe_table(report: dict, fit_split: str, test_split: str, chance: dict) -> Table:
    """`probe`: accuracy per feature and attribute; `chance` is the chance row with its means."""
    table = Table(title=f"linear probe accuracy, fitted on {fit_split}, scored on {test_split}")
    table.add_column("features", overflow="fold")
    for column in PROBE_COLUMNS:
        table.add_column(column, justify="right", overflow="fold")
    for feature, row in report.items():
        values = chance if feature == "chance" else row
        table.add_row(feature, *(f"{values[c]:.2f}" for c in PROBE_COLUMNS))
    return table


def eval_tables(report: Any, title: str) -> list[Any]:
    """`eval` and the demo (indexer.evaluate.driver.EvalReport): methods, subsets, twin groups and
    a closing line."""
    from indexer.evaluate.report import ROW_HEADER

    table = Table(title=title)
    for column in (*ROW_HEADER, "R@1 vs multi"):
        table.add_column(column, justify="left" if column == "method" else "right", overflow="fold")
    versus = report.versus_retrieval()
    for result, (method, k, *numbers) in zip(report.methods, report.rows()):
        change = versus.get(result.label)
        # first places won / lost against retrieval alone, and the sign test's p-value
        paired = "" if change is None else f"+{change.gained}/-{change.lost} p={change.p_value:.2f}"
        table.add_row(method, "-" if k is None else str(k), *(f"{x:.1f}" for x in numbers), paired)
    out: list[Any] = [table]
    if report.subset_rows():
        out.append(_subset_table(report.subset_rows()))
    twins = [m for m in report.methods if m.groups]
    if twins:
        out.append(_twin_table(twins))
    if report.moments is not None:
        out.append(moment_table(report.moments, f"moments: {report.moments.queries} captions with known time "
                                                "spans, default search"))
    out.append(f"{report.n_queries} queries over {report.n_videos} videos ({report.n_segments} segments); "
               f"chance R@1 = {report.chance_r1:.2f}")
    return out


def moment_table(m: Any, title: str) -> Table:
    """The moment metrics (indexer.evaluate.report.MomentReport), searched with the defaults."""
    table = Table(title=title)
    columns = ("video R@1", "R@1 IoU≥0.5", "R@1 IoU≥0.7", "start error s (median)", "any moment IoU≥0.5",
               "moments/result", "p50 ms")
    for column in columns:
        table.add_column(column, justify="right", overflow="fold")
    error = "-" if m.median_start_error_s is None else f"{m.median_start_error_s:.2f}"
    table.add_row(f"{m.video_r1:.1f}", f"{m.r1_iou50:.1f}", f"{m.r1_iou70:.1f}", error,
                  f"{m.any_moment_r1_iou50:.1f}", f"{m.mean_moments:.2f}", f"{m.latency_p50_ms:.1f}")
    return table


def _subset_table(rows: list[tuple]) -> Table:
    table = Table(title="R@1 on subsets (videos with that kind of hard negative / held-out combination)")
    for column in ("method", "K", "subset", "queries", "R@1"):
        table.add_column(column, justify="left" if column in ("method", "subset") else "right", overflow="fold")
    for method, k, label, n, r1 in rows:
        table.add_row(method, "-" if k is None else str(k), label, str(n), f"{r1:.1f}")
    return table


def _twin_table(methods: list[Any]) -> Table:
    labels = sorted({k for m in methods for k in m.groups if k.startswith("within_group_top1:")})
    table = Table(title="twin groups: own video above its hard-negative twins (within), its group first (group R@1)")
    for column in ("method", "K", "queries", "within", "group R@1", *(label.split(":", 1)[1] for label in labels)):
        table.add_column(column, justify="left" if column == "method" else "right", overflow="fold")
    for m in methods:
        table.add_row(m.method, "-" if m.k is None else str(m.k), str(int(m.groups["queries"])),
                      f"{m.groups['within_group_top1']:.1f}", f"{m.groups['group_r1']:.1f}",
                      *(f"{m.groups.get(label, float('nan')):.1f}" for label in labels))
    return table


def validation_line(event: dict) -> str:
    """One line of a training epoch's validation: R@1 per method, group metrics, probes."""
    methods = [k[4:] for k in event if k.startswith("val_") and isinstance(event[k], dict) and "r1" in event[k]]
    text = "val R@1 " + ", ".join(f"{m} {event['val_' + m]['r1']:.1f}" for m in methods)
    groups = event.get("val_groups", {}).get("multi")
    if groups:
        text += f"; multi group R@1 {groups['group_r1']:.1f}, within-group {groups['within_group_top1']:.1f}"
    for feature, row in event.get("val_probes", {}).items():
        text += f"; {feature} probes " + " ".join(f"{k} {v:.2f}" for k, v in row.items())
    return text
