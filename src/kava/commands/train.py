"""`kava train --config PRESET_OR_YAML [--set k=v ...]` and `kava train --resume RUN_DIR`."""

from __future__ import annotations


def add_parser(sub) -> None:
    from kava.spec import METHODS

    p = sub.add_parser("train", help=f"train a method ({', '.join(METHODS)}) from a preset or YAML")
    p.add_argument("--config", help="preset name (see `kava presets list`) or a YAML path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=1e-4 (repeatable)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run exactly where it stopped "
                                                      "(with --set optim.max_steps=N: extend it to N steps)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config and the plan (data counts, steps, accumulation), then stop")
    p.set_defaults(func=run)


def run(args) -> int:
    import sys

    from kava.config import load_config
    from kava.train import plan_only, resume_config, resume_plan, train

    if args.resume:
        if args.config:
            print("kava train: --resume takes the run's own config.yaml; drop --config", file=sys.stderr)
            return 2
        cfg = resume_plan(args.resume, resume_config(args.resume), args.overrides)
        if cfg is None:
            return 0
    else:
        if not args.config:
            print("kava train: give --config PRESET_OR_YAML (or --resume RUN_DIR)", file=sys.stderr)
            return 2
        cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        print("\n".join(plan_only(cfg)))
        return 0
    run_dir = train(cfg, resume=args.resume, progress=not args.no_progress)
    print(f"run directory: {run_dir}")
    return 0
