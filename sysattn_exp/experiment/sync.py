"""Log to MLflow every finished job folder under DIR that is not logged yet: after a crash,
or when the tracking server could not be reached while the jobs ran.

    python -m sysattn_exp.sync outputs/multiruns/2026-11-24_10-00-00.000000
    python -m sysattn_exp.sync outputs --tracking-uri http://mlflow-host:5000

Each job is logged to the tracking store its config names, unless --tracking-uri is given;
jobs of a sweep go under the sweep's parent run (created if it is missing). A job already
in the store is not logged twice. A sweep already logged to one store can be logged to
another with --tracking-uri: its parent there is found by the sweep's key, or created.

A job that cannot be logged is reported in one line and the others are still logged; the
summary counts the jobs logged now, those already logged and those that failed, and the
exit status is 1 when any failed.
"""

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from typing import NamedTuple

from omegaconf import OmegaConf

from sysattn_exp.errors import first_line
from sysattn_exp.experiment.schema import register_resolvers
from sysattn_exp.experiment.tracking import (
    JOB_MARKER,
    SWEEP_MARKER,
    absolute_uri,
    log_job,
    sweep_key,
    sweep_parent,
)

RUN_ID = re.compile(r"[0-9a-f]{32}")  # MLflow's run ids


def job_dirs(root: Path) -> list[Path]:
    """Finished job folders (metrics.json is written last) under root, root included; not
    the copies MLflow keeps of logged jobs (an outputs folder holds the default artifact
    store, outputs/mlartifacts/<experiment>/<run id>/artifacts)."""
    return sorted(
        p.parent
        for p in root.rglob("metrics.json")
        if (p.parent / "config.yaml").exists() and not is_run_artifacts(p.parent)
    )


def is_run_artifacts(folder: Path) -> bool:
    """Whether `folder` is an MLflow run's artifact folder (<run id>/artifacts)."""
    return folder.name == "artifacts" and RUN_ID.fullmatch(folder.parent.name) is not None


def tracking_config(job_dir: Path, uri: str | None):
    tracking = OmegaConf.load(job_dir / "config.yaml").tracking
    if uri:
        tracking.uri = uri
    return tracking


def ensure_parent(sweep_dir: Path, tracking) -> None:
    """A sweep folder whose parent run was never created (the store was down) gets one,
    keyed like the callback would have keyed it. (A parent recorded for another store is
    found or created by log_job_dir.)"""
    if (sweep_dir / SWEEP_MARKER).exists() or not (sweep_dir / "multirun.yaml").exists():
        return
    register_resolvers()  # a layer sweep's params resolve through them
    sweep = OmegaConf.load(sweep_dir / "multirun.yaml")
    sweep.tracking.experiment = tracking.experiment
    sweep_parent(tracking, sweep_dir, *sweep_key(sweep))


def already_logged(job_dir: Path, uri: str | None) -> bool:
    """Whether the job's marker says it is logged: anywhere, or with --tracking-uri, to
    that store (a sweep synced to a second store is logged there too)."""
    marker = job_dir / JOB_MARKER
    if not marker.exists():
        return False
    return uri is None or json.loads(marker.read_text())["uri"] == absolute_uri(uri)


class Counts(NamedTuple):
    logged: int  # logged now
    already_logged: int  # by the job folder's marker, or a complete run found in the store
    failed: int  # could not be logged (said on stderr, one line each)


def sync(root: Path, uri: str | None = None) -> Counts:
    """Log every finished job folder under root; what happened to each, counted."""
    logged = already = failed = 0
    for job_dir in job_dirs(root):
        try:
            if already_logged(job_dir, uri):
                already += 1
                continue
            tracking = tracking_config(job_dir, uri)
            ensure_parent(job_dir.parent, tracking)
            _, new = log_job(job_dir, tracking)
        except Exception as error:  # noqa: BLE001 - one job's failure must not stop the rest
            print(f"error: could not log {job_dir}: {first_line(error)}", file=sys.stderr)
            failed += 1
            continue
        logged += new
        already += not new
    return Counts(logged, already, failed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "dir", type=Path, help="a job folder, a sweep folder, or any folder above them"
    )
    parser.add_argument("--tracking-uri", help="log here instead of the store in each job's config")
    args = parser.parse_args()
    if not args.dir.is_dir():
        print(f"error: {args.dir} is not a directory", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    counts = sync(args.dir, args.tracking_uri)
    print(
        f"logged {counts.logged} job(s); {counts.already_logged} were already logged; "
        f"{counts.failed} could not be logged"
    )
    sys.exit(1 if counts.failed else 0)


if __name__ == "__main__":
    main()
