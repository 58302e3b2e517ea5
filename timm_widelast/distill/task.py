"""``EndpointDistillationTask``: the paper's loss as a ``timm.task.TrainingTask``.

    L = w_task * CE_smooth(y, s) + a * tau^2 * KL_batchmean(t || s) + l_feat * L_feat(s_end, t_end)

with ``w_task = 1 - a`` unless given. Endpoints are read by forward hooks (no model
rewrite, no second forward). The trainable part is :class:`DistillStudent` (student +
optional training-only projector); the teacher is a frozen :class:`FrozenTeacher`.
Works without a teacher too (plain supervised training).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from timm.task import TrainingTask, resolve_classification_loss
from timm.utils import ModelEmaV3
from timm.utils.model import unwrap_model
from torch import nn

from ..errors import UserError
from ..taps import LayerSpec, TokenTap, extract_tokens, resolve_tap
from .endpoints import EndpointAligner
from .losses import FEATURE_LOSSES, feature_loss, soft_kd_loss
from .teacher import FrozenTeacher, model_input_size


class DistillStudent(nn.Module):
    """Student plus the training-only projector; returns ``(logits, endpoint tokens, grid)``.

    The projector lives here (not in the student) so DDP/FSDP sync its gradients with the
    student's, while the exported student never contains it.
    """

    def __init__(self, student: nn.Module, projector: Optional[nn.Module] = None, layer: LayerSpec = None,
                 tap: bool = True) -> None:
        super().__init__()
        self.student = student
        self.projector = projector
        self.layer = layer
        self.tap = tap

    def no_weight_decay(self) -> set:
        """The student's no-decay names, prefixed, so timm's optimizer factory still finds them."""
        names = getattr(self.student, "no_weight_decay", lambda: set())()
        return {f"student.{name}" for name in names}

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[Tuple[int, int]]]:
        if not self.tap:
            return self.student(x), None, None
        with TokenTap(self.student, self.layer, detach=False) as tap:
            logits = self.student(x)
        tokens = tap.tokens
        if self.projector is not None:
            tokens = self.projector(tokens)
        return logits, tokens, tap.grid


def check_weights(task_weight: float, distill_weight: float, feat_weight: float) -> None:
    """Refuse impossible loss weights with one clear message."""
    if distill_weight < 0 or distill_weight > 1:
        raise UserError(f"--distill-loss-weight (a) must be in [0, 1], got {distill_weight}")
    if task_weight < 0:
        raise UserError(f"--task-loss-weight must be >= 0, got {task_weight}")
    if feat_weight < 0:
        raise UserError(f"--feat-weight must be >= 0, got {feat_weight}")


class EndpointDistillationTask(TrainingTask):
    """Soft-KD + endpoint-feature distillation (Lift / WideLast / naive) for timm's and our loops.

    Args:
        student: the timm model being trained.
        teacher: a :class:`FrozenTeacher`, a plain module (wrapped), or None for plain training.
        criterion / criterion_kwargs: classification loss (e.g. ``dict(smoothing=0.1)``; with Mixup
            ``dict(soft_targets=True)``), as in :class:`timm.task.ClassificationTask`.
        distill_loss_weight: ``a`` for the soft-KD term (0 = no logit KD).
        task_loss_weight: CE weight; defaults to ``1 - a``.
        temperature: ``tau``.
        feat_loss / feat_weight: ``mse``, ``spectral`` or ``none``, and ``l_feat``.
        student_layer / teacher_layer: taps (None = defaults in :mod:`timm_widelast.taps`).
        width_align: ``auto``, ``pool``, ``linear`` or ``none`` (see :mod:`.endpoints`).
        probe_size: input size for the one-off probe forward that reads endpoint widths.
    """

    def __init__(
            self,
            student: nn.Module,
            teacher: Optional[Union[FrozenTeacher, nn.Module]] = None,
            criterion: Optional[Callable] = None,
            criterion_kwargs: Optional[Dict[str, Any]] = None,
            distill_loss_weight: float = 0.0,
            task_loss_weight: Optional[float] = None,
            temperature: float = 1.0,
            feat_loss: str = "none",
            feat_weight: float = 0.0,
            student_layer: LayerSpec = None,
            teacher_layer: LayerSpec = None,
            width_align: str = "auto",
            probe_size: Optional[Tuple[int, int]] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = False,
    ) -> None:
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        if feat_loss not in FEATURE_LOSSES:
            raise UserError(f"unknown --feat-loss {feat_loss!r}; choose one of {', '.join(FEATURE_LOSSES)}")
        if temperature <= 0:
            raise UserError(f"--kd-temperature must be > 0, got {temperature}")
        task_loss_weight = 1.0 - distill_loss_weight if task_loss_weight is None else task_loss_weight
        check_weights(task_loss_weight, distill_loss_weight, feat_weight)
        if feat_weight == 0:
            feat_loss = "none"
        if teacher is None and (distill_loss_weight > 0 or feat_loss != "none"):
            raise UserError("soft KD or a feature loss needs a teacher (--kd-model-name)")
        self.distill_loss_weight = float(distill_loss_weight)
        self.task_loss_weight = float(task_loss_weight)
        self.temperature = float(temperature)
        self.feat_loss = feat_loss
        self.feat_weight = float(feat_weight)
        self.criterion = resolve_classification_loss(criterion, self.device, criterion_kwargs=criterion_kwargs)

        use_teacher = teacher is not None and (distill_loss_weight > 0 or feat_loss != "none")
        if use_teacher and not isinstance(teacher, FrozenTeacher):
            cfg = getattr(student, "pretrained_cfg", None) or {}
            teacher = FrozenTeacher(teacher, teacher_layer, cfg.get("mean", (0.485, 0.456, 0.406)),
                                    cfg.get("std", (0.229, 0.224, 0.225)))
        self.teacher: Optional[FrozenTeacher] = teacher if use_teacher else None
        # what this task asks of the teacher on each call (the teacher object itself is not modified)
        self.teacher_layer = teacher_layer
        if self.teacher is not None:
            if teacher_layer is not None:
                resolve_tap(self.teacher.model, teacher_layer)  # a missing layer fails here, not mid-training
            if distill_loss_weight > 0:
                self._check_label_space(student, self.teacher)

        projector = None
        self.aligner: Optional[EndpointAligner] = None
        if feat_loss != "none":
            s_dim, t_dim = self._probe_widths(student, self.teacher, student_layer, teacher_layer, probe_size)
            # The aligner keeps no parameters: its projector moves into DistillStudent (trainable), which
            # applies it to the student tokens, so here the aligner only resizes/pools the teacher side.
            self.aligner = EndpointAligner(s_dim, t_dim, width_align)
            projector, self.aligner.projector = self.aligner.projector, None
        self.trainable_module = DistillStudent(student, projector, student_layer, tap=feat_loss != "none")

    @property
    def width_mode(self) -> str:
        """The resolved ``--width-align`` mode (``none`` without a feature loss)."""
        return self.aligner.mode if self.aligner is not None else "none"

    @staticmethod
    def _check_label_space(student: nn.Module, teacher: FrozenTeacher) -> None:
        s_classes = int(getattr(student, "num_classes", 0) or 0)
        if teacher.num_classes != s_classes:
            raise UserError(
                f"soft KD needs the teacher's classifier to match the student's label space: teacher has "
                f"{teacher.num_classes} classes, student {s_classes}. Give a teacher trained on these labels "
                "(--kd-checkpoint, --kd-model-kwargs num_classes=N) or set --distill-loss-weight 0")

    @staticmethod
    @torch.no_grad()
    def _probe_widths(student: nn.Module, teacher: FrozenTeacher, layer: LayerSpec, teacher_layer: LayerSpec,
                      probe_size: Optional[Tuple[int, int]]) -> Tuple[int, int]:
        """Run one 1-image forward of each model to read the endpoint widths (architecture-agnostic)."""
        size = tuple(probe_size) if probe_size else model_input_size(student)
        param = next(student.parameters())
        x = torch.zeros(1, 3, *size, device=param.device, dtype=param.dtype)
        was_training = student.training
        student.eval()
        try:
            s_tokens = extract_tokens(student, x, layer)
        finally:
            student.train(was_training)
        t_param = next(teacher.model.parameters())
        _, t_tokens, _ = teacher(x.to(t_param.device, t_param.dtype), need_logits=False, need_tokens=True,
                                 layer=teacher_layer)
        return s_tokens.shape[-1], t_tokens.shape[-1]

    # --- timm TrainingTask API -------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "EndpointDistillationTask":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    @property
    def student(self) -> nn.Module:
        return unwrap_model(self.trainable_module).student

    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs) -> "EndpointDistillationTask":
        """DDP-wrap the trainable part only (timm's train.py path); the teacher stays unwrapped and frozen."""
        from torch.nn.parallel import DistributedDataParallel as DDP
        self.trainable_module = DDP(self.trainable_module, device_ids=device_ids, **ddp_kwargs)
        return self

    def compile(self, backend: str = "inductor", mode: Optional[str] = None, **compile_kwargs) -> nn.Module:
        """Compile the student (hooks stay attached to its submodules) and, optionally, the teacher model."""
        trainable = unwrap_model(self.trainable_module)
        trainable.student = torch.compile(trainable.student, backend=backend, mode=mode, **compile_kwargs)
        if self.teacher is not None:
            self.teacher.model = torch.compile(self.teacher.model, backend=backend, mode=mode, **compile_kwargs)
        self.eval_model = trainable.student
        return self.eval_model

    def get_eval_model(self, module: Optional[nn.Module] = None, ema: bool = False) -> Optional[nn.Module]:
        if module is None and ema:
            return getattr(self, "trainable_module_ema", None)
        if module is None and hasattr(self, "eval_model"):
            return self.eval_model
        module = module if module is not None else self.trainable_module
        unwrapped = unwrap_model(module)
        return unwrapped.student if isinstance(unwrapped, DistillStudent) else module

    def setup_ema(self, decay: float = 0.9999, use_warmup: bool = False, device: Optional[torch.device] = None,
                  **kwargs) -> nn.Module:
        """EMA of the student only; the projector is training-only and has no inference use."""
        self.trainable_module_ema = ModelEmaV3(self.student, decay=decay, use_warmup=use_warmup, device=device,
                                               **kwargs)
        return self.trainable_module_ema

    def update_ema(self, step: Optional[int] = None) -> None:
        if self.has_ema():
            self.trainable_module_ema.update(self.student, step=step)

    def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict[str, Any]:
        """The training-only projector, saved beside (never inside) the student's weights."""
        projector = unwrap_model(self.trainable_module).projector
        if ema or projector is None:
            return {}
        return {"projector": projector.state_dict()}

    def load_task_state(self, state: Optional[Dict[str, Any]], strict: bool = True,
                        module: Optional[nn.Module] = None, ema: bool = False) -> None:
        if not state or ema:
            return
        projector = unwrap_model(self.trainable_module).projector
        if projector is None:
            if strict and "projector" in state:
                raise RuntimeError("checkpoint holds a projector but this task has none")
            return
        projector.load_state_dict(state["projector"], strict=strict)

    # --- the loss ---------------------------------------------------------------------------------------
    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Returns ``loss``, ``output`` (student logits) and each weighted-before component."""
        logits, s_tokens, s_grid = self.trainable_module(input)
        task_loss = self.criterion(logits, target)
        zero = task_loss.new_zeros(())
        kd_loss, feat = zero, zero
        if self.teacher is not None:
            t_logits, t_tokens, t_grid = self.teacher(input, need_logits=self.distill_loss_weight > 0,
                                                      need_tokens=self.feat_loss != "none", layer=self.teacher_layer)
            if self.distill_loss_weight > 0:
                kd_loss = soft_kd_loss(logits, t_logits, self.temperature)
            if self.feat_loss != "none":
                s_tokens, t_tokens = self.aligner(s_tokens, s_grid, t_tokens, t_grid)
                feat = feature_loss(self.feat_loss, s_tokens, t_tokens.to(s_tokens.dtype), s_grid)
        loss = self.task_loss_weight * task_loss + self.distill_loss_weight * kd_loss + self.feat_weight * feat
        return {"loss": loss, "output": logits, "task_loss": task_loss.detach(), "kd_loss": kd_loss.detach(),
                "feat_loss": feat.detach()}
