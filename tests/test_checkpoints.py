"""Checkpoints: nothing is unpickled on resume, every state comes back exactly, keep-K pruning, EMA arithmetic."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from _folders import make_imagefolder

from timm_widelast.distill.checkpoints import list_checkpoints, load_checkpoint, save_checkpoint
from timm_widelast.distill.ema import create_student_ema, sync_ema, update_ema
from timm_widelast.distill.trainer import main
from timm_widelast.errors import UserError

STUDENT = ["--model", "deit_tiny_widelast", "--img-size", "32", "--model-kwargs", "patch_size=8", "embed_dim=32",
           "depth=2", "num_heads=2", "wide_dim=64", "wide_heads=2"]
COMMON = ["-b", "4", "--warmup-epochs", "0", "--workers", "0", "--no-progress", "--lr", "1e-3", "--epochs", "1",
          "--model-ema", "--seed", "0"]
# the file names Accelerate's load_state reads (custom states with weights_only=False)
ACCELERATE_FILES = ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl", "optimizer.bin",
                    "scheduler.bin", "pytorch_model.bin", "sampler.bin", "scaler.pt")


class Payload:
    """Unpickling this creates ``marker`` (and nothing else): proof that a file was unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def payload_bytes(marker: Path, tmp_path: Path) -> bytes:
    path = tmp_path / "payload.pt"
    torch.save({"state": Payload(marker)}, path)  # what torch.load(weights_only=False) would run
    return path.read_bytes()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A 3-class ImageFolder (train 8/class, validation 3/class) of generated PNGs."""
    return make_imagefolder(tmp_path_factory.mktemp("data"))


def test_resume_never_unpickles_a_planted_payload(data_dir, tmp_path, capsys):
    marker = tmp_path / "UNPICKLED"
    payload = payload_bytes(marker, tmp_path)
    argv = ["--data-dir", str(data_dir), "--output", str(tmp_path / "out"), *STUDENT, *COMMON, "--experiment", "run"]
    assert main(argv + ["--checkpoint-every-steps", "2", "--stop-after-updates", "2"]) == 0
    ckpt = list_checkpoints(tmp_path / "out" / "run" / "checkpoints")[-1]
    own_files = sorted(p.name for p in ckpt.iterdir())
    assert {"model.safetensors", "optimizer.safetensors", "optimizer.json", "ema.safetensors", "rng_0.safetensors",
            "meta.json"} == set(own_files)
    resume = argv + ["--resume", "auto", "--stop-after-updates", "3"]

    # 1. pickles under Accelerate's names beside a good checkpoint: ignored, the resume goes on
    for name in ACCELERATE_FILES:
        (ckpt / name).write_bytes(payload)
    capsys.readouterr()
    assert main(resume) == 0
    assert f"resumed from {ckpt}" in capsys.readouterr().out
    assert not marker.exists()
    for name in ACCELERATE_FILES:
        (ckpt / name).unlink()

    # 2. each of the checkpoint's own files replaced by, or followed by, a pickle: one error line, exit 2
    for name in own_files:
        good = (ckpt / name).read_bytes()
        for planted in (payload, good + payload):
            (ckpt / name).write_bytes(planted)
            capsys.readouterr()
            code = main(resume)
            err = capsys.readouterr().err.strip().splitlines()
            (ckpt / name).write_bytes(good)
            assert not marker.exists(), name
            if planted is payload or code != 0:  # a valid file with trailing bytes may also be read as valid
                assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and str(ckpt) in err[0], \
                    (name, code, err)

    # 3. a folder written by Accelerate's save_state (the old format): refused, its pickles untouched
    old = tmp_path / "out" / "run" / "checkpoints" / "ckpt_000000009_e0000_b0000009"
    old.mkdir()
    for name in ACCELERATE_FILES:
        (old / name).write_bytes(payload)
    (old / "meta.json").write_text('{"epoch": 0, "batch": 9, "num_updates": 9, "history": [], "best": {}}')
    code = main(resume)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "older" in err[0] and not marker.exists(), err


def _accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(cpu=True)


def _snapshot(model, optimizer, ema, scheduler):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {i: {k: v.clone() for k, v in s.items()} for i, s in optimizer.state_dict()["state"].items()},
            {k: v.clone() for k, v in ema.module.state_dict().items()}, dict(scheduler.state_dict()))


def test_save_load_round_trip_and_pruning(tmp_path):
    """Model, optimizer, EMA, scheduler, accumulation phase and every RNG come back exactly; keep-K prunes."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    accelerator = _accelerator()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    optimizer = create_optimizer_v2(model, opt="adamw", lr=1e-2, weight_decay=0.05)  # two param groups
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=4, warmup_epochs=1,
                                       step_on_epochs=False, updates_per_epoch=3)
    ema = create_student_ema(model, decay=0.5)
    model, optimizer = accelerator.prepare(model, optimizer)

    def train_steps(n: int, start: int) -> None:
        for step in range(start, start + n):
            loss = model(torch.randn(5, 4)).square().mean()
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step_update(step)
            ema.update(model, step=step)

    root = tmp_path / "checkpoints"
    train_steps(3, 1)
    accelerator.step = 7
    meta = {"epoch": 1, "batch": 0, "num_updates": 3}
    path = save_checkpoint(accelerator, root, meta, keep=2, model=model, optimizer=optimizer, scheduler=scheduler,
                           ema=ema)
    saved = _snapshot(model, optimizer, ema, scheduler)
    saved_lr = [group["lr"] for group in optimizer.param_groups]
    draws = (torch.rand(3), np.random.rand(3), random.random())

    train_steps(2, 4)  # move every state on
    accelerator.step = 11
    assert not torch.equal(saved[0]["0.weight"], model.state_dict()["0.weight"])
    loaded_meta = load_checkpoint(accelerator, path, model, optimizer, scheduler, ema)
    assert {k: loaded_meta[k] for k in meta} == meta and accelerator.step == 7
    now = _snapshot(model, optimizer, ema, scheduler)
    for before, after in zip(saved[:3], now[:3]):
        assert before.keys() == after.keys()
        for k in before:
            if isinstance(before[k], dict):
                assert all(torch.equal(before[k][s], after[k][s]) for s in before[k])
            else:
                assert torch.equal(before[k], after[k]), k
    assert now[3] == saved[3]
    assert [group["lr"] for group in optimizer.param_groups] == saved_lr
    assert torch.equal(torch.rand(3), draws[0]) and np.array_equal(np.random.rand(3), draws[1])
    assert random.random() == draws[2]

    for updates in (4, 5, 6):
        save_checkpoint(accelerator, root, dict(meta, num_updates=updates), keep=2, model=model, optimizer=optimizer,
                        scheduler=scheduler, ema=ema)
    (root / ".tmp-ckpt_000000099_e0009_b0000000").mkdir()  # a save killed half-way
    assert [p.name[:14] for p in list_checkpoints(root)] == ["ckpt_000000005", "ckpt_000000006"]
    with pytest.raises(UserError, match="has no EMA weights"):
        (list_checkpoints(root)[-1] / "ema.safetensors").unlink()
        load_checkpoint(accelerator, list_checkpoints(root)[-1], model, optimizer, scheduler, ema)


