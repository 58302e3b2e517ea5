"""SEP (spectral energy pattern): how a single token spreads its energy over channel frequencies.

Per token x in R^D: F = fft(x) (two-sided, no window, no mean removal), energy |F_k|^2,
SEP(d) = 100 * sum_{k<d} |F_k|^2 / sum_k |F_k|^2 in natural bin order (DC first).
The curves are averaged over all tokens; d_a is the 1-based number of leading bins
where the mean curve first reaches a%, and b_a = d_a / (number of bins).

"folded" mode is the one-sided variant: bin k and bin D-k are added together, giving
D // 2 + 1 bins (DC, 1..D/2), and b_a is divided by that bin count.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import UserError
from .svd import ranks_from_cumulative

DEFAULT_LEVELS = (50, 60, 70, 80, 90)
SEP_MODES = ("full", "folded")


def channel_spectrum(tokens: torch.Tensor, mode: str = "full") -> torch.Tensor:
    """Energy per channel-frequency bin of every token, float64 [..., bins]."""
    if mode not in SEP_MODES:
        raise UserError(f"unknown SEP mode {mode!r}; fix: use one of {', '.join(SEP_MODES)}")
    energy = torch.fft.fft(tokens.to(torch.float64), dim=-1).abs().square()
    if mode == "folded":
        dim = energy.shape[-1]
        half = dim // 2
        folded = energy[..., : half + 1].clone()
        # bin k (1 <= k < D/2) and its mirror D-k carry the same frequency
        pairs = (dim + 1) // 2 - 1  # bins 1..pairs have a distinct mirror D-1..D-pairs
        if pairs > 0:
            folded[..., 1: pairs + 1] += energy[..., dim - pairs:].flip(-1)
        energy = folded
    return energy


def token_curves(tokens: torch.Tensor, mode: str = "full") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token SEP curves in percent [..., bins] and a mask of tokens with non-zero energy."""
    energy = channel_spectrum(tokens, mode)
    total = energy.sum(-1, keepdim=True)
    valid = total.squeeze(-1) > 0  # an all-zero token has no spectrum; leave it out of the mean
    curves = 100.0 * energy.cumsum(-1) / torch.where(total > 0, total, torch.ones_like(total))
    return curves, valid


def bandwidths(curve: torch.Tensor | np.ndarray, levels: Sequence[float] = DEFAULT_LEVELS) -> np.ndarray:
    """d_a for each level a: the 1-based first bin where a curve [..., bins] reaches a%."""
    curve = torch.as_tensor(curve, dtype=torch.float64)
    return ranks_from_cumulative(curve, [float(v) for v in levels]).numpy()


def _half_spectrum(tokens: torch.Tensor) -> torch.Tensor:
    """|F_k|^2 for k = 0..D//2 via rfft: a real token's two-sided spectrum mirrors these bins."""
    f = torch.fft.rfft(tokens.to(torch.float64), dim=-1)
    return f.real.square() + f.imag.square()


