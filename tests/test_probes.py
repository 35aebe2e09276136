"""Linear probes and minimal-pair separation (runtime.probes, evaluation/probes.py) through
the CLI on the toy model, each figure checked against an independent computation on states
this test extracts itself: the model's own output_hidden_states of whole prompts, one
prompt at a time, under the job's intervention where it acts. The probe's accuracy equals
scikit-learn's cross_val_predict on those states with the same folds, its interval a naive
loop over the bootstrap's group draws; the separation, numpy's cosine on the same pairs;
the splits by flips, counts from flips.parquet. The states are on disk while scored
(a memmap, deleted after use), never one (L, N, H) array in RAM."""

import itertools

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from cli import run_main, run_main_stderr
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import PredefinedSplit, StratifiedGroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from sysattn_exp.benchmarks import load_benchmark
from sysattn_exp.evaluation.probe_plots import lens_flips_table
from sysattn_exp.evaluation.probes import LayerStates, Recorders, probe_folds, state_stores
from sysattn_exp.evaluation.scoring import encode_full_prompts, score_items
from sysattn_exp.evaluation.stats import draw_groups
from sysattn_exp.experiment.conditions import build_edit, intervention_rule, resolve_layers
from sysattn_exp.experiment.identity import job_key
from sysattn_exp.experiment.job_yes_no import item_prompts, scoring_words
from sysattn_exp.models.loading import load_model

SAMPLES = 200  # stats.bootstrap_samples of the job: enough for an interval, fast to loop
JOB = ("model=toy", "+task=lens", "intervention=redistribute", "layers=q4")

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def config(*overrides: str):
    with initialize_config_module("sysattn_exp.conf", version_base="1.3"):
        return compose("config", overrides=["model=toy", "benchmark=toy", *overrides])


@pytest.fixture(scope="module")
def probes_job(tmp_path_factory):
    """The researcher's command, run as main() in this process (the toy model and torch are
    loaded once for the module)."""
    cwd = tmp_path_factory.mktemp("probes")
    overrides = (*JOB, "runtime.probes=true", f"stats.bootstrap_samples={SAMPLES}")
    with pytest.MonkeyPatch.context() as patch:
        assert run_main(cwd, patch, *overrides, "hydra.run.dir=job") == 0
    return cwd / "job"


@pytest.fixture(scope="module")
def toy():
    """The toy model, its benchmark, and every item's answer-position state at each
    decoder layer, (L, N, H), for the baseline and the job's intervention: whole prompts
    through the model's own forward, one prompt at a time, each layer's output taken by a
    forward hook on the layer (output_hidden_states gives the same for every layer but the
    last, whose entry there is after the final norm)."""
    cfg = config("intervention=redistribute", "layers=q4")
    loaded = load_model(cfg.model)
    bench = load_benchmark(cfg.benchmark)
    prompts = item_prompts(bench, loaded.prompt_format(cfg.model))
    layers = resolve_layers(cfg.layers, loaded.num_layers)
    edit = build_edit(intervention_rule(cfg.intervention), layers)
    states = {"baseline": [], "intervention": []}
    outputs = []
    hooks = [
        layer.register_forward_hook(lambda m, a, out: outputs.append(out[0, -1].clone()))
        for layer in loaded.model.get_decoder().layers
    ]
    try:
        for item, prompt in zip(bench.items, prompts, strict=True):
            image = bench.load_image(item.image_id)
            inputs, modality = encode_full_prompts(loaded, [image], [prompt], [item.question])
            for condition, rule in (("baseline", None), ("intervention", edit)):
                outputs.clear()
                with torch.no_grad():
                    hidden = loaded.model(
                        **inputs,
                        key_modality=modality,
                        attention_edit=rule,
                        output_hidden_states=True,
                    ).hidden_states
                for layer, output in enumerate(outputs[:-1]):
                    assert torch.allclose(output, hidden[layer + 1][0, -1], atol=1e-6)
                states[condition].append(torch.stack(outputs).numpy())
    finally:
        for hook in hooks:
            hook.remove()
    states = {c: np.stack(s, axis=1) for c, s in states.items()}
    return cfg, loaded, bench, prompts, states


