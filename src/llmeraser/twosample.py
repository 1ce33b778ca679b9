"""Two-sample statistics for the membership test (`evidence`), written here because scipy is not a dependency of
the library (the tests hold each against scipy): the AUC with DeLong's standard error, the Mann–Whitney p-value
(exact counts for small untied samples, else normal with the tie correction), and the two-sample Kolmogorov–Smirnov
statistic and p-value (exact lattice-path counts for small samples, Kolmogorov's limit beyond)."""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from fractions import Fraction

from llmeraser.errors import ConfigError

EXACT_MW = 2_000_000  # min(m, n)·m·n up to which the Mann–Whitney null is counted exactly (≈ 1 s in Python)
EXACT_KS = 250_000  # m·n up to which the KS p-value counts lattice paths exactly


def _midranks(values: Sequence[float]) -> tuple[list[float], list[int]]:
    """(1-based ranks of `values`, ties sharing their mean rank; the sizes of the groups of ties)."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks, ties, i = [0.0] * len(values), [], 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for t in range(i, j + 1):
            ranks[order[t]] = (i + j) / 2 + 1
        ties.append(j - i + 1)
        i = j + 1
    return ranks, ties


def _check_samples(x: Sequence[float], y: Sequence[float]) -> None:
    if not x or not y:
        raise ConfigError(f"a two-sample test needs two non-empty samples, got {len(x)} and {len(y)} values")
    if not all(math.isfinite(v) for v in (*x, *y)):
        raise ConfigError("a two-sample test needs finite values")


def auc_delong(x: Sequence[float], y: Sequence[float]) -> tuple[float, float | None]:
    """(AUC = P(X > Y) + ½ P(X = Y), DeLong's standard error; None when a sample has one value).

    DeLong, DeLong & Clarke-Pearson (1988): with V10ᵢ the fraction of y below xᵢ (ties ½) and V01ⱼ the fraction of x
    above yⱼ, Var(AUC) ≈ s²(V10)/m + s²(V01)/n. Both come from midranks: V10ᵢ = (rank of xᵢ in x ∪ y − its rank in
    x)/n, in O(N log N)."""
    _check_samples(x, y)
    m, n = len(x), len(y)
    pooled, _ = _midranks([*x, *y])
    v10 = [(r - s) / n for r, s in zip(pooled[:m], _midranks(x)[0], strict=True)]
    v01 = [1 - (r - s) / m for r, s in zip(pooled[m:], _midranks(y)[0], strict=True)]
    auc = sum(v10) / m
    if m < 2 or n < 2:
        return auc, None
    s10 = sum((v - auc) ** 2 for v in v10) / (m - 1)
    s01 = sum((v - auc) ** 2 for v in v01) / (n - 1)
    return auc, math.sqrt(s10 / m + s01 / n)


def _mw_counts(m: int, n: int) -> list[int]:
    """The number of orderings of m x's and n y's with U = u (pairs with x above y), u = 0..mn: the coefficients of
    the Gaussian binomial [m+n choose m]_q = Π_{i ≤ s} (1 − q^{t+i}) / (1 − q^i), s = min(m, n), t = max(m, n)."""
    s, t = min(m, n), max(m, n)
    poly = [1]
    for i in range(1, s + 1):
        poly = poly + [0] * (t + i)
        for u in range(len(poly) - 1, t + i - 1, -1):  # × (1 − q^{t+i})
            poly[u] -= poly[u - t - i]
        for u in range(i, len(poly)):  # ÷ (1 − q^i): exact, the quotient's coefficients are counts
            poly[u] += poly[u - i]
        while len(poly) > 1 and poly[-1] == 0:
            poly.pop()
    return poly


def mann_whitney_p(x: Sequence[float], y: Sequence[float]) -> float:
    """Two-sided p-value of AUC = 0.5 (no shift between X and Y), as scipy's `mannwhitneyu`: exact (the counts of
    `_mw_counts`) without ties when min(m, n)·m·n ≤ EXACT_MW, else normal with the tie-corrected variance and a
    continuity correction of ½."""
    _check_samples(x, y)
    m, n = len(x), len(y)
    ranks, ties = _midranks([*x, *y])
    u = sum(ranks[:m]) - m * (m + 1) / 2
    far = max(u, m * n - u)
    if len(ties) == m + n and min(m, n) * m * n <= EXACT_MW:
        counts = _mw_counts(m, n)
        return min(1.0, float(Fraction(2 * sum(counts[int(far):]), math.comb(m + n, m))))
    big = m + n
    var = m * n / 12 * ((big + 1) - sum(t ** 3 - t for t in ties) / (big * (big - 1)))
    if var <= 0:  # every value tied: nothing tells the samples apart
        return 1.0
    z = (far - m * n / 2 - 0.5) / math.sqrt(var)
    return min(1.0, max(0.0, math.erfc(z / math.sqrt(2))))


def kolmogorov_sf(z: float) -> float:
    """P(K > z) for Kolmogorov's limit distribution K: 2 Σ (−1)^(j−1) e^(−2j²z²), or for small z 1 − √(2π)/z
    Σ e^(−(2j−1)²π²/(8z²)) (both series converge fast on their side of 1)."""
    if z <= 0:
        return 1.0
    if z < 1:
        terms = sum(math.exp(-((2 * j - 1) ** 2) * math.pi ** 2 / (8 * z * z)) for j in range(1, 20))
        return 1.0 - math.sqrt(2 * math.pi) / z * terms
    return min(1.0, 2 * sum((-1) ** (j - 1) * math.exp(-2 * j * j * z * z) for j in range(1, 101)))


def ks_2samp(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """(D, two-sided p) of the two-sample Kolmogorov–Smirnov test. D = max |F_x − F_y| over the pooled values, held as
    the integer h = max |cₓ·n − c_y·m| / gcd(m, n) (so that the test below needs no float comparison). For m·n ≤
    EXACT_KS p is exact: 1 − (lattice paths from (0, 0) to (m, n) with every |i·n − j·m| < h·g) / C(m+n, m), counted
    in integers (scipy's `ks_2samp(method='exact')`); beyond, Kolmogorov's limit at √(mn/(m+n))·D."""
    _check_samples(x, y)
    m, n, g = len(x), len(y), math.gcd(len(x), len(y))
    xs, ys = sorted(x), sorted(y)
    span = max(abs(bisect.bisect_right(xs, v) * n - bisect.bisect_right(ys, v) * m) for v in (*xs, *ys))
    h, d = span // g, span / (m * n)
    if h == 0:
        return d, 1.0
    if m * n > EXACT_KS:
        return d, kolmogorov_sf(math.sqrt(m * n / (m + n)) * d)
    row = [1 if abs(j * m) < span else 0 for j in range(n + 1)]  # i = 0
    for j in range(1, n + 1):
        row[j] = row[j - 1] if row[j] else 0
    for i in range(1, m + 1):
        new = [0] * (n + 1)
        for j in range(n + 1):
            if abs(i * n - j * m) < span:
                new[j] = row[j] + (new[j - 1] if j else 0)
        row = new
    total = math.comb(m + n, m)
    return d, float(Fraction(total - row[n], total))


# ------------------------------------------------------------------------------------------------ the membership test
