"""Shared yes/no metrics, and the comparison of an intervention with its baseline."""

import pandas as pd


def shared_metrics(predictions: pd.DataFrame) -> dict[str, float]:
    """predictions has boolean columns label, pred, correct and a group_id column.
    A group counts as correct only if all its items are (paired accuracy)."""
    yes_rate = float(predictions["pred"].mean())
    gt_yes_rate = float(predictions["label"].mean())
    return {
        "n_items": len(predictions),
        "n_groups": int(predictions["group_id"].nunique()),
        "yes_rate": yes_rate,
        "gt_yes_rate": gt_yes_rate,
        "yes_bias": yes_rate - gt_yes_rate,
        "accuracy": float(predictions["correct"].mean()),
        "paired_accuracy": float(predictions.groupby("group_id")["correct"].all().mean()),
    }


def compare_with_baseline(metrics: dict, baseline: dict) -> dict:
    """baseline_<metric> for every metric, the change in paired accuracy in points and
    in percent of the baseline (None when the baseline is 0, where a ratio means nothing),
    and the change in yes-rate in points (a column of the MLflow runs table beside them)."""
    out = {f"baseline_{name}": value for name, value in baseline.items()}
    now, before = metrics["paired_accuracy"], baseline["paired_accuracy"]
    out["paired_accuracy_change_points"] = 100.0 * (now - before)
    out["paired_accuracy_change_pct"] = 100.0 * (now - before) / before if before > 0 else None
    if "yes_rate" in metrics and "yes_rate" in baseline:
        out["yes_rate_change_points"] = 100.0 * (metrics["yes_rate"] - baseline["yes_rate"])
    return out
