"""Claims with a lease: which of several concurrent jobs (processes, possibly on different
hosts sharing one file system) does a piece of work, so that it is done once, and a job
that dies holding a claim does not block the others for ever.

A claim on NAME is a file `NAME.<generation>.claim` in a shared directory, holding its
owner (a random token, host, pid, SLURM job); the holder proves it is alive by touching the
file (its mtime) every lease/4 seconds from a background thread. The claim is current while
its file is the highest generation of NAME.

- Creating a claim is atomic and exclusive: the record is written to a private file, then
  hard-linked to the claim's name. link(2) fails when the name exists, on local file
  systems and on NFS alike, and the file appears with its whole record; this is the
  open(2) manual's recipe for "atomic file locking using a lockfile" on NFS, where
  O_CREAT|O_EXCL was not atomic before NFSv3 (a lost reply to a link that succeeded is
  told apart by the private file's link count of 2). Where hard links are not supported,
  O_CREAT|O_EXCL is used.
- A claim is stale when its mtime has not changed for `lease_seconds` of the observer's own
  clock (clocks of different hosts are never compared), when its holder is a process of
  this host that no longer exists, or when it was made by an earlier life of this SLURM job
  (a requeued job takes its own claims back at once). On NFS, attributes are cached for up
  to a minute (acregmax): the file is opened before its mtime is read, which revalidates
  them (close-to-open consistency), and the lease should stay well above a minute there.
- A stale claim of generation g is taken over by creating generation g+1, which only one
  taker can do; the older files are then removed. A holder that was only paused (SIGSTOP,
  a frozen node) and is taken over finds out at its next heartbeat (`Lease.lost`): the
  work it was doing may then be done twice, never lost.
"""

import errno
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

SUFFIX = ".claim"


def slurm_identity() -> str | None:
    """This process's SLURM job step identity, the same after a requeue (None outside SLURM)."""
    job = os.environ.get("SLURM_JOB_ID")
    return f"{job}.{os.environ.get('SLURM_PROCID', '0')}" if job else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def create_exclusively(path: Path, record: dict) -> bool:
    """Create `path` holding `record`, only if it does not exist; True if this call did."""
    tmp = path.with_name(f".{path.name}.{record['token']}.tmp")
    tmp.write_text(json.dumps(record), encoding="utf-8")
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return os.stat(tmp).st_nlink == 2  # NFS: the link was made, its reply lost
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        return create_with_o_excl(path, record)  # a file system without hard links
    finally:
        tmp.unlink(missing_ok=True)


def create_with_o_excl(path: Path, record: dict) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(json.dumps(record))
    return True


def read_claim(path: Path) -> tuple[dict, int] | None:
    """(record, mtime in ns) of a claim file, None once it is gone. Opened first, so that
    NFS revalidates the cached attributes; a record still being written reads as {}."""
    try:
        with open(path, encoding="utf-8") as claim:
            mtime = os.fstat(claim.fileno()).st_mtime_ns
            text = claim.read()
    except FileNotFoundError:
        return None
    try:
        return json.loads(text), mtime
    except json.JSONDecodeError:
        return {}, mtime


class Claims:
    """Claims on named pieces of work in `directory`. One instance per process remembers
    when it first saw each claim unchanged: the lease is timed on this process's clock."""

    def __init__(self, directory: Path, lease_seconds: float):
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be positive, not {lease_seconds}")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lease_seconds = lease_seconds
        self.seen: dict[Path, tuple[int, float]] = {}  # claim -> (mtime, when first seen)

    def generations(self, name: str) -> list[tuple[int, Path]]:
        pattern = re.compile(re.escape(name) + r"\.(\d+)" + re.escape(SUFFIX) + "$")
        found = []
        for path in self.dir.glob(f"{name}.*{SUFFIX}"):
            match = pattern.match(path.name)
            if match:
                found.append((int(match.group(1)), path))
        return sorted(found)

    def try_claim(self, name: str) -> "Lease | None":
        """The claim on `name` if it is free or stale (this process then holds it, and must
        release it), None while a live holder has it. Never waits."""
        current = self.generations(name)
        generation = 0
        if current:
            top, path = current[-1]
            if not self.is_stale(path):
                return None
            generation = top + 1
        record = {
            "token": uuid.uuid4().hex,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm": slurm_identity(),
            "created": time.time(),
        }
        path = self.dir / f"{name}.{generation}{SUFFIX}"
        if not create_exclusively(path, record):
            return None  # another process took it first
        for _, older in current:  # stale ones: their holders are gone or have lost them
            older.unlink(missing_ok=True)
            self.seen.pop(older, None)
        if current:
            log.info("took over the stale claim %s", current[-1][1].name)
        return Lease(self, name, path, record["token"])

    def is_stale(self, path: Path) -> bool:
        claim = read_claim(path)
        if claim is None:
            return True  # released just now
        record, mtime = claim
        if self.holder_is_gone(record):
            return True
        now = time.monotonic()
        seen = self.seen.get(path)
        if seen is None or seen[0] != mtime:
            self.seen[path] = (mtime, now)
            return False
        return now - seen[1] >= self.lease_seconds

    @staticmethod
    def holder_is_gone(record: dict) -> bool:
        """Known without waiting: a dead process of this host, or this SLURM job's earlier
        life (same job step, another process)."""
        if not record:
            return False
        me = (socket.gethostname(), os.getpid())
        if record.get("slurm") and record["slurm"] == slurm_identity():
            return (record.get("host"), record.get("pid")) != me
        return record.get("host") == me[0] and not pid_alive(record.get("pid", -1))


class Lease:
    """A claim this process holds: its heartbeat runs until `release()` (or the end of a
    `with` block). `lost` turns true if another process took it over meanwhile."""

    def __init__(self, claims: Claims, name: str, path: Path, token: str):
        self.claims, self.name, self.path, self.token = claims, name, path, token
        self.lost = False
        self.stopped = threading.Event()
        self.beat = threading.Thread(target=self.heartbeat, name=f"lease {name}", daemon=True)
        self.beat.start()

    def heartbeat(self) -> None:
        while not self.stopped.wait(self.claims.lease_seconds / 4):
            if not self.still_mine():
                self.lost = True
                log.warning("lost the claim %s to another job", self.path.name)
                return
            try:
                os.utime(self.path)
            except FileNotFoundError:
                self.lost = True
                return

    def still_mine(self) -> bool:
        current = self.claims.generations(self.name)
        claim = read_claim(self.path)
        return (
            bool(current)
            and current[-1][1] == self.path
            and claim is not None
            and (claim[0].get("token") == self.token)
        )

    def release(self) -> None:
        self.stopped.set()
        self.beat.join()
        if self.lost or not self.still_mine():
            self.lost = True  # taken over: the file is no longer this process's to remove
            return
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
