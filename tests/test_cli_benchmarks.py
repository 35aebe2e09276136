"""Every benchmark end to end through the CLI on the tiny model, from local data in its
published layout; and the dry run."""

import json
from concurrent.futures import ThreadPoolExecutor

import mlflow
import pandas as pd
import pytest
from benchmark_fixtures import (
    SHARED,
    needs_shared,
    write_beaf,
    write_hallusionbench,
    write_mme,
    write_naturalbench,
    write_pope,
    write_sugarcrepe_images,
    write_winoground,
)
from cli import SHARED_METRICS, read_metrics, run_cli

from sysattn_exp.benchmarks import STAT_METRICS


def prepare(root):
    """{benchmark: (overrides, expected items, native metric names)}"""
    write_mme(root / "mme")
    if SHARED.is_dir():
        records = json.loads((SHARED / "hallusionbench" / "HallusionBench.json").read_text())
        write_hallusionbench(root / "hb", records)
        write_sugarcrepe_images(SHARED / "sugarcrepe", root / "coco")
    write_naturalbench(root / "nb", n_samples=3)
    write_winoground(root / "wino", n_examples=3)
    write_beaf(root / "beaf")
    write_pope(root / "pope")
    return {
        "mme": (
            [
                f"benchmark.data_dir={root / 'mme' / 'txt'}",
                f"benchmark.image_dir={root / 'mme' / 'img'}",
                "benchmark.prompt=llava",  # the preset of LLaVA-1.5's published MME numbers
            ],
            8,
            [
                "mme/existence/acc",
                "mme/artwork/acc_plus",
                "mme/code_reasoning/score",
                "mme/perception_score",
                "mme/cognition_score",
            ],
        ),
        "hallusionbench": (
            [
                f"benchmark.data_dir={root / 'hb' / 'data'}",
                f"benchmark.image_dir={root / 'hb' / 'images'}",
                "benchmark.limit=5",
            ],
            None,
            [
                "hallusionbench/aAcc",
                "hallusionbench/qAcc",
                "hallusionbench/fAcc",
                "hallusionbench/aAcc_image",
                "hallusionbench/qAcc_image",
                "n_no_image_items",
            ],
        ),
        "naturalbench": (
            [f"benchmark.data_dir={root / 'nb'}"],
            12,
            [
                "naturalbench/yesno_acc",
                "naturalbench/yesno_q_acc",
                "naturalbench/yesno_i_acc",
                "naturalbench/yesno_g_acc",
            ],
        ),
        "winoground": (
            [f"benchmark.data_dir={root / 'wino'}"],
            12,
            ["winoground/text_score", "winoground/image_score", "winoground/group_score"],
        ),
        "sugarcrepe": (
            [
                f"benchmark.data_dir={SHARED / 'sugarcrepe'}",
                f"benchmark.image_dir={root / 'coco'}",
                "benchmark.subsets=[add_att,swap_obj]",
                "benchmark.limit=4",
            ],
            8,
            [
                "sugarcrepe/add_att/pyes_acc",
                "sugarcrepe/add_att/paired_accuracy",
                "sugarcrepe/mean_pyes_acc",
                "sugarcrepe/mean_paired_accuracy",
            ],
        ),
        "beaf": (
            [f"benchmark.data_dir={root / 'beaf'}"],
            9,
            ["beaf/TU", "beaf/IG", "beaf/SB_p", "beaf/SB_n", "beaf/ID", "beaf/accuracy", "beaf/f1"],
        ),
        "pope": (
            [
                f"benchmark.data_dir={root / 'pope' / 'coco'}",
                f"benchmark.image_dir={root / 'pope' / 'val2014'}",
                "benchmark.subsets=[random,adversarial]",
            ],
            8,
            [
                "pope/random/accuracy",
                "pope/random/f1",
                "pope/adversarial/recall",
                "pope/adversarial/yes_ratio",
                "pope/mean_accuracy",
                "pope/mean_f1",
                "pope/mean_yes_ratio",
            ],
        ),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    cases = prepare(root)

    def one(name):
        cwd = tmp_path_factory.mktemp(name)
        overrides = [
            "model=tiny",
            f"benchmark={name}",
            *cases[name][0],
            "intervention=redistribute",
            "layers=q4",
        ]
        return cwd, run_cli(*overrides, cwd=cwd)

    names = [name for name in cases if SHARED.is_dir() or name not in FROM_SHARED]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(names, pool.map(one, names), strict=True))
    return cases, results


