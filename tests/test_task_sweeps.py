"""+sweep=quarters and its report through the real CLI with the newer kinds of job: POPE
answered by generation (scoring.mode=generate), and +task=caption scored with CHAIR."""

import mlflow
import pandas as pd
import pytest
from benchmark_fixtures import write_pope
from cli import read_metrics, run_cli
from test_caption_job import write_coco


def quarters(cwd, *overrides):
    result = run_cli("+sweep=quarters", "model=tiny", *overrides, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep_dir,) = (cwd / "outputs" / "multiruns").iterdir()
    jobs = sorted(sweep_dir.glob("job*"))
    assert len(jobs) == 12 and all((job / "metrics.json").exists() for job in jobs)
    return sweep_dir, jobs, result


def reported(sweep_dir, result, benchmark: str) -> pd.DataFrame:
    """The sweep's own report: its table printed, its heatmap written and named."""
    report = sweep_dir / "report"
    heatmap = report / f"heatmap_{benchmark}.png"
    assert heatmap.is_file() and str(heatmap.resolve()) in result.stdout
    table = pd.read_csv(report / "comparison.csv")
    assert set(table["benchmark"]) == {benchmark}
    assert (table["intervention"] == "baseline").sum() == 1 and len(table) == 13
    return table


def test_pope_by_generation(tmp_path_factory):
    data = tmp_path_factory.mktemp("pope")
    write_pope(data)
    cwd = tmp_path_factory.mktemp("pope_sweep")
    sweep_dir, jobs, result = quarters(
        cwd,
        "benchmark=pope",
        f"benchmark.data_dir={data / 'coco'}",
        f"benchmark.image_dir={data / 'val2014'}",
        "benchmark.subsets=[random]",
        "scoring.mode=generate",
        "scoring.max_new_tokens=2",
    )
    for job in jobs:
        predictions = pd.read_parquet(job / "predictions.parquet")
        assert set(predictions["answer"]) <= {"yes", "no", "unknown"}
        assert (predictions["pred"] == (predictions["answer"] == "yes")).all()
        metrics = read_metrics(job)
        assert {"unknown_rate", "pope/random/f1", "baseline_pope/mean_f1"} <= metrics.keys()
    table = reported(sweep_dir, result, "pope")
    assert set(table["native_metric"]) == {"pope/mean_f1"}
    assert table["paired_accuracy_change_points"].notna().all()


def test_captions_scored_with_chair(tmp_path_factory):
    data = write_coco(tmp_path_factory.mktemp("coco") / "coco")
    cwd = tmp_path_factory.mktemp("caption_sweep")
    sweep_dir, jobs, result = quarters(
        cwd,
        "+task=caption",
        f"caption.data_dir={data}",
        "caption.limit=2",
        "caption.max_new_tokens=4",
    )
    for job in jobs:
        captions = pd.read_parquet(job / "predictions.parquet")
        assert len(captions) == 2 and captions["caption"].map(type).eq(str).all()
        metrics = read_metrics(job)
        assert metrics["chair_s_change_points"] == pytest.approx(
            100 * (metrics["chair_s"] - metrics["baseline_chair_s"])
        )
    # The baseline's captions are generated once, for the first job, and cached.
    assert len(list((cwd / "outputs" / "cache" / "captions").iterdir())) == 1
    table = reported(sweep_dir, result, "chair")
    assert set(table["native_metric"]) == {"chair_s"} and table["yes_rate"].isna().all()
    mlflow.set_tracking_uri(f"sqlite:///{cwd}/outputs/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["sysattn"], output_format="list")
    jobs_logged = [r for r in runs if r.data.tags.get("sysattn.kind") == "job"]
    assert len(jobs_logged) == 12
    assert all("chair_i" in r.data.metrics for r in jobs_logged)
