"""The report's evidence (experiment/report_stats.py): each condition's p against its
baseline corrected per benchmark, significance marks in the tables and plots, the CI of the
change, the power line, the dose plot, and the summary across benchmarks with the Wilcoxon
signed-rank test; each checked against an independent computation (statsmodels, scipy, by
hand) on what MLflow holds.

The toy store is real: a sweep of the toy model at two fractions of system -> image in Q1
through the command line, plus a run logged as versions before statistics logged one
(no test, no interval). The six-benchmark store is logged directly (no such benchmarks
offline) with known p-values and changes."""

import subprocess
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest
from cli import run_cli
from figures import record_figures
from matplotlib.figure import Figure
from omegaconf import OmegaConf
from scipy.stats import wilcoxon
from statsmodels.stats.multitest import multipletests

from sysattn_exp.evaluation.power import power_line
from sysattn_exp.experiment.report import main, report

SWEEP = (
    "-m",
    "model=toy",
    "benchmark=toy",
    "intervention=redistribute",
    "intervention.source=system",
    "intervention.recipients=[image]",
    "layers=q1",
    "intervention.fraction=0.5,1.0",
)
# What a run logged before statistics existed has (README, Results).
OLD_METRICS = ("paired_accuracy", "yes_rate", "yes_bias", "accuracy", "gt_yes_rate", "n_groups")
OLD_METRICS += tuple(f"baseline_{m}" for m in OLD_METRICS)
OLD_METRICS += ("paired_accuracy_change_points", "paired_accuracy_change_pct")


