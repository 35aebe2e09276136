"""The yes/no benchmark job: every item scored under the baseline and the configured
condition (by the answer position's logits, or by generated answers with
scoring.mode=generate), optionally with an attention profile (+task=profile). The job
skeleton (job.run_job) checks, loads, writes and logs; this module scores and computes
the metrics."""

import logging
from dataclasses import replace
from pathlib import Path

import pandas as pd

from sysattn_exp.attention.modality import MODALITIES
from sysattn_exp.attention.profile import AttentionProfile, atlas, heatmap
from sysattn_exp.attention.rules import Rule
from sysattn_exp.benchmarks import (
    STAT_METRICS,
    STATISTICS,
    Benchmark,
    answer_parser,
    load_benchmark,
)
from sysattn_exp.errors import UsageError
from sysattn_exp.evaluation.cache import ScoreCache
from sysattn_exp.evaluation.generation import generate_items
from sysattn_exp.evaluation.lens import LogitLens, lens_plot
from sysattn_exp.evaluation.metrics import compare_with_baseline, shared_metrics
from sysattn_exp.evaluation.probe_plots import lens_flips_plot
from sysattn_exp.evaluation.probes import Recorders, item_flips
from sysattn_exp.evaluation.scoring import Scores, score_items
from sysattn_exp.evaluation.stats import SHARED, flip_counts, flips, job_statistics
from sysattn_exp.experiment.identity import condition, prompt_ablation
from sysattn_exp.experiment.job import Evaluation, Job, Watch, num_workers, sweep_job
from sysattn_exp.experiment.parity import check_metrics, job_parity
from sysattn_exp.experiment.readouts import job_states, probe_files
from sysattn_exp.experiment.shared_baseline import SharedBaseline
from sysattn_exp.experiment.tracking import (
    FLIPS_FILE,
    LENS_FLIPS_PLOT,
    LENS_PLOT,
    LENS_TABLE,
    PROFILE_HEADS_PLOT,
    PROFILE_HEADS_TABLE,
    PROFILE_PLOT,
    PROFILE_TABLE,
    storable_names,
)
from sysattn_exp.files import write_atomically
from sysattn_exp.models.ablation import (
    LABELS,
    NO_BOS,
    NO_SYSTEM,
    NO_SYSTEM_PROMPT,
    NONE,
    ablated_tokens,
    shown_tokens,
)
from sysattn_exp.models.ablation import system_prompt as ablation_system_prompt
from sysattn_exp.models.loading import (
    LoadedModel,
    first_token_ids,
    load_processor,
    prompt_format,
    prompt_modalities,
    tokenizer_of,
)
from sysattn_exp.models.prompts import PromptFormat

log = logging.getLogger(__name__)


