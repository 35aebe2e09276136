"""scoring.mode=generate: batched, prefix-shared greedy decoding with the fused path equals
one-at-a-time decoding with the loop reference, token for token; its first step agrees with
the logit mode; answers parse as MME's eval tool parses them; the command line writes the
generated text, the parsed answer and the unknown rate."""

import copy

import pandas as pd
import pytest
import torch
from cli import read_metrics, run_main
from conftest import make_image
from omegaconf import OmegaConf
from reference import REFERENCE_NAME, STATE, reference_setup

from sysattn_exp.attention.rules import Pai, Redistribution
from sysattn_exp.benchmarks.answers import mme_answer as parse_yes_no
from sysattn_exp.benchmarks.base import Benchmark, Item
from sysattn_exp.evaluation.generation import (
    generate_full_prompts,
    generate_items,
    stop_ids,
    until_stop,
)
from sysattn_exp.evaluation.scoring import CACHE_ARG, score_items
from sysattn_exp.experiment.job_yes_no import scoring_words
from sysattn_exp.models.loading import LoadedModel, use_sysattn
from sysattn_exp.models.prompts import build_prompt

NEW_TOKENS = 5
# Two questions share the red image; the three prompts all differ in length.
ITEMS = [
    ("red", "Is it red?"),
    ("red", "Is there a blue square next to the circle? Please answer yes or no."),
    ("blue", "Is the circle large?"),
]
RULES = {  # name: (the sysattn edit, the reference's rule)
    "baseline": (None, None),
    "system->text q4": (
        Redistribution("system", ("text",), frozenset({4, 5})),
        {"source": "system", "recipients": ("text",), "layers": {4, 5}},
    ),
    # PAI edits the answer row: the last question token, then every decoding query.
    # (alpha 20: large enough to change what this random model generates)
    "pai": (Pai(20.0, frozenset(range(6))), {"alpha": 20.0, "layers": set(range(6))}),
}


def sharpened(model):
    """At trained-model init scale (0.02) a random model attends almost uniformly, so an
    off-by-one position changes nothing it generates; with the language model's
    projections 5 times larger each step's token depends on attention, positions included."""
    with torch.no_grad():
        for name, weight in model.model.language_model.named_parameters():
            if weight.dim() == 2 and "embed" not in name:
                weight.mul_(5)
    return model


@pytest.fixture(scope="module")
def loaded(gqa_llava):
    model, processor = gqa_llava
    model = sharpened(copy.deepcopy(model))
    use_sysattn(model)
    return LoadedModel(model, processor, torch.device("cpu"), torch.float32)


def benchmark(items=ITEMS) -> Benchmark:
    rows = [Item(f"i{n}", f"g{n}", colour, q, n % 2 == 0) for n, (colour, q) in enumerate(items)]
    return Benchmark("test", rows, "{question}", make_image)


def prompts_of(bench: Benchmark) -> list[str]:
    return [build_prompt(item.question, "A chat.") for item in bench.items]


@torch.inference_mode()
def reference_generate(loaded: LoadedModel, image, prompt: str, rule, n: int) -> list[int]:
    """One prompt, no padding, no prefix sharing: the reference attention over the whole
    prompt, then one token at a time with the cache, each new position a text key."""
    model, stops = loaded.model, stop_ids(loaded)
    inputs = loaded.processor(images=[image], text=[prompt], return_tensors="pt")
    reference_setup(inputs["input_ids"], inputs["attention_mask"], loaded.image_token_id, rule)
    model.set_attn_implementation({"text_config": REFERENCE_NAME, "vision_config": "sdpa"})
    try:
        out, tokens = model(**inputs, use_cache=True), []
        while True:
            token = int(out.logits[0, -1].argmax())
            if token in stops:
                break
            tokens.append(token)
            if len(tokens) == n:
                break
            STATE["modalities"][0].append("text")
            out = model(
                input_ids=torch.tensor([[token]]),
                **{CACHE_ARG: getattr(out, CACHE_ARG)},
                use_cache=True,
            )
    finally:
        use_sysattn(model)
    return tokens


