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
import transformers
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

from tiny_families.common import IMAGE_ONLY_LOADERS, train_tokenizer

# --- chat templates, verbatim ------------------------------------------------------------
# llava-hf/llava-v1.6-mistral-7b-hf, chat_template.json. Source: openvinotoolkit/openvino.genai
# src/cpp/src/tokenizer.cpp, chat_template_fallback_map entry "tiny-random-llava-next,
# llava-v1.6-mistral (chat_template.json)" (the map keys on the exact published text).
# As in the file, "\n" is a real newline inside jinja strings and the assistant turn ends
# with the jinja string '<\\s> ' (a backslash, rendered `<\s> `). No generation prompt.
LLAVA_NEXT_MISTRAL_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<<SYS>>\n' + "
    "message['content'][0]['text'] + '\n<</SYS>>\n\n' }}{% elif message['role'] == 'user' %}"
    "{{ '[INST] ' }}{# Render all images first #}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text "
    "next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'][0]['text'] + '<\\\\s> '}}{% else %}{{ raise_exception('Only "
    "user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# llava-hf/llava-onevision-qwen2-7b-ov-hf, chat_template.json (824 bytes, "Upload processor").
# Source: the same-size file of its sibling llava-hf/llava-onevision-qwen2-7b-si-hf
# (huggingface.co/llava-hf/llava-onevision-qwen2-7b-si-hf/blob/974bbb6c/chat_template.json),
# which is also the template transformers' convert_llava_onevision_weights_to_hf.py writes.
# Saved as {"chat_template": ...} with indent 2 this text gives exactly those 824 bytes.
LLAVA_ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{# Render all "
    "images first #}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'image') %}{{ '<image>\n' }}{% endfor %}{# Render all video then #}{% for content in "
    "message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}"
    "{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}{% for content "
    "in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'text') %}{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen/Qwen2-VL-7B-Instruct, chat_template.json; Qwen/Qwen2.5-VL-7B-Instruct ships the same
# text. Sources: openvinotoolkit/openvino.genai src/cpp/src/tokenizer.cpp (entry
# "Qwen2-VL-2B-Instruct (tokenizer_config.json)") and the Qwen2.5-VL mirror
# huggingface.co/optimum-intel-internal-testing/tiny-random-qwen2.5-vl chat_template.json.
# Its newlines are literal template text, hence real "\n" here.
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

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


# Image-only stand-ins: the real processor classes minus the video processor (it needs
# torchvision). ProcessorMixin takes its sub-processors from the __init__ signature, so a
# subclass whose __init__ lacks `video_processor` needs, saves and loads only an image
# processor and a tokenizer; every other method (placeholder expansion, chat template,
# saving) is the real class's. They keep the real class names, so the files they save
# (processor_config.json, tokenizer_config.json) name the real class and AutoProcessor on a
# machine with torchvision would load the real processor from them. The arguments are
# spelled out because from_pretrained reads them from __init__.__code__.
class LlavaOnevisionProcessor(transformers.LlavaOnevisionProcessor):
    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token="<image>",
        video_token="<video>",
        vision_aspect_ratio="anyres_max_9",
        **kwargs,
    ):
        super().__init__(
            image_processor,
            tokenizer,
            None,  # video_processor
            num_image_tokens=num_image_tokens,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            video_token=video_token,
            vision_aspect_ratio=vision_aspect_ratio,
            **kwargs,
        )


class Qwen2VLProcessor(transformers.Qwen2VLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class Qwen2_5_VLProcessor(transformers.Qwen2_5_VLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


# The test boundary: rebuild the stand-in from a save_pretrained directory.
IMAGE_ONLY_LOADERS["llava_onevision"] = LlavaOnevisionProcessor.from_pretrained
IMAGE_ONLY_LOADERS["qwen2_vl"] = Qwen2VLProcessor.from_pretrained
IMAGE_ONLY_LOADERS["qwen2_5_vl"] = Qwen2_5_VLProcessor.from_pretrained


def _text(tokenizer, depth: int, hidden: int = 64, **kw) -> dict:
    """Decoder sizes shared by the families: 4 query heads over 2 KV heads (GQA)."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=depth,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.05,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **kw,
    )


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
