"""`timm-widelast models`: what this package registers in timm, with sizes and pretrained tags."""
from __future__ import annotations

import argparse

import timm
import torch

from ..errors import UserError
from ..utils import parse_kwargs

FAMILIES = ("*_lift", "*_widelast")


def list_models(args: argparse.Namespace) -> int:
    names = sorted({n for pattern in FAMILIES for n in timm.list_models(pattern)})
    parsed = parse_kwargs(args.model_kwargs)
    print(f"{'model':<22}{'params (M)':>12}{'width':>8}  pretrained tags")
    for name in names:
        try:
            with torch.device("meta"):  # sizes only: no memory, no init cost
                model = timm.create_model(name, num_classes=args.num_classes, **parsed)
        except (TypeError, ValueError) as err:
            raise UserError(f"cannot build {name} with {parsed}: {err}") from err
        params = sum(p.numel() for p in model.parameters()) / 1e6
        tags = [t.split(".", 1)[1] for t in timm.list_models(name, pretrained=True)]
        print(f"{name:<22}{params:>12.3f}{model.num_features:>8}  {', '.join(tags)}")
    return 0



def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="list the Lift/WideLast models registered in timm")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--model-kwargs", nargs="*", metavar="K=V", help="e.g. lift_dim=320 or wide_dim=256")
    parser.set_defaults(func=list_models)
