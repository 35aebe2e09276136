"""Hydra callbacks, run in the launching process: the MLflow parent run of a sweep (created
before any job starts, which also creates the store and the experiment once), and at the
end where the results are, which jobs failed and why, the sweep's summary on its parent
run (parent_summary) and (runtime.report_at_end) the report of the sweep's jobs. A SLURM
launcher with a SQLite store gets a warning first."""

import json
import logging
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from sysattn_exp.errors import UsageError, first_line, usage_error_in
from sysattn_exp.experiment.cluster import slurm_sqlite_warning
from sysattn_exp.experiment.report import report, summarize_sweep
from sysattn_exp.experiment.tracking import (
    DRY_RUN_FILE,
    JOB_MARKER,
    PROFILE_HEADS_PLOT,
    PROFILE_PLOT,
    SWEEP_MARKER,
    absolute_uri,
    runs_table_address,
    sweep_key,
    sweep_parent,
)

log = logging.getLogger(__name__)

FAILURE_FILE = "failure.json"  # written by a job that failed (see __main__)
# The sweep under way in this process and, once it ends, its failed jobs: read by __main__
# to choose the exit status.
SWEEP: dict = {}


def where_results(folder: str, uri: str) -> str:
    """Where the job (or sweep) folder is, and how to open its runs in the MLflow UI: the
    runs table's address where the folder's marker (JOB_MARKER, SWEEP_MARKER) names the
    experiment in this store."""
    markers = [Path(folder) / name for name in (JOB_MARKER, SWEEP_MARKER)]
    records = [json.loads(m.read_text()) for m in markers if m.exists()]
    here = [r for r in records if r.get("uri") == absolute_uri(uri)]
    ids = [r["experiment_id"] for r in here if "experiment_id" in r]
    address = runs_table_address(ids[0]) if ids else "http://127.0.0.1:5000"
    return (
        f"\nResults: {Path(folder).resolve()} (metrics.json, predictions.parquet per job)\n"
        f"MLflow UI: mlflow ui --backend-store-uri {absolute_uri(uri)}  (then open {address})"
    )


def failed_jobs(sweep_dir: Path, done_file: str = "metrics.json") -> list[dict]:
    """Every job folder of the sweep without its done_file (metrics.json; a dry run's
    DRY_RUN_FILE): its overrides and error."""
    failures = []
    for job_dir in sorted(p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()):
        if (job_dir / done_file).exists():
            continue
        overrides = " ".join(OmegaConf.load(job_dir / ".hydra" / "overrides.yaml"))
        failure = job_dir / FAILURE_FILE
        record = json.loads(failure.read_text()) if failure.exists() else None
        failures.append(
            {
                "job": job_dir.name,
                "overrides": overrides,
                "error": record["error"] if record else "did not finish (killed, or still running)",
                "bad_input": bool(record and record["bad_input"]),
            }
        )
    return failures


def failure_summary(failures: list[dict], n_jobs: int) -> str:
    messages = {f["error"] for f in failures}
    if len(messages) == 1:
        return f"error: {len(failures)} of {n_jobs} jobs failed: {messages.pop()}"
    lines = [f"error: {len(failures)} of {n_jobs} jobs failed:"]
    lines += [f"  {f['job']} ({f['overrides']}): {f['error']}" for f in failures]
    return "\n".join(lines)


def report_sweep_end(sweep_dir: Path, uri: str) -> list[dict]:
    """Print where the results are and which jobs failed; returns the failures."""
    jobs = [p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()] if sweep_dir.exists() else []
    failures = failed_jobs(sweep_dir) if jobs else []
    if len(failures) < len(jobs):
        print(where_results(str(sweep_dir), uri))
    if failures:
        print(failure_summary(failures, len(jobs)), file=sys.stderr)
    return failures


def report_dry_run_end(sweep_dir: Path) -> list[dict]:
    """A dry run of a sweep: how many jobs' configs were checked, and which failed."""
    jobs = [p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()]
    failures = failed_jobs(sweep_dir, DRY_RUN_FILE)
    print(
        f"dry run: {len(jobs) - len(failures)} of {len(jobs)} jobs' configs are valid; "
        "nothing was run or logged"
    )
    if failures:
        print(failure_summary(failures, len(jobs)), file=sys.stderr)
    return failures


def sweep_report(tracking, sweep_dir: Path, parent: str) -> None:
    """python -m sysattn_exp.report for this sweep's parent run, into <sweep dir>/report."""
    cfg = OmegaConf.create(
        {
            "tracking": OmegaConf.to_container(tracking, resolve=True),
            "report": {"out": str(sweep_dir / "report"), "parent": parent},
        }
    )
    try:
        report(cfg)
    except Exception as error:  # noqa: BLE001 - the jobs' results stand without it
        log.warning(
            "no report for this sweep (%s): python -m sysattn_exp.report report.parent=%s",
            first_line(error),
            parent,
        )


def parent_summary(tracking, parent: str) -> None:
    """What the sweep found, as metrics and a tag on its parent run (report.summarize_sweep)."""
    try:
        summarize_sweep(tracking, parent)
    except UsageError:  # no job of the sweep was logged: nothing to summarise
        log.info("no job of this sweep was logged: no summary on its parent run")
    except Exception as error:  # noqa: BLE001 - the jobs' results stand without it
        log.warning(
            "no summary on the sweep's parent run (%s): python -m sysattn_exp.report "
            "report.parent=%s logs it",
            first_line(error),
            parent,
        )


class SweepTracking(Callback):
    def on_multirun_start(self, config, **kwargs) -> None:
        try:
            key, description = sweep_key(config)  # resolves the swept values
        except Exception as error:
            if usage_error_in(error) is None:
                raise
            return  # bad input (a layer sweep's window): the sweeper tells it, exit 2
        warning = slurm_sqlite_warning(config)
        if warning:
            log.warning(warning)
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        SWEEP.clear()
        SWEEP.update(dir=sweep_dir, uri=config.tracking.uri)
        if config.runtime.get("dry_run"):
            return  # a dry run checks every job's config and logs nothing: no parent run
        try:
            SWEEP["parent"] = sweep_parent(config.tracking, sweep_dir, key, description)
        except Exception as error:  # noqa: BLE001 - jobs keep their results on disk
            log.warning(
                "no MLflow parent run (%s): jobs will keep their results on disk; log them "
                "later with python -m sysattn_exp.sync %s",
                first_line(error),
                sweep_dir,
            )

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if config.runtime.get("dry_run"):
            SWEEP["failures"] = report_dry_run_end(sweep_dir)
            return
        SWEEP["failures"] = report_sweep_end(sweep_dir, config.tracking.uri)
        if not SWEEP.get("parent"):
            return
        if config.runtime.get("report_at_end"):  # the report logs the summary too
            sweep_report(config.tracking, sweep_dir, SWEEP["parent"])
        else:
            parent_summary(config.tracking, SWEEP["parent"])

    def on_run_end(self, config, **kwargs) -> None:
        run_dir = Path(config.hydra.run.dir)
        if (run_dir / "metrics.json").exists():
            print(where_results(str(run_dir), config.tracking.uri))
        if (run_dir / PROFILE_PLOT).exists():
            print(f"Attention profile: {(run_dir / PROFILE_PLOT).resolve()}")
        if (run_dir / PROFILE_HEADS_PLOT).exists():
            print(f"Sink atlas (by head): {(run_dir / PROFILE_HEADS_PLOT).resolve()}")
