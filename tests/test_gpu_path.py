"""What a GPU run does differently from the CPU suite's float32 runs, checked here as far as
a CPU can show it: the dtype `auto` picks, and float16 scoring; a bf16 load that keeps the
rotary frequencies (and every other float32 buffer transformers keeps) in float32 and
equals the model's own bf16 forward; the answer read in float32; and a device_map's
accelerate hooks on the scoring and generation paths.

What only a multi-device machine shows (scripts/device_check.py): that every index lands
on the device of the tensor it indexes when the layers, the final norm and the output head
sit on different devices. Here every tensor is on the CPU, so a misplaced index cannot
fail; the split below runs the same code through accelerate's hooks."""

import logging
import math

import pandas as pd
import pytest
import torch
import yaml
from cli import run_main
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from test_families import FAMILIES, SYSTEMS, benchmark_of, fmt
from tiny_families import BUILDERS, load_test_processor, save_checkpoint
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

import sysattn_exp.models.loading as models
from sysattn_exp.attention.rules import Redistribution
from sysattn_exp.benchmarks import load_benchmark
from sysattn_exp.errors import UsageError
from sysattn_exp.evaluation.generation import generate_items
from sysattn_exp.evaluation.scoring import encode_full_prompts, score_full_prompts, score_items
from sysattn_exp.experiment.job_yes_no import item_prompts, scoring_words
from sysattn_exp.models.loading import (
    LoadedModel,
    auto_dtype,
    load_model,
    resolve_device,
    resolve_dtype,
    use_sysattn,
)

BF16_UNIT = 2.0**-8
YES, NO = [5, 6], [7]  # any ids: the scores are compared, not interpreted


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.mark.parametrize(
    "capability,want",
    [
        ((9, 0), torch.bfloat16),  # H100, H200
        ((8, 6), torch.bfloat16),  # A10, RTX 30xx
        ((8, 0), torch.bfloat16),  # A100
        ((7, 5), torch.float16),  # T4
        ((7, 0), torch.float16),  # V100
        ((6, 0), torch.float16),  # P100
    ],
)
def test_auto_dtype_is_bfloat16_from_compute_capability_8(capability, want):
    dtype, why = auto_dtype(torch.device("cuda:0"), capability)
    assert dtype == want
    assert f"{capability[0]}.{capability[1]}" in why


def test_auto_dtype_is_float32_off_cuda(caplog):
    assert auto_dtype(torch.device("cpu"), None) == (torch.float32, "cpu device")
    with caplog.at_level(logging.INFO, logger="sysattn_exp.models.loading"):
        assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert "model.dtype=auto: float32 (cpu device)" in caplog.messages


def test_float16_answers_as_float32_on_the_toy_model():
    """float16 (auto's choice on V100 and T4) through the runner's scoring path, the kernels'
    first-use check included: the toy model's held-out decisions under Q4 system->text are
    float32's, and its margins closer to float32's than bf16's (3 more significant bits)."""
    with initialize_config_module("sysattn_exp.conf", version_base="1.3"):
        cfg = compose("config", overrides=["model=toy", "benchmark=toy", "benchmark.split=test"])
    margins = {}
    for dtype in ("float32", "float16", "bfloat16"):
        cfg.model.dtype = dtype
        loaded = load_model(cfg.model)
        bench = load_benchmark(cfg.benchmark)
        prompts = item_prompts(bench, loaded.prompt_format(cfg.model))
        edit = Redistribution("system", ("text",), frozenset({3}))
        words = scoring_words(loaded, cfg.scoring, prompts[0])
        scores = score_items(loaded, bench, prompts, edit, words, 32, 0, "test")
        margins[dtype] = torch.tensor(scores.yes) - torch.tensor(scores.no)
    exact = margins["float32"]
    assert len(exact) == 192 and exact.abs().min() > 0.05, "no knife-edge items to flip"
    assert torch.equal(margins["float16"] > 0, exact > 0)
    fp16_error = (margins["float16"] - exact).abs().max()
    assert 0 < fp16_error < (margins["bfloat16"] - exact).abs().max()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_without_a_gpu_is_a_usage_error():
    with pytest.raises(UsageError, match="model.device=cuda but no CUDA device"):
        resolve_device("cuda")


