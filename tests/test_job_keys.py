"""Job keys of the paper grid stay what they were (issue 17: a redesign changes no key).

A job key digests the job's condition and its composed config (identity.job_key). What a
refactor may legitimately change (the scoring code's digest, the torch and transformers
versions, the device's name) is held fixed here, so that the keys recorded in
data/paper_job_keys.json check the rest: the config's sections and keys as composed, the
rule's name and fields in the condition, the resolved layers. Recorded before the
redesign with this same computation; regenerate only for a deliberate change of keys
(SYSATTN_RECORD_KEYS=1), and say so in the commit."""

import json
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import sysattn_exp
from sysattn_exp.experiment import identity
from sysattn_exp.experiment.conditions import build_edit, intervention_rule, resolve_layers
from sysattn_exp.experiment.job import checked_none
from sysattn_exp.models.loading import load_model

KEYS_FILE = Path(__file__).parent / "data" / "paper_job_keys.json"
# The paper grid's conditions: the prompt ablations (no-*.yaml) are not in it (paper.yaml).
CONDITIONS = sorted(
    p.stem
    for p in (Path(sysattn_exp.__file__).parent / "conf" / "condition").glob("*.yaml")
    if not p.stem.startswith("no-")
)
BENCHMARKS = ["mme", "hallusionbench", "naturalbench", "winoground", "sugarcrepe", "beaf"]
# Beyond the grid: the other settings a researcher keys jobs by.
EXTRA = {
    "generate": ["+condition=baseline", "scoring.mode=generate"],
    "generate-q4": ["+condition=system-text_q4", "scoring.mode=generate", "scoring.parser=mme"],
    "profile": ["+condition=baseline", "+task=profile"],
    "dose": ["+condition=system-text_q4", "intervention.fraction=0.5"],
    "uniform": ["+condition=system-image_all", "intervention.mode=uniform"],
    "pai-guided": ["+condition=pai", "intervention.cfg_gamma=1.1", "layers.start=1"],
    "scale-eager": ["+condition=image-x2_all", "intervention.impl=eager"],
    "range": ["intervention=redistribute", "layers.start=1", "layers.end=3"],
    "random-weights": ["+condition=baseline", "model=llava15_7b", "model.weights=random"],
}
WORDS = ([3, 4], [5, 6])  # the condition's answer ids: fixed, as the tokenizer is not the point


def compose_job(condition: str, benchmark: str, extra=None):
    overrides = [f"+condition={condition}"] if extra is None else extra
    with initialize_config_module("sysattn_exp.conf", version_base="1.3"):
        return compose(
            config_name="config", overrides=["model=tiny", f"benchmark={benchmark}", *overrides]
        )


def key_of(cfg, loaded, benchmark: str) -> dict:
    rule = intervention_rule(cfg.intervention)
    if rule:
        layers = resolve_layers(cfg.layers, loaded.num_layers)
    else:
        layers = checked_none(cfg.layers, loaded.num_layers)
    edit = build_edit(rule, layers)
    job_name = identity.run_name(benchmark, edit, layers)
    config = identity.job_config(cfg, loaded, edit, WORDS, layers, job_name)
    return {"name": job_name, "key": config["job"]["key"]}


# What a refactor may change, held fixed: the scoring code's digest and the environment
# (versions, device, and the attention kernels, which depend on the CPU's instructions).
FIXED = {"scores_code": "code", "torch": "torch", "transformers": "transformers"}
FIXED |= {"device_name": ["cpu"], "kernel_path": "kernels"}


def paper_keys(monkeypatch) -> dict:
    real = identity.condition
    monkeypatch.setattr(identity, "condition", lambda *args: real(*args) | FIXED)
    loaded = load_model(compose_job("baseline", "mme").model)
    keys = {}
    for benchmark in BENCHMARKS:
        for name in CONDITIONS:
            keys[f"{benchmark}/{name}"] = key_of(compose_job(name, benchmark), loaded, benchmark)
    for name, overrides in EXTRA.items():
        cfg = compose_job("", "pope", overrides)
        # The random-weights preset keys by its own model section; scored on the tiny model.
        keys[f"pope/{name}"] = key_of(cfg, loaded, "pope")
    return keys


def test_paper_grid_job_keys_do_not_change(monkeypatch):
    keys = paper_keys(monkeypatch)
    assert len(keys) == len(BENCHMARKS) * 28 + len(EXTRA)
    if os.environ.get("SYSATTN_RECORD_KEYS"):
        KEYS_FILE.write_text(json.dumps(keys, indent=1, sort_keys=True) + "\n")
    recorded = json.loads(KEYS_FILE.read_text())
    assert keys == recorded


@pytest.mark.parametrize("field", ["scores_code", "torch", "kernel_path"])
def test_the_key_holds_the_environment_and_code(monkeypatch, field):
    """The fixed values above are really in the key: changing one changes it."""
    cfg = compose_job("system-text_q4", "mme")
    loaded = load_model(cfg.model)
    layers = resolve_layers(cfg.layers, loaded.num_layers)
    edit = build_edit(intervention_rule(cfg.intervention), layers)
    condition = identity.condition(cfg, loaded, edit, WORDS)
    config = identity.job_config(cfg, loaded, edit, WORDS, layers, "x")
    # The key is computed before job_config adds "job", "environment" and layers.depth.
    before = {k: v for k, v in config.items() if k not in ("job", "environment")}
    before["layers"] = {k: v for k, v in before["layers"].items() if k != "depth"}
    assert identity.job_key(before, condition) == config["job"]["key"]
    assert identity.job_key(before, condition | {field: "other"}) != config["job"]["key"]


def test_stats_settings_are_keyed_only_away_from_their_defaults():
    """The statistics change reported figures, so a job with other stats settings is
    another job; with the shipped ones, the key is the one jobs had before statistics."""
    cfg = compose_job("system-text_q4", "mme")
    config = {k: v for k, v in OmegaConf.to_container(cfg).items() if k != "stats"}
    shipped = OmegaConf.to_container(cfg)["stats"]
    assert identity.job_key(config | {"stats": shipped}, {}) == identity.job_key(config, {})
    for key, value in [("seed", 1), ("bootstrap_samples", 500)]:
        other = config | {"stats": shipped | {key: value}}
        assert identity.job_key(other, {}) != identity.job_key(config, {})
