"""The job statistics (evaluation.stats): McNemar equals scipy's exact binomial test, the
vectorised cluster bootstrap equals a naive loop over the same group draws, the paired
bootstrap's 95% interval covers a known change about 95% of the time, McNemar rejects at
most ~5% of data sets with no change, edge cases give values; and a job through the real
command line writes the statistics and flips.parquet."""

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
from cli import read_metrics, run_main
from scipy.stats import binomtest, bootstrap, norm

from sysattn_exp.benchmarks import SummedStatistics
from sysattn_exp.evaluation import stats
from sysattn_exp.evaluation.stats import (
    SHARED,
    draw_groups,
    flip_counts,
    flips,
    job_statistics,
    mcnemar_test,
)


def frame(group_id, label, pred) -> pd.DataFrame:
    label, pred = np.asarray(label, bool), np.asarray(pred, bool)
    n = len(label)
    return pd.DataFrame(
        {
            "item_id": [f"i{k}" for k in range(n)],
            "group_id": group_id,
            "label": label,
            "pred": pred,
            "correct": pred == label,
            "yes_logit": np.linspace(-1, 1, n),
            "no_logit": np.zeros(n),
        }
    )


def random_pair(rng, n_groups=40, size=3):
    """A baseline and a condition on the same items, groups of unequal (1..size) sizes,
    ids not in order."""
    sizes = rng.integers(1, size + 1, n_groups)
    group_id = np.repeat([f"g{k:03d}" for k in rng.permutation(n_groups)], sizes)
    label = rng.random(len(group_id)) < 0.5
    return (
        frame(group_id, label, rng.random(len(group_id)) < 0.6),
        frame(group_id, label, rng.random(len(group_id)) < 0.4),
    )


# ---- McNemar ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_mcnemar_counts_and_p_equal_scipys_exact_binomial_test(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 200))
    before, after = rng.random(n) < 0.7, rng.random(n) < rng.uniform(0.4, 0.9)
    result = mcnemar_test(before, after)
    b = sum(x and not y for x, y in zip(before, after, strict=True))
    c = sum(y and not x for x, y in zip(before, after, strict=True))
    assert (result["b"], result["c"]) == (b, c)
    expected = binomtest(b, b + c, 0.5).pvalue if b + c else 1.0
    assert result["p"] == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_mcnemar_without_discordant_pairs_gives_p_1():
    same = np.array([True, False, True])
    assert mcnemar_test(same, same) == {"b": 0, "c": 0, "p": 1.0}


def test_mcnemar_rejects_at_most_about_5_percent_without_a_true_change():
    """2,000 paired data sets of 200 items where the baseline and the condition are
    exchangeable (each item right with its own probability, the same under both): the
    exact test at 0.05 rejects at most 5% plus three binomial standard errors."""
    rng = np.random.default_rng(7)
    sets, n = 2000, 200
    ability = rng.uniform(0.2, 0.95, (sets, n))
    before, after = rng.random((sets, n)) < ability, rng.random((sets, n)) < ability
    rejected = sum(mcnemar_test(x, y)["p"] < 0.05 for x, y in zip(before, after, strict=True))
    assert rejected / sets <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / sets)


# ---- the bootstrap against a naive loop ---------------------------------------------


def naive_f1(scored: pd.DataFrame) -> dict:
    """F1 of the yes answers, None without a yes answer or label: a metric that does not
    decompose per item (the stand-in for a benchmark's native metric)."""
    tp = int((scored["pred"] & scored["label"]).sum())
    fp = int((scored["pred"] & ~scored["label"]).sum())
    fn = int((~scored["pred"] & scored["label"]).sum())
    return {"f1": None if tp + fp == 0 or tp + fn == 0 else 2 * tp / (2 * tp + fp + fn)}


def f1_columns(scored: pd.DataFrame) -> pd.DataFrame:
    """Per group: true positives, false positives, false negatives."""
    pred, label = scored["pred"], scored["label"]
    values = pd.DataFrame({"tp": pred & label, "fp": pred & ~label, "fn": ~pred & label})
    return values.astype(float).groupby(scored["group_id"]).sum()


