"""Tiny random checkpoints of Gemma 3, InternVL, Idefics3, SmolVLM and five text-only LMs.

Every tokenizer has its family's real special tokens, BOS behaviour and the real chat
template of the family's main public checkpoint (sources cited at each template; tool-calling
branches that our prompts never reach are dropped where said). Model configs take their
token ids from the tokenizer, so config and processor agree.
"""

import re

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
    InternVLProcessor,
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
    SmolVLMProcessor,
    SmolVLMVisionConfig,
)
from transformers.processing_utils import ProcessorMixin

from tiny_families.common import IMAGE_ONLY_LOADERS, train_tokenizer

# ---------------------------------------------------------------- chat templates (verbatim)

# google/gemma-3-4b-it's chat template (gemma-3-1b-it has the same), as quoted verbatim in
# public code that patches it into Gemma 3 tokenizers; transformers'
# tests/models/gemma3/test_processing_gemma3.py carries the same text minus the `is string`
# system branch. No system role: the system text opens the first user turn.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    '    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}\n'  # noqa: E501
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    '        {%- set role = "model" -%}\n'
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    '        {{ raise_exception("Invalid content type") }}\n'
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)

# google/gemma-2-2b-it; llama.cpp models/templates/google-gemma-2-2b-it.jinja. It RAISES on a
# system message ("System role not supported"): that is the real checkpoint's behaviour.
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
    "supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}"
    "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# OpenGVLab/InternVL3-*-hf: the template transformers' convert_internvl_weights_to_hf.py
# writes into the -hf checkpoints (no default system prompt).
INTERNVL_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}"
    "{% endif %}"
)

# HuggingFaceM4/Idefics3-8B-Llama3 (as quoted in transformers' modernvbert DEFAULT_CHAT_TEMPLATE
# and Idefics3 fine-tuning code).
IDEFICS3_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# HuggingFaceTB/SmolVLM-Instruct (transformers tests/models/smolvlm/test_processing_smolvlm.py).
SMOLVLM_TEMPLATE = IDEFICS3_TEMPLATE.replace("<|begin_of_text|>", "<|im_start|>", 1)

# meta-llama/Llama-3.1-8B-Instruct: copied from llama.cpp's
# models/templates/meta-llama-Llama-3.3-70B-Instruct.jinja (3.3 reuses 3.1's template; 3.1's
# own file was not in the searchable index). Dropped: the tool branches (custom_tools,
# builtin_tools, tools, tool_calls, ipython/tool messages); the rest is verbatim.
LLAMA31_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}

{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""  # noqa: E501

# Qwen/Qwen2.5-7B-Instruct (its chat_template.jinja as quoted in many repos). Dropped: the
# `tools` branch, assistant tool_calls and tool messages. Inserts Qwen's default system prompt.
QWEN25_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""  # noqa: E501

# Qwen/Qwen3-8B (same as Qwen3-0.6B): llama.cpp models/templates/Qwen-Qwen3-0.6B.jinja.
# Dropped: the `tools` system branch, assistant tool_calls and tool messages.
QWEN3_TEMPLATE = """{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""  # noqa: E501

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
    """A tiny decoder config: 4 query heads over 2 KV heads (GQA), vocab = the tokenizer's."""
    defaults = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.05,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return cls(**{**defaults, **kw})


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


class InternVLImageOnlyProcessor(InternVLProcessor):
    """InternVLProcessor without its video processor (which needs torchvision). Its __init__
    sets what InternVLProcessor.__init__ sets; __call__ (the placeholder expansion) is the
    real class's, untouched."""

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        image_seq_length: int = 256,
        chat_template=None,
        **kw,
    ):
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kw)
        self.video_processor = None
        self.image_seq_length = image_seq_length
        self.start_image_token = tokenizer.start_image_token
        self.end_image_token = tokenizer.end_image_token
        self.start_image_token_id = tokenizer.start_image_token_id
        self.end_image_token_id = tokenizer.end_image_token_id
        self.image_token = tokenizer.context_image_token
        self.video_token = tokenizer.video_token
        self.image_token_id = tokenizer.context_image_token_id
        self.multimodal_pattern = re.compile(
            f"(?P<image>{re.escape(self.image_token)})|(?P<video>{re.escape(self.video_token)})"
        )


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


def _idefics_parts(tok, layers: int, vision_cls, config_cls, image_processor_cls):
    """Idefics3 and SmolVLM share the layout: a 32 px tile / patch 4 = 8x8 patches, pixel-
    shuffled by scale_factor 2 to 16 <image> tokens per tile. Images are resized to a longest
    edge of 64 and split into 32 px tiles (up to 2x2) plus the global image."""
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
    return config, image_processor


def build_idefics3(seed: int):
    tok = train_tokenizer(
        [*LLAMA3_SPECIALS, *IDEFICS_SPECIALS, *ROW_COL],
        bos="<|begin_of_text|>",
        eos="<end_of_utterance>",
        pad="<|finetune_right_pad_id|>",
        chat_template=IDEFICS3_TEMPLATE,
    )
    config, image_processor = _idefics_parts(
        tok, 8, Idefics3VisionConfig, Idefics3Config, Idefics3ImageProcessorPil
    )
    torch.manual_seed(seed)
    model = _eval(Idefics3ForConditionalGeneration(config))
    processor = Idefics3Processor(
        image_processor, tok, image_seq_len=16, chat_template=IDEFICS3_TEMPLATE
    )
    return model, processor


class SmolVLMImageOnlyProcessor(SmolVLMProcessor):
    """SmolVLMProcessor without its video processor (which needs torchvision) and without the
    num2words check (only video prompts use it). Its __init__ sets what
    SmolVLMProcessor.__init__ sets; __call__ (the placeholder expansion) is the real class's."""

    def __init__(
        self, image_processor, tokenizer, image_seq_len: int = 169, chat_template=None, **kw
    ):
        self.fake_image_token = getattr(tokenizer, "fake_image_token", "<fake_token_around_image>")
        self.image_token = getattr(tokenizer, "image_token", "<image>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.end_of_utterance_token = getattr(
            tokenizer, "end_of_utterance_token", "<end_of_utterance>"
        )
        self.global_image_token = getattr(tokenizer, "global_image_token", "<global-img>")
        self.image_seq_len = image_seq_len
        self.video_token = getattr(tokenizer, "video_token", "<video>")
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kw)
        self.video_processor = None

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        # SmolVLMProcessor's override only adds the video processor's frame defaults (and a
        # video template); with no video the base rendering is what it would run.
        return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)


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
    config, image_processor = _idefics_parts(
        tok, 6, SmolVLMVisionConfig, SmolVLMConfig, SmolVLMImageProcessorPil
    )
    torch.manual_seed(seed)
    model = _eval(SmolVLMForConditionalGeneration(config))
    processor = SmolVLMImageOnlyProcessor(
        image_processor, tok, image_seq_len=16, chat_template=SMOLVLM_TEMPLATE
    )
    return model, processor


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
