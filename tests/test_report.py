"""The report's table from known runs in a real MLflow store, through its CLI."""

import subprocess
import sys

import mlflow
import pandas as pd
import pytest
from omegaconf import OmegaConf

import sysattn_exp.report
from sysattn_exp.report import report

JOBS = [  # (benchmark, recipients, quarter, layers, paired, yes_rate, native)
    ("naturalbench", "text", 4, "24,25,26,27,28,29,30,31", 0.30, 0.55, 0.30),
    ("naturalbench", "image,text", 4, "24,25,26,27,28,29,30,31", 0.25, 0.60, 0.25),
    ("naturalbench", "text", 1, "0,1,2,3,4,5,6,7", 0.18, 0.70, 0.18),
    ("winoground", "text", 4, "24,25,26,27,28,29,30,31", 0.10, 0.50, 0.07),
]
BASELINE = {"naturalbench": (0.20, 0.80, 0.20), "winoground": (0.05, 0.90, 0.04)}
NATIVE = {"naturalbench": "naturalbench/yesno_g_acc", "winoground": "winoground/group_score"}


def log_known_runs(uri: str, artifacts) -> str:
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("study", artifact_location=artifacts.as_uri())
    with mlflow.start_run(experiment_id=experiment, tags={"sysattn.kind": "sweep"}) as parent:
        pass
    for benchmark, recipients, quarter, layers, paired, yes_rate, native in JOBS:
        base_paired, base_yes, base_native = BASELINE[benchmark]
        with mlflow.start_run(
            experiment_id=experiment, parent_run_id=parent.info.run_id, tags={"sysattn.kind": "job"}
        ):
            mlflow.log_params(
                {
                    "benchmark.name": benchmark,
                    "intervention.name": "redistribute",
                    "intervention.source": "system",
                    "intervention.recipients": recipients,
                    "job.label": f"system->{recipients.replace(',', '+')}",
                    "layers.quarter": quarter,
                    "layers.resolved": layers,
                }
            )
            mlflow.log_metrics(
                {
                    "paired_accuracy": paired,
                    "yes_rate": yes_rate,
                    "yes_bias": yes_rate - 0.5,
                    "accuracy": 0.6,
                    "paired_accuracy_change_points": 100 * (paired - base_paired),
                    "paired_accuracy_change_pct": 100 * (paired - base_paired) / base_paired,
                    NATIVE[benchmark]: native,
                    "baseline_paired_accuracy": base_paired,
                    "baseline_yes_rate": base_yes,
                    "baseline_yes_bias": base_yes - 0.5,
                    "baseline_accuracy": 0.5,
                    f"baseline_{NATIVE[benchmark]}": base_native,
                }
            )
    # A run of another sweep, which the report must leave out.
    with mlflow.start_run(experiment_id=experiment, tags={"sysattn.kind": "job"}):
        mlflow.log_params({"benchmark.name": "mme", "intervention.name": "none"})
    return parent.info.run_id


def record_panels(monkeypatch) -> dict:
    """{plot file name: [(panel title, row labels), ...]}, taken as report() saves each plot."""
    panels, save = {}, sysattn_exp.report.save

    def recording_save(fig, path):
        axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
        # The row labels, also of panels that share the first one's and do not show them.
        rows = [ax.yaxis.get_major_formatter().format_ticks(ax.get_yticks()) for ax in axes]
        panels[path.name] = [(ax.get_title(), r) for ax, r in zip(axes, rows, strict=True)]
        return save(fig, path)

    monkeypatch.setattr(sysattn_exp.report, "save", recording_save)
    return panels


