"""Build the model and pull patch-token matrices [B, N, D] out of one or several blocks.

Which module a layer means and how its output becomes patch tokens come from
``timm_widelast.taps`` (``resolve_tap``, ``to_patch_tokens``), so every tool in the
package agrees on the default layer and on the prefix-token rule. The capture here
hooks every requested module at once and ends the forward as soon as the last of them
has run: one forward serves a whole per-layer sweep, and we never pay for the layers behind.
"""
from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Optional, Sequence
from urllib.parse import urlparse

import torch
from torch import nn

from ..errors import UserError
from ..taps import TapSet, TapSpec, TokenTap
from ..utils import hub_offline

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKEN_POLICIES = ("patch", "all")
BLOCK_SEQUENCES = ("blocks", "layers", "stages")  # the order taps.resolve_tap looks for them


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


def checkpoint_config(checkpoint: str) -> tuple[Path, dict]:
    """The weights file a ``--checkpoint`` names (a file, or a run/export folder) and the timm
    ``config.json`` beside it ({} when there is none)."""
    path = Path(checkpoint)
    if path.is_dir():
        weights = next((path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()), None)
        if weights is None:
            raise UserError(f"folder {checkpoint!r} holds no model.safetensors; "
                            "fix: pass the weights file, or a run/export folder that has one")
        path = weights
    config_file = path.parent / "config.json"
    if not config_file.is_file():
        return path, {}
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{str(config_file)!r} is not valid JSON ({err}); "
                        "fix: restore it, or pass --model-kwargs yourself and move it away") from err
    return path, config if isinstance(config, dict) else {}


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Can we open a connection to the Hub at all? (huggingface_hub retries ~50 s before it gives up.)"""
    from huggingface_hub import constants

    if hub_offline():
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


def _offline_fix(name: str) -> str:
    return (f"fix: pass --pretrained-file FILE (a local .safetensors/.pth for {name}: timm's "
            "pretrained_cfg_overlay=dict(file=FILE)), or --checkpoint FILE, or --no-pretrained")


def _create(name: str, pretrained: bool, kwargs: dict) -> nn.Module:
    """timm.create_model; download and offline failures become one UserError line."""
    import timm

    try:
        if pretrained and "pretrained_cfg_overlay" not in kwargs and not name.startswith("local-dir:"):
            from huggingface_hub import constants

            if not constants.HF_HUB_OFFLINE and not _hub_reachable():
                # fail fast: read the local cache only, instead of minutes of retries
                constants.HF_HUB_OFFLINE = True
                try:
                    return timm.create_model(name, pretrained=True, **kwargs)
                finally:
                    constants.HF_HUB_OFFLINE = False
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except OSError as err:  # huggingface_hub's LocalEntryNotFoundError / OfflineModeIsEnabled, URLError, no file
        # first: before huggingface_hub 1.0, LocalEntryNotFoundError is also a ValueError
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"cannot load pretrained weights for {name!r} (offline, or not in the local cache: "
                        f"{first}); {_offline_fix(name)}") from err
    except (RuntimeError, TypeError, ValueError) as err:
        raise UserError(f"cannot create model {name!r}: {err}; "
                        "fix: check the name (timm.list_models) and --model-kwargs, or use --no-pretrained") from err


def build_model(name: str, checkpoint: Optional[str] = None, pretrained: Optional[bool] = None,
                model_kwargs: Optional[dict] = None, pretrained_file: Optional[str] = None) -> nn.Module:
    """timm.create_model with our models registered; weights from the hub, a local file or a checkpoint. Eval mode.

    With ``checkpoint``, the timm ``config.json`` beside it (what the trainer and ``export``
    write) supplies the architecture's ``model_args``; ``model_kwargs`` override them.
    ``pretrained_file`` loads the pretrained weights from a local file (timm's
    ``pretrained_cfg_overlay=dict(file=...)``), for machines without the Hub.
    """
    import timm_widelast  # noqa: F401  (registers deit_tiny_lift / deit_tiny_widelast)

    kwargs = dict(model_kwargs or {})
    weights_path, config = checkpoint_config(checkpoint) if checkpoint else (None, {})
    if config:
        arch = config.get("architecture")
        if arch and ":" not in name and name.split(".")[0] != arch:
            raise UserError(f"checkpoint {checkpoint!r} is a {arch!r} (its config.json) but the model is {name!r}; "
                            f"fix: pass {arch} as the model")
        recorded = dict(config.get("model_args") or {})
        if "num_classes" in config:
            recorded.setdefault("num_classes", config["num_classes"])
        if isinstance(config.get("pretrained_cfg"), dict) and not pretrained:
            # the preprocessing the run recorded (mean/std/crop), for the model's own eval transform
            recorded["pretrained_cfg_overlay"] = config["pretrained_cfg"]
        kwargs = {**recorded, **kwargs}
    if pretrained_file:
        if not Path(pretrained_file).is_file():
            raise UserError(f"--pretrained-file {pretrained_file!r} not found; fix: pass an existing weights file")
        kwargs["pretrained_cfg_overlay"] = dict(file=str(pretrained_file))
        pretrained = True
    if pretrained is None:
        pretrained = checkpoint is None
    model = _create(name, pretrained, kwargs)
    if weights_path is not None:
        hint = ("fix: pass the --model-kwargs it was trained with (or keep its config.json beside it)"
                if not config else "fix: pass the matching model (its config.json is beside the weights)")
        try:
            missing, unexpected = model.load_state_dict(load_checkpoint_weights(str(weights_path)), strict=False)
        except RuntimeError as err:  # shapes differ: the model was built with other kwargs
            detail = next((ln.strip() for ln in str(err).splitlines() if "size mismatch" in ln), str(err)[:200])
            raise UserError(f"checkpoint {checkpoint!r} does not fit {name!r} built with {kwargs or 'no kwargs'} "
                            f"({detail}); {hint}") from err
        if missing or unexpected:
            raise UserError(f"checkpoint {checkpoint!r} does not fit {name!r} ({len(missing)} missing keys, "
                            f"{len(unexpected)} unexpected, e.g. {(missing + unexpected)[:2]}); {hint}")
    return model.eval()


def block_count(model: nn.Module) -> tuple[str, int]:
    """The block sequence the taps index into (``blocks``/``layers``/``stages``) and its length."""
    for name in BLOCK_SEQUENCES:
        seq = getattr(model, name, None)
        if isinstance(seq, (nn.Sequential, nn.ModuleList)):
            return name, len(seq)
    raise UserError(f"model {type(model).__name__} has no blocks/layers/stages to sweep; "
                    "fix: pass --layers with module names")


def sweep_layers(model: nn.Module, layers: Sequence[int | str]) -> list[int | str]:
    """``['all']`` -> every block index; otherwise the given indices/names, in order, without repeats."""
    if [str(v) for v in layers] == ["all"]:
        return list(range(block_count(model)[1]))
    if not layers:
        raise UserError("no layers given; fix: pass --layers all, or block indices such as --layers 3 7 11")
    if "all" in [str(v) for v in layers]:
        raise UserError("--layers all cannot be mixed with indices; fix: pass --layers all, or only indices")
    return list(dict.fromkeys(layers))


class _RawTap(TokenTap):
    """The package's tap, also keeping the module's raw output (for policy "all" and the prefix count)."""

    raw: Optional[torch.Tensor] = None

    def _hook(self, module: nn.Module, args, output) -> None:
        if not self.armed:
            return
        out = output[0] if isinstance(output, (tuple, list)) else output
        if not torch.is_tensor(out) or out.dim() not in (3, 4):
            shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise UserError(f"module {self.spec.module_name!r} outputs {shape}, not tokens; "
                            "fix: pick a block that outputs [B, N, D] tokens or a feature map with --layer")
        self.raw = out.detach()
        super()._hook(module, args, output)


class LayerTokens(TapSet):
    """Runs a model until every tapped module has run; returns their tokens, one [B, N, D] per layer.

    The package's :class:`~timm_widelast.taps.TapSet` (hooks registered once, forward stopped
    after the last tap, patch-token rule of ``taps.to_patch_tokens``); ``layers``: block indices
    and/or module names (None = the package's default tap). Policy ``"all"`` keeps the prefix
    tokens. Tokens come back float32 and detached. :meth:`remove` takes the hooks off the model.
    """

    tap_class = _RawTap

    def __init__(self, model: nn.Module, layers: Sequence[int | str | None] = (None,), policy: str = "patch"):
        if policy not in TOKEN_POLICIES:
            raise UserError(f"unknown token policy {policy!r}; fix: use one of {', '.join(TOKEN_POLICIES)}")
        super().__init__(model, layers)
        names = self.module_names
        if len(set(names)) != len(names):
            self.remove()
            raise UserError(f"layers {list(layers)} name the same module twice ({names}); fix: list each layer once")
        self.policy = policy
        self.specs: list[TapSpec] = [tap.spec for tap in self.taps]
        self.num_prefix_tokens = [0] * len(self.taps)  # known after the first batch
        self.layouts = [s.layout for s in self.specs]  # 'NLC' once a tap is seen to output tokens

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        try:
            _output, tokens, _grids = self.run(images, stop_early=True)
        except (RuntimeError, AssertionError, ValueError) as err:
            raise UserError(f"the model's forward pass fails on input {tuple(images.shape)}: {err}; "
                            "fix: check --model-kwargs (e.g. img_size) and the preprocessing") from err
        finally:
            raws = [tap.raw for tap in self.taps]
            for tap in self.taps:
                tap.raw = None  # hold no activations between batches
        out = []
        for k, (patch, raw) in enumerate(zip(tokens, raws)):
            if raw.dim() == 3:
                self.layouts[k] = "NLC"
                self.num_prefix_tokens[k] = raw.shape[1] - patch.shape[1]
                if self.policy == "all":
                    patch = raw
            out.append(patch.float())
        return out


class TokenExtractor:
    """Runs a model up to the tapped module and returns its tokens [B, N, D] (float32, detached).

    The single-layer view of :class:`LayerTokens`; ``layer=None`` is the package's default tap.
    """

    def __init__(self, model: nn.Module, layer: int | str | None = None, policy: str = "patch"):
        self.model, self.policy = model, policy
        self._layers = LayerTokens(model, [layer], policy)
        self.spec = self._layers.specs[0]

    @property
    def num_prefix_tokens(self) -> int:
        return self._layers.num_prefix_tokens[0]

    @property
    def layout(self) -> str:
        return self._layers.layouts[0]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self._layers(images)[0]
