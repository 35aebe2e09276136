"""python -m sysattn_exp.locate (issue 21 point 4): the seeded calibration / held-out split
of the groups, its keys out of the job key at their defaults, bad input, and the command
end to end on the tiny model: every choice made on calibration groups only."""

import hashlib
import json
import shutil
import subprocess
import sys

import mlflow
import pandas as pd
import pytest

from sysattn_exp.benchmarks.base import Item, in_calibration, split_groups
from sysattn_exp.experiment import locate
from sysattn_exp.experiment.identity import job_key


def naive_half(group_id: str, fraction: float, seed: int) -> bool:
    digest = hashlib.sha256(f"{seed}:{group_id}".encode()).hexdigest()
    return int(digest[:16], 16) / 16**16 < fraction


def items(n_groups: int) -> list[Item]:
    return [
        Item(item_id=f"g{g}/{k}", group_id=f"g{g}", image_id=None, question="q?", label=k == 0)
        for g in range(n_groups)
        for k in range(2)
    ]


def test_the_split_is_a_seeded_hash_of_the_group_id():
    ids = [f"group-{i}" for i in range(400)]
    for fraction, seed in ((0.5, 0), (0.3, 7)):
        got = [in_calibration(g, fraction, seed) for g in ids]
        assert got == [naive_half(g, fraction, seed) for g in ids]
        assert abs(sum(got) / len(ids) - fraction) < 0.1  # 400 fair draws: sd 0.025
    assert [in_calibration(g, 0.5, 0) for g in ids] != [in_calibration(g, 0.5, 1) for g in ids]


def test_the_halves_partition_the_groups_whole():
    every = items(60)
    calibration = split_groups(every, "calibration", 0.5, 0)
    held_out = split_groups(every, "held_out", 0.5, 0)
    assert split_groups(every, None, 0.5, 0) == every
    assert len(calibration) + len(held_out) == len(every)
    cal_groups = {i.group_id for i in calibration}
    assert cal_groups.isdisjoint({i.group_id for i in held_out})
    assert all(sum(i.group_id == g for i in calibration) == 2 for g in cal_groups)


def test_the_split_keys_are_keyed_only_when_a_half_is_chosen():
    plain = {"benchmark": {"name": "toy", "limit": None}, "model": {"batch_size": 1}}
    unsplit = plain | {
        "benchmark": plain["benchmark"]
        | {"split_half": None, "calibration_fraction": 0.3, "calibration_seed": 4}
    }
    half = {"split_half": "calibration", "calibration_fraction": 0.5, "calibration_seed": 0}
    calibration = plain | {"benchmark": plain["benchmark"] | half}
    assert job_key(unsplit, {"c": 1}) == job_key(plain, {"c": 1})
    assert job_key(calibration, {"c": 1}) != job_key(plain, {"c": 1})


def locate_in_process(argv, cwd, monkeypatch, capsys) -> tuple[int, str]:
    """python -m sysattn_exp.locate ARGV as main() in this process: (exit status, stderr)."""
    from sysattn_exp.locate import main

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["locate", *argv])
    with pytest.raises(SystemExit) as exit:
        main()
    return exit.value.code, capsys.readouterr().err


def test_a_calibration_fraction_outside_0_1_is_one_line_exit_2(tmp_path):
    """Through the command line, as a researcher types it."""
    result = subprocess.run(
        [sys.executable, "-m", "sysattn_exp.locate", "benchmark.calibration_fraction=1.5"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: benchmark.calibration_fraction=1.5 must be a number in (0, 1)"
    ]
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        *(
            (
                f"benchmark.calibration_fraction={f}",
                f"benchmark.calibration_fraction={f} must be a number in (0, 1)",
            )
            for f in ("0", "1", "-0.2", "half", "nan")
        ),
        ("benchmark.calibration_seed=-1", "benchmark.calibration_seed=-1 must be a number >= 0"),
        ("benchmark.split_half=held_out", "benchmark.split_half is set by each stage of locate"),
        ("runtime.dry_run=true", "runtime.dry_run=true: locate's stages need each other's"),
    ],
)
def test_other_bad_input_is_one_line_exit_2(tmp_path, monkeypatch, capsys, override, message):
    code, err = locate_in_process(["model=tiny", override], tmp_path, monkeypatch, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}")
    assert not (tmp_path / "outputs").exists()


