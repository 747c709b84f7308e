"""Validation plots as PNG files: ROC, KS, reliability (calibration) and score distributions."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

RELIABILITY_BINS = 10


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def roc_plot(y: np.ndarray, scores: dict[str, np.ndarray], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, score in scores.items():
        fpr, tpr, _ = roc_curve(y, score)
        ax.plot(fpr, tpr, label=name)
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC, out-of-time test")
    ax.legend(loc="lower right")
    return _save(fig, path)


def ks_plot(y: np.ndarray, pd_values: np.ndarray, path: Path) -> Path:
    """Cumulative share of defaulters and of good loans by PD; KS is the largest vertical gap."""
    grid = np.unique(pd_values)
    bad = np.searchsorted(np.sort(pd_values[y == 1]), grid, side="right") / max(1, (y == 1).sum())
    good = np.searchsorted(np.sort(pd_values[y == 0]), grid, side="right") / max(1, (y == 0).sum())
    at = int(np.argmax(good - bad))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(grid, good, label="good")
    ax.plot(grid, bad, label="default")
    ax.vlines(grid[at], bad[at], good[at], colors="k", linestyles="--", label=f"KS {good[at] - bad[at]:.3f}")
    ax.set(xscale="log", xlabel="PD", ylabel="cumulative share", title="KS, out-of-time test")
    ax.legend()
    return _save(fig, path)


def calibration_plot(
    y: np.ndarray, pd_values: np.ndarray, path: Path, title: str = "Calibration, out-of-time test"
) -> Path:
    """Observed default rate against mean PD in equal-count bins (the diagonal is perfect calibration)."""
    order = np.argsort(pd_values, kind="stable")
    bins = [idx for idx in np.array_split(order, RELIABILITY_BINS) if len(idx)]
    mean_pd = [pd_values[idx].mean() for idx in bins]
    rate = [y[idx].mean() for idx in bins]
    top = max(max(mean_pd), max(rate)) * 1.05
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, top], [0, top], ls=":", c="grey")
    ax.plot(mean_pd, rate, marker="o")
    ax.set(xlabel="mean predicted PD", ylabel="observed default rate", title=title)
    return _save(fig, path)


def score_distribution_plot(pd_by_slice: dict[str, np.ndarray], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.logspace(-5, 0, 50)
    for name, values in pd_by_slice.items():
        ax.hist(values, bins=bins, histtype="step", density=True, label=name)
    ax.set(xscale="log", xlabel="PD", ylabel="density", title="Score distribution by slice")
    ax.legend()
    return _save(fig, path)
