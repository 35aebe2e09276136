"""HallusionBench (Guan et al., CVPR 2024): yes/no questions on original and edited figures,
and the same questions without any figure.

Hub: lmms-lab-encoder/HallusionBench (formerly lmms-lab/HallusionBench), one config with two
splits: `image` (951 questions with a figure) and `non_image` (the 178 questions without
one, visual_input "0"); both are loaded (benchmark.split). Local: data_dir holds
HallusionBench.json; each record's `filename` (e.g. ./VS/chart/0_1.png, null without a
figure) is resolved against image_dir (default: data_dir). gt_answer "1" = yes, "0" = no.

Every question is an item; one without a figure has `image_id` None (the prompt has no
image span). Native metrics as the official utils.py defines them:
- aAcc (get_eval_all): per question, over all 1,129 questions, the no-image ones included;
- qAcc (get_eval_pair_all): per question pair, the key category_subcategory_set_id_question_id
  (the group here), over all questions, so a pair counts only if its no-image question is
  right too;
- fAcc (get_eval_fig): per figure (category_subcategory_set_id_figure_id, all questions on
  it right), skipping category VS with figure_id 0 (the no-image questions: "no figure").
aAcc_image and qAcc_image are the same over the questions with a figure only (what this
project reported before; not comparable with the leaderboard).
One difference is inherent to scoring by logits: the official assign_correctness also
counts an "unclear" answer (GPT judge output 2) to a no-image VS question as correct; a
forced yes/no choice is never unclear, so such a question is right only when the choice
matches gt_answer."""

import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from sysattn_exp.benchmarks.base import (
    Benchmark,
    DatasetImages,
    DatasetsByPrefix,
    Item,
    SummedStatistics,
    all_correct_rate,
    check_groups,
    check_template,
    data_dir,
    fraction,
    group_sums,
    hub_dataset,
    image_dir,
    open_image_file,
    read_json,
    require_columns,
    required_file,
)
from sysattn_exp.errors import UsageError

MAIN_METRIC = "hallusionbench/qAcc"  # the native metric the report shows
# Given SE, CI and change statistics (evaluation.stats).
STAT_METRICS = ("hallusionbench/aAcc", MAIN_METRIC, "hallusionbench/fAcc")
FIGURE = "figure:"  # the prefix of stat_columns' per-figure columns
FIELDS = (
    "category",
    "subcategory",
    "visual_input",
    "set_id",
    "figure_id",
    "question_id",
    "question",
    "gt_answer",
)
LOCAL_HINT = "HallusionBench.json (and the images under benchmark.image_dir)"


def has_image(record: dict) -> bool:
    return str(record.get("visual_input")) != "0"


def make_item(record: dict, image_id: str | None, where: str) -> Item:
    missing = [f for f in FIELDS if record.get(f) is None]
    if missing:
        raise UsageError(f"{where}: missing field {missing[0]!r}")
    if str(record["gt_answer"]) not in ("0", "1"):
        raise UsageError(f'{where}: gt_answer {record["gt_answer"]!r} must be "1" or "0"')
    cat, sub, set_id = record["category"], record["subcategory"], record["set_id"]
    figure, question = record["figure_id"], record["question_id"]
    # get_eval_fig skips VS figure 0: the question asked without a figure.
    no_figure = cat == "VS" and str(figure) == "0"
    return Item(
        item_id=f"{cat}_{sub}_{set_id}_{figure}_{question}",
        group_id=f"{cat}_{sub}_{set_id}_{question}",
        image_id=image_id,
        question=record["question"],
        label=str(record["gt_answer"]) == "1",
        meta={
            "figure_key": None if no_figure else f"{cat}_{sub}_{set_id}_{figure}",
            "has_image": image_id is not None,
            # A set's question pairs and figures overlap: an unreadable figure drops it whole.
            "set_key": f"{cat}_{sub}_{set_id}",
        },
    )


