"""Tokenizers and processors for model.weights=random, built in code: no hub files.

The tokenizer is a small byte-level BPE trained locally (byte_level.py, as tiny.py's), whose
vocabulary is extended with filler entries to the checkpoint's vocabulary size, with each
family's special tokens at their published ids (so the shipped config's image_token_id,
pad and eos ids mean what they mean in the real checkpoint). Ordinary words therefore
split into other, usually more, tokens than the real tokenizer's; prompts' image spans,
special tokens and chat templates are the real ones. The processor is the family's real
processor class (or its image-only stand-in, image_only_processors.py) with the published
preprocessing settings of the checkpoint's preprocessor_config.json (image size, tiling,
patch and merge sizes), so an image expands to the real number of image tokens (576 for
LLaVA-1.5, any-res tiles for LLaVA-NeXT and OneVision, 28x28-pixel tokens for Qwen2-VL...).

Special-token ids: from the checkpoints' tokenizer files as documented in
sysattn_exp/model_configs/SOURCES.md, which also says where an id is placed by this module
rather than known (Idefics3's and SmolVLM2's tile-marker ids).
"""

import json
from collections.abc import Callable

from tokenizers import AddedToken, Tokenizer, models
from transformers import (
    CLIPImageProcessorPil,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    GotOcr2ImageProcessorPil,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaOnevisionImageProcessorPil,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2VLImageProcessorPil,
    SmolVLMImageProcessorPil,
)

from sysattn_exp.models import chat_templates as templates
from sysattn_exp.models.byte_level import byte_level, fast_tokenizer, train_bpe
from sysattn_exp.models.image_only_processors import (
    InternVLImageOnlyProcessor,
    LlavaOnevisionProcessor,
    Qwen2_5_VLProcessor,
    Qwen2VLProcessor,
    SmolVLMImageOnlyProcessor,
)

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)

# Published special-token ids per tokenizer family.
LLAMA2 = {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": 32000, "<pad>": 32001}  # + llava-hf's two
QWEN2 = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
QWEN2_VL = QWEN2 | {
    name: 151646 + i
    for i, name in enumerate(
        [
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
    )
}
GEMMA = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
LLAMA3 = {
    "<|begin_of_text|>": 128000,
    "<|end_of_text|>": 128001,
    "<|finetune_right_pad_id|>": 128004,
    "<|start_header_id|>": 128006,
    "<|end_header_id|>": 128007,
    "<|eom_id|>": 128008,
    "<|eot_id|>": 128009,
    "<|python_tag|>": 128010,
}
ROW_COL = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]


def build_tokenizer(
    vocab_size: int,
    specials: dict[str, int],
    *,
    bos: str | None,
    eos: str,
    pad: str,
    add_bos: bool,
    chat_template: str | None = None,
    extra_special_tokens: dict[str, str] | None = None,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of max(vocab_size, largest special id + 1) tokens: the
    special tokens at their given ids, the locally learned tokens at the lowest free ids,
    filler entries elsewhere. With `add_bos`, BOS starts every encoding."""
    model = json.loads(train_bpe(600).to_str())["model"]
    size = max(vocab_size, max(specials.values()) + 1)
    taken = set(specials.values())
    free = (i for i in range(size) if i not in taken)
    learned = sorted(model["vocab"], key=model["vocab"].get)
    vocab = dict(specials) | {token: next(free) for token in learned}
    vocab |= {f"<|filler_{i}|>": i for i in free}
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = byte_level(Tokenizer(models.BPE(vocab=vocab, merges=merges)))
    tok.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in specials])
    return fast_tokenizer(
        tok,
        bos=bos,
        eos=eos,
        pad=pad,
        add_bos=add_bos,
        chat_template=chat_template,
        extra_special_tokens=extra_special_tokens,
    )


def vocab_size(config) -> int:
    return config.get_text_config().vocab_size


def llama2_tokenizer(config, template: str | None = None):
    """LLaVA-1.5's and LLaVA-NeXT's (Llama 2 / Mistral) tokenizer: <s> starts every
    encoding, </s> ends, <image> is the image token."""
    return build_tokenizer(
        vocab_size(config),
        LLAMA2,
        bos="<s>",
        eos="</s>",
        pad="<pad>",
        add_bos=True,
        chat_template=template,
        extra_special_tokens={"image_token": "<image>"},
    )


def qwen2_tokenizer(config, specials: dict[str, int], template: str, extra=None):
    """A Qwen2-based tokenizer (Qwen2/2.5-VL, LLaVA-OneVision, InternVL3, the Qwen text
    models): no BOS added, <|im_end|> ends a turn, <|endoftext|> pads; `extra`: the
    processor's named special tokens."""
    return build_tokenizer(
        vocab_size(config),
        specials,
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        add_bos=False,
        chat_template=template,
        extra_special_tokens=extra,
    )


def llava_view(image_processor_class, **settings):
    """LLaVA-1.5's and NeXT's image processor: the base view CLIP's (shortest edge 336,
    centre crop 336, CLIP's mean and std); `settings`: the class's own (any-res)."""
    return image_processor_class(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        **settings,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )


# LLaVA-1.5's and NeXT's image tokens: 14-px patches, the CLS token dropped
# (vision_feature_select_strategy default).
LLAVA_TOKENS = dict(
    patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1
)


def llava15(config):
    # llava-hf/llava-1.5-*-hf preprocessor_config.json: CLIP, shortest edge 336, centre crop
    # 336; 576 patch tokens (the CLS token dropped: vision_feature_select_strategy default).
    # No chat template needed: LLaVA-1.5 keeps the paper's vicuna prompt (prompts.py).
    return LlavaProcessor(
        image_processor=llava_view(CLIPImageProcessorPil),
        tokenizer=llama2_tokenizer(config),
        **LLAVA_TOKENS,
    )


def llava_next(template: str) -> Callable:
    def build(config):
        # llava-hf/llava-v1.6-*-hf: CLIP 336 base view plus any-res crops from the config's
        # image_grid_pinpoints, padded; 24x24 tokens per view, a newline token per row.
        image_processor = llava_view(
            LlavaNextImageProcessorPil, image_grid_pinpoints=config.image_grid_pinpoints
        )
        return LlavaNextProcessor(
            image_processor=image_processor,
            tokenizer=llama2_tokenizer(config, template),
            **LLAVA_TOKENS,
            chat_template=template,
        )

    return build


def llava_onevision(config):
    # llava-hf/llava-onevision-qwen2-7b-ov-hf: SigLIP 384 (mean/std 0.5), any-res from the
    # config's pinpoints with anyres_max_9; 729 tokens per 384-px view.
    tok = qwen2_tokenizer(
        config,
        QWEN2 | {"<image>": 151646, "<video>": 151647},
        templates.LLAVA_ONEVISION_TEMPLATE,
        {"image_token": "<image>", "video_token": "<video>"},
    )
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": 384, "width": 384},
        image_grid_pinpoints=config.image_grid_pinpoints,
        image_mean=HALF,
        image_std=HALF,
    )
    return LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        num_image_tokens=729,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        chat_template=templates.LLAVA_ONEVISION_TEMPLATE,
    )


