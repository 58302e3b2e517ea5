"""``EndpointDistillationTask``: the paper's loss as a ``timm.task.TrainingTask``.

    L = w_task * CE_smooth(y, s) + a * KD(t, s) + l_feat * mean_pairs L_feat(s_k, t_k)

with ``w_task = 1 - a`` unless given; ``KD`` is soft (``tau^2 * KL_batchmean``) or hard (CE to
the teacher's argmax), and the feature loss is averaged over paired layers (one pair by default:
the endpoints). Endpoints are read by forward hooks registered once, at construction
(:class:`timm_widelast.taps.TapSet`): no model rewrite, no second forward, nothing registered
per step, so :meth:`EndpointDistillationTask.compile` gives graphs without breaks. The trainable
part is :class:`DistillStudent` (student + optional training-only projectors); the teacher is a
frozen :class:`FrozenTeacher`. Works without a teacher too (plain supervised training).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from timm.task import TrainingTask, resolve_classification_loss
from timm.utils import ModelEmaV3
from timm.utils.model import unwrap_model
from torch import nn

from ..errors import UserError
from ..taps import Grid, LayerSpec, TapSet, layer_list, resolve_tap
from .endpoints import EndpointAligner
from .losses import FEATURE_LOSSES, feature_loss, hard_kd_loss, soft_kd_loss
from .teacher import FrozenTeacher, model_input_size

DISTILLATION_TYPES = ("soft", "hard")
Layers = Union[LayerSpec, Sequence[LayerSpec]]


class DistillStudent(nn.Module):
    """Student plus the training-only projectors; returns ``(logits, tokens per layer, grid per layer)``.

    The projectors live here (not in the student) so DDP/FSDP sync their gradients with the
    student's, while the exported student never contains them. ``projector`` is one module for
    one layer, or an ``nn.ModuleList`` with one per layer. The taps' hooks are registered here,
    once, on the student's own modules (so they also fire inside FSDP-wrapped blocks).
    """

    def __init__(self, student: nn.Module, projector: Optional[nn.Module] = None, layer: Layers = None,
                 tap: bool = True) -> None:
        super().__init__()
        self.student = student
        self.projector = projector
        self.taps: Optional[TapSet] = TapSet(student, layer_list(layer), detach=False) if tap else None

    def no_weight_decay(self) -> set:
        """The student's no-decay names, prefixed, so timm's optimizer factory still finds them."""
        names = getattr(self.student, "no_weight_decay", lambda: set())()
        return {f"student.{name}" for name in names}

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[List[torch.Tensor]], Optional[List[Grid]]]:
        if self.taps is None:
            return self.student(x), None, None
        logits, tokens, grids = self.taps.run(x)
        if self.projector is not None:
            projectors = self.projector if isinstance(self.projector, nn.ModuleList) else [self.projector]
            tokens = [project(t) for project, t in zip(projectors, tokens)]
        return logits, tokens, grids


def check_weights(task_weight: float, distill_weight: float, feat_weight: float) -> None:
    """Refuse impossible loss weights with one clear message."""
    if distill_weight < 0 or distill_weight > 1:
        raise UserError(f"--distill-loss-weight (a) must be in [0, 1], got {distill_weight}")
    if task_weight < 0:
        raise UserError(f"--task-loss-weight must be >= 0, got {task_weight}")
    if feat_weight < 0:
        raise UserError(f"--feat-weight must be >= 0, got {feat_weight}")


class EndpointDistillationTask(TrainingTask):
    """Soft/hard KD + endpoint-feature distillation (Lift / WideLast / naive) for timm's and our loops.

    Args:
        student: the timm model being trained.
        teacher: a :class:`FrozenTeacher`, a plain module (wrapped), or None for plain training.
        criterion / criterion_kwargs: classification loss (e.g. ``dict(smoothing=0.1)``; with Mixup
            ``dict(soft_targets=True)``), as in :class:`timm.task.ClassificationTask`.
        distill_loss_weight: ``a`` for the KD term (0 = no logit KD).
        task_loss_weight: CE weight; defaults to ``1 - a``.
        temperature: ``tau`` (soft KD only).
        feat_loss / feat_weight: ``mse``, ``spectral`` or ``none``, and ``l_feat``.
        student_layer / teacher_layer: taps (None = defaults in :mod:`timm_widelast.taps`), or equally
            long lists of them: paired layers whose feature losses are averaged.
        width_align: ``auto``, ``pool``, ``linear`` or ``none``, applied per pair (see :mod:`.endpoints`).
        probe_size: input size for the one-off probe forward that reads endpoint widths.
        distillation_type: ``soft`` (KL to the teacher's tempered softmax) or ``hard`` (CE to its argmax).
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
            student_layer: Layers = None,
            teacher_layer: Layers = None,
            width_align: str = "auto",
            probe_size: Optional[Tuple[int, int]] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = False,
            distillation_type: str = "soft",
    ) -> None:
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        if feat_loss not in FEATURE_LOSSES:
            raise UserError(f"unknown --feat-loss {feat_loss!r}; choose one of {', '.join(FEATURE_LOSSES)}")
        if distillation_type not in DISTILLATION_TYPES:
            raise UserError(f"unknown --distillation-type {distillation_type!r}; "
                            f"choose one of {', '.join(DISTILLATION_TYPES)}")
        if temperature <= 0:
            raise UserError(f"--kd-temperature must be > 0, got {temperature}")
        task_loss_weight = 1.0 - distill_loss_weight if task_loss_weight is None else task_loss_weight
        check_weights(task_loss_weight, distill_loss_weight, feat_weight)
        if feat_weight == 0:
            feat_loss = "none"
        if teacher is None and (distill_loss_weight > 0 or feat_loss != "none"):
            raise UserError("soft KD or a feature loss needs a teacher (--kd-model-name)")
        student_layers, teacher_layers = layer_list(student_layer), layer_list(teacher_layer)
        if feat_loss != "none" and len(student_layers) != len(teacher_layers):
            raise UserError(f"--student-layer names {len(student_layers)} layer(s) and --kd-layer "
                            f"{len(teacher_layers)}; fix: give both the same number of layers (paired in order)")
        self.distill_loss_weight = float(distill_loss_weight)
        self.task_loss_weight = float(task_loss_weight)
        self.temperature = float(temperature)
        self.distillation_type = distillation_type
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
        self.teacher_layers: List[LayerSpec] = teacher_layers if feat_loss != "none" else []
        if self.teacher is not None:
            for spec in self.teacher_layers:
                resolve_tap(self.teacher.model, spec)  # a missing layer fails here, not mid-training
            if distill_loss_weight > 0:
                self._check_label_space(student, self.teacher)

        trainable = DistillStudent(student, None, student_layers, tap=feat_loss != "none")
        self.aligners: Optional[nn.ModuleList] = None
        if feat_loss != "none":
            s_dims, t_dims = self._probe_widths(trainable, self.teacher, self.teacher_layers, probe_size)
            self.aligners = nn.ModuleList(EndpointAligner(s, t, width_align) for s, t in zip(s_dims, t_dims))
            # The aligners keep no parameters: their projectors move into DistillStudent (trainable), which
            # applies them to the student tokens, so here the aligners only resize/pool.
            projectors = []
            for aligner in self.aligners:
                projectors.append(nn.Identity() if aligner.projector is None else aligner.projector)
                aligner.projector = None
            if any(not isinstance(p, nn.Identity) for p in projectors):
                trainable.projector = projectors[0] if len(projectors) == 1 else nn.ModuleList(projectors)
        self.trainable_module = trainable
        self._compiled_step: Optional[Callable] = None

    @property
    def width_mode(self) -> str:
        """The resolved ``--width-align`` mode (``none`` without a feature loss; comma-joined if pairs differ)."""
        if self.aligners is None:
            return "none"
        modes = [aligner.mode for aligner in self.aligners]
        return modes[0] if len(set(modes)) == 1 else ",".join(modes)

    @staticmethod
    def _check_label_space(student: nn.Module, teacher: FrozenTeacher) -> None:
        s_classes = int(getattr(student, "num_classes", 0) or 0)
        if teacher.num_classes != s_classes:
            raise UserError(
                f"logit KD needs the teacher's classifier to match the student's label space: teacher has "
                f"{teacher.num_classes} classes, student {s_classes}. Give a teacher trained on these labels "
                "(--kd-checkpoint, --kd-model-kwargs num_classes=N) or set --distill-loss-weight 0")

    @staticmethod
    @torch.no_grad()
    def _probe_widths(trainable: DistillStudent, teacher: FrozenTeacher, teacher_layers: Sequence[LayerSpec],
                      probe_size: Optional[Tuple[int, int]]) -> Tuple[List[int], List[int]]:
        """Run one 1-image forward of each model to read the endpoint widths (architecture-agnostic)."""
        student = trainable.student
        size = tuple(probe_size) if probe_size else model_input_size(student)
        param = next(student.parameters())
        x = torch.zeros(1, 3, *size, device=param.device, dtype=param.dtype)
        was_training = student.training
        student.eval()
        try:
            _, s_tokens, _ = trainable.taps.run(x, stop_early=True)
        finally:
            student.train(was_training)
        t_param = next(teacher.model.parameters())
        # a teacher holding bf16 weights takes float32 input and casts it after preprocessing
        t_dtype = torch.float32 if teacher.weights_dtype is not None else t_param.dtype
        _, t_tokens, _ = teacher.endpoints(x.to(t_param.device, t_dtype), teacher_layers, need_logits=False)
        return [t.shape[-1] for t in s_tokens], [t.shape[-1] for t in t_tokens]

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

    def compile(self, backend: str = "inductor", mode: Optional[str] = None, teacher_mode: Optional[str] = None,
                **compile_kwargs) -> nn.Module:
        """Compile the student step (student forward + every loss term) and, separately, the frozen teacher.

        The teacher graph is built with static shapes and no grad; ``teacher_mode`` (default: ``mode``)
        picks its mode, e.g. ``"reduce-overhead"`` for CUDA graphs. Taps are hooks registered at
        construction, so neither graph breaks. Returns the compiled student for evaluation.
        """
        self._compiled_step = torch.compile(self._student_step, backend=backend, mode=mode, **compile_kwargs)
        if self.teacher is not None:
            self.teacher.compile(backend=backend, mode=mode if teacher_mode is None else teacher_mode,
                                 **compile_kwargs)
        self.eval_model = torch.compile(self.student, backend=backend, mode=mode, **compile_kwargs)
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
    def _student_step(self, input: torch.Tensor, target: torch.Tensor, t_logits: Optional[torch.Tensor],
                      t_tokens: Sequence[torch.Tensor], t_grids: Sequence[Grid]) -> Dict[str, torch.Tensor]:
        """Student forward and all loss terms, given the teacher's outputs (what :meth:`compile` compiles)."""
        logits, s_tokens, s_grids = self.trainable_module(input)
        task_loss = self.criterion(logits, target)
        zero = task_loss.new_zeros(())
        kd_loss, feat = zero, zero
        if self.distill_loss_weight > 0:
            if self.distillation_type == "hard":
                kd_loss = hard_kd_loss(logits, t_logits)
            else:
                kd_loss = soft_kd_loss(logits, t_logits, self.temperature)
        if self.aligners is not None:
            pair_losses = []
            for aligner, s_tok, s_grid, t_tok, t_grid in zip(self.aligners, s_tokens, s_grids, t_tokens, t_grids):
                s_tok, t_tok = aligner(s_tok, s_grid, t_tok, t_grid)
                pair_losses.append(feature_loss(self.feat_loss, s_tok, t_tok.to(s_tok.dtype), s_grid))
            feat = pair_losses[0] if len(pair_losses) == 1 else torch.stack(pair_losses).mean()
        loss = self.task_loss_weight * task_loss + self.distill_loss_weight * kd_loss + self.feat_weight * feat
        return {"loss": loss, "output": logits, "task_loss": task_loss.detach(), "kd_loss": kd_loss.detach(),
                "feat_loss": feat.detach()}

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Returns ``loss``, ``output`` (student logits) and each weighted-before component."""
        t_logits, t_tokens, t_grids = None, [], []
        if self.teacher is not None:
            t_logits, t_tokens, t_grids = self.teacher.endpoints(input, self.teacher_layers,
                                                                 need_logits=self.distill_loss_weight > 0)
        step = self._student_step if self._compiled_step is None else self._compiled_step
        return step(input, target, t_logits, t_tokens, t_grids)
