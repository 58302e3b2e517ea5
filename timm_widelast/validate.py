"""`timm-widelast validate`: top-1 / top-5 of a timm model, one of ours, or an export, on labelled images.

The model is named as timm names it (``deit_tiny_widelast``, ``hf-hub:org/name``, ``local-dir:PATH``), or
given as a run/export folder (``config.json`` + ``model.safetensors``) or a weights file with a ``config.json``
beside it. Images come from an ImageFolder (class folders; labels = sorted folder names, which for
ImageNet's synset folders is timm's class order) or any timm dataset (``--dataset torch/cifar10``, ``hfds/...``).
Preprocessing is the model's own eval transform (``timm.data.resolve_data_config`` + ``create_transform``).
Several processes under ``accelerate launch`` split the images; ``gather_for_metrics`` counts each image once.

    timm-widelast validate deit_tiny_widelast --pretrained --data-dir /imagenet/val
    accelerate launch -m timm_widelast.cli validate output/train/run --data-dir /imagenet --amp bf16
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

from .errors import UserError
from .io import atomic_write

EVAL_SPLIT_NAMES = ("validation", "val", "valid", "eval", "evaluation")
TRAIN_SPLIT_NAMES = ("train", "training")
TEST_SPLIT_NAMES = ("test",)
AMP_MODES = ("bf16", "fp16", "no")  # accelerate's mixed_precision values

EPILOG = """examples:
  timm-widelast validate deit_tiny_widelast --pretrained --data-dir /imagenet/val
  timm-widelast validate hf-hub:org/deit_tiny_widelast.in1k --data-dir /imagenet --split validation --amp bf16
  timm-widelast validate output/train/widelast_softkd_mse/best --data-dir /imagenet --results-file top1.json
  timm-widelast validate vit_small_patch16_224 --dataset torch/cifar10 --data-dir ./cifar --split test ...
  accelerate launch -m timm_widelast.cli validate ...   (several processes: same numbers, faster)"""


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("validate", help="top-1/top-5 of a model or export on an ImageFolder or timm dataset",
                              description=__doc__.splitlines()[0], epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="timm name, hf-hub:org/name, local-dir:PATH, a run/export folder, or a weights "
                                 "file with config.json beside it")
    p.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights for a timm name")
    p.add_argument("--checkpoint", help="weights for the named architecture (.safetensors, or a torch file read "
                                        "with weights_only=True)")
    p.add_argument("--model-kwargs", nargs="*", default=[], metavar="K=V", help="extra timm.create_model kwargs")
    p.add_argument("--num-classes", type=int, help="classifier size to build (default: the model's)")
    p.add_argument("--data-dir", required=True, help="ImageFolder root (or its split folder), or a timm dataset root")
    p.add_argument("--dataset", default="", help="timm dataset ('' = ImageFolder/tar; torch/cifar10, hfds/...)")
    p.add_argument("--split", default="validation", help="split folder or dataset split (default validation)")
    p.add_argument("--dataset-download", action="store_true", help="let a torch/ dataset download itself")
    p.add_argument("--class-map", help="text file of class folder names in label order (a subset of classes)")
    p.add_argument("--img-size", type=int, help="override the model's eval input size")
    p.add_argument("--crop-pct", type=float, help="override the model's eval crop fraction")
    p.add_argument("--interpolation", help="override the model's eval interpolation (bilinear, bicubic)")
    p.add_argument("-b", "--batch-size", type=int, default=128, help="per process")
    p.add_argument("-j", "--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--amp", nargs="?", const="bf16", default="no", choices=AMP_MODES,
                   help="autocast dtype (bare --amp = bf16)")
    p.add_argument("--cpu", action="store_true", help="force the CPU even with a GPU")
    p.add_argument("--results-file", help="write the result as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (none either when not a TTY)")
    p.set_defaults(func=run_validate)


def _first_line(err: BaseException) -> str:
    """The error's first line (its type name when it has no message), for a one-line UserError."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# --- model -------------------------------------------------------------------------------------------------
def create_eval_model(spec: str, pretrained: bool = False, checkpoint: Optional[str] = None,
                      model_kwargs: Optional[Dict[str, Any]] = None):
    """The model ``spec`` names, with its weights, in eval mode (see the module doc for the accepted forms)."""
    import timm

    import timm_widelast  # noqa: F401  (registers our students)

    weights = checkpoint
    path = Path(spec)
    if ":" not in spec and path.exists():
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise UserError(f"{spec} has no config.json; fix: pass a run/export folder, or a timm name "
                                "with --checkpoint FILE")
            name, pretrained = f"local-dir:{path.resolve()}", weights is None
        else:
            if not (path.parent / "config.json").is_file():
                raise UserError(f"{spec} has no config.json beside it; fix: pass the architecture instead, "
                                f"e.g. `validate deit_tiny_widelast --checkpoint {spec} --model-kwargs ...`")
            if weights:
                raise UserError("give the weights once: either a weights file as MODEL or --checkpoint")
            name, pretrained, weights = f"local-dir:{path.parent.resolve()}", False, str(path)
    elif spec.startswith(("local-dir:", "hf-hub:", "hf_hub:")):
        name, pretrained = spec, weights is None  # the spec names weights: load them
    else:
        name = spec
        if weights:
            pretrained = False
    try:
        model = timm.create_model(name, pretrained=pretrained, **(model_kwargs or {}))
    except (RuntimeError, TypeError, ValueError, OSError) as err:
        first = _first_line(err)
        if "fix:" in first:  # our models' loaders already say what to do
            raise UserError(f"cannot create {spec!r}: {first}") from err
        raise UserError(f"cannot create {spec!r}: {first}; fix: check the name (timm.list_models), the folder "
                        "or hub id, and --model-kwargs; offline, use a local folder or --checkpoint") from err
    if weights:
        _load_weights(model, weights)
    return model.eval()


