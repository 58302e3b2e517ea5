"""CLI: `timm-widelast sep`, `timm-widelast compare`, `timm-widelast advise`."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..errors import UserError

EPILOG_SEP = """examples:
  timm-widelast sep cait_s24_224 --images /data/imagenet/val --protocol paper1000 --out reports/cait
  timm-widelast sep deit_tiny_widelast --checkpoint RUN/model.safetensors --images ./imgs --out reports/wl
  timm-widelast sep deit_small_patch16_224 --layers all --images ./imgs --out reports/deit_s_sweep
  timm-widelast sep cait_s24_224 --pretrained-file cait_s24.safetensors --images ./imgs --out reports/cait
  timm-widelast sep vit_small_patch16_224 --dataset torch/cifar10 --data-dir ./cifar --out reports/vit
  accelerate launch -m timm_widelast.cli sep ...   (several processes: same numbers, faster)"""
EPILOG_ADVISE = """The student must reach both the teacher's shared-subspace width (dataset-PCA d) and its
SEP bandwidth (b_a x D channels); otherwise a fixed linear adapter cannot carry the teacher's
tokens, and the advice is a teacher-width endpoint (WideLast or Lift)."""


def _layer(value: str) -> int | str:
    try:
        return int(value)
    except ValueError:
        return value


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sep", help="sample-SVD, dataset-PCA and SEP report of a model's tokens",
                              description="Write report.json, report.md and PNG plots of the SVD/PCA/SEP "
                                          "diagnostics (arXiv 2511.15572) for a timm model.",
                              epilog=EPILOG_SEP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="timm model name (also hf-hub:org/name, local-dir:PATH, our deit_tiny_lift...)")
    src = p.add_argument_group("images")
    src.add_argument("--images", help="folder of images (searched recursively)")
    src.add_argument("--protocol", choices=("all", "paper1000"), default="all",
                     help="paper1000: first file (by name) of every class sub-folder of --images")
    src.add_argument("--dataset", help="timm dataset name instead of --images, e.g. torch/cifar10 or hfds/...")
    src.add_argument("--data-dir", help="root for --dataset")
    src.add_argument("--split", default="validation", help="split of --dataset (default validation)")
    src.add_argument("--num-images", type=int, help="analyse only the first N images")
    src.add_argument("--on-bad-image", choices=("skip", "stop"), default="skip",
                     help="unreadable image: skip it with a warning (counted in the report) or stop")
    mod = p.add_argument_group("model")
    mod.add_argument("--checkpoint", help="weights (.safetensors, or a torch file read with weights_only=True), "
                     "or a run/export folder; the config.json beside them supplies the model kwargs")
    mod.add_argument("--pretrained-file", metavar="FILE",
                     help="pretrained weights from a local file instead of the Hub "
                          "(timm's pretrained_cfg_overlay=dict(file=FILE)); for offline machines")
    mod.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None,
                     help="load timm's pretrained weights (default: yes unless --checkpoint is given)")
    mod.add_argument("--model-kwargs", nargs="*", default=[], metavar="K=V", help="extra timm.create_model kwargs")
    mod.add_argument("--label", help="name shown in tables and plots (default: the model name)")
    mod.add_argument("--layer", type=_layer, help="block index or module name to tap (default: last token block)")
    mod.add_argument("--layers", type=_layer, nargs="+", metavar="L",
                     help="per-layer sweep in one pass: 'all' blocks, or block indices / module names; "
                          "writes report.md (one row per layer), sweep.json, depth.png and layers/NAME/")
    mod.add_argument("--tokens", choices=("patch", "all"), default="patch",
                     help="patch: drop class/register tokens (paper); all: keep them")
    st = p.add_argument_group("statistics")
    st.add_argument("--thresholds", type=float, nargs="+", default=[0.8, 0.9, 0.95, 0.99], help="energy fractions")
    st.add_argument("--percentiles", type=float, nargs="+", default=[99, 50], help="percentiles over images")
    st.add_argument("--centre", action="store_true", help="centre the PCA (covariance instead of second moment)")
    st.add_argument("--sep-mode", choices=("full", "folded"), default="full", help="two-sided (paper) or folded")
    st.add_argument("--sep-levels", type=float, nargs="+", default=[50, 60, 70, 80, 90], help="SEP levels a (%%)")
    st.add_argument("--permutations", type=int, default=50,
                    help="random channel orders for the SEP robustness check (the release's 50; 0 skips it)")
    st.add_argument("--permutation-seed", type=int, default=2026,
                    help="numpy default_rng seed of the permutations (the release's 2026)")
    st.add_argument("--seed", type=int, default=0, help="torch seed for a randomly initialised model")
    ex = p.add_argument_group("execution")
    ex.add_argument("--device", help="torch device (default: the accelerate/CUDA device, else cpu)")
    ex.add_argument("--batch-size", type=int, default=32)
    ex.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                    help="model dtype; the statistics are always accumulated in float64")
    ex.add_argument("--workers", type=int, default=2, help="data-loading worker processes")
    ex.add_argument("--pass2", choices=("auto", "cache", "rerun"), default="auto",
                    help="PCA pass 2 from a temporary float32 token file (exact, one forward) or by re-running")
    ex.add_argument("--cache-limit-gb", type=float, default=4.0, help="auto: largest token file to write")
    ex.add_argument("--cache-dir", help="where the temporary token file goes (default: system temp)")
    ex.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    ex.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="report folder")
    p.set_defaults(func=run_sep)

    c = subparsers.add_parser("compare", help="merge several SEP reports into one table and one SEP figure")
    c.add_argument("reports", nargs="+", help="report folders (or report.json files)")
    c.add_argument("--out", required=True, help="folder for compare.md, compare.json, sep_compare.png")
    c.add_argument("--percentile", type=float, default=99)
    c.set_defaults(func=run_compare)

    a = subparsers.add_parser("advise", help="does a student width hold the teacher's shared subspace?",
                              epilog=EPILOG_ADVISE)
    a.add_argument("report", help="the teacher's report folder (or report.json)")
    # read as text and checked in run_advise: a bad value gives one error line, not argparse's usage
    a.add_argument("--student-width", required=True, metavar="W", help="the student's width (channels)")
    a.add_argument("--energy", type=float, default=0.95, help="energy threshold (one of the report's)")
    a.add_argument("--percentile", type=float, default=99)
    a.add_argument("--sep-level", type=float, default=90, help="SEP level a (one of the report's), percent")
    a.add_argument("--json", action="store_true", help="print the advice as JSON")
    a.set_defaults(func=run_advise)


def _init_processes(device: str | None):
    """Set up accelerate's process group when launched with several processes.

    ``--device cpu`` means CPU processes (gloo), even on a machine with GPUs: otherwise
    accelerate would put each rank on a GPU of its own, and a 1-GPU machine has only one.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        return PartialState(cpu=device == "cpu")
    return None


