"""MLflow: one run per job, logged from the files the job wrote (so a job whose logging
failed can be logged later by `python -m sysattn_exp.sync`), under one parent run per
sweep. A job already logged (same job key under the same parent) is not logged again.
Each run carries the tags the MLflow UI groups and searches by (grouping_tags) and its
benchmark as a dataset input (benchmark_dataset); the experiment is marked as model
training (EXPERIMENT_KIND), and runs_table_address opens its runs table."""

import contextlib
import hashlib
import json
import logging
import re
from pathlib import Path

import yaml

from sysattn_exp.evaluation.cache import digest
from sysattn_exp.experiment.benchmark_dataset import CONTEXT, benchmark_dataset
from sysattn_exp.experiment.labels import aligned_layers, intervention_label, job_task, layers_label
from sysattn_exp.files import write_json

log = logging.getLogger(__name__)

JOB_MARKER = "mlflow_run.json"  # in a job folder: the run it was logged as
SWEEP_MARKER = "mlflow_parent.json"  # in a sweep folder: the parent run of its jobs
JOB_FILES = ("predictions.parquet", "config.yaml", "metrics.json")
PROFILE_TABLE, PROFILE_PLOT = "attention_profile.csv", "attention_profile.png"  # profile runs
# ... and per (layer, head): the sink atlas
PROFILE_HEADS_TABLE = "attention_profile_heads.csv"
PROFILE_HEADS_PLOT = "attention_profile_heads.png"
PROFILE_FILES = (PROFILE_TABLE, PROFILE_PLOT, PROFILE_HEADS_TABLE, PROFILE_HEADS_PLOT)
LENS_TABLE, LENS_PLOT = "lens.parquet", "lens.png"  # runtime.lens (+task=lens)
LENS_FLIPS_PLOT = "lens_flips.png"  # ... with an intervention: split by fixed/broken items
LENS_FILES = (LENS_TABLE, LENS_PLOT, LENS_FLIPS_PLOT)
# runtime.probes (+task=probes): linear probes and minimal-pair separation per layer
PROBES_TABLE, PROBES_PLOT = "probes.csv", "probes.png"
SEPARATION_TABLE, SEPARATION_PLOT = "separation.csv", "separation.png"
SEPARATION_FLIPS_TABLE, SEPARATION_FLIPS_PLOT = "separation_flips.csv", "separation_flips.png"
PROBES_FILES = (
    PROBES_TABLE,
    PROBES_PLOT,
    SEPARATION_TABLE,
    SEPARATION_PLOT,
    SEPARATION_FLIPS_TABLE,
    SEPARATION_FLIPS_PLOT,
)
FLIPS_FILE = "flips.parquet"  # an intervention job's items whose answer changed
DRY_RUN_FILE = "dry_run.json"  # a dry-run job's summary: its config was checked


def absolute_uri(uri: str) -> str:
    """A relative sqlite path is made absolute, so every job and the UI see the same file."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        path = Path(uri[len(prefix) :]).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return prefix + str(path)
    return uri


# How long a process waits for another one to finish with a SQLite store before giving up.
STORE_LOCK_SECONDS = 600
_LOCKS: dict = {}  # one lock object per store file: nested uses in a process are re-entrant


def sqlite_file(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (None for other stores and in-memory ones)."""
    prefix = "sqlite:///"
    path = uri[len(prefix) :].split("?")[0] if uri.startswith(prefix) else ""
    return Path(path) if path and path != ":memory:" else None


def store_lock(uri: str):
    """An exclusive lock on a SQLite store, held by one process at a time: a file lock
    beside the database file (<file>.lock). MLflow creates and migrates a new store's
    schema on first use, and concurrent first uses race (alembic errors, "database is
    locked"); writes from several processes can also find the database locked. Every
    access of this tool to a SQLite store (connect, creating an experiment or a sweep's
    parent run, logging a job) holds it. Other stores (an MLflow server) need none."""
    from filelock import FileLock

    path = sqlite_file(absolute_uri(uri))
    if path is None:
        return contextlib.nullcontext()
    lock_path = str(path) + ".lock"
    if lock_path not in _LOCKS:
        _LOCKS[lock_path] = FileLock(lock_path, timeout=STORE_LOCK_SECONDS)
    return _LOCKS[lock_path]


# MLflow's metric and parameter names: letters, digits and _ - . / and space (and ':',
# but not on Windows); a name that would resolve to another path (a//b, ./a, a/..) is
# refused too.
STORABLE = re.compile(r"[^A-Za-z0-9_\-. /]")