def _load_weights(model, path: str) -> None:
    """Strict load: a validation of partly random weights would be a false number."""
    from .diagnostics.extract import load_checkpoint_weights

    state = load_checkpoint_weights(path)
    if hasattr(model, "load_pretrained"):  # our students read the authors' layouts too
        from .models._checkpoints import CheckpointMismatchError, load_student_state_dict
        try:
            fresh = load_student_state_dict(model, state)
        except CheckpointMismatchError as err:
            raise UserError(f"{path}: {err}") from err
        if fresh:
            raise UserError(f"{path} does not hold {', '.join(fresh[:4])}; fix: pass the weights of this "
                            "architecture (check --model-kwargs / --num-classes)")
        return
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{path} does not fit the model ({len(missing)} missing keys, {len(unexpected)} unexpected, "
                        f"e.g. {(list(missing) + list(unexpected))[:2]}); fix: pass the matching model/--model-kwargs")


def eval_data_config(model, img_size: Optional[int] = None, crop_pct: Optional[float] = None,
                     interpolation: Optional[str] = None) -> Dict[str, Any]:
    """The model's own eval preprocessing config (timm's resolve_data_config), with the overrides given."""
    from .diagnostics.report import model_data_config

    cfg = dict(model_data_config(model))
    if img_size:
        cfg["input_size"] = (cfg["input_size"][0], img_size, img_size)
    if crop_pct:
        cfg["crop_pct"] = crop_pct
    if interpolation:
        cfg["interpolation"] = interpolation
    return cfg


# --- data --------------------------------------------------------------------------------------------------
def _split_folder(root: Path, split: str) -> Path:
    """``root/split`` (or a synonym, as timm searches), or root itself when it holds class folders."""
    synonyms = next((names for names in (EVAL_SPLIT_NAMES, TRAIN_SPLIT_NAMES, TEST_SPLIT_NAMES) if split in names),
                    (split,))
    for name in (split, *synonyms):
        if (root / name).is_dir():
            return root / name
    subfolders = {p.name for p in root.iterdir() if p.is_dir()}
    split_like = sorted(subfolders & {*EVAL_SPLIT_NAMES, *TRAIN_SPLIT_NAMES, *TEST_SPLIT_NAMES})
    if split_like:
        # its "classes" would be split folders: every label wrong, silently
        raise UserError(f"{root} holds split folders {split_like} but none for --split {split!r}; "
                        f"fix: pass --split {split_like[0]} or point --data-dir at the class folders")
    return root


def create_eval_dataset(data_dir: str, dataset: str, split: str, transform, class_map: Optional[str] = None,
                        download: bool = False):
    """A labelled dataset through timm's ``create_dataset`` (ImageFolder/tar or a named timm dataset)."""
    from timm.data import create_dataset

    root = Path(data_dir)
    if not dataset and not root.exists():
        raise UserError(f"data dir not found: {data_dir}; fix: pass the folder of class folders (e.g. /imagenet/val)")
    if class_map and not Path(class_map).is_file():
        raise UserError(f"class map not found: {class_map}; fix: pass a text file with one class folder per line")
    try:
        if dataset:
            ds = create_dataset(dataset, root=data_dir, split=split, download=download, class_map=class_map or "",
                                transform=transform)
        else:
            folder = _split_folder(root, split) if root.is_dir() else root  # a .tar is read as it is
            ds = create_dataset("", root=str(folder), split=split, search_split=False, class_map=class_map or "",
                                transform=transform)
    except UserError:
        raise
    except Exception as err:  # timm raises plain RuntimeError/FileNotFoundError/ValueError here
        first = _first_line(err)
        raise UserError(f"cannot open {dataset or 'image folder'} at {data_dir} (split {split!r}): {first}; "
                        "fix: check --data-dir, --dataset and --split") from err
    if len(ds) == 0:
        raise UserError(f"no images in {data_dir} (split {split!r}); fix: check --data-dir and --split")
    return ds


def _folder_classes(ds) -> Optional[int]:
    reader = getattr(ds, "reader", None)
    class_to_idx = getattr(reader, "class_to_idx", None)
    return len(class_to_idx) if class_to_idx else None


