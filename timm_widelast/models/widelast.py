"""WideLast: DeiT whose last block runs at the teacher's width.

Blocks before the endpoint keep the student's width; the block where the width
changes first lifts the residual stream of every token (class token included)
with ``Linear(bias=False) + LayerNorm`` and then is an ordinary pre-norm ViT block
at the new width. The final norm and the class-token head follow that width.

Paper: "From Per-Image Low-Rank to Encoding Mismatch" (arXiv 2511.15572).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
from timm.layers import LayerNorm, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import Block, init_weights_vit_timm
from torch import nn

from ._common import (
    EndpointForwardMixin,
    VisionTransformer,
    check_width_and_heads,
    create_student,
    endpoint_cfg,
)

__all__ = ["WideBlock", "WideLastVisionTransformer"]


class WideBlock(Block):
    """A pre-norm ViT block that first widens its input from ``in_dim`` to ``dim``.

    Parameter names (``proj_in``, ``proj_norm``) follow the authors' release so their
    checkpoints load without renaming.
    """

    def __init__(self, in_dim: int, dim: int, num_heads: int, norm_layer: Callable = LayerNorm, **kwargs) -> None:
        super().__init__(dim=dim, num_heads=num_heads, norm_layer=norm_layer, **kwargs)
        dd = {"device": kwargs.get("device"), "dtype": kwargs.get("dtype")}
        self.proj_in = nn.Linear(in_dim, dim, bias=False, **dd)
        self.proj_norm = norm_layer(dim, **dd)

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        # Written out rather than calling Block.forward: TorchScript cannot script super() calls.
        x = self.proj_norm(self.proj_in(x))
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


def _width_schedule(
        embed_dim: int,
        depth: int,
        num_heads: int,
        wide_dim: int,
        wide_heads: Optional[int],
        block_dims: Optional[Sequence[int]],
        block_heads: Optional[Sequence[int]],
) -> tuple[List[int], List[int]]:
    """Per-block widths and heads; by default only the last block is widened."""
    if block_dims is None:
        dims = [embed_dim] * (depth - 1) + [wide_dim]
        heads = [num_heads] * (depth - 1) + [wide_heads]
        if block_heads is not None:
            raise ValueError("block_heads needs block_dims; pass both (one entry per block) or neither")
    else:
        dims = [int(d) for d in block_dims]
        heads = [int(h) for h in block_heads] if block_heads is not None else []
        if len(dims) != depth or len(heads) != depth:
            raise ValueError(
                f"block_dims and block_heads need one entry per block (depth={depth}), "
                f"got {len(dims)} dims and {len(heads)} heads"
            )
    for index, (dim, head_count) in enumerate(zip(dims, heads)):
        check_width_and_heads(f"block {index}", dim, head_count)
    return dims, heads


def _heads_keeping_head_dim(wide_dim: int, embed_dim: int, num_heads: int) -> int:
    """Heads for ``wide_dim`` at the narrow blocks' head dim (the release's ``heads_*`` schedules do this)."""
    head_dim = embed_dim // num_heads
    if wide_dim <= 0 or wide_dim % head_dim:
        lower = wide_dim - wide_dim % head_dim
        raise ValueError(
            f"wide_dim {wide_dim} is not a multiple of the head dim {head_dim}; pass wide_heads explicitly "
            f"(a divisor of {wide_dim}) or use a wide_dim in {[lower, lower + head_dim]}"
        )
    return wide_dim // head_dim


class WideLastVisionTransformer(EndpointForwardMixin, VisionTransformer):
    """A ViT whose blocks may change width; by default only the last block is wider.

    Args:
        wide_dim: Width of the last block (the teacher's width; 384 for DeiT-Tiny students of CaiT-S24).
        wide_heads: Attention heads of the last block (default: keep the narrow blocks' head dim,
            ``wide_dim // (embed_dim // num_heads)``, e.g. 6 for 384 and 4 for 256 on DeiT-Tiny).
        block_dims: Optional per-block widths for gradual schedules, e.g. ``[192] * 9 + [256, 320, 384]``.
        block_heads: Per-block heads, required with ``block_dims``.
        **kwargs: Everything ``timm.models.VisionTransformer`` accepts.
    """

    def __init__(
            self,
            wide_dim: int = 384,
            wide_heads: Optional[int] = None,
            block_dims: Optional[Sequence[int]] = None,
            block_heads: Optional[Sequence[int]] = None,
            embed_dim: int = 192,
            depth: int = 12,
            num_heads: int = 3,
            num_classes: int = 1000,
            global_pool: str = "token",
            **kwargs,
    ) -> None:
        if global_pool in ("map", "prr"):
            raise ValueError(f"global_pool={global_pool!r} is not supported by WideLast; use 'token' or 'avg'")
        if wide_heads is None and block_dims is None:
            wide_heads = _heads_keeping_head_dim(wide_dim, embed_dim, num_heads)
        dims, heads = _width_schedule(embed_dim, depth, num_heads, wide_dim, wide_heads, block_dims, block_heads)
        base_block = kwargs.pop("block_fn", Block)

        def block_fn(dim: int, num_heads: int, depth: int = 0, **block_kwargs) -> nn.Module:
            in_dim = dims[depth - 1] if depth > 0 else dim
            if dims[depth] != in_dim:
                return WideBlock(in_dim=in_dim, dim=dims[depth], num_heads=heads[depth], depth=depth, **block_kwargs)
            return base_block(dim=dims[depth], num_heads=heads[depth], depth=depth, **block_kwargs)

        super().__init__(
            embed_dim=embed_dim, depth=depth, num_heads=num_heads, num_classes=num_classes,
            global_pool=global_pool, block_fn=block_fn, **kwargs,
        )
        final_dim = dims[-1]
        self.num_features = self.head_hidden_size = final_dim
        reduction = self.feature_info[0]["reduction"]
        self.feature_info = [
            dict(module=f"blocks.{i}", num_chs=dim, reduction=reduction) for i, dim in enumerate(dims)]
        dd = {"device": self.patch_embed.proj.weight.device, "dtype": self.patch_embed.proj.weight.dtype}
        norm_layer = type(self.blocks[-1].norm1)
        norm_eps = self.blocks[-1].norm1.eps
        if not isinstance(self.norm, nn.Identity):
            self.norm = norm_layer(final_dim, eps=norm_eps, **dd)
        if not isinstance(self.fc_norm, nn.Identity):
            self.fc_norm = norm_layer(final_dim, eps=norm_eps, **dd)
        self.head = nn.Linear(final_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        init_weights_vit_timm(self.head)

    def init_weights(self, mode: str = "", needs_reset: bool = True) -> None:
        super().init_weights(mode, needs_reset)
        if (mode or getattr(self, "weight_init_mode", "")) == "" and self.cls_token is not None:
            # The release's init: trunc_normal(0.02) class token (timm's ViT uses N(0, 1e-6)).
            trunc_normal_(self.cls_token, std=0.02)

    def prune_intermediate_layers(
            self,
            indices=1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        take_indices = super().prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
        kept_width = self.feature_info[len(self.blocks) - 1]["num_chs"]
        if kept_width != self.num_features:
            # The wide final norm cannot apply to narrower kept blocks.
            self.norm = nn.Identity()
            self.num_features = self.head_hidden_size = kept_width
        return take_indices

    def _endpoint(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


default_cfgs = generate_default_cfgs({
    # The authors' release: CaiT-S24 teacher, SoftKD + MSE, 78.23 top-1 on ImageNet-1k.
    "deit_tiny_widelast.cait_s24_softkd_mse_in1k": endpoint_cfg(
        hf_hub_id="Huiyuancs/Encoding_Mismatch",
        hf_hub_filename="models/WideLast/pytorch_model.pth",
        custom_load="hf",
    ),
    # Warm start: the narrow blocks from timm's DeiT-Tiny, the wide parts freshly initialised.
    "deit_tiny_widelast.deit_in1k_init": endpoint_cfg(hf_hub_id="timm/deit_tiny_patch16_224.fb_in1k"),
    "deit_small_widelast.deit_in1k_init": endpoint_cfg(hf_hub_id="timm/deit_small_patch16_224.fb_in1k"),
})


@register_model
def deit_tiny_widelast(pretrained: bool = False, **kwargs) -> WideLastVisionTransformer:
    """DeiT-Tiny (192, 3 heads) with its last block at 384 / 6 heads, for 384-wide teachers such as CaiT-S24."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, wide_dim=384)
    return create_student(WideLastVisionTransformer, "deit_tiny_widelast", pretrained, **dict(model_args, **kwargs))


@register_model
def deit_small_widelast(pretrained: bool = False, **kwargs) -> WideLastVisionTransformer:
    """DeiT-Small (384, 6 heads) with its last block at 768 / 12 heads, for Base-width teachers."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, wide_dim=768)
    return create_student(WideLastVisionTransformer, "deit_small_widelast", pretrained, **dict(model_args, **kwargs))
