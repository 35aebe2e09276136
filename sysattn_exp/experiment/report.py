"""Runs -> the comparison table: which condition moved paired accuracy, on which benchmark,
by how much.

    python -m sysattn_exp.report                          # the newest sweep
    python -m sysattn_exp.report report.parent=<run id> report.out=outputs/report-q4

One row per benchmark x model x intervention x layer range (and the baseline), with paired
accuracy, yes-rate, yes-bias, accuracy, the change in paired accuracy against the
baseline in points and in percent (as the paper reports it) and the benchmark's main
native metric. Written as comparison.csv and comparison.md, with a heatmap per benchmark
(layer range x intervention, colour = change in paired accuracy) and yes-rate bars; all of
it is also logged to the sweep's parent run, with the sweep's summary metrics
(parent_summary). paper_table.csv / .md pivot the change in
paired accuracy (percent) to one row per condition and one column per benchmark, as the
paper's table.

The model is a readable label (the last part of its hub id or path, and its decoder depth
where logged). With several models, each plot has a panel per model (heatmaps share their
colour scale), the paper's table gets a model column, and layer ranges given in quarters
of each model's own depth are labelled by quarter alone (q4, not q4 (24-31)), so a 4-layer
and an 8-layer model's q4 land in the same row.
"""

import os
import re
import sys
from collections import Counter
from importlib import resources
from pathlib import Path

import hydra
import pandas as pd
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sysattn_exp.benchmarks import MAIN_METRICS
from sysattn_exp.errors import UsageError, one_line
from sysattn_exp.experiment.labels import (
    aligned_layers,
    condition_names,
    intervention_label,
    layers_label,
)
from sysattn_exp.experiment.parent_summary import log_summary
from sysattn_exp.experiment.report_layers import layer_plots, localisation_markdown
from sysattn_exp.experiment.report_parity import baseline_vs_published, write_parity
from sysattn_exp.experiment.report_plots import plots
from sysattn_exp.experiment.report_stats import (
    Evidence,
    corrected,
    observed_power,
    summary_table,
    tested,
)
from sysattn_exp.experiment.schema import check_report_config
from sysattn_exp.experiment.tracking import (
    COMPLETE,
    HOW_METRICS,
    PARITY_TEXTS,
    connect,
    storable_name,
)

COLUMNS = [
    "benchmark",
    "model",
    "setting",
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
    "gt_yes_rate",
    "n_groups",
    "fraction",
    # The test against the baseline (report_stats.tested) and its correction (corrected).
    "test",
    "change_ci_low_points",
    "change_ci_high_points",
    "p_value",
    "p_corrected",
    "significant",
    "groups_fixed",
    "groups_broken",
    "items_fixed",
    "items_broken",
    # The yes-rate's change against the baseline and its paired bootstrap interval (the
    # layer plot's second panel: report_layers).
    "yes_rate_change_points",
    "yes_rate_change_ci_low_points",
    "yes_rate_change_ci_high_points",
]
# The main metric per benchmark; +task=caption jobs are filed under "chair".
MAIN_METRIC = MAIN_METRICS | {"chair": "chair_s"}


# Only runs whose logging finished (tracking.COMPLETE): a half-logged run has no metrics.
JOB_QUERY = f"tags.`sysattn.kind` = 'job' and {COMPLETE}"


def job_runs(cfg) -> tuple[pd.DataFrame, str | None]:
    """The job runs to report on (one row each, params.* and metrics.* columns) and the
    parent run they belong to (None for report.parent=all)."""
    mlflow, experiment_id = connect(cfg.tracking)
    parent = cfg.report.parent
    if parent == "latest":
        parent = latest_sweep(mlflow, experiment_id, cfg.tracking.experiment)
    query = JOB_QUERY
    if parent != "all":
        query += f" and tags.`mlflow.parentRunId` = '{parent}'"
    runs = mlflow.search_runs([experiment_id], filter_string=query, output_format="pandas")
    if runs.empty:
        raise UsageError(
            f"report.parent={cfg.report.parent}: no job runs in experiment "
            f"{cfg.tracking.experiment!r} (give a sweep's parent run id, latest, or all)"
        )
    return runs, None if parent == "all" else parent


