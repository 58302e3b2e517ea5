"""Lift: DeiT with a lifting projector kept at inference.

The narrow blocks run unchanged; their last output skips the narrow final norm and
goes token-wise through ``Linear(embed_dim -> lift_dim, bias=False)`` and a
``LayerNorm(lift_dim)`` (PyTorch's default eps, as in the release). Logits come from
the mean of the lifted patch tokens (class token excluded) through
``Linear(lift_dim, num_classes)``. The feature loss is applied to the lifted map.
The authors call this "Lift-GAP".

Paper: "From Per-Image Low-Rank to Encoding Mismatch" (arXiv 2511.15572).
"""
from __future__ import annotations

from typing import List, Optional

import torch
from timm.models import generate_default_cfgs, register_model
from timm.models._manipulate import checkpoint_seq
from timm.models.vision_transformer import init_weights_vit_timm
from torch import nn

from ._common import EndpointForwardMixin, VisionTransformer, create_student, endpoint_cfg

__all__ = ["LiftVisionTransformer"]


class LiftVisionTransformer(EndpointForwardMixin, VisionTransformer):
    """A ViT whose endpoint tokens are lifted to ``lift_dim`` before pooling and the head.

    Args:
        lift_dim: Width of the lifted endpoint (the teacher's width; the paper ablates 256/320/384/448).
        **kwargs: Everything ``timm.models.VisionTransformer`` accepts. ``global_pool`` defaults to
            ``'avg'`` over patch tokens, as in the paper.
    """

    def __init__(
            self,
            lift_dim: int = 384,
            embed_dim: int = 192,
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
        super().__init__(
            embed_dim=embed_dim, num_classes=num_classes, global_pool=global_pool,
            final_norm=False, fc_norm=False, **kwargs,
        )
        dd = {"device": self.patch_embed.proj.weight.device, "dtype": self.patch_embed.proj.weight.dtype}
        self.lift_proj = nn.Linear(embed_dim, lift_dim, bias=False, **dd)
        self.lift_norm = nn.LayerNorm(lift_dim, **dd)
        self.num_features = self.head_hidden_size = lift_dim
        self.head = nn.Linear(lift_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        init_weights_vit_timm(self.lift_proj)
        init_weights_vit_timm(self.head)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        matcher = super().group_matcher(coarse)
        matcher["blocks"] = [(r"^blocks\.(\d+)", None), (r"^norm|^lift_", (99999,))]
        return matcher

    def prune_intermediate_layers(
            self,
            indices=1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        depth = len(self.blocks)
        take_indices = super().prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
        if len(self.blocks) < depth or prune_norm:
            # The lift belongs after the last block; with that block gone it no longer applies.
            self.lift_proj = nn.Identity()
            self.lift_norm = nn.Identity()
            self.num_features = self.head_hidden_size = self.embed_dim
        return take_indices

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
        if attn_mask is not None or is_causal:
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
