"""A job logging to a real `mlflow server` with proxied artifacts: the server chooses where
artifacts go (its --artifacts-destination), not the job's launch folder."""

from pathlib import Path

import mlflow
import pytest
from cli import run_cli
from mlflow_server import mlflow_server


@pytest.fixture
def server(tmp_path):
    """(url, artifacts destination) of an `mlflow server` on a free local port."""
    destination = tmp_path / "server-artifacts"
    backend = f"sqlite:///{tmp_path / 'server.db'}"
    # No background job runner (MLflow's GenAI jobs): not needed, and slow to start.
    quiet = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    options = ("--artifacts-destination", str(destination))
    with mlflow_server(backend, tmp_path, *options, env=quiet) as (url, _):
        yield url, destination


def test_job_artifacts_go_where_the_server_puts_them(tmp_path, server):
    url, destination = server
    work = tmp_path / "launch"
    work.mkdir()
    result = run_cli(
        "model=tiny", "benchmark.limit=1", "runtime.num_workers=0", f"tracking.uri={url}", cwd=work
    )
    assert result.returncode == 0, result.stderr[-3000:]
    mlflow.set_tracking_uri(url)
    experiment = mlflow.get_experiment_by_name("sysattn")
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    (run,) = mlflow.search_runs([experiment.experiment_id], output_format="list")
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    stored = destination / experiment.experiment_id / run.info.run_id / "artifacts"
    assert sorted(p.name for p in stored.iterdir()) == [
        "config.yaml",
        "metrics.json",
        "predictions.parquet",
    ]
    (job_dir,) = (work / "outputs" / "runs").iterdir()
    assert (stored / "metrics.json").read_bytes() == (job_dir / "metrics.json").read_bytes()
    assert not (work / "outputs" / "mlartifacts").exists(), "nothing in the launch folder"
    assert not list(Path(work).rglob("mlartifacts"))
