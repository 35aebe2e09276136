"""Statistics of a job (yes/no; caption jobs' CHAIR through bootstrap_statistics): a
cluster bootstrap over the benchmark's groups, the paired bootstrap of a change against the
baseline, McNemar's exact test and the items that flipped.

- Cluster bootstrap (Efron & Tibshirani 1993, An Introduction to the Bootstrap, ch. 6 and
  13; Davison & Hinkley 1997, Bootstrap Methods, sec. 3.8 for clustered data): each
  resample draws the benchmark's groups (its pairing unit, the one paired accuracy uses)
  with replacement, as many as it has, and recomputes the metric from the items of the
  drawn groups. The standard error is the standard deviation of the resampled metric
  (ddof=1); the 95% interval is the percentile interval (the 2.5th and 97.5th percentiles
  of the resampled metric, numpy's linear interpolation) or, with method="bca"
  (stats.interval), the BCa interval (Efron & Tibshirani 1993, ch. 14; bca_levels).
- Paired bootstrap of a change: the same group draws for the baseline and the condition;
  the change's interval is the percentile interval of the resampled changes; its
  two-sided p-value is p = min(1, 2 * min(1 + #{d* <= 0}, 1 + #{d* >= 0}) / (B + 1)),
  the proportion of resampled changes d* on the other side of 0 (ties counted), doubled,
  with the +1 correction of Davison & Hinkley 1997, eq. 4.11 (the smallest level at which
  the percentile interval excludes 0: Efron & Tibshirani 1993, sec. 16.4).
- McNemar's exact test (McNemar 1947; for two classifiers on the same items Dietterich
  1998, Neural Computation 10(7); Dror et al. 2018, ACL): b items (or groups) right only in
  the baseline, c right only under the intervention, p the two-sided exact binomial
  p-value of min(b, c) in b + c trials at 1/2 (statsmodels' mcnemar(exact=True)); p = 1
  when b + c = 0.

Every metric given statistics is a function of sums over the groups
(benchmarks.SummedStatistics: the shared ones here, a benchmark's native ones in its
module, CHAIR's in chair.py): a resample's sums are its draw counts per group times the
per-group sums, one matrix product per chunk of resamples for every metric of both frames
(a sparse product where the per-group columns are mostly 0, as HallusionBench's
per-figure counts are), so every metric uses all `samples` resamples. The tests check, per
benchmark, that this equals the benchmark's own native_metrics recomputed on each
resampled frame (each drawn group a new group, a group drawn twice counted twice)."""

from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.special import ndtr, ndtri
from statsmodels.stats.contingency_tables import mcnemar

from sysattn_exp.benchmarks.base import SummedStatistics, fraction, group_sums

LEVEL = 0.95  # the intervals' coverage
CHUNK = 256  # resamples drawn at once: the draws depend on it, so it is fixed
SHARED = ("accuracy", "paired_accuracy", "yes_rate", "yes_bias")  # every yes/no job's
SPARSE_BELOW = 0.1  # per-group columns with fewer nonzeros than this share: a sparse product
INTERVALS = ("percentile", "bca")  # stats.interval


def draw_groups(n_groups: int, samples: int, seed: int) -> Iterator[np.ndarray]:
    """The resamples' group draws, in chunks of CHUNK resamples (the last one shorter):
    int arrays of shape (chunk, n_groups), each row the indices of the groups drawn
    with replacement. The same (n_groups, samples, seed) give the same draws."""
    rng = np.random.default_rng(seed)
    for start in range(0, samples, CHUNK):
        yield rng.integers(0, n_groups, size=(min(CHUNK, samples - start), n_groups))


def draw_counts(draws: np.ndarray) -> np.ndarray:
    """How often each group is drawn in each resample: (chunk, n_groups) draws ->
    (chunk, n_groups) counts."""
    chunk, n_groups = draws.shape
    offsets = n_groups * np.arange(chunk)[:, None]
    counts = np.bincount((draws + offsets).ravel(), minlength=draws.size)
    return counts.reshape(chunk, n_groups)


def shared_columns(scored: pd.DataFrame) -> pd.DataFrame:
    """Per group (SummedStatistics.columns): items, right answers, yes answers, yes
    labels, 1 for the group and whether it is wholly right."""
    correct = scored["correct"].astype(bool)
    whole = correct.groupby(scored["group_id"]).transform("all")
    first = ~scored["group_id"].duplicated()
    values = pd.DataFrame(
        {
            "items": True,
            "correct": correct,
            "yes": scored["pred"].astype(bool),
            "labels": scored["label"].astype(bool),
            "groups": first,
            "groups_right": first & whole,
        }
    )
    return group_sums(values, scored["group_id"])


