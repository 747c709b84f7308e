"""Validation plots: ROC, KS, reliability (calibration) and score distributions as PNG files for the
training run; explanation and stability figures (`matplotlib.figure.Figure`, no global state) for the risk
report. Every figure takes its labels ready-made: the report words features from the catalogue."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
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


def _wrapped(labels: Sequence[str], width: int = 48) -> list[str]:
    return [textwrap.fill(label, width) for label in labels]


def _figure(width: float, height: float) -> tuple[Figure, object]:
    figure = Figure(figsize=(width, height))
    return figure, figure.subplots()


def importance_figure(importance: pd.Series, labels: Sequence[str], title: str, top_n: int) -> Figure:
    """Mean |SHAP| bars of the `top_n` features, largest on top; `labels` in the order of `importance`."""
    top = importance.head(top_n)[::-1]
    figure, ax = _figure(8, 0.42 * len(top) + 1.2)
    ax.barh(_wrapped(list(labels)[: len(top)][::-1]), top.to_numpy(), color="#1f5fbf")
    ax.set(xlabel="mean |SHAP| (log-odds)", title=title)
    return figure


def beeswarm_figure(
    values: pd.DataFrame,
    inputs: pd.DataFrame,
    labels: Mapping[str, str],
    order: Sequence[str],
    entity: str,
    seed: int,
) -> Figure:
    """One row of dots per feature (`order`, most important first): where each contribution lies,
    coloured by its value's rank."""
    features = list(order)[::-1]
    rng = np.random.default_rng(seed)
    figure, ax = _figure(9, 0.5 * len(features) + 1.4)
    for row, name in enumerate(features):
        shap_values = values[name].to_numpy()
        column = inputs[name]
        if isinstance(column.dtype, pd.CategoricalDtype):
            colour = np.full(len(column), 0.5)
        else:
            colour = column.rank(pct=True).to_numpy()
        jitter = rng.normal(0, 0.12, len(shap_values))
        points = ax.scatter(
            shap_values, row + jitter, c=colour, cmap="coolwarm", vmin=0, vmax=1, s=6, alpha=0.7, linewidths=0
        )
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(range(len(features)), _wrapped([labels[f] for f in features]))
    ax.set(
        xlabel="SHAP value (log-odds; > 0 raises risk)", title=f"Contribution of each feature per {entity}"
    )
    bar = figure.colorbar(points, ax=ax, ticks=[0, 1], pad=0.01)
    bar.ax.set_yticklabels(["low value", "high value"])
    return figure


def dependence_figure(
    values: pd.DataFrame,
    inputs: pd.DataFrame,
    labels: Mapping[str, str],
    names: Sequence[str],
    units: Mapping[str, str],
) -> Figure:
    """How each feature's value maps to its contribution; missing values in grey at the left."""
    figure = Figure(figsize=(10, 3.8 * ((len(names) + 1) // 2)))
    axes = figure.subplots((len(names) + 1) // 2, 2, squeeze=False).ravel()
    for ax, name in zip(axes, names):
        shap_values, column = values[name], inputs[name]
        if isinstance(column.dtype, pd.CategoricalDtype):
            levels = [level for level in column.cat.categories if (column == level).any()]
            ax.boxplot([shap_values[column == level].to_numpy() for level in levels], showfliers=False)
            ax.set_xticks(range(1, len(levels) + 1), levels, rotation=30, ha="right")
        else:
            known = column.notna()
            ax.scatter(column[known], shap_values[known], s=6, alpha=0.5, color="#1f5fbf", linewidths=0)
            if (~known).any():
                left = column[known].min() if known.any() else 0.0
                ax.scatter(
                    np.full((~known).sum(), left),
                    shap_values[~known],
                    s=6,
                    alpha=0.5,
                    color="grey",
                    linewidths=0,
                    label="missing",
                )
                ax.legend(frameon=False, loc="best")
        ax.axhline(0, color="grey", lw=0.8)
        unit = units.get(name, "")
        ax.set(xlabel=f"value ({unit})" if unit else "value", ylabel="SHAP (log-odds)")
        ax.set_title(textwrap.fill(labels[name], 55), fontsize=9)
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    figure.tight_layout()
    return figure


def comparison_figure(
    table: pd.DataFrame, legend: tuple[str, str], labels: Sequence[str], top_n: int
) -> Figure:
    """Champion and challenger shares of importance (`explain.compare_importance`), `labels` per row."""
    top = table.head(top_n)[::-1]
    figure, ax = _figure(8, 0.45 * len(top) + 1.2)
    y = np.arange(len(top))
    ax.barh(y + 0.2, top["champion_share"], height=0.4, label=legend[0], color="#1f5fbf")
    ax.barh(y - 0.2, top["challenger_share"], height=0.4, label=legend[1], color="#e07b39")
    ax.set_yticks(y, _wrapped(list(labels)[: len(top)][::-1]))
    ax.set(xlabel="share of total mean |SHAP|", title="Feature importance, champion vs challenger")
    ax.legend(frameon=False)
    return figure


def monthly_figure(months: pd.DataFrame, watch_psi: float, max_psi: float) -> Figure:
    """Score PSI (against the first and the previous month) and mean PD per month, with the PSI bands."""
    figure = Figure(figsize=(9, 3.2))
    left, right = figure.subplots(1, 2)
    x = np.arange(len(months))
    left.plot(x, months["score PSI vs first month"], marker="o", label="vs first month")
    left.plot(x, months["score PSI vs previous month"], marker="o", label="vs previous month")
    left.axhline(watch_psi, color="#c99400", ls=":", lw=1, label=f"watch {watch_psi:g}")
    left.axhline(max_psi, color="#b0281b", ls=":", lw=1, label=f"gate {max_psi:g}")
    left.set(title="Score PSI by month", ylabel="PSI")
    left.legend(frameon=False, fontsize=8)
    right.bar(x, months["mean PD"], color="#1f5fbf")
    right.set(title="Mean PD by month", ylabel="mean PD")
    right.yaxis.set_major_formatter(lambda v, _: f"{v:.1%}")
    for ax in (left, right):
        ax.set_xticks(x, months["month"].astype(str), rotation=30, ha="right", fontsize=8)
    figure.tight_layout()
    return figure
