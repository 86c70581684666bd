"""`fit`: isoFLOP parabolas and compute-optimal power laws from a plan's final losses.

Per (architecture, budget): final NLL = a x^2 + b x + c with x = log10(N) (the paper's fit), the
optimum x* = -b / 2a (a parabola that opens downwards has none and is reported as such), and the
optimal tokens D_opt = C / FLOPs-per-token(N_opt), FLOPs per token from a straight line through the
budget's points in log-log. An optimum outside the sizes tried is an extrapolation: reported
(`inside_grid: false`) but left out of the laws; one more than a decade outside them (a nearly
straight curve, whose vertex runs off to 10^300 parameters) is reported as none. Per architecture over budgets:
log10 N_opt = alpha log10 C + k and log10 D_opt = beta log10 C + k' by least squares. Uncertainties
are standard errors (of the slopes, and of x* by the delta method from the parabola's covariance),
available only when a fit has more points than coefficients.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from pretrain.scaling.plan import budget_label

EXTRAPOLATION_DECADES = 1.0  # how far outside the sizes tried an optimum is still reported

@dataclass(frozen=True)
class Observation:
    arch: str
    budget: float
    params: float
    flops_per_token: float
    nll: float


def _polyfit(x: np.ndarray, y: np.ndarray, deg: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Coefficients (highest power first) and their covariance (None without spare points)."""
    if len(x) > deg + 1:
        coef, cov = np.polyfit(x, y, deg, cov="unscaled")
        resid = y - np.polyval(coef, x)
        return coef, cov * float(resid @ resid) / (len(x) - deg - 1)
    return np.polyfit(x, y, deg), None


def isoflop(obs: list[Observation]) -> dict[str, Any]:
    """The parabola of one (arch, budget) and its optimum."""
    obs = sorted(obs, key=lambda o: o.params)
    x = np.log10([o.params for o in obs])
    y = np.array([o.nll for o in obs])
    out: dict[str, Any] = {"arch": obs[0].arch, "budget": obs[0].budget, "params": [o.params for o in obs],
                           "nll": y.tolist()}
    sizes = len(set(x.tolist()))
    if sizes < 3:  # two sizes of one parameter count are one point of the curve's x axis
        return {**out, "optimum": None, "why": f"{sizes} distinct sizes (parameter counts); a parabola needs 3"}
    coef, cov = _polyfit(x, y, 2)
    a, b, c = coef
    out["coef"] = coef.tolist()
    if a <= 0:
        return {**out, "optimum": None, "why": "the parabola opens downwards (no minimum): widen the size range"}
    x_opt = -b / (2 * a)
    if not x[0] - EXTRAPOLATION_DECADES <= x_opt <= x[-1] + EXTRAPOLATION_DECADES:
        return {**out, "optimum": None, "why": f"its vertex (10^{x_opt:.3g} parameters) lies more than a decade "
                                               f"outside the sizes tried; widen the size range"}
    x_err = None
    if cov is not None:  # gradient of -b/2a with respect to (a, b, c)
        grad = np.array([b / (2 * a * a), -1 / (2 * a), 0.0])
        x_err = float(math.sqrt(max(grad @ cov @ grad, 0.0)))
    log_fpt = np.polyval(np.polyfit(x, np.log10([o.flops_per_token for o in obs]), 1), x_opt)
    n_opt = 10 ** x_opt
    d_opt = obs[0].budget / 10 ** log_fpt
    inside = bool(x[0] <= x_opt <= x[-1])
    return {**out, "optimum": {"params": n_opt, "tokens": d_opt, "tokens_per_param": d_opt / n_opt,
                               "nll": float(c - b * b / (4 * a)), "log10_params_stderr": x_err,
                               "inside_grid": inside}}


def power_law(budgets: list[float], values: list[float]) -> dict[str, Any] | None:
    """value = 10^k x C^exponent fitted in log-log; None below 2 budgets."""
    if len(budgets) < 2:
        return None
    coef, cov = _polyfit(np.log10(budgets), np.log10(values), 1)
    err = None if cov is None else float(math.sqrt(cov[0, 0]))
    return {"exponent": float(coef[0]), "exponent_stderr": err, "log10_coefficient": float(coef[1])}


def fit(observations: list[Observation]) -> dict[str, Any]:
    """Every arch's isoFLOP curves and its laws N_opt(C), D_opt(C)."""
    result: dict[str, Any] = {}
    for arch in sorted({o.arch for o in observations}):
        curves = [isoflop([o for o in observations if o.arch == arch and o.budget == c])
                  for c in sorted({o.budget for o in observations if o.arch == arch})]
        best = [cv for cv in curves if cv["optimum"] and cv["optimum"]["inside_grid"]]
        budgets = [cv["budget"] for cv in best]
        result[arch] = {
            "isoflop": curves,
            "n_opt": power_law(budgets, [cv["optimum"]["params"] for cv in best]),
            "d_opt": power_law(budgets, [cv["optimum"]["tokens"] for cv in best]),
            "tokens_per_param": {budget_label(cv["budget"]): cv["optimum"]["tokens_per_param"] for cv in best},
        }
    return result
