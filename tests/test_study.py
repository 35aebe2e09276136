"""The study's grids through the CLI on the tiny model: +sweep=paper (every condition,
rendered as the paper's table by the report) and +sweep=dose."""

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
import yaml
from cli import read_metrics, run_cli
from hydra import compose, initialize_config_module

SIX = ["mme", "hallusionbench", "naturalbench", "winoground", "sugarcrepe", "beaf"]


def test_paper_sweep_is_the_full_grid_over_six_benchmarks():
    with initialize_config_module("sysattn_exp.conf", version_base="1.3"):
        cfg = compose("config", overrides=["+sweep=paper"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params.benchmark.split(",") == SIX
    assert params["+condition"] == "glob(*)"


def test_paper_sweep_runs_and_the_report_renders_it(tmp_path):
    result = run_cli(
        "+sweep=paper", "model=tiny", "benchmark=toy", "benchmark.limit=2", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "multiruns").iterdir()
    conditions = set()
    for job in sweep.glob("job*"):
        config = yaml.safe_load((job / "config.yaml").read_text())
        conditions.add(config["job"]["name"].removeprefix("toy "))
        assert "paired_accuracy" in read_metrics(job)
    rules = ["system->image", "system->text", "system->image+text", "image->text", "text->image"]
    spans = ["0-7", "0-1", "2-3", "4-5", "6-7"]
    want = {f"{r} layers {s}" for r in rules for s in spans} | {
        "baseline",
        "imagex2 layers 0-7",
        "PAI a=0.2 layers 2-7",
    }
    assert conditions == want and len(want) == 28
    report = subprocess.run(
        [sys.executable, "-m", "sysattn_exp.report", f"report.out={tmp_path / 'report'}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    paper = pd.read_csv(tmp_path / "report" / "paper_table.csv")
    assert len(paper) == 27 and list(paper.columns) == ["condition", "toy"]
    table = (tmp_path / "report" / "paper_table.md").read_text()
    assert "| system->text q4 (6-7) |" in table and "| PAI a=0.2 2-7 |" in table and "pts)" in table


def test_dose_sweep(tmp_path):
    result = run_cli("+sweep=dose", "model=tiny", "benchmark.limit=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "multiruns").iterdir()
    seen = set()
    for job in sweep.glob("job*"):
        config = yaml.safe_load((job / "config.yaml").read_text())
        intervention = config["intervention"]
        assert config["layers"]["resolved"] == [6, 7] and intervention["source"] == "system"
        seen.add((intervention["fraction"], tuple(intervention["recipients"])))
    fractions = [0.1, 0.25, 0.5, 0.75, 1.0]
    assert seen == {(f, (r,)) for f in fractions for r in ("text", "image")}


def test_uniform_dose_and_guided_pai_through_the_cli(tmp_path):
    runs = {  # overrides, the job's name
        "uniform": (
            [
                "intervention=redistribute",
                "intervention.mode=uniform",
                "intervention.fraction=0.5",
                "layers=q4",
            ],
            "toy system->text f=0.5 uniform layers 6-7",
        ),
        "pai": (
            ["intervention=pai", "intervention.cfg_gamma=1.1", "layers.start=2"],
            "toy PAI a=0.2 cfg=1.1 layers 2-7",
        ),
    }

    def one(name):
        cwd = tmp_path / name
        cwd.mkdir()
        return cwd, run_cli("model=tiny", "benchmark.limit=4", *runs[name][0], cwd=cwd)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(runs, pool.map(one, runs), strict=True))
    for name, (cwd, result) in results.items():
        assert result.returncode == 0, result.stderr[-3000:]
        (job,) = (cwd / "outputs" / "runs").iterdir()
        metrics = read_metrics(job)
        assert metrics["n_items"] == 8 and "baseline_paired_accuracy" in metrics
        config = yaml.safe_load((job / "config.yaml").read_text())
        assert config["job"]["name"] == runs[name][1]
