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
    from kava import __version__
    from kava.spec import METHODS

    parser = argparse.ArgumentParser(
        prog="kava",
        description=f"KaVa: latent reasoning via compressed KV-cache distillation (and the "
                    f"{'/'.join(m for m in METHODS if m != 'kava')} baselines).",
    )

    parser.add_argument("--version", action="version", version=f"kava {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
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


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "the input is wrong" (config, path, checkpoint, data, a missing optional package):
    one line and exit status 2. Anything else is a bug and keeps its traceback."""
    from kava.checkpoint.saved import CheckpointError
    from kava.config import ConfigError

    return (ConfigError, CheckpointError, OSError, ImportError, ValueError)


def training_failures() -> tuple[type[BaseException], ...]:
    """A training that stopped on its own terms (a non-finite loss under `run.nan_policy: stop`, with the last
    good state saved): one line naming the step and the term, and exit status 1."""
    from kava.train import NonFiniteLoss

    return (NonFiniteLoss,)


def one_line(e: BaseException) -> str:
    if isinstance(e, ModuleNotFoundError) and e.name and "." not in e.name:
        return f"the optional package {e.name!r} is not installed: pip install {e.name}"
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars: noise in logs
    try:
        rc = args.func(args)
    except user_errors() as e:
        if args.debug:
            raise
        print(f"kava {args.command}: error: {one_line(e)} (--debug shows the traceback)", file=sys.stderr)
        return 2
    except training_failures() as e:
        if args.debug:
            raise
        print(f"kava {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # kava train: a checkpoint was saved and the message says how to resume
        if args.debug:
            raise
        print(f"kava {args.command}: interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr, flush=True)
        return 128 + getattr(e, "signum", 2)
    finally:
        leave_process_group()
    return int(rc or 0)


def leave_process_group() -> None:
    """Under torchrun / accelerate launch, leave the process group before the interpreter exits. A gloo group
    still alive at exit could abort a rank after its work was done ("terminate called without an active
    exception", SIGABRT), and the launcher then failed the whole run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
