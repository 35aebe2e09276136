"""The intervention's cost over a grid of model and prompt shapes (bench.py --grid), and the
crossover between the fused implementation's two paths (bench.py --crossover).

The grid's axes (issue 22): depth, query heads, KV heads, head dim, image tokens,
questions per image, question length, batch size. Their full factorial is 864 shapes, far
beyond a 2-core CPU, so the grid is a strength-2 covering array: every level of every axis
and every pair of levels of any two axes occurs in some cell (built greedily, see
covering_array), plus CORNERS, the shapes expected to cost the most.

Per cell, on a random LLaVA of that attention shape at reduced width (hidden size 128,
MLP 256: the attention is the shape's, the rest is narrow so that the CPU runs it, which
makes attention's share, and so any overhead in it, larger than in a real model):
- runner-level: the same items through the runner's real scoring path (score_items: the
  shared system + image prefix pass per image, the question pass), baseline job vs Q4
  system -> text and vs Q4 system -> image (which edits the image rows of the prefix);
- forward-level: one forward of whole prompts (a batch of the cell's size, one question
  each), Q4 system -> text fused over plain SDPA.
At ~2,900 image tokens a run scores one image and the forward takes one prompt
(images_per_run, forward_batch): the batch axis then sets model.batch_size only.
The runner-level variants are interleaved round by round (one warm-up round), then the
forward-level ones (measure_cell says why apart), and each figure is the ratio of medians
over the repeats. A fourth runner-level variant is the baseline job again, an A/A control:
its ratio to the baseline (runner_noise) is what the same work measures as on this machine
in this cell, the noise floor against which an overhead of a few percent is read (on a
shared 2-core VM a single-threaded matmul loop's CPU time alone moves by +-8% from second
to second). Short cells get more rounds (MIN_SECONDS).
- attributable: the rule's own cost, without that noise: the system -> text job's edited
  attention calls timed with the rule and without it, many times each, summed over the
  job and divided by the baseline job's time (attributable_overhead).
`--cell-shape` measures shapes of one's own instead of the grid's (parse_shape).

What keeps the ratios stable on a shared machine: the grid runs torch on one thread with
data loading in the process (num_workers 0), and its headline ratios are of process CPU
time. A single-threaded process's CPU time counts the work it did, not the time it spent
descheduled while other processes ran, which is what moves wall-time ratios by +-5% here
(README Performance); with two threads, OpenMP's spin-waiting would count instead. Wall-time
ratios are reported beside them (`*_wall`).
"""

import itertools
import math
import statistics
import time

import torch

from sysattn_exp.attention import fused
from sysattn_exp.attention.rules import Redistribution
from sysattn_exp.benchmarks.base import Benchmark, Item
from sysattn_exp.evaluation.scoring import encode_full_prompts, score_items
from sysattn_exp.models.loading import LoadedModel, use_sysattn
from sysattn_exp.models.prompts import build_prompt

AXES = {
    "depth": (8, 16, 32),
    "heads": (8, 32),
    "kv_heads": ("1", "4", "=heads"),
    "head_dim": (64, 128),
    "image_tokens": (576, 2916),  # 336 and 756 pixels in 14-pixel patches
    "questions": (1, 2, 4),
    "question_tokens": (10, 40),
    "batch": (1, 8),
}
# The shapes expected to cost the most: the question pass's share is largest with many
# long questions per image, a short prefix, many heads without grouping (the runner-level
# worst); per-call overhead is largest with one short question per batch in a deep model.
CORNERS = [
    dict(depth=16, heads=32, kv_heads="=heads", head_dim=128, image_tokens=576,
         questions=4, question_tokens=40, batch=8),
    dict(depth=32, heads=8, kv_heads="1", head_dim=64, image_tokens=576,
         questions=1, question_tokens=10, batch=1),
]  # fmt: skip
QUICK_CELLS = [
    dict(depth=8, heads=8, kv_heads="4", head_dim=64, image_tokens=576,
         questions=2, question_tokens=10, batch=8),
    dict(depth=8, heads=8, kv_heads="=heads", head_dim=64, image_tokens=576,
         questions=4, question_tokens=40, batch=1),
]  # fmt: skip
HIDDEN_SIZE = 128
SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions."
)
WORDS = ["red", "green", "blue", "circle", "square", "left", "yellow", "triangle"]


