"""Tiny random checkpoints of Gemma 3, InternVL, Idefics3, SmolVLM and five text-only LMs.

Every tokenizer has its family's real special tokens, BOS behaviour and the real chat
template of the family's main public checkpoint (sources cited at each template; tool-calling
branches that our prompts never reach are dropped where said). Model configs take their
token ids from the tokenizer, so config and processor agree.
"""

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    Gemma3TextConfig,
    GotOcr2ImageProcessorPil,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    Idefics3VisionConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SiglipVisionConfig,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessorPil,
    SmolVLMVisionConfig,
)

from sysattn_exp.models.chat_templates import (  # noqa: F401 (re-exported)
    GEMMA2_TEMPLATE,
    GEMMA3_TEMPLATE,
    IDEFICS3_TEMPLATE,
    INTERNVL_TEMPLATE,
    LLAMA31_TEMPLATE,
    QWEN3_TEMPLATE,
    QWEN25_TEMPLATE,
    SMOLVLM_TEMPLATE,
)
from sysattn_exp.models.image_only_processors import (
    InternVLImageOnlyProcessor,
    SmolVLMImageOnlyProcessor,
)
from tiny_families.common import IMAGE_ONLY_LOADERS, decoder_sizes, train_tokenizer

# ---------------------------------------------------------------- special tokens

GEMMA_SPECIALS = [
    "<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
    "<start_of_image>", "<end_of_image>", "<image_soft_token>",
]  # fmt: skip
LLAMA3_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eot_id|>", "<|eom_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>",
]  # fmt: skip
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Idefics3 / SmolVLM tile markers are single tokens in the real tokenizers.
ROW_COL = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
IDEFICS_SPECIALS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]


def _tiny_text(cls, tok, layers: int, **kw):
    """A tiny decoder config (common.decoder_sizes: 32 wide, 512 positions)."""
    return cls(**decoder_sizes(tok, layers, **kw))


def _eval(model):
    return model.float().eval()


# ---------------------------------------------------------------- Gemma 3 / Gemma 2

GEMMA_IMAGE_TOKENS = {
    "image_token": "<image_soft_token>",
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
}


def _gemma_tokenizer(template: str, extra: dict | None = None):
    return train_tokenizer(
        GEMMA_SPECIALS,
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        chat_template=template,
        extra_special_tokens=extra,
    )


def _gemma3_text_config(tok, layers: int):
    # Mostly sliding layers with a full one midway and last (Gemma 3's 5 sliding : 1 full,
    # shortened); sliding_window 8 so the window binds on test prompts;
    # query_pre_attn_scalar 16 != head_dim 8, so the attention scale is not 1/sqrt(head_dim).
    types = ["sliding_attention"] * layers
    types[layers // 2] = types[-1] = "full_attention"
    return _tiny_text(
        Gemma3TextConfig,
        tok,
        layers,
        head_dim=8,
        query_pre_attn_scalar=16,
        sliding_window=8,
        layer_types=types,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
    )


def build_gemma3(seed: int):
    tok = _gemma_tokenizer(GEMMA3_TEMPLATE, GEMMA_IMAGE_TOKENS)
    # 42 px / patch 7 = 6x6 patches, average-pooled to 3x3 = 9 soft tokens per image.
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=42,
        patch_size=7,
    )
    config = Gemma3Config(
        text_config=_gemma3_text_config(tok, 6),
        vision_config=vision,
        mm_tokens_per_image=9,
        boi_token_index=tok.boi_token_id,
        eoi_token_index=tok.eoi_token_id,
        image_token_index=tok.image_token_id,
        initializer_range=0.05,
    )
    torch.manual_seed(seed)
    model = _eval(Gemma3ForConditionalGeneration(config))
    image_processor = Gemma3ImageProcessorPil(size={"height": 42, "width": 42})
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tok,
        chat_template=GEMMA3_TEMPLATE,
        image_seq_length=9,
    )
    return model, processor


def build_gemma3_text(seed: int):
    tok = _gemma_tokenizer(GEMMA3_TEMPLATE)
    config = _gemma3_text_config(tok, 8)
    torch.manual_seed(seed)
    return _eval(Gemma3ForCausalLM(config)), tok


def build_gemma2(seed: int):
    tok = _gemma_tokenizer(GEMMA2_TEMPLATE)
    # Gemma 2 alternates sliding and full layers and soft-caps attention logits and final logits.
    config = _tiny_text(
        Gemma2Config,
        tok,
        4,
        head_dim=8,
        query_pre_attn_scalar=16,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"] * 2,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
    )
    torch.manual_seed(seed)
    return _eval(Gemma2ForCausalLM(config)), tok


# ---------------------------------------------------------------- InternVL (Qwen2 text)

INTERNVL_IMAGE_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}


def build_internvl(seed: int):
    tok = train_tokenizer(
        [*QWEN_SPECIALS, "<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>",
         "<box>", "</box>", "<video>"],
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        chat_template=INTERNVL_TEMPLATE,
        add_bos=False,
        extra_special_tokens=INTERNVL_IMAGE_TOKENS,
    )  # fmt: skip
    # A 32 px tile / patch 4 = 8x8 patches, pixel-shuffled by 0.5 to 16 tokens per tile.
    vision = InternVLVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=[32, 32],
        patch_size=[4, 4],
        initializer_range=0.05,
    )
    config = InternVLConfig(
        vision_config=vision,
        text_config=_tiny_text(Qwen2Config, tok, 4),
        image_token_id=tok.context_image_token_id,
        image_seq_length=16,
        downsample_ratio=0.5,
    )
    torch.manual_seed(seed)
    model = _eval(InternVLForConditionalGeneration(config))
    # crop_to_patches: an image wider than tall becomes several 32 px tiles plus a thumbnail.
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1, max_patches=4
    )
    processor = InternVLImageOnlyProcessor(
        image_processor, tok, image_seq_length=16, chat_template=INTERNVL_TEMPLATE
    )
    return model, processor