def shared_from_sums(sums) -> dict[str, np.ndarray]:
    """SHARED from shared_columns' sums: accuracy, paired accuracy (wholly right groups /
    groups), yes rate and yes bias (yes answers - yes labels, over items)."""
    items = sums["items"]
    return {
        "accuracy": fraction(sums["correct"], items),
        "paired_accuracy": fraction(sums["groups_right"], sums["groups"]),
        "yes_rate": fraction(sums["yes"], items),
        "yes_bias": fraction(sums["yes"] - sums["labels"], items),
    }


SHARED_STATISTICS = SummedStatistics(SHARED, shared_columns, shared_from_sums)


def group_ids(frame: pd.DataFrame) -> pd.Index:
    """The groups in the order draw_groups indexes them (sorted ids)."""
    return pd.Index(pd.unique(frame["group_id"])).sort_values()


def per_group_block(stat: SummedStatistics, frame: pd.DataFrame, ids: pd.Index) -> pd.DataFrame:
    """stat.columns(frame), rows in the order of `ids` (every group must have its row)."""
    block = stat.columns(frame).reindex(ids)
    if block.isna().to_numpy().any():
        raise ValueError("a per-group column has no row for some group")
    return block


def per_group_matrix(blocks: list[pd.DataFrame]):
    """The blocks' columns side by side: a dense float array, or a sparse CSC array where
    under SPARSE_BELOW of its entries are nonzero (HallusionBench's per-figure counts)."""
    matrix = np.concatenate([block.to_numpy(float) for block in blocks], axis=1)
    if np.count_nonzero(matrix) < SPARSE_BELOW * matrix.size:
        return sparse.csc_array(matrix)
    return matrix


def resampled_metrics(
    frames: Sequence[pd.DataFrame],
    statistics: Sequence[SummedStatistics],
    samples: int,
    seed: int,
) -> list[dict[str, np.ndarray]]:
    """Each metric of `statistics` of each frame of `frames` (the same items in the same
    order, with a group_id column: a condition and its baseline) on `samples`
    cluster-bootstrap resamples that share their group draws (draw_groups(seed)): per
    frame, metric name -> (samples,) array, NaN where undefined (or not finite)."""
    ids = group_ids(frames[0])
    parts = [
        (f, stat, per_group_block(stat, frame, ids))
        for f, frame in enumerate(frames)
        for stat in statistics
    ]
    matrix = per_group_matrix([block for _, _, block in parts])
    out = [{name: np.empty(samples) for stat in statistics for name in stat.names} for _ in frames]
    done = 0
    for draws in draw_groups(len(ids), samples, seed):
        counts = draw_counts(draws).astype(float)
        sums = (matrix.T @ counts.T).T if sparse.issparse(matrix) else counts @ matrix
        rows, start = slice(done, done + len(draws)), 0
        for f, stat, block in parts:
            columns = dict(
                zip(block.columns, sums[:, start : start + block.shape[1]].T, strict=True)
            )
            start += block.shape[1]
            values = stat.from_sums(columns)
            for name in stat.names:
                out[f][name][rows] = finite(values[name])
        done += len(draws)
    return out


def jackknife_metrics(
    frames: Sequence[pd.DataFrame], statistics: Sequence[SummedStatistics]
) -> list[dict[str, tuple[float, np.ndarray]]]:
    """Per frame, metric name -> (its value on all groups, its (n_groups,) values with one
    group left out each: the sums less that group's), NaN where undefined."""
    ids = group_ids(frames[0])
    out = []
    for frame in frames:
        values = {}
        for stat in statistics:
            block = per_group_block(stat, frame, ids)
            total = block.sum()
            observed = stat.from_sums({k: np.asarray(v) for k, v in total.items()})
            left_out = stat.from_sums({k: total[k] - block[k].to_numpy() for k in block})
            for name in stat.names:
                values[name] = (float(finite(observed[name])), finite(left_out[name]))
        out.append(values)
    return out


def finite(values) -> np.ndarray:
    """The values as floats, NaN where not finite (an undefined metric)."""
    values = np.asarray(values, float)
    return np.where(np.isfinite(values), values, np.nan)


