"""Train a student (optionally distilled from a frozen teacher) with Accelerate.

One loop, top to bottom: arguments -> accelerator -> data -> models/task -> optimizer/scheduler ->
prepare -> resume -> (train, checkpoint, evaluate, log) per epoch -> export.

Programmatic use::

    from timm_widelast.distill.trainer import parse_args, train
    summary = train(parse_args(["--model", "deit_tiny_widelast", "--data-dir", "data", ...]))
    summary = train({"model": "deit_tiny_widelast", "data_dir": "data", "epochs": 1})  # dict: dest names

Flag names follow timm's ``train.py``; a YAML file given with ``-c`` sets defaults (keys = dest names)
and the command line overrides it.
"""
from __future__ import annotations

import argparse
import csv
import errno
import importlib.util
import io
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import timm
import torch
import yaml

import timm_widelast  # noqa: F401  (registers our students in timm's factory)

from ..errors import UserError
from ..io import atomic_write
from ..utils import parse_kwargs
from .checkpoints import (
    CHECKPOINT_DIR,
    check_fsdp_setup,
    find_resume_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from .data import build_loaders, count_classes, create_datasets
from .ema import create_student_ema, sync_ema, update_ema
from .endpoints import WIDTH_ALIGN_MODES
from .losses import FEATURE_LOSSES
from .task import EndpointDistillationTask, check_weights
from .teacher import FrozenTeacher, create_teacher_model

# accelerate tracker name -> python package that must be importable
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "comet_ml": ("comet_ml",),
                    "aim": ("aim",), "mlflow": ("mlflow",), "clearml": ("clearml",), "dvclive": ("dvclive",),
                    "swanlab": ("swanlab",), "trackio": ("trackio",)}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; training stopped and the last good checkpoint was kept."""


# ---------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------
def available_cores() -> int:
    """CPU cores this process may run on (a container or taskset may allow fewer than the machine has)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def layer_spec(value: str) -> Union[int, str]:
    """A tap: a block index (``9``, ``-1``) or a module name (``blocks.9``)."""
    try:
        return int(value)
    except ValueError:
        return value


