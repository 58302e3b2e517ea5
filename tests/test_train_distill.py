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
from _folders import make_imagefolder
from safetensors.torch import load_file

from timm_widelast.distill.trainer import list_checkpoints, main, parse_args, resolve_lr, train

ROOT = Path(__file__).resolve().parents[1]
STUDENT = ["--model", "deit_tiny_widelast", "--img-size", "32", "--model-kwargs", "patch_size=8", "embed_dim=32",
           "depth=2", "num_heads=2", "wide_dim=64", "wide_heads=2"]
TEACHER = ["--kd-model-name", "vit_small_patch16_224", "--kd-no-pretrained", "--kd-model-kwargs", "img_size=32",
           "patch_size=8", "embed_dim=64", "depth=2", "num_heads=2", "num_classes=3"]
COMMON = ["-b", "4", "--warmup-epochs", "1", "--workers", "0", "--no-progress", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A 3-class ImageFolder (train 8/class, validation 3/class) of generated PNGs."""
    return make_imagefolder(tmp_path_factory.mktemp("data"))


def argv(data_dir, out, *extra):
    return ["--data-dir", str(data_dir), "--output", str(out), *STUDENT, *COMMON, *extra]


def test_distill_run_outputs(data_dir, tmp_path):
    # hard KD and two paired layers (the release's s_id/t_id lists) go through the same loop
    args = parse_args(argv(data_dir, tmp_path, *TEACHER, "--distill-loss-weight", "0.9", "--feat-loss", "spectral",
                           "--epochs", "2", "--model-ema", "--experiment", "run", "--checkpoint-keep", "1",
                           "--distillation-type", "hard", "--student-layer", "0", "1", "--kd-layer", "0", "blocks.1"))
    summary = train(args)
    run = tmp_path / "run"
    rows = list(csv.DictReader(open(run / "summary.csv")))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert {"train_loss", "task_loss", "kd_loss", "feat_loss", "eval_top1", "eval_top5", "lr"} <= set(rows[0])
    assert float(rows[0]["kd_loss"]) > 0 and float(rows[0]["feat_loss"]) > 0
    saved = yaml.safe_load(open(run / "args.yaml"))
    assert saved["distill_loss_weight"] == 0.9 and saved["distillation_type"] == "hard"
    assert saved["student_layer"] == [0, 1] and saved["kd_layer"] == [0, "blocks.1"]
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
        # the release's rule: 5e-4 x global batch / 512, so 4 GPUs x 512 -> 2e-3 and 2 GPUs x 512 -> 1e-3
        assert resolve_lr(args, num_processes=4) == pytest.approx(2e-3, rel=1e-12), path
        assert resolve_lr(args, num_processes=2) == pytest.approx(1e-3, rel=1e-12), path
        assert (args.epochs, args.batch_size, args.weight_decay) == (300, 512, 0.05), path
        assert (args.mixup, args.cutmix, args.smoothing, args.seed) == (0, 0, 0.1, 0), path
        assert not args.sched_on_updates, path


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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train_distill.py"), *argv(data_dir, tmp_path, *TEACHER, "--distill-loss-weight", "0.9",
                                                 "--feat-loss", "spectral", "--epochs", "1", "--experiment", "ddp",
                                                 "--aug-repeats", "3")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "ddp" / "summary.csv")))
    assert len(rows) == 1 and rows[0]["eval_top1"] != ""
    ckpt = list_checkpoints(tmp_path / "ddp" / "checkpoints")[-1]
    from timm_widelast.distill.checkpoints import RNG_FILE
    assert all((ckpt / RNG_FILE.format(rank=rank)).is_file() for rank in (0, 1))  # each rank's own RNG state


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
    assert not (tmp_path / "deit_tiny_widelast").exists()  # a rejected command writes nothing


def test_bf16_autocast_on_cpu_covers_teacher_and_student(data_dir, tmp_path):
    """--mixed-precision bf16 goes through Accelerate's autocast (CPU bf16 here); the loss stays finite."""
    args = parse_args(argv(data_dir, tmp_path, *TEACHER, "--distill-loss-weight", "0.9", "--feat-loss", "mse",
                           "--epochs", "1", "--mixed-precision", "bf16", "--experiment", "bf16",
                           "--kd-weights-dtype", "bfloat16"))
    summary = train(args)
    assert summary["num_updates"] == 6 and np.isfinite(summary["history"][0]["train_loss"])
    # weights are kept in float32 (autocast changes compute, not storage)
    weights = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in weights.values())


