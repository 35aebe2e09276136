"""The tiny Gemma 3 / InternVL / Idefics3 / SmolVLM / text-only checkpoints of
tiny_families.others, used the way the product uses them: chat template, batched processor
call with left padding, forward pass, placeholder expansion, save and reload."""

import pytest
import torch
from PIL import Image
from tiny_families.common import load_test_processor, save_checkpoint
from tiny_families.others import BUILDERS
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

VLMS = ["gemma3", "internvl", "idefics3", "smolvlm"]
TEXT_ONLY = ["llama", "qwen2", "qwen3", "gemma3_text", "gemma2"]
DEPTH = dict(gemma3=6, internvl=4, idefics3=8, smolvlm=6, llama=4, qwen2=6, qwen3=8)
DEPTH.update(gemma3_text=8, gemma2=4)

SYSTEM_VLM = {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
USER_VLM = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is it red?"}]}
SYSTEM_TXT = {"role": "system", "content": "Be brief."}
USER_TXT = {"role": "user", "content": "Is it red?"}
# A small square image and a larger wide one (InternVL: 1 tile vs 2 tiles + thumbnail;
# Idefics3/SmolVLM upscale to a 64 px longest edge: 2x2 tiles vs 1x2 tiles, plus the global).
IMAGES = [Image.new("RGB", (28, 28), "red"), Image.new("RGB", (64, 32), "blue")]

LLAMA_HEAD = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
)
LLAMA_TAIL = (
    "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nIs it red?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
QWEN_TAIL = "<|im_start|>user\nIs it red?<|im_end|>\n<|im_start|>assistant\n"
GEMMA_TAIL = "Is it red?<end_of_turn>\n<start_of_turn>model\n"
IDEFICS_TAIL = "User:<image>Is it red?<end_of_utterance>\nAssistant:"
# (with the system message, without it) as the real templates render them.
RENDERED = {
    "gemma3": (
        "<bos><start_of_turn>user\nBe brief.\n\n<start_of_image>" + GEMMA_TAIL,
        "<bos><start_of_turn>user\n<start_of_image>" + GEMMA_TAIL,
    ),
    "internvl": (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        + QWEN_TAIL.replace("user\n", "user\n<IMG_CONTEXT>\n"),
        QWEN_TAIL.replace("user\n", "user\n<IMG_CONTEXT>\n"),
    ),
    "idefics3": (
        "<|begin_of_text|>System: Be brief.<end_of_utterance>\n" + IDEFICS_TAIL,
        "<|begin_of_text|>" + IDEFICS_TAIL,
    ),
    "smolvlm": (
        "<|im_start|>System: Be brief.<end_of_utterance>\n" + IDEFICS_TAIL,
        "<|im_start|>" + IDEFICS_TAIL,
    ),
    "llama": (LLAMA_HEAD + "Be brief." + LLAMA_TAIL, LLAMA_HEAD + LLAMA_TAIL),
    "qwen2": (
        "<|im_start|>system\nBe brief.<|im_end|>\n" + QWEN_TAIL,
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
        "assistant.<|im_end|>\n" + QWEN_TAIL,
    ),
    "qwen3": (
        "<|im_start|>system\nBe brief.<|im_end|>\n" + QWEN_TAIL + "<think>\n\n</think>\n\n",
        QWEN_TAIL + "<think>\n\n</think>\n\n",
    ),
    "gemma3_text": (
        "<bos><start_of_turn>user\nBe brief.\n\n" + GEMMA_TAIL,
        "<bos><start_of_turn>user\n" + GEMMA_TAIL,
    ),
    "gemma2": (None, "<bos><start_of_turn>user\n" + GEMMA_TAIL),  # no system role: raises
}


@pytest.fixture(scope="module")
def built():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = BUILDERS[name](0)
            processor = cache[name][1]
            getattr(processor, "tokenizer", processor).padding_side = "left"
        return cache[name]

    return get


def render(name, processor, with_system: bool):
    vlm = name in VLMS
    msgs = [SYSTEM_VLM if vlm else SYSTEM_TXT, USER_VLM if vlm else USER_TXT]
    kw = {"enable_thinking": False} if name == "qwen3" else {}
    return processor.apply_chat_template(
        msgs if with_system else msgs[1:], add_generation_prompt=True, tokenize=False, **kw
    )


def encode(name, processor, prompts, images=IMAGES):
    if name not in VLMS:
        return processor(prompts, padding=True, return_tensors="pt")
    # One image per prompt, nested: Gemma 3 and SmolVLM refuse a flat list (test below).
    nested = [[img] for img in images[: len(prompts)]]
    return processor(images=nested, text=prompts, padding=True, return_tensors="pt")


def expanded(name, processor, n_image: int) -> str:
    """The documented expansion of one image placeholder for IMAGES[n_image]."""
    if name == "gemma3":
        soft = "<image_soft_token>" * 9
        return f"\n\n<start_of_image>{soft}<end_of_image>\n\n"
    if name == "internvl":
        tiles = [1, 3][n_image]  # the wide image: 2 tiles + a thumbnail
        return "<img>" + "<IMG_CONTEXT>" * 16 * tiles + "</img>"
    rows, cols = [(2, 2), (1, 2)][n_image]
    tile = "<image>" * 16
    text = "\n".join(
        "".join(f"<fake_token_around_image><row_{r}_col_{c}>{tile}" for c in range(1, cols + 1))
        for r in range(1, rows + 1)
    )
    return text + f"\n\n<fake_token_around_image><global-img>{tile}<fake_token_around_image>"


@pytest.mark.parametrize("name", VLMS + TEXT_ONLY)
def test_tiny_config(name, built):
    model, _ = built(name)
    text = model.config.get_text_config()
    assert (text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (
        DEPTH[name],
        4,
        2,
    )
    assert not model.training and next(model.parameters()).dtype == torch.float32
    if name.startswith("gemma3"):  # sliding layers with a window that binds, scaled queries
        assert set(text.layer_types) == {"sliding_attention", "full_attention"}
        assert text.sliding_window == 8 and text.query_pre_attn_scalar != text.head_dim
    if name == "gemma2":
        assert text.attn_logit_softcapping == 50.0 and text.final_logit_softcapping == 30.0


@pytest.mark.parametrize("name", VLMS + TEXT_ONLY)
def test_chat_template_renders_the_real_text(name, built):
    _, processor = built(name)
    with_system, without = RENDERED[name]
    assert render(name, processor, False) == without
    if with_system is None:  # gemma-2-2b-it's template rejects a system message
        with pytest.raises(Exception, match="System role not supported"):
            render(name, processor, True)
    else:
        assert render(name, processor, True) == with_system


@pytest.mark.parametrize("name", VLMS + TEXT_ONLY)
def test_batch_forward_with_left_padding(name, built):
    model, processor = built(name)
    prompts = [render(name, processor, name != "gemma2"), render(name, processor, False)]
    if name == "gemma2":  # no system message: make the rows differ in length another way
        prompts[0] = prompts[1].replace("red?", "red or blue?")
    inputs = encode(name, processor, prompts)
    mask = inputs["attention_mask"]
    assert mask[:, -1].all() and not mask.all()  # left padded, one row shorter
    expected_keys = {
        "gemma3": {"pixel_values", "token_type_ids"},
        "internvl": {"pixel_values"},
        "idefics3": {"pixel_values", "pixel_attention_mask"},
        "smolvlm": {"pixel_values", "pixel_attention_mask"},
    }.get(name, set())
    assert expected_keys <= set(inputs)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", VLMS)
def test_image_placeholder_expansion(name, built):
    model, processor = built(name)
    tok = processor.tokenizer
    image_id = model.config.image_token_id
    prompt = render(name, processor, False)
    placeholder = {"gemma3": "<start_of_image>", "internvl": "<IMG_CONTEXT>"}.get(name, "<image>")
    for i, img in enumerate(IMAGES):
        ids = processor(images=[[img]], text=[prompt], return_tensors="pt")["input_ids"][0]
        want = tok(prompt.replace(placeholder, expanded(name, processor, i)))["input_ids"]
        assert ids.tolist() == want
    # The config's image token is where the features go; the processor names it too, except
    # Gemma 3, whose processor.image_token is the <start_of_image> placeholder.
    assert image_id == tok.convert_tokens_to_ids(
        "<image_soft_token>" if name == "gemma3" else placeholder
    )
    if name == "gemma3":
        assert processor.image_token == "<start_of_image>"
        inputs = encode(name, processor, [prompt])
        # token_type_ids mark the soft tokens: that is what makes them attend bidirectionally
        assert torch.equal(inputs["token_type_ids"] == 1, inputs["input_ids"] == image_id)
    else:
        assert (processor.image_token, processor.image_token_id) == (placeholder, image_id)


@pytest.mark.parametrize("name", VLMS)
def test_flat_image_list(name, built):
    """processor(images=[img1, img2], text=[p1, p2]): InternVL and Idefics3 split a flat list
    by the prompts' placeholders; Gemma 3 and SmolVLM want it nested per prompt."""
    _, processor = built(name)
    prompts = [render(name, processor, False)] * 2
    if name in ("gemma3", "smolvlm"):
        with pytest.raises(ValueError):
            processor(images=IMAGES, text=prompts, padding=True, return_tensors="pt")
    else:
        flat = processor(images=IMAGES, text=prompts, padding=True, return_tensors="pt")
        assert torch.equal(flat["input_ids"], encode(name, processor, prompts)["input_ids"])


@pytest.mark.parametrize("name", VLMS + TEXT_ONLY)
def test_save_and_reload(name, built, tmp_path):
    model, processor = built(name)
    save_checkpoint(model, processor, tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == model.config.model_type
    loaded = load_test_processor(tmp_path)
    assert type(loaded) is type(processor) or name in TEXT_ONLY
    getattr(loaded, "tokenizer", loaded).padding_side = "left"
    prompts = [render(name, loaded, False), render(name, processor, False)]
    assert prompts[0] == prompts[1]
    inputs, again = encode(name, processor, prompts), encode(name, loaded, prompts)
    assert set(inputs) == set(again) and all(torch.equal(inputs[k], again[k]) for k in inputs)
    auto = AutoModelForImageTextToText if name in VLMS else AutoModelForCausalLM
    reloaded = auto.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, reloaded(**inputs).logits, atol=1e-5)


@pytest.mark.parametrize("name", ["gemma3", "gemma3_text"])
def test_gemma3_sliding_window_binds_and_image_tokens_see_each_other(name):
    model, processor = BUILDERS[name](0)  # own copy: switched to eager to read the weights
    model.set_attn_implementation("eager")
    inputs = encode(name, processor, [render(name, processor, True)])
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    types = model.config.get_text_config().layer_types
    for kind, weights in zip(types, attentions, strict=True):
        beyond_window = weights[0, :, -1, :-8].sum()  # last token -> keys 8+ back
        assert (beyond_window == 0) == (kind == "sliding_attention")
        if name == "gemma3":
            image = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
            assert (weights[0, :, image[0], image[-1]] > 0).all()  # first soft token sees last
            assert (weights[0, :, image[0] - 1, image[0]] == 0).all()  # text stays causal
