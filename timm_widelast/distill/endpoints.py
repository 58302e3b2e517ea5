"""Aligning a student endpoint with a teacher endpoint (width and token grid).

Width modes (``--width-align``):

* ``none``   -- widths must match (Lift/WideLast at teacher width): nothing is created;
* ``pool``   -- the paper's naive mode: the wider map is average-pooled along channels down to
  the narrower width (no parameters). Usually that is the teacher; a student wider than its
  teacher (e.g. Lift with ``lift_dim=448`` against a 384-wide teacher) is pooled down to the
  teacher's width instead, as the authors' release does (adaptive average pooling along
  channels in both cases, the same windows as its ``adaptive_avg_pool3d(F, (C, None, None))``);
* ``linear`` -- classic FitNet: a training-only ``Linear(student -> teacher)`` on the student
  tokens. It trains with the student but is never part of the exported student;
* ``auto``   -- ``none`` when widths match, else ``pool`` (what the paper's naive rows and the
  release do).

Grid: when the token grids differ, the teacher grid is resized (bilinear) to the student's.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .losses import tokens_to_map

WIDTH_ALIGN_MODES = ("auto", "pool", "linear", "none")


def resolve_width_mode(mode: str, student_dim: int, teacher_dim: int) -> str:
    """Resolve ``auto`` and refuse combinations that cannot work."""
    if mode not in WIDTH_ALIGN_MODES:
        raise UserError(f"unknown --width-align {mode!r}; choose one of {', '.join(WIDTH_ALIGN_MODES)}")
    if mode == "auto":
        return "none" if student_dim == teacher_dim else "pool"
    if mode == "none" and student_dim != teacher_dim:
        raise UserError(f"student endpoint has {student_dim} channels and the teacher's {teacher_dim}; "
                        "use --width-align pool or linear (or a student at teacher width)")
    return mode


def channel_avg_pool(tokens: torch.Tensor, out_dim: int) -> torch.Tensor:
    """Average-pool ``[B, N, C]`` along channels to ``[B, N, out_dim]`` (contiguous groups when C % out_dim == 0)."""
    if tokens.shape[-1] == out_dim:
        return tokens
    batch, count, channels = tokens.shape
    pooled = F.adaptive_avg_pool1d(tokens.reshape(batch * count, 1, channels), out_dim)
    return pooled.reshape(batch, count, out_dim)


def resize_grid(tokens: torch.Tensor, grid: Tuple[int, int], target: Tuple[int, int]) -> torch.Tensor:
    """Resize a token grid ``[B, H*W, C]`` to ``target`` (bilinear), returned as tokens again."""
    if tuple(grid) == tuple(target):
        return tokens
    feature_map = tokens_to_map(tokens, grid)
    feature_map = F.interpolate(feature_map.float(), size=tuple(target), mode="bilinear", align_corners=False)
    return feature_map.flatten(2).transpose(1, 2).to(tokens.dtype)


class EndpointAligner(nn.Module):
    """Maps (student tokens, teacher tokens) to two tensors of equal shape for the feature loss."""

    def __init__(self, student_dim: int, teacher_dim: int, mode: str = "auto") -> None:
        super().__init__()
        self.student_dim = student_dim
        self.teacher_dim = teacher_dim
        self.mode = resolve_width_mode(mode, student_dim, teacher_dim)
        # Only the FitNet mode has parameters; with matching widths nothing is created at all.
        self.projector: Optional[nn.Linear] = (
            nn.Linear(student_dim, teacher_dim) if self.mode == "linear" else None)
        if self.projector is not None:
            nn.init.trunc_normal_(self.projector.weight, std=0.02)
            nn.init.zeros_(self.projector.bias)

    def forward(self, student: torch.Tensor, student_grid: Tuple[int, int], teacher: torch.Tensor,
                teacher_grid: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
        teacher = resize_grid(teacher, teacher_grid, student_grid)
        if self.mode == "pool" and self.student_dim > self.teacher_dim:
            student = channel_avg_pool(student, self.teacher_dim)  # a wider student is pooled down, as released
        elif self.mode == "pool":
            teacher = channel_avg_pool(teacher, self.student_dim)
        elif self.projector is not None:
            student = self.projector(student)
        return student, teacher
