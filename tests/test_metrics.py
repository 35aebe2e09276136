import pandas as pd
import pytest

from sysattn_exp.evaluation.metrics import compare_with_baseline, shared_metrics


def frame(rows):
    df = pd.DataFrame(rows, columns=["group_id", "label", "pred"])
    df["correct"] = df["label"] == df["pred"]
    return df


def test_shared_metrics_hand_worked():
    # g1: both right; g2: one wrong; g3: both right. 6 items, 4 yes predictions, 3 yes labels.
    df = frame(
        [
            ("g1", True, True),
            ("g1", False, False),
            ("g2", True, True),
            ("g2", False, True),
            ("g3", True, True),
            ("g3", False, False),
        ]
    )
    m = shared_metrics(df)
    assert m["n_items"] == 6 and m["n_groups"] == 3
    assert m["yes_rate"] == pytest.approx(4 / 6)
    assert m["gt_yes_rate"] == pytest.approx(3 / 6)
    assert m["yes_bias"] == pytest.approx(1 / 6)
    assert m["accuracy"] == pytest.approx(5 / 6)
    assert m["paired_accuracy"] == pytest.approx(2 / 3)


def test_compare_with_baseline():
    now = {"paired_accuracy": 0.6, "yes_rate": 0.5}
    before = {"paired_accuracy": 0.4, "yes_rate": 0.8}
    out = compare_with_baseline(now, before)
    assert out["baseline_paired_accuracy"] == 0.4 and out["baseline_yes_rate"] == 0.8
    assert out["paired_accuracy_change_pct"] == pytest.approx(50.0)
    assert out["paired_accuracy_change_points"] == pytest.approx(20.0)
    assert out["yes_rate_change_points"] == pytest.approx(-30.0)
    zero = compare_with_baseline(now, {"paired_accuracy": 0.0})
    assert "yes_rate_change_points" not in zero  # no baseline yes-rate to compare with
    assert zero["paired_accuracy_change_pct"] is None
    assert zero["paired_accuracy_change_points"] == pytest.approx(60.0)
