"""One job: load the benchmark and model, score baseline and intervention, write the
results to the job's folder, then log them to MLflow."""

import logging
import os
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd
import torch
import transformers
from omegaconf import OmegaConf

from sysattn_exp import kernels, random_weights
from sysattn_exp.benchmarks import Benchmark, answer_parser, load_benchmark
from sysattn_exp.cache import SCORES_VERSION, ScoreCache, digest, scores_code_digest
from sysattn_exp.caption import caption_job, load_coco
from sysattn_exp.cluster import available_cpus, log_when_stopped
from sysattn_exp.conditions import build_edit, intervention_rule, resolve_layers
from sysattn_exp.environment import device_names, environment, model_devices
from sysattn_exp.errors import UsageError, first_line
from sysattn_exp.files import write_atomically, write_json
from sysattn_exp.generation import generate_in_batches, generate_items
from sysattn_exp.intervention import Edit, EditTally, watch_edits
from sysattn_exp.metrics import compare_with_baseline, shared_metrics
from sysattn_exp.modality import MODALITIES
from sysattn_exp.models import (
    BUILTIN_TINY,
    BUILTIN_TOY,
    LoadedModel,
    first_token_ids,
    load_config,
    load_model,
    load_processor,
    prompt_format,
    prompt_modalities,
    tokenizer_of,
)
from sysattn_exp.profile import AttentionProfile, heatmap
from sysattn_exp.prompts import PromptFormat
from sysattn_exp.scoring import Scores, score_items
from sysattn_exp.shared_baseline import SharedBaseline
from sysattn_exp.toy_model import weights_file_digest
from sysattn_exp.tracking import PROFILE_PLOT, PROFILE_TABLE, log_job_dir, storable_names

log = logging.getLogger(__name__)


def predict(
    cfg, loaded, benchmark, prompts, edit, words, desc, profile=None
) -> tuple[pd.DataFrame, Scores]:
    """Score every item (through the score cache, unless profiling): one row per item with
    the columns of predictions.parquet, and how the scoring went."""
    if cfg.scoring.mode == "generate":
        return predict_by_generation(cfg, loaded, benchmark, prompts, edit, words, desc)
    plain = None
    if edit is not None and edit.kind == "pai" and edit.cfg_gamma is not None:
        plain = item_prompts(benchmark, loaded.prompt_format(cfg.model), with_image=False)
    cache = None
    if cfg.runtime.cache_dir and profile is None:
        cache = ScoreCache(cfg.runtime.cache_dir, condition(cfg, loaded, edit, words))
    scores = score_items(
        loaded,
        benchmark,
        prompts,
        edit,
        words,
        cfg.model.batch_size,
        num_workers(cfg),
        desc,
        cache,
        profile,
        plain,
        cfg.runtime.progress_seconds,
    )
    frame = item_columns(benchmark, prompts, scores)
    frame["pred"] = frame["yes_logit"] > frame["no_logit"]
    frame["correct"] = frame["pred"] == frame["label"]
    return frame, scores


def predict_by_generation(
    cfg, loaded, benchmark, prompts, edit, words, desc
) -> tuple[pd.DataFrame, Scores]:
    """Greedy answers, parsed to yes/no/unknown by the benchmark's own rule or MME's
    (scoring.parser; benchmarks.answer_parser); the score columns
    come from the first step's logits, the logit mode's. No score cache: a generated text is
    not a score, and a run costs max_new_tokens forward passes per batch more than the
    logit mode's one, which a cache would only save on a rerun of the same condition."""
    generated = generate_items(
        loaded,
        benchmark,
        prompts,
        edit,
        cfg.scoring.max_new_tokens,
        cfg.model.batch_size,
        num_workers(cfg),
        desc,
        words,
        cfg.runtime.progress_seconds,
    )
    scores = Scores(
        generated.yes,
        generated.no,
        generated.p_yes,
        generated.seconds,
        generated.computed,
        generated.new_tokens,
    )
    frame = item_columns(benchmark, prompts, scores)
    frame["generated"] = generated.texts
    parse = answer_parser(benchmark.name, cfg.scoring.parser)
    # Stripped first, as LLaVA's evaluation scripts strip outputs before POPE's and MME's
    # rules read them (a leading newline would otherwise make POPE's first word "").
    frame["answer"] = [parse(text.strip()) for text in generated.texts]
    frame["pred"] = frame["answer"] == "yes"
    # An unknown answer is neither yes nor no: wrong whatever the label.
    frame["correct"] = (frame["pred"] == frame["label"]) & (frame["answer"] != "unknown")
    return frame, scores


