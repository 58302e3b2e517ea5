"""Reading foreign checkpoints into our students.

Three layouts are understood, whatever file they come in:

* ours (what ``state_dict()`` gives, and what we export);
* the authors' release: DeiT-style ``.pth`` dicts (``{'model', 'model_ema', ...,
  'args': argparse.Namespace}``). Their WideLast keys already match ours; their
  Lift keys wrap a whole timm DeiT in ``base_model.`` and keep the projectors as
  ``projections.{i}`` / ``layer_norms.{i}`` (0-based block index; the last block's is our
  ``lift_proj``/``lift_norm``, earlier ones our ``lift_projs.{i}``/``lift_norms.{i}``);
* a plain narrow timm ViT (e.g. ``deit_tiny_patch16_224``): a warm start where every
  narrow tensor that fits is loaded and only the new wide parts stay freshly
  initialised.

Whatever the layout, a model built with ``num_classes=0`` drops the checkpoint's classifier
(as timm's own ViTs do), and another class count re-initialises only the classifier.
"""
from __future__ import annotations

import argparse
import logging
import re
import urllib.error
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

import torch
from torch import nn

from ..errors import UserError
from ..utils import hub_offline

_logger = logging.getLogger(__name__)

# Entries the authors' training code keeps next to the student; none belong in an inference model.
_TRAINING_ONLY_PREFIXES = ("teacher.", "teacher_model.", "feature_projector.", "feat_proj.", "projector.",
                           "aligner.", "adapter.", "distill_", "head_dist.", "dist_token")


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's keys or shapes do not fit the model."""


