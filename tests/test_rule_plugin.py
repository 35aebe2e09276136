"""A rule added from outside the package, as the README's "How to add a rule" says: its
class, registration and yaml are in this file alone, and it runs through the real command
line (in this process, where the registration is) on the builtin tiny model.

The rule, `mute`: the keys of one modality get no attention, and each row that sees other
keys is renormalised over them (Scale's limit as its factor goes to 0). Muting the system
keys is, key for key, the redistribution system -> image+text with fraction 1 in
proportion (all of the source's mass to every other key, in proportion to its weight),
which the loop reference checks (test_intervention_exact.py): so a mute job's scores must
be that redistribution job's, and its fused and eager applications must agree."""

import json
from dataclasses import dataclass

import pandas as pd
import pytest
import torch
import yaml
from cli import run_main_stderr
from omegaconf import OmegaConf

from sysattn_exp.attention.fused import plain_merge
from sysattn_exp.attention.modality import MODALITIES
from sysattn_exp.attention.rules import (
    Rule,
    checked_impl,
    checked_modality,
    configure,
    register_rule,
)
from sysattn_exp.errors import UsageError
from sysattn_exp.experiment.report import report


@register_rule("mute")
@dataclass(frozen=True)
class Mute(Rule):
    """No attention to the keys of `modality` in the decoder layers `layers`; rows that see
    no other key, and padding rows, are left as they are."""

    modality: str
    layers: frozenset[int]
    impl: str = "fused"

    @classmethod
    def settings(cls, section) -> dict:
        return {"modality": checked_modality(section, "modality"), "impl": checked_impl(section)}

    def describe(self) -> str:
        return f"mute {self.modality}"

    def eager_weights(self, weights, visible, key_modality, query_is_real):
        muted = (key_modality == MODALITIES[self.modality])[:, None, None, :]
        kept = weights.masked_fill(muted, 0.0)
        total = kept.sum(dim=-1, keepdim=True)
        change = (total > 0) & query_is_real[:, None, :, None]
        return torch.where(change, kept / total.clamp_min(1e-30), weights)

    def merge(self, parts, block):
        plain, shares = plain_merge(parts)
        rest = {name: part for name, part in parts.items() if name != self.modality}
        muted, rest_shares = plain_merge(rest)
        sees_rest = torch.stack([lse for _, lse in rest.values()]).logsumexp(0).isfinite()
        change = sees_rest[..., None] & block.query_is_real
        after = {
            name: (o, torch.where(change, rest_shares[name][1] if name in rest else 0.0, a))
            for name, (o, a) in shares.items()
        }
        return torch.where(change, muted, plain), after


MUTE_YAML = {"name": "mute", "modality": "system", "impl": "fused"}
JOB = ("model=tiny", "layers=q4", "benchmark.limit=8")


def run_job(tmp_path, monkeypatch, capsys, *overrides) -> tuple[int, str]:
    """One job through the command line, with the rule's yaml on Hydra's search path."""
    conf = tmp_path / "conf" / "intervention"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "mute.yaml").write_text(yaml.safe_dump(MUTE_YAML, sort_keys=False))
    search = f"hydra.searchpath=[file://{tmp_path / 'conf'}]"
    cache = f"runtime.cache_dir={tmp_path / 'cache'}"
    return run_main_stderr((*JOB, search, cache, *overrides), tmp_path, monkeypatch, capsys)


JOBS = {  # name: overrides, run in this order (the baseline's scores come from the cache)
    "fused": ("intervention=mute",),
    "eager": ("intervention=mute", "intervention.impl=eager"),
    "redistribution": ("intervention=redistribute", "intervention.recipients=[image,text]"),
    "baseline": ("intervention=none",),
}


def test_a_rule_defined_in_a_test_runs_through_the_command_line(tmp_path, monkeypatch, capsys):
    for overrides in JOBS.values():
        code, stderr = run_job(tmp_path, monkeypatch, capsys, *overrides)
        assert code == 0, stderr[-3000:]
    runs = dict(zip(JOBS, sorted((tmp_path / "outputs" / "runs").iterdir()), strict=True))
    configs = {name: yaml.safe_load((r / "config.yaml").read_text()) for name, r in runs.items()}
    assert {name: c["job"]["name"] for name, c in configs.items()} == {
        "fused": "toy mute system layers 6-7",
        "eager": "toy mute system layers 6-7",
        "redistribution": "toy system->image+text layers 6-7",
        "baseline": "toy baseline",
    }
    assert configs["eager"]["intervention"] == MUTE_YAML | {"impl": "eager"}
    columns = ["yes_logit", "no_logit"]
    scores = {
        name: torch.tensor(pd.read_parquet(run / "predictions.parquet")[columns].values)
        for name, run in runs.items()
    }
    # Both applications of the rule give the scores of the redistribution it equals...
    for name in ("fused", "eager"):
        torch.testing.assert_close(scores[name], scores["redistribution"], rtol=0, atol=1e-5)
    # ... which are not the baseline's: the rule ran in layers 6 and 7.
    assert (scores["fused"] - scores["baseline"]).abs().max() > 1e-3
    assert json.loads((runs["fused"] / "metrics.json").read_text())["edited_layers"] == 2
    # The report labels its runs with the label the jobs logged.
    tracking = {"uri": f"sqlite:///{tmp_path}/outputs/mlflow.db", "experiment": "sysattn"}
    out = tmp_path / "report"
    report(OmegaConf.create({"tracking": tracking, "report": {"parent": "all", "out": str(out)}}))
    table = pd.read_csv(out / "comparison.csv")
    assert set(table.intervention) == {"baseline", "mute system", "system->image+text"}


def test_a_key_the_added_rule_lacks_is_one_line(tmp_path, monkeypatch, capsys):
    code, stderr = run_job(
        tmp_path, monkeypatch, capsys, "intervention=mute", "+intervention.modalty=image"
    )
    assert code == 2
    assert stderr.strip().splitlines()[-1] == (
        "error: intervention.modalty is not a key of the mute rule; allowed: name, modality, impl"
    )


@register_rule("eager_only")
@dataclass(frozen=True)
class EagerOnly(Rule):
    """A rule with an eager path only (no merge, no fused)."""

    modality: str
    layers: frozenset[int]
    impl: str = "fused"

    @classmethod
    def settings(cls, section) -> dict:
        return {"modality": checked_modality(section, "modality"), "impl": checked_impl(section)}

    def eager_scores(self, scores, key_modality):
        return scores / 2


def test_a_rule_without_a_fused_path_is_refused_on_it():
    """Rather than leave attention as it was on the default fused path: one line; the
    eager path, which the rule has, is accepted."""
    section = {"name": "eager_only", "modality": "image"}
    with pytest.raises(UsageError, match="eager_only rule has no fused path.*impl=eager"):
        configure(OmegaConf.create(section))
    rule = configure(OmegaConf.create(section | {"impl": "eager"}))
    assert rule(layers=frozenset({1})) == EagerOnly("image", frozenset({1}), "eager")