# --- flags: compile, distillation type, several layers ----------------------------------------------------
def test_torchcompile_and_layer_flags_parse():
    args = parse_args(["--torchcompile", "--student-layer", "9", "10", "11", "--kd-layer", "blocks.21", "22", "-1",
                       "--distillation-type", "hard", "--kd-weights-dtype", "bfloat16"])
    assert args.torchcompile == "inductor" and args.torchcompile_mode is None  # timm's const
    assert args.student_layer == [9, 10, 11] and args.kd_layer == ["blocks.21", 22, -1]
    assert (args.distillation_type, args.kd_weights_dtype) == ("hard", "bfloat16")
    named = parse_args(["--torchcompile", "aot_eager", "--torchcompile-mode", "max-autotune"])
    assert (named.torchcompile, named.torchcompile_mode) == ("aot_eager", "max-autotune")
    assert parse_args([]).torchcompile is None  # eager stays the default


def test_torchcompile_run_matches_eager(data_dir, tmp_path):
    base = argv(data_dir, tmp_path, *TEACHER, "--distill-loss-weight", "0.9", "--feat-loss", "mse", "--epochs", "1",
                "--seed", "0")
    eager = train(parse_args(base + ["--experiment", "eager"]))
    compiled = train(parse_args(base + ["--experiment", "compiled", "--torchcompile", "aot_eager"]))
    for key in ("train_loss", "task_loss", "kd_loss", "feat_loss"):
        assert compiled["history"][0][key] == pytest.approx(eager["history"][0][key], rel=1e-4, abs=1e-6), key
    a, b = _weights(tmp_path / "eager" / "model.safetensors"), _weights(tmp_path / "compiled" / "model.safetensors")
    assert a.keys() == b.keys()  # compiling does not rename the exported weights
    assert all(torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5) for k in a)


