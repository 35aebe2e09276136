"""What every tiny family checkpoint shares: a byte-level BPE tokenizer trained locally with
`tokenizers` (family special tokens and chat template added), saving with save_pretrained,
and the test boundary that loads a processor back."""

import json
from collections.abc import Callable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoProcessor, AutoTokenizer, PreTrainedTokenizerFast

CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions. USER: ASSISTANT:",
    "You are a helpful assistant. system user assistant model",
    "Is there a red green blue yellow circle square triangle in the image?",
    "Please answer yes or no. Yes No yes no Does this figure show the picture",
]

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
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    if add_bos and bos is not None:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        chat_template=chat_template,
        extra_special_tokens=extra_special_tokens or {},
        padding_side="left",
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
