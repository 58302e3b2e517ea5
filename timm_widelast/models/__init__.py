"""Model families; importing them registers their names in timm's factory."""
from .lift import LiftVisionTransformer
from .widelast import WideBlock, WideLastVisionTransformer

__all__ = ["LiftVisionTransformer", "WideBlock", "WideLastVisionTransformer"]