# --- no per-step host sync: the non-finite stop is read at checkpoints, logs, eval and export ---------------
def test_nan_between_log_intervals_writes_nothing_after_it(data_dir, tmp_path, capsys, monkeypatch):
    from timm_widelast.distill.task import EndpointDistillationTask
    original, calls = EndpointDistillationTask.forward, []

    def forward(self, x, y):
        out = original(self, x, y)
        calls.append(1)
        if len(calls) == 4:  # epoch 0, batch 3: after the checkpoint at update 2, before the one at update 4
            out = dict(out, loss=out["loss"] * float("nan"))
        return out

    monkeypatch.setattr(EndpointDistillationTask, "forward", forward)
    code = main(argv(data_dir, tmp_path, "--epochs", "2", "--log-interval", "100", "--checkpoint-every-steps", "2",
                     "--experiment", "nan"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1, err
    assert "non-finite loss (nan) at epoch 0, batch 3" in err[0] and "before a checkpoint" in err[0], err
    run = tmp_path / "nan"
    kept = list_checkpoints(run / "checkpoints")
    assert [c.name[:30] for c in kept] == ["ckpt_000000002_e0000_b0000002"] and str(kept[0]) in err[0]
    assert all(torch.isfinite(v).all() for v in _weights(kept[0] / "model.safetensors").values())
    # nothing after the bad step: no later checkpoint, no best or final export, no epoch row
    assert not (run / "model.safetensors").exists() and not (run / "best").exists()
    assert not (run / "summary.csv").exists()


# --- the schedule and the lr, as the release ---------------------------------------------------------------
def release_lr(epoch: int, lr: float, warmup_lr: float, warmup_epochs: int, min_lr: float, epochs: int) -> float:
    """The lr the release trains epoch ``epoch`` (0-based) at: DeiT calls ``lr_scheduler.step(epoch)`` after
    each epoch, so epoch e > 0 uses the schedule's value at e - 1 and epoch 0 the warmup start."""
    t = max(epoch - 1, 0)
    if t < warmup_epochs:
        return warmup_lr + t * (lr - warmup_lr) / warmup_epochs
    return min_lr + 0.5 * (lr - min_lr) * (1 + np.cos(np.pi * t / epochs))


def test_paper_recipe_lr_per_epoch_is_the_release_stepping():
    import torch.nn as nn

    from timm_widelast.distill.trainer import create_schedule, step_schedule_at_epoch_end
    args = parse_args(["-c", "widelast_softkd_mse"])
    lr = resolve_lr(args, num_processes=4)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler, num_epochs = create_schedule(args, optimizer, updates_per_epoch=625)
    seen = []
    for epoch in range(num_epochs):
        seen.append(optimizer.param_groups[0]["lr"])
        for update in range(1, 4):  # the loop's per-update calls must not move a per-epoch schedule
            scheduler.step_update(num_updates=epoch * 625 + update)
        step_schedule_at_epoch_end(scheduler, epoch)
    assert num_epochs == 300
    assert seen[1] == pytest.approx(1e-6) and seen[5] == pytest.approx(1.6e-3, rel=1e-3)  # issue 11's numbers
    assert seen == pytest.approx([release_lr(e, 2e-3, 1e-6, 5, 1e-5, 300) for e in range(300)], rel=1e-12)


def test_lr_scaling_rules():
    # timm train.py: --lr wins; else lr_base x (batch x processes x accumulation / lr_base_size)[ ** 0.5]
    args = parse_args(["-b", "128", "--lr-base-scale", "linear"])
    assert resolve_lr(args, 1) == pytest.approx(5e-4 * 128 / 512)
    assert resolve_lr(args, 2) == pytest.approx(5e-4 * 256 / 512)
    args.grad_accum_steps = 4
    assert resolve_lr(args, 2) == pytest.approx(5e-4 * 1024 / 512)
    default = parse_args(["-b", "128"])  # '' -> sqrt for adaptive optimizers (adamw), linear for sgd
    assert resolve_lr(default, 2) == pytest.approx(5e-4 * (256 / 512) ** 0.5)
    assert resolve_lr(parse_args(["-b", "128", "--opt", "sgd"]), 2) == pytest.approx(5e-4 * 256 / 512)
    assert resolve_lr(parse_args(["-b", "128", "--lr", "0.1"]), 8) == 0.1


def test_lr_per_epoch_in_a_run_follows_the_release(data_dir, tmp_path):
    # 24 images, -b 4, accumulation 2: 3 updates/epoch; lr = 1e-3 x (4 x 1 x 2) / 16 = 5e-4
    common = [a for a in COMMON if a not in ("--lr", "1e-3")]
    args = parse_args(["--data-dir", str(data_dir), "--output", str(tmp_path), *STUDENT, *common, "--epochs", "4",
                       "--grad-accum-steps", "2", "--lr-base", "1e-3", "--lr-base-size", "16", "--lr-base-scale",
                       "linear", "--warmup-epochs", "2", "--warmup-lr", "1e-5", "--min-lr", "1e-4"])
    summary = train(args)
    assert yaml.safe_load(open(tmp_path / "deit_tiny_widelast" / "args.yaml"))["lr"] == pytest.approx(5e-4)
    lrs = [row["lr"] for row in summary["history"]]
    # epochs 0 and 1 at the warmup start, 2 half-way up, 3 on the cosine
    assert lrs == pytest.approx([release_lr(e, 5e-4, 1e-5, 2, 1e-4, 4) for e in range(4)], rel=1e-12)


# --- a rejected command leaves the run untouched; resume names the changed settings --------------------------
def test_rejected_commands_leave_the_run_intact(data_dir, tmp_path, capsys):
    from timm_widelast.hub.export import export
    base = argv(data_dir, tmp_path, "--epochs", "1", "--experiment", "run", "--log-interval", "3")
    assert main(base) == 0
    saved = (tmp_path / "run" / "args.yaml").read_bytes()
    out = capsys.readouterr().out.splitlines()  # --no-progress: progress lines every --log-interval updates
    assert [line.split(" loss=")[0] for line in out if line.startswith("epoch 0 [")] == [
        "epoch 0 [3/6] update 3", "epoch 0 [6/6] update 6"]
    bad_kwargs = ["--model-kwargs", "patch_size=8", "embed_dim=32", "depth=2", "num_heads=2", "wide_dim=63",
                  "wide_heads=2"]
    wider = ["--model-kwargs", "patch_size=8", "embed_dim=32", "depth=2", "num_heads=2", "wide_dim=128",
             "wide_heads=2"]
    for extra, match in ((bad_kwargs, "not divisible"), (["--model-ema"], "--model-ema False -> True"),
                         (wider, "--model-kwargs")):
        assert main(base + ["--resume", "auto", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err
        assert (tmp_path / "run" / "args.yaml").read_bytes() == saved
    assert "wide_dim" in err[0] and "64" in err[0] and "128" in err[0]  # says what changed, from what, to what
    out = export(tmp_path / "run", tmp_path / "exported")
    assert (out / "model.safetensors").is_file()


def test_output_that_cannot_be_written_is_one_line(data_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("x")
    assert main(argv(data_dir, tmp_path / "afile", "--epochs", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file" in err[0], err
    if os.geteuid() != 0:
        readonly = tmp_path / "ro"
        readonly.mkdir()
        readonly.chmod(0o555)
    elif Path("/sys").is_dir():
        readonly = Path("/sys")  # sysfs refuses new folders even to root
    else:
        pytest.skip("no read-only location for root here")
    assert main(argv(data_dir, readonly / "out", "--epochs", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "cannot write" in err[0], err

    def write_to_full_disk(path, data):  # the kernel's own ENOSPC, from /dev/full
        with open("/dev/full", "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    monkeypatch.setattr("timm_widelast.distill.trainer.atomic_write", write_to_full_disk)
    assert main(argv(data_dir, tmp_path, "--epochs", "1", "--experiment", "full")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no space left" in err[0], err


# --- teachers: the same random teacher on every rank -----------------------------------------------------------
def test_random_teacher_is_the_same_on_every_rank():
    from timm_widelast.distill.trainer import create_teacher_same_on_every_rank
    args = parse_args([*TEACHER, "--seed", "3"])
    weights = []
    for rank in (0, 1):
        torch.manual_seed(3 + rank)  # what set_seed(seed, device_specific=True) leaves on rank `rank`
        before = torch.random.get_rng_state()
        weights.append(create_teacher_same_on_every_rank(args).state_dict())
        assert torch.equal(torch.random.get_rng_state(), before)  # the rank's own stream is left as it was
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


# --- logs ------------------------------------------------------------------------------------------------------
def test_default_workers_capped_at_available_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert parse_args([]).workers == 1


def test_launch_logs_warning_progress_lines_and_plot(data_dir, tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts one process: the run says so. Its log (not a terminal)
    gets progress lines, no bar redraws, a start and a done line, and the run folder a summary.png."""
    import re

    from matplotlib.image import imread
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    progress_on = [a for a in COMMON if a != "--no-progress"]  # bars requested, but stderr is a pipe
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "train_distill.py"),
           "--data-dir", str(data_dir), "--output", str(tmp_path), *STUDENT, *progress_on, "--epochs", "2",
           "--log-interval", "2", "--experiment", "launched"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning: the launcher asked for several processes but this run has 1" in proc.stderr
    assert "\r" not in proc.stderr + proc.stdout  # no bar redraws in a log file
    lines = proc.stdout.splitlines()
    start = [line for line in lines if line.startswith("start: ")]
    assert len(start) == 1 and "1 process(es), global batch 4" in start[0] and "train 24 images" in start[0]
    assert "validation 9 images" in start[0] and str(tmp_path / "launched") in start[0]
    assert sum(bool(re.match(r"epoch 0 \[\d+/6\] update \d+ loss=", line)) for line in lines) == 3  # every 2
    epoch_lines = [line for line in lines if line.startswith("epoch=")]
    assert len(epoch_lines) == 2
    for line in epoch_lines:
        speed, wait = re.search(r"img/s=([\d.]+) data_wait=(\d+)%", line).groups()
        assert float(speed) > 0 and 0 <= int(wait) <= 100
    assert lines[-1].startswith("done: ") and str(tmp_path / "launched" / "best") in lines[-1]
    image = imread(tmp_path / "launched" / "summary.png")
    assert image.shape[:2] == (360, 900) and image[..., :3].std() > 0.01  # drawn, not blank


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy re-runs an imported module
def test_module_help_prints_usage(monkeypatch, capsys):
    """`python -m timm_widelast.distill.trainer -h` runs the module as __main__ (it printed nothing before)."""
    import runpy
    monkeypatch.setattr(sys, "argv", ["trainer", "-h"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("timm_widelast.distill.trainer", run_name="__main__")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and "--torchcompile" in out
