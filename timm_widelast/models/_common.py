"""Pieces shared by the Lift and WideLast families.

Both keep timm's ``VisionTransformer`` for everything up to the last block and
change only what happens at the endpoint, so they share the intermediate-feature
and parameter-group plumbing here.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Set, Tuple, Union

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg
from timm.models._builder import resolve_pretrained_cfg
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import VisionTransformer
from torch import nn


def endpoint_cfg(url: str = "", **kwargs) -> Dict:
    """Pretrained config shared by all our DeiT-derived students (DeiT eval: resize 256, crop 224, bicubic)."""
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        "paper_ids": "arXiv:2511.15572",
        **kwargs,
    }


class EndpointForwardMixin:
    """What a ViT needs when its endpoint is wider than its blocks.

    ``forward_intermediates``: timm's version applies the final norm to every
    intermediate, which assumes a single width. Here ``norm=True`` normalises the
    intermediates whose width matches the final norm; narrower ones are returned as
    they are, because the wide norm cannot apply to them. ``reset_classifier`` sizes
    the head from the endpoint (timm's uses ``embed_dim``).
    """

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        # timm's base set names tokens (reg/dist) our models lack; keep only real parameters.
        params = {name for name, _ in self.named_parameters()}
        return {name for name in super().no_weight_decay() if name in params}

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        super().reset_classifier(num_classes, global_pool)
        weight = self.patch_embed.proj.weight
        self.head = nn.Linear(self.num_features, num_classes, device=weight.device, dtype=weight.dtype) \
            if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def _endpoint(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.jit.unused
    def _after_block(self, index: int, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Called after each block (not under TorchScript); Lift computes its side projectors here."""
        return None

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: str, prefix: str = "") -> None:
        """Load a checkpoint file in any supported layout (authors' ``.pth``, timm DeiT, ours)."""
        from ._checkpoints import load_release_checkpoint, load_student_state_dict

        load_student_state_dict(self, load_release_checkpoint(checkpoint_path))

    def _maybe_norm(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.norm, nn.Identity) or x.shape[-1] != self.num_features:
            return x
        return self.norm(x)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Block outputs at ``indices`` (prefix tokens split off), plus the final features unless intermediates_only."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        batch, _, height, width = x.shape
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        blocks = self.blocks if torch.jit.is_scripting() or not stop_early else self.blocks[: max_index + 1]
        intermediates = []
        for i, block in enumerate(blocks):
            x = block(x)
            if not torch.jit.is_scripting():
                self._after_block(i, x)
            if i in take_indices:
                intermediates.append(self._maybe_norm(x) if norm else x)

        prefix_tokens = [y[:, : self.num_prefix_tokens] for y in intermediates]
        intermediates = [y[:, self.num_prefix_tokens:] for y in intermediates]
        if output_fmt == "NCHW":
            grid_h, grid_w = self.patch_embed.dynamic_feat_size((height, width))
            intermediates = [
                y.reshape(batch, grid_h, grid_w, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if not torch.jit.is_scripting() and return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self._endpoint(x), intermediates


def create_student(model_cls: type, variant: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """timm's builder with our checkpoint filter and the getter-based ``features_only`` support.

    A pretrained download that fails (offline, no network, not cached) raises
    :class:`~timm_widelast.models._checkpoints.PretrainedWeightsUnavailable` saying how to
    load a local copy, instead of the hub client's traceback.
    """
    from ._checkpoints import PretrainedWeightsUnavailable, is_download_failure, student_filter_fn

    out_indices = kwargs.pop("out_indices", 3)
    try:
        return build_model_with_cfg(
            model_cls,
            variant,
            pretrained,
            pretrained_filter_fn=student_filter_fn,
            feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
            **kwargs,
        )
    except Exception as err:
        if not (pretrained and is_download_failure(err)):
            raise
        cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
        raise PretrainedWeightsUnavailable.for_cfg(cfg.to_dict(), variant, err) from err


def check_width_and_heads(name: str, width: int, heads: int) -> None:
    """Raise a ValueError that lists workable values when ``width`` does not split into ``heads``."""
    if width <= 0 or heads <= 0:
        raise ValueError(f"{name}: width and heads must be positive, got width={width}, heads={heads}")
    if width % heads:
        head_options = [h for h in range(1, min(width, 32) + 1) if width % h == 0]
        width_options = [width - width % heads, width - width % heads + heads]
        raise ValueError(
            f"{name}: width {width} is not divisible by {heads} heads; "
            f"use heads in {head_options} for width {width}, or width in {width_options} for {heads} heads"
        )


__all__ = ["VisionTransformer", "endpoint_cfg", "EndpointForwardMixin",
           "check_width_and_heads", "create_student"]
