"""The report's plots (experiment/report.py draws them from its comparison table): per
benchmark a heatmap of the change in paired accuracy (layer range x rule, significant
changes marked), yes-rate bars, and where a rule ran at several fractions (the dose sweep,
+sweep=dose) the change against the fraction with its 95% band; a panel per model and
setting."""

from pathlib import Path

import pandas as pd

from sysattn_exp.experiment.report_stats import Evidence


def panel_names(rows: pd.DataFrame) -> pd.Series:
    """A plot's panel per model and setting: the model's label, and the setting where
    there is one."""
    models = rows["model"].astype(object).where(rows["model"].notna(), "").astype(str)
    return models.str.cat(rows["setting"].map(lambda s: f" [{s}]" if s else "")).str.strip()


def plots(table: pd.DataFrame, out: Path, evidence: Evidence) -> list[Path]:
    """A heatmap and yes-rate bars per benchmark, one panel per model and setting; a dose
    plot where a rule was run at several fractions. `table`: the comparison table, its
    layer ranges as the plots label them (report.plotted)."""
    import matplotlib

    matplotlib.use("Agg")

    files = []
    for benchmark, rows in table.groupby("benchmark"):
        rows = rows.assign(panel=panel_names(rows))
        several = rows["panel"].nunique() > 1
        edits = rows[rows["intervention"] != "baseline"]
        if not edits.empty:
            fig = heatmap(edits, benchmark, several, evidence)
            files.append(save(fig, out / f"heatmap_{benchmark}.png"))
            dose = dose_plot(edits, benchmark, evidence)
            if dose is not None:
                files.append(save(dose, out / f"dose_{benchmark}.png"))
        if rows["yes_rate"].notna().any():  # a yes/no benchmark, not captions
            bars = yes_rate_bars(rows, benchmark, several)
            files.append(save(bars, out / f"yes_rate_{benchmark}.png"))
    return files


def panels(width: float, height: float, n: int):
    import matplotlib.pyplot as plt

    layout = "constrained" if n > 1 else None  # tight_layout cannot fit a shared colour bar
    fig, axes = plt.subplots(
        1, n, sharey=True, squeeze=False, figsize=(width, height), layout=layout
    )
    return fig, list(axes[0])


def titles(fig, axes, names, title: str, several: bool) -> None:
    """One panel: the title as before; several: the title over the panels, a name each."""
    if not several:
        axes[0].set_title(title)
        return
    fig.suptitle(title)
    for ax, name in zip(axes, names, strict=True):
        ax.set_title(str(name), fontsize=9)


def groups_note(rows: pd.DataFrame) -> str:
    """'40 groups: one group = 2.5 points' (how much one group moves paired accuracy)."""
    n = rows["n_groups"].dropna()
    if n.empty:
        return ""
    n = int(n.iloc[0])
    return f"{n} groups: one group = {100 / n:.3g} points"


def heatmap(edits: pd.DataFrame, benchmark: str, several: bool, evidence: Evidence):
    """Layer range x intervention, colour = change in paired accuracy in points (captions:
    in CHAIR_s), the number followed by * where the change is significant after correction
    (the colour bar's label says so); a panel per model and setting on the same rows,
    columns and colour scale, each saying how many groups its benchmark has."""
    # Yes/no benchmarks: paired accuracy; captions: their main metric (CHAIR_s).
    column, what = "paired_accuracy_change_points", "paired accuracy"
    if edits[column].isna().all():
        column, what = "native_change_points", str(edits["native_metric"].iloc[0])
    groups = dict(list(edits.groupby("panel", sort=False)))
    grids = {
        panel: rows.pivot_table(index="layers", columns="intervention", values=column)
        for panel, rows in groups.items()
    }
    index = sorted(set().union(*(grid.index for grid in grids.values())))
    columns = sorted(set().union(*(grid.columns for grid in grids.values())))
    grids = {panel: grid.reindex(index=index, columns=columns) for panel, grid in grids.items()}
    marks = {
        panel: rows.assign(mark=(rows["significant"] == "yes").astype(float))
        .pivot_table(index="layers", columns="intervention", values="mark")
        .reindex(index=index, columns=columns)
        for panel, rows in groups.items()
    }
    limit = max(max(float(abs(grid).max().max()) for grid in grids.values()), 1e-9)
    n = len(grids)
    fig, axes = panels(2 + n * (1.5 + 1.4 * len(columns)), 2.4 + 0.5 * len(index), n)
    for ax, (panel, grid) in zip(axes, grids.items(), strict=True):
        image = ax.imshow(grid.values, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
        ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
        ax.set_yticks(range(len(index)), index)
        if what == "paired accuracy":
            ax.set_xlabel(groups_note(groups[panel]), fontsize=8)
        for (i, j), value in pd.DataFrame(grid.values).stack().dropna().items():
            shade = "white" if abs(value) > limit / 2 else "black"
            mark = "*" if marks[panel].iloc[i, j] == 1 else ""
            text = f"{value:+.1f}{mark}"
            weight = "bold" if mark else "normal"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color=shade, weight=weight)
    tested = edits["p_corrected"].notna().any()
    label = "points vs baseline" + (f"\n{evidence.mark()}" if tested else "")
    fig.colorbar(image, ax=axes if n > 1 else axes[0], label=label)
    titles(fig, axes, grids, f"{benchmark}: {what} vs baseline (points)", several)
    return fig


