"""Sweeps: a matrix of configs × seeds × grid values expanded into named runs, run locally or under SLURM.

Why a separate module: the paper's tables are (preset × seed) matrices plus ablation grids; a user should
get every run with one command, with readable deterministic names, and a bad value should fail the whole
sweep before hours of compute are spent on the runs that precede it.

    expand(...)        -> list[SweepRun]   every config loaded and validated up front
    run_status(dir)    -> done | resume | restart | new
    run_local(runs)    one after another via `kava.train.train` (skip done, resume from the checkpoint)
    write_slurm(runs)  one sbatch script per run + submit_all.sh

Run names: `<preset>-<grid values>-s<seed>` (e.g. `llama1b_aug-all-0.5-s42`). Grid values are the raw
strings given on the command line, with characters outside `[A-Za-z0-9._+]` replaced by `_`. If two grid
keys share a value (`1.0-1.0` would be ambiguous), each value is prefixed by its key's last component
(`lam_1.0-alpha_kv_1.0`), or by the whole key (`loss_alpha_kv_1.0`) when two keys share a last component.

SLURM: one script per run rather than a job array, so each run can be resubmitted, edited or cancelled on
its own and its log carries its name. The script decides at run time (so a requeued job does the right
thing): DONE -> exit; a checkpoint -> `kava train --resume RUN_DIR`; else a fresh `kava train --config`.
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
import shutil
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import yaml

import kava.evaluate
import kava.train
from kava.checkpoint.rundir import RunDir
from kava.checkpoint.state import latest_checkpoint
from kava.config import Config, ConfigError, check_world_size, load_config, resolve_config_path
from kava.data.readers import check_eval_sets

PAPER_SEEDS = (42, 123, 456)
STATUSES = ("done", "resume", "restart", "new")


@dataclass
class SweepRun:
    name: str
    config: str  # preset name or YAML path, as given
    seed: int
    overrides: list[str]  # every `--set` the run is trained with, run.name and run.seed included
    cfg: Config
    run_dir: Path
    grid: dict[str, str] = field(default_factory=dict)  # this run's grid values


# ------------------------------------------------------------------------------------------------ parsing
def split_list(text: str) -> list[str]:
    """`a,b,[c,d]` -> ["a", "b", "[c,d]"]: commas inside brackets/braces belong to a YAML list value."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return [x for x in out if x]


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """`["loss.kv_supervision=last,all"]` -> [("loss.kv_supervision", ["last", "all"])]."""
    grid: list[tuple[str, list[str]]] = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--grid {item!r} must look like KEY=V1,V2 (e.g. loss.kv_supervision=last,all)")
        key, raw = (s.strip() for s in item.split("=", 1))
        values = split_list(raw)
        if not values:
            raise ConfigError(f"--grid {key}: no values")
        if len(set(values)) != len(values):
            raise ConfigError(f"--grid {key}: repeated value in {values}")
        if key in (k for k, _ in grid):
            raise ConfigError(f"--grid {key}: given twice")
        grid.append((key, values))
    return grid


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in split_list(text)]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected comma-separated integers (e.g. 42,123,456)") from None
    if len(set(seeds)) != len(seeds) or not seeds:
        raise ConfigError(f"--seeds {text!r}: give distinct integers")
    return seeds


def _yaml_str(s: str) -> str:
    """An override value that YAML reads back as this exact string (`2024` or `a: b` get quoted)."""
    return s if yaml.safe_load(s) == s else json.dumps(s)


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+]", "_", s)


# ------------------------------------------------------------------------------------------------ expansion
def _names(stems: list[str], combos: list[tuple[str, ...]], keys: list[str], seeds: list[int],
           style: int) -> list[str]:
    def part(k: str, v: str) -> str:
        return [_slug(v), _slug(k.split(".")[-1] + "_" + v), _slug(k.replace(".", "_") + "_" + v)][style]

    return ["-".join([stem, *(part(k, v) for k, v in zip(keys, combo)), f"s{seed}"])
            for stem in stems for combo in combos for seed in seeds]


