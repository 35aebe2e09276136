"""One job: load the benchmark and model, score baseline and intervention, write the
results to the job's folder, then log them to MLflow."""

import json
import logging
import os
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from sysattn_exp.benchmarks import Benchmark, load_benchmark
from sysattn_exp.conditions import build_edit, intervention_rule, resolve_layers
from sysattn_exp.errors import UsageError
from sysattn_exp.intervention import Redistribution
from sysattn_exp.metrics import compare_with_baseline, shared_metrics
from sysattn_exp.models import (
    LoadedModel,
    build_prompt,
    first_token_ids,
    load_model,
    load_processor,
    prompt_modalities,
)
from sysattn_exp.scoring import score_items
from sysattn_exp.tracking import log_job

log = logging.getLogger(__name__)

# Baseline predictions by everything that determines them; later jobs of a sweep reuse them.
_BASELINES: dict[tuple, tuple[pd.DataFrame, float]] = {}


def predict(cfg, loaded, benchmark, prompts, edit, words, desc) -> tuple[pd.DataFrame, float]:
    """Score every item: one row per item with the columns of predictions.parquet, and the
    seconds the scoring took."""
    yes, no, seconds = score_items(
        loaded, benchmark, prompts, edit, words, cfg.model.batch_size, num_workers(cfg), desc
    )
    items = benchmark.items
    frame = pd.DataFrame(
        {
            "item_id": [i.item_id for i in items],
            "group_id": [i.group_id for i in items],
            "image_id": [i.image_id for i in items],
            "question": [i.question for i in items],
            "prompt": prompts,
            "label": [i.label for i in items],
            "yes_logit": yes,
            "no_logit": no,
        }
    )
    frame["pred"] = frame["yes_logit"] > frame["no_logit"]
    frame["correct"] = frame["pred"] == frame["label"]
    return frame, seconds


def num_workers(cfg) -> int:
    """Image-decoding worker processes: runtime.num_workers, or by default up to 4 while
    leaving a core to the model."""
    if cfg.runtime.num_workers != "auto":
        return int(cfg.runtime.num_workers)
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def scoring_words(loaded: LoadedModel, cfg) -> tuple[list[int], list[int]]:
    tokenizer = loaded.processor.tokenizer
    yes = first_token_ids(tokenizer, cfg.yes_words, "scoring.yes_words")
    no = first_token_ids(tokenizer, cfg.no_words, "scoring.no_words")
    shared = sorted(set(yes) & set(no))
    if shared:
        raise UsageError(f"scoring.yes_words and scoring.no_words share first tokens {shared}")
    return yes, no


def evaluate(cfg, benchmark, loaded, prompts, edit, words, desc) -> tuple[pd.DataFrame, float]:
    """Predictions for `edit` and the seconds they took; the baseline (edit None) is
    computed once per process."""
    if edit is not None:
        return predict(cfg, loaded, benchmark, prompts, edit, words, desc)
    key = (
        id(loaded),
        tuple((i.item_id, i.image_id, i.label) for i in benchmark.items),
        tuple(prompts),
        tuple(map(tuple, words)),
    )
    if key not in _BASELINES:
        log.info("computing the baseline (once per model, benchmark and prompt)")
        _BASELINES[key] = predict(cfg, loaded, benchmark, prompts, None, words, "baseline")
    return _BASELINES[key]


def run_name(benchmark: Benchmark, edit: Redistribution | None, layers: list[int]) -> str:
    if edit is None:
        return f"{benchmark.name} baseline"
    return f"{benchmark.name} {edit.describe()} layers {layers[0]}-{layers[-1]}"


def write_atomically(path: Path, write) -> None:
    """Write via a temporary name and rename, so a killed job never leaves a partial file."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_results(
    out_dir: Path, predictions: pd.DataFrame, metrics: dict, config: dict
) -> list[Path]:
    """predictions.parquet, config.yaml, then metrics.json last: its presence marks a
    complete job."""
    files = [out_dir / "predictions.parquet", out_dir / "config.yaml", out_dir / "metrics.json"]
    write_atomically(files[0], lambda p: predictions.to_parquet(p, index=False))
    write_atomically(files[1], lambda p: p.write_text(OmegaConf.to_yaml(config)))
    write_atomically(files[2], lambda p: p.write_text(json.dumps(metrics, indent=2) + "\n"))
    return files


def all_metrics(benchmark: Benchmark, predictions: pd.DataFrame) -> dict:
    """Shared metrics, the benchmark's native ones (which see each item's meta as
    columns), and the counts from loading."""
    scored = predictions.join(pd.DataFrame([item.meta for item in benchmark.items]))
    return shared_metrics(predictions) | benchmark.native_metrics(scored) | benchmark.load_counts


def dry_run(cfg, benchmark: Benchmark) -> dict:
    """Print what a run would evaluate, without loading the model."""
    items = benchmark.items
    summary = {
        "n_items": len(items),
        "n_groups": len({item.group_id for item in items}),
        "gt_yes_rate": sum(item.label for item in items) / len(items),
    } | benchmark.load_counts
    example = items[0]
    prompt = build_prompt(benchmark.question_text(example), cfg.model.system_prompt)
    split = prompt_modalities(
        load_processor(cfg.model), benchmark.load_image(example.image_id), prompt
    )
    print(f"benchmark {benchmark.name}: " + ", ".join(f"{k}={v:g}" for k, v in summary.items()))
    print(f"example prompt (item {example.item_id}, image {example.image_id}):\n{prompt}")
    print(
        f"tokens for {cfg.model.name_or_path}: " + ", ".join(f"{k}={v}" for k, v in split.items())
    )
    return summary | {f"example_{k}_tokens": v for k, v in split.items()}


def run(cfg, out_dir: Path) -> dict:
    """Evaluate the configured condition; returns the job's metrics."""
    benchmark = load_benchmark(cfg.benchmark)
    rule = intervention_rule(cfg.intervention)  # checked before the (slow) model load
    if cfg.runtime.dry_run:
        return dry_run(cfg, benchmark)
    loaded = load_model(cfg.model)
    layers = resolve_layers(cfg.layers, loaded.num_layers) if rule else []
    edit = build_edit(rule, layers)
    words = scoring_words(loaded, cfg.scoring)
    prompts = [
        build_prompt(benchmark.question_text(i), cfg.model.system_prompt) for i in benchmark.items
    ]
    name = run_name(benchmark, edit, layers)

    baseline, _ = evaluate(cfg, benchmark, loaded, prompts, None, words, name)
    predictions, seconds = evaluate(cfg, benchmark, loaded, prompts, edit, words, name)
    metrics = all_metrics(benchmark, predictions)
    metrics |= {"scoring_seconds": seconds, "items_per_second": len(predictions) / seconds}
    if edit is not None:
        metrics |= compare_with_baseline(metrics, all_metrics(benchmark, baseline))

    config = OmegaConf.to_container(cfg, resolve=True)
    config["layers"]["resolved"] = layers
    files = write_results(out_dir, predictions, metrics, config)
    log.info(
        "%s: paired_accuracy=%.4f yes_rate=%.4f",
        name,
        metrics["paired_accuracy"],
        metrics["yes_rate"],
    )
    params = config | {"scoring": config["scoring"] | {"yes_ids": words[0], "no_ids": words[1]}}
    params["layers"]["resolved"] = ",".join(map(str, layers))
    log_job(cfg.tracking, name, params, metrics, files)
    return metrics
