"""The shipped toy model (model=toy) is a real model: it answers held-out toy questions,
its answers depend on the image, it says yes to hard compositional questions more than to
easy ones, and its answer position attends to the system tokens. The training script is
deterministic from its seed: the same code twice in one process gives the same weights.
(Not the same bits on another machine: the CPU's instruction set and thread count change
the last bits of float32 sums, so no test compares a fresh run with a recorded digest. The
shipped file's digest is its bytes, and the accuracy tests check what those weights do.)"""

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_module
from transformers import LlavaForConditionalGeneration

from sysattn_exp.attention.profile import AttentionProfile
from sysattn_exp.benchmarks import load_benchmark
from sysattn_exp.evaluation.scoring import score_items
from sysattn_exp.experiment.conditions import build_edit, intervention_rule, resolve_layers
from sysattn_exp.experiment.job_yes_no import item_prompts, scoring_words
from sysattn_exp.models import toy_model
from sysattn_exp.models.loading import load_model

# sha256 of the shipped weights, as scripts/train_toy.py prints it (seed 0, defaults).
SHIPPED_DIGEST = "1fa4d75c6ac5c43b029f1bdb911fce67b1c2b08ae0557ea356b07ac1178a1654"


def config(*overrides: str):
    with initialize_config_module("sysattn_exp.conf", version_base="1.3"):
        return compose("config", overrides=["model=toy", "benchmark=toy", *overrides])


def predictions(*overrides: str, profile=None) -> pd.DataFrame:
    cfg = config(*overrides)
    loaded = load_model(cfg.model)
    bench = load_benchmark(cfg.benchmark)
    prompts = item_prompts(bench, loaded.prompt_format(cfg.model))
    layers = resolve_layers(cfg.layers, loaded.num_layers)
    edit = build_edit(intervention_rule(cfg.intervention), layers)
    words = scoring_words(loaded, cfg.scoring, prompts[0])
    scores = score_items(loaded, bench, prompts, edit, words, 32, 0, "toy", profile=profile)
    frame = pd.DataFrame({"group": [i.group_id for i in bench.items]})
    frame["label"] = [i.label for i in bench.items]
    frame["pred"] = [y > n for y, n in zip(scores.yes, scores.no, strict=True)]
    frame["correct"] = frame["pred"] == frame["label"]
    return frame


def paired(frame: pd.DataFrame) -> float:
    return frame.groupby("group")["correct"].all().mean()


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_held_out_accuracy_and_blinding():
    baseline = predictions("benchmark.split=test")
    assert len(baseline) == 192
    # README's recorded figures (accuracy 0.922, paired 0.854), less a few knife-edge items
    # that another machine's float32 rounding may tip.
    assert baseline["correct"].mean() >= 0.90
    assert paired(baseline) >= 0.82
    blind = predictions(
        "benchmark.split=test",
        "intervention=redistribute",
        "intervention.source=image",
        "intervention.recipients=[text]",
    )
    # One yes and one no question on each image: a model that cannot see answers both the
    # same way far more often than not (chance for a pair is 0.25).
    assert paired(blind) <= 0.35
    assert paired(baseline) - paired(blind) >= 0.5


def test_yes_bias_on_hard_questions():
    easy = predictions("benchmark.split=test")
    hard = predictions("benchmark.split=hard")
    easy_no = easy[~easy["label"]]["pred"].mean()
    hard_no = hard[~hard["label"]]["pred"].mean()
    assert hard_no >= 0.3 and hard_no >= easy_no + 0.2


def test_system_sink():
    profile = AttentionProfile()
    predictions("benchmark.split=test", "benchmark.limit=24", profile=profile)
    table = profile.table()
    answer = table[table.queries == "answer"].set_index("layer").sort_index()
    # The system part (BOS, system prompt, "USER:") is 46 of the prompt's ~134 positions;
    # the answer position gives it more than that share in the first layers.
    assert answer["system"].iloc[:2].min() >= 0.35


def test_shipped_weights_are_the_scripts():
    model, _ = toy_model.build_toy_llava()
    assert toy_model.digest(model) == SHIPPED_DIGEST


def test_training_is_deterministic():
    """The script's code path, short (the full run takes about 4 minutes), twice: equal
    weights, and weights that training moved from the seed's initial ones."""
    short = dict(seed=0, vision_steps=3, steps=3, batch_size=4, log=None)
    first = toy_model.train(**short)[0].state_dict()
    second = toy_model.train(**short)[0].state_dict()
    assert first.keys() == second.keys()
    different = [name for name in first if not torch.equal(first[name], second[name])]
    assert not different, f"differ between two runs: {different[:5]}"
    torch.manual_seed(0)  # train() builds its model right after seeding
    initial = LlavaForConditionalGeneration(toy_model.build_toy_config()).state_dict()
    moved = [name for name in first if not torch.equal(first[name], initial[name])]
    assert "lm_head.weight" in moved and len(moved) >= len(first) // 2
