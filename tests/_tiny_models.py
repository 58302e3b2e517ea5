"""Tiny students and teachers (32x32 inputs, random weights) shared by the distillation tests."""
from __future__ import annotations

import timm

import timm_widelast  # noqa: F401  (registers the students)

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)


def deit():
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, **TINY)


def widelast():
    return timm.create_model("deit_tiny_widelast", wide_dim=64, wide_heads=2, **TINY)


def lift():
    return timm.create_model("deit_tiny_lift", lift_dim=64, **TINY)


def deit_teacher(**kw):
    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10) | kw
    return timm.create_model("vit_small_patch16_224", pretrained=False, **args)


def cait_teacher():
    return timm.create_model("cait_xxs24_224", pretrained=False, img_size=32, patch_size=4, embed_dim=64,
                             depth=2, num_heads=2, num_classes=10)


def swin_teacher():
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=4,
                             embed_dim=32, depths=(1, 1), num_heads=(2, 2), window_size=4, num_classes=10)