def items_frame(bench) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "item_id": [i.item_id for i in bench.items],
            "group_id": [i.group_id for i in bench.items],
            "label": [bool(i.label) for i in bench.items],
        }
    )


def answers(job) -> dict[str, pd.DataFrame]:
    """Each condition's answers, item order: the intervention's from predictions.parquet,
    the baseline's from the lens at the last layer (its own scores: tests/test_lens.py)."""
    predictions = pd.read_parquet(job / "predictions.parquet")
    lens = pd.read_parquet(job / "lens.parquet")
    last = lens[(lens["condition"] == "baseline") & (lens["layer"] == lens["layer"].max())]
    baseline = predictions[["item_id", "label"]].merge(last[["item_id", "log_odds"]])
    baseline["pred"] = baseline["log_odds"] > 0
    baseline["correct"] = baseline["pred"] == baseline["label"]
    return {"baseline": baseline, "intervention": predictions}


def test_probe_accuracy_equals_sklearn_on_the_models_own_states(probes_job, toy):
    _, loaded, bench, _, states = toy
    items = items_frame(bench)
    labels, groups = items["label"].to_numpy(), items["group_id"].to_numpy()
    # The documented folds: StratifiedGroupKFold, 5 folds, groups shuffled with seed 0.
    splitter = StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=0)
    fold = np.empty(len(labels), int)
    for f, (_, test) in enumerate(splitter.split(labels, labels, groups)):
        fold[test] = f
    probes = pd.read_csv(probes_job / "probes.csv")
    assert list(probes.columns) == [
        "condition", "layer", "accuracy", "ci_low", "ci_high", "n_items", "n_groups", "folds",
    ]  # fmt: skip
    assert len(probes) == 2 * loaded.num_layers
    assert (probes["n_items"] == 72).all() and (probes["n_groups"] == 36).all()
    assert (probes["folds"] == 5).all()
    ids = np.sort(np.unique(groups))
    members = [np.flatnonzero(groups == g) for g in ids]
    for row in probes.itertuples():
        probe = make_pipeline(
            StandardScaler(), LogisticRegression(C=1.0, max_iter=1000, random_state=0)
        )
        x = states[row.condition][row.layer]
        predicted = cross_val_predict(probe, x, labels, cv=PredefinedSplit(fold))
        correct = predicted == labels
        assert row.accuracy == pytest.approx(correct.mean(), abs=1e-12), row
        # The interval: a naive loop over the bootstrap's group draws (seed 0).
        resampled = [
            np.mean(np.concatenate([correct[members[g]] for g in draw]))
            for draws in draw_groups(len(ids), SAMPLES, 0)
            for draw in draws
        ]
        low, high = np.percentile(resampled, [2.5, 97.5])
        assert (row.ci_low, row.ci_high) == pytest.approx((low, high), abs=1e-12), row
    # The toy model decodes its label well above chance at its last two layers.
    assert probes[probes["layer"] >= 2]["accuracy"].min() > 0.7


def test_folds_never_split_a_group():
    rng = np.random.default_rng(0)
    for n_groups in (2, 3, 7, 40):
        groups = rng.integers(0, n_groups, size=5 * n_groups)
        groups[:n_groups] = np.arange(n_groups)  # every group present
        labels = rng.integers(0, 2, size=len(groups)).astype(bool)
        fold = probe_folds(labels, groups)
        assert fold.min() == 0 and fold.max() == min(5, n_groups) - 1
        for g in range(n_groups):
            assert len(np.unique(fold[groups == g])) == 1, (n_groups, g)
    with pytest.raises(ValueError, match="at least 2 groups"):
        probe_folds([True, False], ["a", "a"])


