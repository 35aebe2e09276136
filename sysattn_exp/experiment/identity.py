"""Job identity: what a job's results depend on, and the names and keys derived from it.

- condition: everything besides an item and its prompt that determines the item's scores
  (model, data revision, environment, planned attention kernels, code, the rule); the
  score cache's condition (cache.ScoreCache) and part of every key below.
- job_key: the condition and the composed config less the keys that never change what a
  job produces (NOT_IN_JOB_KEY); two jobs that can produce different files never share it.
- job_config: config.yaml, which records the job's name and key.
- run_name: the job's MLflow run name ('pope baseline', 'pope system->text layers 24-31',
  'pope profile').
- caption_baseline_key: the key of a caption job's cached baseline captions.

Every value here is part of the results' identity on disk and in MLflow: a change of one
changes every job's key (tests/test_job_keys.py holds the paper grid's keys fixed)."""

from dataclasses import asdict
from importlib.resources import files

import torch
import transformers
from omegaconf import OmegaConf

from sysattn_exp.attention import kernels
from sysattn_exp.attention.rules import Rule, label
from sysattn_exp.evaluation.cache import SCORES_VERSION, digest, scores_code_digest
from sysattn_exp.experiment.environment import device_names, environment, model_devices
from sysattn_exp.models import random_weights
from sysattn_exp.models.ablation import LABELS, NONE
from sysattn_exp.models.ablation import label as ablation_label
from sysattn_exp.models.loading import BUILTIN_TINY, BUILTIN_TOYS, toy_weights
from sysattn_exp.models.toy_model import weights_file_digest


def condition(cfg, loaded, edit: Rule | None, words, ablation: str = NONE) -> dict:
    """Everything that determines an item's scores besides the item and its prompt: the
    model and data, the environment that computes them (torch and transformers versions,
    device names, the planned attention kernels, the batch size: bf16 results depend on
    how a batch is padded and reduced) and the code (cache.py). The same in every process
    of one environment and checkout. `ablation` (prompt.ablation, models.ablation): the
    tokens removed from each prompt, which an item's key (its prompt's text) does not
    show; in the condition only where set, so that other conditions stay as they were."""
    model = cfg.model
    return {
        "model": model.name_or_path,
        "revision": model.revision,
        "seed": model.seed if model.name_or_path == BUILTIN_TINY else None,
        **toy_condition(model.name_or_path),
        **random_weights.cache_condition(model),
        "device": loaded.device.type,
        "device_name": device_names(loaded.model),
        "dtype": str(loaded.dtype),
        "batch_size": model.batch_size,
        "torch": str(torch.__version__),  # a TorchVersion, which YAML cannot write
        "transformers": transformers.__version__,
        "kernel_path": planned_kernel_path(loaded, edit),
        "yes_ids": words[0],
        "no_ids": words[1],
        "scores_version": SCORES_VERSION,
        "scores_code": scores_code_digest(),
        "dataset_revision": cfg.benchmark.get("revision"),
        "intervention": None if edit is None else rule_condition(edit),
        **({} if ablation == NONE else {"prompt_ablation": ablation}),
    } | generation_condition(cfg.scoring)


def toy_condition(name_or_path: str) -> dict:
    """A built-in toy model's weights file digest (toy_model.SHIPPED): retrained, rescored."""
    if name_or_path not in BUILTIN_TOYS:
        return {}
    return {"weights": weights_file_digest(toy_weights(name_or_path))}


def prompt_ablation(cfg) -> str:
    """prompt.ablation (models.ablation.ABLATIONS); none where the config has no prompt
    section (a config composed before it existed)."""
    return OmegaConf.select(cfg, "prompt.ablation", default=NONE)


def rule_condition(edit: Rule) -> dict:
    """The rule's class and fields; the head fields only where heads are selected, so that
    rules on every head keep the condition they had before heads existed."""
    fields = asdict(edit)
    if fields.get("heads") is None:
        fields.pop("heads", None)
        fields.pop("head_selection", None)
    else:
        fields["heads"] = [list(pair) for pair in edit.heads]
    return {"rule": type(edit).__name__, **fields, "layers": sorted(edit.layers)}


def head_dim(text_config) -> int:
    return getattr(text_config, "head_dim", None) or (
        text_config.hidden_size // text_config.num_attention_heads
    )


def planned_kernel_path(loaded, edit: Rule | None, profiled: bool = False) -> str:
    """The attention paths that scoring `edit` is planned to take (kernels.planned_path):
    "sdpa" for the unchanged model, "eager" for the eager implementation, else the fused
    path's kernels for the devices the weights are on (several under a device_map), the
    dtype and the head dim (a profile takes the fused path too)."""
    if edit is None and not profiled:
        return "sdpa"
    if edit is not None and edit.impl == "eager":
        return "eager"
    size = head_dim(loaded.text_config)
    plans = [kernels.planned_path(d, loaded.dtype, size) for d in model_devices(loaded.model)]
    return kernels.path_label({path for plan in plans for path in plan.split("+")})


def generation_condition(scoring) -> dict:
    """The generation settings, in the condition only in generate mode: logit-mode
    conditions (and their cached scores and job keys) stay what they were before it."""
    if scoring.mode == "logit":
        return {}
    return {"scoring_mode": "generate", "max_new_tokens": scoring.max_new_tokens}


# Config keys that never change what a job produces (where results go, how fast they come);
# every other key, present or future (the task, runtime.profile, the prompt...), is in the
# job key, so that two jobs that can produce different files never share one.
# The environment section is recorded, not keyed: what in it changes scores (versions,
# device names) is in the condition, which the key includes.
NOT_IN_JOB_KEY = {
    "tracking": None,
    "environment": None,
    "runtime": {
        "num_workers",
        "cache_dir",
        "report_at_end",
        "progress_seconds",
        "baseline_part_items",
        "lease_seconds",
        "deterministic",
        "published_table",  # the comparison with published figures, not a score
    },
    # The dry run's power line only (evaluation/power.py): no figure of a job changes.
    "stats": {"discordance"},
    # +sweep=layers / windows: only how the sweep chose layers.start/end, which are keyed
    # (a job keeps the key of the same range given by hand).
    "sweep": None,
}


