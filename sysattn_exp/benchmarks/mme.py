"""MME (Fu et al. 2023): 14 categories, two yes/no questions per image (one Yes, one No).

Hub: lmms-lab-encoder/MME (formerly lmms-lab/MME; split test, 2,374 rows: question_id
= the image's path, e.g. "code_reasoning/0020.png", image, question, answer "Yes"/"No",
category). Local: the release's evaluation-tool files, one
`<category>.txt` per category in data_dir with lines `image<TAB>question<TAB>Yes|No`, and
the images under image_dir as `<category>/<image>` or `<category>/images/<image>`.
Native metrics follow the MME tool: per category acc and acc_plus (both questions of an
image right) in percent, score = acc + acc_plus (max 200), and perception / cognition
totals (sums of their categories' scores)."""

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
    mme_answer,
    open_image_file,
    require_columns,
)
from sysattn_exp.errors import UsageError
from sysattn_exp.files import read_text

MAIN_METRIC = "mme/perception_score"  # the native metric the report shows
STAT_METRICS = ("mme/perception_score", "mme/cognition_score")  # given SE, CI, change stats
PERCEPTION = [
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
]
COGNITION = ["commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"]
LOCAL_HINT = "one <category>.txt per category (image<TAB>question<TAB>Yes/No)"


def parse_answer(answer: str, where: str) -> bool:
    if answer.strip().lower() not in ("yes", "no"):
        raise UsageError(f"{where}: answer {answer!r} must be Yes or No")
    return answer.strip().lower() == "yes"


def make_item(category: str, image: str, question: str, label: bool, image_id: str, k: int):
    return Item(
        item_id=f"{category}/{image}/{k}",
        group_id=f"{category}/{image}",
        image_id=image_id,
        question=question,
        label=label,
        meta={"category": category},
    )


def image_path(root: Path, category: str, image: str) -> Path:
    """The release keeps some categories' images in an images/ subfolder."""
    flat, nested = root / category / image, root / category / "images" / image
    return nested if nested.exists() and not flat.exists() else flat


def local_items(directory: Path, images: Path) -> list[Item]:
    files = sorted(directory.glob("*.txt"))
    if not files:
        raise UsageError(
            f"benchmark.data_dir={directory} holds no <category>.txt files ({LOCAL_HINT})"
        )
    items, seen = [], {}
    for file in files:
        category = file.stem
        for number, line in enumerate(read_text(file).splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 3:
                raise UsageError(f"{file} line {number}: want image<TAB>question<TAB>Yes/No")
            image, question, answer = fields[0].strip(), fields[1].strip(), fields[2]
            label = parse_answer(answer, f"{file} line {number}")
            k = seen[(category, image)] = seen.get((category, image), -1) + 1
            path = str(image_path(images, category, image))
            items.append(make_item(category, image, question, label, path, k))
    return items


def hub_items(dataset, source: str) -> tuple[list[Item], DatasetImages]:
    """The two questions of an image share its question_id (as lmms-eval groups them)."""
    columns = ["question_id", "question", "answer", "category"]
    require_columns(dataset, [*columns, "image"], source)
    items, index, seen = [], {}, {}
    for row, record in enumerate(dataset.select_columns(columns)):
        # question_id is the image's path under its category ("code_reasoning/0020.png").
        category = record["category"]
        image = record["question_id"].removeprefix(f"{category}/")
        label = parse_answer(record["answer"], f"{source} row {row}")
        k = seen[(category, image)] = seen.get((category, image), -1) + 1
        image_id = f"{category}/{image}"
        index.setdefault(image_id, (row, "image"))
        items.append(make_item(category, image, record["question"], label, image_id, k))
    return items, DatasetImages(dataset, index)


def pair_problem(members: list[Item]) -> str | None:
    """acc_plus counts an image right when both its questions are: MME asks exactly two
    about each image, one answered Yes and one No."""
    yes = sum(item.label for item in members)
    if len(members) != 2 or yes != 1:
        return (
            f"has {len(members)} question{'s' * (len(members) != 1)} ({yes} Yes, "
            f"{len(members) - yes} No); MME asks two "
            "about each image, one Yes and one No"
        )
    return None


def native_metrics(scored: pd.DataFrame) -> dict[str, float]:
    out, totals = {}, {"perception": 0.0, "cognition": 0.0}
    for category, rows in scored.groupby("category", sort=True):
        acc = 100 * rows["correct"].mean()
        acc_plus = 100 * rows.groupby("group_id")["correct"].all().mean()
        out |= {
            f"mme/{category}/acc": acc,
            f"mme/{category}/acc_plus": acc_plus,
            f"mme/{category}/score": acc + acc_plus,
        }
        for total, members in (("perception", PERCEPTION), ("cognition", COGNITION)):
            if category in members:
                totals[total] += acc + acc_plus
    present = set(scored["category"])
    for total, members in (("perception", PERCEPTION), ("cognition", COGNITION)):
        if present & set(members):
            out[f"mme/{total}_score"] = totals[total]
    return out


def stat_columns(scored: pd.DataFrame) -> pd.DataFrame:
    """Per image (SummedStatistics.columns), for each category of the data: its questions
    (`<category>/items`), right answers (`correct`), 1 for the image (`images`) and
    whether both its questions are right (`images_right`); 0 in other categories'."""
    correct = scored["correct"].astype(bool)
    whole = correct.groupby(scored["group_id"]).transform("all")
    first = ~scored["group_id"].duplicated()  # one row per image counts the image
    values = {}
    for category in sorted(set(scored["category"])):
        member = scored["category"] == category
        values |= {
            f"{category}/items": member,
            f"{category}/correct": member & correct,
            f"{category}/images": member & first,
            f"{category}/images_right": member & first & whole,
        }
    return group_sums(pd.DataFrame(values), scored["group_id"])


def stat_from_sums(sums: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The perception and cognition scores from stat_columns' sums: per category with
    questions, 100 * correct / items + 100 * images_right / images, summed over the
    total's categories; NaN where none of them has questions (native_metrics leaves the
    total out)."""
    categories = [name.removesuffix("/items") for name in sums if name.endswith("/items")]
    out = {}
    for total, members in (("perception", PERCEPTION), ("cognition", COGNITION)):
        score, present = 0.0, False
        for category in sorted(set(categories) & set(members)):
            items, images = sums[f"{category}/items"], sums[f"{category}/images"]
            acc = 100 * fraction(sums[f"{category}/correct"], items)
            acc_plus = 100 * fraction(sums[f"{category}/images_right"], images)
            score = score + np.where(items > 0, acc + acc_plus, 0.0)
            present = present | (items > 0)
        out[f"mme/{total}_score"] = np.where(present, score, np.nan)
    return out


STATISTICS = SummedStatistics(STAT_METRICS, stat_columns, stat_from_sums)


def load(cfg) -> Benchmark:
    template = check_template(cfg.template)
    directory = data_dir(cfg)
    if directory is None:
        dataset, source = hub_split(cfg, LOCAL_HINT)
        items, images = hub_items(dataset, source)
    else:
        items = local_items(directory, image_dir(cfg, directory))
        images, source = open_image_file, f"benchmark.data_dir={directory}"
    check_groups(items, source, pair_problem)
    return Benchmark("mme", items, template, images, native_metrics)


# Generated answers (scoring.mode=generate) are parsed by MME's own eval tool's rule.
parse_generated = mme_answer