def local_items(directory: Path, images: Path) -> list[Item]:
    path = required_file(directory / "HallusionBench.json", "HallusionBench.json")
    records = read_json(path)
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise UsageError(f"{path}: must be a JSON list of question records")
    items = []
    for i, record in enumerate(records):
        image = None
        if has_image(record):
            if not record.get("filename"):
                raise UsageError(
                    f"{path} record {i}: visual_input {record.get('visual_input')!r} but no "
                    "filename"
                )
            image = str(images / record["filename"])
        items.append(make_item(record, image, f"{path} record {i}"))
    return items


def hub_items(
    repo_id: str, splits: list[str], revision: str | None
) -> tuple[list[Item], DatasetsByPrefix]:
    """Items of every split, in split order. Only rows with a figure need the image column
    (the non_image split's is empty)."""
    items, images = [], {}
    for split in splits:
        dataset = hub_dataset(repo_id, split, LOCAL_HINT, revision)
        source = f"{repo_id} split {split}"
        require_columns(dataset, FIELDS, source)
        text = dataset.remove_columns("image") if "image" in dataset.column_names else dataset
        index = {}
        for row, record in enumerate(text):
            image_id = f"{split}/{record.get('filename') or row}" if has_image(record) else None
            if image_id is not None:
                index[image_id] = (row, "image")
            items.append(make_item(record, image_id, f"{source} row {row}"))
        if index:
            require_columns(dataset, ["image"], source)
            images[split] = DatasetImages(dataset, index)

    return items, DatasetsByPrefix(images)  # ids start with their split


def pair_problem(members: list[Item]) -> str | None:
    """qAcc and fAcc count each question on each figure once: a pair must not ask its
    question twice on one figure (one record twice would count twice)."""
    ids = [item.item_id for item in members]
    twice = next((i for i in ids if ids.count(i) > 1), None)
    if twice is not None:
        figure = twice.rsplit("_", 2)[1]
        return f"asks its question twice on figure {figure} ({twice})"
    return None


def set_of(item: Item) -> str:
    return item.meta["set_key"]


def rate(rows: pd.DataFrame, keys: list[str] | None = None) -> float | None:
    """Accuracy per item (no keys) or per group of `keys`; None when there are no rows."""
    if rows.empty:
        return None
    return float(rows["correct"].mean()) if keys is None else all_correct_rate(rows, keys)


def native_metrics(scored: pd.DataFrame) -> dict[str, float | None]:
    with_image = scored[scored["has_image"]]
    figures = scored[scored["figure_key"].notna()]
    return {
        "hallusionbench/aAcc": rate(scored),
        "hallusionbench/qAcc": rate(scored, ["group_id"]),
        "hallusionbench/fAcc": rate(figures, ["figure_key"]),
        "hallusionbench/aAcc_image": rate(with_image),
        "hallusionbench/qAcc_image": rate(with_image, ["group_id"]),
    }


def stat_columns(scored: pd.DataFrame) -> pd.DataFrame:
    """Per question pair (the group; SummedStatistics.columns): its questions (`items`),
    right answers (`correct`), 1 (`pairs`) and whether all are right (`pair_right`); and
    per figure f, the pair's questions on f (`figure:<f>/items`) and the wrong ones among
    them (`figure:<f>/wrong`). A figure is shared by several pairs, so fAcc is not a mean
    over pairs; but a resampled figure is right exactly when none of the drawn pairs'
    questions on it is wrong: a function of these sums all the same."""
    correct = scored["correct"].astype(bool)
    whole = correct.groupby(scored["group_id"]).transform("all")
    first = ~scored["group_id"].duplicated()
    shared = group_sums(
        pd.DataFrame(
            {"items": True, "correct": correct, "pairs": first, "pair_right": first & whole}
        ),
        scored["group_id"],
    )
    figures = scored[scored["figure_key"].notna()]
    counts = pd.DataFrame(
        {"items": 1.0, "wrong": (~figures["correct"].astype(bool)).astype(float)},
        index=figures.index,
    )
    per_figure = counts.groupby([figures["group_id"], figures["figure_key"]]).sum()
    per_figure = per_figure.unstack("figure_key", fill_value=0.0)
    per_figure.columns = [f"{FIGURE}{figure}/{name}" for name, figure in per_figure.columns]
    return pd.concat([shared, per_figure.reindex(shared.index, fill_value=0.0)], axis=1)


