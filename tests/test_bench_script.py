"""scripts/bench.py runs and writes every figure (its numbers are read by people, not
asserted here: timings belong in the benchmark, not in unit tests)."""

import json
import subprocess
import sys
from pathlib import Path

FIGURES = [
    "overhead_ratio",
    "runner_overhead_ratio",
    "runner_overhead_ratio_system_image",
    "head_selective_overhead_ratio",
    "lens_overhead_ratio",
    "eager_overhead_ratio",
    "speedup_vs_naive",
    "prefix_sharing_speedup",
    "long_context_memory_ratio",
    "long_sequence_overhead_ratio",
    "long_sequence_padded_overhead_ratio",
    "long_sequence_memory_ratio",
    "items_per_second",
    "generated_tokens_per_second",
    "generation_overhead_ratio",
    "quarters_sweep_hours_all_six",
    "paper_sweep_hours_all_six",
    "stats_seconds_beaf_size",
]


def test_bench_quick_writes_all_figures(tmp_path):
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(script), "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    for name in FIGURES:
        assert isinstance(figures[name], float) and figures[name] > 0, name
    assert figures["tokens_per_prompt"] > 576  # LLaVA-1.5's 576 image tokens and the text