@pytest.mark.parametrize("rule", list(RULES))
def test_batched_generation_equals_the_reference_one_at_a_time(loaded, rule):
    edit, reference_rule = RULES[rule]
    bench = benchmark()
    prompts = prompts_of(bench)
    got = generate_items(loaded, bench, prompts, edit, NEW_TOKENS, len(prompts), 0, "test")
    for item, prompt, text in zip(bench.items, prompts, got.texts, strict=True):
        image = make_image(item.image_id)
        want = reference_generate(loaded, image, prompt, reference_rule, NEW_TOKENS)
        assert text == loaded.tokenizer.decode(want, skip_special_tokens=True), item.item_id
    assert got.new_tokens > len(prompts)  # decoding went past the first token


def test_full_prompt_generation_equals_prefix_shared(loaded):
    """The lower-level path for free text (captions): whole prompts, left-padded."""
    edit = RULES["system->text q4"][0]
    bench = benchmark()
    prompts = prompts_of(bench)
    shared = generate_items(loaded, bench, prompts, edit, NEW_TOKENS, 2, 0, "test").texts
    images = [make_image(item.image_id) for item in bench.items]
    assert generate_full_prompts(loaded, images, prompts, edit, NEW_TOKENS) == shared


@pytest.fixture(scope="module")
def answering(gqa_llava):
    """The random LLaVA with its output head's Yes and No rows replaced by larger ones
    (a shared direction plus noise, seed chosen so that both answers occur), so that its
    first generated token is a yes/no word; which one still depends on the input. With the
    random head the first token is almost never one of them."""
    model, processor = copy.deepcopy(gqa_llava[0]), gqa_llava[1]
    tokenizer = processor.tokenizer
    words = [tokenizer(w, add_special_tokens=False).input_ids[0] for w in ("Yes", "No")]
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        head = model.lm_head.weight
        shared = torch.randn(head.shape[1], generator=generator)
        head[words] = 0.1 * (shared + torch.randn(len(words), head.shape[1], generator=generator))
    use_sysattn(model)
    return LoadedModel(model, processor, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("rule", ["baseline", "system->text q4"])
def test_generated_answer_agrees_with_the_logit_mode(answering, rule):
    edit = RULES[rule][0]
    colours = ["red", "blue", "green", "yellow"]
    questions = ["Is it red?", "Is there a circle?", "Is the circle small and blue?"]
    bench = benchmark([(c, q) for c in colours for q in questions])
    prompts = prompts_of(bench)
    cfg = OmegaConf.create({"yes_words": ["Yes", "yes"], "no_words": ["No", "no"]})
    words = scoring_words(answering, cfg, prompts[0])
    logit = score_items(answering, bench, prompts, edit, words, 6, 0, "test")
    generated = generate_items(answering, bench, prompts, edit, 3, 6, 0, "test", words)
    # The first step's scores are the logit mode's.
    assert torch.allclose(torch.tensor(generated.yes), torch.tensor(logit.yes), atol=1e-5)
    assert torch.allclose(torch.tensor(generated.no), torch.tensor(logit.no), atol=1e-5)
    tokenizer = answering.tokenizer
    first = [tokenizer.decode(ids[:1]).strip().lower() for ids in generated.tokens]
    answers = []
    for yes, no, text, word in zip(logit.yes, logit.no, generated.texts, first, strict=True):
        if word in ("yes", "no"):  # the first generated token is a yes/no word
            answers.append(parse_yes_no(text))
            assert answers[-1] == ("yes" if yes > no else "no"), text
    assert set(answers) == {"yes", "no"}  # some items qualify, with either answer


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("Yes", "yes"),
        ("no.", "no"),
        ("  NO  ", "no"),
        ("Yes, there is a dog.", "yes"),
        ("No, it is blue.", "no"),
        ("Nope", "no"),  # "no" within the first 4 characters, as MME's tool reads it
        ("I think yes", "unknown"),  # not within the first 4
        ("There is a cat.", "unknown"),
        ("", "unknown"),
    ],
)
def test_parse_yes_no(text, answer):
    assert parse_yes_no(text) == answer


