"""Statistics of a yes/no job: a cluster bootstrap over the benchmark's groups, the paired
bootstrap of a change against the baseline, McNemar's exact test and the items that flipped.

- Cluster bootstrap (Efron & Tibshirani 1993, An Introduction to the Bootstrap, ch. 6 and
  13; Davison & Hinkley 1997, Bootstrap Methods, sec. 3.8 for clustered data): each
  resample draws the benchmark's groups (its pairing unit, the one paired accuracy uses)
  with replacement, as many as it has, and recomputes the metric from the items of the
  drawn groups. The standard error is the standard deviation of the resampled metric
  (ddof=1); the 95% interval is the percentile interval (the 2.5th and 97.5th percentiles
  of the resampled metric, numpy's linear interpolation), not BCa.
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

Metrics that are means over items (accuracy, yes_rate, yes_bias) or over groups
(paired_accuracy) are computed from per-group sums weighted by how often each group is
drawn (one matrix product per chunk of resamples: 10,000 resamples of 26,118 items take
about 3 s); other metrics (F1, MME's score, Winoground's group score: a benchmark's
native metric) are recomputed whole on each resampled frame, each drawn group a new group
(its group_id the position of the draw), which costs one call of the benchmark's metric
function (milliseconds) per resample: they use the first `native_samples` resamples only
(stats.native_bootstrap_samples)."""

from collections.abc import Callable, Iterator

import numpy as np
import pandas as pd
from statsmodels.stats.contingency_tables import mcnemar

LEVEL = 0.95  # the intervals' coverage
CHUNK = 256  # resamples drawn at once: the draws depend on it, so it is fixed
SHARED = ("accuracy", "paired_accuracy", "yes_rate", "yes_bias")  # computed from group sums


def draw_groups(n_groups: int, samples: int, seed: int) -> Iterator[np.ndarray]:
    """The resamples' group draws, in chunks of CHUNK resamples (the last one shorter):
    int arrays of shape (chunk, n_groups), each row the indices of the groups drawn
    with replacement. The same (n_groups, samples, seed) give the same draws."""
    rng = np.random.default_rng(seed)
    for start in range(0, samples, CHUNK):
        yield rng.integers(0, n_groups, size=(min(CHUNK, samples - start), n_groups))


