"""Hub-ready exports: a folder that timm loads as it is (``local-dir:`` or ``hf-hub:``).

Layout written by :func:`export`::

    model.safetensors      weights (raw or EMA), our state-dict layout
    config.json            timm's format: architecture, num_classes, num_features, model_args, pretrained_cfg
    README.md              the generated model card
    training_record.json   teacher name/tag, metrics shown on the card, source files, weights kind
    args.yaml, summary.csv the run's training record, when present
    sep_report/            report.json, report.md and PNG plots, when a SEP report is given or found

The folder is built in a temporary directory beside ``--out``, checked by reloading it
through timm, and only then renamed into place, so a failed export never leaves a half
folder nor clobbers an existing export.
"""
from __future__ import annotations

import csv
import errno
import json
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import yaml
from torch import nn

from ..errors import UserError
from ..utils import parse_kwargs
from . import cards

_logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
# where runs keep EMA weights: our trainer's ema/ folder first, then single-file layouts
EMA_NAMES = ("ema/model.safetensors", "model_ema.safetensors", "ema.safetensors", "model-ema.safetensors")
RECORD_NAME = "training_record.json"
REPORT_FOLDER = "sep_report"
REQUIRED_FILES = ("config.json", WEIGHTS_NAME, "README.md")
UNKNOWN_MODEL_HINT = ("install and import timm_widelast before creating the model "
                      "(`pip install timm-widelast`, then `import timm_widelast`)")


# ----------------------------------------------------------------------------------------------
# Reading a run

@dataclass
class RunSource:
    """What an export is made from: a weights file and whatever training record belongs to it.

    ``kind`` says which weights these are, and so which evaluation (if any) was measured on them:
    ``final`` (the run's last epoch), ``best`` (the trainer's ``best/``), ``ema`` (the EMA weights after
    the last epoch), ``export`` (an earlier export, with its own record) or ``file`` (a checkpoint the
    run's evaluation does not describe: no metrics are claimed for it).
    """

    weights: Path
    run_dir: Optional[Path]  # the training run: args.yaml, summary.csv
    kind: str = "file"
    weights_dir: Optional[Path] = None  # the folder beside the weights (its config.json)
    args: Dict[str, Any] = field(default_factory=dict)
    summary: List[Dict[str, str]] = field(default_factory=list)
    config: Dict[str, Any] = field(default_factory=dict)  # config.json beside the weights
    record: Dict[str, Any] = field(default_factory=dict)  # training_record.json of an earlier export
    report_dir: Optional[Path] = None
    ema: bool = False


def _first(d: Dict[str, Any], *keys: str, default: Any = None) -> Any:
    """The first present, non-empty value among ``keys`` (arg names differ between trainers)."""
    for key in keys:
        value = d.get(key)
        if value not in (None, "", [], {}):
            return value
    return default


def _read_yaml(path: Path) -> Dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML ({str(err).splitlines()[0]}); fix: repair or remove it") from err
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a mapping of training args; fix: repair or remove it")
    return data


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err}); fix: repair or remove it") from err
    return data if isinstance(data, dict) else {}


def read_summary(path: Path) -> List[Dict[str, str]]:
    """Rows of a timm-style ``summary.csv`` (epoch, train_loss, eval_top1, eval_top5, ...)."""
    with path.open(newline="", encoding="utf-8") as f:
        return [dict(row) for row in csv.DictReader(f)]


def _find_report(run_dir: Path) -> Optional[Path]:
    """A SEP report folder inside the run (``report.json`` at the top or one level down)."""
    if (run_dir / "report.json").is_file():
        return run_dir
    for candidate in sorted(run_dir.glob("*/report.json")):
        return candidate.parent
    return None


def _is_run(folder: Path) -> bool:
    return (folder / "args.yaml").is_file() or (folder / "summary.csv").is_file()


