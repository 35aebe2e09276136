"""Entry point: `python -m sysattn_exp [overrides]` composes conf/config.yaml and runs one
job (or, with +sweep=NAME, one job per condition)."""

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from sysattn_exp.errors import UsageError

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def run_job(cfg: DictConfig) -> dict:
    from sysattn_exp.runner import run  # torch and transformers load only once the config is valid

    try:
        return run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except UsageError as error:
        exit_bad_input(error)  # here, before Hydra adds its "Error executing job" line


def one_line(error: Exception) -> str:
    text = str(error).split("Config search path")[0]  # Hydra appends its search path
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def exit_bad_input(error: Exception) -> None:
    print(f"error: {one_line(error)}", file=sys.stderr)
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


if __name__ == "__main__":
    main()
