"""Statistics of caption jobs: CHAIR_s and CHAIR_i on every resample of the cluster
bootstrap over images equal chair_metrics recomputed by a naive loop on the resampled
captions; McNemar's counts on hallucinating captions equal a plain count and its p
scipy's exact binomial test; and a caption job with an intervention writes them through
the real command line."""

import numpy as np
import pandas as pd
import pytest
from cli import read_metrics, run_main
from omegaconf import OmegaConf
from scipy.stats import binomtest
from test_caption_job import write_coco

from sysattn_exp.evaluation.caption import caption_statistics
from sysattn_exp.evaluation.chair import (
    CHAIR_STATISTICS,
    CaptionScore,
    caption_counts,
    chair_metrics,
)
from sysattn_exp.evaluation.stats import draw_groups, resampled_metrics

OBJECTS = ["dog", "cat", "car", "person", "pizza", "couch"]


def random_scores(rng, n: int) -> list[CaptionScore]:
    """Captions with 0-4 object mentions each (repeats allowed), some hallucinated."""
    scores = []
    for _ in range(n):
        truth = frozenset(rng.choice(OBJECTS, size=2, replace=False))
        mentions = [(str(o), str(o)) for o in rng.choice(OBJECTS, size=rng.integers(0, 5))]
        hallucinated = [m for m in mentions if m[1] not in truth]
        scores.append(CaptionScore(mentions, hallucinated, truth, int(rng.integers(3, 20))))
    return scores


def test_chair_s_and_chair_i_equal_chair_metrics_on_every_resample():
    rng = np.random.default_rng(0)
    scores = random_scores(rng, 30)
    image_ids = [int(i) for i in rng.permutation(1000)[:30]]  # not in sorted order
    captions = caption_counts(image_ids, scores)
    samples, seed = 200, 3
    (vectorised,) = resampled_metrics([captions], [CHAIR_STATISTICS], samples, seed)
    by_image = dict(zip(image_ids, scores, strict=True))
    ids = sorted(image_ids)  # draw_groups indexes the groups in sorted order
    for r, draw in enumerate(np.concatenate(list(draw_groups(len(ids), samples, seed)))):
        expected = chair_metrics([by_image[ids[g]] for g in draw])
        for name in ("chair_s", "chair_i"):
            assert vectorised[name][r] == pytest.approx(expected[name], rel=1e-12, abs=1e-12)
    sums = CHAIR_STATISTICS.columns(captions).sum()
    observed = CHAIR_STATISTICS.from_sums({k: np.asarray(v) for k, v in sums.items()})
    for name in ("chair_s", "chair_i"):
        assert float(observed[name]) == pytest.approx(chair_metrics(scores)[name], rel=1e-12)


def test_caption_mcnemar_counts_and_p_equal_a_plain_count_and_scipy():
    rng = np.random.default_rng(1)
    image_ids = list(range(80))
    before = caption_counts(image_ids, random_scores(rng, 80))
    after = caption_counts(image_ids, random_scores(rng, 80))
    out = caption_statistics(after, before, OmegaConf.create({"bootstrap_samples": 100, "seed": 0}))
    pairs = list(zip(before["hallucinated"], after["hallucinated"], strict=True))
    broke = sum(not b and a for b, a in pairs)  # hallucinating only under the intervention
    fixed = sum(b and not a for b, a in pairs)
    assert broke + fixed > 0
    assert (out["chair_s_mcnemar_b"], out["chair_s_mcnemar_c"]) == (broke, fixed)
    expected = binomtest(broke, broke + fixed, 0.5).pvalue
    assert out["chair_s_mcnemar_p"] == pytest.approx(expected, rel=1e-12)
    for name in ("chair_s", "chair_i"):
        assert out[f"{name}_ci_low"] <= out[f"{name}_ci_high"]
        assert out[f"{name}_change_ci_low"] <= out[f"{name}_change_ci_high"]
        assert 0 < out[f"{name}_change_p"] <= 1 and out[f"{name}_se"] > 0


def test_a_caption_job_with_an_intervention_writes_chair_statistics(tmp_path, monkeypatch):
    data = write_coco(tmp_path / "coco")
    common = (
        "model=toy",
        "runtime.num_workers=0",
        "+task=caption",
        f"caption.data_dir={data}",
        "caption.max_new_tokens=4",
        "stats.bootstrap_samples=200",
        f"runtime.cache_dir={tmp_path / 'cache'}",
        f"tracking.uri=sqlite:///{tmp_path}/m.db",
    )
    job = (*common, "intervention=redistribute", "layers=q4", "hydra.run.dir=job")
    assert run_main(tmp_path, monkeypatch, *job) == 0
    assert run_main(tmp_path, monkeypatch, *common, "hydra.run.dir=baseline") == 0
    metrics, baseline = read_metrics(tmp_path / "job"), read_metrics(tmp_path / "baseline")
    for name in ("chair_s", "chair_i"):
        for suffix in ("se", "ci_low", "ci_high", "change_ci_low", "change_ci_high", "change_p"):
            assert np.isfinite(metrics[f"{name}_{suffix}"])
        assert metrics[f"{name}_ci_low"] <= metrics[name] <= metrics[f"{name}_ci_high"]
        assert {f"{name}_se", f"{name}_ci_low"} <= set(baseline)
        assert f"{name}_change_p" not in baseline
    # McNemar's counts from the two jobs' captions, counted independently
    now = pd.read_parquet(tmp_path / "job" / "predictions.parquet")
    before = pd.read_parquet(tmp_path / "baseline" / "predictions.parquet")
    assert now["image_id"].tolist() == before["image_id"].tolist()
    broke = int((~before["hallucinated"] & now["hallucinated"]).sum())
    fixed = int((before["hallucinated"] & ~now["hallucinated"]).sum())
    assert (metrics["chair_s_mcnemar_b"], metrics["chair_s_mcnemar_c"]) == (broke, fixed)
    assert metrics["baseline_chair_s"] == pytest.approx(before["hallucinated"].mean())
