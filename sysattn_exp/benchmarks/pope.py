"""POPE (Li et al., EMNLP 2023): "Is there a <object> in the image?" about 500 COCO val2014
images, in three splits that differ in how the absent objects were drawn: random, popular
(the most frequent COCO objects) and adversarial (objects that co-occur with the present
ones). Each split: 3,000 questions, 6 per image (3 yes, 3 no: 1,500 each).

Hub: lmms-lab/POPE (lmms-eval's `pope` task), split test,
9,000 rows, all strings but image: id (the row, "0".."8999"), question_id (the release's
id within its split, so it repeats across splits), question, answer "yes"/"no",
image_source (the COCO file stem, e.g. "COCO_val2014_000000310196"), image, category
(the split: adversarial, popular or random).
Local: data_dir holds the release's question files, output/coco/coco_pope_<split>.json of
github.com/RUCAIBox/POPE: JSON lines {"question_id", "image" (a COCO val2014 file name),
"text", "label" "yes"/"no"} (newer copies add "image_id"); image_dir is the COCO val2014
folder.

benchmark.subsets picks splits (default all three). The same question on the same image
is asked in several splits, so an item is <split>/<question_id>, and a group, the
questions about one image within one split (<split>/<image>: by this key a group never
mixes images or splits, the structure POPE's per-split figures and the paired accuracy
assume).

Native metrics per split, as POPE's evaluate.py computes them with yes as the positive
class: accuracy, precision = TP / (TP + FP), recall = TP / (TP + FN), F1 = 2PR / (P + R),
yes_ratio = the share of questions answered yes; and their means over the loaded splits.
Where evaluate.py divides by zero (no yes answer at all), precision is None (lmms-eval
reports 0 there); F1 is computed as 2TP / (2TP + FP + FN), equal to 2PR / (P + R) wherever
that is defined, and 0 when TP is 0. With a generated answer (an `answer` column, "yes" /
"no" / "unknown"), an unknown answer is neither yes nor no: wrong, not a yes (so a miss
for recall), and counted as unknown_rate. evaluate.py itself reads any answer without
"no" or "not" as yes; here the scores decide, so there is no unknown."""

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from sysattn_exp.benchmarks.base import (
    Benchmark,
    DatasetImages,
    Item,
    SummedStatistics,
    check_template,
    data_dir,
    fraction,
    group_sums,
    hub_split,
    image_dir,
    json_lines,
    open_image_file,
    require_columns,
    required_file,
)
from sysattn_exp.errors import UsageError

# Mean F1 over the splits: the figure POPE's paper leads with and the OpenCompass VLM
# leaderboard's overall POPE score; unlike accuracy it falls when a model answers yes to
# everything (precision 0.5), which is the bias this study measures.
MAIN_METRIC = "pope/mean_f1"
STAT_METRICS = (MAIN_METRIC,)  # given SE, CI and change statistics (evaluation.stats)
SPLITS = ["random", "popular", "adversarial"]
FIELDS = ("question_id", "image", "text", "label")
HUB_COLUMNS = ["question_id", "question", "answer", "image_source", "category"]
LOCAL_HINT = (
    "the release's coco_pope_<split>.json files (output/coco/ of github.com/RUCAIBox/POPE) "
    "and benchmark.image_dir=COCO val2014"
)
METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def chosen_splits(cfg) -> list[str]:
    """benchmark.subsets (default: all three), in order, without repeats."""
    wanted = list(cfg.subsets) if cfg.get("subsets") else SPLITS
    return list(dict.fromkeys(wanted))


def parse_label(value, where: str) -> bool:
    if str(value).strip().lower() not in ("yes", "no"):
        raise UsageError(f"{where}: label {value!r} must be yes or no")
    return str(value).strip().lower() == "yes"


def make_item(split: str, question_id, image: str, question: str, label: bool, image_id: str):
    return Item(
        item_id=f"{split}/{question_id}",
        group_id=f"{split}/{image}",
        image_id=image_id,
        question=question,
        label=label,
        meta={"split": split},
    )


def unique_ids(items: list[Item], source: str) -> list[Item]:
    """Predictions are joined by item id: a question id twice in a split would mix two rows."""
    seen = set()
    for item in items:
        if item.item_id in seen:
            split, question_id = item.item_id.split("/", 1)
            raise UsageError(f"{source}: question_id {question_id} appears twice in {split}")
        seen.add(item.item_id)
    return items


def read_lines(path: Path) -> list[dict]:
    records = []
    for number, record in json_lines(path):
        missing = [f for f in FIELDS if not isinstance(record, dict) or record.get(f) is None]
        if missing:
            raise UsageError(
                f"{path} line {number}: missing field {missing[0]!r} "
                f"(POPE fields: {', '.join(FIELDS)})"
            )
        records.append(record | {"line": number})
    return records


def local_items(cfg, directory: Path, images: Path) -> list[Item]:
    items = []
    for split in chosen_splits(cfg):
        path = required_file(
            directory / f"coco_pope_{split}.json",
            f"coco_pope_{split}.json ({LOCAL_HINT}; or choose splits with benchmark.subsets)",
        )
        for record in read_lines(path):
            label = parse_label(record["label"], f"{path} line {record['line']}")
            image = str(record["image"])
            items.append(
                make_item(
                    split, record["question_id"], image, record["text"], label, str(images / image)
                )
            )
    return unique_ids(items, str(directory))


