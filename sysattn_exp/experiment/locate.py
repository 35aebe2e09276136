"""Where and how much (python -m sysattn_exp.locate): the rule (default system -> text)
placed in three stages, each chosen on the CALIBRATION half of the benchmark's groups,
and the chosen condition measured once on the other, HELD-OUT half, so that the figure
a researcher publishes was not selected on the data it is measured on (issue 21).

1. quarters: +sweep=quarters on one recipient set: the quarter with the largest change
   in paired accuracy against the baseline (paired_accuracy_change_points);
2. windows inside that quarter: +sweep=windows with window = half the quarter (at least
   1 layer) and stride = half the window (at least 1), its starts inside the quarter;
3. dose at the best window: +sweep=dose (intervention.fraction 0.1 .. 1.0) on it;
4. held out: the chosen layers and fraction, with its baseline, on the held-out half.

Ties go to the earlier job of a stage (the earlier quarter or window, the smaller
fraction). A stage's choice reads only that stage's job folders, whose jobs scored only
calibration groups (benchmark.split_half=calibration; benchmarks.base.split_groups):
nothing held-out reaches a choice. Each stage is an ordinary multirun (its own parent
run, the score cache shared with every other job: an item's key does not depend on the
split), nested in MLflow under one locate run."""

import json
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from sysattn_exp.errors import UsageError
from sysattn_exp.experiment.tracking import SWEEP_MARKER, connect, store_lock

METRIC = "paired_accuracy_change_points"  # metrics.compare_with_baseline
FRACTIONS = "0.1,0.25,0.5,0.75,1.0"  # conf/sweep/dose.yaml's
STAGES = ("1_quarters", "2_windows", "3_dose", "4_held_out")
SPLIT_KEYS = ("benchmark.calibration_fraction", "benchmark.calibration_seed")


@dataclass
class Stage:
    """One stage's jobs (their folders, in the sweep's order) and its choice."""

    name: str
    rows: list[dict] = field(default_factory=list)
    choice: dict | None = None


def split_overrides(overrides: list[str]) -> list[str]:
    """The user's overrides with the split's keys (absent from the shipped benchmark files)
    as `++key=value`, which adds or replaces; UsageError for a fraction outside (0, 1)
    before anything runs."""
    out = []
    for override in overrides:
        key, _, value = override.lstrip("+").partition("=")
        if key in SPLIT_KEYS:
            if key == SPLIT_KEYS[0]:
                check_fraction(value)
            override = f"++{key}={value}"
        elif key == "benchmark.split_half":
            raise UsageError("benchmark.split_half is set by each stage of locate; leave it out")
        out.append(override)
    return out


def check_fraction(text: str) -> None:
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 < value < 1:
        raise UsageError(f"benchmark.calibration_fraction={text} must be a number in (0, 1)")


def read_stage(name: str, sweep_dir: Path) -> Stage:
    """The stage's jobs in order (job0, job1, ...): their layers, fraction and metrics;
    UsageError naming the first job without metrics.json (it failed)."""
    stage = Stage(name)
    jobs = sorted(
        (p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()),
        key=lambda p: int(p.name.removeprefix("job")),
    )
    for job_dir in jobs:
        if not (job_dir / "metrics.json").exists():
            raise UsageError(f"locate stage {name}: {job_dir} did not finish (no metrics.json)")
        config = OmegaConf.load(job_dir / "config.yaml")
        metrics = json.loads((job_dir / "metrics.json").read_text())
        layers = list(config.layers.resolved)
        stage.rows.append(
            {
                "job": job_dir.name,
                "split_half": config.benchmark.get("split_half"),
                "first_layer": layers[0],
                "last_layer": layers[-1],
                "fraction": config.intervention.get("fraction"),
                "n_groups": metrics["n_groups"],
                "paired_accuracy": metrics["paired_accuracy"],
                "baseline_paired_accuracy": metrics["baseline_paired_accuracy"],
                METRIC: metrics[METRIC],
                "ci_low": 100 * metrics["paired_accuracy_change_ci_low"],
                "ci_high": 100 * metrics["paired_accuracy_change_ci_high"],
                "p": metrics.get("paired_accuracy_change_p"),  # the paired bootstrap's
                "mcnemar_p": metrics.get("paired_accuracy_mcnemar_p"),  # whole groups
            }
        )
    return stage


def choose(stage: Stage) -> dict:
    """The stage's job with the largest change in paired accuracy, the earlier on a tie.
    Refuses (ValueError) a job that did not score the calibration half: a choice must not
    see held-out groups."""
    for row in stage.rows:
        if row["split_half"] != "calibration":
            raise ValueError(f"{stage.name} {row['job']} scored {row['split_half']!r} groups")
    best = max(stage.rows, key=lambda row: (row[METRIC], -stage.rows.index(row)))
    stage.choice = best
    return best


