"""Benchmarks by name. Each module's `load(cfg) -> Benchmark` reads the data and checks it."""

from sysattn_exp.benchmarks import jsonl, toy
from sysattn_exp.benchmarks.base import Benchmark, Item, first_groups
from sysattn_exp.errors import UsageError

LOADERS = {"toy": toy.load, "jsonl": jsonl.load}

__all__ = ["Benchmark", "Item", "load_benchmark"]


def load_benchmark(cfg) -> Benchmark:
    if cfg.name not in LOADERS:
        raise UsageError(f"benchmark.name={cfg.name!r} is unknown; allowed: {', '.join(LOADERS)}")
    benchmark = LOADERS[cfg.name](cfg)
    benchmark.items = first_groups(benchmark.items, cfg.get("limit"))
    return benchmark
