"""BEAF (Ye-Bin et al., ECCV 2024): the same questions on an original COCO image and on
edited copies (`<original stem>_NN.png`) from which one object was removed.

Local (the default; the authors do not publish it on the hub): data_dir holds
beaf_qna.json, a list of {id, image, question, orig_img, removed_q, gt}; image_dir (default
<data_dir>/images) the original and edited images by file name. The release has 26,118
questions on 500 original and 1,727 edited images. A group is one question on an original
image and on all its edits.

Hub, opt-in (benchmark.hub_id=MM-Hallu/BEAF): an unofficial mirror, split train, columns
image, question, gt "yes"/"no", orig_img, removed_q, image_name, and no `id` (items are
numbered by row). Its card lists 26,064 questions on 2,223 images (500 + 1,723): 54
questions and 4 edited images fewer than the release, so its figures are not the
paper's. Edits are paired with their original through image_name, which must be the
release's file name (`<original stem>_NN.png`); an edit whose original is not in the data
is an error naming it. Native metrics follow the official beaf_metric.py, with
denominators counted from the data; each edited-image question is paired with the same
question on its original:
- TU / IG / SB_p / SB_n: over questions about the removed object (removed_q, gt yes on the
  original and no on the edit): answered yes then no (true understanding), no then yes
  (ignorance), yes both times, no both times (stubbornness, + and -);
- ID (indecision): over questions with removed_q false, how often the correctness on the
  edit differs from that on the original;
- accuracy, precision, recall, F1 over all questions (yes = positive); F1(TU, ID) is the
  harmonic mean of TU and 1 - ID. All as fractions."""

import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from sysattn_exp.benchmarks.base import (
    Benchmark,
    DatasetImages,
    Item,
    SummedStatistics,
    check_groups,
    check_template,
    data_dir,
    fraction,
    group_sums,
    hub_split,
    image_dir,
    open_image_file,
    read_json,
    require_columns,
    required_file,
)
from sysattn_exp.errors import UsageError

MAIN_METRIC = "beaf/f1_tu_id"  # the native metric the report shows
# Given SE, CI and change statistics (evaluation.stats).
STAT_METRICS = ("beaf/TU", "beaf/IG", "beaf/ID", MAIN_METRIC)
FIELDS = ("id", "image", "question", "orig_img", "removed_q", "gt")
HUB_COLUMNS = ("image_name", "question", "orig_img", "removed_q", "gt")
LOCAL_HINT = "beaf_qna.json and the images (github.com/postech-ami/BEAF)"
EDITED = re.compile(r"^(?P<stem>.+)_\d+$")


def original_stem(name: str, is_original: bool) -> str:
    stem = Path(name).stem
    match = EDITED.match(stem)
    if is_original or match is None:
        return stem
    return match["stem"]


def make_item(record: dict, image_id: str, where: str, fields=FIELDS) -> Item:
    """`record` has the release's fields; `image` is the image's file name."""
    missing = [f for f in fields if record.get(f) is None]
    if missing:
        raise UsageError(
            f"{where}: missing field {missing[0]!r} (BEAF fields: {', '.join(fields)})"
        )
    if str(record["gt"]).lower() not in ("yes", "no"):
        raise UsageError(f"{where}: gt {record['gt']!r} must be yes or no")
    original = original_stem(record["image"], bool(record["orig_img"]))
    return Item(
        item_id=str(record["id"]),
        group_id=f"{original}/{record['question']}",
        image_id=image_id,
        question=record["question"],
        label=str(record["gt"]).lower() == "yes",
        meta={"orig_img": bool(record["orig_img"]), "removed_q": bool(record["removed_q"])},
    )


def local_items(directory: Path, images: Path) -> list[Item]:
    path = required_file(directory / "beaf_qna.json", "beaf_qna.json")
    records = read_json(path)
    if not isinstance(records, list):
        raise UsageError(f"{path}: must be a JSON list of question records")
    items = []
    for i, record in enumerate(records):
        where = f"{path} record {i}"
        if not isinstance(record, dict) or not isinstance(record.get("image", ""), str):
            raise UsageError(f"{where}: must be an object whose image is a file name")
        items.append(make_item(record, str(images / record.get("image", "")), where))
    return items


def hub_items(dataset, source: str) -> tuple[list[Item], DatasetImages]:
    require_columns(dataset, [*HUB_COLUMNS, "image"], source)
    items, index = [], {}
    for row, record in enumerate(dataset.select_columns(list(HUB_COLUMNS))):
        record = record | {"id": f"row{row}", "image": record["image_name"]}
        items.append(make_item(record, record["image"], f"{source} row {row}", HUB_COLUMNS))
        index.setdefault(record["image"], (row, "image"))
    originals = {original_stem(i.image_id, True) for i in items if i.meta["orig_img"]}
    for item in items:
        stem = item.group_id.split("/", 1)[0]
        if stem not in originals:
            raise UsageError(
                f"{source}: image_name {item.image_id!r} has no original image {stem!r} in the "
                "data (image_name must be the release's file name, <original stem>_NN.png)"
            )
    return items, DatasetImages(dataset, index)


def group_problem(members: list[Item]) -> str | None:
    """The metrics compare each edit's answer with the same question's on its original:
    a group needs exactly one question on the original image, and each image once."""
    originals = sum(item.meta["orig_img"] for item in members)
    if originals != 1:
        return (
            f"has {originals} questions on the original image; BEAF compares each edited "
            "image's answer with the same question's on its original, so want exactly one"
        )
    images = [item.image_id for item in members]
    twice = next((image for image in images if images.count(image) > 1), None)
    if twice is not None:
        return f"asks its question twice about image {twice}"
    return None


def ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def edit_pairs(scored: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The edited-image questions, each beside the same question on its original (same
    group; columns label_orig, pred_orig, correct_orig): those about the removed object
    (removed_q, yes on the original and no on the edit), the ones TU, IG and SB count;
    and those with removed_q false, the ones ID counts."""
    originals = scored[scored["orig_img"]].set_index("group_id")[["label", "pred", "correct"]]
    edits = scored[~scored["orig_img"]].merge(
        originals, left_on="group_id", right_index=True, suffixes=("", "_orig")
    )
    removed = edits[edits["removed_q"] & edits["label_orig"] & ~edits["label"]]
    return removed, edits[~edits["removed_q"]]


def native_metrics(scored: pd.DataFrame) -> dict[str, float | None]:
    removed, kept = edit_pairs(scored)
    before, after = removed["pred_orig"], removed["pred"]
    n = len(removed)
    out = {
        "beaf/TU": ratio(int((before & ~after).sum()), n),
        "beaf/IG": ratio(int((~before & after).sum()), n),
        "beaf/SB_p": ratio(int((before & after).sum()), n),
        "beaf/SB_n": ratio(int((~before & ~after).sum()), n),
        "beaf/ID": ratio(int((kept["correct"] != kept["correct_orig"]).sum()), len(kept)),
    }
    tp = int((scored["pred"] & scored["label"]).sum())
    precision = ratio(tp, int(scored["pred"].sum()))
    recall = ratio(tp, int(scored["label"].sum()))
    out |= {
        "beaf/accuracy": float(scored["correct"].mean()),
        "beaf/precision": precision,
        "beaf/recall": recall,
        "beaf/f1": harmonic(precision, recall),
        "beaf/f1_tu_id": harmonic(
            out["beaf/TU"], None if out["beaf/ID"] is None else 1 - out["beaf/ID"]
        ),
    }
    return out


def harmonic(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or a + b == 0:
        return None
    return 2 * a * b / (a + b)


def stat_columns(scored: pd.DataFrame) -> pd.DataFrame:
    """Per group (SummedStatistics.columns; a group holds a question's original and its
    edits, so every pair native_metrics counts lies in one group): removed-object pairs
    (`removed`), those answered yes then no (`tu`), no then yes (`ig`); removed_q-false
    pairs (`kept`) and those whose correctness changed (`id`)."""
    removed, kept = edit_pairs(scored)
    before, after = removed["pred_orig"].astype(bool), removed["pred"].astype(bool)
    changed = kept["correct"] != kept["correct_orig"]
    pairs = pd.concat(  # one row per pair: removed and kept pairs are disjoint
        [
            pd.DataFrame({"removed": True, "tu": before & ~after, "ig": ~before & after}),
            pd.DataFrame({"kept": True, "id": changed}),
        ]
    )
    per_group = group_sums(pairs.fillna(False), pd.concat([removed["group_id"], kept["group_id"]]))
    groups = sorted(set(scored["group_id"]))
    return per_group.reindex(groups, columns=["removed", "tu", "ig", "kept", "id"], fill_value=0.0)


def stat_from_sums(sums: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """TU, IG (over removed-object pairs), ID (over removed_q-false pairs) and F1(TU, ID),
    the harmonic mean of TU and 1 - ID; NaN where native_metrics gives None."""
    tu = fraction(sums["tu"], sums["removed"])
    indecision = fraction(sums["id"], sums["kept"])
    a, b = tu, 1 - indecision
    return {
        "beaf/TU": tu,
        "beaf/IG": fraction(sums["ig"], sums["removed"]),
        "beaf/ID": indecision,
        MAIN_METRIC: fraction(2 * a * b, np.where(a + b == 0, 0.0, a + b)),
    }


STATISTICS = SummedStatistics(STAT_METRICS, stat_columns, stat_from_sums)


def load(cfg) -> Benchmark:
    template = check_template(cfg.template)
    directory = data_dir(cfg)
    if directory is None:
        if not cfg.get("hub_id"):
            raise UsageError(
                "benchmark=beaf needs benchmark.data_dir=DIR holding beaf_qna.json (the "
                "release, github.com/postech-ami/BEAF, is not on the Hugging Face hub; "
                "benchmark.hub_id=MM-Hallu/BEAF reads an unofficial, incomplete mirror)"
            )
        dataset, source = hub_split(cfg, LOCAL_HINT)
        items, images = hub_items(dataset, source)
    else:
        items = local_items(directory, image_dir(cfg, directory / "images"))
        images, source = open_image_file, str(directory / "beaf_qna.json")
    check_groups(items, source, group_problem)
    return Benchmark("beaf", items, template, images, native_metrics)


def parse_generated(text: str) -> str:
    """A generated answer as BEAF's beaf_metric.py (answer_check) reads it: "yes" anywhere
    in the lowercased text -> "yes", else "no" anywhere -> "no" (substrings: "not",
    "nothing", "know" read as no). With neither, the official loop keeps the previous
    answer's value (a leftover variable); here it is "unknown", counted wrong."""
    lower = text.lower()
    if "yes" in lower:
        return "yes"
    if "no" in lower:
        return "no"
    return "unknown"