def expand(configs: list[str], seeds: list[int] = PAPER_SEEDS, grid: list[tuple[str, list[str]]] = (),
           fixed: list[str] = (), output_dir: str | None = None) -> list[SweepRun]:
    """Every (config, grid combination, seed), loaded and validated; raises `ConfigError` naming the key.

    Order: configs, then grid combinations (first grid key slowest), then seeds.
    """
    fixed = list(fixed)
    keys = [k for k, _ in grid]
    fixed_keys = {o.split("=", 1)[0].strip() for o in fixed}
    for reserved in ("run.name", "run.seed") + (("run.output_dir",) if output_dir else ()):
        if reserved in fixed_keys or reserved in keys:
            raise ConfigError(f"{reserved}: set by the sweep itself (names, --seeds, --output-dir); do not --set it")
    both = sorted(fixed_keys & set(keys))
    if both:
        raise ConfigError(f"{', '.join(both)}: given both by --set and --grid")
    if len(set(configs)) != len(configs) or not configs:
        raise ConfigError(f"--configs {configs}: give distinct presets or YAML paths")
    stems = [resolve_config_path(c).stem for c in configs]
    combos = list(itertools.product(*(v for _, v in grid)))
    values = [v for _, vs in grid for v in vs]
    leaves = [k.split(".")[-1] for k in keys]
    style = 0 if len(set(values)) == len(values) else 1 if len(set(leaves)) == len(leaves) else 2
    names = _names(stems, combos, keys, seeds, style)
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"run names collide: {dup[:3]} (two configs with the same file name?)")
    runs, it = [], iter(names)
    for config in configs:
        for combo in combos:
            for seed in seeds:
                name = next(it)
                ov = fixed + [f"{k}={v}" for k, v in zip(keys, combo)] + [f"run.seed={seed}", f"run.name={name}"]
                if output_dir:
                    ov.append(f"run.output_dir={_yaml_str(str(output_dir))}")
                try:
                    cfg = load_config(config, ov)
                except ConfigError as e:
                    raise ConfigError(f"sweep run {name}: {e}") from None
                runs.append(SweepRun(name, config, seed, ov, cfg, Path(cfg.run.output_dir) / name,
                                     dict(zip(keys, combo))))
    return runs


# ------------------------------------------------------------------------------------------------ status
def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def config_diff(run: SweepRun) -> list[str]:
    """Keys where the run dir's saved config.yaml differs from the sweep's (a run must not silently change).

    run.output_dir is left out: `runs` and `./runs` name the same place, and the run dir is found anyway.
    """
    p = RunDir(run.run_dir).config
    if not p.exists():
        return []
    saved, want = _flat(yaml.safe_load(p.read_text()) or {}), _flat(run.cfg.to_dict())
    return sorted(k for k in saved.keys() | want.keys() if saved.get(k) != want.get(k) and k != "run.output_dir")


def run_status(run_dir: Path) -> str:
    """done (DONE written) | resume (a checkpoint) | restart (started, nothing to resume) | new."""
    if RunDir(run_dir).finished():
        return "done"
    if latest_checkpoint(run_dir) is not None:
        return "resume"
    return "restart" if RunDir(run_dir).started() else "new"


def check_resumable(runs: list[SweepRun]) -> None:
    """A run to resume must have been started with the same config; say which keys differ otherwise."""
    for r in runs:
        if run_status(r.run_dir) == "resume" and (diff := config_diff(r)):
            raise ConfigError(f"sweep run {r.name}: {r.run_dir}/config.yaml differs from the sweep's config in "
                              f"{', '.join(diff[:8])}; delete the run dir or change the sweep")


