"""The report's table from known runs in a real MLflow store, through its CLI."""

import subprocess
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest
from figures import pixels, record_figures
from omegaconf import OmegaConf

from sysattn_exp.experiment.report import report

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


@pytest.fixture(scope="module")
def known_runs(tmp_path_factory):
    """One store of the known runs for the module (creating one costs seconds): its URI
    and the sweep's parent run id. Reports only add artifacts to the parent."""
    root = tmp_path_factory.mktemp("known")
    uri = f"sqlite:///{root}/store.db"
    return uri, log_known_runs(uri, root / "artifacts")


def titles_and_rows(figure: list[dict]) -> list[tuple]:
    """(panel title, row labels) of each panel of a recorded figure."""
    return [(p["title"], p["yticks"]) for p in figure]


def test_report_table_plots_and_parent_artifacts(known_runs, tmp_path, monkeypatch):
    uri, parent = known_runs
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
    assert (out / "comparison.md").read_text().startswith("## naturalbench\n")
    # The CLI's plots are, pixel for pixel, those report() draws in this process from the
    # same runs, whose artists show the logged values (changes in points vs baseline).
    figures = record_figures(monkeypatch)
    tracking = {"uri": uri, "experiment": "study", "artifact_location": str(tmp_path)}
    again = tmp_path / "again"
    report(OmegaConf.create({"tracking": tracking, "report": {"parent": parent, "out": again}}))
    plots = {f"{p}_{b}.png" for p in ("heatmap", "yes_rate") for b in NATIVE}
    assert set(figures) == plots == {p.name for p in out.glob("*.png")}
    for name in plots:
        assert (pixels(out / name) == pixels(again / name)).all(), name
    (heat,) = figures["heatmap_naturalbench.png"]
    assert heat["yticks"] == ["q1 (0-7)", "q4 (24-31)"]
    assert heat["xticks"] == ["system->image+text", "system->text"]
    grid = np.array([[np.nan, -2.0], [5.0, 10.0]])  # q1 has no system->image+text job
    assert heat["images"][0] == pytest.approx(grid, nan_ok=True)
    assert heat["texts"] == ["-2.0", "+5.0", "+10.0"]
    (heat,) = figures["heatmap_winoground.png"]
    assert heat["images"][0] == pytest.approx(np.array([[5.0]])) and heat["texts"] == ["+5.0"]
    (bars,) = figures["yes_rate_naturalbench.png"]
    assert bars["xticks"] == [
        "system->image+text q4 (24-31)",
        "system->text q1 (0-7)",
        "system->text q4 (24-31)",
    ]
    assert bars["bars"] == pytest.approx([-20.0, -10.0, -25.0])  # yes-rate 80% at baseline
    assert bars["lines"] == pytest.approx({"baseline 80.0%": 0.0})
    (bars,) = figures["yes_rate_winoground.png"]
    assert bars["bars"] == pytest.approx([-40.0]) and bars["texts"] == ["-40.0"]
    artifacts = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(parent, "report")}
    assert {"report/comparison.csv", "report/heatmap_naturalbench.png"} <= artifacts


def test_report_latest_sweep_and_bad_parent(known_runs, tmp_path, monkeypatch):
    uri, _ = known_runs
    figures = record_figures(monkeypatch)
    # report.parent=latest is resolved by report() itself: in this process.
    tracking = {"uri": uri, "experiment": "study", "artifact_location": str(tmp_path)}
    report(
        OmegaConf.create(
            {"tracking": tracking, "report": {"parent": "latest", "out": str(tmp_path / "r")}}
        )
    )
    assert len(pd.read_csv(tmp_path / "r" / "comparison.csv")) == 6
    # One model: one panel per plot, titled as before, and no model column in the paper's table.
    assert titles_and_rows(figures["heatmap_naturalbench.png"]) == [
        ("naturalbench: paired accuracy vs baseline (points)", ["q1 (0-7)", "q4 (24-31)"])
    ]
    assert set(figures) == {f"{p}_{b}.png" for p in ("heatmap", "yes_rate") for b in NATIVE}
    assert all(len(axes) == 1 for axes in figures.values())
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
    figures = record_figures(monkeypatch)
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
    # A panel per model, on the same rows: the small model's q4 beside the big one's,
    # coloured by its change against its own baseline, on one colour scale.
    heat = figures["heatmap_naturalbench.png"]
    assert titles_and_rows(heat) == [(big, ["q1", "q4"]), (small, ["q1", "q4"])]
    assert [p["xticks"] for p in heat] == [["system->text"]] * 2
    assert heat[0]["images"][0] == pytest.approx(np.array([[-10.0], [10.0]]))
    assert heat[1]["images"][0] == pytest.approx(np.array([[np.nan], [5.0]]), nan_ok=True)
    assert [p["texts"] for p in heat] == [["-10.0", "+10.0"], ["+5.0"]]
    bars = figures["yes_rate_naturalbench.png"]
    assert [p["title"] for p in bars] == [big, small]
    assert [p["xticks"] for p in bars] == [["system->text q1", "system->text q4"]] * 2
    # Yes-rate 60% in every job against 70% at the baselines; the small model has no q1.
    assert bars[0]["bars"] == pytest.approx([-10.0, -10.0])
    assert bars[1]["bars"] == pytest.approx([np.nan, -10.0], nan_ok=True)
    assert [p["lines"] for p in bars] == [{"baseline 70.0%": 0.0}] * 2
    assert {p.name for p in (tmp_path / "report").glob("*.png")} == set(figures)


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
