"""A multiplication run that outlasts a device lease: stopped part way, its resume state shipped back in pieces
(`gpu.sh back`), gathered, joined and re-split here (`gpu.sh gather`), stashed and restored on a fresh machine
(`gpu.sh stash`, `restore`) and continued by the driver (`kava train --resume`) ends with the weights and
AdamW state of an uninterrupted run, bit for bit."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import kava.train as kt
from kava.config import load_config

REPO = Path(__file__).resolve().parents[1]
GPU_SH = REPO / "experiments" / "multiplication" / "gpu.sh"
RUN = "icot4-s42"
# a GPT-2 of width 32 on 3,000 generated 4x4 products, batch 16, 12 steps: checkpoints at 4, 8, 12, validations on
# 4 published questions; iCoT removes ~1.6 CoT tokens a step, each removal a fresh AdamW (reset_optimizer)
TINY = ["model.from_scratch.n_embd=32", "model.from_scratch.n_head=2", "model.from_scratch.n_layer=1",
        "data.synth_train_size=3000", "data.synth_eval_size=8", "data.valid_limit=4", "optim.effective_batch=16",
        "optim.micro_batch=16", "optim.max_steps=12", "run.eval_every=4", "run.save_every=4",
        "run.eval_batch_size=4", "run.eval_max_cot_tokens=40", "icot.tokens_per_epoch=300"]


def driver():
    path = REPO / "experiments" / "multiplication" / "driver.py"
    spec = importlib.util.spec_from_file_location("mult_driver_ship", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def gpu_sh(*args, root: Path, out: Path | None = None, **env) -> str:
    """One `gpu.sh` verb as a device call (MULT_ROOT: the machine's /root/mult, OUT: its $OUT) or here."""
    env = {**os.environ, "MULT_ROOT": str(root), "PYTHON": sys.executable, **({"OUT": str(out)} if out else {}),
           **env}
    r = subprocess.run(["bash", str(GPU_SH), *args], cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def tensors(run: Path, rel: str) -> dict[str, torch.Tensor]:
    return load_file(str(run / rel))


def test_run_shipped_between_leases_resumes_exactly(tmp_path, data_dir, monkeypatch):
    d = driver()
    monkeypatch.setattr(d, "POLL_S", 0.2)
    monkeypatch.setattr(d, "eval_cmd", lambda *a: [sys.executable, "-c", ""])  # the test set is not the point
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kava train subprocesses compute as this one (conftest)

    def drive(out: Path):
        d.run(argparse.Namespace(data=str(data_dir), out=str(out), jobs="icot4", budget=600, seeds="42",
                                 stagger=0, set=TINY, dry_run=False))
        return [json.loads(ln) for ln in (out / "status.jsonl").read_text().splitlines()]

    # the uninterrupted run
    whole = tmp_path / "whole"
    assert [e["event"] for e in drive(whole)][0] == "start"
    a = whole / "runs" / RUN
    assert (a / "DONE").exists()

    # lease 1: the same job stopped after step 8 (`kava train` as the driver starts it, stopped part way)
    dev1 = tmp_path / "dev1"
    cfg = load_config(d.JOBS["icot4"][0], d.job_sets("icot4", data_dir, dev1 / "out", 42, TINY))
    kt.train(cfg, progress=False, stop_after=8)
    assert kt.latest_checkpoint(dev1 / "out" / "runs" / RUN).name == "step_8"
    # ... back in calls of 4 pieces each (pieces of 60 kB here, 16 MB on the device)
    calls = []
    for k in range(9):
        got = tmp_path / "device" / str(k)
        got.mkdir(parents=True)
        say = gpu_sh("back", RUN, str(k), root=dev1, out=got, PIECE_BYTES="60000")
        calls.append(sorted(p.name for p in got.iterdir()))
        if "remaining: none" in say:
            break
    n = len(json.loads((got / "manifest.json").read_text())["pieces"])
    assert n >= 5 and len(calls) == -(-n // 4)  # K = 0 .. ceil(n / 4) - 1
    assert all(len(c) <= 5 and "manifest.json" in c for c in calls)
    assert [f for c in calls for f in c if f != "manifest.json"] == [f"{RUN}.step_8.tar.{k:02d}" for k in range(n)]
    shutil.rmtree(dev1)  # the machine is given back: nothing of the first run is left but what came back

    # here: gathered, joined (sha256 checked), unpacked, re-split into carry pieces
    carry = tmp_path / "here" / ".carry"
    say = gpu_sh("gather", RUN, root=tmp_path / "nowhere", CARRY=str(carry), DEVICE_FILES=str(tmp_path / "device"))
    assert "carry pieces" in say
    with tarfile.open(carry / "back" / f"{RUN}.step_8.tar") as tar:
        names = set(tar.getnames())
    assert {f"{RUN}/{f}" for f in ("config.yaml", "meta.json", "metrics.jsonl", "best/meta.json",
                                   "tokenizer_src/tokenizer_config.json", "checkpoints/step_8/state.json",
                                   "checkpoints/step_8/trainable.safetensors",
                                   "checkpoints/step_8/optimizer.safetensors")} <= names
    assert not [n for n in names if "step_4" in n or "_data" in n or "final" in n or "best/model" in n]
    assert (carry / "back" / "out" / "runs" / RUN / "checkpoints" / "step_8").is_dir()
    pieces = sorted((carry / "ship" / RUN).iterdir())
    assert [p.name for p in pieces] == ["p00"]  # 49.5 MB carry pieces: one here

    # lease 2, a fresh machine: each piece stashed in its own call, then restored and continued by the driver
    dev2 = tmp_path / "dev2"
    for p in pieces:
        gpu_sh("stash", RUN, p.name, root=dev2, CARRY=str(carry))
    gpu_sh("restore", RUN, root=dev2)
    events = drive(dev2 / "out")
    assert [(e["event"], e.get("from_step")) for e in events if e["event"] in ("start", "resume")] == [("resume", 8)]
    assert not dev1.exists()  # the resumed run read and wrote nothing at the first machine's paths
    b = dev2 / "out" / "runs" / RUN
    assert json.loads((b / "DONE").read_text())["steps"] == 12
    for rel in ("checkpoints/step_12/trainable.safetensors", "checkpoints/step_12/optimizer.safetensors",
                "final/model/model.safetensors"):
        wa, wb = tensors(a, rel), tensors(b, rel)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), rel
    val = [[(r["step"], r["val/accuracy"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r.get("split") == "val"] for run in (a, b)]
    assert val[0] == val[1] and [s for s, _ in val[0]] == [4, 8, 12]

    # a finished run is not trained again
    again = drive(dev2 / "out")[len(events):]
    assert [e["event"] for e in again if e["event"] in ("start", "resume", "done before")] == ["done before"]


def test_a_fork_job_branches_the_parent_run_and_trains_on(tmp_path, data_dir, monkeypatch):
    """A FORKS job: the driver forks the parent job's run at its latest checkpoint with the job's changes (event
    "fork"), resumes it to the end, and leaves the parent run as it was."""
    d = driver()
    monkeypatch.setattr(d, "POLL_S", 0.2)
    monkeypatch.setattr(d, "eval_cmd", lambda *a: [sys.executable, "-c", ""])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setitem(d.FORKS, "icot4-fk", ("icot4", ["optim.lr=1e-4", "icot.reset_optimizer=false"]))
    monkeypatch.setitem(d.JOBS, "icot4-fk", (d.JOBS["icot4"][0], [*d.JOBS["icot4"][1], *d.FORKS["icot4-fk"][1]]))
    out = tmp_path / "out"
    parent = out / "runs" / RUN
    kt.train(load_config(d.JOBS["icot4"][0], d.job_sets("icot4", data_dir, out, 42, TINY)), progress=False,
             stop_after=8)
    before = sorted(p.name for p in parent.rglob("*"))
    d.run(argparse.Namespace(data=str(data_dir), out=str(out), jobs="icot4-fk", budget=600, seeds="42", stagger=0,
                             set=TINY, dry_run=False))
    events = [json.loads(ln) for ln in (out / "status.jsonl").read_text().splitlines()]
    fork = next(e for e in events if e["event"] == "fork")
    assert (fork["parent"], fork["step"]) == (RUN, 8)
    assert [(e["event"], e.get("from_step")) for e in events if e["event"] in ("start", "resume")] == [("resume", 8)]
    child = out / "runs" / "icot4-fk-s42"
    assert json.loads((child / "DONE").read_text())["steps"] == 12
    cfg = kt.resume_config(child)
    assert cfg.optim.lr == 1e-4 and cfg.icot.reset_optimizer is False
    assert json.loads((child / "meta.json").read_text())["fork"]["step"] == 8
    assert sorted(p.name for p in parent.rglob("*")) == before and not (parent / "DONE").exists()


def test_deadline_file_moves_the_running_drivers_deadline(tmp_path):
    """`driver.py deadline --in S` writes OUT/deadline; the run loop reads it at every poll instead of its own."""
    import time

    d = driver()
    out = tmp_path / "out"
    out.mkdir()
    assert d.devicekit.read_deadline(out, 123.0) == 123.0  # no file: the --budget deadline
    before = time.time()
    d.set_deadline(argparse.Namespace(out=str(out), seconds=300.0))
    moved = d.devicekit.read_deadline(out, 123.0)
    assert before + 300.0 - 0.2 <= moved <= time.time() + 300.0 + 0.2
    assert json.loads((out / "status.jsonl").read_text().splitlines()[-1])["event"] == "deadline moved"


JOB_EXITING = """import pathlib, sys
run = pathlib.Path(sys.argv[1])
run.mkdir(parents=True, exist_ok=True)
(run / "config.yaml").write_text("method: icot\\n")  # begun: kava would refuse to start it over
with open(run.parent.parent / "calls.txt", "a") as f:
    f.write(f"{run.name}:{sys.argv[2]}\\n")
sys.exit(int(sys.argv[3]))
"""


def test_a_run_that_fails_goes_on_once_from_its_last_checkpoint(tmp_path, monkeypatch):
    """A job whose `kava train` exits 1 (a non-finite gradient, out of memory) is resumed once (event "retry");
    a second failure ends it, and another exit code (2: a usage or config error) is not retried."""
    d = driver()
    monkeypatch.setattr(d, "POLL_S", 1.0)  # every job has ended by the next look: the retry must still happen
    script = tmp_path / "job.py"
    script.write_text(JOB_EXITING)
    codes = {"icot4": {"train": 1, "resume": 0}, "icot5": {"train": 1, "resume": 1}, "cot4": {"train": 2}}

    def cmd(kind):
        return lambda name, data, out, seed, extra: [sys.executable, str(script), str(d.run_dir(out, name, seed)),
                                                     kind, str(codes[name][kind])]

    monkeypatch.setattr(d, "train_cmd", cmd("train"))
    monkeypatch.setattr(d, "resume_cmd", cmd("resume"))
    out = tmp_path / "out"
    d.run(argparse.Namespace(data=str(tmp_path), out=str(out), jobs="icot4,icot5,cot4", budget=600, seeds="42",
                             stagger=0, set=[], dry_run=False))
    events = [json.loads(ln) for ln in (out / "status.jsonl").read_text().splitlines()]
    assert sorted((e["job"], e["from_step"]) for e in events if e["event"] == "retry") == [("icot4", 0), ("icot5", 0)]
    assert {e["job"]: e["rc"] for e in events if e["event"] == "end"} == {"icot4": 0, "icot5": 1, "cot4": 2}
    assert sorted((out / "calls.txt").read_text().split()) == [
        "cot4-s42:train", "icot4-s42:resume", "icot4-s42:train", "icot5-s42:resume", "icot5-s42:train"]