def storable_name(name: str) -> str:
    """The name under which a metric (or parameter) is logged to MLflow: every character
    outside [A-Za-z0-9_-. /] becomes '_' ('mme/code (v2)/acc' -> 'mme/code _v2_/acc'), and
    every empty, '.' or '..' part between slashes becomes '_'. Names that MLflow accepts
    are unchanged. The report looks metrics up through the same mapping."""
    parts = STORABLE.sub("_", name).split("/")
    return "/".join("_" if part in ("", ".", "..") else part for part in parts)


def storable_names(names, what: str) -> dict[str, str]:
    """{name: storable name}; refuses (ValueError, one line) two names that map to one."""
    mapped: dict[str, str] = {}
    seen: dict[str, str] = {}
    for name in names:
        new = storable_name(name)
        if new in seen and seen[new] != name:
            raise ValueError(
                f"{what} {seen[new]!r} and {name!r} would both be logged to MLflow as "
                f"{new!r}; rename one (characters outside [A-Za-z0-9_-. /] become '_')"
            )
        seen[new], mapped[name] = name, new
    return mapped


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    return flat


SERVER_SCHEMES = ("http://", "https://")


def connect(cfg):
    """mlflow pointed at cfg.uri, and the experiment's id (created on first use: the
    schema of a new SQLite store and the experiment come into being here, one process at
    a time: store_lock). With a tracking server (http, https) the server chooses where
    artifacts go: with `mlflow server --artifacts-destination`, runs upload through it
    (proxied artifacts, `mlflow-artifacts:/...`), so the nodes need no shared path;
    cfg.artifact_location, a local folder, applies to local stores only."""
    with store_lock(cfg.uri):
        return _connect(cfg)


# MLflow 3's UI shows an experiment as GenAI (traces) or model training (the runs table)
# by this experiment tag, which its own "experiment type" selector writes (mlflow 3.17's UI:
# setExperimentTag "mlflow.experimentKind"; values in its ExperimentKind enum). MLflow
# 3.17's UI reads the URL's ?workflowType=machine_learning first (README, MLflow UI).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def _connect(cfg):
    import mlflow

    mlflow.set_tracking_uri(absolute_uri(cfg.uri))
    experiment = mlflow.get_experiment_by_name(cfg.experiment)
    if experiment is not None:
        mark_model_training(mlflow, experiment)
        return mlflow, experiment.experiment_id
    location = None
    if not str(cfg.uri).startswith(SERVER_SCHEMES):
        location = Path(cfg.artifact_location).resolve().as_uri()
    try:
        return mlflow, mlflow.create_experiment(
            cfg.experiment, artifact_location=location, tags=dict([EXPERIMENT_KIND])
        )
    except Exception:  # noqa: BLE001 - another process created it first
        return mlflow, mlflow.get_experiment_by_name(cfg.experiment).experiment_id


def mark_model_training(mlflow, experiment) -> None:
    """An experiment made before EXPERIMENT_KIND was set gets it; a kind someone chose in
    the UI is left as it is."""
    key, value = EXPERIMENT_KIND
    if key not in experiment.tags:
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, key, value)


def runs_table_address(experiment_id: str, ui: str = "http://127.0.0.1:5000") -> str:
    """The MLflow UI's runs table of an experiment, opened as model training (MLflow 3.17's
    UI reads ?workflowType before EXPERIMENT_KIND: README, MLflow UI)."""
    return f"{ui}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def tags_query(tags: dict) -> str:
    return " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())


# A run is complete once MLflow ended it FINISHED, which it does last, when the logging
# block ended without an error. A run whose logging failed part-way (FAILED) or was killed
# (left RUNNING) never counts as logged.
COMPLETE = "attributes.status = 'FINISHED'"