class PretrainedWeightsUnavailable(UserError, RuntimeError):
    """``pretrained=True`` could not fetch the weights (offline, no network, not in the local cache)."""

    @classmethod
    def for_cfg(cls, cfg: Dict[str, Any], variant: str, err: BaseException) -> "PretrainedWeightsUnavailable":
        """The message names the source, the reason and the local-file overlay that loads a downloaded copy."""
        repo, filename = cfg.get("hf_hub_id") or "", cfg.get("hf_hub_filename") or "model.safetensors"
        tag = f"{variant}.{cfg['tag']}" if cfg.get("tag") else variant
        source = f"the Hugging Face Hub ({repo}, file {filename})" if repo else (cfg.get("url") or "its url")
        reason = ("HF_HUB_OFFLINE is set and the file is not in the local cache" if hub_offline()
                  else f"the download failed and the file is not in the local cache ({_first_line(err)})")
        custom = ", custom_load=True" if not filename.endswith(".safetensors") else ""
        fetch = f"`hf download {repo} {filename} --local-dir DIR`" if repo else f"downloading {source}"
        return cls(
            f"cannot get the pretrained weights of {tag} from {source}: {reason}; fix: fetch the file where "
            f"there is network ({fetch}), then load it with timm.create_model('{tag}', pretrained=True, "
            f"pretrained_cfg_overlay=dict(file='DIR/{filename}'{custom})), or use pretrained=False"
        )


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def is_download_failure(err: BaseException) -> bool:
    """True when ``err`` (or what caused it) is the hub client or urllib failing to fetch a file."""
    kinds: List[type] = [urllib.error.URLError]
    try:
        from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
        kinds += [LocalEntryNotFoundError, OfflineModeIsEnabled]
    except ImportError:  # older huggingface_hub: no such module, nothing of it to recognise
        pass
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, tuple(kinds)):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def load_release_checkpoint(path: Union[str, Path], use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """Read weights from ``.safetensors`` or a (DeiT-style) ``.pth``/``.bin`` file, without unpickling code.

    ``.pth`` files are read with ``weights_only=True``; the only class allowed beyond
    tensors and containers is ``argparse.Namespace`` (the ``args`` entry of DeiT-style dicts).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError/RuntimeError variants across versions
        raise CheckpointMismatchError(
            f"{path} is not a plain weights file (refusing to unpickle it: {str(err).splitlines()[0]}); "
            "convert it to safetensors or a state dict of tensors"
        ) from err
    return unwrap_state_dict(checkpoint, use_ema=use_ema)


def unwrap_state_dict(checkpoint: dict, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """Pick the model weights out of a training checkpoint dict (``model``/``model_ema``/``state_dict``)."""
    if not isinstance(checkpoint, dict):
        raise CheckpointMismatchError(f"expected a dict of weights, got {type(checkpoint).__name__}")
    keys = ("model_ema", "state_dict_ema", "model", "state_dict") if use_ema else ("model", "state_dict")
    for key in keys:
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    return {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}


def _from_lift_release(state_dict: Dict[str, torch.Tensor], depth: int) -> Dict[str, torch.Tensor]:
    """Rename the authors' Lift layout (``base_model.*``, ``projections.i``, ``layer_norms.i``) to ours.

    The release keys its projectors by 0-based block index; the last block's is our endpoint
    (``lift_proj``/``lift_norm``), earlier ones are ``lift_projs.i``/``lift_norms.i``.
    """
    renamed = {}
    for key, value in state_dict.items():
        if key.startswith("base_model."):
            inner = key[len("base_model."):]
            # The wrapped DeiT's own final norm and 192-wide head are unused by Lift.
            if inner.startswith(("norm.", "head.", "fc_norm.", "head_dist.")):
                continue
            renamed[inner] = value
        elif (match := re.match(r"(projections|layer_norms)\.(\d+)\.(.+)", key)) is not None:
            ours = "lift_proj" if match.group(1) == "projections" else "lift_norm"
            block = int(match.group(2))
            renamed[f"{ours}.{match.group(3)}" if block == depth - 1 else f"{ours}s.{block}.{match.group(3)}"] = value
        else:
            renamed[key] = value
    return renamed


def _classifier_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier") or "head"
    return classifier if isinstance(classifier, str) else classifier[0]


def _endpoint_keys(model: nn.Module) -> List[str]:
    """Keys that exist only in the widened endpoint; their absence marks a narrow (warm-start) checkpoint."""
    return [k for k in model.state_dict() if k.startswith(("lift_proj", "lift_norm")) or ".proj_in." in k]


def _resample_pos_embed(value: torch.Tensor, model: nn.Module) -> torch.Tensor:
    from timm.layers import resample_abs_pos_embed
    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    old_tokens = value.shape[1] - prefix
    old_side = int(round(old_tokens ** 0.5))
    return resample_abs_pos_embed(value, new_size=model.patch_embed.grid_size, old_size=(old_side, old_side),
                                  num_prefix_tokens=prefix, verbose=True)


def convert_state_dict(
        state_dict: Dict[str, torch.Tensor], model: nn.Module
) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Map any supported layout onto ``model``'s keys.

    Returns the complete state dict for ``model`` and the keys that were not in the
    checkpoint and keep the model's fresh initialisation (non-empty only for a warm start
    or a new classifier). Raises :class:`CheckpointMismatchError` naming missing,
    unexpected or mis-shaped keys otherwise.
    """
    state_dict = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    if any(k.startswith("base_model.") for k in state_dict):
        state_dict = _from_lift_release(state_dict, len(getattr(model, "blocks", ())))
    target = model.state_dict()
    state_dict = {k: v for k, v in state_dict.items() if k in target or not k.startswith(_TRAINING_ONLY_PREFIXES)}
    classifier = _classifier_name(model)
    if f"{classifier}.weight" not in target:
        # num_classes=0 (an embedding model): drop the trained classifier, as timm's own ViTs do.
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(f"{classifier}.")}
    pos_embed = state_dict.get("pos_embed")
    if pos_embed is not None and "pos_embed" in target and pos_embed.shape != target["pos_embed"].shape:
        state_dict["pos_embed"] = _resample_pos_embed(state_dict["pos_embed"], model)

    warm_start = not any(k in state_dict for k in _endpoint_keys(model))
    fitting = {k: v for k, v in state_dict.items() if k in target and v.shape == target[k].shape}
    if warm_start:
        # A module is loaded whole or not at all: a narrow head's bias must not sit beside a fresh wide weight.
        broken = {k.rsplit(".", 1)[0] for k in target if k not in fitting}
        fitting = {k: v for k, v in fitting.items() if k.rsplit(".", 1)[0] not in broken}
    mis_shaped = sorted(k for k in state_dict if k in target and state_dict[k].shape != target[k].shape)
    unexpected = sorted(k for k in state_dict if k not in target)
    missing = sorted(k for k in target if k not in state_dict)

    classifier_keys = {f"{classifier}.weight", f"{classifier}.bias"}
    if warm_start:
        # A narrow ViT: keep what fits; its narrow final norm and head have no place here.
        fresh = sorted(set(target) - set(fitting))
        if not fitting:
            raise CheckpointMismatchError(
                f"no tensor of the checkpoint fits {type(model).__name__}; unexpected keys: {unexpected[:8]}")
    else:
        # A new label space is a legitimate reason for a fresh head; anything else is a wrong checkpoint.
        fresh = [k for k in mis_shaped if k in classifier_keys]
        mis_shaped = [k for k in mis_shaped if k not in classifier_keys]
        if missing or unexpected or mis_shaped:
            problems = []
            if missing:
                problems.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
            if unexpected:
                problems.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
            if mis_shaped:
                shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(target[k].shape)}" for k in mis_shaped[:4]]
                problems.append(f"shape mismatches {shapes}")
            raise CheckpointMismatchError(
                f"checkpoint does not fit {type(model).__name__}: " + "; ".join(problems)
                + "; check the model name and its width kwargs (lift_dim / wide_dim / block_dims)"
            )
    full = dict(target)
    full.update(fitting)
    if fresh:
        _logger.warning("Freshly initialised (not in the checkpoint): %s", ", ".join(fresh))
    return full, fresh


def student_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """``pretrained_filter_fn`` for timm's loader; records the freshly initialised keys on the model."""
    full, fresh = convert_state_dict(unwrap_state_dict(state_dict), model)
    model.pretrained_new_keys = fresh
    return full


def load_student_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> List[str]:
    """Load any supported layout into ``model``; returns the keys that kept their fresh initialisation."""
    full, fresh = convert_state_dict(state_dict, model)
    model.load_state_dict(full, strict=True)
    model.pretrained_new_keys = fresh
    return fresh
