"""The tracking store under concurrency and refusal (cases 05 and 06): independent jobs and
syncs opening one new SQLite store at once all end up logged, without a traceback; a
metric name MLflow refuses is logged under its storable name; a run whose logging did not
finish never counts as logged; sync's summary counts what happened."""

import json
import re
import shutil
import subprocess
import sys

import mlflow
import pytest
from cli import read_metrics
from conftest import make_image

from sysattn_exp.experiment.tracking import storable_name, storable_names

TOY = ["model=toy", "runtime.num_workers=0", "runtime.cache_dir=null"]
CONDITIONS = {  # three different jobs: each must be logged as its own run
    "base": [],
    "q1": ["intervention=redistribute", "layers=q1"],
    "q4": ["intervention=redistribute", "layers=q4"],
}


def start(args: list[str], cwd) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(processes: dict) -> dict:
    """{name: (exit status, stdout, stderr)} once every process has ended."""
    return {name: (p.wait(timeout=300), *p.communicate()) for name, p in processes.items()}


def job_runs(uri: str) -> list:
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["sysattn"], output_format="list")
    return [r for r in runs if r.data.tags.get("sysattn.kind") == "job"]


@pytest.fixture(scope="module")
def raced(tmp_path_factory):
    """Three different jobs started together against one new SQLite store (case 05)."""
    root = tmp_path_factory.mktemp("race")
    make_image("red").save(root / "ok.png")
    records = [
        {"id": "y", "group": "g", "image": "ok.png", "question": "Red?", "answer": "yes"},
        {"id": "n", "group": "g", "image": "ok.png", "question": "Green?", "answer": "no"},
    ]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    data = ["benchmark=jsonl", f"benchmark.path={root / 'data.jsonl'}"]
    uri = f"sqlite:///{root}/fresh.db"
    processes = {
        name: start(
            [
                "-m",
                "sysattn_exp",
                *TOY,
                *data,
                *extra,
                f"tracking.uri={uri}",
                f"hydra.run.dir={name}",
            ],
            root,
        )
        for name, extra in CONDITIONS.items()
    }
    return root, uri, finish(processes)


def test_independent_jobs_on_a_new_store_are_all_logged(raced):
    root, uri, results = raced
    for name, (status, out, err) in results.items():
        assert status == 0, err[-3000:]
        assert "Traceback" not in err and "could not log to MLflow" not in out + err, name
    runs = job_runs(uri)
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}
    logged = {r.data.tags["sysattn.job_dir"]: r.data.metrics for r in runs}
    for name in CONDITIONS:
        metrics = read_metrics(root / name)
        assert logged[str(root / name)]["paired_accuracy"] == metrics["paired_accuracy"]
        assert logged[str(root / name)]["yes_rate"] == metrics["yes_rate"]


def test_concurrent_syncs_into_a_new_store_log_every_job_once(raced):
    """Five syncs at once into another new store: the three jobs, and two copies of one
    job (the same job and results: logged once, the copies count as already logged)."""
    root, _, _ = raced
    for copy in ("copy1", "copy2"):
        shutil.copytree(root / "q1", root / copy)
    other = f"sqlite:///{root}/other.db"
    folders = [*CONDITIONS, "copy1", "copy2"]
    processes = {
        name: start(["-m", "sysattn_exp.sync", name, "--tracking-uri", other], root)
        for name in folders
    }
    results = finish(processes)
    summaries = []
    for name, (status, out, err) in results.items():
        assert status == 0 and "Traceback" not in err, (name, err[-3000:])
        summaries.append(out.strip().splitlines()[-1])
    counted = {s: summaries.count(s) for s in summaries}
    assert counted == {
        "logged 1 job(s); 0 were already logged; 0 could not be logged": 3,  # base, q1, q4
        "logged 0 job(s); 1 were already logged; 0 could not be logged": 2,  # q1 again
    }
    runs = job_runs(other)
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}
    assert len({r.data.tags["sysattn.job_key"] for r in runs}) == 3