def images_per_run(cell: dict) -> int:
    """Images a runner-level run scores: one batch's worth, batch / questions (at least
    one); at ~2,900 image tokens one image (each prefix pass is 25x a 576-token one's
    attention), so that the grid runs in minutes."""
    if cell["image_tokens"] > 1000:
        return 1
    return max(1, cell["batch"] // cell["questions"])


def forward_batch(cell: dict) -> int:
    """Prompts in the forward-level batch: the cell's batch size, one at ~2,900 image tokens."""
    return 1 if cell["image_tokens"] > 1000 else cell["batch"]


def estimated_cost(cell: dict) -> float:
    """A cell's work, roughly in floating-point operations: its prefixes' attention
    (images x depth x heads x head dim x tokens^2) plus a fixed cost per layer (the
    narrow linear layers and per-call overhead), for the covering array's choice."""
    tokens = cell["image_tokens"] + 40
    attention = cell["depth"] * cell["heads"] * cell["head_dim"] * tokens**2
    return images_per_run(cell) * attention + 3e9 * cell["depth"]


def covering_array(axes: dict) -> list[dict]:
    """A strength-2 covering array over `axes`: cells (axis -> level) such that every pair
    of levels of two axes occurs in some cell. Greedy weighted set cover, deterministic:
    each step takes, of all full-factorial cells, the one that covers the most pairs not
    yet covered per unit of estimated_cost (the first in factorial order among equals), so
    that the expensive levels (~2,900 image tokens, depth 32, 32 heads) meet the other
    axes' levels in cheap company. 21 cells for AXES."""
    names = list(axes)
    cells = [dict(zip(names, levels, strict=True)) for levels in itertools.product(*axes.values())]

    def pairs(cell):
        return {(a, cell[a], b, cell[b]) for a, b in itertools.combinations(names, 2)}

    uncovered = set().union(*(pairs(c) for c in cells))
    chosen = []
    while uncovered:
        best = max(cells, key=lambda c: len(pairs(c) & uncovered) / estimated_cost(c))
        chosen.append(best)
        uncovered -= pairs(best)
    return chosen


def kv_heads(cell: dict) -> int:
    return cell["heads"] if cell["kv_heads"] == "=heads" else int(cell["kv_heads"])


def build_cell_model(cell: dict) -> LoadedModel:
    from sysattn_exp.models.tiny import build_tiny_llava

    model, processor = build_tiny_llava(
        num_layers=cell["depth"],
        hidden_size=HIDDEN_SIZE,
        num_heads=cell["heads"],
        num_kv_heads=kv_heads(cell),
        head_dim=cell["head_dim"],
        image_size=14 * round(cell["image_tokens"] ** 0.5),
        init_std=0.02,
        max_positions=4096,
    )
    use_sysattn(model)
    processor.tokenizer.padding_side = "left"
    return LoadedModel(model, processor, torch.device("cpu"), torch.float32)


def question_of_length(tokenizer, tokens: int, seed: int) -> str:
    """A yes/no question of `tokens` tokens (words added until it has that many, then cut
    at a word boundary: within a token or two of it)."""
    words = ["Is", "there", "a"]
    while len(tokenizer(" ".join(words), add_special_tokens=False).input_ids) < tokens:
        words.append(WORDS[(seed + len(words)) % len(WORDS)])
    return " ".join(words) + "?"


def cell_items(loaded: LoadedModel, cell: dict) -> tuple[Benchmark, list[str]]:
    """`questions` items per image, images_per_run images."""
    n_images = images_per_run(cell)
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
    tokenizer = loaded.processor.tokenizer
    items = [
        Item(f"{i}-{q}", f"{i}-{q}", f"{colours[i % 8]}-{i}",
             question_of_length(tokenizer, cell["question_tokens"], q), q % 2 == 0)
        for i in range(n_images)
        for q in range(cell["questions"])
    ]  # fmt: skip
    bench = Benchmark("grid", items, "{question}", solid_image)
    prompts = [build_prompt(bench.question_text(i), SYSTEM_PROMPT) for i in items]
    return bench, prompts


def solid_image(image_id: str):
    from PIL import Image

    return Image.new("RGB", (400, 300), image_id.split("-")[0])


def q4(depth: int) -> frozenset[int]:
    return frozenset(range(3 * depth // 4, depth))


def cell_variants(loaded: LoadedModel, cell: dict, helpers) -> dict:
    """The six timed variants of a cell: runner-level (baseline, system_text, system_image,
    and baseline_again, the A/A control) and forward-level (forward_plain, forward_fused).
    `helpers`: bench.py's answer_words and forward_runs (this module is imported by it)."""
    answer_words, forward_runs = helpers
    bench, prompts = cell_items(loaded, cell)
    words = answer_words(loaded, prompts[0])
    layers = q4(cell["depth"])
    edits = {
        "baseline": None,
        "system_text": Redistribution("system", ("text",), layers),
        "system_image": Redistribution("system", ("image",), layers),
        "baseline_again": None,
    }
    runs = {
        name: lambda edit=edit: score_items(
            loaded, bench, prompts, edit, words, cell["batch"], 0, "grid"
        )
        for name, edit in edits.items()
    }
    forward_prompts = [prompts[i % len(prompts)] for i in range(cell["batch"])]
    images = [
        bench.load_image(bench.items[i % len(prompts)].image_id) for i in range(cell["batch"])
    ]
    inputs, modality = encode_full_prompts(loaded, images, forward_prompts)
    forward = forward_runs(loaded, inputs, modality, {"plain": None, "fused": edits["system_text"]})
    return runs | {f"forward_{name}": run for name, run in forward.items()}


# A short run's CPU time moves by up to +-20% here (a 0.25 s runner-level run: 0.21-0.33 s),
# so a cell's variants are repeated until each has run about this long in all (at least
# `repeats` rounds, at most MAX_REPEATS): short cells get more rounds, long ones none more.
MIN_SECONDS = 4.0
MAX_REPEATS = 25


def timed_rounds(variants: dict, repeats: int, min_seconds: float = 0.0) -> dict:
    """One warm-up round, then rounds of every variant in turn, in the given order in even
    rounds and reversed in odd ones, so that no variant always runs first or always after
    the same other one: `repeats` rounds, more (up to MAX_REPEATS) where the warm-up's
    shortest variant times them would fall short of `min_seconds`. The median wall and
    process CPU seconds of each, and the rounds run ("rounds")."""
    warm = []
    for run in variants.values():
        start = time.process_time()
        run()
        warm.append(time.process_time() - start)
    repeats = max(repeats, min(MAX_REPEATS, math.ceil(min_seconds / max(min(warm), 1e-3))))
    wall = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    for round_ in range(repeats):
        for name in list(variants)[:: 1 if round_ % 2 == 0 else -1]:
            run = variants[name]
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {
        "wall": {n: statistics.median(t) for n, t in wall.items()},
        "cpu": {n: statistics.median(t) for n, t in cpu.items()},
        "rounds": repeats,
    }


def measure_cell(cell: dict, repeats: int, helpers, min_seconds: float = 0.0) -> dict:
    """A cell's ratios. The runner-level variants are timed among themselves, then the
    forward-level ones: a run just after a forward-level one (a batch of whole prompts,
    the model switched to SDPA and back) pays for it, which in one mixed rotation always
    fell on the same runner-level variant (the baseline: the A/A control read 0.93-0.95)."""
    torch.manual_seed(0)
    loaded = build_cell_model(cell)
    variants = cell_variants(loaded, cell, helpers)
    runner = {n: run for n, run in variants.items() if not n.startswith("forward")}
    forward = {n: run for n, run in variants.items() if n.startswith("forward")}
    timed = timed_rounds(runner, repeats, min_seconds), timed_rounds(forward, repeats, min_seconds)
    seconds = {clock: timed[0][clock] | timed[1][clock] for clock in ("cpu", "wall")}
    row = dict(cell, runner_rounds=timed[0]["rounds"], forward_rounds=timed[1]["rounds"])
    for clock, suffix in (("cpu", ""), ("wall", "_wall")):
        s = seconds[clock]
        row[f"runner_system_text{suffix}"] = s["system_text"] / s["baseline"]
        row[f"runner_system_image{suffix}"] = s["system_image"] / s["baseline"]
        row[f"runner_noise{suffix}"] = s["baseline_again"] / s["baseline"]
        row[f"forward{suffix}"] = s["forward_fused"] / s["forward_plain"]
    row["baseline_seconds"] = seconds["cpu"]["baseline"]
    calls, count = edited_calls(runner["system_text"])
    row["runner_attributable"] = attributable_overhead(calls, count, row["baseline_seconds"])
    row["edited_calls"] = count
    return row


# attributable_overhead times at most this many of a job's edited attention calls (the
# first), each this many times with its rule and without.
CAPTURED_CALLS = 48
CALL_REPEATS = 25


def edited_calls(run) -> tuple[list, int]:
    """Run `run` (a runner-level job with a rule) with the attention function wrapped: the
    arguments of the first CAPTURED_CALLS calls in which the rule applies (one of its
    layers, keys it can change), and how many such calls the job made."""
    from transformers import AttentionInterface

    from sysattn_exp.attention.intervention import ATTENTION_NAME, sysattn_attention

    captured, count = [], 0

    def recording(module, query, key, value, attention_mask, **kwargs):
        nonlocal count
        edit, modality = kwargs.get("attention_edit"), kwargs.get("key_modality")
        if edit is not None and module.layer_idx in edit.layers and edit.can_change(modality):
            count += 1
            if len(captured) < CAPTURED_CALLS:
                captured.append((module, query, key, value, attention_mask, kwargs))
        return sysattn_attention(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(ATTENTION_NAME, recording)
    try:
        run()
    finally:
        AttentionInterface.register(ATTENTION_NAME, sysattn_attention)
    return captured, count


def attributable_overhead(captured: list, count: int, baseline_seconds: float) -> float:
    """1 + the rule's own cost as a share of the baseline job's CPU time: each captured
    call through the attention function with its rule and without it (as the baseline
    job runs it: plain SDPA), interleaved, CALL_REPEATS times; the difference of medians
    summed, scaled to the job's `count` edited calls. A whole job's CPU time moves by
    +-8% from run to run here, a millisecond call repeated 25 times far less: this is the
    runner-level overhead without that noise (it leaves out effects outside the attention
    function, e.g. on caches, which the runner-level ratio includes)."""
    from sysattn_exp.attention.intervention import sysattn_attention

    extra = 0.0
    with torch.inference_mode():
        for module, query, key, value, mask, kwargs in captured:
            variants = {"plain": dict(kwargs, attention_edit=None), "rule": kwargs}
            seconds = {name: [] for name in variants}
            for _ in range(CALL_REPEATS):
                for name, arguments in variants.items():
                    start = time.process_time()
                    sysattn_attention(module, query, key, value, mask, **arguments)
                    seconds[name].append(time.process_time() - start)
            extra += statistics.median(seconds["rule"]) - statistics.median(seconds["plain"])
    return 1 + extra * count / max(len(captured), 1) / baseline_seconds


FIGURES = {
    "grid_runner_overhead": "runner_system_text",
    "grid_runner_overhead_system_image": "runner_system_image",
    "grid_forward_overhead": "forward",
    "grid_runner_noise": "runner_noise",
    "grid_runner_attributable": "runner_attributable",
}


def parse_shape(words: list[str]) -> dict:
    """A cell from `axis=level` words (bench.py --cell-shape): every axis of AXES, each an
    integer >= 1 (kv_heads: one that divides heads, or =heads). Raises ValueError, one
    line naming the bad word and what is allowed."""
    cell = {}
    for word in words:
        axis, _, level = word.partition("=")
        if axis not in AXES:
            raise ValueError(
                f"--cell-shape {word}: {axis!r} is not an axis; allowed: {', '.join(AXES)}"
            )
        if not (level.isdigit() and int(level) >= 1) and not (
            axis == "kv_heads" and level == "=heads"
        ):
            raise ValueError(f"--cell-shape {word}: the level must be an integer >= 1")
        cell[axis] = level if axis == "kv_heads" else int(level)
    missing = [axis for axis in AXES if axis not in cell]
    if missing:
        raise ValueError(
            f"--cell-shape: missing {', '.join(missing)} (every axis: {', '.join(AXES)})"
        )
    if cell["heads"] % kv_heads(cell):
        raise ValueError(
            f"--cell-shape: kv_heads={cell['kv_heads']} does not divide heads={cell['heads']}"
        )
    return cell


def grid(
    quick: bool, repeats: int, helpers, only: list[int] | None = None, shapes: list | None = None
) -> dict:
    """Every cell measured (printed as it finishes), then the table, the median and the
    worst cell of each figure, and the total time. `only`: the numbers (from 1) of the full
    grid's cells to measure, to measure again a cell a busy machine disturbed; `shapes`:
    cells of one's own (parse_shape) instead of the grid's, numbered from 1, to check the
    figures on shapes outside the grid."""
    import logging

    logger = logging.getLogger("sysattn_exp")
    level = logger.level
    logger.setLevel(logging.ERROR)  # random models' answers
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cells = shapes or (QUICK_CELLS if quick else covering_array(AXES) + CORNERS)
    numbers = range(1, len(cells) + 1) if only is None else only
    if not set(numbers) <= set(range(1, len(cells) + 1)):
        raise SystemExit(f"--cells: the grid has cells 1 to {len(cells)}")
    start = time.perf_counter()
    rows = []
    try:
        for number in numbers:
            row = measure_cell(cells[number - 1], repeats, helpers, 0 if quick else MIN_SECONDS)
            rows.append(row | {"cell": number})
            print(f"cell {number}/{len(cells)}: {format_row(rows[-1])}", flush=True)
    finally:
        torch.set_num_threads(threads)
        logger.setLevel(level)  # in a test process, later tests read these logs
    figures = {"grid_cells": rows, "grid_seconds": time.perf_counter() - start}
    for name, column in FIGURES.items():
        for suffix in ("", "_wall") if column + "_wall" in rows[0] else ("",):
            values = [row[column + suffix] for row in rows]
            figures[f"{name}_worst{suffix}"] = max(values)
            figures[f"{name}_median{suffix}"] = statistics.median(values)
    print(table(rows))
    for name in FIGURES:
        line = (
            f"{name}: median {figures[f'{name}_median']:.3f}, worst {figures[f'{name}_worst']:.3f}"
        )
        if f"{name}_median_wall" in figures:
            line += (
                f" (wall: median {figures[f'{name}_median_wall']:.3f}, worst "
                f"{figures[f'{name}_worst_wall']:.3f})"
            )
        print(line)
    print(f"grid: {len(rows)} cells in {figures['grid_seconds']:.0f} s")
    return figures


COLUMNS = ["cell", *AXES, "runner_system_text", "runner_system_image", "forward",
           "runner_noise", "runner_system_text_wall", "runner_system_image_wall",
           "forward_wall", "runner_noise_wall", "runner_attributable", "edited_calls",
           "runner_rounds", "forward_rounds"]  # fmt: skip


def format_row(row: dict) -> str:
    return " ".join(f"{c}={row[c]:.3f}" if isinstance(row[c], float) else f"{c}={row[c]}"
                    for c in COLUMNS)  # fmt: skip


def table(rows: list[dict]) -> str:
    """The cells as a Markdown table (CPU-time ratios, then wall-time ratios)."""
    header = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)
    lines = [
        "| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c])
                          for c in COLUMNS) + " |"
        for r in rows
    ]  # fmt: skip
    return "\n".join([header, *lines])


CROSSOVER_SHAPES = [  # (sequences, heads, KV heads, head dim, keys)
    (1, 8, 4, 64, 650),
    (8, 8, 4, 64, 650),
    (1, 32, 32, 128, 650),
    (1, 8, 1, 64, 2950),
    (8, 32, 8, 128, 2950),
]


def crossover(repeats: int = 7) -> dict:
    """One question-pass attention call (n query rows, all text, against a system + image +
    text cache, causal boolean mask), Q4 system -> text, on the spans path and the rows path
    interleaved: median milliseconds of each, per shape and n, and the weights the rows path
    materialises (sequences x heads x rows x keys: fused.choose_path's measure)."""
    torch.manual_seed(0)
    edit = Redistribution("system", ("text",), frozenset({0}))
    rows = []
    for batch, heads, kv, dim, keys in CROSSOVER_SHAPES:
        for n in (8, 16, 32, 64, 128):
            q = torch.randn(batch, heads, n, dim)
            k, v = torch.randn(2, batch, kv, keys, dim)
            modality = torch.full((batch, keys), 2)
            modality[:, :35], modality[:, keys - n - 5 :] = 1, 3
            causal = torch.ones(keys, keys, dtype=torch.bool).tril()[keys - n :]
            mask = causal[None, None].expand(batch, 1, n, keys)

            def call(path, q=q, k=k, v=v, mask=mask, modality=modality, dim=dim):
                def run():
                    with fused.forced_path(path):
                        fused.fused_edited_attention(q, k, v, mask, dim**-0.5, modality, edit)

                return run

            ms = timed_rounds({p: call(p) for p in ("spans", "rows")}, repeats)["wall"]
            row = {"shape": (batch, heads, kv, dim, keys), "rows": n,
                   "entries": batch * heads * n * keys} | {
                f"{p}_ms": 1e3 * s for p, s in ms.items()}  # fmt: skip
            rows.append(row)
            print(
                f"B={batch} H={heads} KV={kv} D={dim} K={keys} n={n}: weights {row['entries']}, "
                f"spans {row['spans_ms']:.2f} ms, rows {row['rows_ms']:.2f} ms "
                f"({row['rows_ms'] / row['spans_ms']:.2f}x)",
                flush=True,
            )
    return {"crossover": rows}