def item_columns(benchmark: Benchmark, prompts: list[str], scores: Scores) -> pd.DataFrame:
    items = benchmark.items
    return pd.DataFrame(
        {
            "item_id": [i.item_id for i in items],
            "group_id": [i.group_id for i in items],
            "image_id": [i.image_id for i in items],
            "question": [i.question for i in items],
            "prompt": prompts,
            "label": [i.label for i in items],
            "yes_logit": scores.yes,
            "no_logit": scores.no,
            "p_yes": scores.p_yes,
        }
    )


def condition(cfg, loaded, edit: Edit | None, words) -> dict:
    """Everything that determines an item's scores besides the item and its prompt: the
    model and data, the environment that computes them (torch and transformers versions,
    device names, the planned attention kernels, the batch size: bf16 results depend on
    how a batch is padded and reduced) and the code (cache.py). The same in every process
    of one environment and checkout."""
    model = cfg.model
    return {
        "model": model.name_or_path,
        "revision": model.revision,
        "seed": model.seed if model.name_or_path == BUILTIN_TINY else None,
        **({"weights": weights_file_digest()} if model.name_or_path == BUILTIN_TOY else {}),
        **random_weights.cache_condition(model),
        "device": loaded.device.type,
        "device_name": device_names(loaded.model),
        "dtype": str(loaded.dtype),
        "batch_size": model.batch_size,
        "torch": str(torch.__version__),  # a TorchVersion, which YAML cannot write
        "transformers": transformers.__version__,
        "kernel_path": planned_kernel_path(loaded, edit),
        "yes_ids": words[0],
        "no_ids": words[1],
        "scores_version": SCORES_VERSION,
        "scores_code": scores_code_digest(),
        "dataset_revision": cfg.benchmark.get("revision"),
        "intervention": None
        if edit is None
        else {"rule": type(edit).__name__, **asdict(edit), "layers": sorted(edit.layers)},
    } | generation_condition(cfg.scoring)


def head_dim(text_config) -> int:
    return getattr(text_config, "head_dim", None) or (
        text_config.hidden_size // text_config.num_attention_heads
    )


def planned_kernel_path(loaded, edit: Edit | None, profiled: bool = False) -> str:
    """The attention paths that scoring `edit` is planned to take (kernels.planned_path):
    "sdpa" for the unchanged model, "eager" for the eager implementation, else the fused
    path's kernels for the devices the weights are on (several under a device_map), the
    dtype and the head dim (a profile takes the fused path too)."""
    if edit is None and not profiled:
        return "sdpa"
    if edit is not None and edit.impl == "eager":
        return "eager"
    size = head_dim(loaded.text_config)
    plans = [kernels.planned_path(d, loaded.dtype, size) for d in model_devices(loaded.model)]
    return kernels.path_label({path for plan in plans for path in plan.split("+")})


def generation_condition(scoring) -> dict:
    """The generation settings, in the condition only in generate mode: logit-mode
    conditions (and their cached scores and job keys) stay what they were before it."""
    if scoring.mode == "logit":
        return {}
    return {"scoring_mode": "generate", "max_new_tokens": scoring.max_new_tokens}


# Config keys that never change what a job produces (where results go, how fast they come);
# every other key, present or future (the task, runtime.profile, the prompt...), is in the
# job key, so that two jobs that can produce different files never share one.
# The environment section is recorded, not keyed: what in it changes scores (versions,
# device names) is in the condition, which the key includes.
NOT_IN_JOB_KEY = {
    "tracking": None,
    "environment": None,
    "runtime": {
        "num_workers",
        "cache_dir",
        "report_at_end",
        "progress_seconds",
        "baseline_part_items",
        "lease_seconds",
        "deterministic",
    },
}


