"""Entry point: `python -m sysattn_exp [overrides]` composes conf/config.yaml and runs one
job (or, with +sweep=NAME, one job per condition)."""

import json
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from sysattn_exp.errors import UsageError, one_line, usage_error_in
from sysattn_exp.experiment.callbacks import FAILURE_FILE, SWEEP, report_sweep_end
from sysattn_exp.experiment.schema import check_config

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="pkg://sysattn_exp.conf", config_name="config")
def run_job(cfg: DictConfig) -> dict | None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    in_sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        check_config(cfg)  # the schema (schema.py): keys, types and allowed values
        # torch and transformers load only once the config is valid
        from sysattn_exp.experiment.runner import run

        return run(cfg, out_dir)
    except UsageError as error:
        if not in_sweep:
            exit_bad_input(error)  # here, before Hydra adds its "Error executing job" line
        record_failure(out_dir, error, bad_input=True)
    except Exception as error:
        if not in_sweep:
            raise
        # One failing job must not stop the others: the sweep reports it at the end.
        log.exception("job failed")
        record_failure(out_dir, error, bad_input=False)
    return None


def record_failure(out_dir: Path, error: Exception, bad_input: bool) -> None:
    message = one_line(error) if bad_input else f"{type(error).__name__}: {one_line(error)}"
    (out_dir / FAILURE_FILE).write_text(
        json.dumps({"error": message, "bad_input": bad_input}) + "\n"
    )


def exit_bad_input(error: Exception) -> None:
    # A UsageError raised inside Hydra or OmegaConf (a sweep's resolver) is told as itself.
    print(f"error: {one_line(usage_error_in(error) or error)}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    # Let configuration errors reach us instead of Hydra's multi-line report: bad input is
    # one line and exit status 2; anything else is a bug and keeps its full traceback.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    # Tokenizers run in DataLoader workers; their own thread pool would warn after fork.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        run_job()
    except (UsageError, HydraException, OmegaConfBaseException) as error:
        exit_bad_input(error)
    except Exception as error:
        if "dir" not in SWEEP:
            raise
        # The launcher gave up (a job killed outright, say): report what finished.
        report_sweep_end(SWEEP["dir"], SWEEP["uri"])
        print(f"error: the sweep stopped: {one_line(error)}", file=sys.stderr)
        sys.exit(1)
    failures = SWEEP.get("failures")
    if failures:
        sys.exit(2 if all(f["bad_input"] for f in failures) else 1)


if __name__ == "__main__":
    main()
