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

HEAD_DIM = 64  # WideLast's wide block uses 64-d heads, so widths are best kept multiples of 64


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


def advise_width(report: dict, student_width: int, energy: float = 0.95, percentile: float = 99) -> dict:
    """Can a ``student_width`` endpoint hold the teacher's shared subspace, and what to train instead.

    The shared subspace needs d = the ``percentile`` over images of the dataset-PCA d at
    ``energy``. A fixed linear adapter from W channels cannot reproduce more than W of
    those directions, so W < d means an encoding mismatch: give the student a
    teacher-width endpoint (WideLast, or Lift's inference-time projector).
    """
    if student_width < 1:
        raise UserError(f"student width {student_width} must be positive; fix: pass e.g. --student-width 192")
    _check_percentile(percentile)
    thresholds = report["settings"]["thresholds"]
    matches = [j for j, t in enumerate(thresholds) if math.isclose(t, energy, abs_tol=1e-9)]
    if not matches:
        raise UserError(f"the report has no energy threshold {energy} (it has {thresholds}); "
                        f"fix: pass --energy from that list, or re-run `timm-widelast sep --thresholds ... {energy}`")
    j = matches[0]
    teacher = int(report["model"]["dim"])
    d_pca = float(np.percentile(np.asarray(report["pca"]["required_dims"])[:, j], percentile))
    d_svd = float(np.percentile(np.asarray(report["svd"]["ranks"])[:, j], percentile))
    need = int(math.ceil(d_pca))
    min_width = min(teacher, HEAD_DIM * math.ceil(need / HEAD_DIM))
    fits = student_width >= need
    if fits:
        recommendation = "feature-kd"
        width = student_width
        reason = (f"the student's {student_width} channels can hold the teacher's shared subspace "
                  f"({need} dims at {100 * energy:g}% energy, p{percentile:g}); plain feature KD with a linear "
                  "adapter is enough")
    else:
        recommendation = "widelast"
        width = teacher
        reason = (f"the teacher's shared subspace needs {need} dims at {100 * energy:g}% energy (p{percentile:g}) "
                  f"but the student has {student_width}: a fixed linear adapter cannot match it (encoding "
                  f"mismatch). Widen the endpoint to the teacher's width {teacher}: WideLast (last block at "
                  f"{teacher}; best accuracy in the paper) or Lift (keep a {student_width}->{teacher} projector at "
                  f"inference; fewer parameters). At least {min_width} is needed; wider than {teacher} hurt in the "
                  "paper's ablation")
    return {"student_width": student_width, "teacher_width": teacher, "energy": energy, "percentile": percentile,
            "pca_d": d_pca, "svd_rank": d_svd, "fits": fits, "recommendation": recommendation,
            "alternative": None if fits else "lift", "recommended_width": width, "minimum_width": min_width,
            "per_image_fits": student_width >= d_svd, "reason": reason, "model": model_label(report)}
