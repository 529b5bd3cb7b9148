"""The paper's table on a real pretrained model: SmolLM2-135M-Instruct + LoRA on GSM8k, every method x CoT style x
seed, trained, evaluated (GSM8k, GSM8k-Hard, SVAMP) and diagnosed, many jobs sharing one GPU.

    python experiments/smollm2/driver.py run --data /path/to/shared/data --out /tmp/smol --parallel 9 --budget 1200
    python experiments/smollm2/driver.py collect --out /tmp/smol --tar results.tgz
    python experiments/smollm2/driver.py report --runs results/smollm2/runs --output results/smollm2

One job = `kava train --config smollm2_gsm8k_<style> --set method=M --set run.seed=S`, then
`kava eval --datasets gsm8k --diagnostics` (latent methods: accuracy with the latents zeroed / placeholder /
shuffled, the oracle, the KV match; others: plain) and `kava eval --datasets gsm8k-hard,svamp`.
Every method gets the same epoch budget (`BASE_SETS`: 4 epochs at micro-batch 64 of the preset's 128) and the
same rule: validation on GSM8k-Aug's valid.txt after every epoch, and `best/` (the best validation epoch) is what
is evaluated. CODI runs with its own paper's 6 latents (`METHOD_SETS`), the Jacobi methods with the preset's 24.

Jobs start in priority order (seed 42 of every method and style first, then 123, then 456), `--parallel` at a
time; with `--budget S`, a job whose expected duration would end after S seconds is not started, so the seeds
that finish are complete cells. The expected duration is 1.1x the longest finished job of that method, or a
planning guess (`EXPECTED_S` x epochs + `EVAL_S`) before one has finished. `status.jsonl` in `--out` records every job.
With `--deadline S` (or `driver.py deadline --out OUT --in S` from a later device call, which moves it), every job
still training at the deadline is stopped (SIGTERM: kava saves a checkpoint) and its `best/`, the best validated
epoch so far, is evaluated as a finished job's is; no job starts after it.
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

# experiments/devicekit.py (the deadline file): beside this file in the frozen device copy, else one folder up
sys.path.insert(0, str(next(d for d in Path(__file__).resolve().parents[:2] if (d / "devicekit.py").exists())))
import devicekit  # noqa: E402

METHODS = ["nocot", "cot", "kava", "pccot", "codi", "icot", "coconut"]
LATENT = {"pccot", "codi", "kava", "coconut"}
STYLES = ["eq", "nl"]
SEEDS = [42, 123, 456]
# seconds per epoch when the GPU is shared by ~10 jobs (a planning guess, used only by --budget); eval on top
EXPECTED_S = {"nocot": 25, "cot": 40, "kava": 90, "pccot": 80, "codi": 80, "icot": 35, "coconut": 80}
EVAL_S = {"nocot": 40, "cot": 150, "kava": 100, "pccot": 100, "codi": 100, "icot": 40, "coconut": 100}
# GPU memory (MiB) of one training process before one of that method has been measured: the 2026-12-02 lease saw
# kava grow to 38 GiB (CUDA-graph pools of 13-16 GiB) long after start-up, so admission is per method
JOB_MIB = {"nocot": 14000, "cot": 18000, "kava": 40000, "pccot": 36000, "codi": 24000, "icot": 18000,
           "coconut": 24000}
# Qwen2.5-0.5B (vocabulary 151,936) at micro-batch 64, eager, fully fine-tuned, on 2026-12-07: an NL CoT job peaked
# at 54 GB in nvidia-smi (50.6 GiB in torch), three times the SmolLM2 guess, and the jobs admitted beside it on that
# guess ran out of memory; No-CoT at 31.0 GiB in torch (`gpu.sh` passes these with MODEL=qwen05; `--job-mib`
# overrides any). The latent methods' are guesses above CoT's (two passes)
QWEN_JOB_MIB = {"nocot": 34000, "cot": 56000, "kava": 70000, "pccot": 70000, "codi": 60000, "icot": 56000,
                "coconut": 60000}
# every job: micro-batch 64 of the preset's effective 128 (GPU-sized), fewer captured shapes (memory), 4 epochs
BASE_SETS = ["optim.micro_batch=64", "optim.max_graphs=12", "optim.graph_buckets=1.4", "optim.epochs=4"]
# per method: CODI's own latent count (its paper: 6 continuous thoughts); 24 sequential passes ran at 0.05-0.28
# steps/s under sharing on 2026-12-02
# Coconut: its GSM8k recipe (c = 2 thoughts per step, 3 stages, 6 thoughts at the end, raw hidden states), one
# stage per epoch so that the 4 epochs reach the last stage; iCoT: 12 tokens per epoch, so the whole CoT is gone
# (remove_all_beyond 39) after 3.25 epochs
METHOD_SETS = {"codi": ["latent.num_latents=6"],
               "coconut": ["latent.num_latents=6", "latent.projection=identity", "coconut.epochs_per_stage=1"],
               "icot": ["icot.tokens_per_epoch=12"]}
# recipes (`--recipes`): named variations of the presets' recipe, each a job dimension of its own (its runs are
# named STYLE-METHOD-RECIPE-sSEED; "base" is the presets' recipe, named STYLE-METHOD-sSEED). The teacher search of
# the Qwen2.5-0.5B study (issue 33, experiments/qwen05): full fine-tuning vs LoRA on the 7 linears, the lr, and the
# CoT's last step kept (dropping it removes the computation that yields the answer). Without CUDA graphs: their
# pools took 20-42 GiB per Qwen process, so that two jobs did not fit an 80 GB card; eager, several do.
ALL_LINEARS = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
TEACHER = ["data.drop_last_step=false", "optim.cuda_graphs=false"]  # every recipe below
FULL = ["lora=null", "optim.weight_decay=0", *TEACHER]  # full fine-tuning
RECIPES = {
    "base": [],
    "full-lr1e5": [*FULL, "optim.lr=1e-5"],
    "full-lr2e5": [*FULL, "optim.lr=2e-5"],
    "lora7-lr2e4": [*TEACHER, f"lora.target_modules={ALL_LINEARS}", "optim.lr=2e-4"],
    # NL with GSM8k's <<...>> annotations kept (GSM8k's train answers as written; `{data}` is the data root; with
    # STYLES=nl only), without the 500 questions of the validation set: the 6,973 of train_no_aug.txt
    "full-lr1e5-annot": [*FULL, "optim.lr=1e-5", "data.source={data}/gsm8k/train.jsonl", "data.format=gsm8k",
                         "data.cot_style=nl_annotated", "data.exclude_valid_questions=true"],
}
KAVA = [sys.executable, "-m", "kava.cli"]


def job_name(style: str, method: str, seed: int, recipe: str = "base") -> str:
    return f"{style}-{method}-s{seed}" if recipe == "base" else f"{style}-{method}-{recipe}-s{seed}"


def data_overrides(style: str, data: Path) -> list[str]:
    """The presets' ../shared/data paths, pointed at `data` (the same layout)."""
    src = data / ("gsm8k/train.jsonl" if style == "eq" else "gsm8k-aug/train_no_aug.txt")
    return [f"data.source={src}", f"data.valid_source={data / 'gsm8k-aug' / 'valid.txt'}"]


