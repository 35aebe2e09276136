"""scripts/bench.py runs and writes every figure (its numbers are read by people, not
asserted here: timings belong in the benchmark, not in unit tests)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

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
] + ["grid_runner_attributable_worst", "grid_runner_attributable_median"]


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


def scripts_on_path():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def test_cell_shape_measures_a_shape_outside_the_grid():
    """--cell-shape's parser gives a cell of every axis, and the grid measures it instead of
    its own cells: every ratio of the row, the A/A control and the rounds run."""
    scripts_on_path()
    import bench
    import bench_grid

    words = "depth=2 heads=4 kv_heads=2 head_dim=16 image_tokens=16 questions=2 question_tokens=10"
    shape = bench_grid.parse_shape([*words.split(), "batch=2"])
    assert shape == dict(depth=2, heads=4, kv_heads="2", head_dim=16, image_tokens=16,
                         questions=2, question_tokens=10, batch=2)  # fmt: skip
    assert bench_grid.parse_shape(["kv_heads==heads", *words.split()[:2], *words.split()[3:],
                                   "batch=1"])["kv_heads"] == "=heads"  # fmt: skip
    figures = bench_grid.grid(True, 1, (bench.answer_words, bench.forward_runs), shapes=[shape])
    (row,) = figures["grid_cells"]
    assert {k: row[k] for k in shape} == shape and row["cell"] == 1
    assert row["runner_rounds"] == row["forward_rounds"] == 1
    for column in ("runner_system_text", "runner_system_image", "forward", "runner_noise"):
        assert row[column] > 0 and row[column + "_wall"] > 0
    assert figures["grid_runner_noise_worst"] == row["runner_noise"]
    assert row["edited_calls"] > 0 and row["runner_attributable"] > 0


BAD_SHAPES = [
    (["depth=2"], "missing heads, kv_heads"),
    (["layers=2"], "'layers' is not an axis; allowed: depth, heads"),
    (["depth=0"], "depth=0: the level must be an integer >= 1"),
    (["depth=2", "heads=6", "kv_heads=4", "head_dim=8", "image_tokens=4", "questions=1",
      "question_tokens=10", "batch=1"], "kv_heads=4 does not divide heads=6"),
]  # fmt: skip


@pytest.mark.parametrize("words,message", BAD_SHAPES)
def test_cell_shape_refuses_bad_words_in_one_line(words, message):
    scripts_on_path()
    import bench_grid

    with pytest.raises(ValueError, match=re.escape(message)) as error:
        bench_grid.parse_shape(words)
    assert "\n" not in str(error.value)


def test_cell_shape_bad_on_the_command_line_exits_2():
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"
    result = subprocess.run(
        [sys.executable, str(script), "--grid", "--cell-shape", "depth=x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: --cell-shape depth=x: the level must be an integer >= 1" in result.stderr