def latest_sweep(mlflow, experiment_id: str, experiment: str) -> str:
    """The newest sweep's parent run that has a logged job (a sweep whose jobs all failed,
    or whose jobs are still running, has none)."""
    sweeps = mlflow.search_runs(
        [experiment_id],
        filter_string="tags.`sysattn.kind` = 'sweep'",
        order_by=["start_time DESC"],
        output_format="list",
    )
    for sweep in sweeps:
        query = f"{JOB_QUERY} and tags.`mlflow.parentRunId` = '{sweep.info.run_id}'"
        if mlflow.search_runs([experiment_id], filter_string=query, max_results=1).shape[0]:
            return sweep.info.run_id
    raise UsageError(f"report.parent=latest: experiment {experiment!r} has no sweep with jobs")


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


# A condition is a benchmark, a model, a setting and a rule: runs of two models, or of two
# benchmark configurations, never merge.
CONDITION = ["benchmark", "model", "setting", "intervention", "layers"]

# Params that do not change a job's baseline: its rule and layers, its own bookkeeping,
# where its results go and how fast they come. Every other param (the benchmark's split,
# subsets, prompt, limit, data; the model's revision and prompt; the scoring) does.
# The environment (versions, devices, the kernel verdicts a process reached) and how a
# job computed (HOW_METRICS, logged as params) are left out too: where they change the
# baseline, its values (baseline_signature) tell the settings apart.
# The prompt ablation (prompt.ablation) is a condition like a rule: compared with the
# unablated prompt's baseline, its row sits beside the rules' (its label: job.label).
NOT_SETTING = (
    "intervention.",
    "layers.",
    "sweep.",  # how a layer sweep chose layers.start/end (layer_sweeps.py)
    "job.",
    "runtime.",
    "tracking.",
    "environment.",
    "prompt.",
)
# The parity tag and label (logged as params, baseline jobs only) compare a baseline with
# the literature: they do not make a setting.
NOT_SETTING_KEYS = {
    "model.batch_size",
    "model.device",
    "model.device_map",
    *HOW_METRICS,
    *PARITY_TEXTS,
}
BASELINE_SIGNATURE = ("paired_accuracy", "yes_rate", "accuracy")


def in_setting(param: str) -> bool:
    return not param.startswith(NOT_SETTING) and param not in NOT_SETTING_KEYS


def baseline_signature(run: pd.Series, native: str | None) -> tuple:
    """The baseline values a run compared with (a baseline run: its own values)."""
    prefix = "" if is_baseline(run) else "baseline_"
    names = [*BASELINE_SIGNATURE, *([storable_name(native)] if native else [])]
    values = (run.get(f"metrics.{prefix}{name}") for name in names)
    return tuple(None if v is None or pd.isna(v) else round(float(v), 9) for v in values)


def is_baseline(run: pd.Series) -> bool:
    """A baseline job: no rule and no prompt ablation (a run logged before prompt.ablation
    existed has none)."""
    ablation = run.get("params.prompt.ablation")
    unablated = not isinstance(ablation, str) or ablation == "none"
    return run.get("params.intervention.name") == "none" and unablated


def settings(runs: pd.DataFrame) -> pd.Series:
    """Each run's setting label: runs of one benchmark and model that share every param
    but the rule's (NOT_SETTING) and compared with the same baseline values share one. It
    names what differs from the other settings of that benchmark and model ('split=...,
    limit=...'), or 'baseline N' where only the baseline values differ; '' where the
    benchmark and model have one setting."""
    params = [c for c in runs.columns if c.startswith("params.") and in_setting(c[7:])]
    values = runs[params].astype(object).where(runs[params].notna(), None).astype(str)
    keys = pd.Series(
        [
            (
                tuple(values.loc[i]),
                baseline_signature(run, MAIN_METRIC.get(run["params.benchmark.name"])),
            )
            for i, run in runs.iterrows()
        ],
        index=runs.index,
    )
    models = runs.get("params.model.name_or_path", pd.Series(None, index=runs.index))
    labels = pd.Series("", index=runs.index)
    models = models.astype(object).where(models.notna(), "")
    for _, members in keys.groupby([runs["params.benchmark.name"], models]):
        distinct = list(dict.fromkeys(members))
        if len(distinct) > 1:
            for n, key in enumerate(distinct, 1):
                labels[members.index[members == key]] = setting_label(params, distinct, key, n)
    return labels


