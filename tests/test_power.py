"""The smallest change in paired accuracy a McNemar test detects (evaluation/power.py):
Connor's formula solved for the change, checked by putting it back and by simulating the
exact test; the dry run's power line through the command line; stats.discordance is
checked and stays out of the job key."""

import json

import numpy as np
import pytest
from cli import run_cli
from scipy.stats import binom, binomtest, norm

from sysattn_exp.evaluation.power import connor_groups, mcnemar_detectable_change, power_line
from sysattn_exp.experiment.identity import DEFAULT_STATS, job_key

SETTINGS = [(400, 0.1), (400, 0.2), (1000, 0.05), (200, 0.3), (60, 0.6)]  # (groups, psi)


def connor_by_hand(delta: float, psi: float, alpha: float, power: float) -> float:
    """Connor 1987, eq. 3, written out again."""
    z_a, z_b = norm.ppf(1 - alpha / 2), norm.ppf(power)
    return (z_a * psi**0.5 + z_b * (psi - delta**2) ** 0.5) ** 2 / delta**2


@pytest.mark.parametrize(("n_groups", "psi"), SETTINGS)
@pytest.mark.parametrize(("alpha", "power"), [(0.05, 0.8), (0.01, 0.9)])
def test_detectable_change_put_back_into_connor_gives_the_groups(n_groups, psi, alpha, power):
    points = mcnemar_detectable_change(n_groups, psi, alpha, power)
    assert points is not None and 0 < points <= 100 * psi
    delta = points / 100
    assert connor_by_hand(delta, psi, alpha, power) == pytest.approx(n_groups, rel=1e-9)
    assert connor_groups(delta, psi, alpha, power) == pytest.approx(n_groups, rel=1e-9)
    # More groups detect a smaller change.
    assert mcnemar_detectable_change(2 * n_groups, psi, alpha, power) < points


def test_no_change_is_detectable_where_even_all_discordant_groups_one_way_are_too_few():
    # At psi = 0.1, delta = psi needs (1.96 sqrt(.1) + 0.8416 sqrt(.09))^2 / .01 = 76.1 groups.
    needed = connor_by_hand(0.1, 0.1, 0.05, 0.8)
    assert 76 < needed < 77
    assert mcnemar_detectable_change(76, 0.1) is None
    assert mcnemar_detectable_change(77, 0.1) == pytest.approx(10.0, abs=0.2)
    assert power_line(36, 0.1) == (
        "36 groups; at 10% discordant groups a McNemar test at alpha 0.05 detects no change "
        "in paired accuracy with 80% power (even 10 points, all discordant groups one way, "
        "needs 77 groups)"
    )
    for bad in [(0, 0.1), (10, 0.0), (10, 1.5)]:
        with pytest.raises(ValueError):
            mcnemar_detectable_change(*bad)


def exact_mcnemar_p(b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """The two-sided exact McNemar p of many (b, c) at once: min(1, 2 P(X <= min(b, c)))
    for X ~ Binomial(b + c, 1/2); 1 where b + c = 0."""
    p = np.minimum(1.0, 2 * binom.cdf(np.minimum(b, c), b + c, 0.5))
    return np.where(b + c == 0, 1.0, p)


@pytest.mark.parametrize(("n_groups", "psi"), SETTINGS)
def test_exact_mcnemar_rejects_about_80_percent_at_the_detectable_change(n_groups, psi):
    """20,000 simulated benchmarks of n_groups groups: each group discordant against the
    baseline with probability psi, right only under the intervention with (psi + delta)/2,
    right only in the baseline with (psi - delta)/2. The exact test (slightly
    conservative: Connor's n is the normal approximation's) rejects in about 77%."""
    delta = mcnemar_detectable_change(n_groups, psi) / 100
    rng = np.random.default_rng(0)
    cells = rng.multinomial(n_groups, [(psi - delta) / 2, (psi + delta) / 2, 1 - psi], 20_000)
    b, c = cells[:, 0], cells[:, 1]
    p = exact_mcnemar_p(b, c)
    for i in range(40):  # the vectorised p is scipy's exact binomial test
        expected = binomtest(int(c[i]), int(b[i] + c[i]), 0.5).pvalue if b[i] + c[i] else 1.0
        assert p[i] == pytest.approx(expected, rel=1e-9)
    assert 0.74 <= (p <= 0.05).mean() <= 0.86


def test_dry_run_prints_the_power_line_and_refuses_a_bad_discordance(tmp_path):
    result = run_cli(
        "model=toy", "benchmark=toy", "runtime.dry_run=true", "stats.discordance=0.5", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("power: ")]
    assert lines == [f"power: {power_line(36, 0.5)}"]  # the demo split's 36 groups
    assert "detects a change of >= 31.9 points" in lines[0]
    (summary,) = tmp_path.glob("outputs/runs/*/dry_run.json")
    detectable = json.loads(summary.read_text())["detectable_change_points"]
    assert detectable == pytest.approx(mcnemar_detectable_change(36, 0.5), rel=1e-12)
    bad = run_cli("model=toy", "runtime.dry_run=true", "stats.discordance=0", cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip() == "error: stats.discordance=0 must be a number in (0, 1]"


def test_discordance_is_not_in_the_job_key():
    config = {"model": {"name_or_path": "builtin:toy"}, "stats": dict(DEFAULT_STATS)}
    assert DEFAULT_STATS["discordance"] == 0.1
    other = {**config, "stats": DEFAULT_STATS | {"discordance": 0.3}}
    assert job_key(other, {}) == job_key(config, {})
    seeded = {**config, "stats": DEFAULT_STATS | {"seed": 1}}  # a figure changes: keyed
    assert job_key(seeded, {}) != job_key(config, {})