class Holder(torch.nn.Module):
    """The trainer's trainable module in miniature: ``.student`` plus training-only parts."""

    def __init__(self, student: torch.nn.Module):
        super().__init__()
        self.student = student
        self.projector = torch.nn.Linear(2, 2)


def test_ema_starts_at_prepared_weights_and_averages_like_timm():
    accelerator = _accelerator()
    torch.manual_seed(0)
    student = torch.nn.Linear(3, 2)
    ema = create_student_ema(student, decay=0.75)  # built before prepare: a plain copy
    with torch.no_grad():
        student.weight.add_(1.0)  # as DDP's broadcast (or FSDP's shards) would change the weights at prepare
    trainable = Holder(student)
    sync_ema(ema, accelerator, trainable)
    expected = student.weight.detach().double().numpy().copy()
    assert np.array_equal(ema.module.weight.detach().double().numpy(), expected)
    for step in range(1, 5):
        with torch.no_grad():
            student.weight.mul_(0.5).add_(0.1 * step)
        update_ema(ema, accelerator, trainable, step)
        decay = 0.0 if step == 1 else 0.75  # timm: the first update copies, later ones average
        expected = decay * expected + (1 - decay) * student.weight.detach().double().numpy()
        assert np.allclose(ema.module.weight.detach().double().numpy(), expected, atol=1e-6), step


def test_fsdp_settings_the_trainer_cannot_use_are_one_line_errors():
    """Checked before prepare: FSDP1 flat parameters, and wrap classes the student does not have."""
    from types import SimpleNamespace

    import timm
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.utils import DistributedType

    from timm_widelast.distill.checkpoints import check_fsdp_setup
    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)
    widelast = timm.create_model("deit_tiny_widelast", wide_dim=64, wide_heads=2, **kwargs)
    lift = timm.create_model("deit_tiny_lift", **kwargs)

    def fsdp(version: int, wrap: str, orig_params=True):
        if version == 2 and "fsdp_version" not in FullyShardedDataParallelPlugin.__dataclass_fields__:
            pytest.skip("this accelerate has no FSDP2")
        plugin = FullyShardedDataParallelPlugin(
            auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=wrap,
            use_orig_params=orig_params if version == 1 else None, **({"fsdp_version": 2} if version == 2 else {}))
        return SimpleNamespace(distributed_type=DistributedType.FSDP, state=SimpleNamespace(fsdp_plugin=plugin))

    check_fsdp_setup(fsdp(1, "Block,WideBlock"), widelast)
    check_fsdp_setup(fsdp(2, "Block"), lift)
    with pytest.raises(UserError, match="use_orig_params true"):
        check_fsdp_setup(fsdp(1, "Block,WideBlock", orig_params=False), widelast)
    with pytest.raises(UserError, match=r"names WideBlock, .*wrap its block classes: Block$"):
        check_fsdp_setup(fsdp(2, "Block,WideBlock"), lift)
    with pytest.raises(UserError, match=r"--fsdp_transformer_layer_cls_to_wrap Block,WideBlock$"):
        check_fsdp_setup(fsdp(1, None), widelast)
