"""experiments/smollm2/driver.py, the GSM8k study driver (SmolLM2, and Qwen2.5-0.5B through --preset/--set): every
job it can start resolves to a valid kava config (a config error would otherwise cost device time), its recipes
change what they name, and job names keep the recipe apart."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from kava.config import load_config

REPO = Path(__file__).resolve().parents[1]
QWEN = ["model.name_or_path=/root/models", "model.gguf_file=qwen2.5-coder-0.5b-instruct.gguf"]


def driver():
    spec = importlib.util.spec_from_file_location("gsm8k_driver", REPO / "experiments" / "smollm2" / "driver.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def train_config(d, style, method, recipe, tmp_path, extra=()):
    cmd = d.commands(style, method, 42, Path("/data"), tmp_path / "runs", list(extra), recipe=recipe)[0]
    i = cmd.index("--config")
    sets = [cmd[k + 1] for k in range(len(cmd)) if cmd[k] == "--set"]
    return cmd[i + 1], load_config(cmd[i + 1], sets, resolve_paths=False)


@pytest.mark.parametrize("recipe", ["base", "full-lr1e5", "full-lr2e5", "lora7-lr2e4", "full-lr1e5-annot"])
def test_every_job_resolves_to_a_valid_config(recipe, tmp_path):
    d = driver()
    for style in d.STYLES:
        for method in d.METHODS:
            preset, cfg = train_config(d, style, method, recipe, tmp_path, QWEN)
            assert preset == f"smollm2_gsm8k_{style}" and cfg.method == method
            assert cfg.run.name == d.job_name(style, method, 42, recipe)
            assert cfg.model.gguf_file == "qwen2.5-coder-0.5b-instruct.gguf"  # --set wins over the preset
            if recipe.startswith("full"):
                assert cfg.lora is None and cfg.optim.weight_decay == 0 and not cfg.data.drop_last_step
                assert cfg.optim.lr == {"full-lr1e5": 1e-5, "full-lr2e5": 2e-5, "full-lr1e5-annot": 1e-5}[recipe]
            if recipe == "full-lr1e5-annot":  # GSM8k's own answers, annotations kept, from the data root
                assert (cfg.data.source, cfg.data.cot_style) == ("/data/gsm8k/train.jsonl", "nl_annotated")
                assert cfg.data.exclude_valid_questions  # GSM8k train holds the 500 validation questions
            if recipe == "lora7-lr2e4":
                assert len(cfg.lora.target_modules) == 7 and cfg.optim.lr == 2e-4
            if recipe != "base":
                assert cfg.optim.cuda_graphs is False
            if method == "codi":  # the method's own sets stay under a recipe
                assert cfg.latent.num_latents == 6


def test_job_order_and_names_keep_recipes_apart():
    d = driver()
    js = d.jobs(["cot", "nocot"], ["nl"], [42, 123], ["full-lr1e5", "base"])
    assert js[:4] == [("nl", "cot", 42, "full-lr1e5"), ("nl", "nocot", 42, "full-lr1e5"), ("nl", "cot", 42, "base"),
                      ("nl", "nocot", 42, "base")]  # every recipe of seed 42 before seed 123
    names = {d.job_name(*j[:3], j[3]) for j in js}
    assert len(names) == len(js) and "nl-cot-s42" in names and "nl-cot-full-lr1e5-s123" in names
    with pytest.raises(SystemExit, match="unknown recipes .'lora9'"):
        d.jobs(["cot"], ["nl"], [42], ["lora9"])


FAKE_JOB = """
import pathlib, signal, sys, time
mode, run = sys.argv[1], pathlib.Path(sys.argv[2])
if mode.startswith("eval"):  # an evaluation: leaves a mark
    run.mkdir(parents=True, exist_ok=True)
    (run / mode).write_text("x")
    sys.exit(0)
