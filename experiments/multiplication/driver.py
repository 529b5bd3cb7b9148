"""iCoT's multiplication benchmark on one GPU: many `kava train` jobs side by side, stopped at a deadline, then
each run's best validation model evaluated on the published test set. Results: results/multiplication/README.md.

    python experiments/multiplication/driver.py run --data DATA --out OUT --budget 1000 --jobs gate,icot
    python experiments/multiplication/driver.py status --out OUT
    python experiments/multiplication/driver.py pack --out OUT --tar results.tgz

One job = `kava train --config multN_scratch --set method=M ...`; at `--budget` seconds after the start every job
still training gets SIGTERM, which makes kava save a checkpoint and stop (`kava train --resume RUN` continues it
exactly). Then `kava eval --checkpoint RUN --datasets multN-test` evaluates `best/`, the best validation step
(validation: the published valid.txt, 500 questions, every `run.eval_every` steps; under iCoT, the best among the
validations at the furthest removal). `status.jsonl` in OUT records every start, stop and evaluation.
Budget rule: every method trains at least as many samples as No-CoT of its size (the same batch, at least the
same steps); stopping and checkpoint choice use validation only.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

KAVA = [sys.executable, "-m", "kava.cli"]
DEEP = ["model.from_scratch.n_layer=6"]
# name -> (preset, --set values). Every job: batch 128, validation on 500 published valid questions.
JOBS: dict[str, tuple[str, list[str]]] = {
    # the gate: CoT >= 95 and No-CoT <= 5 on 5x5; 4x4 No-CoT as measured
    "cot4": ("mult4_scratch", ["method=cot"]),
    "nocot4": ("mult4_scratch", ["method=nocot"]),
    "cot5": ("mult5_scratch", ["method=cot"]),
    "nocot5": ("mult5_scratch", ["method=nocot"]),
    "cot5-6l": ("mult5_scratch", ["method=cot", *DEEP]),
    "nocot5-6l": ("mult5_scratch", ["method=nocot", *DEEP]),
    # iCoT from scratch, as the official recipe (removal from step 0). The official rate is 8 tokens per epoch
    # of 808k at batch 32 (3,156 steps per token); at batch 128 a preset epoch is 6,312 steps, so
    # tokens_per_epoch 40 removes a token every 158 steps (4x4's 46 CoT tokens in ~7.3k steps).
    "icot4": ("mult4_scratch", ["method=icot", "icot.tokens_per_epoch=40"]),
    "icot5": ("mult5_scratch", ["method=icot", "icot.tokens_per_epoch=40"]),
    # iCoT at the official per-sample rate (8 tokens per 808k samples), after the 2026-12-06 lease (each removal
    # cost 10-50 validation points at lr 3e-4 with an AdamW reset): batch 512 (a token every 197 steps, so
    # 4x4's 46 tokens take ~9k steps), and the suspects one at a time: the lr, the resets, the start
    "icot4-b512": ("mult4_scratch", ["method=icot", "icot.tokens_per_epoch=8", "optim.effective_batch=512",
                                     "optim.micro_batch=512", "optim.lr=3e-4"]),
    "icot4-b512-lr1e4": ("mult4_scratch", ["method=icot", "icot.tokens_per_epoch=8", "optim.effective_batch=512",
                                           "optim.micro_batch=512", "optim.lr=1e-4"]),
    "icot4-b512-noreset": ("mult4_scratch", ["method=icot", "icot.tokens_per_epoch=8", "optim.effective_batch=512",
                                             "optim.micro_batch=512", "optim.lr=3e-4", "icot.reset_optimizer=false"]),
    "icot5-b512-lr1e4": ("mult5_scratch", ["method=icot", "icot.tokens_per_epoch=8", "optim.effective_batch=512",
                                           "optim.micro_batch=512", "optim.lr=1e-4"]),
    # The 7-method table on 5x5: a CoT model that finishes (2,000 steps: 99.8% validation at step 1,500 and 100%
    # at 2,000 on 2026-12-06), then every student from it (`AFTER`: started when its CoT run is DONE, initialised
    # from it) for 3,000 more steps; No-CoT gets 6,000 steps (the budget rule: nobody trains fewer samples).
    # Latent budgets that allow the serial work: M = 5 = the CoT steps, T = 3 and T = M; Coconut one thought per
    # step; CODI its own 6 latents.
    "cot5-base": ("mult5_scratch", ["method=cot", "optim.max_steps=2000"]),
    "nocot5-6k": ("mult5_scratch", ["method=nocot", "optim.max_steps=6000"]),
    "pccot5": ("mult5_scratch", ["method=pccot", "optim.max_steps=3000"]),
    "kava5": ("mult5_scratch", ["method=kava", "optim.max_steps=3000"]),
    "kava5-T5": ("mult5_scratch", ["method=kava", "optim.max_steps=3000", "latent.num_sweeps=5"]),
    "codi5": ("mult5_scratch", ["method=codi", "optim.max_steps=3000", "latent.num_latents=6"]),
    "coconut5": ("mult5_scratch", ["method=coconut", "optim.max_steps=3000", "coconut.epochs_per_stage=0.06"]),
    # iCoT from the finished CoT model, all 74 tokens removed within ~2,700 steps (a token every 37 steps)
    "icot5-fromcot": ("mult5_scratch", ["method=icot", "optim.max_steps=3000", "icot.tokens_per_epoch=170"]),
    # iCoT from a finished CoT model (the official `--pretrain_epochs`: CoT first, then removal), at a rate that
    # fits one lease, with the suspects of the from-scratch dips one at a time (the lr, the AdamW resets):
    # 4x4, 46 CoT tokens, a token every round(6312 / 58) = 109 steps (14k samples, 1/7 of the official 101k);
    # 5x5, 74 CoT tokens, a token every 61 steps (7.8k samples); then steps with no CoT left until max_steps.
    "cot4-base": ("mult4_scratch", ["method=cot", "optim.max_steps=2000"]),
    **{f"icot{n}-fc-{tag}": (f"mult{n}_scratch", ["method=icot", f"icot.tokens_per_epoch={tpe}", "optim.max_steps=6500",
                                                   *sets])
       for n, tpe in ((4, 58), (5, 103))
       for tag, sets in (("lr1e4", ["optim.lr=1e-4"]),
                         ("lr1e4-noreset", ["optim.lr=1e-4", "icot.reset_optimizer=false"]),
                         ("lr3e4-noreset", ["optim.lr=3e-4", "icot.reset_optimizer=false"]))},
}
AFTER = {name: "cot5-base" for name in ("pccot5", "kava5", "kava5-T5", "codi5", "coconut5", "icot5-fromcot")} | \
    {name: f"cot{name[4]}-base" for name in JOBS if "-fc-" in name}
GROUPS = {"gate": ["cot4", "nocot4", "cot5", "nocot5", "cot5-6l", "nocot5-6l"], "icot": ["icot4", "icot5"],
          "icot-next": ["icot4-b512", "icot4-b512-lr1e4", "icot4-b512-noreset", "icot5-b512-lr1e4"],
          "table5": ["cot5-base", "nocot5-6k", "pccot5", "kava5", "kava5-T5", "codi5", "coconut5", "icot5-fromcot"],
          "icot-fc": ["cot4-base", "cot5-base"] + [name for name in JOBS if "-fc-" in name]}
COMMON = ["optim.max_steps=20000", "run.eval_every=500", "run.save_every=500"]
LATENT = {"pccot", "kava", "codi", "coconut"}


def digits_of(preset: str) -> int:
    return int(preset.removeprefix("mult")[0])


def job_sets(name: str, data: Path, out: Path, seed: int, extra: list[str]) -> list[str]:
    preset, sets = JOBS[name]
    n = digits_of(preset)
    root = data / "multiplication" / f"{n}x{n}"
    init = [f"model.init_from={run_dir(out, AFTER[name], seed)}"] if name in AFTER else []
    return [*COMMON, *sets, *init, f"run.seed={seed}", f"run.output_dir={out / 'runs'}", f"run.name={name}-s{seed}",
            f"data.valid_source={root / 'valid.txt'}",
            f"data.synth_exclude=[{root / 'valid.txt'}, {root / 'test_bigbench.txt'}]", *extra]


def run_dir(out: Path, name: str, seed: int) -> Path:
    return out / "runs" / f"{name}-s{seed}"


def method_of(name: str) -> str:
    return next(v.split("=", 1)[1] for v in JOBS[name][1] if v.startswith("method="))


def train_cmd(name: str, data: Path, out: Path, seed: int, extra: list[str]) -> list[str]:
    sets = job_sets(name, data, out, seed, extra)
    return KAVA + ["train", "--config", JOBS[name][0], "--no-progress"] + sum((["--set", s] for s in sets), [])


def eval_cmd(name: str, data: Path, out: Path, seed: int) -> list[str]:
    """The test evaluation of a job's best/; latent students also with the diagnostics (latents zeroed, shuffled,
    the oracle, the KV match)."""
    n = digits_of(JOBS[name][0])
    diag = ["--diagnostics"] if method_of(name) in LATENT else []
    return KAVA + ["eval", "--checkpoint", str(run_dir(out, name, seed)), "--datasets", f"mult{n}-test",
                   "--data-dir", str(data), "--batch-size", "500", *diag]


def log(out: Path, **event) -> None:
    event["t"] = round(time.time(), 1)
    with open(out / "status.jsonl", "a") as f:
        f.write(json.dumps(event) + "\n")
    print(json.dumps(event), flush=True)


def expand(jobs: str) -> list[str]:
    names = [j for part in jobs.split(",") for j in GROUPS.get(part, [part])]
    unknown = [j for j in names if j not in JOBS]
    if unknown:
        raise SystemExit(f"unknown jobs {unknown}; known: {sorted(JOBS)} and groups {sorted(GROUPS)}")
    return names


def run(args) -> None:
    """Start every job of every seed whose dependency (`AFTER`) is done, stop what still trains at the deadline,
    then evaluate each run's best/ on the test set."""
    out, data = Path(args.out).absolute(), Path(args.data).absolute()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    seeds = [int(x) for x in str(args.seeds).split(",")]
    pending = [(name, seed) for seed in seeds for name in expand(args.jobs)]
    start = time.time()
    deadline = start + args.budget
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs: dict[tuple[str, int], subprocess.Popen] = {}
    stopped: set[tuple[str, int]] = set()
    if args.dry_run:
        for name, seed in pending:
            print(("after " + AFTER[name] + ": " if name in AFTER else "") +
                  " ".join(train_cmd(name, data, out, seed, args.set)))
        return
    while pending or any(p.poll() is None for p in procs.values()):
        for name, seed in list(pending):
            dep = AFTER.get(name)
            if dep is not None:
                dep_proc = procs.get((dep, seed))
                if (run_dir(out, dep, seed) / "DONE").exists():
                    pass  # ready: the CoT model it starts from is final
                elif dep_proc is not None and dep_proc.poll() is not None or (dep, seed) not in procs and \
                        (dep, seed) not in pending:
                    pending.remove((name, seed))  # its CoT model failed, was stopped or is not part of this run
                    log(out, event="not started", job=name, seed=seed, why=f"{dep}-s{seed} did not finish")
                    continue
                else:
                    continue
            if time.time() > deadline:
                pending.remove((name, seed))
                log(out, event="not started", job=name, seed=seed, why="deadline")
                continue
            cmd = train_cmd(name, data, out, seed, args.set)
            procs[(name, seed)] = subprocess.Popen(cmd, stdout=open(out / "logs" / f"{name}-s{seed}.log", "w"),
                                                   stderr=subprocess.STDOUT, env=env)
            pending.remove((name, seed))
            log(out, event="start", job=name, seed=seed, pid=procs[(name, seed)].pid, cmd=cmd)
            time.sleep(args.stagger)
        if time.time() > deadline:
            for key, p in procs.items():
                if p.poll() is None and key not in stopped:
                    p.send_signal(signal.SIGTERM)  # kava saves a checkpoint at the step boundary and exits 143
                    stopped.add(key)
                    log(out, event="deadline", job=key[0], seed=key[1])
        time.sleep(5)
    for (name, seed), p in procs.items():
        log(out, event="end", job=name, seed=seed, rc=p.returncode, stopped=(name, seed) in stopped,
            wall_s=round(time.time() - start))
    evals = {}
    for name, seed in procs:
        if (run_dir(out, name, seed) / "best").exists():
            evals[(name, seed)] = subprocess.Popen(eval_cmd(name, data, out, seed), env=env, stderr=subprocess.STDOUT,
                                                   stdout=open(out / "logs" / f"{name}-s{seed}.eval.log", "w"))
        else:
            log(out, event="no best/ to evaluate", job=name, seed=seed)
    for (name, seed), p in evals.items():
        log(out, event="eval", job=name, seed=seed, rc=p.wait())
    log(out, event="all done", wall_s=round(time.time() - start))


