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


def decoder_sizes(tok, layers: int, hidden: int = 32, max_positions: int = 512, **kw) -> dict:
    """A tiny decoder's config keywords: `hidden` wide (the MLP twice that), 4 query heads
    over 2 KV heads (GQA), the tokenizer's vocabulary and special ids; `kw` adds or
    overrides keys."""
    defaults = dict(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        initializer_range=0.05,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return defaults | kw


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
