"""Bad input: one line naming the key or file and what is allowed, exit status 2, no
traceback, and no results that look complete."""

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cli import run_cli, run_main_stderr
from conftest import make_image
from PIL import Image

TINY = ("model=tiny",)
REDIS = ("model=tiny", "intervention=redistribute")
CASES = {
    "unknown model": (("model=gpt5",), ["model/gpt5", "Available options", "tiny"]),
    # NaN and inf pass range comparisons: refused, not scored as garbage.
    "PAI alpha nan": (("model=tiny", "intervention=pai", "intervention.alpha=nan"), ["alpha"]),
    "scale factor inf": (
        ("model=tiny", "intervention=scale", "intervention.factor=inf"),
        ["intervention.factor=inf", "positive"],
    ),
    "lease seconds nan": (("model=tiny", "runtime.lease_seconds=nan"), ["lease_seconds", "finite"]),
    "not a device": (
        ("model=tiny", "model.device=cudaa"),
        ["model.device='cudaa'", "not a device"],
    ),
    "zero batch size": (("model=tiny", "model.batch_size=0"), ["model.batch_size=0", ">= 1"]),
    "metric names MLflow cannot keep apart": (
        (*TINY, "benchmark=mme", "benchmark.data_dir=mme_names", "benchmark.image_dir=mme_names"),
        ["'mme/a:b/acc' and 'mme/a_b/acc'", "mme/a_b/acc"],
    ),
    "device map on a builtin model": (
        ("model=toy", "model.device_map={foo:cpu}"),
        ["model.device_map", "builtin:toy", "model.device"],
    ),
    "random weights: uneven heads": (
        (
            "model=llava15_7b",
            "model.weights=random",
            "model.config_overrides={text_config:{num_attention_heads:4,num_key_value_heads:3}}",
        ),
        ["model.config_overrides", "num_key_value_heads=3"],
    ),
    "random weights: a value of the wrong type": (
        ("model=llava15_7b", "model.weights=random", "model.config_overrides={text_config:7}"),
        ["model.config_overrides"],
    ),
    "unknown benchmark": (("benchmark=imagenet",), ["benchmark/imagenet", "toy"]),
    "unknown intervention": (("intervention=swap",), ["intervention/swap", "redistribute"]),
    "unknown layer option": (("layers=q5",), ["layers/q5", "q4"]),
    "recipient is the source": (
        (*REDIS, "intervention.recipients=[system]"),
        ["intervention.recipients", "'system'", "image, text"],
    ),
    "recipient not a modality": ((*REDIS, "intervention.recipients=[audio]"), ["'audio'"]),
    "empty recipients": (
        (*REDIS, "intervention.recipients=[]"),
        ["intervention.recipients is empty"],
    ),
    "source not a modality": (
        (*REDIS, "intervention.source=audio"),
        ["intervention.source='audio'", "system, image, text"],
    ),
    "layers beyond depth": (
        (*REDIS, "layers.start=4", "layers.end=9"),
        ["8 decoder layers", "layers.end"],
    ),
    "quarter and range": ((*REDIS, "layers=q4", "layers.start=1"), ["not both"]),
    "misspelt rule key added with +": (  # Hydra's own error message suggests the +
        (*REDIS, "+intervention.sourse=image"),
        [
            "intervention.sourse is not a key of the redistribute rule",
            "allowed: name, source, recipients, impl, fraction, mode, heads",
        ],
    ),
    "missing jsonl path": ((*TINY, "benchmark=jsonl"), ["benchmark.path is required"]),
    "jsonl path not a file": (
        (*TINY, "benchmark=jsonl", "benchmark.path=nowhere.jsonl"),
        ["nowhere.jsonl"],
    ),
    "jsonl missing field": (
        (*TINY, "benchmark=jsonl", "benchmark.path=missing.jsonl"),
        ["missing.jsonl line 2", "'answer'"],
    ),
    "jsonl bad answer": (
        (*TINY, "benchmark=jsonl", "benchmark.path=maybe.jsonl"),
        ["maybe.jsonl line 1", "'maybe'", "yes or no"],
    ),
    "unreadable image": (
        (*TINY, "benchmark=jsonl", "benchmark.path=corrupt.jsonl"),
        ["broken.png"],
    ),
    # Decoded in full when the data loads (before the model), not only its header read.
    "truncated image": (
        (*TINY, "benchmark=jsonl", "benchmark.path=cut.jsonl"),
        ["cut.jpg: image file is truncated", "benchmark.skip_missing_images=true"],
    ),
    "mme image with one question": (
        (*TINY, "benchmark=mme", "benchmark.data_dir=mme", "benchmark.image_dir=mme"),
        ["group 'existence/1.jpg'", "has 1 question", "one Yes and one No"],
    ),
    "winoground example twice": (
        (*TINY, "benchmark=winoground", "benchmark.data_dir=wino"),
        ["examples.jsonl: group '0'", "(caption, image) pairs", "once each"],
    ),
    "template without question": (
        (*TINY, "benchmark.template=hello"),
        ["benchmark.template", "{question}"],
    ),
    "bad dtype": ((*TINY, "model.dtype=float8"), ["model.dtype", "float32"]),
    "unknown prompt ablation": (
        (*TINY, "prompt.ablation=no-sys"),
        ["prompt.ablation='no-sys'", "none, no-system-prompt, no-bos, no-system"],
    ),
    "prompt ablation with PAI's guidance": (
        (*TINY, "+condition=no-system", "intervention=pai", "intervention.cfg_gamma=1.1"),
        ["prompt.ablation=no-system", "guidance"],
    ),
    "unknown ranking": (
        (*TINY, "scoring.rank_by=logit"),
        ["scoring.rank_by='logit'", "p_yes, log_odds"],
    ),
    "pope unknown split": (
        (*TINY, "benchmark=pope", "benchmark.subsets=[random,adverserial]"),
        ["benchmark.subsets", "'adverserial'", "random, popular, adversarial"],
    ),
    "pope missing question file": (
        (*TINY, "benchmark=pope", "benchmark.data_dir=.", "benchmark.image_dir=."),
        ["coco_pope_random.json not found", "benchmark.data_dir", "benchmark.subsets"],
    ),
    "caption without annotations": (
        (*TINY, "+task=caption"),
        ["caption.data_dir is required", "instances_val2014.json", "captions_val2014.json"],
    ),
    "caption missing annotation file": (
        (*TINY, "+task=caption", "caption.data_dir=.", "caption.image_dir=."),
        ["instances_val2014.json not found", "caption.data_dir"],
    ),
    "unknown prompt preset": (
        (*TINY, "benchmark.prompt=vicuna"),
        ["benchmark.prompt='vicuna'", "native, llava"],
    ),
    # The schema (schema.py): keys Hydra adds unchecked with +, types, sets, removed keys.
    "new top-level key": (
        (*TINY, "+layer=q4"),
        ["layer is not a key of the config", "layers", "did you mean layers?"],
    ),
    "misspelt scoring key": (
        (*TINY, "+scoring.moode=generate"),
        ["scoring.moode is not a key of scoring", "mode"],
    ),
    "misspelt runtime key": (
        (*TINY, "+runtime.cache_dri=x"),
        ["runtime.cache_dri", "did you mean cache_dir?"],
    ),
    "misspelt model key": ((*TINY, "+model.batchsize=2"), ["model.batchsize", "batch_size"]),
    "misspelt benchmark key": ((*TINY, "+benchmark.limt=2"), ["benchmark.limt", "limit"]),
    "wrong type": ((*TINY, "model.batch_size=two"), ["model.batch_size='two'", "whole number"]),
    "quarter outside 1..4": (
        (*REDIS, "layers=q4", "layers.quarter=5"),
        ["layers.quarter=5", "1 to 4"],
    ),
    "removed key": ((*TINY, "~scoring.mode"), ["scoring.mode is required"]),
    "layer window larger than the model": (
        ("+sweep=windows", *TINY, "sweep.window=9"),
        ["sweep.window=9", "8 decoder layers", "allowed 1 to 8"],
    ),
    "layer window stride 0": (
        ("+sweep=windows", *TINY, "sweep.stride=0"),
        ["sweep.stride=0", "whole number >= 1"],
    ),
}