def single_or_list(values: Optional[Sequence[Union[int, str]]]) -> Union[None, int, str, List[Union[int, str]]]:
    """One tap as itself, several as a list (the task pairs list items by position)."""
    if values is None or isinstance(values, (int, str)):
        return values
    values = list(values)
    return values[0] if len(values) == 1 else values


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    """timm ``train.py`` flag names where the concept exists; ours for the feature loss and checkpointing."""
    p = argparse.ArgumentParser(prog=prog, description="Endpoint-feature distillation (Lift/WideLast) on Accelerate",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-c", "--config", default="", metavar="FILE", help="YAML file of defaults (keys = dest names)")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default=None, help="dataset root (ImageFolder: train/ and validation|val/)")
    g.add_argument("--dataset", default="", help="timm dataset type ('' = ImageFolder/tar, 'torch/cifar10', ...)")
    g.add_argument("--train-split", default="train", help="folder under --data-dir holding the training images")
    g.add_argument("--val-split", default="validation",
                   help="folder under --data-dir for evaluation ('validation' also finds val/; '' = no evaluation)")
    g.add_argument("--dataset-download", action="store_true", default=False)
    g.add_argument("-j", "--workers", type=int, default=min(4, available_cores()),
                   help="loader processes (default: 4, capped at the cores this process may use)")
    g.add_argument("--pin-mem", action=argparse.BooleanOptionalAction, default=None,
                   help="pinned loader memory (None: on with CUDA)")
    g.add_argument("--no-prefetcher", action="store_true", default=False,
                   help="CUDA: normalise and erase in the workers (float batches) instead of on the GPU (uint8)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="deit_tiny_widelast")
    g.add_argument("--pretrained", action="store_true", default=False)
    g.add_argument("--num-classes", type=int, default=None, help="default: number of classes in the dataset")
    g.add_argument("--img-size", type=int, default=None)
    g.add_argument("--input-size", type=int, nargs=3, default=None, metavar="N")
    g.add_argument("--crop-pct", type=float, default=None)
    g.add_argument("--mean", type=float, nargs="+", default=None)
    g.add_argument("--std", type=float, nargs="+", default=None)
    g.add_argument("--interpolation", default="")
    g.add_argument("--drop-path", type=float, default=None)
    g.add_argument("--model-kwargs", nargs="*", default=[], metavar="K=V")
    g = p.add_argument_group("batch / precision / runtime")
    g.add_argument("-b", "--batch-size", type=int, default=128, help="per process")
    g.add_argument("-vb", "--validation-batch-size", type=int, default=None)
    g.add_argument("--grad-accum-steps", type=int, default=1)
    g.add_argument("--amp", action="store_true", default=False, help="mixed precision with --amp-dtype")
    g.add_argument("--amp-dtype", default="float16", choices=["float16", "bfloat16"])
    g.add_argument("--mixed-precision", default=None, choices=["no", "fp16", "bf16"], help="overrides --amp")
    g.add_argument("--cpu", action="store_true", default=False, help="force CPU even with a GPU")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--find-unused-parameters", action="store_true", default=False)
    g.add_argument("--torchcompile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the step (student and frozen teacher); no value = inductor")
    g.add_argument("--torchcompile-mode", default=None, metavar="MODE",
                   help="torch.compile mode, e.g. max-autotune or reduce-overhead")
    g = p.add_argument_group("optimizer / schedule")
    g.add_argument("--opt", default="adamw")
    g.add_argument("--opt-eps", type=float, default=None)
    g.add_argument("--opt-betas", type=float, nargs="+", default=None)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--clip-grad", type=float, default=None)
    g.add_argument("--lr", type=float, default=None,
                   help="learning rate; default: --lr-base scaled by the global batch (timm train.py)")
    g.add_argument("--lr-base", type=float, default=5e-4, help="lr at --lr-base-size global batch")
    g.add_argument("--lr-base-size", type=int, default=512)
    g.add_argument("--lr-base-scale", default="", choices=["", "linear", "sqrt"],
                   help="'' = timm's rule: sqrt for adaptive optimizers (ada*, lamb), else linear")
    g.add_argument("--sched", default="cosine")
    g.add_argument("--epochs", type=int, default=300)
    g.add_argument("--warmup-epochs", type=float, default=5)
    g.add_argument("--warmup-lr", type=float, default=1e-6)
    g.add_argument("--min-lr", type=float, default=1e-5)
    g.add_argument("--cooldown-epochs", type=int, default=0)
    g.add_argument("--decay-epochs", type=float, default=90)
    g.add_argument("--decay-rate", type=float, default=0.1)
    g.add_argument("--sched-on-updates", action="store_true", default=False,
                   help="step the schedule every optimizer update (default: once per epoch, as the release)")
    g = p.add_argument_group("augmentation / regularization")
    g.add_argument("--smoothing", type=float, default=0.1)
    g.add_argument("--mixup", type=float, default=0.0)
    g.add_argument("--cutmix", type=float, default=0.0)
    g.add_argument("--mixup-prob", type=float, default=1.0)
    g.add_argument("--mixup-switch-prob", type=float, default=0.5)
    g.add_argument("--mixup-mode", default="batch")
    g.add_argument("--aa", default=None, help="e.g. rand-m9-mstd0.5-inc1")
    g.add_argument("--reprob", type=float, default=0.0)
    g.add_argument("--remode", default="pixel")
    g.add_argument("--recount", type=int, default=1)
    g.add_argument("--aug-repeats", type=float, default=0, help="repeated augmentation (multi-process only)")
    g.add_argument("--scale", type=float, nargs=2, default=[0.08, 1.0])
    g.add_argument("--ratio", type=float, nargs=2, default=[3.0 / 4.0, 4.0 / 3.0])
    g.add_argument("--hflip", type=float, default=0.5)
    g.add_argument("--color-jitter", type=float, default=0.4)
    g.add_argument("--train-interpolation", default="random")
    g.add_argument("--model-ema", action="store_true", default=False)
    g.add_argument("--model-ema-decay", type=float, default=0.9998)
    g.add_argument("--model-ema-warmup", action="store_true", default=False)
    g = p.add_argument_group("distillation")
    g.add_argument("--kd-model-name", default=None, help="teacher (timm name); none = plain training")
    g.add_argument("--kd-model-kwargs", nargs="*", default=[], metavar="K=V")
    g.add_argument("--kd-checkpoint", default=None,
                   help="teacher weights file (.safetensors/.pth, weights only) or exported folder with config.json")
    g.add_argument("--kd-no-pretrained", dest="kd_pretrained", action="store_false", default=True,
                   help="do not load the teacher's timm pretrained weights")
    g.add_argument("--kd-temperature", type=float, default=1.0, help="tau (paper: 1; timm train.py default: 4)")
    g.add_argument("--distill-loss-weight", type=float, default=0.0, help="a, the soft-KD weight (paper: 0.9)")
    g.add_argument("--task-loss-weight", type=float, default=None, help="CE weight (default 1 - a)")
    g.add_argument("--feat-loss", default="none", choices=FEATURE_LOSSES)
    g.add_argument("--feat-weight", type=float, default=0.2, help="l_feat")
    g.add_argument("--distillation-type", default="soft", choices=["soft", "hard"],
                   help="soft: KL to the teacher's softened logits; hard: CE to the teacher's argmax")
    g.add_argument("--kd-layer", nargs="+", default=None, type=layer_spec,
                   help="teacher taps (block indices or module names, paired with --student-layer; "
                        "default: endpoint)")
    g.add_argument("--student-layer", nargs="+", default=None, type=layer_spec,
                   help="student taps (default: Lift/WideLast endpoint); several = loss averaged over pairs")
    g.add_argument("--kd-weights-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="hold the frozen teacher's weights in this dtype (bfloat16: no per-op casts under bf16)")
    g.add_argument("--width-align", default="auto", choices=WIDTH_ALIGN_MODES)
    g = p.add_argument_group("output / checkpoints / logging")
    g.add_argument("--output", default="output/train")
    g.add_argument("--experiment", default="", help="run folder name (default: the model name)")
    g.add_argument("--resume", default="", help="'auto' (latest checkpoint of this run, if any) or a checkpoint path")
    g.add_argument("--checkpoint-every-steps", type=int, default=0, help="also save every N optimizer updates")
    g.add_argument("--checkpoint-keep", type=int, default=2, help="keep the last K checkpoints")
    g.add_argument("--log-with", nargs="*", default=[], help="accelerate trackers: tensorboard, wandb, ...")
    g.add_argument("--log-wandb", action="store_true", default=False, help="same as --log-with wandb")
    g.add_argument("--log-interval", type=int, default=50)
    g.add_argument("--no-progress", dest="progress", action="store_false", default=True)
    g.add_argument("--progress-position", type=int, default=0, help=argparse.SUPPRESS)  # row, for parallel runs
    g.add_argument("--stop-after-updates", type=int, default=0,
                   help="testing aid: stop as if killed after N updates (no final save/export)")
    return p


def parse_args(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> argparse.Namespace:
    """Parse ``argv`` with YAML defaults from ``-c`` (command line wins), like timm's train.py."""
    parser = build_parser(prog)
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument("-c", "--config", default="")
    known, _ = config_parser.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**load_config(known.config, parser))
    return parser.parse_args(argv)


CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def packaged_configs() -> List[str]:
    """Names of the recipes shipped inside the package (``-c NAME`` finds them)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config(name_or_path: str) -> Path:
    """A YAML path, or the name of a packaged recipe (``widelast_softkd_mse``, with or without ``.yaml``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    packaged = CONFIG_DIR / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    if path.parent == Path(".") and packaged.is_file():
        return packaged
    raise UserError(f"config not found: {name_or_path}; fix: give a YAML path or one of the packaged recipes: "
                    f"{', '.join(packaged_configs())}")


def load_config(path: str, parser: argparse.ArgumentParser) -> Dict[str, Any]:
    """Read a YAML config (path or packaged recipe name); unknown keys are an error (a typo would pass silently)."""
    path = resolve_config(path)
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        raise UserError(f"{path} must hold a mapping of argument names to values")
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise UserError(f"{path}: unknown keys {unknown} (keys are argument dest names, e.g. batch_size)")
    return cfg


def as_namespace(args: Union[argparse.Namespace, Dict[str, Any]]) -> argparse.Namespace:
    """Accept a Namespace or a dict of dest names (missing ones take the parser defaults)."""
    if isinstance(args, argparse.Namespace):
        return args
    parser = build_parser()
    base = vars(parser.parse_args([]))
    if args.get("config"):
        base.update(load_config(args["config"], parser))
    unknown = sorted(set(args) - set(base))
    if unknown:
        raise UserError(f"unknown training arguments {unknown}")
    base.update(args)
    return argparse.Namespace(**base)


def validate_args(args: argparse.Namespace) -> None:
    """Check what can be checked before any heavy work; one clear message per problem."""
    if not timm.is_model(args.model):
        raise UserError(f"unknown model {args.model!r} (see timm.list_models())")
    if args.kd_model_name and not timm.is_model(args.kd_model_name):
        raise UserError(f"unknown teacher model {args.kd_model_name!r} (see timm.list_models())")
    a = args.distill_loss_weight
    check_weights(1.0 - a if args.task_loss_weight is None else args.task_loss_weight, a, args.feat_weight)
    teacher_needed = a > 0 or (args.feat_loss != "none" and args.feat_weight > 0)
    if teacher_needed and not (args.kd_model_name or args.kd_checkpoint):
        raise UserError("soft KD (--distill-loss-weight > 0) or --feat-loss needs a teacher: pass --kd-model-name")
    if args.batch_size < 1 or args.grad_accum_steps < 1 or args.epochs < 1:
        raise UserError("--batch-size, --grad-accum-steps and --epochs must be >= 1")
    if not args.dataset or args.dataset.lower() in ("folder", "imagefolder"):
        if not args.data_dir:
            raise UserError("no data: pass --data-dir (an ImageFolder root with train/ and validation/ or val/)")
        root = Path(args.data_dir)
        if not root.is_dir():
            raise UserError(f"data dir not found: {root}")
        if not any(root.iterdir()):
            raise UserError(f"data dir is empty: {root}")


# ---------------------------------------------------------------------------------------------------
# Pieces of the loop
# ---------------------------------------------------------------------------------------------------
def mixed_precision_of(args: argparse.Namespace) -> str:
    if args.mixed_precision:
        return args.mixed_precision
    return ({"float16": "fp16", "bfloat16": "bf16"}[args.amp_dtype]) if args.amp else "no"


def resolve_trackers(args: argparse.Namespace) -> List[str]:
    """Requested trackers, refusing missing packages (Accelerate would only warn and log nothing)."""
    trackers = list(args.log_with or []) + (["wandb"] if args.log_wandb else [])
    for name in trackers:
        if name not in TRACKER_PACKAGES:
            raise UserError(f"unknown tracker {name!r}; choose from {', '.join(TRACKER_PACKAGES)}")
        if not any(importlib.util.find_spec(pkg) for pkg in TRACKER_PACKAGES[name]):
            raise UserError(f"tracker {name!r} requested but its package is not installed "
                            f"(pip install {TRACKER_PACKAGES[name][0]})")
    return sorted(set(trackers))


def check_output_dir(run_dir: Path) -> None:
    """Refuse an output path that cannot hold a run folder, before any work is done or anything written."""
    path = run_dir
    while not path.exists() and path != path.parent:
        path = path.parent
    if not path.is_dir():
        raise UserError(f"--output: {path} is a file, not a folder; fix: pass a folder path to --output")
    if not os.access(path, os.W_OK):
        raise UserError(f"--output: cannot write into {path} (read-only filesystem or no permission); "
                        f"fix: pass a writable folder to --output")


def disk_nearly_full(path: Union[str, Path], margin: int = 64 << 20) -> bool:
    """Whether the filesystem holding ``path`` (or its nearest existing parent) has less than ``margin`` free."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free < margin


def write_error(err: OSError, output: Union[str, Path]) -> Exception:
    """Turn an OS error while writing outputs into one clear UserError line (other errors pass unchanged)."""
    where = err.filename or output
    if err.errno == errno.ENOSPC:
        return UserError(f"no space left on the device writing {where}; free some space, or pass another "
                         f"--output, then --resume auto (the last complete checkpoint is kept)")
    if not Path(os.path.abspath(str(where))).is_relative_to(Path(output).absolute()):
        return err  # e.g. an unreadable image: not a problem with --output
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return UserError(f"cannot write {where} ({os.strerror(err.errno)}); fix: pass a writable folder to --output")
    if err.errno in (errno.ENOTDIR, errno.EEXIST) and where:
        return UserError(f"cannot create the run folder at {where}: a file is in the way; fix: pass a folder "
                         f"path to --output")
    return err


def warn_if_fewer_processes(accelerator) -> None:
    """Say so when a launcher asked for several processes but this run has fewer.

    ``accelerate launch --cpu --num_processes 2`` starts one process (it sets MASTER_PORT but no
    WORLD_SIZE), and ``--multi_gpu`` without ``ACCELERATE_USE_CPU=1`` on a CPU box starts processes
    that do not know each other (WORLD_SIZE=2, each one a world of 1).
    """
    world = os.environ.get("WORLD_SIZE")
    launched_by_accelerate = "ACCELERATE_DYNAMO_BACKEND" in os.environ or "ACCELERATE_MIXED_PRECISION" in os.environ
    asked = int(world) if world and world.isdigit() else None
    if asked is None and launched_by_accelerate and "MASTER_PORT" in os.environ:
        asked = 2  # several were asked for (MASTER_PORT is set only then); the exact count is not passed on
    if asked is not None and asked > accelerator.num_processes and accelerator.is_local_main_process:
        print(f"warning: the launcher asked for {'several' if world is None else asked} processes but this run has "
              f"{accelerator.num_processes}; on a CPU use `torchrun --nproc_per_node N` or "
              f"`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N` "
              f"(`accelerate launch --cpu --num_processes N` starts one process)", file=sys.stderr)


def resolve_lr(args: argparse.Namespace, num_processes: int) -> float:
    """timm train.py's rule: ``--lr`` when given, else ``--lr-base`` scaled by the global batch.

    Global batch = batch per process x processes x grad-accum steps; the ratio to ``--lr-base-size`` is
    used as is (``linear``) or square-rooted (``sqrt``; timm's default for ada*/lamb optimizers).
    The release: 5e-4 x global batch / 512, i.e. ``lr_base_scale: linear`` in the packaged configs.
    """
    if args.lr:
        return args.lr
    global_batch = args.batch_size * num_processes * args.grad_accum_steps
    ratio = global_batch / args.lr_base_size
    scale = args.lr_base_scale or ("sqrt" if any(o in args.opt.lower() for o in ("ada", "lamb")) else "linear")
    return args.lr_base * (ratio ** 0.5 if scale == "sqrt" else ratio)


def create_schedule(args: argparse.Namespace, optimizer, updates_per_epoch: int):
    """timm scheduler stepped per epoch (default) or per optimizer update (``--sched-on-updates``)."""
    from timm.scheduler import create_scheduler_v2
    return create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
        warmup_lr=args.warmup_lr, min_lr=args.min_lr, cooldown_epochs=args.cooldown_epochs,
        decay_epochs=args.decay_epochs, decay_rate=args.decay_rate, step_on_epochs=not args.sched_on_updates,
        updates_per_epoch=updates_per_epoch)


def step_schedule_at_epoch_end(scheduler, epoch: int) -> None:
    """After epoch ``epoch`` (0-based): ``scheduler.step(epoch)``, as DeiT and the authors' release do.

    So epoch e > 0 trains at the schedule's value for e - 1, and epochs 0 and 1 both at ``--warmup-lr``
    (timm's train.py calls ``step(epoch + 1)``, one epoch ahead). Per-update schedules ignore this call.
    """
    if scheduler is not None:
        scheduler.step(epoch)


def create_teacher_same_on_every_rank(args: argparse.Namespace) -> torch.nn.Module:
    """The teacher model, created under one seed shared by all ranks.

    Pretrained or checkpoint weights overwrite the init anyway; a randomly initialised teacher
    (``--kd-no-pretrained`` without ``--kd-checkpoint``) would otherwise differ per rank, since the
    global RNG is seeded per rank for augmentation. The global RNG is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        return create_teacher_model(args.kd_model_name, parse_kwargs(args.kd_model_kwargs), args.kd_checkpoint,
                                    pretrained=args.kd_pretrained)


# settings that shape the checkpointed state: changing them makes a resume fail or mean something else
RESUME_SETTINGS = ("model", "model_kwargs", "num_classes", "img_size", "input_size", "model_ema", "opt", "sched",
                   "sched_on_updates", "kd_model_name", "kd_model_kwargs", "feat_loss", "width_align",
                   "student_layer", "kd_layer", "distillation_type")


def load_run_args(run_dir: Path) -> Optional[Dict[str, Any]]:
    """The ``args.yaml`` a run folder was started with (None when it has none)."""
    path = run_dir / "args.yaml"
    if not path.is_file():
        return None
    saved = yaml.safe_load(path.read_text())
    return saved if isinstance(saved, dict) else None


def check_resume_compatible(saved_args: Optional[Dict[str, Any]], args: argparse.Namespace) -> None:
    """Refuse a resume whose state-shaping settings differ from the run's ``args.yaml``; name each one."""
    if not saved_args:
        return

    def norm(key: str, value: Any) -> Any:
        if key.endswith("model_kwargs"):
            return parse_kwargs(value or [])
        if key.endswith("_layer"):  # 9, "9" and [9] are the same tap
            value = single_or_list(value)
            value = [layer_spec(str(v)) for v in value] if isinstance(value, list) else (
                None if value is None else layer_spec(str(value)))
        return yaml.safe_load(yaml.safe_dump(value))  # tuples -> lists, as the file holds them

    changed = [f"--{k.replace('_', '-')} {norm(k, saved_args[k])!r} -> {norm(k, getattr(args, k))!r}"
               for k in RESUME_SETTINGS
               if k in saved_args and hasattr(args, k) and norm(k, saved_args[k]) != norm(k, getattr(args, k))]
    if changed:
        raise UserError(f"cannot resume: settings differ from the run's args.yaml: {'; '.join(changed)}; "
                        f"fix: resume with the run's settings, or start a new run (--experiment NAME)")


def write_run_args(run_dir: Path, args: argparse.Namespace) -> None:
    """``args.yaml``, atomically, once every check has passed (a rejected command leaves the run untouched)."""
    atomic_write(run_dir / "args.yaml", yaml.safe_dump(vars(args), sort_keys=False))


def count_params(module: Optional[torch.nn.Module]) -> str:
    if module is None:
        return "none"
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:.2f}M"


def write_summary_plot(path: Path, rows: List[Dict[str, Any]]) -> None:
    """``summary.png``: losses and top-1/top-5 per epoch (matplotlib's Agg, no display; written atomically)."""
    if not rows:
        return
    from matplotlib.figure import Figure
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    epochs = [r["epoch"] for r in rows]

    def column(key: str) -> List[float]:  # a value a row lacks is a gap in the curve
        return [float(v) if isinstance(v, (int, float)) else math.nan for v in (r.get(key) for r in rows)]

    for key in ("train_loss", "task_loss", "kd_loss", "feat_loss", "eval_loss"):
        values = column(key)
        if any(v != 0 and not math.isnan(v) for v in values):  # a loss term that is off stays out
            ax_loss.plot(epochs, values, marker="o", markersize=3, label=key)
    for key in ("eval_top1", "eval_top5", "ema_top1", "ema_top5"):
        values = column(key)
        if not all(math.isnan(v) for v in values):
            ax_acc.plot(epochs, values, marker="o", markersize=3, label=key)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="%", title="accuracy")
    for ax in (ax_loss, ax_acc):
        if ax.lines:
            ax.legend(fontsize="small", loc="best", framealpha=0.6)
        ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write(path, buf.getvalue())


class RunningLosses:
    """The epoch's loss sums, kept on the device, and a device-side record of the first non-finite loss.

    ``add`` never waits for the device; ``read`` is the one host transfer (all ranks take part) and is
    called at log intervals, checkpoints, evaluation and export, so a non-finite state is caught before
    anything is written from it.
    """

    keys = ("loss", "task_loss", "kd_loss", "feat_loss")

    def __init__(self, accelerator, batches_per_epoch: int) -> None:
        self.accelerator, self.batches_per_epoch = accelerator, batches_per_epoch
        device = accelerator.device
        self.dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)  # epoch * batches + batch
        self.bad_value = torch.zeros((), dtype=torch.float32, device=device)
        self.start_epoch(None)

    def start_epoch(self, partial: Optional[Dict[str, float]]) -> None:
        """Zero the sums, or restore a checkpoint's (mid-epoch resume)."""
        partial = partial or {}
        self.sums = torch.tensor([float(partial.get(k, 0.0)) for k in self.keys], dtype=self.dtype,
                                 device=self.accelerator.device)
        self.batches = int(partial.get("batches", 0))

    def add(self, out: Dict[str, torch.Tensor], epoch: int, batch: int) -> None:
        values = torch.stack([out[k].detach().float() for k in self.keys])
        self.sums += values.to(self.dtype)
        self.batches += 1
        newly_bad = (self.first_bad < 0) & ~torch.isfinite(values).all()
        self.first_bad = torch.where(newly_bad, epoch * self.batches_per_epoch + batch, self.first_bad)
        self.bad_value = torch.where(newly_bad, values[0], self.bad_value)

    def _reduced(self, weights_of: Optional[torch.nn.Module] = None) -> List[float]:
        """[sums averaged over ranks..., ranks with a bad loss, ranks with bad weights]: one transfer."""
        flags = [(self.first_bad >= 0).to(self.dtype)]
        if weights_of is not None:
            finite = torch.stack([torch.isfinite(p.detach()).all() for p in weights_of.parameters()]).all()
            flags.append((~finite).to(self.dtype))
        packed = torch.cat([self.sums, torch.stack(flags)])
        values = self.accelerator.reduce(packed, "sum").tolist()
        n = len(self.keys)
        return [v / self.accelerator.num_processes for v in values[:n]] + values[n:]

    def read(self, weights_of: Optional[torch.nn.Module] = None) -> Tuple[Dict[str, float], str]:
        """Mean losses so far this epoch, and '' or what is non-finite (loss first, then ``weights_of``)."""
        values = self._reduced(weights_of)
        n = len(self.keys)
        means = {k: v / max(self.batches, 1) for k, v in zip(self.keys, values[:n])}
        bad = ""
        if values[n] > 0:
            step = int(self.first_bad.item())
            if step >= 0:
                epoch, batch = divmod(step, self.batches_per_epoch)
                bad = f"non-finite loss ({self.bad_value.item()}) at epoch {epoch}, batch {batch}"
            else:
                bad = "non-finite loss on another process"
        elif len(values) > n + 1 and values[n + 1] > 0:
            bad = "non-finite weights"
        return means, bad

    def partial(self) -> Dict[str, float]:
        """The sums so far (averaged over ranks) for a mid-epoch checkpoint."""
        values = self._reduced()
        return {**dict(zip(self.keys, values[:len(self.keys)])), "batches": self.batches}


class TimedIterable:
    """Iterates ``iterable`` and adds up the seconds spent waiting for each item (the loader's share)."""

    def __init__(self, iterable) -> None:
        self.iterable, self.wait = iterable, 0.0

    def __iter__(self):
        items = iter(self.iterable)
        while True:
            start = time.perf_counter()
            try:
                item = next(items)
            except StopIteration:
                return
            self.wait += time.perf_counter() - start
            yield item


def create_student(args: argparse.Namespace, num_classes: int) -> torch.nn.Module:
    kwargs = parse_kwargs(args.model_kwargs)
    if args.img_size is not None:
        kwargs.setdefault("img_size", args.img_size)
    if args.drop_path is not None:
        kwargs.setdefault("drop_path_rate", args.drop_path)
    try:
        return timm.create_model(args.model, pretrained=args.pretrained, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError) as err:
        raise UserError(f"bad --model-kwargs for {args.model}: {err}") from err


def export_student(accelerator, trainable, path: Path, model: Optional[torch.nn.Module] = None,
                   data_config: Optional[dict] = None) -> None:
    """Student weights only (no projector/teacher) as ``model.safetensors`` + timm ``config.json``."""
    # get_state_dict gathers FSDP shards, so every rank takes part
    state = accelerator.get_state_dict(trainable) if model is None else model.state_dict()
    if not accelerator.is_main_process:
        return
    student = accelerator.unwrap_model(trainable).student
    if model is None:
        state = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
    path.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save
    from timm.models._hub import save_config_for_hf
    # both files are written beside and renamed over, so a kill never leaves a half-written export
    # the process count makes the card's global batch (per-process batch x processes x accumulation) true
    atomic_write(path / "model.safetensors", save({k: v.detach().cpu().contiguous() for k, v in state.items()},
                                                  metadata={"format": "pt",
                                                            "num_processes": str(accelerator.num_processes)}))
    tmp = path / ".config.json.tmp"
    # the architecture's default tag names the authors' release: a run's weights are named after the run
    run_name = f"{path.parent.name}_{path.name}" if path.name in ("best", "ema") else path.name
    save_config_for_hf(student, tmp, model_config={"pretrained_cfg": {"tag": run_name}}, data_config=data_config)
    os.replace(tmp, path / "config.json")


def write_summary(path: Path, rows: List[Dict[str, Any]]) -> None:
    """timm-style summary.csv, rewritten whole each epoch (so a resumed run's file is complete)."""
    if not rows:
        return
    columns = list(dict.fromkeys(k for row in rows for k in row))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, text.getvalue())


@torch.no_grad()
def evaluate(accelerator, model_fn, loader) -> Dict[str, float]:
    """Top-1/top-5 over the whole validation set (``gather_for_metrics`` drops the padding duplicates)."""
    correct1 = correct5 = total = 0
    loss_sum = 0.0
    for x, y in loader:
        with accelerator.autocast():
            logits = model_fn(x)
        logits, y = accelerator.gather_for_metrics((logits.float(), y))
        loss_sum += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        hits = top.eq(y[:, None])
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=-1).sum().item()
        total += y.numel()
    total = max(total, 1)
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total, "loss": loss_sum / total}


