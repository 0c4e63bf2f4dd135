"""Lloyd-Max codebooks for the coordinates of a Haar-rotated unit vector.

After a uniformly random rotation each coordinate t of a unit vector in R^d has the density
    f_d(t) = Γ(d/2) / (√π Γ((d−1)/2)) · (1 − t²)^((d−3)/2)  on [−1, 1],
i.e. (t + 1)/2 ~ Beta((d−1)/2, (d−1)/2). The optimal scalar quantizer of f_d with 2^b levels is
found by Lloyd's algorithm in float64, with closed forms for the cell mass (regularised incomplete
beta) and the cell's first moment, so no numerical integration is involved.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy import linalg, special, stats

MAX_BITS = 8
_TOLERANCE = 1e-9  # on centroid moves, in units of 1/sqrt(d); float64 round-off sits near 2e-11 at d=4096
_MAX_ITERATIONS = 2_000


def check_dim_bits(dim: int, bits: int, codec: str) -> None:
    if not isinstance(dim, int) or dim < 8:
        raise ValueError(f"dim={dim!r} is not allowed for {codec}: it must be an integer >= 8")
    if isinstance(bits, bool) or not float(bits).is_integer() or not 1 <= int(bits) <= MAX_BITS:
        raise ValueError(
            f"bits={bits!r} is not allowed for {codec}: it takes an integer in 1..{MAX_BITS} "
            "(fractional bits such as 2.5 go through tqlab.quant.MixedPrecision or make_codec)"
        )


def _cdf(t: np.ndarray, dim: int) -> np.ndarray:
    a = (dim - 1) / 2
    return special.betainc(a, a, np.clip((t + 1) / 2, 0.0, 1.0))


def _first_moment(lo: np.ndarray, hi: np.ndarray, dim: int) -> np.ndarray:
    # d/dt (1 − t²)^((d−1)/2) = −(d−1) t (1 − t²)^((d−3)/2), so ∫_lo^hi t f_d(t) dt has a closed form.
    log_c = special.gammaln(dim / 2) - special.gammaln((dim - 1) / 2) - 0.5 * math.log(math.pi)
    p = (dim - 1) / 2
    g = lambda t: np.power(np.clip(1 - t * t, 0.0, 1.0), p)  # noqa: E731
    return math.exp(log_c) / (dim - 1) * (g(lo) - g(hi))


def _companding_init(dim: int, levels: int) -> np.ndarray:
    # High-rate theory puts levels with density ∝ f^(1/3); for f_d that is again a symmetric Beta law,
    # (t + 1)/2 ~ Beta(a', a') with a' = (d − 3)/6 + 1. Starting there, Lloyd converges at every b ≤ 8
    # (a uniform start over [−1, 1] does not at b ≥ 6).
    a = (dim - 3) / 6 + 1
    q = (np.arange(levels) + 0.5) / levels
    return 2 * stats.beta.ppf(q, a, a) - 1


def _density(t: np.ndarray, dim: int) -> np.ndarray:
    log_c = special.gammaln(dim / 2) - special.gammaln((dim - 1) / 2) - 0.5 * math.log(math.pi)
    return math.exp(log_c) * np.power(np.clip(1 - t * t, 0.0, 1.0), (dim - 3) / 2)


def _cells(c: np.ndarray, dim: int):
    """Mass, first and second moments of f_d over the cells of centroids c (bounded by midpoints)."""
    edges = np.concatenate([[-1.0], (c[1:] + c[:-1]) / 2, [1.0]])
    lo, hi = edges[:-1], edges[1:]
    return _mass(lo, hi, dim), _first_moment(lo, hi, dim), _second_moment(lo, hi, dim)


def _mass(lo: np.ndarray, hi: np.ndarray, dim: int, cdf=None) -> np.ndarray:
    # Upper cells are measured from the upper tail (F(t) = 1 − F(−t)): 1 − 1e-9 loses digits that
    # the outer cells of an 8-bit codebook need.
    cdf = cdf or (lambda t: _cdf(t, dim))
    upper = lo >= 0
    return np.where(upper, cdf(-lo) - cdf(-hi), cdf(hi) - cdf(lo))


def _mse(c: np.ndarray, dim: int) -> float:
    mass, m1, m2 = _cells(c, dim)
    return float(np.sum(m2 - 2 * c * m1 + c**2 * mass))


def _newton_step(c: np.ndarray, mass: np.ndarray, m1: np.ndarray, dim: int) -> np.ndarray:
    # Root of g_k = c_k·P_k − M_k (centroid = cell mean); the Jacobian is tridiagonal.
    mid = (c[1:] + c[:-1]) / 2
    fm = _density(mid, dim) / 2
    upper = (c[:-1] - mid) * fm  # ∂g_k/∂c_{k+1}
    lower = (mid - c[1:]) * fm  # ∂g_{k+1}/∂c_k
    diag = mass.copy()
    diag[:-1] += upper
    diag[1:] += lower
    banded = np.zeros((3, len(c)))
    banded[0, 1:], banded[1], banded[2, :-1] = upper, diag, lower
    return c - linalg.solve_banded((1, 1), banded, c * mass - m1)


@functools.cache
def _lloyd_max(dim: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    # Lloyd's update (each centroid moves to its cell's mean) never increases the MSE but crawls at
    # b >= 6; a Newton step on the same conditions converges quadratically. Take Newton's step whenever
    # it keeps the levels ordered and lowers the MSE below Lloyd's, Lloyd's otherwise.
    c = _companding_init(dim, 2**bits)
    for _ in range(_MAX_ITERATIONS):
        mass, m1, _ = _cells(c, dim)
        lloyd = m1 / np.maximum(mass, 1e-300)
        if np.max(np.abs(lloyd - c)) < _TOLERANCE / math.sqrt(dim):
            break
        newton = _newton_step(c, mass, m1, dim)
        ordered = np.all(np.diff(newton) > 0) and -1 < newton[0] and newton[-1] < 1
        c = newton if ordered and _mse(newton, dim) < _mse(lloyd, dim) else lloyd
        c = (c - c[::-1]) / 2  # f_d is even: keep the codebook exactly symmetric
    else:
        raise RuntimeError(f"Lloyd-Max did not converge for dim={dim}, bits={bits}")
    boundaries = (c[1:] + c[:-1]) / 2
    c.setflags(write=False)
    boundaries.setflags(write=False)
    return c, boundaries


def lloyd_max_codebook(dim: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Centroids (2^bits, ascending) and decision boundaries (2^bits − 1) of f_dim, float64, read-only.

    Solved once per (dim, bits) per process (a few milliseconds to a few tenths of a second).
    """
    check_dim_bits(dim, bits, "lloyd_max_codebook")
    return _lloyd_max(int(dim), int(bits))


