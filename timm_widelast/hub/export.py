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
import json
import logging
import math
import os
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
EMA_NAMES = ("model_ema.safetensors", "ema.safetensors", "model-ema.safetensors")
RECORD_NAME = "training_record.json"
REPORT_FOLDER = "sep_report"
REQUIRED_FILES = ("config.json", WEIGHTS_NAME, "README.md")
UNKNOWN_MODEL_HINT = ("install and import timm_widelast before creating the model "
                      "(`pip install timm-widelast`, then `import timm_widelast`)")


# ----------------------------------------------------------------------------------------------
# Reading a run

@dataclass
class RunSource:
    """What an export is made from: a weights file and whatever training record sits beside it."""

    weights: Path
    run_dir: Optional[Path]
    args: Dict[str, Any] = field(default_factory=dict)
    summary: List[Dict[str, str]] = field(default_factory=list)
    config: Dict[str, Any] = field(default_factory=dict)  # config.json when re-exporting an export
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


def resolve_source(path: Union[str, Path], ema: bool = False, report: Optional[Union[str, Path]] = None) -> RunSource:
    """Locate the weights and the optional training record for a run folder, export folder or checkpoint file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; fix: pass a training run folder or a checkpoint file")
    if path.is_dir():
        run_dir = path
        if ema:
            found = [run_dir / n for n in EMA_NAMES if (run_dir / n).is_file()]
            if not found:
                raise UserError(f"{run_dir} has no EMA weights ({', '.join(EMA_NAMES)}); fix: drop --ema, "
                                "or pass the EMA checkpoint file with --model")
            weights = found[0]
        else:
            weights = run_dir / WEIGHTS_NAME
            if not weights.is_file():
                candidates = sorted(run_dir.glob("*.safetensors")) + sorted(run_dir.glob("*.pth"))
                hint = f" (found {', '.join(c.name for c in candidates[:4])}; pass one of them)" if candidates else ""
                raise UserError(f"{run_dir} has no {WEIGHTS_NAME}{hint}; fix: pass the checkpoint file "
                                "with --model NAME")
    else:
        weights, run_dir = path, None
        # A checkpoint inside a run folder still brings its training record along.
        if (path.parent / "args.yaml").is_file():
            run_dir = path.parent
        elif path.parent.name == "checkpoints" and (path.parent.parent / "args.yaml").is_file():
            run_dir = path.parent.parent
    source = RunSource(weights=weights, run_dir=run_dir, ema=ema)
    if run_dir is not None:
        if (run_dir / "args.yaml").is_file():
            source.args = _read_yaml(run_dir / "args.yaml")
        if (run_dir / "summary.csv").is_file():
            source.summary = read_summary(run_dir / "summary.csv")
        if (run_dir / "config.json").is_file():
            source.config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
        if (run_dir / RECORD_NAME).is_file():
            source.record = json.loads((run_dir / RECORD_NAME).read_text(encoding="utf-8"))
        source.report_dir = _find_report(run_dir)
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
    """Top-1/top-5 from summary.csv: the ``last`` epoch (the exported weights) or the ``best`` top-1 epoch."""
    if not summary:
        return None
    cols = list(summary[0].keys())

    def col(metric: str) -> Optional[str]:
        names = [c for c in cols if metric in c.replace("acc1", "top1").replace("acc5", "top5")]
        ema_names = [c for c in names if "ema" in c]
        plain = [c for c in names if "ema" not in c]
        preferred = (ema_names or plain) if ema else plain
        for prefix in ("eval_", "val_", ""):
            for c in preferred:
                if c.startswith(prefix):
                    return c
        return None

    top1, top5 = col("top1"), col("top5")
    if top1 is None:
        return None
    rows = [r for r in summary if _float(r.get(top1)) is not None]
    if not rows:
        return None
    chosen = max(rows, key=lambda r: _float(r[top1])) if row == "best" else rows[-1]
    return {"epoch": chosen.get("epoch"), "top1": _float(chosen[top1]),
            "top5": _float(chosen.get(top5)) if top5 else None, "top1_column": top1, "top5_column": top5,
            "row": row}


def run_metrics(source: RunSource, metric_row: str = "last") -> Optional[Dict[str, Any]]:
    """The metrics a card shows: summary.csv's chosen row, else those an earlier export recorded."""
    return pick_metrics(source.summary, ema=source.ema, row=metric_row) or source.record.get("metrics") or None


