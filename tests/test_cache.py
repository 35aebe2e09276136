"""The score cache never serves stale scores: it is keyed by the image's content, the
scores version and code, and the environment that computes scores, not by file names."""

import copy
import dataclasses

import pytest
import torch
import transformers
from conftest import make_image
from hydra import compose, initialize_config_module
from test_scoring import WORDS

from sysattn_exp.attention.rules import Redistribution
from sysattn_exp.benchmarks.base import Benchmark, Item, open_image_file
from sysattn_exp.evaluation.cache import (
    SCORES_VERSION,
    ScoreCache,
    code_digest,
    digest,
    scores_code_digest,
)
from sysattn_exp.evaluation.scoring import score_items
from sysattn_exp.experiment import identity
from sysattn_exp.experiment.identity import condition, job_config, job_key
from sysattn_exp.models.loading import LoadedModel, use_sysattn
from sysattn_exp.models.prompts import build_prompt


def on_disk(folder) -> Benchmark:
    items = [
        Item(f"{name}-{q}", name, str(folder / f"{name}.png"), question, q == 0)
        for name in ("a", "b")
        for q, question in enumerate(["Is it red?", "Is there a blue square?"])
    ]
    return Benchmark("files", items, "{question}", open_image_file)


def test_a_replaced_image_is_scored_again(gqa_llava, tmp_path):
    model, processor = gqa_llava
    use_sysattn(model)
    loaded = LoadedModel(model, processor, torch.device("cpu"), torch.float32)
    make_image("red").save(tmp_path / "a.png")
    make_image("blue").save(tmp_path / "b.png")
    edit = Redistribution("system", ("text",), frozenset({4, 5}))
    condition = {"model": "gqa", "scores_version": SCORES_VERSION}

    def score():
        bench = on_disk(tmp_path)
        prompts = [build_prompt(i.question, "A chat.") for i in bench.items]
        cache = ScoreCache(tmp_path / "cache", condition)
        return score_items(
            loaded, bench, prompts, edit, WORDS, 2, 0, "t", cache
        )  # a batch per image

    first = score()
    assert first.computed == 4 and score().computed == 0  # all from the cache
    make_image("green").save(tmp_path / "a.png")  # same file name, another picture
    again = score()
    assert again.computed == 2, "only the items of the replaced image are scored again"
    assert again.yes[:2] != first.yes[:2] and again.yes[2:] == first.yes[2:]
    changed = ScoreCache(tmp_path / "cache", condition | {"scores_version": SCORES_VERSION + 1})
    assert changed.load() == {}, "a new scores version starts an empty cache"


@pytest.fixture(scope="module")
def composed():
    with initialize_config_module("sysattn_exp.conf", version_base="1.3"):
        return compose("config", overrides=["model=tiny", "intervention=redistribute"])


def test_the_condition_changes_with_what_changes_scores(gqa_llava, composed, monkeypatch):
    """The score cache's key (and the job key) changes with the torch and transformers
    versions, the device's name, the batch size and the planned kernel path; it is the
    same when computed again in one environment."""
    model, processor = gqa_llava
    loaded = LoadedModel(model, processor, torch.device("cpu"), torch.float32)
    edit = Redistribution("system", ("text",), frozenset({4, 5}))
    before = condition(composed, loaded, edit, WORDS)
    assert before == condition(composed, loaded, edit, WORDS), "deterministic"
    assert before["device_name"] == "cpu" and before["kernel_path"] == "cpu_flash"
    assert before["batch_size"] == composed.model.batch_size
    assert before["scores_code"] == scores_code_digest()
    changed = {}
    with monkeypatch.context() as patch:
        patch.setattr(torch, "__version__", "9.1.0+cu130")
        changed["torch"] = condition(composed, loaded, edit, WORDS)
    with monkeypatch.context() as patch:
        # the library as identity imported it (a lazy module that may be replaced in
        # sys.modules after import)
        patch.setattr(identity.transformers, "__version__", "6.0.0")
        changed["transformers"] = condition(composed, loaded, edit, WORDS)
    smaller = copy.deepcopy(composed)
    smaller.model.batch_size = 4
    changed["batch_size"] = condition(smaller, loaded, edit, WORDS)
    eager = dataclasses.replace(edit, impl="eager")
    changed["kernel_path"] = condition(composed, loaded, eager, WORDS)
    with torch.device("meta"):  # the same architecture on another device
        elsewhere = type(model)(model.config)
    moved = LoadedModel(elsewhere, processor, torch.device("cpu"), torch.float32)
    changed["device_name"] = condition(composed, moved, edit, WORDS)
    for what, after in changed.items():
        assert after[what] != before[what], what
        assert digest(after) != digest(before), what
        assert job_key({}, after) != job_key({}, before), what


