"""The report's per-layer localisation (+sweep=layers, +sweep=windows: experiment/
layer_sweeps.py): where in depth a rule changes the answers.

Per benchmark, model and setting (a panel) and rule, the jobs that ran it on explicit
layer ranges (layers.start/end) of one width at two or more starts form a line:
layers_<benchmark>.png draws the change in paired accuracy and in yes-rate against the
window's first layer, each with its paired bootstrap's 95% interval as a band (the jobs'
<metric>_change_ci_low/high: evaluation/stats.py), significant changes in paired accuracy
starred (report_stats.corrected: McNemar's exact test, corrected over the benchmark's
conditions). The text names each line's window with the largest significant gain, or
says that none is significant. Quarters and all-layer jobs are labelled by quarter, not
by range, and are not drawn here (the heatmap has them)."""

from pathlib import Path

import pandas as pd

from sysattn_exp.experiment.report_plots import panel_names, save
from sysattn_exp.experiment.report_stats import Evidence

SPAN = r"^(\d+)-(\d+)$"  # report.layers_label of an explicit range: 'first-last'
# (figure rows) column of the change, its interval's columns, and its axis label
CHANGES = (
    (
        "paired_accuracy_change_points",
        ("change_ci_low_points", "change_ci_high_points"),
        "paired accuracy change (points)",
    ),
    (
        "yes_rate_change_points",
        ("yes_rate_change_ci_low_points", "yes_rate_change_ci_high_points"),
        "yes-rate change (points)",
    ),
)


def window_lines(edits: pd.DataFrame) -> dict[tuple, pd.DataFrame]:
    """{(panel, rule, width): rows sorted by the window's first layer} for every rule run
    on explicit layer ranges of one width at two or more first layers. `edits`: the
    comparison table's intervention rows with a `panel` column."""
    span = edits["layers"].astype(str).str.extract(SPAN).astype(float)
    rows = edits.assign(start=span[0], width=span[1] - span[0] + 1)
    rows = rows[rows["start"].notna() & rows["paired_accuracy_change_points"].notna()]
    lines = {}
    for (panel, rule, width), part in rows.groupby(["panel", "intervention", "width"]):
        if part["start"].nunique() >= 2:
            lines[panel, rule, int(width)] = part.sort_values("start")
    return lines


def line_name(panel: str, rule: str, width: int) -> str:
    """'system->text, single layers' / 'system->text, 4-layer windows' (and the panel)."""
    windows = "single layers" if width == 1 else f"{width}-layer windows"
    return ", ".join(part for part in (rule, windows, panel) if part)


def layer_plots(table: pd.DataFrame, out: Path, evidence: Evidence) -> list[Path]:
    """layers_<benchmark>.png for every benchmark with a window line (window_lines)."""
    import matplotlib

    matplotlib.use("Agg")

    files = []
    for benchmark, rows in table.groupby("benchmark"):
        edits = rows[rows["intervention"] != "baseline"]
        lines = window_lines(edits.assign(panel=panel_names(edits)))
        if lines:
            files.append(
                save(layer_plot(lines, benchmark, evidence), out / f"layers_{benchmark}.png")
            )
    return files


def layer_plot(lines: dict, benchmark: str, evidence: Evidence):
    """The change in paired accuracy (top) and in yes-rate (bottom) against the window's
    first layer, a line per (panel, rule, width) with its 95% band; stars on significant
    changes in paired accuracy."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 1, sharex=True, figsize=(6.5, 6))
    for ax, (column, (low, high), label) in zip(axes, CHANGES, strict=True):
        for key, rows in lines.items():
            x = rows["start"].to_numpy(dtype=float)
            y = rows[column].to_numpy(dtype=float)
            (line,) = ax.plot(x, y, marker="o", label=line_name(*key))
            # A gap in the band where a run logged no interval (logged before statistics).
            band = [rows[end].to_numpy(dtype=float) for end in (low, high)]
            ax.fill_between(x, *band, alpha=0.2, color=line.get_color())
            if column == CHANGES[0][0]:
                marked = (rows["significant"] == "yes").to_numpy()
                ax.plot(x[marked], y[marked], "*", markersize=12, color=line.get_color())
        ax.axhline(0, color="grey", linewidth=1)
        ax.set_ylabel(label)
    axes[-1].set_xlabel("first decoder layer of the window (0-based)")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole
    axes[0].set_title(
        f"{benchmark}: change vs baseline by layer window\n"
        f"band: 95% CI of the change; {evidence.mark()}",
        fontsize=9,
    )
    axes[0].legend(fontsize=7)
    return fig


def best_window(rows: pd.DataFrame, evidence: Evidence) -> str:
    """One line's verdict: its window with the largest significant gain in paired accuracy,
    with its change, 95% interval and corrected p; or that none is significant."""
    gains = rows[(rows["significant"] == "yes") & (rows["paired_accuracy_change_points"] > 0)]
    if gains.empty:
        tested = rows["p_corrected"].notna().any()
        return (
            f"no window's gain is significant ({evidence.mark()})"
            if tested
            else "no test logged (runs from before statistics)"
        )
    best = gains.loc[gains["paired_accuracy_change_points"].idxmax()]
    return (
        f"largest significant gain at layers {best['layers']}: "
        f"{best['paired_accuracy_change_points']:+.1f} points "
        f"[95% CI {best['change_ci_low_points']:+.1f}, {best['change_ci_high_points']:+.1f}], "
        f"p ({evidence.correction}) {best['p_corrected']:.3g}"
    )


def localisation_markdown(table: pd.DataFrame, evidence: Evidence) -> str:
    """comparison.md's "Where in depth" section (empty without a window line): per
    benchmark and line, best_window's verdict."""
    found = []
    for benchmark, rows in table.groupby("benchmark", sort=False):
        edits = rows[rows["intervention"] != "baseline"]
        for key, line in window_lines(edits.assign(panel=panel_names(edits))).items():
            found.append(f"- {benchmark}, {line_name(*key)}: {best_window(line, evidence)}")
    if not found:
        return ""
    return (
        "\n## Where in depth\n\n"
        "Per rule run on windows of consecutive layers (+sweep=layers, +sweep=windows): the "
        "window with the largest significant gain in paired accuracy.\n\n" + "\n".join(found) + "\n"
    )
