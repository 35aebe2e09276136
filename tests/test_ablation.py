"""Prompt ablations (prompt.ablation, models/ablation.py): which tokens each removes, how
jobs are keyed and named, and an ablation job through the CLI, compared with the unablated
prompt's baseline as a rule's job is. Exactness on every family (the scores equal the
model's own forward of the shortened prompt) is in tests/test_families.py."""

import json

import pandas as pd
import pytest
import yaml
from cli import read_metrics, run_cli
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from scipy.stats import binomtest
from tiny_families import BUILDERS

from sysattn_exp.attention.rules import Redistribution
from sysattn_exp.experiment import identity
from sysattn_exp.experiment.schema import Ablation
from sysattn_exp.models import ablation
from sysattn_exp.models.loading import load_model
from sysattn_exp.models.prompts import PromptFormat

BOS, IMG = 1, 9


@pytest.mark.parametrize(
    "name,ids,text_start,want",
    [
        ("none", [BOS, 5, IMG, IMG, 6], 0, 0),
        ("no-system-prompt", [BOS, 5, IMG, 6], 0, 0),  # a change of the text, not of tokens
        ("no-bos", [BOS, 5, IMG, 6], 0, 1),
        ("no-bos", [5, 5, IMG, 6], 0, 0),  # no BOS (Qwen's templates): nothing removed
        ("no-system", [BOS, 5, 7, IMG, IMG, 6], 0, 3),  # at the first image token
        ("no-system", [BOS, 5, 7, 8, 6], 3, 3),  # no image: at the question
    ],
)
def test_first_kept_token(name, ids, text_start, want):
    assert ablation.first_kept(ids, name, IMG, text_start, BOS) == want


def test_no_bos_without_a_bos_token_removes_nothing():
    assert ablation.first_kept([BOS, 5, 6], "no-bos", IMG, 0, None) == 0


def test_schema_allows_exactly_the_ablations():
    assert tuple(member.value for member in Ablation) == ablation.ABLATIONS


def compose_job(*overrides):
    with initialize_config_module("sysattn_exp.conf", version_base="1.3"):
        return compose(config_name="config", overrides=["model=tiny", *overrides])


def test_job_key_and_condition_see_the_ablation_and_none_adds_nothing():
    """prompt.ablation=none keys a job as before the prompt section existed; each ablation
    is another job, with and without a rule, and the score cache's condition says which."""
    loaded = load_model(compose_job().model)
    words = ([3], [4])
    keys = {}
    for name in ablation.ABLATIONS:
        for condition in ("baseline", "system-text_q4"):
            cfg = compose_job(f"+condition={condition}", f"prompt.ablation={name}")
            config = OmegaConf.to_container(cfg, resolve=True)
            rule = Redistribution("system", ("text",), frozenset({6, 7}))
            edit = None if condition == "baseline" else rule
            cond = identity.condition(cfg, loaded, edit, words, identity.prompt_ablation(cfg))
            assert ("prompt_ablation" in cond) == (name != "none")
            keys[name, condition] = identity.job_key(config, cond)
            if name == "none":
                without = {k: v for k, v in config.items() if k != "prompt"}
                assert keys[name, condition] == identity.job_key(without, cond)
    assert len(set(keys.values())) == len(keys)


def test_labels_and_run_names():
    rule = Redistribution("system", ("text",), frozenset({2, 3}))
    assert ablation.label("no-system", "baseline") == "no system tokens"
    assert ablation.label("no-bos", rule.describe()) == "no BOS + system->text"
    assert ablation.label("none", rule.describe()) == "system->text"
    assert identity.run_name("pope", None, [], ablation="no-system") == "pope no system tokens"
    assert (
        identity.run_name("pope", rule, [2, 3], ablation="no-system-prompt")
        == "pope no system prompt + system->text layers 2-3"
    )


def group_correct(predictions: pd.DataFrame) -> pd.Series:
    return predictions.groupby("group_id")["correct"].all()


