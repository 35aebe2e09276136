"""A job logging to a real `mlflow server` with proxied artifacts: the server chooses where
artifacts go (its --artifacts-destination), not the job's launch folder."""

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
from cli import run_cli


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_up(url: str, server: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert server.poll() is None, "mlflow server exited"
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.25)
    raise TimeoutError(f"mlflow server at {url} did not start")


def stop_group(server: subprocess.Popen) -> None:
    """The server and every worker it started (one process group)."""
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(server.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.killpg(server.pid, signal.SIGKILL)


@pytest.fixture
def server(tmp_path):
    """(url, artifacts destination) of an `mlflow server` on a free local port."""
    destination = tmp_path / "server-artifacts"
    port = free_port()
    command = [
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{tmp_path / 'server.db'}",
        "--artifacts-destination",
        str(destination),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed below
    # No background job runner (MLflow's GenAI jobs): not needed, and slow to start.
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(url, process)
        yield url, destination
    finally:
        stop_group(process)
        log.close()


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
