"""Data files as people save them (a UTF-8 byte-order mark, CRLF or CR line ends, UTF-16
from a spreadsheet) read the same as the plain file by every loader; groups that lack the
structure their metrics assume stop the load with one line naming them; images that
cannot be decoded are found when the data loads, and skip_missing_images drops their
groups whole."""

import codecs
import io
import json
import re
from importlib.resources import files
from pathlib import Path

import datasets
import pytest
from benchmark_fixtures import (
    save_image,
    write_beaf,
    write_mme,
    write_naturalbench,
    write_pope,
    write_winoground,
)
from hub_fixtures import fake_load_dataset
from PIL import Image
from test_benchmark_loaders import benchmark_cfg, groups_of
from test_caption_job import write_coco

from sysattn_exp.benchmarks import load_benchmark
from sysattn_exp.errors import UsageError
from sysattn_exp.evaluation.caption import load_coco
from sysattn_exp.evaluation.chair import parse_synonyms
from sysattn_exp.files import read_text

TEXT_SUFFIXES = (".txt", ".json", ".jsonl")


BOM = {"utf-8-sig": codecs.BOM_UTF8, "utf-16": codecs.BOM_UTF16}  # utf-16: this machine's order


def as_saved_on_windows(root: Path, encoding: str = "utf-8-sig") -> int:
    """Rewrite every text file under root with a byte-order mark and CRLF line ends (as
    Notepad or a spreadsheet's export saves them); returns how many were rewritten."""
    paths = [p for p in root.rglob("*") if p.suffix in TEXT_SUFFIXES]
    for path in paths:
        text = path.read_text(encoding="utf-8").replace("\n", "\r\n")
        path.write_bytes(text.encode(encoding))  # utf-8-sig and utf-16 write the BOM
        assert path.read_bytes().startswith(BOM[encoding])
    return len(paths)


def as_tuples(benchmark) -> list[tuple]:
    """Everything a loader makes of its items (Item's equality leaves meta out)."""
    return [
        (i.item_id, i.group_id, i.image_id, i.question, i.label, sorted(i.meta.items()))
        for i in benchmark.items
    ]


def test_read_text_ignores_bom_and_line_ends(tmp_path):
    plain = "first\tline é\nsecond\n\nlast"
    variants = {
        "plain": plain.encode(),
        "bom": codecs.BOM_UTF8 + plain.encode(),
        "crlf": plain.replace("\n", "\r\n").encode(),
        "bom_crlf": codecs.BOM_UTF8 + plain.replace("\n", "\r\n").encode(),
        "cr": plain.replace("\n", "\r").encode(),
        "utf16": plain.replace("\n", "\r\n").encode("utf-16"),
    }
    for name, data in variants.items():
        (tmp_path / name).write_bytes(data)
        assert read_text(tmp_path / name) == plain, name
    (tmp_path / "latin1").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UsageError, match=r"latin1 is not UTF-8 text"):
        read_text(tmp_path / "latin1")


def test_chair_synonym_list_reads_the_same_saved_on_windows(tmp_path):
    packaged = files("sysattn_exp") / "data" / "coco_synonyms.txt"
    copy = tmp_path / "coco_synonyms.txt"
    copy.write_bytes(codecs.BOM_UTF8 + packaged.read_bytes().replace(b"\n", b"\r\n"))
    assert parse_synonyms(read_text(copy)) == parse_synonyms(read_text(packaged))


def mme_args(root):
    return [
        "benchmark=mme",
        f"benchmark.data_dir={root / 'txt'}",
        f"benchmark.image_dir={root / 'img'}",
    ]


def hallusionbench_records() -> list[dict]:
    """Two sets: set 0 with figures 0 and 1, set 1 with figure 0, two questions each."""
    records = []
    for set_id, figures in (("0", ("0", "1")), ("1", ("0",))):
        for figure in figures:
            for question in ("0", "1"):
                records.append(
                    {
                        "category": "VD",
                        "subcategory": "chart",
                        "visual_input": "1",
                        "set_id": set_id,
                        "figure_id": figure,
                        "sample_note": "",
                        "question_id": question,
                        "question": f"Is bar {question} the tallest?",
                        "gt_answer_details": "",
                        "gt_answer": "1" if figure == "0" else "0",
                        "filename": f"./VD/chart/{set_id}_{figure}.png",
                    }
                )
    return records


