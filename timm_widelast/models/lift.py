"""Lift: DeiT with a lifting projector kept at inference.

The narrow blocks run unchanged; their last output skips the narrow final norm and
goes token-wise through ``Linear(embed_dim -> lift_dim, bias=False)`` and a
``LayerNorm(lift_dim)`` (PyTorch's default eps, as in the release). Logits come from
the mean of the lifted patch tokens (class token excluded) through
``Linear(lift_dim, num_classes)``. The feature loss is applied to the lifted map.
The authors call this "Lift-GAP".

Multi-layer Lift (the release's channel-expansion wrapper): with ``lift_start`` before
the last block, every block from ``lift_start`` on gets its own projector, widths
growing from ``embed_dim`` to ``lift_dim`` (``lift_schedule``). Their maps serve the
per-layer feature losses; only the last one feeds the head.

Paper: "From Per-Image Low-Rank to Encoding Mismatch" (arXiv 2511.15572).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from timm.models import generate_default_cfgs, register_model
from timm.models._manipulate import checkpoint, checkpoint_seq
from torch import nn

from ._common import EndpointForwardMixin, VisionTransformer, create_student, endpoint_cfg

__all__ = ["LIFT_SCHEDULES", "LiftVisionTransformer", "lift_widths"]

LIFT_SCHEDULES = ("linear", "exponential", "step")


def lift_widths(embed_dim: int, lift_dim: int, lift_start: int, depth: int, schedule: str = "linear") -> Dict[int, int]:
    """Projector width per block index, computed as the release's channel-expansion wrapper does.

    Blocks ``lift_start .. depth-1`` are expanded; the i-th of n gets ``int()`` of a linear or
    exponential interpolation at progress ``(i + 1) / n`` from ``embed_dim`` to ``lift_dim``;
    ``step`` widens the last block only. As in the release, a block whose width stays
    ``embed_dim`` gets no projector. The last block always gets exactly ``lift_dim``, the
    head's width (the release's float arithmetic could land one below it there).
    """
    if schedule not in LIFT_SCHEDULES:
        raise ValueError(f"lift_schedule must be one of {LIFT_SCHEDULES}, got {schedule!r}")
    if not 0 <= lift_start < depth:
        raise ValueError(f"lift_start must be a block index in 0..{depth - 1} (depth {depth}), got {lift_start}")
    count = depth - lift_start
    widths = {}
    for i in range(count):
        progress = (i + 1) / count
        if schedule == "linear":
            width = int(embed_dim + (lift_dim - embed_dim) * progress)
        elif schedule == "exponential":
            width = int(embed_dim * (lift_dim / embed_dim) ** progress)
        else:
            width = lift_dim if i == count - 1 else embed_dim
        block = lift_start + i
        if block == depth - 1:
            widths[block] = lift_dim
        elif width != embed_dim:
            widths[block] = width
    return widths


class LiftVisionTransformer(EndpointForwardMixin, VisionTransformer):
    """A ViT whose endpoint tokens are lifted to ``lift_dim`` before pooling and the head.

    Args:
        lift_dim: Width of the lifted endpoint (the teacher's width; the paper ablates 256/320/384/448).
        lift_start: First block with a projector (default: the last block only, the paper's Lift).
        lift_schedule: Widths of the projectors from ``lift_start`` on: ``linear``, ``exponential``
            or ``step`` (last block only), see :func:`lift_widths`.
        **kwargs: Everything ``timm.models.VisionTransformer`` accepts. ``global_pool`` defaults to
            ``'avg'`` over patch tokens, as in the paper.

    The last projector is ``lift_proj``/``lift_norm``; earlier ones are ``lift_projs[str(i)]``/
    ``lift_norms[str(i)]``, computed in every forward (eager or ``torch.compile``; not under
    TorchScript) so hooks on them see their maps (:meth:`lift_tap_name` names them).
    Projectors and head keep PyTorch's default ``Linear`` init, as in the release.
    """

    def __init__(
            self,
            lift_dim: int = 384,
            lift_start: Optional[int] = None,
            lift_schedule: str = "linear",
            embed_dim: int = 192,
            depth: int = 12,
            num_classes: int = 1000,
            global_pool: str = "avg",
            **kwargs,
    ) -> None:
        if lift_dim <= 0:
            raise ValueError(f"lift_dim must be positive, got {lift_dim}; the paper uses 256, 320, 384 or 448")
        if global_pool in ("map", "prr"):
            raise ValueError(f"global_pool={global_pool!r} is not supported by Lift; use 'avg' or 'token'")
        for name in ("final_norm", "fc_norm"):
            if kwargs.pop(name, None):
                raise ValueError(f"{name}=True is not supported by Lift: the lifted LayerNorm is its only final norm")
        lift_start = depth - 1 if lift_start is None else int(lift_start)
        widths = lift_widths(embed_dim, lift_dim, lift_start, depth, lift_schedule)
        super().__init__(
            embed_dim=embed_dim, depth=depth, num_classes=num_classes, global_pool=global_pool,
            final_norm=False, fc_norm=False, **kwargs,
        )
        self.lift_start, self.lift_schedule = lift_start, lift_schedule
        dd = {"device": self.patch_embed.proj.weight.device, "dtype": self.patch_embed.proj.weight.dtype}
        self.lift_proj = nn.Linear(embed_dim, lift_dim, bias=False, **dd)
        self.lift_norm = nn.LayerNorm(lift_dim, **dd)
        side = {i: w for i, w in widths.items() if i != depth - 1}
        self.lift_projs = nn.ModuleDict({str(i): nn.Linear(embed_dim, w, bias=False, **dd) for i, w in side.items()})
        self.lift_norms = nn.ModuleDict({str(i): nn.LayerNorm(w, **dd) for i, w in side.items()})
        self.num_features = self.head_hidden_size = lift_dim
        self.head = nn.Linear(lift_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()

    def init_weights(self, mode: str = "", needs_reset: bool = True) -> None:
        super().init_weights(mode, needs_reset)
        if (mode or getattr(self, "weight_init_mode", "")) == "" and hasattr(self, "lift_proj"):
            # The release keeps PyTorch's default Linear init here (timm's ViT init would give trunc_normal).
            for module in [self.lift_proj, self.head, *self.lift_projs.values()]:
                if isinstance(module, nn.Linear):
                    module.reset_parameters()

    @torch.jit.ignore
    def lift_tap_name(self, block_index: int) -> Optional[str]:
        """Name of the module whose output is block ``block_index``'s projected map, or None if it has none."""
        depth = len(self.blocks)
        index = block_index + depth if block_index < 0 else block_index
        if index == depth - 1 and not isinstance(self.lift_norm, nn.Identity):
            return "lift_norm"
        return f"lift_norms.{index}" if str(index) in self.lift_norms else None

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        matcher = super().group_matcher(coarse)
        # First match wins: a side projector belongs to its block, the endpoint to the last group.
        matcher["blocks"] = [(r"^blocks\.(\d+)", None), (r"^lift_(?:projs|norms)\.(\d+)", None),
                             (r"^norm|^lift_", (99999,))]
        return matcher

    def prune_intermediate_layers(
            self,
            indices=1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        depth = len(self.blocks)
        take_indices = super().prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
        for key in [k for k in self.lift_projs if int(k) >= len(self.blocks)]:
            del self.lift_projs[key]
            del self.lift_norms[key]
        if len(self.blocks) < depth or prune_norm:
            # The lift belongs after the last block; with that block gone it no longer applies.
            self.lift_proj = nn.Identity()
            self.lift_norm = nn.Identity()
            self.num_features = self.head_hidden_size = self.embed_dim
        return take_indices

    @torch.jit.unused
    def _after_block(self, index: int, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Block ``index``'s projected map when it has a side projector (its hooks fire here)."""
        key = str(index)
        if key not in self.lift_projs:
            return None
        return self.lift_norms[key](self.lift_projs[key](x))

    @torch.jit.unused
    def _blocks_with_side_lifts(
            self, x: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool) -> torch.Tensor:
        for index, block in enumerate(self.blocks):
            if attn_mask is not None or is_causal:
                x = block(x, attn_mask=attn_mask, is_causal=is_causal)
            elif self.grad_checkpointing:
                x = checkpoint(block, x)
            else:
                x = block(x)
            self._after_block(index, x)
        return x

    def _endpoint(self, x: torch.Tensor) -> torch.Tensor:
        return self.lift_norm(self.lift_proj(x))

    def forward_features(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        """Lifted tokens, class token included: ``[B, 1 + N, lift_dim]``."""
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        if not torch.jit.is_scripting() and len(self.lift_projs) > 0:
            # Side projectors feed only per-layer feature losses (through hooks); the head uses the last.
            x = self._blocks_with_side_lifts(x, attn_mask, is_causal)
        elif attn_mask is not None or is_causal:
            for block in self.blocks:
                x = block(x, attn_mask=attn_mask, is_causal=is_causal)
        elif self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.lift_norm(self.lift_proj(x))


default_cfgs = generate_default_cfgs({
    # The authors' release: CaiT-S24 teacher, SoftKD + SpectralKD, 77.53 top-1 on ImageNet-1k.
    "deit_tiny_lift.cait_s24_softkd_spectralkd_in1k": endpoint_cfg(
        hf_hub_id="Huiyuancs/Encoding_Mismatch",
        hf_hub_filename="models/Lift/pytorch_model.pth",
        custom_load="hf",
    ),
    # Warm start: DeiT-Tiny's blocks from timm, the projector and head freshly initialised.
    "deit_tiny_lift.deit_in1k_init": endpoint_cfg(hf_hub_id="timm/deit_tiny_patch16_224.fb_in1k"),
    "deit_small_lift.deit_in1k_init": endpoint_cfg(hf_hub_id="timm/deit_small_patch16_224.fb_in1k"),
})


@register_model
def deit_tiny_lift(pretrained: bool = False, **kwargs) -> LiftVisionTransformer:
    """DeiT-Tiny (192) with a kept 192 -> 384 lifting projector and a 384-wide GAP head."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, lift_dim=384)
    return create_student(LiftVisionTransformer, "deit_tiny_lift", pretrained, **dict(model_args, **kwargs))


@register_model
def deit_small_lift(pretrained: bool = False, **kwargs) -> LiftVisionTransformer:
    """DeiT-Small (384) with a kept 384 -> 768 lifting projector, for Base-width teachers."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, lift_dim=768)
    return create_student(LiftVisionTransformer, "deit_small_lift", pretrained, **dict(model_args, **kwargs))
