"""Figures of a scaling fit: isoFLOP parabolas and the fitted laws, one colour per architecture."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pretrain.evaluation.plots import plt, save_figure  # the Agg backend is chosen there


def plot_isoflops(fits: dict[str, Any], path: Path) -> Path:
    """Final NLL vs parameters per budget (markers: budgets), the parabolas, optima as stars."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = "osD^vP*X"
    for colour, (arch, f) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4, fits.items()):
        for k, curve in enumerate(f["isoflop"]):
            ax.scatter(curve["params"], curve["nll"], color=colour, marker=markers[k % len(markers)],
                       label=f"{arch} C={curve['budget']:.1e}")
            if "coef" in curve:
                xs = np.linspace(np.log10(min(curve["params"])) - 0.1, np.log10(max(curve["params"])) + 0.1, 100)
                ax.plot(10 ** xs, np.polyval(curve["coef"], xs), color=colour, linewidth=1)
            if curve["optimum"]:
                ax.scatter([curve["optimum"]["params"]], [curve["optimum"]["nll"]], color=colour, marker="*", s=150,
                           edgecolor="black", zorder=5)
    ax.set(xscale="log", xlabel="parameters (active, non-embedding)", ylabel="final validation NLL",
           title="isoFLOP curves (stars: fitted optima)")
    if ax.get_legend_handles_labels()[0]:  # an empty plan draws no points
        ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def plot_laws(fits: dict[str, Any], path: Path) -> Path:
    """N_opt(C) and D_opt(C): optima as points, the fitted power laws as lines."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    drawn = False
    for colour, (arch, f) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4, fits.items()):
        best = [c for c in f["isoflop"] if c["optimum"] and c["optimum"]["inside_grid"]]
        if not best:
            continue
        drawn = True
        budgets = np.array([c["budget"] for c in best])
        for ax, key, law in ((axes[0], "params", f["n_opt"]), (axes[1], "tokens", f["d_opt"])):
            ax.scatter(budgets, [c["optimum"][key] for c in best], color=colour)
            if law:
                cs = np.geomspace(budgets.min(), budgets.max(), 50)
                ax.plot(cs, 10 ** law["log10_coefficient"] * cs ** law["exponent"], color=colour,
                        label=f"{arch}: C^{law['exponent']:.3f}")
    for ax, what in zip(axes, ("N_opt (parameters)", "D_opt (tokens)")):
        ax.set(xlabel="compute C (FLOPs)", ylabel=what)
        if drawn:  # a log axis needs positive data
            ax.set(xscale="log", yscale="log")
        else:
            ax.text(0.5, 0.5, "no optimum inside the sizes tried", ha="center", va="center", transform=ax.transAxes)
        if ax.get_legend_handles_labels()[0]:  # no law without two budgets whose optimum is inside the grid
            ax.legend(fontsize=8)
    return save_figure(fig, path)
