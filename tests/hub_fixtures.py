"""`datasets.Dataset` objects with exactly the features of the hub datasets the benchmark
loaders read (column names, dtypes, `Image()` columns, split names, value spellings), at
their published sizes, with generated stand-in images. Where each schema comes from:

- lmms-lab-encoder/MME (mirror of lmms-lab/MME): the dataset card's dataset_info
  (question_id, image, question, answer, category; split test, 2,374 rows) and lmms-eval
  tasks/mme (answer "Yes"/"No"; two questions per question_id, 14 categories).
- lmms-lab-encoder/HallusionBench (mirror of lmms-lab/HallusionBench): the card (splits
  image, 951 rows, and non_image, 178 rows), lmms-eval tasks/hallusion_bench (the
  release's fields, all strings, plus image) and the release's HallusionBench.json.
- BaiqiL/NaturalBench: the card (Index, Image_0, Image_1, Question_0, Image_0_Question_0,
  Image_1_Question_0, Question_1, Image_0_Question_1, Image_1_Question_1, Question_Type,
  Source; split train, 1,900 rows; older revisions "Question Type") and the authors'
  example.py (types yes_no / multiple_choice, answers "Yes"/"No" or "A"/"B").
- facebook/winoground: its card and loading script (id int32, image_0, image_1,
  caption_0, caption_1, tag, secondary_tag, num_main_preds int32, collapsed_tag; split
  test, 400 rows).
- HuggingFaceM4/SugarCrepe_<subset>: the script that pushed them (image, tested_labels =
  [caption, negative_caption] as a sequence of strings, true_label = ClassLabel whose
  names are every caption of the seven subsets; split test), built here from the
  release's json files.
- MM-Hallu/BEAF: its card (image, question, gt "yes"/"no", orig_img bool, removed_q bool,
  image_name; split train; no id).
- lmms-lab/POPE: the card's dataset_info (id,
  question_id, question, answer, image_source, image, category, all strings but image;
  config default, split test, 9,000 rows) and a printed first row ({'id': '0',
  'question_id': '1', 'question': 'Is there a snowboard in the image?', 'answer': 'yes',
  'image_source': 'COCO_val2014_000000310196', 'category': 'adversarial'}); the release's
  sizes per split (500 images, 6 questions each: 3 yes, 3 no).
"""

import io
import json
from functools import cache

import datasets
from benchmark_fixtures import BEAF_ORIGINAL, COLOURS, SHARED, beaf_records, naturalbench_columns
from conftest import make_image

# Published MME sizes: images per category (two questions each): 1,187 images, 2,374 rows.
MME_IMAGES = {
    "existence": 30,
    "count": 30,
    "position": 30,
    "color": 30,
    "posters": 147,
    "celebrity": 170,
    "scene": 200,
    "landmark": 200,
    "artwork": 200,
    "OCR": 20,
    "commonsense_reasoning": 70,
    "numerical_calculation": 20,
    "text_translation": 20,
    "code_reasoning": 20,
}
SUGARCREPE_SUBSETS = ["swap_obj", "swap_att", "replace_rel", "replace_obj", "replace_att"]
SUGARCREPE_SUBSETS += ["add_obj", "add_att"]


@cache
def png(n: int) -> bytes:
    buffer = io.BytesIO()
    make_image(COLOURS[n % len(COLOURS)]).save(buffer, format="PNG")
    return buffer.getvalue()


def image(n: int) -> dict:
    """An Image() cell as the hub's parquet stores it."""
    return {"bytes": png(n % len(COLOURS)), "path": None}


def mme() -> dict[str, datasets.Dataset]:
    rows = {k: [] for k in ("question_id", "image", "question", "answer", "category")}
    n = 0
    for category, n_images in MME_IMAGES.items():
        for k in range(n_images):
            for answer in ("Yes", "No"):
                rows["question_id"].append(f"{category}/{k:04d}.png")
                rows["image"].append(image(n))
                rows["question"].append(f"Is this picture {k} {answer}? Please answer yes or no.")
                rows["answer"].append(answer)
                rows["category"].append(category)
            n += 1
    features = datasets.Features(
        {k: datasets.Image() if k == "image" else datasets.Value("string") for k in rows}
    )
    return {"test": datasets.Dataset.from_dict(rows, features=features)}


