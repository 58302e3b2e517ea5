"""The demo end to end at a few steps per stage, and its embedded dataset."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from sklearn.datasets import load_digits

import timm_widelast  # noqa: F401
from timm_widelast.demo import DemoConfig, build_digits_imagefolder, run_demo


def _digest(folder: Path) -> str:
    sha = hashlib.sha256()
    for path in sorted(folder.rglob("*.png")):
        sha.update(str(path.relative_to(folder)).encode())
        sha.update(path.read_bytes())
    return sha.hexdigest()


def test_digits_imagefolder_is_real_fixed_and_cached(tmp_path):
    first = build_digits_imagefolder(tmp_path / "a", img_size=16)
    second = build_digits_imagefolder(tmp_path / "b", img_size=16)
    assert _digest(first) == _digest(second)  # the split and the pixels are fixed
    digits = load_digits()
    train = sorted((first / "train").rglob("*.png"))
    val = sorted((first / "validation").rglob("*.png"))
    assert len(train) + len(val) == len(digits.images) == 1797
    assert not {p.name for p in train} & {p.name for p in val}
    # each file is the digit it is filed under: its label matches scikit-learn's, and it is a 16 px RGB image
    sample = val[0]
    index = int(sample.stem)
    assert int(sample.parent.name) == digits.target[index]
    image = Image.open(sample)
    assert image.size == (16, 16) and image.mode == "RGB"
    # brightness order of the upsampled image follows the original 8x8 scan
    small = np.asarray(image.convert("L").resize((8, 8), Image.BOX), dtype=float)
    assert np.corrcoef(small.ravel(), digits.images[index].ravel())[0, 1] > 0.9
    for label in range(10):  # stratified: every class in both splits, ~20% held out
        n_train = len(list((first / "train" / str(label)).glob("*.png")))
        n_val = len(list((first / "validation" / str(label)).glob("*.png")))
        assert abs(n_val / (n_train + n_val) - 0.2) < 0.02
    stamp = (first / "train").stat().st_mtime_ns
    assert build_digits_imagefolder(tmp_path / "a", img_size=16) == first
    assert (first / "train").stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_demo_end_to_end_small(tmp_path):
    cfg = DemoConfig(out=tmp_path / "demo", cache_dir=tmp_path / "cache", img_size=16, patch_size=4, width=8,
                     depth=1, epochs=1, teacher_epochs=1, batch_size=128, diag_images=32)
    results = run_demo(cfg)
    out = cfg.out
    for name in ("results.md", "results.json", "sep_overlay.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["rows"]) == ["teacher", "plain", "plain_naive_kd", "lift_kd", "widelast_kd"]
    assert saved["rows"]["widelast_kd"]["params"] > saved["rows"]["plain"]["params"]
    for row in saved["rows"].values():
        assert 0.0 <= row["top1_mean"] <= 100.0 and len(row["top1"]) == 1
    # widths of the endpoints the diagnostics saw: narrow student 8, teacher and wide endpoints 16
    assert {k: v["dim"] for k, v in saved["sep"].items()} == {
        "teacher": 16, "plain": 8, "plain_naive_kd": 8, "lift_kd": 16, "widelast_kd": 16}
    table = (out / "results.md").read_text()
    assert "WideLast + KD" in table and "sep_overlay.png" in table
    # each export loads through timm's own local-dir path and reproduces the trained weights
    export = out / results["exports"]["widelast_kd"]
    assert (export / "README.md").is_file() and (export / "sep_report" / "report.json").is_file()
    model = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
    from safetensors.torch import load_file
    trained = load_file(str(out / "widelast_kd" / "seed0" / "model.safetensors"))
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())


def test_width_that_does_not_split_into_heads_is_one_line_before_starting(tmp_path, capsys):
    """`demo --width 31` once failed with an AssertionError after starting: the 62-wide teacher has 3 heads."""
    import re

    from timm_widelast.cli import main
    from timm_widelast.demo import teacher_spec, variants

    out = tmp_path / "demo"
    code = main(["demo", "--width", "31", "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --width 31") and captured.out == ""
    assert not out.exists() and not (tmp_path / "cache").exists()  # nothing started, nothing written
    suggested = [int(w) for w in re.findall(r"--width (\d+)", err[0])[1:]]
    assert suggested
    for width in suggested:  # the widths it suggests do build: teacher and all four students
        cfg = DemoConfig(width=width, depth=1, img_size=16, patch_size=4)
        for name, kwargs in [teacher_spec(cfg), *((v.model, v.model_kwargs) for v in variants(cfg))]:
            timm.create_model(name, img_size=16, num_classes=10, **kwargs)
