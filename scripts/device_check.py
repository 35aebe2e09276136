"""One command that checks a GPU box: kernels, exactness, batch invariance, speed, memory.

    PYTHONPATH=. python scripts/device_check.py --json outputs/device_check.json
    python scripts/device_check.py --small --json /tmp/dc.json     # CPU, reduced (the tests)

Needs only torch, transformers (with its own tokenizers, PyYAML, safetensors), accelerate and
Pillow: no Hydra, MLflow, datasets, pandas. No install, no download: the models are the
presets' real architectures with random weights (model.weights=random, from the config.json
files shipped in sysattn_exp/models/model_configs), so the numbers the models produce are
meaningless, while shapes, memory and time are real. Target: under 8 minutes on one
H200-class GPU.

Sections (each in the JSON; an error in one is recorded there and the others still run):
- kernels: for bfloat16, float16 and float32, every candidate fused kernel (sysattn_exp/
  kernels.py) against the float32 math path on real-size spans (576 and 2,900 keys, head
  dim 128, grouped-query attention as fused.py lays it out, causal and not, with and without
  left padding): supported or not, the error against its bound on the whole inputs, and the
  verdict of the runtime's own first-use check (on a slice). A kernel the first-use check
  accepts while the whole inputs disagree is an exactness failure.
- exactness: a full-width, full-depth LLaVA-1.5-7B-shaped random model. float32: sysattn's
  baseline against the unmodified model (plain SDPA), and every rule of the paper grid
  (conf/condition/*.yaml) fused against eager, largest yes/no logit difference <= 1e-4.
  bfloat16 (the same weights, rounded): the bf16 noise is the largest margin change of the
  unmodified model from float32 to bfloat16; for every rule, bf16 fused decisions agree with
  float32's on >= 99% of the items whose float32 margin exceeds that noise. Rotary: every
  buffer that construction makes float32 is still float32 after load_model in bfloat16, and
  inv_freq equals the float32 model's. device_map: a full-width 4-layer model split over
  cuda:0 and the CPU scores and generates as the same weights on one device (CUDA only).
- batch_invariance: 64 items at batch sizes 1, 8 and 32, bfloat16 and float32, with prefix
  sharing (score_items) and without (whole prompts): the largest logit difference from
  batch size 1 and the decisions that flip; torch.use_deterministic_algorithms' cost.
- speed: items/s of the runner's scoring path (score_items) for the baseline and Q4
  system->text (the runner-level overhead ratio; target <= 1.05), generated tokens/s, peak
  memory per batch size and the largest batch that fits for the 7B and 13B presets, and the
  estimated hours of +sweep=quarters and +sweep=paper over the six benchmarks.

Exit status 1 if an exactness check failed or could not run, else 0. --small runs the same
code on the CPU at reduced depth and width (and smaller spans), in about a minute.
"""

import argparse
import gc
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

# Deterministic cuBLAS needs its workspace fixed before CUDA starts; harmless otherwise.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's package, without installing it
sys.path.insert(0, str(ROOT / "scripts"))  # sweep_sizes, also when run with runpy

import torch  # noqa: E402
import transformers  # noqa: E402
import yaml  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from sweep_sizes import BENCHMARK_ITEMS, PAPER_JOBS, QUARTERS_JOBS  # noqa: E402
from transformers.integrations.sdpa_attention import repeat_kv  # noqa: E402

from sysattn_exp.attention import kernels  # noqa: E402
from sysattn_exp.attention.rules import Redistribution  # noqa: E402
from sysattn_exp.evaluation.generation import generate_items  # noqa: E402
from sysattn_exp.evaluation.scoring import plan_batches, score_full_prompts, score_items  # noqa: E402
from sysattn_exp.experiment.conditions import build_edit, intervention_rule, resolve_layers  # noqa: E402
from sysattn_exp.models import loading as models  # noqa: E402
from sysattn_exp.models import random_weights  # noqa: E402

