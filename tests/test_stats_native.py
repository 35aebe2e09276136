"""Each benchmark's native metrics as functions of sums over its groups
(benchmarks.STATISTICS, vectorised in evaluation.stats) equal the benchmark's own
native_metrics: observed, and on every resample of a cluster bootstrap, recomputed by a
naive loop on the resampled frame (the same draws; each drawn group a new group), to
1e-12, on random predictions over local fixtures in each release's format."""

import json

import numpy as np
import pandas as pd
import pytest
from benchmark_fixtures import SHARED, needs_shared, write_naturalbench, write_winoground
from omegaconf import open_dict
from test_benchmark_loaders import benchmark_cfg

from sysattn_exp.benchmarks import (
    MAIN_METRICS,
    STAT_METRICS,
    STATISTICS,
    Benchmark,
    beaf,
    hallusionbench,
    mme,
    naturalbench,
    pope,
    sugarcrepe,
    winoground,
)
from sysattn_exp.evaluation import stats
from sysattn_exp.evaluation.stats import draw_groups, resampled_metrics
from sysattn_exp.experiment.job_yes_no import statistic_names

SAMPLES = 100  # resamples compared one by one (the naive loop costs ms each)


def scored_items(benchmark, seed: int, generate: bool = False) -> pd.DataFrame:
    """The benchmark's items with random answers and scores, as job_yes_no.scored_frame
    joins them (meta as columns). `generate`: answers yes / no / unknown, as parsed
    generated text; rank scores on a coarse grid, so that ties occur."""
    rng = np.random.default_rng(seed)
    items = benchmark.items
    frame = pd.DataFrame(
        {
            "item_id": [i.item_id for i in items],
            "group_id": [i.group_id for i in items],
            "label": [i.label for i in items],
        }
    )
    # Items right with a group-dependent probability: whole groups right or wrong occur.
    ability = frame.groupby("group_id")["label"].transform(lambda g: rng.uniform(0.3, 0.95))
    right = rng.random(len(frame)) < ability.to_numpy()
    frame["pred"] = np.where(right, frame["label"], ~frame["label"])
    if generate:
        frame["answer"] = np.where(frame["pred"], "yes", "no")
        unknown = rng.random(len(frame)) < 0.1
        frame.loc[unknown, "answer"] = "unknown"
        frame["pred"] = frame["answer"] == "yes"
    frame["correct"] = (frame["pred"] == frame["label"]) & (frame.get("answer") != "unknown")
    frame["rank_score"] = rng.integers(0, 6, len(frame)) / 5
    return frame.join(pd.DataFrame([i.meta for i in items]))


def naive_resample(scored: pd.DataFrame, draw: np.ndarray) -> pd.DataFrame:
    """The resampled frame by a plain loop: the drawn groups' rows (groups in sorted id
    order, as draw_groups indexes them), each draw a new group (its position)."""
    ids = sorted(set(scored["group_id"]))
    members = {g: [] for g in ids}
    for row, g in enumerate(scored["group_id"]):
        members[g].append(row)
    rows, positions = [], []
    for position, g in enumerate(draw):
        rows += members[ids[g]]
        positions += [position] * len(members[ids[g]])
    sample = scored.iloc[rows].reset_index(drop=True)
    sample["group_id"] = positions
    return sample


def as_float(value) -> float:
    return np.nan if value is None or not np.isfinite(value) else float(value)


def assert_equals_native(module, scored: pd.DataFrame, seed: int) -> dict[str, int]:
    """Observed and resampled, every STAT_METRICS name of `module` equals native_metrics
    (NaN where it gives None or leaves the name out); returns how many resamples were
    undefined per name."""
    statistics = module.STATISTICS
    sums = statistics.columns(scored).sum()
    observed = statistics.from_sums({k: np.asarray(v) for k, v in sums.items()})
    native = module.native_metrics(scored)
    for name in statistics.names:
        assert_same(observed[name], as_float(native.get(name)))
    n_groups = scored["group_id"].nunique()
    draws = np.concatenate(list(draw_groups(n_groups, SAMPLES, seed)))
    (vectorised,) = resampled_metrics([scored], [statistics], SAMPLES, seed)
    undefined = dict.fromkeys(statistics.names, 0)
    for r, draw in enumerate(draws):
        expected = module.native_metrics(naive_resample(scored, draw))
        for name in statistics.names:
            want = as_float(expected.get(name))
            assert_same(vectorised[name][r], want)
            undefined[name] += np.isnan(want)
    return undefined


