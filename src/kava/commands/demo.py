"""`kava demo`: backbone (CoT) -> No-CoT and KaVa students -> evaluation table, on CPU in minutes."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="end-to-end demo on the synthetic task (CPU, minutes, no downloads)")
    p.add_argument("--output", default="runs/demo", help="where the runs, data and report go")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value of every stage (e.g. --set optim.max_steps=50)")
    p.add_argument("--eval-limit", type=int, default=300, help="test questions to evaluate")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from kava.tools.demo import run_demo

    run_demo(args.output, args.overrides, args.eval_limit, progress=not args.no_progress)
    return 0