def independent_pairs(items: pd.DataFrame) -> list[tuple[int, int]]:
    """Every two items of one group with different labels, by a loop over groups."""
    pairs = []
    for _, group in items.groupby("group_id"):
        for i, j in itertools.combinations(sorted(group.index), 2):
            if items.at[i, "label"] != items.at[j, "label"]:
                pairs.append((i, j))
    return pairs


def pair_kind(pred, correct, i, j) -> str:
    if pred[i] and pred[j]:
        return "yes_yes"
    return "right" if correct[i] and correct[j] else "other"


def test_separation_equals_numpy_cosines_on_the_models_own_states(probes_job, toy):
    _, loaded, bench, _, states = toy
    items = items_frame(bench)
    pairs = independent_pairs(items)
    assert len(pairs) == 36  # every toy group is one yes and one no question
    table = pd.read_csv(probes_job / "separation.csv")
    assert list(table.columns) == ["condition", "layer", "pair_kind", "mean_distance", "n_pairs"]
    table = table.set_index(["condition", "layer", "pair_kind"])
    for condition, frame in answers(probes_job).items():
        pred, correct = frame["pred"].to_numpy(), frame["correct"].to_numpy()
        kinds = [pair_kind(pred, correct, i, j) for i, j in pairs]
        for layer in range(loaded.num_layers):
            h = states[condition][layer]
            distance = [
                1 - h[i] @ h[j] / (np.linalg.norm(h[i]) * np.linalg.norm(h[j])) for i, j in pairs
            ]
            for kind in ("yes_yes", "right", "other"):
                chosen = [d for d, k in zip(distance, kinds, strict=True) if k == kind]
                row = table.loc[(condition, layer, kind)]
                assert row["n_pairs"] == len(chosen)
                if chosen:  # float32 states of prefix-shared batches vs whole prompts
                    assert row["mean_distance"] == pytest.approx(np.mean(chosen), abs=2e-5)
                else:
                    assert np.isnan(row["mean_distance"])
    # Pairs the baseline answers yes to both are closer at the last layer than right ones.
    last = table.loc[("baseline", loaded.num_layers - 1)]
    assert last.loc["yes_yes", "mean_distance"] < last.loc["right", "mean_distance"]


def test_the_splits_by_flips_count_the_flipped_items(probes_job, toy):
    _, loaded, bench, _, states = toy
    items = items_frame(bench)
    flipped = pd.read_parquet(probes_job / "flips.parquet")
    assert len(flipped) > 0  # the toy job flips some answers (else this test checks little)
    effect = dict.fromkeys(items["item_id"], "unchanged")
    effect |= dict(zip(flipped["item_id"], flipped["right"].map(
        {"intervention": "fixed", "baseline": "broken"}), strict=True))  # fmt: skip
    kinds = {}
    for i, j in independent_pairs(items):
        both = {effect[items.at[i, "item_id"]], effect[items.at[j, "item_id"]]}
        fixed, broken = "fixed" in both, "broken" in both
        kinds[(i, j)] = (
            "mixed" if fixed and broken else "fixed" if fixed else "broken" if broken
            else "unchanged"
        )  # fmt: skip
    table = pd.read_csv(probes_job / "separation_flips.csv").set_index(
        ["condition", "layer", "flip"]
    )
    for condition in ("baseline", "intervention"):
        for layer in range(loaded.num_layers):
            h = states[condition][layer]
            for kind in ("fixed", "broken", "mixed", "unchanged"):
                chosen = [p for p, k in kinds.items() if k == kind]
                row = table.loc[(condition, layer, kind)]
                assert row["n_pairs"] == len(chosen)
                if chosen:
                    distance = [1 - h[i] @ h[j] / np.linalg.norm(h[i]) / np.linalg.norm(h[j])
                                for i, j in chosen]  # fmt: skip
                    assert row["mean_distance"] == pytest.approx(np.mean(distance), abs=2e-5)
    # The lens split (lens_flips.png's numbers): the label-signed log-odds by flip class.
    lens = pd.read_parquet(probes_job / "lens.parquet")
    got = lens_flips_table(lens, pd.Series(effect)).set_index(["condition", "flip", "layer"])
    lens["signed"] = np.where(lens["label"], lens["log_odds"], -lens["log_odds"])
    lens["flip"] = lens["item_id"].map(effect)
    want = lens.groupby(["condition", "flip", "layer"])["signed"].agg(["mean", "count"])
    assert len(got) == len(want)
    for key, row in want.iterrows():
        assert got.loc[key, "mean_right_log_odds"] == pytest.approx(row["mean"], abs=1e-12)
        assert got.loc[key, "n_items"] == row["count"]