class YesNoJob(Job):
    """A yes/no benchmark job: baseline and the configured condition."""

    logged = ("paired_accuracy", "yes_rate")

    @property
    def profiled(self) -> bool:
        return bool(self.cfg.runtime.get("profile"))

    def load(self) -> None:
        self.benchmark = load_benchmark(self.cfg.benchmark)
        self.benchmark_name = self.benchmark.name

    def check(self) -> None:
        cfg = self.cfg
        self.ranking = cfg.scoring.rank_by
        check_metric_names(self.benchmark, self.ranking)
        if cfg.scoring.mode == "generate" and cfg.runtime.profile:
            raise UsageError(
                "runtime.profile records the logit mode's answer row; use scoring.mode=logit"
            )
        if cfg.scoring.mode == "generate" and cfg.runtime.lens:
            raise UsageError(
                "runtime.lens reads the logit mode's answer row; use scoring.mode=logit"
            )
        if cfg.runtime.get("probes"):
            check_probes(cfg, self.benchmark)
        # A bad table, or an entry for this job with a metric it does not log, fails before
        # the model loads.
        check_metrics(cfg, lambda: metric_names(self.benchmark, self.ranking))

    def dry_run(self, config) -> tuple[dict, str]:
        """The data, the model's processor, the scored answer tokens: prints the counts, an
        example prompt, its token split and the scored tokens (in a sweep, for its first
        job only)."""
        items = self.benchmark.items
        summary = {
            "n_items": len(items),
            "n_groups": len({item.group_id for item in items}),
            "gt_yes_rate": sum(item.label for item in items) / len(items),
        } | self.benchmark.load_counts
        show = sweep_job() in (None, 0)
        summary |= dry_run_details(self.cfg, self.benchmark, config, summary, show)
        return summary, f"{summary['n_items']} items, {summary['n_groups']} groups"

    def evaluate(self, loaded: LoadedModel, edit: Rule | None, name: str, watch: Watch):
        # With runtime.probes, each condition's layer states go to disk while it is scored
        # (readouts.job_states), and are read and deleted before the job's files are written.
        changed = edit is not None or prompt_ablation(self.cfg) != NONE
        conditions = ["baseline"] + (["intervention"] if changed else [])
        n_items = len(self.benchmark.items)
        with job_states(self.cfg, loaded, n_items, conditions, self.out_dir) as states:
            evaluation = self.score(loaded, edit, name, watch, states)
        if not changed:  # a baseline job: compared with the published figures (parity.py)
            evaluation.metrics |= job_parity(self.cfg, evaluation.metrics)
        return evaluation

    def score(self, loaded: LoadedModel, edit: Rule | None, name: str, watch: Watch, states):
        """The baseline (the unchanged model on the unablated prompts) and, where the job
        changes something (a rule `edit`, a prompt.ablation, or both), its condition, with
        the change against the baseline: an ablation job is a baseline-like job whose
        "edit" is the prompt's change, compared with the same shared baseline as the
        rules' jobs (paired change, McNemar, intervals)."""
        cfg, benchmark, ranking = self.cfg, self.benchmark, self.ranking
        ablation = prompt_ablation(cfg)
        fmt = loaded.prompt_format(cfg.model)
        prompts = item_prompts(benchmark, fmt)
        asked = ablated_prompts(benchmark, fmt, ablation, prompts)  # the condition's
        words = scoring_words(loaded, cfg.scoring, prompts[0])
        changed = edit is not None or ablation != NONE
        check_guidance(edit, ablation)
        # The baseline is shared through the score cache by concurrent jobs (shared_baseline):
        # the parts nobody holds first, this job's own condition while others finish theirs.
        # A lens or the probes read every item anew: no shared baseline, no score cache.
        lenses = {"baseline": LogitLens(loaded)} if cfg.runtime.lens else {}
        if lenses and changed:
            lenses["intervention"] = LogitLens(loaded)
        readers = {c: Recorders(lenses.get(c), states.get(c)) for c in set(lenses) | set(states)}
        shared = None if readers else shared_baseline(cfg, loaded, benchmark, prompts, words)
        profile = AttentionProfile() if self.profiled else None
        if shared is not None:
            shared.compute_free_parts()
        if changed or profile is not None:
            with watch.passes():  # the job's metrics describe the condition's passes
                predictions, scores = predict(
                    cfg, loaded, benchmark, asked, edit, words, name, profile,
                    readers.get("intervention" if changed else "baseline"), ablation,
                )  # fmt: skip
        if shared is not None:
            shared.finish()
        # (A profile job without a rule has read the baseline's lens and states above.)
        baseline_lens = readers.get("baseline") if changed or profile is None else None
        baseline, baseline_scores = predict(
            cfg, loaded, benchmark, prompts, None, words, "baseline", lens=baseline_lens
        )
        if shared is not None:  # the parts this job computed
            baseline_scores = replace(
                baseline_scores, computed=shared.computed, seconds=shared.seconds
            )
        log.info(
            "baseline: %d of %d items computed by this job, the rest from the cache",
            baseline_scores.computed,
            len(prompts),
        )
        if not changed and profile is None:
            predictions, scores = baseline, baseline_scores
        # The predictions with each item's meta, built once for the metrics and statistics.
        scored = scored_frame(benchmark, predictions, ranking)
        metrics = all_metrics(benchmark, scored) | timing(scores, len(prompts))
        comparison, scored_baseline, flipped = {}, None, None
        artifacts = [] if profile is None else [profile_files(profile, name)]
        if changed:
            scored_baseline = scored_frame(benchmark, baseline, ranking)
            comparison = compare_with_baseline(metrics, all_metrics(benchmark, scored_baseline))
            flipped = flips(predictions, baseline)
            comparison |= flip_counts(flipped)
            artifacts.append(flips_file(flipped))
        if lenses:
            artifacts.append(lens_files(lenses, benchmark, name, flipped))
        if states:  # computed now, while the states are on disk
            answered = {"baseline": baseline, "intervention": predictions}
            artifacts.append(probe_files(cfg.stats, states, benchmark, answered, flipped, name))
        # SE and intervals of the job's figures (and of their change): after the checks.
        comparison |= statistics(cfg.stats, benchmark, scored, scored_baseline)
        return Evaluation(
            predictions,
            metrics,
            scores.computed,
            comparison=comparison,
            words=words,
            artifacts=artifacts,
        )


