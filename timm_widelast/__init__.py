"""Lift and WideLast students for timm (arXiv 2511.15572).

Importing this package registers the models in timm's factory, so that
``timm.create_model('deit_tiny_widelast')`` works.
"""
from .models import *  # noqa: F401,F403  (registration side effect)
from .models import lift, widelast  # noqa: F401

__version__ = "0.1.0"
