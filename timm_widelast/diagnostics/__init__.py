"""Diagnostics of arXiv 2511.15572: sample-wise SVD, dataset PCA and SEP of a model's tokens.

Library use::

    from timm_widelast.diagnostics import run_report
    report = run_report(model, "path/to/images", "reports/my_model")
    sweep = run_sweep(model, "path/to/images", "reports/my_model_sweep", layers=["all"])

The statistics also work on plain token tensors [B, N, D]: ``sample_svd_ranks``,
``DatasetPCA`` (two passes), ``SEPAccumulator`` / ``sep_bandwidths``.
"""
from .compare import advise_width, compare_reports
from .data import ImageFiles, TimmDataset, list_images, paper1000_images
from .extract import LayerTokens, TokenExtractor, build_model, load_checkpoint_weights
from .pca import DatasetPCA, dataset_pca
from .plots import plot_depth, plot_report
from .report import SCHEMA, SWEEP_SCHEMA, load_report, run_report, run_sweep, short_model_name, write_report
from .sep import SEPAccumulator, bandwidths, channel_spectrum, permutation_robustness, sep_bandwidths, token_curves
from .svd import DEFAULT_THRESHOLDS, sample_svd_ranks, singular_energies

__all__ = [
    "DEFAULT_THRESHOLDS", "SCHEMA", "SWEEP_SCHEMA", "DatasetPCA", "ImageFiles", "LayerTokens", "SEPAccumulator",
    "TimmDataset", "TokenExtractor", "advise_width", "bandwidths", "build_model", "channel_spectrum",
    "compare_reports", "dataset_pca", "list_images", "load_checkpoint_weights", "load_report", "paper1000_images",
    "permutation_robustness", "plot_depth", "plot_report", "run_report", "run_sweep", "sample_svd_ranks",
    "sep_bandwidths", "short_model_name", "singular_energies", "token_curves", "write_report",
]