def job_key(config: dict, condition: dict) -> str:
    kept = {}
    for section, value in config.items():
        dropped = NOT_IN_JOB_KEY.get(section, set())
        if dropped is None:
            continue
        if section == "scoring" and value.get("mode", "logit") == "logit":
            # The logit mode ignores the generation keys; without them, jobs keep the key
            # they had before generation existed (the condition has them in generate mode).
            dropped = {"mode", "max_new_tokens", "parser"}
        if section == "model" and value.get("weights", "pretrained") == "pretrained":
            # Likewise pretrained weights keep the key jobs had before model.weights existed.
            dropped = {"weights", "config_overrides"}
        kept[section] = {k: v for k, v in value.items() if k not in dropped} if dropped else value
    return digest([condition, kept])


def timing(scores: Scores, n_items: int) -> dict:
    per_second = scores.computed / scores.seconds if scores.computed else None
    out = {
        "scoring_seconds": scores.seconds,
        "items_per_second": per_second,
        "n_items_from_cache": n_items - scores.computed,
    }
    if scores.new_tokens is not None:  # generate mode
        out["generated_tokens_per_second"] = scores.new_tokens / scores.seconds
    return out


def scoring_checks(loaded, edit, profiled: bool, tally: EditTally, paths: set, computed: int):
    """kernel_path: the attention paths that computed the `computed` items scored now (kernels.
    path_label), or the planned ones when every item came from the cache (cached under
    that plan); a path outside the plan (a kernel rejected at first use) is warned about.
    edited_layers: the decoder layers each checked forward pass applied the edit in
    (intervention.guard_edits stops a job where that is not the resolved layers); for
    cached scores, the resolved count (they were saved only after their passes' check);
    0 without an edit."""
    planned = planned_kernel_path(loaded, edit, profiled)
    used = kernels.path_label(paths) if computed else planned
    unplanned = set(paths) - set(planned.split("+")) - {"eager"}
    if computed and unplanned:
        log.warning(
            "attention computed by %s, not the planned %s (the score cache's condition): "
            "a kernel was rejected, see above",
            used,
            planned,
        )
    if edit is None:
        edited = 0
    elif tally.passes:
        edited = tally.edited_layers
        log.info(
            "the intervention was applied in %d decoder layers in each of %d forward passes",
            edited,
            tally.passes,
        )
    else:
        edited = len(edit.layers)
    return {"kernel_path": used, "edited_layers": edited}


def num_workers(cfg) -> int:
    """Image-decoding worker processes: runtime.num_workers, or by default up to 4 while
    leaving a core to the model, out of the CPUs of the job's allocation (SLURM's
    cpus_per_task, else the process's CPU affinity: cluster.available_cpus)."""
    if cfg.runtime.num_workers != "auto":
        return int(cfg.runtime.num_workers)
    return max(0, min(4, available_cpus() - 1))


def sharing_settings(cfg) -> dict:
    """How concurrent jobs share the baseline (shared_baseline.SharedBaseline)."""
    return {
        "batch_size": cfg.model.batch_size,
        "part_items": cfg.runtime.baseline_part_items,
        "lease_seconds": cfg.runtime.lease_seconds,
        "progress_seconds": cfg.runtime.progress_seconds,
    }


def shared_baseline(cfg, loaded, benchmark, prompts, words) -> SharedBaseline | None:
    """The baseline's parts, claimed through the score cache (None without a cache or in
    generate mode, which does not use it)."""
    if not cfg.runtime.cache_dir or cfg.scoring.mode != "logit":
        return None
    settings = sharing_settings(cfg) | {"num_workers": num_workers(cfg)}
    cache = ScoreCache(cfg.runtime.cache_dir, condition(cfg, loaded, None, words))
    return SharedBaseline(loaded, benchmark, prompts, words, cache, settings)


def scoring_words(loaded: LoadedModel, cfg, prompt: str) -> tuple[list[int], list[int]]:
    """The yes and no token ids (models.first_token_ids) as they follow `prompt`, a rendered
    prompt of the job (every prompt ends in the template's same generation prompt)."""
    return answer_token_ids(loaded.tokenizer, cfg, prompt)


def answer_token_ids(tokenizer, cfg, prompt: str) -> tuple[list[int], list[int]]:
    yes = first_token_ids(tokenizer, cfg.yes_words, "scoring.yes_words", prompt)
    no = first_token_ids(tokenizer, cfg.no_words, "scoring.no_words", prompt)
    shared = sorted(set(yes) & set(no))
    if shared:
        raise UsageError(
            f"scoring.yes_words and scoring.no_words share first tokens {shared} "
            f"({', '.join(token_strings(tokenizer, shared))}); give words that start differently"
        )
    return yes, no


