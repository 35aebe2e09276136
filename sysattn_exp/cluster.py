"""What a job needs when it runs unattended on a cluster: progress lines in its log when
no terminal shows a progress bar, a line saying why it stopped, DataLoader workers sized to
its allocation, and a warning against a SQLite store shared by SLURM jobs."""

import logging
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager

from tqdm import tqdm

log = logging.getLogger(__name__)


class Progress:
    """Items done in a loop: tqdm's bar on a terminal; otherwise (a SLURM log, a pipe), where
    a bar prints nothing useful, a log line every `seconds` (done/total, rate, ETA)."""

    def __init__(self, desc: str, total: int, seconds: float, terminal: bool | None = None):
        terminal = sys.stderr.isatty() if terminal is None else terminal
        self.bar = tqdm(total=total, desc=desc, unit="item") if terminal else None
        self.desc, self.total, self.seconds = desc, total, seconds
        self.done, self.started = 0, time.monotonic()
        self.last = self.started

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.seconds:
            self.last = now
            log.info(progress_line(self.desc, self.done, self.total, now - self.started))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def progress_line(desc: str, done: int, total: int, elapsed: float) -> str:
    """'baseline: 40/15000 items (0.3%), 3.2 items/s, elapsed 00:12, ETA 1:17:55'."""
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = tqdm.format_interval((total - done) / rate) if rate > 0 else "?"
    share = 100 * done / total if total else 100.0
    return (
        f"{desc}: {done}/{total} items ({share:.1f}%), {rate:.3g} items/s, "
        f"elapsed {tqdm.format_interval(elapsed)}, ETA {eta}"
    )


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