def write_hallusionbench_small(root: Path) -> None:
    records = hallusionbench_records()
    (root / "data").mkdir(parents=True)
    (root / "data" / "HallusionBench.json").write_text(json.dumps(records, indent=1))
    for n, record in enumerate(records):
        save_image(root / "images" / record["filename"], n)


def write_sugarcrepe_small(root: Path) -> None:
    (root / "data").mkdir(parents=True)
    records = {
        str(k): {
            "filename": f"00000000{k}.jpg",
            "caption": f"a dog {k} on a sofa",
            "negative_caption": f"a sofa {k} on a dog",
        }
        for k in range(3)
    }
    (root / "data" / "swap_obj.json").write_text(json.dumps(records, indent=2))
    for k, record in records.items():
        save_image(root / "val2017" / record["filename"], int(k))


def write_jsonl(root: Path) -> None:
    root.mkdir(parents=True)
    save_image(root / "red.png", 0)
    records = [
        {"id": "a", "group": "g", "image": "red.png", "question": "Red?", "answer": "yes"},
        {"id": "b", "group": "g", "image": "red.png", "question": "Blue?", "answer": "no"},
        {"id": "c", "group": "h", "question": "Is 2 > 1?", "answer": "yes"},
    ]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


# benchmark -> (write the fixture under root, the overrides that load it)
LOCAL = {
    "mme": (write_mme, mme_args),
    "hallusionbench": (
        write_hallusionbench_small,
        lambda r: [
            "benchmark=hallusionbench",
            f"benchmark.data_dir={r / 'data'}",
            f"benchmark.image_dir={r / 'images'}",
        ],
    ),
    "winoground": (write_winoground, lambda r: ["benchmark=winoground", f"benchmark.data_dir={r}"]),
    "sugarcrepe": (
        write_sugarcrepe_small,
        lambda r: [
            "benchmark=sugarcrepe",
            f"benchmark.data_dir={r / 'data'}",
            f"benchmark.image_dir={r / 'val2017'}",
        ],
    ),
    "beaf": (write_beaf, lambda r: ["benchmark=beaf", f"benchmark.data_dir={r}"]),
    "pope": (
        write_pope,
        lambda r: [
            "benchmark=pope",
            f"benchmark.data_dir={r / 'coco'}",
            f"benchmark.image_dir={r / 'val2014'}",
        ],
    ),
    "jsonl": (write_jsonl, lambda r: ["benchmark=jsonl", f"benchmark.path={r / 'pairs.jsonl'}"]),
}


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
@pytest.mark.parametrize("name", list(LOCAL))
def test_loader_reads_bom_and_crlf_files_as_the_plain_ones(name, encoding, tmp_path):
    write, args = LOCAL[name]
    root = tmp_path / name
    write(root)
    plain = as_tuples(load_benchmark(benchmark_cfg(*args(root))))
    assert as_saved_on_windows(root, encoding) >= 1
    assert as_tuples(load_benchmark(benchmark_cfg(*args(root)))) == plain


def test_mme_bom_does_not_split_the_first_image_s_pair(tmp_path):
    """The issue's case: a BOM glued to the first image's name made its two questions two
    groups of one, each scored as a "pair" for acc+."""
    write_mme(tmp_path)
    txt = tmp_path / "txt" / "existence.txt"
    txt.write_bytes(codecs.BOM_UTF8 + txt.read_bytes())
    bench = load_benchmark(benchmark_cfg(*mme_args(tmp_path)))
    groups = groups_of(bench)
    assert "existence/000000006040.jpg" in groups
    assert all(len(g) == 2 and sorted(i.label for i in g) == [False, True] for g in groups.values())


def test_caption_annotations_and_image_list_saved_on_windows(tmp_path):
    root = write_coco(tmp_path / "coco")
    (root / "list.txt").write_text("# chosen\n285\nCOCO_val2014_000000000139.jpg\n")
    cfg = {"data_dir": str(root), "image_dir": None, "limit": None, "seed": None}
    cfg["image_list"] = str(root / "list.txt")
    from omegaconf import OmegaConf

    plain = load_coco(OmegaConf.create(cfg))
    assert as_saved_on_windows(root) == 3
    saved = load_coco(OmegaConf.create(cfg))
    assert saved == plain and [i.image_id for i in saved] == [285, 139]


def test_caption_truncated_image_stops_before_the_model(tmp_path):
    from omegaconf import OmegaConf

    root = write_coco(tmp_path / "coco")
    image = root / "val2014" / "COCO_val2014_000000000285.jpg"
    noise = Image.effect_noise((64, 64), 60).convert("RGB")
    noise.save(image, quality=95)
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    cfg = {"data_dir": str(root), "image_dir": None, "limit": None, "seed": None}
    with pytest.raises(UsageError, match=r"000000000285.jpg: image file is truncated.*1 of 4"):
        load_coco(OmegaConf.create(cfg | {"image_list": None}))


