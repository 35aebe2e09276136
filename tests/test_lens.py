"""The logit lens through the CLI (+task=lens), in the order a researcher runs it: a
baseline, then a lens job with an intervention into the same store. The lens at the last
layer equals each condition's own scores; its plot draws the table's means; the files are
logged to MLflow. (Layer-by-layer exactness on every family: tests/test_families.py.)"""

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from cli import run_cli
from matplotlib.figure import Figure

from sysattn_exp.evaluation.lens import lens_plot


@pytest.fixture(scope="module")
def lens_job(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("lens")
    common = ("model=tiny", "benchmark.limit=6")
    baseline = run_cli(*common, "hydra.run.dir=baseline", cwd=cwd)
    assert baseline.returncode == 0, baseline.stderr[-3000:]
    result = run_cli(
        *common, "+task=lens", "intervention=redistribute", "layers=q4", "hydra.run.dir=lens",
        cwd=cwd,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd


def test_lens_table_ends_in_each_conditions_own_scores(lens_job):
    table = pd.read_parquet(lens_job / "lens" / "lens.parquet")
    columns = ["item_id", "group_id", "label", "condition", "layer", "log_odds", "p_yes"]
    assert list(table.columns) == columns
    predictions = pd.read_parquet(lens_job / "lens" / "predictions.parquet")
    baseline = pd.read_parquet(lens_job / "baseline" / "predictions.parquet")
    assert len(table) == 2 * len(predictions) * 8  # two conditions, 8 layers of the tiny model
    last = table[table["layer"] == 7].set_index(["condition", "item_id"])
    for condition, scores in (("intervention", predictions), ("baseline", baseline)):
        scores = scores.set_index("item_id")
        got = last.loc[condition].loc[scores.index]
        assert np.allclose(got["log_odds"], scores["yes_logit"] - scores["no_logit"], atol=1e-5)
        assert np.allclose(got["p_yes"], scores["p_yes"], atol=1e-6)
        assert (got["label"] == scores["label"]).all()
    # Before Q4 (layers 6-7) the intervention has not acted yet: the same readings.
    early = table[table["layer"] < 6].pivot_table(
        index=["item_id", "layer"], columns="condition", values="log_odds"
    )
    assert np.allclose(early["baseline"], early["intervention"], atol=1e-5)
    later = table[table["layer"] == 7].pivot_table(
        index="item_id", columns="condition", values="log_odds"
    )
    assert (later["baseline"] - later["intervention"]).abs().max() > 1e-4


def test_lens_job_is_logged_with_its_files(lens_job):
    mlflow.set_tracking_uri(f"sqlite:///{lens_job}/outputs/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["sysattn"], output_format="list")
    assert len(runs) == 2  # the baseline and the lens job, each its own job
    (lens_run,) = [r for r in runs if r.data.params.get("runtime.lens") == "True"]
    files = {f.path for f in mlflow.MlflowClient().list_artifacts(lens_run.info.run_id)}
    assert {"lens.parquet", "lens.png"} <= files
    key = yaml.safe_load((lens_job / "lens" / "config.yaml").read_text())["job"]["key"]
    assert key != yaml.safe_load((lens_job / "baseline" / "config.yaml").read_text())["job"]["key"]


def test_lens_plot_draws_the_mean_log_odds_by_layer(lens_job, tmp_path, monkeypatch):
    table = pd.read_parquet(lens_job / "lens" / "lens.parquet")
    drawn, savefig = {}, Figure.savefig

    def keep(fig, fname, *args, **kwargs):
        for line in fig.axes[0].get_lines():
            drawn[line.get_label()] = (list(line.get_xdata()), list(line.get_ydata()))
        return savefig(fig, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    lens_plot(table, tmp_path / "lens.png", "title")
    for condition in ("baseline", "intervention"):
        for label, word in ((True, "yes"), (False, "no")):
            rows = table[(table["condition"] == condition) & (table["label"] == label)]
            want = rows.groupby("layer")["log_odds"].mean()
            x, y = drawn[f"{condition}, {word}-label items"]
            assert x == list(range(8)) and np.allclose(y, want.to_numpy())


def test_lens_in_generate_mode_is_refused(tmp_path):
    result = run_cli("model=tiny", "+task=lens", "scoring.mode=generate", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: runtime.lens reads the logit mode's answer row; use scoring.mode=logit"
    )
