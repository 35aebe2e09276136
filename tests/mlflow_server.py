"""A real `mlflow server` for tests: started on a free local port in its own process group,
and stopped with every process it started (uvicorn's workers, MLflow's job runner)."""

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


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


def group_members(pgid: int) -> list[int]:
    """The live processes of process group `pgid` (from /proc; zombies are gone already)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # After the ')' that ends the command name: state, ppid, pgrp, ...
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(stat.parent.name))
    return members


def stop_group(server: subprocess.Popen) -> bool:
    """The server and every worker it started (one process group): SIGTERM to the group,
    as the README tells users; SIGKILL to what is left after 30 s. Returns whether SIGTERM
    alone ended the whole group."""
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        return False
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not group_members(server.pid):
            return True
        time.sleep(0.1)
    os.killpg(server.pid, signal.SIGKILL)
    return False


@contextlib.contextmanager
def mlflow_server(backend_uri: str, folder: Path, *options: str, env: dict | None = None):
    """`mlflow server --backend-store-uri backend_uri OPTIONS` on a free local port, its log
    in folder/server.log: yields (url, process); stopped (stop_group) on leaving."""
    port = free_port()
    command = ["mlflow", "server", "--backend-store-uri", backend_uri, *options]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(folder / "server.log", "w") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=os.environ | (env or {}),
            start_new_session=True,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until_up(url, process)
            yield url, process
        finally:
            stop_group(process)
