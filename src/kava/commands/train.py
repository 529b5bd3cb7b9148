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
    from kava.train import resume_config, train

    if args.resume:
        if args.config:
            print("kava train: --resume takes the run's own config.yaml; drop --config", file=sys.stderr)
            return 2
        cfg = resume_config(args.resume)
        cfg = resume_plan(args.resume, cfg, args.overrides)
        if cfg is None:
            return 0
    else:
        if not args.config:
            print("kava train: give --config PRESET_OR_YAML (or --resume RUN_DIR)", file=sys.stderr)
            return 2
        cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        print("\n".join(dry_run(cfg)))
        return 0
    run_dir = train(cfg, resume=args.resume, progress=not args.no_progress)
    print(f"run directory: {run_dir}")
    return 0


def resume_plan(run_dir, cfg, overrides: list[str]):
    """What `--resume RUN [--set optim.max_steps=N]` continues: the run's config (None: a finished run, nothing
    to do, said so). `optim.max_steps` is the one key a resume may change: N beyond the run's end extends it
    (config.yaml rewritten, DONE removed, the LR schedule's end moved to N, said so; a run in use is refused
    before any of that); any other key is refused."""
    import json
    import os
    from pathlib import Path

    from kava.checkpoint.rundir import RunLock
    from kava.checkpoint.state import latest_checkpoint
    from kava.config import ConfigError, load_config, parse_override, save_config

    run_dir = Path(run_dir)
    new = load_config(str(run_dir / "config.yaml"), overrides, resolve_paths=False) if overrides else cfg
    a, b = cfg.to_dict(), new.to_dict()
    a["optim"]["max_steps"] = b["optim"]["max_steps"]
    if a != b:
        keys = ", ".join(parse_override(o)[0] for o in overrides)
        raise ConfigError(f"--resume takes the run's own config.yaml; --set may change only optim.max_steps "
                          f"(to extend the run), got {keys}")
    done = json.loads((run_dir / "DONE").read_text()) if (run_dir / "DONE").exists() else None
    if not overrides or new.optim.max_steps == cfg.optim.max_steps:
        if done is not None:
            print(f"kava train: {run_dir} is finished ({done['steps']} steps; DONE); nothing to do. To train it "
                  f"further: kava train --resume {run_dir} --set optim.max_steps=N")
            return None
        return cfg
    ck = latest_checkpoint(run_dir)
    at = json.loads((ck / "state.json").read_text())["step"] if ck is not None else 0
    meta_p = run_dir / "meta.json"
    meta = json.loads(meta_p.read_text()) if meta_p.exists() else {}
    before = done["steps"] if done else (meta.get("plan") or {}).get("total_steps", cfg.optim.max_steps)
    if new.optim.max_steps <= at:
        raise ConfigError(f"optim.max_steps={new.optim.max_steps}: {run_dir} is already at step {at}; give more steps")
    # the run's files change only under its lock (a run in use is refused untouched); the main process alone
    # writes them (no Accelerator yet: RANK is what a launcher sets) and `train` takes the lock again after
    main = int(os.environ.get("RANK", "0")) == 0
    with RunLock(run_dir, enabled=main):
        if main:
            save_config(new, run_dir / "config.yaml")
            (run_dir / "DONE").unlink(missing_ok=True)
            if meta:
                meta.setdefault("extended", []).append({"from_steps": before, "to_steps": new.optim.max_steps,
                                                        "at_step": at})
                meta_p.write_text(json.dumps(meta, indent=2))
    print(f"[kava] extending {run_dir}: optim.max_steps {before} -> {new.optim.max_steps} from step {at}; the LR "
          f"schedule ({new.optim.schedule}, warmup {new.optim.warmup_ratio:g} of the steps) now ends at step "
          f"{new.optim.max_steps}, so the learning rate from step {at} on follows the new schedule", flush=True)
    return new


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
