"""EMA of the student that works on one process, under DDP, and under FSDP1/FSDP2.

timm's ``ModelEmaV3`` deep-copies the module it averages, and an FSDP-wrapped student cannot be copied
("FSDP does not support deepcopy"); its parameters are shards anyway. So the EMA is a plain, full copy of
the student made *before* ``accelerator.prepare``, set to the prepared weights right after it (DDP broadcasts
rank 0's, FSDP keeps each rank's shards), and averaged from the student's full weights: the live parameters
on one process or DDP, the gathered ones under FSDP. Every rank holds the same EMA, so any rank can
evaluate or export it.
"""
from __future__ import annotations

from typing import Dict

import torch
from timm.utils import ModelEmaV3

from .checkpoints import full_model_state


def create_student_ema(student: torch.nn.Module, decay: float, use_warmup: bool = False) -> ModelEmaV3:
    """timm's EMA of the still unwrapped student (call before ``accelerator.prepare``)."""
    return ModelEmaV3(student, decay=decay, use_warmup=use_warmup)


def is_fsdp(accelerator) -> bool:
    return getattr(accelerator, "distributed_type", None) is not None and accelerator.distributed_type.name == "FSDP"


def student_weights(accelerator, trainable: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The student's full weights by name: gathered under FSDP (all ranks must call), live tensors otherwise."""
    if is_fsdp(accelerator):
        prefix = "student."
        return {k[len(prefix):]: v for k, v in full_model_state(accelerator, trainable, offload=False).items()
                if k.startswith(prefix)}
    return accelerator.unwrap_model(trainable).student.state_dict()


@torch.no_grad()
def sync_ema(ema: ModelEmaV3, accelerator, trainable: torch.nn.Module) -> None:
    """After ``prepare``: move the EMA to the device and start it at the weights training starts from."""
    ema.module.to(accelerator.device)
    ema.module.load_state_dict(student_weights(accelerator, trainable))


@torch.no_grad()
def update_ema(ema: ModelEmaV3, accelerator, trainable: torch.nn.Module, step: int) -> None:
    """One EMA step after an optimizer update, with ``ModelEmaV3``'s decay schedule and arithmetic."""
    if not is_fsdp(accelerator):
        ema.update(accelerator.unwrap_model(trainable).student, step=step)
        return
    weights = student_weights(accelerator, trainable)
    decay = ema.get_decay(step)
    ema_state = ema.module.state_dict()
    floats = [k for k, v in ema_state.items() if v.is_floating_point()]
    torch._foreach_lerp_([ema_state[k] for k in floats], [weights[k].to(ema_state[k].dtype) for k in floats],
                         weight=1.0 - decay)
    for k, v in ema_state.items():
        if not v.is_floating_point():
            v.copy_(weights[k])