# ---------------------------------------------------------------- Idefics3 / SmolVLM (Llama text)


def _idefics_like(seed: int, tok, layers: int, template: str, classes: tuple):
    """(model, processor) of Idefics3 or SmolVLM, which share the layout: a 32 px tile /
    patch 4 = 8x8 patches, pixel-shuffled by scale_factor 2 to 16 <image> tokens per tile.
    Images are resized to a longest edge of 64 and split into 32 px tiles (up to 2x2) plus
    the global image. `classes`: the family's vision config, config, image processor, model
    and processor classes."""
    vision_cls, config_cls, image_processor_cls, model_cls, processor_cls = classes
    vision = vision_cls(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=32,
        patch_size=4,
        initializer_range=0.05,
    )
    text = _tiny_text(LlamaConfig, tok, layers)
    config = config_cls(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=2,
    )
    image_processor = image_processor_cls(
        size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=True
    )
    torch.manual_seed(seed)
    model = _eval(model_cls(config))
    return model, processor_cls(image_processor, tok, image_seq_len=16, chat_template=template)


def build_idefics3(seed: int):
    tok = train_tokenizer(
        [*LLAMA3_SPECIALS, *IDEFICS_SPECIALS, *ROW_COL],
        bos="<|begin_of_text|>",
        eos="<end_of_utterance>",
        pad="<|finetune_right_pad_id|>",
        chat_template=IDEFICS3_TEMPLATE,
    )
    classes = (
        Idefics3VisionConfig,
        Idefics3Config,
        Idefics3ImageProcessorPil,
        Idefics3ForConditionalGeneration,
        Idefics3Processor,
    )
    return _idefics_like(seed, tok, 8, IDEFICS3_TEMPLATE, classes)


def build_smolvlm(seed: int):
    # SmolVLM-Instruct's tokenizer (SmolLM2): no BOS added, <|im_start|> opens the template;
    # the image tokens are named extra special tokens, as SmolVLMProcessor looks them up.
    tok = train_tokenizer(
        [*QWEN_SPECIALS, *IDEFICS_SPECIALS, "<video>", *ROW_COL],
        bos="<|im_start|>",
        eos="<end_of_utterance>",
        pad="<|im_end|>",
        chat_template=SMOLVLM_TEMPLATE,
        add_bos=False,
        extra_special_tokens={
            "image_token": "<image>",
            "fake_image_token": "<fake_token_around_image>",
            "end_of_utterance_token": "<end_of_utterance>",
            "global_image_token": "<global-img>",
        },
    )
    classes = (
        SmolVLMVisionConfig,
        SmolVLMConfig,
        SmolVLMImageProcessorPil,
        SmolVLMForConditionalGeneration,
        SmolVLMImageOnlyProcessor,
    )
    return _idefics_like(seed, tok, 6, SMOLVLM_TEMPLATE, classes)


# ---------------------------------------------------------------- text-only LMs


def build_llama(seed: int):
    # Llama 3's tokenizer adds <|begin_of_text|>; the instruct eos is <|eot_id|>.
    tok = train_tokenizer(
        LLAMA3_SPECIALS,
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        pad="<|finetune_right_pad_id|>",
        chat_template=LLAMA31_TEMPLATE,
    )
    config = _tiny_text(LlamaConfig, tok, 4)
    torch.manual_seed(seed)
    return _eval(LlamaForCausalLM(config)), tok


def _qwen_tokenizer(template: str, extra: list[str] = ()):
    # Qwen's tokenizers add no BOS; pad is <|endoftext|>, the instruct eos <|im_end|>.
    return train_tokenizer(
        [*QWEN_SPECIALS, *extra],
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        chat_template=template,
        add_bos=False,
    )


def build_qwen2(seed: int):
    tok = _qwen_tokenizer(QWEN25_TEMPLATE)
    config = _tiny_text(Qwen2Config, tok, 6)
    torch.manual_seed(seed)
    return _eval(Qwen2ForCausalLM(config)), tok


def build_qwen3(seed: int):
    tok = _qwen_tokenizer(QWEN3_TEMPLATE, ["<think>", "</think>"])
    config = _tiny_text(Qwen3Config, tok, 8, head_dim=8)
    torch.manual_seed(seed)
    return _eval(Qwen3ForCausalLM(config)), tok


# The stand-ins rebuild from a save_pretrained directory with the real loading code.
IMAGE_ONLY_LOADERS["internvl"] = InternVLImageOnlyProcessor.from_pretrained
IMAGE_ONLY_LOADERS["smolvlm"] = SmolVLMImageOnlyProcessor.from_pretrained

BUILDERS = {
    "gemma3": build_gemma3,
    "internvl": build_internvl,
    "idefics3": build_idefics3,
    "smolvlm": build_smolvlm,
    "llama": build_llama,
    "qwen2": build_qwen2,
    "qwen3": build_qwen3,
    "gemma3_text": build_gemma3_text,
    "gemma2": build_gemma2,
}