def test_cli_generate_mode(tmp_path, monkeypatch):
    status = run_main(
        tmp_path,
        monkeypatch,
        "model=tiny",
        "scoring.mode=generate",
        "scoring.max_new_tokens=3",
        "benchmark.limit=2",
        "intervention=redistribute",
        "layers=q4",
        "runtime.num_workers=0",
        "hydra.run.dir=job",
    )
    assert status == 0
    frame = pd.read_parquet(tmp_path / "job" / "predictions.parquet")
    assert {"generated", "answer"} <= set(frame.columns)
    assert set(frame["answer"]) <= {"yes", "no", "unknown"}
    assert frame["pred"].tolist() == (frame["answer"] == "yes").tolist()
    metrics = read_metrics(tmp_path / "job")
    assert metrics["unknown_rate"] == (frame["answer"] == "unknown").mean()
    assert "baseline_unknown_rate" in metrics and metrics["generated_tokens_per_second"] > 0


def test_cli_bad_scoring_mode(tmp_path, monkeypatch, capsys):
    status = run_main(tmp_path, monkeypatch, "model=tiny", "scoring.mode=sample")
    assert status == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and "scoring.mode" in lines[-1]
    assert "logit, generate" in lines[-1]


QWEN_PROMPT = (
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
)
QWEN_IMAGES = {"red": (28, 28), "blue": (56, 28)}  # 4 and 8 image tokens: unequal prefixes


@pytest.fixture(scope="module")
def qwen2_vl():
    from tiny_families.llava_qwen import build_qwen2_vl

    model, processor = build_qwen2_vl(0)
    processor.tokenizer.padding_side = "left"
    sharpened(model)  # at the builder's scale it repeats one token whatever it sees
    use_sysattn(model)
    return LoadedModel(model, processor, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("rule", ["baseline", "system->text q4"])
def test_qwen2_vl_generation_continues_3d_positions(qwen2_vl, rule):
    """Qwen2-VL's multimodal RoPE: the prefix-shared batch equals whole prompts generated
    one at a time (positions from the model's own get_rope_index), and, unedited, the
    model's own generate()."""
    edit = Redistribution("system", ("text",), frozenset({6, 7})) if rule != "baseline" else None
    items = [
        Item(f"i{n}", f"g{n}", colour, q, True)
        for n, (colour, q) in enumerate(ITEMS + [("blue", "Is it red?")])
    ]
    bench = Benchmark("q", items, "{question}", lambda c: make_image(c, QWEN_IMAGES[c]))
    prompts = [QWEN_PROMPT.format(question=item.question) for item in items]
    got = generate_items(qwen2_vl, bench, prompts, edit, NEW_TOKENS, 4, 0, "test")
    for item, prompt, text, ids in zip(items, prompts, got.texts, got.tokens, strict=True):
        image = bench.load_image(item.image_id)
        alone = generate_full_prompts(qwen2_vl, [image], [prompt], edit, NEW_TOKENS)
        assert text == alone[0], item.item_id
        if edit is None:
            inputs = qwen2_vl.processor(images=[image], text=[prompt], return_tensors="pt")
            with torch.inference_mode():
                out = qwen2_vl.model.generate(
                    **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, top_k=None, top_p=None
                )
            new = out[0, inputs["input_ids"].shape[1] :].tolist()
            assert ids == until_stop(new, stop_ids(qwen2_vl)), item.item_id


def test_job_key_separates_the_modes():
    from sysattn_exp.experiment.identity import generation_condition, job_key

    before = {"scoring": {"yes_words": ["Yes"]}, "model": {"name_or_path": "m"}}
    logit = {**before, "scoring": {"yes_words": ["Yes"], "mode": "logit", "max_new_tokens": 8}}
    generate = {**logit, "scoring": {**logit["scoring"], "mode": "generate"}}
    longer = {**generate, "scoring": {**generate["scoring"], "max_new_tokens": 16}}
    # Logit-mode jobs keep the key they had before the generation keys existed.
    assert job_key(logit, {}) == job_key(before, {})
    assert len({job_key(c, {}) for c in (logit, generate, longer)}) == 3
    assert generation_condition(OmegaConf.create(logit["scoring"])) == {}
    assert generation_condition(OmegaConf.create(longer["scoring"]))["max_new_tokens"] == 16
