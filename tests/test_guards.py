"""A guarded intervention, through the real command line (in this process, so that a
transformers release that stops passing keyword arguments can be simulated by wrapping
its decoder layer), and the guard's count per forward pass."""

import json
import threading

import mlflow
import pytest
import torch
import yaml
from cli import run_main_stderr
from test_caption_job import write_coco
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from sysattn_exp.attention import kernels
from sysattn_exp.attention.fused import forced_path
from sysattn_exp.attention.intervention import EditNotApplied, watch_edits
from sysattn_exp.attention.modality import SYSTEM, TEXT
from sysattn_exp.attention.rules import Redistribution
from sysattn_exp.models.loading import use_sysattn

JOB = ("model=tiny", "intervention=redistribute", "layers=q4", "benchmark.limit=2")


def drop_the_edit(monkeypatch, when) -> None:
    """Fault injection: transformers' Llama decoder layer stops passing attention_edit on
    to attention in the calls `when(layer, hidden_states)` picks."""
    forward = LlamaDecoderLayer.forward

    def forgetful(self, hidden_states, *args, **kwargs):
        if when(self, hidden_states):
            kwargs.pop("attention_edit", None)
        return forward(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(LlamaDecoderLayer, "forward", forgetful)


FAULTS = {  # a release that drops the keyword: (where, scoring mode, what the line says)
    "every layer": (lambda layer, h: True, "logit", "applied in decoder layers [], not"),
    "one layer": (
        lambda layer, h: layer.self_attn.layer_idx == 3,
        "logit",
        "decoder layers [3] of 0-7 never received it",
    ),
    "decoding steps": (  # the prompt passes keep it: only generation's cached steps drop it
        lambda layer, h: h.shape[1] == 1,
        "generate",
        "applied in decoder layers [], not the resolved [6, 7]",
    ),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_an_edit_that_does_not_reach_the_layers_stops_the_job(fault, tmp_path, monkeypatch, capsys):
    when, mode, said = FAULTS[fault]
    drop_the_edit(monkeypatch, when)
    code, stderr = run_main_stderr(
        (
            *JOB,
            f"scoring.mode={mode}",
            "scoring.max_new_tokens=3",
            f"runtime.cache_dir={tmp_path / 'cache'}",
        ),
        tmp_path,
        monkeypatch,
        capsys,
    )
    assert code == 2, stderr[-2000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: intervention system->text: "), lines[-1]
    assert said in lines[-1] and "attention_edit" in lines[-1]
    assert "Traceback" not in stderr
    assert not list(tmp_path.rglob("metrics.json"))


def test_the_guarded_job_reports_its_layers_kernels_and_environment(tmp_path, monkeypatch, capsys):
    """The normal path: edited_layers is the resolved count (8 layers, q4: 6 and 7), also
    when a rerun takes every score from the cache; kernel_path names the CPU kernel;
    config.yaml and the MLflow run (a real SQLite store) hold the environment."""
    cache = f"runtime.cache_dir={tmp_path / 'cache'}"
    for _ in range(2):
        with forced_path("spans"):  # the kernels' path (the tiny model's calls take rows)
            code, stderr = run_main_stderr((*JOB, cache), tmp_path, monkeypatch, capsys)
        assert code == 0, stderr[-2000:]
    first, again = sorted((tmp_path / "outputs" / "runs").iterdir())
    for job, from_cache in ((first, 0), (again, 4)):
        metrics = json.loads((job / "metrics.json").read_text())
        config = yaml.safe_load((job / "config.yaml").read_text())
        assert config["layers"]["resolved"] == [6, 7]
        assert metrics["edited_layers"] == 2 and metrics["n_items_from_cache"] == from_cache
        assert metrics["kernel_path"] == "cpu_flash"
        environment = config["environment"]
        assert environment["torch"] == str(torch.__version__)
        assert environment["device_name"] == "cpu" and environment["cuda_capability"] is None
        assert set(environment) >= {"python", "transformers", "kernel_verdicts"}
        assert "cpu_flash cpu float32 causal head_dim=16: used" in environment["kernel_verdicts"]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    (run,) = mlflow.search_runs(experiment_names=["sysattn"], output_format="list")
    params = run.data.params
    assert params["environment.torch"] == str(torch.__version__)
    assert params["environment.device_name"] == "cpu"
    assert "cpu_flash cpu float32" in params["environment.kernel_verdicts"]
    assert params["kernel_path"] == "cpu_flash" and run.data.metrics["edited_layers"] == 2


def run_with_cpu_kernel(name, function, tmp_path, monkeypatch, capsys) -> tuple[int, str]:
    """(exit code, stderr) of JOB with `function` the only float32 kernel for the CPU
    (verdicts cleared, a score cache under tmp_path)."""
    kernel = kernels.Kernel(name, function, frozenset({torch.float32}), accepts_mask=True)
    monkeypatch.setitem(kernels.KERNELS, "cpu", [kernel])
    monkeypatch.setattr(kernels, "_verdicts", {})
    with forced_path("spans"):  # the path that uses kernels (the rows path has none)
        return run_main_stderr(
            (*JOB, f"runtime.cache_dir={tmp_path / 'cache'}"), tmp_path, monkeypatch, capsys
        )


def test_out_of_memory_in_attention_is_one_line(tmp_path, monkeypatch, capsys):
    """A kernel that runs out of memory: exit 2 and the hint to lower model.batch_size."""

    def out_of_memory(q, k, v, bias, scaling, is_causal):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB\nmore")

    code, stderr = run_with_cpu_kernel("oom", out_of_memory, tmp_path, monkeypatch, capsys)
    assert code == 2, stderr[-2000:]
    last = [line for line in stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: out of memory in attention on cpu float32 (")
    assert "lower model.batch_size (CUDA out of memory. Tried to allocate 9.00 GiB)" in last
    assert "Traceback" not in stderr and kernels._verdicts == {}


def text_pass(model, edit):
    """One forward of the language model over 2 x 7 tokens (system, then text)."""
    ids = torch.randint(5, 90, (2, 7), generator=torch.Generator().manual_seed(0))
    modality = torch.tensor([[SYSTEM] * 3 + [TEXT] * 4] * 2)
    with torch.inference_mode():
        model.model(input_ids=ids, key_modality=modality, attention_edit=edit)


def test_the_count_is_per_pass_and_per_thread(gqa_llava):
    """Each pass is counted where it runs: a pass in another thread is not in this
    thread's tally, and a pass whose layers were not edited stops there."""
    model, _ = gqa_llava
    use_sysattn(model)
    edit = Redistribution("system", ("text",), frozenset({1, 4}))
    with watch_edits() as tally:
        worker = threading.Thread(target=text_pass, args=(model, edit))
        worker.start()
        worker.join()
        assert tally.passes == 0 and tally.edited_layers is None
        text_pass(model, edit)
        text_pass(model, edit)
    assert tally.passes == 2 and tally.edited_layers == 2
    beyond = Redistribution("system", ("text",), frozenset({4, 9}))  # the model has 6 layers
    with pytest.raises(EditNotApplied, match=r"applied in decoder layers \[4\], not the resolved"):
        text_pass(model, beyond)
    text_pass(model, None)  # no edit: nothing to check, and the failed pass left no state
    with watch_edits() as tally:
        text_pass(model, edit)
    assert tally.passes == 1


def test_a_caption_job_is_guarded_and_reports_its_layers(tmp_path, monkeypatch, capsys):
    """+task=caption generates through the same guard: the count in its metrics (each call
    a few rows: the rows path), and a decoder layer that drops the edit stops it with one
    line."""
    data = write_coco(tmp_path / "coco")
    job = (
        "+task=caption",
        f"caption.data_dir={data}",
        "caption.limit=2",
        "caption.max_new_tokens=2",
        "model=tiny",
        "intervention=redistribute",
        "layers=q4",
        f"runtime.cache_dir={tmp_path / 'cache'}",
    )
    code, stderr = run_main_stderr(job, tmp_path, monkeypatch, capsys)
    assert code == 0, stderr[-2000:]
    (done,) = (tmp_path / "outputs" / "runs").iterdir()
    metrics = json.loads((done / "metrics.json").read_text())
    assert metrics["edited_layers"] == 2 and metrics["kernel_path"] == "rows"
    assert "environment" in yaml.safe_load((done / "config.yaml").read_text())
    drop_the_edit(monkeypatch, lambda layer, h: True)
    code, stderr = run_main_stderr(job, tmp_path, monkeypatch, capsys)
    assert code == 2 and "Traceback" not in stderr
    last = [line for line in stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: intervention system->text: applied in decoder layers []")


def test_a_rejected_kernel_shows_in_kernel_path(tmp_path, monkeypatch, capsys):
    """A CPU kernel that disagrees with the math path: the job's scores come from the math
    path, kernel_path says so, and the job's log warns that this is not the planned path
    (the one the score cache's condition names)."""

    def scaled(q, k, v, bias, scaling, is_causal):
        out, lse = kernels.cpu_flash(q, k, v, bias, scaling, is_causal)
        return out * 1.1, lse

    code, stderr = run_with_cpu_kernel("k0", scaled, tmp_path, monkeypatch, capsys)
    assert code == 0, stderr[-2000:]
    (job,) = (tmp_path / "outputs" / "runs").iterdir()
    assert json.loads((job / "metrics.json").read_text())["kernel_path"] == "math"
    conditions = (tmp_path / "cache").glob("*/condition.json")
    assert {json.loads(c.read_text())["kernel_path"] for c in conditions} == {"sdpa", "k0"}
    log = "".join(path.read_text() for path in job.glob("*.log"))
    assert "attention computed by math, not the planned k0" in log
    environment = yaml.safe_load((job / "config.yaml").read_text())["environment"]
    assert "k0 cpu float32 causal head_dim=16: rejected" in environment["kernel_verdicts"]