def find_run(mlflow, experiment_id: str, tags: dict) -> str | None:
    """The complete run with these tags, if any."""
    runs = mlflow.search_runs(
        [experiment_id],
        filter_string=f"{tags_query(tags)} and {COMPLETE}",
        output_format="list",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def delete_incomplete(mlflow, experiment_id: str, tags: dict, uri: str) -> int:
    """Delete the runs with these tags whose logging did not finish (FAILED or KILLED; and
    RUNNING in a SQLite store, where the store lock shows that no process is logging one
    now), so that the store holds each job once, complete. Returns how many."""
    runs = mlflow.search_runs(
        [experiment_id],
        filter_string=f"{tags_query(tags)} and attributes.status != 'FINISHED'",
        output_format="list",
    )
    stale = [
        run
        for run in runs
        if run.info.status != "RUNNING" or sqlite_file(absolute_uri(uri)) is not None
    ]
    for run in stale:
        mlflow.MlflowClient().delete_run(run.info.run_id)
        log.info("deleted MLflow run %s: its logging had not finished", run.info.run_id)
    return len(stale)


def sweep_key(sweep_config) -> tuple[str, str]:
    """A sweep's identity (its command-line overrides, swept parameters and experiment) and
    a description, from the composed config of the multirun (or its multirun.yaml), so that
    running the same sweep again finds the same parent run."""
    from omegaconf import OmegaConf

    overrides = sorted(sweep_config.hydra.overrides.task)
    params = sweep_config.hydra.sweeper.get("params")
    params = OmegaConf.to_container(params, resolve=True) if params is not None else {}
    return digest([overrides, params, sweep_config.tracking.experiment]), " ".join(overrides)


def sweep_parent(cfg, sweep_dir: Path, sweep_key: str, description: str) -> str:
    """The parent run of a sweep: found by its key (a re-run of the same sweep reuses it)
    or created, and recorded in the sweep folder for its jobs."""
    with store_lock(cfg.uri):
        return _sweep_parent(cfg, sweep_dir, sweep_key, description)


def _sweep_parent(cfg, sweep_dir: Path, sweep_key: str, description: str) -> str:
    mlflow, experiment_id = connect(cfg)
    run_id = find_run(mlflow, experiment_id, {"sysattn.sweep_key": sweep_key})
    if run_id is None:
        with mlflow.start_run(
            experiment_id=experiment_id,
            run_name=f"sweep {description}"[:250],
            tags={"sysattn.sweep_key": sweep_key, "sysattn.kind": "sweep"},
        ) as run:
            mlflow.log_param("sweep", description[:6000])
            run_id = run.info.run_id
    marker = {"run_id": run_id, "sweep_key": sweep_key, "description": description}
    where = {"uri": absolute_uri(cfg.uri), "experiment_id": experiment_id}
    write_json(sweep_dir / SWEEP_MARKER, marker | where)
    return run_id


TIMING_METRICS = ("scoring_seconds", "items_per_second", "n_items_from_cache")
# How the scores were computed, not what they are: a rerun served from the cache reports
# the planned kernel path (job.scoring_checks) and must still find its logged run.
HOW_METRICS = ("kernel_path",)
# A baseline job's text metrics that are MLflow tags too (experiment/parity.py: the parity
# tag and its label), so that runs can be searched by them (tags.parity = 'differs').
PARITY_TEXTS = ("parity", "parity_note")


def parity_tags(texts: dict) -> dict:
    """The MLflow tags of a job from its text metrics: PARITY_TEXTS where the job has them
    (a baseline yes/no job)."""
    return {key: texts[key] for key in PARITY_TEXTS if key in texts}


def results_digest(job_dir: Path) -> str:
    """A hash of what the job produced (its scores, metrics but timing, and attention
    profile): a job whose files differ from a logged run's is logged anew, never skipped."""
    import pandas as pd

    metrics = json.loads((job_dir / "metrics.json").read_text())
    predictions = pd.read_parquet(job_dir / "predictions.parquet")
    lists = [c for c in predictions if str(predictions[c].dtype) == "object"]  # not str
    for column in lists:  # list cells (a caption's objects) hashed as text
        predictions[column] = predictions[column].map(
            lambda cell: repr(cell.tolist()) if hasattr(cell, "tolist") else cell
        )
    rows = pd.util.hash_pandas_object(predictions, index=False).values
    profile = job_dir / PROFILE_TABLE
    return digest(
        [
            {k: v for k, v in metrics.items() if k not in TIMING_METRICS + HOW_METRICS},
            hashlib.sha256(rows.tobytes()).hexdigest(),
            hashlib.sha256(profile.read_bytes()).hexdigest() if profile.exists() else None,
        ]
    )


def job_parent(cfg, sweep_dir: Path) -> str | None:
    """The parent run, in the store cfg names, of a job in sweep_dir (None outside a sweep
    that has a parent). A run id means nothing in another store: when the marker was written
    for another one (the folder is synced elsewhere), the parent is found there by its sweep
    key, or created."""
    marker = sweep_dir / SWEEP_MARKER
    if not marker.exists():
        return None
    record = json.loads(marker.read_text())
    if record.get("uri") == absolute_uri(cfg.uri):
        return record["run_id"]
    key = record["sweep_key"]
    return sweep_parent(cfg, sweep_dir, key, record.get("description", key))


def log_profile(mlflow, table_path: Path) -> None:
    """attn_share_<modality> (answer position) and attn_share_text_rows_<modality>, with the
    decoder layer as the step; likewise attn_share_bos (the first position alone) where the
    table has it."""
    import pandas as pd

    table = pd.read_csv(table_path)
    for row in table.itertuples(index=False):
        prefix = "attn_share_" if row.queries == "answer" else "attn_share_text_rows_"
        for modality in ("system", "image", "text", "bos"):
            if modality not in table.columns:  # a table written before the bos column
                continue
            mlflow.log_metric(prefix + modality, float(getattr(row, modality)), step=int(row.layer))


def grouping_tags(config: dict) -> dict[str, str]:
    """The tags a job's run is grouped and searched by in the MLflow UI, from its
    config.yaml: benchmark (benchmark.name), model (model.name_or_path), condition (the
    report's intervention column: labels.intervention_label, e.g. 'system->text',
    'baseline', 'no system tokens'), layers (the report's layer range by quarter alone:
    'q4', 'all', '24-31'; '-' without a rule) and task (labels.job_task: score, profile,
    lens, probes, caption)."""
    params = {f"params.{key}": value for key, value in flatten(config).items()}
    run = params | {"tags.mlflow.runName": config["job"]["name"]}
    return {
        "benchmark": config["benchmark"]["name"],
        "model": config["model"]["name_or_path"],
        "condition": intervention_label(run),
        "layers": aligned_layers(layers_label(run)),
        "task": job_task(config),
    }


def log_job_dir(job_dir: Path, cfg) -> str:
    """Log a finished job folder (config.yaml, metrics.json, predictions.parquet) as one
    run, under its sweep's parent run if it has one; returns the run id."""
    return log_job(job_dir, cfg)[0]


def log_job(job_dir: Path, cfg) -> tuple[str, bool]:
    """log_job_dir, and whether the job was logged now (False: a complete run of the same
    job and results was already in the store). The run carries grouping_tags and the
    benchmark as its dataset input (benchmark_dataset). Metric and parameter names go through
    storable_name; two names that would collide are refused (ValueError) before any run
    is created. A run whose logging fails is deleted, so that none is left half-logged."""
    with store_lock(cfg.uri):
        return _log_job(job_dir, cfg)


def _log_job(job_dir: Path, cfg) -> tuple[str, bool]:
    config = yaml.safe_load((job_dir / "config.yaml").read_text())
    metrics = json.loads((job_dir / "metrics.json").read_text())
    # Text metrics (kernel_path) are params: MLflow metrics are numbers.
    texts = {k: v for k, v in metrics.items() if isinstance(v, str)}
    metrics = {k: float(v) for k, v in metrics.items() if v is not None and k not in texts}
    params = flatten(config) | texts
    metric_names = storable_names(metrics, "metrics")
    param_names = storable_names(params, "config keys")
    parent = job_parent(cfg, job_dir.parent)
    mlflow, experiment_id = connect(cfg)
    tags = {
        "sysattn.job_key": config["job"]["key"],
        "sysattn.results": results_digest(job_dir),
        "sysattn.parent": parent or "none",
    }
    run_id = find_run(mlflow, experiment_id, tags)
    new = run_id is None
    if new:
        delete_incomplete(mlflow, experiment_id, tags, cfg.uri)
        try:
            with mlflow.start_run(
                experiment_id=experiment_id,
                run_name=config["job"]["name"],
                parent_run_id=parent,
                tags=tags
                | grouping_tags(config)
                | {"sysattn.kind": "job", "sysattn.job_dir": str(job_dir.resolve())},
            ) as run:
                run_id = run.info.run_id
                mlflow.log_input(benchmark_dataset(job_dir, config), context=CONTEXT)
                mlflow.log_params({param_names[k]: v for k, v in params.items()})
                mlflow.log_metrics({metric_names[k]: v for k, v in metrics.items()})
                mlflow.set_tags(parity_tags(texts))
                if (job_dir / PROFILE_TABLE).exists():
                    log_profile(mlflow, job_dir / PROFILE_TABLE)
                for name in (*JOB_FILES, *PROFILE_FILES, FLIPS_FILE, *LENS_FILES, *PROBES_FILES):
                    if (job_dir / name).exists():
                        mlflow.log_artifact(str(job_dir / name))
        except Exception:
            if run_id is not None:  # ended FAILED by MLflow: not left half-logged
                with contextlib.suppress(Exception):
                    mlflow.MlflowClient().delete_run(run_id)
            raise
        log.info("logged MLflow run %s (%s)", run_id, config["job"]["name"])
    else:
        log.info(
            "already logged as MLflow run %s (same job, same results): not logged again", run_id
        )
    where = {"uri": absolute_uri(cfg.uri), "experiment_id": experiment_id}
    write_json(job_dir / JOB_MARKER, {"run_id": run_id} | where)
    return run_id, new