def coordinate_distortion(dim: int, bits: int) -> float:
    """Exact E‖u − û‖² of the codebook for a Haar-rotated unit vector in R^dim.

    Computed from the density's closed-form cell moments (∫(t − c)² f_d over each cell), not from samples.
    """
    centroids, _ = lloyd_max_codebook(dim, bits)
    return dim * _mse(np.asarray(centroids), dim)


def _second_moment(lo: np.ndarray, hi: np.ndarray, dim: int) -> np.ndarray:
    # By parts with G(t) = −c_d/(d−1) · (1 − t²)^((d−1)/2), an antiderivative of t f_d(t):
    # ∫ t² f_d = [t G] − ∫ G, and (1 − t²)^((d−1)/2) = f_{d+2}(t) / c_{d+2}, whose integral is the Beta CDF.
    log_c = special.gammaln(dim / 2) - special.gammaln((dim - 1) / 2) - 0.5 * math.log(math.pi)
    log_c2 = special.gammaln((dim + 2) / 2) - special.gammaln((dim + 1) / 2) - 0.5 * math.log(math.pi)
    p = (dim - 1) / 2

    def G(t):
        return -math.exp(log_c) / (dim - 1) * np.power(np.clip(1 - t * t, 0.0, 1.0), p)

    k = math.exp(log_c - log_c2) / (dim - 1)
    return (hi * G(hi) - lo * G(lo)) + k * _mass(lo, hi, dim, cdf=lambda t: _cdf(t, dim + 2))
