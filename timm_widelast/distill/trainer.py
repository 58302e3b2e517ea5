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
import importlib.util
import io
import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import timm
import torch
import yaml
from torch.utils.data import DataLoader

import timm_widelast  # noqa: F401  (registers our students in timm's factory)

from ..errors import UserError
from ..io import atomic_write
from ..utils import parse_kwargs
from .checkpoints import CHECKPOINT_DIR, META_FILE, find_resume_checkpoint, list_checkpoints, save_checkpoint
from .data import SeededAugDataset, count_classes, create_datasets
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
def build_parser() -> argparse.ArgumentParser:
    """timm ``train.py`` flag names where the concept exists; ours for the feature loss and checkpointing."""
    p = argparse.ArgumentParser(description="Endpoint-feature distillation (Lift/WideLast) on Accelerate",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-c", "--config", default="", metavar="FILE", help="YAML file of defaults (keys = dest names)")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default=None, help="dataset root (ImageFolder: train/ and validation|val/)")
    g.add_argument("--dataset", default="", help="timm dataset type ('' = ImageFolder/tar, 'torch/cifar10', ...)")
    g.add_argument("--train-split", default="train")
    g.add_argument("--val-split", default="validation")
    g.add_argument("--dataset-download", action="store_true", default=False)
    g.add_argument("-j", "--workers", type=int, default=4)
    g.add_argument("--pin-mem", action="store_true", default=False)
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
    g = p.add_argument_group("optimizer / schedule")
    g.add_argument("--opt", default="adamw")
    g.add_argument("--opt-eps", type=float, default=None)
    g.add_argument("--opt-betas", type=float, nargs="+", default=None)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--clip-grad", type=float, default=None)
    g.add_argument("--lr", type=float, default=5e-4)
    g.add_argument("--sched", default="cosine")
    g.add_argument("--epochs", type=int, default=300)
    g.add_argument("--warmup-epochs", type=float, default=5)
    g.add_argument("--warmup-lr", type=float, default=1e-6)
    g.add_argument("--min-lr", type=float, default=1e-5)
    g.add_argument("--cooldown-epochs", type=int, default=0)
    g.add_argument("--decay-epochs", type=float, default=90)
    g.add_argument("--decay-rate", type=float, default=0.1)
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
    g.add_argument("--kd-layer", default=None, help="teacher tap (block index or module name; default: endpoint)")
    g.add_argument("--student-layer", default=None, help="student tap (default: Lift/WideLast endpoint)")
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


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse ``argv`` with YAML defaults from ``-c`` (command line wins), like timm's train.py."""
    parser = build_parser()
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
    atomic_write(path / "model.safetensors", save({k: v.detach().cpu().contiguous() for k, v in state.items()}))
    tmp = path / ".config.json.tmp"
    save_config_for_hf(student, tmp, data_config=data_config)
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
def train(args: Union[argparse.Namespace, Dict[str, Any]]) -> Dict[str, Any]:
    """Train and return a summary dict (best/final top-1, history rows, output paths).

    Raises :class:`UserError` for bad input and :class:`NonFiniteLossError` when the loss diverges.
    """
    from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
    from accelerate.data_loader import prepare_data_loader
    from accelerate.utils import ProjectConfiguration, set_seed, tqdm
    from timm.data import Mixup, create_transform, resolve_data_config
    from timm.data.distributed_sampler import RepeatAugSampler
    from timm.loss import create_classification_loss
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    args = as_namespace(args)
    validate_args(args)
    trackers = resolve_trackers(args)
    run_dir = Path(args.output) / (args.experiment or args.model)
    ckpt_root = run_dir / CHECKPOINT_DIR

    # --- accelerator: devices, precision, accumulation, DDP/FSDP all come from here -------------------
    # train() may run several times in one process (the demo, notebooks); Accelerate keeps its precision
    # setting in a singleton, so drop it (keeping the process group) before each run's Accelerator.
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        cpu=args.cpu or not torch.cuda.is_available(),  # torchrun on a CPU box needs cpu=True (gloo)
        mixed_precision=mixed_precision_of(args),
        gradient_accumulation_steps=args.grad_accum_steps,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        # a seeded sampler makes each epoch's order a function of (seed, epoch): resumable mid-epoch
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=args.find_unused_parameters)],
    )
    set_seed(args.seed, device_specific=True)  # augmentation differs per rank; DDP syncs the initial weights
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "args.yaml", "w") as f:
            yaml.safe_dump(vars(args), f, sort_keys=False)

    # --- data -------------------------------------------------------------------------------------------
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
    train_set.transform = create_transform(
        data_config["input_size"], is_training=True, scale=tuple(args.scale), ratio=tuple(args.ratio),
        hflip=args.hflip, color_jitter=args.color_jitter, auto_augment=args.aa,
        interpolation=args.train_interpolation, mean=data_config["mean"], std=data_config["std"],
        re_prob=args.reprob, re_mode=args.remode, re_count=args.recount)
    train_set = SeededAugDataset(train_set, args.seed, accelerator.process_index)
    loader_kwargs = dict(num_workers=args.workers, pin_memory=args.pin_mem, persistent_workers=False)
    repeat_aug = args.aug_repeats > 0 and accelerator.num_processes > 1
    if repeat_aug:
        # RepeatAugSampler shards by rank itself, so Accelerate must not shard again (num_processes=1 below)
        sampler = RepeatAugSampler(train_set, num_replicas=accelerator.num_processes,
                                   rank=accelerator.process_index, num_repeats=args.aug_repeats)
        train_loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                                  **loader_kwargs)
    else:
        train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                  generator=torch.Generator().manual_seed(args.seed), **loader_kwargs)
    val_loader = None
    if val_set is not None:
        val_set.transform = create_transform(
            data_config["input_size"], is_training=False, interpolation=data_config["interpolation"],
            mean=data_config["mean"], std=data_config["std"], crop_pct=data_config["crop_pct"])
        val_loader = DataLoader(val_set, batch_size=args.validation_batch_size or args.batch_size, shuffle=False,
                                **loader_kwargs)
    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                         switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=num_classes)

    # --- teacher (never prepared: kept out of save_state) and the task --------------------------------
    a = args.distill_loss_weight
    feat_on = args.feat_loss != "none" and args.feat_weight > 0
    teacher = None
    if a > 0 or feat_on:
        teacher_model = create_teacher_model(args.kd_model_name, parse_kwargs(args.kd_model_kwargs),
                                             args.kd_checkpoint, pretrained=args.kd_pretrained)
        teacher = FrozenTeacher(teacher_model, args.kd_layer, data_config["mean"], data_config["std"],
                                need_logits=a > 0, need_tokens=feat_on)
    task = EndpointDistillationTask(
        student, teacher, criterion=create_classification_loss(smoothing=args.smoothing,
                                                               soft_targets=mixup_fn is not None),
        distill_loss_weight=a, task_loss_weight=args.task_loss_weight, temperature=args.kd_temperature,
        feat_loss=args.feat_loss if feat_on else "none", feat_weight=args.feat_weight,
        student_layer=args.student_layer, teacher_layer=args.kd_layer, width_align=args.width_align,
        probe_size=data_config["input_size"][-2:])
    if task.teacher is not None:
        task.teacher.to(accelerator.device)

    # --- optimizer and per-update schedule ------------------------------------------------------------
    opt_kwargs = {}
    if args.opt_eps is not None:
        opt_kwargs["eps"] = args.opt_eps
    if args.opt_betas is not None:
        opt_kwargs["betas"] = tuple(args.opt_betas)
    optimizer = create_optimizer_v2(task.trainable_module, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum, **opt_kwargs)
    trainable, optimizer, train_loader = accelerator.prepare(task.trainable_module, optimizer, train_loader)
    if repeat_aug:
        train_loader = prepare_data_loader(train_loader, accelerator.device, num_processes=1, process_index=0,
                                           put_on_device=True)
    if val_loader is not None:
        val_loader = accelerator.prepare(val_loader)
    task.trainable_module = trainable
    updates_per_epoch = math.ceil(len(train_loader) / args.grad_accum_steps)
    if updates_per_epoch == 0:
        raise UserError(f"the training set is smaller than one batch ({len(train_set)} images, -b {args.batch_size})")
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
        warmup_lr=args.warmup_lr, min_lr=args.min_lr, cooldown_epochs=args.cooldown_epochs,
        decay_epochs=args.decay_epochs, decay_rate=args.decay_rate, step_on_epochs=False,
        updates_per_epoch=updates_per_epoch)
    if scheduler is not None:  # --sched none
        accelerator.register_for_checkpointing(scheduler)
    ema = None
    if args.model_ema:
        # after prepare: DDP has broadcast rank 0's weights, so every rank's EMA starts equal
        ema = ModelEmaV3(task.student, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)
        task.trainable_module_ema = ema
        accelerator.register_for_checkpointing(ema)

    # --- resume -----------------------------------------------------------------------------------------
    start_epoch, start_batch, num_updates = 0, 0, 0
    history: List[Dict[str, Any]] = []
    best = {"top1": -1.0, "epoch": -1}
    partial: Dict[str, float] = {}
    resume_from = find_resume_checkpoint(args.resume, run_dir)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))  # model, optimizer, scheduler, EMA, scaler, RNG states
        meta = json.loads((resume_from / META_FILE).read_text())
        start_epoch, start_batch, num_updates = meta["epoch"], meta["batch"], meta["num_updates"]
        history, best, partial = meta["history"], meta["best"], meta.get("partial", {})
        # we name checkpoints ourselves, but keep Accelerate's counter right for anyone using automatic naming
        accelerator.project_configuration.iteration = meta.get("index", 0) + 1
        accelerator.print(f"resumed from {resume_from} at epoch {start_epoch}, batch {start_batch}")
    if trackers:
        accelerator.init_trackers(args.experiment or args.model,
                                  config={k: v for k, v in vars(args).items()
                                          if isinstance(v, (int, float, str, bool))})

    ckpt_index = [accelerator.project_configuration.iteration]

    def checkpoint(epoch: int, batch: int, sums: Dict[str, float]) -> Path:
        meta = {"epoch": epoch, "batch": batch, "num_updates": num_updates, "history": history, "best": best,
                "partial": dict(sums), "index": ckpt_index[0]}
        ckpt_index[0] += 1
        return save_checkpoint(accelerator, ckpt_root, meta, args.checkpoint_keep)

    def last_good() -> str:
        found = list_checkpoints(ckpt_root)
        return str(found[-1]) if found else "none"

    # --- train / checkpoint / evaluate / log -------------------------------------------------------------
    summary_path = run_dir / "summary.csv"
    loss_keys = ("loss", "task_loss", "kd_loss", "feat_loss")
    for epoch in range(start_epoch, num_epochs):
        task.train()
        train_set.set_epoch(epoch)
        train_loader.set_epoch(epoch)
        loader = train_loader
        sums: Dict[str, float] = defaultdict(float)
        if start_batch:
            loader = accelerator.skip_first_batches(train_loader, start_batch)
            # a fresh loader counts its own epochs from 0 and would replay epoch 0's order: set it explicitly
            loader.set_epoch(epoch)
            sums.update(partial)
        bar = tqdm(loader, main_process_only=True, disable=not args.progress,
                   desc=f"{args.experiment or args.model} epoch {epoch}", initial=start_batch,
                   total=len(train_loader), position=args.progress_position, leave=args.progress_position == 0)
        for batch_idx, (x, y) in enumerate(bar, start=start_batch):
            if mixup_fn is not None:
                x, y = mixup_fn(x, y)
            with accelerator.accumulate(trainable):
                with accelerator.autocast():  # covers the (unprepared) teacher forward too
                    out = task(x, y)
                # one reduce gives the logged mean and lets every rank agree to stop on a bad loss
                # the step's one host transfer: every loss value below comes from this list
                losses = accelerator.reduce(torch.stack([out[k].detach().float() for k in loss_keys]),
                                            "mean").tolist()
                if not all(map(math.isfinite, losses)):
                    raise NonFiniteLossError(
                        f"non-finite loss ({losses[0]}) at epoch {epoch}, batch {batch_idx} "
                        f"(after {num_updates} updates); stopped, last good checkpoint: {last_good()}")
                accelerator.backward(out["loss"])
                if args.clip_grad and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(trainable.parameters(), args.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            for key, value in zip(loss_keys, losses):
                sums[key] += value
            sums["batches"] += 1
            if not accelerator.sync_gradients:
                continue
            num_updates += 1
            if scheduler is not None:
                scheduler.step_update(num_updates=num_updates)
            if ema is not None:
                ema.update(task.student, step=num_updates)
            if num_updates % max(args.log_interval, 1) == 0:
                bar.set_postfix(loss=f"{sums['loss'] / sums['batches']:.4f}")
                if trackers:
                    accelerator.log({"train/" + k: v for k, v in zip(loss_keys, losses)}
                                    | {"lr": optimizer.param_groups[0]["lr"]}, step=num_updates)
            if args.checkpoint_every_steps and num_updates % args.checkpoint_every_steps == 0:
                checkpoint(epoch, batch_idx + 1, sums)
            if args.stop_after_updates and num_updates >= args.stop_after_updates:
                accelerator.print(f"stopping after {num_updates} updates (--stop-after-updates)")
                accelerator.end_training()
                return {"stopped": True, "num_updates": num_updates, "output_dir": str(run_dir)}
        start_batch = 0
        if scheduler is not None:
            scheduler.step(epoch + 1)

        row: Dict[str, Any] = {"epoch": epoch}
        row.update({f"train_{k}" if k == "loss" else k: sums[k] / max(sums["batches"], 1) for k in loss_keys})
        if val_loader is not None:
            task.eval()
            metrics = evaluate(accelerator, lambda inp: trainable(inp)[0], val_loader)
            row.update({"eval_loss": metrics["loss"], "eval_top1": metrics["top1"], "eval_top5": metrics["top5"]})
            if ema is not None:
                ema_metrics = evaluate(accelerator, ema.module, val_loader)
                row.update({"ema_top1": ema_metrics["top1"], "ema_top5": ema_metrics["top5"]})
        row["lr"] = optimizer.param_groups[0]["lr"]
        history.append(row)
        # the raw model's best epoch is what the paper reports (EMA is kept but not used for selection)
        if row.get("eval_top1", -1.0) > best["top1"]:
            best = {"top1": row["eval_top1"], "top5": row["eval_top5"], "epoch": epoch}
            export_student(accelerator, trainable, run_dir / "best", data_config=data_config)
        if accelerator.is_main_process:
            write_summary(summary_path, history)
        if trackers:
            accelerator.log({k: v for k, v in row.items() if k != "epoch"}, step=num_updates)
        accelerator.print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        checkpoint(epoch + 1, 0, {})

    # --- export ------------------------------------------------------------------------------------------
    export_student(accelerator, trainable, run_dir, data_config=data_config)
    if ema is not None:
        export_student(accelerator, trainable, run_dir / "ema", model=ema.module, data_config=data_config)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    last = history[-1] if history else {}
    return {"output_dir": str(run_dir), "model_path": str(run_dir / "model.safetensors"),
            "best_model_path": str(run_dir / "best" / "model.safetensors") if best["epoch"] >= 0 else None,
            "best_top1": best["top1"] if best["epoch"] >= 0 else None, "best_epoch": best["epoch"],
            "final_top1": last.get("eval_top1"), "final_top5": last.get("eval_top5"),
            "num_updates": num_updates, "num_classes": num_classes, "history": history, "stopped": False}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry: one line ``error: ...`` and exit 2 on bad input, 3 on a non-finite loss."""
    import sys
    # every rank hits the same error; only rank 0 reports it, so the user sees one line
    report = os.environ.get("RANK", "0") == "0"
    try:
        train(parse_args(argv))
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

