"""Each benchmark's native metrics on a small hand-worked example."""

import numpy as np
import pandas as pd
import pytest
from benchmark_fixtures import write_beaf
from test_benchmark_loaders import benchmark_cfg

from sysattn_exp.benchmarks import (
    beaf,
    hallusionbench,
    load_benchmark,
    mme,
    naturalbench,
    pope,
    sugarcrepe,
    winoground,
)


def scored(rows: list[dict], rank_by: str | None = None) -> pd.DataFrame:
    """rows with label and either pred or the probabilities p_yes and p_no of the yes and
    no words under the softmax over the whole vocabulary. Then, as the runner builds it:
    yes_logit - no_logit = log(p_yes / p_no) (the two share the vocabulary's log-sum-exp),
    pred = yes_logit > no_logit, and rank_score per scoring.rank_by."""
    df = pd.DataFrame(rows)
    if "p_yes" in df:
        df["yes_logit"], df["no_logit"] = np.log(df["p_yes"]), np.log(df["p_no"])
        df["pred"] = df["yes_logit"] > df["no_logit"]
        log_odds = df["yes_logit"] - df["no_logit"]
        df["rank_score"] = {"p_yes": df["p_yes"], "log_odds": log_odds}[rank_by]
    df["correct"] = df["pred"] == df["label"]
    return df


def test_mme_acc_acc_plus_score_and_totals():
    rows = [  # existence: image a both right, image b one right; code_reasoning: both wrong
        {"group_id": "a", "category": "existence", "label": True, "pred": True},
        {"group_id": "a", "category": "existence", "label": False, "pred": False},
        {"group_id": "b", "category": "existence", "label": True, "pred": True},
        {"group_id": "b", "category": "existence", "label": False, "pred": True},
        {"group_id": "c", "category": "code_reasoning", "label": True, "pred": False},
        {"group_id": "c", "category": "code_reasoning", "label": False, "pred": True},
    ]
    m = mme.native_metrics(scored(rows))
    assert m["mme/existence/acc"] == pytest.approx(75.0)
    assert m["mme/existence/acc_plus"] == pytest.approx(50.0)
    assert m["mme/existence/score"] == pytest.approx(125.0)
    assert m["mme/code_reasoning/score"] == 0.0
    assert m["mme/perception_score"] == pytest.approx(125.0)
    assert m["mme/cognition_score"] == 0.0


def test_hallusionbench_aacc_qacc_facc():
    rows = [  # question pairs q1, q2 (each also asked without a figure), q3; figures f1, f2
        ("q1", None, False, False),
        ("q1", "f1", True, True),
        ("q1", "f2", False, False),
        ("q2", None, True, False),  # wrong without a figure
        ("q2", "f1", True, True),
        ("q2", "f2", False, False),
        ("q3", "f1", True, True),
        ("q3", "f2", True, False),  # wrong on f2
    ]
    m = hallusionbench.native_metrics(
        scored(
            [
                {"group_id": g, "figure_key": f, "has_image": f is not None, "label": y, "pred": p}
                for g, f, y, p in rows
            ]
        )
    )
    # Official (utils.py): aAcc and qAcc over every question, the no-image ones included.
    assert m["hallusionbench/aAcc"] == pytest.approx(6 / 8)
    assert m["hallusionbench/qAcc"] == pytest.approx(1 / 3)  # q1 only: q2's no-image is wrong
    # fAcc skips the questions without a figure: f1 all right, f2 not.
    assert m["hallusionbench/fAcc"] == pytest.approx(1 / 2)
    # The image-only figures leave the no-image questions out: q2 now counts as right.
    assert m["hallusionbench/aAcc_image"] == pytest.approx(5 / 6)
    assert m["hallusionbench/qAcc_image"] == pytest.approx(2 / 3)


def test_naturalbench_acc_q_i_g():
    rows = []
    for group, wrong in (("g0", None), ("g1", (0, 0))):
        for j in (0, 1):
            for k in (0, 1):
                label = j == k
                rows.append(
                    {
                        "group_id": group,
                        "question_index": j,
                        "image_index": k,
                        "label": label,
                        "pred": (not label) if wrong == (j, k) else label,
                    }
                )
    m = naturalbench.native_metrics(scored(rows))
    assert m["naturalbench/yesno_acc"] == pytest.approx(7 / 8)
    assert m["naturalbench/yesno_q_acc"] == pytest.approx(3 / 4)
    assert m["naturalbench/yesno_i_acc"] == pytest.approx(3 / 4)
    assert m["naturalbench/yesno_g_acc"] == pytest.approx(1 / 2)