# ---------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------
@dataclass
class RunData:
    """The datasets, loaders and batch transforms of a run (the loaders become their prepared versions)."""

    val_set: Any
    loaders: Any  # build_loaders' result: the seeded train_set, device_transform and eval_wrap
    train_loader: Any
    val_loader: Any
    mixup_fn: Optional[Callable]
    data_config: Dict[str, Any]
    num_classes: int

    @property
    def train_set(self):
        """The seeded training dataset (call ``set_epoch(epoch)`` before each epoch)."""
        return self.loaders.train_set


@dataclass
class Run:
    """The pieces a run is built from before its first epoch."""

    args: argparse.Namespace
    accelerator: Any
    run_dir: Path
    trackers: List[str]
    data: RunData
    task: EndpointDistillationTask
    trainable: torch.nn.Module  # task.trainable_module as prepared (DDP/FSDP-wrapped)
    optimizer: Any
    scheduler: Any
    ema: Any
    num_epochs: int
    # losses are summed on the device and read only at log, checkpoint and epoch end (no per-step sync)
    losses: RunningLosses

    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / CHECKPOINT_DIR


@dataclass
class RunState:
    """Where the run stands (the next batch to train) and what it has recorded: a checkpoint's meta."""

    epoch: int = 0
    batch: int = 0  # > 0: mid-epoch, with the epoch's loss sums so far in ``partial``
    num_updates: int = 0
    history: List[Dict[str, Any]] = field(default_factory=list)  # summary.csv rows
    best: Dict[str, Any] = field(default_factory=lambda: {"top1": -1.0, "epoch": -1})
    partial: Dict[str, float] = field(default_factory=dict)


