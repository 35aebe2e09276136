"""The report's evidence: which changes are significant after correcting for the many
conditions of a benchmark, what each benchmark can detect, and how a condition fares
across benchmarks (the statistics each job logged: evaluation/stats.py).

- The test of a condition against its baseline: McNemar's exact test on paired accuracy
  (whole groups right; `paired_accuracy_mcnemar_p`) on a yes/no benchmark: paired
  accuracy is the study's headline figure and the exact test needs no resampling
  (McNemar 1947; Dietterich 1998; Dror et al. 2018). On the caption benchmark (chair),
  which has no groups, the paired bootstrap's p of the change in CHAIR_s
  (`chair_s_change_p`, per image).
- Each benchmark's p-values (all its models, settings and conditions in the report) are
  corrected together by statsmodels' multipletests: Holm's step-down method (Holm 1979,
  Scand. J. Statist. 6:65-70) by default, Bonferroni, or none; a change is significant
  where its corrected p <= alpha (report.correction, report.alpha).
- Power: per benchmark, model and setting, the smallest change in paired accuracy a
  McNemar test at alpha detects with 80% power (power.py, Connor 1987) at the median over
  its conditions of the observed discordance (b + c) / n_groups: the median, not each
  condition's own, because the question is what the benchmark can show, and a condition
  with few discordant groups would otherwise make its own power look poor.
- Across benchmarks: per condition, in how many benchmarks its change is significant
  (after correction) for the better and for the worse, and where it has a change in paired
  accuracy on at least 5 benchmarks (5 not 0), the Wilcoxon signed-rank test of those
  changes against 0 (scipy.stats.wilcoxon, its defaults: zero changes dropped, exact p
  without ties):
  Demsar 2006, JMLR 7:1-30, sec. 3.1.3, for two methods (here: the condition and its
  baseline) over several data sets, with at least 5 data sets. A benchmark with several
  settings counts once per setting."""

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import wilcoxon
from statsmodels.stats.multitest import multipletests

from sysattn_exp.evaluation.power import power_line

CAPTION_BENCHMARK = "chair"  # job_caption.CAPTION_BENCHMARK: its changes are in CHAIR_s
# The threshold (after Demsar 2006). With exactly 5 nonzero changes the smallest
# exact two-sided p is 2 / 2^5 = 0.0625: rejecting at 0.05 takes at least 6.
MIN_WILCOXON = 5
WILCOXON_LABEL = "Wilcoxon signed-rank test over benchmarks (Demsar 2006)"


@dataclass(frozen=True)
class Evidence:
    """report.correction (holm, bonferroni or none) and report.alpha."""

    correction: str
    alpha: float

    def mark(self) -> str:
        """What the * of a significant change means, in a plot's caption."""
        corrected = "uncorrected" if self.correction == "none" else f"{self.correction}-corrected"
        return f"* {corrected} p <= {self.alpha:g}"

    def note(self) -> str:
        """What significant means, for footnotes."""
        how = (
            "significant without correction for the benchmark's many conditions "
            "(report.correction=none)"
            if self.correction == "none"
            else "significant after correcting the p-values of all conditions of the "
            "benchmark in this report together"
        )
        tests = "p: McNemar's exact test on paired accuracy; chair: the paired bootstrap of CHAIR_s"
        return f"{self.mark()}: {how} ({tests})"


def tested(logged, benchmark: str) -> dict:
    """A job's test against its baseline from its logged metrics (`logged(name)`,
    None where not logged): test, p_value, and the tested change's 95% interval in points
    (change_ci_low_points, change_ci_high_points); plus the discordant counts of groups
    (groups_broken = McNemar's b, groups_fixed = c) and of items (items_broken, items_fixed:
    n_broken, n_fixed). Blanks (None) for a run logged before statistics existed (its
    metrics absent, or NaN beside runs that have them)."""

    def run_metric(name: str):
        value = logged(name)
        return None if value is None or pd.isna(value) else float(value)

    if benchmark == CAPTION_BENCHMARK:
        metric, test, p = "chair_s", "paired bootstrap (CHAIR_s)", run_metric("chair_s_change_p")
    else:
        metric, test = "paired_accuracy", "McNemar exact (groups)"
        p = run_metric("paired_accuracy_mcnemar_p")
    low, high = run_metric(f"{metric}_change_ci_low"), run_metric(f"{metric}_change_ci_high")
    return {
        "test": None if p is None else test,
        "p_value": p,
        "change_ci_low_points": None if low is None else 100 * low,
        "change_ci_high_points": None if high is None else 100 * high,
        "groups_broken": run_metric("paired_accuracy_mcnemar_b"),
        "groups_fixed": run_metric("paired_accuracy_mcnemar_c"),
        "items_broken": run_metric("n_broken"),
        "items_fixed": run_metric("n_fixed"),
    }