def _mirror_counts(dim: int) -> torch.Tensor:
    """How many two-sided bins each one-sided bin stands for (1 for DC and Nyquist, else 2)."""
    counts = torch.ones(dim // 2 + 1, dtype=torch.float64)
    counts[1: (dim + 1) // 2] = 2.0
    return counts


class SEPAccumulator:
    """Streaming mean SEP curve over all tokens, plus per-image bandwidths.

    ``permutations`` > 0 adds that many fixed random channel orders (seeded); the
    spread of b_a across them is the robustness check.

    Why it is cheap: the mean of per-token cumulative curves equals the cumulative sum
    of the mean *normalised* spectrum, so we only sum |F_k|^2 / sum_k |F_k|^2 over tokens
    (a batched matrix product) and take one cumsum at the end. For real tokens the
    two-sided spectrum is the mirror of the one-sided rfft bins, which halves the FFT work.
    """

    def __init__(self, dim: int, mode: str = "full", levels: Sequence[float] = DEFAULT_LEVELS,
                 permutations: int = 0, seed: int = 0):
        if mode not in SEP_MODES:
            raise UserError(f"unknown SEP mode {mode!r}; fix: use one of {', '.join(SEP_MODES)}")
        for a in levels:
            if not 0 < float(a) < 100:
                raise UserError(f"SEP level {a} is outside (0, 100); fix: use percentages such as 50 60 70 80 90")
        if permutations < 0:
            raise UserError(f"permutation count {permutations} is negative; fix: pass --permutations 0 or more")
        self.dim, self.mode, self.levels = dim, mode, tuple(float(a) for a in levels)
        self.bins = dim if mode == "full" else dim // 2 + 1
        self.counts = _mirror_counts(dim)
        k = torch.arange(dim)
        self.mirror = torch.minimum(k, dim - k)  # two-sided bin k has the energy of one-sided bin min(k, D-k)
        gen = torch.Generator().manual_seed(seed)
        self.perms = [torch.randperm(dim, generator=gen) for _ in range(permutations)]
        # row 0: natural channel order; rows 1..k: the permuted orders (one-sided normalised spectra)
        self.spec_sum = torch.zeros(1 + len(self.perms), dim // 2 + 1, dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.float64)

    def _to_curve(self, half: torch.Tensor) -> torch.Tensor:
        """Mean normalised one-sided spectra [..., D//2+1] -> SEP curves in percent [..., bins]."""
        spec = half[..., self.mirror] if self.mode == "full" else half * self.counts
        return 100.0 * spec.cumsum(-1)

    def _normalised_sums(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image: sum over tokens of the normalised one-sided spectrum [B, H], and valid tokens [B]."""
        half = _half_spectrum(tokens)
        total = half @ self.counts.to(half.device)  # sum over all D two-sided bins
        valid = total > 0  # an all-zero token has no spectrum; leave it out of the mean
        weights = torch.where(valid, 1.0 / torch.where(valid, total, 1.0), 0.0)
        return torch.einsum("bn,bnh->bh", weights, half), valid.sum(1)

    def update(self, tokens: torch.Tensor) -> np.ndarray:
        """Add a batch [B, N, D]; returns the per-image bandwidths d_a, int64 [B, len(levels)]."""
        tokens = tokens.to(torch.float64)  # cast once; the permuted copies reuse it
        sums, valid = self._normalised_sums(tokens)
        self.spec_sum[0] += sums.sum(0).cpu()
        self.count += valid.sum().cpu().to(torch.float64)
        for row, perm in enumerate(self.perms, start=1):
            self.spec_sum[row] += self._normalised_sums(tokens[..., perm.to(tokens.device)])[0].sum(0).cpu()
        per_image = self._to_curve(sums.cpu() / valid.cpu().clamp_min(1).unsqueeze(1).to(torch.float64))
        return bandwidths(per_image, self.levels)

    def state(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The sums to add across processes."""
        return self.spec_sum, self.count

    def load_state(self, spec_sum: torch.Tensor, count: torch.Tensor) -> None:
        self.spec_sum, self.count = spec_sum.to(torch.float64), count.to(torch.float64)

    def mean_curves(self) -> np.ndarray:
        """Mean curves [1 + permutations, bins]; row 0 is the natural channel order."""
        if float(self.count) == 0:
            raise ValueError("SEPAccumulator has seen no token with non-zero energy")
        return self._to_curve(self.spec_sum / self.count).numpy()

    def result(self) -> dict:
        """Mean curve, d_a, b_a, and the permutation spread of b_a."""
        curves = self.mean_curves()
        d = bandwidths(curves, self.levels)
        b = d / self.bins
        out = {
            "mode": self.mode, "bins": self.bins, "levels": list(self.levels),
            "mean_curve": curves[0].tolist(),
            "d": d[0].tolist(), "b": b[0].tolist(),
        }
        if self.perms:
            out["permutations"] = {
                "count": len(self.perms),
                "mean_curves": curves[1:].tolist(),
                "b": b[1:].tolist(),
                "b_min": b[1:].min(0).tolist(), "b_max": b[1:].max(0).tolist(),
                "b_std": b[1:].std(0).tolist(),
            }
        return out


def sep_bandwidths(tokens: torch.Tensor | np.ndarray, mode: str = "full", levels: Sequence[float] = DEFAULT_LEVELS,
                   permutations: int = 0, seed: int = 0, batch_size: Optional[int] = None) -> dict:
    """In-memory convenience: SEP result for tokens [B, N, D] (or [N, D])."""
    tokens = torch.as_tensor(tokens)
    if tokens.dim() == 2:
        tokens = tokens.unsqueeze(0)
    acc = SEPAccumulator(tokens.shape[-1], mode, levels, permutations, seed)
    step = batch_size or tokens.shape[0]
    for start in range(0, tokens.shape[0], step):
        acc.update(tokens[start: start + step])
    return acc.result()
