"""Logging one job to MLflow: params, metrics and the job's files as artifacts."""

import logging
from pathlib import Path

log = logging.getLogger(__name__)


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
            flat[name] = str(value)
    return flat


def experiment_id(mlflow, name: str, artifact_location: str) -> str:
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = Path(artifact_location).resolve().as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


def log_job(cfg, run_name: str, params: dict, metrics: dict, files: list[Path]) -> str:
    """One MLflow run for one job; returns its run id. None-valued metrics are left out."""
    import mlflow

    mlflow.set_tracking_uri(absolute_uri(cfg.uri))
    exp_id = experiment_id(mlflow, cfg.experiment, cfg.artifact_location)
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name) as run:
        mlflow.log_params(flatten(params))
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None})
        for path in files:
            mlflow.log_artifact(str(path))
    log.info("logged MLflow run %s (%s) to %s", run.info.run_id, run_name, cfg.uri)
    return run.info.run_id