# Two items where P(yes) and the log-odds disagree: P(yes)=.5, P(no)=.1 has the lower
# P(yes) but the higher log-odds (ln 5) than P(yes)=.6, P(no)=.3 (ln 2).
LOW_P_HIGH_ODDS, HIGH_P_LOW_ODDS = (0.5, 0.1), (0.6, 0.3)


def test_winoground_text_image_group_scores_by_rank_score():
    probs = {  # (caption j, image k): (P(yes), P(no)); caption j belongs to image j
        # text right by log-odds only: image 0 ranks caption 0 above caption 1 by ln 5 > ln 2
        # but below it by P(yes) .5 < .6; image right by both.
        "A": {
            (0, 0): LOW_P_HIGH_ODDS,
            (1, 0): HIGH_P_LOW_ODDS,
            (0, 1): (0.2, 0.7),
            (1, 1): (0.9, 0.05),
        },
        # text wrong by both (.4 < .7; log-odds 0 < ln 3.5), image right by both.
        "B": {(0, 0): (0.4, 0.4), (1, 0): (0.7, 0.2), (0, 1): (0.1, 0.8), (1, 1): (0.8, 0.1)},
        # everything right by both.
        "C": {(0, 0): (0.9, 0.05), (1, 0): (0.1, 0.8), (0, 1): (0.2, 0.7), (1, 1): (0.8, 0.1)},
    }
    rows = [
        {
            "group_id": g,
            "caption_index": j,
            "image_index": k,
            "label": j == k,
            "p_yes": y,
            "p_no": n,
        }
        for g, table in probs.items()
        for (j, k), (y, n) in table.items()
    ]
    by_p_yes = winoground.native_metrics(scored(rows, "p_yes"))
    assert by_p_yes["winoground/text_score"] == pytest.approx(1 / 3)  # C
    assert by_p_yes["winoground/image_score"] == pytest.approx(1.0)
    assert by_p_yes["winoground/group_score"] == pytest.approx(1 / 3)
    by_log_odds = winoground.native_metrics(scored(rows, "log_odds"))
    assert by_log_odds["winoground/text_score"] == pytest.approx(2 / 3)  # A and C
    assert by_log_odds["winoground/image_score"] == pytest.approx(1.0)
    assert by_log_odds["winoground/group_score"] == pytest.approx(2 / 3)


def test_sugarcrepe_ranking_and_paired_per_subset_and_mean():
    rows = []
    for subset, group, positive, negative in (
        # caption ranked above its negative by log-odds (ln 5 > ln 2), below by P(yes);
        # both answered yes, so the pair is wrong either way
        ("add_att", "g1", LOW_P_HIGH_ODDS, HIGH_P_LOW_ODDS),
        ("add_att", "g2", (0.7, 0.2), (0.1, 0.8)),  # right by both; pair right
        ("swap_obj", "g3", (0.2, 0.5), (0.4, 0.3)),  # wrong by both; pair wrong
    ):
        for polarity, (p_yes, p_no) in (("positive", positive), ("negative", negative)):
            rows.append(
                {
                    "subset": subset,
                    "group_id": group,
                    "polarity": polarity,
                    "label": polarity == "positive",
                    "p_yes": p_yes,
                    "p_no": p_no,
                }
            )
    by_p_yes = sugarcrepe.native_metrics(scored(rows, "p_yes"))
    assert by_p_yes["sugarcrepe/add_att/pyes_acc"] == pytest.approx(1 / 2)
    assert by_p_yes["sugarcrepe/swap_obj/pyes_acc"] == 0.0
    assert by_p_yes["sugarcrepe/mean_pyes_acc"] == pytest.approx(1 / 4)
    by_log_odds = sugarcrepe.native_metrics(scored(rows, "log_odds"))
    assert by_log_odds["sugarcrepe/add_att/pyes_acc"] == 1.0
    assert by_log_odds["sugarcrepe/swap_obj/pyes_acc"] == 0.0
    assert by_log_odds["sugarcrepe/mean_pyes_acc"] == pytest.approx(1 / 2)
    for m in (by_p_yes, by_log_odds):  # paired yes/no accuracy does not depend on rank_by
        assert m["sugarcrepe/add_att/paired_accuracy"] == pytest.approx(1 / 2)
        assert m["sugarcrepe/swap_obj/paired_accuracy"] == 0.0
        assert m["sugarcrepe/mean_paired_accuracy"] == pytest.approx(1 / 4)


