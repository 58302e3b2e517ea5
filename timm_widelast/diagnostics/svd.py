"""Sample-wise SVD: how many singular directions one image's token matrix needs.

For one image X (N tokens x D channels, not centred) with singular values s, the
energy of direction k is s_k^2 and rank_t is the smallest k with
cumsum(s^2) / sum(s^2) >= t.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import numpy as np
import torch

from ..errors import UserError

DEFAULT_THRESHOLDS = (0.8, 0.9, 0.95, 0.99)


def check_thresholds(thresholds: Sequence[float]) -> tuple[float, ...]:
    """Validate energy thresholds: a non-empty list of numbers strictly inside (0, 1)."""
    values = tuple(float(t) for t in thresholds)
    if not values:
        raise UserError("no energy thresholds given; fix: pass e.g. --thresholds 0.8 0.9 0.95 0.99")
    for t in values:
        if not 0.0 < t < 1.0:
            raise UserError(f"energy threshold {t} is outside (0, 1); fix: use fractions such as 0.95, not 95")
    return values


def singular_energies(tokens: torch.Tensor) -> torch.Tensor:
    """Squared singular values of each [N, D] matrix in a [B, N, D] batch, descending, float64.

    The squared singular values are the eigenvalues of the Gram matrix; we take the
    smaller of X X^T (N x N) and X^T X (D x D) so the cost is min(N, D)^2 * max(N, D).
    """
    x = tokens.to(torch.float64)
    gram = x @ x.transpose(1, 2) if x.shape[1] <= x.shape[2] else x.transpose(1, 2) @ x
    with single_thread(gram.device):
        energies = torch.linalg.eigvalsh(gram).flip(-1)
    return energies.clamp_min_(0.0)  # round-off can make zero eigenvalues slightly negative


@contextlib.contextmanager
def single_thread(device: torch.device):
    """Run small batched LAPACK calls on one CPU thread.

    Batched eigvalsh on a few hundred rows gains nothing from intra-op threads, and on a
    loaded machine their synchronisation made it several times slower (measured).
    """
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def ranks_from_cumulative(cum: torch.Tensor, thresholds: Sequence[float]) -> torch.Tensor:
    """First 1-based index where a non-decreasing curve [..., K] reaches each threshold.

    Returns int64 [..., len(thresholds)]; 0 marks a curve that is not finite (no energy at all).
    """
    t = torch.as_tensor(thresholds, dtype=cum.dtype, device=cum.device)
    counts = (cum.unsqueeze(-2) < t.view(-1, 1)).sum(-1)  # how many leading entries stay below t
    ranks = (counts + 1).clamp_max_(cum.shape[-1])
    ranks[~torch.isfinite(cum[..., -1])] = 0
    return ranks


def energy_ranks(energies: torch.Tensor, thresholds: Sequence[float]) -> torch.Tensor:
    """Ranks at the thresholds from descending per-direction energies [B, K]."""
    energies = energies.to(torch.float64)
    total = energies.sum(-1, keepdim=True)
    cum = energies.cumsum(-1) / total  # nan for an all-zero image, handled above
    return ranks_from_cumulative(cum, thresholds)


def sample_svd_ranks(tokens: torch.Tensor | np.ndarray, thresholds: Sequence[float] = DEFAULT_THRESHOLDS
                     ) -> np.ndarray:
    """Per-image rank at each energy threshold for a batch of token matrices [B, N, D].

    Returns an int64 array [B, len(thresholds)].
    """
    thresholds = check_thresholds(thresholds)
    tokens = torch.as_tensor(tokens)
    if tokens.dim() == 2:
        tokens = tokens.unsqueeze(0)
    return energy_ranks(singular_energies(tokens), thresholds).cpu().numpy()
