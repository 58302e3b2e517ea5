"""timm-widelast: Lift / WideLast students for timm (models, diagnostics, publishing, demo).

One entry point, one module per command group.

Each command module exposes ``add_commands(subparsers)``; each command sets
``func`` on its parser. User mistakes raise :class:`UserError` and are printed as
one line with a non-zero exit code.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from .errors import UserError

# Modules that contribute sub-commands; imported lazily so a broken optional
# dependency of one command group does not break the others.
COMMAND_MODULES = (
    "timm_widelast.models.commands",
    "timm_widelast.diagnostics.commands",
    "timm_widelast.hub.commands",
    "timm_widelast.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="timm-widelast", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
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
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
