"""Shared helpers for the diagnostics tests: a tiny ViT and generated image folders."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=2)
TINY_NAME = "vit_tiny_patch16_224"
TINY_ARGS = ["--model-kwargs"] + [f"{k}={v}" for k, v in TINY.items()] + ["--no-pretrained"]


def tiny_model(seed: int = 0):
    import timm
    import torch

    torch.manual_seed(seed)
    return timm.create_model(TINY_NAME, pretrained=False, **TINY).eval()


def write_images(root: Path, classes: int = 3, per_class: int = 4, seed: int = 0, size=(40, 48)) -> list[Path]:
    """Random RGB PNG/JPEG images in class sub-folders; returns the files sorted by path."""
    rng = np.random.default_rng(seed)
    files = []
    for c in range(classes):
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            ext = ".png" if k % 2 == 0 else ".jpg"
            path = d / f"img{k}{ext}"
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
            files.append(path)
    return sorted(files)


def numpy_rank(x: np.ndarray, t: float) -> int:
    s = np.linalg.svd(x, compute_uv=False)
    e = s**2
    cum = np.cumsum(e) / e.sum()
    return int(np.argmax(cum >= t)) + 1


def direct_pca(images: np.ndarray, centre: bool, thresholds=(0.8, 0.9, 0.95, 0.99)):
    """All tokens in memory: C, eigh, E_i(d) by projection, first d reaching t."""
    tokens = images.reshape(-1, images.shape[-1])
    c = tokens.T @ tokens / len(tokens)
    mean = tokens.mean(0)
    if centre:
        c = c - np.outer(mean, mean)
    w, v = np.linalg.eigh(c)
    v = v[:, np.argsort(w)[::-1]]
    curves, dims = [], []
    for x in images:
        if centre:
            x = x - mean
        e = np.cumsum(((x @ v) ** 2).sum(0)) / (x**2).sum()
        curves.append(e)
        dims.append([int(np.argmax(e >= t)) + 1 for t in thresholds])
    return np.array(curves), np.array(dims)


def direct_sep(tokens: np.ndarray) -> np.ndarray:
    e = np.abs(np.fft.fft(tokens.reshape(-1, tokens.shape[-1]).astype(np.float64), axis=-1)) ** 2
    return (100 * np.cumsum(e, -1) / e.sum(-1, keepdims=True)).mean(0)