def token_strings(tokenizer, ids: list[int]) -> list[str]:
    """Each id with its token as the vocabulary spells it, e.g. "3869 '▁Yes'"."""
    return [
        f"{i} {token!r}" for i, token in zip(ids, tokenizer.convert_ids_to_tokens(ids), strict=True)
    ]


def run_name(benchmark: str, edit: Edit | None, layers: list[int], profile=False) -> str:
    """'pope baseline', 'pope system->text layers 24-31'; a profile job (+task=profile):
    'pope profile', 'pope profile system->text layers 24-31'."""
    kind = " profile" if profile else ""
    if edit is None:
        return f"{benchmark}{kind}" if profile else f"{benchmark} baseline"
    return f"{benchmark}{kind} {edit.describe()} layers {layers[0]}-{layers[-1]}"


def write_results(
    out_dir: Path, predictions: pd.DataFrame, metrics: dict, config: dict
) -> list[Path]:
    """predictions.parquet, config.yaml, then metrics.json last: its presence marks a
    complete job."""
    files = [out_dir / "predictions.parquet", out_dir / "config.yaml", out_dir / "metrics.json"]
    write_atomically(files[0], lambda p: predictions.to_parquet(p, index=False))
    write_atomically(files[1], lambda p: p.write_text(OmegaConf.to_yaml(config)))
    write_json(files[2], metrics)
    return files


RANKINGS = {  # scoring.rank_by: the score that metrics comparing two items rank by
    "p_yes": lambda frame: frame["p_yes"],  # VQAScore's P("Yes") over the whole vocabulary
    "log_odds": lambda frame: frame["yes_logit"] - frame["no_logit"],
}


def all_metrics(benchmark: Benchmark, predictions: pd.DataFrame, ranking: str) -> dict:
    """Shared metrics, the benchmark's native ones (which see each item's meta as columns,
    and `rank_score`, the score that metrics comparing items rank by), and the counts from
    loading."""
    scored = predictions.join(pd.DataFrame([item.meta for item in benchmark.items]))
    scored["rank_score"] = RANKINGS[ranking](scored)
    generated = {}
    if "answer" in predictions:  # generate mode: answers that are neither yes nor no
        generated["unknown_rate"] = float((predictions["answer"] == "unknown").mean())
    return (
        shared_metrics(predictions)
        | generated
        | benchmark.native_metrics(scored)
        | benchmark.load_counts
    )


def check_metric_names(benchmark: Benchmark, ranking: str) -> None:
    """UsageError, before the model loads, where two of the job's metric names would be
    logged to MLflow under one name (tracking.storable_names: e.g. MME categories "a:b"
    and "a_b"); found at logging time, after scoring, they could never be logged. The
    names are those of the metrics computed on answers equal to the labels."""
    labels = [item.label for item in benchmark.items]
    n = len(labels)
    scores = Scores([float(label) for label in labels], [0.5] * n, [0.5] * n, 0.0, 0)
    frame = item_columns(benchmark, [""] * n, scores)
    frame["pred"], frame["correct"] = frame["label"], True
    try:
        names = all_metrics(benchmark, frame, ranking)
    except Exception:  # noqa: BLE001 - a check only: the job computes its own metrics anyway
        log.debug("metric names not checked before scoring", exc_info=True)
        return
    try:
        storable_names(names, "metrics")
    except ValueError as error:
        raise UsageError(f"benchmark {benchmark.name}: {error}") from error


def item_prompts(benchmark: Benchmark, fmt: PromptFormat, with_image=True) -> list[str]:
    """Every item's prompt (`with_image` False: each rendered without its image)."""
    return [
        fmt.render(benchmark.question_text(item), with_image and item.image_id is not None)
        for item in benchmark.items
    ]


DRY_RUN_FILE = "dry_run.json"  # a dry-run job's summary: its config was checked


