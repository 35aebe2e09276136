import itertools

import pytest
import torch
from conftest import make_image

from sysattn_exp.attention.rules import Pai, Redistribution, Scale
from sysattn_exp.benchmarks.base import Benchmark, Item
from sysattn_exp.evaluation.scoring import (
    BatchEncoder,
    plan_batches,
    score_batch,
    score_full_prompts,
    score_items,
)
from sysattn_exp.models.loading import LoadedModel, use_sysattn
from sysattn_exp.models.prompts import build_prompt

COLOURS = ["red", "blue", "green"]
QUESTIONS = [
    "Is it red?",
    "Is there a blue square in the image? Please answer yes or no.",
    "Yes?",
    "Is the circle on the left green and large, and is it next to a small yellow triangle?",
]
WORDS = ([10, 11], [12])
EDITS = [
    None,
    Redistribution("system", ("text",), frozenset({3, 4, 5})),
    Redistribution("system", ("image", "text"), frozenset(range(6))),
    Redistribution("image", ("system",), frozenset({0, 1}), "eager"),
    Redistribution("text", ("image",), frozenset({2, 5})),
    Redistribution("system", ("text",), frozenset({3, 4, 5}), fraction=0.5, mode="uniform"),
    Scale("image", 2.0, frozenset({4, 5})),
    Pai(0.5, frozenset(range(6))),
    Pai(0.5, frozenset(range(6)), "eager"),
]


@pytest.fixture(scope="module")
def loaded(gqa_llava):
    model, processor = gqa_llava
    use_sysattn(model)
    return LoadedModel(model, processor, torch.device("cpu"), torch.float32)


def four_questions_per_image() -> Benchmark:
    items = [
        Item(f"{c}-{q}", f"g{q}", c, QUESTIONS[q], q % 2 == 0)
        for c, q in itertools.product(COLOURS, range(len(QUESTIONS)))
    ]
    return Benchmark("test", items, "{question}", make_image)


def test_plan_keeps_images_together():
    image_ids = ["a", "a", "b", "c", "c", "c", "a", "d"]
    assert plan_batches(image_ids, 4) == [[0, 1, 6, 2], [3, 4, 5, 7]]
    assert plan_batches(image_ids, 2) == [[0, 1], [6, 2], [3, 4], [5, 7]]
    assert sorted(sum(plan_batches(image_ids, 3), [])) == list(range(8))


def test_encoder_tokenizes_as_the_processor(loaded):
    bench = four_questions_per_image()
    prompts = [build_prompt(i.question, "A chat.") for i in bench.items]
    batch = BatchEncoder(bench, prompts, [list(range(len(prompts)))], loaded)[0]
    pixel_values = batch.vision["pixel_values"]
    assert batch.prefix_ids.shape[0] == pixel_values.shape[0] == len(COLOURS)
    for row, j in enumerate(batch.items):
        item = bench.items[j]
        want = loaded.processor(
            images=[make_image(item.image_id)], text=[prompts[j]], return_tensors="pt"
        )
        question = batch.question_ids[row][batch.question_mask[row].bool()]
        got = torch.cat([batch.prefix_ids[batch.image_row[row]], question])
        assert got.tolist() == want["input_ids"][0].tolist()
        assert torch.equal(pixel_values[batch.image_row[row]], want["pixel_values"][0])


