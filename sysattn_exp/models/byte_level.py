"""Small byte-level BPE tokenizers trained locally from a few sentences (no hub files),
as the tiny model (tiny.py), random-weight checkpoints (offline_processors.py) and the
tests' tiny family checkpoints build them: any text encodes (byte by byte where no merge
was learned), special tokens are single tokens, padding is on the left."""

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

# Text the BPE learns its merges from: the words of the prompts the project writes.
CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions. USER: ASSISTANT:",
    "You are a helpful assistant. system user assistant model",
    "Is there a red green blue yellow circle square triangle in the image?",
    "Please answer yes or no. Yes No yes no Does this figure show the picture",
]


def byte_level(tok: Tokenizer) -> Tokenizer:
    """`tok` with byte-level pre-tokenization (no prefix space) and decoding."""
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(
    vocab_size: int,
    special_tokens: Iterable[str] = (),
    corpus: list[str] = CORPUS,
    unk_token: str | None = None,
) -> Tokenizer:
    """A byte-level BPE of `vocab_size` tokens learned from `corpus` (four times over):
    `special_tokens` first (ids from 0, in that order), then the byte alphabet and merges."""
    tok = byte_level(Tokenizer(models.BPE(unk_token=unk_token)))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus * 4, trainer=trainer)
    return tok


def fast_tokenizer(
    tok: Tokenizer,
    *,
    bos: str | None,
    eos: str,
    pad: str,
    add_bos: bool,
    chat_template: str | None = None,
    extra_special_tokens: dict[str, str] | None = None,
    **special: str,
) -> PreTrainedTokenizerFast:
    """`tok` as a transformers tokenizer padding on the left. With `add_bos` (and a `bos`),
    BOS starts every encoding (as Llama's and Gemma's tokenizers do; Qwen's add nothing).
    `special`: further special tokens by role (e.g. unk_token="<unk>")."""
    if add_bos and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tok.token_to_id(bos))],
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        chat_template=chat_template,
        extra_special_tokens=extra_special_tokens or {},
        padding_side="left",
        **special,
    )
