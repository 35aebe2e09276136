"""Running the real command line: in a subprocess, as a user does, or in this process
(where a test must patch what a machine without a GPU box's packages cannot run)."""

import json
import logging
import subprocess
import sys
from pathlib import Path

SHARED_METRICS = [
    "n_items",
    "n_groups",
    "yes_rate",
    "gt_yes_rate",
    "yes_bias",
    "accuracy",
    "paired_accuracy",
]


def run_cli(*overrides: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m sysattn_exp ...` with outputs and the MLflow store inside `cwd`."""
    return subprocess.run(
        [sys.executable, "-m", "sysattn_exp", *overrides],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_metrics(job_dir: Path) -> dict:
    return json.loads((job_dir / "metrics.json").read_text())


def run_main(tmp_path: Path, monkeypatch, *overrides: str) -> int:
    """`python -m sysattn_exp ...` in this process, in tmp_path; its exit status."""
    from sysattn_exp.__main__ import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["sysattn_exp", *overrides])
    try:
        main()
    except SystemExit as exit:
        return exit.code or 0
    return 0


def run_main_stderr(overrides, cwd: Path, monkeypatch, capsys) -> tuple[int, str]:
    """`python -m sysattn_exp OVERRIDES` as main() in this process, in `cwd`: (exit status,
    stderr)."""
    from sysattn_exp.__main__ import main

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["sysattn_exp", *overrides])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # main() sets it for its own process
    handlers = logging.root.handlers[:]  # Hydra configures logging for each job
    try:
        main()
        code = 0
    except SystemExit as exit:
        code = exit.code
    finally:
        logging.root.handlers[:] = handlers
    return code, capsys.readouterr().err
