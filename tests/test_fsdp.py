"""FSDP1 and FSDP2 end to end on two CPU processes (gloo): EMA, mid-epoch checkpoint, resume, best/final/EMA export.

Accelerate turns FSDP on only for GPU-like devices (on CPU processes it falls back to DDP), so the child
script below switches the Accelerator's state to FSDP after it is built, as ``accelerate launch --use_fsdp``
would on GPUs, with the plugin settings of docs/training.md (transformer wrap on Block,WideBlock). It also
drops the ``device_id`` Accelerate passes to torch's FSDP1, which FSDP1 refuses on CPU. The trainer itself
runs unchanged.

Reference: the same run under DDP, uninterrupted. Two ranks average gradients exactly alike under DDP and
FSDP (a/2 + b/2 == (a + b)/2 in floating point), so every exported tensor must be equal, not just close.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _folders import make_imagefolder
from safetensors.torch import load_file

from timm_widelast.distill.checkpoints import list_checkpoints

STUDENT = ["--model", "deit_tiny_widelast", "--img-size", "32", "--model-kwargs", "patch_size=8", "embed_dim=32",
           "depth=2", "num_heads=2", "wide_dim=64", "wide_heads=2"]
TEACHER = ["--kd-model-name", "vit_small_patch16_224", "--kd-no-pretrained", "--kd-model-kwargs", "img_size=32",
           "patch_size=8", "embed_dim=64", "depth=2", "num_heads=2", "num_classes=3"]
RUN = ["-b", "4", "--warmup-epochs", "0", "--workers", "0", "--no-progress", "--lr", "1e-3", "--epochs", "2",
       "--distill-loss-weight", "0.9", "--feat-loss", "mse", "--model-ema", "--model-ema-decay", "0.9",
       "--drop-path", "0.1", "--seed", "0"]  # drop-path draws from each rank's RNG: its restore is checked too
COMPARED = ("train_loss", "task_loss", "kd_loss", "feat_loss", "eval_loss", "eval_top1", "ema_top1")

CHILD = '''
import json, sys
import torch
from accelerate import Accelerator, FullyShardedDataParallelPlugin
from accelerate.state import PartialState
from accelerate.utils import DistributedType
import torch.distributed.fsdp._init_utils as fsdp_init

version = [0]
build_accelerator = Accelerator.__init__


def build_with_fsdp(self, *args, **kwargs):
    build_accelerator(self, *args, **kwargs)
    if version[0]:
        self.state.distributed_type = DistributedType.FSDP
        # accelerate < 1.6 knows FSDP1 only (no fsdp_version field)
        versioned = {"fsdp_version": version[0]} if version[0] == 2 else {}
        self.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["Block", "WideBlock"],
            use_orig_params=True if version[0] == 1 else None, **versioned)


Accelerator.__init__ = build_with_fsdp
if hasattr(fsdp_init, "_get_device_from_device_id"):
    device_of_id = fsdp_init._get_device_from_device_id
    fsdp_init._get_device_from_device_id = (
        lambda d, *a: None if d is not None and torch.device(d).type == "cpu" else device_of_id(d, *a))
PartialState.destroy_process_group = lambda self, group=None: None  # several runs share one process group

from timm_widelast.distill.trainer import main

for fsdp_version, argv in json.load(open(sys.argv[1])):
    version[0] = fsdp_version
    code = main(argv)
    if code:
        sys.exit(code)
'''


def fsdp2_supported() -> bool:
    from accelerate import FullyShardedDataParallelPlugin
    return hasattr(torch.distributed.fsdp, "fully_shard") and \
        "fsdp_version" in FullyShardedDataParallelPlugin.__dataclass_fields__


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A 3-class ImageFolder (train 8/class, validation 3/class) of generated PNGs."""
    return make_imagefolder(tmp_path_factory.mktemp("data"))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
@pytest.mark.skipif(tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 6),
                    reason="FSDP on CPU processes (gloo): checked with torch 2.14; fully_shard is public from 2.6")
def test_fsdp1_and_fsdp2_stop_resume_export_match_ddp(data_dir, tmp_path):
    base = ["--data-dir", str(data_dir), "--output", str(tmp_path), *STUDENT, *TEACHER, *RUN]
    stop = ["--checkpoint-every-steps", "2", "--stop-after-updates", "4"]  # 3 updates/epoch: update 4 is mid-epoch
    versions = [1, 2] if fsdp2_supported() else [1]
    runs = [[0, base + ["--experiment", "ddp"]]]
    for v in versions:
        runs += [[v, base + ["--experiment", f"fsdp{v}", *stop]],
                 [v, base + ["--experiment", f"fsdp{v}", "--resume", "auto"]]]
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    (tmp_path / "child.py").write_text(CHILD)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(tmp_path / "child.py"), str(tmp_path / "runs.json")],
                          capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for v in versions:
        assert f"resumed from {tmp_path / f'fsdp{v}' / 'checkpoints' / 'ckpt_000000004_e0001_b0000001'}" in proc.stdout
    ref_rows = list(csv.DictReader(open(tmp_path / "ddp" / "summary.csv")))
    assert len(ref_rows) == 2 and float(ref_rows[0]["feat_loss"]) > 0  # the feature taps fired
    for v in versions:
        run = tmp_path / f"fsdp{v}"
        # full student weights, not shards: the files load into a plain model
        for name in ("model.safetensors", "best/model.safetensors", "ema/model.safetensors"):
            ref, got = load_file(str(tmp_path / "ddp" / name)), load_file(str(run / name))
            assert ref.keys() == got.keys(), name
            assert all(ref[k].shape == got[k].shape and torch.equal(ref[k], got[k]) for k in ref), (v, name)
        assert (run / "ema" / "config.json").is_file()
        rows = list(csv.DictReader(open(run / "summary.csv")))
        assert [{k: r[k] for k in COMPARED} for r in rows] == [{k: r[k] for k in COMPARED} for r in ref_rows]
        ckpt = list_checkpoints(run / "checkpoints")[-1]
        assert {p.suffix for p in ckpt.iterdir()} <= {".safetensors", ".json"}  # nothing pickled
        assert {"rng_0.safetensors", "rng_1.safetensors"} <= {p.name for p in ckpt.iterdir()}
    ema, final = load_file(str(tmp_path / "ddp" / "ema" / "model.safetensors")), \
        load_file(str(tmp_path / "ddp" / "model.safetensors"))
    assert any(not torch.equal(ema[k], final[k]) for k in ema)  # the EMA is not just a copy of the weights
