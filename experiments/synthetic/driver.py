"""Small-scale replication of the paper's tables on the synthetic task, on one GPU.

    python experiments/synthetic/driver.py --out runs/synth --stage all --parallel 10

Stages (each skips runs that already finished, so it can be run in parts):
  backbone   CoT SFT from scratch on both CoT styles (src/kava/configs/synth_backbone.yaml): the "pretrained LLM"
  main       nocot, cot, pccot, codi, kava  x  {equation, nl} CoT  x  seeds 42, 123, 456, fine-tuned from it
  ablations  on nl data, seeds 42, 123: kv_supervision=all; eviction crop / cosine / attention / random;
             keys before RoPE; no projection; no CODI term; lambda in {0, 0.5, 1} (0.1 is the main kava run)
  eval       every finished run on synth-test, synth-hard, synth-varied
  report     results/synthetic/{main,ablations}/ via `kava report`, and results/synthetic/README.md

Many small jobs share the GPU at once (`--parallel`): each is launch-bound, so they overlap well.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

METHODS = ["nocot", "cot", "pccot", "codi", "kava"]
STYLES = {"eq": "equation", "nl": "nl"}
SEEDS = [42, 123, 456]
ABLATION_SEEDS = [42, 123]
ABLATIONS = {
    "kv-all": ["loss.kv_supervision=all"],
    "evict-crop": ["eviction.method=crop"],
    "evict-cosine": ["eviction.method=cosine"],
    "evict-attention": ["eviction.method=attention"],
    "evict-random": ["eviction.method=random"],
    "keys-pre-rope": ["loss.kv_key_space=pre_rope"],
    "no-proj": ["latent.projection=identity"],
    "no-codi": ["loss.alpha_codi=0"],
    "lam-0": ["eviction.lam=0.0"],
    "lam-0.5": ["eviction.lam=0.5"],
    "lam-1": ["eviction.lam=1.0"],
}
EVAL_SETS = "synth-test,synth-hard,synth-varied"
KAVA = [sys.executable, "-m", "kava.cli"]


DEADLINE: float | None = None  # time.time() after which no new job starts (--time-limit)


def run_jobs(jobs: list[tuple[str, list[str], Path]], parallel: int) -> list[str]:
    """Run (name, argv, log) jobs, `parallel` at a time; returns names that failed or were not started."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    pending, running, failed = list(jobs), [], []

    def stop(signum, frame):  # `timeout` / scancel: take the running jobs down with us
        for _, proc, _ in running:
            proc.terminate()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    while pending or running:
        if DEADLINE is not None and time.time() > DEADLINE and pending:
            print(f"time limit: {len(pending)} job(s) not started: {', '.join(n for n, _, _ in pending)}")
            failed += [n for n, _, _ in pending]
            pending = []
        while pending and len(running) < parallel:
            name, argv, log = pending.pop(0)
            log.parent.mkdir(parents=True, exist_ok=True)
            running.append((name, subprocess.Popen(argv, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env),
                            time.time()))
        for item in list(running):
            name, proc, t0 = item
            if proc.poll() is not None:
                running.remove(item)
                status = "ok" if proc.returncode == 0 else f"FAILED ({proc.returncode})"
                print(f"[{time.strftime('%H:%M:%S')}] {name}: {status} in {time.time() - t0:.0f}s", flush=True)
                if proc.returncode:
                    failed.append(name)
        time.sleep(1)
    return failed


def train_job(out: Path, name: str, config: str, sets: list[str]) -> tuple[str, list[str], Path] | None:
    run_dir = out / name
    if (run_dir / "DONE").exists():
        return None
    argv = KAVA + ["train", "--no-progress"]
    if (run_dir / "checkpoints").exists():
        argv += ["--resume", str(run_dir)]
    else:
        if run_dir.exists():  # started but never checkpointed: start over
            import shutil

            shutil.rmtree(run_dir)
        argv += ["--config", config] + [a for s in sets + [f"run.name={name}", f"run.output_dir={out}"]
                                        for a in ("--set", s)]
    return name, argv, out / "logs" / f"{name}.log"


def student_runs(out: Path, steps: int | None) -> dict[str, list[str]]:
    base = [f"model.init_from={out / 'backbone'}"] + ([f"optim.max_steps={steps}"] if steps else [])
    runs = {}
    for st, style in STYLES.items():
        for m in METHODS:
            for seed in SEEDS:
                # CODI runs one pass per latent: it uses CODI's own 6 latents rather than 24 (see README).
                # The CoT baseline writes the whole chain (the upper bound); the latent students' teachers
                # drop the last step (SPEC §1), as the student configs say.
                extra = {"codi": ["latent.num_latents=6"], "cot": ["data.drop_last_step=false"]}.get(m, [])
                runs[f"{m}-{st}-s{seed}"] = base + extra + [f"method={m}", f"data.cot_style={style}",
                                                           f"run.seed={seed}", f"preset={m}"]
    return runs


