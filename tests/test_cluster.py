"""Running on a cluster, on CPU: concurrent submitit jobs compute each baseline item once
between them, a killed job's claims do not block the next, progress lines without a
terminal, a stop signal logged and passed on, workers sized to the allocation, and the
warning against a SQLite store with the SLURM launcher."""

import json
import logging
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli import read_metrics, run_cli, run_main
from omegaconf import OmegaConf

from sysattn_exp.evaluation.progress import Progress
from sysattn_exp.experiment.cluster import available_cpus, log_when_stopped, slurm_sqlite_warning
from sysattn_exp.experiment.job import num_workers

COMPUTED = re.compile(r"baseline: (\d+) of (\d+) items computed by this job")


@pytest.fixture(scope="module")
def slow_checkpoint(tmp_path_factory):
    """A tiny LLaVA slow enough (64 image tokens, 4 layers of width 128) that jobs started
    together are still scoring the baseline when the others start."""
    from sysattn_exp.models.tiny import build_tiny_llava

    path = tmp_path_factory.mktemp("slow") / "ckpt"
    model, processor = build_tiny_llava(hidden_size=128, image_size=112, num_layers=4)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def baseline_writes(cache_dir: Path) -> dict[str, list[str]]:
    """The baseline condition's cache: scores file (one per writing process) -> item keys."""
    (condition_dir,) = [
        d
        for d in cache_dir.iterdir()
        if json.loads((d / "condition.json").read_text())["intervention"] is None
    ]
    return {
        path.name: [
            key for line in path.read_text().splitlines() for key in json.loads(line)["keys"]
        ]
        for path in condition_dir.glob("scores-*.jsonl")
    }


