"""A tiny labelled ImageFolder of generated PNGs, shared by the training, checkpoint, FSDP, CLI and hub tests."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Tuple

import numpy as np


def make_imagefolder(root: Path, classes: int = 3,
                     counts: Sequence[Tuple[str, int]] = (("train", 8), ("validation", 3)),
                     size: int = 36, step: int = 60) -> Path:
    """``root/<split>/class<c>/<i>.png``; class c's pixels are noise in [c*step, c*step + 80), so it is learnable."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in counts:
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray((rng.random((size, size, 3)) * 80 + c * step).astype("uint8")).save(folder / f"{i}.png")
    return root
