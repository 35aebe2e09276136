"""Per-layer localisation (+sweep=layers, +sweep=windows): the windows on each model's
own depth, one intervention pass per window and one shared baseline, and the report's
layer plot and verdict, through the real CLI."""

import json

import pandas as pd
import pytest
import yaml
from cli import read_metrics, run_cli
from omegaconf import OmegaConf

from sysattn_exp.errors import UsageError
from sysattn_exp.experiment.identity import job_key
from sysattn_exp.experiment.layer_sweeps import sweep_starts, window_starts
from sysattn_exp.experiment.tracking import DRY_RUN_FILE


def naive_starts(depth: int, window: int, stride: int) -> list[int]:
    """Every layer that starts a whole window and is a multiple of the stride from 0."""
    return [s for s in range(depth) if s % stride == 0 and s + window <= depth]


@pytest.mark.parametrize(
    "depth, window, stride", [(32, 1, 1), (32, 4, 2), (28, 4, 2), (8, 3, 2), (4, 4, 2), (5, 2, 3)]
)
def test_window_starts_cover_the_depth(depth, window, stride):
    assert window_starts(depth, window, stride) == naive_starts(depth, window, stride)


def test_a_32_layer_model_has_32_single_layers_and_15_windows_of_4():
    assert len(window_starts(32, 1, 1)) == 32
    assert window_starts(32, 4, 2) == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28]


@pytest.mark.parametrize(
    "window, stride, message",
    [
        (9, 1, "sweep.window=9 is larger than the model's 8 decoder layers; allowed 1 to 8"),
        (0, 1, "sweep.window=0 must be a whole number >= 1"),
        (2, 0, "sweep.stride=0 must be a whole number >= 1"),
        ("two", 1, "sweep.window='two' must be a whole number >= 1"),
    ],
)
def test_bad_windows_are_refused(window, stride, message):
    with pytest.raises(UsageError) as error:
        window_starts(8, window, stride)
    assert str(error.value) == message


def test_the_depth_is_each_models_own():
    """Hydra's range over the starts, from the model's config (no weights): a 28-layer
    Qwen2.5-VL, the 4-layer toy model."""
    qwen = OmegaConf.create(
        {"name_or_path": "Qwen/Qwen2.5-VL-7B-Instruct", "revision": None, "weights": "random"}
    )
    assert sweep_starts(qwen, 4, 2) == "range(0,25,2)"  # 0, 2, ..., 24: the last ends at 28
    toy = OmegaConf.create({"name_or_path": "builtin:toy", "revision": None})
    assert sweep_starts(toy, 1, 1) == "range(0,4,1)"


def test_the_sweep_section_is_not_in_the_job_key():
    """A sweep job keeps the key of the same layers.start/end given by hand."""
    by_hand = {"layers": {"quarter": None, "start": 2, "end": 4}, "model": {"batch_size": 1}}
    swept = by_hand | {"sweep": {"window": 2, "stride": 1}}
    assert job_key(swept, {"c": 1}) == job_key(by_hand, {"c": 1})


def test_windows_dry_run_on_the_toy_model(tmp_path):
    """In a submitit worker process, which resolves its own layers.end: windows of 3 at
    stride 2 on 4 layers are one job, layers 0-2 (layer 3 is in no window: said)."""
    result = run_cli(
        "+sweep=windows", "model=toy", "sweep.window=3", "sweep.stride=2",
        "hydra/launcher=submitit_local", "runtime.dry_run=true", "benchmark.limit=1",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep_dir,) = (tmp_path / "outputs" / "multiruns").iterdir()
    jobs = sorted(sweep_dir.glob("job*"), key=lambda p: int(p.name[3:]))
    layers = [json.loads((job / DRY_RUN_FILE).read_text())["layers"] for job in jobs]
    assert layers == [[0, 1, 2]]
    assert "dry run: 1 of 1 jobs' configs are valid" in result.stdout
    assert "on 4 decoder layers: layers 3 are in no window" in result.stdout + result.stderr