def check_probes(cfg, benchmark: Benchmark) -> None:
    """runtime.probes reads the logit mode's answer row and cross-validates over groups:
    UsageError in generate mode or with fewer than 2 groups."""
    if cfg.scoring.mode == "generate":
        raise UsageError("runtime.probes reads the logit mode's answer row; use scoring.mode=logit")
    n_groups = len({item.group_id for item in benchmark.items})
    if n_groups < 2:
        raise UsageError(
            f"runtime.probes cross-validates by group and needs at least 2 groups; "
            f"benchmark {benchmark.name} has {n_groups}"
        )


def profile_files(profile: AttentionProfile, name: str):
    """write(out_dir): the profile's table (PROFILE_TABLE) and heatmap (PROFILE_PLOT), its
    per-head table (PROFILE_HEADS_TABLE) and sink atlas (PROFILE_HEADS_PLOT), and its
    answer-position shares printed (profile_shares)."""

    def write(out_dir: Path) -> None:
        table, heads = profile.table(), profile.head_table()
        write_atomically(out_dir / PROFILE_TABLE, lambda p: table.to_csv(p, index=False))
        write_atomically(out_dir / PROFILE_HEADS_TABLE, lambda p: heads.to_csv(p, index=False))
        heatmap(table, out_dir / PROFILE_PLOT, f"{name}: share of the answer's attention")
        atlas(
            heads, out_dir / PROFILE_HEADS_PLOT, f"{name}: share of the answer's attention by head"
        )
        print(profile_shares(table, name))

    return write


def lens_files(lenses: dict, benchmark, name: str, flipped: pd.DataFrame | None = None):
    """write(out_dir): the lens readings of the baseline (and the intervention) as
    LENS_TABLE (item_id, group_id, label, condition, layer, log_odds, p_yes) and their
    mean log-odds by layer for yes- and no-label items as LENS_PLOT (lens.lens_plot); with
    an intervention's `flipped` items (stats.flips), the lens of the items it fixed, broke
    or left unchanged as LENS_FLIPS_PLOT (probe_plots.lens_flips_plot)."""

    def write(out_dir: Path) -> None:
        item_ids = [i.item_id for i in benchmark.items]
        items = pd.DataFrame(
            [(i.item_id, i.group_id, i.label) for i in benchmark.items],
            columns=["item_id", "group_id", "label"],
        )
        frames = [lens.table().assign(condition=condition) for condition, lens in lenses.items()]
        table = pd.concat(frames, ignore_index=True).join(items, on="item")
        table = table[["item_id", "group_id", "label", "condition", "layer", "log_odds", "p_yes"]]
        write_atomically(out_dir / LENS_TABLE, lambda p: table.to_parquet(p, index=False))
        lens_plot(table, out_dir / LENS_PLOT, f"{name}: logit lens of the answer")
        if flipped is not None:
            effect = pd.Series(item_flips(flipped, item_ids), index=item_ids)
            title = f"{name}: logit lens of fixed, broken and unchanged items"
            lens_flips_plot(table, effect, out_dir / LENS_FLIPS_PLOT, title)

    return write


def flips_file(flipped: pd.DataFrame):
    """write(out_dir): the items whose answer changed (stats.flips) as FLIPS_FILE."""

    def write(out_dir: Path) -> None:
        write_atomically(out_dir / FLIPS_FILE, lambda p: flipped.to_parquet(p, index=False))

    return write


def statistics(cfg, benchmark: Benchmark, scored: pd.DataFrame, baseline) -> dict:
    """stats.job_statistics of the job's scored frame (scored_frame; and of its change
    from `baseline`'s, None for a baseline job) for the shared metrics and the
    benchmark's native ones (benchmarks.STATISTICS, its STAT_METRICS), with cfg (the
    stats section)'s resamples, seed and interval method."""
    native = STATISTICS.get(benchmark.name)
    samples, seed, method = cfg.bootstrap_samples, cfg.seed, str(cfg.interval)
    return job_statistics(scored, baseline, native, samples, seed, method)


