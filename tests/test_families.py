"""Every model family, on a tiny random checkpoint of it (tests/tiny_families): prompts from
its chat template, the modality split, every rule on the fused and eager paths against the
loop reference, the baseline against the model's own forward, and prefix-shared scoring
against whole prompts. Each family brings its own attention quirks: sliding windows and
bidirectional image blocks (Gemma 3), soft-capped logits (Gemma 2), multimodal RoPE
(Qwen2-VL), any-res image token counts (LLaVA-NeXT), tiles with markers (Idefics3)."""

import pytest
import torch
from conftest import make_image
from paths import IMPL_PATHS
from reference import REFERENCE_NAME, STATE, reference_setup
from tiny_families import BUILDERS

from sysattn_exp.attention.fused import forced_path
from sysattn_exp.attention.modality import IMAGE, SYSTEM, TEXT
from sysattn_exp.attention.profile import AttentionProfile
from sysattn_exp.attention.rules import Pai, Redistribution, Scale
from sysattn_exp.benchmarks.base import Benchmark, Item
from sysattn_exp.evaluation.lens import LogitLens
from sysattn_exp.evaluation.scoring import (
    BatchEncoder,
    encode_full_prompts,
    plan_batches,
    score_full_prompts,
    score_items,
)
from sysattn_exp.experiment.job_yes_no import ablated_format
from sysattn_exp.models.loading import LoadedModel, tokenizer_of, use_sysattn
from sysattn_exp.models.prompts import PromptFormat, text_kwargs

FAMILIES = sorted(BUILDERS)
QUESTIONS = ["Is there a red circle in the image?", "Is it blue?"]
SYSTEMS = [None, "Answer briefly and exactly."]
# Two sizes and aspect ratios: any-res and dynamic-resolution families give them different
# numbers of image tokens, so the batch is padded differently per row.
IMAGES = [("red", (40, 40)), ("blue", (64, 30))]
MODALITY_NAMES = ["system", "image", "text"]


def is_vlm(loaded) -> bool:
    return loaded.image_token_id is not None


def fmt(loaded, system) -> PromptFormat:
    return PromptFormat(loaded.processor, system, vicuna=loaded.model.config.model_type == "llava")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    """(loaded model, whole-prompt batch) of one family."""
    model, processor = BUILDERS[request.param](3)
    use_sysattn(model)
    tokenizer_of(processor).padding_side = "left"
    loaded = LoadedModel(model.eval(), processor, torch.device("cpu"), torch.float32)
    vlm = is_vlm(loaded)
    prompts = [fmt(loaded, s).render(q, vlm) for s, q in zip(SYSTEMS, QUESTIONS, strict=True)]
    images = [make_image(c, size) if vlm else None for c, size in IMAGES]
    inputs, key_modality = encode_full_prompts(loaded, images, prompts, QUESTIONS)
    return loaded, prompts, inputs, key_modality


def question_starts(loaded, prompts, inputs) -> list[int] | None:
    """For prompts without an image: where each question starts, counted independently of
    sysattn_exp (tokens of the text before it, plus the row's left padding)."""
    if is_vlm(loaded):
        return None
    tokenizer = loaded.tokenizer
    pads = (inputs["attention_mask"] == 0).sum(1).tolist()
    return [
        pad + len(tokenizer(p[: p.rindex(q)], **text_kwargs(tokenizer, p)).input_ids)
        for pad, p, q in zip(pads, prompts, QUESTIONS, strict=True)
    ]


def with_attention(model, name):
    """Switch the language model's attention implementation, leaving the vision tower's."""
    if "text_config" in (getattr(model.config, "sub_configs", None) or {}):
        model.set_attn_implementation({"text_config": name})
    else:
        model.set_attn_implementation(name)


def logits(loaded, inputs, **extra) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(**inputs, **extra).logits


