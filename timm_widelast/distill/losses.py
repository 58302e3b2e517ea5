"""The paper's loss terms: soft KD (KL, batchmean x tau^2), hard KD, and feature losses (MSE, SpectralKD).

Feature losses take patch tokens ``[B, N, C]`` plus their ``(H, W)`` grid, because
SpectralKD needs the spatial layout ``[B, C, H, W]`` for its 2-D FFT over space.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

FEATURE_LOSSES = ("mse", "spectral", "none")


def soft_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``tau^2 * KL(softmax(t/tau) || softmax(s/tau))`` summed over classes, averaged over the batch.

    Not DeiT's per-element mean, which is ``num_classes`` times smaller.
    """
    # float32 so fp16/bf16 logits under autocast do not lose the small KL values
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature ** 2


def hard_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """DeiT's hard distillation: cross-entropy to the teacher's argmax class (no temperature)."""
    return F.cross_entropy(student_logits.float(), teacher_logits.argmax(dim=-1))


def tokens_to_map(tokens: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """``[B, H*W, C]`` tokens (row-major grid) -> ``[B, C, H, W]`` map."""
    batch, count, channels = tokens.shape
    height, width = grid
    if height * width != count:
        raise ValueError(f"{count} tokens do not fill a {height}x{width} grid")
    return tokens.transpose(1, 2).reshape(batch, channels, height, width)


def mse_feature_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements."""
    return F.mse_loss(student.float(), teacher.float())


def spectral_feature_loss(student: torch.Tensor, teacher: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """SpectralKD: ``rfft2`` over the spatial grid (ortho), real and imaginary parts stacked, then MSE."""
    s_map = tokens_to_map(student.float(), grid)
    t_map = tokens_to_map(teacher.float(), grid)
    s_freq = torch.fft.rfft2(s_map, dim=(-2, -1), norm="ortho")
    t_freq = torch.fft.rfft2(t_map, dim=(-2, -1), norm="ortho")
    return F.mse_loss(torch.view_as_real(s_freq), torch.view_as_real(t_freq))


def feature_loss(kind: str, student: torch.Tensor, teacher: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """Dispatch on ``kind`` (``mse`` or ``spectral``); both inputs are aligned ``[B, N, C]`` tokens."""
    if student.shape != teacher.shape:
        raise ValueError(f"feature shapes differ after alignment: {tuple(student.shape)} vs {tuple(teacher.shape)}")
    if kind == "mse":
        return mse_feature_loss(student, teacher)
    if kind == "spectral":
        return spectral_feature_loss(student, teacher, grid)
    raise ValueError(f"unknown feature loss {kind!r}; choose one of {FEATURE_LOSSES}")
