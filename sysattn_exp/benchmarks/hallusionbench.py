"""HallusionBench (Guan et al., CVPR 2024): yes/no questions on original and edited figures.

Hub: lmms-lab/HallusionBench (split image). Local: data_dir holds HallusionBench.json;
each record's `filename` (e.g. ./VS/chart/0_1.png) is resolved against image_dir (default:
data_dir). gt_answer "1" = yes, "0" = no. Questions without an image (visual_input "0")
are excluded: the intervention needs an image span. As in the official evaluation:
aAcc per question, qAcc per question pair (category_subcategory_set_id_question_id, the
group here), fAcc per figure (category_subcategory_set_id_figure_id)."""

import json
import logging
from pathlib import Path

import pandas as pd

from sysattn_exp.benchmarks.base import (
    Benchmark,
    DatasetImages,
    Item,
    all_correct_rate,
    check_template,
    data_dir,
    drop_unreadable,
    hub_dataset,
    image_dir,
    open_image_file,
    required_file,
)
from sysattn_exp.errors import UsageError

log = logging.getLogger(__name__)

MAIN_METRIC = "hallusionbench/qAcc"  # the native metric the report shows
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


def make_item(record: dict, image_id: str, where: str) -> Item:
    missing = [f for f in FIELDS if record.get(f) is None]
    if missing:
        raise UsageError(f"{where}: missing field {missing[0]!r}")
    if str(record["gt_answer"]) not in ("0", "1"):
        raise UsageError(f'{where}: gt_answer {record["gt_answer"]!r} must be "1" or "0"')
    cat, sub, set_id = record["category"], record["subcategory"], record["set_id"]
    figure, question = record["figure_id"], record["question_id"]
    return Item(
        item_id=f"{cat}_{sub}_{set_id}_{figure}_{question}",
        group_id=f"{cat}_{sub}_{set_id}_{question}",
        image_id=image_id,
        question=record["question"],
        label=str(record["gt_answer"]) == "1",
        meta={"figure_key": f"{cat}_{sub}_{set_id}_{figure}"},
    )


def with_image(records, source: str) -> list[tuple[int, dict]]:
    """(position, record) of the questions that come with an image; logs the others."""
    kept = [(i, r) for i, r in enumerate(records) if str(r.get("visual_input")) != "0"]
    if len(kept) < len(records):
        log.info(
            "%s: excluded %d text-only questions (visual_input 0)", source, len(records) - len(kept)
        )
    return kept


def local_items(directory: Path, images: Path) -> tuple[list[Item], int]:
    path = required_file(directory / "HallusionBench.json", "HallusionBench.json")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}: not valid JSON ({err.msg})") from None
    kept = with_image(records, str(path))
    items = []
    for i, record in kept:
        if not record.get("filename"):
            raise UsageError(
                f"{path} record {i}: visual_input {record.get('visual_input')!r} but no filename"
            )
        items.append(make_item(record, str(images / record["filename"]), f"{path} record {i}"))
    return items, len(records) - len(kept)


def hub_items(dataset) -> tuple[list[Item], DatasetImages, int]:
    records = list(dataset.remove_columns("image"))
    kept = with_image(records, "lmms-lab/HallusionBench")
    items, index = [], {}
    for row, record in kept:
        item = make_item(record, record.get("filename") or f"row{row}", f"row {row}")
        index[item.image_id] = (row, "image")
        items.append(item)
    return items, DatasetImages(dataset, index), len(records) - len(kept)


def native_metrics(scored: pd.DataFrame) -> dict[str, float]:
    return {
        "hallusionbench/aAcc": float(scored["correct"].mean()),
        "hallusionbench/qAcc": all_correct_rate(scored, ["group_id"]),
        "hallusionbench/fAcc": all_correct_rate(scored, ["figure_key"]),
    }


def load(cfg) -> Benchmark:
    template = check_template(cfg.template)
    directory = data_dir(cfg)
    if directory is None:
        dataset = hub_dataset(cfg.hub_id, cfg.split, LOCAL_HINT)
        items, images, text_only = hub_items(dataset)
        counts = {"n_text_only_excluded": text_only}
        return Benchmark("hallusionbench", items, template, images, native_metrics, counts)
    items, text_only = local_items(directory, image_dir(cfg, directory))
    items, skipped = drop_unreadable(items, cfg.skip_missing_images)
    counts = {"n_text_only_excluded": text_only, "n_skipped_items": skipped}
    return Benchmark("hallusionbench", items, template, open_image_file, native_metrics, counts)
