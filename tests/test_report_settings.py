"""The report keeps benchmark configurations apart and compares each job with the baseline
it compared with; its plots and tables show values with units (read back from the
matplotlib artists and the files written); half-logged runs and empty sweeps are left out."""

import mlflow
import numpy as np
import pandas as pd
import pytest
from figures import record_figures
from omegaconf import OmegaConf

from sysattn_exp.experiment.report import report

NATIVE = "pope/mean_f1"


def log_job(experiment, parent, split, rule, metrics, status="FINISHED", limit=None):
    """A job run as log_job_dir logs one: params of the config, the job's metrics."""
    params = {
        "benchmark.name": "pope",
        "benchmark.split": split,
        "benchmark.limit": limit,
        "model.name_or_path": "builtin:toy",
        "model.batch_size": 8,
        "runtime.num_workers": 0,
        "intervention.name": "none" if rule is None else "redistribute",
        "job.label": "baseline" if rule is None else f"system->{rule[0].replace(',', '+')}",
    }
    if rule is not None:
        params |= {
            "intervention.source": "system",
            "intervention.recipients": rule[0],
            "layers.quarter": rule[1],
            "layers.resolved": rule[2],
        }
    tags = {"sysattn.kind": "job"} | ({"mlflow.parentRunId": parent} if parent else {})
    run = mlflow.start_run(experiment_id=experiment, tags=tags)
    mlflow.log_params(params)
    mlflow.log_metrics(metrics)
    mlflow.end_run(status)
    return run.info.run_id


def yes_no(paired, yes, gt, native, groups, base=None) -> dict:
    out = {
        "paired_accuracy": paired,
        "yes_rate": yes,
        "yes_bias": yes - gt,
        "accuracy": 0.7,
        "gt_yes_rate": gt,
        "n_groups": groups,
        NATIVE: native,
    }
    if base is not None:  # an intervention: its own baseline's values and the change
        b_paired, b_yes, b_native = base
        out |= {
            "baseline_paired_accuracy": b_paired,
            "baseline_yes_rate": b_yes,
            "baseline_yes_bias": b_yes - gt,
            "baseline_accuracy": 0.6,
            f"baseline_{NATIVE}": b_native,
            "paired_accuracy_change_points": 100 * (paired - b_paired),
            "paired_accuracy_change_pct": 100 * (paired - b_paired) / b_paired,
        }
    return out


BASE_A = (0.40, 0.65, 0.70)  # paired accuracy, yes-rate, native on split adversarial
BASE_B = (0.80, 0.52, 0.90)  # on split random


@pytest.fixture
def store(tmp_path):
    """A sweep on split adversarial (two interventions, 40 groups), one extra baseline job
    on split random outside it, a half-logged run, and a newer sweep with no jobs."""
    uri = f"sqlite:///{tmp_path}/store.db"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("s", artifact_location=tmp_path.as_uri())
    with mlflow.start_run(experiment_id=experiment, tags={"sysattn.kind": "sweep"}) as sweep:
        pass
    q4 = ("text", 4, "3")
    q1 = ("image", 1, "0")
    log_job(
        experiment, sweep.info.run_id, "adversarial", q4, yes_no(0.50, 0.61, 0.5, 0.75, 40, BASE_A)
    )
    log_job(
        experiment, sweep.info.run_id, "adversarial", q1, yes_no(0.35, 0.68, 0.5, 0.66, 40, BASE_A)
    )
    log_job(experiment, None, "random", None, yes_no(*BASE_B[:2], 0.5, BASE_B[2], 100))
    # Logging that stopped part-way (params, a metric, then FAILED): never reported.
    log_job(
        experiment, sweep.info.run_id, "adversarial", ("text", 2, "1"), {"yes_rate": 0.9}, "FAILED"
    )
    with mlflow.start_run(experiment_id=experiment, tags={"sysattn.kind": "sweep"}):
        pass  # a newer sweep whose jobs all failed: report.parent=latest skips it
    tracking = {"uri": uri, "experiment": "s", "artifact_location": str(tmp_path)}
    return tmp_path, tracking


def run_report(tmp_path, tracking, parent, monkeypatch) -> tuple[pd.DataFrame, dict]:
    """The comparison table and {plot file name: figure}, taken as report() saves them."""
    figures = record_figures(monkeypatch)
    out = tmp_path / f"report-{parent}"
    report(OmegaConf.create({"tracking": tracking, "report": {"parent": parent, "out": str(out)}}))
    return pd.read_csv(out / "comparison.csv", keep_default_na=False, na_values=[""]), figures