def windows_in(first: int, last: int) -> tuple[int, int, list[int]]:
    """Stage 2's window, stride and starts inside the quarter's layers first..last: window
    half the quarter (>= 1), stride half the window (>= 1), every window inside it."""
    window = max(1, (last - first + 1) // 2)
    stride = max(1, window // 2)
    return window, stride, list(range(first, last - window + 2, stride))


def start_parent(tracking, description: str) -> str:
    """The MLflow run that holds the stages' sweep runs (tag sysattn.kind=locate)."""
    with store_lock(tracking.uri):
        mlflow, experiment_id = connect(tracking)
        with mlflow.start_run(
            experiment_id=experiment_id,
            run_name=f"locate {description}"[:250],
            tags={"sysattn.kind": "locate"},
        ) as run:
            mlflow.log_param("locate", description[:6000])
            return run.info.run_id


def nest_stage(tracking, sweep_dir: Path, parent: str) -> str | None:
    """Put the stage's sweep run (its folder's SWEEP_MARKER) under the locate run."""
    marker = sweep_dir / SWEEP_MARKER
    if not marker.exists():
        return None
    run_id = json.loads(marker.read_text())["run_id"]
    with store_lock(tracking.uri):
        mlflow, _ = connect(tracking)
        mlflow.MlflowClient().set_tag(run_id, "mlflow.parentRunId", parent)
    return run_id


def finish_parent(tracking, parent: str, out_dir: Path, held_out: dict) -> None:
    """The held-out figures as the locate run's metrics, locate.json/.md as its artifacts."""
    with store_lock(tracking.uri):
        mlflow, _ = connect(tracking)
        client = mlflow.MlflowClient()
        for key in ("paired_accuracy", "baseline_paired_accuracy", METRIC, "ci_low", "ci_high"):
            client.log_metric(parent, f"held_out_{key}", float(held_out[key]))
        for name in ("locate.json", "locate.md"):
            client.log_artifact(parent, str(out_dir / name))


def layers_text(row: dict) -> str:
    return f"layers {row['first_layer']}-{row['last_layer']}"


def table(stage: Stage) -> list[str]:
    lines = [
        "| job | layers | fraction | groups | paired acc | baseline | change (points) "
        "| 95% CI | p |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in stage.rows:
        mark = " **chosen**" if row is stage.choice else ""
        lines.append(
            f"| {row['job']}{mark} | {row['first_layer']}-{row['last_layer']} | "
            f"{row['fraction']} | {row['n_groups']} | {row['paired_accuracy']:.4f} | "
            f"{row['baseline_paired_accuracy']:.4f} | {row[METRIC]:+.2f} | "
            f"[{row['ci_low']:+.2f}, {row['ci_high']:+.2f}] | {fmt_p(row['p'])} |"
        )
    return lines


def fmt_p(p) -> str:
    return "n/a" if p is None else f"{p:.3g}"


def write_report(out_dir: Path, stages: list[Stage], split: dict) -> dict:
    """locate.json (every stage's rows and choice, the held-out result) and locate.md."""
    held_out = stages[-1].rows[0]
    result = {
        "split": split,
        "stages": {s.name: {"rows": s.rows, "choice": s.choice} for s in stages[:-1]},
        "held_out": held_out,
    }
    (out_dir / "locate.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Where and how much",
        "",
        f"Groups split by sha256(seed:group_id): calibration fraction "
        f"{split['calibration_fraction']}, seed {split['calibration_seed']}. Stages 1-3 "
        "chose on the calibration half; the result below is on the held-out half.",
    ]
    for stage in stages[:-1]:
        choice = stage.choice
        what = f"{layers_text(choice)}, fraction {choice['fraction']}"
        lines += ["", f"## {stage.name}: chose {what}", "", *table(stage)]
        if choice[METRIC] <= 0:
            lines += [
                "",
                "No job of this stage gained on the baseline: the choice is a tie or a loss.",
            ]
    lines += [
        "",
        f"## held out: {layers_text(held_out)}, fraction {held_out['fraction']}",
        "",
        f"Paired accuracy {held_out['paired_accuracy']:.4f} against the baseline's "
        f"{held_out['baseline_paired_accuracy']:.4f} on {held_out['n_groups']} held-out "
        f"groups: {held_out[METRIC]:+.2f} points, 95% CI [{held_out['ci_low']:+.2f}, "
        f"{held_out['ci_high']:+.2f}] (paired cluster bootstrap over groups, p = "
        f"{fmt_p(held_out['p'])}; McNemar on whole groups, p = {fmt_p(held_out['mcnemar_p'])}).",
        "",
    ]
    (out_dir / "locate.md").write_text("\n".join(lines))
    return result