def jobs(methods, styles, seeds, recipes=("base",)) -> list[tuple[str, str, int, str]]:
    """(style, method, seed, recipe) in priority order: every recipe, style and method of a seed before the next."""
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown recipes {unknown}; known: {', '.join(RECIPES)}")
    return [(st, m, s, r) for s in seeds for r in recipes for st in styles for m in methods]


def commands(style: str, method: str, seed: int, data: Path, runs: Path, extra: list[str],
             eval_limit: int | None = None, recipe: str = "base",
             preset: str = "smollm2_gsm8k") -> list[list[str]]:
    """`kava train --config PRESET_STYLE` with the job's sets (later ones win: the recipe's over the method's,
    --set's over all), then its evaluations."""
    name = job_name(style, method, seed, recipe)
    sets = [f"method={method}", f"run.seed={seed}", f"run.name={name}", f"run.output_dir={runs}",
            *data_overrides(style, data), *BASE_SETS, *METHOD_SETS.get(method, []),
            *(x.replace("{data}", str(data)) for x in RECIPES[recipe]), *extra]
    run_dir = str(runs / name)
    # a run begun before (a job requeued after it failed, a driver started again) continues from its last
    # checkpoint, or from step 0 if it saved none: `kava train` refuses to start over an unfinished run
    from kava.checkpoint.rundir import RunDir

    rd = RunDir(runs / name)
    begun = rd.started() and not rd.finished()
    start = ["--resume", run_dir] if begun else ["--config", f"{preset}_{style}"]
    train = KAVA + ["train", *start] + [x for s in sets for x in ("--set", s)]
    ev = KAVA + ["eval", "--checkpoint", run_dir, "--data-dir", str(data)] + (
        ["--limit", str(eval_limit)] if eval_limit else [])
    gsm = ev + ["--datasets", "gsm8k"] + (["--diagnostics"] if method in LATENT else [])
    rest = ev + ["--datasets", "gsm8k-hard,svamp"]
    return [train, gsm, rest]


