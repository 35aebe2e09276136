"""A clone without shared/benchmarks (the real annotation files): exactly the tests that
read those files skip, with a reason, and the rest of their modules still run."""

import os
import subprocess
import sys
from pathlib import Path

from benchmark_fixtures import SHARED_ENV

ROOT = Path(__file__).resolve().parents[1]
NEED_SHARED = [
    "tests/test_benchmark_loaders.py::test_hallusionbench_real_annotations",
    "tests/test_benchmark_loaders.py::test_sugarcrepe_real_annotations",
    "tests/test_cli_benchmarks.py::test_benchmark_runs_end_to_end[hallusionbench]",
    "tests/test_cli_benchmarks.py::test_benchmark_runs_end_to_end[sugarcrepe]",
    "tests/test_cli_benchmarks.py::test_hallusionbench_limit_keeps_whole_question_pairs",
    "tests/test_hub_paths.py::test_hub_path_through_cli[hallusionbench]",
]
UNRELATED = [
    "tests/test_benchmark_loaders.py::test_winoground_release_layout",
    "tests/test_native_metrics.py::test_beaf_change_metrics",
    "tests/test_hub_paths.py::test_mme_hub_counts",
]


def test_only_the_tests_that_read_shared_files_skip_without_them(tmp_path):
    env = os.environ | {SHARED_ENV: str(tmp_path / "absent")}
    result = subprocess.run(
        # Its own basetemp: a nested session numbering and cleaning the shared
        # /tmp/pytest-of-<user> folders can remove the outer (xdist) session's.
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"]
        + [f"--basetemp={tmp_path / 'inner'}"]
        + NEED_SHARED
        + UNRELATED,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert "3 passed, 6 skipped" in result.stdout, result.stdout[-3000:]
    assert f"needs the real annotation files in {tmp_path / 'absent'}" in result.stdout
