"""Token taps: read a block's output patch tokens from any timm model with a forward hook.

No model is rewritten and no second forward is needed: a hook on the tapped module
captures its output during the ordinary forward. ``stop_early`` aborts the forward
right after the tap, for when only the tokens are wanted.

Two ways to hold a tap:

* :class:`TapSet` -- the training path. Hooks are registered **once**, when the set is
  built, and stay for its life; each :meth:`TapSet.run` arms them, runs the forward and
  reads the slots they filled. Nothing is registered or removed per step, so a step that
  goes through a set compiles with ``torch.compile`` without graph breaks.
* :class:`TokenTap` as a context manager (and :func:`extract_tokens`) -- one-off reads
  (diagnostics): hooks live for the ``with`` block only.

Default tap, per family:

* ViT / DeiT / our WideLast: the last of ``blocks``;
* CaiT: the last self-attention block (``blocks[-1]``, patch tokens only, before class attention);
* our Lift: the lifted tokens (``lift_norm``), where the paper applies the feature loss; an integer
  layer on a Lift model with projectors on several blocks taps that block's projected map
  (``model.lift_tap_name(i)``), and the block itself where it has no projector;
* Swin and other staged models: the last of ``layers``/``stages`` (NHWC or NCHW maps).

Prefix tokens: every token ahead of the patch grid (class, distillation and register tokens) is
dropped, so the taps return exactly the ``H*W`` patch tokens. The authors' release drops exactly
one token for standard ViTs and none for CaiT's self-attention blocks; for those models the two
agree, and for models with registers or a distillation token ours is the right count.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .errors import UserError

LayerSpec = Optional[Union[int, str]]
Grid = Tuple[int, int]


@dataclass(frozen=True)
class TapSpec:
    """Where to tap: the module's dotted name, and how its output is laid out if it is a 4-d map."""

    module_name: str
    layout: str  # 'NHWC' (Swin stages) or 'NCHW'; 3-d outputs are tokens [B, N, D] either way


def _map_layout(model: nn.Module) -> str:
    # timm's Swin family keeps its stage maps channels-last; everything else is channels-first.
    swin = "swin" in type(model).__name__.lower() or getattr(model, "output_fmt", "") == "NHWC"
    return "NHWC" if swin else "NCHW"


def resolve_tap(model: nn.Module, layer: LayerSpec = None) -> TapSpec:
    """Resolve ``layer`` (block index, negative allowed, or a module name) to a tap on ``model``.

    Raises :class:`UserError` when the model has no such layer.
    """
    layout = _map_layout(model)
    if isinstance(layer, str) and not layer.lstrip("-").isdigit():
        if layer not in dict(model.named_modules()):
            raise UserError(f"model {type(model).__name__} has no module named {layer!r}; "
                            "fix: pass a block index or one of its module names (see model.named_modules())")
        return TapSpec(layer, layout)
    if layer is None and hasattr(model, "lift_norm") and not isinstance(model.lift_norm, nn.Identity):
        return TapSpec("lift_norm", layout)
    seq_name = next((n for n in ("blocks", "layers", "stages")
                     if isinstance(getattr(model, n, None), (nn.Sequential, nn.ModuleList))), "")
    if not seq_name:
        raise UserError(f"model {type(model).__name__} has no blocks/layers/stages to tap tokens from; "
                        "fix: pass --layer with a module name that outputs tokens")
    count = len(getattr(model, seq_name))
    index = count - 1 if layer is None else int(layer)
    if not -count <= index < count:
        raise UserError(f"layer {layer} is out of range: {type(model).__name__} has {count} {seq_name}; "
                        f"fix: use 0..{count - 1} or a negative index")
    index %= count
    # A Lift model projects some blocks' outputs (the last one at least): that projected map is the layer.
    lift_name = model.lift_tap_name(index) if callable(getattr(model, "lift_tap_name", None)) else None
    return TapSpec(lift_name or f"{seq_name}.{index}", layout)