def dry_run(cfg, benchmark: Benchmark, rule: dict | None, out_dir: Path) -> dict:
    """Check what a run would evaluate without loading the model's weights: the data, the
    model's config and processor, the scored answer tokens, and the layer range against
    the model's depth (from its config). Prints the counts, an example prompt, its token
    split and the scored tokens (in a sweep, for its first job only) and dry_run_job's
    line. Logs nothing."""
    items = benchmark.items
    summary = {
        "n_items": len(items),
        "n_groups": len({item.group_id for item in items}),
        "gt_yes_rate": sum(item.label for item in items) / len(items),
    } | benchmark.load_counts
    config = load_config(cfg.model)
    summary |= dry_run_details(cfg, benchmark, config, summary, show=sweep_job() in (None, 0))
    counts = f"{summary['n_items']} items, {summary['n_groups']} groups"
    return dry_run_job(cfg, config, benchmark.name, rule, out_dir, summary, counts)


def dry_run_job(cfg, config, benchmark: str, rule, out_dir: Path, summary: dict, counts: str):
    """The layers checked against the model's depth from its config (UsageError), one line
    'dry run[ jobN]: <job name> on <model> (<depth> layers): <counts>: config ok', and the
    summary in DRY_RUN_FILE, which tells the sweep's end that this job's config is valid."""
    depth = config.get_text_config().num_hidden_layers
    layers = resolve_layers(cfg.layers, depth) if rule else checked_none(cfg.layers, depth)
    profile = bool(cfg.runtime.get("profile"))
    name = run_name(benchmark, build_edit(rule, layers), layers, profile)
    job = sweep_job()
    where = "" if job is None else f" job{job}"
    print(
        f"dry run{where}: {name} on {cfg.model.name_or_path} ({depth} layers): {counts}: config ok"
    )
    write_json(out_dir / DRY_RUN_FILE, summary | {"name": name, "layers": layers})
    return summary


def checked_none(layers_cfg, depth: int) -> list[int]:
    """A baseline edits no layer, but a layer range outside the model is still refused:
    the same config with an intervention would fail."""
    resolve_layers(layers_cfg, depth)
    return []


def sweep_job() -> int | None:
    """The number of this job in its sweep (None outside a sweep)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return HydraConfig.get().job.num


def dry_run_details(cfg, benchmark: Benchmark, config, summary: dict, show: bool) -> dict:
    """The example prompt, its system / image / text token split and the scored answer
    tokens (bad scoring words fail here), printed with the counts where `show`; returns
    the token counts."""
    example = benchmark.items[0]
    processor = load_processor(cfg.model, config.model_type)
    question = benchmark.question_text(example)
    with_image = example.image_id is not None
    prompt = prompt_format(cfg.model, processor, config.model_type).render(question, with_image)
    image = benchmark.load_image(example.image_id) if with_image else None
    image_token_id = getattr(config, "image_token_id", None)
    split = prompt_modalities(processor, image_token_id, image, prompt, question)
    tokenizer = tokenizer_of(processor)
    words = answer_token_ids(tokenizer, cfg.scoring, prompt)  # bad words fail before printing
    if show:
        print(f"benchmark {benchmark.name}: " + ", ".join(f"{k}={v:g}" for k, v in summary.items()))
        print(f"example prompt (item {example.item_id}, image {example.image_id}):\n{prompt}")
        tokens = ", ".join(f"{k}={v}" for k, v in split.items())
        print(f"tokens for {cfg.model.name_or_path}: {tokens}")
        for name, ids in zip(("yes", "no"), words, strict=True):
            strings = ", ".join(token_strings(tokenizer, ids))
            print(f"scored {name} tokens after the prompt: {strings}")
    return {f"example_{k}_tokens": v for k, v in split.items()}


def run(cfg, out_dir: Path) -> dict:
    """Evaluate the configured condition; returns the job's metrics. A stop signal (SLURM's
    SIGTERM, submitit's preemption signal) is logged with how the job resumes."""
    if cfg.runtime.cache_dir:
        resume = f"scores computed so far are in the score cache {cfg.runtime.cache_dir}"
    else:
        resume = "without a score cache (runtime.cache_dir) it will start over"
    deterministic(cfg.runtime.get("deterministic", False))
    with log_when_stopped(resume):
        if cfg.get("caption") is not None:
            return run_caption(cfg, out_dir)
        return run_yes_no(cfg, out_dir)


