"""Parity with published numbers (experiment/parity.py, data/published.yaml): the shipped
table's schema and metric names; a real toy baseline job compared with a test table that it
misses and hits (the published_* metrics, the parity tag and label in metrics.json and
MLflow, the one line naming the likely causes) and the report's baseline vs published
table; the causes in order for a LLaVA-1.5 POPE config; bad tables stop with one line."""

import json
import math
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from benchmark_fixtures import write_hallusionbench, write_mme, write_pope
from cli import read_metrics, run_cli, run_main_stderr
from hydra import compose, initialize_config_module
from test_benchmark_loaders import SHARED, benchmark_cfg, pope_args

from sysattn_exp.benchmarks import load_benchmark
from sysattn_exp.errors import UsageError
from sysattn_exp.experiment.job_yes_no import metric_names
from sysattn_exp.experiment.parity import (
    FIELDS,
    compare,
    job_parity,
    job_settings,
    load_table,
    parity_line,
    parity_metrics,
    preset,
)

TOY = ["model=toy", "runtime.num_workers=0"]


def toy_entry(metric: str, figure: float, tolerance: float, note=None) -> dict:
    """A test table's entry for the toy model on its demo split (not a published figure)."""
    return {
        "model": "toy",
        "benchmark": "toy",
        "split": "demo",
        "metric": metric,
        "figure": figure,
        "published_as": f"{figure}",
        "prompt": "llava",
        "scoring": "generate",
        "parser": "native",
        "dtype": "float16",
        "image": None,
        "source": "tests/test_parity.py",
        "tolerance": tolerance,
        "tolerance_why": "a test",
        "note": note,
    }


def write_table(path: Path, entries: list[dict]) -> Path:
    path.write_text(yaml.safe_dump(entries))
    return path


