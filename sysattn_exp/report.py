"""Runs -> the comparison table: which condition moved paired accuracy, on which benchmark,
by how much.

    python -m sysattn_exp.report                          # the newest sweep
    python -m sysattn_exp.report report.parent=<run id> report.out=outputs/report-q4

One row per benchmark x model x intervention x layer range (and the baseline), with paired
accuracy, yes-rate, yes-bias, accuracy, the change in paired accuracy against the
baseline in points and in percent (as the paper reports it) and the benchmark's main
native metric. Written as comparison.csv and comparison.md, with a heatmap per benchmark
(layer range x intervention, colour = change in paired accuracy) and yes-rate bars; all of
it is also logged to the sweep's parent run. paper_table.csv / .md pivot the change in
paired accuracy (percent) to one row per condition and one column per benchmark, as the
paper's table.

The model is a readable label (the last part of its hub id or path, and its decoder depth
where logged). With several models, each plot has a panel per model (heatmaps share their
colour scale), the paper's table gets a model column, and layer ranges given in quarters
of each model's own depth are labelled by quarter alone (q4, not q4 (24-31)), so a 4-layer
and an 8-layer model's q4 land in the same row.
"""

import re
import sys
from collections import Counter
from pathlib import Path

import hydra
import pandas as pd
from omegaconf import DictConfig

from sysattn_exp.benchmarks import MAIN_METRICS
from sysattn_exp.errors import UsageError
from sysattn_exp.tracking import connect

COLUMNS = [
    "benchmark",
    "model",
    "intervention",
    "layers",
    "paired_accuracy",
    "yes_rate",
    "yes_bias",
    "accuracy",
    "paired_accuracy_change_points",
    "paired_accuracy_change_pct",
    "native_metric",
    "native_value",
    "native_change_points",
]
# The main metric per benchmark; +task=caption jobs are filed under "chair".
MAIN_METRIC = MAIN_METRICS | {"chair": "chair_s"}


def job_runs(cfg) -> tuple[pd.DataFrame, str | None]:
    """The job runs to report on (one row each, params.* and metrics.* columns) and the
    parent run they belong to (None for report.parent=all)."""
    mlflow, experiment_id = connect(cfg.tracking)
    parent = cfg.report.parent
    if parent == "latest":
        sweeps = mlflow.search_runs(
            [experiment_id],
            filter_string="tags.`sysattn.kind` = 'sweep'",
            order_by=["start_time DESC"],
            max_results=1,
            output_format="list",
        )
        if not sweeps:
            raise UsageError(
                f"report.parent=latest: experiment {cfg.tracking.experiment!r} has no sweep"
            )
        parent = sweeps[0].info.run_id
    query = "tags.`sysattn.kind` = 'job'"
    if parent != "all":
        query += f" and tags.`mlflow.parentRunId` = '{parent}'"
    runs = mlflow.search_runs([experiment_id], filter_string=query, output_format="pandas")
    if runs.empty:
        raise UsageError(
            f"report.parent={cfg.report.parent}: no job runs in experiment "
            f"{cfg.tracking.experiment!r} (give a sweep's parent run id, latest, or all)"
        )
    return runs, None if parent == "all" else parent


def intervention_label(run: pd.Series) -> str:
    """The label the runner gives the rule (Redistribution.describe, Scale.describe)."""
    name = run["params.intervention.name"]
    if name == "none":
        return "baseline"
    if name == "scale":
        factor = float(run["params.intervention.factor"])
        return f"{run['params.intervention.modality']}x{factor:g}"
    if name == "pai":
        gamma = run.get("params.intervention.cfg_gamma")
        guidance = "" if gamma in (None, "None") else f" cfg={float(gamma):g}"
        return f"PAI a={float(run['params.intervention.alpha']):g}{guidance}"
    recipients = run["params.intervention.recipients"].replace(",", "+")
    label = f"{run['params.intervention.source']}->{recipients}"
    fraction = float(run.get("params.intervention.fraction") or 1)
    mode = run.get("params.intervention.mode") or "proportional"
    return (
        label
        + ("" if fraction == 1 else f" f={fraction:g}")
        + ("" if mode == "proportional" else f" {mode}")
    )


def layers_label(run: pd.Series) -> str:
    if run["params.intervention.name"] == "none":
        return "-"
    layers = [int(x) for x in str(run["params.layers.resolved"]).split(",")]
    span = f"{layers[0]}-{layers[-1]}"
    unset = (None, "None")
    quarter = run.get("params.layers.quarter")
    if quarter not in unset:
        return f"q{quarter} ({span})"
    if run.get("params.layers.start") in unset and run.get("params.layers.end") in unset:
        return f"all ({span})"
    return span


def aligned_layers(layers: str) -> str:
    """'q4 (24-31)' -> 'q4', 'all (0-31)' -> 'all': the same for models of any depth."""
    return re.sub(r"^(q\d|all) \(.*\)$", r"\1", layers)


