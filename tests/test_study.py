"""The study's grids through the CLI on the tiny model: +sweep=paper (every condition,
each changing the baseline's scores, rendered as the paper's table by the report) and
+sweep=dose; on the toy model, what uniform redistribution and PAI's guidance change."""

import math
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
import pytest
import yaml
from cli import read_metrics, run_cli
from hydra import compose, initialize_config_module

SIX = ["mme", "hallusionbench", "naturalbench", "winoground", "sugarcrepe", "beaf"]


def test_paper_sweep_is_the_full_grid_over_six_benchmarks():
    with initialize_config_module("sysattn_exp.conf", version_base="1.3"):
        cfg = compose("config", overrides=["+sweep=paper"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params.benchmark.split(",") == SIX
    assert params["+condition"] == "glob(*,exclude=no-*)"  # no prompt ablation


def test_paper_sweep_runs_and_the_report_renders_it(tmp_path):
    result = run_cli(
        "+sweep=paper", "model=tiny", "benchmark=toy", "benchmark.limit=2", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "multiruns").iterdir()
    jobs = {name.removeprefix("toy "): job for name, job in jobs_by_name(sweep).items()}
    conditions = set(jobs)
    baseline = pd.read_parquet(jobs["baseline"] / "predictions.parquet")
    for name, job in jobs.items():
        assert "paired_accuracy" in read_metrics(job)
        if name != "baseline":  # every rule changes some item's logits
            scores = pd.read_parquet(job / "predictions.parquet")
            assert list(scores["item_id"]) == list(baseline["item_id"])
            changed = (
                scores[["yes_logit", "no_logit"]] - baseline[["yes_logit", "no_logit"]]
            ).abs()
            assert changed.to_numpy().max() > 1e-3, name
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


def log_odds(job) -> pd.Series:
    """Each item's yes logit minus its no logit (log-probabilities' difference alike)."""
    predictions = pd.read_parquet(job / "predictions.parquet").set_index("item_id")
    return predictions["yes_logit"] - predictions["no_logit"]


def jobs_by_name(sweep) -> dict:
    """{job name: job folder} of a sweep's jobs, whose names are distinct."""
    folders = list(sweep.glob("job*"))
    jobs = {yaml.safe_load((j / "config.yaml").read_text())["job"]["name"]: j for j in folders}
    assert len(jobs) == len(folders), sorted(jobs)
    return jobs


def test_uniform_mode_and_pai_guidance_change_the_scores(tmp_path):
    """On the toy model (trained: yes and no are its likely answers, which PAI's guidance
    keeps), each through the CLI as a small sweep: uniform against proportional
    redistribution (same fraction, recipients and layers), and PAI with guidance gamma 1,
    1.1 and 2 against PAI without. Guidance on log-probabilities, gamma (c - u) + u with
    every token more than 10 times less likely than the top one at -inf (a mask that
    depends on c alone), makes an answer's log-odds linear in gamma:
    lo(2) - lo(1) = 10 (lo(1.1) - lo(1)); at gamma 1 they are PAI's own, less the yes/no
    variants the mask drops."""
    toy = ["model=toy", "benchmark.limit=2", "runtime.num_workers=0"]
    runs = {
        "uniform": [
            "intervention=redistribute",
            "intervention.fraction=0.5",
            "layers=q4",
            "intervention.mode=uniform,proportional",
        ],
        "pai": ["intervention=pai", "layers.start=2", "intervention.cfg_gamma=1.0,1.1,2.0,null"],
    }

    def one(name):
        cwd = tmp_path / name
        cwd.mkdir()
        return cwd, run_cli("-m", *toy, *runs[name], cwd=cwd)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(runs, pool.map(one, runs), strict=True))
    jobs = {}
    for cwd, result in results.values():
        assert result.returncode == 0, result.stderr[-3000:]
        (sweep,) = (cwd / "outputs" / "multiruns").iterdir()
        jobs |= jobs_by_name(sweep)
    assert set(jobs) == {
        "toy system->text f=0.5 uniform layers 3-3",
        "toy system->text f=0.5 layers 3-3",
        "toy PAI a=0.2 cfg=1 layers 2-3",
        "toy PAI a=0.2 cfg=1.1 layers 2-3",
        "toy PAI a=0.2 cfg=2 layers 2-3",
        "toy PAI a=0.2 layers 2-3",
    }
    for job in jobs.values():
        metrics = read_metrics(job)
        assert metrics["n_items"] == 4 and "baseline_paired_accuracy" in metrics
    # Uniform mode moves the same mass elsewhere: every item's two logits change.
    uniform, proportional = (
        pd.read_parquet(jobs[f"toy system->text f=0.5{mode} layers 3-3"] / "predictions.parquet")
        for mode in (" uniform", "")
    )
    assert list(uniform["item_id"]) == list(proportional["item_id"])
    moved = (uniform[["yes_logit", "no_logit"]] - proportional[["yes_logit", "no_logit"]]).abs()
    assert (moved.max(axis=1) > 1e-3).all(), moved
    # PAI's guidance: linear in gamma, through PAI's own log-odds at gamma 1.
    unguided = log_odds(jobs["toy PAI a=0.2 layers 2-3"])
    gamma = {g: log_odds(jobs[f"toy PAI a=0.2 cfg={g} layers 2-3"]) for g in ("1", "1.1", "2")}
    unlikely = unguided < math.log(0.1)  # yes 10 times less likely than no, the top token
    assert 0 < unlikely.sum() < len(unguided)
    assert all((lo[unlikely] == -math.inf).all() for lo in gamma.values())
    kept = ~unlikely
    assert (gamma["1"][kept] - unguided[kept]).abs().max() < 1e-3
    step = gamma["1.1"][kept] - gamma["1"][kept]
    assert (step.abs() > 0.1).all()  # guidance moves every kept answer
    assert (gamma["2"][kept] - gamma["1"][kept]).values == pytest.approx(10 * step.values, rel=1e-4)