def write_data(root):
    make_image("red").save(root / "ok.png")
    (root / "broken.png").write_bytes(b"not a png at all")
    good = {"id": "1", "group": "g", "image": "ok.png", "question": "Red?", "answer": "yes"}
    files = {
        "missing.jsonl": [good, {k: v for k, v in good.items() if k != "answer"} | {"id": "2"}],
        "maybe.jsonl": [good | {"answer": "maybe"}],
        "corrupt.jsonl": [good, good | {"id": "2", "image": "broken.png", "answer": "no"}],
    }
    # A JPEG whose header is whole and whose data stops halfway.
    Image.effect_noise((64, 64), 60).convert("RGB").save(root / "cut.jpg", quality=95)
    (root / "cut.jpg").write_bytes((root / "cut.jpg").read_bytes()[:1500])
    files["cut.jsonl"] = [good, good | {"id": "2", "group": "h", "image": "cut.jpg"}]
    for name, records in files.items():
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "mme").mkdir()
    (root / "mme" / "existence.txt").write_text("1.jpg\tIs there a cat?\tYes\n")
    pair = "1.png\tIs it red?\tYes\n1.png\tIs it blue?\tNo\n"
    for category in ("a:b", "a_b"):  # two categories, one name in MLflow
        (root / "mme_names" / category).mkdir(parents=True)
        make_image("red").save(root / "mme_names" / category / "1.png")
        (root / "mme_names" / f"{category}.txt").write_text(pair)
    (root / "wino" / "images").mkdir(parents=True)
    example = {"id": 0, "caption_0": "a", "caption_1": "b", "image_0": "x", "image_1": "y"}
    (root / "wino" / "examples.jsonl").write_text(2 * (json.dumps(example) + "\n"))


