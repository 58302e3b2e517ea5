"""Several reports side by side (`compare`) and the student-width advice (`advise`)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import UserError
from ..io import atomic_write
from .report import load_report, markdown_tables, model_label


def _check_percentile(percentile: float) -> None:
    if not 0 <= percentile <= 100:
        raise UserError(f"percentile {percentile} is outside [0, 100]; fix: pass e.g. --percentile 99")


def compare_reports(paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike, percentile: float = 99) -> dict:
    """Merge reports into compare.md / compare.json and one overlaid SEP figure."""
    if not paths:
        raise UserError("no reports to compare; fix: pass one or more report folders")
    _check_percentile(percentile)
    reports = [load_report(p) for p in paths]
    thresholds = reports[0]["settings"]["thresholds"]
    levels = reports[0]["sep"]["levels"]
    for p, r in zip(paths, reports):
        if r["settings"]["thresholds"] != thresholds or r["sep"]["levels"] != levels:
            raise UserError(f"report {str(p)!r} uses other thresholds/levels than {str(paths[0])!r}; "
                            "fix: re-run `timm-widelast sep` with the same --thresholds and --sep-levels")
    out = Path(out_dir)
    rows = []
    for p, r in zip(paths, reports):
        rows.append({"report": str(p), "model": model_label(r), "dim": r["model"]["dim"],
                     "svd": np.percentile(r["svd"]["ranks"], percentile, axis=0).tolist(),
                     "pca": np.percentile(r["pca"]["required_dims"], percentile, axis=0).tolist(),
                     "sep_d": r["sep"]["d"], "sep_b": r["sep"]["b"], "sep_mode": r["sep"]["mode"]})
    summary = {"schema": "timm-widelast/sep-compare/v1", "percentile": percentile, "thresholds": thresholds,
               "sep_levels": levels, "rows": rows}
    atomic_write(out / "compare.json", json.dumps(summary, indent=1))
    atomic_write(out / "compare.md", "# SEP comparison\n\n" + markdown_tables(reports, percentile))
    from .plots import plot_sep_curves

    plot_sep_curves(reports, out / "sep_compare.png")
    return summary


def advise_width(report: dict, student_width: int, energy: float = 0.95, percentile: float = 99,
                 sep_level: float = 90) -> dict:
    """Can a ``student_width`` endpoint carry the teacher's features, and what to train instead.

    The paper's diagnosis needs two widths from the teacher's report, and the student
    must reach both:

    * the shared subspace: the ``percentile`` over images of the dataset-PCA d at ``energy``;
    * the SEP bandwidth: each token spreads its energy over b_a of the channel-frequency
      bins (a = ``sep_level``), i.e. over ceil(b_a * D) of the teacher's D channels.

    A student narrower than either cannot reproduce the teacher's tokens through a fixed
    linear adapter (encoding mismatch): give it a teacher-width endpoint (WideLast, or Lift's
    inference-time projector). The result always satisfies
    ``fits == (student_width >= minimum_width)`` and ``minimum_width <= recommended_width``.
    """
    if student_width < 1:
        raise UserError(f"student width {student_width} must be positive; fix: pass e.g. --student-width 192")
    _check_percentile(percentile)
    thresholds = report["settings"]["thresholds"]
    matches = [j for j, t in enumerate(thresholds) if math.isclose(t, energy, abs_tol=1e-9)]
    if not matches:
        raise UserError(f"the report has no energy threshold {energy} (it has {thresholds}); "
                        f"fix: pass --energy from that list, or re-run `timm-widelast sep --thresholds ... {energy}`")
    levels = report["sep"]["levels"]
    level_at = [k for k, a in enumerate(levels) if math.isclose(a, sep_level, abs_tol=1e-9)]
    if not level_at:
        raise UserError(f"the report has no SEP level {sep_level:g} (it has {[f'{a:g}' for a in levels]}); "
                        "fix: pass --sep-level from that list")
    j, k = matches[0], level_at[0]
    teacher = int(report["model"]["dim"])
    d_pca = float(np.percentile(np.asarray(report["pca"]["required_dims"])[:, j], percentile))
    d_svd = float(np.percentile(np.asarray(report["svd"]["ranks"])[:, j], percentile))
    b = float(report["sep"]["b"][k])
    sep_width = int(math.ceil(b * teacher - 1e-9))  # channels a token's energy spreads over
    pca_width = int(math.ceil(d_pca - 1e-9))
    need = max(pca_width, sep_width)
    fits = student_width >= need
    warnings = []
    if student_width > teacher:
        warnings.append(f"the student ({student_width}) is wider than the teacher ({teacher}): a feature loss then "
                        f"pools the student down to {teacher} (as the authors' release does), and endpoints wider "
                        "than the teacher did worse in the paper's ablation")
    limit = "the SEP bandwidth" if sep_width >= pca_width else "the shared subspace"
    basis = (f"shared subspace {pca_width} dims (dataset-PCA d at {100 * energy:g}% energy, p{percentile:g}); "
             f"SEP bandwidth {sep_width} channels (b_{sep_level:g} = {b:.3f} of D = {teacher})")
    if fits:
        recommendation, width = "feature-kd", student_width
        reason = (f"{basis}: the student's {student_width} channels reach both, so plain feature KD with a linear "
                  "adapter can carry the teacher's tokens")
    else:
        recommendation, width = "widelast", teacher
        reason = (f"{basis}: the student's {student_width} channels fall short of {limit} ({need}), so a fixed "
                  f"linear adapter cannot reproduce the teacher's tokens (encoding mismatch). Give the student a "
                  f"teacher-width endpoint: WideLast (last block at {teacher}; best accuracy in the paper) or Lift "
                  f"(keep a {student_width}->{teacher} projector at inference; fewer parameters)")
    return {"student_width": student_width, "teacher_width": teacher, "energy": energy, "percentile": percentile,
            "sep_level": sep_level, "pca_d": d_pca, "pca_width": pca_width, "sep_b": b, "sep_width": sep_width,
            "svd_rank": d_svd, "fits": fits, "minimum_width": need, "recommendation": recommendation,
            "alternative": None if fits else "lift", "recommended_width": width,
            "per_image_fits": student_width >= d_svd, "warnings": warnings, "reason": reason,
            "model": model_label(report)}
