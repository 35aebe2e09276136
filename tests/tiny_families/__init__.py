"""Tiny random checkpoints of every supported model family, built in code (test side).

Each family module defines BUILDERS: name -> build(seed) returning (model, processor), the
processor being the family's real processor class where it can be built without
torchvision, else an image-only stand-in (common.py) that expands images exactly as the
real one does. A text-only family's "processor" is its tokenizer.
"""

from sysattn_exp.models.tiny import build_tiny_llava
from tiny_families.common import load_test_processor, save_checkpoint


def build_llava(seed: int):
    """LLaVA-1.5 (the paper's family), 4 decoder layers, 4 heads over 2 KV heads."""
    return build_tiny_llava(seed, num_layers=4, hidden_size=32, image_size=28, init_std=0.05)


BUILDERS: dict = {"llava": build_llava}
try:  # filled in by the family modules as they land
    from tiny_families.llava_qwen import BUILDERS as _LLAVA_QWEN

    BUILDERS.update(_LLAVA_QWEN)
except ImportError:
    pass
try:
    from tiny_families.others import BUILDERS as _OTHERS

    BUILDERS.update(_OTHERS)
except ImportError:
    pass

__all__ = ["BUILDERS", "load_test_processor", "save_checkpoint"]
