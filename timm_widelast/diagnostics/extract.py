"""Build the model and pull patch-token matrices [B, N, D] out of a chosen block.

The tap (which module, how many prefix tokens, which layout) and the forward that
stops right after that module come from ``timm_widelast.taps.TokenTap``, so every tool
in the package agrees on the default layer and we never pay for the layers behind it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..errors import UserError
from ..taps import TokenTap

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKEN_POLICIES = ("patch", "all")


def load_checkpoint_weights(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch file loaded with weights_only=True.

    DeiT-style training dicts ({'model': ..., 'args': Namespace}) are unwrapped; the
    only class allowed besides tensors is argparse.Namespace.
    """
    from ..models._checkpoints import CheckpointMismatchError, load_release_checkpoint

    try:
        state = load_release_checkpoint(path)
    except FileNotFoundError as err:
        raise UserError(f"checkpoint {path!r} not found; fix: pass an existing .safetensors/.pth file") from err
    except CheckpointMismatchError as err:
        raise UserError(f"{err}") from err
    if not state:
        raise UserError(f"checkpoint {path!r} holds no state dict; fix: save model.state_dict()")
    return {k.removeprefix("module."): v for k, v in state.items()}


def build_model(name: str, checkpoint: Optional[str] = None, pretrained: Optional[bool] = None,
                model_kwargs: Optional[dict] = None) -> nn.Module:
    """timm.create_model with our models registered; weights from the hub or a checkpoint. Eval mode."""
    import timm

    import timm_widelast  # noqa: F401  (registers deit_tiny_lift / deit_tiny_widelast)

    if pretrained is None:
        pretrained = checkpoint is None
    try:
        model = timm.create_model(name, pretrained=pretrained, **(model_kwargs or {}))
    except (RuntimeError, TypeError, ValueError) as err:
        raise UserError(f"cannot create model {name!r}: {err}; "
                        "fix: check the name (timm.list_models) and --model-kwargs, or use --no-pretrained") from err
    if checkpoint:
        missing, unexpected = model.load_state_dict(load_checkpoint_weights(checkpoint), strict=False)
        if missing or unexpected:
            raise UserError(f"checkpoint {checkpoint!r} does not fit {name!r} ({len(missing)} missing keys, "
                            f"{len(unexpected)} unexpected, e.g. {(missing + unexpected)[:2]}); "
                            "fix: pass the matching --model / --model-kwargs")
    return model.eval()


class _Tap(TokenTap):
    """The package's stop-early tap, also keeping the raw output (for policy "all" and the prefix count)."""

    raw: Optional[torch.Tensor] = None

    def _hook(self, module: nn.Module, args, output) -> None:
        out = output[0] if isinstance(output, (tuple, list)) else output
        if not torch.is_tensor(out) or out.dim() not in (3, 4):
            shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise UserError(f"module {self.spec.module_name!r} outputs {shape}, not tokens; "
                            "fix: pick a block that outputs [B, N, D] tokens or a feature map with --layer")
        self.raw = out
        super()._hook(module, args, output)


class TokenExtractor:
    """Runs a model up to the tapped module and returns its tokens [B, N, D] (float32, detached).

    The tap, the early stop and the patch-token rule (prefix tokens dropped, maps flattened)
    are the package's own (``timm_widelast.taps.TokenTap``); policy ``"all"`` keeps the prefix tokens.
    """

    def __init__(self, model: nn.Module, layer: int | str | None = None, policy: str = "patch"):
        if policy not in TOKEN_POLICIES:
            raise UserError(f"unknown token policy {policy!r}; fix: use one of {', '.join(TOKEN_POLICIES)}")
        self.model, self.policy = model, policy
        self.tap = _Tap(model, layer, stop_early=True)
        self.spec = self.tap.spec
        self.num_prefix_tokens = 0  # known after the first batch
        self.layout = self.spec.layout  # 'NLC' once the tap is seen to output tokens

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        tap = self.tap
        tap.tokens = tap.raw = None
        with tap:
            try:
                tap.run(images)
            except (RuntimeError, AssertionError, ValueError) as err:
                raise UserError(f"the model's forward pass fails on input {tuple(images.shape)}: {err}; "
                                "fix: check --model-kwargs (e.g. img_size) and the preprocessing") from err
        if tap.tokens is None:
            raise UserError(f"module {self.spec.module_name!r} never ran in the forward pass; "
                            "fix: pick a block on the model's main path with --layer")
        tokens, out = tap.tokens, tap.raw
        if out.dim() == 3:
            self.layout = "NLC"
            self.num_prefix_tokens = out.shape[1] - tokens.shape[1]
            if self.policy == "all":
                tokens = out
        return tokens.float()
