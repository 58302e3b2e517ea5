"""Training data: datasets per split, per-sample seeded augmentation, and the loaders.

The trainer asks this module for its datasets and loaders; everything about where images come
from and how batches reach the device lives here.

Two data paths, chosen by :func:`build_loaders`:

* CPU path (on CPU, or ``--no-prefetcher``): the workers decode, augment, normalise and erase, as
  timm's transforms do without a prefetcher. Its numbers are the reference.
* Device path (default on CUDA): the workers hand over uint8 batches (4x fewer bytes to copy, from
  pinned memory), and :class:`DeviceTransform` normalises and randomly erases them on the device,
  as timm's ``PrefetchLoader`` does, but with erasing seeded per (seed, rank, epoch, batch) so a
  resumed run stays bit-identical.
"""
from __future__ import annotations

import argparse
import math
import os
import random
from pathlib import Path
from typing import Callable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import timm
import torch
from torch.utils.data import DataLoader

from ..errors import UserError

FOLDER_DATASETS = ("", "folder", "imagefolder")
# timm's names for training / evaluation folders; used only to suggest the flag that fixes a mistake
TRAIN_SPLIT_NAMES = ("train", "training")
EVAL_SPLIT_NAMES = ("validation", "val", "valid", "eval", "evaluation", "test")
SPLIT_RULE = ("splits are folders under --data-dir; a root of class folders alone trains whole, "
              "with --val-split ''")
ERASING_STREAM = 1  # keeps the device erasing seeds apart from the per-sample augmentation seeds