@pytest.fixture(scope="module")
def located(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("locate")
    result = subprocess.run(
        [
            sys.executable, "-m", "sysattn_exp.locate", "model=tiny", "benchmark.limit=3",
            "stats.bootstrap_samples=200", "benchmark.calibration_seed=3", "locate.out=L",
        ],
        cwd=cwd, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd, json.loads((cwd / "L" / "locate.json").read_text())


def job_groups(stage_dir) -> set[str]:
    frames = [pd.read_parquet(p) for p in stage_dir.glob("job*/predictions.parquet")]
    return set(pd.concat(frames)["group_id"])


def test_each_stage_chooses_inside_the_previous_choice(located):
    cwd, result = located
    stages = result["stages"]
    quarter = stages["1_quarters"]["choice"]
    assert len(stages["1_quarters"]["rows"]) == 4  # the tiny model's 8 layers in quarters
    window = stages["2_windows"]["choice"]
    assert quarter["first_layer"] <= window["first_layer"] <= window["last_layer"]
    assert window["last_layer"] <= quarter["last_layer"]
    dose = stages["3_dose"]["choice"]
    assert (dose["first_layer"], dose["last_layer"]) == (
        window["first_layer"],
        window["last_layer"],
    )
    assert [r["fraction"] for r in stages["3_dose"]["rows"]] == [0.1, 0.25, 0.5, 0.75, 1.0]
    held = result["held_out"]
    assert (held["first_layer"], held["last_layer"], held["fraction"]) == (
        dose["first_layer"], dose["last_layer"], dose["fraction"],
    )  # fmt: skip
    for stage in stages.values():
        best = max(row[locate.METRIC] for row in stage["rows"])
        first_best = next(row for row in stage["rows"] if row[locate.METRIC] == best)
        assert stage["choice"] == first_best  # the largest change, the earlier on a tie
    report = (cwd / "L" / "locate.md").read_text()
    assert "## held out" in report and "McNemar" in report


def test_stages_score_calibration_groups_and_the_result_held_out_ones(located):
    cwd, _ = located
    for name in locate.STAGES:
        groups = job_groups(cwd / "L" / name)
        want = name != "4_held_out"
        assert groups and all(in_calibration(g, 0.5, 3) == want for g in groups), name


def test_changing_held_out_predictions_changes_no_choice(located, tmp_path):
    cwd, result = located
    copy = tmp_path / "L"
    shutil.copytree(cwd / "L", copy)
    for job in (copy / "4_held_out").glob("job*"):
        frame = pd.read_parquet(job / "predictions.parquet")
        frame["correct"] = ~frame["correct"]
        frame.to_parquet(job / "predictions.parquet", index=False)
        metrics = json.loads((job / "metrics.json").read_text())
        (job / "metrics.json").write_text(json.dumps(metrics | {locate.METRIC: 1e6}))
    for name in locate.STAGES[:3]:
        stage = locate.read_stage(name, copy / name)
        assert locate.choose(stage) == result["stages"][name]["choice"]
    # ... while a change on the calibration half does change it (the check can fail)
    last = copy / "1_quarters" / "job3" / "metrics.json"
    metrics = json.loads(last.read_text())
    last.write_text(json.dumps(metrics | {locate.METRIC: 1e6}))
    assert locate.choose(locate.read_stage("1_quarters", copy / "1_quarters"))["job"] == "job3"
    held = locate.read_stage("4_held_out", copy / "4_held_out")
    with pytest.raises(ValueError, match="held_out"):
        locate.choose(held)  # a held-out job never enters a choice


def test_the_stages_are_sweeps_inside_one_locate_run(located):
    cwd, _ = located
    mlflow.set_tracking_uri(f"sqlite:///{cwd / 'outputs' / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True)
    parent = runs[runs["tags.sysattn.kind"] == "locate"]
    assert len(parent) == 1
    sweeps = runs[runs["tags.sysattn.kind"] == "sweep"]
    assert len(sweeps) == 4
    assert set(sweeps["tags.mlflow.parentRunId"]) == {parent["run_id"].iloc[0]}
    assert (runs["tags.sysattn.kind"] == "job").sum() == 4 + 2 + 5 + 1
    assert parent["metrics.held_out_paired_accuracy"].notna().all()


def row(job: str, change: float, split_half: str = "calibration") -> dict:
    return {
        "job": job, "split_half": split_half, "first_layer": 2, "last_layer": 3,
        "fraction": 1.0, "n_groups": 10, "paired_accuracy": 0.5,
        "baseline_paired_accuracy": 0.5 - change / 100, locate.METRIC: change,
        "ci_low": change - 5, "ci_high": change + 5, "p": 0.5, "mcnemar_p": 0.25,
    }  # fmt: skip


@pytest.mark.parametrize("changes", [(0.0, 0.0), (-2.0, -1.0), (0.0, 3.0)])
def test_the_report_says_when_no_job_gained(tmp_path, changes):
    stages = []
    for name in locate.STAGES[:3]:
        stage = locate.Stage(name, [row("job0", changes[0]), row("job1", changes[1])])
        locate.choose(stage)
        stages.append(stage)
    stages.append(locate.Stage("4_held_out", [row("job0", 1.5, "held_out")]))
    split = {"calibration_fraction": 0.5, "calibration_seed": 0}
    result = locate.write_report(tmp_path, stages, split)
    report = (tmp_path / "locate.md").read_text()
    assert result["stages"]["1_quarters"]["choice"]["job"] == (
        "job1" if changes[1] > changes[0] else "job0"
    )
    assert report.count("No job of this stage gained") == (3 if max(changes) <= 0 else 0)
    assert "+1.50 points, 95% CI [-3.50, +6.50]" in report and "p = 0.25" in report
