"""Progress of a long loop: tqdm's bar on a terminal, log lines in a SLURM log."""

import logging
import sys
import time

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