@pytest.fixture(scope="module")
def layer_sweep(tmp_path_factory):
    """+sweep=layers on the tiny model (8 decoder layers), 2 groups of the toy benchmark."""
    cwd = tmp_path_factory.mktemp("layers")
    result = run_cli("+sweep=layers", "model=tiny", "benchmark.limit=2", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep_dir,) = (cwd / "outputs" / "multiruns").iterdir()
    jobs = sorted(sweep_dir.glob("job*"), key=lambda p: int(p.name[3:]))
    return cwd, sweep_dir, jobs, result


def test_one_job_per_layer(layer_sweep):
    _, _, jobs, _ = layer_sweep
    configs = [yaml.safe_load((job / "config.yaml").read_text()) for job in jobs]
    assert [c["layers"]["resolved"] for c in configs] == [[k] for k in range(8)]
    assert all(c["intervention"]["recipients"] == ["text"] for c in configs)
    assert all(read_metrics(job)["edited_layers"] == 1 for job in jobs)


def test_one_pass_per_layer_and_one_baseline(layer_sweep):
    """8 layers: 8 intervention passes over the items and one baseline pass, counted in
    the score cache (every item scored now is written there, under its condition)."""
    cwd, _, jobs, result = layer_sweep
    n_items = read_metrics(jobs[0])["n_items"]
    assert n_items == 4
    computed = {}
    for folder in (cwd / "outputs" / "cache").iterdir():
        lines = [line for f in folder.glob("scores-*.jsonl") for line in f.read_text().split("\n")]
        computed[folder.name] = sum(len(json.loads(line)["keys"]) for line in lines if line)
    assert sorted(computed.values()) == [n_items] * (8 + 1)  # 8 windows and the baseline
    assert all(read_metrics(job)["n_items_from_cache"] == 0 for job in jobs)
    output = result.stdout + result.stderr
    assert output.count(f"baseline: {n_items} of {n_items} items computed") == 1
    assert output.count(f"baseline: 0 of {n_items} items computed") == 7


def test_the_report_draws_and_names_the_windows(layer_sweep):
    _, sweep_dir, jobs, result = layer_sweep
    report = sweep_dir / "report"
    plot = report / "layers_toy.png"
    assert plot.is_file() and str(plot.resolve()) in result.stdout
    table = pd.read_csv(report / "comparison.csv")
    edits = table[table["intervention"] != "baseline"].set_index("layers")
    for k, job in enumerate(jobs):
        metrics = read_metrics(job)
        row = edits.loc[f"{k}-{k}"]
        assert row["yes_rate_change_points"] == pytest.approx(
            100 * (metrics["yes_rate"] - metrics["baseline_yes_rate"])
        )
        for end in ("low", "high"):
            assert row[f"yes_rate_change_ci_{end}_points"] == pytest.approx(
                100 * metrics[f"yes_rate_change_ci_{end}"]
            )
            assert row[f"change_ci_{end}_points"] == pytest.approx(
                100 * metrics[f"paired_accuracy_change_ci_{end}"]
            )
    # The verdict, recomputed from the table: the largest significant gain, or none.
    gains = edits[(edits["significant"] == "yes") & (edits["paired_accuracy_change_points"] > 0)]
    text = (report / "comparison.md").read_text()
    assert "## Where in depth" in text and text in result.stdout
    (line,) = [x for x in text.splitlines() if x.startswith("- toy, system->text, single layers")]
    if gains.empty:
        assert "no window's gain is significant" in line
    else:
        best = gains["paired_accuracy_change_points"].idxmax()
        assert f"largest significant gain at layers {best}:" in line


