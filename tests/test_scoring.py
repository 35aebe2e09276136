import pytest
import torch
from conftest import make_image

from sysattn_exp.intervention import Redistribution
from sysattn_exp.models import LoadedModel, build_prompt, use_sysattn
from sysattn_exp.scoring import score_batch

QUESTIONS = [
    "Is it red?",
    "Is there a blue square in the image? Please answer yes or no.",
    "Yes?",
    "Is the circle on the left green and large?",
    "Is it?",
]
COLOURS = ["red", "blue", "green", "yellow", "red"]


@pytest.fixture(scope="module")
def loaded(gqa_llava):
    model, processor = gqa_llava
    use_sysattn(model)
    return LoadedModel(model, processor, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize(
    "edit",
    [
        None,
        Redistribution("system", ("text",), frozenset({3, 4, 5})),
        Redistribution("image", ("system", "text"), frozenset({0, 1})),
    ],
)
def test_batched_equals_unbatched(loaded, edit):
    prompts = [build_prompt(q, "A chat.") for q in QUESTIONS]
    images = [make_image(c) for c in COLOURS]
    words = ([10, 11], [12])
    yes_b, no_b = score_batch(loaded, images, prompts, edit, *words)
    for i in range(len(prompts)):
        yes_1, no_1 = score_batch(loaded, images[i : i + 1], prompts[i : i + 1], edit, *words)
        assert torch.allclose(yes_b[i], yes_1[0], atol=1e-5, rtol=0)
        assert torch.allclose(no_b[i], no_1[0], atol=1e-5, rtol=0)


def test_yes_no_logits_are_logsumexp_of_last_position(loaded):
    """Against a plain SDPA forward of the full sequence, read at the last position."""
    model, processor = loaded.model, loaded.processor
    prompt = build_prompt("Is it red?", "A chat.")
    image = make_image("red")
    yes, no = score_batch(loaded, [image], [prompt], None, [10, 11], [12])
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    model.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1]
    finally:
        use_sysattn(model)
    assert yes.item() == pytest.approx(torch.logsumexp(logits[[10, 11]], 0).item(), abs=1e-5)
    assert no.item() == pytest.approx(logits[12].item(), abs=1e-5)


def test_only_the_language_model_is_rerouted(loaded):
    config = loaded.model.config
    assert config.text_config._attn_implementation == "sysattn"
    assert config.vision_config._attn_implementation == "sdpa"
    assert loaded.model.model.vision_tower.config._attn_implementation == "sdpa"
