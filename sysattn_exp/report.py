"""Runs -> the comparison table: which condition moved paired accuracy, on which benchmark,
by how much.

    python -m sysattn_exp.report                          # the newest sweep
    python -m sysattn_exp.report report.parent=<run id> report.out=outputs/report-q4

One row per benchmark x model x intervention x layer range (and the baseline), with paired
accuracy, yes-rate, yes-bias, accuracy, the change in paired accuracy against the
baseline in points and in percent (as the paper reports it) and the benchmark's main
native metric. Written as comparison.csv and comparison.md, with a heatmap per benchmark
and model (layer range x intervention, colour = change in paired accuracy) and yes-rate
bars; all of it is also logged to the sweep's parent run. paper_table.csv / .md pivot the
change in paired accuracy (percent) to one row per condition and one column per benchmark,
as the paper's table (with several models, each condition's label starts with its model).
"""

import re
import sys
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
]


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
        native = MAIN_METRICS.get(benchmark)
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
                }
            )
    table = pd.DataFrame(rows, columns=COLUMNS).drop_duplicates(CONDITION)
    table["baseline_first"] = table["intervention"] != "baseline"
    table = table.sort_values(["benchmark", "model", "baseline_first", "intervention", "layers"])
    return table.drop(columns="baseline_first").reset_index(drop=True)


def paper_table(table: pd.DataFrame, value: str) -> pd.DataFrame:
    """The paper's table: the change in paired accuracy against the baseline (`value`:
    percent or points), one row per condition (rule and layers), one column per benchmark."""
    edits = table[table["intervention"] != "baseline"]
    condition = edits["intervention"] + " " + edits["layers"]
    if table["model"].nunique(dropna=False) > 1:
        condition = edits["model"].astype(str) + ": " + condition
    grid = edits.assign(condition=condition).pivot_table(
        index="condition", columns="benchmark", values=value, dropna=False
    )
    return grid.reset_index()


def paper_markdown(table: pd.DataFrame) -> str:
    """Cells '+12.5% (+2.1 pts)'; the percentage is blank where the baseline is 0."""
    pct = paper_table(table, "paired_accuracy_change_pct").set_index("condition")
    pts = paper_table(table, "paired_accuracy_change_points").set_index("condition")
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    several_models = table["model"].nunique(dropna=False) > 1
    for (benchmark, model), rows in table.groupby(["benchmark", "model"], dropna=False):
        # One model keeps the plain file names; with several, each model gets its own.
        name = f"{benchmark}_{slug(model)}" if several_models else benchmark
        title = f"{benchmark} ({model})" if several_models else benchmark
        edits = rows[rows["intervention"] != "baseline"]
        if not edits.empty:
            grid = edits.pivot_table(
                index="layers", columns="intervention", values="paired_accuracy_change_points"
            )
            fig, ax = plt.subplots(figsize=(3.5 + 1.4 * grid.shape[1], 2 + 0.5 * grid.shape[0]))
            limit = max(float(abs(grid).max().max()), 1e-9)
            image = ax.imshow(grid.values, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
            ax.set_xticks(range(grid.shape[1]), grid.columns, rotation=30, ha="right")
            ax.set_yticks(range(grid.shape[0]), grid.index)
            for (i, j), value in pd.DataFrame(grid.values).stack().items():
                shade = "white" if abs(value) > limit / 2 else "black"
                ax.text(j, i, f"{value:+.1f}", ha="center", va="center", fontsize=8, color=shade)
            fig.colorbar(image, ax=ax, label="points vs baseline")
            ax.set_title(f"{title}: paired accuracy vs baseline")
            files.append(save(fig, out / f"heatmap_{name}.png"))
        labels = [f"{r.intervention} {r.layers}".replace(" -", "") for r in rows.itertuples()]
        fig, ax = plt.subplots(figsize=(2 + 0.5 * len(rows), 3.5))
        ax.bar(range(len(rows)), rows["yes_rate"], color=["grey"] + ["tab:blue"] * (len(rows) - 1))
        ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("yes-rate")
        ax.set_ylim(0, 1)
        ax.set_title(f"{title}: yes-rate by condition")
        files.append(save(fig, out / f"yes_rate_{name}.png"))
    return files


def slug(model) -> str:
    """A model's name (hub id, folder) as a file-name part."""
    return re.sub(r"[^\w.-]+", "_", str(model)).strip("_")


def save(fig, path: Path) -> Path:
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
