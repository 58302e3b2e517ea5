"""Training data: datasets per split, per-sample seeded augmentation, and the loaders.

The trainer asks this module for its datasets and loaders; everything about where images come
from and how batches reach the device lives here.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import timm
import torch

from ..errors import UserError


def _split_root(args: argparse.Namespace, split: str, training: bool) -> Optional[str]:
    """For folder datasets: the split folder; a flat train root is allowed, a missing val split means no eval."""
    root = Path(args.data_dir)
    candidates = [split] + (["val"] if split == "validation" else [])
    for name in candidates:
        if (root / name).is_dir():
            return str(root / name)
    return str(root) if training else None


def create_datasets(args: argparse.Namespace):
    """timm ``create_dataset`` for train and (when present) validation; empty data is a UserError."""
    folder = not args.dataset or args.dataset.lower() in ("folder", "imagefolder")
    datasets = []
    for split, training in ((args.train_split, True), (args.val_split, False)):
        root = _split_root(args, split, training) if folder else args.data_dir
        if root is None:
            datasets.append(None)
            continue
        try:
            ds = timm.data.create_dataset(args.dataset, root=root, split=split, is_training=training,
                                          download=args.dataset_download, batch_size=args.batch_size,
                                          seed=args.seed, search_split=False)
        except (RuntimeError, FileNotFoundError, ValueError) as err:
            raise UserError(f"cannot read {split} data from {root}: {str(err).splitlines()[0]}") from err
        if len(ds) == 0:
            raise UserError(f"no images in {root}")
        datasets.append(ds)
    return datasets[0], datasets[1]


class SeededAugDataset(torch.utils.data.Dataset):
    """Makes each sample's augmentation a pure function of (seed, rank, epoch, index).

    The global RNGs are left untouched (forked and restored around each sample). So a resumed
    run sees the same augmentations as an uninterrupted one, whatever the worker count, and
    even though Accelerate's loader fetches one batch ahead of the checkpoint it saves.
    """

    def __init__(self, dataset, seed: int, rank: int) -> None:
        self.dataset, self.seed, self.rank, self.epoch = dataset, seed, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        import random

        import numpy as np
        seed = int(np.random.SeedSequence([self.seed, self.rank, self.epoch, int(index)]).generate_state(1)[0])
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


def count_classes(dataset) -> Optional[int]:
    reader = getattr(dataset, "reader", None)
    class_to_idx = getattr(reader, "class_to_idx", None) or getattr(dataset, "class_to_idx", None)
    if class_to_idx:
        return len(class_to_idx)
    classes = getattr(dataset, "classes", None)
    return len(classes) if classes else None

