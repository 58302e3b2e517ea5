"""PNG plots drawn only from a report dict (so they can be redrawn from report.json)."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..io import atomic_write
from .report import model_label


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display needed
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write(path, buf.getvalue())


def plot_sep_curves(reports: Sequence[dict], path: str | os.PathLike) -> None:
    """Mean SEP curve(s) against the fraction of leading bins, with the diagonal of white noise."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5, 4))
    for r in reports:
        curve = np.asarray(r["sep"]["mean_curve"])
        x = np.arange(1, len(curve) + 1) / len(curve)
        ax.plot(x, curve, label=f"{model_label(r)} (D={r['model']['dim']})")
    ax.plot([0, 1], [0, 100], "k--", lw=1, label="white noise (diagonal)")
    if len(reports) == 1:
        s = reports[0]["sep"]
        ax.scatter(s["b"], s["levels"], color="C3", zorder=3, s=15, label="b_a")
    ax.set(xlabel="leading channel-frequency bins d / bins", ylabel="mean cumulative energy (%)",
           xlim=(0, 1), ylim=(0, 100.5), title=f"SEP ({reports[0]['sep']['mode']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, Path(path))
    plt.close(fig)


def plot_rank_hist(report: dict, path: str | os.PathLike) -> None:
    """Per threshold: histogram over images of the sample-SVD rank vs the dataset-PCA d."""
    plt = _figure()
    thresholds = report["settings"]["thresholds"]
    svd, pca = np.asarray(report["svd"]["ranks"]), np.asarray(report["pca"]["required_dims"])
    dim = report["model"]["dim"]
    fig, axes = plt.subplots(1, len(thresholds), figsize=(3.2 * len(thresholds), 3), squeeze=False)
    bins = np.linspace(0.5, dim + 0.5, min(dim, 64) + 1)
    for j, (ax, t) in enumerate(zip(axes[0], thresholds)):
        ax.hist(svd[:, j], bins=bins, alpha=0.6, label="sample SVD")
        ax.hist(pca[:, j], bins=bins, alpha=0.6, label="dataset PCA")
        ax.set(title=f"{100 * t:g}% energy", xlabel="dimensions needed", xlim=(0, dim + 1))
    axes[0][0].set_ylabel("images")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(model_label(report), y=1.04)  # above the per-threshold titles
    _save(fig, Path(path))
    plt.close(fig)


def plot_pca_energy(report: dict, path: str | os.PathLike) -> None:
    """E_i(d): a few images' curves, the spread over images, and the threshold lines."""
    plt = _figure()
    p = report["pca"]
    q = {k: np.asarray(v) for k, v in p["energy_quantiles"].items()}
    d = np.arange(1, len(p["energy_mean"]) + 1)
    fig, ax = plt.subplots(figsize=(5, 4))
    for c in p["sample_curves"]:
        ax.plot(d, c, color="0.7", lw=0.6)
    ax.fill_between(d, q["0"], q["100"], color="C0", alpha=0.15, label="min-max over images")
    ax.plot(d, q["1"], "C1", lw=1, label="1st percentile")
    ax.plot(d, q["50"], "C0", lw=1.5, label="median")
    for t in report["settings"]["thresholds"]:
        ax.axhline(t, color="k", lw=0.5, ls=":")
    ax.set(xlabel="d (leading dataset-PCA directions)", ylabel="E_i(d)", ylim=(0, 1.01),
           title=f"{model_label(report)}: energy kept per image")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    _save(fig, Path(path))
    plt.close(fig)


def plot_report(report: dict, out_dir: str | os.PathLike) -> list[Path]:
    """All three plots of one report; returns their paths."""
    out = Path(out_dir)
    paths = [out / "sep_curve.png", out / "rank_hist.png", out / "pca_energy.png"]
    plot_sep_curves([report], paths[0])
    plot_rank_hist(report, paths[1])
    plot_pca_energy(report, paths[2])
    return paths