def test_report_table_plots_and_parent_artifacts(tmp_path):
    uri = f"sqlite:///{tmp_path}/store.db"
    parent = log_known_runs(uri, tmp_path / "artifacts")
    out = tmp_path / "report"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sysattn_exp.report",
            f"tracking.uri={uri}",
            "tracking.experiment=study",
            f"report.parent={parent}",
            f"report.out={out}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = pd.read_csv(out / "comparison.csv")
    assert len(table) == 6  # 4 conditions and a baseline per benchmark; not the mme run
    row = table[
        (table.benchmark == "naturalbench")
        & (table.intervention == "system->text")
        & (table.layers == "q4 (24-31)")
    ].iloc[0]
    assert row.paired_accuracy == pytest.approx(0.30)
    assert row.paired_accuracy_change_points == pytest.approx(10.0)
    assert row.paired_accuracy_change_pct == pytest.approx(50.0)
    assert row.native_metric == NATIVE["naturalbench"]
    assert row.native_value == pytest.approx(0.30)
    both = table[(table.intervention == "system->image+text")].iloc[0]
    assert both.paired_accuracy_change_points == pytest.approx(5.0)
    base = table[(table.benchmark == "winoground") & (table.intervention == "baseline")].iloc[0]
    assert (base.paired_accuracy, base.yes_rate, base.native_value) == pytest.approx(
        (0.05, 0.90, 0.04)
    )
    assert list(table.intervention[table.benchmark == "naturalbench"])[0] == "baseline"
    for name in (
        "comparison.md",
        "heatmap_naturalbench.png",
        "heatmap_winoground.png",
        "yes_rate_winoground.png",
    ):
        assert (out / name).stat().st_size > 0, name
    artifacts = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(parent, "report")}
    assert {"report/comparison.csv", "report/heatmap_naturalbench.png"} <= artifacts


