"""NaturalBench (Li et al., NeurIPS 2024): 2 questions x 2 images per sample.

Hub: BaiqiL/NaturalBench (split train, 1,900 samples: Index, Image_0, Image_1, Question_0,
Question_1, Image_k_Question_j "Yes"/"No" (or "A"/"B" for multiple choice), Question_Type
"yes_no" | "multiple_choice", Source); only the yes_no samples are used, the others are
counted as n_multiple_choice_excluded. The type column is `Question_Type` on the current
card and `Question Type` in older revisions and exports: either is accepted. Local:
data_dir holds parquet file(s) exported from it (same columns, images as {bytes, path}).
The answer of question j on image k is the field Image_k_Question_j. Native metrics as in
the official get_scores: Acc per item, Q-Acc per question (right on both images), I-Acc
per image (right on both questions), G-Acc per sample (all four). The official figures
cover all 1,900 samples, multiple-choice ones included; these cover only the yes/no ones,
so they are named yesno_* to keep them from being compared with the leaderboard."""

import re
from collections.abc import Mapping

import numpy as np
import pandas as pd

from sysattn_exp.benchmarks.base import (
    Benchmark,
    DatasetImages,
    Item,
    SummedStatistics,
    all_correct_rate,
    check_groups,
    check_template,
    data_dir,
    fraction,
    group_sums,
    hub_split,
    one_each,
    require_columns,
)
from sysattn_exp.errors import UsageError

MAIN_METRIC = "naturalbench/yesno_g_acc"  # the native metric the report shows
STAT_METRICS = (MAIN_METRIC,)  # given SE, CI and change statistics (evaluation.stats)
LOCAL_HINT = "parquet file(s) exported from BaiqiL/NaturalBench"
TYPE_COLUMNS = ("Question_Type", "Question Type")  # current card, older revisions
COLUMNS = [
    "Index",
    "Question_0",
    "Question_1",
    "Image_0_Question_0",
    "Image_1_Question_0",
    "Image_0_Question_1",
    "Image_1_Question_1",
]


def parquet_dataset(directory):
    import datasets

    files = sorted(str(p) for p in directory.glob("*.parquet"))
    if not files:
        raise UsageError(f"benchmark.data_dir={directory} holds no .parquet files ({LOCAL_HINT})")
    return datasets.load_dataset("parquet", data_files=files, split="train")


def items_of(dataset, source: str) -> tuple[list[Item], DatasetImages, int]:
    """Items of the yes_no samples, their images, and how many samples were not yes_no."""
    type_column = next((c for c in TYPE_COLUMNS if c in dataset.column_names), TYPE_COLUMNS[0])
    require_columns(dataset, [*COLUMNS, type_column, "Image_0", "Image_1"], source)
    items, index, excluded = [], {}, 0
    for row, record in enumerate(dataset.select_columns([*COLUMNS, type_column])):
        if record[type_column] != "yes_no":
            excluded += 1
            continue
        sample = str(record["Index"])
        for j in (0, 1):
            for k in (0, 1):
                answer = str(record[f"Image_{k}_Question_{j}"]).strip().lower()
                if answer not in ("yes", "no"):
                    raise UsageError(
                        f"{source} row {row}: Image_{k}_Question_{j} {answer!r} must be Yes or No"
                    )
                image_id = f"{sample}/Image_{k}"
                index[image_id] = (row, f"Image_{k}")
                items.append(
                    Item(
                        item_id=f"{sample}/q{j}_i{k}",
                        group_id=sample,
                        image_id=image_id,
                        question=record[f"Question_{j}"],
                        label=answer == "yes",
                        meta={"question_index": j, "image_index": k},
                    )
                )
    return items, DatasetImages(dataset, index), excluded


def sample_problem(members: list[Item]) -> str | None:
    """Q-Acc, I-Acc and G-Acc need each sample's 2 questions x 2 images, once each (an
    Index on two rows would merge two samples)."""
    return one_each(
        members,
        lambda item: (item.meta["question_index"], item.meta["image_index"]),
        [(0, 0), (0, 1), (1, 0), (1, 1)],
        "(question, image) pairs",
    )


def native_metrics(scored: pd.DataFrame) -> dict[str, float]:
    return {
        "naturalbench/yesno_acc": float(scored["correct"].mean()),
        "naturalbench/yesno_q_acc": all_correct_rate(scored, ["group_id", "question_index"]),
        "naturalbench/yesno_i_acc": all_correct_rate(scored, ["group_id", "image_index"]),
        "naturalbench/yesno_g_acc": all_correct_rate(scored, ["group_id"]),
    }


def stat_columns(scored: pd.DataFrame) -> pd.DataFrame:
    """Per sample (the group; SummedStatistics.columns): 1 (`samples`) and whether all its
    four answers are right (`sample_right`)."""
    correct = scored["correct"].astype(bool)
    whole = correct.groupby(scored["group_id"]).transform("all")
    first = ~scored["group_id"].duplicated()
    values = pd.DataFrame({"samples": first, "sample_right": first & whole})
    return group_sums(values, scored["group_id"])


def stat_from_sums(sums: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """naturalbench/yesno_g_acc: sample_right / samples."""
    return {MAIN_METRIC: fraction(sums["sample_right"], sums["samples"])}


STATISTICS = SummedStatistics(STAT_METRICS, stat_columns, stat_from_sums)


def load(cfg) -> Benchmark:
    directory = data_dir(cfg)
    if directory is None:
        dataset, source = hub_split(cfg, LOCAL_HINT)[0], cfg.hub_id
    else:
        dataset, source = parquet_dataset(directory), str(directory)
    items, images, excluded = items_of(dataset, source)
    check_groups(items, source, sample_problem)
    counts = {"n_multiple_choice_excluded": excluded}
    return Benchmark(
        "naturalbench", items, check_template(cfg.template), images, native_metrics, counts
    )


def parse_generated(text: str) -> str:
    """A generated answer as NaturalBench's extract_answer reads a yes_no one (its README's
    evaluation code; lmms-eval's naturalbench task copies it): the first whole word "yes"
    or "no" (regex word boundaries, any case) decides; neither -> "unknown" (its -1)."""
    positions = {
        answer: match.start()
        for answer in ("yes", "no")
        if (match := re.search(rf"\b{answer}\b", text, re.IGNORECASE))
    }
    if not positions:
        return "unknown"
    return min(positions, key=positions.get)