@pytest.fixture(scope="module")
def toy_store(tmp_path_factory):
    """(cwd, tracking, parent run id, the job runs as MLflow has them): the real sweep and
    an old-style run at fraction 0.25 under the same parent."""
    cwd = tmp_path_factory.mktemp("toy")
    result = run_cli(*SWEEP, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    uri = f"sqlite:///{cwd}/outputs/mlflow.db"
    mlflow.set_tracking_uri(uri)
    (parent,) = mlflow.search_runs(
        search_all_experiments=True, filter_string="tags.`sysattn.kind` = 'sweep'"
    )["run_id"]
    runs = job_runs(uri)
    full = runs[runs["params.intervention.fraction"] == "0.5"].iloc[0]
    params = {k[7:]: v for k, v in full.items() if k.startswith("params.") and v is not None}
    params |= {"intervention.fraction": "0.25", "job.label": "system->image f=0.25"}
    with mlflow.start_run(
        experiment_id=full["experiment_id"],
        tags={"sysattn.kind": "job", "mlflow.parentRunId": parent},
    ):
        mlflow.log_params(params)
        mlflow.log_metrics({m: float(full[f"metrics.{m}"]) for m in OLD_METRICS})
    tracking = {"uri": uri, "experiment": "sysattn", "artifact_location": str(cwd)}
    return cwd, tracking, parent, job_runs(uri)


def job_runs(uri: str) -> pd.DataFrame:
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(
        search_all_experiments=True, filter_string="tags.`sysattn.kind` = 'job'"
    )


def by_fraction(frame: pd.DataFrame) -> pd.DataFrame:
    edits = frame[frame["intervention"] != "baseline"]
    return edits.set_index(edits["intervention"].str.extract(r"f=(\S+)")[0].fillna("1"))


def logged_by_fraction(runs: pd.DataFrame) -> pd.DataFrame:
    edits = runs[runs["params.intervention.name"] != "none"]
    fraction = edits["params.intervention.fraction"].astype(float).map(lambda f: f"{f:g}")
    return edits.set_index(fraction)


def record_extras(monkeypatch) -> dict:
    """{file name: (colour bar labels, [(x, y) of each line])} as figures are saved."""
    extras, savefig = {}, Figure.savefig

    def recording(fig, fname, *args, **kwargs):
        bars = [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"]
        lines = [
            (list(line.get_xdata()), list(line.get_ydata()))
            for ax in fig.axes
            for line in ax.get_lines()
        ]
        extras[str(fname).rsplit("/", 1)[-1]] = (bars, lines)
        return savefig(fig, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording)
    return extras


def test_cli_report_corrects_each_benchmarks_p_values_by_holm(toy_store, tmp_path):
    cwd, tracking, parent, runs = toy_store
    out = tmp_path / "report"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sysattn_exp.report",
            f"tracking.uri={tracking['uri']}",
            f"report.parent={parent}",
            f"report.out={out}",
        ],
        capture_output=True,
        text=True,
        cwd=cwd,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = by_fraction(pd.read_csv(out / "comparison.csv"))
    logged = logged_by_fraction(runs)
    assert sorted(table.index) == ["0.25", "0.5", "1"]
    tested = ["0.5", "1"]
    p = logged.loc[tested, "metrics.paired_accuracy_mcnemar_p"].to_numpy()
    assert table.loc[tested, "p_value"].to_numpy() == pytest.approx(p)
    holm = multipletests(p, alpha=0.05, method="holm")
    assert table.loc[tested, "p_corrected"].to_numpy() == pytest.approx(holm[1])
    assert list(table.loc[tested, "significant"]) == ["yes" if r else "no" for r in holm[0]]
    for end in ("low", "high"):
        ci = 100 * logged.loc[tested, f"metrics.paired_accuracy_change_ci_{end}"].to_numpy()
        assert table.loc[tested, f"change_ci_{end}_points"].to_numpy() == pytest.approx(ci)
    for column, metric in [
        ("groups_broken", "paired_accuracy_mcnemar_b"),
        ("items_fixed", "n_fixed"),
    ]:
        assert table.loc[tested, column].to_numpy() == pytest.approx(
            logged.loc[tested, f"metrics.{metric}"].to_numpy()
        )
    assert set(table.loc[tested, "test"]) == {"McNemar exact (groups)"}
    # The run logged before statistics: its figures, blanks for the evidence.
    old = table.loc["0.25"]
    assert old["paired_accuracy_change_points"] == pytest.approx(
        logged.loc["0.5", "metrics.paired_accuracy_change_points"]
    )
    for column in ("test", "p_value", "p_corrected", "significant", "change_ci_low_points"):
        assert pd.isna(old[column]), column
    # The printed report: the change, its CI and significance per condition; the power line
    # at the median observed discordance, computed here from the logged counts.
    discordance = (
        logged.loc[tested, "metrics.paired_accuracy_mcnemar_b"]
        + logged.loc[tested, "metrics.paired_accuracy_mcnemar_c"]
    ) / logged.loc[tested, "metrics.n_groups"]
    power = power_line(36, float(np.median(discordance)), 0.05)
    assert f"conditions: {power}." in result.stdout
    header = next(line for line in result.stdout.splitlines() if "change 95% CI" in line)
    for name in ("change (points)", "change 95% CI (points)", "p (holm)", "significant"):
        assert f"| {name} |" in header
    row = table.loc["1"]
    ci = f"[{row.change_ci_low_points:+.1f}, {row.change_ci_high_points:+.1f}]"
    assert f"| {row.paired_accuracy_change_points:.1f} | " in result.stdout and ci in result.stdout
    assert "holm-corrected p <= 0.05" in (out / "comparison.md").read_text()
    summary = pd.read_csv(out / "summary.csv", keep_default_na=False)
    assert set(summary["wilcoxon_note"]) == {"needs >= 5 benchmarks"}
    assert set(summary["wilcoxon_p"]) == {""}


@pytest.mark.parametrize("correction", ["bonferroni", "none"])
def test_bonferroni_and_no_correction_mark_the_same_cells_everywhere(
    toy_store, tmp_path, monkeypatch, correction
):
    """Bonferroni by hand (m = the 2 tested conditions; the old run has no p), and none;
    alpha 0.2, at which the toy's system -> image q1 (6 groups broken, none fixed:
    p = 0.031) is significant. The mark is where significant is yes: in the paper's table
    (with a footnote), on the heatmap (and its colour bar says what it means) and the dose
    plot, whose line runs through the logged changes with a band of their intervals."""
    _, tracking, parent, runs = toy_store
    figures, extras = record_figures(monkeypatch), None
    extras = record_extras(monkeypatch)
    out = tmp_path / correction
    settings = {"parent": parent, "out": str(out), "correction": correction, "alpha": 0.2}
    report(OmegaConf.create({"tracking": tracking, "report": settings}))
    table = by_fraction(pd.read_csv(out / "comparison.csv"))
    logged = logged_by_fraction(runs)
    p = logged.loc[["0.5", "1"], "metrics.paired_accuracy_mcnemar_p"].to_numpy()
    expected = np.minimum(1, 2 * p) if correction == "bonferroni" else p
    assert table.loc[["0.5", "1"], "p_corrected"].to_numpy() == pytest.approx(expected)
    significant = {f: s == "yes" for f, s in table["significant"].items() if isinstance(s, str)}
    assert significant == {f: bool(v <= 0.2) for f, v in zip(["0.5", "1"], expected, strict=True)}
    assert significant["1"]  # the data marks something
    paper = (out / "paper_table.md").read_text()
    cells = {  # condition -> its toy cell
        line.split("|")[1].strip(): line.split("|")[2].strip()
        for line in paper.splitlines()
        if line.startswith("| system->")
    }
    for fraction, row in table.iterrows():
        cell = cells[f"{row.intervention} {row.layers}"]
        assert f"({row.paired_accuracy_change_points:+.1f} pts" in cell
        assert cell.endswith("*") == significant.get(fraction, False), fraction
        if fraction in significant:
            low, high = row.change_ci_low_points, row.change_ci_high_points
            assert cell.endswith(f"pts) [{low:+.1f}, {high:+.1f}]" + "*" * significant[fraction])
        else:  # the old run: no interval
            assert cell.endswith("pts)")
    mark = "* uncorrected p <= 0.2" if correction == "none" else "* bonferroni-corrected p <= 0.2"
    how = "without correction" if correction == "none" else "after correcting"
    assert f"{mark}: significant {how}" in paper
    (heat,) = figures["heatmap_toy.png"]
    expected_texts = {
        f"{row.paired_accuracy_change_points:+.1f}" + ("*" if significant.get(f) else "")
        for f, row in table.iterrows()
    }
    assert set(heat["texts"]) == expected_texts
    assert extras["heatmap_toy.png"][0] == [f"points vs baseline\n{mark}"]
    (dose,) = figures["dose_toy.png"]
    assert dose["xlabel"] == "fraction of the source's attention moved"
    assert mark in dose["title"]
    xs, ys = extras["dose_toy.png"][1][0]  # the first line: system->image q1 (0-0)
    assert xs == pytest.approx([0.25, 0.5, 1.0])
    assert ys == pytest.approx(
        list(table.loc[["0.25", "0.5", "1"], "paired_accuracy_change_points"])
    )
    starred = extras["dose_toy.png"][1][1][0]
    assert starred == pytest.approx([float(f) for f, s in significant.items() if s])


def log_run(experiment, parent, benchmark: str, label: str, metrics: dict) -> None:
    tags = {"sysattn.kind": "job", "mlflow.parentRunId": parent}
    with mlflow.start_run(experiment_id=experiment, tags=tags):
        mlflow.log_params(
            {
                "benchmark.name": benchmark,
                "model.name_or_path": "llava-hf/llava-1.5-7b-hf",
                "intervention.name": "redistribute",
                "job.label": label,
                "layers.quarter": 4,
                "layers.resolved": "24,25,26,27,28,29,30,31",
            }
        )
        mlflow.log_metrics(metrics)


# benchmark -> {label: (change in paired accuracy in points, McNemar p)}: system->text on
# six yes/no benchmarks, system->image on three.
KNOWN = {
    "pope": {"system->text": (4.0, 0.001), "system->image": (-1.0, 0.40)},
    "mme": {"system->text": (2.5, 0.030), "system->image": (-6.0, 0.004)},
    "winoground": {"system->text": (-1.5, 0.50), "system->image": (0.5, 0.90)},
    "naturalbench": {"system->text": (3.0, 0.020)},
    "sugarcrepe": {"system->text": (1.0, 0.20)},
    "beaf": {"system->text": (5.5, 0.0001)},
}
CHAIR = (-4.0, 0.002)  # system->text on the captions: CHAIR_s down 4 points, p 0.002


@pytest.fixture(scope="module")
def six_benchmarks(tmp_path_factory):
    root = tmp_path_factory.mktemp("six")
    uri = f"sqlite:///{root}/store.db"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("six", artifact_location=root.as_uri())
    with mlflow.start_run(experiment_id=experiment, tags={"sysattn.kind": "sweep"}) as sweep:
        pass
    for benchmark, conditions in KNOWN.items():
        for label, (change, p) in conditions.items():
            base = 0.4
            metrics = {
                "paired_accuracy": base + change / 100,
                "baseline_paired_accuracy": base,
                "paired_accuracy_change_points": change,
                "paired_accuracy_change_pct": 100 * change / 100 / base,
                "paired_accuracy_mcnemar_p": p,
                "paired_accuracy_mcnemar_b": 10,
                "paired_accuracy_mcnemar_c": 10 + round(change * 2),
                "paired_accuracy_change_ci_low": (change - 3) / 100,
                "paired_accuracy_change_ci_high": (change + 3) / 100,
                "n_groups": 200,
            }
            log_run(experiment, sweep.info.run_id, benchmark, label, metrics)
    change, p = CHAIR
    chair = {
        "chair_s": 0.30 + change / 100,
        "baseline_chair_s": 0.30,
        "chair_s_change_points": change,
        "chair_s_change_p": p,
        "chair_s_change_ci_low": (change - 2) / 100,
        "chair_s_change_ci_high": (change + 2) / 100,
    }
    log_run(experiment, sweep.info.run_id, "chair", "system->text", chair)
    tracking = {"uri": uri, "experiment": "six", "artifact_location": str(root)}
    return root, tracking, sweep.info.run_id


def test_summary_counts_significant_benchmarks_and_runs_wilcoxon_with_five(six_benchmarks):
    root, tracking, parent = six_benchmarks
    out = root / "report"
    report(OmegaConf.create({"tracking": tracking, "report": {"parent": parent, "out": str(out)}}))
    summary = pd.read_csv(out / "summary.csv", keep_default_na=False).set_index("condition")
    # Holm within each benchmark, here.
    better, worse = {}, {}
    for benchmark, conditions in {**KNOWN, "chair": {"system->text": CHAIR}}.items():
        labels = list(conditions)
        corrected = multipletests([conditions[c][1] for c in labels], method="holm")[1]
        for label, p in zip(labels, corrected, strict=True):
            change = conditions[label][0]
            good = change < 0 if benchmark == "chair" else change > 0
            if p <= 0.05:
                (better if good else worse).setdefault(label, []).append(benchmark)
    text = summary.loc["system->text q4 (24-31)"]
    image = summary.loc["system->image q4 (24-31)"]
    assert (text.significant_better, text.significant_worse) == (len(better["system->text"]), 0)
    assert set(text.better_on.split(", ")) == set(better["system->text"]) >= {"chair", "beaf"}
    assert (image.significant_better, image.significant_worse) == (0, 1)
    assert image.worse_on == "mme" == worse["system->image"][0]
    assert (text.benchmarks, image.benchmarks) == (7, 3)
    # Wilcoxon over the six yes/no benchmarks' changes in paired accuracy (not CHAIR_s).
    changes = [conditions["system->text"][0] for conditions in KNOWN.values()]
    expected = wilcoxon(changes)
    assert text.wilcoxon_benchmarks == 6
    assert float(text.wilcoxon_statistic) == pytest.approx(expected.statistic)
    assert float(text.wilcoxon_p) == pytest.approx(expected.pvalue)
    assert text.wilcoxon_note == "Wilcoxon signed-rank test over benchmarks (Demsar 2006)"
    assert (image.wilcoxon_benchmarks, image.wilcoxon_p) == (3, "")
    assert image.wilcoxon_note == "needs >= 5 benchmarks"
    md = (out / "comparison.md").read_text()
    assert md.startswith("## beaf\n") and "## Across benchmarks" in md and "Demsar 2006" in md
    # The caption benchmark's test is the bootstrap of CHAIR_s, its CI in points.
    table = pd.read_csv(out / "comparison.csv")
    chair = table[(table.benchmark == "chair") & (table.intervention != "baseline")].iloc[0]
    assert chair.test == "paired bootstrap (CHAIR_s)" and chair.p_value == pytest.approx(0.002)
    assert (chair.change_ci_low_points, chair.change_ci_high_points) == pytest.approx((-6, -2))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "report.correction=fdr",
            "report.correction='fdr' is not allowed; allowed: holm, bonferroni, none",
        ),
        ("report.alpha=1.5", "report.alpha=1.5 must be a number in (0, 1)"),
        ("report.alpha=0", "report.alpha=0 must be a number in (0, 1)"),
    ],
)
def test_bad_correction_or_alpha_is_one_line_exit_2(
    override, message, tmp_path, monkeypatch, capsys
):
    """python -m sysattn_exp.report (its main, in this process: real Hydra) refuses them
    before it opens the store."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["sysattn_exp.report", override, f"report.out={tmp_path}"])
    with pytest.raises(SystemExit) as exit:
        main()
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.strip() == f"error: {message}"
    assert not (tmp_path / "outputs").exists()


def test_wilcoxon_counts_the_benchmarks_it_uses():
    """scipy's test drops zero changes: five benchmarks of which one did not move are four."""
    from sysattn_exp.experiment.report_stats import wilcoxon_over_benchmarks

    some_zero = wilcoxon_over_benchmarks(np.array([0.02, -0.01, 0.0, 0.03, 0.04]))
    assert some_zero["wilcoxon_p"] is None
    assert some_zero["wilcoxon_note"] == "needs >= 5 benchmarks with a change (4 of 5 are not 0)"
    changes = np.array([0.02, -0.01, 0.0, 0.03, 0.04, 0.05, 0.06])
    result = wilcoxon_over_benchmarks(changes)
    assert result["wilcoxon_p"] == pytest.approx(wilcoxon(changes).pvalue)