def teacher_of(args: Dict[str, Any], record: Dict[str, Any]) -> Tuple[Optional[str], Optional[str]]:
    """(teacher model name, pretrained tag) from args.yaml, or an earlier export's record."""
    if record.get("teacher"):
        return record["teacher"].get("name"), record["teacher"].get("tag")
    name = _first(args, "kd_model_name", "teacher", "teacher_model", "teacher_name")
    tag = _first(args, "kd_model_tag", "teacher_tag", "teacher_pretrained_tag")
    if isinstance(name, str) and "." in name and tag is None:
        name, tag = name.split(".", 1)
    return name, tag


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


def recipe_rows(args: Dict[str, Any], teacher: Optional[str]) -> List[Tuple[str, Any]]:
    """The card's training-recipe table, from whatever of the known arg names the run recorded."""
    rows: List[Tuple[str, Any]] = [("teacher", f"`{teacher}`" if teacher else "none")]
    known = [
        ("soft-KD weight a", ("kd_alpha", "alpha", "soft_kd_weight", "distill_loss_weight", "kd_weight")),
        ("temperature tau", ("kd_temperature", "tau", "temperature")),
        ("feature loss", ("feature_loss", "feat_loss", "kd_feature_loss", "feat_loss_type")),
        ("feature weight l_feat", ("feat_weight", "l_feat", "feature_loss_weight", "feat_loss_weight",
                                   "kd_feat_weight")),
        ("label smoothing", ("smoothing", "label_smoothing")),
        ("epochs", ("epochs",)),
        ("batch size", ("batch_size", "b", "global_batch_size")),
        ("grad accumulation", ("grad_accum_steps",)),
        ("optimizer", ("opt", "optimizer")),
        ("lr", ("lr", "learning_rate")),
        ("weight decay", ("weight_decay",)),
        ("schedule", ("sched", "scheduler")),
        ("warmup epochs", ("warmup_epochs",)),
        ("min lr", ("min_lr",)),
        ("drop path", ("drop_path", "drop_path_rate")),
        ("EMA decay", ("model_ema_decay", "ema_decay")),
        ("seed", ("seed",)),
        ("init", ("initial_checkpoint", "init_checkpoint", "pretrained_student", "init")),
    ]
    for label, keys in known:
        value = _first(args, *keys)
        if value is not None:
            rows.append((label, value))
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