def test_probes_job_is_logged_with_its_files_and_leaves_no_states(probes_job):
    names = {
        "probes.csv", "probes.png", "separation.csv", "separation.png",
        "separation_flips.csv", "separation_flips.png", "lens_flips.png",
    }  # fmt: skip
    assert names <= {p.name for p in probes_job.iterdir()}
    assert not list(probes_job.glob(".states-*"))  # the states on disk were deleted
    mlflow.set_tracking_uri(f"sqlite:///{probes_job.parent}/outputs/mlflow.db")
    (run,) = mlflow.search_runs(experiment_names=["sysattn"], output_format="list")
    assert run.data.params["runtime.probes"] == "True"
    files = {f.path for f in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert names <= files
    config = yaml.safe_load((probes_job / "config.yaml").read_text())
    assert config["runtime"]["probes"] is True


def test_states_stream_to_disk_a_batch_at_a_time(toy, tmp_path):
    cfg, loaded, bench, prompts, states = toy
    words = scoring_words(loaded, cfg.scoring, prompts[0])
    n, depth = len(bench.items), loaded.num_layers
    hidden = loaded.text_config.hidden_size
    with state_stores(tmp_path, ["baseline"], depth, n, hidden) as stores:
        store = stores["baseline"]
        assert isinstance(store, LayerStates)
        # A memmap over a file, not an array in RAM: (L, N, H) float32 on disk.
        assert isinstance(store.array, np.memmap)
        assert store.path.exists() and store.path.parent.parent == tmp_path
        assert store.path.stat().st_size >= depth * n * hidden * 4
        score_items(loaded, bench, prompts, None, words, 16, 0, "t", lens=Recorders(store))
        on_disk = np.load(store.path, mmap_mode="r")
        assert on_disk.shape == (depth, n, hidden) and on_disk.dtype == np.float32
        assert np.allclose(on_disk, states["baseline"], atol=1e-4)
        assert store.layer(1).shape == (n, hidden)  # what is read into RAM: one layer
        folder = store.path.parent
    assert not folder.exists()  # deleted after use


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ("scoring.mode=generate",),
            "error: runtime.probes reads the logit mode's answer row; use scoring.mode=logit",
        ),
        (
            ("benchmark.limit=1",),
            "error: runtime.probes cross-validates by group and needs at least 2 groups; "
            "benchmark toy has 1",
        ),
    ],
)
def test_probes_in_generate_mode_or_on_one_group_are_refused(
    tmp_path, monkeypatch, capsys, overrides, message
):
    overrides = ("model=toy", "runtime.probes=true", *overrides)
    status, err = run_main_stderr(overrides, tmp_path, monkeypatch, capsys)
    assert status == 2
    assert err.strip() == message


def test_probes_off_keep_the_job_key_and_on_change_it():
    composed = OmegaConf.to_container(config("runtime.probes=false"), resolve=True)
    runtime = {k: v for k, v in composed["runtime"].items() if k != "probes"}
    before = {**composed, "runtime": runtime}  # the config before runtime.probes existed
    condition = {"model": "builtin:toy"}
    assert job_key(composed, condition) == job_key(before, condition)
    composed["runtime"]["probes"] = True
    assert job_key(composed, condition) != job_key(before, condition)