# The stats and prompt sections as config.yaml ships them (evaluation.stats, models.ablation).
SHIPPED = OmegaConf.create(files("sysattn_exp.conf").joinpath("config.yaml").read_text())
DEFAULT_STATS = OmegaConf.to_container(SHIPPED.stats)
DEFAULT_PROMPT = OmegaConf.to_container(SHIPPED.prompt)


def job_key(config: dict, condition: dict) -> str:
    kept = {}
    for section, value in config.items():
        dropped = NOT_IN_JOB_KEY.get(section, set())
        if dropped is None:
            continue
        if section == "scoring" and value.get("mode", "logit") == "logit":
            # The logit mode ignores the generation keys; without them, jobs keep the key
            # they had before generation existed (the condition has them in generate mode).
            dropped = {"mode", "max_new_tokens", "parser"}
        if section == "stats":
            # The statistics change reported figures, not predictions: keyed only where
            # they differ from the shipped defaults, so that jobs keep the key they had
            # before statistics existed (tests/test_job_keys.py); discordance never (it
            # only sets the dry run's power line: NOT_IN_JOB_KEY).
            dropped = dropped | {k for k, v in value.items() if DEFAULT_STATS.get(k) == v}
            if set(value) <= dropped:
                continue
        if section == "prompt":
            # Likewise prompt.ablation=none: the key jobs had before ablations existed.
            dropped = {k for k, v in value.items() if DEFAULT_PROMPT.get(k) == v}
            if set(value) <= dropped:
                continue
        if section == "benchmark" and value.get("split_half") is None:
            # All groups: the key jobs had before the split existed (its fraction and seed
            # choose nothing then).
            dropped = {"split_half", "calibration_fraction", "calibration_seed"}
        if section == "runtime" and not value.get("lens", True):
            dropped = dropped | {"lens"}  # off: the key jobs had before the lens existed
        if section == "runtime" and not value.get("probes", True):
            dropped = dropped | {"probes"}  # likewise for the probes
        if section == "intervention":
            value = keyed_heads(value)
            if value.get("heads", "given") is None:
                dropped = {"heads"}  # every head: the key jobs had before heads existed
        if section == "model" and value.get("weights", "pretrained") == "pretrained":
            # Likewise pretrained weights keep the key jobs had before model.weights existed.
            dropped = {"weights", "config_overrides"}
        kept[section] = {k: v for k, v in value.items() if k not in dropped} if dropped else value
    return digest([condition, kept])


def keyed_heads(section: dict) -> dict:
    """The intervention section with its heads as the job they make: a list of pairs
    sorted and without duplicates (rules.checked_heads), and a selection with top_k null
    (every head, +sweep=heads) as null, the plain rule's."""
    heads = section.get("heads")
    if isinstance(heads, dict) and heads.get("top_k") is None:
        return section | {"heads": None}
    if isinstance(heads, list):
        return section | {"heads": [list(pair) for pair in sorted({tuple(p) for p in heads})]}
    return section


def job_config(cfg, loaded, edit, words, layers, name, benchmark=None) -> dict:
    """The job's config.yaml: the composed config (its benchmark section replaced where
    given), the resolved layers, the job's name, key and rule label (rules.label), and the
    environment it ran in (environment.environment: not in the key)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    if benchmark is not None:
        config["benchmark"] = benchmark
    config["layers"]["resolved"] = layers
    ablation = prompt_ablation(cfg)
    key = job_key(config, condition(cfg, loaded, edit, words, ablation))
    # label: the report's intervention column (the ablation's, then the rule's)
    config["job"] = {"name": name, "key": key, "label": ablation_label(ablation, label(edit))}
    if edit is not None and getattr(edit, "heads", None) is not None:
        config["job"]["heads"] = [list(pair) for pair in edit.heads]  # as selected
    config["layers"]["depth"] = loaded.num_layers  # for the report's model label; not in the key
    config["environment"] = environment(loaded.model)
    return config


def run_name(
    benchmark: str, edit: Rule | None, layers: list[int], task="score", ablation: str = NONE
) -> str:
    """'pope baseline', 'pope system->text layers 24-31'; a job that records readouts
    (labels.job_task: profile, lens, probes) says so after the benchmark: 'pope profile',
    'pope lens system->text layers 24-31', 'pope profile+lens'; a prompt ablation
    (models.ablation.LABELS) before the rule: 'pope no system tokens',
    'pope no BOS + system->text layers 24-31'. A caption job's benchmark (chair) says its task."""
    kind = "" if task in ("score", "caption") else f" {task}"
    if ablation != NONE:
        rule = "" if edit is None else f" + {edit.describe()} layers {layers[0]}-{layers[-1]}"
        return f"{benchmark}{kind} {LABELS[ablation]}{rule}"
    if edit is None:
        return f"{benchmark}{kind}" if kind else f"{benchmark} baseline"
    return f"{benchmark}{kind} {edit.describe()} layers {layers[0]}-{layers[-1]}"


def caption_baseline_key(cfg, loaded, files: list[str], prompts: list[str], new_tokens) -> str:
    """The key of a caption job's baseline captions (the unchanged model's, kept in
    runtime.cache_dir): the baseline's condition (no answer words), the image files, the
    prompts and caption.max_new_tokens."""
    return digest([condition(cfg, loaded, None, ([], [])), files, prompts, new_tokens])
