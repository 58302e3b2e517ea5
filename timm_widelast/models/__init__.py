"""Model families; importing them registers their names in timm's factory."""
from ._checkpoints import CheckpointMismatchError, PretrainedWeightsUnavailable
from .lift import LIFT_SCHEDULES, LiftVisionTransformer, lift_widths
from .widelast import WideBlock, WideLastVisionTransformer

__all__ = ["CheckpointMismatchError", "LIFT_SCHEDULES", "LiftVisionTransformer", "PretrainedWeightsUnavailable",
           "WideBlock", "WideLastVisionTransformer", "lift_widths"]