def f1_from_sums(sums) -> dict:
    tp, fp, fn = sums["tp"], sums["fp"], sums["fn"]
    undefined = (tp + fp == 0) | (tp + fn == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"f1": np.where(undefined, np.nan, 2 * tp / (2 * tp + fp + fn))}


# The stand-in for a benchmark's native metrics (benchmarks.STATISTICS): F1 from sums.
F1 = SummedStatistics(("f1",), f1_columns, f1_from_sums)


def naive_metrics(predictions: pd.DataFrame, draw) -> dict:
    """The metrics of one resample, by plain loops: the drawn groups' items, each draw a
    new group."""
    ids = sorted(set(predictions["group_id"]))
    members = {g: [] for g in ids}
    for index, g in enumerate(predictions["group_id"]):
        members[g].append(index)
    rows, groups_right = [], []
    for position, g in enumerate(draw):
        items = members[ids[g]]
        groups_right.append(all(predictions["correct"].iloc[i] for i in items))
        rows += [(position, i) for i in items]
    sample = predictions.iloc[[i for _, i in rows]].reset_index(drop=True)
    sample["group_id"] = [position for position, _ in rows]
    n = len(sample)
    return {
        "accuracy": sum(sample["correct"]) / n,
        "paired_accuracy": sum(groups_right) / len(draw),
        "yes_rate": sum(sample["pred"]) / n,
        "yes_bias": (sum(sample["pred"]) - sum(sample["label"])) / n,
        "f1": naive_f1(sample)["f1"],
    }


def test_the_bootstrap_equals_a_naive_loop_over_the_same_draws():
    rng = np.random.default_rng(3)
    condition, baseline = random_pair(rng, n_groups=12)
    samples, seed = 300, 11
    n_groups = condition["group_id"].nunique()
    draws = np.concatenate(list(draw_groups(n_groups, samples, seed)))
    assert draws.shape == (samples, n_groups)
    naive = {
        which: [naive_metrics(f, draw) for draw in draws]
        for which, f in (("now", condition), ("before", baseline))
    }
    out = job_statistics(condition, baseline, F1, samples, seed)
    for name in [*SHARED, "f1"]:
        now = np.array([np.nan if r[name] is None else r[name] for r in naive["now"]], float)
        before = np.array([np.nan if r[name] is None else r[name] for r in naive["before"]])
        defined = now[np.isfinite(now)]
        assert out[f"{name}_se"] == pytest.approx(np.std(defined, ddof=1), rel=1e-9)
        low, high = np.percentile(defined, [2.5, 97.5])
        assert out[f"{name}_ci_low"] == pytest.approx(low, rel=1e-9, abs=1e-12)
        assert out[f"{name}_ci_high"] == pytest.approx(high, rel=1e-9, abs=1e-12)
        change = (now - before.astype(float))[np.isfinite(now - before.astype(float))]
        low, high = np.percentile(change, [2.5, 97.5])
        assert out[f"{name}_change_ci_low"] == pytest.approx(low, rel=1e-9, abs=1e-12)
        assert out[f"{name}_change_ci_high"] == pytest.approx(high, rel=1e-9, abs=1e-12)
        tail = min(np.sum(change <= 1e-12), np.sum(change >= -1e-12))
        assert out[f"{name}_change_p"] == pytest.approx(min(1, 2 * (1 + tail) / (len(change) + 1)))
        undefined = len(now) - len(defined)
        assert out.get(f"{name}_ci_undefined_resamples", 0) == undefined
    assert out["f1_se"] > 0


def test_the_same_seed_gives_the_same_figures_and_another_seed_others():
    rng = np.random.default_rng(1)
    condition, baseline = random_pair(rng)
    first = job_statistics(condition, baseline, None, 500, 0)
    assert job_statistics(condition, baseline, None, 500, 0) == first
    assert job_statistics(condition, baseline, None, 500, 1) != first