def run_yes_no(cfg, out_dir: Path) -> dict:
    """A yes/no benchmark job: baseline and the configured condition."""
    rule = intervention_rule(cfg.intervention)  # checked before the data and model load
    benchmark = load_benchmark(cfg.benchmark)
    ranking = cfg.scoring.rank_by
    check_metric_names(benchmark, ranking)
    if cfg.scoring.mode == "generate" and cfg.runtime.profile:
        raise UsageError(
            "runtime.profile records the logit mode's answer row; use scoring.mode=logit"
        )
    if cfg.runtime.dry_run:
        return dry_run(cfg, benchmark, rule, out_dir)
    loaded = load_model(cfg.model)
    layers = (
        resolve_layers(cfg.layers, loaded.num_layers)
        if rule
        else checked_none(cfg.layers, loaded.num_layers)
    )
    edit = build_edit(rule, layers)
    prompts = item_prompts(benchmark, loaded.prompt_format(cfg.model))
    words = scoring_words(loaded, cfg.scoring, prompts[0])
    name = run_name(benchmark.name, edit, layers, profile=bool(cfg.runtime.profile))

    # The baseline is shared through the score cache by concurrent jobs (shared_baseline):
    # the parts nobody holds first, this job's own condition while others finish theirs.
    shared = shared_baseline(cfg, loaded, benchmark, prompts, words)
    profile = AttentionProfile() if cfg.runtime.profile else None
    with kernels.record_paths() as paths:  # a baseline job's: every attention call
        if shared is not None:
            shared.compute_free_parts()
        tally = EditTally()
        if edit is not None or profile is not None:
            with watch_edits() as tally, kernels.record_paths() as paths:
                predictions, scores = predict(
                    cfg, loaded, benchmark, prompts, edit, words, name, profile
                )
        if shared is not None:
            shared.finish()
        baseline, baseline_scores = predict(
            cfg, loaded, benchmark, prompts, None, words, "baseline"
        )
    if shared is not None:  # the parts this job computed
        baseline_scores = replace(baseline_scores, computed=shared.computed, seconds=shared.seconds)
    log.info(
        "baseline: %d of %d items computed by this job, the rest from the cache",
        baseline_scores.computed,
        len(prompts),
    )
    if edit is None and profile is None:
        predictions, scores = baseline, baseline_scores
    metrics = all_metrics(benchmark, predictions, ranking) | timing(scores, len(prompts))
    metrics |= scoring_checks(loaded, edit, profile is not None, tally, paths, scores.computed)
    if edit is not None:
        metrics |= compare_with_baseline(metrics, all_metrics(benchmark, baseline, ranking))

    config = job_config(cfg, loaded, edit, words, layers, name)
    if profile is not None:  # before metrics.json, which marks the job complete
        table = profile.table()
        write_atomically(out_dir / PROFILE_TABLE, lambda p: table.to_csv(p, index=False))
        heatmap(table, out_dir / PROFILE_PLOT, f"{name}: share of the answer's attention")
        print(profile_shares(table, name))
    write_results(out_dir, predictions, metrics, config)
    log.info(
        "%s: paired_accuracy=%.4f yes_rate=%.4f",
        name,
        metrics["paired_accuracy"],
        metrics["yes_rate"],
    )
    log_or_warn(out_dir, cfg.tracking)
    return metrics


def profile_shares(table: pd.DataFrame, name: str) -> str:
    """The profile's answer-position shares per decoder layer, in percent, as a short
    table (the same numbers as attention_profile.csv's 'answer' rows and the heatmap)."""
    shares = table[table["queries"] == "answer"].set_index("layer")[list(MODALITIES)]
    percent = (100 * shares).round(1)
    percent.columns = [f"{m} %" for m in MODALITIES]
    return f"{name}: share of the answer position's attention per decoder layer\n" + (
        percent.to_string()
    )


