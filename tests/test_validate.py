"""`timm-widelast validate`: top-1/top-5 against a count made here, model sources, processes, bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

import timm_widelast  # noqa: F401
from timm_widelast.cli import main

NUM_CLASSES = 7  # > 5, so top-5 is a real top-5
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, wide_dim=64, wide_heads=2,
            num_classes=NUM_CLASSES)


@pytest.fixture(scope="module")
def val_dir(tmp_path_factory) -> Path:
    """An ImageFolder `val/` of 7 classes x 3 images of varied sizes (13 images would not split evenly)."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for c in range(NUM_CLASSES):
        folder = root / "val" / f"n0{c}"
        folder.mkdir(parents=True)
        for i in range(3):
            h, w = rng.integers(30, 60, size=2)
            Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(folder / f"{i}.jpg")
    return root


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    """A WideLast student saved as timm saves exports (config.json + model.safetensors), eval crop 0.875."""
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_widelast", **TINY)
    with torch.no_grad():  # a head that spreads the logits, so top-1/top-5 depend on the image
        model.head.weight.mul_(50)
    folder = tmp_path_factory.mktemp("export")
    model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(3, 32, 32), crop_pct=0.875,
                                interpolation="bilinear")
    timm.models.save_for_hf(model, str(folder), safe_serialization=True)
    return folder


def expected_counts(model: torch.nn.Module, folder: Path) -> tuple[int, int, int]:
    """Independent count: each image through timm's eval transform and the model, one at a time."""
    cfg = resolve_data_config({}, model=model)
    transform = create_transform(**cfg)
    classes = sorted(p.name for p in folder.iterdir())
    n = top1 = top5 = 0
    with torch.no_grad():
        for label, name in enumerate(classes):
            for path in sorted((folder / name).iterdir()):
                logits = model(transform(Image.open(path).convert("RGB"))[None])[0]
                order = torch.argsort(logits, descending=True).tolist()
                n += 1
                top1 += order[0] == label
                top5 += label in order[:5]
    return n, top1, top5


def test_export_folder_matches_independent_count(val_dir, export_dir, tmp_path, capsys):
    model = timm.create_model(f"local-dir:{export_dir}", pretrained=True).eval()
    assert resolve_data_config({}, model=model)["crop_pct"] == 0.875  # the export's own eval transform is used
    n, top1, top5 = expected_counts(model, val_dir / "val")
    assert 0 < top5 < n and top1 < top5  # the count can tell a wrong order or transform apart
    results = tmp_path / "out" / "r.json"
    # the root with a val/ folder: the default split "validation" finds it as timm does
    code = main(["validate", str(export_dir), "--data-dir", str(val_dir), "-b", "4", "-j", "0",
                 "--results-file", str(results)])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(out) == 1 and "top-1" in out[0]
    saved = json.loads(results.read_text())
    assert (saved["num_images"], saved["correct_top1"], saved["correct_top5"]) == (n, top1, top5)
    assert saved["top1"] == pytest.approx(100 * top1 / n, abs=1e-3)
    assert saved["top5"] == pytest.approx(100 * top5 / n, abs=1e-3)
    assert (saved["img_size"], saved["crop_pct"], saved["interpolation"]) == (32, 0.875, "bilinear")
    assert f"{100 * top1 / n:.3f}" in out[0]


def test_weights_file_and_local_dir_and_checkpoint_agree(val_dir, export_dir, tmp_path, capsys):
    """The same weights named three ways give the same counts; bf16 autocast runs and stays close."""
    weights = export_dir / "model.safetensors"
    runs = {
        "file": [str(weights)],
        "local-dir": [f"local-dir:{export_dir}"],
        "checkpoint": ["deit_tiny_widelast", "--checkpoint", str(weights), "--model-kwargs",
                       *[f"{k}={v}" for k, v in TINY.items()], "--crop-pct", "0.875", "--interpolation", "bilinear"],
        "bf16": [str(export_dir), "--amp", "bf16"],
    }
    found = {}
    for key, spec in runs.items():
        path = tmp_path / f"{key}.json"
        assert main(["validate", *spec, "--data-dir", str(val_dir / "val"), "-j", "0", "--results-file",
                     str(path)]) == 0, key
        found[key] = json.loads(path.read_text())
    counts = {k: (v["correct_top1"], v["correct_top5"]) for k, v in found.items()}
    assert counts["file"] == counts["local-dir"] == counts["checkpoint"]
    assert found["bf16"]["amp"] == "bf16" and abs(found["bf16"]["correct_top1"] - counts["file"][0]) <= 2


def test_two_processes_count_each_image_once(val_dir, export_dir, tmp_path):
    """torchrun, 2 CPU processes (gloo): 21 images, batch 4 -> padded shards; the totals are the 1-process ones."""
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert main(["validate", str(export_dir), "--data-dir", str(val_dir), "-b", "4", "-j", "0", "--cpu",
                 "--results-file", str(one)]) == 0
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "timm_widelast.cli", "validate", str(export_dir), "--data-dir",
                           str(val_dir), "-b", "4", "-j", "0", "--cpu", "--results-file", str(two)],
                          capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len([line for line in proc.stdout.splitlines() if "top-1" in line]) == 1  # printed once
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert b["processes"] == 2 and a["processes"] == 1
    counts = [(r["num_images"], r["correct_top1"], r["correct_top5"]) for r in (a, b)]
    assert counts[0] == counts[1] and counts[0][0] == 21


@pytest.mark.parametrize("case, extra, match", [
    ("missing data", ["--data-dir", "{tmp}/nope"], "data dir not found"),
    ("split folders, wrong split", ["--data-dir", "{root}", "--split", "test"], r"split folders \['val'\]"),
    ("class count", ["--data-dir", "{tmp}/three"], "7 classes but .* 3 class folders"),
    ("no config beside", ["--data-dir", "{root}/val", "--model-from", "{tmp}/loose.safetensors"], "no config.json"),
    ("unknown model", ["--data-dir", "{root}/val", "--model-from", "no_such_model_xyz"], "cannot create"),
    ("results file is a folder", ["--data-dir", "{root}/val", "--results-file", "{tmp}"], "is a folder"),
])
def test_bad_input_is_one_line(val_dir, export_dir, tmp_path, capsys, case, extra, match):
    import re
    import shutil
    (tmp_path / "loose.safetensors").write_bytes(b"")
    for c in range(3):  # a subset of the classes: sorted-folder labels would not be the model's indices
        shutil.copytree(val_dir / "val" / f"n0{c}", tmp_path / "three" / f"n0{c}")
    extra = [a.format(tmp=tmp_path, root=val_dir) for a in extra]
    model = str(export_dir)
    if "--model-from" in extra:
        i = extra.index("--model-from")
        model = extra[i + 1]
        del extra[i:i + 2]
    code = main(["validate", model, "-j", "0", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if not line.startswith("warning")]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and re.search(match, err[0]), err
