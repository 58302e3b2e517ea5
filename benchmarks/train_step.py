"""Distillation step cost: ours (eager and compiled) against the student step, the teacher forward and timm's KD.

    python benchmarks/train_step.py                                    # CPU: 112 px, batch 16, DeiT-S teacher
    python benchmarks/train_step.py --device cuda --amp bf16 --batch-size 256 --img-size 224 \\
        --teacher cait_s24_224 --compile                               # the GPU goal setting

Rows (medians over interleaved rounds, so load drifts hit all rows alike):

* student step: forward + label-smoothed CE + backward + AdamW, no teacher;
* teacher forward: the frozen teacher alone, no grad;
* ours: ``EndpointDistillationTask`` step, soft KD (a = 0.9, tau = 1) + endpoint feature loss (l = 0.2);
* timm KD: ``timm.task.LogitDistillationTask`` step on the same student/teacher pair (logits only);
* with ``--compile``: the student step and the teacher forward under ``torch.compile``, and ours after
  ``EndpointDistillationTask.compile()``.

Ratios: ``ours / (student + teacher)`` (eager; goal <= 1.05 on CPU, <= 1.02 on GPU) and
``timm KD / ours compiled`` (goal >= 1.6 on one H100/H200 at bf16, batch 256, 224 px, CaiT-S24 teacher).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time

import timm
import torch
import torch.nn.functional as F

import timm_widelast  # noqa: F401
from timm_widelast.distill import EndpointDistillationTask, FrozenTeacher


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", default="none", choices=["none", "bf16"], help="autocast dtype")
    p.add_argument("--compile", action="store_true", help="add the torch.compile rows")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode for the student step")
    p.add_argument("--teacher-compile-mode", default=None, help="mode for the frozen teacher (e.g. reduce-overhead)")
    p.add_argument("--teacher-bf16-weights", action="store_true",
                   help="also time ours with the teacher's weights held in bf16 (FrozenTeacher.hold_weights_in)")
    p.add_argument("-b", "--batch-size", type=int, default=16)
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--student", default="deit_tiny_widelast")
    p.add_argument("--teacher", default="deit_small_patch16_224")
    p.add_argument("--feat-loss", default="mse", choices=["mse", "spectral"])
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds (compilation happens here)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.teacher_bf16_weights and args.amp != "bf16":
        raise SystemExit("error: --teacher-bf16-weights compares against bf16 autocast; fix: add --amp bf16")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    size, n = args.img_size, args.num_classes
    student = timm.create_model(args.student, img_size=size, num_classes=n).to(device)
    teacher_model = timm.create_model(args.teacher, pretrained=False, img_size=size, num_classes=n).to(device).eval()
    teacher_model.requires_grad_(False)
    x = torch.randn(args.batch_size, 3, size, size, device=device)
    y = torch.randint(0, n, (args.batch_size,), device=device)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.amp == "bf16" \
        else contextlib.nullcontext

    def train_step(loss_fn, params):
        opt = torch.optim.AdamW(params, lr=1e-6)

        def step():
            with autocast():
                loss = loss_fn()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def student_step(model):
        return train_step(lambda: F.cross_entropy(model(x), y, label_smoothing=0.1), model.parameters())

    def teacher_forward(model):
        def forward():
            with torch.no_grad(), autocast():
                model(x)
        return forward

    def ours(student_, teacher_, compiled=False, bf16_teacher=False):
        frozen = FrozenTeacher(teacher_)
        if bf16_teacher:
            frozen.hold_weights_in(torch.bfloat16)
        task = EndpointDistillationTask(student_, frozen, criterion_kwargs=dict(smoothing=0.1),
                                        distill_loss_weight=0.9, temperature=1.0, feat_loss=args.feat_loss,
                                        feat_weight=0.2, probe_size=(size, size), device=device).to(device)
        if compiled:
            task.compile(backend=args.compile_backend, mode=args.compile_mode,
                         teacher_mode=args.teacher_compile_mode)
        task.train()
        return train_step(lambda: task(x, y)["loss"], task.trainable_module.parameters())

    def timm_kd(student_, teacher_):
        from timm.task import LogitDistillationTask
        task = LogitDistillationTask(student_, teacher_, criterion_kwargs=dict(smoothing=0.1),
                                     distill_loss_weight=0.9, task_loss_weight=0.1, temperature=1.0,
                                     device=device, verbose=False).to(device)
        task.train()
        return train_step(lambda: task(x, y)["loss"], task.trainable_module.parameters())

    cases = {
        "student step": student_step(student),
        "teacher forward": teacher_forward(teacher_model),
        "ours (eager)": ours(student, teacher_model),
        "timm LogitDistillationTask (eager)": timm_kd(student, copy.deepcopy(teacher_model)),
    }
    if args.teacher_bf16_weights:
        cases["ours, teacher weights bf16"] = ours(student, copy.deepcopy(teacher_model), bf16_teacher=True)
    if args.compile:
        # separate copies: compiling must not change what the eager rows run
        compile_kw = dict(backend=args.compile_backend, mode=args.compile_mode)
        cases["student step (compiled)"] = student_step(torch.compile(copy.deepcopy(student), **compile_kw))
        cases["teacher forward (compiled)"] = teacher_forward(torch.compile(
            copy.deepcopy(teacher_model), backend=args.compile_backend, mode=args.teacher_compile_mode, dynamic=False))
        cases["ours (compiled)"] = ours(copy.deepcopy(student), copy.deepcopy(teacher_model), compiled=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = {name: [] for name in cases}
    for round_ in range(args.warmup + args.repeats):
        for name, fn in cases.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if round_ >= args.warmup:
                times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(values) * 1e3 for name, values in times.items()}

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"{where}; torch {torch.__version__}, timm {timm.__version__}; batch {args.batch_size}, {size} px, "
          f"amp {args.amp}; student {args.student}, teacher {args.teacher}, feat loss {args.feat_loss}; "
          f"median of {args.repeats} after {args.warmup} warm-up rounds")
    print(f"{'row':40s} {'ms':>9s} {'img/s':>9s}")
    for name, value in med.items():
        print(f"{name:40s} {value:9.1f} {args.batch_size / value * 1e3:9.0f}")
    base = med["student step"] + med["teacher forward"]
    print(f"{'ours eager / (student + teacher)':40s} {med['ours (eager)'] / base:9.3f}")
    print(f"{'ours eager / timm KD eager':40s} {med['ours (eager)'] / med['timm LogitDistillationTask (eager)']:9.3f}")
    if args.teacher_bf16_weights:
        print(f"{'ours bf16-weight teacher / ours':40s} {med['ours, teacher weights bf16'] / med['ours (eager)']:9.3f}")
    if args.compile:
        print(f"{'timm KD eager / ours compiled':40s} "
              f"{med['timm LogitDistillationTask (eager)'] / med['ours (compiled)']:9.3f}  (speed-up)")
        compiled_base = med["student step (compiled)"] + med["teacher forward (compiled)"]
        print(f"{'ours compiled / (student + teacher) comp.':40s} {med['ours (compiled)'] / compiled_base:9.3f}")


if __name__ == "__main__":
    main()
