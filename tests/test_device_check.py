"""scripts/device_check.py --small runs where Hydra, OmegaConf, MLflow, datasets, pandas and
pyarrow cannot be imported (a GPU image's own Python), writes its JSON with every section,
and its exactness checks pass; its paper grid is the grid Hydra composes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "device_check.py"
BLOCKED = ("hydra", "omegaconf", "mlflow", "datasets", "pandas", "pyarrow")

# Runs the script with those packages unimportable (None in sys.modules makes `import` fail).
WITHOUT = f"""
import runpy, sys
for name in {BLOCKED!r}:
    sys.modules[name] = None
sys.argv = [{str(SCRIPT)!r}, *sys.argv[1:]]
runpy.run_path({str(SCRIPT)!r}, run_name="__main__")
"""


@pytest.fixture(scope="module")
def small_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_check") / "check.json"
    env = {"PYTHONPATH": "", "PATH": "/usr/bin:/bin", "HOME": str(out.parent)}
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT, "--small", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=out.parent,
        env=env,
    )
    return result, json.loads(out.read_text()) if out.exists() else None


def test_small_run_passes_without_the_projects_other_dependencies(small_report):
    result, report = small_report
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert report["errors"] == {}
    assert report["passed"] is True and report["failures"] == []
    assert {"environment", "kernels", "exactness", "batch_invariance", "speed"} <= set(report)
    assert "PASSED" in result.stdout


def test_small_run_reports_each_section(small_report):
    _, report = small_report
    kernels = report["kernels"]
    assert kernels["candidates"] == ["cpu_flash"]
    # 3 dtypes x 2 spans x causal or not x padded or not
    assert len(kernels["cases"]) == 24
    exactness = report["exactness"]
    assert exactness["image_tokens"] == 576  # LLaVA-1.5's (336 / 14)^2
    assert exactness["rules_in_grid"] == 27 and exactness["rules"] == 7
    checks = exactness["checks"]
    assert all(check["passed"] for check in checks.values())
    assert checks["float32 baseline vs unmodified"]["value"] <= 1e-4
    assert checks["bfloat16 load keeps float32 buffers"]["float32_buffers"] > 0
    invariance = report["batch_invariance"]
    for key in ("bfloat16 shared", "bfloat16 unshared", "float32 shared", "float32 unshared"):
        assert set(invariance[key]) == {"1", "2", "4"}
        assert invariance[key]["1"]["largest_logit_difference"] == 0.0
    assert invariance["deterministic"]["cost_ratio"] > 0
    speed = report["speed"]
    assert speed["items_per_second"] > 0 and speed["generated_tokens_per_second"] > 0
    assert speed["paper_hours_all_six"] > speed["quarters_hours_all_six"] > 0


def test_paper_grid_is_the_grid_hydra_composes():
    from hydra import compose, initialize_config_module

    sys.path.insert(0, str(SCRIPT.parent))
    import device_check

    from sysattn_exp.experiment.conditions import build_edit, intervention_rule, resolve_layers

    depth = 32
    ours = dict(device_check.paper_grid(depth))
    composed = {}
    with initialize_config_module("sysattn_exp.conf", version_base="1.3"):
        for name in ours:
            cfg = compose("config", overrides=[f"+condition={name}"])
            rule = intervention_rule(cfg.intervention)
            layers = resolve_layers(cfg.layers, depth) if rule else []
            composed[name] = build_edit(rule, layers)
    assert len(ours) == 28 and ours == composed


def test_sweep_sizes_are_bench_scripts():
    sys.path.insert(0, str(SCRIPT.parent))
    import bench
    import device_check
    import sweep_sizes

    # One table (scripts/sweep_sizes.py) serves both scripts.
    for script in (bench, device_check):
        assert script.BENCHMARK_ITEMS is sweep_sizes.BENCHMARK_ITEMS
        assert (script.QUARTERS_JOBS, script.PAPER_JOBS) == (13, 28)


def test_runtime_deterministic_turns_torchs_deterministic_algorithms_on_per_job(
    tmp_path, monkeypatch
):
    import torch
    from cli import run_main

    common = ("model=tiny", "benchmark.limit=1", "runtime.num_workers=0")
    uri = f"tracking.uri=sqlite:///{tmp_path}/mlruns.db"
    try:
        assert run_main(tmp_path, monkeypatch, *common, uri, "runtime.deterministic=true") == 0
        assert torch.are_deterministic_algorithms_enabled()
        # the next job in the same process decides for itself
        assert run_main(tmp_path, monkeypatch, *common, uri) == 0
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