def plan_lines(runs: list[SweepRun]) -> list[str]:
    """One line per run: name, status, overrides (what --dry-run prints), then a count per status."""
    w = max(len(r.name) for r in runs)
    lines, counts = [], dict.fromkeys(STATUSES, 0)
    for r in runs:
        st = run_status(r.run_dir)
        counts[st] += 1
        shown = [o for o in r.overrides if not o.startswith(("run.name=", "run.output_dir="))]
        note = f"  (config differs: {', '.join(config_diff(r)[:4])})" if st == "done" and config_diff(r) else ""
        lines.append(f"{r.name:<{w}}  {st:<7}  --config {r.config} " + " ".join(shlex.quote(o) for o in shown) + note)
    parents = {str(r.run_dir.parent) for r in runs}
    lines.append(f"{len(runs)} runs in {', '.join(sorted(parents))}: "
                 + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return lines


# ------------------------------------------------------------------------------------------------ local
def _missing_evals(run_dir: Path, datasets: list[str]) -> list[str]:
    return [d for d in datasets if not (RunDir(run_dir).eval / d / "summary.json").exists()]


def check_evals(runs: list[SweepRun], datasets: list[str], data_dir: str | None, hub: bool) -> str | None:
    """Refuse, before any run trains, `--eval-datasets` that the runs' `kava eval` could not read: an unknown
    name, or a set that is neither under `--data-dir` (default: `$KAVA_DATA_DIR` or ./data, from the directory
    the sweep and its SLURM jobs run in) nor read with `--hub`. Returns `data_dir` absolute (a job may start
    elsewhere), or None."""
    synthetic = all(r.cfg.data.source == "synthetic" for r in runs)  # they find their own synth-* data
    try:
        check_eval_sets(datasets, data_dir, hub, synthetic_found=synthetic)
    except ValueError as e:
        raise ConfigError(f"--eval-datasets: {e}") from None
    return str(Path(data_dir).resolve()) if data_dir is not None else None


def run_local(runs: list[SweepRun], *, eval_datasets: list[str] = (), data_dir: str | None = None,
              hub: bool = False, progress: bool = True) -> dict[str, str]:
    """Train the runs one after another; returns {name: done|skipped|failed}.

    A failing run is reported (traceback printed) and the sweep goes on with the next one, so one bad
    run does not waste a night; the caller turns any failure into a non-zero exit.
    (`kava.train.train` and `kava.evaluate.evaluate_run` are looked up at call time: tests replace them.)
    """
    check_resumable(runs)
    result = {}
    for i, r in enumerate(runs, 1):
        st = run_status(r.run_dir)
        print(f"[sweep {i}/{len(runs)}] {r.name}: {st}", flush=True)
        try:
            if st == "done":
                result[r.name] = "skipped"
            else:
                if st == "restart":  # started but no checkpoint yet: nothing to keep, `train` refuses the dir
                    shutil.rmtree(r.run_dir)
                kava.train.train(r.cfg, resume=r.run_dir if st == "resume" else None, progress=progress)
                result[r.name] = "done"
            todo = _missing_evals(r.run_dir, list(eval_datasets))
            if todo:
                kava.evaluate.evaluate_run(str(r.run_dir), todo, data_dir=data_dir, hub=hub, progress=progress)
        except Exception:  # noqa: BLE001 - reported and counted, the sweep continues
            traceback.print_exc()
            result[r.name] = "failed"
    return result


# ------------------------------------------------------------------------------------------------ SLURM
@dataclass
class SlurmOptions:
    partition: str | None = None
    nodes: int = 1
    gpus_per_node: int = 1
    cpus_per_task: int = 8  # the one task per node; its G processes share them
    time: str = "24:00:00"
    log_dir: str | None = None  # default <script_dir>/logs
    env_setup: str | None = None  # shell lines run before launching (module load ..., source venv)
    port: int = 29500


def default_env_setup() -> str:
    """Activate the environment the sweep was generated from, when it is a venv (login node = compute)."""
    act = Path(sys.prefix) / "bin" / "activate"
    return f"source {shlex.quote(str(act))}" if sys.prefix != sys.base_prefix and act.exists() else ""


def launch_line(opts: SlurmOptions) -> str:
    """The training launch: torchrun on one node, or torchrun per node under srun with c10d rendezvous.

    torchrun rather than `accelerate launch`: `kava.train` configures its `Accelerator` itself and reads
    the ranks torchrun sets, so no accelerate config file is needed on the cluster. srun gets
    --cpus-per-task explicitly because Slurm >= 22.05 no longer passes the sbatch value on to srun.
    """
    g = opts.gpus_per_node
    if opts.nodes == 1:
        return f'torchrun --standalone --nproc_per_node {g} -m kava.cli train "${{TRAIN_ARGS[@]}}"'
    return ("srun --nodes $SLURM_NNODES --ntasks-per-node 1 --cpus-per-task $SLURM_CPUS_PER_TASK "
            f"torchrun --nnodes $SLURM_NNODES --nproc_per_node {g} --rdzv_backend c10d "
            f"--rdzv_endpoint $MASTER_ADDR:{opts.port} --rdzv_id $SLURM_JOB_ID "
            f'-m kava.cli train "${{TRAIN_ARGS[@]}}"')


def slurm_script(run: SweepRun, opts: SlurmOptions, log_dir: Path, *, eval_datasets: list[str] = (),
                 data_dir: str | None = None, hub: bool = False) -> str:
    """The sbatch script of one run; it runs from the current directory (relative paths keep working)."""
    q = shlex.quote
    config = run.config
    if Path(config).suffix in (".yaml", ".yml") or Path(config).exists():
        config = str(Path(config).resolve())  # the job may start elsewhere; presets stay names
    train_args = " ".join(q(a) for a in ["--config", config] + [x for o in run.overrides for x in ("--set", o)])
    run_dir = q(str(run.run_dir.resolve()))
    sb = [f"--job-name={run.name}"] + ([f"--partition={opts.partition}"] if opts.partition else []) + [
        f"--nodes={opts.nodes}", "--ntasks-per-node=1", f"--gpus-per-node={opts.gpus_per_node}",
        f"--cpus-per-task={opts.cpus_per_task}", f"--time={opts.time}", f"--output={log_dir / run.name}-%j.out"]
    env = default_env_setup() if opts.env_setup is None else opts.env_setup
    lines = ["#!/bin/bash", *(f"#SBATCH {s}" for s in sb), "",
             f"# kava sweep run {run.name}: trains, resumes after a requeue, skips when DONE.",
             "set -e  # no pipefail: `scontrol ... | head -n1` ends scontrol by SIGPIPE on large allocations",
             f"cd {q(str(Path.cwd().resolve()))}", *([env] if env else []),
             "set -u  # after the environment setup: `module load` and some activate scripts read unset variables",
             f"RUN_DIR={run_dir}",
             'if [ -f "$RUN_DIR/DONE" ]; then echo "$RUN_DIR is DONE"; else',
             '  if compgen -G "$RUN_DIR/checkpoints/step_*/state.json" > /dev/null; then',
             '    TRAIN_ARGS=(--resume "$RUN_DIR" --no-progress)',
             "  else",
             '    rm -rf "$RUN_DIR"  # a start without a checkpoint holds nothing to resume',
             f"    TRAIN_ARGS=({train_args} --no-progress)",
             "  fi"]
    if opts.nodes > 1:
        lines.append('  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)')
    lines += [f"  {launch_line(opts)}", "fi"]
    if eval_datasets:
        ev = f"python -m kava.cli eval --checkpoint \"$RUN_DIR\" --datasets {q(','.join(eval_datasets))}"
        lines.append(ev + (f" --data-dir {q(str(Path(data_dir).resolve()))}" if data_dir else "")
                     + (" --hub" if hub else ""))
    return "\n".join(lines) + "\n"


def write_slurm(runs: list[SweepRun], opts: SlurmOptions, script_dir: str | Path, *,
                eval_datasets: list[str] = (), data_dir: str | None = None, hub: bool = False
                ) -> tuple[list[Path], Path]:
    """One `<name>.sbatch` per run not yet DONE, and `submit_all.sh`; returns (scripts, submit_all)."""
    for r in runs:  # the effective batch must split over the GPUs
        try:
            check_world_size(r.cfg, opts.nodes * opts.gpus_per_node)
        except ConfigError as e:
            raise ConfigError(f"sweep run {r.name} on --nodes {opts.nodes} x --gpus-per-node "
                              f"{opts.gpus_per_node}: {e}") from None
    check_resumable(runs)
    sd = Path(script_dir)
    log_dir = Path(opts.log_dir or sd / "logs").resolve()
    sd.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)  # sbatch does not create the --output directory
    scripts = []
    for r in runs:
        if run_status(r.run_dir) == "done":
            continue
        p = sd / f"{r.name}.sbatch"
        p.write_text(slurm_script(r, opts, log_dir, eval_datasets=eval_datasets, data_dir=data_dir, hub=hub))
        scripts.append(p)
    sub = sd / "submit_all.sh"
    sub.write_text("#!/bin/bash\n# Submit every kava sweep run that is not DONE.\nset -euo pipefail\n"
                   'cd "$(dirname "$0")"\n' + "".join(f"sbatch {shlex.quote(p.name)}\n" for p in scripts))
    for p in scripts + [sub]:
        p.chmod(0o755)
    return scripts, sub