# ---------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------
def _subfolders(root: Path) -> List[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _holds_images(folder: Path) -> bool:
    """True when ``folder`` has an image file directly inside (a class folder, not a split folder)."""
    from timm.data.readers.img_extensions import get_img_extensions
    extensions = get_img_extensions(as_set=True)
    with os.scandir(folder) as entries:
        return any(e.is_file() and os.path.splitext(e.name)[1].lower() in extensions for e in entries)


def _is_flat(root: Path) -> bool:
    """A root of class folders alone (each holds images directly), no split folders."""
    folders = _subfolders(root)
    return bool(folders) and all(_holds_images(p) for p in folders)


def _found(root: Path) -> str:
    names = [p.name + "/" for p in _subfolders(root)]
    if not names:
        return "no folders"
    shown = ", ".join(names[:8])
    return f"folders found: {shown}" + (f" ... ({len(names)} in all)" if len(names) > 8 else "")


def _suggest(root: Path, flag: str, names: Sequence[str]) -> str:
    present = [p.name for p in _subfolders(root) if p.name.lower() in names]
    return f" (here: {flag} {present[0]})" if present else ""


def _split_root(args: argparse.Namespace, split: str, training: bool) -> Optional[str]:
    """The folder holding one split of a folder dataset (None: no evaluation, ``--val-split ''``).

    Train: ``ROOT/<train split>``; if it is missing and every subfolder of ROOT holds images (a flat
    root of class folders, no split folders), ROOT itself. Validation: ``ROOT/<val split>`` (the default
    ``validation`` also finds ``val``). Anything else is a :class:`UserError` naming the folders found,
    so a typo never trains on every image or silently skips evaluation.
    """
    root = Path(args.data_dir)
    if not split:
        return None  # --val-split '' (create_datasets refuses an empty --train-split)
    for name in [split] + (["val"] if split == "validation" else []):
        if (root / name).is_dir():
            return str(root / name)
    flat = _is_flat(root)
    if training:
        if flat:
            return str(root)  # class folders alone: nothing in the root can be a validation split
        raise UserError(f"no train split {split!r} in {root} ({_found(root)}); fix: pass --train-split NAME"
                        f"{_suggest(root, '--train-split', TRAIN_SPLIT_NAMES)} ({SPLIT_RULE})")
    if flat:
        raise UserError(f"no validation split {split!r} in {root}: it holds class folders only ({_found(root)}), "
                        f"so all of it is training data; fix: pass --val-split '' to train without evaluation, "
                        f"or split the images into train/ and validation/ folders")
    raise UserError(f"no validation split {split!r} in {root} ({_found(root)}); fix: pass --val-split NAME"
                    f"{_suggest(root, '--val-split', EVAL_SPLIT_NAMES)}, or --val-split '' to train without "
                    f"evaluation ({SPLIT_RULE})")


def create_datasets(args: argparse.Namespace):
    """timm ``create_dataset`` for train and validation (None when ``--val-split ''``).

    Split-name mistakes, a validation folder inside a flat training root, and empty data are
    :class:`UserError`s.
    """
    if not args.train_split:
        raise UserError("--train-split is empty; fix: name the split that holds the training images")
    folder = (args.dataset or "").lower() in FOLDER_DATASETS
    # folder datasets: the split folders; other timm datasets take the root and the split name
    roots = {training: _split_root(args, split, training) if folder else args.data_dir
             for split, training in ((args.train_split, True), (args.val_split, False))}
    if folder and roots[False] is not None and Path(roots[False]).resolve() == Path(roots[True]).resolve():
        raise UserError(f"the train and validation splits are the same folder ({roots[True]}); "
                        f"fix: pass different --train-split and --val-split")
    if folder and roots[False] is not None and Path(roots[True]).resolve() == Path(args.data_dir).resolve():
        raise UserError(f"{args.data_dir} is used whole for training (no {args.train_split!r} folder), so it cannot "
                        f"also hold the validation split; fix: pass --val-split '' or split the images into "
                        f"train/ and validation/ folders")
    datasets = []
    for split, training in ((args.train_split, True), (args.val_split, False)):
        root = roots[training]
        if not split:  # --val-split '': no evaluation (an empty train split was refused above)
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


def count_classes(dataset) -> Optional[int]:
    """Number of classes a timm dataset knows of (None when it cannot tell)."""
    reader = getattr(dataset, "reader", None)
    class_to_idx = getattr(reader, "class_to_idx", None) or getattr(dataset, "class_to_idx", None)
    if class_to_idx:
        return len(class_to_idx)
    classes = getattr(dataset, "classes", None)
    return len(classes) if classes else None


# ---------------------------------------------------------------------------------------------------
# Seeding
# ---------------------------------------------------------------------------------------------------
def derive_seed(*entropy: int) -> int:
    """A 32-bit seed that is a pure function of the given non-negative integers."""
    return int(np.random.SeedSequence([int(e) for e in entropy]).generate_state(1)[0])


class SeededAugDataset(torch.utils.data.Dataset):
    """Makes each sample's augmentation a pure function of (seed, rank, epoch, index).

    The global RNGs are left untouched (forked and restored around each sample). So a resumed
    run sees the same augmentations as an uninterrupted one, whatever the worker count, and
    even though Accelerate's loader fetches one batch ahead of the checkpoint it saves.
    The epoch lives in shared memory, so persistent workers see :meth:`set_epoch` too.
    """

    def __init__(self, dataset, seed: int, rank: int) -> None:
        self.dataset, self.seed, self.rank = dataset, seed, rank
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        seed = derive_seed(self.seed, self.rank, self.epoch, index)
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


# ---------------------------------------------------------------------------------------------------
# Device-side normalisation and random erasing
# ---------------------------------------------------------------------------------------------------
class DeviceTransform:
    """uint8 batch -> float normalised by (mean, std) [+ random erasing], on the batch's device.

    timm's ``PrefetchLoader`` arithmetic: ``(x - 255 mean) / (255 std)``. The erasing follows timm's
    ``RandomErasing`` (per image: probability, 1..count boxes, area 2%..1/3 split over the boxes, log-uniform
    aspect 0.3..3.3, 10 tries), but its draws come from a generator seeded by (seed, rank, epoch, batch),
    so a batch's erasing never depends on what ran before it.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device, re_prob: float = 0.0,
                 re_mode: str = "const", re_count: int = 1, seed: int = 0, rank: int = 0) -> None:
        shape = (1, len(mean), 1, 1)
        self.mean = torch.tensor([255.0 * m for m in mean], device=device).view(shape)
        self.std = torch.tensor([255.0 * s for s in std], device=device).view(shape)
        self.re_prob, self.re_mode, self.re_count = re_prob, re_mode.lower(), max(int(re_count), 1)
        if self.re_mode not in ("const", "rand", "pixel"):
            raise UserError(f"unknown --remode {re_mode!r}; choose const, rand or pixel")
        self.seed, self.rank = seed, rank
        self.min_area, self.max_area = 0.02, 1.0 / 3.0
        self.log_aspect = (math.log(0.3), math.log(1.0 / 0.3))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> normalised float32, no randomness (evaluation)."""
        return x.to(torch.float32).sub_(self.mean).div_(self.std)

    def __call__(self, x: torch.Tensor, epoch: int, batch: int) -> torch.Tensor:
        """Training batch ``batch`` of ``epoch``: normalise, then erase (in place) when ``re_prob`` > 0."""
        x = self.normalize(x)
        if self.re_prob > 0:
            self.erase(x, derive_seed(self.seed, self.rank, epoch, batch, ERASING_STREAM))
        return x

    def erase(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        """Erase boxes of the normalised batch ``x`` in place; the boxes and fill are a function of ``seed``."""
        rng = random.Random(seed)  # box geometry: host-side draws, so no device sync
        gen = torch.Generator(device=x.device)
        gen.manual_seed(seed)
        _, chans, img_h, img_w = x.shape
        for image in x:
            if rng.random() >= self.re_prob:
                continue
            count = rng.randint(1, self.re_count)
            for _ in range(count):
                for _attempt in range(10):
                    target_area = rng.uniform(self.min_area, self.max_area) * img_h * img_w / count
                    aspect = math.exp(rng.uniform(*self.log_aspect))
                    h = int(round(math.sqrt(target_area * aspect)))
                    w = int(round(math.sqrt(target_area / aspect)))
                    if w < img_w and h < img_h:
                        top, left = rng.randint(0, img_h - h), rng.randint(0, img_w - w)
                        image[:, top:top + h, left:left + w] = self._fill((chans, h, w), x, gen)
                        break
        return x

    def _fill(self, shape: Tuple[int, int, int], x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if self.re_mode == "pixel":
            return torch.randn(shape, generator=gen, device=x.device, dtype=x.dtype)
        if self.re_mode == "rand":
            return torch.randn((shape[0], 1, 1), generator=gen, device=x.device, dtype=x.dtype)
        return torch.zeros((shape[0], 1, 1), device=x.device, dtype=x.dtype)


class NormalizedLoader:
    """Wraps an (evaluation) loader of uint8 batches so it yields normalised float batches."""

    def __init__(self, loader, transform: DeviceTransform) -> None:
        self.loader, self.transform = loader, transform

    def __iter__(self) -> Iterator:
        for x, y in self.loader:
            yield self.transform.normalize(x), y

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def dataset(self):
        return self.loader.dataset


def _cpu_path(x: torch.Tensor, epoch: int, batch: int) -> torch.Tensor:
    return x  # the workers already normalised (and erased)


class Loaders(NamedTuple):
    """What :func:`build_loaders` gives the trainer."""

    train: DataLoader
    val: Optional[DataLoader]
    train_set: SeededAugDataset  # call set_epoch(epoch) before each epoch
    device_transform: Callable[[torch.Tensor, int, int], torch.Tensor]  # (x, epoch, batch) -> model input
    eval_wrap: Callable  # applied to the prepared val loader (normalises on the device path)
    shards_by_rank: bool  # the train sampler shards by rank itself (repeated augmentation)
    on_device: bool


def device_path_default(args: argparse.Namespace, device: torch.device) -> bool:
    """The uint8 + device-normalisation path: on CUDA unless ``--no-prefetcher``."""
    return device.type == "cuda" and not getattr(args, "no_prefetcher", False)


def pin_memory_default(args: argparse.Namespace, device: torch.device) -> bool:
    """``--pin-mem`` / ``--no-pin-mem`` when given, else pinned on CUDA."""
    pin = getattr(args, "pin_mem", None)
    return device.type == "cuda" if pin is None else bool(pin)


def build_loaders(args: argparse.Namespace, train_set, val_set, data_config: dict, device: torch.device,
                  rank: int = 0, num_processes: int = 1, on_device: Optional[bool] = None) -> Loaders:
    """Transforms, seeded dataset, samplers and DataLoaders for training and evaluation.

    ``on_device`` (default: :func:`device_path_default`) picks the device path: workers yield uint8 and
    ``device_transform`` normalises and erases on the device. Otherwise the workers normalise and erase
    (the CPU path) and ``device_transform`` returns its input.
    """
    from timm.data import create_transform
    from timm.data.distributed_sampler import RepeatAugSampler

    on_device = device_path_default(args, device) if on_device is None else on_device
    input_size, mean, std = data_config["input_size"], data_config["mean"], data_config["std"]
    train_set.transform = create_transform(
        input_size, is_training=True, scale=tuple(args.scale), ratio=tuple(args.ratio),
        hflip=args.hflip, color_jitter=args.color_jitter, auto_augment=args.aa,
        interpolation=args.train_interpolation, mean=mean, std=std,
        re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, use_prefetcher=on_device)
    seeded = SeededAugDataset(train_set, args.seed, rank)
    workers = args.workers
    loader_kwargs = dict(num_workers=workers, pin_memory=pin_memory_default(args, device),
                         persistent_workers=workers > 0)
    shards_by_rank = args.aug_repeats > 0 and num_processes > 1
    if shards_by_rank:
        # RepeatAugSampler shards by rank itself, so Accelerate must not shard again
        sampler = RepeatAugSampler(seeded, num_replicas=num_processes, rank=rank, num_repeats=args.aug_repeats)
        train_loader = DataLoader(seeded, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                                  **loader_kwargs)
    else:
        train_loader = DataLoader(seeded, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                  generator=torch.Generator().manual_seed(args.seed), **loader_kwargs)
    val_loader = None
    if val_set is not None:
        val_set.transform = create_transform(
            input_size, is_training=False, interpolation=data_config["interpolation"], mean=mean, std=std,
            crop_pct=data_config["crop_pct"], use_prefetcher=on_device)
        val_loader = DataLoader(val_set, batch_size=args.validation_batch_size or args.batch_size, shuffle=False,
                                **loader_kwargs)
    if not on_device:
        return Loaders(train_loader, val_loader, seeded, _cpu_path, lambda loader: loader, shards_by_rank, False)
    transform = DeviceTransform(mean, std, device, re_prob=args.reprob, re_mode=args.remode,
                                re_count=args.recount, seed=args.seed, rank=rank)
    return Loaders(train_loader, val_loader, seeded, transform, lambda loader: NormalizedLoader(loader, transform),
                   shards_by_rank, True)