def run_sep(args: argparse.Namespace) -> int:
    import torch

    from ..utils import parse_kwargs
    from .data import ImageFiles, TimmDataset, list_images, paper1000_images
    from .extract import build_model
    from .report import model_data_config, model_transform, run_report, run_sweep, short_model_name

    if bool(args.images) == bool(args.dataset):
        raise UserError("give exactly one image source; fix: pass --images DIR or --dataset NAME")
    if args.protocol == "paper1000" and not args.images:
        raise UserError("--protocol paper1000 needs an ImageNet-style folder; fix: pass --images VAL_DIR")
    if args.num_images is not None and args.num_images < 1:
        raise UserError(f"--num-images {args.num_images} must be at least 1; fix: pass a positive number")
    if args.layers is not None and args.layer is not None:
        raise UserError("--layer and --layers both given; fix: use --layer for one report, --layers for a sweep")
    if args.pretrained_file and args.checkpoint:
        raise UserError("--pretrained-file and --checkpoint both given; fix: pass one source of weights")
    state = _init_processes(args.device)
    kwargs = parse_kwargs(args.model_kwargs)
    # a randomly initialised model must be the same in every process (and every run)
    torch.manual_seed(args.seed)
    model = build_model(args.model, args.checkpoint, args.pretrained, kwargs, args.pretrained_file)
    transform = model_transform(model)
    if args.images:
        files = paper1000_images(args.images) if args.protocol == "paper1000" else list_images(args.images)
        images = ImageFiles(files, transform, root=Path(args.images))
        source = f"{args.images} ({args.protocol}, {len(files)} files)"
    else:
        images = TimmDataset(args.dataset, args.data_dir, args.split, transform)
        source = f"timm dataset {args.dataset} ({args.split})"
    # several processes: each rank on its own device (a bare "cuda" would put them all on cuda:0)
    device = state.device if state is not None and args.device in (None, "cuda") else args.device
    meta = {"model": {"name": args.model, "label": args.label or short_model_name(args.model),
                      "checkpoint": args.checkpoint, "pretrained_file": args.pretrained_file,
                      "pretrained": bool(args.pretrained_file) or bool(
                          args.pretrained if args.pretrained is not None else not args.checkpoint),
                      "model_kwargs": kwargs, "data_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in
                                                               model_data_config(model).items()}},
            "data": {"source": source, "protocol": args.protocol}}
    settings = dict(token_policy=args.tokens, thresholds=args.thresholds, percentiles=args.percentiles,
                    centre=args.centre, sep_mode=args.sep_mode, sep_levels=args.sep_levels,
                    permutations=args.permutations, permutation_seed=args.permutation_seed,
                    batch_size=args.batch_size, num_workers=args.workers, device=device, dtype=args.dtype,
                    num_images=args.num_images, on_bad_image=args.on_bad_image, pass2=args.pass2,
                    cache_limit_gb=args.cache_limit_gb, cache_dir=args.cache_dir, progress=not args.no_progress,
                    plots=not args.no_plots, meta=meta)
    if args.layers is not None:
        sweep = run_sweep(model, images, args.out, layers=args.layers, **settings)
        reports = sweep["reports"]
    else:
        reports = [run_report(model, images, args.out, layer=args.layer, **settings)]
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank == 0:
        from .report import markdown_tables

        if args.layers is not None:
            print(markdown_tables(reports, args.percentiles[0], row_label=lambda r: r["model"]["tap"],
                                  first_column="layer"))
        else:
            print(markdown_tables(reports, args.percentiles[0]))
        data = reports[0]["data"]
        print(f"report written to {args.out} ({data['num_images']} images, {data['num_skipped']} skipped, "
              f"{len(reports)} layer(s), {reports[0]['timing']['seconds']:.1f} s)")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from .compare import compare_reports
    from .report import load_report, markdown_tables

    compare_reports(args.reports, args.out, args.percentile)
    print(markdown_tables([load_report(p) for p in args.reports], args.percentile))
    print(f"comparison written to {args.out}")
    return 0


