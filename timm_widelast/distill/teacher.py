"""The frozen teacher: creation, safe checkpoint loading, its own preprocessing, and one forward.

The teacher is kept out of anything trainable: parameters have ``requires_grad=False``, it stays
in eval mode, runs under ``torch.no_grad()``, and training loops must not hand it to
``accelerator.prepare`` (that would write it into every checkpoint). Its taps are registered once
(:class:`timm_widelast.taps.TapSet`), so :meth:`FrozenTeacher.compile` gives one graph per call
signature, with static shapes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..models._checkpoints import CheckpointMismatchError, load_release_checkpoint
from ..taps import Grid, LayerSpec, TapSet, layer_list, resolve_tap
from ..utils import hub_offline


def model_input_size(model: nn.Module) -> Tuple[int, int]:
    """The spatial input size the model was built for (its patch embed's, else its pretrained cfg's)."""
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        return (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    size = timm.data.resolve_data_config({}, model=model)["input_size"]
    return tuple(size[-2:])


def _hub_weights_cached(name: str) -> Optional[bool]:
    """Whether ``name``'s pretrained weights are in the local hub cache (None: they do not come from the hub)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except (RuntimeError, ValueError):  # an unknown tag: timm.create_model gives the better message
        return None
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return None
    repo_id, _, revision = hub_id.partition("@")
    names = [cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else []
    names += ["model.safetensors", "pytorch_model.bin"]
    return any(isinstance(try_to_load_from_cache(repo_id, filename, revision=revision or None), str)
               for filename in names)


def _no_weights_error(name: str, why: str) -> UserError:
    return UserError(f"cannot get pretrained weights for teacher {name!r}: {why}; fix: pass --kd-checkpoint "
                     "(a weights file or an exported folder), or --kd-no-pretrained for a random teacher, "
                     "or fetch the weights once with network access")


def create_teacher_model(name: Optional[str], kwargs: Optional[Dict[str, Any]] = None,
                         checkpoint: Optional[str] = None, pretrained: bool = True) -> nn.Module:
    """Create the teacher with ``timm.create_model``; weights from ``checkpoint`` when given.

    ``checkpoint`` may be a weights file (``.safetensors``, or ``.pth`` read with ``weights_only=True``)
    or an exported folder holding ``config.json`` + ``model.safetensors`` (then ``name`` may be None).
    ``num_classes`` is never forced onto the teacher: timm would silently reset its head.
    Pretrained weights that cannot be had (offline and not cached, or the hub unreachable) are a
    :class:`UserError` naming ``--kd-checkpoint`` / ``--kd-no-pretrained``; offline it fails at once.
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
    from_hub = pretrained and not checkpoint
    overridden = "pretrained_cfg" in kwargs or "pretrained_cfg_overlay" in kwargs  # weights may not come from the hub
    if from_hub and not overridden and hub_offline() and _hub_weights_cached(name) is False:
        raise _no_weights_error(name, "the Hugging Face Hub is offline (HF_HUB_OFFLINE) and they are not cached")
    try:
        model = timm.create_model(name, pretrained=from_hub, **kwargs)
    except TypeError as err:
        raise UserError(f"bad --kd-model-kwargs for {name}: {err}") from err
    except OSError as err:  # the hub's errors (offline, not found, HTTP) and network errors are all OSErrors
        if not from_hub:
            raise
        raise _no_weights_error(name, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
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
    resized to the teacher's own input size when it differs. Tokens are read by taps registered
    once per layer list (:meth:`tap_set`); without logits the forward stops at the last tap.
    """

    def __init__(self, model: nn.Module, layer: Union[LayerSpec, Sequence[LayerSpec]] = None,
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
            for spec in layer_list(layer):
                resolve_tap(model, spec)  # fails early on a layer the teacher lacks
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
        self.weights_dtype: Optional[torch.dtype] = None
        self._tap_sets: Dict[Tuple[LayerSpec, ...], TapSet] = {}
        self._compiled = None
        self._cuda_graphs = False

    @property
    def num_classes(self) -> int:
        return int(getattr(self.model, "num_classes", 0) or 0)

    def train(self, mode: bool = True) -> "FrozenTeacher":
        """The teacher never leaves eval mode (dropout/drop-path off, norms frozen)."""
        return super().train(False)

    def hold_weights_in(self, dtype: torch.dtype) -> "FrozenTeacher":
        """Cast the frozen weights to ``dtype`` once (e.g. bf16), so autocast has no per-op weight casts.

        Inputs are cast to ``dtype`` after preprocessing; outputs come out in ``dtype``. float32 restores
        full-precision compute only for weights still exact in float32 (the cast is not undone).
        """
        self.model.to(dtype)
        self.weights_dtype = None if dtype == torch.float32 else dtype
        return self

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Student-normalized batch -> teacher-normalized batch at the teacher's input size."""
        if not self.same_norm:
            x = x * self.scale.to(x.dtype) + self.shift.to(x.dtype)
        if not self.dynamic_size and tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bicubic", align_corners=False, antialias=True)
        return x

    def tap_set(self, layers: Sequence[LayerSpec]) -> TapSet:
        """The taps for ``layers``, registered on the first request and reused ever after."""
        key = tuple(layers)
        taps = self._tap_sets.get(key)
        if taps is None:
            taps = self._tap_sets[key] = TapSet(self.model, key)
        return taps

    def compile(self, backend: str = "inductor", mode: Optional[str] = None, **compile_kwargs) -> "FrozenTeacher":
        """Compile the teacher's endpoint forward on its own: no grad, static shapes.

        ``mode="reduce-overhead"`` (CUDA graphs) pays off for a frozen forward of fixed shape; its
        outputs are copied out of the graph's buffers before the next step replays it.
        """
        compile_kwargs = dict(compile_kwargs, dynamic=False)
        self._compiled = torch.compile(self._endpoints, backend=backend, mode=mode, **compile_kwargs)
        self._cuda_graphs = mode in ("reduce-overhead", "max-autotune") or bool(
            (compile_kwargs.get("options") or {}).get("triton.cudagraphs"))
        return self

    @torch.no_grad()
    def _endpoints(self, x: torch.Tensor, taps: Optional[TapSet], need_logits: bool
                   ) -> Tuple[Optional[torch.Tensor], List[torch.Tensor], List[Grid]]:
        x = self.preprocess(x)
        if self.weights_dtype is not None:
            x = x.to(self.weights_dtype)
        if taps is None:
            return self.model(x), [], []
        # Without soft KD the forward stops at the last tap: CaiT's class-attention blocks and the head are skipped.
        return taps.run(x, stop_early=not need_logits)

    def endpoints(self, x: torch.Tensor, layers: Sequence[LayerSpec] = (), need_logits: bool = True
                  ) -> Tuple[Optional[torch.Tensor], List[torch.Tensor], List[Grid]]:
        """``(logits or None, tokens per layer, grid per layer)``; no layers means logits only."""
        taps = self.tap_set(layers) if layers else None  # set up eagerly, outside any compiled region
        if self._compiled is None:
            return self._endpoints(x, taps, need_logits)
        if self._cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        logits, tokens, grids = self._compiled(x, taps, need_logits)
        if self._cuda_graphs:  # the next replay overwrites the graph's output buffers
            logits = None if logits is None else logits.clone()
            tokens = [t.clone() for t in tokens]
        return logits, tokens, grids

    def forward(self, x: torch.Tensor, need_logits: Optional[bool] = None, need_tokens: Optional[bool] = None,
                layer: Union[LayerSpec, Sequence[LayerSpec]] = None
                ) -> Tuple[Optional[torch.Tensor], Any, Any]:
        """``(logits, tokens, grid)``; per-call flags override the defaults so one teacher can serve many tasks.

        With a list of layers, tokens and grids are lists (one per layer).
        """
        need_logits = self.need_logits if need_logits is None else need_logits
        need_tokens = self.need_tokens if need_tokens is None else need_tokens
        layer = self.layer if layer is None else layer
        if not need_tokens:
            return self.endpoints(x, (), True)[0], None, None
        logits, tokens, grids = self.endpoints(x, layer_list(layer), need_logits)
        if isinstance(layer, (list, tuple)):
            return logits, tokens, grids
        return logits, tokens[0], grids[0]
