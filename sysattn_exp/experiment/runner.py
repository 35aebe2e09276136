"""One job from a composed config: picks the job's kind and runs it through the job
skeleton (job.run_job: check, load, evaluate, write, log to MLflow)."""

import os
from pathlib import Path

import torch

from sysattn_exp.experiment.cluster import log_when_stopped
from sysattn_exp.experiment.job import Job, run_job
from sysattn_exp.experiment.job_caption import CaptionJob
from sysattn_exp.experiment.job_yes_no import YesNoJob


def job_kind(cfg) -> type[Job]:
    """The kind of job the config asks for: captions scored with CHAIR where it has a
    caption section (+task=caption), else yes/no scoring of a benchmark."""
    return CaptionJob if cfg.get("caption") is not None else YesNoJob


def run(cfg, out_dir: Path) -> dict:
    """Evaluate the configured condition; returns the job's metrics. A stop signal (SLURM's
    SIGTERM, submitit's preemption signal) is logged with how the job resumes."""
    if cfg.runtime.cache_dir:
        resume = f"scores computed so far are in the score cache {cfg.runtime.cache_dir}"
    else:
        resume = "without a score cache (runtime.cache_dir) it will start over"
    deterministic(cfg.runtime.get("deterministic", False))
    with log_when_stopped(resume):
        return run_job(job_kind(cfg)(cfg), out_dir)


def deterministic(on: bool) -> None:
    """runtime.deterministic: torch's deterministic algorithms on or (as each job of a sweep
    in one process decides for itself) off. cuBLAS needs its workspace fixed before CUDA
    starts: set here unless the environment already sets it."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(bool(on))