def job_mib(spec: str | None) -> dict[str, float]:
    """The memory guesses before a method's first job is measured: `JOB_MIB`, then each part of `spec` in order:
    a model's (`smollm2`: `JOB_MIB`, `qwen`: `QWEN_JOB_MIB`) or `METHOD=MIB` (e.g. `qwen,cot=60000`)."""
    out = dict(JOB_MIB)
    for part in filter(None, (spec or "").split(",")):
        method, sep, mib = part.partition("=")
        if part in ("smollm2", "qwen"):
            out.update(JOB_MIB if part == "smollm2" else QWEN_JOB_MIB)
        elif sep and method in JOB_MIB and mib.replace(".", "", 1).isdigit():
            out[method] = float(mib)
        else:
            raise SystemExit(f"--job-mib: {part!r} is neither smollm2, qwen nor METHOD=MIB "
                             f"(methods: {', '.join(JOB_MIB)})")
    return out


def gpu_memory() -> tuple[float, dict[int, float]] | None:
    """(free MiB on GPU 0, {pid: used MiB}) from nvidia-smi; None without one (a CPU smoke test)."""
    try:
        free = subprocess.run(["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=20).stdout.split()
        apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=20).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    if not free:
        return None
    used = {}
    for line in apps:
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and parts[1].replace(".", "").isdigit():
            used[int(parts[0])] = float(parts[1])
    return float(free[0]), used


def run(a) -> int:
    out = Path(a.out).resolve()
    runs = out / "runs"
    (out / "logs").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    pending = jobs(a.methods.split(","), a.styles.split(","), [int(s) for s in a.seeds.split(",")],
                   a.recipes.split(","))
    extra = a.set or []
    if a.dry_run:
        for st, m, s, rec in pending:
            print("\n".join(" ".join(c) for c in commands(st, m, s, Path(a.data), runs, extra, a.eval_limit, rec,
                                                            a.preset)))
        return 0
    t0 = time.time()
    devicekit.clear_deadline(out)
    status = open(out / "status.jsonl", "a")

    def note(**kw):
        status.write(json.dumps({"t": round(time.time() - t0, 1), **kw}) + "\n")
        status.flush()
        print(json.dumps(kw), flush=True)

    running: list[dict] = []
    measured: dict[str, float] = {}  # method -> the longest finished job's seconds
    peak = job_mib(a.job_mib)  # method -> the largest training process of it seen (MiB); before any, a guess
    last_start = [0.0]
    retried: set[str] = set()
    while pending or running:
        deadline = devicekit.read_deadline(out, t0 + a.deadline if a.deadline else None)
        late = deadline is not None and time.time() > deadline
        for j in list(running):  # advance every running job through its commands
            rc = j["proc"].poll()
            if rc is None:
                if late and j["stage"] == 0 and not j["stopped"]:
                    j["proc"].send_signal(signal.SIGTERM)  # kava saves a checkpoint at the step boundary, exits 143
                    j["stopped"] = True
                    note(job=j["name"], event="deadline")
                continue
            # a job stopped at the deadline goes on to its evaluations if it validated an epoch (best/)
            ok = rc == 0 or (j["stage"] == 0 and j["stopped"] and (runs / j["name"] / "best").is_dir())
            if not ok or j["stage"] + 1 == len(j["cmds"]):
                took = time.time() - j["t"]
                note(job=j["name"], event="end", stage=j["stage"], rc=rc, seconds=round(took, 1))
                if not ok and j["stage"] == 0 and not j["stopped"] and j["name"] not in retried:  # e.g. OOM: once more
                    retried.add(j["name"])
                    pending.append(j["key"])
                    note(job=j["name"], event="requeued")
                if rc == 0:  # the budget check then uses what this method really took
                    measured[j["method"]] = max(measured.get(j["method"], 0.0), took)
                running.remove(j)
                continue
            if rc != 0:
                note(job=j["name"], event="stopped", rc=rc, seconds=round(time.time() - j["t"], 1))
            j["stage"] += 1
            j["proc"] = subprocess.Popen(j["cmds"][j["stage"]], stdout=j["log"], stderr=subprocess.STDOUT, env=env)
        mem = gpu_memory()
        if mem is not None:  # admission by memory: a new job needs room for the largest job of its method seen
            for j in running:
                if j["stage"] == 0 and j["proc"].pid in mem[1]:
                    peak[j["method"]] = max(peak[j["method"]], mem[1][j["proc"].pid])
        # a training process may still grow to its method's peak (graph captures come late): reserve the rest
        growing = sum(max(0.0, peak[j["method"]] - mem[1].get(j["proc"].pid, 0.0)) for j in running
                      if j["stage"] == 0) if mem is not None else 0.0
        ramp = time.time() - last_start[0] >= a.ramp_s
        if late and pending:
            for st, m, s, rec in pending:
                note(job=job_name(st, m, s, rec), event="not started", reason="deadline")
            pending.clear()
        while pending and len(running) < a.parallel and ramp:
            st, m, s, rec = pending[0]
            if mem is not None and mem[0] - growing < 1.1 * peak[m] + a.eval_mib:
                break  # wait for room (jobs start in priority order)
            need = round(1.1 * measured[m]) if m in measured else EXPECTED_S[m] * a.epochs + EVAL_S[m]
            if a.budget and time.time() - t0 + need > a.budget:
                note(job=job_name(st, m, s, rec), event="not started", reason=f"budget: needs ~{need}s")
                pending.pop(0)
                continue
            pending.pop(0)
            name = job_name(st, m, s, rec)
            if (runs / name / "eval" / "svamp" / "summary.json").exists():
                note(job=name, event="already done")
                continue
            cmds = commands(st, m, s, Path(a.data), runs, extra, a.eval_limit, rec, a.preset)
            log = open(out / "logs" / f"{name}.log", "a")
            proc = subprocess.Popen(cmds[0], stdout=log, stderr=subprocess.STDOUT, env=env)
            running.append({"name": name, "method": m, "key": (st, m, s, rec), "cmds": cmds, "stage": 0, "proc": proc,
                            "log": log, "t": time.time(), "stopped": False})
            note(job=name, event="start", running=len(running), free_mib=None if mem is None else mem[0],
                 reserved_mib=round(growing), peak_job_mib=peak[m])
            last_start[0] = time.time()
            if mem is not None:
                break  # one start per check: the next one sees this job's memory
        time.sleep(2)
    note(event="all done", seconds=round(time.time() - t0, 1))
    return 0


def set_deadline(a) -> int:
    """`driver.py deadline --out OUT --in S`: the running driver stops every job still training S seconds from
    now (OUT/deadline replaces its --deadline)."""
    t = devicekit.write_deadline(Path(a.out), a.seconds)
    with open(Path(a.out) / "status.jsonl", "a") as f:
        f.write(json.dumps({"event": "deadline moved", "at": round(t, 1), "seconds_from_now": a.seconds}) + "\n")
    print(f"deadline in {a.seconds:.0f} s")
    return 0


SMALL = ("config.yaml", "meta.json", "metrics.jsonl", "DONE", "skips.json", "versions.json", "best/meta.json",
         "final/meta.json")


def collect(a) -> int:
    """The small files of every run (config, metrics, eval summaries and predictions, logs): no weights."""
    out = Path(a.out)
    with tarfile.open(a.tar, "w:gz") as tar:
        for p in sorted(out.rglob("*")):
            rel = p.relative_to(out)
            if not p.is_file() or "checkpoints" in rel.parts or "tb" in rel.parts:
                continue
            keep = (rel.parts[0] == "logs" or len(rel.parts) == 1
                    or (rel.parts[0] == "runs" and len(rel.parts) > 2 and (
                        "/".join(rel.parts[2:]) in SMALL or rel.parts[2] == "eval")))
            if keep:
                tar.add(p, arcname=str(rel))
    print(f"wrote {a.tar} ({Path(a.tar).stat().st_size / 2**20:.1f} MiB)")
    return 0


def _cell(rows: list[dict], method: str, style: str, ds: str) -> dict | None:
    for r in rows:
        if r["method"] == method and _style_of(r) == style:
            for name, c in r["datasets"].items():  # a smoke test's `--limit N` sets count as their dataset
                if name == ds or name.startswith(f"{ds}-limit"):
                    return c
    return None


def _style_of(row: dict) -> str:
    return "nl" if "train_no_aug" in row["train_data"] else "eq"


def _pm(c: dict | None, key: str = "accuracy") -> str:
    if c is None or c.get(key) is None:
        return "–"
    sd = c.get(key + "_std")
    return f"{c[key]:.1f} ± {sd:.1f}" if sd is not None else f"{c[key]:.1f}"


MIN_GAP = 1.0  # points: the CoT - No-CoT gap below which no "share of the gap closed" is given


def headline(rows: list[dict]) -> str:
    """Markdown: accuracy (mean ± std over seeds) and passes per method x style, the share of the CoT-No-CoT gap
    each latent method closes on GSM8k, its latent ablations, and the best validation epoch of every run."""
    sets = ["gsm8k", "gsm8k-hard", "svamp"]
    lines = ["| style | method | seeds | GSM8k | GSM8k-Hard | SVAMP | passes (GSM8k) | gap closed (GSM8k) |",
             "|---|---|---|---|---|---|---|---|"]
    for style in STYLES:
        base, top = _cell(rows, "nocot", style, "gsm8k"), _cell(rows, "cot", style, "gsm8k")
        for m in METHODS:
            c = [_cell(rows, m, style, ds) for ds in sets]
            if all(x is None for x in c):
                continue
            gap = "–"
            if m in LATENT and c[0] and base and top:
                d = top["accuracy"] - base["accuracy"]
                # a share of a gap within noise is meaningless (CoT at No-CoT's level gives +-2000%)
                gap = (f"{100 * (c[0]['accuracy'] - base['accuracy']) / d:.0f}%" if d > MIN_GAP
                       else f"no gap (CoT − No-CoT {d:+.1f})")
            n = max((x["n"] for x in c if x), default=0)
            lines.append(f"| {style} | {m} | {n} | " + " | ".join(_pm(x) for x in c)
                         + f" | {_pm(c[0], 'forward_passes')} | {gap} |")
    lines += ["", "Latent students on GSM8k test: accuracy (%) with the latents replaced, the oracle (the teacher's "
              "compressed CoT KV in the latent slots) and the KV match (mean over layers).", "",
              "| style | method | normal | zeros | placeholder | shuffle | oracle | K cos | V cos |",
              "|---|---|---|---|---|---|---|---|---|"]
    f = lambda st: "–" if not st else (f"{st['mean']:.1f}" + (f" ± {st['std']:.1f}" if st.get("std") is not None else ""))  # noqa: E731
    g = lambda st: "–" if not st else f"{st['mean']:.3f}"  # noqa: E731
    for style in STYLES:
        for m in METHODS:
            c = _cell(rows, m, style, "gsm8k")
            if m not in LATENT or c is None or "ablations" not in c:
                continue
            ab, kv = c["ablations"], c.get("kv_match_mean", {})
            lines.append(f"| {style} | {m} | {f(ab.get('none'))} | {f(ab.get('zeros'))} | {f(ab.get('placeholder'))} | "
                         f"{f(ab.get('shuffle'))} | {f(c.get('oracle'))} | {g(kv.get('k_cos'))} | {g(kv.get('v_cos'))} |")
    lines += ["", "Validation accuracy (%, GSM8k-Aug valid, 500) by epoch; the evaluated checkpoint is the best one.", ""]
    epochs = max((len([x for x in run.metrics if x.get("split") == "val"]) for r in rows for run in r["run_data"]),
                 default=0)
    lines += ["| run | " + " | ".join(f"ep {i + 1}" for i in range(epochs)) + " | best |",
              "|---|" + "---|" * (epochs + 1)]
    for r in rows:
        for run in r["run_data"]:
            val = [100 * x["val/accuracy"] for x in run.metrics if x.get("split") == "val"]
            if val:
                best = max(range(len(val)), key=lambda i: (val[i], -i))
                lines.append(f"| {run.path.name} | " + " | ".join(f"{v:.1f}" for v in val)
                             + " |" * (epochs - len(val)) + f" | ep {best + 1} |")
    return "\n".join(lines) + "\n"


def report(a) -> int:
    from kava.tools.report import find_run_dirs, write_report

    dirs, _ = find_run_dirs([a.runs])
    res = write_report(dirs, a.output, group_by="method")
    (Path(a.output) / "table.md").write_text(headline(res["rows"]), encoding="utf-8")
    print((Path(a.output) / "table.md").read_text())
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--data", required=True, help="data root in ../shared/data's layout")
    r.add_argument("--out", required=True)
    r.add_argument("--parallel", type=int, default=9)
    r.add_argument("--budget", type=float, default=0, help="seconds; 0 = no limit")
    r.add_argument("--deadline", type=float, default=0,
                   help="seconds from the start at which jobs still training stop and their best/ is evaluated; 0 = none")
    r.add_argument("--epochs", type=float, default=4, help="the jobs' optim.epochs (for --budget only)")
    r.add_argument("--methods", default=",".join(METHODS))
    r.add_argument("--styles", default=",".join(STYLES))
    r.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    r.add_argument("--recipes", default="base", help=f"comma list of {', '.join(RECIPES)}")
    r.add_argument("--preset", default="smollm2_gsm8k", help="presets PRESET_eq / PRESET_nl (their model: --set)")
    r.add_argument("--set", action="append", help="extra `kava train --set` for every job")
    r.add_argument("--eval-limit", type=int, help="first N test questions only (smoke tests)")
    r.add_argument("--dry-run", action="store_true", help="print every job's commands, start nothing")
    r.add_argument("--job-mib", help="memory guesses (MiB) before a method's first job is measured: smollm2 "
                   "(the default), qwen, then METHOD=MIB,... (e.g. qwen,cot=60000)")
    r.add_argument("--eval-mib", type=float, default=6000, help="headroom (MiB) kept for running evaluations")
    r.add_argument("--ramp-s", type=float, default=10, help="seconds between two job starts on a GPU")
    d = sub.add_parser("deadline", help="move the running driver's deadline to --in seconds from now")
    d.add_argument("--out", required=True)
    d.add_argument("--in", dest="seconds", type=float, required=True)
    c = sub.add_parser("collect")
    c.add_argument("--out", required=True)
    c.add_argument("--tar", required=True)
    p = sub.add_parser("report")
    p.add_argument("--runs", required=True)
    p.add_argument("--output", required=True)
    a = ap.parse_args()
    return {"run": run, "deadline": set_deadline, "collect": collect, "report": report}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
