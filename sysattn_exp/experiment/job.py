"""The skeleton every job runs, whatever it evaluates (run_job):

0. (before: the entry point checks the composed config against its schema, schema.py,
   before torch loads);
1. check: the intervention rule checks its section, the job kind loads its data (the
   benchmark, the COCO images) and checks what the schema cannot (relations between
   keys), all before the (slow) model load; a dry
   run stops here, after checking the layers against the model's depth from its config;
2. load the model once, resolve the layers and build the rule's edit;
3. evaluate: the only step a job kind implements (Job.evaluate), watched for the attention
   paths taken and the layers edited (the kernel_path and edited_layers metrics);
4. write the job's files: the kind's extra files (a profile's table and heatmap),
   predictions.parquet, config.yaml, then metrics.json last: its presence marks a complete
   job (each file written atomically);
5. log the job's folder to MLflow, or, when tracking fails, warn how to log it later
   (the results are safe on disk either way).

A new job kind is a subclass of Job implementing load, dry_run and evaluate (and check,
if it reads keys of its own); runner.job_kind picks it from the config."""

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from sysattn_exp.attention import kernels
from sysattn_exp.attention.intervention import EditTally, watch_edits
from sysattn_exp.attention.rules import Rule
from sysattn_exp.errors import first_line
from sysattn_exp.evaluation.power import mcnemar_detectable_change, power_line
from sysattn_exp.experiment.cluster import available_cpus
from sysattn_exp.experiment.conditions import build_edit, intervention_rule, resolve_layers
from sysattn_exp.experiment.identity import (
    job_config,
    planned_kernel_path,
    prompt_ablation,
    run_name,
)
from sysattn_exp.experiment.labels import job_task
from sysattn_exp.experiment.tracking import DRY_RUN_FILE, log_job_dir
from sysattn_exp.files import write_atomically, write_json
from sysattn_exp.models.loading import LoadedModel, load_config, load_model

log = logging.getLogger(__name__)


class Watch:
    """The attention paths (kernels.record_paths) and the edited decoder layers
    (intervention.watch_edits) of the forward passes run inside `with watch.passes():`.
    The skeleton watches the whole evaluation; a kind narrows it to the passes its
    metrics describe by a nested block (the innermost block entered last is reported)."""

    def __init__(self):
        self.paths: set[str] = set()
        self.tally = EditTally()

    @contextmanager
    def passes(self):
        with watch_edits() as self.tally, kernels.record_paths() as self.paths:
            yield self


@dataclass
class Evaluation:
    """What a job kind's evaluation gives the skeleton to write and log."""

    predictions: pd.DataFrame  # predictions.parquet: one row per item (or image)
    metrics: dict  # the job's own metrics
    computed: int  # items computed now, not taken from a cache (0: all cached)
    # Metrics listed after the run's checks (kernel_path, edited_layers): the comparison
    # with the baseline.
    comparison: dict = field(default_factory=dict)
    # The answer token ids (yes, no) in the job's condition (identity.condition).
    words: tuple[list[int], list[int]] = ([], [])
    # Extra files, each written by write(out_dir) before metrics.json.
    artifacts: list[Callable[[Path], None]] = field(default_factory=list)


class Job(ABC):
    """One kind of job: its data, its checks and its evaluation; run_job does the rest.
    Subclasses set `logged` and implement load, dry_run and evaluate; check is optional."""

    # The job's benchmark as its run name and the report know it (set by load, or fixed).
    benchmark_name: str = ""
    # config.yaml's benchmark section in place of the composed one (None: kept as composed).
    config_benchmark: dict | None = None
    logged: tuple[str, ...] = ()  # the metrics in the job's last log line
    # The job's folder (set by run_job before evaluate: where temporary files may go).
    out_dir: Path | None = None

    def __init__(self, cfg):
        self.cfg = cfg

    @property
    def profiled(self) -> bool:
        """Whether the job records an attention profile (+task=profile: its run name says so)."""
        return False

    @abstractmethod
    def load(self) -> None:
        """Load and check the job's data (UsageError), before the model loads."""

    def check(self) -> None:
        """Check the config keys the evaluation reads (UsageError), before the model loads;
        none by default."""
        return

    @abstractmethod
    def dry_run(self, config) -> tuple[dict, str]:
        """What a dry run checks and prints beyond the skeleton's line, given the model's
        config (no weights): the summary for DRY_RUN_FILE and the counts for the line."""

    @abstractmethod
    def evaluate(self, loaded: LoadedModel, edit: Rule | None, name: str, watch: Watch):
        """Evaluate the condition `edit` (None: the baseline) of the job named `name`;
        returns an Evaluation."""