def composed(*overrides: str):
    with initialize_config_module("sysattn_exp.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


# ---- the shipped table -------------------------------------------------------------------


def test_shipped_table_has_a_source_and_a_justified_tolerance_for_every_figure():
    raw = yaml.safe_load(
        (Path(__file__).parents[1] / "sysattn_exp" / "data" / "published.yaml").read_text()
    )
    table = load_table()
    assert len(table) == len(raw) >= 10
    for entry, record in zip(table, raw, strict=True):
        assert set(FIELDS) <= set(record)
        assert entry.source.strip() and entry.tolerance_why.strip() and entry.published_as
        assert entry.tolerance >= 0 and math.isfinite(entry.figure)
        # Units as this tool logs them: MME in points (a sum of subtask scores), the rest
        # fractions (a published 85.9 % is 0.859).
        if entry.benchmark == "mme":
            assert entry.figure > 200
        else:
            assert 0 <= entry.figure <= 1
    # Every preset the table names has a checkpoint id to match jobs by.
    assert all(preset(m)["name_or_path"] for e in table for m in e.models)


def test_readme_shows_every_figure_of_the_table():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Does my baseline match the literature?")[1].split("\n## ")[0]
    for entry in load_table():
        row = next(
            line
            for line in section.splitlines()
            if line.startswith("| ") and entry.published_as in line and entry.models[0] in line
        )
        assert f"{entry.figure:g}" in row, (entry.metric, row)
        assert entry.metric.split("/")[-1].split("+")[0] in row, (entry.metric, row)


@pytest.fixture(scope="module")
def names_by_benchmark(tmp_path_factory) -> dict:
    """The metric names a job of each benchmark of the shipped table logs, from small
    copies of the releases (the HallusionBench annotations are the real file)."""
    root = tmp_path_factory.mktemp("names")
    write_mme(root / "mme")
    write_pope(root / "pope")
    records = json.loads((SHARED / "hallusionbench" / "HallusionBench.json").read_text())
    write_hallusionbench(root / "hb", records)
    configs = {
        "mme": [
            "benchmark=mme",
            f"benchmark.data_dir={root / 'mme' / 'txt'}",
            f"benchmark.image_dir={root / 'mme' / 'img'}",
        ],
        "pope": pope_args(root / "pope"),
        "hallusionbench": [
            "benchmark=hallusionbench",
            f"benchmark.data_dir={root / 'hb' / 'data'}",
            f"benchmark.image_dir={root / 'hb' / 'images'}",
        ],
    }
    return {
        name: set(metric_names(load_benchmark(benchmark_cfg(*args)), "p_yes"))
        for name, args in configs.items()
    }


def test_every_metric_of_the_table_is_one_its_benchmark_logs(names_by_benchmark):
    table = load_table()
    assert {e.benchmark for e in table} == set(names_by_benchmark)
    for entry in table:
        assert set(entry.metrics) <= names_by_benchmark[entry.benchmark], entry


# ---- a real toy job against a test table ----------------------------------------------------


def test_toy_baseline_that_misses_a_figure_is_tagged_differs_and_names_the_causes(tmp_path):
    table = write_table(
        tmp_path / "table.yaml",
        [
            toy_entry("paired_accuracy", 0.0, 0.01, note="a test label"),
            toy_entry("yes_rate", 0.5, 0.5),
        ],
    )
    result = run_cli(*TOY, f"runtime.published_table={table}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    job = next((tmp_path / "outputs" / "runs").iterdir())
    metrics = read_metrics(job)
    predictions = pd.read_parquet(job / "predictions.parquet")
    # The job's values, computed anew from its predictions.
    paired = predictions.groupby("group_id")["correct"].all().mean()
    yes_rate = predictions["pred"].mean()
    assert paired > 0.01  # the miss is a miss
    assert metrics["published_paired_accuracy"] == 0.0
    assert metrics["published_delta_paired_accuracy"] == pytest.approx(paired)
    assert metrics["published_yes_rate"] == 0.5
    assert metrics["published_delta_yes_rate"] == pytest.approx(yes_rate - 0.5)
    assert (metrics["parity"], metrics["parity_note"]) == ("differs", "a test label")
    lines = [line for line in result.stdout.splitlines() if line.startswith("parity:")]
    assert lines == [
        "parity: builtin:toy on toy differs from the published: paired_accuracy "
        f"{paired:.4g} vs 0 (delta {paired:+.4g}, tolerance 0.01); likely causes: "
        "1) benchmark.prompt=native (published: benchmark.prompt=llava); "
        "2) scoring.mode=logit (published: generate, parser native); "
        "3) model.dtype=auto (published: float16); label: a test label; "
        "source: tests/test_parity.py"
    ]
    run = mlflow_runs(tmp_path)[0]
    assert run.data.tags["parity"] == "differs"
    assert run.data.tags["parity_note"] == "a test label"
    assert run.data.metrics["published_delta_paired_accuracy"] == pytest.approx(paired)

    # The report: one row per metric, each with its own verdict, and the section.
    out = tmp_path / "report"
    done = run_report(tmp_path, out)
    assert done.returncode == 0, done.stderr
    rows = pd.read_csv(out / "baseline_vs_published.csv")
    assert list(rows["metric"]) == ["paired_accuracy", "yes_rate"]
    assert list(rows["parity"]) == ["differs", "match"]
    assert rows["baseline"].tolist() == pytest.approx([paired, yes_rate])
    assert rows["delta"].tolist() == pytest.approx([paired, yes_rate - 0.5])
    assert "## Baseline vs published" in (out / "comparison.md").read_text()

    # The table deleted since the job: the report is written all the same, without the
    # section, and says which runs it left out.
    table.unlink()
    again = run_report(tmp_path, tmp_path / "report2")
    assert again.returncode == 0, again.stderr
    assert not (tmp_path / "report2" / "baseline_vs_published.csv").exists()
    assert "## Baseline vs published" not in (tmp_path / "report2" / "comparison.md").read_text()
    assert f"runs compared with {table} left out" in again.stdout  # Hydra's log: stdout


def test_toy_baseline_within_tolerance_is_tagged_match_and_prints_nothing(tmp_path):
    table = write_table(tmp_path / "table.yaml", [toy_entry("yes_rate", 0.5, 0.5)])
    cache = (f"runtime.cache_dir={tmp_path / 'cache'}",)
    result = run_cli(*TOY, *cache, f"runtime.published_table={table}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = read_metrics(next((tmp_path / "outputs" / "runs").iterdir()))
    assert metrics["parity"] == "match" and "parity_note" not in metrics
    assert metrics["published_delta_yes_rate"] == pytest.approx(metrics["yes_rate"] - 0.5)
    assert "parity:" not in result.stdout
    assert mlflow_runs(tmp_path)[0].data.tags["parity"] == "match"

    # An intervention job is not compared itself; in the report, its logged baseline is
    # (the report of a store that holds only that job).
    other = tmp_path / "other"
    other.mkdir()
    edit = ("intervention=redistribute", "layers=q4", "tracking.uri=sqlite:///other.db")
    result = run_cli(*TOY, *cache, f"runtime.published_table={table}", *edit, cwd=other)
    assert result.returncode == 0, result.stderr
    job = read_metrics(next((other / "outputs" / "runs").iterdir()))
    assert not {"parity", "published_yes_rate"} & set(job)
    assert job["baseline_yes_rate"] == pytest.approx(metrics["yes_rate"])
    done = subprocess.run(
        [sys.executable, "-m", "sysattn_exp.report", "report.parent=all", "report.out=rep"]
        + ["tracking.uri=sqlite:///other.db"],
        cwd=other,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    rows = pd.read_csv(other / "rep" / "baseline_vs_published.csv")
    assert rows[["metric", "parity"]].values.tolist() == [["yes_rate", "match"]]
    assert rows["baseline"].tolist() == pytest.approx([metrics["yes_rate"]])


def mlflow_runs(cwd: Path) -> list:
    mlflow.set_tracking_uri(f"sqlite:///{cwd / 'outputs' / 'mlflow.db'}")
    return mlflow.search_runs(search_all_experiments=True, output_format="list")


def run_report(cwd: Path, out: Path) -> subprocess.CompletedProcess:
    """`python -m sysattn_exp.report` over every job of the store in `cwd`."""
    return subprocess.run(
        [sys.executable, "-m", "sysattn_exp.report", "report.parent=all", f"report.out={out}"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


# ---- the comparison on configs of the real presets --------------------------------------------


def test_a_model_without_a_published_figure_is_tagged_so():
    settings = job_settings(composed("model=toy"))
    assert compare(load_table(), settings, {"accuracy": 0.9}) == []
    assert parity_metrics([]) == {"parity": "no published figure"}


def test_llava15_pope_causes_come_in_order_from_the_config():
    cfg = composed("model=llava15_7b", "benchmark=pope", "model.system_prompt=Be brief.")
    settings = job_settings(cfg)
    comparisons = compare(load_table(), settings, {"pope/mean_f1": 0.70})
    assert [c.entry.metric for c in comparisons] == ["pope/mean_f1"]
    assert parity_metrics(comparisons)["published_delta_pope/mean_f1"] == pytest.approx(-0.159)
    line = parity_line(comparisons, settings)
    causes = line.split("likely causes: ")[1].split("; label: ")[0].split("; ")
    assert [c.split(")", 1)[0] for c in causes] == ["1", "2", "3", "4", "5"]
    assert causes[0] == "1) benchmark.prompt=native (published: benchmark.prompt=llava)"
    assert causes[1] == "2) scoring.mode=logit (published: generate, parser native)"
    assert causes[2] == "3) model.dtype=auto (published: float16)"
    assert causes[3].startswith("4) image: LLaVA's evaluation pads each image to a square")
    assert causes[4] == "5) model.system_prompt differs from the preset's"
    # The entry's label (POPE's 2,910-question random split) is in the line too.
    assert "; label: LLaVA evaluated POPE at AoiDragon/POPE commit e3e3926" in line
    assert "haotian-liu/LLaVA docs/MODEL_ZOO.md" in line.split("; source: ")[1]


@pytest.mark.parametrize(
    ("override", "label"),
    [
        ("benchmark.limit=2", "benchmark.limit=2 (part of the data)"),
        (
            "+benchmark.split_half=calibration",
            "benchmark.split_half=calibration (part of the data)",
        ),
        ("benchmark.subsets=[random]", "benchmark.subsets=random (published: all)"),
        ("model.weights=random", "model.weights=random (published: pretrained)"),
    ],
)
def test_a_baseline_on_other_data_is_not_compared_and_says_why(override, label):
    # A figure over all of POPE's 9,000 questions is not one for its first 2 groups, one
    # split or random weights: never a match, even by chance; labelled, not silently skipped.
    cfg = composed("model=llava15_7b", "benchmark=pope", override)
    out = job_parity(cfg, {"pope/mean_f1": 0.859})
    assert out == {"parity": "no published figure", "parity_note": f"not compared: {label}"}
    # A model without any entry: no label.
    assert job_parity(composed("model=toy"), {"accuracy": 0.9}) == {"parity": "no published figure"}


def test_the_published_protocol_within_tolerance_matches():
    cfg = composed(
        "model=llava15_13b",
        "benchmark=mme",
        "benchmark.prompt=llava",
        "scoring.mode=generate",
        "model.dtype=float16",
    )
    settings = job_settings(cfg)
    comparisons = compare(load_table(), settings, {"mme/perception_score": 1525.0})
    assert parity_metrics(comparisons) == {
        "parity": "match",
        "published_mme/perception_score": 1531.3,
        "published_delta_mme/perception_score": pytest.approx(-6.3),
    }
    assert parity_line(comparisons, settings) is None
    # On MME, scoring.parser=mme is MME's native rule: not a cause.
    same = settings | {"scoring.parser": "mme"}
    off = compare(load_table(), same, {"mme/perception_score": 1400.0})
    assert "scoring.parser" not in parity_line(off, same)
    # On POPE it is another rule than POPE's (LLaVA's eval_pope.py): a cause, in its place.
    pope = job_settings(
        composed(
            "model=llava15_13b",
            "benchmark=pope",
            "benchmark.prompt=llava",
            "scoring.mode=generate",
            "scoring.parser=mme",
            "model.dtype=float16",
        )
    )
    off = compare(load_table(), pope, {})
    assert parity_metrics(off)["parity"] == "differs"  # no value: never a match
    assert "likely causes: 1) scoring.parser=mme (published: native); 2) image:" in (
        parity_line(off, pope)
    )


def test_a_published_sum_and_a_deliberate_difference_are_labelled():
    qwen = job_settings(composed("model=qwen2_vl_7b", "benchmark=mme"))
    [sum_of_both] = compare(
        load_table(), qwen, {"mme/perception_score": 1700.0, "mme/cognition_score": 620.0}
    )
    assert sum_of_both.value == 2320.0 and sum_of_both.delta == pytest.approx(-6.8)
    assert sum_of_both.within  # tolerance 30
    llava = job_settings(composed("model=llava15_7b", "benchmark=hallusionbench"))
    found = compare(
        load_table(),
        llava,
        {"hallusionbench/aAcc": 0.47, "hallusionbench/qAcc": 0.11, "hallusionbench/fAcc": 0.25},
    )
    assert sorted(c.entry.metric.split("/")[1] for c in found) == ["aAcc", "fAcc", "qAcc"]
    out = parity_metrics(found)
    assert out["parity"] == "match" and "judged by GPT-4" in out["parity_note"]
    # Only the data the figures are over: one HallusionBench split, one POPE split, or
    # random weights are not compared.
    half = llava | {"benchmark.split": "image"}
    assert compare(load_table(), half, {}) == []
    pope = job_settings(composed("model=llava15_7b", "benchmark=pope"))
    assert len(compare(load_table(), pope, {})) == 1
    assert compare(load_table(), pope | {"benchmark.subsets": "random"}, {}) == []
    assert compare(load_table(), pope | {"model.weights": "random"}, {}) == []


# ---- bad tables ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"source": ""}, "entry 1: source must be non-empty text"),
        ({"tolerance": -1}, "entry 1: tolerance must be >= 0"),
        ({"model": "gpt5"}, "entry 1: model 'gpt5' is not a preset of conf/model"),
        ({"figure": "high"}, "entry 1: figure must be a finite number"),
        ({"scoring": "vibes"}, "entry 1: scoring must be one of"),
        ({"benchmark": "pope2"}, "entry 1: benchmark 'pope2' is not one of beaf, hallusionbench"),
    ],
)
def test_a_bad_entry_is_one_line_naming_it(tmp_path, change, message):
    path = write_table(tmp_path / "t.yaml", [toy_entry("accuracy", 0.5, 0.1) | change])
    with pytest.raises(UsageError, match=message):
        load_table(path)


def test_an_entry_without_a_tolerance_is_refused(tmp_path):
    entry = toy_entry("accuracy", 0.5, 0.1)
    del entry["tolerance"]
    with pytest.raises(UsageError, match="entry 1: lacks tolerance"):
        load_table(write_table(tmp_path / "t.yaml", [entry]))


def test_a_missing_table_stops_the_job_before_the_model_loads(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "nowhere.yaml"
    code, err = run_main_stderr(
        [*TOY, "runtime.cache_dir=null", f"runtime.published_table={missing}"],
        tmp_path,
        monkeypatch,
        capsys,
    )
    assert code == 2
    assert err.strip().splitlines() == [
        f"error: runtime.published_table={missing}: cannot be read "
        f"([Errno 2] No such file or directory: '{missing}')"
    ]


def test_a_misspelt_metric_for_the_job_stops_it_before_the_model_loads(
    tmp_path, monkeypatch, capsys
):
    table = write_table(tmp_path / "t.yaml", [toy_entry("paired_acc", 0.5, 0.1)])
    code, err = run_main_stderr(
        [*TOY, "runtime.cache_dir=null", f"runtime.published_table={table}"],
        tmp_path,
        monkeypatch,
        capsys,
    )
    assert code == 2
    [line] = err.strip().splitlines()
    assert line.startswith(f"error: {table}: metric 'paired_acc' is not one a toy job logs: ")
    assert "paired_accuracy, " in line and "paired_accuracy_se" not in line
    assert not (tmp_path / "outputs" / "runs").exists() or not any(
        (tmp_path / "outputs" / "runs").rglob("metrics.json")
    )


def test_a_template_of_ones_own_is_the_prompt_cause_even_with_the_published_preset():
    cfg = composed(
        "model=llava15_7b",
        "benchmark=pope",
        "benchmark.prompt=llava",
        "benchmark.template='Q: {question}'",
        "scoring.mode=generate",
        "model.dtype=float16",
    )
    settings = job_settings(cfg)
    line = parity_line(compare(load_table(), settings, {"pope/mean_f1": 0.5}), settings)
    causes = line.split("likely causes: ")[1]
    assert causes.startswith(
        "1) benchmark.template='Q: {question}' (published: benchmark.prompt=llava); 2) image: "
    )
