"""What a job needs when it runs unattended on a cluster: progress lines in its log when
no terminal shows a progress bar, a line saying why it stopped, DataLoader workers sized to
its allocation, and a warning against a SQLite store shared by SLURM jobs."""

import logging
import os
import signal
import threading
from contextlib import contextmanager

log = logging.getLogger(__name__)


def stop_signals() -> list[signal.Signals]:
    """SIGTERM (SLURM's scancel and end of time limit) and submitit's preemption/timeout
    signal (SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL names another)."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    preempt = getattr(signal, f"SIG{name}", getattr(signal, name, signal.SIGUSR2))
    return list(dict.fromkeys([signal.SIGTERM, preempt]))


@contextmanager
def log_when_stopped(resume: str):
    """While the block runs, a stop signal first logs that the job was stopped and how it
    resumes (`resume` ends that line), then goes to the handler that was there before:
    submitit's (which ignores SIGTERM and requeues on SIGUSR2), Python's default (the
    process ends, as without this block) or any other. The previous handlers are restored
    afterwards. Main thread only (Python's rule for signal handlers); elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in stop_signals()}

    def on_stop(signum, frame):
        log.warning(
            "job stopped by %s; it resumes when requeued or run again: %s",
            signal.Signals(signum).name,
            resume,
        )
        chain(previous[signum], signum, frame)

    for sig in previous:
        signal.signal(sig, on_stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def chain(handler, signum: int, frame) -> None:
    if callable(handler):
        handler(signum, frame)
    elif handler == signal.SIG_DFL or handler is None:
        signal.signal(signum, signal.SIG_DFL)  # the default action: usually, terminate
        os.kill(os.getpid(), signum)
    # SIG_IGN: ignored, as before


def available_cpus() -> int:
    """CPUs this job may use: its SLURM allocation (SLURM_CPUS_PER_TASK), else the CPUs this
    process may run on (its affinity mask, which SLURM's cgroups and taskset set), not the
    node's count."""
    allocated = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if allocated.isdigit() and int(allocated) > 0:
        return int(allocated)
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def slurm_sqlite_warning(config) -> str | None:
    """One line when a SLURM launcher (hydra/launcher=slurm or submitit_slurm) is used with
    a SQLite tracking store, else None."""
    launcher = config.hydra.get("launcher") or {}
    target = str(launcher.get("_target_", ""))
    uri = str(config.tracking.uri)
    if not target.endswith("SlurmLauncher") or not uri.startswith("sqlite:"):
        return None
    return (
        f"warning: SLURM jobs logging to the SQLite store {uri}: concurrent writers on a "
        "network file system can lock up or corrupt it; start an MLflow server and pass "
        "tracking.uri=http://HOST:5000 (README: Running on a cluster)"
    )