class ImageOnlyProcessors:
    """AutoProcessor as it behaves on a machine with torchvision (as test_cli_families)."""

    @staticmethod
    def from_pretrained(path, revision=None):
        return load_test_processor(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """name -> a save_pretrained directory of that family's tiny checkpoint (made once)."""
    made = {}

    def get(name):
        if name not in made:
            model, processor = BUILDERS[name](3)
            made[name] = save_checkpoint(model, processor, tmp_path_factory.mktemp(name))
        return made[name]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(models, "AutoProcessor", ImageOnlyProcessors)
        yield get


def tool_load(path, dtype: str, **extra) -> LoadedModel:
    """The model as the runner loads it (models.load_model)."""
    cfg = dict(name_or_path=str(path), revision=None, seed=0, device="cpu", dtype=dtype)
    return load_model(OmegaConf.create(cfg | {"device_map": None} | extra))


def own_load(path, dtype, **kwargs):
    """transformers' own load, nothing of this tool's."""
    vlm = "vision_config" in (path / "config.json").read_text()
    model_class = AutoModelForImageTextToText if vlm else AutoModelForCausalLM
    return model_class.from_pretrained(path, dtype=dtype, **kwargs).eval()


@pytest.mark.parametrize("name", FAMILIES)
def test_bfloat16_load_keeps_the_float32_buffers(checkpoint, name):
    """Loaded in bf16, the parameters are bf16 and every buffer has the dtype and value of
    from_pretrained(dtype=bfloat16)'s: the rotary frequencies float32, equal to a float32
    load's. (Gemma's embed_scale is bf16 there: transformers rounds it on purpose, as the
    original Gemma does.)"""
    path = checkpoint(name)
    tool = tool_load(path, "bfloat16").model
    own = own_load(path, torch.bfloat16)
    full = dict(own_load(path, torch.float32).named_buffers())
    assert {p.dtype for p in tool.parameters()} == {torch.bfloat16}
    buffers, own_buffers = dict(tool.named_buffers()), dict(own.named_buffers())
    assert buffers.keys() == own_buffers.keys()
    for key, buffer in buffers.items():
        assert buffer.dtype == own_buffers[key].dtype, key
        assert torch.equal(buffer, own_buffers[key]), key
    rotary = [key for key in buffers if key.endswith("inv_freq")]
    assert rotary, "every family has rotary frequencies"
    for key in rotary:
        assert buffers[key].dtype == torch.float32, key
        assert torch.equal(buffers[key], full[key]), key


def items_of(loaded):
    """A few items: two questions about one image (a shared prefix) and one without an
    image for a VLM; two questions for a text-only model."""
    bench = benchmark_of(loaded)
    keep = [0, 1, len(bench.items) - 1] if loaded.image_token_id is not None else [0, 1]
    bench.items = [bench.items[j] for j in keep]
    prompts = [
        fmt(loaded, SYSTEMS[j % 2]).render(item.question, item.image_id is not None)
        for j, item in enumerate(bench.items)
    ]
    return bench, prompts


def own_answer_logits(model, loaded, bench, prompts) -> torch.Tensor:
    """(items, V): each whole prompt alone through the model's own forward, last position."""
    rows = []
    for j, item in enumerate(bench.items):
        image = bench.load_image(item.image_id) if item.image_id else None
        inputs, _ = encode_full_prompts(loaded, [image], [prompts[j]], [item.question])
        inputs.pop("position_ids")  # one unpadded prompt: the model numbers it itself
        with torch.no_grad():
            rows.append(model(**inputs).logits[0, -1].float())
    return torch.stack(rows)


@pytest.mark.parametrize("name", FAMILIES)
def test_bfloat16_baseline_equals_the_models_own_forward(checkpoint, name):
    """The tool's bf16 baseline (prefix-shared batches, sysattn's attention, the float32
    answer read) against from_pretrained(dtype=bfloat16)'s own forward, default and eager
    attention. Tolerance 4 bf16 units of the logits' scale: the model's logits are rounded
    to bf16 (half a unit) and two attention implementations round their bf16
    intermediates differently (measured: at most 1 unit on these checkpoints)."""
    path = checkpoint(name)
    loaded = tool_load(path, "bfloat16")
    bench, prompts = items_of(loaded)
    scores = score_items(loaded, bench, prompts, None, (YES, NO), 4, 0, "test")
    got = torch.tensor([scores.yes, scores.no]).T
    for attention in ({}, {"attn_implementation": "eager"}):
        logits = own_answer_logits(
            own_load(path, torch.bfloat16, **attention), loaded, bench, prompts
        )
        want = torch.stack([logits[:, YES].logsumexp(-1), logits[:, NO].logsumexp(-1)], dim=1)
        bound = 4 * BF16_UNIT * max(1.0, logits.abs().max().item())
        assert (got - want).abs().max() <= bound, (attention, (got - want).abs().max(), bound)


@pytest.mark.parametrize("name", FAMILIES)
def test_float32_answer_read_is_the_models_own_logits(checkpoint, name):
    """In float32 the answer read (final norm and head redone on the answer rows) is the
    model's own last-position logits, and p_yes their softmax's yes mass."""
    loaded = tool_load(checkpoint(name), "float32")
    bench, prompts = items_of(loaded)
    images = [bench.load_image(i.image_id) if i.image_id else None for i in bench.items]
    questions = [i.question for i in bench.items]
    for image, prompt, question in zip(images, prompts, questions, strict=True):
        yes, no, p_yes = score_full_prompts(loaded, [image], [prompt], None, YES, NO, [question])
        inputs, key_modality = encode_full_prompts(loaded, [image], [prompt], [question])
        with torch.no_grad():
            logits = loaded.model(**inputs, key_modality=key_modality).logits[:, -1]
        assert yes.item() == pytest.approx(logits[0, YES].logsumexp(-1).item(), abs=1e-5)
        assert no.item() == pytest.approx(logits[0, NO].logsumexp(-1).item(), abs=1e-5)
        want = logits.softmax(-1)[0, YES].sum().item()
        assert p_yes.item() == pytest.approx(want, abs=1e-6)


def reference_read(model, states: torch.Tensor) -> torch.Tensor:
    """(B, V) float64 logits from the final norm's input (B, H): RMSNorm (Gemma's scales by
    1 + weight, the others by weight; eps from the module), the head, Gemma 2's soft cap."""
    norm = model.get_decoder().norm
    x = states.double()
    eps = getattr(norm, "variance_epsilon", None) or norm.eps
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    weight = norm.weight.double()
    x = x * (1 + weight if "Gemma" in type(norm).__name__ else weight)
    logits = x @ model.get_output_embeddings().weight.double().T
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


@pytest.mark.parametrize("name", FAMILIES)
def test_bfloat16_answer_is_read_in_float32(checkpoint, name):
    """In bf16 the yes - no margin is the float32 read of the same bf16 residual stream (the
    final norm's input, captured here by a hook of the test's own): within float32
    rounding of a float64 recomputation, not bf16's steps, which the model's own bf16
    logits would be off by."""
    loaded = tool_load(checkpoint(name), "bfloat16")
    bench, prompts = items_of(loaded)
    images = [bench.load_image(i.image_id) if i.image_id else None for i in bench.items]
    captured, scores = [], []
    norm = loaded.model.get_decoder().norm

    def keep(module, args, output):
        if args[0].dim() == 3:  # the forward's, not the answer read's own (B, H) call
            captured.append(args[0][:, -1])

    handle = norm.register_forward_hook(keep)
    try:
        for image, prompt, item in zip(images, prompts, bench.items, strict=True):
            scores.append(
                score_full_prompts(loaded, [image], [prompt], None, YES, NO, [item.question])
            )
    finally:
        handle.remove()
    states = torch.cat(captured)
    yes, no, p_yes = (torch.cat(s) for s in zip(*scores, strict=True))
    assert states.dtype == torch.bfloat16
    want = reference_read(loaded.model, states)
    margin = want[:, YES].logsumexp(-1) - want[:, NO].logsumexp(-1)
    scale = max(1.0, want.abs().max().item())
    assert ((yes - no).double() - margin).abs().max() <= 1e-5 * scale
    assert (p_yes.double() - want.softmax(-1)[:, YES].sum(-1)).abs().max() <= 1e-6
    rounded = want.to(torch.bfloat16).double()  # what a bf16 head gives, at best
    rounded_margin = rounded[:, YES].logsumexp(-1) - rounded[:, NO].logsumexp(-1)
    # The bound tells the two apart: bf16 logits miss it (by 10x and more here).
    assert (rounded_margin - margin).abs().max() >= 10 * 1e-5 * scale


def split_map(model) -> dict:
    """A device_map (all cpu) with each decoder layer, the final norm, the head and every
    other piece as an entry of its own, as a split over devices has them."""
    decoder = model.get_decoder()
    path = next(name for name, module in model.named_modules() if module is decoder)
    entries, parent = {}, ""
    for part in path.split("."):  # the siblings of each module on the way to the decoder
        module = model.get_submodule(parent.rstrip("."))
        entries |= {parent + name: "cpu" for name, _ in module.named_children() if name != part}
        parent += part + "."
    entries |= {parent + name: "cpu" for name, _ in decoder.named_children() if name != "layers"}
    return entries | {f"{parent}layers.{i}": "cpu" for i in range(len(decoder.layers))}


@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
def test_split_over_accelerate_hooks_gives_the_same_scores(name):
    """The decoder's layers, final norm and head dispatched as separate device_map pieces
    with accelerate's hooks (forced: all on the CPU): scoring (prefix-shared, Q4
    system->text) and generation's first-step scores and tokens equal the unsplit model's."""
    from accelerate import dispatch_model

    def run(split: bool):
        model, processor = BUILDERS[name](3)
        use_sysattn(model)
        getattr(processor, "tokenizer", processor).padding_side = "left"
        if split:
            model = dispatch_model(model, split_map(model), main_device="cpu", force_hooks=True)
            assert hasattr(model.get_decoder().layers[-1], "_hf_hook")
        loaded = LoadedModel(model.eval(), processor, torch.device("cpu"), torch.float32)
        bench, prompts = items_of(loaded)
        layers = frozenset(range(3 * loaded.num_layers // 4, loaded.num_layers))
        edit = Redistribution("system", ("text",), layers)
        scores = score_items(loaded, bench, prompts, edit, (YES, NO), 4, 0, "test")
        generated = generate_items(loaded, bench, prompts, edit, 2, 4, 0, "test", (YES, NO))
        return scores, generated

    (scores, generated), (split_scores, split_generated) = run(False), run(True)
    assert split_scores.yes == pytest.approx(scores.yes, abs=1e-6)
    assert split_scores.p_yes == pytest.approx(scores.p_yes, abs=1e-6)
    assert split_generated.tokens == generated.tokens
    assert split_generated.no == pytest.approx(generated.no, abs=1e-6)
    assert all(math.isfinite(x) for x in split_generated.yes)


def test_device_map_mapping_through_the_cli(tmp_path, monkeypatch, checkpoint):
    """model.device_map given as a mapping that splits the decoder layer by layer (all cpu:
    transformers attaches no hooks on one device, so this checks the mapping's way in, and
    the scores) gives the scores of the unsplit model."""
    path = checkpoint("llava")
    entries = split_map(BUILDERS["llava"](3)[0])
    device_map = "{" + ",".join(f"{k}:{v}" for k, v in entries.items()) + "}"
    scores = {}
    for name, extra in (("one", []), ("split", [f"model.device_map={device_map}"])):
        (tmp_path / name).mkdir()
        status = run_main(
            tmp_path / name,
            monkeypatch,
            f"model.name_or_path={path}",
            "benchmark=toy",
            "benchmark.limit=4",
            "runtime.num_workers=0",
            *extra,
        )
        assert status == 0
        (job,) = (tmp_path / name / "outputs" / "runs").iterdir()
        scores[name] = pd.read_parquet(job / "predictions.parquet")
        config = yaml.safe_load((job / "config.yaml").read_text())
        assert config["model"]["device_map"] == (entries if extra else None)
    assert len(scores["one"]) == 8
    for column in ("yes_logit", "no_logit"):
        assert scores["split"][column].tolist() == pytest.approx(
            scores["one"][column].tolist(), abs=1e-6
        )


def test_builtin_tiny_in_bfloat16_keeps_its_rotary_float32():
    """model=tiny in bf16: parameters rounded from the same float32 draw, buffers as built."""
    cfg = dict(name_or_path=models.BUILTIN_TINY, revision=None, seed=0, device="cpu")
    full = load_model(OmegaConf.create(cfg | {"dtype": "float32"})).model
    half = load_model(OmegaConf.create(cfg | {"dtype": "bfloat16"})).model
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    for (key, a), (_, b) in zip(full.named_parameters(), half.named_parameters(), strict=True):
        assert torch.equal(a.to(torch.bfloat16), b), key
    buffers = dict(half.named_buffers())
    assert any(key.endswith("inv_freq") for key in buffers)
    for key, buffer in full.named_buffers():
        assert buffers[key].dtype == buffer.dtype and torch.equal(buffers[key], buffer), key
