"""Independent verification of issue 19's statistics: every SE, interval, change and p-value
equals a naive loop (each resample's frame built item by item and given to the benchmark's
own native_metrics), McNemar equals scipy's binomtest, flips equal a plain comparison,
BCa equals scipy.stats.bootstrap on identical resamples, and the power formula equals
Connor (1987) computed here. Predictions are random and adversarial, on benchmarks read
by their loaders from local copies written here."""

import json

import numpy as np
import pandas as pd
import pytest
from benchmark_fixtures import SHARED, needs_shared, write_naturalbench, write_winoground
from hydra import compose, initialize_config_module
from omegaconf import open_dict
from scipy import stats as sps

from sysattn_exp.benchmarks import LOADERS, STATISTICS
from sysattn_exp.benchmarks.base import first_groups, prompt_preset
from sysattn_exp.evaluation import stats

SAMPLES, SEED = 40, 7


def benchmark_cfg(*overrides: str):
    with initialize_config_module("sysattn_exp.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides)).benchmark


def write_pope(root, rng):
    """Three splits, 8 images each, 2-5 questions per image; in `adversarial` every
    question of the first images is a no (F1 can be undefined on a resample)."""
    (root / "coco").mkdir(parents=True)
    (root / "val2014").mkdir()
    for split in ("random", "popular", "adversarial"):
        lines, qid = [], 0
        for image in range(8):
            for _ in range(rng.integers(2, 6)):
                qid += 1
                label = "no" if split == "adversarial" and image < 7 else rng.choice(["yes", "no"])
                record = {"question_id": qid, "image": f"im{image}.jpg", "text": f"q{qid}?"}
                lines.append(json.dumps(record | {"label": str(label)}))
        (root / "coco" / f"coco_pope_{split}.json").write_text("\n".join(lines) + "\n")
    return ["benchmark=pope", f"benchmark.data_dir={root / 'coco'}",
            f"benchmark.image_dir={root / 'val2014'}"]  # fmt: skip


def write_mme(root, rng):
    """Two perception and two cognition categories, 2-7 images each, one yes and one no."""
    (root / "txt").mkdir(parents=True)
    (root / "img").mkdir()
    for category in ("existence", "count", "code_reasoning", "numerical_calculation"):
        lines = []
        for image in range(rng.integers(2, 8)):
            lines += [f"{image}.jpg\tq{image}?\tYes", f"{image}.jpg\tq{image} not?\tNo"]
        (root / "txt" / f"{category}.txt").write_text("\n".join(lines) + "\n")
    return ["benchmark=mme", f"benchmark.data_dir={root / 'txt'}",
            f"benchmark.image_dir={root / 'img'}"]  # fmt: skip


def write_beaf(root, rng):
    """10 originals, 1-3 edits each; questions about removed objects and kept ones; some
    originals have no removed-object question (TU undefined on some resamples)."""
    records = []
    for o in range(10):
        stem = f"COCO_val2014_{o:012d}"
        objects = [f"obj{k}" for k in range(3)]
        edits = [f"{stem}_{e:02d}.png" for e in range(rng.integers(1, 4))]
        for k, obj in enumerate(objects):
            removed = o == 0 and k == 0
            for image, orig in [(f"{stem}.jpg", True)] + [(e, False) for e in edits]:
                gt = "yes" if orig or not removed else "no"
                if not removed and rng.random() < 0.3:
                    gt = "no"
                records.append({"id": len(records), "image": image, "question": f"{obj}?",
                                "orig_img": orig, "removed_q": removed, "gt": gt})  # fmt: skip
    root.mkdir(parents=True)
    (root / "images").mkdir()
    (root / "beaf_qna.json").write_text(json.dumps(records))
    return ["benchmark=beaf", f"benchmark.data_dir={root}"]


def write_hallusionbench(root, rng):
    records = json.loads((SHARED / "hallusionbench" / "HallusionBench.json").read_text())
    sets = sorted({(r["category"], r["subcategory"], r["set_id"]) for r in records})
    keep = {sets[i] for i in rng.choice(len(sets), 25, replace=False)}
    chosen = [r for r in records if (r["category"], r["subcategory"], r["set_id"]) in keep]
    (root / "data").mkdir(parents=True)
    (root / "images").mkdir()
    (root / "data" / "HallusionBench.json").write_text(json.dumps(chosen))
    return ["benchmark=hallusionbench", f"benchmark.data_dir={root / 'data'}",
            f"benchmark.image_dir={root / 'images'}"]  # fmt: skip


def write_sugarcrepe(root, rng):
    (root / "images").mkdir(parents=True)
    return ["benchmark=sugarcrepe", f"benchmark.data_dir={SHARED / 'sugarcrepe'}",
            f"benchmark.image_dir={root / 'images'}"]  # fmt: skip


def write_wino(root, rng):
    root.mkdir(parents=True)
    write_winoground(root, n_examples=12)
    return ["benchmark=winoground", f"benchmark.data_dir={root}"]


def write_natural(root, rng):
    root.mkdir(parents=True)
    write_naturalbench(root / "nb", n_samples=9)
    return ["benchmark=naturalbench", f"benchmark.data_dir={root / 'nb'}"]


WRITERS = {
    "pope": write_pope,
    "mme": write_mme,
    "beaf": write_beaf,
    "hallusionbench": write_hallusionbench,
    "sugarcrepe": write_sugarcrepe,
    "winoground": write_wino,
    "naturalbench": write_natural,
}


def load_items(name, tmp_path, rng):
    """The benchmark as its loader reads it (images are never decoded: the statistics
    read none); SugarCrepe cut to 6 pairs per subset."""
    cfg = benchmark_cfg(*WRITERS[name](tmp_path / name, rng))
    with open_dict(cfg):
        cfg.template = prompt_preset(cfg)[0]
    bench = LOADERS[name](cfg)
    if name == "sugarcrepe":
        items = []
        for subset in sorted({i.meta["subset"] for i in bench.items}):
            items += first_groups([i for i in bench.items if i.meta["subset"] == subset], 6)
        bench.items = items
    return bench


def scored(bench, rng, kind: str) -> pd.DataFrame:
    """A scored frame as the job builds it (scored_frame), with predictions of `kind`:
    random (yes with a random probability per frame), all yes, all no, or generated
    answers with unknowns; rank_score with ties."""
    n = len(bench.items)
    label = np.array([i.label for i in bench.items])
    frame = pd.DataFrame(
        {
            "item_id": [i.item_id for i in bench.items],
            "group_id": [i.group_id for i in bench.items],
            "label": label,
        }
    )
    yes = rng.normal(size=n)
    no = rng.normal(size=n)
    if kind == "all_yes":
        yes = no + 1
    elif kind == "all_no":
        yes = no - 1
    elif kind == "right":  # mostly right: a baseline near 1
        yes = no + np.where(label, 1, -1) * np.where(rng.random(n) < 0.95, 1, -1)
    frame["yes_logit"], frame["no_logit"] = yes, no
    frame["p_yes"] = np.round(1 / (1 + np.exp(no - yes)), 1)  # rounded: ties in ranks
    frame["pred"] = frame["yes_logit"] > frame["no_logit"]
    frame["correct"] = frame["pred"] == frame["label"]
    if kind == "generate":
        answer = np.where(frame["pred"], "yes", "no").astype(object)
        answer[rng.random(n) < 0.2] = "unknown"
        frame["answer"] = answer
        frame["pred"] = frame["answer"] == "yes"
        frame["correct"] = (frame["pred"] == frame["label"]) & (frame["answer"] != "unknown")
    frame = frame.join(pd.DataFrame([i.meta for i in bench.items]))
    frame["rank_score"] = frame["p_yes"]
    return frame


def naive_metrics(bench, frame) -> dict:
    """Shared metrics computed here, and the benchmark's own native_metrics."""
    out = {
        "accuracy": frame["correct"].mean(),
        "paired_accuracy": frame.groupby("group_id")["correct"].all().mean(),
        "yes_rate": frame["pred"].mean(),
        "yes_bias": frame["pred"].mean() - frame["label"].mean(),
    }
    return out | bench.native_metrics(frame)


def resampled_frame(frame, ids, row):
    """The resample's frame: the drawn groups' items, each drawn group a new group."""
    rows, names = [], []
    for k, j in enumerate(row):
        members = np.flatnonzero(frame["group_id"].to_numpy() == ids[j])
        rows.append(members)
        names += [f"{k}:{ids[j]}"] * len(members)
    out = frame.iloc[np.concatenate(rows)].reset_index(drop=True)
    out["group_id"] = names
    return out


def naive_resamples(bench, frames, names):
    ids = sorted(set(frames[0]["group_id"]))
    values = [{name: [] for name in names} for _ in frames]
    for draws in stats.draw_groups(len(ids), SAMPLES, SEED):
        for row in draws:
            for f, frame in enumerate(frames):
                metrics = naive_metrics(bench, resampled_frame(frame, ids, row))
                for name in names:
                    value = metrics.get(name)
                    values[f][name].append(np.nan if value is None else float(value))
    return [{k: np.array(v) for k, v in per.items()} for per in values]


def naive_summary(values, base=None) -> dict:
    out = {}
    for name, v in values.items():
        ok = v[np.isfinite(v)]
        out |= {f"{name}_se": ok.std(ddof=1), f"{name}_ci_low": np.percentile(ok, 2.5),
                f"{name}_ci_high": np.percentile(ok, 97.5)}  # fmt: skip
        if len(ok) < len(v):
            out[f"{name}_ci_undefined_resamples"] = len(v) - len(ok)
        if base is not None:
            d = v - base[name]
            if not np.all(np.isfinite(d)):
                out[f"{name}_change_ci_undefined_resamples"] = int(np.sum(~np.isfinite(d)))
            d = d[np.isfinite(d)]
            out[f"{name}_change_ci_low"] = np.percentile(d, 2.5)
            out[f"{name}_change_ci_high"] = np.percentile(d, 97.5)
            # README: p = min(1, 2 min(1 + #{d <= 0}, 1 + #{d >= 0}) / (B + 1))
            lo, hi = 1 + np.sum(d <= 0), 1 + np.sum(d >= 0)
            out[f"{name}_change_p"] = min(1.0, 2 * min(lo, hi) / (len(d) + 1))
    return out


BENCHMARKS = sorted(WRITERS)
KINDS = {"pope": "all_no", "beaf": "all_yes", "mme": "right", "hallusionbench": "generate"}


@needs_shared
@pytest.mark.parametrize("name", BENCHMARKS)
def test_bootstrap_equals_naive_loop_with_native_metrics(name, tmp_path):
    rng = np.random.default_rng(BENCHMARKS.index(name))
    bench = load_items(name, tmp_path, rng)
    baseline = scored(bench, rng, KINDS.get(name, "random"))
    condition = scored(bench, rng, "random")
    names = [*stats.SHARED, *STATISTICS[name].names]
    got = stats.job_statistics(condition, baseline, STATISTICS[name], SAMPLES, SEED)
    now, before = naive_resamples(bench, [condition, baseline], names)
    want = naive_summary(now, before)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    undefined = {k for k in got if k.endswith("_ci_undefined_resamples")}
    assert undefined == {k for k in want if k.endswith("_ci_undefined_resamples")}
    if name in ("pope", "beaf"):  # the adversarial fixtures leave metrics undefined
        assert undefined
    # The observed native metric (on all groups) equals the benchmark's own.
    observed = naive_metrics(bench, condition)
    for metric in STATISTICS[name].names:
        block = STATISTICS[name].columns(condition).sum()
        value = STATISTICS[name].from_sums({k: np.asarray(v) for k, v in block.items()})[metric]
        assert (np.nan if observed[metric] is None else observed[metric]) == pytest.approx(
            float(value), abs=1e-12, nan_ok=True
        )


def binomial_p(b: int, c: int) -> float:
    return 1.0 if b + c == 0 else sps.binomtest(min(b, c), b + c, 0.5).pvalue


@needs_shared
@pytest.mark.parametrize("name", ["hallusionbench", "pope"])
def test_mcnemar_and_flips_equal_a_plain_comparison(name, tmp_path):
    rng = np.random.default_rng(11)
    bench = load_items(name, tmp_path / "data", rng)
    baseline, condition = scored(bench, rng, "generate"), scored(bench, rng, "random")
    got = stats.job_statistics(condition, baseline, STATISTICS[name], 10, 0)
    right0, right1 = baseline["correct"].to_numpy(), condition["correct"].to_numpy()
    b, c = int(np.sum(right0 & ~right1)), int(np.sum(~right0 & right1))
    assert (got["accuracy_mcnemar_b"], got["accuracy_mcnemar_c"]) == (b, c)
    assert got["accuracy_mcnemar_p"] == pytest.approx(binomial_p(b, c), rel=1e-12)
    groups = {}
    for g, r0, r1 in zip(baseline["group_id"], right0, right1, strict=True):
        before, after = groups.get(g, (True, True))
        groups[g] = (before and r0, after and r1)
    gb = sum(1 for r0, r1 in groups.values() if r0 and not r1)
    gc = sum(1 for r0, r1 in groups.values() if r1 and not r0)
    assert (got["paired_accuracy_mcnemar_b"], got["paired_accuracy_mcnemar_c"]) == (gb, gc)
    assert got["paired_accuracy_mcnemar_p"] == pytest.approx(binomial_p(gb, gc), rel=1e-12)
    # flips: every item whose answer (yes / no / unknown) changed
    flipped = stats.flips(condition, baseline)
    before = list(baseline["answer"])
    after = ["yes" if p else "no" for p in condition["pred"]]
    want = [i for i in range(len(before)) if before[i] != after[i]]
    assert list(flipped["item_id"]) == [baseline["item_id"][i] for i in want]
    assert list(flipped["baseline_answer"]) == [before[i] for i in want]
    assert list(flipped["answer"]) == [after[i] for i in want]
    for column, frame in (("margin_before", baseline), ("margin_after", condition)):
        margin = [frame["yes_logit"][i] - frame["no_logit"][i] for i in want]
        assert np.allclose(flipped[column], margin, rtol=0, atol=1e-12)
    right = ["baseline" if right0[i] else "intervention" if right1[i] else "neither" for i in want]
    assert list(flipped["right"]) == right
    counts = stats.flip_counts(flipped)
    assert counts == {
        "n_flipped_to_yes": sum(after[i] == "yes" for i in want),
        "n_flipped_to_no": sum(after[i] == "no" for i in want),
        "n_fixed": sum(right1[i] and not right0[i] for i in want),
        "n_broken": sum(right0[i] and not right1[i] for i in want),
    }


@needs_shared
@pytest.mark.parametrize("name", ["mme", "winoground"])
def test_bca_equals_scipy_on_identical_resamples(name, tmp_path):
    """scipy.stats.bootstrap draws rng.integers(0, n, (B, n)) at once: with B <= CHUNK
    and the same seed, its resamples of the group indices are draw_groups'."""
    rng = np.random.default_rng(3)
    bench = load_items(name, tmp_path / "data", rng)
    baseline, condition = scored(bench, rng, "random"), scored(bench, rng, "random")
    ids = sorted(set(condition["group_id"]))
    metric = STATISTICS[name].names[0]

    def value(frame, idx):
        return naive_metrics(bench, resampled_frame(frame, ids, np.asarray(idx, int)))[metric]

    got = stats.bootstrap_statistics(
        condition, baseline, [STATISTICS[name]], 64, SEED, method="bca"
    )
    for key, statistic in (
        (metric, lambda idx: value(condition, idx)),
        (f"{metric}_change", lambda idx: value(condition, idx) - value(baseline, idx)),
    ):
        res = sps.bootstrap(
            (np.arange(len(ids)),), statistic, n_resamples=64, vectorized=False,
            method="BCa", random_state=np.random.default_rng(SEED),
        )  # fmt: skip
        low, high = res.confidence_interval
        assert got[f"{key}_ci_low"] == pytest.approx(low, abs=1e-12), key
        assert got[f"{key}_ci_high"] == pytest.approx(high, abs=1e-12), key


def test_chair_statistics_equal_a_naive_loop_over_caption_scores():
    from omegaconf import OmegaConf

    from sysattn_exp.evaluation.caption import caption_statistics
    from sysattn_exp.evaluation.chair import CaptionScore, caption_counts, chair_metrics

    rng = np.random.default_rng(5)

    def caption():
        n = int(rng.integers(0, 4))  # some captions mention nothing
        mentions = [(f"w{k}", f"o{k}") for k in range(n)]
        return CaptionScore(mentions, [m for m in mentions if rng.random() < 0.3], frozenset(), 5)

    image_ids = [int(i) for i in rng.choice(10_000, 40, replace=False)]
    before = [caption() for _ in image_ids]
    after = [caption() for _ in image_ids]
    cfg = OmegaConf.create({"bootstrap_samples": SAMPLES, "seed": SEED, "interval": "percentile"})
    got = caption_statistics(
        caption_counts(image_ids, after), caption_counts(image_ids, before), cfg
    )
    order = np.argsort(image_ids)  # draw_groups indexes the sorted ids
    values = [{"chair_s": [], "chair_i": []} for _ in range(2)]
    for draws in stats.draw_groups(len(image_ids), SAMPLES, SEED):
        for row in draws:
            for f, scores in enumerate((after, before)):
                metrics = chair_metrics([scores[order[j]] for j in row])
                for name in ("chair_s", "chair_i"):
                    values[f][name].append(metrics[name])
    now, base = ({k: np.array(v) for k, v in per.items()} for per in values)
    for key, value in naive_summary(now, base).items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    # McNemar on hallucinating captions: b = only under the intervention (lower is better)
    h0 = np.array([bool(s.hallucinated) for s in before])
    h1 = np.array([bool(s.hallucinated) for s in after])
    b, c = int(np.sum(~h0 & h1)), int(np.sum(h0 & ~h1))
    assert (got["chair_s_mcnemar_b"], got["chair_s_mcnemar_c"]) == (b, c)
    assert got["chair_s_mcnemar_p"] == pytest.approx(binomial_p(b, c), rel=1e-12)


def test_change_with_a_baseline_undefined_on_resamples_counts_them():
    """POPE's F1 of a split with no yes label, answered all no by the baseline, is
    undefined on the resamples that draw only such images of that split: the change's
    interval leaves those resamples out, and says how many."""
    groups = [f"random/im{g}" for g in range(6) for _ in range(2)]
    label = np.array([g == 0 for g in range(6) for _ in range(2)])
    frame = pd.DataFrame({"group_id": groups, "label": label, "split": "random"})
    baseline = frame.assign(pred=False, correct=~label)
    condition = frame.assign(pred=label, correct=True)
    got = stats.bootstrap_statistics(condition, baseline, [STATISTICS["pope"]], 200, 1)
    draws = np.concatenate(list(stats.draw_groups(6, 200, 1)))
    no_positive = int(np.sum(~np.any(draws == 0, axis=1)))  # group 0 holds the yes labels
    assert no_positive > 0
    assert got["pope/mean_f1_change_ci_undefined_resamples"] == no_positive
    assert got["pope/mean_f1_ci_undefined_resamples"] == no_positive  # 2TP+FP+FN = 0 too


def connor_n(delta, psi, alpha=0.05, power=0.8):
    """Connor 1987, Biometrics 43:207-211, eq. 3."""
    za, zb = sps.norm.ppf(1 - alpha / 2), sps.norm.ppf(power)
    return (za * np.sqrt(psi) + zb * np.sqrt(psi - delta**2)) ** 2 / delta**2


@pytest.mark.parametrize(("n", "psi"), [(400, 0.1), (36, 0.5), (7511, 0.03), (2000, 0.2)])
def test_power_equals_connor_by_bisection_and_a_simulation(n, psi):
    from sysattn_exp.evaluation.power import mcnemar_detectable_change, power_line

    low, high = 1e-9, psi
    if connor_n(psi, psi) > n:
        assert mcnemar_detectable_change(n, psi) is None
        assert "detects no change" in power_line(n, psi)
        return
    for _ in range(200):  # n(delta) falls with delta: bisect n(delta) = n
        mid = (low + high) / 2
        low, high = (mid, high) if connor_n(mid, psi) > n else (low, mid)
    assert mcnemar_detectable_change(n, psi) == pytest.approx(100 * low, rel=1e-8)
    assert f">= {100 * low:.1f} points" in power_line(n, psi)
    # The exact test's power at that change, by simulation: about 80% (normal approx.)
    rng = np.random.default_rng(0)
    p01, p10 = (psi + low) / 2, (psi - low) / 2
    cells = rng.multinomial(n, [p01, p10, 1 - psi], size=4000)
    b, c = cells[:, 1], cells[:, 0]
    m = b + c
    p = np.minimum(1, 2 * sps.binom.cdf(np.minimum(b, c), m, 0.5))
    assert 0.72 < np.mean(p <= 0.05) < 0.86


def test_edge_cases_give_values_not_crashes():
    # One group; baselines of 0 and 1; no discordant pair (p = 1)
    one = pd.DataFrame({"group_id": "g", "label": [True, False], "pred": [True, True]})
    one["correct"] = one["pred"] == one["label"]
    got = stats.job_statistics(one, one, None, 50, 0)
    assert got["paired_accuracy_se"] == 0 and got["paired_accuracy_ci_low"] == 0
    assert got["paired_accuracy_mcnemar_p"] == 1 and got["accuracy_mcnemar_b"] == 0
    assert got["accuracy_change_p"] == 1  # every resampled change is 0
    frame = pd.DataFrame({"group_id": np.repeat(np.arange(20), 2), "label": True})
    for right in (False, True):
        base = frame.assign(pred=right, correct=right)
        cond = frame.assign(pred=True, correct=True)
        got = stats.job_statistics(cond, base, None, 100, 0)
        assert got["paired_accuracy_change_ci_low"] == got["paired_accuracy_change_ci_high"]
        assert got["paired_accuracy_change_ci_low"] == (0.0 if right else 1.0)
        b, c = (0, 0) if right else (0, 20)
        assert got["paired_accuracy_mcnemar_p"] == pytest.approx(binomial_p(b, c))
        assert got["paired_accuracy_change_p"] == (1.0 if right else pytest.approx(2 / 101))


def test_same_seed_same_figures_other_seed_other_figures():
    rng = np.random.default_rng(2)
    frame = pd.DataFrame({"group_id": np.repeat(np.arange(30), 3), "label": rng.random(90) < 0.5})
    frame["pred"] = rng.random(90) < 0.5
    frame["correct"] = frame["pred"] == frame["label"]
    base = frame.assign(correct=rng.random(90) < 0.6)
    one = stats.job_statistics(frame, base, None, 500, 3)
    assert one == stats.job_statistics(frame, base, None, 500, 3)
    other = stats.job_statistics(frame, base, None, 500, 4)
    assert (
        other["accuracy_ci_low"] != one["accuracy_ci_low"]
        or other["accuracy_se"] != one["accuracy_se"]
    )