def run_job(job: Job, out_dir: Path) -> dict:
    """Check, load, evaluate, write and log one job (see the module's docstring); returns
    its metrics (a dry run: its summary)."""
    cfg = job.cfg
    rule = intervention_rule(cfg.intervention)  # checked before the data and model load
    job.load()  # bad data fails before the model loads
    job.check()
    if cfg.runtime.dry_run:
        config = load_config(cfg.model)
        summary, counts = job.dry_run(config)
        return dry_run_job(cfg, config, job, rule, out_dir, summary, counts)
    loaded = load_model(cfg.model)
    layers = job_layers(rule, cfg.layers, loaded.num_layers)
    edit = build_edit(rule, layers, loaded.text_config.num_attention_heads)
    name = run_name(job.benchmark_name, edit, layers, job_task(cfg), prompt_ablation(cfg))
    watch = Watch()
    job.out_dir = out_dir
    with watch.passes():
        evaluation = job.evaluate(loaded, edit, name, watch)
    checks = scoring_checks(
        loaded, edit, job.profiled, watch.tally, watch.paths, evaluation.computed
    )
    metrics = evaluation.metrics | checks | evaluation.comparison
    config = job_config(cfg, loaded, edit, evaluation.words, layers, name, job.config_benchmark)
    for write in evaluation.artifacts:  # before metrics.json, which marks the job complete
        write(out_dir)
    write_results(out_dir, evaluation.predictions, metrics, config)
    log.info("%s: %s", name, " ".join(f"{key}={metrics[key]:.4f}" for key in job.logged))
    log_or_warn(out_dir, cfg.tracking)
    return metrics


def job_layers(rule: Callable[..., Rule] | None, layers_cfg, depth: int) -> list[int]:
    """The decoder layers the rule edits, resolved against the model's depth (UsageError);
    none for a baseline (checked_none)."""
    return resolve_layers(layers_cfg, depth) if rule else checked_none(layers_cfg, depth)


def checked_none(layers_cfg, depth: int) -> list[int]:
    """A baseline edits no layer, but a layer range outside the model is still refused:
    the same config with an intervention would fail."""
    resolve_layers(layers_cfg, depth)
    return []


def dry_run_job(cfg, config, job: Job, rule, out_dir: Path, summary: dict, counts: str):
    """The layers checked against the model's depth from its config (UsageError), one line
    'dry run[ jobN]: <job name> on <model> (<depth> layers): <counts>: config ok', and the
    summary in DRY_RUN_FILE, which tells the sweep's end that this job's config is valid.
    Logs nothing."""
    depth = config.get_text_config().num_hidden_layers
    layers = job_layers(rule, cfg.layers, depth)
    edit = build_edit(rule, layers, config.get_text_config().num_attention_heads)
    name = run_name(job.benchmark_name, edit, layers, job_task(cfg), prompt_ablation(cfg))
    number = sweep_job()
    where = "" if number is None else f" job{number}"
    print(
        f"dry run{where}: {name} on {cfg.model.name_or_path} ({depth} layers): {counts}: config ok"
    )
    if "n_groups" in summary:  # a paired benchmark: what a McNemar test on it can show
        summary = summary | dry_run_power(summary["n_groups"], cfg.stats.discordance)
    heads = getattr(edit, "heads", None)
    heads = {} if heads is None else {"heads": [list(pair) for pair in heads]}
    write_json(out_dir / DRY_RUN_FILE, summary | {"name": name, "layers": layers} | heads)
    return summary


