"""`regdrop-fast` command line: one subcommand per job, each defined in its own module
exposing `add_parser(subparsers)` (which sets `func`) so this file only routes."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module defining add_parser(subparsers)
SUBCOMMANDS = {
    "bench": "regdrop_fast.benchmarking.cli",
    "build-ext": "regdrop_fast._extension",
    "finetune": "regdrop_fast.finetune.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regdrop-fast", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # a job not built yet is simply not offered
        module.add_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
