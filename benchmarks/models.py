"""Inference cost of the students: params, GMACs and CPU throughput, measured side by side.

    python benchmarks/models.py [--batch-size 16] [--repeats 7] [--img-size 224]

Widening only the last block should cost what its FLOPs say: the script prints the
measured slowdown of deit_tiny_widelast over deit_tiny divided by its FLOP ratio
(1.0 = exactly as predicted; the goal is within 10%).
"""
from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import timm_widelast  # noqa: F401  (registers the students)

MODELS = ("deit_tiny_patch16_224", "deit_tiny_lift", "deit_tiny_widelast", "deit_small_patch16_224")


def gmacs(model: torch.nn.Module, img_size: int) -> float:
    """Multiply-accumulates of one image, from PyTorch's FLOP counter (1 MAC = 2 FLOPs)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, img_size, img_size))
    return counter.get_total_flops() / 2 / 1e9


def seconds_per_batch(model: torch.nn.Module, batch: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        model(batch)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    models = {name: timm.create_model(name).eval() for name in MODELS}
    batch = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    for model in models.values():  # warm-up: allocator, kernels
        seconds_per_batch(model, batch)
    # Interleave the models in every repeat so drifting machine load hits all of them alike.
    times = {name: [] for name in MODELS}
    for _ in range(args.repeats):
        for name, model in models.items():
            times[name].append(seconds_per_batch(model, batch))

    rows = {}
    print(f"batch {args.batch_size}, {args.img_size}px, {args.threads} threads, median of {args.repeats}")
    print(f"{'model':<24}{'params (M)':>12}{'GMACs':>9}{'img/s':>9}")
    for name, model in models.items():
        params = sum(p.numel() for p in model.parameters()) / 1e6
        macs = gmacs(model, args.img_size)
        throughput = args.batch_size / statistics.median(times[name])
        rows[name] = (params, macs, throughput)
        print(f"{name:<24}{params:>12.3f}{macs:>9.3f}{throughput:>9.1f}")

    base, wide = rows["deit_tiny_patch16_224"], rows["deit_tiny_widelast"]
    flop_ratio = wide[1] / base[1]
    slowdown = base[2] / wide[2]
    print(f"widelast vs deit_tiny: FLOP ratio {flop_ratio:.3f}, measured slowdown {slowdown:.3f}, "
          f"slowdown / FLOP ratio = {slowdown / flop_ratio:.3f} (goal 0.90-1.10)")


if __name__ == "__main__":
    main()
