"""A missing optional dependency is one line before the weights load, not a traceback after
(issue 18, section 6). In transformers 5 every video processor needs torchvision, and the
processors of Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision, InternVL and SmolVLM include one;
SmolVLM's also needs num2words.

The command runs in a subprocess whose sitecustomize hides torchvision and num2words
(fault injection: this project's CPU machines have neither anyway, and a machine that has
them gets the same test). The checkpoint is a tiny Qwen2-VL saved with its real processor
files, loaded by the real AutoProcessor, and its weights file is garbage: had the weights
been read first, the error would be about them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_families import BUILDERS, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
HIDE_TORCHVISION = """
import importlib.abc
import importlib.util
import sys


def _hidden(name):
    return name.split(".")[0] in ("torchvision", "num2words")


class _HideTorchvision(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if _hidden(name):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


_find_spec = importlib.util.find_spec


def _find_spec_without_torchvision(name, package=None):
    return None if _hidden(name) else _find_spec(name, package)


sys.meta_path.insert(0, _HideTorchvision())
importlib.util.find_spec = _find_spec_without_torchvision
"""
VIDEO_FAMILIES = {"qwen2_vl", "qwen2_5_vl", "llava_onevision", "internvl", "smolvlm"}


@pytest.fixture(scope="module")
def hidden(tmp_path_factory) -> dict:
    """The environment of a Python without torchvision."""
    site = tmp_path_factory.mktemp("site")
    (site / "sitecustomize.py").write_text(HIDE_TORCHVISION)
    return {"PYTHONPATH": f"{site}:{REPO}:{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}


def python(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=os.environ | env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def qwen2_vl_garbage_weights(tmp_path_factory) -> Path:
    path = save_checkpoint(*BUILDERS["qwen2_vl"](0), tmp_path_factory.mktemp("ckpt") / "q")
    for weights in path.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    return path


def test_families_whose_processor_needs_torchvision(tmp_path, hidden):
    """With the packages hidden, the families named are exactly those whose processor class
    lists a video processor; SmolVLM's message names num2words too; the others' processors
    need nothing more."""
    code = (
        "import json\n"
        "from transformers.utils import is_torchvision_available\n"
        "from sysattn_exp.models.loading import VLM_FAMILIES, missing_processor_dependency as m\n"
        "print(json.dumps([is_torchvision_available(), {f: m(f) for f in VLM_FAMILIES}]))"
    )
    result = python(["-c", code], tmp_path, hidden)
    assert result.returncode == 0, result.stderr[-2000:]
    available, messages = json.loads(result.stdout.strip().splitlines()[-1])
    assert available is False  # the injection works
    assert {family for family, message in messages.items() if message} == VIDEO_FAMILIES
    for family in VIDEO_FAMILIES:
        assert "torchvision (for its video processor)" in messages[family]
        assert ("num2words" in messages[family]) == (family == "smolvlm")
    assert "not installed here: pip install torchvision num2words;" in messages["smolvlm"]


def test_missing_torchvision_is_one_line_before_the_weights(
    tmp_path, hidden, qwen2_vl_garbage_weights
):
    result = python(
        [
            "-m",
            "sysattn_exp",
            f"model.name_or_path={qwen2_vl_garbage_weights}",
            "benchmark=toy",
        ],
        tmp_path,
        hidden,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: model.name_or_path=")
    assert "Qwen2-VL processor (Qwen2VLProcessor)" in lines[-1]
    assert "pip install torchvision" in lines[-1]
    assert "safetensors" not in result.stderr  # the weights were never read
    assert not list(tmp_path.rglob("metrics.json"))