def corrected(table: pd.DataFrame, evidence: Evidence) -> pd.DataFrame:
    """The table with p_corrected (each benchmark's p-values corrected together by
    multipletests(method=evidence.correction); none: the raw p) and significant ('yes' /
    'no': p_corrected <= alpha); blank where a row has no p (a baseline, an old run)."""
    table = table.assign(p_corrected=np.nan, significant=None)
    for _, rows in table.groupby("benchmark", sort=False):
        tested_rows = rows[(rows["intervention"] != "baseline") & rows["p_value"].notna()]
        if tested_rows.empty:
            continue
        p = tested_rows["p_value"].astype(float).to_numpy()
        if evidence.correction != "none":
            p = multipletests(p, alpha=evidence.alpha, method=evidence.correction)[1]
        table.loc[tested_rows.index, "p_corrected"] = p
        table.loc[tested_rows.index, "significant"] = np.where(p <= evidence.alpha, "yes", "no")
    return table


def change_of(rows: pd.DataFrame) -> pd.Series:
    """The tested change in points: paired accuracy's, CHAIR_s's on the caption benchmark."""
    caption = rows["benchmark"] == CAPTION_BENCHMARK
    return rows["paired_accuracy_change_points"].where(~caption, rows["native_change_points"])


def direction(rows: pd.DataFrame) -> pd.Series:
    """+1 where a change is for the better (paired accuracy up; CHAIR_s, hallucination,
    down), -1 for the worse, 0 for none, NaN where there is no change."""
    sign = np.sign(change_of(rows).astype(float))
    return sign.where(rows["benchmark"] != CAPTION_BENCHMARK, -sign)


SUMMARY_COLUMNS = [
    "condition",
    "model",
    "benchmarks",
    "significant_better",
    "significant_worse",
    "better_on",
    "worse_on",
    "wilcoxon_benchmarks",
    "wilcoxon_statistic",
    "wilcoxon_p",
    "wilcoxon_note",
]


def summary_table(edits: pd.DataFrame) -> pd.DataFrame:
    """One row per condition (and model) over the benchmarks (each setting of a benchmark
    one data set, named 'benchmark [setting]'): how many have a test, on how many the
    change is significant for the better / worse (and which), and the Wilcoxon signed-rank
    test of its changes in paired accuracy (points) where there are at least MIN_WILCOXON
    (wilcoxon_note says why not otherwise). `edits`: the corrected table's non-baseline
    rows with a `condition` column."""
    rows = []
    edits = edits.assign(
        data_set=edits["benchmark"] + edits["setting"].map(lambda s: f" [{s}]" if s else ""),
        direction=direction(edits),
    )
    models = edits["model"].astype(object).where(edits["model"].notna(), "")
    for (condition, model), group in edits.groupby([edits["condition"], models], sort=True):
        significant = group[group["significant"] == "yes"]
        changes = group.loc[group["benchmark"] != CAPTION_BENCHMARK]
        changes = changes["paired_accuracy_change_points"].dropna().astype(float)
        rows.append(
            {
                "condition": condition,
                "model": model,
                "benchmarks": int(group["p_value"].notna().sum()),
                "significant_better": int((significant["direction"] > 0).sum()),
                "significant_worse": int((significant["direction"] < 0).sum()),
                "better_on": ", ".join(significant.loc[significant["direction"] > 0, "data_set"]),
                "worse_on": ", ".join(significant.loc[significant["direction"] < 0, "data_set"]),
                "wilcoxon_benchmarks": len(changes),
            }
            | wilcoxon_over_benchmarks(changes.to_numpy())
        )
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def wilcoxon_over_benchmarks(changes: np.ndarray) -> dict:
    """scipy.stats.wilcoxon of per-benchmark changes against 0 (its defaults), where at
    least MIN_WILCOXON of them are not 0 (the test drops zeros); else no statistic and the
    note 'needs >= 5 benchmarks' (with a change)."""
    # The test drops zero changes (its default): the benchmarks it uses are the others.
    if np.count_nonzero(changes) < MIN_WILCOXON:
        note = f"needs >= {MIN_WILCOXON} benchmarks"
        if len(changes) >= MIN_WILCOXON:
            note += f" with a change ({np.count_nonzero(changes)} of {len(changes)} are not 0)"
        return {"wilcoxon_statistic": None, "wilcoxon_p": None, "wilcoxon_note": note}
    result = wilcoxon(changes)
    return {
        "wilcoxon_statistic": float(result.statistic),
        "wilcoxon_p": float(result.pvalue),
        "wilcoxon_note": WILCOXON_LABEL,
    }


def observed_power(rows: pd.DataFrame, alpha: float) -> str:
    """The power line of one benchmark, model and setting (`rows`, its conditions): at the
    median observed discordance (groups_broken + groups_fixed) / n_groups over its
    conditions; '' where no condition logged McNemar's counts."""
    edits = rows[(rows["intervention"] != "baseline") & rows["groups_broken"].notna()]
    edits = edits[edits["n_groups"].notna()]
    if edits.empty:
        return ""
    n_groups = int(edits["n_groups"].iloc[0])
    discordance = (edits["groups_broken"] + edits["groups_fixed"]) / edits["n_groups"]
    median = float(discordance.median())
    plural = "s" if len(edits) > 1 else ""
    where = f"power at the median observed discordance of {len(edits)} condition{plural}: "
    if median == 0:
        return where + f"{n_groups} groups; no discordant group: no change to detect"
    return where + power_line(n_groups, median, alpha)
