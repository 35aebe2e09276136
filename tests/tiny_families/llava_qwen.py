"""Tiny random LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL and Qwen2.5-VL checkpoints (test side).

Each build(seed) gives a float32 eval model and the family's processor: the real
LlavaNextProcessor, or for the three families whose real processor insists on a video
processor (which needs torchvision) an image-only subclass of the real processor class,
so placeholder expansion runs the real class's own code. Tokenizers carry each family's
real special tokens, BOS behaviour and the chat template of its main public checkpoint,
copied verbatim (sources cited at each template).
"""

from collections.abc import Callable

import torch
from transformers import (
    CLIPVisionConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    MistralConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    SiglipVisionConfig,
)

from sysattn_exp.models.chat_templates import (  # noqa: F401 (re-exported)
    LLAVA_NEXT_MISTRAL_TEMPLATE,
    LLAVA_ONEVISION_TEMPLATE,
    QWEN2_VL_TEMPLATE,
)
from sysattn_exp.models.image_only_processors import (
    LlavaOnevisionProcessor,
    Qwen2_5_VLProcessor,
    Qwen2VLProcessor,
)
from tiny_families.common import IMAGE_ONLY_LOADERS, decoder_sizes, train_tokenizer

# --- special tokens (in the real vocabularies' order) -------------------------------------
# Mistral-7B's first ids, then what llava-hf appended: <image> (32000) and a <pad>.
LLAVA_NEXT_SPECIAL = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]
# Qwen2's added tokens from 151643 on (Qwen2-VL/2.5-VL use all of them).
QWEN_SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# llava-onevision-qwen2 added_tokens.json: Qwen2's three, then <image> and <video>.
ONEVISION_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]

PINPOINTS_28 = [[28, 28], [28, 56], [56, 28], [56, 56]]


# The test boundary: rebuild the stand-in from a save_pretrained directory.
IMAGE_ONLY_LOADERS["llava_onevision"] = LlavaOnevisionProcessor.from_pretrained
IMAGE_ONLY_LOADERS["qwen2_vl"] = Qwen2VLProcessor.from_pretrained
IMAGE_ONLY_LOADERS["qwen2_5_vl"] = Qwen2_5_VLProcessor.from_pretrained


def _text(tokenizer, depth: int, hidden: int = 64, **kw) -> dict:
    """Decoder sizes shared by these families: 64 wide by default, 1,024 positions."""
    return decoder_sizes(tokenizer, depth, hidden, 1024, **kw)


def build_llava_next(seed: int = 0):
    """LLaVA-NeXT (Mistral text, 6 layers): a 28 px CLIP with 14 px patches and any-res
    tiles from PINPOINTS_28, so a 28x28 image gives 10 tokens and a 56x28 one 14."""
    tokenizer = train_tokenizer(
        LLAVA_NEXT_SPECIAL,
        bos="<s>",
        eos="</s>",
        pad="<pad>",
        add_bos=True,  # Llama/Mistral tokenizers start every encoding with <s>
        chat_template=LLAVA_NEXT_MISTRAL_TEMPLATE,
        extra_special_tokens={"image_token": "<image>"},
    )
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 28},
        crop_size={"height": 28, "width": 28},
        image_grid_pinpoints=PINPOINTS_28,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, dropped by the "default" strategy
        chat_template=LLAVA_NEXT_MISTRAL_TEMPLATE,
    )
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
            projection_dim=32,
        ),
        text_config=MistralConfig(**_text(tokenizer, depth=6, sliding_window=None)),
        image_token_index=processor.image_token_id,
        image_grid_pinpoints=PINPOINTS_28,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=4,
    )
    torch.manual_seed(seed)
    return LlavaNextForConditionalGeneration(config).eval(), processor


