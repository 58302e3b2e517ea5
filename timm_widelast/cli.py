"""timm-widelast: Lift / WideLast students for timm (train, validate, models, diagnostics, publishing, demo).

One entry point, one module per command group. ``train`` hands its arguments untouched to the
trainer (the flags of ``train_distill.py``, which keeps its own parser and ``-h``).

Each command module exposes ``add_commands(subparsers)``; each command sets
``func`` on its parser. User mistakes raise :class:`UserError` and are printed as
one line with a non-zero exit code.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional, Sequence

from .errors import UserError

# Modules that contribute sub-commands; imported lazily so a broken optional
# dependency of one command group does not break the others.
COMMAND_MODULES = (
    "timm_widelast.validate",
    "timm_widelast.models.commands",
    "timm_widelast.diagnostics.commands",
    "timm_widelast.hub.commands",
    "timm_widelast.demo",
)


def _add_train_command(subparsers: argparse._SubParsersAction) -> None:
    # Listed here for `timm-widelast -h`; main() routes `train ...` to the trainer before parsing, so
    # options such as -c/-h reach the trainer's own parser.
    p = subparsers.add_parser("train", add_help=False, help="distill or train a student (the flags of "
                              "train_distill.py; -c NAME picks a packaged recipe; train -h lists them)")
    p.add_argument("trainer_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda args: _train(args.trainer_args))


def _train(argv: Sequence[str]) -> int:
    from .distill.trainer import main as trainer_main

    return trainer_main(list(argv), prog="timm-widelast train")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="timm-widelast", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train_command(subparsers)
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name == module_name:
                continue  # command group not present in this build
            raise
        module.add_commands(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        return _train(argv[1:])  # the trainer reports its own errors (one line, exit 2/3)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except UserError as err:
        if os.environ.get("RANK", "0") == "0":  # every process of a launch hits it; the user sees one line
            print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
