"""The caption job's metric plumbing (ground truth -> prompts -> captions -> CHAIR ->
predictions.parquet), on a tiny COCO-format fixture, with a stub in place of generation that
returns fixed captions; and its answers to bad input. Generation itself is tested where
it is built."""

import copy
import functools
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from PIL import Image

from sysattn_exp.errors import UsageError
from sysattn_exp.evaluation.caption import caption_predictions, load_coco

CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 3, "name": "car", "supercategory": "vehicle"},
    {"id": 18, "name": "dog", "supercategory": "animal"},
    {"id": 59, "name": "pizza", "supercategory": "food"},
    {"id": 63, "name": "couch", "supercategory": "furniture"},
]
# image id -> (instance categories, reference captions)
IMAGES = {
    139: ([18, 63, 18], ["A dog lying on a couch.", "A brown dog on a sofa."]),
    285: ([1, 59], ["A man eating a slice of pizza."]),
    632: ([3], ["A car parked next to a bicycle."]),  # bicycle: from the captions only
    724: ([1], ["A woman standing."]),
}
STUB_CAPTIONS = {
    139: "Two dogs on a sofa with a cat. The dogs sleep.",  # cat hallucinated
    285: "A man eating pizza.",
    632: "A bicycle and a car.",
    724: "A sunny day.",
}


def file_name(image_id: int) -> str:
    return f"COCO_val2014_{image_id:012d}.jpg"


def write_coco(root: Path) -> Path:
    """data_dir with the two annotation files in COCO's layout, and data_dir/val2014."""
    images = [{"id": i, "file_name": file_name(i), "width": 8, "height": 8} for i in IMAGES]
    instances, captions = [], []
    for image_id, (categories, references) in IMAGES.items():
        for category in categories:
            instances.append(
                {"id": len(instances) + 1, "image_id": image_id, "category_id": category}
                | {"bbox": [0, 0, 1, 1], "area": 1, "iscrowd": 0}
            )
        for text in references:
            captions.append({"id": len(captions) + 1, "image_id": image_id, "caption": text})
    root.mkdir(parents=True, exist_ok=True)
    common = {"info": {}, "licenses": [], "images": images}
    (root / "instances_val2014.json").write_text(
        json.dumps(common | {"annotations": instances, "categories": CATEGORIES})
    )
    (root / "captions_val2014.json").write_text(json.dumps(common | {"annotations": captions}))
    (root / "val2014").mkdir(exist_ok=True)
    for i in IMAGES:
        Image.new("RGB", (8, 8), (i % 255, 0, 0)).save(root / "val2014" / file_name(i))
    return root


@pytest.fixture
def coco(tmp_path) -> Path:
    return write_coco(tmp_path / "coco")


@functools.cache
def composed():
    with initialize_config_module("sysattn_exp.conf", version_base="1.3"):
        return compose("config", overrides=["+task=caption"])


def config(data_dir: Path, /, **caption):
    """The config with +task=caption, as a job sees it (composed once: Hydra is slow)."""
    cfg = copy.deepcopy(composed())
    for key, value in ({"data_dir": str(data_dir)} | caption).items():
        OmegaConf.update(cfg, f"caption.{key}", value)
    return cfg


class StubFormat:
    def render(self, question: str, with_image: bool = True) -> str:
        return f"USER: {'<image>' if with_image else ''}\n{question} ASSISTANT:"


class StubModel:
    def prompt_format(self, cfg):
        return StubFormat()


def stub_generate(calls: list):
    """A generate_fn returning fixed captions, recording what it was given."""

    def generate(loaded, images, prompts, edit, max_new_tokens):
        calls.append((images, prompts, edit, max_new_tokens))
        ids = [int(Path(p).stem.split("_")[-1]) for p in images.paths]
        assert images[0].size == (8, 8)  # images decode on access
        return [STUB_CAPTIONS[i] for i in ids]

    return generate