def test_report_latest_sweep_and_bad_parent(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/store.db"
    log_known_runs(uri, tmp_path / "artifacts")
    panels = record_panels(monkeypatch)
    # report.parent=latest is resolved by report() itself: in this process.
    tracking = {"uri": uri, "experiment": "study", "artifact_location": str(tmp_path)}
    report(
        OmegaConf.create(
            {"tracking": tracking, "report": {"parent": "latest", "out": str(tmp_path / "r")}}
        )
    )
    assert len(pd.read_csv(tmp_path / "r" / "comparison.csv")) == 6
    # One model: one panel per plot, titled as before, and no model column in the paper's table.
    assert panels["heatmap_naturalbench.png"] == [
        ("naturalbench: paired accuracy vs baseline (points)", ["q1 (0-7)", "q4 (24-31)"])
    ]
    assert set(panels) == {f"{p}_{b}.png" for p in ("heatmap", "yes_rate") for b in NATIVE}
    assert all(len(axes) == 1 for axes in panels.values())
    paper = pd.read_csv(tmp_path / "r" / "paper_table.csv")
    assert list(paper.columns) == ["condition", "naturalbench", "winoground"]
    assert "system->text q4 (24-31)" in set(paper.condition)
    # A bad parent through the CLI: one line and exit status 2.
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "sysattn_exp.report",
            f"tracking.uri={uri}",
            "tracking.experiment=study",
            "report.parent=abc",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: report.parent=abc")
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


def test_report_compares_models_side_by_side(tmp_path, monkeypatch):
    """Two models of different depth (8 and 4 decoder layers), the same benchmark and
    condition, in one store without a sweep: neither model's rows replace the other's, each
    gets a readable label, and their q4 shares a row in the paper's table and the heatmap,
    which has a panel per model."""
    uri = f"sqlite:///{tmp_path}/store.db"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("models", artifact_location=tmp_path.as_uri())
    jobs = [  # (name_or_path, depth logged, quarter, layers, paired, baseline paired)
        ("llava-hf/llava-1.5-7b-hf", 8, 4, "6,7", 0.30, 0.20),
        ("llava-hf/llava-1.5-7b-hf", 8, 1, "0,1", 0.10, 0.20),
        ("/ckpt/tiny-qwen2-vl/", None, 4, "3", 0.45, 0.40),
    ]
    for model, depth, quarter, layers, paired, base in jobs:
        with mlflow.start_run(experiment_id=experiment, tags={"sysattn.kind": "job"}):
            mlflow.log_params(
                {
                    "benchmark.name": "naturalbench",
                    "model.name_or_path": model,
                    "intervention.name": "redistribute",
                    "intervention.source": "system",
                    "intervention.recipients": "text",
                    "job.label": "system->text",
                    "layers.quarter": quarter,
                    "layers.resolved": layers,
                }
                | ({"layers.depth": depth} if depth else {})
            )
            mlflow.log_metrics(
                {
                    "paired_accuracy": paired,
                    "yes_rate": 0.6,
                    "baseline_yes_rate": 0.7,
                    "paired_accuracy_change_points": 100 * (paired - base),
                    "paired_accuracy_change_pct": 100 * (paired - base) / base,
                    "baseline_paired_accuracy": base,
                }
            )
    panels = record_panels(monkeypatch)
    cfg = OmegaConf.create(
        {
            "tracking": {"uri": uri, "experiment": "models", "artifact_location": str(tmp_path)},
            "report": {"parent": "all", "out": str(tmp_path / "report")},
        }
    )
    report(cfg)
    big, small = "llava-1.5-7b-hf (8 layers)", "tiny-qwen2-vl"
    table = pd.read_csv(tmp_path / "report" / "comparison.csv")
    got = {(r.model, r.intervention, r.layers): r.paired_accuracy for r in table.itertuples()}
    assert got == pytest.approx(
        {
            (big, "baseline", "-"): 0.20,
            (big, "system->text", "q1 (0-1)"): 0.10,
            (big, "system->text", "q4 (6-7)"): 0.30,
            (small, "baseline", "-"): 0.40,
            (small, "system->text", "q4 (3-3)"): 0.45,
        }
    )
    paper = pd.read_csv(tmp_path / "report" / "paper_table.csv")
    assert list(paper.columns) == ["condition", "model", "naturalbench"]
    assert paper.set_index(["condition", "model"])["naturalbench"].to_dict() == pytest.approx(
        {
            ("system->text q1", big): -50.0,
            ("system->text q4", big): 50.0,
            ("system->text q4", small): 12.5,
        }
    )
    assert "| system->text q4 | tiny-qwen2-vl | +12.5% (+5.0 pts) |" in (
        (tmp_path / "report" / "paper_table.md").read_text()
    )
    # A panel per model, on the same rows: the small model's q4 beside the big one's.
    assert panels["heatmap_naturalbench.png"] == [(big, ["q1", "q4"]), (small, ["q1", "q4"])]
    assert [title for title, _ in panels["yes_rate_naturalbench.png"]] == [big, small]
    for name in ("heatmap_naturalbench.png", "yes_rate_naturalbench.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0


def test_runs_logged_before_the_label_take_it_from_their_run_name(tmp_path):
    """Runs logged by versions that did not log job.label: the rule's label is the rule
    part of the run name they were logged under (identity.run_name), whatever their params."""
    uri = f"sqlite:///{tmp_path}/store.db"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("old", artifact_location=tmp_path.as_uri())
    jobs = [  # (run name, quarter, layers, paired)
        ("pope system->image+text f=0.5 uniform layers 6-7", 4, "6,7", 0.30),
        ("pope profile PAI a=0.2 cfg=1.1 layers 2-7", None, "2,3,4,5,6,7", 0.25),
        ("pope imagex2 layers 0-7", None, "0,1,2,3,4,5,6,7", 0.22),
    ]
    for name, quarter, layers, paired in jobs:
        with mlflow.start_run(
            experiment_id=experiment, run_name=name, tags={"sysattn.kind": "job"}
        ):
            params = {"intervention.name": "redistribute", "intervention.source": "text"}
            mlflow.log_params(
                {"benchmark.name": "pope", "layers.quarter": quarter, "layers.resolved": layers}
                | params
            )
            mlflow.log_metrics({"paired_accuracy": paired, "baseline_paired_accuracy": 0.2})
    cfg = OmegaConf.create(
        {
            "tracking": {"uri": uri, "experiment": "old", "artifact_location": str(tmp_path)},
            "report": {"parent": "all", "out": str(tmp_path / "report")},
        }
    )
    report(cfg)
    table = pd.read_csv(tmp_path / "report" / "comparison.csv")
    assert dict(zip(table.intervention, table.paired_accuracy, strict=True)) == pytest.approx(
        {
            "baseline": 0.2,
            "system->image+text f=0.5 uniform": 0.30,
            "PAI a=0.2 cfg=1.1": 0.25,
            "imagex2": 0.22,
        }
    )