@pytest.mark.parametrize("edit", EDITS)
def test_shared_prefix_equals_full_prompts(loaded, edit):
    """Four questions of different lengths per image, three images in one batch."""
    bench = four_questions_per_image()
    prompts = [
        build_prompt(i.question, "A chat between a user and an assistant.") for i in bench.items
    ]
    batch = BatchEncoder(bench, prompts, [list(range(len(prompts)))], loaded)[0]
    yes, no, _ = score_batch(loaded, batch, edit, *WORDS)
    images = [make_image(bench.items[j].image_id) for j in batch.items]
    yes_full, no_full, _ = score_full_prompts(
        loaded, images, [prompts[j] for j in batch.items], edit, *WORDS
    )
    assert torch.allclose(yes, yes_full, atol=1e-5, rtol=0)
    assert torch.allclose(no, no_full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("edit", EDITS[:2])
def test_batched_equals_unbatched(loaded, edit):
    bench = four_questions_per_image()
    prompts = [build_prompt(i.question, "A chat.") for i in bench.items]
    batched = score_items(loaded, bench, prompts, edit, WORDS, 5, 0, "test")
    single = score_items(loaded, bench, prompts, edit, WORDS, 1, 0, "test")
    assert batched.seconds > 0 and batched.computed == single.computed == len(prompts)
    assert torch.allclose(torch.tensor(batched.yes), torch.tensor(single.yes), atol=1e-5, rtol=0)
    assert torch.allclose(torch.tensor(batched.no), torch.tensor(single.no), atol=1e-5, rtol=0)
    assert torch.allclose(torch.tensor(batched.p_yes), torch.tensor(single.p_yes), atol=1e-6)


def test_worker_processes_give_the_same_scores(loaded):
    bench = four_questions_per_image()
    prompts = [build_prompt(i.question, "A chat.") for i in bench.items]
    in_process = score_items(loaded, bench, prompts, EDITS[1], WORDS, 4, 0, "test")
    workers = score_items(loaded, bench, prompts, EDITS[1], WORDS, 4, 2, "test")
    assert (in_process.yes, in_process.no, in_process.p_yes) == (
        workers.yes,
        workers.no,
        workers.p_yes,
    )


def test_yes_no_logits_are_logsumexp_of_last_position(loaded):
    """Against a plain SDPA forward of the full sequence, read at the last position."""
    model, processor = loaded.model, loaded.processor
    prompt = build_prompt("Is it red?", "A chat.")
    image = make_image("red")
    yes, no, p_yes = score_full_prompts(loaded, [image], [prompt], None, [10, 11], [12])
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    model.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1]
    finally:
        use_sysattn(model)
    assert yes.item() == pytest.approx(torch.logsumexp(logits[[10, 11]], 0).item(), abs=1e-5)
    assert no.item() == pytest.approx(logits[12].item(), abs=1e-5)
    want_p_yes = torch.softmax(logits.double(), 0)[[10, 11]].sum().item()
    assert p_yes.item() == pytest.approx(want_p_yes, abs=1e-6)


def test_only_the_language_model_is_rerouted(loaded):
    config = loaded.model.config
    assert config.text_config._attn_implementation == "sysattn"
    assert config.vision_config._attn_implementation == "sdpa"
    assert loaded.model.model.vision_tower.config._attn_implementation == "sdpa"


def test_pai_guidance_against_the_image_free_prompt(loaded):
    """PAI with cfg_gamma: gamma (log p_img - log p_noimg) + log p_noimg, tokens less than a
    tenth as likely as the best conditional one dropped; computed here from plain forwards."""
    from sysattn_exp.attention.modality import modality_ids
    from sysattn_exp.evaluation.scoring import left_padded_position_ids

    bench = four_questions_per_image()
    prompts = [build_prompt(i.question, "A chat.") for i in bench.items]
    layers = frozenset(range(1, 6))
    plain_prompts = [build_prompt(i.question, "A chat.", with_image=False) for i in bench.items]
    batch = BatchEncoder(bench, prompts, [list(range(len(prompts)))], loaded, plain_prompts)[0]
    model, processor = loaded.model, loaded.processor
    ordered = [prompts[j] for j in batch.items]
    inputs = processor(
        images=[make_image(bench.items[j].image_id) for j in batch.items],
        text=ordered,
        padding=True,
        return_tensors="pt",
    )
    mask = inputs["attention_mask"]
    with torch.no_grad():
        cond = (
            model(
                **inputs,
                position_ids=left_padded_position_ids(mask),
                attention_edit=Pai(20.0, layers, "eager"),
                key_modality=modality_ids(
                    inputs["input_ids"],
                    mask,
                    model.config.image_token_id,
                ),
            )
            .logits[:, -1]
            .log_softmax(-1)
        )
        plain = processor.tokenizer(
            [p.replace("<image>\n", "") for p in ordered], padding=True, return_tensors="pt"
        )
        uncond = model(
            **plain, position_ids=left_padded_position_ids(plain["attention_mask"])
        ).logits[:, -1]
        uncond = uncond.log_softmax(-1)
    top = cond.mean(0).topk(3).indices.tolist()
    words = (top[:2], top[2:])
    gamma = 1.1
    expected = gamma * (cond - uncond) + uncond
    expected[cond < cond.max(-1, keepdim=True).values + torch.log(torch.tensor(0.1))] = float(
        "-inf"
    )
    yes, no, _ = score_batch(loaded, batch, Pai(20.0, layers, cfg_gamma=gamma), *words)
    for got, ids in ((yes, words[0]), (no, words[1])):
        want = expected[:, ids].logsumexp(-1)
        assert torch.equal(torch.isfinite(got), torch.isfinite(want))
        assert torch.isfinite(want).any()
        finite = torch.isfinite(want)
        assert torch.allclose(got[finite], want[finite], atol=1e-4)
