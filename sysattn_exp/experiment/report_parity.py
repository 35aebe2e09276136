"""The report's "baseline vs published" table: each baseline of the report (a baseline
job's values, or the baseline values an intervention job logged as baseline_<metric>)
compared with the published figures for its model and benchmark (parity.py), one row per
model, benchmark, setting and metric. Written as baseline_vs_published.csv and a section
of comparison.md, where at least one baseline has a published figure."""

import logging
from pathlib import Path

import pandas as pd

from sysattn_exp.errors import UsageError
from sysattn_exp.experiment.parity import (
    Comparison,
    Entry,
    entries_for,
    fmt,
    load_table,
    metric_value,
    tag,
)
from sysattn_exp.experiment.tracking import storable_name

log = logging.getLogger(__name__)

COLUMNS = [
    "benchmark",
    "model",
    "setting",
    "metric",
    "baseline",
    "published",
    "delta",
    "tolerance",
    "parity",
    "published_as",
    "source",
    "note",
]


def run_settings(run: pd.Series) -> dict:
    """A run's params by config key ("model.name_or_path": ...), as parity compares them."""
    return {
        name[len("params.") :]: value
        for name, value in run.items()
        if name.startswith("params.") and isinstance(value, str)
    }


def logged_value(run: pd.Series, entry: Entry, prefix: str) -> float | None:
    """The run's value of the entry's metric (parity.metric_value: a sum for "a+b"), from
    its logged metrics (prefix "baseline_" for an intervention run's baseline); None where
    one is missing."""
    logged = {name: run.get(f"metrics.{prefix}{storable_name(name)}") for name in entry.metrics}
    return metric_value(logged, entry)


def run_table(run: pd.Series, tables: dict) -> list[Entry]:
    """The published table the run was compared with (its runtime.published_table; the
    shipped one where it has none), loaded once per file into `tables`. A file that can no
    longer be read (moved or deleted since the job, or relative to another folder) leaves
    its runs out of the section with a warning: the rest of the report does not need it."""
    path = run.get("params.runtime.published_table")
    path = None if not isinstance(path, str) or path == "None" else path
    if path not in tables:
        try:
            tables[path] = load_table(path)
        except UsageError as error:
            log.warning("baseline vs published: runs compared with %s left out: %s", path, error)
            tables[path] = []
    return tables[path]


def baseline_vs_published(
    runs: pd.DataFrame, settings: pd.Series, models: dict, baseline
) -> pd.DataFrame:
    """The table's rows for `runs` (report.job_runs), with each run's setting label
    (report.settings), the model labels (report.model_labels) and `baseline(run)`, whether
    a run is a baseline job (report.is_baseline). Each run is compared with the table its
    job was run with (run_table)."""
    rows, tables = [], {}
    for index, run in runs.iterrows():
        prefix = "" if baseline(run) else "baseline_"
        for entry in entries_for(run_table(run, tables), run_settings(run)):
            found = Comparison(entry, logged_value(run, entry, prefix))
            model = run.get("params.model.name_or_path")
            rows.append(
                {
                    "benchmark": entry.benchmark,
                    "model": models.get(model, model),
                    "setting": settings[index],
                    "metric": entry.metric,
                    "baseline": found.value,
                    "published": entry.figure,
                    "delta": found.delta,
                    "tolerance": entry.tolerance,
                    "parity": tag([found]),
                    "published_as": entry.published_as,
                    "source": entry.source,
                    "note": entry.note or "",
                }
            )
    frame = pd.DataFrame(rows, columns=COLUMNS)
    return frame.drop_duplicates(["benchmark", "model", "setting", "metric"]).reset_index(drop=True)


def write_parity(rows: pd.DataFrame, out: Path) -> tuple[str, list[Path]]:
    """comparison.md's "Baseline vs published" section and baseline_vs_published.csv
    ('' and no file where no baseline has a published figure)."""
    if rows.empty:
        return "", []
    path = out / "baseline_vs_published.csv"
    rows.to_csv(path, index=False)
    lines = [
        "| benchmark | model | setting | metric | baseline | published | delta | tolerance "
        "| parity | source |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows.itertuples(index=False):
        label = f" ({row.note})" if row.note else ""
        lines.append(
            f"| {row.benchmark} | {row.model} | {row.setting} | {row.metric} | "
            f"{fmt(row.baseline)} | {fmt(row.published)} | {fmt(row.delta, '+')} | "
            f"{fmt(row.tolerance)} | {row.parity}{label} | {row.published_as}: {row.source} |"
        )
    text = (
        "\n## Baseline vs published\n\n"
        "Each baseline against the published figure for its model and benchmark, in this "
        "tool's units (sysattn_exp/data/published.yaml; README, \"Does my baseline match "
        'the literature?"): delta = baseline - published; match: |delta| <= tolerance.\n\n'
        + "\n".join(lines)
        + "\n"
    )
    return text, [path]
