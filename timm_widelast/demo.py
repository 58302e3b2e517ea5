"""`timm-widelast demo`: the whole study at laptop scale, on a real dataset that ships with scikit-learn.

1. Data: scikit-learn's handwritten digits (1,797 real 8x8 scans, 10 classes) written once as an
   ImageFolder (fixed stratified train/validation split), so the same timm ImageFolder path as
   ImageNet is exercised. Cached: a second run reuses it.
2. Teacher: a ViT twice the student's width, trained from scratch with the same training loop.
3. Students, same recipe and budget: the plain narrow student without KD, with naive feature KD
   (teacher channel-pooled to the student's width), Lift + KD and WideLast + KD.
4. Diagnostics (SVD / PCA / SEP) on the teacher's and each student's endpoint.
5. Export of each student as a Hub-ready folder with its generated card (no push).
6. Results table (top-1 mean and spread over seeds, params, train time): results.md, results.json
   and one overlaid SEP plot.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

from .errors import UserError

DIGITS_SPLIT_SEED = 0
VALIDATION_FRACTION = 0.2


def default_cache_dir() -> Path:
    root = os.environ.get("TIMM_WIDELAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "timm_widelast")
    return Path(root)


def build_digits_imagefolder(root: Path, img_size: int = 32) -> Path:
    """Write scikit-learn's digits as ``root/digits{img_size}/{train,validation}/{class}/{index}.png``.

    The split is stratified and fixed (seed 0, 20% validation). The folder is built in a temporary
    sibling and renamed into place, so an interrupted build never leaves a half dataset behind.
    """
    import numpy as np
    from PIL import Image
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise UserError("the demo needs scikit-learn for its dataset; fix: pip install 'timm-widelast[demo]'") from err

    target = Path(root) / f"digits{img_size}"
    if (target / "train").is_dir() and (target / "validation").is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        for label in range(10):
            indices = rng.permutation(np.flatnonzero(digits.target == label))
            n_val = int(round(len(indices) * VALIDATION_FRACTION))
            for split, chosen in (("validation", indices[:n_val]), ("train", indices[n_val:])):
                folder = staging / split / str(label)
                folder.mkdir(parents=True, exist_ok=True)
                for index in chosen:
                    # 0..16 ink levels -> white-on-black 8-bit image, upsampled to the model's input size
                    pixels = (digits.images[index] * (255.0 / 16.0)).round().astype(np.uint8)
                    image = Image.fromarray(pixels, mode="L").resize((img_size, img_size), Image.BICUBIC)
                    image.convert("RGB").save(folder / f"{index:04d}.png")
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@dataclass(frozen=True)
class Variant:
    """One row of the study: a student model and whether it learns from the teacher."""

    key: str
    label: str
    model: str
    model_kwargs: Dict[str, Any]
    distill: bool
    width_align: str = "auto"


@dataclass
class DemoConfig:
    out: Path = Path("demo_output")
    cache_dir: Path = field(default_factory=default_cache_dir)
    img_size: int = 32
    patch_size: int = 4
    width: int = 32  # the student's; the teacher and the Lift/WideLast endpoints get twice this (the paper's 1:2)
    depth: int = 4
    epochs: int = 20
    teacher_epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-3
    seeds: int = 1
    diag_images: int = 0  # 0 = the whole validation split
    threads: int = 0  # torch threads per process; 0 = the cores shared out among the processes running
    jobs: int = field(default_factory=lambda: min(2, os.cpu_count() or 1))  # students trained side by side


def _heads(width: int) -> int:
    return max(1, width // 16)


def teacher_spec(cfg: DemoConfig) -> tuple[str, Dict[str, Any]]:
    wide = 2 * cfg.width
    return "vit_small_patch16_224", dict(patch_size=cfg.patch_size, embed_dim=wide, depth=cfg.depth,
                                         num_heads=_heads(wide))


def variants(cfg: DemoConfig) -> List[Variant]:
    """The four students of the study, all scaled down through kwargs of the registered families."""
    narrow = dict(patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.depth, num_heads=_heads(cfg.width))
    wide = 2 * cfg.width
    return [
        Variant("plain", "DeiT (narrow), no KD", "deit_tiny_patch16_224", narrow, distill=False),
        Variant("plain_naive_kd", "DeiT (narrow) + KD, naive (channel-pooled teacher)", "deit_tiny_patch16_224",
                narrow, distill=True, width_align="pool"),
        Variant("lift_kd", "Lift + KD", "deit_tiny_lift", dict(narrow, lift_dim=wide), distill=True),
        Variant("widelast_kd", "WideLast + KD", "deit_tiny_widelast",
                dict(narrow, wide_dim=wide, wide_heads=_heads(wide)), distill=True),
    ]


def _splits_into_heads(width: int) -> bool:
    return width % _heads(width) == 0


def check_config(cfg: DemoConfig) -> None:
    """Refuse a configuration the models cannot be built from, before anything runs or is written."""
    problems = []
    for name, value, low in (("--seeds", cfg.seeds, 1), ("--epochs", cfg.epochs, 1), ("--jobs", cfg.jobs, 1),
                             ("--teacher-epochs", cfg.teacher_epochs, 1), ("--depth", cfg.depth, 1),
                             ("--batch-size", cfg.batch_size, 1), ("--width", cfg.width, 2),
                             ("--patch-size", cfg.patch_size, 1), ("--diag-images", cfg.diag_images, 0),
                             ("--threads", cfg.threads, 0)):
        if value < low:
            problems.append(f"{name} {value} must be >= {low}")
    if cfg.lr <= 0:
        problems.append(f"--lr {cfg.lr} must be > 0")
    if problems:
        raise UserError("; ".join(problems))
    if cfg.img_size < cfg.patch_size or cfg.img_size % cfg.patch_size:
        raise UserError(f"--img-size {cfg.img_size} must be a multiple of --patch-size {cfg.patch_size}")
    # heads = width // 16 (at least 1), for the student and for the 2x-wide teacher and endpoints
    if not (_splits_into_heads(cfg.width) and _splits_into_heads(2 * cfg.width)):
        near = [w for w in range(max(2, cfg.width - 16), cfg.width + 17)
                if _splits_into_heads(w) and _splits_into_heads(2 * w)]
        near = sorted(near, key=lambda w: (abs(w - cfg.width), w))[:2]
        bad = cfg.width if not _splits_into_heads(cfg.width) else 2 * cfg.width
        raise UserError(f"--width {cfg.width}: width {bad} does not split into {_heads(bad)} attention heads "
                        f"(the demo uses width // 16 heads, for the student and its 2x-wide teacher); "
                        f"fix: use e.g. --width {' or '.join(map(str, sorted(near)))}")


def _kwargs_list(kwargs: Dict[str, Any]) -> List[str]:
    return [f"{k}={v}" for k, v in kwargs.items()]


def _train_args(cfg: DemoConfig, data_dir: Path, out: Path, experiment: str, model: str, kwargs: Dict[str, Any],
                seed: int, epochs: int) -> Dict[str, Any]:
    """The one recipe every run shares (the teacher differs only in having no teacher)."""
    return dict(
        model=model, model_kwargs=_kwargs_list(kwargs), img_size=cfg.img_size, data_dir=str(data_dir),
        output=str(out), experiment=experiment, epochs=epochs, batch_size=cfg.batch_size, lr=cfg.lr,
        warmup_epochs=min(2, max(epochs - 1, 0)), min_lr=1e-5, weight_decay=0.05, smoothing=0.1, seed=seed,
        workers=0, scale=[0.75, 1.0], hflip=0.0, color_jitter=0.0, checkpoint_keep=1,
        sched_on_updates=True,  # short runs warm up per update (the trainer's default is per epoch, as the release)
    )


# Shared KD recipe: the paper's loss weights (a = 0.9, tau = 1, MSE feature loss with l_feat = 0.2).
KD_RECIPE = dict(distill_loss_weight=0.9, kd_temperature=1.0, feat_loss="mse", feat_weight=0.2)


_WORKER_SLOT = 0


def _init_worker(slots, threads: int) -> None:
    """Each worker process takes one progress-bar row and one torch thread."""
    import torch

    global _WORKER_SLOT
    _WORKER_SLOT = slots.get()
    torch.set_num_threads(threads)


def _train_in_worker(args: Dict[str, Any]) -> Dict[str, Any]:
    from .distill.trainer import train

    started = time.perf_counter()
    result = train(dict(args, progress_position=_WORKER_SLOT))
    result["seconds"] = time.perf_counter() - started
    result.pop("history", None)
    return result


def _train_students(jobs: List[Dict[str, Any]], cfg: DemoConfig) -> List[Dict[str, Any]]:
    """Train the students, ``cfg.jobs`` at a time, each in its own single-threaded process."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")
    slots = context.Manager().Queue()
    for slot in range(cfg.jobs):
        slots.put(slot)
    with ProcessPoolExecutor(max_workers=cfg.jobs, mp_context=context, initializer=_init_worker,
                             initargs=(slots, cfg.threads or max(1, (os.cpu_count() or 1) // cfg.jobs))) as pool:
        return list(pool.map(_train_in_worker, jobs))


def _log(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def _load_run_model(run_dir: Path):
    """A finished run folder is a timm ``local-dir`` (config.json + model.safetensors)."""
    import timm

    return timm.create_model(f"local-dir:{run_dir}", pretrained=True).eval()


def _diagnose(net, label: str, val_dir: Path, out_dir: Path, cfg: DemoConfig) -> Path:
    from .diagnostics import run_report

    run_report(net, str(val_dir), out_dir, num_images=cfg.diag_images or None, batch_size=128,
               permutations=3, progress=True, meta={"label": label})
    return out_dir


def _fmt_mean(values: List[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def run_demo(cfg: DemoConfig) -> Dict[str, Any]:
    """Run the whole study; returns the results dict also written to ``results.json``."""
    check_config(cfg)
    import torch

    from .diagnostics import compare_reports
    from .hub.export import export

    started = time.perf_counter()
    cores = os.cpu_count() or 1
    # Tiny models: oversubscribed threads cost far more than they give, so never exceed one per core.
    torch.set_num_threads(cfg.threads or cores)
    out = Path(cfg.out).absolute()
    out.mkdir(parents=True, exist_ok=True)

    _log(f"1/6 data: scikit-learn digits as an ImageFolder (cache {cfg.cache_dir})")
    data_dir = build_digits_imagefolder(Path(cfg.cache_dir), cfg.img_size)
    val_dir = data_dir / "validation"
    _log(f"    {data_dir}")

    teacher_name, teacher_kwargs = teacher_spec(cfg)
    rows: Dict[str, Dict[str, Any]] = {}
    for seed in range(cfg.seeds):
        _log(f"2/6 teacher (seed {seed}): {teacher_name} width {2 * cfg.width}, {cfg.teacher_epochs} epochs")
        teacher = _train_in_worker(_train_args(cfg, data_dir, out, f"teacher/seed{seed}", teacher_name,
                                               teacher_kwargs, seed, cfg.teacher_epochs))
        row = rows.setdefault("teacher", dict(label=f"teacher ViT (width {2 * cfg.width})", top1=[], seconds=[]))
        row["top1"].append(teacher["final_top1"])
        row["seconds"].append(teacher["seconds"])

        _log(f"3/6 students (seed {seed}), {cfg.epochs} epochs each, {cfg.jobs} at a time: "
             + "; ".join(v.label for v in variants(cfg)))
        jobs = []
        for variant in variants(cfg):
            args = _train_args(cfg, data_dir, out, f"{variant.key}/seed{seed}", variant.model,
                               variant.model_kwargs, seed, cfg.epochs)
            if variant.distill:
                # the teacher's run folder holds its config.json: architecture and weights in one place
                args.update(KD_RECIPE, kd_checkpoint=teacher["output_dir"], width_align=variant.width_align)
            jobs.append(args)
        results = _train_students(jobs, cfg) if cfg.jobs > 1 else [_train_in_worker(job) for job in jobs]
        for variant, result in zip(variants(cfg), results):
            row = rows.setdefault(variant.key, dict(label=variant.label, top1=[], seconds=[]))
            row["top1"].append(result["final_top1"])
            row["seconds"].append(result["seconds"])
            row.setdefault("run_dirs", []).append(os.path.relpath(result["output_dir"], out))
            _log(f"    {variant.label}: top-1 {result['final_top1']:.2f} ({result['seconds']:.0f} s)")

    _log("4/6 diagnostics (SVD / PCA / SEP) of each endpoint on the validation split")
    reports: Dict[str, Path] = {}
    for key in rows:  # teacher first, then the students in table order; seed 0 of each
        net = _load_run_model(out / key / "seed0")
        rows[key]["params"] = sum(p.numel() for p in net.parameters())
        reports[key] = _diagnose(net, rows[key]["label"], val_dir, out / "reports" / key, cfg)
    comparison = compare_reports([str(p) for p in reports.values()], out / "reports")
    sep_plot = out / "sep_overlay.png"
    shutil.copyfile(out / "reports" / "sep_compare.png", sep_plot)

    _log("5/6 export: Hub-ready folders with generated model cards (no push)")
    exports = {}
    for variant in variants(cfg):
        target = out / "exports" / variant.key
        exports[variant.key] = str(export(out / variant.key / "seed0", target, report=reports[variant.key],
                                          overwrite=True))

    _log("6/6 results")
    results = dict(
        schema="timm-widelast/demo-results/v1",
        recipe=dict(cfg=_jsonable(vars(cfg)), kd=KD_RECIPE, teacher=dict(model=teacher_name, kwargs=teacher_kwargs),
                    dataset="scikit-learn digits, 1,438 train / 359 validation, fixed split"),
        rows={k: dict(v, top1_mean=statistics.mean(v["top1"]),
                      top1_std=statistics.stdev(v["top1"]) if len(v["top1"]) > 1 else 0.0) for k, v in rows.items()},
        # compare_reports keeps the order of the reports it was given
        sep={key: dict(label=rows[key]["label"], dim=row["dim"], b=row["sep_b"])
             for key, row in zip(reports, comparison["rows"])},
        # relative to the output folder, so the folder can be moved or committed as it is
        exports={k: os.path.relpath(v, out) for k, v in exports.items()},
        reports={k: os.path.relpath(v, out) for k, v in reports.items()},
        wall_seconds=time.perf_counter() - started,
    )
    (out / "results.json").write_text(json.dumps(results, indent=1))
    markdown = results_markdown(results, sep_plot.name)
    (out / "results.md").write_text(markdown)
    print(markdown)
    _log(f"results: {out / 'results.md'}, {out / 'results.json'}, SEP plot {sep_plot}")
    _log(f"reports: {out / 'reports'}; exports: {out / 'exports'}; runs: {out}")
    _log(f"wall time {results['wall_seconds'] / 60:.1f} min")
    return results


def _jsonable(values: Dict[str, Any]) -> Dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}


def results_markdown(results: Dict[str, Any], sep_plot: str) -> str:
    """The results table with the recipe it came from."""
    cfg = results["recipe"]["cfg"]
    lines = [
        "# timm-widelast demo: Lift / WideLast at laptop scale",
        "",
        f"Dataset: {results['recipe']['dataset']}, {cfg['img_size']} px, patch {cfg['patch_size']}. "
        f"Student width {cfg['width']}, teacher and endpoints {2 * cfg['width']}, depth {cfg['depth']}.",
        f"One recipe for every student: {cfg['epochs']} epochs, batch {cfg['batch_size']}, AdamW lr {cfg['lr']}, "
        "wd 0.05, cosine, label smoothing 0.1. KD runs add soft KD (a = 0.9, tau = 1) and an MSE feature loss "
        "(l_feat = 0.2) on the endpoint; the plain student's teacher map is channel-pooled to its width (naive). "
        f"Teacher trained with the same loop, no teacher, {cfg['teacher_epochs']} epochs. "
        "Top-1 is the last epoch's, on the validation split.",
        "",
        f"| model | top-1 (mean{' ± std' if cfg['seeds'] > 1 else ''}, {cfg['seeds']} seed(s)) | params | "
        "train time (s) |",
        "|---|---|---|---|",
    ]
    for row in results["rows"].values():
        lines.append(f"| {row['label']} | {_fmt_mean(row['top1'])} | {row.get('params', 0):,} | "
                     f"{statistics.mean(row['seconds']):.0f} |")
    lines += ["", "SEP bandwidths b_a (a = 50..90%) of each endpoint:", "",
              "| endpoint | D | b50 | b60 | b70 | b80 | b90 |", "|---|---|---|---|---|---|---|"]
    for sep in results["sep"].values():
        lines.append(f"| {sep['label']} | {sep['dim']} | " + " | ".join(f"{b:.3f}" for b in sep["b"]) + " |")
    lines += ["", f"![SEP curves]({sep_plot})", "",
              f"Wall time: {results['wall_seconds'] / 60:.1f} min.", ""]
    return "\n".join(lines)


def _command(args: argparse.Namespace) -> int:
    cfg = DemoConfig(out=Path(args.out), cache_dir=Path(args.cache_dir), img_size=args.img_size,
                     patch_size=args.patch_size, width=args.width, depth=args.depth, epochs=args.epochs,
                     teacher_epochs=args.teacher_epochs if args.teacher_epochs else args.epochs,
                     batch_size=args.batch_size, lr=args.lr, seeds=args.seeds,
                     diag_images=args.diag_images, threads=args.threads, jobs=args.jobs)
    run_demo(cfg)  # checks cfg before it starts
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    defaults = DemoConfig()
    p = subparsers.add_parser("demo", help="the whole Lift/WideLast study at laptop scale (about 10 min on 2 cores)")
    p.add_argument("--out", default=str(defaults.out))
    p.add_argument("--cache-dir", default=str(defaults.cache_dir), help="where the digits ImageFolder is cached")
    p.add_argument("--img-size", type=int, default=defaults.img_size)
    p.add_argument("--patch-size", type=int, default=defaults.patch_size)
    p.add_argument("--width", type=int, default=defaults.width, help="student width (teacher: twice this)")
    p.add_argument("--depth", type=int, default=defaults.depth)
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--teacher-epochs", type=int, default=0, help="default: --epochs")
    p.add_argument("-b", "--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--seeds", type=int, default=defaults.seeds)
    p.add_argument("--diag-images", type=int, default=0, help="images for the diagnostics (0 = all validation)")
    p.add_argument("--threads", type=int, default=defaults.threads, help="torch CPU threads per training process")
    p.add_argument("--jobs", type=int, default=defaults.jobs, help="students trained side by side (processes)")
    p.set_defaults(func=_command)
