"""train_distill.py / timm_widelast.distill.trainer: outputs, resume equivalence, two processes, bad input."""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from timm_widelast.distill.trainer import list_checkpoints, main, parse_args, train

ROOT = Path(__file__).resolve().parents[1]
STUDENT = ["--model", "deit_tiny_widelast", "--img-size", "32", "--model-kwargs", "patch_size=8", "embed_dim=32",
           "depth=2", "num_heads=2", "wide_dim=64", "wide_heads=2"]
TEACHER = ["--kd-model-name", "vit_small_patch16_224", "--kd-no-pretrained", "--kd-model-kwargs", "img_size=32",
           "patch_size=8", "embed_dim=64", "depth=2", "num_heads=2", "num_classes=3"]
COMMON = ["-b", "4", "--warmup-epochs", "1", "--workers", "0", "--no-progress", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A 3-class ImageFolder (train 8/class, validation 3/class) of generated PNGs."""
    from PIL import Image
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("validation", 3)):
        for c in range(3):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = (rng.random((36, 36, 3)) * 80 + c * 60).astype("uint8")
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def argv(data_dir, out, *extra):
    return ["--data-dir", str(data_dir), "--output", str(out), *STUDENT, *COMMON, *extra]


def test_distill_run_outputs(data_dir, tmp_path):
    args = parse_args(argv(data_dir, tmp_path, *TEACHER, "--distill-loss-weight", "0.9", "--feat-loss", "spectral",
                           "--epochs", "2", "--model-ema", "--experiment", "run", "--checkpoint-keep", "1"))
    summary = train(args)
    run = tmp_path / "run"
    rows = list(csv.DictReader(open(run / "summary.csv")))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert {"train_loss", "task_loss", "kd_loss", "feat_loss", "eval_top1", "eval_top5", "lr"} <= set(rows[0])
    assert float(rows[0]["kd_loss"]) > 0 and float(rows[0]["feat_loss"]) > 0
    assert yaml.safe_load(open(run / "args.yaml"))["distill_loss_weight"] == 0.9
    assert summary["best_top1"] == max(float(r["eval_top1"]) for r in rows)
    # exported student: loads through timm's local-dir path, no projector/teacher keys
    import timm
    model = timm.create_model(f"local-dir:{run}", pretrained=True)
    assert model.num_classes == 3
    for folder in (run, run / "best", run / "ema"):
        assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    ckpts = list_checkpoints(run / "checkpoints")
    assert len(ckpts) == 1  # --checkpoint-keep 1
    keys = load_file(str(ckpts[-1] / "model.safetensors"))
    assert keys and all(k.startswith("student.") for k in keys)  # the teacher is never checkpointed


def test_plain_training_without_teacher_via_dict(data_dir, tmp_path):
    summary = train({"data_dir": str(data_dir), "output": str(tmp_path), "model": "deit_tiny_lift", "img_size": 32,
                     "model_kwargs": ["patch_size=8", "embed_dim=32", "depth=2", "num_heads=2", "lift_dim=64"],
                     "batch_size": 4, "epochs": 1, "workers": 0, "progress": False})
    assert summary["num_classes"] == 3 and len(summary["history"]) == 1
    assert Path(summary["model_path"]).is_file()


def test_yaml_config_and_cli_override(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("batch_size: 7\nlr: 0.002\nfeat_loss: mse\n")
    args = parse_args(["-c", str(cfg), "--lr", "0.1"])
    assert (args.batch_size, args.lr, args.feat_loss) == (7, 0.1, "mse")


def test_configs_parse_with_paper_recipe():
    configs = sorted((ROOT / "timm_widelast" / "configs").glob("*.yaml"))
    assert len(configs) >= 10
    for path in configs:
        args = parse_args(["-c", str(path)])
        assert (args.lr, args.epochs, args.batch_size, args.weight_decay) == (2e-3, 300, 512, 0.05), path
        assert (args.mixup, args.cutmix, args.smoothing, args.seed) == (0, 0, 0.1, 0), path


def _weights(path: Path):
    return load_file(str(path))


def test_killed_and_resumed_run_matches_uninterrupted(data_dir, tmp_path):
    base = argv(data_dir, tmp_path, *TEACHER, "--distill-loss-weight", "0.9", "--feat-loss", "mse",
                "--epochs", "2", "--model-ema", "--model-ema-decay", "0.9", "--reprob", "0.25", "--aa",
                "rand-m9-mstd0.5-inc1", "--drop-path", "0.1", "--seed", "0")
    full = train(parse_args(base + ["--experiment", "full"]))
    stopped = train(parse_args(base + ["--experiment", "killed", "--checkpoint-every-steps", "4",
                                       "--stop-after-updates", "9"]))
    assert stopped["stopped"]
    ckpt_root = tmp_path / "killed" / "checkpoints"
    # a save killed half-way leaves a temp folder without meta.json: it must be ignored on resume
    latest = list_checkpoints(ckpt_root)[-1]
    shutil.copytree(latest, ckpt_root / ".tmp-ckpt_999999999_e0009_b0000000")
    (ckpt_root / ".tmp-ckpt_999999999_e0009_b0000000" / "meta.json").unlink()
    assert latest.name.startswith("ckpt_000000008_e0001_b0000002")  # mid-epoch: 6 updates/epoch
    resumed = train(parse_args(base + ["--experiment", "killed", "--resume", "auto"]))
    assert resumed["num_updates"] == full["num_updates"] == 12
    for name in ("model.safetensors", "ema/model.safetensors"):
        a, b = _weights(tmp_path / "full" / name), _weights(tmp_path / "killed" / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    rows_full = list(csv.DictReader(open(tmp_path / "full" / "summary.csv")))
    rows_resumed = list(csv.DictReader(open(tmp_path / "killed" / "summary.csv")))
    assert rows_full == rows_resumed


# --- bad input: one line, non-zero exit -------------------------------------------------------------------
@pytest.mark.parametrize("case, extra, match", [
    ("unknown model", ["--model", "no_such_model"], "unknown model"),
    ("unknown teacher", ["--kd-model-name", "no_such_teacher", "--distill-loss-weight", "0.5"], "unknown teacher"),
    ("negative weight", ["--feat-weight", "-1"], "feat-weight"),
    ("a > 1", ["--distill-loss-weight", "1.5"], r"\[0, 1\]"),
    ("missing teacher layer", [*TEACHER, "--feat-loss", "mse", "--kd-layer", "9"], "out of range"),
    ("missing tracker", ["--log-with", "wandb"], "wandb"),
])
def test_bad_input_one_line(data_dir, tmp_path, capsys, case, extra, match):
    import re
    if case == "missing tracker" and __import__("importlib").util.find_spec("wandb"):
        pytest.skip("wandb is installed here")
    code = main(argv(data_dir, tmp_path, "--epochs", "1", *extra))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and re.search(match, err[0]), err


def test_missing_and_empty_data_dir(tmp_path, capsys):
    assert main(argv(tmp_path / "nope", tmp_path, "--epochs", "1")) == 2
    (tmp_path / "empty").mkdir()
    assert main(argv(tmp_path / "empty", tmp_path, "--epochs", "1")) == 2
    (tmp_path / "empty2" / "train").mkdir(parents=True)
    assert main(argv(tmp_path / "empty2", tmp_path, "--epochs", "1")) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines), lines


def test_non_finite_loss_stops_and_keeps_checkpoint(data_dir, tmp_path, capsys):
    code = main(argv(data_dir, tmp_path, "--epochs", "2", "--warmup-epochs", "0", "--lr", "1e30",
                     "--checkpoint-every-steps", "1", "--experiment", "nan"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1 and "non-finite loss" in err[0] and "batch" in err[0]
    latest = list_checkpoints(tmp_path / "nan" / "checkpoints")[-1]
    assert str(latest) in err[0]
    weights = load_file(str(latest / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())  # the kept checkpoint is good


def test_script_exit_code_and_single_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train_distill.py"), "--data-dir", str(tmp_path / "nope")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: data dir not found: {tmp_path / 'nope'}"]


def test_two_process_cpu_run(data_dir, tmp_path):
    """torchrun with two CPU processes (gloo); `accelerate launch --cpu --num_processes 2` would start one."""
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(ROOT / "train_distill.py"), *argv(data_dir, tmp_path, *TEACHER, "--distill-loss-weight", "0.9",
                                                 "--feat-loss", "spectral", "--epochs", "1", "--experiment", "ddp",
                                                 "--aug-repeats", "3")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "ddp" / "summary.csv")))
    assert len(rows) == 1 and rows[0]["eval_top1"] != ""
    ckpt = list_checkpoints(tmp_path / "ddp" / "checkpoints")[-1]
    assert {p.name for p in ckpt.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}


def test_image_size_from_model_kwargs_alone(data_dir, tmp_path):
    """--model-kwargs img_size=32 without --img-size: the data pipeline follows the model, not the 224 default."""
    student = [a for a in STUDENT if a not in ("--img-size", "32")] + ["img_size=32"]
    args = parse_args(["--data-dir", str(data_dir), "--output", str(tmp_path), *student, *COMMON, "--epochs", "1",
                       "--experiment", "kw"])
    summary = train(args)
    assert summary["num_updates"] == 6 and 0 <= summary["final_top1"] <= 100  # 24 images / batch 4


def test_invalid_width_kwargs_are_one_line(data_dir, tmp_path, capsys):
    code = main(argv(data_dir, tmp_path, "--epochs", "1", "--model-kwargs", "patch_size=8", "embed_dim=32",
                     "depth=2", "num_heads=2", "wide_dim=63", "wide_heads=2"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not divisible" in err[0]


def test_bf16_autocast_on_cpu_covers_teacher_and_student(data_dir, tmp_path):
    """--mixed-precision bf16 goes through Accelerate's autocast (CPU bf16 here); the loss stays finite."""
    args = parse_args(argv(data_dir, tmp_path, *TEACHER, "--distill-loss-weight", "0.9", "--feat-loss", "mse",
                           "--epochs", "1", "--mixed-precision", "bf16", "--experiment", "bf16"))
    summary = train(args)
    assert summary["num_updates"] == 6 and np.isfinite(summary["history"][0]["train_loss"])
    # weights are kept in float32 (autocast changes compute, not storage)
    weights = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in weights.values())