def _locate(path: Path, ema: bool, metric_row: str) -> Tuple[Path, Optional[Path], str]:
    """(weights file, run folder, kind) for a run folder, its ``best/`` or ``ema/``, an export, or a file."""
    if path.is_dir() and (path / RECORD_NAME).is_file():
        if ema or metric_row == "best":
            raise UserError(f"{path} is an export (one set of weights, already chosen); fix: drop --ema / "
                            "--metric-row best, or export the training run folder instead")
        return path / WEIGHTS_NAME, path, "export"
    if path.is_dir() and path.name in ("best", "ema") and _is_run(path.parent):
        if (path.name == "best" and ema) or (path.name == "ema" and metric_row == "best"):
            raise UserError(f"{path} holds the {path.name} weights only; fix: drop --ema / --metric-row best")
        return path / WEIGHTS_NAME, path.parent, path.name
    if path.is_dir():
        if metric_row == "best":
            if ema:
                raise UserError("the trainer keeps the raw model's best epoch only (best/), not an EMA one; "
                                "fix: drop --ema, or drop --metric-row best to export the final EMA weights")
            weights = path / "best" / WEIGHTS_NAME
            if not weights.is_file():
                raise UserError(f"{path} has no best/{WEIGHTS_NAME} (the trainer writes it when an epoch improves "
                                "top-1); fix: drop --metric-row best to export the final weights with their "
                                "own metrics")
            return weights, path, "best"
        if ema:
            found = [path / n for n in EMA_NAMES if (path / n).is_file()]
            if not found:
                raise UserError(f"{path} has no EMA weights ({', '.join(EMA_NAMES)}); fix: drop --ema, "
                                "or pass the EMA checkpoint file with --model")
            return found[0], path, "ema"
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            candidates = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.pth"))
            hint = f" (found {', '.join(c.name for c in candidates[:4])}; pass one of them)" if candidates else ""
            raise UserError(f"{path} has no {WEIGHTS_NAME}{hint}; fix: pass the checkpoint file with --model NAME")
        return weights, path, "final"
    # A file: the run it belongs to still brings its training record along.
    if metric_row == "best":
        raise UserError("--metric-row best exports the run's best/ weights; fix: pass the run folder, "
                        "or drop --metric-row best")
    parent = path.parent
    if parent.name in ("best", "ema") and path.name == WEIGHTS_NAME and _is_run(parent.parent):
        return path, parent.parent, parent.name
    if _is_run(parent):
        kind = {WEIGHTS_NAME: "final", **{n: "ema" for n in EMA_NAMES if "/" not in n}}.get(path.name, "file")
        return path, parent, "file" if ema and kind == "final" else kind  # --ema on a raw file: unknown epoch
    for up in (parent.parent, parent.parent.parent):  # RUN/checkpoints/FILE, RUN/checkpoints/ckpt_N/FILE
        if "checkpoints" in (parent.name, parent.parent.name) and _is_run(up):
            return path, up, "file"
    return path, None, "file"


