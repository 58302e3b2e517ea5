"""Diagnostics of arXiv 2511.15572: sample-wise SVD, dataset PCA and SEP of a model's tokens.

Library use::

    from timm_widelast.diagnostics import run_report
    report = run_report(model, "path/to/images", "reports/my_model")

The statistics also work on plain token tensors [B, N, D]: ``sample_svd_ranks``,
``DatasetPCA`` (two passes), ``SEPAccumulator`` / ``sep_bandwidths``.
"""
from .compare import advise_width, compare_reports
from .data import ImageFiles, TimmDataset, list_images, paper1000_images
from .extract import TokenExtractor, build_model, load_checkpoint_weights
from .pca import DatasetPCA, dataset_pca
from .plots import plot_report
from .report import SCHEMA, load_report, run_report, write_report
from .sep import SEPAccumulator, bandwidths, channel_spectrum, sep_bandwidths, token_curves
from .svd import DEFAULT_THRESHOLDS, sample_svd_ranks, singular_energies

__all__ = [
    "DEFAULT_THRESHOLDS", "SCHEMA", "DatasetPCA", "ImageFiles", "SEPAccumulator", "TimmDataset", "TokenExtractor",
    "advise_width", "bandwidths", "build_model", "channel_spectrum", "compare_reports", "dataset_pca",
    "list_images", "load_checkpoint_weights", "load_report", "paper1000_images", "plot_report", "run_report",
    "sample_svd_ranks", "sep_bandwidths", "singular_energies", "token_curves", "write_report",
]