def ablation_runs(out: Path, steps: int | None) -> dict[str, list[str]]:
    base = [f"model.init_from={out / 'backbone'}", "method=kava", "data.cot_style=nl"] + \
        ([f"optim.max_steps={steps}"] if steps else [])
    runs = {}
    for abl, sets in ABLATIONS.items():
        for seed in ABLATION_SEEDS:
            runs[f"kava-{abl}-nl-s{seed}"] = base + sets + [f"run.seed={seed}", f"preset=kava-{abl}"]
    return runs


def main() -> int:
    global DEADLINE, METHODS, STYLES, SEEDS, EVAL_SETS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/synth")
    ap.add_argument("--stage", default="all", choices=["backbone", "main", "ablations", "eval", "report", "all"])
    ap.add_argument("--parallel", type=int, default=10)
    ap.add_argument("--student-steps", type=int, default=None, help="override optim.max_steps of the students")
    ap.add_argument("--backbone-set", action="append", default=[], help="extra --set for the backbone")
    ap.add_argument("--student-set", action="append", default=[], help="extra --set for every student")
    ap.add_argument("--only", help="comma list of run-name prefixes to restrict main/ablations to")
    ap.add_argument("--results", default="results/synthetic")
    ap.add_argument("--time-limit", type=float, default=None, help="seconds; stop starting new jobs after this")
    ap.add_argument("--backbone-config", default="synth_backbone")
    ap.add_argument("--student-config", default="synth_student")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--styles", default=",".join(STYLES), help="comma list of eq, nl")
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    ap.add_argument("--eval-sets", default=EVAL_SETS)
    ap.add_argument("--eval-args", default="", help="extra arguments for every `kava eval` (one string)")
    ap.add_argument("--eval-unfinished", action="store_true",
                    help="also evaluate runs stopped before their last step (their validation-selected best/)")
    a = ap.parse_args()
    out = Path(a.out)
    METHODS = a.methods.split(",")
    STYLES = {k: v for k, v in STYLES.items() if k in a.styles.split(",")}
    SEEDS = [int(x) for x in a.seeds.split(",")]
    EVAL_SETS = a.eval_sets
    if a.time_limit:
        DEADLINE = time.time() + a.time_limit
    failed: list[str] = []
    stages = ["backbone", "main", "ablations", "eval", "report"] if a.stage == "all" else [a.stage]

    def keep(name: str) -> bool:
        return not a.only or any(name.startswith(p) for p in a.only.split(","))

    if "backbone" in stages:
        job = train_job(out, "backbone", a.backbone_config, a.backbone_set)
        failed += run_jobs([job] if job else [], 1)
    for stage, runs in (("main", student_runs(out, a.student_steps)), ("ablations", ablation_runs(out, a.student_steps))):
        if stage in stages:
            from kava.config import load_config
            from kava.data.pipeline import synthetic_dir

            synthetic_dir(load_config(a.student_config, a.student_set), out / "_data")  # once, before the jobs
            jobs = [train_job(out, n, a.student_config, s + a.student_set) for n, s in runs.items() if keep(n)]
            failed += run_jobs([j for j in jobs if j], a.parallel)
    if "eval" in stages:
        names = [n for n in list(student_runs(out, None)) + list(ablation_runs(out, None)) if keep(n)]
        data_dir = next((p for p in (out / "_data").glob("synth_*")), None)
        jobs = []
        for n in names:
            rd = out / n
            ready = (rd / "DONE").exists() or (a.eval_unfinished and (rd / "best" / "meta.json").exists())
            if ready and not all((rd / "eval" / d / "summary.json").exists()
                                                  for d in EVAL_SETS.split(",")):
                jobs.append((f"eval {n}", KAVA + ["eval", "--checkpoint", str(rd), "--datasets", EVAL_SETS,
                                                  "--data-dir", str(data_dir), "--batch-size", "250"]
                             + a.eval_args.split(),
                             out / "logs" / f"eval-{n}.log"))
        failed += run_jobs(jobs, a.parallel)
    if "report" in stages:
        res = Path(a.results)
        main_runs = [str(out / n) for n in student_runs(out, None) if (out / n / "eval").is_dir()]
        abl_runs = [str(out / n) for n in ablation_runs(out, None) if (out / n / "DONE").exists()]
        abl_runs += [str(out / f"kava-nl-s{s}") for s in ABLATION_SEEDS if (out / f"kava-nl-s{s}" / "DONE").exists()]
        if main_runs:
            subprocess.run(KAVA + ["report", *main_runs, "--output", str(res / "main"), "--group-by", "method"])
            data_dir = next((p for p in (out / "_data").glob("synth_*")), None)
            if data_dir is not None:
                from per_depth import write_depth_table

                write_depth_table([Path(r) for r in main_runs], data_dir, res / "main")
        if abl_runs:
            subprocess.run(KAVA + ["report", *abl_runs, "--output", str(res / "ablations"), "--group-by", "preset"])
    if failed:
        print(f"{len(failed)} job(s) failed: {', '.join(failed)} (logs in {out / 'logs'})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
