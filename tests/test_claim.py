"""Claims with a lease (sysattn_exp.experiment.claim), between real processes and in real time: one
winner among racing processes, a live holder kept, a paused one taken over after its lease
(and told so), a dead one or a requeued SLURM job's earlier life taken over at once."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sysattn_exp.experiment.claim import Claims

LEASE = 1.0  # seconds: the heartbeat beats every 0.25 s

HOLDER = """
import sys, time
from sysattn_exp.experiment.claim import Claims
directory, lease, start_at = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
time.sleep(max(0.0, start_at - time.time()))
held = Claims(directory, lease).try_claim("part")
print("claimed" if held else "busy", flush=True)
sys.stdin.readline()  # hold it until told to release
if held:
    held.release()
    print("lost" if held.lost else "kept", flush=True)
"""


def holder(directory: Path, start_at: float = 0.0, env=None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(directory), str(LEASE), str(start_at)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=Path(__file__).parents[1],
    )


def released(process: subprocess.Popen) -> str:
    out, _ = process.communicate("\n", timeout=30)
    return out


def test_one_of_several_racing_processes_gets_the_claim(tmp_path):
    start_at = time.time() + 1.5  # after every interpreter has started
    processes = [holder(tmp_path, start_at) for _ in range(6)]
    answers = [p.stdout.readline().strip() for p in processes]
    assert sorted(answers) == ["busy"] * 5 + ["claimed"]
    for p in processes:
        released(p)
    assert not list(tmp_path.glob("*.claim")), "the winner released its claim"
    assert Claims(tmp_path, LEASE).try_claim("part") is not None, "free again after release"


def test_a_live_holder_keeps_its_claim_past_its_lease(tmp_path):
    process = holder(tmp_path)
    assert process.stdout.readline().strip() == "claimed"
    claims = Claims(tmp_path, LEASE)
    deadline = time.monotonic() + 3 * LEASE
    while time.monotonic() < deadline:
        assert claims.try_claim("part") is None, "taken from a holder that beats"
        time.sleep(0.1)
    assert released(process).split() == ["kept"]


def test_a_paused_holder_is_taken_over_after_its_lease_and_finds_out(tmp_path):
    process = holder(tmp_path)
    assert process.stdout.readline().strip() == "claimed"
    claims = Claims(tmp_path, LEASE)
    assert claims.try_claim("part") is None
    os.kill(process.pid, signal.SIGSTOP)  # alive, but no heartbeat
    stopped = time.monotonic()
    lease = None
    while lease is None and time.monotonic() - stopped < 20:
        lease = claims.try_claim("part")
        time.sleep(0.05)
    waited = time.monotonic() - stopped
    assert lease is not None, "a holder without heartbeat must not block for ever"
    # The last beat came at most a quarter lease before the stop.
    assert waited >= 0.75 * LEASE
    assert [p.name for p in tmp_path.glob("*.claim")] == ["part.1.claim"]
    os.kill(process.pid, signal.SIGCONT)
    time.sleep(LEASE / 2)  # its next heartbeat
    assert released(process).split() == ["lost"]
    assert lease.path.exists(), "the old holder left the new claim alone"
    lease.release()
    assert not lease.path.exists()


def test_a_killed_holder_on_this_host_is_taken_over_at_once(tmp_path):
    process = holder(tmp_path)
    assert process.stdout.readline().strip() == "claimed"
    process.kill()
    process.wait()
    lease = Claims(tmp_path, 3600).try_claim("part")  # an hour's lease: not waited for
    assert lease is not None
    lease.release()


def test_a_requeued_slurm_job_takes_back_its_own_claim_at_once(tmp_path, monkeypatch):
    env = os.environ | {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "0"}
    process = holder(tmp_path, env=env)
    assert process.stdout.readline().strip() == "claimed"
    claims = Claims(tmp_path, 3600)
    monkeypatch.setenv("SLURM_JOB_ID", "777")  # another job of the array: waits
    assert claims.try_claim("part") is None
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # the same job, requeued: its claim
    lease = claims.try_claim("part")
    assert lease is not None
    assert released(process).split() == ["lost"]
    lease.release()
