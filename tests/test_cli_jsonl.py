"""benchmark=jsonl on a checkpoint saved with save_pretrained, loaded through the real
from_pretrained / AutoProcessor path, checked against a plain forward of that checkpoint."""

import json

import pandas as pd
import pytest
import torch
from cli import read_metrics, run_cli
from conftest import make_image
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from sysattn_exp.models.prompts import build_prompt

RECORDS = [
    {"id": "a1", "group": "a", "image": "img/red.png", "question": "Is it red?", "answer": "yes"},
    {"id": "a2", "group": "a", "image": "img/blue.png", "question": "Is it red?", "answer": "no"},
    {
        "id": "b1",
        "group": "b",
        "image": "img/blue.png",
        "question": "Is the shape blue?",
        "answer": "Yes",
    },
    {
        "id": "b2",
        "group": "b",
        "image": "img/green.png",
        "question": "Is the shape blue?",
        "answer": "no",
    },
    {"id": "c1", "group": "c", "image": "img/green.png", "question": "Green?", "answer": "yes"},
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, gqa_llava):
    root = tmp_path_factory.mktemp("jsonl")
    model, processor = gqa_llava
    model.save_pretrained(root / "ckpt")
    processor.save_pretrained(root / "ckpt")
    (root / "data" / "img").mkdir(parents=True)
    for colour in ("red", "blue", "green"):
        make_image(colour).save(root / "data" / "img" / f"{colour}.png")
    lines = "\n".join(json.dumps(r) for r in RECORDS) + "\n"
    (root / "data" / "pairs.jsonl").write_text(lines)
    return root


def run_jsonl(workspace, *extra):
    result = run_cli(
        f"model.name_or_path={workspace / 'ckpt'}",
        "benchmark=jsonl",
        f"benchmark.path={workspace / 'data' / 'pairs.jsonl'}",
        "model.batch_size=2",
        "model.system_prompt=",
        *extra,
        cwd=workspace,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return max((workspace / "outputs" / "runs").iterdir())


def next_token_ids(tokenizer, prompt: str, spellings: list[str]) -> list[int]:
    """The first token after `prompt` of each spelling that does not merge into the
    prompt's last token: the tokens a model emits to start that word there."""
    start = tokenizer(prompt).input_ids
    ids = set()
    for spelling in spellings:
        whole = tokenizer(prompt + spelling).input_ids
        if whole[: len(start)] == start:
            ids.add(whole[len(start)])
    return sorted(ids)


def test_baseline_logits_equal_a_plain_forward(workspace):
    job = run_jsonl(workspace)
    predictions = pd.read_parquet(job / "predictions.parquet")
    assert predictions["item_id"].tolist() == [r["id"] for r in RECORDS]
    assert predictions["label"].tolist() == [True, False, True, False, True]
    model = LlavaForConditionalGeneration.from_pretrained(
        workspace / "ckpt", attn_implementation="sdpa"
    )
    processor = AutoProcessor.from_pretrained(workspace / "ckpt")
    for record, row in zip(RECORDS, predictions.itertuples(), strict=True):
        prompt = build_prompt(record["question"], "")
        assert row.prompt == prompt == f"USER: <image>\n{record['question']} ASSISTANT:"
        image = Image.open(workspace / "data" / record["image"]).convert("RGB")
        with torch.no_grad():
            logits = model(**processor(images=[image], text=[prompt], return_tensors="pt")).logits[
                0, -1
            ]
        yes_ids = next_token_ids(processor.tokenizer, prompt, ["Yes", "yes", " Yes", " yes"])
        assert row.yes_logit == pytest.approx(torch.logsumexp(logits[yes_ids], 0).item(), abs=1e-4)
    metrics = read_metrics(job)
    assert metrics["n_items"] == 5 and metrics["n_groups"] == 3
    assert metrics["gt_yes_rate"] == pytest.approx(3 / 5)
    assert "baseline_paired_accuracy" not in metrics


def test_intervention_on_a_local_checkpoint(workspace):
    job = run_jsonl(
        workspace,
        "intervention=redistribute",
        "intervention.source=image",
        "intervention.recipients=[system,text]",
        "layers.start=2",
        "layers.end=5",
    )
    metrics = read_metrics(job)
    assert "baseline_paired_accuracy" in metrics and "paired_accuracy_change_points" in metrics
    config = (job / "config.yaml").read_text()
    assert "resolved:\n  - 2\n  - 3\n  - 4\n" in config