def known_table() -> pd.DataFrame:
    """A report table of a single-layer sweep (4 layers) and a 2-layer window sweep, with
    known changes, intervals and verdicts, and a quarter job that is no window."""
    rows = [  # layers, change, CI, yes-rate change and CI, significant, corrected p
        ("0-0", -5.0, (-9.0, -1.0), 10.0, (4.0, 16.0), "yes", 0.01),
        ("1-1", 4.0, (1.0, 7.0), -3.0, (-6.0, 0.0), "yes", 0.02),
        ("2-2", 6.0, (2.0, 10.0), -8.0, (-12.0, -4.0), "yes", 0.004),
        ("3-3", 9.0, (-1.0, 19.0), 1.0, (-2.0, 4.0), "no", 0.2),
        ("0-1", 1.0, (-2.0, 4.0), 0.0, (-1.0, 1.0), "no", 0.9),
        ("2-3", 2.0, (-1.0, 5.0), 0.5, (-1.0, 2.0), "no", 0.5),
        ("q4 (3-3)", 9.0, (-1.0, 19.0), 1.0, (-2.0, 4.0), "no", 0.2),
    ]
    base = {
        "benchmark": "toy",
        "model": "toy (4 layers)",
        "setting": "",
        "intervention": "system->text",
    }
    table = pd.DataFrame(
        [
            base
            | {
                "layers": layers,
                "paired_accuracy_change_points": change,
                "change_ci_low_points": ci[0],
                "change_ci_high_points": ci[1],
                "yes_rate_change_points": yes,
                "yes_rate_change_ci_low_points": yes_ci[0],
                "yes_rate_change_ci_high_points": yes_ci[1],
                "significant": significant,
                "p_corrected": p,
            }
            for layers, change, ci, yes, yes_ci, significant, p in rows
        ]
    )
    baseline = base | {"intervention": "baseline", "layers": "-"}
    return pd.concat([table, pd.DataFrame([baseline])], ignore_index=True)


def test_the_verdict_names_the_largest_significant_gain():
    from sysattn_exp.experiment.report_layers import localisation_markdown
    from sysattn_exp.experiment.report_stats import Evidence

    text = localisation_markdown(known_table(), Evidence("holm", 0.05))
    lines = [line for line in text.splitlines() if line.startswith("- ")]
    assert lines == [
        "- toy, system->text, single layers, toy (4 layers): largest significant gain at "
        "layers 2-2: +6.0 points [95% CI +2.0, +10.0], p (holm) 0.004",
        "- toy, system->text, 2-layer windows, toy (4 layers): no window's gain is "
        "significant (* holm-corrected p <= 0.05)",
    ]


def test_the_layer_plot_draws_each_window_with_its_band():
    from sysattn_exp.experiment.report_layers import layer_plot, window_lines
    from sysattn_exp.experiment.report_plots import panel_names
    from sysattn_exp.experiment.report_stats import Evidence

    table = known_table()
    edits = table[table["intervention"] != "baseline"]
    lines = window_lines(edits.assign(panel=panel_names(edits)))
    assert list(lines) == [
        ("toy (4 layers)", "system->text", 1),
        ("toy (4 layers)", "system->text", 2),
    ]
    fig = layer_plot(lines, "toy", Evidence("holm", 0.05))
    accuracy, yes_rate = fig.axes
    single = accuracy.get_lines()[0]
    assert list(single.get_xdata()) == [0, 1, 2, 3]
    assert list(single.get_ydata()) == [-5.0, 4.0, 6.0, 9.0]
    assert list(accuracy.get_lines()[1].get_xdata()) == [0, 1, 2]  # the stars: significant
    band = accuracy.collections[0].get_paths()[0].vertices[:, 1]
    assert {-9.0, 1.0, 2.0, -1.0, -1.0, 7.0, 10.0, 19.0} <= set(band)
    assert list(yes_rate.get_lines()[0].get_ydata()) == [10.0, -3.0, -8.0, 1.0]
    assert list(yes_rate.get_lines()[1].get_xdata()) == [0, 2]  # the 2-layer windows


def test_sync_finds_the_sweeps_parent_by_its_key(layer_sweep, tmp_path, monkeypatch):
    """python -m sysattn_exp.sync keys a sweep whose parent it has no record of from its
    multirun.yaml (experiment/sync.ensure_parent): the swept layers.start resolves there
    too, to the callback's key, so it finds the parent the callback created."""
    from sysattn_exp.experiment.sync import ensure_parent, tracking_config
    from sysattn_exp.experiment.tracking import SWEEP_MARKER

    cwd, sweep_dir, jobs, _ = layer_sweep
    monkeypatch.chdir(cwd)  # the store's URI is relative to where the sweep ran
    copy = tmp_path / "sweep"
    copy.mkdir()
    (copy / "multirun.yaml").write_text((sweep_dir / "multirun.yaml").read_text())
    ensure_parent(copy, tracking_config(jobs[0], None))
    found = json.loads((copy / SWEEP_MARKER).read_text())
    assert found == json.loads((sweep_dir / SWEEP_MARKER).read_text())
