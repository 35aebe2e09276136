"""Questions without an image (HallusionBench's visual_input 0): system is every position
before the question, text the rest. Every rule and path (fused, eager, prefix sharing, the
profile, PAI) agrees with the loop reference, and mixes with image questions."""

import pytest
import torch
from conftest import make_image
from reference import REFERENCE_NAME, reference_setup

from sysattn_exp.attention.modality import IMAGE, SYSTEM, TEXT
from sysattn_exp.attention.profile import AttentionProfile
from sysattn_exp.attention.rules import Pai, Redistribution, Scale
from sysattn_exp.benchmarks.base import Benchmark, Item
from sysattn_exp.evaluation.scoring import (
    encode_full_prompts,
    plan_batches,
    score_full_prompts,
    score_items,
)
from sysattn_exp.models.loading import LoadedModel, use_sysattn
from sysattn_exp.models.prompts import build_prompt

LAYERS = frozenset({2, 4, 5})
WORDS = ([10, 11], [12])
# (question, system prompt, image colour or None): two without an image, one with.
ROWS = [
    ("Is the sky green in this chart? Please answer yes or no.", "A chat.", None),
    ("Is 3 larger than 2?", "", None),
    ("Is it red?", "A chat between a user and an assistant.", "red"),
]


@pytest.fixture(scope="module")
def loaded(gqa_llava):
    model, processor = gqa_llava
    use_sysattn(model)
    return LoadedModel(model, processor, torch.device("cpu"), torch.float32)


def system_length(tokenizer, prompt: str) -> int:
    """Tokens of the prompt before its question ("USER: " included), counted without
    offsets. (This byte-level tokenizer makes the space after "USER:" a token of its own.)"""
    return len(tokenizer(prompt[: prompt.rindex("USER: ") + len("USER: ")]).input_ids)


@pytest.fixture(scope="module")
def mixed(loaded):
    """Whole prompts, left-padded, and the reference's question starts."""
    prompts = [build_prompt(q, s, with_image=c is not None) for q, s, c in ROWS]
    images = [None if c is None else make_image(c) for _, _, c in ROWS]
    inputs, key_modality = encode_full_prompts(loaded, images, prompts, [q for q, _, _ in ROWS])
    pads = (inputs["attention_mask"] == 0).sum(1).tolist()
    starts = [
        pad + system_length(loaded.processor.tokenizer, p)
        for pad, p in zip(pads, prompts, strict=True)
    ]
    return prompts, images, inputs, key_modality, starts


def test_modalities_of_a_prompt_without_image(mixed):
    _, _, inputs, key_modality, starts = mixed
    for row in (0, 1):
        real = key_modality[row][inputs["attention_mask"][row].bool()]
        n_system = starts[row] - int((inputs["attention_mask"][row] == 0).sum())
        assert real[:n_system].eq(SYSTEM).all() and real[n_system:].eq(TEXT).all()
        assert not real.eq(IMAGE).any()
    assert key_modality[2].eq(IMAGE).sum() == 9  # gqa_llava: 42 px images, 14 px patches


def logits_with(loaded, inputs, **extra):
    with torch.no_grad():
        return loaded.model(**inputs, **extra).logits  # inputs carry left-padded position ids


def reference(loaded, mixed, rule):
    _, _, inputs, _, starts = mixed
    model = loaded.model
    reference_setup(
        inputs["input_ids"], inputs["attention_mask"], model.config.image_token_id, rule, starts
    )
    model.set_attn_implementation({"text_config": REFERENCE_NAME, "vision_config": "sdpa"})
    try:
        return logits_with(loaded, inputs)
    finally:
        use_sysattn(model)


def rules():
    for source, recipients in [
        ("system", ("text",)),
        ("text", ("system",)),
        ("system", ("image", "text")),
        ("image", ("system",)),
    ]:
        yield (
            Redistribution(source, recipients, LAYERS),
            {"source": source, "recipients": set(recipients), "layers": LAYERS},
        )
    yield Scale("system", 0.5, LAYERS), {"modality": "system", "factor": 0.5, "layers": LAYERS}
    yield Pai(5.0, LAYERS), {"alpha": 5.0, "layers": LAYERS}
    yield None, None


@pytest.mark.parametrize("edit,rule", list(rules()))
def test_every_rule_matches_the_reference_without_image(loaded, mixed, edit, rule):
    _, _, inputs, key_modality, _ = mixed
    want = reference(loaded, mixed, rule)
    real = inputs["attention_mask"].bool()
    impls = ["fused"] if edit is None else ["fused", "eager"]
    for impl in impls:
        chosen = None if edit is None else type(edit)(**{**edit.__dict__, "impl": impl})
        got = logits_with(loaded, inputs, key_modality=key_modality, attention_edit=chosen)
        assert torch.allclose(got[real], want[real], atol=1e-5, rtol=0), impl


def mixed_benchmark() -> Benchmark:
    """Two image questions per colour and three questions without an image."""
    items = [
        Item(f"{c}-{q}", f"g{q}", c, question, q == 0)
        for c in ("red", "blue")
        for q, question in enumerate(["Is it red?", "Is there a blue square?"])
    ]
    items += [Item(f"none-{n}", f"t{n}", None, q, n == 1) for n, (q, _, _) in enumerate(ROWS)]
    return Benchmark("mixed", items, "{question}", make_image)


def prompts_of(bench: Benchmark, system: str) -> list[str]:
    return [build_prompt(i.question, system, i.image_id is not None) for i in bench.items]


def test_plan_puts_questions_without_image_last():
    assert plan_batches(["a", None, "b", None, "a"], 2) == [[0, 4], [2], [1, 3]]


EDITS = [
    None,
    Redistribution("system", ("text",), LAYERS),
    Redistribution("text", ("system", "image"), LAYERS, fraction=0.5, mode="uniform"),
    Redistribution("system", ("image",), LAYERS, "eager"),
    Scale("image", 2.0, LAYERS),
    Pai(5.0, LAYERS),
]


@pytest.mark.parametrize("edit", EDITS)
def test_shared_system_prefix_equals_whole_prompts(loaded, edit):
    """The questions without an image share their system prefix; scores equal whole-prompt
    scoring, and a mixed benchmark scores each kind in batches of its own."""
    bench = mixed_benchmark()
    prompts = prompts_of(bench, "A chat.")
    scores = score_items(loaded, bench, prompts, edit, WORDS, 3, 0, "test")
    images = [None if i.image_id is None else make_image(i.image_id) for i in bench.items]
    questions = [i.question for i in bench.items]
    yes, no, p_yes = score_full_prompts(loaded, images, prompts, edit, *WORDS, questions)
    assert torch.allclose(torch.tensor(scores.yes), yes, atol=1e-5, rtol=0)
    assert torch.allclose(torch.tensor(scores.no), no, atol=1e-5, rtol=0)
    assert torch.allclose(torch.tensor(scores.p_yes), p_yes, atol=1e-6, rtol=0)


def test_profile_of_questions_without_image(loaded):
    bench = mixed_benchmark()
    bench.items = bench.items[4:]
    prompts = prompts_of(bench, "A chat.")
    profile = AttentionProfile()
    score_items(loaded, bench, prompts, None, WORDS, 3, 0, "profile", profile=profile)
    table = profile.table()
    answer = table[table.queries == "answer"]
    assert (answer["image"] == 0).all() and (answer["n_queries"] == 3).all()
    assert torch.allclose(
        torch.tensor(answer[["system", "text"]].sum(axis=1).values),
        torch.ones(len(answer), dtype=torch.float64),
    )