HB_FIELDS = [
    "category",
    "subcategory",
    "visual_input",
    "set_id",
    "figure_id",
    "sample_note",
    "question_id",
    "question",
    "gt_answer_details",
    "gt_answer",
    "filename",
]


def hallusionbench() -> dict[str, datasets.Dataset]:
    """The release's 1,129 records in the hub's two splits; non_image rows have no image."""
    records = json.loads((SHARED / "hallusionbench" / "HallusionBench.json").read_text())
    features = datasets.Features(
        {**{f: datasets.Value("string") for f in HB_FIELDS}, "image": datasets.Image()}
    )
    splits = {}
    for split, keep in (("image", lambda r: r["visual_input"] != "0"), ("non_image", None)):
        chosen = [r for r in records if (keep(r) if keep else r["visual_input"] == "0")]
        rows = {f: [r[f] for r in chosen] for f in HB_FIELDS}
        rows["image"] = [image(n) if keep else None for n in range(len(chosen))]
        splits[split] = datasets.Dataset.from_dict(rows, features=features)
    return splits


def naturalbench(n_samples=1900, n_multiple_choice=300, type_column="Question_Type"):
    """The first n_multiple_choice samples are multiple choice ("A"/"B" answers)."""
    rows = {k: [] for k in naturalbench_columns(type_column)}
    for i in range(n_samples):
        mc = i < n_multiple_choice
        yes, no = ("A", "B") if mc else ("Yes", "No")
        rows["Index"].append(i)
        rows["Image_0"].append(image(i))
        rows["Image_1"].append(image(i + 1))
        rows["Question_0"].append(f"Is the thing number {i} red?")
        rows["Question_1"].append(f"Is the thing number {i} blue?")
        rows["Image_0_Question_0"].append(yes)
        rows["Image_1_Question_0"].append(no)
        rows["Image_0_Question_1"].append(no)
        rows["Image_1_Question_1"].append(yes)
        rows[type_column].append("multiple_choice" if mc else "yes_no")
        rows["Source"].append("flickr30k")
    features = datasets.Features(
        {
            k: datasets.Image()
            if k in ("Image_0", "Image_1")
            else datasets.Value("int64" if k == "Index" else "string")
            for k in rows
        }
    )
    return {"train": datasets.Dataset.from_dict(rows, features=features)}


def winoground(n_examples=400) -> dict[str, datasets.Dataset]:
    rows = {
        "id": list(range(n_examples)),
        "image_0": [image(i) for i in range(n_examples)],
        "image_1": [image(i + 1) for i in range(n_examples)],
        "caption_0": [f"a red thing {i} left of a blue thing" for i in range(n_examples)],
        "caption_1": [f"a blue thing {i} left of a red thing" for i in range(n_examples)],
        "tag": ["Object"] * n_examples,
        "secondary_tag": [""] * n_examples,
        "num_main_preds": [1] * n_examples,
        "collapsed_tag": ["Object"] * n_examples,
    }
    features = datasets.Features(
        {
            k: datasets.Image()
            if k.startswith("image_")
            else datasets.Value("int32" if k in ("id", "num_main_preds") else "string")
            for k in rows
        }
    )
    return {"test": datasets.Dataset.from_dict(rows, features=features)}


def sugarcrepe() -> dict[str, dict[str, datasets.Dataset]]:
    """{repo id: {split: dataset}} for the seven subsets, from the release's json files."""
    subsets = {
        s: json.loads((SHARED / "sugarcrepe" / f"{s}.json").read_text()) for s in SUGARCREPE_SUBSETS
    }
    names = sorted(
        {
            t
            for r in subsets.values()
            for e in r.values()
            for t in (e["caption"], e["negative_caption"])
        }
    )
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "tested_labels": datasets.Sequence(datasets.Value("string")),
            "true_label": datasets.ClassLabel(names=names),
        }
    )
    label = {name: i for i, name in enumerate(names)}  # ints: ClassLabel's str lookup is slow
    out = {}
    for subset, records in subsets.items():
        examples = list(records.values())
        rows = {
            "image": [image(n) for n in range(len(examples))],
            "tested_labels": [[e["caption"], e["negative_caption"]] for e in examples],
            "true_label": [label[e["caption"]] for e in examples],
        }
        out[f"HuggingFaceM4/SugarCrepe_{subset}"] = {"test": with_fingerprint(rows, features)}
    return out