def qwen_vl(processor_class) -> Callable:
    def build(config):
        # Qwen/Qwen2-VL-7B-Instruct and Qwen2.5-VL preprocessor_config.json: 14-px patches
        # merged 2x2 (one token per 28x28 pixels), min_pixels 3136, max_pixels 12845056.
        tok = qwen2_tokenizer(config, QWEN2_VL, templates.QWEN2_VL_TEMPLATE)
        image_processor = Qwen2VLImageProcessorPil(
            patch_size=14,
            merge_size=2,
            temporal_patch_size=2,
            size={"shortest_edge": 3136, "longest_edge": 12845056},
            image_mean=CLIP_MEAN,
            image_std=CLIP_STD,
        )
        return processor_class(
            image_processor=image_processor,
            tokenizer=tok,
            chat_template=templates.QWEN2_VL_TEMPLATE,
        )

    return build


GEMMA3_IMAGE = {"<start_of_image>": 255999, "<end_of_image>": 256000, "<image_soft_token>": 262144}


def gemma_tokenizer(config, template: str, turns: tuple[int, int], image: bool = False):
    specials = GEMMA | {"<start_of_turn>": turns[0], "<end_of_turn>": turns[1]}
    extra = {}
    if image:
        specials |= GEMMA3_IMAGE
        extra = {
            "image_token": "<image_soft_token>",
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
        }
    return build_tokenizer(
        vocab_size(config),
        specials,
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        add_bos=True,
        chat_template=template,
        extra_special_tokens=extra,
    )


def gemma3(config):
    # google/gemma-3-*-it: SigLIP 896x896 (mean/std 0.5), pan-and-scan off; 256 soft tokens.
    tok = gemma_tokenizer(config, templates.GEMMA3_TEMPLATE, (105, 106), image=True)
    image_processor = Gemma3ImageProcessorPil(
        size={"height": 896, "width": 896}, image_mean=HALF, image_std=HALF
    )
    return Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tok,
        chat_template=templates.GEMMA3_TEMPLATE,
        image_seq_length=config.mm_tokens_per_image,
    )


def internvl(config):
    # OpenGVLab/InternVL3-8B-hf: 448-px tiles (ImageNet mean/std), 1..12 tiles plus a
    # thumbnail; 256 <IMG_CONTEXT> tokens per tile inside <img>...</img>.
    names = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>"]
    specials = QWEN2 | {name: 151665 + i for i, name in enumerate([*names, "</box>"])}
    # Placed, not published: a free id below the vocabulary size (only video prompts use it).
    specials["<video>"] = 151664
    tok = qwen2_tokenizer(
        config,
        specials,
        templates.INTERNVL_TEMPLATE,
        {
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
    )
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": 448, "width": 448},
        crop_to_patches=True,
        min_patches=1,
        max_patches=12,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )
    return InternVLImageOnlyProcessor(
        image_processor,
        tok,
        image_seq_length=config.image_seq_length,
        chat_template=templates.INTERNVL_TEMPLATE,
    )


