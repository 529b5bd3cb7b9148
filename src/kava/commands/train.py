"""`kava train --config PRESET_OR_YAML [--set k=v ...]` and `kava train --resume RUN_DIR`."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a method (cot, nocot, pccot, codi, kava) from a preset or YAML")
    p.add_argument("--config", help="preset name (see `kava presets list`) or a YAML path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=1e-4 (repeatable)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run exactly where it stopped")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config and the plan (data counts, steps, accumulation), then stop")
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
    if args.dry_run:
        print("\n".join(dry_run(cfg)))
        return 0
    run_dir = train(cfg, resume=args.resume, progress=not args.no_progress)
    print(f"run directory: {run_dir}")
    return 0


def dry_run(cfg) -> list[str]:
    """The resolved config and the training plan, without loading a model: the lines `--dry-run` prints."""
    import os
    from pathlib import Path

    from kava.data.format import Formatter
    from kava.data.pipeline import load_train_valid
    from kava.data.records import SkipLog
    from kava.training.progress import plan_lines
    from kava.checkpoint.rundir import run_name
    from kava.train import make_plan

    skips, valid_skips = SkipLog(strict=cfg.data.strict), SkipLog()
    train_recs, valid_recs, desc = load_train_valid(cfg, Path(cfg.run.output_dir) / "_data", skips, valid_skips)
    n = len(train_recs)
    how = "records (not tokenized: the tokenizer is built at the start of training)"
    if not (cfg.model.from_scratch is not None and not cfg.model.tokenizer and not cfg.model.init_from):
        from kava.checkpoint.load import load_tokenizer

        n = len(Formatter.from_config(cfg, load_tokenizer(cfg)).tokenize_all(train_recs, skips))
        how = "examples after the length limits"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    plan = make_plan(cfg, n, world)
    return [cfg.to_yaml().rstrip(), "", "plan:"] + plan_lines(
        cfg, plan, run_dir=Path(cfg.run.output_dir) / run_name(cfg), world=world, data_desc=desc,
        train_desc=f"{n} {how}; {skips.summary()}", n_valid=len(valid_recs), valid_skips=valid_skips)
