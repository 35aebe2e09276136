"""The shipped toy model (model=toy) is a real model: it answers held-out toy questions,
its answers depend on the image, it says yes to hard compositional questions more than to
easy ones, and its answer position attends to the system tokens. The training script is
deterministic from its seed: the same code twice in one process gives the same weights.
(Not the same bits on another machine: the CPU's instruction set and thread count change
the last bits of float32 sums, so no test compares a fresh run with a recorded digest. The
shipped file's digest is its bytes, and the accuracy tests check what those weights do.)"""

import hashlib
import random

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_module
from transformers import LlavaForConditionalGeneration

from sysattn_exp.attention.profile import AttentionProfile
from sysattn_exp.benchmarks import load_benchmark
from sysattn_exp.benchmarks import toy as world
from sysattn_exp.evaluation.scoring import score_items
from sysattn_exp.experiment.conditions import build_edit, intervention_rule, resolve_layers
from sysattn_exp.experiment.identity import toy_condition
from sysattn_exp.experiment.job_yes_no import item_prompts, scoring_words
from sysattn_exp.models import toy_model
from sysattn_exp.models.loading import load_model

# sha256 of the shipped weights, as scripts/train_toy.py prints it (seed 0, defaults).
SHIPPED_DIGEST = "1fa4d75c6ac5c43b029f1bdb911fce67b1c2b08ae0557ea356b07ac1178a1654"
# The balanced twin's (model=toy_balanced): scripts/train_toy.py --hard-share 0.2
# --out sysattn_exp/models/toy_balanced_weights.safetensors (seed 0, one thread, 324 s).
BALANCED_DIGEST = "fe92408b28fc0407747f7dbc2ba6627841daf651012b4161cffc568d544948da"


def config(*overrides: str, model: str = "toy"):
    with initialize_config_module("sysattn_exp.conf", version_base="1.3"):
        return compose("config", overrides=[f"model={model}", "benchmark=toy", *overrides])


def predictions(*overrides: str, profile=None, model: str = "toy") -> pd.DataFrame:
    cfg = config(*overrides, model=model)
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


def test_balanced_twin_weights_are_the_scripts():
    """model=toy_balanced loads the twin's file, whose digest is the script's, and keys its
    scores by that file (identity.condition's weights entry), not by the toy's."""
    loaded = load_model(config(model="toy_balanced").model)
    assert toy_model.digest(loaded.model) == BALANCED_DIGEST
    assert toy_model.digest(load_model(config().model).model) == SHIPPED_DIGEST
    twin = toy_condition("builtin:toy_balanced")["weights"]
    assert twin == hashlib.sha256(toy_model.BALANCED_WEIGHTS.read_bytes()).hexdigest()
    assert toy_condition("builtin:toy")["weights"] == toy_model.weights_file_digest()
    assert twin != toy_condition("builtin:toy")["weights"]


# The twin's yes-rate on the 48 hard no questions as measured (CPU, float32): 43/48 against
# the toy model's 47/48, 4 questions fewer. The margin, 2 questions: the smallest
# |yes_logit - no_logit| among those questions is 0.04 (twin) and 0.12 (toy), far above
# what float32 rounding on another CPU or thread count moves, so none is expected to tip;
# 2 still lets one tip each way.
MEASURED_DROP, MARGIN = 4 / 48, 2 / 48


def test_balanced_twin_says_yes_less_to_hard_no_questions():
    hard_no = {}
    for model in ("toy", "toy_balanced"):
        hard = predictions("benchmark.split=hard", model=model)
        hard_no[model] = hard[~hard["label"]]["pred"].mean()
    assert hard_no["toy"] - hard_no["toy_balanced"] >= MEASURED_DROP - MARGIN


def test_the_mix_option_draws_hard_no_questions_at_its_share():
    """draw_question's hard_share: among the no questions of scenes that have a hard one,
    the hard ones' share is hard_share (the shipped 0.05, the twin's uniform 0.2), within
    4 binomial standard errors over 20000 scenes; the default is the shipped share."""
    assert toy_model.DEFAULTS["hard_share"] == toy_model.HARD_SHARE == 0.05
    assert toy_model.UNIFORM_HARD_SHARE == 0.2
    for share in (toy_model.HARD_SHARE, toy_model.UNIFORM_HARD_SHARE):
        rng, scenes = random.Random(0), random.Random(1)
        hard = drawn = 0
        for _ in range(20000):
            objects = world.random_scene(scenes)
            colour, shape, yes = toy_model.draw_question(rng, objects, share)
            asks = world.questions(objects)
            if yes or not asks["hard"]:
                continue
            drawn += 1
            hard += (colour, shape) in asks["hard"]
        se = (share * (1 - share) / drawn) ** 0.5
        assert abs(hard / drawn - share) <= 4 * se, (share, hard / drawn)


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