def test_beaf_change_metrics(tmp_path):
    write_beaf(tmp_path / "beaf")
    bench = load_benchmark(
        benchmark_cfg("benchmark=beaf", f"benchmark.data_dir={tmp_path / 'beaf'}")
    )
    # Labels by id (train, truck, person): original y y y; _00 (train removed) n y y;
    # _03 (truck removed) y n y.
    preds = [True, False, True, False, True, False, True, True, True]
    df = pd.DataFrame([i.meta | {"group_id": i.group_id, "label": i.label} for i in bench.items])
    m = beaf.native_metrics(scored(df.assign(pred=preds).to_dict("records")))
    # Removed-object pairs: train (yes -> no: TU), truck (no -> yes: IG).
    assert (m["beaf/TU"], m["beaf/IG"], m["beaf/SB_p"], m["beaf/SB_n"]) == (0.5, 0.5, 0.0, 0.0)
    # Unremoved person on the edits: wrong on _00 (was right on the original), right on _03.
    assert m["beaf/ID"] == pytest.approx(1 / 2)
    assert m["beaf/accuracy"] == pytest.approx(6 / 9)
    assert m["beaf/precision"] == pytest.approx(5 / 6)
    assert m["beaf/recall"] == pytest.approx(5 / 7)
    assert m["beaf/f1"] == pytest.approx(10 / 13)
    assert m["beaf/f1_tu_id"] == pytest.approx(0.5)


def pope_rows(split: str, labels: str, preds: str) -> list[dict]:
    return [
        {"split": split, "group_id": split, "label": y == "Y", "pred": p == "Y"}
        for y, p in zip(labels, preds, strict=True)
    ]


def test_pope_per_split_and_mean_as_evaluate_py():
    rows = (
        pope_rows("random", "YYYNNN", "YYNYNN")  # TP 2, FN 1, FP 1, TN 2
        + pope_rows("popular", "YYNN", "NNNN")  # no yes answer: TP 0, FN 2, TN 2
        + pope_rows("adversarial", "YN", "YY")  # TP 1, FP 1
    )
    m = pope.native_metrics(scored(rows))
    assert m["pope/random/accuracy"] == pytest.approx(4 / 6)
    assert m["pope/random/precision"] == pytest.approx(2 / 3)
    assert m["pope/random/recall"] == pytest.approx(2 / 3)
    assert m["pope/random/f1"] == pytest.approx(2 / 3)
    assert m["pope/random/yes_ratio"] == pytest.approx(1 / 2)
    # evaluate.py divides 0 by 0 for precision here: undefined, not 0; F1 = 2TP/(2TP+FP+FN) = 0.
    assert m["pope/popular/precision"] is None
    assert (m["pope/popular/recall"], m["pope/popular/f1"]) == (0.0, 0.0)
    assert (m["pope/popular/accuracy"], m["pope/popular/yes_ratio"]) == (0.5, 0.0)
    assert m["pope/adversarial/precision"] == 0.5 and m["pope/adversarial/recall"] == 1.0
    assert m["pope/mean_accuracy"] == pytest.approx(5 / 9)
    assert m["pope/mean_recall"] == pytest.approx(5 / 9)
    assert m["pope/mean_f1"] == pytest.approx(4 / 9)
    assert m["pope/mean_yes_ratio"] == pytest.approx(1 / 2)
    assert m["pope/mean_precision"] is None  # one split's is undefined
    assert not any("unknown" in k for k in m)


def test_pope_generated_unknown_is_wrong_and_not_yes():
    df = scored(pope_rows("random", "YYNN", "YYYY"))
    df["answer"] = ["yes", "unknown", "no", "unknown"]  # decides over pred when present
    m = pope.native_metrics(df)
    assert m["pope/random/accuracy"] == 0.5
    assert m["pope/random/precision"] == 1.0
    assert m["pope/random/recall"] == 0.5  # the unknown answer to a yes question is a miss
    assert m["pope/random/f1"] == pytest.approx(2 / 3)
    assert m["pope/random/yes_ratio"] == 0.25
    assert m["pope/random/unknown_rate"] == 0.5
    assert m["pope/mean_unknown_rate"] == 0.5
