"""Every benchmark read from a local copy in its published layout: items, labels, groups."""

import json
from collections import Counter

import pytest
from benchmark_fixtures import (
    BEAF_ORIGINAL,
    POPE_IMAGES,
    SHARED,
    beaf_records,
    needs_shared,
    write_beaf,
    write_hallusionbench,
    write_mme,
    write_naturalbench,
    write_pope,
    write_sugarcrepe_images,
    write_winoground,
)
from hydra import compose, initialize_config_module

from sysattn_exp.benchmarks import load_benchmark
from sysattn_exp.errors import UsageError


def benchmark_cfg(*overrides: str):
    """The benchmark node as the CLI composes it."""
    with initialize_config_module("sysattn_exp.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides)).benchmark


def groups_of(benchmark) -> dict[str, list]:
    groups: dict[str, list] = {}
    for item in benchmark.items:
        groups.setdefault(item.group_id, []).append(item)
    return groups


def test_mme_local_release_layout(tmp_path):
    write_mme(tmp_path)
    bench = load_benchmark(
        benchmark_cfg(
            "benchmark=mme",
            f"benchmark.data_dir={tmp_path / 'txt'}",
            f"benchmark.image_dir={tmp_path / 'img'}",
        )
    )
    assert len(bench.items) == 8
    groups = groups_of(bench)
    assert len(groups) == 4 and all(len(g) == 2 for g in groups.values())
    assert all([i.label for i in g] == [True, False] for g in groups.values())
    assert {i.meta["category"] for i in bench.items} == {"existence", "artwork", "code_reasoning"}
    nested = [i for i in bench.items if i.meta["category"] == "artwork"]
    assert all("/artwork/images/" in i.image_id for i in nested)
    assert bench.question_text(bench.items[0]).endswith("Please answer yes or no.")
    assert bench.load_image(bench.items[0].image_id).mode == "RGB"


def test_mme_missing_image_error_or_skip(tmp_path):
    write_mme(tmp_path)
    (tmp_path / "img" / "existence" / "000000006040.jpg").unlink()
    args = [
        "benchmark=mme",
        f"benchmark.data_dir={tmp_path / 'txt'}",
        f"benchmark.image_dir={tmp_path / 'img'}",
    ]
    with pytest.raises(UsageError, match="000000006040.jpg"):
        load_benchmark(benchmark_cfg(*args))
    bench = load_benchmark(benchmark_cfg(*args, "benchmark.skip_missing_images=true"))
    assert len(bench.items) == 6 and bench.load_counts["n_skipped_items"] == 2
    assert all(i.meta["category"] != "existence" for i in bench.items)


@needs_shared
def test_hallusionbench_real_annotations(tmp_path):
    records = json.loads((SHARED / "hallusionbench" / "HallusionBench.json").read_text())
    write_hallusionbench(tmp_path, records)
    bench = load_benchmark(
        benchmark_cfg(
            "benchmark=hallusionbench",
            f"benchmark.data_dir={tmp_path / 'data'}",
            f"benchmark.image_dir={tmp_path / 'images'}",
        )
    )
    # Every question is an item, the 178 without a figure too (image_id None), as the
    # official aAcc and qAcc count them.
    no_image = [r for r in records if r["visual_input"] == "0"]
    assert len(records) == 1129 and len(no_image) == 178
    assert len(bench.items) == 1129
    assert [i.image_id is None for i in bench.items] == [r["visual_input"] == "0" for r in records]
    assert bench.load_counts["n_no_image_items"] == 178
    pair_key = lambda r: f"{r['category']}_{r['subcategory']}_{r['set_id']}_{r['question_id']}"  # noqa: E731
    assert len(groups_of(bench)) == len({pair_key(r) for r in records})
    assert sum(i.label for i in bench.items) == sum(r["gt_answer"] == "1" for r in records)
    # fAcc's figures: every figure but VS figure 0, the question asked without one.
    figures = {
        f"{r['category']}_{r['subcategory']}_{r['set_id']}_{r['figure_id']}"
        for r in records
        if not (r["category"] == "VS" and r["figure_id"] == "0")
    }
    assert {i.meta["figure_key"] for i in bench.items} - {None} == figures
    assert all((i.meta["figure_key"] is None) == (i.image_id is None) for i in bench.items)
    first = next(i for i, r in zip(bench.items, records, strict=True) if r["filename"])
    assert first.image_id.endswith(
        next(r for r in records if r["filename"])["filename"].lstrip("./").split("/", 1)[1]
    )


def test_naturalbench_parquet_export(tmp_path):
    write_naturalbench(tmp_path / "nb", n_samples=3)
    bench = load_benchmark(
        benchmark_cfg("benchmark=naturalbench", f"benchmark.data_dir={tmp_path / 'nb'}")
    )
    assert len(bench.items) == 12 and len(groups_of(bench)) == 3  # multiple choice left out
    by_id = {i.item_id: i for i in bench.items}
    assert [by_id[f"0/q{j}_i{k}"].label for j, k in ((0, 0), (0, 1), (1, 0), (1, 1))] == [
        True,
        False,
        False,
        True,
    ]
    assert by_id["1/q1_i0"].question == "Is the thing number 1 blue?"
    assert bench.question_text(by_id["0/q0_i0"]).endswith("? Please answer Yes or No.")
    image = bench.load_image(by_id["2/q0_i1"].image_id)
    assert image.size == (50, 40) and image.getpixel((25, 20)) == (
        255,
        255,
        0,
    )  # Image_1 of sample 2: yellow


def test_winoground_release_layout(tmp_path):
    write_winoground(tmp_path, n_examples=3)
    bench = load_benchmark(benchmark_cfg("benchmark=winoground", f"benchmark.data_dir={tmp_path}"))
    assert len(bench.items) == 12 and len(groups_of(bench)) == 3
    for item in bench.items:
        assert item.label == (item.meta["caption_index"] == item.meta["image_index"])
        assert item.image_id.endswith(f"ex_{item.group_id}_img_{item.meta['image_index']}.png")
    assert bench.question_text(bench.items[0]) == (
        'Does this figure show "a red thing 0 left of a blue thing"? Please answer yes or no.'
    )


@needs_shared
def test_sugarcrepe_real_annotations(tmp_path):
    n_images = write_sugarcrepe_images(SHARED / "sugarcrepe", tmp_path / "val2017")
    args = [
        "benchmark=sugarcrepe",
        f"benchmark.data_dir={SHARED / 'sugarcrepe'}",
        f"benchmark.image_dir={tmp_path / 'val2017'}",
    ]
    bench = load_benchmark(benchmark_cfg(*args))
    sizes = {f.stem: len(json.loads(f.read_text())) for f in (SHARED / "sugarcrepe").glob("*.json")}
    assert sum(sizes.values()) == 7511 and len(sizes) == 7
    assert len(bench.items) == 2 * 7511 and len(groups_of(bench)) == 7511
    assert Counter(i.meta["subset"] for i in bench.items) == {k: 2 * v for k, v in sizes.items()}
    assert len({i.image_id for i in bench.items}) == n_images
    swap = load_benchmark(
        benchmark_cfg(*args, "benchmark.subsets=[swap_obj]", "benchmark.limit=10")
    )
    record = json.loads((SHARED / "sugarcrepe" / "swap_obj.json").read_text())
    first_key = next(iter(record))
    positive, negative = swap.items[0], swap.items[1]
    assert len(swap.items) == 20
    assert (positive.question, positive.label) == (record[first_key]["caption"], True)
    assert (negative.question, negative.label) == (record[first_key]["negative_caption"], False)
    with pytest.raises(UsageError, match="'swap_color'"):
        load_benchmark(benchmark_cfg(*args, "benchmark.subsets=[swap_color]"))


def test_beaf_release_layout(tmp_path):
    write_beaf(tmp_path / "beaf")
    bench = load_benchmark(
        benchmark_cfg("benchmark=beaf", f"benchmark.data_dir={tmp_path / 'beaf'}")
    )
    records = beaf_records()
    assert len(bench.items) == len(records) == 9
    groups = groups_of(bench)
    assert len(groups) == 3 and all(len(g) == 3 for g in groups.values())
    assert set(groups) == {
        f"{BEAF_ORIGINAL}/Is there a {o} in the image?" for o in ("train", "truck", "person")
    }
    assert [i.label for i in bench.items] == [r["gt"] == "yes" for r in records]
    assert bench.items[3].image_id.endswith(f"images/{BEAF_ORIGINAL}_00.png")


def pope_args(root) -> list[str]:
    return [
        "benchmark=pope",
        f"benchmark.data_dir={root / 'coco'}",
        f"benchmark.image_dir={root / 'val2014'}",
    ]


def test_pope_release_layout(tmp_path):
    write_pope(tmp_path)
    bench = load_benchmark(benchmark_cfg(*pope_args(tmp_path)))
    # 3 splits x 2 images x 2 questions; the same question ids in every split, kept apart.
    assert len(bench.items) == 12 and len({i.item_id for i in bench.items}) == 12
    groups = groups_of(bench)
    assert list(groups) == [
        f"{s}/{image}" for s in ("random", "popular", "adversarial") for image in POPE_IMAGES
    ]
    assert all([i.label for i in g] == [True, False] for g in groups.values())
    first = bench.items[0]
    assert (first.item_id, first.meta) == ("random/1", {"split": "random"})
    assert first.image_id == str(tmp_path / "val2014" / POPE_IMAGES[0])
    assert (
        bench.question_text(first) == "Is there a snowboard in the image? Please answer yes or no."
    )
    assert bench.load_image(first.image_id).mode == "RGB"
    adversarial = load_benchmark(
        benchmark_cfg(*pope_args(tmp_path), "benchmark.subsets=[adversarial]")
    )
    assert [i.item_id for i in adversarial.items] == [f"adversarial/{k}" for k in range(1, 5)]


def test_pope_bad_input(tmp_path):
    write_pope(tmp_path)
    (tmp_path / "coco" / "coco_pope_popular.json").unlink()
    with pytest.raises(UsageError, match="coco_pope_popular.json not found"):
        load_benchmark(benchmark_cfg(*pope_args(tmp_path)))
    bench = load_benchmark(benchmark_cfg(*pope_args(tmp_path), "benchmark.subsets=[random]"))
    assert len(bench.items) == 4


def test_limit_takes_whole_groups(tmp_path):
    write_winoground(tmp_path, n_examples=3)
    bench = load_benchmark(
        benchmark_cfg("benchmark=winoground", f"benchmark.data_dir={tmp_path}", "benchmark.limit=2")
    )
    assert len(bench.items) == 8 and len(groups_of(bench)) == 2


def test_hub_unreachable_fails_fast_pointing_to_data_dir(monkeypatch):
    # A closed local port stands in for "no network", whatever this machine can reach.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    for name in ("mme", "hallusionbench", "naturalbench", "winoground", "sugarcrepe"):
        with pytest.raises(UsageError, match="benchmark.data_dir"):
            load_benchmark(benchmark_cfg(f"benchmark={name}"))


def test_beaf_needs_data_dir():
    with pytest.raises(UsageError, match="benchmark.data_dir"):
        load_benchmark(benchmark_cfg("benchmark=beaf"))