def test_edge_cases_give_values_not_errors():
    one_group = frame(["g"] * 3, [1, 0, 1], [1, 1, 1])
    out = job_statistics(one_group, one_group, None, 50, 0)
    assert out["accuracy_se"] == pytest.approx(0.0, abs=1e-12)
    assert out["accuracy_ci_low"] == pytest.approx(out["accuracy_ci_high"], abs=1e-12)
    assert out["accuracy_change_p"] == 1.0  # every resampled change is 0
    assert out["paired_accuracy_mcnemar_p"] == 1.0
    perfect = frame(["a", "a", "b", "b"], [1, 0, 1, 0], [1, 0, 1, 0])
    out = job_statistics(perfect, perfect, None, 50, 0)
    assert out["paired_accuracy_ci_low"] == pytest.approx(1.0)
    assert out["paired_accuracy_ci_high"] == pytest.approx(1.0)
    never_yes = frame(["a", "b"], [1, 0], [0, 0])
    out = job_statistics(never_yes, None, F1, 50, 0)
    assert out["f1_se"] is None and out["f1_ci_undefined_resamples"] == 50


# ---- BCa against scipy ----------------------------------------------------------------


def per_group(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per group, in sorted id order: items, right answers, TP, FP, FN."""
    pred, label = frame["pred"], frame["label"]
    counts = pd.DataFrame(
        {"items": 1, "correct": frame["correct"], "tp": pred & label, "fp": pred & ~label}
    ).assign(fn=~pred & label)
    summed = counts.astype(int).groupby(frame["group_id"]).sum().sort_index()
    return {k: summed[k].to_numpy() for k in summed}


def scipy_bca(statistic, n_groups: int, samples: int, seed: int):
    """scipy.stats.bootstrap's BCa interval over the group indices, on the same draws
    (draw_groups: rng.integers(0, n_groups, (CHUNK, n_groups)) per batch of CHUNK)."""
    result = bootstrap(
        (np.arange(n_groups),),
        statistic,
        vectorized=True,
        n_resamples=samples,
        batch=stats.CHUNK,
        method="BCa",
        confidence_level=0.95,
        rng=np.random.default_rng(seed),
    )
    return result.confidence_interval


def test_bca_intervals_equal_scipys_bca_on_the_same_resamples():
    rng = np.random.default_rng(9)
    condition, baseline = random_pair(rng, n_groups=30, size=4)
    samples, seed = 600, 21
    out = job_statistics(condition, baseline, F1, samples, seed, method="bca")
    now, before = per_group(condition), per_group(baseline)

    def accuracy(counts, idx):
        return counts["correct"][idx].sum(axis=-1) / counts["items"][idx].sum(axis=-1)

    def f1(counts, idx):
        tp, fp, fn = (counts[k][idx].sum(axis=-1) for k in ("tp", "fp", "fn"))
        return 2 * tp / (2 * tp + fp + fn)

    for name, metric in (("accuracy", accuracy), ("f1", f1)):
        single = scipy_bca(lambda idx, axis=-1, m=metric: m(now, idx), 30, samples, seed)
        assert out[f"{name}_ci_low"] == pytest.approx(single.low, rel=1e-9)
        assert out[f"{name}_ci_high"] == pytest.approx(single.high, rel=1e-9)
        change = scipy_bca(
            lambda idx, axis=-1, m=metric: m(now, idx) - m(before, idx), 30, samples, seed
        )
        assert out[f"{name}_change_ci_low"] == pytest.approx(change.low, rel=1e-9, abs=1e-12)
        assert out[f"{name}_change_ci_high"] == pytest.approx(change.high, rel=1e-9, abs=1e-12)
    percentile = job_statistics(condition, baseline, F1, samples, seed)
    assert percentile["f1_ci_low"] != out["f1_ci_low"]  # another interval, same resamples
    assert percentile["f1_se"] == out["f1_se"] and percentile["f1_change_p"] == out["f1_change_p"]


def test_bca_without_spread_falls_back_to_a_value_not_an_error():
    perfect = frame(["a", "a", "b", "b"], [1, 0, 1, 0], [1, 0, 1, 0])
    out = job_statistics(perfect, perfect, None, 50, 0, method="bca")
    assert out["accuracy_ci_low"] == out["accuracy_ci_high"] == pytest.approx(1.0)
    assert out["accuracy_change_ci_low"] == pytest.approx(0.0)


# ---- coverage of the paired cluster bootstrap ---------------------------------------


def test_the_paired_cluster_bootstrap_covers_the_true_change_about_95_percent():
    """1,000 simulated paired data sets of 60 groups of 3 items, items correlated inside
    a group (a shared group effect) and between baseline and condition (a shared item
    ability): an item is right when ability + noise > threshold, so the true change in
    accuracy is known in closed form. The 95% interval of the change (500 resamples per
    data set, not 10,000, to keep the test to seconds) must cover it in 93-97% of them."""
    rng = np.random.default_rng(2024)
    sets, n_groups, size = 1000, 60, 3
    t_before, t_after = 0.3, -0.1
    scale = np.sqrt(3.0)  # group effect, item effect and noise: each of variance 1
    true_change = norm.cdf(-t_after / scale) - norm.cdf(-t_before / scale)
    group_id = np.repeat(np.arange(n_groups), size)
    label = np.ones(n_groups * size, bool)
    covered = 0
    for k in range(sets):
        ability = np.repeat(rng.normal(size=n_groups), size) + rng.normal(size=len(group_id))
        before = ability + rng.normal(size=len(group_id)) > t_before
        after = ability + rng.normal(size=len(group_id)) > t_after
        out = job_statistics(
            frame(group_id, label, after), frame(group_id, label, before), None, 500, k
        )
        covered += out["accuracy_change_ci_low"] <= true_change <= out["accuracy_change_ci_high"]
    assert 0.93 <= covered / sets <= 0.97


# ---- flips --------------------------------------------------------------------------


def test_flips_lists_every_changed_answer_with_who_is_right():
    baseline = frame(["a", "a", "b", "b"], [1, 0, 1, 0], [1, 1, 0, 0])
    condition = frame(["a", "a", "b", "b"], [1, 0, 1, 0], [0, 0, 0, 1])
    condition["yes_logit"] = [0.5, -2.0, 0.0, 1.0]
    flipped = flips(condition, baseline)
    assert flipped["item_id"].tolist() == ["i0", "i1", "i3"]
    assert flipped["baseline_answer"].tolist() == ["yes", "yes", "no"]
    assert flipped["answer"].tolist() == ["no", "no", "yes"]
    assert flipped["right"].tolist() == ["baseline", "intervention", "baseline"]
    assert flipped["margin_after"].tolist() == [0.5, -2.0, 1.0]
    counts = {"n_flipped_to_yes": 1, "n_flipped_to_no": 2, "n_fixed": 1, "n_broken": 2}
    assert flip_counts(flipped) == counts


def test_generate_mode_flips_compare_the_parsed_answers():
    baseline = frame(["a", "b"], [1, 0], [1, 0])
    condition = frame(["a", "b"], [1, 0], [0, 0])
    baseline["answer"], condition["answer"] = ["yes", "no"], ["unknown", "no"]
    condition["correct"] = [False, True]
    flipped = flips(condition, baseline)
    assert flipped["answer"].tolist() == ["unknown"] and flipped["right"].tolist() == ["baseline"]
    assert flip_counts(flipped)["n_flipped_to_no"] == 0


# ---- through the command line ------------------------------------------------------

TOY = ("model=tiny", "benchmark=toy", "runtime.num_workers=0")


def test_an_intervention_job_writes_statistics_and_flips(tmp_path, monkeypatch):
    common = (*TOY, "stats.bootstrap_samples=300", f"tracking.uri=sqlite:///{tmp_path}/m.db")
    for directory in ("first", "again"):
        overrides = (*common, "intervention=redistribute", f"hydra.run.dir={directory}")
        assert run_main(tmp_path, monkeypatch, *overrides) == 0
    overrides = (*common, "hydra.run.dir=baseline")
    assert run_main(tmp_path, monkeypatch, *overrides) == 0
    metrics = read_metrics(tmp_path / "first")
    for name in SHARED:
        for suffix in ("se", "ci_low", "ci_high", "change_ci_low", "change_ci_high", "change_p"):
            assert metrics[f"{name}_{suffix}"] is not None
    for name in ("accuracy", "paired_accuracy"):
        assert {f"{name}_mcnemar_{k}" for k in "bcp"} <= set(metrics)
    # the same predictions and seed: the same figures
    again = read_metrics(tmp_path / "again")
    assert {k: v for k, v in again.items() if "_ci_" in k or k.endswith(("_se", "_p"))} == {
        k: v for k, v in metrics.items() if "_ci_" in k or k.endswith(("_se", "_p"))
    }
    # flips.parquet equals an independent comparison of the two jobs' predictions
    now = pd.read_parquet(tmp_path / "first" / "predictions.parquet")
    before = pd.read_parquet(tmp_path / "baseline" / "predictions.parquet")
    flipped = pd.read_parquet(tmp_path / "first" / "flips.parquet")
    changed = [k for k in range(len(now)) if now["pred"][k] != before["pred"][k]]
    assert changed  # the toy intervention changes some answers
    assert flipped["item_id"].tolist() == [now["item_id"][k] for k in changed]
    for row, k in zip(flipped.itertuples(), changed, strict=True):
        assert row.baseline_answer == ("yes" if before["pred"][k] else "no")
        assert row.answer == ("yes" if now["pred"][k] else "no")
        assert row.right == ("baseline" if before["correct"][k] else "intervention")
        margin = before["yes_logit"][k] - before["no_logit"][k]
        assert row.margin_before == pytest.approx(margin, abs=1e-6)
    assert metrics["n_fixed"] == sum(now["correct"][k] for k in changed)
    assert metrics["n_broken"] == sum(before["correct"][k] for k in changed)
    b = int((before["correct"] & ~now["correct"]).sum())
    assert (metrics["accuracy_mcnemar_b"], metrics["accuracy_mcnemar_c"]) == (
        b,
        int((~before["correct"] & now["correct"]).sum()),
    )
    # a baseline job: intervals, no change, no flips
    baseline = read_metrics(tmp_path / "baseline")
    assert "accuracy_se" in baseline and "accuracy_change_p" not in baseline
    assert not (tmp_path / "baseline" / "flips.parquet").exists()
    # MLflow keeps flips.parquet with the run
    run = json.loads((tmp_path / "first" / "mlflow_run.json").read_text())["run_id"]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/m.db")
    names = [a.path for a in mlflow.MlflowClient().list_artifacts(run)]
    assert "flips.parquet" in names


@pytest.mark.parametrize("override", ["stats.bootstrap_samples=1", "stats.interval=studentized"])
def test_stats_settings_are_checked_before_anything_loads(tmp_path, monkeypatch, capsys, override):
    status = run_main(tmp_path, monkeypatch, *TOY, override)
    assert status == 2
    err = capsys.readouterr().err
    assert override.split("=")[0] in err and "Traceback" not in err


def test_draw_groups_is_fixed_by_its_seed():
    first = np.concatenate(list(draw_groups(7, 600, 3)))
    assert first.shape == (600, 7) and first.max() < 7
    assert np.array_equal(first, np.concatenate(list(draw_groups(7, 600, 3))))
    assert stats.CHUNK < 600  # more than one chunk drawn


def test_a_generate_mode_job_flips_its_parsed_answers(tmp_path, monkeypatch):
    common = (
        *TOY,
        "scoring.mode=generate",
        "scoring.max_new_tokens=2",
        "stats.bootstrap_samples=100",
        f"tracking.uri=sqlite:///{tmp_path}/m.db",
    )
    overrides = (*common, "intervention=redistribute", "hydra.run.dir=job")
    assert run_main(tmp_path, monkeypatch, *overrides) == 0
    assert run_main(tmp_path, monkeypatch, *common, "hydra.run.dir=baseline") == 0
    now = pd.read_parquet(tmp_path / "job" / "predictions.parquet")
    before = pd.read_parquet(tmp_path / "baseline" / "predictions.parquet")
    flipped = pd.read_parquet(tmp_path / "job" / "flips.parquet")
    changed = now["answer"] != before["answer"]
    assert flipped["item_id"].tolist() == now["item_id"][changed].tolist()
    assert flipped["answer"].tolist() == now["answer"][changed].tolist()
    assert flipped["baseline_answer"].tolist() == before["answer"][changed].tolist()
    metrics = read_metrics(tmp_path / "job")
    assert metrics["n_flipped_to_yes"] == int((now["answer"][changed] == "yes").sum())
    assert {"accuracy_change_p", "paired_accuracy_mcnemar_p"} <= set(metrics)
