"""Scaling laws in the number of experts: Clark et al. 2022 (arXiv 2202.01169), Eq. 1.

    log10 L(N, E) = a·log10 N + b·log10 Ê + c·log10 N·log10 Ê + d
    1/Ê = 1/(E − 1 + (1/E_start − 1/E_max)^−1) + 1/E_max

``N`` is the dense (active, non-embedding) parameter count of a base size, ``E`` the
number of experts, ``L`` the validation loss. The saturating transform makes Ê grow
like E for small E and level off at ``E_max`` (routing stops paying); ``Ê(1) = E_start``.

The fit minimises ``sum_i huber_delta(log10 L̂_i − log10 L_i)`` (robust to the odd
diverged trial, as in Hoffmann et al. 2022) over (a, b, c, d, E_start, E_max) with
BFGS (analytic gradient) from a grid of starting points, keeping the best. Uncertainty: percentile
confidence intervals from refits on bootstrap resamples of the trials; error: RMS of
the log10 residuals in sample and leave-one-out (each trial predicted by a fit without
it). The effective parameter count N̄ of a trial is the dense size with the same loss:
``L(N̄, E=1) = L``, i.e. ``log10 N̄ = (log10 L − d − b·log10 E_start) / (a + c·log10 E_start)``.

Also: the simpler power law in E at one base size, ``log10 L = α + β·log10 E``
(least squares, with the slope's standard error).

Legend: n trials; arrays are 1-D of length n unless named otherwise.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import huber

COEFFS = ("a", "b", "c", "d", "e_start", "e_max")


@dataclass(frozen=True)
class ExpertLaw:
    """Fitted coefficients of Eq. 1 (log base 10, as in Clark et al.)."""

    a: float
    b: float
    c: float
    d: float
    e_start: float
    e_max: float

    def e_hat(self, experts: np.ndarray) -> np.ndarray:
        return e_hat(experts, self.e_start, self.e_max)

    def log10_loss(self, params: np.ndarray, experts: np.ndarray) -> np.ndarray:
        log_n, log_e = np.log10(params), np.log10(self.e_hat(experts))
        return self.a * log_n + self.b * log_e + self.c * log_n * log_e + self.d

    def loss(self, params: np.ndarray, experts: np.ndarray) -> np.ndarray:
        return 10.0 ** self.log10_loss(params, experts)

    def n_bar(self, loss: np.ndarray) -> np.ndarray:
        """Dense size (E = 1) whose loss under this law is ``loss``."""
        log_e1 = np.log10(self.e_start)  # Ê(1) = E_start
        return 10.0 ** ((np.log10(loss) - self.d - self.b * log_e1) / (self.a + self.c * log_e1))

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def e_hat(experts: np.ndarray, e_start: float, e_max: float) -> np.ndarray:
    """The saturating transform ``1/Ê = 1/(E − 1 + (1/E_start − 1/E_max)^−1) + 1/E_max``."""
    experts = np.asarray(experts, dtype=float)
    return 1.0 / (1.0 / (experts - 1.0 + 1.0 / (1.0 / e_start - 1.0 / e_max)) + 1.0 / e_max)


def _unpack(theta: np.ndarray) -> ExpertLaw:
    """Free parameters -> law: ``E_start = exp(u)``, ``E_max = E_start + exp(v)`` keep
    ``0 < E_start < E_max``; u and v are clipped to E_start in [1, 20] and
    E_max − E_start in [1, 1e5] (flat beyond, so the optimiser stays inside)."""
    a, b, c, d = theta[:4]
    u, v = np.clip(theta[4], 0.0, np.log(20.0)), np.clip(theta[5], 0.0, np.log(1e5))
    e_start = float(np.exp(u))
    return ExpertLaw(float(a), float(b), float(c), float(d), e_start, e_start + float(np.exp(v)))


def _pack(law: ExpertLaw) -> np.ndarray:
    return np.array([law.a, law.b, law.c, law.d, np.log(law.e_start), np.log(law.e_max - law.e_start)])


def _objective(
    theta: np.ndarray, params: np.ndarray, experts: np.ndarray, log_loss: np.ndarray, delta: float
) -> tuple[float, np.ndarray]:
    """``sum_i huber_delta(r_i) / delta²`` and its gradient in ``theta``; dividing by
    ``delta²`` keeps the objective O(n) so that the optimiser's tolerances do not stop it early.
    ``r = a·x + b·y + c·x·y + d − log10 L`` with ``x = log10 N``, ``y = log10 Ê(u, v)``;
    ``dy/du``, ``dy/dv`` by central differences."""
    law = _unpack(theta)
    x = np.log10(params)
    y = np.log10(law.e_hat(experts))
    residual = law.a * x + law.b * y + law.c * x * y + law.d - log_loss
    dy = []
    for j in (4, 5):
        step = np.zeros(6)
        step[j] = 1e-6
        dy.append((np.log10(_unpack(theta + step).e_hat(experts)) - np.log10(_unpack(theta - step).e_hat(experts))) / 2e-6)
    jac_n6 = np.stack([x, y, x * y, np.ones_like(x), (law.b + law.c * x) * dy[0], (law.b + law.c * x) * dy[1]], axis=1)
    psi = np.clip(residual, -delta, delta)
    return float(huber(delta, residual).sum()) / delta**2, (psi @ jac_n6) / delta**2


def _starts(params: np.ndarray, log_loss: np.ndarray) -> list[np.ndarray]:
    """A grid of starting points; ``d`` of each is set so its mean residual is zero."""
    starts = []
    for a, b, c, e_start, e_max in itertools.product((-0.2, -0.05), (-0.2, -0.05), (0.0,), (1.5, 4.0), (64.0, 1000.0)):
        law = ExpertLaw(a, b, c, 0.0, e_start, e_max)
        d = float(np.mean(log_loss - law.log10_loss(params, np.ones_like(params))))
        starts.append(_pack(ExpertLaw(a, b, c, d, e_start, e_max)))
    return starts


def _fit_from(
    starts: list[np.ndarray], params: np.ndarray, experts: np.ndarray, log_loss: np.ndarray, delta: float
) -> ExpertLaw:
    best = None
    for theta0 in starts:
        res = minimize(_objective, theta0, args=(params, experts, log_loss, delta), jac=True, method="BFGS")
        if best is None or res.fun < best.fun:
            best = res
    return _unpack(best.x)


def fit_expert_law(params: np.ndarray, experts: np.ndarray, loss: np.ndarray, delta: float = 1e-3) -> ExpertLaw:
    """Fit Eq. 1 to trials ``(N_i, E_i, L_i)`` by the Huber loss on log10 L (see module doc)."""
    params, experts, loss = (np.asarray(v, dtype=float) for v in (params, experts, loss))
    if len(params) < 6:
        raise ValueError(f"the fit has 6 coefficients and needs at least 6 trials, got {len(params)}")
    log_loss = np.log10(loss)
    return _centered(lambda p: _fit_from(_starts(p, log_loss), p, experts, log_loss, delta), params)


def _centered(fit: Callable[[np.ndarray], ExpertLaw], params: np.ndarray) -> ExpertLaw:
    """Fit on ``N / N0`` (``log10 N0`` the mean of log10 N), then map back: with
    ``x' = x − x0``, ``a·x' + b·y + c·x'·y + d'`` is the law with ``b = b' − c·x0`` and
    ``d = d' − a·x0``. Centring decorrelates a from d (log10 N ≈ 4–9 otherwise), which
    the optimiser needs to converge in few iterations."""
    x0 = float(np.mean(np.log10(params)))
    law = fit(params / 10.0**x0)
    return ExpertLaw(law.a, law.b - law.c * x0, law.c, law.d - law.a * x0, law.e_start, law.e_max)


def _refit(law: ExpertLaw, params: np.ndarray, experts: np.ndarray, log_loss: np.ndarray, delta: float) -> ExpertLaw:
    """A refit on a subset, started from the full fit and a few grid points (cheap, for
    bootstrap and leave-one-out)."""
    x0 = float(np.mean(np.log10(params)))
    moved = ExpertLaw(law.a, law.b + law.c * x0, law.c, law.d + law.a * x0, law.e_start, law.e_max)

    def fit(p: np.ndarray) -> ExpertLaw:
        return _fit_from([_pack(moved)] + _starts(p, log_loss)[::6], p, experts, log_loss, delta)

    return _centered(fit, params)


def _pack_plain(law: ExpertLaw) -> np.ndarray:
    return np.array([getattr(law, k) for k in COEFFS])


@dataclass(frozen=True)
class FitReport:
    """A fit with its uncertainty and errors; N̄ per trial, in the input order."""

    law: ExpertLaw
    ci_low: dict[str, float]
    ci_high: dict[str, float]
    rmse_log10_in_sample: float
    rmse_log10_loo: float
    max_rel_error_loo: float
    n_bar: list[float]
    n_bar_fitted: list[float]
    bootstrap_samples: int


def fit_with_uncertainty(
    params: np.ndarray, experts: np.ndarray, loss: np.ndarray, delta: float = 1e-3, bootstrap: int = 200, seed: int = 0
) -> FitReport:
    """The fit, 95% percentile bootstrap CIs (resampling trials), in-sample and
    leave-one-out RMS error of log10 L, and N̄ from the observed and the fitted losses."""
    params, experts, loss = (np.asarray(v, dtype=float) for v in (params, experts, loss))
    log_loss = np.log10(loss)
    law = fit_expert_law(params, experts, loss, delta)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        idx = rng.integers(0, len(params), len(params))
        if len(np.unique(params[idx])) < 2 or len(np.unique(experts[idx])) < 3:
            continue  # a resample without spread in N or E cannot pin the law down
        samples.append(_pack_plain(_refit(law, params[idx], experts[idx], log_loss[idx], delta)))
    arr = np.array(samples) if samples else np.full((1, len(COEFFS)), np.nan)
    low, high = np.percentile(arr, 2.5, axis=0), np.percentile(arr, 97.5, axis=0)
    loo = np.empty(len(params))
    for i in range(len(params)):
        keep = np.arange(len(params)) != i
        sub = _refit(law, params[keep], experts[keep], log_loss[keep], delta)
        loo[i] = sub.log10_loss(params[i : i + 1], experts[i : i + 1])[0]
    in_sample = law.log10_loss(params, experts) - log_loss
    return FitReport(
        law=law,
        ci_low=dict(zip(COEFFS, map(float, low))),
        ci_high=dict(zip(COEFFS, map(float, high))),
        rmse_log10_in_sample=float(np.sqrt(np.mean(in_sample**2))),
        rmse_log10_loo=float(np.sqrt(np.mean((loo - log_loss) ** 2))),
        max_rel_error_loo=float(np.max(np.abs(10.0 ** (loo - log_loss) - 1.0))),
        n_bar=law.n_bar(loss).tolist(),
        n_bar_fitted=law.n_bar(law.loss(params, experts)).tolist(),
        bootstrap_samples=len(samples),
    )


@dataclass(frozen=True)
class PowerLaw:
    """``log10 L = alpha + beta·log10 E`` at one base size; ``beta_se`` is the slope's
    standard error (NaN with fewer than 3 points)."""

    alpha: float
    beta: float
    beta_se: float

    def loss(self, experts: np.ndarray) -> np.ndarray:
        return 10.0 ** (self.alpha + self.beta * np.log10(np.asarray(experts, dtype=float)))


def fit_power_law(experts: np.ndarray, loss: np.ndarray) -> PowerLaw:
    """Least squares on (log10 E, log10 L); needs at least two distinct E."""
    x, y = np.log10(np.asarray(experts, dtype=float)), np.log10(np.asarray(loss, dtype=float))
    if len(np.unique(x)) < 2:
        raise ValueError("a power law in E needs trials at two or more expert counts")
    beta, alpha = np.polyfit(x, y, 1)
    n = len(x)
    if n < 3:
        return PowerLaw(float(alpha), float(beta), float("nan"))
    resid = y - (alpha + beta * x)
    se = np.sqrt(resid @ resid / (n - 2) / np.sum((x - x.mean()) ** 2))
    return PowerLaw(float(alpha), float(beta), float(se))
