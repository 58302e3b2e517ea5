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
PERMUTATION_SEED = 2026  # the release's seed for its channel permutations
PERMUTATIONS = 50  # the release's count
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

    ``permutations`` > 0 adds that many random channel orders, drawn as the authors'
    release draws them: ``numpy.random.default_rng(seed).permutation(D)`` in turn, seed 2026.
    ``update`` returns each image's d_a in the natural and in every permuted order;
    :func:`permutation_robustness` turns those into the release's statistic.

    Why it is cheap: the mean of per-token cumulative curves equals the cumulative sum
    of the mean *normalised* spectrum, so we only sum |F_k|^2 / sum_k |F_k|^2 over tokens
    (a batched matrix product) and take one cumsum at the end. For real tokens the
    two-sided spectrum is the mirror of the one-sided rfft bins, which halves the FFT work.
    """

    def __init__(self, dim: int, mode: str = "full", levels: Sequence[float] = DEFAULT_LEVELS,
                 permutations: int = 0, seed: int = PERMUTATION_SEED):
        if mode not in SEP_MODES:
            raise UserError(f"unknown SEP mode {mode!r}; fix: use one of {', '.join(SEP_MODES)}")
        for a in levels:
            if not 0 < float(a) < 100:
                raise UserError(f"SEP level {a} is outside (0, 100); fix: use percentages such as 50 60 70 80 90")
        if permutations < 0:
            raise UserError(f"permutation count {permutations} is negative; fix: pass --permutations 0 or more")
        self.dim, self.mode, self.levels, self.seed = dim, mode, tuple(float(a) for a in levels), seed
        self.bins = dim if mode == "full" else dim // 2 + 1
        self.counts = _mirror_counts(dim)
        k = torch.arange(dim)
        self.mirror = torch.minimum(k, dim - k)  # two-sided bin k has the energy of one-sided bin min(k, D-k)
        rng = np.random.default_rng(seed)
        self.perms = [torch.from_numpy(rng.permutation(dim)) for _ in range(permutations)]
        # row 0: natural channel order; rows 1..k: the permuted orders (one-sided normalised spectra).
        # spec_sum weighs every token alike (our mean curve); image_sum every image alike (the release's).
        self.spec_sum = torch.zeros(1 + len(self.perms), dim // 2 + 1, dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.float64)
        self.image_sum = torch.zeros_like(self.spec_sum)
        self.image_count = torch.zeros((), dtype=torch.float64)

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
        """Add a batch [B, N, D]; returns per-image d_a, int64 [B, 1 + permutations, len(levels)].

        Column 0 is the natural channel order. An image without a single non-zero token gets d = 0.
        """
        tokens = tokens.to(torch.float64)  # cast once; the permuted copies reuse it
        if self.perms and self.perms[0].device != tokens.device:
            self.perms = [perm.to(tokens.device) for perm in self.perms]  # once, not every batch
        results = [self._normalised_sums(tokens if perm is None else tokens[..., perm]) for perm in [None, *self.perms]]
        # one copy to the host for every channel order (a .cpu() per order would wait on the device each time);
        # a permutation keeps each token's energy, so the valid tokens are the natural order's
        all_sums = torch.stack([sums for sums, _ in results]).cpu()
        valid = results[0][1].cpu().to(torch.float64)
        has = valid > 0
        self.count += valid.sum()
        self.image_count += has.sum()
        rows = []
        for row, sums in enumerate(all_sums):
            per_image = sums / valid.unsqueeze(1)  # mean normalised spectrum of each image (nan: no valid token)
            self.spec_sum[row] += sums.sum(0)
            self.image_sum[row] += per_image[has].sum(0)
            rows.append(bandwidths(self._to_curve(per_image), self.levels))
        return np.stack(rows, axis=1)

    def state(self) -> tuple[torch.Tensor, ...]:
        """The sums to add across processes."""
        return self.spec_sum, self.count, self.image_sum, self.image_count

    def load_state(self, spec_sum: torch.Tensor, count: torch.Tensor, image_sum: torch.Tensor,
                   image_count: torch.Tensor) -> None:
        self.spec_sum, self.count = spec_sum.to(torch.float64), count.to(torch.float64)
        self.image_sum, self.image_count = image_sum.to(torch.float64), image_count.to(torch.float64)

    def mean_curves(self) -> np.ndarray:
        """Mean curves over all tokens [1 + permutations, bins]; row 0 is the natural channel order."""
        if float(self.count) == 0:
            raise ValueError("SEPAccumulator has seen no token with non-zero energy")
        return self._to_curve(self.spec_sum / self.count).numpy()

    def image_mean_curves(self) -> np.ndarray:
        """Mean over images of the per-image curves [1 + permutations, bins] (the release's mean curve)."""
        if float(self.image_count) == 0:
            raise ValueError("SEPAccumulator has seen no token with non-zero energy")
        return self._to_curve(self.image_sum / self.image_count).numpy()

    def result(self, per_image_d: Optional[np.ndarray] = None) -> dict:
        """Mean curve, d_a, b_a; with permutations, their spread and (given every image's
        ``update`` output, in any order) the release's robustness statistics."""
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
                "count": len(self.perms), "seed": self.seed, "generator": "numpy.random.default_rng(seed).permutation",
                "b": b[1:].tolist(),
                "b_min": b[1:].min(0).tolist(), "b_max": b[1:].max(0).tolist(),
                "b_std": b[1:].std(0).tolist(),
            }
            if per_image_d is not None:
                out["permutations"]["per_image"] = permutation_robustness(
                    per_image_d, self.bins, self.image_mean_curves())
        return out