def with_fingerprint(rows: dict, features: datasets.Features) -> datasets.Dataset:
    """Dataset.from_dict without hashing the features for a fingerprint: SugarCrepe's
    ClassLabel holds ~15,000 names, which takes a second per subset to hash."""
    from datasets.table import InMemoryTable

    table = InMemoryTable.from_pydict(features.encode_batch(rows), schema=features.arrow_schema)
    info = datasets.DatasetInfo(features=features)
    return datasets.Dataset(table, info=info, fingerprint=f"fixture-{id(table)}")


def beaf() -> dict[str, datasets.Dataset]:
    """The release fixture's records (one original, two edits) in the mirror's schema."""
    records = beaf_records()
    rows = {
        "image": [image(n) for n in range(len(records))],
        "question": [r["question"] for r in records],
        "gt": [r["gt"] for r in records],
        "orig_img": [r["orig_img"] for r in records],
        "removed_q": [r["removed_q"] for r in records],
        "image_name": [r["image"] for r in records],
    }
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "gt": datasets.Value("string"),
            "orig_img": datasets.Value("bool"),
            "removed_q": datasets.Value("bool"),
            "image_name": datasets.Value("string"),
        }
    )
    return {"train": datasets.Dataset.from_dict(rows, features=features)}


POPE_IMAGES = 500  # per split; 6 questions each (3 yes, 3 no): 3,000 per split


def pope() -> dict[str, datasets.Dataset]:
    """The three splits one after another (adversarial first, as on the hub), question ids
    from 1 within each split, the same 500 images in every split."""
    rows = {k: [] for k in ("id", "question_id", "question", "answer", "image_source")}
    rows |= {"image": [], "category": []}
    for split in ("adversarial", "popular", "random"):
        for k in range(6 * POPE_IMAGES):
            n = k // 6
            rows["id"].append(str(len(rows["id"])))
            rows["question_id"].append(str(k + 1))
            rows["question"].append(f"Is there a thing {k % 6} in the image?")
            rows["answer"].append("yes" if k % 6 < 3 else "no")
            rows["image_source"].append(f"COCO_val2014_{n:012d}")
            rows["image"].append(image(n))
            rows["category"].append(split)
    features = datasets.Features(
        {k: datasets.Image() if k == "image" else datasets.Value("string") for k in rows}
    )
    return {"test": datasets.Dataset.from_dict(rows, features=features)}


def hub() -> dict[str, dict[str, datasets.Dataset]]:
    """{repo id: {split: dataset}}: what the hub serves, as far as the loaders can tell.
    HallusionBench and SugarCrepe are built from the real annotation files, when present."""
    from_shared = {}
    if SHARED.is_dir():
        from_shared = {"lmms-lab-encoder/HallusionBench": hallusionbench(), **sugarcrepe()}
    return {
        "lmms-lab-encoder/MME": mme(),
        "BaiqiL/NaturalBench": naturalbench(),
        "facebook/winoground": winoground(),
        "MM-Hallu/BEAF": beaf(),
        "lmms-lab/POPE": pope(),
    } | from_shared


def fake_load_dataset(repos: dict[str, dict[str, datasets.Dataset]]):
    """`datasets.load_dataset(path, split=...)` over `repos`, failing as datasets does."""

    def load_dataset(path, split=None, **kwargs):
        if path not in repos:
            raise datasets.exceptions.DatasetNotFoundError(
                f"Dataset '{path}' doesn't exist on the Hub or cannot be accessed."
            )
        if split not in repos[path]:
            raise ValueError(f'Unknown split "{split}". Should be one of {list(repos[path])}.')
        return repos[path][split]

    return load_dataset


__all__ = ["BEAF_ORIGINAL", "fake_load_dataset", "hub"]