def build_llava_onevision(seed: int = 0):
    """LLaVA-OneVision (Qwen2 text, 4 layers): a 42 px SigLIP with 14 px patches (9 base
    tokens) and any-res tiles of 42 px."""
    pinpoints = [[42, 42], [42, 84], [84, 42], [84, 84]]
    tokenizer = train_tokenizer(
        ONEVISION_SPECIAL,
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        add_bos=False,  # Qwen2 tokenizers add no BOS
        chat_template=LLAVA_ONEVISION_TEMPLATE,
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
    )
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": 42, "width": 42}, image_grid_pinpoints=pinpoints
    )
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=9,  # (42 / 14) ** 2 patches of the base image
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        chat_template=LLAVA_ONEVISION_TEMPLATE,
    )
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=42,
            patch_size=14,
        ),
        text_config=Qwen2Config(**_text(tokenizer, depth=4, hidden=48)),
        image_token_index=processor.image_token_id,
        video_token_index=processor.video_token_id,
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
    )
    torch.manual_seed(seed)
    return LlavaOnevisionForConditionalGeneration(config).eval(), processor


def _qwen_tokenizer(template: str):
    return train_tokenizer(
        QWEN_SPECIAL,
        bos=None,
        eos="<|im_end|>",  # the Instruct checkpoints' eos; <|endoftext|> pads
        pad="<|endoftext|>",
        add_bos=False,  # Qwen2 tokenizers add no BOS
        chat_template=template,
    )


def _qwen_image_processor():
    """Qwen2-VL's PIL image processor with 7 px patches, merged 2x2: a 28x28 image is a 4x4
    patch grid (4 tokens), a 56x28 one 4x8 (8 tokens); small images are not upscaled."""
    return Qwen2VLImageProcessorPil(
        patch_size=7,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": 14 * 14, "longest_edge": 64 * 64},
    )


def _qwen_ids(tokenizer) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


# head_dim 16 -> 8 rotary frequencies, split over (temporal, height, width) positions.
_MROPE = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1000000.0}


def build_qwen2_vl(seed: int = 0):
    """Qwen2-VL (8 layers, M-RoPE) with a 2-block vision tower of 7 px patches."""
    processor = Qwen2VLProcessor(
        image_processor=_qwen_image_processor(),
        tokenizer=_qwen_tokenizer(QWEN2_VL_TEMPLATE),
        chat_template=QWEN2_VL_TEMPLATE,
    )
    tokenizer = processor.tokenizer
    config = Qwen2VLConfig(
        text_config=_text(tokenizer, depth=8, rope_parameters=dict(_MROPE)),
        vision_config=dict(
            depth=2,
            embed_dim=32,
            hidden_size=64,  # the merger's output: the text hidden size
            mlp_ratio=2,
            num_heads=2,
            patch_size=7,
            spatial_merge_size=2,
            temporal_patch_size=2,
            initializer_range=0.05,
        ),
        **_qwen_ids(tokenizer),
    )
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(config).eval(), processor


def build_qwen2_5_vl(seed: int = 0):
    """Qwen2.5-VL (6 layers, hidden 32, M-RoPE) with a 2-block windowed vision tower."""
    processor = Qwen2_5_VLProcessor(
        image_processor=_qwen_image_processor(),
        tokenizer=_qwen_tokenizer(QWEN2_VL_TEMPLATE),
        chat_template=QWEN2_VL_TEMPLATE,
    )
    tokenizer = processor.tokenizer
    config = Qwen2_5_VLConfig(
        text_config=_text(
            tokenizer,
            depth=6,
            hidden=32,  # head_dim 8 -> 4 rotary frequencies
            rope_parameters={**_MROPE, "mrope_section": [2, 1, 1]},
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=32,
            patch_size=7,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=28,  # 2x2 merged tokens per attention window
            fullatt_block_indexes=[1],
            initializer_range=0.05,
        ),
        **_qwen_ids(tokenizer),
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval(), processor


BUILDERS: dict[str, Callable[[int], tuple]] = {
    "llava_next": build_llava_next,
    "llava_onevision": build_llava_onevision,
    "qwen2_vl": build_qwen2_vl,
    "qwen2_5_vl": build_qwen2_5_vl,
}
