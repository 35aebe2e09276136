"""Prompt presets: benchmark.prompt=native (each benchmark's own yes/no prompt) or llava
(LLaVA-1.5's evaluation prompt), with benchmark.template still overriding the template."""

import pytest
from benchmark_fixtures import write_mme
from test_benchmark_loaders import benchmark_cfg

from sysattn_exp.benchmarks import LOADERS, load_benchmark
from sysattn_exp.benchmarks.base import prompt_preset
from sysattn_exp.errors import UsageError

SHORT = "\nAnswer the question using a single word or phrase."
# The templates every benchmark used before presets existed: native must keep them.
NATIVE = {
    "toy": "{question} Please answer yes or no.",
    "jsonl": "{question}",
    "mme": "{question}",
    "hallusionbench": "{question} Please answer yes or no.",
    "naturalbench": "{question} Please answer Yes or No.",
    "winoground": 'Does this figure show "{question}"? Please answer yes or no.',
    "sugarcrepe": 'Does this figure show "{question}"? Please answer yes or no.',
    "beaf": "{question} Please answer yes or no.",
    "pope": "{question} Please answer yes or no.",
}
# (template, remove) of the llava preset: see the sources in each benchmark's yaml.
LLAVA = {
    "toy": ("{question}" + SHORT, None),
    "jsonl": ("{question}" + SHORT, " Please answer yes or no."),
    "mme": ("{question}" + SHORT, " Please answer yes or no."),
    "hallusionbench": ("{question}", None),
    "naturalbench": (NATIVE["naturalbench"], None),
    "winoground": (NATIVE["winoground"], None),
    "sugarcrepe": ('Does this figure show "{question}"?' + SHORT, None),
    "beaf": ("{question}" + SHORT, None),
    "pope": ("{question}" + SHORT, None),
}


def test_every_benchmark_has_native_by_default_and_llava():
    assert set(NATIVE) == set(LLAVA) == set(LOADERS)
    for name in LOADERS:
        cfg = benchmark_cfg(f"benchmark={name}")
        assert prompt_preset(cfg) == (NATIVE[name], None)
        cfg.prompt = "llava"  # as benchmark.prompt=llava (one compose per benchmark is faster)
        assert prompt_preset(cfg) == LLAVA[name], name


def mme_texts(tmp_path, *overrides) -> dict[str, str]:
    """The text given for each MME question of write_mme, by item id."""
    if not (tmp_path / "txt").exists():
        write_mme(tmp_path)
    args = [f"benchmark.data_dir={tmp_path / 'txt'}", f"benchmark.image_dir={tmp_path / 'img'}"]
    bench = load_benchmark(benchmark_cfg("benchmark=mme", *args, *overrides))
    return {i.item_id: bench.question_text(i) for i in bench.items}


def test_mme_llava_replaces_the_yes_or_no_request(tmp_path):
    train, really = "existence/000000006040.jpg/0", "existence/000000006040.jpg/1"
    native = mme_texts(tmp_path)
    assert native[train] == "Is there a train in this image? Please answer yes or no."
    llava = mme_texts(tmp_path, "benchmark.prompt=llava")
    # As LLaVA's llava_mme.jsonl has it: the question, a newline, the short-answer line.
    assert (
        llava[train]
        == "Is there a train in this image?\nAnswer the question using a single word or phrase."
    )
    assert llava[really] == "Is there a train in this image really?" + SHORT
    assert not any("Please answer" in text for text in llava.values())


def test_template_override_still_wins(tmp_path):
    train = "existence/000000006040.jpg/0"
    native = mme_texts(tmp_path, "benchmark.template='Q: {question}'")
    assert native[train] == "Q: Is there a train in this image? Please answer yes or no."
    # With a preset the override replaces its template; the preset's remove still applies.
    llava = mme_texts(tmp_path, "benchmark.prompt=llava", "benchmark.template='Q: {question}'")
    assert llava[train] == "Q: Is there a train in this image?"
    toy = load_benchmark(benchmark_cfg("benchmark.template='<{question}>'"))
    assert toy.question_text(toy.items[0]) == f"<{toy.items[0].question}>"


def test_unknown_or_broken_preset_is_one_clear_error():
    with pytest.raises(
        UsageError, match=r"^benchmark.prompt='vicuna' is unknown; allowed: native, llava$"
    ):
        load_benchmark(benchmark_cfg("benchmark.prompt=vicuna"))
    broken = ("benchmark.prompt=llava", "benchmark.prompts.llava.template=hello")
    with pytest.raises(UsageError, match=r"^benchmark.prompts.llava.template='hello' must contain"):
        load_benchmark(benchmark_cfg(*broken))