def test_every_change_is_against_the_baseline_of_its_own_configuration(store, monkeypatch):
    tmp_path, tracking = store
    table, _ = run_report(tmp_path, tracking, "all", monkeypatch)
    got = {
        (r.setting, r.intervention, r.layers): (r.paired_accuracy, r.yes_rate, r.native_value)
        for r in table.itertuples()
    }
    expected = {
        ("split=adversarial", "baseline", "-"): BASE_A,
        ("split=adversarial", "system->text", "q4 (3-3)"): (0.50, 0.61, 0.75),
        ("split=adversarial", "system->image", "q1 (0-0)"): (0.35, 0.68, 0.66),
        ("split=random", "baseline", "-"): BASE_B,
    }
    assert set(got) == set(expected)
    for key, values in expected.items():
        assert got[key] == pytest.approx(values), key
    change = table.set_index("layers")["paired_accuracy_change_points"]
    assert change["q4 (3-3)"] == pytest.approx(10.0) and change["q1 (0-0)"] == pytest.approx(-5.0)
    paper = pd.read_csv(tmp_path / "report-all" / "paper_table.csv")
    assert list(paper.columns) == ["condition", "setting", "pope"]
    assert set(paper["setting"]) == {"split=adversarial"}
    md = (tmp_path / "report-all" / "comparison.md").read_text()
    assert "| system->text q4 (3-3) | split=adversarial | +25.0% (+10.0 pts) |" in (
        (tmp_path / "report-all" / "paper_table.md").read_text()
    )
    assert md.startswith("## pope\n")


def test_settings_that_differ_only_by_baseline_or_limit_stay_apart(tmp_path, monkeypatch):
    """Two jobs with the same params but different baseline values (say, code versions)
    and one with another limit: three settings, each change beside its own baseline."""
    uri = f"sqlite:///{tmp_path}/store.db"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("s", artifact_location=tmp_path.as_uri())
    q4 = ("text", 4, "3")
    log_job(experiment, None, "a", q4, yes_no(0.5, 0.6, 0.5, 0.7, 10, (0.4, 0.7, 0.6)))
    log_job(experiment, None, "a", q4, yes_no(0.5, 0.6, 0.5, 0.7, 10, (0.3, 0.7, 0.6)))
    log_job(experiment, None, "a", q4, yes_no(0.5, 0.6, 0.5, 0.7, 5, (0.2, 0.7, 0.6)), limit=5)
    tracking = {"uri": uri, "experiment": "s", "artifact_location": str(tmp_path)}
    table, _ = run_report(tmp_path, tracking, "all", monkeypatch)
    base = table[table.intervention == "baseline"].set_index("setting")["paired_accuracy"]
    edit = table[table.intervention != "baseline"].set_index("setting")
    assert len(base) == 3 and set(base.index) == set(edit.index)
    for setting, value in base.items():
        points = edit.loc[setting, "paired_accuracy_change_points"]
        assert points == pytest.approx(100 * (0.5 - value)), setting
    assert base[[s for s in base.index if "limit=5" in s][0]] == pytest.approx(0.2)
    assert sum("baseline" in s for s in base.index) == 2


def test_yes_rate_plot_shows_changes_with_reference_lines(store, monkeypatch):
    tmp_path, tracking = store
    _, figures = run_report(tmp_path, tracking, "latest", monkeypatch)
    (bars,) = figures["yes_rate_pope.png"]
    assert bars["xticks"] == ["system->image q1 (0-0)", "system->text q4 (3-3)"]
    assert bars["bars"] == pytest.approx([100 * (0.68 - 0.65), 100 * (0.61 - 0.65)])
    assert bars["texts"] == ["+3.0", "-4.0"]
    assert bars["lines"] == pytest.approx({"baseline 65.0%": 0.0, "ground truth 50.0%": -15.0})
    low, high = bars["ylim"]
    assert low < -15.0 and high > 3.0 and high - low < 30  # zoomed on what is drawn
    assert bars["ylabel"] == "yes-rate change vs baseline (points)"
    (heat,) = figures["heatmap_pope.png"]
    assert heat["xlabel"] == "40 groups: one group = 2.5 points"
    assert sorted(heat["texts"]) == ["+10.0", "-5.0"]
    assert (heat["yticks"], heat["xticks"]) == (
        ["q1 (0-0)", "q4 (3-3)"],
        ["system->image", "system->text"],
    )
    grid = np.array([[-5.0, np.nan], [np.nan, 10.0]])  # points vs the baseline's 40%
    assert heat["images"][0] == pytest.approx(grid, nan_ok=True)


def test_markdown_has_units_and_no_empty_columns(store, monkeypatch):
    tmp_path, tracking = store
    run_report(tmp_path, tracking, "latest", monkeypatch)
    md = (tmp_path / "report-latest" / "comparison.md").read_text().splitlines()
    header = [h.strip() for h in md[2].strip("|").split("|")]
    assert header == [
        "model",
        "intervention",
        "layers",
        "paired accuracy (%)",
        "change (points)",
        "change (% of baseline)",
        "yes-rate (%)",
        "ground-truth yes-rate (%)",
        "yes-bias (points)",
        "accuracy (%)",
        NATIVE,
        "groups",
    ]
    baseline = [c.strip() for c in md[4].strip("|").split("|")]
    assert baseline == [
        "builtin:toy",
        "baseline",
        "-",
        "40.0",
        "0.0",
        "0.0",
        "65.0",
        "50.0",
        "15.0",
    ] + [
        "60.0",
        "0.7",
        "40",
    ]