def test_a_model_split_over_devices_names_them_all(gqa_llava, composed):
    """Under a device_map the weights are on several devices: the condition names each,
    and the planned kernel path covers the kernels of each (here the CPU's flash kernel
    and, for the layers on `meta`, which has no kernel, the math path)."""
    model, processor = gqa_llava
    with torch.device("meta"):
        split = type(model)(model.config)
    split.model.language_model.layers[0].to_empty(device="cpu")
    loaded = LoadedModel(split, processor, torch.device("cpu"), torch.float32)
    edit = Redistribution("system", ("text",), frozenset({4, 5}))
    split_condition = condition(composed, loaded, edit, WORDS)
    assert split_condition["device_name"] == "cpu + meta"
    assert split_condition["kernel_path"] == "cpu_flash+math"


def test_the_environment_is_recorded_but_not_in_the_job_key(gqa_llava, composed):
    model, processor = gqa_llava
    loaded = LoadedModel(model, processor, torch.device("cpu"), torch.float32)
    edit = Redistribution("system", ("text",), frozenset({4, 5}))
    config = job_config(composed, loaded, edit, WORDS, [4, 5], "name")
    assert config["environment"]["torch"] == str(torch.__version__)
    assert config["environment"]["transformers"] == transformers.__version__ != ""
    cond = condition(composed, loaded, edit, WORDS)
    other = copy.deepcopy(config) | {"environment": {"torch": "0.1", "device_name": "x"}}
    assert job_key(config, cond) == job_key(other, cond)
    assert job_key(config, cond) != job_key(config | {"model": {"batch_size": 1}}, cond)
    again = job_config(composed, loaded, edit, WORDS, [4, 5], "name")
    assert again["job"]["key"] == config["job"]["key"], "deterministic in one environment"


CODE = '''"""A module."""


def f(x):
    """Twice x."""
    return 2 * x  # a comment
'''


def test_the_code_digest_sees_code_not_comments_docstrings_or_formatting():
    same = CODE.replace("# a comment", "# another").replace("Twice x.", "2x.")
    reformatted = same.replace("return 2 * x", "return (2*x)").replace('"""A module."""', "")
    assert code_digest([CODE]) == code_digest([same]) == code_digest([reformatted])
    assert code_digest([CODE]) != code_digest([CODE.replace("2 * x", "3 * x")])
    assert code_digest([CODE]) != code_digest([CODE, "y = 1"])


def test_cached_scores_keep_the_paths_that_computed_them(tmp_path):
    """A rerun served from the cache reports the attention paths of the run that computed
    its scores (the fused path is chosen per call by shape), batch by batch; a torn line
    is ignored."""
    cache = ScoreCache(tmp_path, {"model": "m"})
    cache.save(["a", "b"], [1.0, 2.0], [0.0, 0.5], [0.7, 0.8], paths={"rows", "cpu_flash"})
    cache.save(["c"], [3.0], [1.0], [0.9])
    with cache.file.open("a") as torn:
        torn.write('{"keys": ["d"], "yes": [1')  # killed mid-line
    again = ScoreCache(tmp_path, {"model": "m"})
    scores, paths = again.read()
    assert again.load() == scores
    assert scores == {"a": (1.0, 0.0, 0.7), "b": (2.0, 0.5, 0.8), "c": (3.0, 1.0, 0.9)}
    assert set(paths["b"]) == {"rows", "cpu_flash"}
    assert set(paths["c"]) == set()
    assert set(paths["c"]) | set(paths["a"]) == {"rows", "cpu_flash"}
    assert "d" not in paths
