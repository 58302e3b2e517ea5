"""`timm-widelast models`: what this package registers in timm, with sizes and pretrained tags."""
from __future__ import annotations

import argparse
import fnmatch

import timm
import torch

from ..errors import UserError
from ..utils import parse_kwargs

FAMILIES = ("*_lift", "*_widelast")


def _rejects_a_kwarg(err: TypeError) -> bool:
    # The constructor does not take a kwarg: it belongs to the other family, not a user mistake.
    return "unexpected keyword argument" in str(err)


def list_models(args: argparse.Namespace) -> int:
    """Print each registered student (optionally filtered) built with ``--model-kwargs``.

    Kwargs are applied to the models that take them (``lift_dim`` to Lift, ``wide_dim`` to
    WideLast); models that do not take them are listed as skipped.
    """
    names = sorted({n for pattern in FAMILIES for n in timm.list_models(pattern)})
    if args.pattern:
        names = [n for n in names if fnmatch.fnmatch(n, args.pattern)]
        if not names:
            raise UserError(f"no registered Lift/WideLast model matches {args.pattern!r}; "
                            "fix: run `timm-widelast models` to see the names")
    parsed = parse_kwargs(args.model_kwargs)
    rows, skipped = [], []
    for name in names:
        try:
            with torch.device("meta"):  # sizes only: no memory, no init cost
                model = timm.create_model(name, num_classes=args.num_classes, **parsed)
        except TypeError as err:
            if not _rejects_a_kwarg(err):
                raise UserError(f"cannot build {name} with {parsed}: {err}") from err
            skipped.append(name)
            continue
        except ValueError as err:
            raise UserError(f"cannot build {name} with {parsed}: {err}") from err
        params = sum(p.numel() for p in model.parameters()) / 1e6
        tags = [t.split(".", 1)[1] for t in timm.list_models(name, pretrained=True)]
        rows.append(f"{name:<22}{params:>12.3f}{model.num_features:>8}  {', '.join(tags)}")
    if not rows:
        raise UserError(f"no listed model takes all of {sorted(parsed)}; fix: give the kwargs of one family "
                        "(Lift: lift_dim, lift_start, lift_schedule; WideLast: wide_dim, wide_heads, block_dims)")
    print(f"{'model':<22}{'params (M)':>12}{'width':>8}  pretrained tags")
    print("\n".join(rows))
    if skipped:
        print(f"skipped (do not take {', '.join(sorted(parsed))}): {', '.join(skipped)}")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="list the Lift/WideLast models registered in timm")
    parser.add_argument("pattern", nargs="?", default=None, help="only names matching this glob, e.g. '*lift'")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--model-kwargs", nargs="*", metavar="K=V",
                        help="applied to the models that take them, e.g. lift_dim=320 or wide_dim=256")
    parser.set_defaults(func=list_models)