def resolve_source(path: Union[str, Path], ema: bool = False, report: Optional[Union[str, Path]] = None,
                   metric_row: str = "last") -> RunSource:
    """Locate the weights and the training record of a run folder (or its ``best/``, ``ema/``), export or file.

    ``metric_row='best'`` picks the run's ``best/`` weights, so the best epoch's metrics describe what is shipped.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; fix: pass a training run folder or a checkpoint file")
    weights, run_dir, kind = _locate(path, ema, metric_row)
    if not weights.is_file():
        raise UserError(f"{weights.parent} has no {weights.name}; fix: pass a folder or file that holds weights")
    source = RunSource(weights=weights, run_dir=run_dir, kind=kind, weights_dir=weights.parent,
                       ema=ema or kind == "ema")
    if run_dir is not None:
        if (run_dir / "args.yaml").is_file():
            source.args = _read_yaml(run_dir / "args.yaml")
        if (run_dir / "summary.csv").is_file():
            source.summary = read_summary(run_dir / "summary.csv")
        if kind == "export":
            source.record = _read_json(run_dir / RECORD_NAME)
            source.ema = source.record.get("weights") == "ema"
        source.report_dir = _find_report(run_dir)
    for folder in (source.weights_dir, run_dir):
        if folder is not None and (folder / "config.json").is_file():
            source.config = _read_json(folder / "config.json")
            break
    if report is not None:
        report = Path(report)
        if report.is_file():
            report = report.parent
        if not (report / "report.json").is_file():
            raise UserError(f"{report} holds no report.json; fix: pass a folder written by `timm-widelast sep`")
        source.report_dir = report
    return source


# ----------------------------------------------------------------------------------------------
# Building the model

def _model_spec(source: RunSource, model_name: Optional[str], model_kwargs: Dict[str, Any]) -> Tuple[str, Dict]:
    """Model name and kwargs: the command line wins over args.yaml, which wins over an earlier config.json."""
    args = source.args
    name = model_name or _first(args, "model", "model_name", "arch") or source.config.get("architecture")
    if not name:
        raise UserError(f"no model name for {source.weights}; fix: pass --model NAME (e.g. deit_tiny_widelast) "
                        "and its width kwargs with --model-kwargs")
    kwargs: Dict[str, Any] = dict(source.config.get("model_args") or {})
    # A mapping, or k=v strings as timm's train.py stores --model-kwargs.
    kwargs.update(parse_kwargs(_first(args, "model_kwargs", "model_args")))
    for key in ("num_classes", "img_size", "in_chans"):
        if args.get(key) not in (None, ""):
            kwargs[key] = args[key]
    kwargs.update(model_kwargs)
    kwargs.pop("pretrained", None)
    if isinstance(kwargs.get("img_size"), (list, tuple)) and len(set(kwargs["img_size"])) == 1:
        kwargs["img_size"] = int(kwargs["img_size"][0])
    return str(name), kwargs


def _create(name: str, kwargs: Dict[str, Any]) -> nn.Module:
    import timm

    import timm_widelast  # noqa: F401  (registration)

    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise UserError(f"unknown model {name!r}; fix: use one of deit_tiny_lift, deit_tiny_widelast, "
                            "deit_small_lift, deit_small_widelast") from err
        raise
    except (TypeError, ValueError) as err:
        raise UserError(f"cannot build {name} with {kwargs} ({err}); fix: check --model-kwargs") from err


def build_model(source: RunSource, model_name: Optional[str] = None,
                model_kwargs: Optional[Dict[str, Any]] = None) -> Tuple[nn.Module, str, Dict[str, Any]]:
    """Create the model and load the weights; infer num_classes / img_size from the weights when not given."""
    from timm_widelast.models._checkpoints import (
        CheckpointMismatchError,
        load_release_checkpoint,
        load_student_state_dict,
    )

    name, kwargs = _model_spec(source, model_name, dict(model_kwargs or {}))
    try:
        state_dict = load_release_checkpoint(source.weights, use_ema=source.ema)
    except (CheckpointMismatchError, OSError, RuntimeError) as err:
        raise UserError(f"cannot read weights from {source.weights}: {err}; fix: pass a .safetensors or .pth "
                        "state dict") from err
    head = state_dict.get("head.weight")
    if "num_classes" not in kwargs and head is not None:
        kwargs["num_classes"] = int(head.shape[0])
    model = _create(name, kwargs)
    pos = state_dict.get("pos_embed")
    if "img_size" not in kwargs and pos is not None and pos.shape != model.pos_embed.shape:
        # The checkpoint's grid decides the image size; resampling it would silently change the model.
        grid = int(round(math.sqrt(pos.shape[1] - model.num_prefix_tokens)))
        kwargs["img_size"] = grid * int(model.patch_embed.patch_size[0])
        model = _create(name, kwargs)
    try:
        fresh = load_student_state_dict(model, state_dict)
    except CheckpointMismatchError as err:
        detail = str(err).split("; check the model name")[0]
        raise UserError(f"{source.weights.name} does not fit {name}: {detail}; fix: pass the --model and "
                        "--model-kwargs (lift_dim / wide_dim / block_dims) it was trained with") from err
    if fresh:
        raise UserError(f"{source.weights} lacks {', '.join(fresh[:6])}{' ...' if len(fresh) > 6 else ''} for "
                        f"{name}; fix: pass the trained student checkpoint and the --model / --model-kwargs "
                        "it was trained with")
    model.eval()
    return model, name, kwargs


# ----------------------------------------------------------------------------------------------
# Card content from a run

def _float(value: Any) -> Optional[float]:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def pick_metrics(summary: List[Dict[str, str]], ema: bool = False, row: str = "last") -> Optional[Dict[str, Any]]:
    """Top-1/top-5 from summary.csv: the ``last`` epoch or the ``best`` raw top-1 epoch (the trainer's ``best/``).

    ``ema`` reads the EMA columns (``ema_top1``...) and nothing else: raw-model numbers never describe EMA weights.
    """
    if not summary:
        return None
    cols = list(summary[0].keys())

    def col(metric: str, want_ema: bool) -> Optional[str]:
        names = [c for c in cols if metric in c.replace("acc1", "top1").replace("acc5", "top5")]
        preferred = [c for c in names if ("ema" in c) == want_ema]
        for prefix in ("eval_", "val_", ""):
            for c in preferred:
                if c.startswith(prefix):
                    return c
        return None

    top1, top5 = col("top1", ema), col("top5", ema)
    raw_top1 = col("top1", False)
    if top1 is None:
        return None
    rows = [r for r in summary if _float(r.get(top1)) is not None]
    if not rows:
        return None
    if row == "best":
        # the trainer keeps the first epoch with the highest raw top-1
        ranked = [r for r in rows if _float(r.get(raw_top1)) is not None]
        chosen = max(ranked, key=lambda r: _float(r[raw_top1])) if ranked else rows[-1]
    else:
        chosen = rows[-1]
    return {"epoch": chosen.get("epoch"), "top1": _float(chosen[top1]),
            "top5": _float(chosen.get(top5)) if top5 else None, "top1_column": top1, "top5_column": top5,
            "row": row}


def run_metrics(source: RunSource) -> Optional[Dict[str, Any]]:
    """Metrics measured on exactly the weights being exported, or None.

    ``final``/``ema``: the last summary.csv row (EMA columns for EMA weights); ``best``: the best row;
    an earlier export: what it recorded; any other checkpoint: nothing (no row describes it).
    """
    if source.kind == "export":
        return source.record.get("metrics") or None
    if source.kind in ("final", "ema"):
        return pick_metrics(source.summary, ema=source.kind == "ema", row="last")
    if source.kind == "best":
        return pick_metrics(source.summary, row="best")
    return None


def _teacher_used(args: Dict[str, Any]) -> bool:
    """Whether the run had a teacher: our trainer builds one only for a soft-KD or feature loss."""
    if "distill_loss_weight" in args or "feat_loss" in args:
        soft = (_float(args.get("distill_loss_weight")) or 0.0) > 0
        feat = str(args.get("feat_loss") or "none") != "none" and (_float(args.get("feat_weight")) or 0.0) > 0
        return soft or feat
    return _first(args, "kd_model_name", "teacher", "teacher_model", "teacher_name") is not None


def teacher_of(args: Dict[str, Any], record: Dict[str, Any]) -> Optional[Dict[str, Optional[str]]]:
    """The teacher as ``{"name", "tag", "checkpoint"}`` from args.yaml (or an earlier export's record); None if none.

    A teacher loaded from ``--kd-checkpoint`` is named by that checkpoint: the architecture in the folder's
    config.json (or ``--kd-model-name`` for a weights file) and the checkpoint's file or folder name.
    """
    if "teacher" in record:
        return record["teacher"] or None
    if not _teacher_used(args):
        return None
    name = _first(args, "kd_model_name", "teacher", "teacher_model", "teacher_name")
    tag = _first(args, "kd_model_tag", "teacher_tag", "teacher_pretrained_tag")
    checkpoint = _first(args, "kd_checkpoint", "teacher_checkpoint")
    if checkpoint is not None:
        path = Path(str(checkpoint))
        config = path / "config.json"
        if path.is_dir() and config.is_file():
            name = _read_json(config).get("architecture") or name
        # the weights are the checkpoint's, not the timm tag's: the tag a name may carry does not apply;
        # a weights file is known by its folder too (``run/model.safetensors``), a folder by its name
        tag, checkpoint = None, path.name if path.is_dir() else "/".join(path.parts[-2:])
    if name is None:
        return {"name": "unknown architecture", "tag": None, "checkpoint": checkpoint} if checkpoint else None
    name = cards.short_name(str(name))
    if "." in name and tag is None and checkpoint is None:
        name, tag = name.split(".", 1)
    elif "." in name and checkpoint is not None:
        name = name.split(".", 1)[0]
    return {"name": name, "tag": tag, "checkpoint": checkpoint}


def teacher_label(teacher: Optional[Dict[str, Optional[str]]]) -> Optional[str]:
    """``name.tag``, or ``name`` with the checkpoint it was loaded from."""
    if not teacher:
        return None
    label = f"{teacher['name']}.{teacher['tag']}" if teacher.get("tag") else str(teacher["name"])
    return f"{label} (weights: {teacher['checkpoint']})" if teacher.get("checkpoint") else label


def _dataset(args: Dict[str, Any], num_classes: int) -> Tuple[str, str]:
    """(Hub dataset id, label) from the run's args; ImageNet-1k is the default at 1000 classes."""
    raw = _first(args, "dataset", "dataset_name", "data_name")
    if raw is None:
        data_dir = _first(args, "data_dir", "data")
        raw = Path(str(data_dir)).name if data_dir else None
    if raw is None:
        return ("imagenet-1k", "ImageNet-1k") if num_classes == 1000 else ("custom", "custom dataset (not recorded)")
    text = str(raw)
    low = text.lower().split(":")[-1]
    if low in ("imagenet", "imagenet-1k", "imagenet1k", "ilsvrc2012", "in1k") and num_classes == 1000:
        return "imagenet-1k", "ImageNet-1k"
    return low.replace(" ", "-"), text


def _num_processes(source: "RunSource") -> Optional[int]:
    """Processes the run trained on: args.yaml if it says, else what our trainer stamps into its weights."""
    value = _first(source.args, "num_processes", "world_size")
    if value is None and source.weights.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(source.weights), framework="pt") as f:
            value = (f.metadata() or {}).get("num_processes")
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def recipe_rows(args: Dict[str, Any], teacher: Optional[str],
                num_processes: Optional[int] = None) -> List[Tuple[str, Any]]:
    """The card's training-recipe table, from whatever of the known arg names the run recorded."""
    rows: List[Tuple[str, Any]] = [("teacher", f"`{teacher}`" if teacher else "none")]
    kd = [
        ("distillation type", ("distillation_type",)),
        ("soft-KD weight a", ("kd_alpha", "alpha", "soft_kd_weight", "distill_loss_weight", "kd_weight")),
        ("temperature tau", ("kd_temperature", "tau", "temperature")),
        ("feature loss", ("feature_loss", "feat_loss", "kd_feature_loss", "feat_loss_type")),
        ("feature weight l_feat", ("feat_weight", "l_feat", "feature_loss_weight", "feat_loss_weight",
                                   "kd_feat_weight")),
    ]
    known = [
        ("label smoothing", ("smoothing", "label_smoothing")),
        ("epochs", ("epochs",)),
        ("optimizer", ("opt", "optimizer")),
        ("lr", ("lr", "learning_rate")),
        ("weight decay", ("weight_decay",)),
        ("schedule", ("sched", "scheduler")),
        ("warmup epochs", ("warmup_epochs",)),
        ("min lr", ("min_lr",)),
        ("drop path", ("drop_path", "drop_path_rate")),
        ("seed", ("seed",)),
    ]
    if str(_first(args, *kd[3][1], default="")).lower() == "none":
        kd = kd[:3]  # no feature loss: its weight is meaningless
    for label, keys in (kd if teacher else []) + known[:2]:
        value = _first(args, *keys)
        if value is not None:
            rows.append((label, value))
    rows += _batch_rows(args, num_processes)
    for label, keys in known[2:]:
        value = _first(args, *keys)
        if value is not None:
            rows.append((label, value))
    ema_on = args.get("model_ema", True)  # other trainers may record only a decay
    decay = _first(args, "model_ema_decay", "ema_decay")
    if ema_on and decay is not None:
        rows.append(("EMA decay", decay))
    init = _first(args, "initial_checkpoint", "init_checkpoint", "pretrained_student", "init")
    if init is not None:
        rows.append(("init", cards.short_name(str(init))))
    return rows


def _batch_rows(args: Dict[str, Any], num_processes: Optional[int]) -> List[Tuple[str, Any]]:
    """The global batch (per process x processes x accumulation) when the process count is known."""
    global_batch = _first(args, "global_batch_size")
    per_process = _first(args, "batch_size", "b")
    accum = int(_first(args, "grad_accum_steps", default=1))
    if global_batch is not None:
        return [("global batch", global_batch)]
    if per_process is None:
        return []
    if num_processes is None:
        rows = [("batch per process", per_process), ("processes", "not recorded")]
    else:
        total = int(per_process) * num_processes * accum
        parts = [f"{per_process} per process", f"{num_processes} process{'es' if num_processes != 1 else ''}"]
        rows = [("global batch", f"{total} ({' x '.join(parts + [f'{accum} accumulation steps'])})"
                 if accum != 1 else f"{total} ({' x '.join(parts)})")]
    if accum != 1 and num_processes is None:
        rows.append(("grad accumulation", accum))
    return rows


def _base_model(args: Dict[str, Any], model: nn.Module) -> Optional[str]:
    """Hub id of the DeiT the student was warm-started from, when the run says it was."""
    init = str(_first(args, "initial_checkpoint", "init_checkpoint", "init", "pretrained_student", default=""))
    warm = bool(args.get("pretrained")) or "deit" in init.lower() or "deit_in1k_init" in str(args.get("model", ""))
    if not warm:
        return None
    if init.startswith(("timm/", "hf-hub:")):
        return init.removeprefix("hf-hub:").split("@")[0]
    return cards.DEIT_BASES.get(int(model.patch_embed.proj.out_channels))


_KIND_NOTES = {
    "final": "raw weights after the last epoch",
    "best": "raw weights of the best epoch (highest evaluation top-1)",
    "ema": "EMA weights after the last epoch",
}


def run_card_info(model: nn.Module, name: str, kwargs: Dict[str, Any], source: RunSource, *,
                  repo_id: Optional[str] = None, report_folder: str = REPORT_FOLDER) -> cards.CardInfo:
    """Card content for a trained model; every number comes from the run's files or the model itself.

    ``report_folder`` is where the card links the SEP report (and its figure) from.
    """
    args = source.args
    # a model created from ``local-dir:/path`` or ``hf-hub:org/x`` is shown by its architecture, not the path
    name = str(getattr(model, "pretrained_cfg", {}).get("architecture") or cards.short_name(name))
    family, paragraph = cards.describe_family(model, name)
    teacher_info = teacher_of(args, source.record)
    teacher = teacher_label(teacher_info)
    dataset_id, dataset_label = _dataset(args, int(model.num_classes))
    metrics = run_metrics(source)
    eval_split = str(_first(args, "val_split", "eval_split", default="validation"))
    weights_kind = "EMA" if source.ema else "raw"
    results = []
    if metrics is not None:
        results.append(cards.ResultRow(f"this model ({weights_kind} weights)", f"{dataset_label} {eval_split}",
                                       metrics.get("epoch"), metrics.get("top1"), metrics.get("top5")))
    ref = repo_id or source.record.get("repo_id") or cards.PLACEHOLDER_REPO
    stats = cards.model_stats(model)
    title = repo_id.split("/")[-1] if repo_id else (str(_first(args, "experiment", default="")) or
                                                    (source.run_dir.name if source.run_dir else name))
    title = cards.short_name(title).replace("/", "-")  # nested experiment folders; a Hub model name has no slash
    epochs = _first(args, "epochs")
    summary = (f"A {family} student (`{name}`) " + (f"distilled from `{teacher}` " if teacher else "trained ")
               + f"on {dataset_label}" + (f" for {epochs} epochs" if epochs else "")
               + " with `timm-widelast` (arXiv 2511.15572).")
    if metrics and "top1_column" in metrics:
        intro = (f"Measured by this run's evaluation of the exported weights (`summary.csv`, column "
                 f"`{metrics['top1_column']}`, {'best' if metrics['row'] == 'best' else 'last'} epoch).")
    elif metrics:
        intro = "Measured by this run's evaluation of the exported weights."
    elif source.kind == "file" and source.summary:
        intro = (f"`{source.weights.name}` is not one of the weights the run evaluated (final, `best/`, `ema/`); "
                 "no result is claimed.")
    else:
        intro = "The run recorded no evaluation of these weights (no `summary.csv` with top-1); no result is claimed."
    if source.kind in _KIND_NOTES:
        rel = source.weights.relative_to(source.run_dir).as_posix() if source.run_dir else source.weights.name
        weights_note = f"{_KIND_NOTES[source.kind]}, from the run's `{rel}`"
    else:
        weights_note = f"{weights_kind} weights from `{source.weights.name}`"
    teacher_name = str((teacher_info or {}).get("name") or "")
    model_args = {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg_overlay",)}
    return cards.CardInfo(
        title=title, architecture=name, model_args=model_args, stats=stats, num_features=int(model.num_features),
        feature_dims=cards.feature_dims(model), family=family, family_paragraph=paragraph, dataset_id=dataset_id,
        dataset_label=dataset_label, eval_split=eval_split, results=results,
        recipe=recipe_rows(args, teacher, _num_processes(source)),
        model_ref=f"hf-hub:{ref}", pretrained=True, summary=summary, teacher=teacher,
        base_model=_base_model(args, model), show_paper_table=dataset_id == "imagenet-1k",
        weights_note=weights_note,
        usage_note=None if repo_id else (f"{cards.NOTE_START}The snippets name a placeholder repo, "
                                         f"`{cards.PLACEHOLDER_REPO}`; `timm-widelast push` fills in the real one. "
                                         f"A local copy loads with `'local-dir:/path/to/export'`.{cards.NOTE_END}"),
        results_intro=intro,
        sep=_sep_section(source.report_dir, report_folder) if source.report_dir is not None else None,
        cite_deit=cards.is_deit_sized(model) or cards.is_timm_deit(teacher_name),
        cite_cait="cait" in teacher_name.lower(),
        num_classes=int(model.num_classes),
    )


# ----------------------------------------------------------------------------------------------
# Export

def read_label_names(path: Union[str, Path]) -> Union[List[str], Dict[int, str]]:
    """Label names from a text file (one per line), a JSON list, or a JSON {index: name} mapping."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"label-names file {path} not found; fix: pass a text file with one name per line")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        if isinstance(data, dict):
            return {int(k): str(v) for k, v in data.items()}
        return [str(v) for v in data]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _data_config(args: Dict[str, Any]) -> Dict[str, Any]:
    """Preprocessing the run recorded (mean/std/crop/interpolation), for config.json's pretrained_cfg."""
    out = {}
    for key in ("mean", "std", "crop_pct", "interpolation", "crop_mode"):
        if args.get(key) not in (None, "", []):
            out[key] = tuple(args[key]) if isinstance(args[key], list) else args[key]
    return out


def _report_figure(report_dir: Path) -> Optional[str]:
    for name in ("sep_curve.png", *sorted(p.name for p in report_dir.glob("*.png"))):
        if (report_dir / name).is_file():
            return name
    return None


def _sep_section(report_dir: Path, folder: str) -> Dict[str, Any]:
    """The card's SEP section from a report folder; ``folder`` is the report's path as the card links it."""
    report = json.loads((report_dir / "report.json").read_text(encoding="utf-8"))
    if report.get("schema") != "timm-widelast/sep-report/v1":
        _logger.warning("%s: unexpected report schema %r", report_dir, report.get("schema"))
    fig = _report_figure(report_dir)
    return cards.sep_section(report, folder, f"{folder}/{fig}" if fig else None)


def _check_roundtrip(model: nn.Module, folder: Path) -> None:
    """Reload ``folder`` through timm's own ``local-dir:`` path and compare logits with ``model``."""
    import timm

    reloaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    size = model.patch_embed.img_size
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if not torch.equal(model(x), reloaded(x)):
            raise RuntimeError("exported folder does not reproduce the model's logits")


# an absolute (or ~/) path: not inside a URL, a relative path or a closing HTML tag
_ABS_PATH = re.compile(r"(?:(?<=local-dir:)|(?<![\w.:/~<-]))~?/[^\s'\"`|()\[\]<>,;]+")


def portable(text: str) -> str:
    """``text`` with absolute local paths cut to their last part (``/home/me/data/imagenet`` -> ``imagenet``).

    Exports are made to be published: the publisher's folder layout is nobody's business, and a
    reader cannot use it anyway. URLs and relative paths are kept.
    """
    return _ABS_PATH.sub(lambda m: Path(m.group(0).rstrip("/")).name or m.group(0), text)


def portable_value(value: Any) -> Any:
    """:func:`portable` applied to every string in a (nested) mapping or list, e.g. args.yaml."""
    if isinstance(value, str):
        return portable(value)
    if isinstance(value, dict):
        return {k: portable_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable_value(v) for v in value]
    return value


def portable_file(path: Path, data: bytes) -> bytes:
    """A text file of the export (args.yaml, a SEP report's .json/.md) without absolute local paths."""
    if path.suffix in (".yaml", ".yml"):
        return yaml.safe_dump(portable_value(yaml.safe_load(data) or {}), sort_keys=False).encode("utf-8")
    if path.suffix in (".json", ".md", ".txt", ".csv"):
        return portable(data.decode("utf-8")).encode("utf-8")
    return data


def _write_error(out: Path, err: OSError) -> UserError:
    """One line for a failed write: what happened to which folder, and that nothing was changed there."""
    if err.errno == errno.ENOSPC:
        return UserError(f"no space left on device while writing the export next to {out} (nothing was "
                         "changed there); fix: free some space or choose another --out")
    if err.errno == errno.EROFS:
        return UserError(f"cannot write {out}: read-only file system; fix: choose a writable --out")
    if err.errno in (errno.EACCES, errno.EPERM):
        return UserError(f"cannot write {out}: permission denied; fix: choose a folder you can write to for --out")
    if err.errno == errno.ENOTDIR or isinstance(err, (FileExistsError, NotADirectoryError)):
        return UserError(f"cannot create {out}: a part of its path is a file; fix: choose another --out")
    return UserError(f"cannot write {out} ({err.strerror or err}); fix: choose another --out")


def export(source_path: Union[str, Path], out: Union[str, Path], *, ema: bool = False,
           model_name: Optional[str] = None, model_kwargs: Optional[Dict[str, Any]] = None,
           report: Optional[Union[str, Path]] = None, label_names: Optional[Union[str, Path]] = None,
           repo_id: Optional[str] = None, metric_row: str = "last", overwrite: bool = False) -> Path:
    """Write a Hub-ready export of a run folder or checkpoint to ``out`` (atomically); returns ``out``.

    ``metric_row='best'`` exports the run's ``best/`` weights (with the best epoch's metrics); the
    default exports the final weights with the last epoch's metrics. A card never pairs the numbers
    of one set of weights with another.
    """
    from safetensors.torch import save as safetensors_bytes
    from timm.models._hub import save_config_for_hf

    out = Path(out).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"{out} already exists; fix: choose another --out or pass --overwrite")
    source = resolve_source(source_path, ema=ema, report=report, metric_row=metric_row)
    if source.run_dir is not None and out in (source.run_dir.absolute(), source.weights.parent.absolute()):
        raise UserError("--out is the source folder; fix: export to a new folder")
    model, name, kwargs = build_model(source, model_name, model_kwargs)

    model_config: Dict[str, Any] = {}
    labels = read_label_names(label_names) if label_names else source.config.get("label_names")
    if labels:
        if len(labels) != model.num_classes:
            raise UserError(f"{len(labels)} label names for {model.num_classes} classes; fix: pass a matching file")
        model_config["label_names"] = labels
    # The registry's default tag names the authors' release; an export is its own weights.
    tag = (repo_id.split("/")[-1] if repo_id else out.name).replace(" ", "_")
    model_config["pretrained_cfg"] = {"tag": tag}
    if source.config.get("pretrained_cfg"):
        keep = ("mean", "std", "crop_pct", "crop_mode", "interpolation")
        model_config["pretrained_cfg"].update({k: v for k, v in source.config["pretrained_cfg"].items() if k in keep})
    info = run_card_info(model, name, kwargs, source, repo_id=repo_id)
    teacher = teacher_of(source.args, source.record)
    record = {
        "format": "timm-widelast/export/v1",
        "architecture": name,
        "weights": "ema" if source.ema else "raw",
        "selection": source.record.get("selection") if source.kind == "export" else source.kind,
        "source_weights": source.weights.name,
        "teacher": teacher,
        "metrics": run_metrics(source),
        "dataset": info.dataset_id,
        "repo_id": repo_id or cards.PLACEHOLDER_REPO,
        "stats": {"params_m": info.stats.params_m, "gmacs": info.stats.gmacs,
                  "activations_m": info.stats.activations_m, "img_size": info.stats.img_size},
    }

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as err:
        raise _write_error(out, err) from err
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        (tmp / WEIGHTS_NAME).write_bytes(safetensors_bytes(state))
        save_config_for_hf(model, str(tmp / "config.json"), model_config=model_config,
                           data_config=_data_config(source.args) or None)
        if source.report_dir is not None:
            dest = tmp / REPORT_FOLDER
            dest.mkdir()
            for item in sorted(source.report_dir.iterdir()):
                if item.is_file() and item.suffix in (".json", ".md", ".png", ".csv", ".txt"):
                    (dest / item.name).write_bytes(portable_file(item, item.read_bytes()))
        if source.args:
            (tmp / "args.yaml").write_text(yaml.safe_dump(portable_value(source.args), sort_keys=False),
                                           encoding="utf-8")
        if source.run_dir is not None and (source.run_dir / "summary.csv").is_file():
            shutil.copyfile(source.run_dir / "summary.csv", tmp / "summary.csv")
        (tmp / "README.md").write_text(str(cards.render_card(info)) + "\n", encoding="utf-8")
        (tmp / RECORD_NAME).write_text(json.dumps(record, indent=2), encoding="utf-8")
        _check_roundtrip(model, tmp)
        _replace_dir(tmp, out)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(out, err) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace_dir(new: Path, out: Path) -> None:
    """Rename ``new`` to ``out``; an existing ``out`` is moved aside first and restored if the rename fails."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    try:
        os.replace(new, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None and old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    elif old is not None:
        old.unlink(missing_ok=True)  # --overwrite of a file (or link) named like the export


# ----------------------------------------------------------------------------------------------
# Checking and loading exports

def check_export(folder: Union[str, Path]) -> Dict[str, Any]:
    """Raise UserError unless ``folder`` is a complete export; returns its config.json. No network."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; fix: pass the folder written by `timm-widelast export`")
    missing = [n for n in REQUIRED_FILES if not (folder / n).is_file()]
    if missing:
        raise UserError(f"{folder} is not a valid export (missing {', '.join(missing)}); "
                        "fix: create it with `timm-widelast export RUN --out DIR`")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{folder}/config.json is not valid JSON ({err}); fix: re-run `timm-widelast export`") from err
    if not isinstance(config, dict) or "architecture" not in config or "pretrained_cfg" not in config:
        raise UserError(f"{folder}/config.json is not a timm config (no architecture/pretrained_cfg); "
                        "fix: re-run `timm-widelast export`")
    try:
        from huggingface_hub import ModelCard

        card = ModelCard.load(folder / "README.md")
    except Exception as err:  # huggingface_hub raises ValueError variants for bad front matter
        raise UserError(f"{folder}/README.md has no valid card metadata ({err}); "
                        "fix: re-run `timm-widelast export`") from err
    if card.data.to_dict().get("library_name") != "timm":
        raise UserError(f"{folder}/README.md does not declare library_name: timm; fix: re-run `timm-widelast export`")
    return config


def load_exported(path_or_hub_id: Union[str, Path], pretrained: bool = True, **kwargs: Any) -> nn.Module:
    """Load an export from a folder, ``local-dir:DIR``, ``hf-hub:org/name`` or ``org/name``.

    timm itself raises ``RuntimeError('Unknown model (...)')`` when the architecture is not
    registered; this helper turns that into an error that names the fix.
    """
    import timm

    ref = str(path_or_hub_id)
    if not ref.startswith(("hf-hub:", "local-dir:")):
        ref = f"local-dir:{ref}" if Path(ref).is_dir() else f"hf-hub:{ref}"
    try:
        return timm.create_model(ref, pretrained=pretrained, **kwargs)
    except RuntimeError as err:
        if "Unknown model" not in str(err):
            raise
        raise RuntimeError(f"{err}: {ref} uses an architecture that timm does not know; {UNKNOWN_MODEL_HINT}") \
            from err
