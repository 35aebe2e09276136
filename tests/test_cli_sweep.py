"""The demo: +sweep=quarters on the tiny model and the toy benchmark, through the real CLI
(on 4 of its 36 groups: the grid, not the item count, is what is tested)."""

import mlflow
import pandas as pd
import pytest
import yaml
from cli import SHARED_METRICS, read_metrics, run_cli

COLUMNS = [
    "item_id",
    "group_id",
    "image_id",
    "question",
    "prompt",
    "label",
    "yes_logit",
    "no_logit",
    "p_yes",
    "pred",
    "correct",
]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("sweep")
    result = run_cli("+sweep=quarters", "model=tiny", "benchmark=toy", "benchmark.limit=4", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep_dir,) = (cwd / "outputs" / "multiruns").iterdir()
    return cwd, sweep_dir, result


def test_twelve_jobs_cover_the_grid(sweep):
    _, sweep_dir, _ = sweep
    jobs = sorted(sweep_dir.glob("job*"))
    assert len(jobs) == 12
    conditions = set()
    for job in jobs:
        config = yaml.safe_load((job / "config.yaml").read_text())
        assert config["intervention"]["source"] == "system"
        conditions.add(
            (tuple(config["layers"]["resolved"]), tuple(config["intervention"]["recipients"]))
        )
    # The tiny model has 8 decoder layers: quarters of 2.
    quarters = [tuple(range(2 * q, 2 * q + 2)) for q in range(4)]
    recipients = [("image",), ("text",), ("image", "text")]
    assert conditions == {(q, r) for q in quarters for r in recipients}


def test_each_job_writes_predictions_and_metrics(sweep):
    _, sweep_dir, _ = sweep
    baselines = set()
    for job in sorted(sweep_dir.glob("job*")):
        predictions = pd.read_parquet(job / "predictions.parquet")
        assert list(predictions.columns) == COLUMNS
        assert len(predictions) == 8
        assert predictions["label"].dtype == bool and predictions["pred"].dtype == bool
        assert (predictions["pred"] == (predictions["yes_logit"] > predictions["no_logit"])).all()
        assert predictions["p_yes"].between(0, 1).all()
        assert predictions["prompt"].str.endswith("Please answer yes or no. ASSISTANT:").all()
        assert predictions["prompt"].str.startswith("A chat between a curious user").all()
        metrics = read_metrics(job)
        for name in SHARED_METRICS:
            assert f"baseline_{name}" in metrics
        assert metrics["n_items"] == 8 and metrics["n_groups"] == 4
        assert metrics["scoring_seconds"] > 0
        assert metrics["items_per_second"] == pytest.approx(8 / metrics["scoring_seconds"])
        assert metrics["gt_yes_rate"] == 0.5
        assert metrics["paired_accuracy"] == pytest.approx(
            predictions.groupby("group_id")["correct"].all().mean()
        )
        assert metrics["yes_rate"] == pytest.approx(predictions["pred"].mean())
        baselines.add(tuple(metrics[f"baseline_{name}"] for name in SHARED_METRICS))
    assert len(baselines) == 1, "every job must report the same baseline"


def test_baseline_computed_once_and_results_announced(sweep):
    _, sweep_dir, result = sweep
    output = result.stdout + result.stderr
    # The first job computes the baseline into the score cache; the others read it.
    assert output.count("baseline: 8 of 8 items computed") == 1
    assert output.count("baseline: 0 of 8 items computed") == 11
    assert output.count("loading builtin:tiny") == 1, "jobs of one sweep share the model"
    assert str(sweep_dir) in result.stdout
    assert "mlflow ui --backend-store-uri sqlite:///" in result.stdout


def test_mlflow_has_one_run_per_job(sweep):
    cwd, sweep_dir, _ = sweep
    mlflow.set_tracking_uri(f"sqlite:///{cwd}/outputs/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["sysattn"], output_format="list")
    (parent,) = [r for r in runs if r.data.tags.get("sysattn.kind") == "sweep"]
    runs = [r for r in runs if r.data.tags.get("sysattn.kind") == "job"]
    assert len(runs) == 12
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent.info.run_id}
    by_layers = {}
    for run in runs:
        params, metrics = run.data.params, run.data.metrics
        assert params["intervention.source"] == "system"
        assert params["model.name_or_path"] == "builtin:tiny"
        by_layers.setdefault(params["layers.resolved"], []).append(run)
        assert "paired_accuracy" in metrics and "baseline_paired_accuracy" in metrics
        artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
        assert {"predictions.parquet", "metrics.json", "config.yaml"} <= artifacts
    assert sorted(by_layers) == ["0,1", "2,3", "4,5", "6,7"]
    job_metrics = sorted(read_metrics(j)["paired_accuracy"] for j in sweep_dir.glob("job*"))
    assert sorted(r.data.metrics["paired_accuracy"] for r in runs) == pytest.approx(job_metrics)


def test_the_sweep_ends_with_its_report(sweep):
    """runtime.report_at_end (set by +sweep=quarters): the table and the plots' paths."""
    _, sweep_dir, result = sweep
    heatmap = sweep_dir / "report" / "heatmap_toy.png"
    assert heatmap.is_file() and f"  {heatmap.resolve()}" in result.stdout
    table = (sweep_dir / "report" / "comparison.md").read_text()
    conditions = table.split("## Across benchmarks")[0]  # the summary names them again
    assert conditions.count("system->") == 12 and table in result.stdout
