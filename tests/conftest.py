import os
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).parent))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2` on a 2-core machine: one torch thread per worker, and per command-line
    # run a worker starts, rather than four threads contending for two cores.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a test module (with pytestmark usefixtures("one_thread")):
    tensors this small run faster so, and the suite shares two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fused_path(request):
    """A test parametrized with `path` (tests/paths.py IMPL_PATHS) runs the fused
    implementation on that path (fused.forced_path); other tests take it by shape."""
    from sysattn_exp.attention.fused import forced_path

    callspec = getattr(request.node, "callspec", None)
    with forced_path(callspec.params.get("path") if callspec else None):
        yield


@pytest.fixture(scope="session")
def gqa_llava():
    """A random LLaVA unlike the builtin tiny one: 6 layers, 6 heads over 3 KV heads, and
    weights at the usual 0.02 scale of trained-model initialisation."""
    from sysattn_exp.models.tiny import build_tiny_llava

    return build_tiny_llava(
        seed=7,
        num_layers=6,
        hidden_size=48,
        num_heads=6,
        num_kv_heads=3,
        image_size=42,
        init_std=0.02,
    )


def make_image(color: str, size=(50, 40)) -> Image.Image:
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).ellipse((5, 5, size[0] - 5, size[1] - 5), fill=color)
    return image