def setting_label(params: list[str], distinct: list[tuple], key: tuple, n: int) -> str:
    """The params whose values differ between the distinct settings, with key's values;
    'baseline n' too where another setting has the same params but other baseline values."""
    differing = [i for i in range(len(params)) if len({k[0][i] for k in distinct}) > 1]
    parts = [f"{params[i][7:].removeprefix('benchmark.')}={key[0][i]}" for i in differing]
    if sum(other[0] == key[0] for other in distinct) > 1:
        parts.append(f"baseline {n}")
    return ", ".join(parts)


def comparison_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per benchmark x model x setting x intervention x layer range, and a baseline
    row per benchmark, model and setting (from a baseline job, or the baseline values every
    intervention job logs): each change is against the baseline the job compared with."""
    rows = []
    labels = settings(runs)
    for index, run in runs.iterrows():
        benchmark = run["params.benchmark.name"]
        model = run.get("params.model.name_or_path")
        native = MAIN_METRIC.get(benchmark)
        metric = run.filter(like="metrics.").rename(lambda name: name[len("metrics.") :]).get
        stored = storable_name(native) if native else None
        common = {
            "benchmark": benchmark,
            "model": model,
            "setting": labels[index],
            "native_metric": native,
            "gt_yes_rate": metric("gt_yes_rate"),
            "n_groups": metric("n_groups"),
        }
        rows.append(
            common
            | {
                "intervention": intervention_label(run),
                "layers": layers_label(run),
                "paired_accuracy": metric("paired_accuracy"),
                "yes_rate": metric("yes_rate"),
                "yes_bias": metric("yes_bias"),
                "accuracy": metric("accuracy"),
                "paired_accuracy_change_points": metric("paired_accuracy_change_points"),
                "paired_accuracy_change_pct": metric("paired_accuracy_change_pct"),
                "native_value": metric(stored) if native else None,
                "native_change_points": metric(f"{stored}_change_points") if native else None,
                "fraction": fraction(run),
            }
            | yes_rate_change(metric)
            | (tested(metric, benchmark) if intervention_label(run) != "baseline" else {})
        )
        if rows[-1]["intervention"] != "baseline":
            rows.append(
                common
                | {
                    "intervention": "baseline",
                    "layers": "-",
                    "paired_accuracy": metric("baseline_paired_accuracy"),
                    "yes_rate": metric("baseline_yes_rate"),
                    "yes_bias": metric("baseline_yes_bias"),
                    "accuracy": metric("baseline_accuracy"),
                    "paired_accuracy_change_points": 0.0,
                    "paired_accuracy_change_pct": 0.0,
                    "native_value": metric(f"baseline_{stored}") if native else None,
                    "native_change_points": 0.0 if rows[-1]["native_change_points"] else None,
                }
            )
    table = pd.DataFrame(rows, columns=COLUMNS)
    table["model"] = table["model"].map(model_labels(runs))
    table = table.drop_duplicates(CONDITION)
    table["baseline_first"] = table["intervention"] != "baseline"
    order = ["benchmark", "model", "setting", "baseline_first", "intervention", "layers"]
    table = table.sort_values(order)
    return table.drop(columns="baseline_first").reset_index(drop=True)


def published_rows(runs: pd.DataFrame) -> pd.DataFrame:
    """The "baseline vs published" rows of the runs (report_parity.baseline_vs_published),
    with the comparison table's setting and model labels."""
    return baseline_vs_published(runs, settings(runs), model_labels(runs), is_baseline)


def yes_rate_change(metric) -> dict:
    """An intervention run's yes-rate change against its baseline and the change's 95%
    interval (the job's yes_rate_change_ci_low/high), in points; None where not logged."""

    def points(value):
        return None if value is None or pd.isna(value) else 100 * float(value)

    now, before = metric("yes_rate"), metric("baseline_yes_rate")
    change = None if now is None or before is None else now - before
    return {
        "yes_rate_change_points": points(change),
        "yes_rate_change_ci_low_points": points(metric("yes_rate_change_ci_low")),
        "yes_rate_change_ci_high_points": points(metric("yes_rate_change_ci_high")),
    }


