"""timm_widelast.distill.data: split-name mistakes, the device (uint8) data path, seeded erasing, workers."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from timm_widelast.distill.data import (
    DeviceTransform,
    SeededAugDataset,
    build_loaders,
    create_datasets,
    device_path_default,
    pin_memory_default,
)
from timm_widelast.distill.trainer import main, parse_args
from timm_widelast.errors import UserError

DATA_CONFIG = {"input_size": (3, 32, 32), "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
               "interpolation": "bilinear", "crop_pct": 0.875}
STUDENT = ["--model", "deit_tiny_widelast", "--img-size", "32", "--model-kwargs", "patch_size=8", "embed_dim=32",
           "depth=2", "num_heads=2", "wide_dim=64", "wide_heads=2"]


def make_images(folder: Path, count: int, seed: int) -> None:
    from PIL import Image
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray((rng.random((36, 40, 3)) * 255).astype("uint8")).save(folder / f"{i}.png")


def make_root(root: Path, splits=("train", "validation"), per_class: int = 3) -> Path:
    for s, split in enumerate(splits):
        for c in range(2):
            make_images(root / split / f"class{c}", per_class, seed=10 * s + c)
    return root


def paths_of(dataset):
    return [Path(p) for p, _ in dataset.reader.samples]


# --- split-name mistakes (issue 10, item 7) ----------------------------------------------------------------
@pytest.mark.parametrize("splits, extra, flag, names", [
    (("train", "validation"), ["--train-split", "trainn"], "--train-split", ["train/", "validation/"]),
    (("training", "valid"), [], "--train-split training", ["training/", "valid/"]),
    (("train", "validation"), ["--val-split", "validaton"], "--val-split validation", ["train/", "validation/"]),
])
def test_split_mistakes_are_one_line_errors(tmp_path, capsys, splits, extra, flag, names):
    root = make_root(tmp_path / "data", splits)
    code = main(["--data-dir", str(root), "--output", str(tmp_path / "out"), *STUDENT, "--epochs", "1",
                 "--workers", "0", "--no-progress", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert all(name in err[0] for name in names) and flag in err[0], err[0]
    if "--val-split" in extra:
        assert "--val-split ''" in err[0]  # the way to train without evaluation is named


def test_training_and_valid_folders_never_train_on_validation_images(tmp_path):
    root = make_root(tmp_path, ("training", "valid"))
    with pytest.raises(UserError, match="no train split 'train'"):
        create_datasets(parse_args(["--data-dir", str(root)]))  # before: the whole root, valid/ included
    train_set, val_set = create_datasets(parse_args(["--data-dir", str(root), "--train-split", "training",
                                                     "--val-split", "valid"]))
    train_paths, val_paths = paths_of(train_set), paths_of(val_set)
    assert len(train_paths) == 6 and all(p.parent.parent.name == "training" for p in train_paths)
    assert len(val_paths) == 6 and all(p.parent.parent.name == "valid" for p in val_paths)
    assert train_set.reader.class_to_idx == {"class0": 0, "class1": 1}


def test_split_rules_that_keep_working(tmp_path):
    # train/ + val/: the default 'validation' finds val/
    root = make_root(tmp_path / "a", ("train", "val"))
    train_set, val_set = create_datasets(parse_args(["--data-dir", str(root)]))
    assert len(train_set) == 6 and {p.parent.parent.name for p in paths_of(val_set)} == {"val"}
    # --val-split '': no evaluation, said explicitly
    assert create_datasets(parse_args(["--data-dir", str(root), "--val-split", ""]))[1] is None
    # a flat root of class folders trains on all of it, but only without a validation split
    flat = tmp_path / "flat"
    for c in range(3):
        make_images(flat / f"class{c}", 2, seed=c)
    with pytest.raises(UserError, match=r"no validation split 'validation'.*class0/, class1/, class2/.*--val-split ''"):
        create_datasets(parse_args(["--data-dir", str(flat)]))
    train_set, val_set = create_datasets(parse_args(["--data-dir", str(flat), "--val-split", ""]))
    assert len(train_set) == 6 and val_set is None
    # a validation folder picked out of a flat root would be trained on too
    with pytest.raises(UserError, match="used whole for training"):
        create_datasets(parse_args(["--data-dir", str(flat), "--val-split", "class0"]))


# --- the device data path (issue 9, item 4) ----------------------------------------------------------------
def loader_args(root: Path, *extra: str):
    return parse_args(["--data-dir", str(root), "-b", "4", "--workers", "0", "--seed", "3", *extra])


def test_device_normalisation_equals_cpu_path(tmp_path):
    """Same images, seed and augmentation: uint8 + device normalisation == the workers' float batch."""
    root = make_root(tmp_path, per_class=4)
    args = loader_args(root, "--hflip", "0.5", "--color-jitter", "0.4")
    cpu = build_loaders(args, *create_datasets(args), DATA_CONFIG, torch.device("cpu"), on_device=False)
    dev = build_loaders(args, *create_datasets(args), DATA_CONFIG, torch.device("cpu"), on_device=True)
    assert not cpu.on_device and dev.on_device
    for epoch in (0, 1):
        cpu.train_set.set_epoch(epoch)
        dev.train_set.set_epoch(epoch)
        # each loader runs whole epochs (a sampler left unfinished would not draw its next epoch's order)
        for batch, ((xc, yc), (xd, yd)) in enumerate(zip(list(cpu.train), list(dev.train))):
            assert xd.dtype == torch.uint8 and xc.dtype == torch.float32
            assert torch.equal(yc, yd)
            # independent reference: timm's ToTensor + Normalize, computed here from the uint8 pixels
            mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_DEFAULT_STD)
            expected = (xd.double() / 255 - mean) / std.view(1, 3, 1, 1)
            assert torch.allclose(xc.double(), expected, atol=1e-5)
            assert torch.allclose(dev.device_transform(xd, epoch, batch), xc, atol=1e-5, rtol=0)
    (xc, yc), = [next(iter(cpu.val))]
    (xd, yd), = [next(iter(dev.eval_wrap(dev.val)))]
    assert xd.dtype == torch.float32 and torch.equal(yc, yd)
    assert torch.allclose(xd, xc, atol=1e-5, rtol=0)


