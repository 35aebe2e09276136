"""The tiny LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL and Qwen2.5-VL checkpoints
(tests/tiny_families/llava_qwen.py) work the way the product uses them: the real chat
template, batched left-padded processing of images of different sizes, a forward pass,
the placeholder token, and a save/load round trip through the test boundary."""

import json
import pickle

import pytest
import torch
import transformers
from PIL import Image
from tiny_families import load_test_processor, save_checkpoint
from tiny_families.llava_qwen import BUILDERS
from transformers import AutoConfig, AutoModelForImageTextToText

SYSTEM = {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
USER = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is it red?"}]}

QWEN_TEXT = (
    "<|im_start|>system\nBe brief.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Is it red?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
# What each family's real template renders: with the system message, then without it.
# Qwen2-VL's template puts its default system prompt in when none is given.
RENDERED = {
    "llava_next": (
        "<<SYS>>\nBe brief.\n<</SYS>>\n\n[INST] <image>\nIs it red? [/INST]",
        "[INST] <image>\nIs it red? [/INST]",
    ),
    "llava_onevision": (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<image>\nIs it red?<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\n<image>\nIs it red?<|im_end|>\n<|im_start|>assistant\n",
    ),
    "qwen2_vl": (QWEN_TEXT, QWEN_TEXT.replace("Be brief.", "You are a helpful assistant.")),
}
RENDERED["qwen2_5_vl"] = RENDERED["qwen2_vl"]

# Placeholder tokens for a 28x28 and a 56x28 (width x height) image.
COUNTS = {
    "llava_next": (10, 14),
    "llava_onevision": (21, 30),
    "qwen2_vl": (4, 8),
    "qwen2_5_vl": (4, 8),
}
VISION_INPUTS = {
    "llava_next": {"pixel_values", "image_sizes"},
    "llava_onevision": {"pixel_values", "image_sizes", "batch_num_images"},
    "qwen2_vl": {"pixel_values", "image_grid_thw", "mm_token_type_ids"},
    "qwen2_5_vl": {"pixel_values", "image_grid_thw", "mm_token_type_ids"},
}
SPECIAL = {
    "llava_next": ["<s>", "</s>", "<unk>", "<image>", "<pad>"],
    "llava_onevision": ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<image>", "<video>"],
    "qwen2_vl": ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>"]
    + ["<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
}
SPECIAL["qwen2_5_vl"] = SPECIAL["qwen2_vl"]

IMAGES = [Image.new("RGB", (28, 28), "red"), Image.new("RGB", (56, 28), "blue")]


@pytest.fixture(scope="module", params=list(BUILDERS))
def family(request):
    """(name, model, processor, batch): each family built once, with the product's batch of
    two prompts (with and without a system message) and two images of different sizes."""
    model, processor = BUILDERS[request.param](0)
    processor.tokenizer.padding_side = "left"
    prompts = [
        processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        for msgs in ([SYSTEM, USER], [USER])
    ]
    batch = processor(images=IMAGES, text=prompts, padding=True, return_tensors="pt")
    return request.param, model, processor, batch


def test_chat_template_renders_the_real_template(family):
    name, _, processor, _ = family
    for messages, expected in zip(([SYSTEM, USER], [USER]), RENDERED[name], strict=True):
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert text == expected


def test_tokenizer_has_the_family_special_tokens_and_bos_behaviour(family):
    name, _, processor, _ = family
    tok = processor.tokenizer
    for token in SPECIAL[name]:
        assert tok.tokenize(token) == [token]
    ids = tok("Is it red?").input_ids
    if name == "llava_next":  # Mistral's tokenizer starts every encoding with <s>
        assert ids[0] == tok.bos_token_id == tok.convert_tokens_to_ids("<s>")
    else:  # Qwen2's adds nothing
        assert tok.bos_token is None
        assert ids == tok("Is it red?", add_special_tokens=False).input_ids


def test_model_is_a_tiny_float32_gqa_decoder(family):
    name, model, _, _ = family
    text = model.config.get_text_config()
    assert not model.training and model.dtype == torch.float32
    assert (text.num_attention_heads, text.num_key_value_heads) == (4, 2)
    assert text.num_hidden_layers in (4, 6, 8) and 32 <= text.hidden_size <= 64
    assert model.config.model_type == name


def test_same_seed_gives_the_same_weights(family):
    name, model, _, _ = family
    again, _ = BUILDERS[name](0)
    pairs = zip(model.state_dict().values(), again.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_batch_is_left_padded_and_runs_through_the_model(family):
    name, model, processor, batch = family
    assert set(batch) == {"input_ids", "attention_mask"} | VISION_INPUTS[name]
    mask = batch["attention_mask"]
    assert mask[:, -1].all() and not mask.all()  # left padding: ragged starts, common end
    short = int(mask.sum(1).argmin())
    assert batch["input_ids"][short, 0] == processor.tokenizer.pad_token_id
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()


def test_placeholder_token_names_the_model_image_token(family):
    _, model, processor, _ = family
    token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    assert token_id == processor.image_token_id == model.config.image_token_id
    if hasattr(model.config, "vision_start_token_id"):  # Qwen: the wrappers around the pads
        ids = processor.tokenizer.convert_tokens_to_ids
        assert model.config.vision_start_token_id == ids("<|vision_start|>")
        assert model.config.vision_end_token_id == ids("<|vision_end|>")


def test_processor_is_the_real_class_or_its_image_only_subclass(family):
    """The image-only stand-ins subclass the real processor, keep its name, have no video
    processor, and expand placeholders with the real class's own method."""
    _, _, processor, _ = family
    real = getattr(transformers, type(processor).__name__)
    assert isinstance(processor, real) and not hasattr(processor, "video_processor")
    assert type(processor).replace_image_token is real.replace_image_token
    assert type(pickle.loads(pickle.dumps(processor))) is type(processor)


def test_image_expansion_follows_the_family_rule(family):
    """Qwen: prod(image_grid_thw) / merge_size**2 pads per image; LLaVA-NeXT/OneVision: as
    many placeholders as the model's any-res packing gives features for that image size.
    Different aspect ratios give different counts."""
    name, model, processor, batch = family
    counts = (batch["input_ids"] == processor.image_token_id).sum(1).tolist()
    assert tuple(counts) == COUNTS[name] and counts[0] != counts[1]
    if "image_grid_thw" in batch:
        merge = processor.image_processor.merge_size
        assert counts == (batch["image_grid_thw"].prod(-1) // merge**2).tolist()
    else:
        with torch.no_grad():
            features = model.model.get_image_features(
                pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"]
            ).pooler_output
        assert counts == [len(f) for f in features]
    # one contiguous span per row, as the modality split needs
    for row in batch["input_ids"]:
        where = (row == processor.image_token_id).nonzero().flatten()
        assert (where.diff() == 1).all()


def test_save_and_reload_through_the_test_boundary(family, tmp_path_factory):
    name, model, processor, batch = family
    path = save_checkpoint(model, processor, tmp_path_factory.mktemp(name))
    loaded = load_test_processor(path)
    loaded.tokenizer.padding_side = "left"
    assert type(loaded) is type(processor)
    saved = json.loads((path / "processor_config.json").read_text())
    assert saved["processor_class"] == type(processor).__name__  # the real class's name
    prompts = [
        loaded.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        for msgs in ([SYSTEM, USER], [USER])
    ]
    assert prompts == list(RENDERED[name])
    again = loaded(images=IMAGES, text=prompts, padding=True, return_tensors="pt")
    assert set(again) == set(batch)
    assert all(torch.equal(again[key], batch[key]) for key in batch)
    assert AutoConfig.from_pretrained(path).model_type == name
    reloaded = AutoModelForImageTextToText.from_pretrained(path).eval()
    assert type(reloaded) is type(model)
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, model(**batch).logits, atol=1e-5)