class Groups:
    """The items of a predictions frame by group: `codes` (n_items,) the group index of
    each item (groups in sorted group_id order), `order` the item indices sorted by group,
    `starts` / `sizes` (n_groups,) each group's slice of `order`."""

    def __init__(self, group_id: pd.Series):
        self.codes, self.ids = pd.factorize(group_id, sort=True)
        self.n = len(self.ids)
        self.sizes = np.bincount(self.codes, minlength=self.n)
        self.order = np.argsort(self.codes, kind="stable")
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])

    def items(self, draw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The item indices of the drawn groups `draw` (n_groups,), and for each the
        position of its draw (the resampled frame's new group id)."""
        sizes = self.sizes[draw]
        ends = np.cumsum(sizes)
        within = np.arange(ends[-1]) - np.repeat(ends - sizes, sizes)
        return self.order[np.repeat(self.starts[draw], sizes) + within], np.repeat(
            np.arange(len(draw)), sizes
        )

    def sums(self, values: np.ndarray) -> np.ndarray:
        """Per-group sums of item values (n_items, k) -> (n_groups, k)."""
        out = np.zeros((self.n, values.shape[1]))
        np.add.at(out, self.codes, values)
        return out


def shared_columns(predictions: pd.DataFrame, groups: Groups) -> np.ndarray:
    """Per-group sums (n_groups, 5): items, correct, yes answers, yes labels, and whether
    the whole group is correct (one per group)."""
    values = predictions[["correct", "pred", "label"]].to_numpy(dtype=float)
    sums = groups.sums(values)
    whole = (sums[:, 0] == groups.sizes).astype(float)
    return np.column_stack([groups.sizes, sums, whole])


def shared_from_sums(sums: np.ndarray) -> dict[str, np.ndarray]:
    """SHARED metrics from summed columns (..., 5) of shared_columns, over the last axis;
    a resample's row of weights times the groups' sums gives its sums."""
    n_items, correct, yes, labels, whole = np.moveaxis(sums, -1, 0)
    return {
        "accuracy": correct / n_items,
        "paired_accuracy": whole,  # divided by the number of groups by the caller
        "yes_rate": yes / n_items,
        "yes_bias": (yes - labels) / n_items,
    }


def resampled_metrics(
    frames: list[pd.DataFrame],
    native: Callable[[pd.DataFrame], dict] | None,
    names: list[str],
    samples: int,
    seed: int,
    native_samples: int | None = None,
) -> tuple[list[dict[str, float]], list[dict[str, np.ndarray]]]:
    """The metrics `names` (SHARED ones, and native ones computed by `native(frame)`, a
    frame of the same columns) of each frame of `frames` (the same items in the same
    order: a baseline and a condition), as observed and on `samples` cluster-bootstrap
    resamples that share their group draws (draw_groups(seed)); native metrics, recomputed
    whole on each resample, on the first `native_samples` of them only (None: all); a
    resample where a metric is undefined (None or not finite) gives NaN."""
    native_samples = samples if native_samples is None else min(samples, native_samples)
    groups = Groups(frames[0]["group_id"])
    sums = [shared_columns(frame, groups) for frame in frames]
    natives = [name for name in names if name not in SHARED]
    shared = [name for name in names if name in SHARED]
    observed = []
    for frame, summed in zip(frames, sums, strict=True):
        values = {k: float(v) for k, v in shared_from_sums(summed.sum(axis=0)).items()}
        values["paired_accuracy"] /= groups.n
        if natives:
            values |= native_values(native, frame, natives)
        observed.append({name: values[name] for name in names})
    resampled = [
        {name: np.empty(native_samples if name in natives else samples) for name in names}
        for _ in frames
    ]
    done = 0
    for draws in draw_groups(groups.n, samples, seed):
        offsets = groups.n * np.arange(len(draws))[:, None]
        weights = np.bincount((draws + offsets).ravel(), minlength=draws.size)
        weights = weights.reshape(len(draws), groups.n).astype(float)
        rows = slice(done, done + len(draws))
        for summed, out in zip(sums, resampled, strict=True):
            values = shared_from_sums(weights @ summed)
            values["paired_accuracy"] = values["paired_accuracy"] / groups.n
            for name in shared:
                out[name][rows] = values[name]
        for r, draw in enumerate(draws[: max(0, native_samples - done)]):
            if not natives:
                break
            items, new_groups = groups.items(draw)
            for frame, out in zip(frames, resampled, strict=True):
                sample = frame.iloc[items].reset_index(drop=True)
                sample["group_id"] = new_groups
                for name, value in native_values(native, sample, natives).items():
                    out[name][done + r] = value
        done += len(draws)
    return observed, resampled


def native_values(native, frame: pd.DataFrame, names: list[str]) -> dict[str, float]:
    metrics = native(frame)
    return {name: undefined_as_nan(metrics.get(name)) for name in names}


def undefined_as_nan(value) -> float:
    return float("nan") if value is None or not np.isfinite(value) else float(value)


def interval(resampled: np.ndarray) -> dict[str, float]:
    """se (standard deviation, ddof=1), ci_low and ci_high (the LEVEL percentile interval)
    of the defined resamples, and how many were undefined (None where all were)."""
    defined = resampled[np.isfinite(resampled)]
    tail = 100 * (1 - LEVEL) / 2
    out = {"undefined": int(len(resampled) - len(defined))}
    if len(defined) < 2:
        return out | {"se": None, "ci_low": None, "ci_high": None}
    low, high = np.percentile(defined, [tail, 100 - tail])
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


def job_statistics(
    predictions: pd.DataFrame,
    baseline: pd.DataFrame | None,
    native: Callable[[pd.DataFrame], dict] | None,
    native_names: list[str],
    samples: int,
    seed: int,
    native_samples: int | None = None,
) -> dict[str, float]:
    """The statistics a yes/no job reports (metrics.json), for SHARED and `native_names`:
    `<metric>_se`, `<metric>_ci_low`, `<metric>_ci_high` of the predictions; with a
    `baseline` (the same items in the same order), `<metric>_change_ci_low`,
    `<metric>_change_ci_high`, `<metric>_change_p` of the change (condition - baseline),
    and accuracy_mcnemar_b/c/p and paired_accuracy_mcnemar_b/c/p. Frames have the
    columns group_id, label, pred, correct (and what `native` reads). Native metrics are
    recomputed whole on each resample, on the first `native_samples` resamples only
    (None: all `samples`), since that costs a call of `native` per resample. Where a metric is
    undefined on some resamples they are left out and counted in
    `<metric>_ci_undefined_resamples` (written only when not 0)."""
    names = [*SHARED, *native_names]
    frames = [predictions] if baseline is None else [predictions, baseline]
    observed, resampled = resampled_metrics(frames, native, names, samples, seed, native_samples)
    out = {}
    for name in names:
        spread = interval(resampled[0][name])
        undefined = spread.pop("undefined")
        out |= {f"{name}_{k}": v for k, v in spread.items()}
        if undefined:
            out[f"{name}_ci_undefined_resamples"] = undefined
        if baseline is None:
            continue
        changes = resampled[0][name] - resampled[1][name]
        change = interval(changes)
        out[f"{name}_change_ci_low"] = change["ci_low"]
        out[f"{name}_change_ci_high"] = change["ci_high"]
        out[f"{name}_change_p"] = change_p_value(changes)
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