def test_caption_job_metric_plumbing_with_stub_generation(coco):
    cfg = config(coco, limit=3, seed=None)  # the first 3 by id: 139, 285, 632
    calls = []
    images = load_coco(cfg.caption)
    rows, metrics = caption_predictions(cfg, StubModel(), "EDIT", stub_generate(calls), images)
    (images, prompts, edit, max_new_tokens) = calls[0]
    assert [call[2] for call in calls] == ["EDIT", None]  # with an edit, the baseline too
    assert prompts == ["USER: <image>\nPlease describe this image in detail. ASSISTANT:"] * 3
    assert (len(images), edit, max_new_tokens) == (3, "EDIT", 512)
    # mentions: dog couch cat dog | person pizza | bicycle car -> 1 of 8 hallucinated;
    # ground truth {dog, couch} {person, pizza} {car, bicycle}: all 6 recalled
    assert metrics["chair_s"] == pytest.approx(1 / 3)
    assert metrics["chair_i"] == pytest.approx(1 / 8)
    assert metrics["recall"] == pytest.approx(1.0)
    assert metrics["caption_length"] == pytest.approx((11 + 4 + 5) / 3)
    assert metrics["n_images"] == 3
    assert metrics["baseline_chair_s"] == metrics["chair_s"]  # the stub ignores the edit
    assert metrics["chair_s_change_points"] == metrics["chair_i_change_points"] == 0
    assert list(rows["image_id"]) == [139, 285, 632]
    first = rows.iloc[0]
    assert first["file_name"] == file_name(139)
    assert list(first["mentioned_objects"]) == ["dog", "couch", "cat", "dog"]
    assert list(first["hallucinated_objects"]) == ["cat"]
    assert list(first["ground_truth_objects"]) == ["couch", "dog"]
    assert bool(first["hallucinated"]) and first["n_words"] == 11
    assert list(rows.iloc[2]["ground_truth_objects"]) == ["bicycle", "car"]


def test_limit_and_seed_draw_a_reproducible_sample(coco):
    first = [i.image_id for i in load_coco(config(coco, limit=2, seed=3).caption)]
    again = [i.image_id for i in load_coco(config(coco, limit=2, seed=3).caption)]
    assert first == again == sorted(first) and len(first) == 2
    assert len(load_coco(config(coco, limit=None).caption)) == 4


def test_image_list_by_id_or_file_name(coco, tmp_path):
    listed = tmp_path / "ids.txt"
    listed.write_text(f"724\n# a comment\n{file_name(139)}\n")
    images = load_coco(config(coco, image_list=str(listed)).caption)
    assert [i.image_id for i in images] == [724, 139]


def break_instances(coco: Path) -> None:
    (coco / "instances_val2014.json").unlink()


def break_json(coco: Path) -> None:
    (coco / "captions_val2014.json").write_text("{not json")


def drop_categories(coco: Path) -> None:
    path = coco / "instances_val2014.json"
    data = json.loads(path.read_text())
    del data["categories"]
    path.write_text(json.dumps(data))


def drop_caption_text(coco: Path) -> None:
    path = coco / "captions_val2014.json"
    data = json.loads(path.read_text())
    del data["annotations"][0]["caption"]
    path.write_text(json.dumps(data))


def drop_image(coco: Path) -> None:
    (coco / "val2014" / file_name(285)).unlink()


@pytest.mark.parametrize(
    ("damage", "overrides", "expected"),
    [
        (None, {"data_dir": None}, "caption.data_dir is required"),
        (None, {"data_dir": "/nonexistent"}, "caption.data_dir=/nonexistent is not a directory"),
        (None, {"image_dir": "/nonexistent"}, "caption.image_dir=/nonexistent"),
        (break_instances, {}, "instances_val2014.json not found: caption.data_dir must hold"),
        (break_json, {}, "captions_val2014.json as JSON"),
        (drop_categories, {}, "has no list 'categories'"),
        (drop_caption_text, {}, "an entry of 'annotations' has no 'caption'"),
        (drop_image, {}, f"{file_name(285)} not found (1 of 4 missing)"),
        (None, {"image_list": "/nonexistent.txt"}, "caption.image_list=/nonexistent.txt"),
    ],
)
def test_bad_input_is_one_line_naming_the_key_or_file(coco, damage, overrides, expected):
    if damage:
        damage(coco)
    with pytest.raises(UsageError) as error:
        load_coco(config(coco, **overrides).caption)
    message = str(error.value)
    assert expected in message and "\n" not in message


def test_unknown_image_in_list(coco, tmp_path):
    listed = tmp_path / "ids.txt"
    listed.write_text("999\n")
    with pytest.raises(UsageError, match="line 1: '999' is not an image"):
        load_coco(config(coco, image_list=str(listed)).caption)
