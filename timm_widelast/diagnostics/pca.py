"""Dataset PCA: how many dimensions of one basis shared by all images each image needs.

Pass 1 accumulates the channel second moment C = (1/T) sum_i X_i^T X_i over all T
tokens (float64, D x D); ``eigh`` gives the basis V with eigenvalues sorted descending.
Pass 2 measures, per image, E_i(d) = ||X_i V_d||_F^2 / ||X_i||_F^2 for every d, and
the first d with E_i(d) >= t. Memory is O(D^2) plus one length-D curve per image.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .svd import DEFAULT_THRESHOLDS, check_thresholds, ranks_from_cumulative


class DatasetPCA:
    """Streaming two-pass dataset PCA over [B, N, D] token batches.

    ``centre=False`` (the paper's default) uses the uncentred second moment; with
    ``centre=True`` the covariance is used and pass 2 measures the centred tokens.
    """

    def __init__(self, dim: int, centre: bool = False, thresholds: Sequence[float] = DEFAULT_THRESHOLDS):
        self.dim = dim
        self.centre = centre
        self.thresholds = check_thresholds(thresholds)
        self.moment = torch.zeros(dim, dim, dtype=torch.float64)
        self.total = torch.zeros(dim, dtype=torch.float64)  # sum of tokens, for the optional centring
        self.count = 0
        self.eigenvalues: Optional[torch.Tensor] = None
        self.basis: Optional[torch.Tensor] = None
        self.mean: Optional[torch.Tensor] = None

    # pass 1 ------------------------------------------------------------------
    def update(self, tokens: torch.Tensor) -> None:
        """Add a batch of token matrices [B, N, D] to the second moment."""
        x = tokens.reshape(-1, tokens.shape[-1]).to(torch.float64)  # on the tokens' device (GPU stays GPU)
        self.moment += (x.T @ x).cpu()
        self.total += x.sum(0).cpu()
        self.count += x.shape[0]

    def state(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The sums to add across processes (moment, token sum, token count)."""
        return self.moment, self.total, self.count

    def load_state(self, moment: torch.Tensor, total: torch.Tensor, count: int) -> None:
        self.moment, self.total, self.count = moment.to(torch.float64), total.to(torch.float64), int(count)

    def finalize(self) -> None:
        """Turn the sums into the basis: eigh of C, eigenvalues sorted descending."""
        if self.count == 0:
            raise ValueError("DatasetPCA.finalize() called before any update()")
        cov = self.moment / self.count
        self.mean = self.total / self.count
        if self.centre:
            cov = cov - torch.outer(self.mean, self.mean)
        cov = (cov + cov.T) / 2  # exact symmetry for eigh
        values, vectors = torch.linalg.eigh(cov)
        self.eigenvalues = values.flip(0)
        self.basis = vectors.flip(1)

    # pass 2 ------------------------------------------------------------------
    def energy_curves(self, tokens: torch.Tensor) -> torch.Tensor:
        """E_i(d) for d = 1..D of each image in a [B, N, D] batch, float64 [B, D]."""
        if self.basis is None:
            raise ValueError("call finalize() after pass 1 before energy_curves()")
        x = tokens.to(torch.float64)
        basis = self.basis.to(x.device)
        if self.centre:
            x = x - self.mean.to(x.device)
        per_direction = (x @ basis).square().sum(1)  # [B, D]: ||X_i v_j||^2
        norm = x.square().sum((1, 2)).unsqueeze(1)  # ||X_i||_F^2 (V is a complete orthonormal basis)
        return per_direction.cumsum(-1) / norm

    def required_dims(self, curves: torch.Tensor) -> torch.Tensor:
        """The first d with E_i(d) >= t for each threshold t, int64 [B, len(thresholds)]."""
        return ranks_from_cumulative(curves, self.thresholds)


def dataset_pca(batches: Sequence[torch.Tensor | np.ndarray], centre: bool = False,
                thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """In-memory convenience: (eigenvalues [D], curves [n, D], required d [n, len(thresholds)])."""
    batches = [torch.as_tensor(b) for b in batches]
    pca = DatasetPCA(batches[0].shape[-1], centre=centre, thresholds=thresholds)
    for b in batches:
        pca.update(b)
    pca.finalize()
    curves = torch.cat([pca.energy_curves(b) for b in batches])
    return pca.eigenvalues.numpy(), curves.numpy(), pca.required_dims(curves).numpy()
