"""BEAF (Ye-Bin et al., ECCV 2024): the same questions on an original COCO image and on
edited copies (`<original stem>_NN.png`) from which one object was removed.

Local only (the release is not on the hub): data_dir holds beaf_qna.json, a list of
{id, image, question, orig_img, removed_q, gt}; image_dir (default <data_dir>/images)
the original and edited images by file name. A group is one question on an original
image and on all its edits. Native metrics follow the official beaf_metric.py, with
denominators counted from the data; each edited-image question is paired with the same
question on its original:
- TU / IG / SB_p / SB_n: over questions about the removed object (removed_q, gt yes on the
  original and no on the edit): answered yes then no (true understanding), no then yes
  (ignorance), yes both times, no both times (stubbornness, + and -);
- ID (indecision): over questions with removed_q false, how often the correctness on the
  edit differs from that on the original;
- accuracy, precision, recall, F1 over all questions (yes = positive); F1(TU, ID) is the
  harmonic mean of TU and 1 - ID. All as fractions."""

import json
import re
from pathlib import Path

import pandas as pd

from sysattn_exp.benchmarks.base import (
    Benchmark,
    Item,
    check_template,
    data_dir,
    drop_unreadable,
    image_dir,
    open_image_file,
    required_file,
)
from sysattn_exp.errors import UsageError

MAIN_METRIC = "beaf/f1_tu_id"  # the native metric the report shows
FIELDS = ("id", "image", "question", "orig_img", "removed_q", "gt")
EDITED = re.compile(r"^(?P<stem>.+)_\d+$")


def original_stem(name: str, is_original: bool) -> str:
    stem = Path(name).stem
    match = EDITED.match(stem)
    if is_original or match is None:
        return stem
    return match["stem"]


def make_item(record: dict, images: Path, where: str) -> Item:
    missing = [f for f in FIELDS if record.get(f) is None]
    if missing:
        raise UsageError(
            f"{where}: missing field {missing[0]!r} (BEAF fields: {', '.join(FIELDS)})"
        )
    if str(record["gt"]).lower() not in ("yes", "no"):
        raise UsageError(f"{where}: gt {record['gt']!r} must be yes or no")
    original = original_stem(record["image"], bool(record["orig_img"]))
    return Item(
        item_id=str(record["id"]),
        group_id=f"{original}/{record['question']}",
        image_id=str(images / record["image"]),
        question=record["question"],
        label=str(record["gt"]).lower() == "yes",
        meta={"orig_img": bool(record["orig_img"]), "removed_q": bool(record["removed_q"])},
    )


def local_items(directory: Path, images: Path) -> list[Item]:
    path = required_file(directory / "beaf_qna.json", "beaf_qna.json")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}: not valid JSON ({err.msg})") from None
    if not isinstance(records, list):
        raise UsageError(f"{path}: must be a JSON list of question records")
    return [make_item(r, images, f"{path} record {i}") for i, r in enumerate(records)]


def ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def native_metrics(scored: pd.DataFrame) -> dict[str, float | None]:
    # Each edited-image question next to the same question on its original (same group).
    originals = scored[scored["orig_img"]].set_index("group_id")[["label", "pred", "correct"]]
    edits = scored[~scored["orig_img"]].merge(
        originals, left_on="group_id", right_index=True, suffixes=("", "_orig")
    )
    removed = edits[edits["removed_q"] & edits["label_orig"] & ~edits["label"]]
    kept = edits[~edits["removed_q"]]
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


def load(cfg) -> Benchmark:
    directory = data_dir(cfg)
    if directory is None:
        raise UsageError(
            "benchmark=beaf needs benchmark.data_dir=DIR holding beaf_qna.json (the release, "
            "github.com/postech-ami/BEAF, is not on the Hugging Face hub)"
        )
    items = local_items(directory, image_dir(cfg, directory / "images"))
    items, skipped = drop_unreadable(items, cfg.skip_missing_images)
    counts = {"n_skipped_items": skipped}
    return Benchmark(
        "beaf", items, check_template(cfg.template), open_image_file, native_metrics, counts
    )