def hub_items(dataset, splits: list[str], source: str) -> tuple[list[Item], DatasetImages]:
    """Rows of the chosen splits (category), in split order. An image is keyed by its COCO
    file stem, so that the splits share one stored copy of it and its score-cache digest."""
    require_columns(dataset, [*HUB_COLUMNS, "image"], source)
    by_split: dict[str, list[Item]] = {split: [] for split in splits}
    index = {}
    # Whole columns at once: 0.01 s for the 9,000 rows, against 0.6 s read row by row.
    columns = dataset.select_columns(HUB_COLUMNS).to_dict()
    rows = zip(*columns.values(), strict=True)
    records = (dict(zip(columns, values, strict=True)) for values in rows)
    for row, record in enumerate(records):
        split = record["category"]
        if split not in SPLITS:
            raise UsageError(
                f"{source} row {row}: category {split!r} is not a POPE split ({', '.join(SPLITS)})"
            )
        if split not in by_split:
            continue
        image = record["image_source"]
        label = parse_label(record["answer"], f"{source} row {row}")
        index.setdefault(image, (row, "image"))
        by_split[split].append(
            make_item(split, record["question_id"], image, record["question"], label, image)
        )
    items = [item for split in splits for item in by_split[split]]
    return unique_ids(items, source), DatasetImages(dataset, index)


def ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def yes_and_no(rows: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Which answers are yes and which no: `answer` (generated answers), when present,
    decides yes / no / unknown; else `pred` (True = yes) does."""
    if "answer" in rows:
        answer = rows["answer"].astype(str).str.strip().str.lower()
        return answer == "yes", answer == "no"
    yes = rows["pred"].astype(bool)
    return yes, ~yes


def split_metrics(rows: pd.DataFrame) -> dict[str, float | None]:
    """POPE's five figures for one split (yes and no answers as yes_and_no reads them)."""
    label = rows["label"].astype(bool)
    yes, no = yes_and_no(rows)
    tp, fp = int((yes & label).sum()), int((yes & ~label).sum())
    tn = int((no & ~label).sum())
    # An unknown answer to a yes question is a miss: recall is over every yes question.
    fn = int(label.sum()) - tp
    out = {
        "accuracy": (tp + tn) / len(rows),
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "yes_ratio": int(yes.sum()) / len(rows),
    }
    if "answer" in rows:
        out["unknown_rate"] = float((~yes & ~no).mean())
    return out


def native_metrics(scored: pd.DataFrame) -> dict[str, float | None]:
    out, per_split = {}, []
    for split in [s for s in SPLITS if s in set(scored["split"])]:
        values = split_metrics(scored[scored["split"] == split])
        per_split.append(values)
        out |= {f"pope/{split}/{name}": value for name, value in values.items()}
    for name in per_split[0] if per_split else ():
        values = [v[name] for v in per_split]
        # A mean over a split whose figure is undefined would not be a mean over the splits.
        out[f"pope/mean_{name}"] = None if None in values else sum(values) / len(values)
    return out


def stat_columns(scored: pd.DataFrame) -> pd.DataFrame:
    """Per group (SummedStatistics.columns), for each split: its questions (`<split>/n`),
    true positives (`tp`), false positives (`fp`) and yes labels (`positives`; FN =
    positives - TP, as split_metrics counts an unknown answer to a yes question a miss)."""
    yes, _ = yes_and_no(scored)
    label = scored["label"].astype(bool)
    values = {}
    for split in SPLITS:
        member = scored["split"] == split
        values |= {
            f"{split}/n": member,
            f"{split}/tp": member & yes & label,
            f"{split}/fp": member & yes & ~label,
            f"{split}/positives": member & label,
        }
    return group_sums(pd.DataFrame(values), scored["group_id"])


def stat_from_sums(sums: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """pope/mean_f1 from stat_columns' sums: F1 = 2TP / (2TP + FP + FN) per split, their
    mean over the splits with questions; NaN where a present split's F1 is undefined
    (native_metrics' None)."""
    total, count = 0, 0
    for split in SPLITS:
        tp, fp = sums[f"{split}/tp"], sums[f"{split}/fp"]
        fn = sums[f"{split}/positives"] - tp
        present = sums[f"{split}/n"] > 0
        total = total + np.where(present, fraction(2 * tp, 2 * tp + fp + fn), 0.0)
        count = count + present
    return {MAIN_METRIC: fraction(total, count)}


STATISTICS = SummedStatistics(STAT_METRICS, stat_columns, stat_from_sums)


def load(cfg) -> Benchmark:
    template = check_template(cfg.template)
    splits = chosen_splits(cfg)
    directory = data_dir(cfg)
    if directory is None:
        dataset, source = hub_split(cfg, LOCAL_HINT)
        items, images = hub_items(dataset, splits, source)
    else:
        items, images = local_items(cfg, directory, image_dir(cfg, None)), open_image_file
    return Benchmark("pope", items, template, images, native_metrics)


def parse_generated(text: str) -> str:
    """A generated answer as POPE's evaluate.py reads it (github.com/AoiDragon/POPE; LLaVA's
    llava/eval/eval_pope.py is the same): only the first sentence (the text before the
    first "."), commas removed, split on single spaces; "No", "no" or "not" among the
    words -> "no", anything else -> "yes" (an empty answer, a "NO", a "Nope" too). Never
    "unknown"."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"