def run_advise(args: argparse.Namespace) -> int:
    from .compare import advise_width
    from .report import load_report

    try:
        width = int(args.student_width)
    except ValueError:
        raise UserError(f"--student-width {args.student_width!r} is not a whole number; "
                        "fix: pass the student's channel count, e.g. --student-width 192") from None
    advice = advise_width(load_report(args.report), width, args.energy, args.percentile, args.sep_level)
    for warning in advice["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    if args.json:
        json.dump(advice, sys.stdout, indent=1)
        print()
    else:
        verdict = "reaches" if advice["fits"] else "does NOT reach"
        print(f"{advice['model']}: width {advice['student_width']} {verdict} the {advice['minimum_width']} "
              f"channels the teacher's tokens need (shared subspace {advice['pca_width']}: PCA d = "
              f"{advice['pca_d']:g} at {100 * advice['energy']:g}% energy, p{advice['percentile']:g}; SEP bandwidth "
              f"{advice['sep_width']}: b_{advice['sep_level']:g} = {advice['sep_b']:.3f}; teacher width "
              f"{advice['teacher_width']})")
        rec = {"feature-kd": "plain feature KD", "widelast": "WideLast"}[advice["recommendation"]]
        print(f"recommendation: {rec} at width {advice['recommended_width']}"
              + (f" (alternative: Lift at width {advice['recommended_width']})" if advice["alternative"] else ""))
        print(advice["reason"])
    return 0