def fraction(run: pd.Series) -> float | None:
    """The share of the source's attention a rule moved (params.intervention.fraction,
    redistribute's dose), None for a rule without one or a baseline."""
    value = run.get("params.intervention.fraction")  # a string; NaN where not logged
    if run.get("params.intervention.name") == "none" or not isinstance(value, str):
        return None
    return None if value == "None" else float(value)


def paper_table(table: pd.DataFrame, value: str) -> pd.DataFrame:
    """The paper's table: the change in paired accuracy against the baseline (`value`:
    percent or points), one row per condition (rule and layers), one column per benchmark;
    with several models, one row per condition and model, with a model column; with
    several settings of a benchmark, one row per condition and setting, with a setting
    column."""
    edits = table[table["intervention"] != "baseline"]
    layers = edits["layers"].map(aligned_layers) if several_models(table) else edits["layers"]
    edits = edits.assign(condition=condition_names(edits["intervention"], layers))
    index = paper_index(table)
    return edits.set_index([*index, "benchmark"])[value].unstack("benchmark").reset_index()


def paper_index(table: pd.DataFrame) -> list[str]:
    return (
        ["condition"]
        + (["model"] if several_models(table) else [])
        + (["setting"] if several_settings(table) else [])
    )


def several_models(table: pd.DataFrame) -> bool:
    return table["model"].nunique(dropna=False) > 1


def several_settings(table: pd.DataFrame) -> bool:
    return bool((table["setting"] != "").any())


def paper_markdown(table: pd.DataFrame, evidence: Evidence) -> str:
    """Cells '+12.5% (+2.1 pts)', or with the change's 95% interval in points and a * where
    it is significant after correction, '+12.5% (+2.1 pts) [-0.4, +4.6]*', and a footnote
    saying what they mean; the percentage is blank where the baseline is 0."""
    index = paper_index(table)
    pct = paper_table(table, "paired_accuracy_change_pct").set_index(index)
    pts = paper_table(table, "paired_accuracy_change_points").set_index(index)
    low = paper_table(table, "change_ci_low_points").set_index(index).reindex_like(pct)
    high = paper_table(table, "change_ci_high_points").set_index(index).reindex_like(pct)
    marked = paper_table(table, "significant").set_index(index).reindex_like(pct) == "yes"
    cells = pct.copy().astype(object)
    for condition in pct.index:
        for benchmark in pct.columns:
            p, q = pct.loc[condition, benchmark], pts.loc[condition, benchmark]
            lo, hi = low.loc[condition, benchmark], high.loc[condition, benchmark]
            percent = "" if pd.isna(p) else f"{p:+.1f}% "
            ci = "" if pd.isna(lo) or pd.isna(hi) else f" [{lo:+.1f}, {hi:+.1f}]"
            mark = "*" if marked.loc[condition, benchmark] else ""
            cells.loc[condition, benchmark] = (
                "" if pd.isna(q) else f"{percent}({q:+.1f} pts){ci}{mark}"
            )
    footnote = ""
    if table["p_corrected"].notna().any():
        footnote = (
            "\nChange in paired accuracy against the baseline: percent of the baseline "
            "(points) [the paired cluster bootstrap's 95% interval of the change, points]. "
            f"{evidence.note()}.\n"
        )
    return markdown(cells.reset_index()) + footnote


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


# comparison.md: column -> (header, factor); fractions are shown in percent, changes in
# points (percentage points) or in percent of the baseline.
SHOWN = {
    "model": ("model", None),
    "setting": ("setting", None),
    "intervention": ("intervention", None),
    "layers": ("layers", None),
    "paired_accuracy": ("paired accuracy (%)", 100),
    "paired_accuracy_change_points": ("change (points)", 1),
    "paired_accuracy_change_pct": ("change (% of baseline)", 1),
    "yes_rate": ("yes-rate (%)", 100),
    "gt_yes_rate": ("ground-truth yes-rate (%)", 100),
    "yes_bias": ("yes-bias (points)", 100),
    "accuracy": ("accuracy (%)", 100),
    "native_value": ("{native}", None),
    "native_change_points": ("{native} change (points)", 1),
    "change_ci": ("change 95% CI (points)", None),
    "p_value": ("p", None),
    "p_corrected": ("p ({correction})", None),
    "significant": ("significant", None),
    "groups_fixed": ("groups fixed", None),
    "groups_broken": ("groups broken", None),
    "items_fixed": ("items fixed", None),
    "items_broken": ("items broken", None),
    "n_groups": ("groups", None),
}
COUNTS = {"n_groups", "groups_fixed", "groups_broken", "items_fixed", "items_broken"}