FROM_SHARED = {"hallusionbench", "sugarcrepe"}  # built from the real annotation files


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=needs_shared) if name in FROM_SHARED else name
        for name in [
            "mme",
            "hallusionbench",
            "naturalbench",
            "winoground",
            "sugarcrepe",
            "beaf",
            "pope",
        ]
    ],
)
def test_benchmark_runs_end_to_end(runs, name):
    cases, results = runs
    cwd, result = results[name]
    assert result.returncode == 0, result.stderr[-3000:]
    (job,) = (cwd / "outputs" / "runs").iterdir()
    metrics = read_metrics(job)
    predictions = pd.read_parquet(job / "predictions.parquet")
    expected_items = cases[name][1]
    if expected_items is not None:
        assert metrics["n_items"] == len(predictions) == expected_items
    for key in SHARED_METRICS + cases[name][2]:
        assert key in metrics, key
    native = [k for k in cases[name][2] if not k.startswith("n_")]
    assert all(f"baseline_{k}" in metrics for k in native)
    # Every native metric given statistics (STAT_METRICS) has them, as the shared ones do.
    for stat in STAT_METRICS[name]:
        for suffix in ("se", "ci_low", "ci_high", "change_ci_low", "change_ci_high", "change_p"):
            assert f"{stat}_{suffix}" in metrics, f"{stat}_{suffix}"
    assert (predictions["prompt"].str.endswith(" ASSISTANT:")).all()
    mlflow.set_tracking_uri(f"sqlite:///{cwd}/outputs/mlflow.db")
    (run,) = mlflow.search_runs(experiment_names=["sysattn"], output_format="list")
    logged = {k: v for k, v in metrics.items() if v is not None and not isinstance(v, str)}
    assert run.data.metrics.keys() == logged.keys()
    assert run.data.params["kernel_path"] == metrics["kernel_path"]  # text: a param
    assert run.data.params["benchmark.name"] == name


def test_mme_llava_prompt_reaches_the_model(runs):
    (job,) = (runs[1]["mme"][0] / "outputs" / "runs").iterdir()
    prompts = pd.read_parquet(job / "predictions.parquet")["prompt"]
    short = "?\nAnswer the question using a single word or phrase. ASSISTANT:"
    assert prompts.str.endswith(short).all() and not prompts.str.contains("yes or no").any()


@needs_shared
def test_hallusionbench_limit_keeps_whole_question_pairs(runs):
    _, results = runs
    cwd, _ = results["hallusionbench"]
    (job,) = (cwd / "outputs" / "runs").iterdir()
    predictions = pd.read_parquet(job / "predictions.parquet")
    records = json.loads((SHARED / "hallusionbench" / "HallusionBench.json").read_text())
    key = lambda r: f"{r['category']}_{r['subcategory']}_{r['set_id']}_{r['question_id']}"  # noqa: E731
    # Whole pairs, their questions without a figure included (scored with no image).
    first_five = list(dict.fromkeys(key(r) for r in records))[:5]
    sizes = {k: sum(key(r) == k for r in records) for k in first_five}
    assert predictions.groupby("group_id").size().to_dict() == sizes
    no_image = sum(key(r) in sizes and r["visual_input"] == "0" for r in records)
    assert no_image > 0 and predictions["image_id"].isna().sum() == no_image


def test_dry_run_prints_counts_prompt_and_token_split(tmp_path):
    result = run_cli(
        "model=tiny", "benchmark=toy", "runtime.dry_run=true", "benchmark.limit=3", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "benchmark toy: n_items=6, n_groups=3, gt_yes_rate=0.5" in out
    assert (
        "USER: <image>\nIs there a red circle in the image? Please answer yes or no. ASSISTANT:"
        in out
    )
    assert "tokens for builtin:tiny: system=" in out and "image=16" in out
    assert "loading builtin:tiny" not in out + result.stderr  # the model is not loaded
    assert not list(tmp_path.rglob("metrics.json"))
