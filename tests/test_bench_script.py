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


GRID_FIGURES = [
    f"{name}_{stat}{clock}"
    for name in (
        "grid_runner_overhead",
        "grid_runner_overhead_system_image",
        "grid_forward_overhead",
        "grid_runner_noise",
    )
    for stat in ("worst", "median")
    for clock in ("", "_wall")
]


def test_bench_grid_quick_writes_the_grid_figures(tmp_path):
    """--grid --quick: two cells, each with the runner- and forward-level ratios and the
    A/A control (the baseline job against itself), and the median and worst of each
    figure (CPU time and wall time)."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"
    out = tmp_path / "grid.json"
    result = subprocess.run(
        [sys.executable, str(script), "--grid", "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    cells = figures["grid_cells"]
    assert len(cells) == 2
    for name in GRID_FIGURES:
        assert isinstance(figures[name], float) and figures[name] > 0, name
    column = {
        "grid_runner_overhead": "runner_system_text",
        "grid_forward_overhead": "forward",
        "grid_runner_noise": "runner_noise",
    }
    for name, key in column.items():
        assert figures[f"{name}_worst"] == max(c[key] for c in cells)
    assert "| runner_system_text |" in result.stdout and "grid: 2 cells in" in result.stdout


def test_grid_is_a_strength_two_covering_array():
    """Every pair of levels of any two axes occurs in some cell of the full grid (checked
    pair by pair, independently of how the array was built), and it is far smaller than
    the full factorial."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import bench_grid

    cells = bench_grid.covering_array(bench_grid.AXES)
    assert cells == bench_grid.covering_array(bench_grid.AXES)  # deterministic
    names = list(bench_grid.AXES)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            for level_a in bench_grid.AXES[a]:
                for level_b in bench_grid.AXES[b]:
                    assert any(c[a] == level_a and c[b] == level_b for c in cells), (a, b)
    assert len(cells) < 30 < 864
