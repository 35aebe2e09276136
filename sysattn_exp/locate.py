"""python -m sysattn_exp.locate [overrides] [locate.out=DIR]: where and how much for a
model (experiment/locate.py): quarters, windows inside the best quarter, dose at the best
window, each chosen on the calibration half of the benchmark's groups, then the choice
and its baseline on the held-out half. Each stage is `python -m sysattn_exp -m +sweep=...`
run in this process with the overrides given here; the results go to locate.json and
locate.md in DIR (default outputs/locate/<time>) and under one MLflow run.

A driver, not a Hydra sweep: a stage's values are chosen from the previous stage's
results, which a sweeper needs before any job starts."""

import sys
from datetime import datetime
from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from sysattn_exp.__main__ import main as sysattn_main
from sysattn_exp.errors import UsageError, one_line, usage_error_in
from sysattn_exp.experiment import locate
from sysattn_exp.experiment.schema import BenchmarkConfig, check_config

RECIPIENTS = "intervention.recipients=[text]"  # the default rule: system -> text


def parse(argv: list[str]) -> tuple[Path, list[str]]:
    out, overrides = None, []
    for arg in argv:
        if arg.startswith("locate.out="):
            out = Path(arg.partition("=")[2])
        else:
            overrides.append(arg)
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S.%f")
    overrides = locate.split_overrides(overrides)
    if not any(o.lstrip("+").startswith("intervention.recipients=") for o in overrides):
        overrides.append(RECIPIENTS)
    return out or Path("outputs/locate") / stamp, overrides


def checked_config(overrides: list[str]):
    """The first stage's composed config, checked (schema.check_config): bad input is
    answered before anything runs."""
    with initialize_config_module("sysattn_exp.conf", version_base="1.3"):
        first = [*overrides, "+sweep=quarters", "++benchmark.split_half=calibration"]
        cfg = compose("config", first)
    check_config(cfg)
    if cfg.runtime.dry_run:
        # A stage's values come from the previous stage's results, which a dry run has not.
        raise UsageError(
            "runtime.dry_run=true: locate's stages need each other's results; dry-run its "
            "first stage with python -m sysattn_exp +sweep=quarters runtime.dry_run=true"
        )
    return cfg


def run_stage(out: Path, name: str, overrides: list[str], stage: list[str]) -> locate.Stage:
    """One stage as `python -m sysattn_exp -m ...` in this process; its jobs, read back."""
    sweep_dir = out / name
    argv, sys.argv = sys.argv, ["sysattn_exp", "-m", *overrides, *stage]
    sys.argv += ["runtime.report_at_end=false", f"hydra.sweep.dir={sweep_dir}"]
    try:
        sysattn_main()
    except SystemExit as exit:
        if exit.code:
            raise
    finally:
        sys.argv = argv
    return locate.read_stage(name, sweep_dir)


def layer_range(row: dict) -> list[str]:
    return [
        "layers=all",
        f"layers.start={row['first_layer']}",
        f"layers.end={row['last_layer'] + 1}",
    ]


def run(out: Path, overrides: list[str], cfg) -> dict:
    calibration = "++benchmark.split_half=calibration"
    out.mkdir(parents=True, exist_ok=True)
    parent = locate.start_parent(cfg.tracking, " ".join(overrides))
    names = iter(locate.STAGES)
    stages = [run_stage(out, next(names), overrides, ["+sweep=quarters", calibration])]
    quarter = locate.choose(stages[0])
    window, stride, starts = locate.windows_in(quarter["first_layer"], quarter["last_layer"])
    windows = ["+sweep=windows", f"sweep.window={window}", f"sweep.stride={stride}"]
    windows += [f"layers.start={','.join(map(str, starts))}", calibration]
    stages.append(run_stage(out, next(names), overrides, windows))
    best = locate.choose(stages[1])
    dose = ["+sweep=dose", *layer_range(best), f"intervention.fraction={locate.FRACTIONS}"]
    stages.append(run_stage(out, next(names), overrides, [*dose, calibration]))
    chosen = locate.choose(stages[2])
    held = ["+sweep=dose", *layer_range(chosen), f"intervention.fraction={chosen['fraction']}"]
    stages.append(
        run_stage(out, next(names), overrides, [*held, "++benchmark.split_half=held_out"])
    )
    for stage in stages:
        locate.nest_stage(cfg.tracking, out / stage.name, parent)
    split = {
        key: cfg.benchmark.get(key, getattr(BenchmarkConfig, key))  # the schema's default
        for key in ("calibration_fraction", "calibration_seed")
    }
    result = locate.write_report(out, stages, split)
    locate.finish_parent(cfg.tracking, parent, out, result["held_out"])
    print(f"\nLocate: {(out / 'locate.md').resolve()}")
    return result


def main() -> None:
    try:
        out, overrides = parse(sys.argv[1:])
        cfg = checked_config(overrides)
    except (UsageError, HydraException, OmegaConfBaseException) as error:
        print(f"error: {one_line(usage_error_in(error) or error)}", file=sys.stderr)
        sys.exit(2)
    try:
        run(out, overrides, cfg)
    except UsageError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