def model_labels(runs: pd.DataFrame) -> dict:
    """params.model.name_or_path -> its label: the last part of the hub id or path (the full
    name where two models would share it), with the decoder depth where logged."""
    if "params.model.name_or_path" not in runs:
        return {}
    found = {}
    for name, group in runs.groupby("params.model.name_or_path"):
        depths = group.get("params.layers.depth", pd.Series(dtype=object))
        depths = [d for d in depths.dropna() if d != "None"]
        found[name] = (re.split(r"[\\/]", name.rstrip("/\\"))[-1] or name, depths[:1])
    count = Counter(short for short, _ in found.values())
    return {
        name: (short if count[short] == 1 else name) + "".join(f" ({d} layers)" for d in depth)
        for name, (short, depth) in found.items()
    }


# A condition is a benchmark, a model and a rule: runs of two models never merge.
CONDITION = ["benchmark", "model", "intervention", "layers"]


def comparison_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per benchmark x model x intervention x layer range, and a baseline row per
    benchmark and model (from a baseline job, or the baseline values every intervention job
    logs)."""
    rows = []
    for _, run in runs.iterrows():
        benchmark = run["params.benchmark.name"]
        model = run.get("params.model.name_or_path")
        native = MAIN_METRIC.get(benchmark)
        metric = run.filter(like="metrics.").rename(lambda name: name[len("metrics.") :]).get
        rows.append(
            {
                "benchmark": benchmark,
                "model": model,
                "intervention": intervention_label(run),
                "layers": layers_label(run),
                "paired_accuracy": metric("paired_accuracy"),
                "yes_rate": metric("yes_rate"),
                "yes_bias": metric("yes_bias"),
                "accuracy": metric("accuracy"),
                "paired_accuracy_change_points": metric("paired_accuracy_change_points"),
                "paired_accuracy_change_pct": metric("paired_accuracy_change_pct"),
                "native_metric": native,
                "native_value": metric(native) if native else None,
                "native_change_points": metric(f"{native}_change_points") if native else None,
            }
        )
        if rows[-1]["intervention"] != "baseline":
            rows.append(
                {
                    "benchmark": benchmark,
                    "model": model,
                    "intervention": "baseline",
                    "layers": "-",
                    "paired_accuracy": metric("baseline_paired_accuracy"),
                    "yes_rate": metric("baseline_yes_rate"),
                    "yes_bias": metric("baseline_yes_bias"),
                    "accuracy": metric("baseline_accuracy"),
                    "paired_accuracy_change_points": 0.0,
                    "paired_accuracy_change_pct": 0.0,
                    "native_metric": native,
                    "native_value": metric(f"baseline_{native}") if native else None,
                    "native_change_points": 0.0 if native else None,
                }
            )
    table = pd.DataFrame(rows, columns=COLUMNS)
    table["model"] = table["model"].map(model_labels(runs))
    table = table.drop_duplicates(CONDITION)
    table["baseline_first"] = table["intervention"] != "baseline"
    table = table.sort_values(["benchmark", "model", "baseline_first", "intervention", "layers"])
    return table.drop(columns="baseline_first").reset_index(drop=True)


def paper_table(table: pd.DataFrame, value: str) -> pd.DataFrame:
    """The paper's table: the change in paired accuracy against the baseline (`value`:
    percent or points), one row per condition (rule and layers), one column per benchmark;
    with several models, one row per condition and model, with a model column."""
    edits = table[table["intervention"] != "baseline"]
    layers, index = edits["layers"], ["condition"]
    if several_models(table):
        layers, index = layers.map(aligned_layers), ["condition", "model"]
    edits = edits.assign(condition=edits["intervention"] + " " + layers)
    return edits.set_index([*index, "benchmark"])[value].unstack("benchmark").reset_index()


def several_models(table: pd.DataFrame) -> bool:
    return table["model"].nunique(dropna=False) > 1


def paper_markdown(table: pd.DataFrame) -> str:
    """Cells '+12.5% (+2.1 pts)'; the percentage is blank where the baseline is 0."""
    index = ["condition", "model"] if several_models(table) else ["condition"]
    pct = paper_table(table, "paired_accuracy_change_pct").set_index(index)
    pts = paper_table(table, "paired_accuracy_change_points").set_index(index)
    cells = pct.copy().astype(object)
    for condition in pct.index:
        for benchmark in pct.columns:
            p, q = pct.loc[condition, benchmark], pts.loc[condition, benchmark]
            percent = "" if pd.isna(p) else f"{p:+.1f}% "
            cells.loc[condition, benchmark] = "" if pd.isna(q) else f"{percent}({q:+.1f} pts)"
    return markdown(cells.reset_index())


def markdown(table: pd.DataFrame) -> str:
    def cell(value) -> str:
        if value is None or (isinstance(value, float) and pd.isna(value)):
            return ""
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += [
        "| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)
    ]
    return "\n".join(lines) + "\n"


def plots(table: pd.DataFrame, out: Path) -> list[Path]:
    """A heatmap and yes-rate bars per benchmark, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")

    files = []
    several = several_models(table)
    for benchmark, rows in table.groupby("benchmark"):
        if several:
            rows = rows.assign(layers=rows["layers"].map(aligned_layers))
        edits = rows[rows["intervention"] != "baseline"]
        if not edits.empty:
            fig = heatmap(edits, benchmark, several)
            files.append(save(fig, out / f"heatmap_{benchmark}.png"))
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


