"""Speed and memory of the scoring path, as ratios of variants measured side by side.

Runs in one process (the memory probes each in a process of their own), interleaving the
variants and taking medians over repeats, on a random LLaVA with LLaVA-1.5's sequence
shape (576 image tokens, its system prompt, ~20-token questions) that a 2-core CPU runs:

    python scripts/bench.py --json outputs/bench.json            # the figures to quote
    python scripts/bench.py --quick                              # under a minute
    python scripts/bench.py --smoke                              # runs, numbers meaningless
    python scripts/bench.py --device cuda --model llava15_7b     # the real model on a GPU
    python scripts/bench.py --grid --json outputs/bench_grid.json # over a grid of shapes
    python scripts/bench.py --crossover                          # the fused paths' crossover

Figures (each a ratio): overhead_ratio (forward with a Q4 system->text redistribution over
a plain SDPA forward), runner_overhead_ratio (the same intervention inside the runner's real
scoring path, prefix sharing and data loading included, over the baseline job's; and
runner_overhead_ratio_system_image, for a rule that also edits the image prefix's rows;
head_selective_overhead_ratio, for Q4 system->text on a handful of heads, intervention.heads;
lens_overhead_ratio, the baseline with the logit lens reading every layer, runtime.lens),
eager_overhead_ratio (the same with impl=eager), speedup_vs_naive
(items/s of the runner's scoring path over a one-item-at-a-time generate() loop with eager
attention everywhere, two questions per image), prefix_sharing_speedup (shared vs whole
prompts, four questions per image), long_context_memory_ratio (peak memory of a forward
whose recipients are a strict subset, at 4,096 tokens, over plain SDPA); on one
LLaVA-NeXT-shaped prompt (672x672 any-res: 35 system, 2,928 image, 20 question tokens, as
embeddings into the language model), long_sequence_overhead_ratio (a Q4 system->text
forward over plain SDPA), long_sequence_padded_overhead_ratio (the same on a left-padded
batch of it and a smaller any-res prompt) and long_sequence_memory_ratio (peak memory, own
processes, like long_context_memory_ratio); generated_tokens_per_second (scoring.mode=generate:
the runner's generation path, generate_items, greedy with the shared image prefix, its
prompt passes and data loading included, baseline) and generation_overhead_ratio (seconds
per generated token with a Q4 system->text redistribution over the baseline's, same items);
stats_seconds_beaf_size (seconds, not a ratio: all statistics of one BEAF-sized job, 26,118
items and 10,000 paired resamples, on one CPU core, in a process of its own:
scripts/bench_stats.py).

--grid measures the runner- and forward-level overheads over a covering array of model and
prompt shapes instead (bench_grid.py: grid_runner_overhead_worst / _median, the same for
system -> image and the forward, and every cell); --crossover times the fused
implementation's spans and rows paths on question-pass calls (fused.choose_path).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import bench_grid
import torch
from bench_stats import ONE_CORE
from PIL import Image
from sweep_sizes import BENCHMARK_ITEMS, PAPER_JOBS, QUARTERS_JOBS
from transformers import AttentionInterface
from transformers.models.llama.modeling_llama import eager_attention_forward

from sysattn_exp.attention.intervention import eager_edited_attention
from sysattn_exp.attention.modality import modality_ids
from sysattn_exp.attention.rules import Redistribution
from sysattn_exp.benchmarks.base import Benchmark, Item
from sysattn_exp.evaluation.generation import generate_items
from sysattn_exp.evaluation.lens import LogitLens
from sysattn_exp.evaluation.scoring import (
    encode_full_prompts,
    plan_batches,
    position_ids,
    score_full_prompts,
    score_items,
)
from sysattn_exp.models.loading import LoadedModel, first_token_ids, use_sysattn
from sysattn_exp.models.prompts import build_prompt

SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions."
)
QUESTIONS = [
    "Is there a red circle in the image?",
    "Is the square on the left green?",
    "Are there two blue triangles here?",
    "Is the yellow shape larger than the car?",
]


def load(args) -> LoadedModel:
    if args.model == "bench":
        from sysattn_exp.models.tiny import build_tiny_llava

        device = torch.device(args.device)
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        model, processor = build_tiny_llava(  # rotary frequencies stay float32
            num_layers=8,
            hidden_size=256,
            num_heads=8,
            num_kv_heads=4,
            image_size=336,
            init_std=0.02,
            max_positions=8192,
            dtype=dtype,
        )
        use_sysattn(model)
        processor.tokenizer.padding_side = "left"
        model.to(device)
        return LoadedModel(model, processor, device, dtype)
    from hydra import compose, initialize_config_module

    from sysattn_exp.models.loading import load_model

    with initialize_config_module("sysattn_exp.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"model={args.model}", f"model.device={args.device}"])
    return load_model(cfg.model)


COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]


def solid_image(image_id: str) -> Image.Image:
    return Image.new("RGB", (400, 300), image_id.split("-")[0])


def bench_items(n_images: int, per_image: int) -> Benchmark:
    """`per_image` questions about each of `n_images` plain images."""
    items = [
        Item(f"{i}-{q}", f"{i}-{q}", f"{COLOURS[i % len(COLOURS)]}-{i}", QUESTIONS[q], q % 2 == 0)
        for i in range(n_images)
        for q in range(per_image)
    ]
    return Benchmark("bench", items, "{question} Please answer yes or no.", solid_image)


def q4(loaded: LoadedModel) -> frozenset[int]:
    depth = loaded.num_layers
    return frozenset(range(3 * depth // 4, depth))


def handful(loaded: LoadedModel) -> tuple[tuple[int, int], ...]:
    """A handful of heads in Q4 (intervention.heads): one in each of its first four layers."""
    heads = loaded.text_config.num_attention_heads
    return tuple((layer, layer % heads) for layer in sorted(q4(loaded))[:4])


def median_seconds(variants: dict, repeats: int) -> dict[str, float]:
    """Each variant once per round, rounds repeated; median wall time per variant."""
    for run in variants.values():  # warm-up
        run()
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def forward_runs(loaded: LoadedModel, inputs: dict, modality, edits: dict) -> dict:
    """One timed run per named edit: a forward with logits at the last position only; an
    edit of None is plain SDPA (the language model switched to it for the call)."""
    model = loaded.model

    def forward(edit):
        def run():
            with torch.inference_mode():
                if edit is not None:
                    model(**inputs, logits_to_keep=1, key_modality=modality, attention_edit=edit)
                    return
                model.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})
                try:
                    model(**inputs, logits_to_keep=1)
                finally:
                    use_sysattn(model)

        return run

    return {name: forward(edit) for name, edit in edits.items()}


def forward_overheads(loaded: LoadedModel, batch_size: int, repeats: int) -> dict:
    bench = bench_items(batch_size, 1)
    prompts = [build_prompt(bench.question_text(i), SYSTEM_PROMPT) for i in bench.items]
    images = [bench.load_image(i.image_id) for i in bench.items]
    inputs, modality = encode_full_prompts(loaded, images, prompts)
    edits = {
        "plain": None,
        "fused": Redistribution("system", ("text",), q4(loaded), "fused"),
        "eager": Redistribution("system", ("text",), q4(loaded), "eager"),
    }
    seconds = median_seconds(forward_runs(loaded, inputs, modality, edits), repeats)
    return {
        "overhead_ratio": seconds["fused"] / seconds["plain"],
        "eager_overhead_ratio": seconds["eager"] / seconds["plain"],
        "forward_seconds": seconds,
        "tokens_per_prompt": int(inputs["attention_mask"].sum(1).float().mean()),
    }


# LLaVA-NeXT's any-res prompt: the 576-token base image, then the crops' 24x24 features
# unpadded into one (24 rows) x (24 cols) grid with a newline token closing each row.
NEXT_SYSTEM_TOKENS, NEXT_QUESTION_TOKENS = 35, 20


def anyres_image_tokens(rows: int, cols: int) -> int:
    """Image tokens of a LLaVA-NeXT prompt whose image is `rows` x `cols` 336-pixel crops:
    2,928 at 672x672 (2 x 2)."""
    return 576 + 24 * rows * (24 * cols + 1)


def long_sequence_inputs(loaded: LoadedModel, image_tokens: list[int], question_tokens: list[int]):
    """Left-padded LLaVA-NeXT-shaped prompts as embeddings (the figure is about the language
    model's attention, so the vision tower is left out): a 35-token system prompt, the
    image tokens, a question; random token ids. Model inputs and (B, N) modality ids."""
    vocab = loaded.model.get_input_embeddings().num_embeddings
    image_id = loaded.image_token_id
    lengths = [
        NEXT_SYSTEM_TOKENS + i + q for i, q in zip(image_tokens, question_tokens, strict=True)
    ]
    ids = torch.randint(
        vocab, (len(lengths), max(lengths)), generator=torch.Generator().manual_seed(0)
    )
    ids = torch.where(ids == image_id, (ids + 1) % vocab, ids)
    mask = torch.zeros_like(ids)
    for row, (n_image, length) in enumerate(zip(image_tokens, lengths, strict=True)):
        start = ids.shape[1] - length
        mask[row, start:] = 1
        ids[row, start + NEXT_SYSTEM_TOKENS : start + NEXT_SYSTEM_TOKENS + n_image] = image_id
    ids, mask = ids.to(loaded.device), mask.to(loaded.device)
    with torch.inference_mode():
        embeds = loaded.model.get_input_embeddings()(ids)
    inputs = {
        "inputs_embeds": embeds,
        "attention_mask": mask,
        "position_ids": position_ids(loaded, ids, mask, {}),
    }
    return inputs, modality_ids(ids, mask, image_id)


def long_sequence_overheads(loaded: LoadedModel, grid: tuple[int, int], repeats: int) -> dict:
    """A Q4 system->text forward over plain SDPA's on one LLaVA-NeXT-shaped prompt (`grid`
    crops), and on a left-padded batch of it and a prompt half its crops and a shorter
    question (any-res prompts of different sizes in one batch)."""
    rows, cols = grid
    one = long_sequence_inputs(loaded, [anyres_image_tokens(rows, cols)], [NEXT_QUESTION_TOKENS])
    padded = long_sequence_inputs(
        loaded,
        [anyres_image_tokens(rows, cols), anyres_image_tokens(rows, max(1, cols // 2))],
        [NEXT_QUESTION_TOKENS, NEXT_QUESTION_TOKENS - 8],
    )
    edits = {"plain": None, "fused": Redistribution("system", ("text",), q4(loaded))}
    runs = {
        f"{name}{suffix}": run
        for suffix, (inputs, modality) in (("", one), ("_padded", padded))
        for name, run in forward_runs(loaded, inputs, modality, edits).items()
    }
    seconds = median_seconds(runs, repeats)
    return {
        "long_sequence_overhead_ratio": seconds["fused"] / seconds["plain"],
        "long_sequence_padded_overhead_ratio": seconds["fused_padded"] / seconds["plain_padded"],
        "long_sequence_tokens": one[1].shape[1],
        "long_sequence_seconds": seconds,
    }


# generate() refuses unknown kwargs, so the naive loop hands the edit over in a global, as
# hook-based research code does.
NAIVE: dict = {}


def naive_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """How typical research code does it: eager attention everywhere, the edit on the
    materialised weights in the chosen layers."""
    edit = NAIVE.get("edit")
    if edit is not None and module.layer_idx in edit.layers:
        visible = (
            None if attention_mask is None else attention_mask == 0
        )  # eager masks are additive
        out = eager_edited_attention(query, key, value, visible, scaling, NAIVE["modality"], edit)
        return out.transpose(1, 2).contiguous(), None
    return eager_attention_forward(
        module, query, key, value, attention_mask, scaling, dropout, **kwargs
    )


AttentionInterface.register("naive_eager", naive_attention)


def naive_scores(loaded: LoadedModel, bench: Benchmark, prompts, edit, words):
    """One item at a time through generate(max_new_tokens=1) with eager attention."""
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionMaskInterface.register("naive_eager", eager_mask)
    model = loaded.model
    model.set_attn_implementation({"text_config": "naive_eager", "vision_config": "sdpa"})
    try:
        for item, prompt in zip(bench.items, prompts, strict=True):
            image = bench.load_image(item.image_id)
            inputs, modality = encode_full_prompts(loaded, [image], [prompt])
            inputs.pop("position_ids")  # generate() numbers the positions itself
            NAIVE.update(edit=edit, modality=modality)
            out = model.generate(
                **inputs,
                max_new_tokens=1,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
            )
            scores = out.scores[0][0].float()
            _ = scores[words[0]].logsumexp(0) > scores[words[1]].logsumexp(0)
    finally:
        NAIVE.clear()
        use_sysattn(model)


def answer_words(loaded: LoadedModel, prompt: str) -> tuple[list[int], list[int]]:
    """The yes and no token ids as they follow the vicuna prompt (models.first_token_ids)."""
    tokenizer = loaded.processor.tokenizer
    return (
        first_token_ids(tokenizer, ["Yes", "yes"], "yes", prompt),
        first_token_ids(tokenizer, ["No", "no"], "no", prompt),
    )


def throughput(
    loaded: LoadedModel, n_images: int, batch_size: int, repeats: int, workers: int
) -> dict:
    edit = Redistribution("system", ("text",), q4(loaded))
    two = bench_items(n_images, 2)
    two_prompts = [build_prompt(two.question_text(i), SYSTEM_PROMPT) for i in two.items]
    words = answer_words(loaded, two_prompts[0])
    four = bench_items(n_images, 4)
    four_prompts = [build_prompt(four.question_text(i), SYSTEM_PROMPT) for i in four.items]
    plan = plan_batches([i.image_id for i in four.items], batch_size)

    def unshared():
        for batch in plan:
            images = [four.load_image(four.items[j].image_id) for j in batch]
            score_full_prompts(loaded, images, [four_prompts[j] for j in batch], edit, *words)

    variants = {
        "runner_two": lambda: score_items(
            loaded, two, two_prompts, edit, words, batch_size, workers, "runner"
        ),
        "naive_two": lambda: naive_scores(loaded, two, two_prompts, edit, words),
        "shared_four": lambda: score_items(
            loaded, four, four_prompts, edit, words, batch_size, 0, "shared"
        ),
        "unshared_four": unshared,
    }
    seconds = median_seconds(variants, repeats)
    return {
        "speedup_vs_naive": seconds["naive_two"] / seconds["runner_two"],
        "prefix_sharing_speedup": seconds["unshared_four"] / seconds["shared_four"],
        "items_per_second": len(two.items) / seconds["runner_two"],
        "throughput_seconds": seconds,
    }


def runner_overheads(
    loaded: LoadedModel, n_images: int, batch_size: int, repeats: int, workers: int
) -> dict:
    """Items per second of the runner's real scoring path (score_items: data loading, the
    shared image prefix, the question pass) with a Q4 intervention over the baseline's, on
    the same items, two questions per image: the cost a job really pays."""
    two = bench_items(n_images, 2)
    prompts = [build_prompt(two.question_text(i), SYSTEM_PROMPT) for i in two.items]
    words = answer_words(loaded, prompts[0])
    edits = {
        "baseline": None,
        "system_text": Redistribution("system", ("text",), q4(loaded)),
        "system_image": Redistribution("system", ("image",), q4(loaded)),
        "system_text_heads": Redistribution("system", ("text",), q4(loaded), heads=handful(loaded)),
    }
    runs = {
        name: lambda edit=edit: score_items(
            loaded, two, prompts, edit, words, batch_size, workers, "runner"
        )
        for name, edit in edits.items()
    }
    # The logit lens on (every layer's reading kept); off, the path above reads no state.
    runs["baseline_lens"] = lambda: score_items(
        loaded, two, prompts, None, words, batch_size, workers, "runner", lens=LogitLens(loaded)
    )
    seconds = median_seconds(runs, repeats)
    return {
        "runner_overhead_ratio": seconds["system_text"] / seconds["baseline"],
        "lens_overhead_ratio": seconds["baseline_lens"] / seconds["baseline"],
        "runner_overhead_ratio_system_image": seconds["system_image"] / seconds["baseline"],
        "head_selective_overhead_ratio": seconds["system_text_heads"] / seconds["baseline"],
        "runner_items": len(two.items),
        "runner_seconds": seconds,
    }


def generation_overheads(
    loaded: LoadedModel, n_images: int, batch_size: int, repeats: int, workers: int, tokens: int
) -> dict:
    """Generated tokens per second of the runner's generation path (generate_items, up to
    `tokens` new tokens per item, two questions per image), baseline; and the seconds per
    generated token with a Q4 system->text redistribution over the baseline's. Per token,
    because a random model may stop (EOS) after different numbers of tokens per variant."""
    two = bench_items(n_images, 2)
    prompts = [build_prompt(two.question_text(i), SYSTEM_PROMPT) for i in two.items]
    edits = {"baseline": None, "system_text": Redistribution("system", ("text",), q4(loaded))}
    generated = {}

    def run(name):
        generated[name] = generate_items(
            loaded, two, prompts, edits[name], tokens, batch_size, workers, "generate"
        ).new_tokens

    seconds = median_seconds({name: lambda name=name: run(name) for name in edits}, repeats)
    per_token = {name: seconds[name] / max(generated[name], 1) for name in edits}
    return {
        "generated_tokens_per_second": 1 / per_token["baseline"],
        "generation_overhead_ratio": per_token["system_text"] / per_token["baseline"],
        "generation_items": len(two.items),
        "generation_new_tokens": generated,
        "generation_seconds": seconds,
    }


def peak_memory_probe(args) -> None:
    """In a fresh process: the peak memory one forward adds (printed), at `--tokens` of a
    LLaVA-1.5 prompt or (`--shape next`) on a 672x672 LLaVA-NeXT-shaped prompt."""
    loaded = load(args)
    if args.shape == "next":
        rows, cols = args.next_grid
        inputs, modality = long_sequence_inputs(
            loaded, [anyres_image_tokens(rows, cols)], [NEXT_QUESTION_TOKENS]
        )
    else:
        inputs, modality = llava15_probe_inputs(loaded, args.tokens)
    edit = Redistribution("system", ("text",), q4(loaded)) if args.memory_probe == "lse" else None
    if edit is None:
        loaded.model.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})
    kwargs = {} if edit is None else {"key_modality": modality, "attention_edit": edit}
    before = reset_peak(loaded.device)
    with torch.inference_mode():
        loaded.model(**inputs, logits_to_keep=1, **kwargs)
    print(json.dumps({"peak_bytes": read_peak(loaded.device) - before}))


def llava15_probe_inputs(loaded: LoadedModel, tokens: int):
    """One LLaVA-1.5 prompt cut to `tokens`: its image, then a long filler question."""
    image = Image.new("RGB", (400, 300), "red")
    filler = " ".join(["the red circle is next to the square"] * tokens)
    prompt = build_prompt(filler, SYSTEM_PROMPT)
    inputs = loaded.processor(images=[image], text=[prompt], return_tensors="pt")
    inputs = {k: v[:, :tokens] if k != "pixel_values" else v for k, v in inputs.items()}
    inputs = {k: v.to(loaded.device) for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
    modality = modality_ids(inputs["input_ids"], inputs["attention_mask"], loaded.image_token_id)
    return inputs, modality


def reset_peak(device) -> int:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident set (VmHWM)
    return proc_status_kb("VmRSS") * 1024


def read_peak(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return proc_status_kb("VmHWM") * 1024


def proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


# A fixed mmap threshold makes glibc return every large freed block to the system at once,
# so the resident-set peak follows live memory instead of the allocator's caching.
PROBE_ENV = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def probe_peaks(args, *shape: str) -> dict[str, int]:
    """Peak bytes of a plain SDPA forward and of a fused-path one, each in its own process
    (`--memory-probe`; `shape` adds the probe's shape options)."""
    peaks = {}
    for variant in ("plain", "lse"):
        command = [sys.executable, __file__, "--memory-probe", variant, *shape]
        command += ["--device", args.device, "--model", args.model, "--next-grid", *grid(args)]
        output = subprocess.run(
            command, capture_output=True, text=True, check=True, env=PROBE_ENV
        ).stdout
        peaks[variant] = json.loads(output.strip().splitlines()[-1])["peak_bytes"]
    return peaks


def stats_seconds(repeats: int) -> dict[str, float]:
    """stats_seconds_beaf_size (scripts/bench_stats.py), in its own process on one BLAS /
    OpenMP thread: the figure the issue bounds is one core's."""
    command = [sys.executable, str(Path(__file__).with_name("bench_stats.py"))]
    output = subprocess.run(
        [*command, "--repeats", str(repeats)],
        capture_output=True,
        text=True,
        check=True,
        env=os.environ | ONE_CORE,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def grid(args) -> list[str]:
    return [str(n) for n in args.next_grid]


def long_context_memory(args) -> dict:
    peaks = probe_peaks(args, "--tokens", str(args.tokens))
    return {
        "long_context_memory_ratio": peaks["lse"] / peaks["plain"],
        "long_context_peak_bytes": peaks,
    }


def long_sequence_memory(args) -> dict:
    peaks = probe_peaks(args, "--shape", "next")
    return {
        "long_sequence_memory_ratio": peaks["lse"] / peaks["plain"],
        "long_sequence_peak_bytes": peaks,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and items (< 1 min)")
    parser.add_argument(
        "--smoke", action="store_true", help="every figure once, on small inputs (a test)"
    )
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--model", default="bench", help="bench (random, built in code) or a conf/model name"
    )
    parser.add_argument("--memory-probe", choices=["plain", "lse"], help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, default=4096, help=argparse.SUPPRESS)
    parser.add_argument(
        "--shape", choices=["llava15", "next"], default="llava15", help=argparse.SUPPRESS
    )
    parser.add_argument("--next-grid", type=int, nargs=2, default=[2, 2], help=argparse.SUPPRESS)
    parser.add_argument(
        "--grid",
        action="store_true",
        help="only the overhead over the grid of shapes (bench_grid.py; with --quick: 2 cells)",
    )
    parser.add_argument(
        "--cells",
        type=int,
        nargs="+",
        help="with --grid: only these cells of the full grid (numbered from 1, as printed)",
    )
    parser.add_argument(
        "--cell-shape",
        nargs="+",
        action="append",
        metavar="AXIS=LEVEL",
        help="with --grid: measure this shape instead of the grid's cells, every axis given "
        "(depth=24 heads=16 kv_heads=2 head_dim=96 image_tokens=1156 questions=3 "
        "question_tokens=25 batch=4); may be repeated",
    )
    parser.add_argument(
        "--crossover",
        action="store_true",
        help="only the spans vs rows paths' times per call shape (fused.choose_path)",
    )
    args = parser.parse_args()
    try:
        args.cell_shape = [bench_grid.parse_shape(words) for words in args.cell_shape or []]
    except ValueError as error:
        parser.error(str(error))
    if args.grid or args.crossover:
        return grid_main(args)
    if args.smoke:  # LLaVA-NeXT with no crops (631 tokens); 1,024-token memory probe
        args.quick, args.next_grid, args.tokens = True, [0, 1], 1024
    if args.memory_probe:
        return peak_memory_probe(args)
    torch.manual_seed(0)
    loaded = load(args)
    repeats, n_images = (1, 2) if args.smoke else (3, 4) if args.quick else (7, 8)
    workers = max(0, min(4, (os.cpu_count() or 1) - 1))
    figures = {
        "device": str(loaded.device),
        "model": args.model,
        "quick": args.quick,
        "repeats": repeats,
    }
    figures |= forward_overheads(loaded, batch_size=4, repeats=repeats)
    # The full run scores 64 items per variant (32 images), as a small benchmark job would.
    runner_images = n_images if args.quick else 32
    figures |= runner_overheads(loaded, runner_images, 8, repeats, workers)
    figures |= throughput(loaded, n_images, batch_size=8, repeats=repeats, workers=workers)
    new_tokens = 4 if args.smoke else 8  # scoring.max_new_tokens' default: 8
    figures |= generation_overheads(loaded, n_images, 8, repeats, workers, new_tokens)
    figures |= long_context_memory(args)
    # LLaVA-NeXT at 672x672 (2 x 2 crops, 2,983 tokens); --quick: no crops (631 tokens).
    figures |= long_sequence_overheads(loaded, (0, 1) if args.quick else args.next_grid, repeats)
    figures |= long_sequence_memory(args)
    figures |= stats_seconds(repeats)
    total_items = sum(BENCHMARK_ITEMS.values())
    for sweep, jobs in (("quarters", QUARTERS_JOBS), ("paper", PAPER_JOBS)):
        hours = jobs * total_items / figures["items_per_second"] / 3600
        figures[f"{sweep}_sweep_hours_all_six"] = hours
    text = json.dumps(figures, indent=2)
    print(text)
    rate = figures["items_per_second"]
    print(f"{rate:.1f} items/s on {loaded.device}; all six benchmarks hold {total_items} items:")
    for sweep, jobs in (("quarters", QUARTERS_JOBS), ("paper", PAPER_JOBS)):
        hours = figures[f"{sweep}_sweep_hours_all_six"]
        print(f"  +sweep={sweep}: {jobs} evaluations ~ {hours:.1f} h")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


def grid_main(args) -> None:
    """--grid (the covering-array grid of shapes, or --quick's 2 cells) or --crossover."""
    if args.crossover:
        figures = bench_grid.crossover(repeats=3 if args.quick else 7)
    else:
        repeats = 2 if args.quick else 5
        helpers = (answer_words, forward_runs)
        figures = bench_grid.grid(args.quick, repeats, helpers, args.cells, args.cell_shape)
        figures |= {"quick": args.quick, "repeats": repeats}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