def run_card_info(model: nn.Module, name: str, kwargs: Dict[str, Any], source: RunSource, *,
                  repo_id: Optional[str] = None, metric_row: str = "last",
                  report_folder: str = REPORT_FOLDER) -> cards.CardInfo:
    """Card content for a trained model; every number comes from the run's files or the model itself.

    ``report_folder`` is where the card links the SEP report (and its figure) from.
    """
    args = source.args
    family, paragraph = cards.describe_family(model, name)
    teacher_name, teacher_tag = teacher_of(args, source.record)
    teacher = f"{teacher_name}.{teacher_tag}" if teacher_name and teacher_tag else teacher_name
    dataset_id, dataset_label = _dataset(args, int(model.num_classes))
    metrics = run_metrics(source, metric_row)
    eval_split = str(_first(args, "val_split", "eval_split", default="validation"))
    results = []
    if metrics is not None:
        results.append(cards.ResultRow(f"this model ({'EMA' if source.ema else 'raw'} weights)",
                                       f"{dataset_label} {eval_split}", metrics.get("epoch"), metrics.get("top1"),
                                       metrics.get("top5")))
    ref = repo_id or source.record.get("repo_id") or cards.PLACEHOLDER_REPO
    stats = cards.model_stats(model)
    title = repo_id.split("/")[-1] if repo_id else (str(_first(args, "experiment", default="")) or
                                                    (source.run_dir.name if source.run_dir else name))
    title = title.replace("/", "-")  # nested experiment folders; a Hub model name has no slash
    epochs = _first(args, "epochs")
    summary = (f"A {family} student (`{name}`) " + (f"distilled from `{teacher}` " if teacher else "trained ")
               + f"on {dataset_label}" + (f" for {epochs} epochs" if epochs else "")
               + " with `timm-widelast` (arXiv 2511.15572).")
    intro = ("Measured by this run's evaluation (`summary.csv`, column "
             f"`{metrics['top1_column']}`, {metrics['row']} epoch)." if metrics and "top1_column" in metrics
             else "Measured by this run's evaluation." if metrics else
             "The run recorded no evaluation (no `summary.csv` with top-1); no result is claimed.")
    model_args = {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg_overlay",)}
    return cards.CardInfo(
        title=title, architecture=name, model_args=model_args, stats=stats, num_features=int(model.num_features),
        feature_dims=cards.feature_dims(model), family=family, family_paragraph=paragraph, dataset_id=dataset_id,
        dataset_label=dataset_label, eval_split=eval_split, results=results, recipe=recipe_rows(args, teacher),
        model_ref=f"hf-hub:{ref}", pretrained=True, summary=summary, teacher=teacher,
        base_model=_base_model(args, model), show_paper_table=dataset_id == "imagenet-1k",
        weights_note=f"{'EMA' if source.ema else 'raw'} weights from `{source.weights.name}`",
        usage_note=None if repo_id else (f"{cards.NOTE_START}The snippets name a placeholder repo, "
                                         f"`{cards.PLACEHOLDER_REPO}`; `timm-widelast push` fills in the real one. "
                                         f"A local copy loads with `'local-dir:/path/to/export'`.{cards.NOTE_END}"),
        results_intro=intro,
        sep=_sep_section(source.report_dir, report_folder) if source.report_dir is not None else None,
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


def export(source_path: Union[str, Path], out: Union[str, Path], *, ema: bool = False,
           model_name: Optional[str] = None, model_kwargs: Optional[Dict[str, Any]] = None,
           report: Optional[Union[str, Path]] = None, label_names: Optional[Union[str, Path]] = None,
           repo_id: Optional[str] = None, metric_row: str = "last", overwrite: bool = False) -> Path:
    """Write a Hub-ready export of a run folder or checkpoint to ``out`` (atomically); returns ``out``."""
    from timm.models._hub import save_for_hf

    out = Path(out).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"{out} already exists; fix: choose another --out or pass --overwrite")
    source = resolve_source(source_path, ema=ema, report=report)
    if source.run_dir is not None and source.run_dir.absolute() == out:
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
    model_config["pretrained_cfg"] = {"tag": tag, "origin_url": cards.PAPER_URL}
    if source.config.get("pretrained_cfg"):
        keep = ("mean", "std", "crop_pct", "crop_mode", "interpolation")
        model_config["pretrained_cfg"].update({k: v for k, v in source.config["pretrained_cfg"].items() if k in keep})

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_for_hf(model, str(tmp), model_config=model_config, safe_serialization=True,
                    data_config=_data_config(source.args) or None)
        if source.report_dir is not None:
            dest = tmp / REPORT_FOLDER
            dest.mkdir()
            for item in sorted(source.report_dir.iterdir()):
                if item.is_file() and item.suffix in (".json", ".md", ".png", ".csv", ".txt"):
                    shutil.copy2(item, dest / item.name)
        if source.run_dir is not None:
            for fname in ("args.yaml", "summary.csv"):
                if (source.run_dir / fname).is_file():
                    shutil.copy2(source.run_dir / fname, tmp / fname)
        info = run_card_info(model, name, kwargs, source, repo_id=repo_id, metric_row=metric_row)
        (tmp / "README.md").write_text(str(cards.render_card(info)) + "\n", encoding="utf-8")
        teacher_name, teacher_tag = teacher_of(source.args, source.record)
        record = {
            "format": "timm-widelast/export/v1",
            "architecture": name,
            "weights": "ema" if ema else "raw",
            "source_weights": source.weights.name,
            "teacher": {"name": teacher_name, "tag": teacher_tag} if teacher_name else None,
            "metrics": run_metrics(source, metric_row),
            "dataset": info.dataset_id,
            "repo_id": repo_id or cards.PLACEHOLDER_REPO,
            "stats": {"params_m": info.stats.params_m, "gmacs": info.stats.gmacs,
                      "activations_m": info.stats.activations_m, "img_size": info.stats.img_size},
        }
        (tmp / RECORD_NAME).write_text(json.dumps(record, indent=2), encoding="utf-8")
        _check_roundtrip(model, tmp)
        _replace_dir(tmp, out)
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
