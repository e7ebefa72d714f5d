"""Chinchilla scaling laws: compute-optimal parameters and tokens for a FLOP budget C = 6ND."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Law = Literal["approach1", "approach3"]
Fit = Literal["chinchilla", "epoch"]

# Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models", Table 3: the
# compute-optimal (parameters, FLOPs, tokens) that approach 1 (the IsoFLOP-envelope fit)
# projects. Every row satisfies C = 6ND to the printed precision.
CHINCHILLA_TABLE_3: tuple[tuple[float, float, float], ...] = (
    (400e6, 1.92e19, 8.0e9),
    (1e9, 1.21e20, 20.2e9),
    (10e9, 1.23e22, 205.1e9),
    (67e9, 5.76e23, 1.5e12),
    (175e9, 3.85e24, 3.7e12),
    (280e9, 9.90e24, 5.9e12),
    (520e9, 3.43e25, 11.0e12),
    (1e12, 1.27e26, 21.2e12),
    (10e12, 1.30e28, 216.2e12),
)
# Hoffmann et al. trained models from 70M to over 16B parameters to fit these laws.
FITTED_PARAMS = (70e6, 16e9)


@dataclass(frozen=True)
class ParametricLoss:
    """Approach 3: L(N, D) = E + A / N^alpha + B / D^beta, nats per token on the fit's data."""

    name: str
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    source: str

    def loss(self, n_params: float, n_tokens: float) -> float:
        return self.E + self.A / n_params**self.alpha + self.B / n_tokens**self.beta

    @property
    def _g(self) -> float:
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    def optimum(self, flops: float) -> tuple[float, float]:
        """Minimise L along 6ND = C (closed form, Hoffmann et al. 2022, eq. 4)."""
        a = self.beta / (self.alpha + self.beta)
        n = self._g * (flops / 6.0) ** a
        return n, flops / (6.0 * n)


# The paper's constants (section 3.3, eq. 10).
CHINCHILLA_FIT = ParametricLoss(
    "chinchilla", 1.69, 406.4, 410.7, 0.34, 0.28, "Hoffmann et al. 2022, eq. 10"
)
# Besiroglu et al. 2024, "Chinchilla Scaling: A replication attempt", refit on the data
# reconstructed from the paper's figure 4; the published constants do not reproduce the
# paper's own compute-optimal ratio, these do (about 20 tokens per parameter).
EPOCH_FIT = ParametricLoss(
    "epoch", 1.8172, 482.01, 2085.43, 0.3478, 0.3658, "Besiroglu et al. 2024, Epoch AI"
)
FITS: dict[str, ParametricLoss] = {"chinchilla": CHINCHILLA_FIT, "epoch": EPOCH_FIT}


@dataclass(frozen=True)
class TokensPerParam:
    """Approach 1 as a tokens-per-parameter law D/N = k * C^gamma, so N = sqrt(C / (6 D/N))."""

    k: float
    gamma: float

    def ratio(self, flops: float) -> float:
        return self.k * flops**self.gamma

    def optimum(self, flops: float) -> tuple[float, float]:
        r = self.ratio(flops)
        n = math.sqrt(flops / (6.0 * r))
        return n, r * n


def fit_tokens_per_param(
    table: tuple[tuple[float, float, float], ...] = CHINCHILLA_TABLE_3,
) -> TokensPerParam:
    """Least squares of log(D/N) on log(C) over the rows of the compute-optimal table."""
    xs = [math.log(c) for _, c, _ in table]
    ys = [math.log(d / n) for n, _, d in table]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    covariance = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    gamma = covariance / sum((x - mx) ** 2 for x in xs)
    return TokensPerParam(k=math.exp(my - gamma * mx), gamma=gamma)


APPROACH1 = fit_tokens_per_param()


def optimum(flops: float, law: Law = "approach3", fit: Fit = "chinchilla") -> tuple[float, float]:
    """Compute-optimal (parameters, tokens) for `flops` training FLOPs."""
    if flops <= 0:
        raise ValueError(f"flops must be > 0, got {flops}")
    if law == "approach1":
        return APPROACH1.optimum(flops)
    return FITS[fit].optimum(flops)


def predicted_loss(n_params: float, n_tokens: float, fit: Fit = "chinchilla") -> float:
    """Approach 3's loss at (N, D); approach 1 has no loss model, so both laws report this."""
    return FITS[fit].loss(n_params, n_tokens)


def compute_for_tokens(n_tokens: float, law: Law = "approach3", fit: Fit = "chinchilla") -> float:
    """The budget C whose compute-optimal token count is `n_tokens` (the inverse of D_opt(C))."""
    return _invert(1, n_tokens, law, fit)


def compute_for_params(n_params: float, law: Law = "approach3", fit: Fit = "chinchilla") -> float:
    """The budget C whose compute-optimal model has `n_params` parameters."""
    return _invert(0, n_params, law, fit)


def _invert(index: int, value: float, law: Law, fit: Fit) -> float:
    # Bisection in log C: N_opt and D_opt grow monotonically with C under both laws, and one
    # routine for both keeps the data-constrained rule identical whichever law is chosen.
    lo, hi = math.log(1e3), math.log(1e40)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if optimum(math.exp(mid), law, fit)[index] < value:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi))


def describe(law: Law, fit: Fit) -> str:
    """One line naming the law and its constants, for the readable output."""
    f = FITS[fit]
    loss = f"L = {f.E} + {f.A}/N^{f.alpha} + {f.B}/D^{f.beta} ({f.source})"
    if law == "approach1":
        a = APPROACH1
        return (
            f"Chinchilla approach 1: D/N = {a.k:.3g} * C^{a.gamma:.4f}, fitted to Hoffmann et al. "
            f"2022 table 3; loss from {loss}"
        )
    return f"Chinchilla approach 3: {loss}"
