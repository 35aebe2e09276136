"""Every family through the command line, from a save_pretrained directory: the family is
detected from config.json, the prompt rendered by its chat template, and one job scores the
baseline, Q4 system->text and the attention profile. (In this process, so that the
processors that need torchvision's video processor can be swapped for their image-only
stand-ins: the one thing patched.)"""

import json

import mlflow
import pandas as pd
import pytest
import yaml
from cli import read_metrics, run_main
from conftest import make_image
from tiny_families import BUILDERS, load_test_processor, save_checkpoint

import sysattn_exp.models.loading

RECORDS = [
    {"id": "a1", "group": "a", "image": "red.png", "question": "Is it red?", "answer": "yes"},
    {"id": "a2", "group": "a", "image": "blue.png", "question": "Is it red?", "answer": "no"},
    {"id": "b1", "group": "b", "image": "blue.png", "question": "Blue?", "answer": "yes"},
    {"id": "b2", "group": "b", "image": "red.png", "question": "Blue?", "answer": "no"},
]


class ImageOnlyProcessors:
    """AutoProcessor as it behaves on a machine with torchvision, for the tiny checkpoints."""

    @staticmethod
    def from_pretrained(path, revision=None):
        return load_test_processor(path)


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    """One MLflow store for the module: creating one costs seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlruns.db"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    make_image("red", (40, 40)).save(root / "red.png")
    make_image("blue", (64, 30)).save(root / "blue.png")
    with_images = "\n".join(json.dumps(r) for r in RECORDS) + "\n"
    (root / "images.jsonl").write_text(with_images)
    text_only = [{k: v for k, v in r.items() if k != "image"} for r in RECORDS]
    (root / "text.jsonl").write_text("\n".join(json.dumps(r) for r in text_only) + "\n")
    return root


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_family_through_the_cli(workspace, tracking_uri, tmp_path, monkeypatch, name):
    model, processor = BUILDERS[name](0)
    checkpoint = save_checkpoint(model, processor, tmp_path / name)
    monkeypatch.setattr(sysattn_exp.models.loading, "AutoProcessor", ImageOnlyProcessors)
    vlm = getattr(model.config, "image_token_id", None) is not None
    data = workspace / ("images.jsonl" if vlm else "text.jsonl")
    # One family loads through from_pretrained's device_map=auto (accelerate's placement),
    # the path of a model too large for one GPU. This machine has one device, the CPU, so
    # the whole model lands on it: spreading over several devices is for a machine that
    # has them (tests/test_gpu_path.py, scripts/device_check.py).
    device_map = ["model.device_map=auto"] if name == "llama" else []
    status = run_main(
        tmp_path,
        monkeypatch,
        f"model.name_or_path={checkpoint}",
        "model.system_prompt=null",
        "benchmark=jsonl",
        f"benchmark.path={data}",
        "intervention=redistribute",
        "layers=q4",
        "+task=profile",
        "runtime.num_workers=0",
        f"tracking.uri={tracking_uri}",
        *device_map,
    )
    assert status == 0
    (job,) = (tmp_path / "outputs" / "runs").iterdir()
    config = yaml.safe_load((job / "config.yaml").read_text())
    loading = [
        line for line in (job / "sysattn.log").read_text().splitlines() if " loading " in line
    ]
    # The loader got the map (transformers places the weights by it; with one device there
    # is nothing to dispatch, so the model has no hf_device_map to inspect).
    assert config["model"]["device_map"] == ("auto" if device_map else None)
    assert len(loading) == 1 and f" on {'auto' if device_map else 'cpu'} as " in loading[0]
    metrics = read_metrics(job)
    depth = model.config.get_text_config().num_hidden_layers
    assert metrics["n_items"] == 4 and "baseline_paired_accuracy" in metrics
    predictions = pd.read_parquet(job / "predictions.parquet")
    rendered = load_test_processor(checkpoint).apply_chat_template
    if name != "llava":  # LLaVA-1.5 keeps the paper's vicuna prompt
        message = [{"role": "user", "content": "Is it red?"}]
        if vlm:
            message[0]["content"] = [{"type": "image"}, {"type": "text", "text": "Is it red?"}]
        assert predictions["prompt"][0] == rendered(
            message, add_generation_prompt=True, tokenize=False
        )
    profile = pd.read_csv(job / "attention_profile.csv")
    answer = profile[profile["queries"] == "answer"]
    assert sorted(answer["layer"]) == list(range(depth))
    # Q4 system->text: no system attention left in the last quarter.
    q4 = answer[answer["layer"] >= 3 * depth // 4]
    assert (q4["system"].abs() < 1e-6).all() and (q4["text"] > 0).all()
    if not vlm:
        assert (answer["image"] == 0).all()
    mlflow.set_tracking_uri(tracking_uri)
    (run,) = mlflow.search_runs(
        experiment_names=["sysattn"],
        filter_string=f"params.`model.name_or_path` = '{checkpoint}'",
        output_format="list",
    )
    q4_layers = range(3 * depth // 4, depth)
    assert run.data.params["layers.resolved"] == ",".join(map(str, q4_layers))


def test_quarters_sweep_by_the_models_own_depth(workspace, tracking_uri, tmp_path, monkeypatch):
    """+sweep=quarters on a 6-layer text-only LM: quarters [0,1), [1,3), [3,4), [4,6)."""
    model, tokenizer = BUILDERS["qwen2"](0)
    assert model.config.num_hidden_layers == 6
    checkpoint = save_checkpoint(model, tokenizer, tmp_path / "qwen2")
    status = run_main(
        tmp_path,
        monkeypatch,
        "+sweep=quarters",
        "intervention.recipients=[text]",
        f"model.name_or_path={checkpoint}",
        "benchmark=jsonl",
        f"benchmark.path={workspace / 'text.jsonl'}",
        "runtime.num_workers=0",
        f"tracking.uri={tracking_uri}",
    )
    assert status == 0
    (sweep,) = (tmp_path / "outputs" / "multiruns").iterdir()
    resolved = sorted(
        tuple(yaml.safe_load((job / "config.yaml").read_text())["layers"]["resolved"])
        for job in sweep.glob("job*")
    )
    assert resolved == [(0,), (1, 2), (3,), (4, 5)]


def last_error_line(capsys) -> str:
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    return [line for line in stderr.splitlines() if line.strip()][-1]


def test_models_that_cannot_run_are_one_clear_line(tmp_path, monkeypatch, capsys):
    from transformers import PaliGemmaConfig

    PaliGemmaConfig().save_pretrained(tmp_path / "paligemma")  # a VLM family not handled
    status = run_main(tmp_path, monkeypatch, f"model.name_or_path={tmp_path / 'paligemma'}")
    line = last_error_line(capsys)
    assert status == 2 and "'paligemma' model" in line and "qwen2_vl" in line, line
    checkpoint = save_checkpoint(*BUILDERS["llama"](0), tmp_path / "llama")
    status = run_main(tmp_path, monkeypatch, f"model.name_or_path={checkpoint}", "benchmark=toy")
    line = last_error_line(capsys)
    assert status == 2 and "text-only" in line and "without image" in line, line
    assert not list(tmp_path.rglob("metrics.json"))


@pytest.mark.parametrize("name", ["idefics3", "qwen3"])
def test_dry_run_shows_the_split(workspace, tmp_path, monkeypatch, capsys, name):
    """runtime.dry_run prints the configured model's token counts per modality, without
    loading its weights; the counts are those of the real forward's key_modality."""
    model, processor = BUILDERS[name](0)
    checkpoint = save_checkpoint(model, processor, tmp_path / name)
    monkeypatch.setattr(sysattn_exp.models.loading, "AutoProcessor", ImageOnlyProcessors)
    vlm = name != "qwen3"
    status = run_main(
        tmp_path,
        monkeypatch,
        f"model.name_or_path={checkpoint}",
        "benchmark=jsonl",
        f"benchmark.path={workspace / ('images.jsonl' if vlm else 'text.jsonl')}",
        "runtime.dry_run=true",
    )
    assert status == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("tokens for"))
    counts = dict(part.split("=") for part in line.split(": ")[1].split(", "))
    assert int(counts["system"]) >= 2 and int(counts["text"]) >= 3
    assert (int(counts["image"]) > 16) == vlm  # Idefics3's tiles and markers: one span
