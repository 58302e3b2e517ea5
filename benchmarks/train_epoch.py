"""End to end: `train_distill.py` against timm's `train.py --device-modules timm_widelast`, same data and recipe.

    python benchmarks/train_epoch.py --timm-train /path/to/pytorch-image-models/train.py          # CPU, tiny
    python benchmarks/train_epoch.py --timm-train train.py --device cuda --amp bf16 --images 10240 \\
        --img-size 224 -b 256 --workers 14 --epochs 2                                             # GPU setting

timm's `train.py` is not in its wheel: pass the path of a copy from timm's repository (the same timm version
as installed). A JPEG ImageFolder (``train/`` + ``validation/``, 10 classes) is generated once under
``--data-root`` and reused. Both scripts train the same student, no teacher, with the same epochs, batch,
optimizer, schedule and precision, and evaluate after every epoch; each runs in its own process and its wall
time includes start-up. Prints the median wall times over ``--rounds`` (the order alternates), the ratio, and
the last lines each script logged (our epoch line carries img/s and the share of time spent waiting for data).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 10


def make_jpeg_folder(root: Path, images: int, size: int) -> Path:
    """``root/jpeg{images}_{size}/{train,validation}/class{c}/{i}.jpg`` (10% validation); built once."""
    import numpy as np
    from PIL import Image

    target = root / f"jpeg{images}_{size}"
    if (target / "train").is_dir() and (target / "validation").is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    rng = np.random.default_rng(0)
    n_val = max(NUM_CLASSES, images // 10)
    for i in range(images + n_val):
        split, label = ("train", i % NUM_CLASSES) if i < images else ("validation", i % NUM_CLASSES)
        folder = staging / split / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        # smooth colour fields plus noise: JPEG decode cost close to a photo's, a class-dependent tint
        base = rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((size, size), Image.BILINEAR)
        pixels = np.asarray(image, dtype=np.int16) + rng.integers(-20, 20, size=(size, size, 3))
        pixels[..., label % 3] += 25 * (label // 3)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)
    os.replace(staging, target)
    return target


def run(name: str, cmd: list, env: dict) -> float:
    print(f"\n$ {' '.join(cmd)}", flush=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - started
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    print("\n".join(f"  {name} | {line[:200]}" for line in lines[-6:]))
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed with exit code {proc.returncode}")
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--timm-train", required=True, help="path of timm's train.py")
    p.add_argument("--data-root", default=os.path.join(tempfile.gettempdir(), "timm_widelast_bench"))
    p.add_argument("--images", type=int, default=320, help="training images (validation: 10%% more)")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--model", default="deit_tiny_widelast")
    p.add_argument("--model-kwargs", nargs="*", default=[], metavar="K=V")
    p.add_argument("-b", "--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--amp", default="none", choices=["none", "bf16"])
    p.add_argument("--rounds", type=int, default=3, help="runs of each script, alternating which goes first")
    args = p.parse_args()
    if not Path(args.timm_train).is_file():
        raise SystemExit(f"error: {args.timm_train} not found; fix: pass the path of timm's train.py")

    data = make_jpeg_folder(Path(args.data_root), args.images, args.img_size)
    out = Path(tempfile.mkdtemp(prefix="bench_out_"))
    shared = ["--data-dir", str(data), "--model", args.model,
              "--num-classes", str(NUM_CLASSES), "--epochs", str(args.epochs), "-b", str(args.batch_size),
              "--workers", str(args.workers), "--opt", "adamw", "--lr", "5e-4", "--weight-decay", "0.05",
              "--sched", "cosine", "--warmup-epochs", "0", "--smoothing", "0.1", "--output", str(out),
              "--log-interval", "50"]
    # the model is built at the image size (ours sizes its data from the model; timm's needs --img-size too)
    shared += ["--model-kwargs", f"img_size={args.img_size}", *args.model_kwargs]
    ours = [sys.executable, str(ROOT / "train_distill.py"), *shared, "--no-progress"]
    timm_cmd = [sys.executable, args.timm_train, *shared, "--img-size", str(args.img_size),
                "--device-modules", "timm_widelast", "--device", args.device, "--checkpoint-hist", "1"]
    if args.amp == "bf16":
        ours += ["--mixed-precision", "bf16"]
        timm_cmd += ["--amp", "--amp-dtype", "bfloat16"]
    else:
        ours += ["--mixed-precision", "no"]
    if args.device == "cpu":
        ours += ["--cpu"]
        timm_cmd += ["--no-prefetcher"]  # timm's prefetcher is CUDA-only
    else:
        timm_cmd += ["--pin-mem"]  # ours pins by default on CUDA
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    seconds = {"ours": [], "timm": []}
    for round_ in range(args.rounds):  # alternate the order, so a load drift hits both alike
        runs = [("ours", ours + ["--experiment", f"ours{round_}"]),
                ("timm", timm_cmd + ["--experiment", f"timm{round_}"])]
        for name, cmd in runs if round_ % 2 == 0 else reversed(runs):
            seconds[name].append(run(name, cmd, env))
    shutil.rmtree(out, ignore_errors=True)
    med = {name: statistics.median(values) for name, values in seconds.items()}

    print(f"\n{args.images} train + {max(NUM_CLASSES, args.images // 10)} validation JPEGs, {args.img_size} px, "
          f"{args.model}, {args.epochs} epochs, batch {args.batch_size}, {args.workers} workers, {args.device}, "
          f"amp {args.amp}, no teacher")
    for name, label in (("ours", "train_distill.py"), ("timm", "timm train.py")):
        runs = ", ".join(f"{v:.1f}" for v in seconds[name])
        print(f"{label:18s} median {med[name]:7.1f} s   (runs: {runs})")
    print(f"{'ours / timm':18s} {med['ours'] / med['timm']:14.3f}")


if __name__ == "__main__":
    main()
