"""The score cache never serves stale scores: it is keyed by the image's content and the
scores version, not by file names."""

import torch
from conftest import make_image
from test_scoring import WORDS

from sysattn_exp.benchmarks.base import Benchmark, Item, open_image_file
from sysattn_exp.cache import SCORES_VERSION, ScoreCache
from sysattn_exp.intervention import Redistribution
from sysattn_exp.models import LoadedModel, use_sysattn
from sysattn_exp.prompts import build_prompt
from sysattn_exp.scoring import score_items


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
