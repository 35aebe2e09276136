"""Sweeps at scale on CPU: real submitit subprocesses, one MLflow tree per sweep,
idempotent re-runs, kill and resume, sync after a tracking failure, concurrent cache
writers, and a failure summary that lets the other jobs finish."""

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from cli import read_metrics, run_cli

from sysattn_exp.evaluation.cache import ScoreCache
from sysattn_exp.experiment.sync import sync as sync_dir

TIMING = {"scoring_seconds", "items_per_second", "n_items_from_cache"}


def runs_of(cwd):
    mlflow.set_tracking_uri(f"sqlite:///{cwd}/outputs/mlflow.db")
    return mlflow.search_runs(experiment_names=["sysattn"], output_format="list")


def sweep_dirs(cwd):
    return sorted((cwd / "outputs" / "multiruns").iterdir())


def run_sync(folder, uri: str, cwd) -> subprocess.CompletedProcess:
    """`python -m sysattn_exp.sync FOLDER --tracking-uri URI`, as a user runs it."""
    command = [sys.executable, "-m", "sysattn_exp.sync", str(folder), "--tracking-uri", uri]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd)


def results(sweep_dir) -> dict:
    return {job.name: read_metrics(job) for job in sorted(sweep_dir.glob("job*"))}


def test_submitit_local_sweep_is_one_mlflow_tree(tmp_path):
    args = [
        "-m",
        "model=tiny",
        "intervention=redistribute",
        "layers=q3,q4",
        "hydra/launcher=submitit_local",
        "benchmark.limit=2",
    ]
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep_dir,) = sweep_dirs(tmp_path)
    assert list((sweep_dir / ".submitit").iterdir()), "jobs ran through submitit"
    metrics = results(sweep_dir)
    assert sorted(metrics) == ["job0", "job1"]
    assert (
        metrics["job0"]["baseline_paired_accuracy"] == metrics["job1"]["baseline_paired_accuracy"]
    )
    runs = runs_of(tmp_path)
    parents = [r for r in runs if r.data.tags.get("sysattn.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("sysattn.kind") == "job"]
    assert len(parents) == 1 and len(children) == 2
    parent_id = parents[0].info.run_id
    assert json.loads((sweep_dir / "mlflow_parent.json").read_text())["run_id"] == parent_id
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent_id}
    assert sorted(r.data.params["layers.resolved"] for r in children) == ["4,5", "6,7"]
    assert {r.data.params["layers.depth"] for r in children} == {"8"}  # the report's label


@pytest.fixture(scope="module")
def rerun(tmp_path_factory):
    """The same sweep run twice into one store: (cwd, first sweep folder, second run)."""
    cwd = tmp_path_factory.mktemp("rerun")
    args = ["-m", "model=tiny", "intervention=redistribute", "layers=q1,q4", "benchmark.limit=4"]
    first = run_cli(*args, cwd=cwd)
    assert first.returncode == 0, first.stderr[-3000:]
    (first_dir,) = sweep_dirs(cwd)
    second = run_cli(*args, cwd=cwd)
    assert second.returncode == 0, second.stderr[-3000:]
    return cwd, first_dir, second


def test_rerun_recomputes_nothing_and_logs_nothing_new(rerun):
    cwd, _, second = rerun
    old, new = (results(d) for d in sweep_dirs(cwd))
    for job in old:
        assert new[job]["n_items_from_cache"] == new[job]["n_items"] == 8
        assert {k: v for k, v in new[job].items() if k not in TIMING} == {
            k: v for k, v in old[job].items() if k not in TIMING
        }
    assert len(runs_of(cwd)) == 3
    assert (second.stdout + second.stderr).count("already logged as MLflow run") == 2


def test_sync_a_logged_sweep_to_another_store(rerun, tmp_path):
    """The sweep folder's markers name runs of store A; store B gets its own parent (the
    same sweep key) with every job under it, once."""
    cwd, first_dir, _ = rerun
    sweep_dir = tmp_path / first_dir.name
    shutil.copytree(first_dir, sweep_dir)
    store_a = runs_of(cwd)
    (parent_a,) = [r for r in store_a if r.data.tags.get("sysattn.kind") == "sweep"]
    other = f"sqlite:///{tmp_path}/other.db"
    sync = run_sync(sweep_dir, other, cwd=tmp_path)
    assert sync.returncode == 0, sync.stderr[-3000:]
    assert "logged 2 job(s); 0 were already logged" in sync.stdout
    mlflow.set_tracking_uri(other)
    runs = mlflow.search_runs(experiment_names=["sysattn"], output_format="list")
    (parent,) = [r for r in runs if r.data.tags.get("sysattn.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("sysattn.kind") == "job"]
    assert parent.data.tags["sysattn.sweep_key"] == parent_a.data.tags["sysattn.sweep_key"]
    assert parent.info.run_id != parent_a.info.run_id
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    metrics = {job: m["paired_accuracy"] for job, m in results(sweep_dir).items()}
    assert {
        Path(r.data.tags["sysattn.job_dir"]).name: r.data.metrics["paired_accuracy"]
        for r in children
    } == metrics
    assert len(runs_of(cwd)) == len(store_a), "store A is left as it was"
    assert sync_dir(sweep_dir, other) == (0, 2, 0)  # logged, already logged, failed
    assert len(mlflow.search_runs(experiment_names=["sysattn"], output_format="list")) == len(runs)


def test_failing_job_does_not_stop_the_others(tmp_path):
    result = run_cli(
        "-m",
        "model=tiny",
        "intervention=redistribute",
        "layers.end=9,6",
        "benchmark.limit=2",
        cwd=tmp_path,
    )
    assert result.returncode == 2  # the only failure is bad input
    assert "error: 1 of 2 jobs failed: layers [0, 9) is outside" in result.stderr
    (sweep_dir,) = sweep_dirs(tmp_path)
    assert (sweep_dir / "job1" / "metrics.json").exists()
    assert not (sweep_dir / "job0" / "metrics.json").exists()
    assert "Traceback" not in result.stderr


def test_sync_logs_jobs_after_a_tracking_failure(tmp_path):
    env_args = ["tracking.uri=http://127.0.0.1:9"]  # nothing listens there
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        result = run_cli(
            "-m",
            "model=tiny",
            "intervention=redistribute",
            "layers=q2,q4",
            "benchmark.limit=2",
            *env_args,
            cwd=tmp_path,
        )
    finally:
        del os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert "python -m sysattn_exp.sync" in result.stdout + result.stderr
    (sweep_dir,) = sweep_dirs(tmp_path)
    assert len(results(sweep_dir)) == 2 and not (sweep_dir / "mlflow_parent.json").exists()
    store = f"sqlite:///{tmp_path}/outputs/mlflow.db"
    sync = run_sync(sweep_dir, store, cwd=tmp_path)
    assert sync.returncode == 0, sync.stderr[-3000:]
    assert "logged 2 job(s)" in sync.stdout
    runs = runs_of(tmp_path)
    parent = [r for r in runs if r.data.tags.get("sysattn.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("sysattn.kind") == "job"]
    assert len(parent) == 1 and len(children) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent[0].info.run_id}
    for run in children:
        job = next(
            d for d in sweep_dir.glob("job*") if run.data.tags["sysattn.job_dir"].endswith(d.name)
        )
        assert run.data.metrics["paired_accuracy"] == read_metrics(job)["paired_accuracy"]
    again = subprocess.run(
        [sys.executable, "-m", "sysattn_exp.sync", str(sweep_dir)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert "logged 0 job(s); 2 were already logged" in again.stdout


@pytest.fixture(scope="module")
def slow_checkpoint(tmp_path_factory):
    """A tiny LLaVA slow enough (256 image tokens, 8 layers of width 256) to kill mid-run."""
    from sysattn_exp.models.tiny import build_tiny_llava

    path = tmp_path_factory.mktemp("slow") / "ckpt"
    model, processor = build_tiny_llava(hidden_size=256, image_size=224, num_layers=8)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def scored_batches(cache_dir) -> int:
    return sum(len(p.read_text().splitlines()) for p in cache_dir.glob("*/scores-*.jsonl"))


def test_killed_job_resumes_with_identical_results(tmp_path, slow_checkpoint):
    args = [
        sys.executable,
        "-m",
        "sysattn_exp",
        f"model.name_or_path={slow_checkpoint}",
        "model.batch_size=2",
        "benchmark.limit=12",  # 24 items: 12 baseline batches, then 12 intervention batches
        "intervention=redistribute",
        "runtime.num_workers=0",
    ]
    killed = tmp_path / "killed"
    killed.mkdir()
    job = subprocess.Popen(
        [*args, f"runtime.cache_dir={killed / 'cache'}"],
        cwd=killed,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while scored_batches(killed / "cache") < 14 and time.time() < deadline and job.poll() is None:
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    partial = scored_batches(killed / "cache")
    assert 0 < partial < 24, "the kill should land mid-run"
    assert not list(killed.rglob("metrics.json"))
    resumed = subprocess.run(
        [*args, f"runtime.cache_dir={killed / 'cache'}"], cwd=killed, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = tmp_path / "whole"
    whole.mkdir()
    straight = subprocess.run(
        [*args, f"runtime.cache_dir={whole / 'cache'}"], cwd=whole, capture_output=True, text=True
    )
    assert straight.returncode == 0, straight.stderr[-3000:]
    # The killed run's folder stays, without metrics.json: it never looks complete.
    (resumed_job,) = [
        d for d in (killed / "outputs" / "runs").iterdir() if (d / "metrics.json").exists()
    ]
    (straight_job,) = (whole / "outputs" / "runs").iterdir()
    a, b = read_metrics(resumed_job), read_metrics(straight_job)
    assert a["n_items_from_cache"] > 0 and b["n_items_from_cache"] == 0
    assert {k: v for k, v in a.items() if k not in TIMING} == {
        k: v for k, v in b.items() if k not in TIMING
    }
    pa, pb = (pd.read_parquet(d / "predictions.parquet") for d in (resumed_job, straight_job))
    assert pa.equals(pb)


N_WRITERS, N_BATCHES, BATCH = 4, 100, 200
CONDITION = {"condition": "shared"}


def batch(worker: int, b: int) -> tuple[list[str], list[float], list[float], list[float]]:
    keys = [f"w{worker}-b{b}-{i}" for i in range(BATCH)]
    yes = [worker * 1000 + b + i / 1000 for i in range(BATCH)]
    return keys, yes, [-float(b)] * BATCH, [i / BATCH for i in range(BATCH)]


def write_batches(root, worker: int, start) -> None:
    start.wait()
    cache = ScoreCache(root, CONDITION)
    for b in range(N_BATCHES):
        cache.save(*batch(worker, b))


def batches_seen(scores: dict) -> dict[int, int]:
    """How many batches of each writer a reader sees, after checking that it sees exactly
    whole batches, with their values, and for each writer its first ones (written in order)."""
    seen = {}
    for w in range(N_WRITERS):
        seen[w] = 0
        while seen[w] < N_BATCHES and f"w{w}-b{seen[w]}-0" in scores:
            seen[w] += 1
    whole = {}
    for w, n in seen.items():
        for b in range(n):
            keys, yes, no, p_yes = batch(w, b)
            whole.update(zip(keys, zip(yes, no, p_yes, strict=True), strict=True))
    assert scores == whole
    return seen


def test_readers_racing_concurrent_writers_see_only_whole_batches(tmp_path):
    """Four processes append batches to one condition while this one reads it over and
    over: every read is whole batches (a line being written is not half-read), and what was
    seen stays seen."""
    start = multiprocessing.Event()
    writers = [
        multiprocessing.Process(target=write_batches, args=(tmp_path, w, start))
        for w in range(N_WRITERS)
    ]
    for p in writers:
        p.start()
    start.set()
    snapshots = []
    while any(p.is_alive() for p in writers):
        snapshots.append(batches_seen(ScoreCache(tmp_path, CONDITION).load()))
    for p in writers:
        p.join()
        assert p.exitcode == 0
    final = batches_seen(ScoreCache(tmp_path, CONDITION).load())
    assert final == dict.fromkeys(range(N_WRITERS), N_BATCHES)
    for before, after in zip(snapshots, [*snapshots[1:], final], strict=True):
        assert all(after[w] >= before[w] for w in before), "a read lost batches"
    total = N_WRITERS * N_BATCHES
    assert any(0 < sum(s.values()) < total for s in snapshots), "no read raced the writers"