def stat_from_sums(sums: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """aAcc (correct / items), qAcc (pair_right / pairs) and fAcc (figures with questions
    and none wrong / figures with questions; NaN with no figure) from stat_columns' sums."""
    asked, right = np.zeros_like(sums["items"]), np.zeros_like(sums["items"])
    for name in sums:
        if name.startswith(FIGURE) and name.endswith("/items"):
            on_figure = sums[name] > 0
            asked = asked + on_figure
            right = right + (on_figure & (sums[name.replace("/items", "/wrong")] == 0))
    return {
        "hallusionbench/aAcc": fraction(sums["correct"], sums["items"]),
        MAIN_METRIC: fraction(sums["pair_right"], sums["pairs"]),
        "hallusionbench/fAcc": fraction(right, asked),
    }


STATISTICS = SummedStatistics(STAT_METRICS, stat_columns, stat_from_sums)


def splits_of(cfg) -> list[str]:
    split = cfg.split
    splits = [split] if isinstance(split, str) else list(split or [])
    if not splits:
        raise UsageError("benchmark.split must name the hub split(s), e.g. [image,non_image]")
    return splits


def load(cfg) -> Benchmark:
    template = check_template(cfg.template)
    directory = data_dir(cfg)
    if directory is None:
        items, images = hub_items(cfg.hub_id, splits_of(cfg), cfg.get("revision"))
        source = f"{cfg.hub_id} splits {', '.join(splits_of(cfg))}"
    else:
        items, images = local_items(directory, image_dir(cfg, directory)), open_image_file
        source = str(directory / "HallusionBench.json")
    check_groups(items, source, pair_problem)
    counts = {"n_no_image_items": 0}  # load_benchmark counts them after the limit
    return Benchmark(
        "hallusionbench", items, template, images, native_metrics, counts, drop_unit=set_of
    )


# The official evaluation (utils.py, evaluate_by_chatgpt) asks GPT-4 whether the answer
# agrees with gt_answer_details: not reproducible offline. The parser here is the
# deterministic first stage of VLMEvalKit's HallusionBench evaluation (YOrN_Extraction,
# vlmeval/dataset/utils/yorn.py; its GPT judge then reads only the "Unknown" answers).
VQA_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-"]
VQA_PUNCTUATION += [">", "<", "@", "`", ",", "?", "!"]
COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
# VLMEvalKit's period pattern as written: "(?!<=" is a lookahead, not a lookbehind, so a
# period is removed wherever no digit follows it.
PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")


def vqa_punctuation(text: str) -> str:
    """VLMEvalKit's process_punctuation (from the VQA evaluation): each mark is deleted
    where the text has it beside a space (or has a comma between digits), else replaced by
    a space; then periods not followed by a digit are deleted, at most 32 of them (it
    passes re.UNICODE, 32, where re.sub takes its count)."""
    out = text
    for mark in VQA_PUNCTUATION:
        beside_space = mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if beside_space or COMMA_IN_NUMBER.search(text) else " ")
    return PERIOD.sub("", out, count=re.UNICODE)


def parse_generated(text: str) -> str:
    """ "yes" if "yes" is among the words (lowercased, punctuation normalised, split on
    whitespace) and "no" is not, "no" the other way round, else "unknown" (VLMEvalKit's
    YOrN_Extraction)."""
    words = vqa_punctuation(text.lower()).split()
    if "yes" in words and "no" not in words:
        return "yes"
    if "no" in words and "yes" not in words:
        return "no"
    return "unknown"
