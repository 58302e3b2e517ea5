"""Training checkpoints: atomic folders of safetensors and JSON; nothing in them is ever unpickled.

One checkpoint folder (``checkpoints/ckpt_{updates}_e{epoch}_b{batch}/``) holds:

- ``model.safetensors``: the full trainable module (student + projector) under its plain parameter names;
- ``optimizer.safetensors`` + ``optimizer.json``: the full optimizer state (tensors, and the structure around them);
- ``ema.safetensors``: the student's EMA weights, with ``--model-ema``;
- ``rng_{rank}.safetensors``: each process's torch, CUDA, numpy and Python RNG states;
- ``meta.json``: progress, history, scheduler and grad-scaler states. Written last: a folder is complete when it exists.

Model and optimizer states are the *full* (gathered) ones from ``torch.distributed.checkpoint.state_dict``, which
handles plain, DDP, FSDP1 and FSDP2 modules alike, so a checkpoint does not depend on how it was sharded.
Accelerate's ``save_state`` is not used: its ``load_state`` unpickles custom states (EMA, scheduler).
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ..errors import UserError

CHECKPOINT_DIR = "checkpoints"
META_FILE = "meta.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
OPTIMIZER_LAYOUT_FILE = "optimizer.json"
EMA_FILE = "ema.safetensors"
RNG_FILE = "rng_{rank}.safetensors"
FORMAT = 2  # 1 = Accelerate save_state folders (pickles), never loaded


def list_checkpoints(ckpt_root: Path) -> List[Path]:
    """Complete checkpoints, oldest first. Half-written ones (``.tmp-*``, no meta.json) are ignored."""
    if not ckpt_root.is_dir():
        return []
    done = [d for d in ckpt_root.iterdir() if d.is_dir() and not d.name.startswith(".") and (d / META_FILE).is_file()]
    return sorted(done, key=lambda d: d.name)


def find_resume_checkpoint(resume: str, run_dir: Path) -> Optional[Path]:
    """``auto`` -> latest in this run (None when there is none); a path -> that checkpoint or run's latest."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir / CHECKPOINT_DIR)
        return found[-1] if found else None
    path = Path(resume)
    if (path / META_FILE).is_file():
        return path
    for root in (path / CHECKPOINT_DIR, path):
        found = list_checkpoints(root)
        if found:
            return found[-1]
    raise UserError(f"--resume {resume}: no complete checkpoint there")


# ---------------------------------------------------------------------------------------------------
# Full states of wrapped modules
# ---------------------------------------------------------------------------------------------------
def check_fsdp_setup(accelerator, model: torch.nn.Module) -> None:
    """Refuse FSDP settings this trainer cannot train with, before ``prepare`` (one line, not a traceback).

    - FSDP1 must keep the original parameters (``--fsdp_use_orig_params true``, accelerate's default): the
      optimizer is built before ``prepare`` (timm's weight-decay groups need the unsharded parameters), and with
      flat parameters it would hold tensors FSDP no longer trains.
    - Every class named for transformer wrapping must exist in the model (WideLast: ``Block,WideBlock``;
      Lift and plain DeiT: ``Block``).
    """
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if accelerator.distributed_type.name != "FSDP" or plugin is None:
        return
    if getattr(plugin, "fsdp_version", 1) == 1 and not plugin.use_orig_params:
        raise UserError("FSDP1 with use_orig_params=false is not supported (the optimizer keeps timm's weight-decay "
                        "groups of the original parameters); fix: accelerate launch --fsdp_use_orig_params true")
    wrap = plugin.transformer_cls_names_to_wrap or []
    wrap = wrap.split(",") if isinstance(wrap, str) else list(wrap)
    present = {type(m).__name__ for m in model.modules()}
    blocks = ",".join(sorted(n for n in present if n.endswith("Block"))) or "see the model"
    by_class = getattr(plugin.auto_wrap_policy, "__name__", "") == "transformer_auto_wrap_policy"
    if by_class and not wrap:  # timm models have no _no_split_modules for Accelerate to fall back on
        raise UserError(f"transformer-based FSDP wrapping needs the block classes; fix: "
                        f"--fsdp_transformer_layer_cls_to_wrap {blocks}")
    missing = [name for name in wrap if name not in present]
    if missing:
        raise UserError(f"--fsdp_transformer_layer_cls_to_wrap names {', '.join(missing)}, which this model does not "
                        f"have; fix: wrap its block classes: {blocks}")