def erased_boxes(x: torch.Tensor):
    """(top, left, h, w) of the zero region of each image, None when nothing was erased; asserts a rectangle."""
    boxes = []
    for image in x:
        zero = (image == 0).all(dim=0)
        if not zero.any():
            boxes.append(None)
            continue
        rows, cols = zero.any(dim=1).nonzero().flatten(), zero.any(dim=0).nonzero().flatten()
        top, left = int(rows[0]), int(cols[0])
        h, w = int(rows[-1]) - top + 1, int(cols[-1]) - left + 1
        assert zero[top:top + h, left:left + w].all() and int(zero.sum()) == h * w  # one solid box
        boxes.append((top, left, h, w))
    return boxes


def test_device_random_erasing_is_seeded_and_sized():
    size, n = 48, 400
    x = torch.full((n, 3, size, size), 200, dtype=torch.uint8)  # normalises to non-zero everywhere
    erase = DeviceTransform(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, torch.device("cpu"), re_prob=0.5,
                            re_mode="const", seed=7, rank=1)
    a = erase(x, epoch=2, batch=5)
    assert torch.equal(a, erase(x, epoch=2, batch=5))  # a pure function of (seed, rank, epoch, batch)
    for other in (erase(x, epoch=2, batch=6), erase(x, epoch=3, batch=5),
                  DeviceTransform(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, torch.device("cpu"), re_prob=0.5,
                                  seed=7, rank=0)(x, epoch=2, batch=5)):
        assert not torch.equal(a, other)
    boxes = erased_boxes(a)
    erased = [b for b in boxes if b is not None]
    assert 0.4 < len(erased) / n < 0.6  # re_prob 0.5 over 400 images
    area = size * size
    for _, _, h, w in erased:
        # h and w are the box's real sides rounded to integers: the real sides lie within +-0.5 of them,
        # so the real area (2%..1/3 of the image) and aspect (0.3..1/0.3) must be reachable from there
        assert (h - 0.5) * (w - 0.5) <= area / 3 and (h + 0.5) * (w + 0.5) >= 0.02 * area, (h, w)
        assert (h - 0.5) / (w + 0.5) <= 1 / 0.3 and (h + 0.5) / (w - 0.5) >= 0.3, (h, w)
    # what is not erased is exactly the plain normalisation
    plain = erase.normalize(x)
    untouched = torch.tensor([b is None for b in boxes])
    assert torch.equal(a[untouched], plain[untouched])
    # pixel mode: seeded noise, the same again for the same batch
    noisy = DeviceTransform(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, torch.device("cpu"), re_prob=1.0,
                            re_mode="pixel", re_count=3, seed=7)
    first = noisy(x[:8], 0, 0)
    assert torch.equal(first, noisy(x[:8], 0, 0)) and not torch.equal(first, noisy.normalize(x[:8]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_erasing_boxes_on_cuda_match_cpu():
    x = torch.full((16, 3, 32, 32), 90, dtype=torch.uint8)
    kw = dict(re_prob=0.5, re_mode="const", seed=1)
    cpu = DeviceTransform(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, torch.device("cpu"), **kw)(x, 0, 0)
    cuda = DeviceTransform(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, torch.device("cuda"), **kw)(x.cuda(), 0, 0)
    assert torch.allclose(cuda.cpu(), cpu, atol=1e-5, rtol=0)


class _Draws(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int):
        return torch.rand(())


def test_persistent_workers_see_each_epoch():
    """The epoch reaches persistent workers: their draws equal the in-process ones, and differ per epoch."""
    def draws(workers: int):
        data = SeededAugDataset(_Draws(), seed=0, rank=0)
        loader = torch.utils.data.DataLoader(data, batch_size=4, num_workers=workers,
                                             persistent_workers=workers > 0)
        out = []
        for epoch in range(3):
            data.set_epoch(epoch)
            out.append(torch.cat(list(loader)))
        return out

    in_process, workers = draws(0), draws(2)
    assert all(torch.equal(a, b) for a, b in zip(in_process, workers))
    assert not torch.equal(in_process[0], in_process[1]) and not torch.equal(in_process[1], in_process[2])


def test_loader_defaults_follow_the_device(tmp_path):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    args = parse_args([])
    assert pin_memory_default(args, cuda) and not pin_memory_default(args, cpu)
    assert not pin_memory_default(parse_args(["--no-pin-mem"]), cuda) and pin_memory_default(
        parse_args(["--pin-mem"]), cpu)
    assert device_path_default(args, cuda) and not device_path_default(args, cpu)
    assert not device_path_default(parse_args(["--no-prefetcher"]), cuda)
    root = make_root(tmp_path, per_class=2)
    args = loader_args(root, "--workers", "2")
    loaders = build_loaders(args, *create_datasets(args), DATA_CONFIG, cpu)
    assert loaders.train.persistent_workers and loaders.val.persistent_workers
    assert not loaders.train.pin_memory and not loaders.on_device


# --- the device path through the trainer (forced on this CPU) ------------------------------------------------
def train_argv(root: Path, out: Path, *extra: str):
    # --cpu: on a GPU machine too, the first run must take the CPU path it is compared with
    return ["--data-dir", str(root), "--output", str(out), *STUDENT, "-b", "4", "--workers", "0", "--no-progress",
            "--cpu", "--warmup-epochs", "0", "--lr", "1e-3", "--seed", "0", *extra]


@pytest.fixture(scope="module")
def train_root(tmp_path_factory) -> Path:
    return make_root(tmp_path_factory.mktemp("data"), per_class=6)


def test_trainer_device_path_matches_cpu_path(train_root, tmp_path, monkeypatch):
    """Same run through the trainer: uint8 + device normalisation gives the CPU path's losses and accuracy."""
    from timm_widelast.distill import data
    from timm_widelast.distill.trainer import train
    cpu = train(parse_args(train_argv(train_root, tmp_path, "--experiment", "cpu", "--epochs", "1")))
    monkeypatch.setattr(data, "device_path_default", lambda args, device: True)
    dev = train(parse_args(train_argv(train_root, tmp_path, "--experiment", "dev", "--epochs", "1")))
    for key in ("train_loss", "eval_loss", "eval_top1"):
        assert np.isclose(cpu["history"][0][key], dev["history"][0][key], rtol=1e-4, atol=1e-6), key