def train(args: Union[argparse.Namespace, Dict[str, Any]]) -> Dict[str, Any]:
    """Train and return a summary dict (best/final top-1, history rows, output paths).

    Raises :class:`UserError` for bad input (also a full disk or an unwritable output folder) and
    :class:`NonFiniteLossError` when the loss diverges.
    """
    args = as_namespace(args)
    try:
        return _train(args)
    except OSError as err:
        raise write_error(err, args.output) from err
    except RuntimeError as err:
        # torch.save reports a full disk as a RuntimeError ("file write failed")
        if "file write failed" in str(err) and disk_nearly_full(args.output):
            raise UserError(f"no space left on the disk holding {args.output}; free some space, or pass "
                            f"another --output, then --resume auto (the last complete checkpoint is kept)") from err
        raise


def _train(args: argparse.Namespace) -> Dict[str, Any]:
    """The run, top to bottom: checks -> accelerator -> data -> task -> optimizer -> prepare -> resume -> epochs."""
    validate_args(args)
    trackers = resolve_trackers(args)
    run_dir = Path(args.output) / (args.experiment or args.model)
    check_output_dir(run_dir)
    accelerator = setup_accelerator(args, run_dir, trackers)
    # nothing is written into the run folder until every check below has passed (see start_run)
    student, data = build_data(args, accelerator)
    task = build_task(args, accelerator, student, data)
    optimizer, ema = build_optimization(args, accelerator, task)
    run = prepare_run(args, accelerator, run_dir, trackers, data, task, optimizer, ema)
    state = resume_state(run)
    start_run(run)
    while state.epoch < run.num_epochs:
        trained = train_one_epoch(run, state)
        if trained is None:  # --stop-after-updates: as if killed here (no final save or export)
            accelerator.end_training()
            return {"stopped": True, "num_updates": state.num_updates, "output_dir": str(run_dir)}
        end_epoch(run, state, *trained)
        state.epoch, state.batch, state.partial = state.epoch + 1, 0, {}  # resume at the next epoch's start
        save_run_checkpoint(run, state)
    return finish(run, state)