def titles(fig, axes, models, title: str, several: bool) -> None:
    """One model: the title as before; several: the title over the panels, a model each."""
    if not several:
        axes[0].set_title(title)
        return
    fig.suptitle(title)
    for ax, model in zip(axes, models, strict=True):
        ax.set_title(str(model), fontsize=9)


def heatmap(edits: pd.DataFrame, benchmark: str, several: bool):
    """Layer range x intervention, colour = change in paired accuracy (captions: in CHAIR_s);
    a panel per model on the same rows, columns and colour scale."""
    # Yes/no benchmarks: paired accuracy; captions: their main metric (CHAIR_s).
    column, what = "paired_accuracy_change_points", "paired accuracy"
    if edits[column].isna().all():
        column, what = "native_change_points", str(edits["native_metric"].iloc[0])
    grids = {
        model: rows.pivot_table(index="layers", columns="intervention", values=column)
        for model, rows in edits.groupby("model", dropna=False, sort=False)
    }
    index = sorted(set().union(*(grid.index for grid in grids.values())))
    columns = sorted(set().union(*(grid.columns for grid in grids.values())))
    grids = {model: grid.reindex(index=index, columns=columns) for model, grid in grids.items()}
    limit = max(max(float(abs(grid).max().max()) for grid in grids.values()), 1e-9)
    n = len(grids)
    fig, axes = panels(2 + n * (1.5 + 1.4 * len(columns)), 2 + 0.5 * len(index), n)
    for ax, grid in zip(axes, grids.values(), strict=True):
        image = ax.imshow(grid.values, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
        ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
        ax.set_yticks(range(len(index)), index)
        for (i, j), value in pd.DataFrame(grid.values).stack().dropna().items():
            shade = "white" if abs(value) > limit / 2 else "black"
            ax.text(j, i, f"{value:+.1f}", ha="center", va="center", fontsize=8, color=shade)
    fig.colorbar(image, ax=axes if n > 1 else axes[0], label="points vs baseline")
    titles(fig, axes, grids, f"{benchmark}: {what} vs baseline", several)
    return fig


def yes_rate_bars(rows: pd.DataFrame, benchmark: str, several: bool):
    """Yes-rate by condition, the baseline first; a panel per model on the same conditions."""
    rows = rows.assign(
        label=[f"{r.intervention} {r.layers}".replace(" -", "") for r in rows.itertuples()],
        edit=rows["intervention"] != "baseline",
    )
    labels = list(rows.sort_values(["edit", "intervention", "layers"])["label"].unique())
    colours = ["grey" if label == "baseline" else "tab:blue" for label in labels]
    models = dict(list(rows.groupby("model", dropna=False, sort=False)))
    fig, axes = panels(2 + 0.5 * len(labels) * len(models), 3.5, len(models))
    for ax, model_rows in zip(axes, models.values(), strict=True):
        ax.bar(
            range(len(labels)),
            model_rows.set_index("label")["yes_rate"].reindex(labels),
            color=colours,
        )
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("yes-rate")
    titles(fig, axes, models, f"{benchmark}: yes-rate by condition", several)
    return fig


def save(fig, path: Path) -> Path:
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(path, dpi=120)
    fig.clf()
    return path


def report(cfg) -> Path:
    runs, parent = job_runs(cfg)
    table = comparison_table(runs)
    out = Path(cfg.report.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "comparison.csv", index=False)
    (out / "comparison.md").write_text(markdown(table))
    paper_table(table, "paired_accuracy_change_pct").to_csv(out / "paper_table.csv", index=False)
    (out / "paper_table.md").write_text(paper_markdown(table))
    files = [
        out / name
        for name in ("comparison.csv", "comparison.md", "paper_table.csv", "paper_table.md")
    ]
    files += plots(table, out)
    if parent is not None:
        mlflow, _ = connect(cfg.tracking)
        client = mlflow.MlflowClient()
        for path in files:
            client.log_artifact(parent, str(path), "report")
    print(markdown(table))
    print(
        f"report: {out.resolve()} ({len(files)} files)"
        + (f", logged to run {parent}" if parent else "")
    )
    for path in files:
        if path.suffix == ".png":
            print(f"  {path.resolve()}")
    return out


@hydra.main(version_base="1.3", config_path="pkg://sysattn_exp.conf", config_name="report")
def report_app(cfg: DictConfig) -> None:
    try:
        report(cfg)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    report_app()
