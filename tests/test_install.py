"""A wheel of the project, installed outside the checkout, runs: the configs ship inside the
package and nothing looks for the checkout's files."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_wheel_installed_elsewhere_runs_from_its_own_files(tmp_path):
    # Build from a copy: an in-tree build would leave build/ and *.egg-info in the checkout.
    source = tmp_path / "source"
    source.mkdir()
    shutil.copy(ROOT / "pyproject.toml", source)
    shutil.copytree(
        ROOT / "sysattn_exp", source / "sysattn_exp", ignore=shutil.ignore_patterns("__pycache__")
    )
    wheels, target, work = tmp_path / "wheels", tmp_path / "target", tmp_path / "work"
    work.mkdir()
    pip = ("-m", "pip", "--disable-pip-version-check", "-q")
    built = run(
        *pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source), cwd=work
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = wheels.glob("sysattn_exp-*.whl")
    installed = run(*pip, "install", "--no-deps", "--target", str(target), str(wheel), cwd=work)
    assert installed.returncode == 0, installed.stderr[-3000:]
    assert (target / "sysattn_exp" / "conf" / "config.yaml").is_file()
    assert (target / "sysattn_exp" / "conf" / "model" / "tiny.yaml").is_file()
    assert (target / "sysattn_exp" / "models" / "toy_weights.safetensors").is_file()
    assert (target / "sysattn_exp" / "models" / "toy_balanced_weights.safetensors").is_file()
    assert (target / "sysattn_exp" / "models" / "model_configs" / "llava15_7b.json").is_file()
    # The published baselines every baseline job is compared with (experiment/parity.py).
    assert (target / "sysattn_exp" / "data" / "published.yaml").is_file()

    # A config option that exists only in the installed copy: if the app composes it, the
    # configs came from TARGET and not from a checkout.
    probe = (target / "sysattn_exp" / "conf" / "model" / "tiny.yaml").read_text()
    probe += '\nsystem_prompt: "Installed wheel probe."\n'
    (target / "sysattn_exp" / "conf" / "model" / "wheel_probe.yaml").write_text(probe)

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(target)}
    where = run("-c", "import sysattn_exp; print(sysattn_exp.__file__)", cwd=work, env=env)
    assert where.stdout.strip() == str(target / "sysattn_exp" / "__init__.py"), where.stderr
    dry = run("-m", "sysattn_exp", "model=wheel_probe", "runtime.dry_run=true", cwd=work, env=env)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "benchmark toy: n_items=72, n_groups=36" in dry.stdout
    assert "Installed wheel probe. USER: <image>" in dry.stdout
    # model.weights=random reads its config.json from the installed package data.
    shapes = ("model=llava15_7b", "model.weights=random", "runtime.dry_run=true")
    dry = run("-m", "sysattn_exp", *shapes, cwd=work, env=env)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "image=576," in dry.stdout
    toy = run("-m", "sysattn_exp", "model=toy", "benchmark.limit=2", cwd=work, env=env)
    assert toy.returncode == 0, toy.stderr[-3000:]
    assert "toy baseline: paired_accuracy=1.0000" in toy.stdout + toy.stderr
    report = run("-m", "sysattn_exp.report", "--help", cwd=work, env=env)
    assert report.returncode == 0, report.stderr[-3000:]
    assert "wheel_probe" in report.stdout and "parent: latest" in report.stdout
