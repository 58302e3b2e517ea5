"""PNG plots drawn only from a report dict (so they can be redrawn from report.json).

Each ``*_figure`` function returns the matplotlib figure (tests read its axes); the
``plot_*`` functions save it atomically and close it. Legends sit outside the axes so
they never cover a curve; labels use the short model name (no ``local-dir:`` paths).
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..io import atomic_write
from .report import model_label, short_model_name


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display needed
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")  # "tight" keeps the outside legends
    atomic_write(path, buf.getvalue())
    _figure().close(fig)


def _legend_outside(ax, **kwargs) -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=7, **kwargs)


def sep_curves_figure(reports: Sequence[dict]):
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
        ax.scatter(s["b"], s["levels"], color="C3", zorder=3, s=15, label="b_a of the mean curve")
    ax.set(xlabel="leading channel-frequency bins d / bins", ylabel="mean cumulative energy (%)",
           xlim=(0, 1), ylim=(0, 100.5), title=f"SEP ({reports[0]['sep']['mode']})")
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    return fig


def plot_sep_curves(reports: Sequence[dict], path: str | os.PathLike) -> None:
    _save(sep_curves_figure(reports), Path(path))


def _integer_bins(lo: int, hi: int, most: int = 60) -> np.ndarray:
    """Histogram edges on half-integers from lo to hi, at most ``most`` bins of equal integer width."""
    width = max(1, int(np.ceil((hi - lo + 1) / most)))
    return np.arange(lo - 0.5, hi + width + 0.5, width)


def rank_hist_figure(report: dict):
    """Per threshold: histogram over images of the sample-SVD rank vs the dataset-PCA d.

    The x-range is the range of the data (plus a margin); the two histograms are drawn as
    translucent steps so the overlapping bars both stay visible.
    """
    plt = _figure()
    thresholds = report["settings"]["thresholds"]
    svd, pca = np.asarray(report["svd"]["ranks"]), np.asarray(report["pca"]["required_dims"])
    fig, axes = plt.subplots(1, len(thresholds), figsize=(3.2 * len(thresholds), 3), squeeze=False)
    for j, (ax, t) in enumerate(zip(axes[0], thresholds)):
        values = np.concatenate([svd[:, j], pca[:, j]])
        lo, hi = int(values.min()), int(values.max())
        bins = _integer_bins(lo, hi)
        for data, colour, name in ((svd[:, j], "C0", "sample SVD rank"), (pca[:, j], "C1", "dataset-PCA d")):
            ax.hist(data, bins=bins, histtype="stepfilled", alpha=0.3, color=colour)
            ax.hist(data, bins=bins, histtype="step", lw=1.5, color=colour, label=name)
        margin = max(1.0, 0.05 * (hi - lo))
        ax.set(title=f"{100 * t:g}% energy", xlabel="dimensions needed", xlim=(lo - margin, hi + margin))
    axes[0][0].set_ylabel("images")
    _legend_outside(axes[0][-1])
    fig.suptitle(f"{model_label(report)} (D={report['model']['dim']})", y=1.04)  # above the per-threshold titles
    return fig


def plot_rank_hist(report: dict, path: str | os.PathLike) -> None:
    _save(rank_hist_figure(report), Path(path))


def pca_energy_figure(report: dict):
    """E_i(d): a few images' curves, the spread over images, and the threshold lines."""
    plt = _figure()
    p = report["pca"]
    q = {k: np.asarray(v) for k, v in p["energy_quantiles"].items()}
    d = np.arange(1, len(p["energy_mean"]) + 1)
    fig, ax = plt.subplots(figsize=(5, 4))
    for k, c in enumerate(p["sample_curves"]):
        ax.plot(d, c, color="0.7", lw=0.6, label="single images" if k == 0 else None)
    ax.fill_between(d, q["0"], q["100"], color="C0", alpha=0.15, label="min-max over images")
    ax.plot(d, q["1"], "C1", lw=1, label="1st percentile")
    ax.plot(d, q["50"], "C0", lw=1.5, label="median")
    for t in report["settings"]["thresholds"]:
        ax.axhline(t, color="k", lw=0.5, ls=":")
    ax.set(xlabel="d (leading dataset-PCA directions)", ylabel="E_i(d)", ylim=(0, 1.01), xlim=(1, len(d)),
           title=f"{model_label(report)}: energy kept per image")
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    return fig


def plot_pca_energy(report: dict, path: str | os.PathLike) -> None:
    _save(pca_energy_figure(report), Path(path))


def depth_figure(sweep: dict):
    """A sweep against depth: per-image SVD rank and dataset-PCA d at the first percentile, and SEP b_a."""
    plt = _figure()
    rows, settings = sweep["layers"], sweep["settings"]
    q = f"{settings['percentiles'][0]:g}"
    x = np.arange(len(rows))
    names = [r["layer"] for r in rows]
    fig, (ax_rank, ax_b) = plt.subplots(1, 2, figsize=(11, 4))
    for j, t in enumerate(settings["thresholds"]):
        ax_rank.plot(x, [r["svd_percentiles"][q][j] for r in rows], "o-", color=f"C{j}", ms=3,
                     label=f"sample SVD, {100 * t:g}%")
        ax_rank.plot(x, [r["pca_percentiles"][q][j] for r in rows], "s--", color=f"C{j}", ms=3,
                     label=f"dataset PCA, {100 * t:g}%")
    ax_rank.set(ylabel=f"dimensions needed ({q}th percentile over images)", title="ranks against depth")
    for j, a in enumerate(settings["sep_levels"]):
        ax_b.plot(x, [r["sep_b"][j] for r in rows], "o-", color=f"C{j}", ms=3, label=f"b_{a:g}")
    ax_b.set(ylabel="SEP b_a (mean curve)", ylim=(0, 1.02), title="SEP bandwidth against depth")
    for ax in (ax_rank, ax_b):
        ax.set_xticks(x, names, rotation=60, ha="right", fontsize=7)
        ax.set(xlabel="layer", xlim=(-0.5, len(rows) - 0.5))
        ax.grid(alpha=0.3)
        _legend_outside(ax)
    model = sweep["model"]
    fig.suptitle(short_model_name(model.get("label") or model.get("name") or "model"))
    fig.subplots_adjust(wspace=0.75)
    return fig


def plot_depth(sweep: dict, path: str | os.PathLike) -> None:
    _save(depth_figure(sweep), Path(path))


def plot_report(report: dict, out_dir: str | os.PathLike) -> list[Path]:
    """All three plots of one report; returns their paths."""
    out = Path(out_dir)
    paths = [out / "sep_curve.png", out / "rank_hist.png", out / "pca_energy.png"]
    plot_sep_curves([report], paths[0])
    plot_rank_hist(report, paths[1])
    plot_pca_energy(report, paths[2])
    return paths
