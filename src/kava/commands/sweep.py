"""`kava sweep --configs A,B --seeds 42,123,456 [--grid KEY=V1,V2 ...] [--set KEY=VALUE ...]`.

Local (default): train the runs one after another (done runs skipped, interrupted ones resumed).
`--dry-run`: print the plan. `--slurm`: write one sbatch script per run and `submit_all.sh`.
"""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("sweep", help="run a matrix of presets x seeds x grid values (locally or as SLURM jobs)")
    p.add_argument("--configs", required=True,
                   help="comma list of presets or YAML paths, e.g. llama1b_aug,qwen05b_aug")
    p.add_argument("--seeds", default="42,123,456", help="comma list of seeds (default: the paper's 42,123,456)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="sweep a config key over values, e.g. --grid loss.kv_supervision=last,all (repeatable: product)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="fixed override applied to every run (repeatable)")
    p.add_argument("--output-dir", help="parent of the run dirs (sets run.output_dir; default: each config's)")
    p.add_argument("--dry-run", action="store_true", help="print name, status (done/resume/restart/new), overrides")
    p.add_argument("--eval-datasets", help="after training, `kava eval` each run on these (comma list)")
    p.add_argument("--data-dir", help="data root for --eval-datasets (see `kava eval --data-dir`)")
    p.add_argument("--hub", action="store_true", help="read --eval-datasets from the Hugging Face hub")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (local mode)")
    s = p.add_argument_group("SLURM (with --slurm: write scripts instead of training)")
    s.add_argument("--slurm", action="store_true")
    s.add_argument("--script-dir", default="slurm", help="where the .sbatch scripts and submit_all.sh go")
    s.add_argument("--partition")
    s.add_argument("--nodes", type=int, default=1)
    s.add_argument("--gpus-per-node", type=int, default=1)
    s.add_argument("--cpus-per-task", type=int, default=8, help="CPUs of the one task per node")
    s.add_argument("--time", default="24:00:00")
    s.add_argument("--log-dir", help="job logs (default SCRIPT_DIR/logs)")
    s.add_argument("--env-setup", help="shell line(s) before the launch (default: activate the current venv)")
    p.set_defaults(func=run)


def run(args) -> int:
    import sys

    from kava.config import ConfigError
    from kava.tools.sweep import (SlurmOptions, check_evals, check_resumable, expand, parse_grid, parse_seeds,
                                  plan_lines, run_local, split_list, write_slurm)

    evals = split_list(args.eval_datasets or "")
    try:
        runs = expand(split_list(args.configs), parse_seeds(args.seeds), parse_grid(args.grid), args.overrides,
                      args.output_dir)
        data_dir = check_evals(runs, evals, args.data_dir, args.hub)  # before hours of training
        if args.dry_run:
            print("\n".join(plan_lines(runs)))
            check_resumable(runs)
            return 0
        if args.slurm:
            if args.nodes < 1 or args.gpus_per_node < 1:
                raise ConfigError("--nodes and --gpus-per-node must be >= 1")
            opts = SlurmOptions(args.partition, args.nodes, args.gpus_per_node, args.cpus_per_task, args.time,
                                args.log_dir, args.env_setup)
            scripts, sub = write_slurm(runs, opts, args.script_dir, eval_datasets=evals, data_dir=data_dir,
                                       hub=args.hub)
            print(f"{len(scripts)} scripts in {args.script_dir} ({len(runs) - len(scripts)} runs already DONE); "
                  f"submit with: bash {sub}")
            return 0
        result = run_local(runs, eval_datasets=evals, data_dir=data_dir, hub=args.hub,
                           progress=not args.no_progress)
    except ConfigError as e:
        print(f"kava sweep: error: {e}", file=sys.stderr)
        return 2
    failed = [n for n, s in result.items() if s == "failed"]
    print(f"sweep: {sum(s == 'done' for s in result.values())} trained, "
          f"{sum(s == 'skipped' for s in result.values())} already done, {len(failed)} failed"
          + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0
