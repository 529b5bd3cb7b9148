"""`kava train --config PRESET_OR_YAML [--set k=v ...]` and `kava train --resume RUN_DIR`."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a method (cot, nocot, pccot, codi, kava) from a preset or YAML")
    p.add_argument("--config", help="preset name (see `kava presets list`) or a YAML path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=1e-4 (repeatable)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run exactly where it stopped")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from kava.config import load_config
    from kava.train import resume_config, train

    if args.resume:
        if args.config or args.overrides:
            print("kava train: --resume takes the run's own config.yaml; drop --config/--set")
            return 2
        cfg = resume_config(args.resume)
    else:
        if not args.config:
            print("kava train: give --config PRESET_OR_YAML (or --resume RUN_DIR)")
            return 2
        cfg = load_config(args.config, args.overrides)
    run_dir = train(cfg, resume=args.resume, progress=not args.no_progress)
    print(f"run directory: {run_dir}")
    return 0