# --- groups as the benchmark defines them -------------------------------------------


def mme_with(tmp_path, lines: list[str]):
    write_mme(tmp_path)
    (tmp_path / "txt" / "existence.txt").write_text("\n".join(lines) + "\n")
    return benchmark_cfg(*mme_args(tmp_path))


@pytest.mark.parametrize(
    "lines, fragment",
    [
        (["000000006040.jpg\tIs there a train?\tYes"], "has 1 question (1 Yes, 0 No)"),
        (
            ["000000006040.jpg\tIs there a train?\tYes", "000000006040.jpg\tA car?\tYes"],
            "has 2 questions (2 Yes, 0 No)",
        ),
    ],
)
def test_mme_group_must_be_one_yes_and_one_no(tmp_path, lines, fragment):
    cfg = mme_with(tmp_path, lines)
    with pytest.raises(
        UsageError, match=re.escape(f"group 'existence/000000006040.jpg' {fragment}")
    ):
        load_benchmark(cfg)


def test_broken_structure_stops_even_with_skip_missing_images(tmp_path):
    cfg = mme_with(tmp_path, ["000000006040.jpg\tIs there a train?\tYes"])
    cfg.skip_missing_images = True
    with pytest.raises(UsageError, match="has 1 question "):
        load_benchmark(cfg)


def test_winoground_example_twice_is_not_one_group_of_eight(tmp_path):
    write_winoground(tmp_path, n_examples=2)
    path = tmp_path / "examples.jsonl"
    path.write_text(path.read_text() + path.read_text().splitlines()[0] + "\n")
    with pytest.raises(UsageError, match=r"examples.jsonl: group '0' has \(caption, image\)"):
        load_benchmark(benchmark_cfg("benchmark=winoground", f"benchmark.data_dir={tmp_path}"))


def test_naturalbench_index_on_two_rows_stops(tmp_path):
    write_naturalbench(tmp_path / "nb", n_samples=2)
    table = datasets.load_dataset(
        "parquet", data_files=str(tmp_path / "nb" / "train-00000.parquet"), split="train"
    )
    table.map(lambda row: {"Index": 0}).to_parquet(str(tmp_path / "nb" / "train-00000.parquet"))
    with pytest.raises(UsageError, match=r"group '0' has \(question, image\) pairs"):
        load_benchmark(
            benchmark_cfg("benchmark=naturalbench", f"benchmark.data_dir={tmp_path / 'nb'}")
        )


def test_beaf_edit_without_its_original_stops(tmp_path):
    write_beaf(tmp_path / "beaf")
    path = tmp_path / "beaf" / "beaf_qna.json"
    records = [r for r in json.loads(path.read_text()) if not r["orig_img"] or r["id"] != 0]
    path.write_text(json.dumps(records))
    with pytest.raises(UsageError, match=r"beaf_qna.json: group '.*train in the image\?' has 0 q"):
        load_benchmark(benchmark_cfg("benchmark=beaf", f"benchmark.data_dir={tmp_path / 'beaf'}"))


def test_hallusionbench_record_twice_stops(tmp_path):
    write_hallusionbench_small(tmp_path)
    path = tmp_path / "data" / "HallusionBench.json"
    records = json.loads(path.read_text())
    path.write_text(json.dumps([*records, records[1]]))
    with pytest.raises(UsageError, match=r"group 'VD_chart_0_1' asks its question twice on fig"):
        load_benchmark(benchmark_cfg(*LOCAL["hallusionbench"][1](tmp_path)))


# --- images that cannot be decoded -----------------------------------------------


def cut_in_half(path: Path) -> None:
    """A JPEG whose header is whole and whose data stops halfway (opens, cannot decode)."""
    Image.effect_noise((64, 64), 60).convert("RGB").save(path, format="JPEG", quality=95)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    Image.open(path).close()  # the header still reads


def test_truncated_image_error_or_whole_group_skipped(tmp_path):
    write_mme(tmp_path)
    cut_in_half(tmp_path / "img" / "existence" / "000000006040.jpg")
    with pytest.raises(UsageError, match=r"000000006040.jpg: image file is truncated.*skip_miss"):
        load_benchmark(benchmark_cfg(*mme_args(tmp_path)))
    bench = load_benchmark(benchmark_cfg(*mme_args(tmp_path), "benchmark.skip_missing_images=true"))
    assert bench.load_counts["n_skipped_items"] == 2 and len(bench.items) == 6
    assert "existence/000000006040.jpg" not in groups_of(bench)