def setup_accelerator(args: argparse.Namespace, run_dir: Path, trackers: List[str]):
    """The Accelerator (devices, precision, accumulation, DDP/FSDP all come from here), with every rank seeded."""
    from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration, set_seed

    # train() may run several times in one process (the demo, notebooks); Accelerate keeps its precision
    # setting in a singleton, so drop it (keeping the process group) before each run's Accelerator.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        cpu=args.cpu or not torch.cuda.is_available(),  # torchrun on a CPU box needs cpu=True (gloo)
        mixed_precision=mixed_precision_of(args),
        gradient_accumulation_steps=args.grad_accum_steps,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        # a seeded sampler makes each epoch's order a function of (seed, epoch): resumable mid-epoch
        # non_blocking: batches from pinned memory reach the GPU without a host sync per step
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed, non_blocking=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=args.find_unused_parameters)],
    )
    set_seed(args.seed, device_specific=True)  # augmentation differs per rank; DDP syncs the initial weights
    warn_if_fewer_processes(accelerator)
    return accelerator


def build_data(args: argparse.Namespace, accelerator) -> Tuple[torch.nn.Module, RunData]:
    """The student and the data: the student comes first, as its pretrained config sets the data config."""
    from timm.data import Mixup, resolve_data_config

    train_set, val_set = create_datasets(args)
    num_classes = args.num_classes or count_classes(train_set)
    if not num_classes:
        raise UserError("cannot infer the number of classes from the dataset; pass --num-classes")
    student = create_student(args, num_classes)
    data_config = resolve_data_config(vars(args), model=student)
    model_hw = getattr(getattr(student, "patch_embed", None), "img_size", None)
    if args.img_size is None and args.input_size is None and model_hw is not None:
        # an img_size given through --model-kwargs is not in the model's pretrained cfg; the model knows it
        data_config["input_size"] = (3, *model_hw)
    # on CUDA the workers hand over uint8 and loaders.device_transform normalises/erases on the GPU
    loaders = build_loaders(args, train_set, val_set, data_config, accelerator.device,
                            rank=accelerator.process_index, num_processes=accelerator.num_processes)
    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                         switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=num_classes)
    return student, RunData(val_set, loaders, loaders.train, loaders.val, mixup_fn,
                            data_config, num_classes)