def test_ablation_job_compares_with_the_unablated_baseline(tmp_path):
    """An ablation job's change, McNemar test and report row are against the baseline of
    the unablated prompt (the baseline job's predictions), and the report shows it as its
    own condition, labelled, with its interval and p-value."""
    result = run_cli(
        "-m",
        "+condition=baseline,no-system",
        "model=tiny",
        "benchmark=toy",
        "runtime.report_at_end=true",
        "runtime.num_workers=0",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = next((tmp_path / "outputs" / "multiruns").iterdir())
    baseline, ablated = read_metrics(sweep / "job0"), read_metrics(sweep / "job1")
    config = yaml.safe_load((sweep / "job1" / "config.yaml").read_text())
    assert config["job"]["label"] == "no system tokens"
    assert config["prompt"] == {"ablation": "no-system"}
    assert ablated["baseline_paired_accuracy"] == pytest.approx(baseline["paired_accuracy"])
    change = 100 * (ablated["paired_accuracy"] - baseline["paired_accuracy"])
    assert ablated["paired_accuracy_change_points"] == pytest.approx(change)
    # McNemar's exact test on the groups, computed here from both jobs' predictions.
    before = group_correct(pd.read_parquet(sweep / "job0" / "predictions.parquet"))
    after = group_correct(pd.read_parquet(sweep / "job1" / "predictions.parquet"))
    fixed, broken = int((after & ~before).sum()), int((before & ~after).sum())
    assert fixed + broken > 0, "the ablation changed no group's answers: nothing tested"
    want = binomtest(min(fixed, broken), fixed + broken, 0.5).pvalue
    assert ablated["paired_accuracy_mcnemar_p"] == pytest.approx(want)
    table = pd.read_csv(sweep / "report" / "comparison.csv").set_index("intervention")
    row = table.loc["no system tokens"]
    assert row["layers"] == "-"
    assert row["p_value"] == pytest.approx(want)
    assert (row["groups_fixed"], row["groups_broken"]) == (fixed, broken)
    assert row["change_ci_low_points"] <= change <= row["change_ci_high_points"]
    assert table.loc["baseline", "paired_accuracy"] == pytest.approx(baseline["paired_accuracy"])
    summary = pd.read_csv(sweep / "report" / "summary.csv")
    assert list(summary["condition"]) == ["no system tokens"]  # no layers to name


def test_ablation_dry_run_says_what_is_left(tmp_path):
    """The dry run prints the tokens removed and left; the tiny model's prompt (LLaVA-1.5's
    format, BOS from its tokenizer) keeps only the image and the text after it."""
    result = run_cli(
        "model=tiny", "benchmark=toy", "+condition=no-system", "runtime.dry_run=true", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "prompt.ablation=no-system (no system tokens):" in out
    assert "left's split: system=0," in out
    summary = json.loads(next(tmp_path.rglob("dry_run.json")).read_text())
    assert summary["example_ablated_system_tokens"] == 0
    assert summary["example_ablated_image_tokens"] == summary["example_image_tokens"]
    assert summary["example_ablated_text_tokens"] == summary["example_text_tokens"]


@pytest.mark.parametrize(
    "family,removed",
    [("qwen2", []), ("llama", ["<|begin_of_text|>"]), ("gemma2", ["<bos>"])],
)
def test_no_bos_removes_the_bos_whoever_adds_it(family, removed):
    """Qwen's template has no BOS (no-bos is a no-op there); Llama 3's and Gemma's write it
    in the template's text, where the tokenizer adds none."""
    processor = BUILDERS[family](0)[1]
    prompt = PromptFormat(processor, "Be brief.").render("Is it red?", False)
    got, kept, _ = ablation.ablated_tokens(processor, None, None, prompt, "Is it red?", "no-bos")
    assert got == removed
    assert kept[0] != processor.bos_token
