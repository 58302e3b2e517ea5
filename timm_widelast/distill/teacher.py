"""The frozen teacher: creation, safe checkpoint loading, its own preprocessing, and one forward.

The teacher is kept out of anything trainable: parameters have ``requires_grad=False``, it stays
in eval mode, runs under ``torch.no_grad()``, and training loops must not hand it to
``accelerator.prepare`` (that would write it into every checkpoint).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import timm
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..models._checkpoints import CheckpointMismatchError, load_release_checkpoint
from ..taps import LayerSpec, TokenTap, resolve_tap


def model_input_size(model: nn.Module) -> Tuple[int, int]:
    """The spatial input size the model was built for (its patch embed's, else its pretrained cfg's)."""
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        return (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    size = timm.data.resolve_data_config({}, model=model)["input_size"]
    return tuple(size[-2:])


def create_teacher_model(name: Optional[str], kwargs: Optional[Dict[str, Any]] = None,
                         checkpoint: Optional[str] = None, pretrained: bool = True) -> nn.Module:
    """Create the teacher with ``timm.create_model``; weights from ``checkpoint`` when given.

    ``checkpoint`` may be a weights file (``.safetensors``, or ``.pth`` read with ``weights_only=True``)
    or an exported folder holding ``config.json`` + ``model.safetensors`` (then ``name`` may be None).
    ``num_classes`` is never forced onto the teacher: timm would silently reset its head.
    """
    kwargs = dict(kwargs or {})
    if checkpoint and Path(checkpoint).is_dir():
        if not (Path(checkpoint) / "config.json").is_file():
            raise UserError(f"teacher checkpoint folder {checkpoint} has no config.json")
        try:
            return timm.create_model(f"local-dir:{checkpoint}", pretrained=True, **kwargs)
        except RuntimeError as err:
            raise UserError(f"cannot load teacher from {checkpoint}: {str(err).splitlines()[0]}") from err
    if not name:
        raise UserError("no teacher: pass --kd-model-name (and optionally --kd-checkpoint)")
    if not timm.is_model(name):
        raise UserError(f"unknown teacher model {name!r} (see timm.list_models(); "
                        "our students need `import timm_widelast`, already done here)")
    try:
        model = timm.create_model(name, pretrained=pretrained and not checkpoint, **kwargs)
    except TypeError as err:
        raise UserError(f"bad --kd-model-kwargs for {name}: {err}") from err
    if checkpoint:
        try:
            state_dict = load_release_checkpoint(checkpoint)
        except FileNotFoundError as err:
            raise UserError(f"teacher checkpoint not found: {checkpoint}") from err
        except CheckpointMismatchError as err:
            raise UserError(str(err)) from err
        state_dict = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as err:
            raise UserError(f"teacher checkpoint {checkpoint} does not fit {name} "
                            f"(check --kd-model-kwargs, e.g. num_classes): {str(err).splitlines()[1:2]}") from err
    return model


class FrozenTeacher(nn.Module):
    """A frozen teacher that returns ``(logits or None, endpoint tokens or None, grid)`` for student inputs.

    Inputs arrive normalized for the student; they are converted to the teacher's mean/std and
    resized to the teacher's own input size when it differs.
    """

    def __init__(self, model: nn.Module, layer: LayerSpec = None,
                 student_mean: Sequence[float] = (0.485, 0.456, 0.406),
                 student_std: Sequence[float] = (0.229, 0.224, 0.225),
                 need_logits: bool = True, need_tokens: bool = True) -> None:
        super().__init__()
        self.model = model
        self.model.eval()
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.layer = layer
        self.need_logits = need_logits
        self.need_tokens = need_tokens
        if need_tokens:
            resolve_tap(model, layer)  # fails early on a layer the teacher lacks
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406)), dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225)), dtype=torch.float32).view(1, -1, 1, 1)
        s_mean = torch.tensor(tuple(student_mean), dtype=torch.float32).view(1, -1, 1, 1)
        s_std = torch.tensor(tuple(student_std), dtype=torch.float32).view(1, -1, 1, 1)
        # x_t = (x_s * std_s + mean_s - mean_t) / std_t = x_s * scale + shift: one fused op per batch
        self.register_buffer("scale", s_std / std, persistent=False)
        self.register_buffer("shift", (s_mean - mean) / std, persistent=False)
        self.same_norm = bool(torch.equal(mean, s_mean) and torch.equal(std, s_std))
        self.input_size = model_input_size(model)
        self.dynamic_size = bool(getattr(model, "dynamic_img_size", False))

    @property
    def num_classes(self) -> int:
        return int(getattr(self.model, "num_classes", 0) or 0)

    def train(self, mode: bool = True) -> "FrozenTeacher":
        """The teacher never leaves eval mode (dropout/drop-path off, norms frozen)."""
        return super().train(False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Student-normalized batch -> teacher-normalized batch at the teacher's input size."""
        if not self.same_norm:
            x = x * self.scale.to(x.dtype) + self.shift.to(x.dtype)
        if not self.dynamic_size and tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bicubic", align_corners=False, antialias=True)
        return x

    @torch.no_grad()
    def forward(self, x: torch.Tensor, need_logits: Optional[bool] = None, need_tokens: Optional[bool] = None,
                layer: LayerSpec = None) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor],
                                                  Optional[Tuple[int, int]]]:
        """``(logits, tokens, grid)``; per-call flags override the defaults so one teacher can serve many tasks."""
        need_logits = self.need_logits if need_logits is None else need_logits
        need_tokens = self.need_tokens if need_tokens is None else need_tokens
        layer = self.layer if layer is None else layer
        x = self.preprocess(x)
        if not need_tokens:
            return self.model(x), None, None
        # Without soft KD the forward stops at the tap: CaiT's class-attention blocks and the head are skipped.
        with TokenTap(self.model, layer, stop_early=not need_logits) as tap:
            logits = tap.run(x)
        if tap.tokens is None:
            raise UserError(f"teacher layer {tap.spec.module_name} never ran in the forward pass; choose another "
                            "--kd-layer")
        return logits, tap.tokens, tap.grid
