"""bfloat16 on CPU: the fused and eager implementations agree within bf16 rounding and
give the same yes/no answers, on a random LLaVA whose yes/no margins are O(1).

A random checkpoint answers the same on every item, or by margins too small to mean
anything, so the yes and no rows of lm_head are set here: +w/2 and -w/2 with w a random
direction orthogonal to the mean final hidden state (under the edit, in float32) and
scaled so that the margins yes_logit - no_logit = w . h have standard deviation 2 and
mean 0. Attention is then what separates the items' answers.

"Within bf16 rounding" is measured against the model's own rounding: the eager path in
bf16 is some distance from float32; the fused path in bf16 must be no further (up to a
factor 1.5, max and mean over items). The decisions must agree on >= 99% of items.
"""

import itertools

import pytest
import torch
from conftest import make_image

from sysattn_exp.attention.rules import Redistribution
from sysattn_exp.evaluation.scoring import encode_full_prompts, score_full_prompts
from sysattn_exp.models.loading import LoadedModel, first_token_ids, use_sysattn
from sysattn_exp.models.prompts import build_prompt
from sysattn_exp.models.tiny import build_tiny_llava, cast_parameters

LAYERS = 4
COLORS = ["red", "blue", "green", "yellow", "black", "purple", "orange", "gray"]
SHAPES = ["circle", "square", "triangle", "shape", "figure"]
SYSTEMS = ["", "A chat with an assistant."]
# 8 images x 4 asked colours x 5 shapes = 160 distinct items, one batch; every other one
# with a system prompt: mixed prompt lengths, so left padding and masked spans.
ITEMS = [
    (
        color,
        build_prompt(f"Is there a {asked} {shape}? Answer yes or no.", SYSTEMS[i % 2]),
    )
    for i, (color, asked, shape) in enumerate(itertools.product(COLORS, COLORS[:4], SHAPES))
]


def edit(impl: str) -> Redistribution:
    return Redistribution("system", ("image", "text"), frozenset(range(LAYERS)), impl)


@pytest.fixture(scope="module")
def margins():
    """yes - no margins per item: float32 eager, bf16 eager and fused; and the float32
    margins without the edit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors this small run faster on one thread
    try:
        yield compute_margins()
    finally:
        torch.set_num_threads(threads)


def compute_margins() -> dict:
    model, processor = build_tiny_llava(
        seed=3,
        num_layers=LAYERS,
        hidden_size=64,
        num_heads=4,
        num_kv_heads=2,
        image_size=28,
        init_std=0.05,
    )
    use_sysattn(model)
    processor.tokenizer.padding_side = "left"
    images = [make_image(color, (28, 28)) for color, _ in ITEMS]
    prompts = [prompt for _, prompt in ITEMS]
    yes = first_token_ids(processor.tokenizer, ["Yes", "yes"], "yes", prompts[0])
    no = first_token_ids(processor.tokenizer, ["No", "no"], "no", prompts[0])

    fp32 = LoadedModel(model, processor, torch.device("cpu"), torch.float32)
    set_yes_no_rows(model, fp32, images, prompts, yes, no)

    def score(loaded, rule):
        y, n, _ = score_full_prompts(loaded, images, prompts, rule, yes, no)
        return y - n

    result = {"fp32": score(fp32, edit("eager")), "fp32 unedited": score(fp32, None)}
    # As the runner loads bf16: parameters rounded, rotary frequencies kept in float32.
    model = cast_parameters(model, torch.bfloat16)
    bf16 = LoadedModel(model, processor, torch.device("cpu"), torch.bfloat16)
    result["bf16 eager"] = score(bf16, edit("eager"))
    result["bf16 fused"] = score(bf16, edit("fused"))
    return result


def set_yes_no_rows(model, loaded, images, prompts, yes, no) -> None:
    inputs, key_modality = encode_full_prompts(loaded, images, prompts)
    with torch.inference_mode():
        hidden = (
            model.model(
                **inputs,
                use_cache=False,
                key_modality=key_modality,
                attention_edit=edit("eager"),
            )
            .last_hidden_state[:, -1]
            .clone()
        )
    mean = hidden.mean(0)
    w = torch.linalg.svd(hidden - mean, full_matrices=False).Vh[0]  # where items differ most
    w = w - (w @ mean) / (mean @ mean) * mean
    w = w * 2 / (hidden @ w).std()
    with torch.no_grad():
        model.lm_head.weight[yes] = w / 2
        model.lm_head.weight[no] = -w / 2


def test_the_checkpoint_has_margins_worth_comparing(margins):
    m = margins["fp32"]
    assert len(m) == len(ITEMS) == 160
    assert 0.3 <= (m > 0).float().mean() <= 0.7, "both answers, in similar numbers"
    assert m.abs().median() >= 1.0
    assert (m.abs() < 0.1).float().mean() <= 0.05, "few items on a knife edge"
    effect = (m - margins["fp32 unedited"]).abs()
    assert effect.mean() >= 0.3, "the edit moves the margins: it is what is compared"


def test_fused_is_as_close_to_float32_as_eager_in_bfloat16(margins):
    exact = margins["fp32"]
    fused_error = (margins["bf16 fused"] - exact).abs()
    eager_error = (margins["bf16 eager"] - exact).abs()
    assert eager_error.max() > 0 and fused_error.max() > 0, "bf16 ran"
    assert fused_error.max() <= 1.5 * eager_error.max(), (fused_error.max(), eager_error.max())
    assert fused_error.mean() <= 1.5 * eager_error.mean(), (fused_error.mean(), eager_error.mean())


def test_fused_and_eager_give_the_same_answers_in_bfloat16(margins):
    same = (margins["bf16 fused"] > 0) == (margins["bf16 eager"] > 0)
    assert same.float().mean() >= 0.99, f"{int((~same).sum())} of {len(same)} differ"