def reference_logits(loaded, prompts, inputs, rule):
    reference_setup(
        inputs["input_ids"],
        inputs["attention_mask"],
        loaded.image_token_id,
        rule,
        question_starts(loaded, prompts, inputs),
        bidirectional_image=loaded.model.config.model_type == "gemma3",
    )
    with_attention(loaded.model, REFERENCE_NAME)
    try:
        return logits(loaded, inputs)
    finally:
        use_sysattn(loaded.model)


def late_layers(loaded) -> frozenset:
    depth = loaded.num_layers
    return frozenset(range(depth // 2, depth))


def rules(layers) -> dict:
    """Every redistribution, a dose, uniform, scale and PAI: name -> (edit kwargs, rule)."""
    out = {}
    for source in MODALITY_NAMES:
        others = [m for m in MODALITY_NAMES if m != source]
        for recipients in [(others[0],), (others[1],), tuple(others)]:
            edit = {"kind": "redistribute", "source": source, "recipients": recipients}
            rule = {"source": source, "recipients": set(recipients), "layers": layers}
            out[f"{source}->{'+'.join(recipients)}"] = (edit, rule)
    dose = {"kind": "redistribute", "source": "system", "recipients": ("image",)}
    out["dose"] = (dose | {"fraction": 0.4}, out["system->image"][1] | {"fraction": 0.4})
    uniform = {"kind": "redistribute", "source": "system", "recipients": ("text",)}
    out["uniform"] = (uniform | {"mode": "uniform"}, out["system->text"][1] | {"mode": "uniform"})
    out["scale"] = (
        {"kind": "scale", "modality": "image", "factor": 2.0},
        {"modality": "image", "factor": 2.0, "layers": layers},
    )
    out["pai"] = ({"kind": "pai", "alpha": 0.5}, {"alpha": 0.5, "layers": layers})
    return out


RULE_NAMES = list(rules(frozenset()))
# Every family runs the rules that take each modality as the source, with one and with two
# recipients, and the dose, uniform, scale and PAI variants; the other single-recipient
# redistributions rotate over the families, so that each runs on several (and all of them
# run on LLaVA-1.5 in test_intervention_exact).
CORE_RULES = [
    "system->text",
    "system->image+text",
    "image->text",
    "image->system+text",
    "text->system+image",
    "dose",
    "uniform",
    "scale",
    "pai",
]
ROTATING_RULES = [name for name in RULE_NAMES if name not in CORE_RULES]
FAMILY_RULES = [
    (family, rule)
    for index, family in enumerate(FAMILIES)
    for rule in CORE_RULES + [ROTATING_RULES[index % len(ROTATING_RULES)]]
]


def build(kwargs: dict, layers, impl: str):
    kwargs = dict(kwargs)
    kind = kwargs.pop("kind")
    heads = kwargs.pop("heads", None)
    if kind == "scale":
        return Scale(kwargs["modality"], kwargs["factor"], layers, impl, heads=heads)
    if kind == "pai":
        return Pai(kwargs["alpha"], layers, impl, heads=heads)
    kwargs["heads"] = heads
    source, recipients = kwargs.pop("source"), kwargs.pop("recipients")
    return Redistribution(source, recipients, layers, impl, **kwargs)


def test_modality_split_follows_the_rule(family):
    """system before the first image placeholder, image up to the last, text after; without
    an image, system ends where the question starts."""
    loaded, prompts, inputs, key_modality = family
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    starts = question_starts(loaded, prompts, inputs)
    for row in range(len(prompts)):
        real = mask[row].bool()
        got = key_modality[row][real].tolist()
        if starts is None:
            placeholder = (ids[row][real] == loaded.image_token_id).nonzero()[:, 0].tolist()
            first, last = placeholder[0], placeholder[-1]
        else:
            first = last = starts[row] - int((~real).sum())
            last -= 1
        n = len(got)
        assert got == [SYSTEM] * first + [IMAGE] * (last + 1 - first) + [TEXT] * (n - last - 1)
        assert n - last - 1 >= 2, "the question and the generation prompt are text"


def test_baseline_equals_the_models_own_forward(family):
    loaded, _, inputs, key_modality = family
    real = inputs["attention_mask"].bool()
    got = logits(loaded, inputs, key_modality=key_modality, attention_edit=None)
    with_attention(loaded.model, "eager")
    try:
        want = logits(loaded, inputs)
    finally:
        use_sysattn(loaded.model)
    assert torch.allclose(got[real], want[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family,rule_name", FAMILY_RULES, indirect=["family"])
def test_rule_matches_reference(family, rule_name):
    loaded, prompts, inputs, key_modality = family
    real = inputs["attention_mask"].bool()
    layers = late_layers(loaded)
    edit_kwargs, rule = rules(layers)[rule_name]
    want = reference_logits(loaded, prompts, inputs, rule)
    for impl, path in IMPL_PATHS:  # each implementation, the fused one on each path
        edit = build(edit_kwargs, layers, impl)
        with forced_path(path):
            got = logits(loaded, inputs, key_modality=key_modality, attention_edit=edit)
        error = (got[real] - want[real]).abs().max()
        assert error <= 1e-5, f"{impl} {path}: {error}"
    if rule_name == "system->text" or (is_vlm(loaded) and rule_name in ("image->text", "pai")):
        baseline = logits(loaded, inputs, key_modality=key_modality, attention_edit=None)
        assert (baseline[real] - got[real]).abs().max() > 1e-4, "the rule changed nothing"


def test_profile_matches_reference(family):
    """The fused path's recorded shares of the answer position equal the reference's, per
    layer and per head, with the first position's (BOS) share."""
    loaded, prompts, inputs, key_modality = family
    layers = late_layers(loaded)
    profile = AttentionProfile()
    edit = Redistribution("system", ("text",), layers)
    logits(
        loaded, inputs, key_modality=key_modality, attention_edit=edit, attention_profile=profile
    )
    table = profile.table()
    STATE["shares"] = {}
    try:
        rule = {"source": "system", "recipients": {"text"}, "layers": layers}
        reference_logits(loaded, prompts, inputs, rule)
        shares = STATE["shares"]
    finally:
        STATE.pop("shares", None)
    answer = table[table["queries"] == "answer"].set_index("layer")
    assert sorted(answer.index) == sorted(shares) == list(range(loaded.num_layers))
    for layer, rows in shares.items():
        for name in MODALITY_NAMES:
            want = sum(row[name] for row in rows) / len(rows)
            assert answer.loc[layer, name] == pytest.approx(want, abs=1e-5)
    # Per query head, and on the first position alone (0 where a sliding window hides it).
    heads = profile.head_table()
    heads = heads[heads["queries"] == "answer"].set_index(["layer", "head"])
    for layer, rows in shares.items():
        for head in {row["head"] for row in rows}:
            of_head = [row for row in rows if row["head"] == head]
            for name in [*MODALITY_NAMES, "bos"]:
                want = sum(row[name] for row in of_head) / len(of_head)
                assert heads.loc[(layer, head), name] == pytest.approx(want, abs=1e-5)


def test_profile_with_prefix_sharing_equals_whole_prompts(family):
    """Scoring's prefix and question passes record the per-head shares, BOS's included, of
    the whole-prompt pass (its answer rows checked against the reference above), also where
    a sliding window has cut the first position out of the question pass's cache (Gemma 2
    and 3: there the cache's first key is not BOS)."""
    loaded, prompts, inputs, key_modality = family
    whole = AttentionProfile()
    logits(loaded, inputs, key_modality=key_modality, attention_profile=whole)
    vlm, sizes = is_vlm(loaded), dict(IMAGES)
    items = [
        Item(f"{c}{j}", c, c if vlm else None, question, True)
        for j, ((c, _), question) in enumerate(zip(IMAGES, QUESTIONS, strict=True))
    ]
    bench = Benchmark("fam", items, "{question}", lambda c: make_image(c, sizes[c]))
    shared = AttentionProfile()
    score_items(loaded, bench, prompts, None, ([5, 6], [7]), 4, 0, "test", profile=shared)
    # The answer rows, and every text row (the first question rows see the cut cache).
    want, got = (p.head_table().set_index(["layer", "queries", "head"]) for p in (whole, shared))
    assert list(got.index) == list(want.index)
    assert (got["n_queries"] == want["n_queries"]).all()
    assert (got.xs("answer", level="queries")["n_queries"] == 2).all()
    shares = [*MODALITY_NAMES, "bos"]
    assert (got[shares] - want[shares]).abs().to_numpy().max() <= 1e-5


def benchmark_of(loaded) -> Benchmark:
    """Two questions about each of two images of different sizes (none for a text model),
    and for a VLM two more without an image (as HallusionBench has)."""
    vlm = is_vlm(loaded)
    items = [
        Item(f"{c}{q}", c, c if vlm else None, question, True)
        for c, _ in IMAGES
        for q, question in enumerate(QUESTIONS)
    ]
    if vlm:
        items += [Item(f"none{q}", "none", None, text, False) for q, text in enumerate(QUESTIONS)]
    sizes = dict(IMAGES)
    return Benchmark("fam", items, "{question}", lambda c: make_image(c, sizes[c]))


def test_prefix_sharing_equals_whole_prompts(family):
    """Prefix-shared, batched scoring gives the scores of whole prompts scored one at a
    time, for the baseline and rules. Each image is asked with two system prompts, so one
    batch holds prefixes of different lengths (and any-res images differ too)."""
    loaded, *_ = family
    bench = benchmark_of(loaded)
    prompts = [
        fmt(loaded, SYSTEMS[j % 2]).render(item.question, item.image_id is not None)
        for j, item in enumerate(bench.items)
    ]
    layers = late_layers(loaded)
    words = ([5, 6], [7])
    for edit in (None, Redistribution("system", ("text",), layers), Pai(0.5, layers)):
        shared = score_items(loaded, bench, prompts, edit, words, 4, 0, "test")
        for j, item in enumerate(bench.items):
            image = bench.load_image(item.image_id) if item.image_id else None
            yes, no, _ = score_full_prompts(
                loaded, [image], [prompts[j]], edit, *words, [item.question]
            )
            assert shared.yes[j] == pytest.approx(yes.item(), abs=1e-5)
            assert shared.no[j] == pytest.approx(no.item(), abs=1e-5)


@pytest.fixture(scope="module")
def tokenizers():
    return {name: BUILDERS[name](0)[1] for name in ("qwen2", "gemma2", "llama")}


def test_system_prompt_null_empty_and_text(tokenizers):
    """null: the template's default (Qwen2.5 inserts its own); "": none (for Qwen an empty
    system turn, the shortest it renders); text: that system message."""
    qwen = tokenizers["qwen2"]
    default = PromptFormat(qwen, None).render("Is it red?", False)
    assert "You are Qwen" in default
    empty = PromptFormat(qwen, "").render("Is it red?", False)
    assert "You are Qwen" not in empty and empty.startswith("<|im_start|>system\n<|im_end|>")
    assert "Be brief." in PromptFormat(qwen, "Be brief.").render("Is it red?", False)
    llama = tokenizers["llama"]
    assert PromptFormat(llama, "").render("Q?", False) == PromptFormat(llama, None).render(
        "Q?", False
    )


def test_system_prompt_without_a_system_role(tokenizers):
    """Gemma 2's template refuses a system message: the system prompt opens the user turn
    (as Gemma 3's template does), and "" is simply none."""
    gemma = tokenizers["gemma2"]
    with_system = PromptFormat(gemma, "Be brief.").render("Is it red?", False)
    assert "<start_of_turn>user\nBe brief.\n\nIs it red?<end_of_turn>" in with_system
    assert PromptFormat(gemma, "").render("Q?", False) == PromptFormat(gemma, None).render(
        "Q?", False
    )


# Head-selective rules (intervention.heads) rotate over the families: each edits two heads
# of every late layer but the last (which stays plain though selected).
HEAD_RULES = ["system->image+text", "dose", "uniform", "scale", "pai", "image->text"]


@pytest.mark.parametrize(
    "family,rule_name",
    [(f, HEAD_RULES[i % len(HEAD_RULES)]) for i, f in enumerate(FAMILIES)],
    indirect=["family"],
)
def test_rule_on_chosen_heads_matches_reference(family, rule_name):
    loaded, prompts, inputs, key_modality = family
    real = inputs["attention_mask"].bool()
    layers = late_layers(loaded)
    n_heads = loaded.text_config.num_attention_heads
    heads = tuple((layer, (layer + k) % n_heads) for layer in sorted(layers)[:-1] for k in (0, 3))
    edit_kwargs, rule = rules(layers)[rule_name]
    want = reference_logits(loaded, prompts, inputs, rule | {"heads": set(heads)})
    for impl, path in IMPL_PATHS:  # each implementation, the fused one on each path
        edit = build(edit_kwargs | {"heads": heads}, layers, impl)
        with forced_path(path):
            got = logits(loaded, inputs, key_modality=key_modality, attention_edit=edit)
        error = (got[real] - want[real]).abs().max()
        assert error <= 1e-5, f"{impl} {path}: {error}"


def test_logit_lens_reads_every_layer(family):
    """The logit lens (evaluation/lens.py) on prefix-shared batches: at the last layer it is
    the model's own score; at every earlier layer, the reading of that layer's output among
    the model's own output_hidden_states (whole prompts, one at a time), through the final
    norm and head in float32 (Gemma 2's soft-capping, Gemma's scaled embeddings included)."""
    loaded, *_ = family
    bench = benchmark_of(loaded)
    prompts = [
        fmt(loaded, SYSTEMS[j % 2]).render(item.question, item.image_id is not None)
        for j, item in enumerate(bench.items)
    ]
    words = ([5, 6], [7])
    lens = LogitLens(loaded)
    scores = score_items(loaded, bench, prompts, None, words, 4, 0, "test", lens=lens)
    table = lens.table().set_index(["item", "layer"])
    depth = loaded.num_layers
    assert len(table) == len(bench.items) * depth
    norm, head = loaded.model.get_decoder().norm, loaded.model.get_output_embeddings()
    cap = getattr(loaded.text_config, "final_logit_softcapping", None)
    for j, item in enumerate(bench.items):
        last = table.loc[(j, depth - 1)]
        assert last["log_odds"] == pytest.approx(scores.yes[j] - scores.no[j], abs=1e-6)
        assert last["p_yes"] == pytest.approx(scores.p_yes[j], abs=1e-7)
        image = bench.load_image(item.image_id) if item.image_id else None
        inputs, key_modality = encode_full_prompts(loaded, [image], [prompts[j]], [item.question])
        with torch.no_grad():
            states = loaded.model(
                **inputs, key_modality=key_modality, output_hidden_states=True
            ).hidden_states
        assert len(states) == depth + 1  # the embeddings, then each layer's output
        for layer in range(depth - 1):
            logits = head(norm(states[layer + 1][0, -1].float()))
            logits = torch.tanh(logits / cap) * cap if cap else logits
            yes, no = logits[words[0]].logsumexp(0), logits[words[1]].logsumexp(0)
            p_yes = logits.softmax(-1)[words[0]].sum()
            reading = table.loc[(j, layer)]
            assert reading["log_odds"] == pytest.approx((yes - no).item(), abs=1e-4), layer
            assert reading["p_yes"] == pytest.approx(p_yes.item(), abs=1e-5), layer


def own_forward_of_shortened_prompt(loaded, image, prompt: str, question: str, ablation: str):
    """The answer position's logits of the model's own forward (eager attention, its own
    positions) over the prompt's tokens with the ablation's leading span cut off, the cut
    found here without sysattn_exp: BOS as the tokenizer's bos_token_id, the first image
    token, or the question's first token (the tokens of the text before it)."""
    tokenizer = loaded.tokenizer
    kwargs = text_kwargs(tokenizer, prompt)
    if image is not None:
        inputs = loaded.processor(images=[[image]], text=[prompt], return_tensors="pt", **kwargs)
    else:
        inputs = tokenizer([prompt], return_tensors="pt", **kwargs)
    ids = inputs["input_ids"][0].tolist()
    cut = 0
    if ablation == "no-bos" and ids[0] == tokenizer.bos_token_id:
        cut = 1
    elif ablation == "no-system" and image is not None:
        cut = ids.index(loaded.image_token_id)
    elif ablation == "no-system":
        cut = len(tokenizer(prompt[: prompt.rindex(question)], **kwargs).input_ids)
    inputs = dict(inputs)
    for key in ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids"):
        if key in inputs:
            inputs[key] = inputs[key][:, cut:]
    with_attention(loaded.model, "eager")
    try:
        return logits(loaded, inputs)[0, -1], cut
    finally:
        use_sysattn(loaded.model)


@pytest.mark.parametrize("ablation", ["no-system-prompt", "no-bos", "no-system"])
def test_ablation_scores_equal_the_models_own_forward_of_the_shortened_prompt(family, ablation):
    """Prefix-shared, batched scoring under prompt.ablation gives the logits of the model's
    own forward of the shortened prompt (not a mask over the original one), for items with
    and without an image, two system prompts per image (no-system-prompt: the prompt as
    model.system_prompt="" renders it); under no-system the rule system->text finds no
    system token and changes nothing."""
    loaded, *_ = family
    bench = benchmark_of(loaded)
    has_image = [item.image_id is not None for item in bench.items]
    asked = [
        ablated_format(fmt(loaded, SYSTEMS[j % 2]), ablation).render(item.question, has_image[j])
        for j, item in enumerate(bench.items)
    ]
    if ablation == "no-system-prompt":  # the text is the ablation; nothing else removed
        items = zip(bench.items, has_image, strict=True)
        unprompted = [fmt(loaded, "").render(i.question, w) for i, w in items]
        assert asked == unprompted
    token_ablation = "none" if ablation == "no-system-prompt" else ablation
    words = ([5, 6], [7])
    got = score_items(loaded, bench, asked, None, words, 4, 0, "t", ablation=token_ablation)
    for j, item in enumerate(bench.items):
        image = bench.load_image(item.image_id) if item.image_id else None
        want, cut = own_forward_of_shortened_prompt(
            loaded, image, asked[j], item.question, token_ablation
        )
        if ablation == "no-system":  # every family has system tokens to remove
            assert cut > 0
        assert got.yes[j] == pytest.approx(want[words[0]].logsumexp(0).item(), abs=1e-4)
        assert got.no[j] == pytest.approx(want[words[1]].logsumexp(0).item(), abs=1e-4)
    if ablation == "no-system":
        rule = Redistribution("system", ("text",), late_layers(loaded))
        ruled = score_items(loaded, bench, asked, rule, words, 4, 0, "t", ablation="no-system")
        assert ruled.yes == pytest.approx(got.yes, abs=1e-5)
        assert ruled.no == pytest.approx(got.no, abs=1e-5)


def test_no_system_prefix_is_the_image_alone(family):
    """Under no-system, prefix sharing keeps working: the prefix of an item with an image is
    its image span alone (from its first to its last image token), one prefix row per image
    whatever the system prompt; without an image there is no prefix."""
    loaded, *_ = family
    bench = benchmark_of(loaded)
    prompts = [
        fmt(loaded, SYSTEMS[j % 2]).render(item.question, item.image_id is not None)
        for j, item in enumerate(bench.items)
    ]
    plan = plan_batches([item.image_id for item in bench.items], 4)
    encoder = BatchEncoder(bench, prompts, plan, loaded, ablation="no-system")
    for i, order in enumerate(plan):
        batch = encoder.encode(i)
        if bench.items[order[0]].image_id is None:
            assert batch.prefix_ids.shape[1] == 0
            continue
        assert len(batch.prefix_ids) == len({bench.items[j].image_id for j in order})
        for ids, mask in zip(batch.prefix_ids, batch.prefix_mask, strict=True):
            real = ids[mask.bool()].tolist()
            assert real[0] == real[-1] == loaded.image_token_id