def build_task(args: argparse.Namespace, accelerator, student: torch.nn.Module,
               data: RunData) -> EndpointDistillationTask:
    """The frozen teacher (when a loss needs one) and the task that holds student, projector and losses.

    The teacher is never prepared (it has no gradients for DDP/FSDP to sync) and never checkpointed
    (checkpoints.py saves the prepared trainable module: student and projector).
    """
    from timm.loss import create_classification_loss

    a = args.distill_loss_weight
    feat_on = args.feat_loss != "none" and args.feat_weight > 0
    teacher = None
    if a > 0 or feat_on:
        teacher = FrozenTeacher(create_teacher_same_on_every_rank(args), single_or_list(args.kd_layer),
                                data.data_config["mean"], data.data_config["std"], need_logits=a > 0,
                                need_tokens=feat_on)
    task = EndpointDistillationTask(
        student, teacher, criterion=create_classification_loss(smoothing=args.smoothing,
                                                               soft_targets=data.mixup_fn is not None),
        distill_loss_weight=a, task_loss_weight=args.task_loss_weight, temperature=args.kd_temperature,
        distillation_type=args.distillation_type,
        feat_loss=args.feat_loss if feat_on else "none", feat_weight=args.feat_weight,
        student_layer=single_or_list(args.student_layer), teacher_layer=single_or_list(args.kd_layer),
        width_align=args.width_align, probe_size=data.data_config["input_size"][-2:])
    if task.teacher is not None:
        task.teacher.to(accelerator.device)
        if args.kd_weights_dtype != "float32":
            task.teacher.hold_weights_in(getattr(torch, args.kd_weights_dtype))
    if args.torchcompile:
        task.compile(backend=args.torchcompile, mode=args.torchcompile_mode)
    return task


def build_optimization(args: argparse.Namespace, accelerator, task: EndpointDistillationTask):
    """The optimizer over the trainable module (student and projector) and the student's EMA (or None)."""
    from timm.optim import create_optimizer_v2

    args.lr = resolve_lr(args, accelerator.num_processes)  # recorded in args.yaml, as timm's train.py does
    opt_kwargs = {}
    if args.opt_eps is not None:
        opt_kwargs["eps"] = args.opt_eps
    if args.opt_betas is not None:
        opt_kwargs["betas"] = tuple(args.opt_betas)
    optimizer = create_optimizer_v2(task.trainable_module, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum, **opt_kwargs)
    # the EMA copies the plain student: an FSDP-wrapped one cannot be deep-copied (see ema.py)
    ema = create_student_ema(task.student, args.model_ema_decay, args.model_ema_warmup) if args.model_ema else None
    return optimizer, ema