def stop(*_):  # as kava train at SIGTERM: exits 143; a run that validated an epoch has best/
    if mode == "train-validated":
        (run / "best").mkdir(parents=True, exist_ok=True)
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
run.parent.mkdir(parents=True, exist_ok=True)
(run.parent / (run.name + ".ready")).write_text("x")
time.sleep(60)
"""


def test_deadline_stops_training_and_evaluates_best(tmp_path, monkeypatch):
    """At --deadline every job still training gets SIGTERM; one that validated an epoch (best/) goes on to its
    evaluations, one that did not ends there (not retried), and no job starts after the deadline."""
    import argparse
    import json
    import sys

    d = driver()
    script = tmp_path / "fake_job.py"
    script.write_text(FAKE_JOB)

    def commands(style, method, seed, data, runs, extra, eval_limit=None, recipe="base", preset=""):
        run = runs / d.job_name(style, method, seed, recipe)
        train = "train-validated" if method == "nocot" else "train"
        return [[sys.executable, str(script), m, str(run)] for m in (train, "eval-gsm8k", "eval-rest")]

    monkeypatch.setattr(d, "commands", commands)
    monkeypatch.setattr(d, "gpu_memory", lambda: None)
    out = tmp_path / "out"
    a = argparse.Namespace(out=str(out), data=str(tmp_path), methods="nocot,cot,kava", styles="nl", seeds="42",
                           recipes="base", set=None, dry_run=False, eval_limit=None, preset="smollm2_gsm8k",
                           parallel=2, budget=0, epochs=4, eval_mib=0, ramp_s=0, deadline=4.0, job_mib=None)
    assert d.run(a) == 0
    runs = out / "runs"
    assert (runs / "nl-nocot-s42.ready").exists() and (runs / "nl-cot-s42.ready").exists()  # both trained a while
    assert (runs / "nl-nocot-s42" / "eval-gsm8k").exists() and (runs / "nl-nocot-s42" / "eval-rest").exists()
    assert not (runs / "nl-cot-s42").exists()  # stopped before best/: no evaluation
    ev = [json.loads(x) for x in (out / "status.jsonl").read_text().splitlines()]
    assert {e["job"] for e in ev if e.get("event") == "deadline"} == {"nl-nocot-s42", "nl-cot-s42"}
    assert [(e["job"], e["rc"]) for e in ev if e.get("event") == "stopped"] == [("nl-nocot-s42", 143)]
    assert [(e["job"], e["stage"], e["rc"]) for e in ev if e.get("event") == "end"] == [
        ("nl-cot-s42", 0, 143), ("nl-nocot-s42", 2, 0)]
    assert [(e["job"], e["reason"]) for e in ev if e.get("event") == "not started"] == [("nl-kava-s42", "deadline")]
    assert not any(e.get("event") == "requeued" for e in ev)


def test_a_begun_run_resumes_and_a_finished_or_new_one_starts(tmp_path):
    """A job started again (requeued after an out-of-memory exit, or a driver started a second time) continues its
    run with `kava train --resume` instead of failing on the unfinished run; a new or finished run starts from
    the preset."""
    d = driver()
    runs = tmp_path / "runs"

    def train(seed):
        return d.commands("nl", "cot", seed, Path("/data"), runs, [], recipe="full-lr1e5")[0]

    new = train(42)
    assert new[new.index("--config") + 1] == "smollm2_gsm8k_nl" and "--resume" not in new
    begun = runs / d.job_name("nl", "cot", 42, "full-lr1e5")
    begun.mkdir(parents=True)
    (begun / "config.yaml").write_text("method: cot\n")
    again = train(42)
    assert again[again.index("--resume") + 1] == str(begun) and "--config" not in again
    assert again[again.index("--resume") + 2:] == new[new.index("--config") + 2:]  # the same sets
    (begun / "DONE").write_text("")
    assert "--config" in train(42)
    assert "--config" in train(43)  # another seed's run is its own


def test_memory_guesses_per_model_and_method():
    d = driver()
    assert d.job_mib(None) == d.JOB_MIB == d.job_mib("smollm2")
    q = d.job_mib("qwen,cot=60000")
    assert q["cot"] == 60000 and q["nocot"] == d.QWEN_JOB_MIB["nocot"] > d.JOB_MIB["nocot"]
    assert d.job_mib("kava=15000")["kava"] == 15000 and d.job_mib("kava=15000")["cot"] == d.JOB_MIB["cot"]
    for bad in ("cot", "cott=1", "cot=lots", "llama"):
        with pytest.raises(SystemExit, match="--job-mib"):
            d.job_mib(bad)