def deterministic(on: bool) -> None:
    """runtime.deterministic: torch's deterministic algorithms on or (as each job of a sweep
    in one process decides for itself) off. cuBLAS needs its workspace fixed before CUDA
    starts: set here unless the environment already sets it."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(bool(on))


def job_config(cfg, loaded, edit, words, layers, name, benchmark=None) -> dict:
    """The job's config.yaml: the composed config (its benchmark section replaced where
    given), the resolved layers, the job's name and key, and the environment it ran in
    (environment.environment: not in the key)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    if benchmark is not None:
        config["benchmark"] = benchmark
    config["layers"]["resolved"] = layers
    config["job"] = {"name": name, "key": job_key(config, condition(cfg, loaded, edit, words))}
    config["layers"]["depth"] = loaded.num_layers  # for the report's model label; not in the key
    config["environment"] = environment(loaded.model)
    return config


def run_caption(cfg, out_dir: Path) -> dict:
    """+task=caption: captions of COCO images under the configured condition, scored with
    CHAIR (caption.py); the job's files and MLflow run as for any job."""
    rule = intervention_rule(cfg.intervention)
    images = load_coco(cfg.caption)  # bad data fails before the model loads
    if cfg.runtime.dry_run:
        print(f"caption: {len(images)} COCO images (first {images[0].file_name})")
        summary, counts = {"n_images": len(images)}, f"{len(images)} images"
        config = load_config(cfg.model)
        return dry_run_job(cfg, config, CAPTION_BENCHMARK, rule, out_dir, summary, counts)
    loaded = load_model(cfg.model)
    layers = (
        resolve_layers(cfg.layers, loaded.num_layers)
        if rule
        else checked_none(cfg.layers, loaded.num_layers)
    )
    edit = build_edit(rule, layers)
    name = run_name(CAPTION_BENCHMARK, edit, layers)
    # The benchmark group is not used: the report files the job under "chair".
    config = job_config(cfg, loaded, edit, ([], []), layers, name, {"name": CAPTION_BENCHMARK})
    with watch_edits() as tally, kernels.record_paths() as paths:
        metrics = caption_job(cfg, loaded, edit, out_dir, CaptionGenerator(cfg, loaded), images)
    metrics |= scoring_checks(loaded, edit, False, tally, paths, len(images))
    write_atomically(out_dir / "config.yaml", lambda p: p.write_text(OmegaConf.to_yaml(config)))
    write_json(out_dir / "metrics.json", metrics)
    log.info("%s: chair_s=%.4f chair_i=%.4f", name, metrics["chair_s"], metrics["chair_i"])
    log_or_warn(out_dir, cfg.tracking)
    return metrics


CAPTION_BENCHMARK = "chair"


class CaptionGenerator:
    """Captions in batches of model.batch_size; the baseline's (edit None) kept in
    runtime.cache_dir, so that the jobs of a sweep caption the baseline once."""

    def __init__(self, cfg, loaded):
        self.cfg, self.loaded = cfg, loaded

    def __call__(self, loaded, images, prompts, edit, max_new_tokens) -> list[str]:
        path = self.baseline_file(images, prompts, max_new_tokens) if edit is None else None
        if path is not None and path.exists():
            return pd.read_parquet(path)["caption"].tolist()
        batch_size = self.cfg.model.batch_size
        captions = generate_in_batches(
            loaded,
            images,
            prompts,
            edit,
            max_new_tokens,
            batch_size,
            self.cfg.runtime.progress_seconds,
        )
        if path is not None:
            frame = pd.DataFrame({"caption": captions})
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, lambda p: frame.to_parquet(p, index=False))
        return captions

    def baseline_file(self, images, prompts, max_new_tokens) -> Path | None:
        if not self.cfg.runtime.cache_dir:
            return None
        condition_ = condition(self.cfg, self.loaded, None, ([], []))
        files = [str(path) for path in images.paths]
        key = digest([condition_, files, prompts, max_new_tokens])
        return Path(self.cfg.runtime.cache_dir) / "captions" / f"baseline-{key}.parquet"


def log_or_warn(out_dir: Path, tracking) -> None:
    try:
        log_job_dir(out_dir, tracking)
    except Exception as error:  # noqa: BLE001 - the results are safe on disk either way
        log.warning(
            "could not log to MLflow (%s); the results are in %s: log them later with "
            "python -m sysattn_exp.sync %s",
            first_line(error),
            out_dir,
            out_dir.parent if is_sweep_job(out_dir) else out_dir,
        )


def is_sweep_job(job_dir: Path) -> bool:
    return (job_dir.parent / "multirun.yaml").exists()
