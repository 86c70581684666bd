"""The isoFLOP fit against truth: a Chinchilla loss surface L = E + A/N^alpha + B/D^beta has its
compute-optimal N_opt ~ C^(beta/(alpha+beta)) and D_opt ~ C^(alpha/(alpha+beta)) in closed form
(with C = 6ND); the fit must find those exponents and optima, through the functions and through
`python -m pretrain.scaling fit` on a plan whose runs report the surface's losses."""
from __future__ import annotations

import json

import numpy as np
import pytest
from image_checks import assert_nonempty_png

from pretrain.scaling.__main__ import main
from pretrain.scaling.fit import Observation, fit, isoflop
from pretrain.scaling.plan import read_plan

E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28  # Chinchilla's fitted surface


def surface(n, d):
    return E + A / n ** ALPHA + B / d ** BETA


def chinchilla_n_opt(c: float) -> float:
    g = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
    return g * (c / 6) ** (BETA / (ALPHA + BETA))


def test_exponents_and_optima_recovered_from_a_noisy_surface():
    rng = np.random.default_rng(0)
    obs = [Observation("syn", c, n, 6 * n, surface(n, c / (6 * n)) + rng.normal(0, 0.002))
           for c in (1e19, 4e19, 1.6e20, 6.4e20, 2.56e21)
           for n in chinchilla_n_opt(c) * np.geomspace(0.25, 4, 9)]
    f = fit(obs)["syn"]
    for law, truth in ((f["n_opt"], BETA / (ALPHA + BETA)), (f["d_opt"], ALPHA / (ALPHA + BETA))):
        assert law["exponent"] == pytest.approx(truth, abs=0.02)
        assert abs(law["exponent"] - truth) < 4 * law["exponent_stderr"] + 0.005
    for curve in f["isoflop"]:
        opt = curve["optimum"]
        assert opt["params"] == pytest.approx(chinchilla_n_opt(curve["budget"]), rel=0.05)
        assert opt["tokens"] == pytest.approx(curve["budget"] / (6 * opt["params"]), rel=1e-9)
        assert opt["inside_grid"] and opt["log10_params_stderr"] < 0.05


def test_no_minimum_and_extrapolated_optima_stay_out_of_the_laws():
    down = [Observation("x", 1e20, n, 6 * n, -((np.log10(n) - 8) ** 2)) for n in (1e7, 1e8, 1e9)]
    assert isoflop(down)["optimum"] is None and "downwards" in isoflop(down)["why"]
    assert isoflop(down[:2])["optimum"] is None
    edge = [Observation("x", c, n, 6 * n, (np.log10(n) - 9.5) ** 2) for c in (1e19, 1e20) for n in (1e7, 1e8, 1e9)]
    f = fit(edge)["x"]
    assert all(not cv["optimum"]["inside_grid"] for cv in f["isoflop"]) and f["n_opt"] is None


def test_a_nearly_straight_curve_or_repeated_sizes_have_no_optimum():
    """A vertex far off the sizes tried (it ran to 10^inf parameters, an NLL of -6e4 and Infinity
    in fit.json) and two sizes of one parameter count (a rank-deficient parabola) are no optimum."""
    straight = [Observation("x", 1e20, n, 6 * n, 10 - 0.5 * np.log10(n) + 1e-6 * np.log10(n) ** 2)
                for n in (1e7, 1e8, 1e9)]
    curve = isoflop(straight)
    assert curve["optimum"] is None and "more than a decade outside the sizes tried" in curve["why"]
    json.dumps(fit(straight), allow_nan=False)
    same = [Observation("x", 1e20, n, 6 * n, nll) for n, nll in ((2e5, 3.0), (2e5, 3.0), (4e5, 3.2))]
    assert isoflop(same)["optimum"] is None and isoflop(same)["why"].startswith("2 distinct sizes")