def test_concurrent_sweep_jobs_compute_each_baseline_item_once(
    tmp_path, monkeypatch, slow_checkpoint
):
    """Three submitit_local jobs (a baseline and two interventions), started together by
    the real launcher, share one baseline in parts of 4 items: every baseline item is
    computed by exactly one job, the jobs' own counts add up to the baseline, and each job
    logged progress lines (its output is not a terminal). How much the jobs overlap depends
    on this machine's timing; the next test makes them start scoring at the same instant."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # three jobs on a small machine
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # no store: fails at once
    result = run_cli(
        "-m",
        f"model.name_or_path={slow_checkpoint}",
        "model.batch_size=2",
        "benchmark.limit=6",  # 12 items: 3 parts
        "+condition=baseline,system-text_q4,system-image_q4",
        "hydra/launcher=submitit_local",
        "runtime.num_workers=0",
        "runtime.baseline_part_items=4",
        "runtime.progress_seconds=0",
        "tracking.uri=http://127.0.0.1:9",  # not the subject here: results stay on disk
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep_dir,) = (tmp_path / "outputs" / "multiruns").iterdir()
    jobs = sorted(sweep_dir.glob("job*"))
    assert len(jobs) == 3 and list((sweep_dir / ".submitit").iterdir())
    writes = baseline_writes(tmp_path / "outputs" / "cache")
    keys = [key for file_keys in writes.values() for key in file_keys]
    assert len(keys) == 12 and len(set(keys)) == 12, "each baseline item computed once"
    logs = [(job / "sysattn.log").read_text() for job in jobs]
    counts = [COMPUTED.search(text).groups() for text in logs]
    assert sum(int(done) for done, _ in counts) == 12
    assert {total for _, total in counts} == {"12"}
    for text in logs[1:]:  # the interventions' jobs: progress lines for their own items
        assert re.search(r"system->\w+ layers 3-3: \d+/12 items \(.*items/s, elapsed .*, ETA", text)
    assert all("items from the score cache" in t for t in logs)
    metrics = [read_metrics(job) for job in jobs]
    assert {m["baseline_paired_accuracy"] for m in metrics[1:]} == {metrics[0]["paired_accuracy"]}


def test_progress_lines_without_a_terminal(caplog):
    caplog.set_level(logging.INFO, logger="sysattn_exp.evaluation.progress")
    progress = Progress("baseline", total=10, seconds=0.0, terminal=False)
    for _ in range(5):
        progress.update(2)
    progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 5
    assert lines[0].startswith("baseline: 2/10 items (20.0%), ")
    assert lines[-1].startswith("baseline: 10/10 items (100.0%), ")
    assert all(" items/s, elapsed " in line and ", ETA " in line for line in lines)
    caplog.clear()
    quiet = Progress("baseline", total=10, seconds=3600.0, terminal=False)
    quiet.update(10)
    assert not caplog.records, "nothing before the interval has passed"


def test_stop_signal_is_logged_then_passed_to_the_previous_handler(caplog):
    caplog.set_level(logging.WARNING, logger="sysattn_exp.experiment.cluster")
    received = []

    def previous(signum, frame):  # stands where submitit's own handler would be
        received.append(signum)

    old = signal.signal(signal.SIGUSR2, previous)
    try:
        with log_when_stopped("the scores are in the cache"):
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.05)
        assert received == [signal.SIGUSR2]
        assert caplog.records[0].getMessage() == (
            "job stopped by SIGUSR2; it resumes when requeued or run again: "
            "the scores are in the cache"
        )
        assert signal.getsignal(signal.SIGUSR2) is previous, "restored after the block"
    finally:
        signal.signal(signal.SIGUSR2, old)


def share_baseline(overrides: list[str], start, results) -> None:
    """One job's baseline share (job_yes_no.shared_baseline), in a process of its own: model
    loaded first, then scoring from the moment every job is ready (`start`, a barrier)."""
    from hydra import compose, initialize_config_module

    from sysattn_exp.benchmarks import load_benchmark
    from sysattn_exp.experiment.job_yes_no import item_prompts, scoring_words, shared_baseline
    from sysattn_exp.models.loading import load_model

    with initialize_config_module("sysattn_exp.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    loaded = load_model(cfg.model)
    benchmark = load_benchmark(cfg.benchmark)
    prompts = item_prompts(benchmark, loaded.prompt_format(cfg.model))
    words = scoring_words(loaded, cfg.scoring, prompts[0])
    shared = shared_baseline(cfg, loaded, benchmark, prompts, words)
    start.wait(timeout=300)
    shared.compute_free_parts()
    shared.finish()
    results.put(shared.computed)


def test_jobs_scoring_at_the_same_moment_split_the_baseline(tmp_path, slow_checkpoint):
    """Two processes start scoring one baseline at the same instant (after each has loaded
    its model): they split its 8 parts between them, and every item is computed once."""
    overrides = [
        f"model.name_or_path={slow_checkpoint}",
        "model.batch_size=1",
        "benchmark.limit=8",  # 16 items
        "runtime.num_workers=0",
        "runtime.baseline_part_items=2",
        f"runtime.cache_dir={tmp_path / 'cache'}",
    ]
    spawn = multiprocessing.get_context("spawn")
    start, results = spawn.Barrier(2), spawn.Queue()
    jobs = [
        spawn.Process(target=share_baseline, args=(overrides, start, results)) for _ in range(2)
    ]
    for job in jobs:
        job.start()
    computed = []
    for _ in jobs:
        computed.append(results.get(timeout=300))
    for job in jobs:
        job.join(timeout=60)
        assert job.exitcode == 0
    writes = baseline_writes(tmp_path / "cache")
    keys = [key for file_keys in writes.values() for key in file_keys]
    assert len(keys) == 16 and len(set(keys)) == 16, "each baseline item computed once"
    assert sum(computed) == 16
    assert all(n > 0 for n in computed), f"one process did it all: {computed}"


def test_a_stopped_job_says_so_and_its_claim_does_not_block_the_next(tmp_path, slow_checkpoint):
    """SIGTERM outside submitit: the job logs the stop, then ends by the signal (its
    default action is kept), leaving its claim on a baseline part behind; the next job on
    this host takes that claim over at once (its holder is a dead process), not after the
    hour's lease, and computes the rest: every item once."""
    args = [
        sys.executable,
        "-m",
        "sysattn_exp",
        f"model.name_or_path={slow_checkpoint}",
        "model.batch_size=1",
        "benchmark.limit=3",  # 6 items, one part
        "runtime.num_workers=0",
        "runtime.lease_seconds=3600",
    ]
    job = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    cache = tmp_path / "outputs" / "cache"
    deadline = time.time() + 120
    while time.time() < deadline and not list(cache.glob("*/scores-*.jsonl")):
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    out, _ = job.communicate(timeout=60)
    assert job.returncode == -signal.SIGTERM
    assert b"job stopped by SIGTERM; it resumes when requeued or run again: scores" in out
    (claim,) = cache.glob("*/claims/*.claim")
    assert json.loads(claim.read_text())["pid"] == job.pid
    rerun = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "took over the stale claim" in rerun.stdout + rerun.stderr
    writes = baseline_writes(cache)
    keys = [key for file_keys in writes.values() for key in file_keys]
    assert len(writes) == 2 and sorted(keys) == sorted(set(keys)) and len(keys) == 6
    assert not list(cache.glob("*/claims/*.claim")), "claims released once done"