def tiled_processor(
    image_processor_class, processor_class, tok, longest_edge: int, tile: int, tokens: int, template
):
    """Idefics3's processor layout (SmolVLM's too): an image resized to a longest edge of
    `longest_edge` px and split into `tile`-px tiles plus the global image, `tokens` image
    tokens per tile, pixels normalised with mean and std 0.5."""
    image_processor = image_processor_class(
        size={"longest_edge": longest_edge},
        max_image_size={"longest_edge": tile},
        do_image_splitting=True,
        image_mean=HALF,
        image_std=HALF,
    )
    return processor_class(image_processor, tok, image_seq_len=tokens, chat_template=template)


def idefics3(config):
    # HuggingFaceM4/Idefics3-8B-Llama3: images resized to a longest edge of 1456 and split
    # into 364-px tiles plus the global image; 169 tokens per tile (scale_factor 2).
    markers = {name: 128011 + i for i, name in enumerate([*ROW_COL, "<global-img>"])}
    specials = (
        LLAMA3
        | markers
        | {
            "<fake_token_around_image>": 128256,
            "<image>": 128257,
            "<end_of_utterance>": 128258,
        }
    )
    tok = build_tokenizer(
        vocab_size(config),
        specials,
        bos="<|begin_of_text|>",
        eos="<end_of_utterance>",
        pad="<|finetune_right_pad_id|>",
        add_bos=True,
        chat_template=templates.IDEFICS3_TEMPLATE,
    )
    return tiled_processor(
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        tok,
        1456,
        364,
        169,
        templates.IDEFICS3_TEMPLATE,
    )


def smolvlm(config):
    # HuggingFaceTB/SmolVLM2-2.2B-Instruct: longest edge 1536, 384-px tiles plus the global
    # image; 81 tokens per tile (scale_factor 3).
    markers = [*ROW_COL, "<global-img>", "<video>"]
    specials = (
        {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
        | {"<fake_token_around_image>": 49189, "<image>": 49190}
        | {name: 49191 + i for i, name in enumerate(markers)}
        | {"<end_of_utterance>": 49279}
    )
    tok = build_tokenizer(
        vocab_size(config),
        specials,
        bos="<|im_start|>",
        eos="<end_of_utterance>",
        pad="<|im_end|>",
        add_bos=False,
        chat_template=templates.SMOLVLM_TEMPLATE,
        extra_special_tokens={
            "image_token": "<image>",
            "fake_image_token": "<fake_token_around_image>",
            "end_of_utterance_token": "<end_of_utterance>",
            "global_image_token": "<global-img>",
        },
    )
    return tiled_processor(
        SmolVLMImageProcessorPil,
        SmolVLMImageOnlyProcessor,
        tok,
        1536,
        384,
        81,
        templates.SMOLVLM_TEMPLATE,
    )


def llama3(config):
    return build_tokenizer(
        vocab_size(config),
        LLAMA3,
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        pad="<|finetune_right_pad_id|>",
        add_bos=True,
        chat_template=templates.LLAMA31_TEMPLATE,
    )


def qwen_text(template: str, extra: dict[str, int] | None = None) -> Callable:
    def build(config):
        return qwen2_tokenizer(config, QWEN2 | (extra or {}), template)

    return build


# preset -> build(config) -> processor (a text-only model's: its tokenizer)
BUILDERS: dict[str, Callable] = {
    "llava15_7b": llava15,
    "llava15_13b": llava15,
    "llava_next_7b": llava_next(templates.LLAVA_NEXT_MISTRAL_TEMPLATE),
    "llava_next_vicuna_7b": llava_next(templates.LLAVA_NEXT_VICUNA_TEMPLATE),
    "llava_onevision_7b": llava_onevision,
    "qwen2_vl_7b": qwen_vl(Qwen2VLProcessor),
    "qwen25_vl_7b": qwen_vl(Qwen2_5_VLProcessor),
    "qwen25_vl_72b": qwen_vl(Qwen2_5_VLProcessor),
    "gemma3_4b": gemma3,
    "gemma3_12b": gemma3,
    "gemma3_27b": gemma3,
    "gemma3_1b": lambda config: gemma_tokenizer(config, templates.GEMMA3_TEMPLATE, (105, 106)),
    "internvl3_8b": internvl,
    "idefics3_8b": idefics3,
    "smolvlm2_2b": smolvlm,
    "llama31_8b": llama3,
    "qwen25_7b": qwen_text(templates.QWEN25_TEMPLATE),
    "qwen3_8b": qwen_text(templates.QWEN3_TEMPLATE, {"<think>": 151667, "</think>": 151668}),
    "gemma2_2b": lambda config: gemma_tokenizer(config, templates.GEMMA2_TEMPLATE, (106, 107)),
}


def build_processor(preset: str, config):
    """The processor (a VLM) or tokenizer (a text-only LM) for `preset`'s random-weight
    model, whose `config` is the shipped one (possibly with config_overrides)."""
    return BUILDERS[preset](config)