def prepare_run(args: argparse.Namespace, accelerator, run_dir: Path, trackers: List[str], data: RunData,
                task: EndpointDistillationTask, optimizer, ema) -> Run:
    """Accelerate's prepare (DDP/FSDP wrapping, loader sharding), then the schedule (per epoch unless
    ``--sched-on-updates``), which needs the prepared loader's length."""
    from accelerate.data_loader import prepare_data_loader

    check_fsdp_setup(accelerator, task.trainable_module)
    trainable, optimizer, train_loader = accelerator.prepare(task.trainable_module, optimizer, data.train_loader)
    if data.loaders.shards_by_rank:  # RepeatAugSampler shards by rank: Accelerate must not shard again
        train_loader = prepare_data_loader(train_loader, accelerator.device, num_processes=1, process_index=0,
                                           put_on_device=True, non_blocking=True)
    data.train_loader = train_loader
    if data.val_loader is not None:
        data.val_loader = data.loaders.eval_wrap(accelerator.prepare(data.val_loader))
    task.trainable_module = trainable
    updates_per_epoch = math.ceil(len(train_loader) / args.grad_accum_steps)
    if updates_per_epoch == 0:
        raise UserError(f"the training set is smaller than one batch ({len(data.train_set)} images, "
                        f"-b {args.batch_size})")
    scheduler, num_epochs = create_schedule(args, optimizer, updates_per_epoch)
    if ema is not None:
        # start from the prepared weights: DDP broadcast rank 0's, FSDP keeps each rank's shards
        sync_ema(ema, accelerator, trainable)
        task.trainable_module_ema = ema
    return Run(args, accelerator, run_dir, trackers, data, task, trainable, optimizer, scheduler, ema, num_epochs,
               RunningLosses(accelerator, batches_per_epoch=len(train_loader)))


def resume_state(run: Run) -> RunState:
    """A fresh state, or the one a checkpoint kept (``--resume``), with the weights, optimizer, etc. restored."""
    args, accelerator = run.args, run.accelerator
    resume_from = find_resume_checkpoint(args.resume, run.run_dir)
    if resume_from is None:
        return RunState()
    check_resume_compatible(load_run_args(resume_from.parent.parent), args)  # RUN/checkpoints/ckpt_*
    # model, optimizer, scheduler, EMA, scaler, RNG states; safetensors and JSON only (never unpickled)
    meta = load_checkpoint(accelerator, resume_from, run.trainable, run.optimizer, run.scheduler, run.ema)
    state = RunState(epoch=meta["epoch"], batch=meta["batch"], num_updates=meta["num_updates"],
                     history=meta["history"], best=meta["best"], partial=meta.get("partial", {}))
    accelerator.print(f"resumed from {resume_from} at epoch {state.epoch}, batch {state.batch}")
    return state


def start_run(run: Run) -> None:
    """Write ``args.yaml``, say what the run is, and start the trackers."""
    args, accelerator, task, data = run.args, run.accelerator, run.task, run.data
    # every check has passed: only now does the run folder get written
    if accelerator.is_main_process:
        write_run_args(run.run_dir, args)
    accelerator.print(
        f"start: {accelerator.num_processes} process(es), global batch "
        f"{args.batch_size * accelerator.num_processes * args.grad_accum_steps} ({args.batch_size}/process x "
        f"{accelerator.num_processes} x {args.grad_accum_steps} accumulation), lr {args.lr:.3g}, "
        f"student {count_params(task.student)} params, teacher "
        f"{count_params(task.teacher.model if task.teacher is not None else None)} params, train "
        f"{len(data.train_set)} images, validation {len(data.val_set) if data.val_set is not None else 0} images, "
        f"output {run.run_dir}")
    if run.trackers:
        accelerator.init_trackers(args.experiment or args.model,
                                  config={k: v for k, v in vars(args).items()
                                          if isinstance(v, (int, float, str, bool))})


def save_run_checkpoint(run: Run, state: RunState) -> Path:
    """A checkpoint that resumes at ``state``'s position (all ranks call it)."""
    return save_checkpoint(run.accelerator, run.ckpt_root, dict(vars(state)), run.args.checkpoint_keep, run.trainable,
                           run.optimizer, run.scheduler, run.ema)


def ensure_finite(run: Run, state: RunState, before: str, weights: bool = False) -> Dict[str, float]:
    """Losses so far (means over ranks); raises when any loss (or, with ``weights``, weight) is non-finite."""
    means, bad = run.losses.read(run.trainable if weights else None)
    if bad:
        found = list_checkpoints(run.ckpt_root)
        last_good = str(found[-1]) if found else "none"
        raise NonFiniteLossError(f"{bad} (after {state.num_updates} updates); stopped before {before}, "
                                 f"last good checkpoint: {last_good}")
    return means


def train_one_epoch(run: Run, state: RunState) -> Optional[Tuple[Dict[str, float], Dict[str, float]]]:
    """Train from ``state``'s position to the end of its epoch.

    Returns the epoch's mean losses and its speed, or None when ``--stop-after-updates`` stopped the run.
    """
    from accelerate.utils import tqdm

    args, accelerator, data, task, trainable = run.args, run.accelerator, run.data, run.task, run.trainable
    epoch, first_batch = state.epoch, state.batch
    task.train()
    data.train_set.set_epoch(epoch)
    data.train_loader.set_epoch(epoch)
    loader = data.train_loader
    run.losses.start_epoch(state.partial if first_batch else None)
    if first_batch:
        loader = accelerator.skip_first_batches(data.train_loader, first_batch)
        # a fresh loader counts its own epochs from 0 and would replay epoch 0's order: set it explicitly
        loader.set_epoch(epoch)
    # a bar redrawn with \r fills a log file: bars only on a terminal, progress lines otherwise
    show_bar = args.progress and sys.stderr.isatty()
    bar = tqdm(loader, main_process_only=True, disable=not show_bar,
               desc=f"{args.experiment or args.model} epoch {epoch}", initial=first_batch,
               total=len(data.train_loader), position=args.progress_position, leave=args.progress_position == 0)
    timed = TimedIterable(bar)  # seconds spent waiting for the loader
    epoch_start = log_start = time.perf_counter()
    log_batch, batch_idx = first_batch, first_batch - 1
    for batch_idx, (x, y) in enumerate(timed, start=first_batch):
        x = data.loaders.device_transform(x, epoch, batch_idx)  # CUDA: uint8 -> normalised (+ erased); CPU: as is
        if data.mixup_fn is not None:
            x, y = data.mixup_fn(x, y)
        with accelerator.accumulate(trainable):
            with accelerator.autocast():  # covers the (unprepared) teacher forward too
                out = task(x, y)
            run.losses.add(out, epoch, batch_idx)  # device-side: sums and the first non-finite step
            accelerator.backward(out["loss"])
            if args.clip_grad and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(trainable.parameters(), args.clip_grad)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:
            continue
        state.num_updates += 1
        if run.scheduler is not None:
            run.scheduler.step_update(num_updates=state.num_updates)  # a per-epoch schedule ignores this
        if run.ema is not None:
            update_ema(run.ema, accelerator, trainable, state.num_updates)
        if state.num_updates % max(args.log_interval, 1) == 0:
            means = ensure_finite(run, state, "logging")  # the interval's one host transfer
            now = time.perf_counter()
            rate = (batch_idx + 1 - log_batch) * args.batch_size * accelerator.num_processes / (now - log_start)
            log_start, log_batch = now, batch_idx + 1
            log_progress(run, state, batch_idx, means, rate, bar if show_bar else None)
        if args.checkpoint_every_steps and state.num_updates % args.checkpoint_every_steps == 0:
            ensure_finite(run, state, "a checkpoint", weights=True)
            state.batch, state.partial = batch_idx + 1, run.losses.partial()
            save_run_checkpoint(run, state)
        if args.stop_after_updates and state.num_updates >= args.stop_after_updates:
            accelerator.print(f"stopping after {state.num_updates} updates (--stop-after-updates)")
            return None
    means = ensure_finite(run, state, "evaluation", weights=True)  # also waits for the device: the epoch's time is real
    seconds = max(time.perf_counter() - epoch_start, 1e-9)
    speed = {"img_s": (batch_idx + 1 - first_batch) * args.batch_size * accelerator.num_processes / seconds,
             "data_wait": timed.wait / seconds}
    return means, speed


