"""MLflow: one run per job, logged from the files the job wrote (so a job whose logging
failed can be logged later by `python -m sysattn_exp.sync`), under one parent run per
sweep. A job already logged (same job key under the same parent) is not logged again."""

import hashlib
import json
import logging
from pathlib import Path

import yaml

from sysattn_exp.cache import digest
from sysattn_exp.files import write_json

log = logging.getLogger(__name__)

JOB_MARKER = "mlflow_run.json"  # in a job folder: the run it was logged as
SWEEP_MARKER = "mlflow_parent.json"  # in a sweep folder: the parent run of its jobs
JOB_FILES = ("predictions.parquet", "config.yaml", "metrics.json")
PROFILE_TABLE, PROFILE_PLOT = "attention_profile.csv", "attention_profile.png"  # profile runs


def absolute_uri(uri: str) -> str:
    """A relative sqlite path is made absolute, so every job and the UI see the same file."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        path = Path(uri[len(prefix) :]).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return prefix + str(path)
    return uri


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
    schema of a new SQLite store and the experiment come into being here). With a tracking
    server (http, https) the server chooses where artifacts go: with
    `mlflow server --artifacts-destination`, runs upload through it (proxied artifacts,
    `mlflow-artifacts:/...`), so the nodes need no shared path; cfg.artifact_location, a
    local folder, applies to local stores only."""
    import mlflow

    mlflow.set_tracking_uri(absolute_uri(cfg.uri))
    experiment = mlflow.get_experiment_by_name(cfg.experiment)
    if experiment is not None:
        return mlflow, experiment.experiment_id
    location = None
    if not str(cfg.uri).startswith(SERVER_SCHEMES):
        location = Path(cfg.artifact_location).resolve().as_uri()
    try:
        return mlflow, mlflow.create_experiment(cfg.experiment, artifact_location=location)
    except Exception:  # noqa: BLE001 - another process created it first
        return mlflow, mlflow.get_experiment_by_name(cfg.experiment).experiment_id


def find_run(mlflow, experiment_id: str, tags: dict) -> str | None:
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = mlflow.search_runs(
        [experiment_id], filter_string=query, output_format="list", max_results=1
    )
    return runs[0].info.run_id if runs else None


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
    write_json(sweep_dir / SWEEP_MARKER, marker | {"uri": absolute_uri(cfg.uri)})
    return run_id


TIMING_METRICS = ("scoring_seconds", "items_per_second", "n_items_from_cache")
# How the scores were computed, not what they are: a rerun served from the cache reports
# the planned kernel path (runner.scoring_checks) and must still find its logged run.
HOW_METRICS = ("kernel_path",)


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
    decoder layer as the step."""
    import pandas as pd

    table = pd.read_csv(table_path)
    for row in table.itertuples(index=False):
        prefix = "attn_share_" if row.queries == "answer" else "attn_share_text_rows_"
        for modality in ("system", "image", "text"):
            mlflow.log_metric(prefix + modality, float(getattr(row, modality)), step=int(row.layer))


def log_job_dir(job_dir: Path, cfg) -> str:
    """Log a finished job folder (config.yaml, metrics.json, predictions.parquet) as one
    run, under its sweep's parent run if it has one; returns the run id."""
    config = yaml.safe_load((job_dir / "config.yaml").read_text())
    metrics = json.loads((job_dir / "metrics.json").read_text())
    parent = job_parent(cfg, job_dir.parent)
    mlflow, experiment_id = connect(cfg)
    tags = {
        "sysattn.job_key": config["job"]["key"],
        "sysattn.results": results_digest(job_dir),
        "sysattn.parent": parent or "none",
    }
    run_id = find_run(mlflow, experiment_id, tags)
    if run_id is None:
        with mlflow.start_run(
            experiment_id=experiment_id,
            run_name=config["job"]["name"],
            parent_run_id=parent,
            tags=tags | {"sysattn.kind": "job", "sysattn.job_dir": str(job_dir.resolve())},
        ) as run:
            # Text metrics (kernel_path) are params: MLflow metrics are numbers.
            texts = {k: v for k, v in metrics.items() if isinstance(v, str)}
            mlflow.log_params(flatten(config) | texts)
            mlflow.log_metrics(
                {k: float(v) for k, v in metrics.items() if v is not None and k not in texts}
            )
            if (job_dir / PROFILE_TABLE).exists():
                log_profile(mlflow, job_dir / PROFILE_TABLE)
            for name in (*JOB_FILES, PROFILE_TABLE, PROFILE_PLOT):
                if (job_dir / name).exists():
                    mlflow.log_artifact(str(job_dir / name))
            run_id = run.info.run_id
        log.info("logged MLflow run %s (%s)", run_id, config["job"]["name"])
    else:
        log.info(
            "already logged as MLflow run %s (same job, same results): not logged again", run_id
        )
    write_json(job_dir / JOB_MARKER, {"run_id": run_id, "uri": absolute_uri(cfg.uri)})
    return run_id
