"""The issue's image cases through the real command line, on the toy model (copies of
shared/cases/01 and 02 in tests/data/cases): a JPEG cut short is found before the model
loads and its group dropped with skip_missing_images; an RGBA and a palette PNG with
transparency score exactly as the RGB PNG of the same picture."""

import shutil
from pathlib import Path

import pandas as pd
import pytest
from cli import read_metrics, run_cli

CASES = Path(__file__).parent / "data" / "cases"
OFFLINE = ("model=toy", "benchmark=jsonl", "runtime.num_workers=0")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each case's run, in a folder of its own, with one MLflow store between them."""
    root = tmp_path_factory.mktemp("cases")
    uri = f"tracking.uri=sqlite:///{root}/mlruns.db"
    for case in ("01-truncated-image-skip", "02-rgba-transparency"):
        shutil.copytree(CASES / case, root / case)
    out = {}
    for name, case, extra in (
        ("skip", "01-truncated-image-skip", ["benchmark.skip_missing_images=true"]),
        (
            "transparency",
            "02-rgba-transparency",
            ["runtime.cache_dir=null", "benchmark.template='{question} Please answer yes or no.'"],
        ),
    ):
        data = root / case / "data.jsonl"
        out[name] = run_cli(*OFFLINE, f"benchmark.path={data}", uri, *extra, cwd=root / case)
    return root, out


def job_dir(folder: Path) -> Path:
    (metrics,) = (folder / "outputs" / "runs").rglob("metrics.json")
    return metrics.parent


def test_truncated_image_group_is_skipped_and_counted(runs):
    root, out = runs
    assert out["skip"].returncode == 0, out["skip"].stderr[-2000:]
    metrics = read_metrics(job_dir(root / "01-truncated-image-skip"))
    assert metrics["n_skipped_items"] == 2
    assert metrics["n_items"] == 2 and metrics["n_groups"] == 1
    predictions = pd.read_parquet(job_dir(root / "01-truncated-image-skip") / "predictions.parquet")
    assert set(predictions["group_id"]) == {"ok"}


def test_transparent_png_scores_as_the_rgb_one(runs):
    root, out = runs
    assert out["transparency"].returncode == 0, out["transparency"].stderr[-2000:]
    rows = pd.read_parquet(job_dir(root / "02-rgba-transparency") / "predictions.parquet")
    rows = rows.set_index("item_id")
    for form in ("rgba", "p_trans"):
        for suffix in ("-y", "-n"):
            for column in ("yes_logit", "no_logit"):
                mine, reference = rows.at[form + suffix, column], rows.at["rgb" + suffix, column]
                assert abs(mine - reference) < 1e-5, (form, suffix, column)
    # The case's README: the RGB picture's yes question, yes_logit 6.1060, p_yes 0.7927.
    assert abs(rows.at["rgba-y", "yes_logit"] - 6.1060) < 1e-3
    assert abs(rows.at["rgba-y", "p_yes"] - 0.7927) < 1e-3