def status(args) -> None:
    out = Path(args.out)
    for run_dir in sorted((out / "runs").glob("*-s*")):
        vals = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()] \
            if (run_dir / "metrics.jsonl").exists() else []
        train = [v for v in vals if v.get("split") == "train"]
        val = [(v["step"], v["val/accuracy"]) for v in vals if v.get("split") == "val"]
        last = train[-1] if train else {}
        print(f"{run_dir.name}: step {last.get('step')} loss {last.get('loss/total', float('nan')):.4f} "
              f"removed {last.get('curriculum/removed', '-')} val {val[-6:]}")


KEEP_SUFFIXES = (".json", ".jsonl", ".yaml", ".log", ".txt", ".md")


def pack(args) -> None:
    """A tarball of what the results need (configs, metrics, summaries, predictions, logs; no weights, no data)."""
    out = Path(args.out)
    with tarfile.open(args.tar, "w:gz") as tar:
        for p in sorted(out.rglob("*")):
            rel = p.relative_to(out)
            if not p.is_file() or "_data" in rel.parts or "tokenizer_src" in rel.parts or "model" in rel.parts:
                continue
            if "checkpoints" in rel.parts and p.name != "state.json":
                continue
            if p.suffix in KEEP_SUFFIXES or p.name == "DONE":
                tar.add(p, arcname=str(rel))
    print(f"packed {args.tar}: {Path(args.tar).stat().st_size} bytes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--data", required=True, help="the shared data root (multiplication/NxN/*.txt)")
    r.add_argument("--out", required=True)
    r.add_argument("--jobs", default="gate,icot", help="job names or groups, comma-separated")
    r.add_argument("--budget", type=float, default=1000, help="seconds until every job still training is stopped")
    r.add_argument("--seeds", default="42", help="comma-separated: every job runs once per seed")
    r.add_argument("--stagger", type=float, default=2.0, help="seconds between job starts")
    r.add_argument("--set", action="append", default=[], help="extra --set for every job")
    r.add_argument("--dry-run", action="store_true")
    s = sub.add_parser("status")
    s.add_argument("--out", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--out", required=True)
    p.add_argument("--tar", required=True)
    args = ap.parse_args()
    {"run": run, "status": status, "pack": pack}[args.cmd](args)


if __name__ == "__main__":
    main()
