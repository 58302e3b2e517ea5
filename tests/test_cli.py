"""`timm-widelast train` (the trainer's flags, packaged recipes) and what a wheel ships."""
from __future__ import annotations

import csv
import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from _folders import make_imagefolder

from timm_widelast.cli import main

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "timm_widelast"


def test_top_level_help_lists_train_and_validate(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["-h"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "train" in out and "validate" in out


def test_train_help_is_the_trainers_with_the_recipe_applied(capsys):
    """`train -c NAME -h`: the trainer's own help, its defaults taken from the packaged YAML."""
    recipe = yaml.safe_load((PACKAGE / "configs" / "widelast_softkd_mse.yaml").read_text())
    with pytest.raises(SystemExit) as exit_:
        main(["train", "-c", "widelast_softkd_mse", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps long lines
    assert exit_.value.code == 0
    assert out.startswith("usage: timm-widelast train ")  # the usage line names the sub-command
    for flag in ("--kd-model-name", "--feat-loss", "--distill-loss-weight", "--model-ema"):
        assert flag in out
    # values the trainer's own defaults do not have (no teacher, batch 128, a = 0)
    for key in ("kd_model_name", "batch_size", "distill_loss_weight"):
        assert f"(default: {recipe[key]})" in out, key


def test_train_unknown_recipe_is_one_line(capsys):
    assert main(["train", "-c", "widelast_softkd_mse_typo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: config not found") and "widelast_softkd_mse," in err[0]


def test_tiny_distillation_run_through_the_cli(tmp_path):
    from safetensors.torch import load_file

    make_imagefolder(tmp_path / "data", classes=2, counts=(("train", 4), ("validation", 2)), size=32, step=100)
    code = main(["train", "--data-dir", str(tmp_path / "data"), "--output", str(tmp_path / "out"), "--experiment",
                 "run", "--model", "deit_tiny_widelast", "--img-size", "32", "--model-kwargs", "patch_size=8",
                 "embed_dim=32", "depth=1", "num_heads=2", "wide_dim=64", "wide_heads=2",
                 "--kd-model-name", "vit_small_patch16_224", "--kd-no-pretrained", "--kd-model-kwargs", "img_size=32",
                 "patch_size=8", "embed_dim=64", "depth=1", "num_heads=2", "num_classes=2",
                 "--distill-loss-weight", "0.9", "--feat-loss", "mse", "--epochs", "1", "-b", "4", "--workers", "0",
                 "--warmup-epochs", "0", "--no-progress"])
    assert code == 0
    run = tmp_path / "out" / "run"
    rows = list(csv.DictReader(open(run / "summary.csv")))
    assert len(rows) == 1 and float(rows[0]["kd_loss"]) > 0 and float(rows[0]["feat_loss"]) > 0
    weights = load_file(str(run / "model.safetensors"))
    assert weights["head.weight"].shape == (2, 64)  # the WideLast student, 2 classes, 64-wide endpoint


def test_wheel_ships_every_package_file(tmp_path):
    """Build a wheel from a copy of the sources; every file of the package folder (configs, templates) is in it."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed (needed to build without network)")
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(ROOT / "pyproject.toml", src)
    shutil.copy(ROOT / "README.md", src)
    shutil.copytree(PACKAGE, src / "timm_widelast", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(tmp_path / "wheel")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").glob("timm_widelast-*.whl")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("timm_widelast/")}
    on_disk = {p.relative_to(src).as_posix() for p in (src / "timm_widelast").rglob("*") if p.is_file()}
    assert on_disk - shipped == set()
    configs = sorted(n for n in shipped if n.startswith("timm_widelast/configs/") and n.endswith(".yaml"))
    assert "timm_widelast/configs/widelast_softkd_mse.yaml" in configs and len(configs) >= 10
    entry_points = zipfile.ZipFile(wheel).read(f"{wheel.name.split('-py3')[0]}.dist-info/entry_points.txt").decode()
    assert "timm-widelast = timm_widelast.cli:main" in entry_points
