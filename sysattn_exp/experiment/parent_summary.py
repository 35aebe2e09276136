"""What a sweep found, on its parent run: the row a sweep collapses into in the MLflow runs
table. Logged when the sweep ends (callbacks.SweepTracking) and again whenever the report
runs on it (report.report), from the report's comparison table (report.comparison_table,
corrected by report_stats.corrected): the same figures as comparison.csv.

Per benchmark (with several models or settings in the table: per benchmark, model and
setting), under the prefix summary/<benchmark>[/<model>][/<setting>] (storable_name:
characters MLflow refuses become '_'):

- metrics baseline_paired_accuracy and baseline_yes_rate (fractions, as the jobs log
  them; the caption benchmark chair: baseline_chair_s);
- n_conditions: the conditions (rows other than the baseline);
- best_paired_accuracy_change_points (chair: best_chair_s_change_points, lowest is best)
  and best_yes_rate_change_points: the change of the condition whose tested change
  (report_stats.change_of) is best; ties go to the first in the report's order;
- n_significant: how many conditions' changes are significant after the report's
  correction, only where some condition has a test (runs logged before statistics have
  none);
- the tag summary/<...>/best_condition: that condition as the report's paper table names
  it ('system->text q4 (6-7)', labels.condition_names)."""

import time

import pandas as pd

from sysattn_exp.experiment.labels import condition_names
from sysattn_exp.experiment.report_stats import CAPTION_BENCHMARK, change_of
from sysattn_exp.experiment.tracking import storable_name

PREFIX = "summary"


def summary_prefix(part: tuple, several_models: bool) -> str:
    """summary/<benchmark>[/<model>][/<setting>] as MLflow accepts it (the setting label is
    '' where the benchmark and model have one setting: report.settings)."""
    benchmark, model, setting = part
    names = [benchmark] + ([model] if several_models else []) + ([setting] if setting else [])
    return storable_name("/".join([PREFIX, *map(str, names)]))


def summary(table: pd.DataFrame) -> tuple[dict[str, float], dict[str, str]]:
    """The parent run's summary metrics and tags (the module's docstring) from the
    report's corrected comparison table."""
    metrics, tags = {}, {}
    models = table["model"].astype(str)
    several_models = models.nunique() > 1
    for part, rows in table.groupby([table["benchmark"], models, table["setting"]], sort=False):
        prefix = summary_prefix(part, several_models)
        found, best = part_summary(rows)
        metrics |= {f"{prefix}/{name}": value for name, value in found.items()}
        if best is not None:
            tags[f"{prefix}/best_condition"] = best
    return metrics, tags


def part_summary(rows: pd.DataFrame) -> tuple[dict[str, float], str | None]:
    """One benchmark's (model's, setting's) metrics and its best condition's name."""
    caption = rows["benchmark"].iloc[0] == CAPTION_BENCHMARK
    baseline = rows[rows["intervention"] == "baseline"]
    edits = rows[rows["intervention"] != "baseline"]
    found = {}
    if len(baseline):
        base = baseline.iloc[0]
        values = {"chair_s": base["native_value"]} if caption else {}
        values |= {"paired_accuracy": base["paired_accuracy"], "yes_rate": base["yes_rate"]}
        found |= {f"baseline_{k}": float(v) for k, v in values.items() if pd.notna(v)}
    found["n_conditions"] = float(len(edits))
    if edits["p_corrected"].notna().any():
        found["n_significant"] = float((edits["significant"] == "yes").sum())
    change = change_of(edits).astype(float)
    gain = -change if caption else change  # CHAIR_s: lower is better
    if gain.notna().any():
        best = edits.loc[gain.idxmax()]
        tested = "chair_s" if caption else "paired_accuracy"
        found[f"best_{tested}_change_points"] = float(change[best.name])
        if pd.notna(best["yes_rate_change_points"]):
            found["best_yes_rate_change_points"] = float(best["yes_rate_change_points"])
        name = condition_names(
            edits.loc[[best.name], "intervention"], edits.loc[[best.name], "layers"]
        )
        return found, str(name.iloc[0])
    return found, None


def log_summary(client, parent: str, table: pd.DataFrame) -> dict[str, float]:
    """Log summary(table) to the parent run (one batch); returns the metrics."""
    from mlflow.entities import Metric, RunTag

    metrics, tags = summary(table)
    now = int(time.time() * 1000)
    client.log_batch(
        parent,
        metrics=[Metric(key, value, now, 0) for key, value in metrics.items()],
        tags=[RunTag(key, value) for key, value in tags.items()],
    )
    return metrics
