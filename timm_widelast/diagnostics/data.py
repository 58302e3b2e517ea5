"""Image sources for the diagnostics: a folder, the paper's 1,000-image protocol, or a timm dataset.

Every item is returned as ``(index, tensor | None, error | None)`` so that an unreadable
image can be skipped (and counted) or stop the run, by the caller's choice.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from PIL import Image
from timm.data.readers.img_extensions import get_img_extensions

from ..errors import UserError

# timm's own list plus the other still-image formats PIL opens
IMAGE_EXTENSIONS = tuple(sorted(set(get_img_extensions()) | {".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif"}))


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_images(root: str | os.PathLike) -> list[Path]:
    """All image files below ``root`` (recursive), sorted by relative path."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"image folder {str(root)!r} does not exist; fix: pass an existing folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and _is_image(p.name))
    if not files:
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found below {str(root)!r}; "
                        "fix: point to a folder that holds image files")
    return files


def paper1000_images(root: str | os.PathLike) -> list[Path]:
    """The paper's protocol: the first image file (sorted by name) of every class sub-folder."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"image folder {str(root)!r} does not exist; fix: pass an ImageNet-style val folder")
    picks = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(p.name for p in class_dir.iterdir() if p.is_file() and _is_image(p.name))
        if files:
            picks.append(class_dir / files[0])
    if not picks:
        raise UserError(f"no class sub-folders with images in {str(root)!r}; "
                        "fix: --protocol paper1000 needs an ImageNet-style folder (one sub-folder per class)")
    return picks


class ImageFiles(torch.utils.data.Dataset):
    """A list of image files; unreadable files come back as errors, not exceptions."""

    def __init__(self, files: Sequence[Path], transform: Callable, root: Optional[Path] = None):
        self.files, self.transform, self.root = list(files), transform, root

    def __len__(self) -> int:
        return len(self.files)

    def name(self, index: int) -> str:
        path = self.files[index]
        return str(path.relative_to(self.root)) if self.root else str(path)

    def __getitem__(self, index: int) -> tuple[int, Optional[torch.Tensor], Optional[str]]:
        try:
            with Image.open(self.files[index]) as img:
                return index, self.transform(img.convert("RGB")), None
        except Exception as err:  # any decoding problem: report it, let the caller decide
            return index, None, f"{self.name(index)}: {type(err).__name__}: {err}"


class TimmDataset(torch.utils.data.Dataset):
    """Any dataset ``timm.data.create_dataset`` builds; labels are ignored."""

    def __init__(self, name: str, root: Optional[str], split: str, transform: Callable, **kwargs: Any):
        from timm.data import create_dataset

        try:
            self.dataset = create_dataset(name, root=root, split=split, **kwargs)
        except Exception as err:
            raise UserError(f"cannot open timm dataset {name!r} (root {root!r}, split {split!r}): {err}; "
                            "fix: check --dataset, --data-dir and --split") from err
        self.transform = transform
        if len(self.dataset) == 0:
            raise UserError(f"timm dataset {name!r} split {split!r} is empty; fix: check --data-dir and --split")

    def __len__(self) -> int:
        return len(self.dataset)

    def name(self, index: int) -> str:
        fn = getattr(self.dataset, "filename", None)
        try:
            return str(fn(index)) if fn else str(index)
        except Exception:
            return str(index)

    def __getitem__(self, index: int) -> tuple[int, Optional[torch.Tensor], Optional[str]]:
        try:
            img = self.dataset[index][0]
            if isinstance(img, Image.Image):
                img = img.convert("RGB")
            return index, self.transform(img), None
        except Exception as err:
            return index, None, f"{self.name(index)}: {type(err).__name__}: {err}"


def collate(items: list) -> tuple[torch.Tensor, Optional[torch.Tensor], list[tuple[int, str]]]:
    """Stack the readable images; return (indices, images or None, [(index, error), ...])."""
    good = [(i, x) for i, x, err in items if err is None]
    bad = [(i, err) for i, _, err in items if err is not None]
    indices = torch.tensor([i for i, _ in good], dtype=torch.long)
    images = torch.stack([x for _, x in good]) if good else None
    return indices, images, bad