def test_sync_that_cannot_log_says_so_in_one_line_and_counts_it(raced, tmp_path):
    """A store that cannot be written (its folder is a file): one line per job, the summary
    counts the failures, exit status 1, no traceback."""
    root, _, _ = raced
    (tmp_path / "blocker").write_text("")
    bad = f"sqlite:///{tmp_path}/blocker/store.db"
    result = subprocess.run(
        [sys.executable, "-m", "sysattn_exp.sync", str(root / "base"), "--tracking-uri", bad],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(root / "base") in errors[0]
    assert "logged 0 job(s); 0 were already logged; 1 could not be logged" in result.stdout


def test_storable_name_keeps_mlflow_names_and_maps_the_rest():
    assert storable_name("mme/code (v2)/acc") == "mme/code _v2_/acc"
    for name in ("paired_accuracy", "naturalbench/yesno_g_acc", "mme/artwork/acc_plus", "a-b.c d"):
        assert storable_name(name) == name
    assert storable_name("a//b/./c/../d:é") == "a/_/b/_/c/_/d__"
    with pytest.raises(ValueError, match=re.escape("'x (1)' and 'x _1_' would both be logged")):
        storable_names(["x (1)", "x _1_"], "metrics")


def write_case_06(root):
    """MME data with the category files artwork.txt and 'code (v2).txt' (case 06)."""
    for category in ("artwork", "code (v2)"):
        (root / category).mkdir(parents=True)
        make_image("red").save(root / category / "0001.png")
        (root / f"{category}.txt").write_text(
            "0001.png\tIs there a red circle in the image? Please answer yes or no.\tYes\n"
            "0001.png\tIs there a green circle in the image? Please answer yes or no.\tNo\n"
        )


@pytest.fixture(scope="module")
def mme_job(tmp_path_factory):
    root = tmp_path_factory.mktemp("names")
    write_case_06(root / "mme")
    uri = f"sqlite:///{root}/mlflow.db"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sysattn_exp",
            *TOY,
            "benchmark=mme",
            f"benchmark.data_dir={root / 'mme'}",
            f"tracking.uri={uri}",
            "hydra.run.dir=job",
        ],
        capture_output=True,
        text=True,
        cwd=root,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return root, uri, result


def test_refused_metric_name_is_logged_under_its_storable_name(mme_job):
    root, uri, result = mme_job
    assert "could not log to MLflow" not in result.stdout + result.stderr
    metrics = read_metrics(root / "job")
    (run,) = job_runs(uri)
    assert run.info.status == "FINISHED"
    logged = run.data.metrics
    assert logged["mme/code _v2_/acc_plus"] == metrics["mme/code (v2)/acc_plus"] == 100.0
    assert logged["mme/code _v2_/score"] == metrics["mme/code (v2)/score"] == 200.0
    numbers = {k for k, v in metrics.items() if v is not None and not isinstance(v, str)}
    assert {storable_name(k) for k in numbers} == set(logged)  # text metrics are params


def test_half_logged_run_is_replaced_and_the_summary_counts_it(mme_job, tmp_path):
    """The store as the logging failure of case 06 left it: a FAILED run with the job's
    tags and params, no metrics. sync must not call it logged: it logs the job, the half
    run is deleted, and the summary says one job was logged."""
    root, _, _ = mme_job
    job = tmp_path / "job"
    shutil.copytree(root / "job", job)
    (job / "mlflow_run.json").unlink()
    (done,) = job_runs(f"sqlite:///{root}/mlflow.db")
    uri = f"sqlite:///{tmp_path}/half.db"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("sysattn", artifact_location=tmp_path.as_uri())
    tags = {k: v for k, v in done.data.tags.items() if k.startswith("sysattn.")}
    with (
        pytest.raises(RuntimeError),
        mlflow.start_run(experiment_id=experiment, tags=tags) as half,
    ):
        mlflow.log_params(done.data.params)
        raise RuntimeError("logging stopped part-way")
    assert mlflow.get_run(half.info.run_id).info.status == "FAILED"
    result = subprocess.run(
        [sys.executable, "-m", "sysattn_exp.sync", str(job), "--tracking-uri", uri],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "logged 1 job(s); 0 were already logged; 0 could not be logged" in result.stdout
    (run,) = job_runs(uri)
    assert run.info.run_id != half.info.run_id and run.info.status == "FINISHED"
    assert run.data.metrics["mme/code _v2_/acc"] == 100.0
    assert mlflow.get_run(half.info.run_id).info.lifecycle_stage == "deleted"
    again = subprocess.run(
        [sys.executable, "-m", "sysattn_exp.sync", str(job), "--tracking-uri", uri],
        capture_output=True,
        text=True,
    )
    assert "logged 0 job(s); 1 were already logged; 0 could not be logged" in again.stdout