def log_progress(run: Run, state: RunState, batch_idx: int, means: Dict[str, float], rate: float, bar) -> None:
    """The log interval's line (or the bar's loss, on a terminal) and tracker values."""
    lr = run.optimizer.param_groups[0]["lr"]
    if bar is not None:
        bar.set_postfix(loss=f"{means['loss']:.4f}")
    else:
        run.accelerator.print(f"epoch {state.epoch} [{batch_idx + 1}/{len(run.data.train_loader)}] update "
                              f"{state.num_updates} loss={means['loss']:.4f} lr={lr:.3g} img/s={rate:.1f}")
    if run.trackers:
        run.accelerator.log({"train/" + k: v for k, v in means.items()} | {"lr": lr}, step=state.num_updates)


def end_epoch(run: Run, state: RunState, means: Dict[str, float], speed: Dict[str, float]) -> None:
    """Step the schedule, evaluate, keep the best weights, rewrite the summary and log the epoch's row."""
    accelerator, data, epoch = run.accelerator, run.data, state.epoch
    row: Dict[str, Any] = {"epoch": epoch}
    row.update({f"train_{k}" if k == "loss" else k: v for k, v in means.items()})
    # the lr this epoch trained at (per-update schedules: its last update's), read before stepping, like timm
    lr = run.optimizer.param_groups[0]["lr"]
    step_schedule_at_epoch_end(run.scheduler, epoch)
    if data.val_loader is not None:
        run.task.eval()
        metrics = evaluate(accelerator, lambda inp: run.trainable(inp)[0], data.val_loader)
        row.update({"eval_loss": metrics["loss"], "eval_top1": metrics["top1"], "eval_top5": metrics["top5"]})
        if run.ema is not None:
            ema_metrics = evaluate(accelerator, run.ema.module, data.val_loader)
            row.update({"ema_top1": ema_metrics["top1"], "ema_top5": ema_metrics["top5"]})
    row["lr"] = lr
    state.history.append(row)
    # the raw model's best epoch is what the paper reports (EMA is kept but not used for selection)
    if row.get("eval_top1", -1.0) > state.best["top1"]:
        state.best = {"top1": row["eval_top1"], "top5": row["eval_top5"], "epoch": epoch}
        export_student(accelerator, run.trainable, run.run_dir / "best", data_config=data.data_config)
    if accelerator.is_main_process:
        write_summary(run.run_dir / "summary.csv", state.history)
        write_summary_plot(run.run_dir / "summary.png", state.history)
    if run.trackers:
        accelerator.log({k: v for k, v in row.items() if k != "epoch"} | speed, step=state.num_updates)
    # speed is printed, not kept in summary.csv: a resumed run's summary must equal an uninterrupted one's
    accelerator.print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
                      + f" img/s={speed['img_s']:.1f} data_wait={100 * speed['data_wait']:.0f}%")


def finish(run: Run, state: RunState) -> Dict[str, Any]:
    """Export the student (and its EMA), end the trackers, and return the run's summary."""
    accelerator, run_dir, best = run.accelerator, run.run_dir, state.best
    ensure_finite(run, state, "the final export", weights=True)
    export_student(accelerator, run.trainable, run_dir, data_config=run.data.data_config)
    if run.ema is not None:
        export_student(accelerator, run.trainable, run_dir / "ema", model=run.ema.module,
                       data_config=run.data.data_config)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    accelerator.print(
        f"done: student {run_dir / 'model.safetensors'}"
        + (f", best (epoch {best['epoch']}) {run_dir / 'best'}" if best["epoch"] >= 0 else "")
        + (f", EMA {run_dir / 'ema'}" if run.ema is not None else "")
        + f", summary {run_dir / 'summary.csv'} and summary.png, checkpoints {run.ckpt_root}, "
        f"settings {run_dir / 'args.yaml'}")
    last = state.history[-1] if state.history else {}
    return {"output_dir": str(run_dir), "model_path": str(run_dir / "model.safetensors"),
            "best_model_path": str(run_dir / "best" / "model.safetensors") if best["epoch"] >= 0 else None,
            "best_top1": best["top1"] if best["epoch"] >= 0 else None, "best_epoch": best["epoch"],
            "final_top1": last.get("eval_top1"), "final_top5": last.get("eval_top5"),
            "num_updates": state.num_updates, "num_classes": run.data.num_classes, "history": state.history,
            "stopped": False}


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Command-line entry: one line ``error: ...`` and exit 2 on bad input, 3 on a non-finite loss.

    ``prog`` names the command in usage lines (``timm-widelast train``; default: the script's name).
    """
    # every rank hits the same error; only rank 0 reports it, so the user sees one line
    report = os.environ.get("RANK", "0") == "0"
    try:
        train(parse_args(argv, prog))
    except UserError as err:
        if report:
            print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        if report:
            print(f"error: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # python -m timm_widelast.distill.trainer
    sys.exit(main())

