"""The study's size, for the time estimates of scripts/bench.py and scripts/device_check.py:
items per benchmark (HallusionBench: every question, 178 without an image; BEAF: ver0
release) and evaluations per sweep. Plain constants: device_check.py imports this where
Hydra, pandas and datasets cannot be imported."""

BENCHMARK_ITEMS = {
    "mme": 2374,
    "hallusionbench": 1129,
    "naturalbench": 7600,
    "winoground": 1600,
    "sugarcrepe": 15022,
    "beaf": 26118,
}
QUARTERS_JOBS = 12 + 1  # the 12 conditions and the baseline they share
PAPER_JOBS = 28  # +sweep=paper: 28 conditions, the baseline among them