def yes_rate_bars(rows: pd.DataFrame, benchmark: str, several: bool):
    """Per condition, the change of the yes-rate against the baseline in points, the value
    on each bar; the baseline (0) and the ground-truth yes-rate as reference lines,
    labelled with their yes-rates in percent. A panel per model and setting."""
    rows = rows.assign(
        label=[f"{r.intervention} {r.layers}" for r in rows.itertuples()],
    )
    edits = rows[rows["intervention"] != "baseline"]
    labels = list(edits.sort_values(["intervention", "layers"])["label"].unique())
    groups = dict(list(rows.groupby("panel", sort=False)))
    fig, axes = panels(3 + 0.55 * max(len(labels), 1) * len(groups), 4, len(groups))
    for ax, panel_rows in zip(axes, groups.values(), strict=True):
        base = panel_rows.loc[panel_rows["intervention"] == "baseline", "yes_rate"]
        base = float(base.iloc[0]) if len(base) else float("nan")
        change = 100 * (panel_rows.set_index("label")["yes_rate"].reindex(labels) - base)
        bars = ax.bar(range(len(labels)), change.values, color="tab:blue")
        ax.bar_label(bars, fmt="%+.1f", fontsize=7, padding=2)
        ax.axhline(0, color="grey", linewidth=1, label=f"baseline {100 * base:.1f}%")
        truth = panel_rows["gt_yes_rate"].dropna()
        if len(truth):
            gt = float(truth.iloc[0])
            ax.axhline(
                100 * (gt - base),
                color="tab:green",
                linestyle="--",
                linewidth=1,
                label=f"ground truth {100 * gt:.1f}%",
            )
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
        ax.margins(y=0.15)
        ax.legend(fontsize=7, loc="best")
    axes[0].set_ylabel("yes-rate change vs baseline (points)")
    titles(fig, axes, groups, f"{benchmark}: yes-rate by condition", several)
    return fig


def save(fig, path: Path) -> Path:
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(path, dpi=120)
    fig.clf()
    return path


def dose_lines(edits: pd.DataFrame) -> dict:
    """{(panel, layers, rule without its fraction): rows sorted by fraction} for each rule
    with at least two fractions (the dose sweep: +sweep=dose)."""
    edits = edits[edits["fraction"].notna() & edits["paired_accuracy_change_points"].notna()]
    rule = edits["intervention"].str.replace(r" f=[0-9.eE+-]+", "", regex=True)
    lines = {}
    for key, rows in edits.assign(rule=rule).groupby(["panel", "layers", "rule"], sort=True):
        if rows["fraction"].nunique() >= 2:
            lines[key] = rows.sort_values("fraction")
    return lines


def dose_plot(edits: pd.DataFrame, benchmark: str, evidence: Evidence):
    """dose_<benchmark>.png: the change in paired accuracy (points) against the fraction
    of the source's attention moved, a line per rule (source -> recipients), layer range
    and panel, with the 95% interval of the change as a band; significant points are
    marked. None where no rule has two fractions."""
    import matplotlib.pyplot as plt

    lines = dose_lines(edits)
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for (panel, layers, rule), rows in lines.items():
        name = " ".join(str(part) for part in (rule, layers, panel) if part)
        x = rows["fraction"].astype(float).to_numpy()
        y = rows["paired_accuracy_change_points"].astype(float).to_numpy()
        (line,) = ax.plot(x, y, marker="o", label=name)
        # The band has a gap where a run logged no interval (logged before statistics).
        band = [rows[f"change_ci_{end}_points"].astype(float) for end in ("low", "high")]
        ax.fill_between(x, *band, alpha=0.2, color=line.get_color())
        marked = (rows["significant"] == "yes").to_numpy()
        ax.plot(x[marked], y[marked], "*", markersize=12, color=line.get_color())
    ax.axhline(0, color="grey", linewidth=1)
    ax.set_xlabel("fraction of the source's attention moved")
    ax.set_ylabel("paired accuracy change vs baseline (points)")
    ax.set_title(
        f"{benchmark}: paired accuracy vs baseline by fraction\n"
        f"band: 95% CI of the change; {evidence.mark()}",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    return fig