def comparison_markdown(table: pd.DataFrame, evidence: Evidence, summary=None) -> str:
    """comparison.md: a section per benchmark, with units in the headers and without the
    columns that are empty for that benchmark (a caption benchmark has no yes-rate, a
    yes/no one no change of its native metric, one setting no setting column, runs logged
    before statistics no test); under it, what significant means and each setting's
    power line (report_stats.observed_power); then the summary across benchmarks."""
    sections = []
    table = table.assign(change_ci=change_intervals(table))
    for benchmark, rows in table.groupby("benchmark", sort=False):
        shown = pd.DataFrame(index=rows.index)
        native = rows["native_metric"].dropna()
        native = str(native.iloc[0]) if len(native) else "native metric"
        for column, (header, factor) in SHOWN.items():
            values = rows[column]
            if values.isna().all() or (values.astype(str) == "").all():
                continue
            if factor is not None:
                values = (values.astype(float) * factor).map(
                    lambda v: "" if pd.isna(v) else f"{v:.1f}"
                )
            elif column in COUNTS:
                values = values.map(lambda v: "" if pd.isna(v) else f"{v:.0f}")
            shown[header.format(native=native, correction=evidence.correction)] = values
        sections.append(f"## {benchmark}\n\n" + markdown(shown) + benchmark_notes(rows, evidence))
    if summary is not None and len(summary):
        sections.append(summary_markdown(summary))
    return "\n".join(sections)


def change_intervals(table: pd.DataFrame) -> pd.Series:
    """'[-1.2, +3.4]': the tested change's 95% interval in points ('' where not logged)."""
    low, high = table["change_ci_low_points"], table["change_ci_high_points"]
    return pd.Series(
        [
            None if pd.isna(a) or pd.isna(b) else f"[{a:+.1f}, {b:+.1f}]"
            for a, b in zip(low, high, strict=True)
        ],
        index=table.index,
        dtype=object,
    )


def benchmark_notes(rows: pd.DataFrame, evidence: Evidence) -> str:
    """Under a benchmark's table: what significant means (where a row has a test) and the
    power line of each model and setting (where McNemar's counts were logged)."""
    notes = []
    if rows["p_corrected"].notna().any():
        notes.append(evidence.note() + ".")
    for _, part in rows.groupby([rows["model"].astype(str), rows["setting"]], sort=False):
        line = observed_power(part, evidence.alpha)
        if line:
            notes.append(line + ".")
    return "".join(f"\n{note}\n" for note in notes)


def summary_markdown(summary: pd.DataFrame) -> str:
    """The summary section: per condition, significant changes across benchmarks and the
    Wilcoxon signed-rank test (report_stats.summary_table)."""
    shown = summary.rename(
        columns={
            "benchmarks": "benchmarks tested",
            "significant_better": "significant better",
            "significant_worse": "significant worse",
            "better_on": "better on",
            "worse_on": "worse on",
            "wilcoxon_benchmarks": "benchmarks with paired accuracy",
            "wilcoxon_statistic": "Wilcoxon W",
            "wilcoxon_p": "Wilcoxon p",
            "wilcoxon_note": "Wilcoxon",
        }
    )
    if (shown["model"] == "").all():
        shown = shown.drop(columns="model")
    return (
        "## Across benchmarks\n\n"
        "Per condition: on how many benchmarks (each setting one) its change is significant "
        "after correction, for the better (paired accuracy up; chair: CHAIR_s down) or the "
        "worse; and, with changes in paired accuracy on at least 5 benchmarks, the Wilcoxon "
        "signed-rank test of those changes against 0 (Demsar 2006, JMLR 7).\n\n" + markdown(shown)
    )


def plotted(table: pd.DataFrame) -> pd.DataFrame:
    """The table with layer ranges as the plots label them: by quarter alone (aligned_layers)
    with several models, whose depths differ."""
    if not several_models(table):
        return table
    return table.assign(layers=table["layers"].map(aligned_layers))