def assert_same(got, want: float) -> None:
    """Equal to 1e-12, or both NaN (undefined)."""
    if np.isnan(want):
        assert np.isnan(got)
    else:
        assert float(got) == pytest.approx(want, rel=1e-12, abs=1e-12)


def load(module, *overrides: str):
    """The module's loader on the composed benchmark node (images are not opened: the
    statistics need the items only), with the plain template."""
    cfg = benchmark_cfg(*overrides)
    with open_dict(cfg):
        cfg.template = "{question}"
    return module.load(cfg)


# ---- fixtures in the releases' formats, larger than the loaders' --------------------


def write_pope_release(root, images_per_split: dict[str, int]) -> None:
    """coco_pope_<split>.json (JSON lines), 3 yes and 3 no questions per image."""
    root.mkdir(parents=True)
    for split, n_images in images_per_split.items():
        lines = []
        for k in range(n_images):
            image = f"COCO_val2014_{k:012d}.jpg"
            for q in range(6):
                record = {
                    "question_id": len(lines) + 1,
                    "image": image,
                    "text": f"Is there a thing {q} in the image?",
                    "label": "yes" if q < 3 else "no",
                }
                lines.append(json.dumps(record))
        (root / f"coco_pope_{split}.json").write_text("\n".join(lines) + "\n")


def write_mme_release(root, images_per_category: dict[str, int]) -> None:
    """<category>.txt: two questions per image (Yes, No)."""
    root.mkdir(parents=True)
    for category, n_images in images_per_category.items():
        lines = []
        for k in range(n_images):
            lines += [f"{k:04d}.png\tIs it {k}?\tYes", f"{k:04d}.png\tIs it not {k}?\tNo"]
        (root / f"{category}.txt").write_text("\n".join(lines) + "\n")


def write_beaf_release(root, n_originals: int) -> None:
    """beaf_qna.json: per original, 5 questions on it and on 1-3 edits; the first two
    ask about objects the edits remove (gt no on the edit that removed it)."""
    records = []
    for o in range(n_originals):
        stem = f"COCO_val2014_{o:012d}"
        edits = [f"{stem}_{e:02d}.png" for e in range(1 + o % 3)]
        for q in range(5):
            removed = q < 2
            for image in [f"{stem}.jpg", *edits]:
                gone = removed and image != f"{stem}.jpg" and (q + o) % 2 == 0
                records.append(
                    {
                        "id": len(records),
                        "image": image,
                        "question": f"Is there a thing {q}?",
                        "orig_img": image.endswith(".jpg"),
                        "removed_q": removed,
                        "gt": "no" if gone or (not removed and q == 4) else "yes",
                    }
                )
    root.mkdir(parents=True)
    (root / "beaf_qna.json").write_text(json.dumps(records))


# ---- the tests ----------------------------------------------------------------------


def test_every_benchmark_with_native_metrics_has_statistics_for_its_main_metric():
    assert set(STATISTICS) == set(MAIN_METRICS)
    for name, main in MAIN_METRICS.items():
        assert main in STAT_METRICS[name]


def test_the_statistics_named_before_scoring_cover_every_native_stat_metric():
    """statistic_names (the metric-name check before scoring) names what statistics writes."""
    suffixes = ("se", "ci_low", "ci_high", "change_ci_low", "change_ci_high", "change_p")
    for name, stat_metrics in STAT_METRICS.items():
        names = statistic_names(Benchmark(name, [], "{question}", lambda image_id: None))
        assert names == [f"{m}_{s}" for m in [*stats.SHARED, *stat_metrics] for s in suffixes]