def permutation_robustness(per_image_d: np.ndarray, bins: int, image_mean_curves: np.ndarray) -> dict:
    """The release's permutation statistics from per-image d_a [n, 1 + P, A] (column 0: natural order).

    Statistic: the mean over images of the per-image b_a = d_a / bins. Per permutation p,
    delta_p = mean_images(b under p) - mean_images(b natural); curve_l1_p = mean over bins of
    |mean curve under p - natural mean curve| / 100, the mean curves being means over images.
    Spreads over permutations are population std (ddof 0) and numpy percentiles 5 / 95.
    """
    d = np.asarray(per_image_d, dtype=np.float64)
    d = d[(d > 0).all(axis=(1, 2))]  # images with no non-zero token have no bandwidth
    b = d / bins
    natural = b[:, 0].mean(0)
    per_perm = b[:, 1:].mean(0)  # [P, A]
    delta = per_perm - natural
    l1 = np.abs(image_mean_curves[1:] - image_mean_curves[0]).mean(-1) / 100.0
    return {
        "statistic": "mean over images of per-image b_a",
        "natural_mean": natural.tolist(), "natural_std_over_images": b[:, 0].std(0).tolist(),
        "b_mean": per_perm.tolist(),
        "permuted_mean": per_perm.mean(0).tolist(), "permuted_std": per_perm.std(0).tolist(),
        "delta_mean": delta.mean(0).tolist(), "delta_std": delta.std(0).tolist(),
        "delta_p05": np.percentile(delta, 5, axis=0).tolist(), "delta_p95": np.percentile(delta, 95, axis=0).tolist(),
        "curve_l1": l1.tolist(), "curve_l1_mean": float(l1.mean()), "curve_l1_std": float(l1.std()),
    }


def sep_bandwidths(tokens: torch.Tensor | np.ndarray, mode: str = "full", levels: Sequence[float] = DEFAULT_LEVELS,
                   permutations: int = 0, seed: int = PERMUTATION_SEED, batch_size: Optional[int] = None) -> dict:
    """In-memory convenience: SEP result for tokens [B, N, D] (or [N, D]), one row per image."""
    tokens = torch.as_tensor(tokens)
    if tokens.dim() == 2:
        tokens = tokens.unsqueeze(0)
    acc = SEPAccumulator(tokens.shape[-1], mode, levels, permutations, seed)
    step = batch_size or tokens.shape[0]
    per_image = [acc.update(tokens[start: start + step]) for start in range(0, tokens.shape[0], step)]
    return acc.result(np.concatenate(per_image))
