"""iCoT's multiplication benchmark on one GPU: many `kava train` jobs side by side, stopped at a deadline, then
each run's best validation model evaluated on the published test set. Results: results/multiplication/README.md.

    python experiments/multiplication/driver.py run --data DATA --out OUT --budget 1000 --jobs gate,icot
    python experiments/multiplication/driver.py status --out OUT
    python experiments/multiplication/driver.py pack --out OUT --tar results.tgz
    python experiments/multiplication/driver.py deadline --out OUT --in 300   # move the running driver's deadline

One job = `kava train --config multN_scratch --set method=M ...`; at `--budget` seconds after the start every job
still training gets SIGTERM, which makes kava save a checkpoint and stop (`kava train --resume RUN` continues it
exactly). Then `kava eval --checkpoint RUN --datasets multN-test` evaluates `best/`, the best validation step
(validation: the published valid.txt, 500 questions, every `run.eval_every` steps; under iCoT, the best among the
validations at the furthest removal). `status.jsonl` in OUT records every start, stop and evaluation.
Budget rule: every method trains at least as many samples as No-CoT of its size (the same batch, at least the
same steps); stopping and checkpoint choice use validation only.

A job whose run directory holds an unfinished run continues it (`kava train --resume RUN` with the job's --set
list: kava refuses any value that differs from the run's config.yaml, except a larger optim.max_steps, which
extends it; event "resume" with from_step); a finished one (DONE) is only evaluated. A run whose `kava train` exits
1 (a non-finite gradient, out of memory) continues so once before the deadline (event "retry"). So a run longer
than a lease goes on in the next one (on the device: experiments/multiplication/gpu.sh back / stash / restore):

    python experiments/multiplication/driver.py ship --out OUT --name RUN --into DIR   # DIR/pNN, 16,000,000 B
    python experiments/multiplication/driver.py gather --name RUN    # here: /work/.device/*/ -> .carry/...
    python experiments/multiplication/driver.py unship --pieces DIR --out OUT          # or --tar T

A job in FORKS starts as a fork of another job's run at its latest checkpoint (`kava.train.fork_run`: the
weights, AdamW state and RNGs of that step, with some hyperparameters changed; event "fork") and then trains as a
resumed run.

`ship` tars what a resume needs (config.yaml, meta.json, skips.json, metrics.jsonl, the tokenizer the run
trained, the latest checkpoints/step_N, best/meta.json, eval/; not best/ or final/ weights, nor the data, which
is regenerated from the seed) as RUN.step_N.tar and splits it with experiments/devicekit.py. A resumed run ends
bit for bit where an uninterrupted one would (tests/test_ship.py). Its best/ holds no weights until a later
validation beats the shipped best; until then the driver does not evaluate it (the lease that saved that best/
evaluated it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from kava.checkpoint.rundir import BEST_DIR, META_FILE, STEP_PREFIX, RunDir, lock_holder, step_of

# experiments/devicekit.py (pieces, the deadline file): beside this file in the frozen device copy, else one folder up
sys.path.insert(0, str(next(d for d in Path(__file__).resolve().parents[:2] if (d / "devicekit.py").exists())))
import devicekit  # noqa: E402

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
    # After the second lease (2026-12-06): 6,000 student steps (ce_student was still falling at 3,000), and
    # KaVa's alpha_kv 5 (at 1 its KV term had 2.5-4% of the gradient; the recipe raises it to at least 10%).
    "nocot5-8k": ("mult5_scratch", ["method=nocot", "optim.max_steps=8000"]),
    "pccot5": ("mult5_scratch", ["method=pccot", "optim.max_steps=6000"]),
    "kava5": ("mult5_scratch", ["method=kava", "optim.max_steps=6000", "loss.alpha_kv=5"]),
    "kava5-T5": ("mult5_scratch", ["method=kava", "optim.max_steps=6000", "loss.alpha_kv=5", "latent.num_sweeps=5"]),
    "codi5": ("mult5_scratch", ["method=codi", "optim.max_steps=6000", "latent.num_latents=6"]),
    "coconut5": ("mult5_scratch", ["method=coconut", "optim.max_steps=6000", "coconut.epochs_per_stage=0.06"]),
    # iCoT from a finished CoT model (the official `--pretrain_epochs`: CoT first, then removal), at a rate that
    # fits one lease, with the suspects of the from-scratch dips one at a time (the lr, the AdamW resets):
    # 4x4, 46 CoT tokens, a token every round(6312 / 58) = 109 steps (14k samples, 1/7 of the official 101k);
    # 5x5, 74 CoT tokens, a token every 61 steps (7.8k samples); then steps with no CoT left until max_steps.
    "cot4-base": ("mult4_scratch", ["method=cot", "optim.max_steps=2000"]),
    # iCoT at the official rate, from scratch as the official command (no CoT-only epochs first): a token every
    # round(6312 / 8) = 789 steps at batch 128 (101k samples), validated at the end of each token, until all 46
    # (74) tokens are gone and about 4k steps after. Longer than a lease: the driver resumes it (`ship`).
    # 4x4: 40,000 in the third lease (stopped at 35,074 with 44 tokens removed, collapsed since token 30), raised
    # to 60,000 for the next (a resume may extend max_steps): the official loop trains on long after the CoT is
    # gone (~36.3k) and reports the best epoch after that
    "icot4-off": ("mult4_scratch", ["method=icot", "icot.tokens_per_epoch=8", "optim.max_steps=60000",
                                    "run.eval_every=789"]),
    # the official sequence layout, `question SEP CoT SEP #### answer` (da03/Internalize_CoT_Step_by_Step
    # src/data.py: the separators are <eos>; here the token " $"): two positions to compute in that stay when
    # the CoT is gone. The first suspect of icot4-off's collapse at token 30; and the 6-layer model
    "icot4-sep": ("mult4_scratch", ["method=icot", "icot.tokens_per_epoch=8", "optim.max_steps=60000",
                                    "run.eval_every=789", "data.question_suffix=$", "data.answer_prompt='$ ####'"]),
    # the official command's optimizer exactly: batch 32 at lr 5e-5, so 4x the AdamW updates per removed token
    # (round(25,250 / 8) = 3,156 steps per token; all 46 gone at ~145k steps: more than a lease, `ship` carries it)
    "icot4-b32": ("mult4_scratch", ["method=icot", "icot.tokens_per_epoch=8", "optim.effective_batch=32",
                                    "optim.micro_batch=32", "optim.lr=5e-5", "optim.max_steps=160000",
                                    "run.eval_every=3156", "run.save_every=3156"]),
    # the same batch at larger lrs: 5e-5 is the official lr for a pretrained GPT-2 (ours start from scratch)
    **{f"icot4-b32-{tag}": ("mult4_scratch", ["method=icot", "icot.tokens_per_epoch=8", "optim.effective_batch=32",
                                             "optim.micro_batch=32", f"optim.lr={lr}", "optim.max_steps=160000",
                                             "run.eval_every=3156", "run.save_every=3156"])
       for tag, lr in (("lr1e4", "1e-4"), ("lr3e4", "3e-4"))},
    # the papers' regime: a pretrained model fully fine-tuned (SmolLM2-135M-Instruct, `mult4_smollm2`: batch 32,
    # lr 5e-5, the official optimizer). Its GGUF file joins the lease by `gpu.sh smollm2` (after the SmolLM2
    # study's `data` and `piece` calls). CoT and No-CoT first (the gate in this regime), iCoT at the official rate
    # (3,156 steps per token, ~145k steps: several leases, `ship`) and at 4x it (789 steps per token, all 46 gone
    # at ~36k steps)
    "cot4-sm": ("mult4_smollm2", ["method=cot", "optim.max_steps=8000", "run.eval_every=500"]),
    "nocot4-sm": ("mult4_smollm2", ["method=nocot", "optim.max_steps=8000", "run.eval_every=500"]),
    "icot4-sm": ("mult4_smollm2", ["method=icot", "icot.tokens_per_epoch=8", "optim.max_steps=160000",
                                   "run.eval_every=3156", "run.save_every=3156"]),
    "icot4-sm-r32": ("mult4_smollm2", ["method=icot", "icot.tokens_per_epoch=32", "optim.max_steps=40000",
                                       "run.eval_every=789", "run.save_every=789"]),
    "icot4-off-6l": ("mult4_scratch", ["method=icot", "icot.tokens_per_epoch=8", "optim.max_steps=60000",
                                       "run.eval_every=789", *DEEP]),
    "icot5-off": ("mult5_scratch", ["method=icot", "icot.tokens_per_epoch=8", "optim.max_steps=62000",
                                    "run.eval_every=789"]),
    # `icot.keep_position` (the official `--keep_position`): the kept CoT tokens, the answer prompt and the answer
    # keep their positions when tokens before them are removed. Every official-rate run from scratch collapsed at
    # token 30-31, and so did seven forks at token 29 (lr, resets, fp32); a collapsed model writes its remaining
    # CoT from the wrong place. With learnt absolute positions each removal shifts every later token one position,
    # so the model must re-learn where each step is 46 (74) times; with the positions kept it never has to. At
    # the official rate (a token every 789 steps) and at twice it (394: all 46 gone at ~18k steps, in one lease)
    "icot4-keep": ("mult4_scratch", ["method=icot", "icot.tokens_per_epoch=8", "optim.max_steps=60000",
                                     "run.eval_every=789", "icot.keep_position=true"]),
    "icot4-keep-r16": ("mult4_scratch", ["method=icot", "icot.tokens_per_epoch=16", "optim.max_steps=32000",
                                         "run.eval_every=394", "icot.keep_position=true"]),
    "icot5-keep": ("mult5_scratch", ["method=icot", "icot.tokens_per_epoch=8", "optim.max_steps=62000",
                                     "run.eval_every=789", "icot.keep_position=true"]),
    # icot4-keep-r16 collapsed at token 30 like every run before it (2026-12-07): at twice the official rate the
    # collapse comes at step ~11.8k, so variants of it answer "what gets past token 30?" within one lease, from
    # scratch (the shipped checkpoints of icot4-keep / icot5-keep were lost with that session's machine): 6 layers,
    # and the lr a third of ours from step 0 (the forks at token 29 changed it only after 23k steps at 3e-4)
    "icot4-keep-r16-6l": ("mult4_scratch", ["method=icot", "icot.tokens_per_epoch=16", "optim.max_steps=32000",
                                            "run.eval_every=394", "icot.keep_position=true", *DEEP]),
    "icot4-keep-r16-lr1e4": ("mult4_scratch", ["method=icot", "icot.tokens_per_epoch=16", "optim.max_steps=32000",
                                               "run.eval_every=394", "icot.keep_position=true", "optim.lr=1e-4"]),
    # the control no GPU run has had: CUDA graphs off. On 4x4 the collapse at token 30 came with a new captured shape
    # (the 5th, at step 23,700 / 11,850: graphs/captured in metrics.jsonl), but the 5x5 forks collapsed at token 30
    # on a shape captured at token 29, so graphs are not the likely trigger; an eager run past token 30 settles it
    "icot4-keep-r16-eager": ("mult4_scratch", ["method=icot", "icot.tokens_per_epoch=16", "optim.max_steps=32000",
                                               "run.eval_every=394", "icot.keep_position=true",
                                               "optim.cuda_graphs=false"]),
    # the long tail on 4x4 (2026-12-07, sixth session): on the 3x3 CPU twin a run at 32.6% when its CoT was gone
    # reached 96.2% after 22 more epochs with no CoT; the 4x4 tails so far were 2.2-3.7 epochs (1 -> 8%, 0.8 ->
    # 4.2%). icot4-keep-r16's removal ends at ~18.1k steps (~5 minutes alone on an H100 at ~70 steps/s), then up to
    # 62k steps (~10 epochs of 808k) with no CoT, in one lease; validated every 2 tokens
    "icot4-keep-r16-tail": ("mult4_scratch", ["method=icot", "icot.tokens_per_epoch=16", "optim.max_steps=80000",
                                              "run.eval_every=788", "run.save_every=1576",
                                              "icot.keep_position=true"]),
    **{f"icot{n}-fc-{tag}": (f"mult{n}_scratch", ["method=icot", f"icot.tokens_per_epoch={tpe}", "optim.max_steps=6500",
                                                   *sets])
       for n, tpe in ((4, 58), (5, 103))
       for tag, sets in (("lr1e4", ["optim.lr=1e-4"]),
                         ("lr1e4-noreset", ["optim.lr=1e-4", "icot.reset_optimizer=false"]),
                         ("lr3e4-noreset", ["optim.lr=3e-4", "icot.reset_optimizer=false"]))},
}
# forks: a job that continues another job's run from its latest checkpoint with changed hyperparameters
# (`kava.train.fork_run`; event "fork"), then trains as a resumed run. icot5-off's checkpoint at step 23,029 (29 of
# 74 tokens removed, validation 92.8%) is the branch point: every official-rate run so far collapsed at tokens
# 30-31 (4x4 with and without separators, 5x5: validation 0-13% from there on). Which change carries the model
# through: the official lr (5e-5), a third of ours, no AdamW reset at each removal, or fp32 (the official command
# trains without --bf16: fp32, where kava's presets use bf16 autocast); "same" repeats the run.
FORKS = {f"icot5-f29-{tag}": ("icot5-off", changes)
         for tag, changes in (("same", []), ("lr1e4", ["optim.lr=1e-4"]), ("lr5e5", ["optim.lr=5e-5"]),
                              ("noreset", ["icot.reset_optimizer=false"]),
                              ("lr1e4-noreset", ["optim.lr=1e-4", "icot.reset_optimizer=false"]),
                              ("fp32", ["optim.precision=fp32"]),
                              ("fp32-lr5e5", ["optim.precision=fp32", "optim.lr=5e-5"]))}  # both official settings
JOBS.update({name: (JOBS[parent][0], [*JOBS[parent][1], *changes]) for name, (parent, changes) in FORKS.items()})
AFTER = {name: "cot5-base" for name in ("pccot5", "kava5", "kava5-T5", "codi5", "coconut5")} | \
    {name: f"cot{name[4]}-base" for name in JOBS if "-fc-" in name}
GROUPS = {"gate": ["cot4", "nocot4", "cot5", "nocot5", "cot5-6l", "nocot5-6l"], "icot": ["icot4", "icot5"],
          "icot-next": ["icot4-b512", "icot4-b512-lr1e4", "icot4-b512-noreset", "icot5-b512-lr1e4"],
          "table5": ["cot5-base", "nocot5-8k", "pccot5", "kava5", "kava5-T5", "codi5", "coconut5"],
          "icot-off": ["icot4-off", "icot5-off"],
          "icot-lease4": ["icot4-off", "icot5-off", "icot4-sep"],
          "icot5-f29": list(FORKS),
          # the forks at token 29 all collapsed at token 30 (2026-12-07): the remaining difference from the
          # official recipe is the batch (32: 4x the AdamW updates per removed token)
          "icot4-b32": ["icot4-b32", "icot4-b32-lr1e4", "icot4-b32-lr3e4"],
          "sm4": ["cot4-sm", "nocot4-sm", "icot4-sm", "icot4-sm-r32"],
          "keep": ["icot4-keep-r16", "icot4-keep", "icot5-keep"],
          # from scratch, one lease: the official rate with kept positions to token 30 (~23.7k steps), and the
          # twice-the-rate run with 6 layers, lr 1e-4 or CUDA graphs off (token 30 at ~11.8k)
          "past30": ["icot4-keep", "icot4-keep-r16-6l", "icot4-keep-r16-lr1e4", "icot4-keep-r16-eager"],
          # a short lease (~10 minutes of jobs): the twice-the-rate variants only, and the eager control
          "past30-short": ["icot4-keep-r16-6l", "icot4-keep-r16-lr1e4", "icot4-keep-r16-eager"],
          "icot-fc": ["cot4-base", "cot5-base"] + [name for name in JOBS if "-fc-" in name]}
COMMON = ["optim.max_steps=20000", "run.eval_every=500", "run.save_every=500"]
LATENT = {"pccot", "kava", "codi", "coconut"}
POLL_S = 5.0  # seconds between looks at the jobs
SHIP_PIECE_BYTES = 16_000_000  # a device call brings back files of at most 16 MiB each


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


def resume_cmd(name: str, data: Path, out: Path, seed: int, extra: list[str]) -> list[str]:
    """`kava train --resume RUN` with the job's --set list: kava refuses any value that differs from the run's
    config.yaml except optim.max_steps (a larger one extends the run), so a job edited since cannot continue a
    run under another definition."""
    sets = job_sets(name, data, out, seed, extra)
    return KAVA + ["train", "--resume", str(run_dir(out, name, seed)), "--no-progress"] + \
        sum((["--set", s] for s in sets), [])


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


def set_deadline(args) -> None:
    """`driver.py deadline --out OUT --in S`: every job still training is stopped S seconds from now (OUT/deadline
    replaces the --budget deadline: a later device call moves it once the lease's time left is known)."""
    out = Path(args.out).absolute()
    t = devicekit.write_deadline(out, args.seconds)
    log(out, event="deadline moved", at=round(t, 1), seconds_from_now=args.seconds)


def expand(jobs: str) -> list[str]:
    names = [j for part in jobs.split(",") for j in GROUPS.get(part, [part])]
    unknown = [j for j in names if j not in JOBS]
    if unknown:
        raise SystemExit(f"unknown jobs {unknown}; known: {sorted(JOBS)} and groups {sorted(GROUPS)}")
    return names


def run(args) -> None:
    """Start every job of every seed whose dependency (`AFTER`) is done, stop what still trains at the deadline,
    then evaluate each run's best/ on the test set. A job whose run directory holds an unfinished run (stopped
    at an earlier deadline, or shipped from an earlier lease and restored) continues it (`kava train --resume`);
    a finished one (DONE) is not trained again, only evaluated if its test evaluation is missing or stale."""
    out, data = Path(args.out).absolute(), Path(args.data).absolute()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    seeds = [int(x) for x in str(args.seeds).split(",")]
    pending = [(name, seed) for seed in seeds for name in expand(args.jobs)]
    start = time.time()
    devicekit.clear_deadline(out)
    deadline = start + args.budget
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs: dict[tuple[str, int], subprocess.Popen] = {}
    stopped: set[tuple[str, int]] = set()
    finished: list[tuple[str, int]] = []  # DONE before this call: evaluated only
    if args.dry_run:
        for name, seed in pending:
            rd = RunDir(run_dir(out, name, seed))
            fork = name in FORKS and not rd.started()
            cmd = resume_cmd if fork or rd.started() and not rd.finished() else train_cmd
            print(("after " + AFTER[name] + ": " if name in AFTER else "") + ("(DONE) " if rd.finished() else "") +
                  (f"fork of {FORKS[name][0]}-s{seed} with {FORKS[name][1]}, then: " if fork else "") +
                  " ".join(cmd(name, data, out, seed, args.set)))
        return
    retried: set[tuple[str, int]] = set()
    while True:
        deadline = devicekit.read_deadline(out, deadline)
        for key, p in procs.items():
            # kava exits 1 on a non-finite gradient (its last good state saved) or out of memory: once per run, it
            # goes on from its last checkpoint (2026-12-07: a run stopped so while other jobs on the card ran out
            # of memory, and the card stood half idle for the rest of the lease); a second failure ends it
            if p.poll() == 1 and key not in stopped and key not in retried and key not in pending \
                    and time.time() < deadline:
                retried.add(key)
                pending.append(key)
                ck = RunDir(run_dir(out, *key)).latest_checkpoint()
                log(out, event="retry", job=key[0], seed=key[1], rc=1, from_step=step_of(ck) if ck else 0)
        if not pending and all(p.poll() is not None for p in procs.values()):
            break  # (after the retries: a run that failed since the last look may go on)
        for name, seed in list(pending):
            rd = RunDir(run_dir(out, name, seed))
            if rd.finished():
                pending.remove((name, seed))
                finished.append((name, seed))
                log(out, event="done before", job=name, seed=seed, steps=(rd.read_done() or {}).get("steps"))
                continue
            dep = AFTER.get(name)
            if dep is not None:
                dep_proc = procs.get((dep, seed))
                if (run_dir(out, dep, seed) / "DONE").exists():
                    pass  # ready: the CoT model it starts from is final
                elif (dep, seed) not in pending and (dep_proc is not None and dep_proc.poll() is not None
                                                     or (dep, seed) not in procs):
                    pending.remove((name, seed))  # its CoT model failed, was stopped or is not part of this run
                    log(out, event="not started", job=name, seed=seed, why=f"{dep}-s{seed} did not finish")
                    continue
                else:
                    continue
            if time.time() > deadline:
                pending.remove((name, seed))
                log(out, event="not started", job=name, seed=seed, why="deadline")
                continue
            if name in FORKS and not rd.started():
                parent, changes = FORKS[name]
                src = RunDir(run_dir(out, parent, seed))
                if src.latest_checkpoint() is None:
                    pending.remove((name, seed))
                    log(out, event="not started", job=name, seed=seed, why=f"{src.path} has no checkpoint to fork")
                    continue
                from kava.train import fork_run

                fork_run(src.path, rd.path, changes)
                log(out, event="fork", job=name, seed=seed, parent=src.path.name,
                    step=step_of(rd.latest_checkpoint()), changes=changes)
            resume = rd.started()  # config.yaml written: kava refuses to start it over, --resume continues it
            cmd = (resume_cmd if resume else train_cmd)(name, data, out, seed, args.set)
            procs[(name, seed)] = subprocess.Popen(cmd, stdout=open(out / "logs" / f"{name}-s{seed}.log",
                                                                    "a" if resume else "w"),
                                                   stderr=subprocess.STDOUT, env=env)
            pending.remove((name, seed))
            ck = rd.latest_checkpoint() if resume else None
            log(out, event="resume" if resume else "start", job=name, seed=seed, pid=procs[(name, seed)].pid,
                **({"from_step": step_of(ck) if ck else 0} if resume else {}), cmd=cmd)
            time.sleep(args.stagger)
        if time.time() > deadline:
            for key, p in procs.items():
                if p.poll() is None and key not in stopped:
                    p.send_signal(signal.SIGTERM)  # kava saves a checkpoint at the step boundary and exits 143
                    stopped.add(key)
                    log(out, event="deadline", job=key[0], seed=key[1])
        time.sleep(POLL_S)
    for (name, seed), p in procs.items():
        log(out, event="end", job=name, seed=seed, rc=p.returncode, stopped=(name, seed) in stopped,
            wall_s=round(time.time() - start))
    evals = {}
    for name, seed in [*procs, *finished]:
        why = no_eval(name, out, seed, again=(name, seed) in procs)
        if why is None:
            evals[(name, seed)] = subprocess.Popen(eval_cmd(name, data, out, seed), env=env, stderr=subprocess.STDOUT,
                                                   stdout=open(out / "logs" / f"{name}-s{seed}.eval.log", "w"))
        else:
            log(out, event="no evaluation", job=name, seed=seed, why=why)
    for (name, seed), p in evals.items():
        log(out, event="eval", job=name, seed=seed, rc=p.wait())
    log(out, event="all done", wall_s=round(time.time() - start))


def no_eval(name: str, out: Path, seed: int, again: bool) -> str | None:
    """Why a run's best/ is not evaluated now, or None. `again`: it trained in this call (else: DONE before it,
    evaluated only if its test evaluation is missing or no longer of best/)."""
    from kava.checkpoint.saved import has_model

    rd = RunDir(run_dir(out, name, seed))
    if not rd.best.exists():
        return "no best/"
    if not has_model(rd.best):  # `ship` carries best/meta.json, not the weights
        return (f"best/ (step {rd.saved_step(BEST_DIR)}) has no weights here: it came from an earlier lease, whose "
                "evaluation of it is in that lease's results")
    summary = rd.eval / f"mult{digits_of(JOBS[name][0])}-test" / "summary.json"
    if not again and summary.exists() and rd.stale_eval(json.loads(summary.read_text())) is None:
        return f"already evaluated: {summary}"
    return None


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


# ------------------------------------------------------------------------------------------------ leases
def ship_members(rd: RunDir) -> tuple[Path, list[Path]]:
    """(the latest checkpoint, what a resume of run `rd` needs): config.yaml, meta.json, skips.json,
    metrics.jsonl, DONE, wandb.json, the run's own tokenizer, the latest `checkpoints/step_N` (weights, AdamW,
    RNGs, state.json), best/meta.json (which step is best: a later validation must beat it) and eval/ (small).
    Not best/ or final/ weights, older checkpoints, tb/, nor the data (`_data`, outside the run: regenerated
    from the seed)."""
    ck = rd.latest_checkpoint()
    if ck is None:
        raise SystemExit(f"{rd.path}: no complete checkpoint to ship (a resume would start from step 0)")
    files = [rd.config, rd.meta, rd.skips, rd.metrics, rd.done, rd.wandb, rd.best / META_FILE]
    return ck, [f for f in files if f.is_file()] + [d for d in (rd.tokenizer_src, ck, rd.eval) if d.is_dir()]


def ship(args) -> None:
    """One tar of what `kava train --resume` needs from OUT/runs/NAME (`ship_members`), named
    NAME.step_N.tar, split by devicekit into DIR/pNN (one piece and the manifest each). Made once: pieces of the
    same checkpoint already in DIR are kept."""
    rd = RunDir(Path(args.out) / "runs" / args.name)
    if not rd.started():
        raise SystemExit(f"{rd.path}: not a run directory (no {rd.config.name})")
    if (holder := lock_holder(rd.path)) is not None:
        raise SystemExit(f"{rd.path} is in use by a trainer ({holder}): ship it once the driver stopped it")
    ck, members = ship_members(rd)
    tar_name = f"{args.name}.{ck.name}.tar"
    into = Path(args.into)
    old = into / "p00" / "manifest.json"
    if old.exists():
        m = json.loads(old.read_text())
        if m["name"] == tar_name and all((into / f"p{k:02d}" / p["file"]).is_file() and
                                         (into / f"p{k:02d}" / p["file"]).stat().st_size == p["size"]
                                         for k, p in enumerate(m["pieces"])):
            print(f"{into}: {len(m['pieces'])} pieces of {tar_name} already made ({m['size']} bytes)")
            return
    tmp = into.parent / f".{into.name}.tar.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with tarfile.open(tmp / tar_name, "w") as tar:
            for path in members:
                tar.add(path, arcname=str(path.relative_to(rd.path.parent)))
        m = devicekit.split(tmp / tar_name, into, args.piece_bytes, exclude=None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{tar_name}: {m['size']} bytes, sha256 {m['sha256']}, {len(m['pieces'])} pieces in {into}/p00 ..; "
          f"holds {', '.join(str(p.relative_to(rd.path)) for p in members)}")


def unship(args) -> None:
    """A shipped run back into OUT/runs/NAME: from the tar, or from a folder of its pieces and manifest (joined
    and checked by devicekit, the tar written next to that folder). If the run's config.yaml names another
    run.output_dir (the run moved), it is set to OUT/runs (its data cache, `_data`, follows)."""
    out = Path(args.out).absolute()
    tar_path = Path(args.tar) if args.tar else None
    if args.pieces:
        pieces = Path(args.pieces)
        name = json.loads((pieces / "manifest.json").read_text())["name"]
        tar_path = devicekit.join(pieces, pieces.parent / name)
    with tarfile.open(tar_path) as tar:
        tops = {n.split("/", 1)[0] for n in tar.getnames()}
        if len(tops) != 1:
            raise SystemExit(f"{tar_path}: not one run (top-level entries {sorted(tops)})")
        rd = RunDir(out / "runs" / tops.pop())
        if rd.path.exists():
            if not args.replace:
                raise SystemExit(f"{rd.path} exists; remove it first (or --replace)")
            shutil.rmtree(rd.path)
        rd.path.parent.mkdir(parents=True, exist_ok=True)
        tar.extractall(rd.path.parent, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    from kava.config import load_config, save_config

    cfg = load_config(str(rd.config), resolve_paths=False)
    where = str(rd.path.parent)
    if cfg.run.output_dir != where:
        save_config(load_config(str(rd.config), [f"run.output_dir={where}"], resolve_paths=False), rd.config)
        print(f"{rd.config}: run.output_dir {cfg.run.output_dir} -> {where} (the run moved)")
    ck = rd.latest_checkpoint()
    print(f"{rd.path}: {'finished (DONE)' if rd.finished() else 'unfinished'}, checkpoint "
          f"{ck.name if ck else None}, from {tar_path}")


def gather(args) -> None:
    """Here, after `gpu.sh back NAME K` calls: the newest shipment of run NAME (the manifest NAME.step_N.tar with
    the highest N) collected from the device calls' folders (SRC/*/) into INTO/NAME/; once every piece is there
    (devicekit join checks each and the whole by sha256), unpacked into UNPACK/runs/NAME (`unship`) and split
    into carry pieces SHIP/NAME/pNN for the next lease (devicekit's default size)."""
    found = []
    for mpath in Path(args.src).glob("*/manifest.json"):
        m = json.loads(mpath.read_text())
        stem = m["name"].removesuffix(".tar")
        if m["name"].endswith(".tar") and stem.rsplit(".", 1)[0] == args.name and \
                step_of(stem.rsplit(".", 1)[-1]) is not None:
            found.append((step_of(stem.rsplit(".", 1)[-1]), mpath.stat().st_mtime, mpath, m))
    if not found:
        raise SystemExit(f"no manifest of {args.name}.{STEP_PREFIX}N.tar in {args.src}/*/")
    _, _, mpath, m = max(found, key=lambda f: f[:2])
    into = Path(args.into) / args.name
    if (into / "manifest.json").exists() and json.loads((into / "manifest.json").read_text())["name"] != m["name"]:
        shutil.rmtree(into)  # an older shipment's pieces
    into.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(mpath, into / "manifest.json")
    for p in m["pieces"]:
        have = into / p["file"]
        if have.is_file() and have.stat().st_size == p["size"]:
            continue
        src = next((f for f in Path(args.src).glob(f"*/{p['file']}") if f.stat().st_size == p["size"]), None)
        if src is not None:
            shutil.copyfile(src, have)
    gone = devicekit.missing(into)
    if gone:
        k = len(m["pieces"]) - len(gone)
        print(f"{m['name']}: {k} of {len(m['pieces'])} pieces in {into}; missing {', '.join(gone)}")
        raise SystemExit(3)
    unship(argparse.Namespace(out=args.unpack, tar=None, pieces=str(into), replace=True))
    tar_path = into.parent / m["name"]
    s = devicekit.split(tar_path, Path(args.ship) / args.name)
    print(f"for the next lease: {len(s['pieces'])} carry pieces {Path(args.ship) / args.name}/p00 .. "
          f"p{len(s['pieces']) - 1:02d} of {tar_path}")


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
    d = sub.add_parser("deadline", help="move the running driver's deadline to --in seconds from now")
    d.add_argument("--out", required=True)
    d.add_argument("--in", dest="seconds", type=float, required=True)
    s = sub.add_parser("status")
    s.add_argument("--out", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--out", required=True)
    p.add_argument("--tar", required=True)
    sh = sub.add_parser("ship", help="a run's resume state as one tar, in pieces of at most --piece-bytes")
    sh.add_argument("--out", required=True)
    sh.add_argument("--name", required=True, help="the run directory's name, e.g. icot4-s42")
    sh.add_argument("--into", required=True, help="folder of the pieces: INTO/p00, INTO/p01, ...")
    sh.add_argument("--piece-bytes", type=int, default=SHIP_PIECE_BYTES)
    u = sub.add_parser("unship", help="a shipped run (tar or pieces) into OUT/runs/NAME")
    u.add_argument("--out", required=True)
    g = u.add_mutually_exclusive_group(required=True)
    g.add_argument("--tar")
    g.add_argument("--pieces", help="a folder of the pieces and manifest.json (joined and checked first)")
    u.add_argument("--replace", action="store_true", help="replace OUT/runs/NAME if it exists")
    ga = sub.add_parser("gather", help="here: collect a run's pieces from device calls, join, unpack, re-split")
    ga.add_argument("--name", required=True)
    ga.add_argument("--src", default="/work/.device", help="the folders device calls' files land in: SRC/*/")
    ga.add_argument("--into", default=".carry/back")
    ga.add_argument("--unpack", default=".carry/back/out", help="the local OUT the run is unpacked into")
    ga.add_argument("--ship", default=".carry/ship", help="carry pieces for the next lease: SHIP/NAME/pNN")
    args = ap.parse_args()
    verbs = {"run": run, "deadline": set_deadline, "status": status, "pack": pack, "ship": ship, "unship": unship,
             "gather": gather}
    verbs[args.cmd](args)


if __name__ == "__main__":
    main()
