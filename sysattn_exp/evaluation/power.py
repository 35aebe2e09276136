"""Power of McNemar's test on paired accuracy: the smallest change a benchmark can show.

Connor's sample size for McNemar's test (Connor 1987, "Sample size for testing
differences in proportions for the paired-sample design", Biometrics 43(1):207-211,
eq. 3): to detect a difference delta = p01 - p10 between the two discordant cell
probabilities (here: the change in paired accuracy, c/n - b/n with b groups right only
in the baseline and c right only under the intervention), when a fraction psi = p01 + p10
of the groups is discordant, a two-sided test at level alpha needs

    n = (z_{1-alpha/2} sqrt(psi) + z_{1-beta} sqrt(psi - delta^2))^2 / delta^2

groups for power 1 - beta. n falls as delta grows, and delta cannot exceed psi (every
discordant group in the same direction): the detectable change for a given n is the root
of n(delta) = n in (0, psi], found with scipy's brentq, or none where even delta = psi
needs more groups than the benchmark has. The formula is the unconditional normal
approximation; the exact conditional test (stats.mcnemar_test) is slightly conservative
at small discordant counts (tests/test_report_stats.py simulates it)."""

import math

from scipy.optimize import brentq
from scipy.stats import norm


def connor_groups(delta: float, discordance: float, alpha: float = 0.05, power: float = 0.8):
    """Connor's (1987) n: the groups a two-sided McNemar test at `alpha` needs to detect a
    change `delta` (a fraction, 0 < delta <= discordance) with `power`, when a fraction
    `discordance` of the groups is discordant. A float (not rounded up)."""
    z_alpha, z_beta = norm.ppf(1 - alpha / 2), norm.ppf(power)
    spread = z_alpha * math.sqrt(discordance) + z_beta * math.sqrt(discordance - delta**2)
    return spread**2 / delta**2


def mcnemar_detectable_change(
    n_groups: int, discordance: float, alpha: float = 0.05, power: float = 0.8
) -> float | None:
    """The smallest change in paired accuracy, in points (100 delta), that a two-sided
    McNemar test at `alpha` detects with `power` on `n_groups` groups of which a fraction
    `discordance` (0 < discordance <= 1) is discordant: the delta in (0, discordance] at
    which connor_groups(delta) = n_groups (Connor 1987, Biometrics 43:207-211). None where
    no delta up to the discordance is detectable (connor_groups(discordance) > n_groups).
    ValueError for n_groups < 1 or a discordance outside (0, 1]."""
    if n_groups < 1 or not 0 < discordance <= 1:
        raise ValueError(f"n_groups={n_groups}, discordance={discordance}: need >= 1, (0, 1]")
    if connor_groups(discordance, discordance, alpha, power) > n_groups:
        return None
    tiny = discordance * 1e-12  # n(delta) -> inf as delta -> 0: the root is above this
    delta = brentq(
        lambda d: connor_groups(d, discordance, alpha, power) - n_groups,
        tiny,
        discordance,
        xtol=1e-14,
        rtol=1e-12,
    )
    return 100 * delta


def power_line(n_groups: int, discordance: float, alpha: float = 0.05, power: float = 0.8):
    """'400 groups; at 10% discordant groups a McNemar test at alpha 0.05 detects a change
    of >= 4.4 points with 80% power' (or that it detects none up to the discordance, and
    how many groups that would take)."""
    found = mcnemar_detectable_change(n_groups, discordance, alpha, power)
    at = (
        f"{n_groups} groups; at {100 * discordance:.3g}% discordant groups a McNemar test at "
        f"alpha {alpha:g}"
    )
    if found is None:
        needed = math.ceil(connor_groups(discordance, discordance, alpha, power))
        return (
            f"{at} detects no change in paired accuracy with {100 * power:.3g}% power "
            f"(even {100 * discordance:.3g} points, all discordant groups one way, needs "
            f"{needed} groups)"
        )
    return f"{at} detects a change of >= {found:.1f} points with {100 * power:.3g}% power"