CONF = ROOT / "sysattn_exp" / "conf"
LLAVA_7B = "llava15_7b"
FLOAT32_TOLERANCE = 1e-4  # largest |yes/no logit difference| allowed in float32
AGREEMENT = 0.99  # bf16 decisions that must agree with float32's, above the bf16 noise
QUESTIONS = ["Is there a red circle in the image?", "Is the shape on the left green?"]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "cyan"]
# --small: the same code at reduced depth and width (vocabulary and image size as shipped).
SMALL_OVERRIDES = {
    "text_config": {
        "num_hidden_layers": 4,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "vision_config": {
        "num_hidden_layers": 1,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 2,
    },
}


class Settings(dict):
    """A model config as load_model reads it (attribute access and .get), from plain YAML."""

    def __getattr__(self, key: str):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def preset_settings(preset: str, **changes) -> Settings:
    """conf/model/<preset>.yaml over the presets it extends (its defaults list), with
    weights=random and `changes`."""
    data = yaml.safe_load((CONF / "model" / f"{preset}.yaml").read_text())
    merged = {}
    for parent in data.pop("defaults", []):
        if parent != "_self_":
            merged |= preset_settings(parent)
    return Settings(merged | data | {"weights": "random"} | changes)


@dataclass(frozen=True)
class CheckItem:
    item_id: str
    group_id: str
    image_id: str
    question: str
    label: bool


class CheckBenchmark:
    """What score_items and generate_items read of a benchmark (name, items, question_text,
    load_image), without the benchmarks package (it needs omegaconf and pandas): `n_images`
    640x480 scenes, `per_image` questions each."""

    def __init__(self, n_images: int, per_image: int):
        self.name = "device_check"
        self.items = [
            CheckItem(f"{i}-{q}", f"{i}", f"{COLOURS[i % len(COLOURS)]}-{i}", QUESTIONS[q], q == 0)
            for i in range(n_images)
            for q in range(per_image)
        ]

    def question_text(self, item: CheckItem) -> str:
        return f"{item.question} Please answer yes or no."

    def load_image(self, image_id: str) -> Image.Image:
        colour, index = image_id.split("-")
        image = Image.new("RGB", (640, 480), "white")
        offset = 7 * int(index) % 200
        ImageDraw.Draw(image).ellipse((40 + offset, 60, 400 + offset, 420), fill=colour)
        return image


@dataclass
class Setup:
    device: torch.device
    small: bool
    n_grid_images: int  # paper-grid exactness: 2 questions per image
    n_invariance_images: int  # batch invariance: 2 questions per image
    batch_sizes: tuple
    spans: tuple  # keys of the kernel cases
    heads: tuple  # (query heads, KV heads, head dim) of the kernel cases
    memory_batches: tuple
    repeats: int = 3  # speed: interleaved rounds, medians
    new_tokens: int = 16  # speed: generated per item

    def overrides(self):
        return SMALL_OVERRIDES if self.small else None


def release() -> None:
    models._LOADED.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load(setup: Setup, preset: str, dtype: str, **changes) -> models.LoadedModel:
    cfg = preset_settings(
        preset,
        device=str(setup.device),
        dtype=dtype,
        config_overrides=setup.overrides(),
        **changes,
    )
    return models.load_model(cfg)


def words(loaded) -> tuple[list[int], list[int]]:
    tok = loaded.tokenizer
    return (
        models.first_token_ids(tok, ["Yes", "yes"], "yes"),
        models.first_token_ids(tok, ["No", "no"], "no"),
    )


def prompts_for(loaded, bench: CheckBenchmark, preset: str = LLAVA_7B) -> list[str]:
    fmt = models.prompt_format(preset_settings(preset), loaded.processor, "llava")
    return [fmt.render(bench.question_text(item)) for item in bench.items]


def scores(loaded, bench, prompts, edit, batch_size: int) -> torch.Tensor:
    """(N, 2) yes and no logits of every item, through the runner's scoring path."""
    out = score_items(loaded, bench, prompts, edit, words(loaded), batch_size, 0, "check", None)
    return torch.tensor([out.yes, out.no], dtype=torch.float64).T


def unmodified_scores(loaded, bench, prompts, batch_size: int) -> torch.Tensor:
    """The same with the language model's attention plain SDPA (no sysattn at all)."""
    model = loaded.model
    sub_configs = getattr(model.config, "sub_configs", {}) or {}
    model.set_attn_implementation({name: "sdpa" for name in sub_configs} or "sdpa")
    try:
        return scores(loaded, bench, prompts, None, batch_size)
    finally:
        models.use_sysattn(model)


def unshared_scores(loaded, bench, prompts, edit, batch_size: int) -> torch.Tensor:
    """Whole prompts, no prefix sharing, in the runner's batches."""
    yes_ids, no_ids = words(loaded)
    rows = [None] * len(prompts)
    for batch in plan_batches([i.image_id for i in bench.items], batch_size):
        images = [bench.load_image(bench.items[j].image_id) for j in batch]
        yes, no, _ = score_full_prompts(
            loaded, images, [prompts[j] for j in batch], edit, yes_ids, no_ids
        )
        for row, j in enumerate(batch):
            rows[j] = (float(yes[row]), float(no[row]))
    return torch.tensor(rows, dtype=torch.float64)


def largest(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def decisions(s: torch.Tensor) -> torch.Tensor:
    return s[:, 0] > s[:, 1]


def margins(s: torch.Tensor) -> torch.Tensor:
    return s[:, 0] - s[:, 1]


# ---------------------------------------------------------------------------- paper grid


def paper_grid(depth: int) -> list[tuple[str, object]]:
    """(condition name, edit) for every conf/condition/*.yaml the paper sweep globs, as Hydra
    composes it: the intervention and layers options it overrides, then its own keys."""
    grid = []
    for path in sorted((CONF / "condition").glob("*.yaml")):
        if path.stem.startswith("no-"):  # the prompt ablations: paper.yaml excludes them
            continue
        condition = yaml.safe_load(path.read_text()) or {}
        groups = {"intervention": "none", "layers": "all"}
        for entry in condition.get("defaults", []):
            for key, option in entry.items():
                groups[key.removeprefix("override ").removeprefix("/")] = option
        sections = {}
        for group, option in groups.items():
            base = yaml.safe_load((CONF / group / f"{option}.yaml").read_text()) or {}
            sections[group] = Settings(base | (condition.get(group) or {}))
        rule = intervention_rule(sections["intervention"])
        layers = resolve_layers(sections["layers"], depth) if rule else []
        grid.append((path.stem, build_edit(rule, layers)))
    return grid


def with_impl(edit, impl: str):
    from dataclasses import replace

    return edit if edit is None else replace(edit, impl=impl)


# ---------------------------------------------------------------------------- sections


def kernel_section(setup: Setup) -> dict:
    """Every candidate kernel of this device type against the math path."""
    heads, kv_heads, dim = setup.heads
    n_rep = heads // kv_heads
    candidates = kernels.KERNELS.get(setup.device.type, [])
    cases, failures = [], []
    gen = torch.Generator(device=setup.device).manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for keys in setup.spans:
            for causal in (False, True):
                for padded in (False, True):
                    case = kernel_case(
                        setup, candidates, dtype, keys, causal, padded, (kv_heads, n_rep, dim), gen
                    )
                    cases.append(case)
                    failures += [
                        f"{k}: first-use check accepts, whole inputs disagree ({case['name']})"
                        for k, v in case["kernels"].items()
                        if v.get("first_use_accepts") and v.get("agrees") is False
                    ]
    accepted = sorted(
        {k for c in cases for k, v in c["kernels"].items() if v.get("first_use_accepts")}
    )
    return {
        "candidates": [k.name for k in candidates],
        "accepted_somewhere": accepted,
        "cases": cases,
        "failures": failures,
    }


def kernel_case(setup, candidates, dtype, keys, causal, padded, shape, gen) -> dict:
    kv_heads, n_rep, dim = shape
    device, batch = setup.device, 2
    rows = keys if causal else 40  # causal: the span's own square block; else a question
    q = torch.randn(batch, kv_heads * n_rep, rows, dim, generator=gen, device=device).to(dtype)
    k = torch.randn(batch, kv_heads, keys, dim, generator=gen, device=device).to(dtype)
    v = torch.randn(batch, kv_heads, keys, dim, generator=gen, device=device).to(dtype)
    if causal:  # fused.grouped_attention_with_lse: K and V repeated per query head
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    else:  # query heads of a group folded into the rows
        q = q.reshape(batch, kv_heads, n_rep * rows, dim)
    mask = None
    if padded:  # the second sequence left-padded by 17 positions
        mask = torch.ones(batch, 1, q.shape[2], keys, dtype=torch.bool, device=device)
        mask[1, :, :, :17] = False
    bias = None
    if mask is not None:
        bias = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, -math.inf)
    scaling = dim**-0.5
    args = (q, k, v, bias, scaling, causal)
    want = kernels.attention_with_lse_math(*args)
    name = (
        f"{str(dtype).removeprefix('torch.')} keys={keys} "
        f"{'causal' if causal else 'full'}{' padded' if padded else ''}"
    )
    results = {}
    for kernel in candidates:
        if not kernel.supports(q, k, v, mask, causal):
            results[kernel.name] = {"supported": False}
            continue
        entry = {"supported": True}
        try:
            got = kernel.run(*args)
            problem = kernels.disagreement(got, want, v)
            entry |= {"agrees": problem is None, "problem": problem}
        except torch.OutOfMemoryError:
            raise
        except Exception as error:  # a build without it, a changed signature
            entry |= {"agrees": False, "problem": f"failed: {str(error).splitlines()[0]}"}
        verdict = kernels.first_use_check(kernel, kernels.call_kind(kernel, q, mask, causal), *args)
        entry["first_use_accepts"] = verdict
        results[kernel.name] = entry
    return {"name": name, "kernels": results}


def exactness_section(setup: Setup) -> dict:
    out = {"checks": {}}
    checks = out["checks"]
    bench = CheckBenchmark(setup.n_grid_images, 2)
    f32 = load(setup, LLAVA_7B, "float32")
    prompts = prompts_for(f32, bench)
    tokens = f32.processor(
        images=[[bench.load_image(bench.items[0].image_id)]], text=prompts[:1], return_tensors="pt"
    )["input_ids"]
    out["prompt_tokens"] = int(tokens.shape[1])
    out["image_tokens"] = int((tokens == f32.image_token_id).sum())
    out["depth"] = f32.num_layers
    out["hidden_size"] = f32.text_config.hidden_size
    batch = 8
    grid = paper_grid(f32.num_layers)
    out["rules_in_grid"] = len([e for _, e in grid if e is not None])
    if setup.small:  # one rule of each kind: redistributions from each source, scale, PAI
        grid = [(n, e) for n, e in grid if n.endswith("_q4") or n in ("image-x2_all", "pai")]
    f32_ref = unmodified_scores(f32, bench, prompts, batch)
    f32_base = scores(f32, bench, prompts, None, batch)
    difference = largest(f32_base, f32_ref)
    checks["float32 baseline vs unmodified"] = passed_at(difference, FLOAT32_TOLERANCE)
    f32_rules = {}
    for name, edit in grid:
        if edit is None:
            continue
        fused = scores(f32, bench, prompts, with_impl(edit, "fused"), batch)
        eager = scores(f32, bench, prompts, with_impl(edit, "eager"), batch)
        f32_rules[name] = fused
        checks[f"float32 {name} fused vs eager"] = passed_at(
            largest(fused, eager), FLOAT32_TOLERANCE
        )

    state = {k: v for k, v in f32.model.state_dict().items()}
    inv_freq32 = {n: b.clone() for n, b in f32.model.named_buffers() if n.endswith("inv_freq")}
    del f32
    release()
    bf16 = load(setup, LLAVA_7B, "bfloat16")
    checks["bfloat16 load keeps float32 buffers"] = float32_buffers_kept(bf16, inv_freq32)
    bf16.model.load_state_dict(state)  # the float32 weights, rounded
    del state
    bf16_ref = unmodified_scores(bf16, bench, prompts, batch)
    noise = float((margins(bf16_ref) - margins(f32_ref)).abs().max())
    out["bf16_noise"] = noise
    agreement = {}
    for name, edit in grid:
        if edit is None:
            continue
        got = scores(bf16, bench, prompts, with_impl(edit, "fused"), batch)
        want = f32_rules[name]
        decisive = margins(want).abs() > noise
        n = int(decisive.sum())
        agree = int((decisions(got) == decisions(want))[decisive].sum())
        rate = agree / n if n else None
        agreement[name] = {"decisive_items": n, "agreeing": agree}
        checks[f"bfloat16 {name} decisions"] = {
            "passed": rate is None or rate >= AGREEMENT,
            "value": rate,
            "bound": AGREEMENT,
            "decisive_items": n,
        }
    out["bf16_agreement"] = agreement
    out["rules"] = len([e for _, e in grid if e is not None])
    del bf16
    release()
    checks["device_map cuda:0 + cpu"] = device_map_check(setup)
    return out


def passed_at(value: float, bound: float) -> dict:
    return {"passed": bool(value <= bound), "value": value, "bound": bound}


def float32_buffers_kept(loaded, inv_freq32: dict) -> dict:
    """Every buffer construction makes float32 (on meta, in bfloat16: what from_pretrained
    builds) is float32 in the loaded model; inv_freq equals the float32 model's."""
    meta = random_weights.build_on_meta(loaded.model.config, torch.bfloat16)
    want = {n: b.dtype for n, b in meta.named_buffers() if b.dtype == torch.float32}
    got = dict(loaded.model.named_buffers())
    cast = sorted(n for n in want if got[n].dtype != torch.float32)
    changed = sorted(
        n for n, b in inv_freq32.items() if not torch.equal(got[n].cpu(), b.cpu().to(got[n].dtype))
    )
    return {
        "passed": not cast and not changed and bool(want),
        "float32_buffers": len(want),
        "cast": cast,
        "inv_freq_changed": changed,
    }


def device_map_check(setup: Setup) -> dict:
    """A full-width 4-layer model split by device_map over cuda:0 and the CPU (float32;
    transformers and accelerate offload the CPU part and run it on the GPU) scores and
    generates as the same weights on cuda:0 alone (built with the same map, so initialised
    on the same devices, then moved)."""
    # Without CUDA (--small) both halves are on the CPU: the same code, no split.
    gpu = 0 if setup.device.type == "cuda" else "cpu"
    overrides = setup.overrides() or {"text_config": {"num_hidden_layers": 4}}
    lm = "model.language_model"
    split = {
        "model.vision_tower": gpu,
        "model.multi_modal_projector": gpu,
        f"{lm}.embed_tokens": gpu,
        f"{lm}.rotary_emb": gpu,
        f"{lm}.layers.0": gpu,
        f"{lm}.layers.1": gpu,
        f"{lm}.layers.2": "cpu",
        f"{lm}.layers.3": "cpu",
        f"{lm}.norm": "cpu",
        "lm_head": "cpu",
    }
    device = setup.device
    cfg = preset_settings(
        LLAVA_7B, device=str(device), dtype="float32", config_overrides=overrides, device_map=split
    )
    spread = models.load_model(cfg)
    config = random_weights.build_config(LLAVA_7B, overrides)
    model = random_weights.build_model(config, torch.float32, device, cfg.seed, split, False)
    model.to(device)
    models.use_sysattn(model)
    whole = models.LoadedModel(model, spread.processor, device, torch.float32)
    bench = CheckBenchmark(2, 2)
    prompts = prompts_for(whole, bench)
    edit = Redistribution("system", ("text",), frozenset({2, 3}))
    result = {}
    for name, e in (("baseline", None), ("system->text", edit)):
        result[name] = largest(
            scores(spread, bench, prompts, e, 4), scores(whole, bench, prompts, e, 4)
        )
    generated = [
        generate_items(loaded, bench, prompts, edit, 4, 4, 0, "generate").tokens
        for loaded in (spread, whole)
    ]
    del spread, whole, model
    release()
    worst = max(result.values())
    return {
        "passed": worst <= FLOAT32_TOLERANCE and generated[0] == generated[1],
        "devices": "cuda:0 + cpu" if gpu == 0 else "cpu only: the placement code, no split",
        "value": worst,
        "bound": FLOAT32_TOLERANCE,
        "by_rule": result,
        "same_generations": generated[0] == generated[1],
    }


def invariance_section(setup: Setup) -> dict:
    bench = CheckBenchmark(setup.n_invariance_images, 2)
    out = {"items": len(bench.items), "batch_sizes": list(setup.batch_sizes)}
    for dtype in ("bfloat16", "float32"):
        loaded = load(setup, LLAVA_7B, dtype)
        prompts = prompts_for(loaded, bench)
        for sharing, run in (("shared", scores), ("unshared", unshared_scores)):
            by_size = {b: run(loaded, bench, prompts, None, b) for b in setup.batch_sizes}
            first = by_size[setup.batch_sizes[0]]
            out[f"{dtype} {sharing}"] = {
                str(b): {
                    "largest_logit_difference": largest(s, first),
                    "decision_flips": int((decisions(s) != decisions(first)).sum()),
                }
                for b, s in by_size.items()
            }
        if dtype == "bfloat16":
            out["deterministic"] = deterministic_cost(loaded, bench, prompts, setup)
        del loaded
        release()
    return out


def deterministic_cost(loaded, bench, prompts, setup) -> dict:
    """Seconds of one bf16 pass at the middle batch size with
    torch.use_deterministic_algorithms on over off, and whether two runs agree bit for bit
    either way (a run-to-run check, on this machine only)."""
    size = setup.batch_sizes[len(setup.batch_sizes) // 2]
    result = {}
    for mode in (False, True):
        torch.use_deterministic_algorithms(mode, warn_only=True)
        try:
            runs, seconds = [], []
            for _ in range(2):
                started = time.perf_counter()
                runs.append(scores(loaded, bench, prompts, None, size))
                seconds.append(time.perf_counter() - started)
            result["on" if mode else "off"] = {
                "seconds": min(seconds),
                "repeatable": bool(torch.equal(runs[0], runs[1])),
            }
        finally:
            torch.use_deterministic_algorithms(False)
    result["cost_ratio"] = result["on"]["seconds"] / result["off"]["seconds"]
    return result


def speed_section(setup: Setup) -> dict:
    loaded = load(setup, LLAVA_7B, "bfloat16" if setup.device.type == "cuda" else "float32")
    bench = CheckBenchmark(max(2, setup.n_invariance_images // 2), 2)
    prompts = prompts_for(loaded, bench)
    batch = 8
    depth = loaded.num_layers
    q4 = Redistribution("system", ("text",), frozenset(range(3 * depth // 4, depth)))
    seconds = {"baseline": [], "system->text q4": []}
    for _ in range(setup.repeats):  # interleaved, medians
        for name, edit in (("baseline", None), ("system->text q4", q4)):
            out = score_items(loaded, bench, prompts, edit, words(loaded), batch, 0, "speed")
            seconds[name].append(out.seconds)
    median = {k: statistics.median(v) for k, v in seconds.items()}
    items_per_second = len(prompts) / median["baseline"]
    generated = generate_items(loaded, bench, prompts, None, setup.new_tokens, batch, 0, "gen")
    out = {
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "batch_size": batch,
        "items": len(prompts),
        "items_per_second": items_per_second,
        "items_per_second_q4": len(prompts) / median["system->text q4"],
        "runner_overhead_ratio": median["system->text q4"] / median["baseline"],
        "generated_tokens_per_second": generated.new_tokens / generated.seconds,
    }
    total = sum(BENCHMARK_ITEMS.values())
    for sweep, jobs in (("quarters", QUARTERS_JOBS), ("paper", PAPER_JOBS)):
        out[f"{sweep}_hours_all_six"] = jobs * total / items_per_second / 3600
    del loaded
    release()
    out["memory"] = {preset: memory_by_batch(setup, preset) for preset in (LLAVA_7B, "llava15_13b")}
    return out


def memory_by_batch(setup: Setup, preset: str) -> dict:
    """Peak memory of one scoring batch per batch size (one question per image, the
    runner's path), up to the first that does not fit."""
    if setup.device.type != "cuda":
        return {"skipped": "peak memory is measured on CUDA only"}
    loaded = load(setup, preset, "bfloat16")
    weights = torch.cuda.memory_allocated()
    peaks, largest_fitting = {}, None
    for size in setup.memory_batches:
        bench = CheckBenchmark(size, 1)
        prompts = prompts_for(loaded, bench, preset)
        torch.cuda.reset_peak_memory_stats()
        try:
            score_items(loaded, bench, prompts, None, words(loaded), size, 0, "memory")
        except torch.OutOfMemoryError:
            peaks[str(size)] = "out of memory"
            break
        peaks[str(size)] = torch.cuda.max_memory_allocated() / 2**30
        largest_fitting = size
    total = torch.cuda.get_device_properties(setup.device).total_memory / 2**30
    del loaded
    release()
    return {
        "weights_gib": weights / 2**30,
        "peak_gib_by_batch": peaks,
        "largest_batch_tried_that_fits": largest_fitting,
        "device_gib": total,
    }


def environment(setup: Setup) -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(setup.device),
        "small": setup.small,
    }
    if setup.device.type == "cuda":
        props = torch.cuda.get_device_properties(setup.device)
        env |= {
            "device_name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": props.total_memory / 2**30,
            "bf16_supported": torch.cuda.is_bf16_supported(),
            "cuda": torch.version.cuda,
        }
    return env


# ---------------------------------------------------------------------------- driver


def make_setup(args) -> Setup:
    if args.small:
        torch.set_num_threads(1)  # tiny matrices: threads only contend (as the tests run)
        return Setup(
            torch.device(args.device or "cpu"),
            True,
            n_grid_images=1,
            n_invariance_images=2,
            batch_sizes=(1, 2, 4),
            spans=(96, 290),
            heads=(4, 2, 32),
            memory_batches=(1, 2),
            repeats=1,
            new_tokens=4,
        )
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return Setup(
        device,
        False,
        n_grid_images=8,
        n_invariance_images=32,
        batch_sizes=(1, 8, 32),
        spans=(576, 2900),
        heads=(32, 8, 128),
        memory_batches=(1, 8, 16, 32, 64, 128),
    )


def failures_of(report: dict) -> list[str]:
    failed = list(report.get("kernels", {}).get("failures", []))
    for name, check in report.get("exactness", {}).get("checks", {}).items():
        if not check.get("passed"):
            failed.append(f"exactness: {name}")
    if "exactness" in report.get("errors", {}):
        failed.append("exactness: could not run (see errors)")
    return failed


def summary(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"device check on {env.get('device_name', env['device'])}: torch {env['torch']}, "
        f"transformers {env['transformers']}" + (" (--small)" if env["small"] else "")
    ]
    ker = report.get("kernels")
    if ker:
        lines.append(
            f"kernels: candidates {ker['candidates']}, accepted by the first-use check in "
            f"some case: {ker['accepted_somewhere'] or 'none'}"
        )
        lines += [f"  {line}" for line in kernel_lines(ker["cases"])]
    ex = report.get("exactness")
    if ex:
        checks = ex["checks"]
        ok = sum(c["passed"] for c in checks.values())
        worst32 = max(
            (c["value"] for n, c in checks.items() if n.startswith("float32") and "value" in c),
            default=None,
        )
        lines.append(
            f"exactness ({ex['depth']} layers x {ex['hidden_size']}, {ex['prompt_tokens']} "
            f"tokens, {ex['image_tokens']} image): {ok}/{len(checks)} checks passed; "
            f"{ex['rules']} of {ex['rules_in_grid']} rules; float32 worst {worst32:.2e}; "
            f"bf16 noise {ex['bf16_noise']:.3g}"
        )
        dm = checks.get("device_map cuda:0 + cpu", {})
        lines.append(f"  device_map ({dm.get('devices')}): {dm.get('passed')}, {dm.get('value')}")
        rot = checks.get("bfloat16 load keeps float32 buffers", {})
        lines.append(f"  bf16 load keeps float32 buffers: {rot.get('passed')} {rot.get('cast')}")
    inv = report.get("batch_invariance")
    if inv:
        for key, by_size in inv.items():
            if isinstance(by_size, dict) and key.split(" ")[0] in ("bfloat16", "float32"):
                cells = ", ".join(
                    f"b{b}: {v['largest_logit_difference']:.2g}/{v['decision_flips']} flips"
                    for b, v in by_size.items()
                )
                lines.append(f"batch invariance {key}: {cells}")
        det = inv.get("deterministic")
        if det:
            lines.append(f"  deterministic algorithms cost x{det['cost_ratio']:.2f}")
    sp = report.get("speed")
    if sp:
        lines.append(
            f"speed ({sp['dtype']}, batch {sp['batch_size']}): {sp['items_per_second']:.2f} "
            f"items/s, Q4 system->text ratio {sp['runner_overhead_ratio']:.3f} (target <= "
            f"1.05), {sp['generated_tokens_per_second']:.1f} generated tokens/s; quarters "
            f"{sp['quarters_hours_all_six']:.1f} h, paper {sp['paper_hours_all_six']:.1f} h"
        )
        for preset, mem in sp.get("memory", {}).items():
            if "skipped" in mem:
                continue
            peaks = ", ".join(
                f"{b}: {p:.1f}" if isinstance(p, float) else f"{b}: {p}"
                for b, p in mem["peak_gib_by_batch"].items()
            )
            lines.append(
                f"  {preset} peak GiB by batch {peaks}; largest fitting "
                f"{mem['largest_batch_tried_that_fits']}"
            )
    for section, error in report.get("errors", {}).items():
        lines.append(f"ERROR in {section}: {error.splitlines()[-1]}")
    failed = report["failures"]
    lines.append("PASSED" if not failed else f"FAILED: {'; '.join(failed[:5])}")
    return "\n".join(lines)


def kernel_lines(cases: list[dict]) -> list[str]:
    """Per dtype and kernel: in how many cases it was supported, agreed with the math path
    on the whole inputs, and was accepted by its first-use check."""
    lines = []
    for dtype in ("bfloat16", "float16", "float32"):
        mine = [c for c in cases if c["name"].startswith(dtype)]
        parts = []
        for kernel in dict.fromkeys(k for c in mine for k in c["kernels"]):
            results = [c["kernels"][kernel] for c in mine]
            supported = [r for r in results if r["supported"]]
            agree = sum(bool(r.get("agrees")) for r in supported)
            accepted = sum(bool(r.get("first_use_accepts")) for r in supported)
            parts.append(
                f"{kernel} supported {len(supported)}/{len(results)}, agrees {agree}, "
                f"accepted {accepted}"
            )
        lines.append(f"{dtype}: {'; '.join(parts) or 'math path only'}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=Path("outputs/device_check.json"))
    parser.add_argument("--small", action="store_true", help="CPU, reduced depth and width")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument(
        "--sections",
        default="kernels,exactness,batch_invariance,speed",
        help="comma-separated subset to run",
    )
    args = parser.parse_args()
    # Random weights answer with any token: scoring's per-call warning that the likeliest
    # token is no yes/no token says nothing here and would bury the summary.
    logging.getLogger("sysattn_exp.evaluation.scoring").setLevel(logging.ERROR)
    setup = make_setup(args)
    report = {"environment": environment(setup), "errors": {}, "seconds": {}}
    sections = {
        "kernels": lambda: kernel_section(setup),
        "exactness": lambda: exactness_section(setup),
        "batch_invariance": lambda: invariance_section(setup),
        "speed": lambda: speed_section(setup),
    }
    for name in args.sections.split(","):
        started = time.perf_counter()
        try:
            report[name] = sections[name]()
        except Exception:  # recorded; the other sections still run
            report["errors"][name] = traceback.format_exc()
        finally:
            release()
        report["seconds"][name] = time.perf_counter() - started
        print(f"[device check] {name}: {report['seconds'][name]:.0f} s", file=sys.stderr)
    report["failures"] = failures_of(report)
    report["passed"] = not report["failures"]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(summary(report))
    print(f"(full results: {args.json})")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
