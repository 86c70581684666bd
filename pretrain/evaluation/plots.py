"""PNG figures of the suites' JSON (matplotlib, Agg: no display needed). Each function takes the
per-checkpoint results keyed by label and writes one file, returning its path."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
from matplotlib.ticker import NullFormatter, ScalarFormatter  # noqa: E402


def save_figure(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_positions(results: dict[str, dict[str, Any]], path: Path) -> Path:
    """Loss vs token position, one line per checkpoint; dashed: each one's training length."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, r in results.items():
        mids = [(a + b) / 2 for a, b in zip(r["bin_start"], r["bin_end"])]
        line, = ax.plot(mids, r["bin_nll"], label=label)
        ax.axvline(r["train_seq_len"], color=line.get_color(), linestyle="--", linewidth=0.8)
    ax.set(xlabel="token position", ylabel="NLL (nats/token)", title="Loss per position (dashed: training length)")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_niah(label: str, r: dict[str, Any], path: Path) -> Path:
    """Accuracy heatmap, depth (rows) x context length (columns)."""
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(r["lengths"]), 1.2 + 0.45 * len(r["depths"])))
    im = ax.imshow(r["accuracy"], vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(r["lengths"])), [str(n) for n in r["lengths"]])
    ax.set_yticks(range(len(r["depths"])), [f"{d:.0%}" for d in r["depths"]])
    for i, row in enumerate(r["accuracy"]):
        for j, acc in enumerate(row):
            ax.text(j, i, f"{acc:.2f}", ha="center", va="center", fontsize=8)
    ax.set(xlabel="context length (tokens)", ylabel="needle depth", title=f"needle in a haystack: {label}")
    fig.colorbar(im, ax=ax, label="accuracy")
    return save_figure(fig, path)


def plot_inference(results: dict[str, dict[str, Any]], path: Path) -> Path:
    """Decode tokens/s (solid: up to each total; dotted: median step) and cache MiB per sequence (as
    the comparison table: runs of another batch compare) vs total length."""
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(10, 4))
    for label, r in results.items():
        totals = [p["total"] for p in r["points"]]
        line, = speed.plot(totals, [p["tokens_per_s"] for p in r["points"]], marker="o", label=label)
        speed.plot(totals, [p["median_step_tokens_per_s"] for p in r["points"]], linestyle=":",
                   color=line.get_color())
        memory.plot(totals, [p["cache_bytes"] / 2**20 / r["batch"] for p in r["points"]], marker="o", label=label)
    for ax in (speed, memory):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    speed.set(xlabel="total length (tokens)", ylabel="decode tokens/s",
              title="decode speed (dotted: from the median step)")
    memory.set(xlabel="total length (tokens)", ylabel="cache MiB per sequence (measured)", title="inference cache")
    speed.legend(fontsize=8)
    return save_figure(fig, path)


def plot_bars(values: dict[str, float], ylabel: str, path: Path) -> Path:
    """One bar per checkpoint (e.g. validation NLL), side by side as in the paper's T2."""
    fig, ax = plt.subplots(figsize=(1.5 + 1.1 * len(values), 4))
    ax.bar(range(len(values)), list(values.values()))
    ax.set_xticks(range(len(values)), list(values), rotation=30, ha="right", fontsize=8)
    low = min(values.values())
    ax.set_ylim(low - 0.1 * abs(low) - 1e-3, max(values.values()) * 1.02 + 1e-3)
    ax.set(ylabel=ylabel)
    return save_figure(fig, path)