def bca_levels(defined: np.ndarray, observed: float, jackknife: np.ndarray):
    """The BCa interval's percentile levels (fractions, low and high; Efron & Tibshirani
    1993, eq. 14.9-14.10): bias correction z0 = Phi^-1(share of resamples below the
    observed value, ties counted half, as scipy.stats.bootstrap counts them; eq. 14.14
    without ties), acceleration a = sum d^3 / (6 (sum d^2)^(3/2)) over the jackknife's
    d = mean - leave-one-group-out value (eq. 14.15; 0 where the jackknife has no
    spread). None where the observed value is undefined or the levels are not finite."""
    jackknife = jackknife[np.isfinite(jackknife)]
    if not np.isfinite(observed) or not len(jackknife):
        return None
    below = np.count_nonzero(defined < observed) + np.count_nonzero(defined <= observed)
    z0 = ndtri(below / (2 * len(defined)))
    d = jackknife.mean() - jackknife
    spread = np.sum(d**2)
    a = 0.0 if spread == 0 else np.sum(d**3) / (6 * spread**1.5)
    z = z0 + ndtri(np.array([(1 - LEVEL) / 2, (1 + LEVEL) / 2]))
    with np.errstate(invalid="ignore", divide="ignore"):
        levels = ndtr(z0 + z / (1 - a * z))
    return levels if np.all(np.isfinite(levels)) else None


def interval(resampled: np.ndarray, bca: tuple[float, np.ndarray] | None = None) -> dict:
    """se (standard deviation, ddof=1), ci_low and ci_high of the defined resamples, and
    how many were undefined (None where all were). The interval is the LEVEL percentile
    interval, or with `bca` (the observed value and its jackknife values: stats.interval
    =bca) the BCa interval (bca_levels), the percentile one where BCa is undefined."""
    defined = resampled[np.isfinite(resampled)]
    tail = (1 - LEVEL) / 2
    out = {"undefined": int(len(resampled) - len(defined))}
    if len(defined) < 2:
        return out | {"se": None, "ci_low": None, "ci_high": None}
    levels = None if bca is None else bca_levels(defined, *bca)
    levels = np.array([tail, 1 - tail]) if levels is None else levels
    low, high = np.percentile(defined, 100 * levels)
    return out | {"se": float(defined.std(ddof=1)), "ci_low": float(low), "ci_high": float(high)}


def change_p_value(changes: np.ndarray) -> float | None:
    """The paired bootstrap's two-sided p-value of a change (see the module's docstring)
    from its defined resampled changes."""
    defined = changes[np.isfinite(changes)]
    if not len(defined):
        return None
    below = 1 + np.count_nonzero(defined <= 0)
    above = 1 + np.count_nonzero(defined >= 0)
    return float(min(1.0, 2 * min(below, above) / (len(defined) + 1)))


def mcnemar_test(baseline: np.ndarray, condition: np.ndarray) -> dict[str, float]:
    """McNemar's exact test of two boolean arrays of correctness on the same units:
    b (right only in the baseline), c (right only under the condition), p (two-sided exact
    binomial, statsmodels; 1 when b + c = 0)."""
    baseline, condition = np.asarray(baseline, bool), np.asarray(condition, bool)
    b = int(np.count_nonzero(baseline & ~condition))
    c = int(np.count_nonzero(~baseline & condition))
    both = int(np.count_nonzero(baseline & condition))
    neither = int(np.count_nonzero(~baseline & ~condition))
    p = 1.0 if b + c == 0 else float(mcnemar([[both, b], [c, neither]], exact=True).pvalue)
    return {"b": b, "c": c, "p": p}


def group_correct(predictions: pd.DataFrame) -> np.ndarray:
    """Whether each group (sorted by group_id) is wholly correct."""
    return predictions.groupby("group_id", sort=True)["correct"].all().to_numpy()


