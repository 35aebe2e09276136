"""A small random-weight LLaVA built in code from a seed: no files, no network.

It has LLaVA-1.5's structure (CLIP vision tower, MLP projector, Llama decoder with
grouped-query attention, `<image>` expanded to one token per patch), so every code path
of the runner runs on it; its answers are of course meaningless.
"""

import torch
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from sysattn_exp.models.byte_level import fast_tokenizer, train_bpe

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]

# Text the tokenizer learns its merges from; any other text still encodes (byte-level).
CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions. USER: ASSISTANT:",
    "Is there a red green blue yellow circle square triangle in the image?",
    "Please answer yes or no. Yes No yes no Does this figure show the picture",
]


def build_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    tok = train_bpe(vocab_size, SPECIAL_TOKENS, CORPUS, unk_token="<unk>")
    return fast_tokenizer(
        tok,
        bos="<s>",
        eos="</s>",
        pad="<pad>",
        add_bos=True,
        extra_special_tokens={"image_token": "<image>"},
        unk_token="<unk>",
    )


def build_processor(image_size: int = 56, patch_size: int = 14) -> LlavaProcessor:
    """LLaVA-1.5's processor layout (one <image> token per patch, CLS dropped) at a small size."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def build_config(
    tokenizer=None,
    *,
    num_layers: int = 8,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    image_size: int = 56,
    patch_size: int = 14,
    init_std: float = 0.3,
    max_positions: int = 1024,
    head_dim: int | None = None,
) -> LlavaConfig:
    """The tiny LLaVA's config (of the default sizes: the builtin model's). `head_dim`:
    the attention heads' size (None: hidden_size / num_heads, Llama's default), so that a
    narrow model can have a real model's attention shape (scripts/bench.py --grid)."""
    tokenizer = tokenizer or build_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim or hidden_size // num_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # The default is wider than the usual 0.02 so that the demo's answers depend on the
        # input and edits visibly change them.
        initializer_range=init_std,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def build_tiny_llava(
    seed: int = 0,
    *,
    image_size: int = 56,
    patch_size: int = 14,
    dtype: torch.dtype = torch.float32,
    **sizes,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Random LLaVA and its processor; the same seed gives the same weights (drawn in
    float32, then rounded to `dtype`). `sizes` are build_config's."""
    processor = build_processor(image_size, patch_size)
    config = build_config(
        processor.tokenizer, image_size=image_size, patch_size=patch_size, **sizes
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    return cast_parameters(model, dtype), processor


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The parameters in `dtype`, the buffers as they are: a LLaVA as
    from_pretrained(dtype=...) loads it (its only float buffers are the rotary
    frequencies, which transformers keeps in float32; model.to(dtype) would round them)."""
    for parameter in model.parameters():
        parameter.data = parameter.data.to(dtype)
    return model
