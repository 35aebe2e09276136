"""Benchmarks by name. Each module's `load(cfg) -> Benchmark` reads the data, checks it and
forms the groups (checking that each has the structure the metrics assume);
load_benchmark then decodes every image the job will use, before any model loads;
`Benchmark.native_metrics` computes the benchmark's own metrics."""

import copy

from omegaconf import open_dict

from sysattn_exp.benchmarks import (
    beaf,
    hallusionbench,
    jsonl,
    mme,
    naturalbench,
    pope,
    sugarcrepe,
    toy,
    winoground,
)
from sysattn_exp.benchmarks.base import (
    Benchmark,
    Item,
    SummedStatistics,
    first_groups,
    mme_answer,
    prompt_preset,
    split_groups,
    usable_groups,
)
from sysattn_exp.errors import UsageError

LOADERS = {
    "toy": toy.load,
    "jsonl": jsonl.load,
    "mme": mme.load,
    "hallusionbench": hallusionbench.load,
    "naturalbench": naturalbench.load,
    "winoground": winoground.load,
    "sugarcrepe": sugarcrepe.load,
    "beaf": beaf.load,
    "pope": pope.load,
}

WITH_NATIVE_METRICS = (mme, hallusionbench, naturalbench, winoground, sugarcrepe, beaf, pope)
MAIN_METRICS = {
    module.__name__.rsplit(".", 1)[1]: module.MAIN_METRIC for module in WITH_NATIVE_METRICS
}
# The native metrics given SE, CI and change statistics (evaluation.stats), each a function
# of sums over the benchmark's groups (base.SummedStatistics): all resamples are vectorised.
STATISTICS = {
    module.__name__.rsplit(".", 1)[1]: module.STATISTICS for module in WITH_NATIVE_METRICS
}
STAT_METRICS = {name: statistics.names for name, statistics in STATISTICS.items()}

# Each benchmark's own parser of generated answers (scoring.parser=native): text -> "yes",
# "no" or "unknown", as its official evaluation code reads answers (README, "Answers by
# generation"); a benchmark not listed here (toy, jsonl) has MME's rule.
NATIVE_PARSERS = {
    "mme": mme.parse_generated,
    "hallusionbench": hallusionbench.parse_generated,
    "naturalbench": naturalbench.parse_generated,
    "winoground": winoground.parse_generated,
    "sugarcrepe": sugarcrepe.parse_generated,
    "beaf": beaf.parse_generated,
    "pope": pope.parse_generated,
}
__all__ = [
    "MAIN_METRICS",
    "STATISTICS",
    "STAT_METRICS",
    "Benchmark",
    "Item",
    "SummedStatistics",
    "answer_parser",
    "load_benchmark",
]


def answer_parser(benchmark_name: str, parser: str):
    """The function that reads a generated answer as "yes", "no" or "unknown":
    scoring.parser=native, the benchmark's own (NATIVE_PARSERS, else MME's rule); mme,
    MME's eval tool rule for every benchmark (schema.Parser)."""
    if parser == "mme":
        return mme_answer
    return NATIVE_PARSERS.get(benchmark_name, mme_answer)


def load_benchmark(cfg) -> Benchmark:
    """The benchmark `cfg` (a benchmark section that schema.check_config has checked)
    names, its items limited and their images decoded."""
    template, remove = prompt_preset(cfg)
    # Loaders read the prompt template from cfg.template: hand them the preset's.
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.template = template
    benchmark = LOADERS[cfg.name](cfg)
    benchmark.remove = remove
    # One half of the groups (python -m sysattn_exp.locate), before the limit: the first
    # `limit` groups of that half.
    half = cfg.get("split_half")
    fraction, seed = cfg.get("calibration_fraction", 0.5), cfg.get("calibration_seed", 0)
    benchmark.items = split_groups(benchmark.items, half, fraction, seed)
    limit = cfg.get("limit")
    if benchmark.image_files:
        # Every image the job will use is decoded now, before the (slow) model load.
        benchmark.items, skipped = usable_groups(
            benchmark, limit, bool(cfg.get("skip_missing_images", False))
        )
        benchmark.load_counts["n_skipped_items"] = skipped
    else:
        benchmark.items = first_groups(benchmark.items, limit)
    if not benchmark.items:
        raise UsageError(f"benchmark={cfg.name} has no items to evaluate")
    no_image = sum(item.image_id is None for item in benchmark.items)
    if no_image or "n_no_image_items" in benchmark.load_counts:
        # Counted after the limit: the items this job scores without an image.
        benchmark.load_counts["n_no_image_items"] = no_image
    return benchmark
