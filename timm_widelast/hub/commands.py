"""CLI: `timm-widelast export`, `card`, `cards --paper`, `push`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import UserError
from ..io import atomic_write
from ..utils import parse_kwargs


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ema", action="store_true", help="use the EMA weights (model_ema.safetensors / 'model_ema')")
    p.add_argument("--model", default=None, help="model name (default: args.yaml's model)")
    p.add_argument("--model-kwargs", nargs="*", default=[], metavar="K=V",
                   help="model kwargs, e.g. lift_dim=320 (override args.yaml's)")
    p.add_argument("--report", default=None, help="SEP report folder (default: one found inside the run)")
    p.add_argument("--repo-id", default=None, help="Hub repo the card's snippets name (push fills it in otherwise)")
    p.add_argument("--metric-row", choices=("last", "best"), default="last",
                   help="last: the run's final weights with the last epoch's metrics; best: the run's best/ "
                        "weights with the best epoch's metrics")


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export

    out = export(args.source, args.out, ema=args.ema, model_name=args.model,
                 model_kwargs=parse_kwargs(args.model_kwargs), report=args.report, label_names=args.label_names,
                 repo_id=args.repo_id, metric_row=args.metric_row, overwrite=args.overwrite)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    print(f"exported {out} ({len(files)} files: {', '.join(files)})")
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    from . import cards

    if args.paper:
        by_name = {c.name: c for c in cards.PAPER_CONFIGS}
        if args.paper not in by_name:
            raise UserError(f"unknown paper configuration {args.paper!r}; fix: use one of {', '.join(by_name)}")
        text = str(cards.render_card(cards.paper_card_info(by_name[args.paper])))
    else:
        if not args.source:
            raise UserError("no source; fix: pass a run folder, export folder or checkpoint, or --paper NAME")
        from .export import REPORT_FOLDER, build_model, resolve_source, run_card_info

        source = resolve_source(args.source, ema=args.ema, report=args.report, metric_row=args.metric_row)
        model, name, kwargs = build_model(source, args.model, parse_kwargs(args.model_kwargs))
        folder = REPORT_FOLDER
        if source.report_dir is not None:
            # Paths relative to where the card is written, so the figure shows on a rendered page.
            base = Path(args.out).parent if args.out else Path.cwd()
            try:
                folder = Path(source.report_dir).absolute().relative_to(base.absolute()).as_posix()
            except ValueError:
                folder = str(source.report_dir)
        info = run_card_info(model, name, kwargs, source, repo_id=args.repo_id, report_folder=folder)
        text = str(cards.render_card(info))
    if args.out:
        atomic_write(args.out, text + "\n")
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text + "\n")
    return 0


def cmd_cards(args: argparse.Namespace) -> int:
    from .cards import write_paper_cards

    if not args.paper:
        raise UserError("only the paper's cards are generated in bulk; fix: pass --paper "
                        "(use `timm-widelast card RUN` or `export` for a run)")
    written = write_paper_cards(Path(args.out))
    print(f"wrote {len(written)} cards and {Path(args.out) / 'README.md'}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from .push import push

    result = push(args.folder, args.repo_id, token=args.token, private=args.private, revision=args.revision,
                  create_pr=args.create_pr, commit_message=args.commit_message, dry_run=args.dry_run)
    if args.dry_run:
        total = sum(size for _, size in result.files)
        print(f"would upload {len(result.files)} files ({total / 1e6:.2f} MB) to {result.repo_id} in one commit:")
        for rel, size in result.files:
            note = f"  [{result.notes[rel]}]" if rel in result.notes else ""
            print(f"  {rel}  ({size} bytes){note}")
    else:
        print(f"pushed {args.folder} to {args.repo_id}: {result}")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="write a Hub-ready folder (weights, config.json, card, record)",
                              description="Write a folder that timm loads as it is (local-dir: / hf-hub:).")
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT", help="training run folder, export folder or checkpoint")
    p.add_argument("--out", required=True, help="export folder to create")
    _add_model_args(p)
    p.add_argument("--label-names", default=None, help="class names: text file (one per line) or JSON list/dict")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (atomically)")
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser("card", help="render one model card (README.md) from a run or a paper configuration")
    p.add_argument("source", nargs="?", metavar="RUN_OR_CHECKPOINT", help="run folder, export folder or checkpoint")
    p.add_argument("--paper", default=None, metavar="NAME",
                   help="a paper configuration instead, e.g. deit_tiny_widelast.cait_s24_softkd_mse_in1k")
    p.add_argument("--out", default=None, help="file to write (default: stdout)")
    _add_model_args(p)
    p.set_defaults(func=cmd_card)

    p = subparsers.add_parser("cards", help="regenerate the paper's cards (hub_cards/)")
    p.add_argument("--paper", action="store_true", help="the cards of the paper's configurations")
    p.add_argument("--out", default="hub_cards", help="folder (default: hub_cards)")
    p.set_defaults(func=cmd_cards)

    p = subparsers.add_parser("push", help="upload an export folder to the Hugging Face Hub in one commit")
    p.add_argument("folder", help="folder written by `timm-widelast export`")
    p.add_argument("--repo-id", required=True, help="ORG_OR_USER/NAME")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", default=None, help="branch to commit to (created when missing)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--commit-message", default=None, help="default: 'Add timm-widelast model'")
    p.add_argument("--dry-run", action="store_true", help="list what would be uploaded; no network")
    p.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login)")
    p.set_defaults(func=cmd_push)