def across_benchmarks(table: pd.DataFrame) -> pd.DataFrame:
    """summary.csv: report_stats.summary_table over the conditions as the paper's table
    names them (layer ranges by quarter alone with several models)."""
    edits = table[table["intervention"] != "baseline"]
    layers = edits["layers"].map(aligned_layers) if several_models(table) else edits["layers"]
    return summary_table(edits.assign(condition=condition_names(edits["intervention"], layers)))


# report.yaml's report section as shipped: what a caller's config leaves out (the sweep's
# end-of-sweep report sets only out and parent).
REPORT_DEFAULTS = OmegaConf.create(
    resources.files("sysattn_exp.conf").joinpath("report.yaml").read_text()
).report


def corrected_table(cfg) -> tuple[pd.DataFrame, pd.DataFrame, str | None, Evidence]:
    """cfg.report.parent's job runs (job_runs), their comparison table with its tests
    corrected (report.yaml's keys; those left out take report.yaml's values), the parent
    run and the evidence settings."""
    settings = OmegaConf.merge(REPORT_DEFAULTS, cfg.report)
    evidence = Evidence(str(settings.correction), float(settings.alpha))
    runs, parent = job_runs(cfg)
    return runs, corrected(comparison_table(runs), evidence), parent, evidence


def summarize_sweep(tracking, parent: str) -> dict[str, float]:
    """The sweep's summary on its parent run (parent_summary), without the report's files:
    a sweep without runtime.report_at_end. Returns the metrics logged."""
    tracking = OmegaConf.to_container(tracking, resolve=True)
    cfg = OmegaConf.create({"tracking": tracking, "report": {"parent": parent}})
    _, table, _, _ = corrected_table(cfg)
    mlflow, _ = connect(cfg.tracking)
    return log_summary(mlflow.MlflowClient(), parent, table)


def report(cfg) -> Path:
    """The report of cfg.report.parent's jobs (report.yaml's keys; those left out take
    report.yaml's values) into cfg.report.out, logged to the parent run with the sweep's
    summary (parent_summary); printed."""
    settings = OmegaConf.merge(REPORT_DEFAULTS, cfg.report)
    runs, table, parent, evidence = corrected_table(cfg)
    summary = across_benchmarks(table)
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "comparison.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    text = comparison_markdown(table, evidence, summary)
    text += localisation_markdown(plotted(table), evidence)  # a layer sweep's verdicts
    published, published_files = write_parity(published_rows(runs), out)
    text += published  # the baselines against the literature (report_parity)
    (out / "comparison.md").write_text(text)
    paper_table(table, "paired_accuracy_change_pct").to_csv(out / "paper_table.csv", index=False)
    (out / "paper_table.md").write_text(paper_markdown(table, evidence))
    files = [
        out / name
        for name in (
            "comparison.csv",
            "comparison.md",
            "summary.csv",
            "paper_table.csv",
            "paper_table.md",
        )
    ]
    files += published_files
    files += plots(plotted(table), out, evidence)
    files += layer_plots(plotted(table), out, evidence)
    if parent is not None:
        mlflow, _ = connect(cfg.tracking)
        client = mlflow.MlflowClient()
        for path in files:
            client.log_artifact(parent, str(path), "report")
        log_summary(client, parent, table)
    print(text)
    print(
        f"report: {out.resolve()} ({len(files)} files)"
        + (f", logged to run {parent}" if parent else "")
    )
    for path in files:
        if path.suffix == ".png":
            print(f"  {path.resolve()}")
    return out


def main() -> None:
    """`python -m sysattn_exp.report`: bad input, a composition error of Hydra's included
    (an unknown group option, a value its run directory cannot take), is one line and exit
    status 2, as for `python -m sysattn_exp`."""
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # Hydra's errors reach us, not its report
    try:
        report_app()
    except (HydraException, OmegaConfBaseException) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        sys.exit(2)


@hydra.main(version_base="1.3", config_path="pkg://sysattn_exp.conf", config_name="report")
def report_app(cfg: DictConfig) -> None:
    try:
        check_report_config(cfg)
        report(cfg)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
