"""What every tiny family checkpoint shares: a byte-level BPE tokenizer trained locally with
`tokenizers` (family special tokens and chat template added), saving with save_pretrained,
and the test boundary that loads a processor back."""

import json
from collections.abc import Callable
from pathlib import Path

from transformers import AutoProcessor, AutoTokenizer, PreTrainedTokenizerFast

from sysattn_exp.models.byte_level import fast_tokenizer, train_bpe

# model_type -> loader(path) for families whose real processor needs torchvision (a video
# processor); the family modules register theirs. Everything else loads with AutoProcessor.
IMAGE_ONLY_LOADERS: dict[str, Callable] = {}


def train_tokenizer(
    special_tokens: list[str],
    *,
    bos: str | None,
    eos: str,
    pad: str,
    chat_template: str | None = None,
    add_bos: bool = True,
    extra_special_tokens: dict[str, str] | None = None,
    vocab_size: int = 500,
) -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer: `special_tokens` are single tokens (ids from 0 in
    that order), any other text still encodes. With `add_bos`, BOS starts every encoding
    (as Llama's and Gemma's tokenizers do; Qwen's add nothing)."""
    return fast_tokenizer(
        train_bpe(vocab_size, special_tokens),
        bos=bos,
        eos=eos,
        pad=pad,
        add_bos=add_bos,
        chat_template=chat_template,
        extra_special_tokens=extra_special_tokens,
    )


def save_checkpoint(model, processor, path: Path) -> Path:
    """model and processor (or tokenizer) saved with save_pretrained into `path`."""
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def load_test_processor(path: Path):
    """The test boundary: what AutoProcessor.from_pretrained(path) gives on a machine with
    torchvision. Families whose real processor needs a video processor get their image-only
    stand-in; a text-only checkpoint (no processor files) gets its tokenizer."""
    model_type = json.loads((Path(path) / "config.json").read_text())["model_type"]
    if model_type in IMAGE_ONLY_LOADERS:
        return IMAGE_ONLY_LOADERS[model_type](path)
    try:
        return AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        return AutoTokenizer.from_pretrained(path)