# --- evaluation --------------------------------------------------------------------------------------------
def evaluate_topk(model, loader, accelerator, num_classes: int, progress: bool = False) -> Tuple[int, int, int, int]:
    """(images, top-1 hits, top-k hits, k) over the whole loader, each image counted once across processes."""
    import torch
    from tqdm import tqdm

    k = min(5, num_classes)
    seen = hits1 = hitsk = 0
    with torch.inference_mode():
        for images, targets in tqdm(loader, disable=not (progress and accelerator.is_main_process), desc="validate"):
            with accelerator.autocast():
                logits = model(images)
            topk = logits.float().topk(k, dim=1).indices
            correct = topk.eq(targets[:, None])
            out_of_range = (targets < 0) | (targets >= num_classes)
            # gathered, so every process sees the same batch and stops together (no rank left waiting)
            hit1, hitk, bad = accelerator.gather_for_metrics((correct[:, 0], correct.any(dim=1), out_of_range))
            if bool(bad.any()):
                raise UserError(f"a label is outside the model's {num_classes} classes; fix: check --num-classes, "
                                "--class-map, or that the data matches the model")
            seen += hit1.numel()
            hits1 += int(hit1.sum())
            hitsk += int(hitk.sum())
    return seen, hits1, hitsk, k


def validate(args: argparse.Namespace) -> Dict[str, Any]:
    """Run the validation ``args`` describe (the ``validate`` command's flags); returns the result dict."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from timm.data import create_transform

    from .utils import parse_kwargs

    if args.batch_size < 1 or args.workers < 0:
        raise UserError("--batch-size must be >= 1 and --workers >= 0")
    if args.results_file and Path(args.results_file).is_dir():
        raise UserError(f"--results-file {args.results_file} is a folder; fix: give a file name, e.g. results.json")
    kwargs = parse_kwargs(args.model_kwargs)
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    # Accelerate keeps the precision in a singleton: drop it (not the process group) so each call gets its own
    AcceleratorState._reset_state(reset_partial_state=False)
    # a launch on a machine without CUDA needs cpu=True to pick gloo
    accelerator = Accelerator(mixed_precision=args.amp, cpu=args.cpu or not torch.cuda.is_available())
    model = create_eval_model(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint,
                              model_kwargs=kwargs)
    if not (args.pretrained or args.checkpoint or ":" in args.model or Path(args.model).exists()):
        accelerator.print("warning: validating randomly initialised weights (no --pretrained, no --checkpoint)",
                          file=sys.stderr)
    num_classes = getattr(model, "num_classes", 0)
    if not num_classes:
        raise UserError(f"{args.model} has no classifier (num_classes=0); fix: validate a model with a head")
    data_config = eval_data_config(model, args.img_size, args.crop_pct, args.interpolation)
    dataset = create_eval_dataset(args.data_dir, args.dataset, args.split, create_transform(**data_config),
                                  class_map=args.class_map, download=args.dataset_download)
    classes = _folder_classes(dataset)
    if classes is not None and not args.class_map and classes != num_classes:
        # labels are the sorted folder order: with another class count they cannot be the model's indices
        raise UserError(f"the model predicts {num_classes} classes but {args.data_dir} has {classes} class folders; "
                        "fix: point at the full validation set, or give --class-map (folder names in label order)")
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False,
                                         num_workers=args.workers, pin_memory=accelerator.device.type == "cuda")
    model = model.to(accelerator.device)
    loader = accelerator.prepare_data_loader(loader)
    progress = not args.no_progress and sys.stderr.isatty()
    started = time.perf_counter()
    seen, hits1, hitsk, k = evaluate_topk(model, loader, accelerator, num_classes, progress=progress)
    seconds = time.perf_counter() - started
    top1, topk = 100.0 * hits1 / seen, 100.0 * hitsk / seen
    result = dict(
        model=args.model, top1=round(top1, 4), top1_err=round(100.0 - top1, 4), top5=round(topk, 4),
        top5_err=round(100.0 - topk, 4), top5_k=k, correct_top1=hits1, correct_top5=hitsk, num_images=seen,
        param_count=round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        img_size=data_config["input_size"][-1], crop_pct=data_config["crop_pct"],
        interpolation=data_config["interpolation"], amp=args.amp, data_dir=str(args.data_dir),
        dataset=args.dataset or "imagefolder", split=args.split, processes=accelerator.num_processes,
        device=str(accelerator.device), seconds=round(seconds, 2),
    )
    if accelerator.is_main_process:
        print(f"{args.model}: top-1 {top1:.3f}  top-{k} {topk:.3f}  ({seen} images, {result['img_size']} px, "
              f"crop {result['crop_pct']}, amp {args.amp}, {accelerator.num_processes} process(es), {seconds:.1f} s)")
        if args.results_file:
            atomic_write(args.results_file, json.dumps(result, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return result


def run_validate(args: argparse.Namespace) -> int:
    validate(args)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m timm_widelast.validate ...`` (same as ``timm-widelast validate ...``)."""
    from .cli import main as cli_main

    return cli_main(["validate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
