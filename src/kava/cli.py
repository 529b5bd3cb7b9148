"""`kava` command line: a thin dispatcher.

Each subcommand lives in `kava/commands/<name>.py` and exposes `add_parser(subparsers)` (which registers
the subcommand and sets `func`) and the library calls it makes; the parsing stays here, the work stays in
the library so tests can call it directly.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Order is the order `kava --help` lists them in.
COMMANDS = [
    "demo",
    "train",
    "eval",
    "score",
    "report",
    "ask",
    "inspect",
    "export",
    "sweep",
    "presets",
    "data",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kava",
        description="KaVa: latent reasoning via compressed KV-cache distillation (and the cot/nocot/pccot/codi baselines).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"kava.commands.{name}")
        except ModuleNotFoundError as e:  # a command whose module is not written yet is simply not offered
            if e.name == f"kava.commands.{name}":
                continue
            raise
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    rc = args.func(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
