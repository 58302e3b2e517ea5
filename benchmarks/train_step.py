"""Distillation overhead on CPU: (a) student step, (b) teacher forward, (c) full distillation step.

    python benchmarks/train_step.py [--img-size 112] [--batch-size 16] [--repeats 15]

DeiT-Tiny-sized student (deit_tiny_widelast: 192 wide x 11 + one 384 block) and a DeiT-Small
teacher (384 wide, 12 blocks), both at a reduced image size. Prints medians and the ratios
c / (a + b) (goal <= 1.05: nothing beyond the two forwards) and feature loss on / off.
Rounds are interleaved (a, b, c, c_off, a, b, ...) so machine load drifts hit all equally.
"""
from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

import timm_widelast  # noqa: F401
from timm_widelast.distill import EndpointDistillationTask, FrozenTeacher


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--teacher", default="deit_small_patch16_224")
    p.add_argument("--feat-loss", default="mse", choices=["mse", "spectral"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    size = args.img_size
    student = timm.create_model("deit_tiny_widelast", img_size=size, num_classes=1000)
    teacher = FrozenTeacher(timm.create_model(args.teacher, pretrained=False, img_size=size, num_classes=1000))
    x = torch.randn(args.batch_size, 3, size, size)
    y = torch.randint(0, 1000, (args.batch_size,))

    def make(teacher_, **kw):
        task = EndpointDistillationTask(student, teacher_, criterion_kwargs=dict(smoothing=0.1), **kw)
        task.train()
        opt = torch.optim.AdamW(task.trainable_module.parameters(), lr=1e-6)

        def step():
            out = task(x, y)
            out["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    cases = {
        "a_student_step": make(None),
        "b_teacher_forward": lambda: teacher(x),
        "c_distill_step": make(teacher, distill_loss_weight=0.9, feat_loss=args.feat_loss, feat_weight=0.2),
        "c_feat_off_step": make(teacher, distill_loss_weight=0.9, feat_loss="none"),
    }
    times = {name: [] for name in cases}
    for round_ in range(args.warmup + args.repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            if round_ >= args.warmup:
                times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch_size}, {size}px, "
          f"student deit_tiny_widelast, teacher {args.teacher}, feat loss {args.feat_loss}, "
          f"median of {args.repeats} after {args.warmup} warmup")
    for name, value in med.items():
        print(f"{name:20s} {value:9.1f} ms")
    print(f"c / (a + b)          {med['c_distill_step'] / (med['a_student_step'] + med['b_teacher_forward']):9.3f}")
    print(f"feat on / off        {med['c_distill_step'] / med['c_feat_off_step']:9.3f}")


if __name__ == "__main__":
    main()