def predict(
    cfg, loaded, benchmark, prompts, edit, words, desc, profile=None, lens=None, ablation=NONE
) -> tuple[pd.DataFrame, Scores]:
    """Score every item (through the score cache, unless profiling or reading a lens):
    one row per item with the columns of predictions.parquet, and how the scoring went.
    `prompts` are rendered for `ablation` (ablated_prompts); its token removals happen
    as each batch is encoded (scoring.BatchEncoder)."""
    if cfg.scoring.mode == "generate":
        return predict_by_generation(cfg, loaded, benchmark, prompts, edit, words, desc, ablation)
    plain = None
    if edit is not None and edit.guidance is not None:
        fmt = ablated_format(loaded.prompt_format(cfg.model), ablation)
        plain = item_prompts(benchmark, fmt, with_image=False)
    cache = None
    if cfg.runtime.cache_dir and profile is None and lens is None:
        cache = ScoreCache(cfg.runtime.cache_dir, condition(cfg, loaded, edit, words, ablation))
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
        lens,
        ablation,
    )
    frame = item_columns(benchmark, prompts, scores)
    frame["pred"] = frame["yes_logit"] > frame["no_logit"]
    frame["correct"] = frame["pred"] == frame["label"]
    return frame, scores


def predict_by_generation(
    cfg, loaded, benchmark, prompts, edit, words, desc, ablation=NONE
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
        ablation,
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


RANKINGS = {  # scoring.rank_by: the score that metrics comparing two items rank by
    "p_yes": lambda frame: frame["p_yes"],  # VQAScore's P("Yes") over the whole vocabulary
    "log_odds": lambda frame: frame["yes_logit"] - frame["no_logit"],
}


def all_metrics(benchmark: Benchmark, scored: pd.DataFrame) -> dict:
    """Shared metrics, the benchmark's native ones (which see each item's meta as columns,
    and `rank_score`, the score that metrics comparing items rank by: `scored` is
    scored_frame's), and the counts from loading."""
    generated = {}
    if "answer" in scored:  # generate mode: answers that are neither yes nor no
        generated["unknown_rate"] = float((scored["answer"] == "unknown").mean())
    return (
        shared_metrics(scored)
        | generated
        | benchmark.native_metrics(scored)
        | benchmark.load_counts
    )


def statistic_names(benchmark: Benchmark) -> list[str]:
    """The names of the statistics an intervention job of `benchmark` writes (statistics)."""
    names = [*SHARED, *STAT_METRICS.get(benchmark.name, ())]
    suffixes = ("se", "ci_low", "ci_high", "change_ci_low", "change_ci_high", "change_p")
    return [f"{name}_{suffix}" for name in names for suffix in suffixes]


def scored_frame(benchmark: Benchmark, predictions: pd.DataFrame, ranking: str) -> pd.DataFrame:
    """The predictions (one row per item, in the benchmark's order) with each item's meta
    as columns and `rank_score` (RANKINGS): what native metrics read."""
    scored = predictions.join(pd.DataFrame([item.meta for item in benchmark.items]))
    scored["rank_score"] = RANKINGS[ranking](scored)
    return scored


def check_metric_names(benchmark: Benchmark, ranking: str) -> None:
    """UsageError, before the model loads, where two of the job's metric names would be
    logged to MLflow under one name (tracking.storable_names: e.g. MME categories "a:b"
    and "a_b"); found at logging time, after scoring, they could never be logged. The
    names are those of the metrics computed on answers equal to the labels."""
    try:
        names = metric_names(benchmark, ranking)
    except Exception:  # noqa: BLE001 - a check only: the job computes its own metrics anyway
        log.debug("metric names not checked before scoring", exc_info=True)
        return
    try:
        storable_names(names, "metrics")
    except ValueError as error:
        raise UsageError(f"benchmark {benchmark.name}: {error}") from error


def metric_names(benchmark: Benchmark, ranking: str) -> dict:
    """Every metric a job of `benchmark` logs (its values those of answers equal to the
    labels: the names are what matters), and its statistics' names."""
    labels = [item.label for item in benchmark.items]
    n = len(labels)
    scores = Scores([float(label) for label in labels], [0.5] * n, [0.5] * n, 0.0, 0)
    frame = item_columns(benchmark, [""] * n, scores)
    frame["pred"], frame["correct"] = frame["label"], True
    names = all_metrics(benchmark, scored_frame(benchmark, frame, ranking))
    return names | dict.fromkeys(statistic_names(benchmark))


def ablated_format(fmt: PromptFormat, ablation: str) -> PromptFormat:
    """The prompt format of `ablation`: without a system message under no-system-prompt
    (as model.system_prompt="" renders it: ablation.system_prompt), else `fmt`."""
    return replace(fmt, system_prompt=ablation_system_prompt(ablation, fmt.system_prompt))


def ablated_prompts(benchmark: Benchmark, fmt: PromptFormat, ablation: str, prompts) -> list:
    """Every item's prompt as the condition renders it: `prompts` (the baseline's) unless
    the ablation changes the text (no-system-prompt); no-bos and no-system remove tokens
    from the same text as it is encoded (scoring.BatchEncoder)."""
    if ablation != NO_SYSTEM_PROMPT:
        return prompts
    return item_prompts(benchmark, ablated_format(fmt, ablation))


def check_guidance(edit: Rule | None, ablation: str) -> None:
    """PAI's guidance reads the prompts without their image, encoded whole: it is not
    defined with tokens removed (no-bos, no-system). UsageError."""
    if edit is not None and edit.guidance is not None and ablation in (NO_BOS, NO_SYSTEM):
        raise UsageError(
            f"prompt.ablation={ablation} does not support the guidance of {edit.describe()}; "
            "use prompt.ablation=none or no-system-prompt, or a rule without guidance"
        )


def item_prompts(benchmark: Benchmark, fmt: PromptFormat, with_image=True) -> list[str]:
    """Every item's prompt (`with_image` False: each rendered without its image)."""
    return [
        fmt.render(benchmark.question_text(item), with_image and item.image_id is not None)
        for item in benchmark.items
    ]


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
    counts = {f"example_{k}_tokens": v for k, v in split.items()}
    ablation = prompt_ablation(cfg)
    if ablation == NONE:
        return counts
    fmt = ablated_format(prompt_format(cfg.model, processor, config.model_type), ablation)
    asked = fmt.render(question, with_image)
    removed, kept, left = ablated_tokens(
        processor, image_token_id, image, asked, question, ablation
    )
    if show:
        print(ablation_lines(ablation, prompt, asked, removed, kept, left, tokenizer, processor))
    return counts | {f"example_ablated_{k}_tokens": v for k, v in left.items()}


def ablation_lines(ablation, prompt, asked, removed, kept, left, tokenizer, processor) -> str:
    """What prompt.ablation leaves of the example prompt: the prompt's text where it
    changes (no-system-prompt), the tokens removed (no-bos, no-system), every token left
    (image-token runs collapsed) and its system / image / text split."""
    image_token = getattr(processor, "image_token", None)
    lines = [f"prompt.ablation={ablation} ({LABELS[ablation]}):"]
    if asked != prompt:
        lines.append(f"  prompt without its system message:\n{asked}")
    elif ablation == NO_SYSTEM_PROMPT:
        lines.append("  the prompt has no system message: unchanged, the ablation equals none")
    if ablation == NO_BOS and not removed:
        bos = tokenizer.bos_token
        lines.append(
            f"  the prompt does not start with a BOS token (the tokenizer's is {bos!r}): "
            "nothing removed, the ablation equals none"
        )
    elif ablation != NO_SYSTEM_PROMPT:
        lines.append(f"  removed {len(removed)} tokens: {shown_tokens(removed, image_token)}")
    lines.append(f"  left {len(kept)} tokens: {shown_tokens(kept, image_token)}")
    lines.append("  left's split: " + ", ".join(f"{k}={v}" for k, v in left.items()))
    return "\n".join(lines)


def profile_shares(table: pd.DataFrame, name: str) -> str:
    """The profile's answer-position shares per decoder layer, in percent, as a short
    table (the same numbers as attention_profile.csv's 'answer' rows and the heatmap)."""
    shares = table[table["queries"] == "answer"].set_index("layer")[list(MODALITIES)]
    percent = (100 * shares).round(1)
    percent.columns = [f"{m} %" for m in MODALITIES]
    return f"{name}: share of the answer position's attention per decoder layer\n" + (
        percent.to_string()
    )