def test_skip_with_a_limit_takes_the_next_groups(tmp_path):
    write_mme(tmp_path)
    cut_in_half(tmp_path / "img" / "artwork" / "images" / "10002.jpg")  # the first group
    args = [*mme_args(tmp_path), "benchmark.skip_missing_images=true", "benchmark.limit=2"]
    bench = load_benchmark(benchmark_cfg(*args))
    assert list(groups_of(bench)) == ["artwork/10049.jpg", "code_reasoning/0020.png"]
    assert bench.load_counts["n_skipped_items"] == 2


def test_hallusionbench_unreadable_figure_drops_its_whole_set(tmp_path):
    """Question pairs and figures overlap within a set: dropping only the pairs on the bad
    figure would leave the good figure's fAcc group incomplete."""
    write_hallusionbench_small(tmp_path)
    (tmp_path / "images" / "VD" / "chart" / "0_1.png").write_bytes(b"not a png")
    args = [*LOCAL["hallusionbench"][1](tmp_path), "benchmark.skip_missing_images=true"]
    bench = load_benchmark(benchmark_cfg(*args))
    assert {i.meta["set_key"] for i in bench.items} == {"VD_chart_1"}
    assert bench.load_counts["n_skipped_items"] == 4 and len(bench.items) == 2


def small_mme_hub(monkeypatch, images: list[bytes], answers=("Yes", "No")) -> None:
    """lmms-lab-encoder/MME with the given images, each asked one question per answer."""
    from huggingface_hub import constants

    rows = {"question_id": [], "image": [], "question": [], "answer": [], "category": []}
    for n, data in enumerate(images):
        for answer in answers:
            rows["question_id"].append(f"existence/{n:04d}.png")
            rows["image"].append({"bytes": data, "path": None})
            rows["question"].append(f"Is this {n} {answer}?")
            rows["answer"].append(answer)
            rows["category"].append("existence")
    features = datasets.Features(
        {k: datasets.Image() if k == "image" else datasets.Value("string") for k in rows}
    )
    repos = {"lmms-lab-encoder/MME": {"test": datasets.Dataset.from_dict(rows, features=features)}}
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset(repos))


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="PNG")
    return buffer.getvalue()


def test_hub_image_that_cannot_be_decoded(monkeypatch):
    """The hub path decodes every stored image on load too."""
    cut = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(cut, format="JPEG")
    small_mme_hub(monkeypatch, [png_bytes(), cut.getvalue()[:400], png_bytes()])
    with pytest.raises(UsageError, match=r"existence/0001.png \(row 2, image\)"):
        load_benchmark(benchmark_cfg("benchmark=mme"))
    bench = load_benchmark(benchmark_cfg("benchmark=mme", "benchmark.skip_missing_images=true"))
    assert list(groups_of(bench)) == ["existence/0000.png", "existence/0002.png"]
    assert bench.load_counts["n_skipped_items"] == 2


def test_hub_mme_pair_with_a_third_question_stops(monkeypatch):
    small_mme_hub(monkeypatch, [png_bytes()], answers=("Yes", "No", "No"))
    with pytest.raises(
        UsageError,
        match=r"^lmms-lab-encoder/MME split test: group 'existence/0000.png' has 3 questions",
    ):
        load_benchmark(benchmark_cfg("benchmark=mme"))


def test_an_image_decodes_once_per_process_until_its_bytes_change(tmp_path):
    """The jobs of a sweep share a process: the second load hashes the file instead of
    decoding it again, and a changed file (new bytes) is decoded anew."""
    from sysattn_exp.benchmarks.base import Benchmark, Item, decode_once, open_image_file

    path = tmp_path / "x.png"
    Image.new("RGB", (4, 4), "red").save(path)
    decoded = []

    def load(image_id):
        decoded.append(image_id)
        return open_image_file(image_id)

    item = Item("1", "g", str(path), "Red?", True)
    for _ in range(2):
        decode_once(Benchmark("b", [item], "{question}", load), str(path))
    assert decoded == [str(path)]
    Image.new("RGB", (4, 4), "blue").save(path)
    decode_once(Benchmark("b", [item], "{question}", load), str(path))
    assert decoded == [str(path)] * 2
