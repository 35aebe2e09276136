"""Small local copies of the benchmarks in their published layouts (field names, types,
files), with generated images under the file names the annotations reference."""

import json
import os
from pathlib import Path

import pytest
from conftest import make_image

SHARED_ENV = "SYSATTN_SHARED_BENCHMARKS"


def find_shared() -> Path:
    """The real annotation files: $SYSATTN_SHARED_BENCHMARKS if set, else shared/benchmarks
    beside the checkout (or above it). The folder may be absent: see needs_shared."""
    if SHARED_ENV in os.environ:
        return Path(os.environ[SHARED_ENV])
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "shared" / "benchmarks").is_dir():
            return parent / "shared" / "benchmarks"
    return here.parents[2] / "shared" / "benchmarks"


SHARED = find_shared()
# A clone without the shared folder still runs every other test; CI has it, so there
# nothing is skipped.
needs_shared = pytest.mark.skipif(
    not SHARED.is_dir(),
    reason=f"needs the real annotation files in {SHARED} (or ${SHARED_ENV}): not found",
)
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange"]


def save_image(path: Path, n: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    make_image(COLOURS[n % len(COLOURS)]).save(path)


def write_mme(root: Path) -> dict:
    """Evaluation-tool txt files; images flat for some categories, under images/ for others."""
    layout = {
        "existence": ("flat", [("000000006040.jpg", "Is there a train in this image?")]),
        "artwork": (
            "nested",
            [
                ("10002.jpg", "Is this artwork created by maitre?"),
                ("10049.jpg", "Is this artwork titled the holy family?"),
            ],
        ),
        "code_reasoning": ("flat", [("0020.png", "Should the output of the code be 0?")]),
    }
    (root / "txt").mkdir(parents=True)
    for category, (kind, images) in layout.items():
        lines = []
        for n, (image, question) in enumerate(images):
            lines += [
                f"{image}\t{question} Please answer yes or no.\tYes",
                f"{image}\t{question.replace('?', ' really?')} Please answer yes or no.\tNo",
            ]
            folder = root / "img" / category / ("images" if kind == "nested" else "")
            save_image(folder / image, n)
        (root / "txt" / f"{category}.txt").write_text("\n".join(lines) + "\n")


def write_hallusionbench(root: Path, records: list[dict]) -> None:
    (root / "data").mkdir(parents=True)
    (root / "data" / "HallusionBench.json").write_text(json.dumps(records))
    for n, record in enumerate(records):
        if record["filename"]:
            save_image(root / "images" / record["filename"], n)


def naturalbench_columns(type_column: str = "Question_Type") -> list[str]:
    """BaiqiL/NaturalBench's columns; older revisions spell the type column "Question Type"."""
    return [
        "Index",
        "Image_0",
        "Image_1",
        "Question_0",
        "Image_0_Question_0",
        "Image_1_Question_0",
        "Question_1",
        "Image_0_Question_1",
        "Image_1_Question_1",
        type_column,
        "Source",
    ]


def write_naturalbench(root: Path, n_samples: int = 3) -> None:
    """Parquet as `datasets` writes BaiqiL/NaturalBench: images as {bytes, path} structs."""
    import datasets

    rows = {key: [] for key in naturalbench_columns()}
    for i in range(n_samples + 1):
        rows["Index"].append(i)
        rows["Image_0"].append(make_image(COLOURS[i % 6]))
        rows["Image_1"].append(make_image(COLOURS[(i + 1) % 6]))
        rows["Question_0"].append(f"Is the thing number {i} red?")
        rows["Question_1"].append(f"Is the thing number {i} blue?")
        rows["Image_0_Question_0"].append("Yes")
        rows["Image_1_Question_0"].append("No")
        rows["Image_0_Question_1"].append("No")
        rows["Image_1_Question_1"].append("Yes")
        # The last sample is multiple choice, which the loader must leave out.
        rows["Question_Type"].append("yes_no" if i < n_samples else "multiple_choice")
        rows["Source"].append("test")
    features = datasets.Features(
        {
            k: datasets.Image()
            if k.startswith("Image_") and "Question" not in k
            else datasets.Value("int64" if k == "Index" else "string")
            for k in rows
        }
    )
    root.mkdir(parents=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(
        str(root / "train-00000.parquet")
    )


def write_winoground(root: Path, n_examples: int = 3) -> None:
    lines = []
    for i in range(n_examples):
        record = {
            "id": i,
            "caption_0": f"a red thing {i} left of a blue thing",
            "caption_1": f"a blue thing {i} left of a red thing",
            "tag": "Object",
            "secondary_tag": "",
            "num_main_preds": 1,
            "collapsed_tag": "Object",
            "image_0": f"ex_{i}_img_0",
            "image_1": f"ex_{i}_img_1",
        }
        lines.append(json.dumps(record))
        for k in (0, 1):
            save_image(root / "images" / f"ex_{i}_img_{k}.png", i + k)
    (root / "examples.jsonl").write_text("\n".join(lines) + "\n")


def write_sugarcrepe_images(subsets_dir: Path, image_dir: Path) -> int:
    """Stand-in images for every file name the annotation files reference."""
    names = {
        r["filename"]
        for f in subsets_dir.glob("*.json")
        for r in json.loads(f.read_text()).values()
    }
    for n, name in enumerate(sorted(names)):
        save_image(image_dir / name, n)
    return len(names)


BEAF_ORIGINAL = "COCO_val2014_000000001171"


def beaf_records() -> list[dict]:
    """One original image with three objects, and two edits, each removing one object."""
    questions = {o: f"Is there a {o} in the image?" for o in ("train", "truck", "person")}
    records = []
    for image, present, orig in (
        (f"{BEAF_ORIGINAL}.jpg", {"train", "truck", "person"}, True),
        (f"{BEAF_ORIGINAL}_00.png", {"truck", "person"}, False),
        (f"{BEAF_ORIGINAL}_03.png", {"train", "person"}, False),
    ):
        for obj, question in questions.items():
            records.append(
                {
                    "id": len(records),
                    "image": image,
                    "question": question,
                    "orig_img": orig,
                    "removed_q": obj in ("train", "truck"),
                    "gt": "yes" if obj in present else "no",
                }
            )
    return records


def write_beaf(root: Path) -> None:
    records = beaf_records()
    root.mkdir(parents=True)
    (root / "beaf_qna.json").write_text(json.dumps(records))
    for n, image in enumerate(dict.fromkeys(r["image"] for r in records)):
        save_image(root / "images" / image, n)


POPE_SPLITS = ["random", "popular", "adversarial"]
POPE_IMAGES = ["COCO_val2014_000000310196.jpg", "COCO_val2014_000000016631.jpg"]


def pope_records(split: str) -> list[dict]:
    """Two images, a yes and a no question each; the release numbers questions from 1 in
    every split, and asks the same question in several splits."""
    absent = {"random": "zebra", "popular": "chair", "adversarial": "skis"}[split]
    records = []
    for image, present in zip(POPE_IMAGES, ("snowboard", "person"), strict=True):
        for obj, label in ((present, "yes"), (absent, "no")):
            records.append(
                {
                    "question_id": len(records) + 1,
                    "image": image,
                    "image_id": int(image[-10:-4]),
                    "text": f"Is there a {obj} in the image?",
                    "label": label,
                }
            )
    return records


def write_pope(root: Path) -> None:
    """root/coco: coco_pope_<split>.json as JSON lines; root/val2014: the images."""
    (root / "coco").mkdir(parents=True)
    for split in POPE_SPLITS:
        lines = "".join(json.dumps(r) + "\n" for r in pope_records(split))
        (root / "coco" / f"coco_pope_{split}.json").write_text(lines)
    for n, image in enumerate(POPE_IMAGES):
        save_image(root / "val2014" / image, n)