# Through a real process, for the exit-status contract: a Hydra composition error, a config
# check, a data file, and a check that needs the model (its depth). The other cases run
# the same entry point in this process, which skips the start-up of a new interpreter.
IN_A_PROCESS = [
    "unknown model",
    "recipient is the source",
    "jsonl missing field",
    "layers beyond depth",
]


@pytest.fixture(scope="module")
def processes(tmp_path_factory):
    """The IN_A_PROCESS cases, each in its own folder, two at a time."""

    def one(name):
        cwd = tmp_path_factory.mktemp(name.replace(" ", "_"))
        write_data(cwd)
        result = run_cli(*CASES[name][0], cwd=cwd)
        return cwd, result.returncode, result.stderr

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(IN_A_PROCESS, pool.map(one, IN_A_PROCESS), strict=True))


def run_main(overrides, cwd: Path, monkeypatch, capsys) -> tuple[int, str]:
    """A case's command line in this process, beside its data files."""
    write_data(cwd)
    return run_main_stderr(overrides, cwd, monkeypatch, capsys)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line(processes, case, tmp_path, monkeypatch, capsys):
    if case in IN_A_PROCESS:
        cwd, code, stderr = processes[case]
    else:
        cwd = tmp_path
        code, stderr = run_main(CASES[case][0], cwd, monkeypatch, capsys)
    assert code == 2, stderr[-2000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), stderr[-2000:]
    assert "Traceback" not in stderr
    for fragment in CASES[case][1]:
        assert fragment in lines[-1], lines[-1]
    assert not list(cwd.rglob("metrics.json")) and not list(cwd.rglob("predictions.parquet"))