def bootstrap_statistics(
    frame: pd.DataFrame,
    baseline: pd.DataFrame | None,
    statistics: Sequence[SummedStatistics],
    samples: int,
    seed: int,
    method: str = "percentile",
) -> dict[str, float | None]:
    """For each metric of `statistics`: `<metric>_se`, `<metric>_ci_low`,
    `<metric>_ci_high` of `frame` from `samples` cluster-bootstrap resamples of its groups
    (group_id); with a `baseline` (the same items in the same order),
    `<metric>_change_ci_low`, `<metric>_change_ci_high`, `<metric>_change_p` of the change
    (frame - baseline) from the paired resamples. Intervals by `method` (INTERVALS:
    percentile, or bca, which adds a leave-one-group-out jackknife); the p-value is the
    percentile bootstrap's either way. Where a metric is undefined on some resamples they
    are left out and counted in `<metric>_ci_undefined_resamples`, and where it is
    undefined on a resample of either frame, that resample is left out of the change's
    interval and p and counted in `<metric>_change_ci_undefined_resamples` (each written
    only when not 0)."""
    if method not in INTERVALS:
        raise ValueError(f"interval method {method!r}: want one of {', '.join(INTERVALS)}")
    frames = [frame] if baseline is None else [frame, baseline]
    resampled = resampled_metrics(frames, statistics, samples, seed)
    jackknife = jackknife_metrics(frames, statistics) if method == "bca" else None
    out = {}
    for name in (name for stat in statistics for name in stat.names):
        spread = interval(resampled[0][name], None if jackknife is None else jackknife[0][name])
        undefined = spread.pop("undefined")
        out |= {f"{name}_{k}": v for k, v in spread.items()}
        if undefined:
            out[f"{name}_ci_undefined_resamples"] = undefined
        if baseline is None:
            continue
        changes = resampled[0][name] - resampled[1][name]
        change = interval(changes, None if jackknife is None else difference(jackknife, name))
        if change["undefined"]:  # undefined in either frame: left out of the change's figures
            out[f"{name}_change_ci_undefined_resamples"] = change["undefined"]
        out[f"{name}_change_ci_low"] = change["ci_low"]
        out[f"{name}_change_ci_high"] = change["ci_high"]
        out[f"{name}_change_p"] = change_p_value(changes)
    return out


def difference(jackknife: list[dict], name: str) -> tuple[float, np.ndarray]:
    """The change's observed and jackknife values (frame - baseline)."""
    (now, now_left_out), (before, before_left_out) = jackknife[0][name], jackknife[1][name]
    return now - before, now_left_out - before_left_out


def job_statistics(
    predictions: pd.DataFrame,
    baseline: pd.DataFrame | None,
    native: SummedStatistics | None,
    samples: int,
    seed: int,
    method: str = "percentile",
) -> dict[str, float | None]:
    """The statistics a yes/no job reports (metrics.json): bootstrap_statistics of SHARED
    and of the benchmark's `native` metrics (None: none); with a `baseline`,
    accuracy_mcnemar_b/c/p (items) and paired_accuracy_mcnemar_b/c/p (whole groups).
    Frames have the columns group_id, label, pred, correct (and what `native` reads)."""
    statistics = [SHARED_STATISTICS] + ([] if native is None else [native])
    out = bootstrap_statistics(predictions, baseline, statistics, samples, seed, method)
    if baseline is not None:
        tests = {
            "accuracy": (baseline["correct"].to_numpy(), predictions["correct"].to_numpy()),
            "paired_accuracy": (group_correct(baseline), group_correct(predictions)),
        }
        for name, (before, after) in tests.items():
            out |= {f"{name}_mcnemar_{k}": v for k, v in mcnemar_test(before, after).items()}
    return out


def answers(predictions: pd.DataFrame) -> pd.Series:
    """Each item's answer: the generated one (yes/no/unknown) in generate mode, else yes
    or no from pred."""
    if "answer" in predictions:
        return predictions["answer"]
    return predictions["pred"].map({True: "yes", False: "no"})


def flips(predictions: pd.DataFrame, baseline: pd.DataFrame) -> pd.DataFrame:
    """Every item whose answer changed from the baseline (same items, same order):
    item_id, group_id, label, baseline_answer, answer, right ("baseline", "intervention"
    or "neither"), margin_before and margin_after (yes_logit - no_logit)."""
    before, after = answers(baseline), answers(predictions)
    changed = (before != after).to_numpy()
    right = np.where(
        baseline["correct"], "baseline", np.where(predictions["correct"], "intervention", "neither")
    )
    frame = pd.DataFrame(
        {
            "item_id": predictions["item_id"],
            "group_id": predictions["group_id"],
            "label": predictions["label"],
            "baseline_answer": before,
            "answer": after,
            "right": right,
            "margin_before": baseline["yes_logit"] - baseline["no_logit"],
            "margin_after": predictions["yes_logit"] - predictions["no_logit"],
        }
    )
    return frame[changed].reset_index(drop=True)


def flip_counts(flipped: pd.DataFrame) -> dict[str, int]:
    """n_flipped_to_yes / n_flipped_to_no (answers that became yes / no), n_fixed (right
    only under the intervention), n_broken (right only in the baseline)."""
    return {
        "n_flipped_to_yes": int((flipped["answer"] == "yes").sum()),
        "n_flipped_to_no": int((flipped["answer"] == "no").sum()),
        "n_fixed": int((flipped["right"] == "intervention").sum()),
        "n_broken": int((flipped["right"] == "baseline").sum()),
    }