def layer_list(layers: Union[LayerSpec, Sequence[LayerSpec]]) -> List[LayerSpec]:
    """One layer spec or a list/tuple of them, as a list (``None`` is the single default layer)."""
    if isinstance(layers, (list, tuple)):
        if not layers:
            raise UserError("an empty layer list was given; fix: name at least one layer (or none for the default)")
        return list(layers)
    return [layers]


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once the tapped tokens are captured."""


def _patch_grid(model: nn.Module, input_hw: Tuple[int, int]) -> Optional[Grid]:
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None:
        return None
    if hasattr(patch_embed, "dynamic_feat_size"):
        return tuple(patch_embed.dynamic_feat_size(input_hw))
    patch = patch_embed.patch_size
    patch = (patch, patch) if isinstance(patch, int) else patch
    return input_hw[0] // patch[0], input_hw[1] // patch[1]


def to_patch_tokens(output: torch.Tensor, spec: TapSpec, model: nn.Module,
                    input_hw: Tuple[int, int]) -> Tuple[torch.Tensor, Grid]:
    """Turn a tapped module's output into ``[B, N, D]`` patch tokens and their ``(H, W)`` grid."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if output.ndim == 4:
        if spec.layout == "NCHW":
            output = output.permute(0, 2, 3, 1)
        batch, height, width, channels = output.shape
        return output.reshape(batch, height * width, channels), (height, width)
    if output.ndim != 3:
        raise UserError(f"{spec.module_name} outputs a {output.ndim}-d tensor, not tokens; choose another --layer")
    grid = _patch_grid(model, input_hw)
    tokens = output.shape[1]
    if grid is None or grid[0] * grid[1] > tokens:
        side = int(round(tokens ** 0.5))
        grid = (side, tokens // max(side, 1))
    # Whatever precedes the grid tokens (class, distillation, register tokens) is a prefix; CaiT's SA blocks have none.
    prefix = tokens - grid[0] * grid[1]
    return output[:, prefix:], grid


class TokenTap:
    """One module's output captured as patch tokens during a forward pass.

    As a context manager its hooks live for the ``with`` block: after ``model(x)`` inside it,
    ``tap.tokens`` is ``[B, N, D]`` and ``tap.grid`` is ``(H, W)``. With ``stop_early=True`` use
    :meth:`run` (or :func:`extract_tokens`): the forward ends at the tap. With ``detach=False``
    gradients flow through the captured tokens (for feature losses). For hooks registered once and
    reused every step, use :class:`TapSet`.
    """

    def __init__(self, model: nn.Module, layer: LayerSpec = None, stop_early: bool = False,
                 detach: bool = True) -> None:
        self.model = model
        self.spec = resolve_tap(model, layer)
        self.module = model.get_submodule(self.spec.module_name)
        self.stop_early = stop_early
        self.detach = detach
        self.armed = True  # a TapSet disarms its taps between runs, so other forwards skip them
        self.tokens: Optional[torch.Tensor] = None
        self.grid: Optional[Grid] = None
        self.group: Sequence[TokenTap] = (self,)  # a stop-early forward ends once all of these are filled
        self._input_hw: Tuple[int, int] = (0, 0)
        self._handles = []

    def _pre_hook(self, module: nn.Module, args) -> None:
        if args and isinstance(args[0], torch.Tensor) and args[0].ndim == 4:
            self._input_hw = tuple(args[0].shape[-2:])

    def _hook(self, module: nn.Module, args, output) -> None:
        if not self.armed:
            return
        tokens, grid = to_patch_tokens(output, self.spec, self.model, self._input_hw)
        self.tokens = tokens.detach() if self.detach else tokens
        self.grid = grid
        if self.stop_early and all(tap.tokens is not None for tap in self.group):
            raise _StopForward

    def attach(self, input_size_hook: bool = True) -> "TokenTap":
        """Register the hooks (once; a second call does nothing)."""
        if not self._handles:
            self._handles.append(self.module.register_forward_hook(self._hook))
            if input_size_hook:
                self._handles.append(self.model.register_forward_pre_hook(self._pre_hook))
        return self

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "TokenTap":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()

    def run(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Forward ``x``; returns the model output, or None when the forward stopped at the tap."""
        try:
            return self.model(x)
        except _StopForward:
            return None


class TapSet:
    """Taps on one or more layers of one model, with hooks registered once for the life of the set.

    :meth:`run` is the only thing a training step calls: it arms the taps, runs the model (stopping
    right after the last tap when asked), disarms them and hands back the tokens, holding no
    reference to them afterwards. Between runs the hooks return at once, so other forwards of the
    same model (evaluation, another set) neither pay for them nor disturb them.
    """

    tap_class = TokenTap  # a subclass may keep more of each tapped output (diagnostics keeps the raw one)

    def __init__(self, model: nn.Module, layers: Sequence[LayerSpec] = (None,), detach: bool = True) -> None:
        self.model = model
        self.taps = tuple(self.tap_class(model, layer, detach=detach) for layer in layers)
        for tap in self.taps:
            tap.group = self.taps
            tap.armed = False
            tap.attach(input_size_hook=False)  # run() knows the input size

    @property
    def module_names(self) -> List[str]:
        return [tap.spec.module_name for tap in self.taps]

    def run(self, x: torch.Tensor, stop_early: bool = False
            ) -> Tuple[Optional[torch.Tensor], List[torch.Tensor], List[Grid]]:
        """``(model output or None if stopped early, tokens per tap, grid per tap)`` for input ``x``."""
        input_hw = tuple(x.shape[-2:])
        for tap in self.taps:
            tap.tokens, tap.armed, tap.stop_early, tap._input_hw = None, True, stop_early, input_hw
        try:
            output = self.model(x)
        except _StopForward:
            output = None
        finally:
            for tap in self.taps:
                tap.armed = tap.stop_early = False
        missing = [tap.spec.module_name for tap in self.taps if tap.tokens is None]
        if missing:
            raise UserError(f"layer {missing[0]} never ran in the forward pass of {type(self.model).__name__}; "
                            "fix: choose a layer on the model's main path")
        tokens = [tap.tokens for tap in self.taps]
        grids = [tap.grid for tap in self.taps]
        for tap in self.taps:
            tap.tokens = None  # the caller owns the tokens now; keep no activations alive between steps
        return output, tokens, grids

    def remove(self) -> None:
        """Remove every hook of the set."""
        for tap in self.taps:
            tap.remove()


def extract_tokens(model: nn.Module, x: torch.Tensor, layer: LayerSpec = None) -> torch.Tensor:
    """Patch tokens ``[B, N, D]`` of ``layer``, running the model only as far as that layer."""
    with TokenTap(model, layer, stop_early=True) as tap:
        tap.run(x)
    if tap.tokens is None:
        raise UserError(f"{tap.spec.module_name} was never run in the forward pass; choose another --layer")
    return tap.tokens