def dry_run_power(n_groups: int, discordance: float) -> dict:
    """Print 'power: <n> groups; at <discordance> ... detects a change of >= X points with
    80% power' (power.power_line, alpha 0.05) and return the detectable change in points
    (None: none up to the discordance) for DRY_RUN_FILE."""
    print(f"power: {power_line(n_groups, discordance)}")
    return {"detectable_change_points": mcnemar_detectable_change(n_groups, discordance)}


def sweep_job() -> int | None:
    """The number of this job in its sweep (None outside a sweep)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return HydraConfig.get().job.num


def scoring_checks(loaded, edit, profiled: bool, tally: EditTally, paths: set, computed: int):
    """kernel_path: the attention paths that computed the items scored (kernels.path_label;
    for cached items, those their cache lines record: a rerun reports what its first run
    did), or the planned ones where nothing was recorded; a path outside the plan (a kernel
    rejected at first use) is warned about.
    edited_layers: the decoder layers each checked forward pass applied the edit in
    (intervention.guard_edits stops a job where that is not the resolved layers); for
    cached scores, the resolved count (they were saved only after their passes' check);
    0 without an edit."""
    planned = planned_kernel_path(loaded, edit, profiled)
    used = kernels.path_label(paths) if computed or paths else planned
    # The rows and bias paths are chosen by shape (fused.choose_path), not planned: they
    # use no kernel of their own (public SDPA and matmuls).
    unplanned = set(paths) - set(planned.split("+")) - {"eager", "rows", "bias"}
    if unplanned:
        log.warning(
            "attention computed by %s, not the planned %s (the score cache's condition): "
            "a kernel was rejected, see above",
            used,
            planned,
        )
    if edit is None:
        edited = 0
    elif tally.passes:
        edited = tally.edited_layers
        log.info(
            "the intervention was applied in %d decoder layers in each of %d forward passes",
            edited,
            tally.passes,
        )
    else:
        edited = len(edit.layers)
    return {"kernel_path": used, "edited_layers": edited}


def num_workers(cfg) -> int:
    """Image-decoding worker processes: runtime.num_workers, or by default up to 4 while
    leaving a core to the model, out of the CPUs of the job's allocation (SLURM's
    cpus_per_task, else the process's CPU affinity: cluster.available_cpus)."""
    if cfg.runtime.num_workers != "auto":
        return int(cfg.runtime.num_workers)
    return max(0, min(4, available_cpus() - 1))


def write_results(
    out_dir: Path, predictions: pd.DataFrame, metrics: dict, config: dict
) -> list[Path]:
    """predictions.parquet, config.yaml, then metrics.json last: its presence marks a
    complete job."""
    files = [out_dir / "predictions.parquet", out_dir / "config.yaml", out_dir / "metrics.json"]
    write_atomically(files[0], lambda p: predictions.to_parquet(p, index=False))
    write_atomically(files[1], lambda p: p.write_text(OmegaConf.to_yaml(config)))
    write_json(files[2], metrics)
    return files


def log_or_warn(out_dir: Path, tracking) -> None:
    """Log the job's folder to MLflow (tracking.log_job_dir); if that fails, one warning
    with the reason and the sync command that logs it later."""
    try:
        log_job_dir(out_dir, tracking)
    except Exception as error:  # noqa: BLE001 - the results are safe on disk either way
        log.warning(
            "could not log to MLflow (%s); the results are in %s: log them later with "
            "python -m sysattn_exp.sync %s",
            first_line(error),
            out_dir,
            out_dir.parent if is_sweep_job(out_dir) else out_dir,
        )


def is_sweep_job(job_dir: Path) -> bool:
    return (job_dir.parent / "multirun.yaml").exists()