@pytest.mark.parametrize(("cpus", "workers"), [("1", 0), ("3", 2), ("64", 4)])
def test_workers_follow_the_slurm_allocation(monkeypatch, cpus, workers):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", cpus)
    cfg = OmegaConf.create({"runtime": {"num_workers": "auto"}})
    assert num_workers(cfg) == workers


def test_cpus_follow_the_process_affinity_outside_slurm():
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CPUS_PER_TASK"}
    script = (
        "import os; os.sched_setaffinity(0, {0}); "
        "from sysattn_exp.experiment.cluster import available_cpus; print(available_cpus())"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == "1"
    assert available_cpus() == len(os.sched_getaffinity(0))


def test_slurm_launcher_with_sqlite_store_warns_through_the_cli(tmp_path):
    """hydra/launcher=slurm with the default SQLite store: the warning comes before
    submission, which fails here (no SLURM on this machine: no srun)."""
    result = run_cli("-m", "model=tiny", "benchmark.limit=1", "hydra/launcher=slurm", cwd=tmp_path)
    output = result.stdout + result.stderr
    (line,) = [line for line in output.splitlines() if "warning: SLURM jobs" in line]
    assert "SQLite store sqlite:///outputs/mlflow.db" in line and "tracking.uri=http://" in line
    assert 'Could not detect "srun"' in result.stderr and result.returncode == 1


def composed(*overrides):
    from hydra import compose, initialize_config_module

    with initialize_config_module("sysattn_exp.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def test_no_warning_with_a_server_or_a_local_launcher():
    assert slurm_sqlite_warning(composed("hydra/launcher=slurm")) is not None
    assert slurm_sqlite_warning(composed("hydra/launcher=submitit_slurm")) is not None
    server = "tracking.uri=http://mlflow-host:5000"
    assert slurm_sqlite_warning(composed("hydra/launcher=slurm", server)) is None
    assert slurm_sqlite_warning(composed("hydra/launcher=submitit_local")) is None
    assert slurm_sqlite_warning(composed()) is None


@pytest.mark.parametrize(
    "override",
    ["runtime.lease_seconds=0", "runtime.baseline_part_items=0", "runtime.progress_seconds=-1"],
)
def test_bad_cluster_settings_are_one_line_and_exit_2(tmp_path, monkeypatch, capsys, override):
    assert run_main(tmp_path, monkeypatch, "model=tiny", override) == 2
    err = capsys.readouterr().err
    key = override.split("=")[0]
    assert err.startswith(f"error: {key}=") and "must be a number >=" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "outputs" / "cache").exists()