def _full_options(accelerator, offload: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    # Offload only from accelerators: on CPU torch's FSDP1 gather hands back optimizer states that share one
    # buffer (exp_avg == exp_avg_sq, seen with torch 2.14 + gloo); without offload every rank gets its own copy.
    # A single process needs no offload either (older torch asks for a rank when offloading).
    offload = offload and accelerator.device.type != "cpu" and torch.distributed.is_initialized()
    return StateDictOptions(full_state_dict=True, cpu_offload=offload)


def full_model_state(accelerator, model: torch.nn.Module, offload: bool = True) -> Dict[str, torch.Tensor]:
    """The whole module's weights under plain names (DDP/FSDP/compile prefixes removed). Every rank must call it.

    ``offload``: gathered tensors go to CPU memory (on accelerators); without it they stay on the device.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(model, options=_full_options(accelerator, offload))


# ---------------------------------------------------------------------------------------------------
# Tensors + JSON (the optimizer state is a tree of dicts, lists, numbers and tensors)
# ---------------------------------------------------------------------------------------------------
def _split_tensors(obj: Any, key: str, tensors: Dict[str, torch.Tensor]) -> Any:
    """JSON-able copy of ``obj``; each tensor goes into ``tensors`` and leaves ``{"__tensor__": key}`` behind."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj  # _save_tensors moves it to the CPU
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"checkpoint state at {key!r} has non-string keys")
        return {k: _split_tensors(v, f"{key}/{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [_split_tensors(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint state at {key!r} holds a {type(obj).__name__}")


def _join_tensors(obj: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__tuple__"}:
            return tuple(_join_tensors(v, tensors) for v in obj["__tuple__"])
        return {k: _join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    return obj


def _write(path: Path, data: bytes) -> None:
    """Write and fsync: meta.json (written after) must never mark a folder whose data is not on disk."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _save_tensors(path: Path, tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> None:
    from safetensors.torch import save
    _write(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata))


def _load_tensors(path: Path, with_metadata: bool = False):
    """safetensors only; a missing or damaged file is a UserError naming it."""
    from safetensors import safe_open
    if not path.is_file():
        raise UserError(f"checkpoint {path.parent} lacks {path.name}; fix: resume from another checkpoint "
                        "(or start a new run)")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for a bad header
        raise UserError(f"checkpoint file {path} is damaged or not a safetensors file ({err}); "
                        "fix: resume from another checkpoint") from err
    return (tensors, metadata) if with_metadata else tensors


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"checkpoint file {path} is missing or not JSON ({err}); "
                        "fix: resume from another checkpoint") from err


# ---------------------------------------------------------------------------------------------------
# RNG states, one file per process
# ---------------------------------------------------------------------------------------------------
def _rng_state(device: torch.device) -> tuple:
    tensors = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["cuda"] = torch.cuda.get_rng_state(device)
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np_keys.astype(np.int64))
    py_version, py_state, py_gauss = random.getstate()
    tensors["python"] = torch.tensor(py_state, dtype=torch.int64)
    metadata = {"numpy": json.dumps([np_name, int(np_pos), int(np_has_gauss), float(np_gauss)]),
                "python": json.dumps([py_version, py_gauss])}
    return tensors, metadata


def _set_rng_state(tensors: Dict[str, torch.Tensor], metadata: Dict[str, str], device: torch.device) -> None:
    torch.set_rng_state(tensors["torch"])
    if device.type == "cuda" and "cuda" in tensors:
        torch.cuda.set_rng_state(tensors["cuda"], device)
    np_name, np_pos, np_has_gauss, np_gauss = json.loads(metadata["numpy"])
    np.random.set_state((np_name, tensors["numpy"].numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    py_version, py_gauss = json.loads(metadata["python"])
    random.setstate((py_version, tuple(tensors["python"].tolist()), py_gauss))


# ---------------------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------------------
def save_checkpoint(accelerator, ckpt_root: Path, meta: Dict[str, Any], keep: int, model: torch.nn.Module,
                    optimizer, scheduler=None, ema=None) -> Path:
    """Write a checkpoint atomically (temp folder, then rename); prune to the last ``keep``. All ranks call it.

    A kill at any moment leaves either the previous checkpoints or the new complete one: the rename is the
    commit, and ``meta.json`` (written last, fsynced) marks a folder as complete.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    name = f"ckpt_{meta['num_updates']:09d}_e{meta['epoch']:04d}_b{meta['batch']:07d}"
    final, tmp = ckpt_root / name, ckpt_root / f".tmp-{name}"
    if accelerator.is_main_process:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    # collectives under FSDP: every rank gathers, the main one writes
    model_state = full_model_state(accelerator, model)
    optim_state = get_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer),
                                           options=_full_options(accelerator))
    if accelerator.is_main_process:
        _save_tensors(tmp / MODEL_FILE, model_state)
        optim_tensors: Dict[str, torch.Tensor] = {}
        layout = _split_tensors(optim_state, "optimizer", optim_tensors)
        _save_tensors(tmp / OPTIMIZER_FILE, optim_tensors)
        _write(tmp / OPTIMIZER_LAYOUT_FILE, json.dumps(layout).encode())
        if ema is not None:
            _save_tensors(tmp / EMA_FILE, ema.module.state_dict())
    del model_state, optim_state
    tensors, metadata = _rng_state(accelerator.device)
    _save_tensors(tmp / RNG_FILE.format(rank=accelerator.process_index), tensors, metadata)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        meta = dict(meta, format=FORMAT, num_processes=accelerator.num_processes, accelerator_step=accelerator.step,
                    scheduler=scheduler.state_dict() if scheduler is not None else None,
                    scaler=accelerator.scaler.state_dict() if accelerator.scaler is not None else None)
        _write(tmp / META_FILE, json.dumps(meta, indent=1).encode())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(ckpt_root)[:-max(keep, 1)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _mismatch(path: Path, what: str) -> UserError:
    return UserError(f"cannot resume from {path}: {what}; the model or --model-ema differ from the run that "
                     "wrote it; fix: resume with the run's settings (its args.yaml) or start a new run")


def load_checkpoint(accelerator, path: Path, model: torch.nn.Module, optimizer, scheduler=None,
                    ema=None) -> Dict[str, Any]:
    """Restore everything :func:`save_checkpoint` wrote and return its meta. All ranks call it.

    Only JSON and safetensors are read. A folder from an older version (Accelerate's pickles), a damaged file
    or a model that no longer matches the checkpoint is refused with a :class:`UserError`.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    meta = _load_json(path / META_FILE)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"cannot resume from {path}: it was written by an older timm-widelast (Accelerate pickles, "
                        "which are never loaded); fix: start a new run, or load its model.safetensors as weights")
    if (ema is not None) != (path / EMA_FILE).is_file():
        raise _mismatch(path, "it has no EMA weights" if ema is not None else "it holds EMA weights")
    load_options = StateDictOptions(full_state_dict=True)
    try:
        set_model_state_dict(model, _load_tensors(path / MODEL_FILE), options=load_options)
        if ema is not None:
            ema.module.load_state_dict(_load_tensors(path / EMA_FILE))
    except (RuntimeError, KeyError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise _mismatch(path, f"its weights do not fit this model ({first[:200]})") from err
    layout = _load_json(path / OPTIMIZER_LAYOUT_FILE)
    optim_state = _join_tensors(layout, _load_tensors(path / OPTIMIZER_FILE))
    try:
        set_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), optim_state, options=load_options)
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        raise _mismatch(path, f"its optimizer state does not fit ({type(err).__name__}: {str(err)[:200]})") from err
    if scheduler is not None and meta.get("scheduler") is not None:
        scheduler.load_state_dict(meta["scheduler"])
    if accelerator.scaler is not None and meta.get("scaler") is not None:
        accelerator.scaler.load_state_dict(meta["scaler"])
    accelerator.step = meta.get("accelerator_step", 0)  # gradient-accumulation phase
    rng_path = path / RNG_FILE.format(rank=accelerator.process_index)
    if rng_path.is_file() or accelerator.num_processes == meta.get("num_processes"):
        tensors, metadata = _load_tensors(rng_path, with_metadata=True)
        try:
            _set_rng_state(tensors, metadata, accelerator.device)
        except (KeyError, ValueError, TypeError, RuntimeError) as err:
            raise UserError(f"checkpoint file {rng_path} holds no valid RNG state ({err}); "
                            "fix: resume from another checkpoint") from err
    # else: more processes than the checkpoint had; the new ones keep their seeded RNG
    return meta