def test_budgets_apart_in_the_plan_stay_apart_in_the_fit():
    bowl = [Observation("x", c, n, 6 * n, (np.log10(n) - 8) ** 2) for c in (1e19, 1.0004e19) for n in (1e7, 1e8, 1e9)]
    assert set(fit(bowl)["x"]["tokens_per_param"]) == {"1e19", "1.0004e19"}


def test_fit_command_recovers_the_optimum_along_the_plans_flops(tmp_path, corpus):
    """A real plan (tiny widths, true FLOPs per token with head and attention terms), its runs'
    summaries holding the surface's loss at each point's N and D: per budget, the optimum is the
    surface's minimum along D = C / FLOPs-per-token(N)."""
    widths = (32, 40, 48, 64, 80, 96, 128)
    sizes = [f"tiny:d_model={w},d_ffn={3 * w}" for w in widths]
    budgets = (3e12, 6e12, 1.2e13)
    assert main(["plan", "--archs", "llama", "--sizes", *sizes, "--budgets", *map(str, budgets), "--data",
                 str(corpus), "--out", str(tmp_path), "--seq-len", "64", "--micro-batch-size", "1",
                 "--batch-tokens", "64", "--min-steps", "1"]) == 0
    _, points = read_plan(tmp_path)
    a, b = 200.0, 500.0  # ~20 tokens per parameter: the optima fall inside the widths tried
    for p in points:
        (tmp_path / "runs" / p.id).mkdir(parents=True)
        (tmp_path / "runs" / p.id / "summary.json").write_text(json.dumps(
            {"status": "finished", "step": p.steps, "last_val_nll": E + a / p.params ** 0.3 + b / p.tokens ** 0.3}))
    assert main(["fit", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "fit.json").read_text())
    assert result["missing"] == []
    log_n = np.log10([p.params for p in points if p.budget == budgets[0]])
    log_f = np.log10([p.flops_per_token for p in points if p.budget == budgets[0]])
    truths = []
    for curve in result["fits"]["llama"]["isoflop"]:
        dense = np.linspace(log_n[0], log_n[-1], 20001)
        loss = E + a / 10 ** (0.3 * dense) + b / (curve["budget"] / 10 ** np.interp(dense, log_n, log_f)) ** 0.3
        truth = 10 ** dense[np.argmin(loss)]
        truths.append(truth)
        assert curve["optimum"]["inside_grid"] and curve["optimum"]["params"] == pytest.approx(truth, rel=0.05)
    law = result["fits"]["llama"]["n_opt"]
    assert law["exponent"] == pytest.approx(np.polyfit(np.log10(budgets), np.log10(truths), 1)[0], abs=0.02)
    for name in result["plots"].values():
        assert_nonempty_png(tmp_path / name)


def test_fit_without_an_optimum_inside_the_grid_still_writes_its_results(tmp_path, corpus, capsys):
    """Two sizes per budget: no parabola, no law; fit.json and both figures are written all the same
    (the laws figure used to fail on its empty log axes)."""
    assert main(["plan", "--archs", "llama", "--sizes", "tiny:d_model=32,d_ffn=96", "tiny:d_model=64,d_ffn=192",
                 "--budgets", "3e12", "6e12", "--data", str(corpus), "--out", str(tmp_path), "--seq-len", "64",
                 "--micro-batch-size", "1", "--batch-tokens", "64", "--min-steps", "1"]) == 0
    for p in read_plan(tmp_path)[1]:
        (tmp_path / "runs" / p.id).mkdir(parents=True)
        (tmp_path / "runs" / p.id / "summary.json").write_text(json.dumps(
            {"status": "finished", "step": p.steps, "last_val_nll": 3.0 + 1e3 / p.params}))
    capsys.readouterr()
    assert main(["fit", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "fit.json").read_text())
    assert result["fits"]["llama"]["n_opt"] is None
    assert all(c["optimum"] is None for c in result["fits"]["llama"]["isoflop"])
    assert "no optimum (2 distinct sizes (parameter counts); a parabola needs 3)" in capsys.readouterr().out
    for name in result["plots"].values():
        assert_nonempty_png(tmp_path / name)