@pytest.mark.parametrize("generate", [False, True])
def test_pope_mean_f1_equals_native_metrics_on_every_resample(tmp_path, generate):
    # The adversarial split has one image: absent from about a third of the resamples,
    # where the mean is over the other splits, as native_metrics takes it.
    write_pope_release(tmp_path / "coco", {"random": 6, "popular": 5, "adversarial": 1})
    bench = load(
        pope,
        "benchmark=pope",
        f"benchmark.data_dir={tmp_path / 'coco'}",
        f"benchmark.image_dir={tmp_path}",
    )
    undefined = assert_equals_native(pope, scored_items(bench, 1, generate), seed=3)
    assert undefined["pope/mean_f1"] < SAMPLES


def test_pope_f1_undefined_without_yes_answers_or_labels_is_nan(tmp_path):
    write_pope_release(tmp_path / "coco", {"random": 2})
    bench = load(
        pope,
        "benchmark=pope",
        "benchmark.subsets=[random]",
        f"benchmark.data_dir={tmp_path / 'coco'}",
        f"benchmark.image_dir={tmp_path}",
    )
    scored = scored_items(bench, 0)
    scored["label"], scored["pred"] = False, False  # no yes label, no yes answer: 0 / 0
    assert assert_equals_native(pope, scored, seed=0) == {"pope/mean_f1": SAMPLES}


def test_winoground_group_score_equals_native_metrics_on_every_resample(tmp_path):
    write_winoground(tmp_path / "wino", 25)
    bench = load(winoground, "benchmark=winoground", f"benchmark.data_dir={tmp_path}/wino")
    assert_equals_native(winoground, scored_items(bench, 2), seed=5)


def test_mme_perception_and_cognition_equal_native_metrics_on_every_resample(tmp_path):
    # Cognition has two images: absent from some resamples, where its score is undefined.
    write_mme_release(
        tmp_path / "txt",
        {"existence": 8, "count": 6, "OCR": 3, "artwork": 1, "code_reasoning": 2},
    )
    bench = load(
        mme,
        "benchmark=mme",
        f"benchmark.data_dir={tmp_path / 'txt'}",
        f"benchmark.image_dir={tmp_path}",
    )
    undefined = assert_equals_native(mme, scored_items(bench, 3), seed=7)
    assert 0 < undefined["mme/cognition_score"] < SAMPLES


@needs_shared
def test_sugarcrepe_mean_pyes_acc_equals_native_metrics_on_every_resample(tmp_path):
    bench = load(
        sugarcrepe,
        "benchmark=sugarcrepe",
        f"benchmark.data_dir={SHARED / 'sugarcrepe'}",
        f"benchmark.image_dir={tmp_path}",
        "benchmark.subsets=[swap_obj,swap_att]",
    )
    assert_equals_native(sugarcrepe, scored_items(bench, 4), seed=11)


def test_beaf_tu_ig_id_f1_equal_native_metrics_on_every_resample(tmp_path):
    write_beaf_release(tmp_path / "beaf", 12)
    bench = load(
        beaf,
        "benchmark=beaf",
        f"benchmark.data_dir={tmp_path / 'beaf'}",
        f"benchmark.image_dir={tmp_path}",
    )
    assert_equals_native(beaf, scored_items(bench, 5), seed=13)


@needs_shared
def test_hallusionbench_aacc_qacc_facc_equal_native_metrics_on_every_resample():
    bench = load(
        hallusionbench,
        "benchmark=hallusionbench",
        f"benchmark.data_dir={SHARED / 'hallusionbench'}",
    )
    assert_equals_native(hallusionbench, scored_items(bench, 6), seed=17)


def test_naturalbench_g_acc_equals_native_metrics_on_every_resample(tmp_path):
    write_naturalbench(tmp_path / "nb", 20)
    bench = load(naturalbench, "benchmark=naturalbench", f"benchmark.data_dir={tmp_path / 'nb'}")
    assert_equals_native(naturalbench, scored_items(bench, 7), seed=19)
