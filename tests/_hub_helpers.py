"""Shared fixtures for the publishing tests: a tiny trained run folder and its export."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Dict, Sequence

import torch
import yaml
from safetensors.torch import save_file

TINY_KWARGS: Dict = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, wide_dim=64, wide_heads=2,
                         num_classes=10)
# 1x1 transparent PNG
PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                    "1f15c4890000000d49444154789c6360000002000001e221bc330000000049454e44ae426082")


def run_cli(argv: Sequence[str]) -> int:
    """The real CLI entry point, with only the publishing commands registered (other groups are not under test)."""
    from timm_widelast import cli

    saved = cli.COMMAND_MODULES
    cli.COMMAND_MODULES = ("timm_widelast.hub.commands",)
    try:
        return cli.main(argv)
    finally:
        cli.COMMAND_MODULES = saved


def folder_files(folder: Path) -> Dict[str, bytes]:
    """Every file under ``folder`` (relative POSIX path -> bytes), to compare a folder before and after."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def tiny_model():
    import timm

    import timm_widelast  # noqa: F401

    torch.manual_seed(0)
    return timm.create_model("deit_tiny_widelast", **TINY_KWARGS)


def eval_data():
    """The 16 images and labels the tiny runs train and evaluate on."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)


def top1_top5(model, x, y):
    """Top-1/top-5 (%) of ``model`` on (x, y), counted by hand from the logits."""
    with torch.no_grad():
        logits = model.eval()(x)
    order = logits.argsort(dim=1, descending=True)[:, :5]
    top1 = 100.0 * sum(int(order[i, 0] == y[i]) for i in range(len(y))) / len(y)
    top5 = 100.0 * sum(int(y[i] in order[i].tolist()) for i in range(len(y))) / len(y)
    return top1, top5


def train_tiny(model, epochs: int = 3):
    """Epochs of Adam steps on 16 images, evaluated on them after each epoch, with an EMA of the weights.

    The last epoch climbs the loss instead, so the best epoch is not the last one (as when a run
    overfits): each of final / best / EMA weights then has its own, different metrics.
    Returns (summary rows, best epoch's state dict, EMA state dict).
    """
    import copy

    x, y = eval_data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ema = copy.deepcopy(model)
    rows, best_state, best_top1 = [], None, -1.0
    for epoch in range(epochs):
        model.train()
        sign = -1.0 if epoch == epochs - 1 else 1.0
        for _ in range(8):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            (sign * loss).backward()
            opt.step()
        with torch.no_grad():
            for e, p in zip(ema.state_dict().values(), model.state_dict().values()):
                if e.is_floating_point():
                    e.mul_(0.5).add_(p, alpha=0.5)
        top1, top5 = top1_top5(model, x, y)
        ema_top1, ema_top5 = top1_top5(ema, x, y)
        if top1 > best_top1:
            best_top1, best_state = top1, {k: v.clone() for k, v in model.state_dict().items()}
        rows.append({"epoch": epoch, "train_loss": f"{loss.item():.6f}", "eval_loss": f"{loss.item():.6f}",
                     "eval_top1": f"{top1:.4f}", "eval_top5": f"{top5:.4f}", "ema_top1": f"{ema_top1:.4f}",
                     "ema_top5": f"{ema_top5:.4f}", "lr": 0.01})
    model.eval()
    return rows, best_state, ema.state_dict()


def make_run(root: Path) -> Dict:
    """run/ laid out as our trainer lays it out (final model.safetensors, best/, ema/; no config.json), with
    args.yaml, summary.csv (raw and EMA columns, each measured on its weights) and a SEP report folder."""
    run = root / "run"
    run.mkdir(parents=True)
    model = tiny_model()
    rows, best, ema = train_tiny(model)
    save_file(model.state_dict(), str(run / "model.safetensors"))
    for name, state in (("best", best), ("ema", ema)):
        (run / name).mkdir()
        save_file({k: v.contiguous() for k, v in state.items()}, str(run / name / "model.safetensors"))
    args = {"model": "deit_tiny_widelast", "model_kwargs": {k: v for k, v in TINY_KWARGS.items() if k != "num_classes"},
            "num_classes": 10, "img_size": 32, "kd_model_name": "cait_s24_224", "kd_model_tag": "fb_dist_in1k",
            "kd_alpha": 0.9, "kd_temperature": 1.0, "feature_loss": "mse", "feat_weight": 0.2, "epochs": 3,
            "batch_size": 16, "lr": 0.01, "opt": "adam", "dataset": "random-tensors", "smoothing": 0.1,
            "data_dir": str(root / "private" / "random-tensors"), "output": str(root)}
    (run / "args.yaml").write_text(yaml.safe_dump(args), encoding="utf-8")
    with (run / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    report = run / "sep_report"
    report.mkdir()
    (report / "report.json").write_text(json.dumps({
        "schema": "timm-widelast/sep-report/v1",
        "model": {"name": "deit_tiny_widelast", "label": "tiny", "dim": 64, "tap": "blocks.1", "tokens": 16,
                  "checkpoint": str(run / "model.safetensors")},
        "data": {"num_images": 8, "source": f"{root}/images (center, 8 files)"},
        "settings": {"thresholds": [0.8, 0.9, 0.95, 0.99], "percentiles": [99]},
        "svd": {"percentiles": {"99": [1, 2, 3, 7]}},
        "pca": {"percentiles": {"99": [5, 9, 14, 30]}},
        "sep": {"levels": [50, 60, 70, 80, 90], "d": [32, 39, 45, 52, 58], "b": [0.5, 0.61, 0.703, 0.812, 0.906]},
    }), encoding="utf-8")
    (report / "report.md").write_text(f"# SEP report: tiny\n\nimages: `{root}/images`\n", encoding="utf-8")
    (report / "sep_curve.png").write_bytes(PNG)
    return {"run": run, "model": model, "rows": rows, "ema": ema, "best": best, "args": args}


def make_run_and_export(root: Path) -> Dict:
    """The run folder and one export of it (raw weights); tests wrap this in a session fixture."""
    from timm_widelast.hub.export import export

    info = make_run(root)
    info["export"] = export(info["run"], root / "export")
    return info
