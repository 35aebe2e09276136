"""sync over a whole outputs folder: the copies MLflow keeps of logged jobs (the default
artifact store, outputs/mlartifacts/<experiment>/<run id>/artifacts) are not job folders."""

import json
import subprocess
import sys

from cli import run_cli

from sysattn_exp.experiment.sync import job_dirs


def test_sync_of_an_outputs_folder_logs_nothing_twice(tmp_path):
    result = run_cli(
        "model=toy", "benchmark=toy", "benchmark.limit=2", "runtime.num_workers=0", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    outputs = tmp_path / "outputs"
    (job,) = (outputs / "runs").iterdir()
    copies = list((outputs / "mlartifacts").rglob("metrics.json"))
    assert copies, "the logged job has its copy in the artifact store"
    assert job_dirs(outputs) == [job]
    sync = subprocess.run(
        [sys.executable, "-m", "sysattn_exp.sync", "outputs"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert sync.returncode == 0, sync.stderr[-2000:]
    assert "logged 0 job(s); 1 were already logged; 0 could not be logged" in sync.stdout


def test_a_job_folder_named_artifacts_is_still_a_job(tmp_path):
    job = tmp_path / "artifacts"
    job.mkdir()
    (job / "config.yaml").write_text("tracking: {}\n")
    (job / "metrics.json").write_text(json.dumps({}))
    assert job_dirs(tmp_path) == [job]
