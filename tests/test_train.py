"""The trainer end to end on tiny from-scratch models (CPU): every method learns and writes a complete run
directory; exact resume after SIGKILL; seeds; gradient accumulation; where gradients flow; NaN handling."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import kava.losses
import kava.objective
import kava.checkpoint.state as ks
import kava.train as kt
from kava.config import load_config
from kava.data.format import Formatter, build_student_batch, build_teacher_batch
from kava.data.records import SkipLog
from kava.objective import loss_step, make_batch
from kava.checkpoint.load import build_reasoner
from tiny import RECORDS, tiny_tokenizer

TINY = [
    "model.from_scratch.hidden_size=32", "model.from_scratch.intermediate_size=64",
    "model.from_scratch.num_hidden_layers=2",
    "data.synth_train_size=600", "data.synth_eval_size=20", "data.valid_limit=10",
    "optim.effective_batch=8", "optim.micro_batch=4", "latent.num_latents=4",
    "run.log=[jsonl]", "run.log_every=1", "run.eval_max_cot_tokens=24", "run.eval_max_new_tokens=6",
]




@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """Synthetic data generated once for the session (train() writes it on first use)."""
    return tmp_path_factory.mktemp("synth")


def tiny_cfg(out: Path, *extra: str):
    return load_config("tiny_synth", TINY + [f"run.output_dir={out}", *extra])


def metrics(run_dir: Path, split: str = "train") -> list[dict]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [r for r in rows if r.get("split") == split]


def trainable(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step_{step}" / "trainable.safetensors"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# ------------------------------------------------------------------------------------------ every method
LATENT_KEYS = {"loss/ce_student", "loss/codi"}
METHOD_RUNS = {
    "cot": ([], {"loss/ce_teacher"}),
    "nocot": ([], {"loss/ce_teacher"}),
    "pccot": ([], {"loss/ce_teacher"} | LATENT_KEYS),
    "codi": ([], {"loss/ce_teacher"} | LATENT_KEYS),
    "kava": ([], {"loss/ce_teacher", "loss/kv"} | LATENT_KEYS),
    "kava-all": (["loss.kv_supervision=all"], {"loss/ce_teacher", "loss/kv"} | LATENT_KEYS),
    # the curricula (tests/test_curriculum.py has their schedules): Coconut has no teacher pass
    "coconut": (["latent.num_latents=6", "latent.projection=identity", "coconut.epochs_per_stage=0.05"],
                {"loss/ce_student"}),
    "icot": (["icot.tokens_per_epoch=40"], {"loss/ce_teacher"}),
}
STEPS = 20


def hold_lock(run: Path) -> subprocess.Popen:
    """Another process holding `run`'s lock (`RunLock`) for 60 s; it prints "held" once it has it."""
    hold = ("import sys, time; sys.path.insert(0, sys.argv[2]); from kava.checkpoint.rundir import RunLock; "
            "lock = RunLock(sys.argv[1]); print('held', flush=True); time.sleep(60)")
    src = str(Path(kt.__file__).resolve().parents[1])
    return subprocess.Popen([sys.executable, "-c", hold, str(run), src], stdout=subprocess.PIPE, text=True)


@pytest.mark.parametrize("name", list(METHOD_RUNS))
def test_method_trains_and_writes_a_complete_run_dir(name, tmp_path, synth_root):
    method = name.split("-")[0]
    extra, loss_keys = METHOD_RUNS[name]
    cfg = tiny_cfg(tmp_path, f"method={method}", f"optim.max_steps={STEPS}", "run.save_every=10", *extra)
    run_dir = kt.train(cfg, progress=False, data_root=synth_root)
    assert run_dir == tmp_path / f"tiny_synth-s{cfg.run.seed}"

    # files
    for f in ("config.yaml", "meta.json", "skips.json", "metrics.jsonl", "DONE", "final/kava_extra.safetensors",
              "final/model/config.json", "final/model/model.safetensors", "final/tokenizer/tokenizer_config.json"):
        assert (run_dir / f).is_file(), f
    for step in (10, STEPS):
        ck = run_dir / "checkpoints" / f"step_{step}"
        for f in ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"):
            assert (ck / f).is_file(), (step, f)
        state = json.loads((ck / "state.json").read_text())
        assert state["step"] == step and state["method"] == method
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_10", f"step_{STEPS}"]
    assert load_config(str(run_dir / "config.yaml")) == cfg
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["method"] == method and meta["seed"] == 42 and meta["train_data"] == "synthetic:equation"
    assert {"torch", "transformers", "peft", "accelerate", "kava", "python"} <= set(meta["versions"])
    assert meta["versions"]["torch"] == torch.__version__
    assert "git" in meta and (meta["git"] is None or len(meta["git"]) >= 40)
    assert meta["train_examples"] == 600
    assert json.loads((run_dir / "skips.json").read_text())["total"] == 0
    done = json.loads((run_dir / "DONE").read_text())
    assert done["steps"] == STEPS and done["nonfinite_skipped"] == 0
    # the final model equals the last checkpoint's trainable weights
    final = load_file(str(run_dir / "final" / "model" / "model.safetensors"))
    last = trainable(run_dir, STEPS)
    for k, v in final.items():
        key = "lm." + k
        assert key in last and torch.equal(last[key], v), k

    # metrics: one train line per step, every term, and the right combination
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        keys = {k for k in r if k.startswith("loss/")}
        assert keys == loss_keys | {"loss/total"}, keys
        assert all(math.isfinite(r[k]) for k in keys)
        assert r["grad_norm"] > 0 and r["tokens_per_s"] > 0 and r["steps_per_s"] > 0 and r["lr"] > 0
        lc = cfg.loss
        expect = (r.get("loss/ce_teacher", 0) * (lc.ce_teacher if method in ("pccot", "codi", "kava") else 1.0)
                  + r.get("loss/ce_student", 0) * lc.ce_student + r.get("loss/codi", 0) * lc.alpha_codi
                  + r.get("loss/kv", 0) * lc.alpha_kv)
        assert r["loss/total"] == pytest.approx(expect, rel=1e-5)
        evict = {k for k in r if k.startswith("evict/")}
        sweeps = sorted(k for k in r if k.startswith("kv_sweep_"))
        if method == "kava":
            assert evict, r
            assert 0 <= r["evict/masked_slot_frac"] <= 1
        else:
            assert not evict
        if name == "kava-all":
            assert sweeps == [f"kv_sweep_{t}" for t in range(1, cfg.latent.num_sweeps + 1)]
            assert r["loss/kv"] == pytest.approx(sum(r[k] for k in sweeps) / len(sweeps), rel=1e-5)
        else:
            assert not sweeps
    # the logged lr follows warmup + cosine (independent formula)
    warm = int(cfg.optim.warmup_ratio * STEPS)
    for r in rows:
        s = r["step"] - 1
        lr = cfg.optim.lr * (s + 1) / warm if s < warm else \
            cfg.optim.lr * 0.5 * (1 + math.cos(math.pi * (s - warm) / (STEPS - warm)))
        assert r["lr"] == pytest.approx(lr, rel=1e-9)
    # training loss falls: the total, and every term on its own
    for k in sorted(loss_keys | {"loss/total"}):
        first = sum(r[k] for r in rows[:3]) / 3
        final_loss = sum(r[k] for r in rows[-3:]) / 3
        assert final_loss < 0.85 * first, (k, first, final_loss)
    # validation ran at the end and was logged
    val = metrics(run_dir, "val")
    assert [v["step"] for v in val] == [STEPS] and 0 <= val[0]["val/accuracy"] <= 1


# ------------------------------------------------------------------------------------------ exact resume
CHILD = r"""
import json, sys, time
import torch
import kava.checkpoint.state as ks
import kava.train as kt
from kava.config import load_config

overrides, data_root, hang_after = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
torch.set_num_threads(int(sys.argv[4]))  # as the parent: the same float summation order
log = kt.MetricLogger.log

def log_then_hang(self, payload, step):
    log(self, payload, step)
    if step > hang_after:  # mid-run, past the checkpoint: the parent SIGKILLs us while we wait here
        (self.path.parent / "HANGING").write_text(str(step))
        time.sleep(600)

kt.MetricLogger.log = log_then_hang
kt.train(load_config("tiny_synth", overrides), progress=False, data_root=data_root)
"""


def kill_mid_run(overrides: list[str], data_root: Path, run_dir: Path, after_step: int) -> None:
    """Train in a subprocess and SIGKILL it once it has checkpointed `after_step` and logged the next step."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    args = [json.dumps(overrides), str(data_root), str(after_step), str(torch.get_num_threads())]
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while not (run_dir / "HANGING").exists():
            if proc.poll() is not None:
                raise AssertionError(f"child exited early ({proc.returncode}): {proc.stdout.read().decode()[-3000:]}")
            assert time.time() < deadline, "child did not reach the kill point"
            time.sleep(0.05)
        assert (run_dir / "checkpoints" / f"step_{after_step}" / "state.json").exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def strip_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "steps_per_s")} for r in rows]


@pytest.mark.parametrize("method, extra", [
    ("kava", ["eviction.method=random"]),  # random eviction: the generator state must be restored
    ("cot", ["model.from_scratch.attention_dropout=0.2"]),  # dropout: the torch RNG state must be restored
])
def test_exact_resume_after_sigkill(method, extra, tmp_path, synth_root, monkeypatch):
    common = TINY + [f"run.output_dir={tmp_path}", f"method={method}", "optim.max_steps=12", "run.save_every=4",
                     *extra]
    cfg_a = load_config("tiny_synth", common + ["run.name=A"])
    run_a = kt.train(cfg_a, progress=False, data_root=synth_root)

    run_b = tmp_path / "B"
    kill_mid_run(common + ["run.name=B"], synth_root, run_b, after_step=8)
    assert not (run_b / "DONE").exists() and not (run_b / "checkpoints" / "step_12").exists()
    assert max(r["step"] for r in metrics(run_b)) == 9  # a step past the checkpoint was logged
    (run_b / "HANGING").unlink()
    # a checkpoint write the crash interrupted leaves a .tmp dir: it must be ignored and replaced
    (run_b / "checkpoints" / "step_12.tmp").mkdir()
    (run_b / "checkpoints" / "step_12.tmp" / "state.json").write_text("{}")

    calls = []
    real_loss_step = kava.objective.loss_step
    monkeypatch.setattr(kava.objective, "loss_step", lambda *a, **k: calls.append(1) or real_loss_step(*a, **k))
    cfg_b = kt.resume_config(run_b)
    assert cfg_b == load_config("tiny_synth", common + ["run.name=B"])
    assert kt.train(cfg_b, resume=run_b, progress=False, data_root=synth_root) == run_b
    assert len(calls) == 4 * 2  # only steps 9..12 ran (2 micro-batches each)

    assert (run_b / "DONE").exists() and not (run_b / "checkpoints" / "step_12.tmp").exists()
    assert max_diff(trainable(run_a, 12), trainable(run_b, 12)) <= 1e-6
    fa = load_file(str(run_a / "final" / "model" / "model.safetensors"))
    fb = load_file(str(run_b / "final" / "model" / "model.safetensors"))
    assert max_diff(fa, fb) <= 1e-6
    ea = load_file(str(run_a / "final" / "kava_extra.safetensors"))
    eb = load_file(str(run_b / "final" / "kava_extra.safetensors"))
    assert max_diff(ea, eb) <= 1e-6
    # the optimizer state matches too (a later step would diverge otherwise)
    oa = load_file(str(run_a / "checkpoints" / "step_12" / "optimizer.safetensors"))
    ob = load_file(str(run_b / "checkpoints" / "step_12" / "optimizer.safetensors"))
    assert max_diff(oa, ob) <= 1e-6
    ma, mb = metrics(run_a), metrics(run_b)
    assert [r["step"] for r in mb] == list(range(1, 13))  # no duplicated lines from the killed run
    assert strip_timing(ma) == strip_timing(mb)
    assert metrics(run_a, "val") == metrics(run_b, "val")


def test_fork_continues_a_run_under_changed_hyperparameters(tmp_path, synth_root):
    """`fork_run` branches a run at a checkpoint: without changes the fork ends bit for bit where the source
    run does (weights, AdamW state, metrics); with optim.lr changed it trains from the branch point at the new
    lr; what fixes a step's meaning (data, model, method, batch) is refused, as is a step with no checkpoint."""
    common = TINY + [f"run.output_dir={tmp_path}", "method=cot", "model.from_scratch.attention_dropout=0.2",
                     "optim.max_steps=12", "run.save_every=4", "optim.schedule=constant", "optim.warmup_ratio=0"]
    run_a = kt.train(load_config("tiny_synth", common + ["run.name=A"]), progress=False, data_root=synth_root)
    run_b = kt.train(load_config("tiny_synth", common + ["run.name=B"]), progress=False, data_root=synth_root,
                     stop_after=8)
    assert kt.latest_checkpoint(run_b).name == "step_8"

    same = kt.fork_run(run_b, tmp_path / "C", [])
    assert sorted(p.name for p in (same / "checkpoints").iterdir()) == ["step_8"]
    assert json.loads((same / "meta.json").read_text())["fork"] == {"from": str(run_b.resolve()), "step": 8,
                                                                   "changes": []}
    assert max(r["step"] for r in metrics(same)) == 8
    kt.train(kt.resume_config(same), resume=same, progress=False, data_root=synth_root)
    assert max_diff(trainable(run_a, 12), trainable(same, 12)) <= 1e-6
    oa = load_file(str(run_a / "checkpoints" / "step_12" / "optimizer.safetensors"))
    oc = load_file(str(same / "checkpoints" / "step_12" / "optimizer.safetensors"))
    assert max_diff(oa, oc) <= 1e-6
    assert strip_timing(metrics(run_a)) == strip_timing(metrics(same))

    lr = kt.resume_config(run_b).optim.lr / 4
    other = kt.fork_run(run_b, tmp_path / "D", [f"optim.lr={lr}"], step=4)
    cfg = kt.resume_config(other)
    assert cfg.optim.lr == lr and cfg.run.name == "D"
    kt.train(cfg, resume=other, progress=False, data_root=synth_root)
    rows = metrics(other)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert strip_timing(rows[:4]) == strip_timing(metrics(run_a)[:4])  # the source's history up to the branch
    assert all(r["lr"] == pytest.approx(lr) for r in rows[4:])
    assert max_diff(trainable(run_a, 12), trainable(other, 12)) > 1e-4

    with pytest.raises(kt.ConfigError, match="data: a fork keeps the source run's data"):
        kt.fork_run(run_b, tmp_path / "E", ["data.synth_train_size=700"])
    with pytest.raises(kt.ConfigError, match="optim.effective_batch"):
        kt.fork_run(run_b, tmp_path / "E", ["optim.effective_batch=16"])
    with pytest.raises(FileNotFoundError, match="no complete checkpoint of step 5 .have: 4, 8."):
        kt.fork_run(run_b, tmp_path / "E", [], step=5)
    with pytest.raises(FileExistsError, match="needs a new run directory"):
        kt.fork_run(run_b, tmp_path / "C", [])
    with pytest.raises(kt.ConfigError, match="optim.max_steps=8: the fork starts at step 8"):
        kt.fork_run(run_b, tmp_path / "E", ["optim.max_steps=8"])
    assert not (tmp_path / "E").exists()
    by_epochs = kt.fork_run(run_b, tmp_path / "F", ["optim.max_steps=null"])  # the epochs decide the end
    assert kt.resume_config(by_epochs).optim.max_steps is None


def test_resume_checks(tmp_path, synth_root):
    cfg = tiny_cfg(tmp_path, "method=cot", "optim.max_steps=4", "run.save_every=2", "run.name=r")
    run = kt.train(cfg, progress=False, data_root=synth_root, stop_after=2)
    assert not (run / "DONE").exists() and (run / "checkpoints" / "step_2" / "state.json").exists()
    with pytest.raises(FileExistsError, match="--resume"):  # an unfinished run is not silently overwritten
        kt.train(cfg, progress=False, data_root=synth_root)
    other = tiny_cfg(tmp_path, "method=nocot", "optim.max_steps=4", "run.name=r")
    with pytest.raises(ValueError, match="method"):
        kt.train(other, resume=run, progress=False, data_root=synth_root)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        kt.train(tiny_cfg(tmp_path, "method=cot", "run.name=empty"), resume=tmp_path / "empty", progress=False,
                 data_root=synth_root)
    kt.train(cfg, resume=run, progress=False, data_root=synth_root)
    with pytest.raises(FileExistsError, match="finished"):
        kt.train(cfg, progress=False, data_root=synth_root)


# ------------------------------------------------------------------------------------------ seeds
def test_same_seed_same_curve_other_seed_other_curve(tmp_path, synth_root):
    def run(name, seed):
        cfg = tiny_cfg(tmp_path, "method=kava", "optim.max_steps=5", f"run.seed={seed}", f"run.name={name}",
                       "eviction.method=random")
        d = kt.train(cfg, progress=False, data_root=synth_root)
        return [r["loss/total"] for r in metrics(d)], trainable(d, 5)

    a, wa = run("a", 42)
    b, wb = run("b", 42)
    c, wc = run("c", 7)
    assert len(a) == 5 and a == b and max_diff(wa, wb) == 0.0
    assert all(x != y for x, y in zip(a, c)) and max_diff(wa, wc) > 1e-3


# ------------------------------------------------------------------------------------------ accumulation
def write_equal_length_data(path: Path, n: int = 64) -> None:
    """Records whose every segment has the same token count (two-digit numbers, one token per digit)."""
    g = torch.Generator().manual_seed(0)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = (int(x) for x in torch.randint(10, 50, (2,), generator=g))
            c = a + b
            f.write(json.dumps({"question": f"Sam has {a} pens and buys {b} more . How many pens ?",
                                "steps": [f"<<{a}+{b}={c}>>", f"<<{c}-0={c}>>"], "answer": str(c)}) + "\n")


def one_step(tmp_path, data: Path | None, method: str, micro: int, name: str, extra=()):
    """One optimizer step (effective batch 8): (gradients the optimizer saw, parameter updates, step-1 weights,
    the logged metrics)."""
    grads, updates = [], []
    real_step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        params = [p for group in self.param_groups for p in group["params"]]
        grads.extend(None if p.grad is None else p.grad.detach().clone() for p in params)
        before = [p.detach().clone() for p in params]
        out = real_step(self, *a, **k)
        updates.extend(p.detach() - b for p, b in zip(params, before))
        return out

    src = [f"data.source={data}", "data.format=jsonl", "data.valid_limit=4"] if data else []
    cfg = tiny_cfg(tmp_path, f"method={method}", "optim.max_steps=1", "optim.effective_batch=8",
                   f"optim.micro_batch={micro}", "optim.grad_clip=0", f"run.name={name}", *src, *extra)
    torch.optim.AdamW.step = spy
    try:
        d = kt.train(cfg, progress=False, data_root=tmp_path / "synth" if data else None)
    finally:
        torch.optim.AdamW.step = real_step
    return grads, updates, trainable(d, 1), metrics(d)[0]


@pytest.mark.parametrize("method, extra", [
    ("cot", []),
    # batch statistics (std over the micro-batch) are per micro-batch by definition: turn them off
    ("kava", ["loss.codi_std=none", "loss.kv_layer_std=false"]),
])
def test_gradient_accumulation_equals_one_big_batch(method, extra, tmp_path):
    data = tmp_path / "equal.jsonl"
    write_equal_length_data(data)
    g8, u8, w8, m8 = one_step(tmp_path, data, method, 8, "mb8", extra)
    g2, u2, w2, m2 = one_step(tmp_path, data, method, 2, "mb2", extra)
    assert len(g8) == len(g2) > 0
    # precondition: every micro-batch has the same number of labels (per-micro-batch losses are means)
    from kava.checkpoint.load import load_tokenizer
    from kava.data.readers import load_records

    tok = load_tokenizer(load_config("tiny_synth"), str(tmp_path / "mb2" / "tokenizer_src"))
    items = Formatter(tok, drop_last_step=False).tokenize_all(load_records(data, "jsonl"), SkipLog())
    assert len({(len(i.question), len(i.cot), len(i.answer)) for i in items}) == 1
    assert [g is None for g in g8] == [g is None for g in g2]  # (cot never uses the latent-only parameters)
    pairs = [(a, b, u, v) for a, b, u, v in zip(g8, g2, u8, u2) if a is not None]
    # (cot: the special rows get an all-zero gradient; every other parameter learns)
    assert sum(bool(a.abs().max() > 0) for a, *_ in pairs) >= len(pairs) - (method == "cot")
    for a, b, _, _ in pairs:  # the same gradient, parameter by parameter
        assert (a - b).abs().max().item() <= 1e-5 * a.abs().max().item()
    for a, _, u, v in pairs:  # ... hence the same update. (Adam's first step is lr * g / (|g| + eps): where
        big = a.abs() > 1e-5  # |g| is float noise its sign may flip, so compare where the gradient is real)
        if big.any():
            assert (u - v)[big].abs().max().item() <= 1e-5
    assert sum(int((a.abs() > 1e-5).sum()) for a, *_ in pairs) > 0.5 * sum(a.numel() for a, *_ in pairs)
    assert max(u.abs().max().item() for _, _, u, _ in pairs) > 1e-4  # the step really moved the weights
    assert m8["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-5)
    for k in m8:
        if k.startswith("loss/"):
            assert m8[k] == pytest.approx(m2[k], rel=1e-5), k


@pytest.mark.parametrize("method, extra", [("cot", []), ("nocot", []),
                                           ("pccot", ["loss.codi_std=none"])])
def test_gradient_accumulation_with_variable_lengths(method, extra, tmp_path):
    """Micro-batches with different label counts: the CE terms are normalised by the whole step's token
    count (kava.objective.ce_denominators), so the gradient does not depend on the accumulation setting."""
    g8, _, _, m8 = one_step(tmp_path, None, method, 8, "mb8", ["data.drop_last_step=false", *extra])
    g2, _, _, m2 = one_step(tmp_path, None, method, 2, "mb2", ["data.drop_last_step=false", *extra])
    pairs = [(a, b) for a, b in zip(g8, g2) if a is not None]
    assert pairs and sum(bool(a.abs().max() > 0) for a, _ in pairs) > len(pairs) // 2
    for a, b in pairs:
        assert (a - b).abs().max().item() <= 1e-5 * max(a.abs().max().item(), 1e-12)
    for k in m8:
        if k.startswith("loss/ce"):
            assert m8[k] == pytest.approx(m2[k], rel=1e-5), k


# ------------------------------------------------------------------------------------------ gradient flow
def lora_model(method="kava", extra=()):
    cfg = load_config("tiny_synth", TINY + [f"method={method}", "lora.r=4", "lora.alpha=8", "lora.dropout=0.0",
                                            "lora.target_modules=[q_proj,v_proj]", *extra])
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    m = build_reasoner(cfg, tok)
    with torch.no_grad():  # LoRA B starts at zero, which would hide the gradient of A
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    items = Formatter(tok, drop_last_step=False).tokenize_all(RECORDS, SkipLog())
    return cfg, m, make_batch(items, m.ids, cfg)


def test_gradients_reach_lora_projection_and_special_rows_only():
    cfg, m, batch = lora_model()
    m.train()
    total, log = loss_step(m, batch, cfg)
    total.backward()
    names = dict(m.named_parameters())
    trainable_names = {n for n, p in names.items() if p.requires_grad}
    lora = {n for n in trainable_names if "lora_" in n}
    assert lora and all(("q_proj" in n or "v_proj" in n) for n in lora)
    assert len(lora) == 2 * 2 * cfg.model.from_scratch["num_hidden_layers"]  # A, B x q, v x layers
    assert trainable_names == lora | {"special_rows"} | {n for n in names if n.startswith("proj.")}
    for n in trainable_names:
        g = names[n].grad
        assert g is not None and g.abs().sum() > 0, n
    assert (m.special_rows.grad.abs().sum(1) > 0).all()  # <bot>, <eot> and <latent> rows all learn
    for n, p in names.items():
        if n not in trainable_names:
            assert p.grad is None, n
    emb, head = m.embed_tokens.weight, m.head.weight
    assert emb is head or emb.data_ptr() == head.data_ptr()  # tied in tiny_synth
    assert not emb.requires_grad and emb.grad is None


def test_full_finetuning_trains_the_backbone_and_tied_embedding():
    """Without LoRA (tiny_synth) every parameter trains, the tied embedding/head included."""
    cfg = load_config("tiny_synth", TINY + ["method=kava"])
    tok = tiny_tokenizer()
    m = build_reasoner(cfg, tok)
    items = Formatter(tok).tokenize_all(RECORDS, SkipLog())
    total, _ = loss_step(m, make_batch(items, m.ids, cfg), cfg)
    total.backward()
    assert m.embed_tokens.weight is m.head.weight
    for n, p in m.named_parameters():
        assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, n


def test_teacher_targets_get_no_gradient_from_kv_and_codi(monkeypatch):
    # only the distillation terms: CE weights 0 (combine_losses then leaves them out of the total)
    cfg, m, batch = lora_model("kava", ["loss.ce_student=0", "loss.ce_teacher=0"])
    seen = {}
    real_t, real_s = m.teacher_forward, m.student_forward

    def teacher(*a, **k):
        seen["t"] = real_t(*a, **k)
        return seen["t"]

    def student(*a, **k):
        seen["s"] = real_s(*a, **k)
        return seen["s"]

    monkeypatch.setattr(m, "teacher_forward", teacher)
    monkeypatch.setattr(m, "student_forward", student)
    total, log = loss_step(m, batch, cfg)
    assert log["loss/kv"] > 0 and log["loss/codi"] > 0
    t, s = seen["t"], seen["s"]
    assert t.cot_k.requires_grad and t.hidden.requires_grad  # the teacher pass itself is differentiable ...
    g = torch.autograd.grad(total, [t.cot_k, t.cot_v, t.hidden, s.latent_k[-1], s.latent_v[-1], s.hidden],
                            allow_unused=True, retain_graph=True)
    for x in g[:3]:  # ... but the targets are detached
        assert x is None or x.abs().max() == 0
    for x in g[3:]:  # while the student side gets gradient
        assert x is not None and x.abs().max() > 0
    # so no parameter gets gradient through the teacher: the gradient equals the student-only one
    params = [p for p in m.parameters() if p.requires_grad]
    full = torch.autograd.grad(total, params, allow_unused=True, retain_graph=True)
    # reference: the same losses against fully detached copies of the teacher outputs
    from kava import eviction, losses
    with torch.no_grad():
        idx, mask = eviction.select_indices(cfg.eviction.method, keys=t.cot_k, importance=t.importance,
                                            valid=batch.teacher.cot_valid, num_slots=cfg.latent.num_latents,
                                            lam=cfg.eviction.lam)
        tk, tv = eviction.gather_slots(t.cot_k, idx), eviction.gather_slots(t.cot_v, idx)
    lc = cfg.loss
    kv, _ = losses.kv_loss_over_sweeps(s.latent_k, s.latent_v, tk.clone(), tv.clone(), mask, kind=lc.kv_loss,
                                       layer_std=lc.kv_layer_std)
    codi = losses.codi_loss(s.hidden, t.hidden.detach().clone(), kind=lc.codi_loss, std=lc.codi_std)
    ref = torch.autograd.grad(lc.alpha_kv * kv + lc.alpha_codi * codi, params, allow_unused=True)
    for a, b in zip(full, ref):
        if a is None or b is None:
            assert a is None and b is None or (a if a is not None else b).abs().max() == 0
        else:
            assert (a - b).abs().max() <= 1e-6 * max(1.0, b.abs().max().item())


# ------------------------------------------------------------------------------------------ speed
def test_one_kava_step_is_fast_and_finite():
    cfg, m, batch = lora_model("kava", ["loss.kv_supervision=all"])
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    m.train()
    loss_step(m, batch, cfg)[0].backward()  # warm-up (first-call overheads)
    opt.zero_grad()
    t0 = time.perf_counter()
    total, log = loss_step(m, batch, cfg)
    total.backward()
    opt.step()
    dt = time.perf_counter() - t0
    assert dt < 5.0, dt
    assert {"loss/ce_student", "loss/ce_teacher", "loss/codi", "loss/kv", "loss/total", "kv_sweep_1"} <= set(log)
    for k, v in log.items():
        assert torch.isfinite(v).all(), k
    for p in m.parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all()


# ------------------------------------------------------------------------------------------ NaN
def nan_codi_at(monkeypatch, bad_calls: set[int]):
    real = kava.losses.codi_loss
    calls = []

    def codi(*a, **k):
        calls.append(1)
        out = real(*a, **k)
        return out * float("nan") if len(calls) in bad_calls else out

    monkeypatch.setattr(kava.losses, "codi_loss", codi)
    return calls


def test_nan_stops_with_the_step_and_term_and_keeps_the_last_good_state(tmp_path, synth_root, monkeypatch):
    common = ["method=pccot", "optim.max_steps=8", "run.save_every=100"]
    ref = kt.train(tiny_cfg(tmp_path, *common, "run.name=ref"), progress=False, data_root=synth_root, stop_after=4)
    nan_codi_at(monkeypatch, {10})  # 2 micro-batches per step: call 10 is in optimizer step 5
    with pytest.raises(kt.NonFiniteLoss) as e:
        kt.train(tiny_cfg(tmp_path, *common, "run.name=bad"), progress=False, data_root=synth_root)
    msg = str(e.value)
    assert "step 5" in msg and "loss/codi" in msg and "nan_policy" in msg
    run = tmp_path / "bad"
    assert kt.latest_checkpoint(run) == run / "checkpoints" / "step_4"
    assert json.loads((run / "checkpoints" / "step_4" / "state.json").read_text())["step"] == 4
    assert not (run / "DONE").exists()
    # the saved state is the state after 4 good steps (an uninterrupted run stopped there agrees)
    kt.train(tiny_cfg(tmp_path, *common, "run.name=ref2", "run.save_every=4"), progress=False,
             data_root=synth_root, stop_after=4)
    good = trainable(tmp_path / "ref2", 4)
    assert max_diff(trainable(run, 4), good) <= 1e-6
    assert all(torch.isfinite(v).all() for v in good.values())
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]
    assert strip_timing(metrics(run)) == strip_timing(metrics(ref))


def test_nan_policy_skip_finishes_and_counts(tmp_path, synth_root, monkeypatch):
    nan_codi_at(monkeypatch, {5, 12})  # steps 3 and 6
    cfg = tiny_cfg(tmp_path, "method=pccot", "optim.max_steps=8", "run.nan_policy=skip", "run.save_every=100")
    run = kt.train(cfg, progress=False, data_root=synth_root)
    done = json.loads((run / "DONE").read_text())
    assert done["nonfinite_skipped"] == 2 and done["steps"] == 8
    rows = metrics(run)
    skipped = [r for r in rows if "nonfinite_skipped" in r]
    assert [r["step"] for r in skipped] == [3, 6] and all(r["bad_terms"] == ["loss/codi"] for r in skipped)
    assert [r["step"] for r in rows if "loss/total" in r] == [1, 2, 4, 5, 7, 8]
    assert all(math.isfinite(r["loss/total"]) for r in rows if "loss/total" in r)
    final = load_file(str(run / "final" / "model" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in final.values())


def test_skip_count_survives_resume(tmp_path, synth_root, monkeypatch):
    nan_codi_at(monkeypatch, {5})  # step 3
    cfg = tiny_cfg(tmp_path, "method=pccot", "optim.max_steps=6", "run.nan_policy=skip", "run.save_every=4")
    run = kt.train(cfg, progress=False, data_root=synth_root, stop_after=4)
    kt.train(cfg, resume=run, progress=False, data_root=synth_root)
    assert json.loads((run / "DONE").read_text())["nonfinite_skipped"] == 1


def test_resume_after_a_nan_stop_is_exact(tmp_path, synth_root, monkeypatch):
    """The 'last good state' written on a NaN stop must let a resumed run continue exactly (RNG included),
    even when it replaces a regular checkpoint of the same step."""
    common = ["method=kava", "eviction.method=random", "optim.max_steps=8", "run.save_every=4"]
    ref = kt.train(tiny_cfg(tmp_path, *common, "run.name=ref"), progress=False, data_root=synth_root)
    with monkeypatch.context() as mp:
        nan_codi_at(mp, {10})  # optimizer step 5
        with pytest.raises(kt.NonFiniteLoss):
            kt.train(tiny_cfg(tmp_path, *common, "run.name=bad"), progress=False, data_root=synth_root)
    run = tmp_path / "bad"
    kt.train(kt.resume_config(run), resume=run, progress=False, data_root=synth_root)
    assert max_diff(trainable(ref, 8), trainable(run, 8)) <= 1e-6
    assert strip_timing(metrics(ref)) == strip_timing(metrics(run))


# ------------------------------------------------------------------------------------------ W&B
class FakeWandbRun:
    def __init__(self, kw):
        self.kw, self.logged, self.finished = kw, [], False

    def log(self, payload, step=None):
        self.logged.append((step, dict(payload)))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    """A `wandb` module that records each `init` (wandb itself is not installed here)."""
    import types

    mod = types.ModuleType("wandb")
    mod.runs = []

    def init(**kw):
        mod.runs.append(FakeWandbRun(kw))
        return mod.runs[-1]

    mod.init = init
    monkeypatch.setitem(sys.modules, "wandb", mod)
    return mod


def test_wandb_project_entity_tags_and_resume_continues_the_same_run(tmp_path, synth_root, fake_wandb):
    cfg = tiny_cfg(tmp_path, "method=cot", "optim.max_steps=4", "run.save_every=2", "run.name=w",
                   "run.log=[jsonl,wandb]", "run.wandb_project=kava-paper", "run.wandb_entity=my-team",
                   "run.wandb_tags=[llama1b, seed42]")
    run = kt.train(cfg, progress=False, data_root=synth_root, stop_after=3)  # killed after step 3 (ckpt at 2)
    saved = json.loads((run / "wandb.json").read_text())
    assert saved["project"] == "kava-paper" and saved["entity"] == "my-team"
    assert len(saved["id"]) == 16 and saved["id"].isalnum()
    kt.train(cfg, resume=run, progress=False, data_root=synth_root)
    first, second = fake_wandb.runs
    for r in (first, second):
        assert r.kw["id"] == saved["id"] and r.kw["resume"] == "allow" and r.kw["name"] == "w"
        assert (r.kw["project"], r.kw["entity"], r.kw["tags"]) == ("kava-paper", "my-team", ["llama1b", "seed42"])
        assert r.kw["dir"] == str(run) and r.kw["config"]["run"]["wandb_tags"] == ["llama1b", "seed42"]
        assert r.finished
    steps = lambda r: [s for s, p in r.logged if p.get("split") == "train" and "loss/total" in p]
    assert steps(first) == [1, 2, 3] and steps(second) == [3, 4]  # resumed at the step-2 checkpoint
    jsonl = {m["step"]: m["loss/total"] for m in metrics(run)}
    assert {s: p["loss/total"] for s, p in second.logged if "loss/total" in p} == {3: jsonl[3], 4: jsonl[4]}


def test_a_new_run_gets_a_new_wandb_id(tmp_path, synth_root, fake_wandb):
    for name in ("a", "b"):
        kt.train(tiny_cfg(tmp_path, "method=cot", "optim.max_steps=1", f"run.name={name}", "run.log=[wandb]"),
                 progress=False, data_root=synth_root)
    a, b = fake_wandb.runs
    assert a.kw["id"] != b.kw["id"] and a.kw["entity"] is None and a.kw["tags"] == [] and a.kw["project"] == "kava"


@pytest.mark.parametrize("override, msg", [("run.wandb_project=' '", "run.wandb_project: must not be empty"),
                                           ("run.wandb_tags=[ok, '']", "run.wandb_tags: each tag"),
                                           (f"run.wandb_tags=[{'x' * 65}]", "run.wandb_tags: each tag")])
def test_wandb_keys_are_validated(override, msg):
    from kava.config import ConfigError

    with pytest.raises(ConfigError, match=msg):
        load_config("tiny_synth", [override])


# ------------------------------------------------------------------------------------------ stages on their own
def test_batch_indices_visit_every_example_once_per_epoch():
    cfg = tiny_cfg(Path("/nonexistent"), "optim.effective_batch=8", "optim.micro_batch=4")
    plan = kt.make_plan(cfg, 43, world=1)  # 5 full batches; 3 examples left out each epoch
    assert plan.steps_per_epoch == 5
    epochs = [[i for s in range(e * 5, e * 5 + 5) for i in kt.batch_indices(cfg, plan, 43, s)] for e in range(2)]
    for seen in epochs:
        assert len(seen) == 40 and len(set(seen)) == 40 and set(seen) <= set(range(43))
    assert epochs[0] != epochs[1]  # reshuffled
    assert kt.batch_indices(cfg, plan, 43, 7) == kt.batch_indices(cfg, plan, 43, 7)  # a pure function: resume


def test_plan_refuses_fewer_examples_than_one_step_over_several_processes():
    """With fewer examples than optim.effective_batch, the one step has fewer micro-batches than processes: a
    rank without one would crash while the others wait in the all-reduce. One process is fine (a short step)."""
    cfg = tiny_cfg(Path("/nonexistent"), "optim.effective_batch=16", "optim.micro_batch=4")
    assert kt.make_plan(cfg, 10, world=1).steps_per_epoch == 1
    with pytest.raises(ValueError, match="10 training examples are fewer than optim.effective_batch=16"):
        kt.make_plan(cfg, 10, world=2)
    assert kt.make_plan(cfg, 16, world=2).accum == 2


def write_records(path: Path, steps_per_record: list[int], bad_lines: tuple[str, ...] = ()) -> None:
    """One JSONL record per entry of `steps_per_record` (that many CoT steps), then `bad_lines` verbatim."""
    with open(path, "w") as f:
        for i, n in enumerate(steps_per_record):
            a = 10 + i
            steps = [f"<<{a}+{k}={a + k}>>" for k in range(1, n + 1)]
            f.write(json.dumps({"question": f"Tom has {a} apples . How many ?", "steps": steps, "answer": a + n})
                    + "\n")
        for line in bad_lines:
            f.write(line + "\n")


def stage_cfg(tmp_path: Path, data: Path, *extra: str):
    return tiny_cfg(tmp_path, f"data.source={data}", "data.format=jsonl", "data.drop_last_step=true", *extra)


def test_setup_data_counts_examples_empty_cots_and_skips(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    # 3 records keep a CoT, 2 lose their only step to drop_last_step; 3 bad lines, one per reason
    write_records(data, [2, 3, 1, 2, 1], bad_lines=('{"question": "Q?", "steps": [], "answer"',
                                                     '{"problem": "Q?", "steps": [], "answer": 2}',
                                                     '{"question": "Q?", "steps": [], "answer": "two"}'))
    cfg = stage_cfg(tmp_path, data, "method=cot")
    acc = kt.setup_accelerator(cfg)
    run_dir, resume_ck = kt.setup_run_dir(cfg, None, main=True)
    assert run_dir.is_dir() and resume_ck is None
    d = kt.setup_data(cfg, run_dir, acc)
    assert (len(d.train_recs), len(d.items), d.no_cot) == (5, 5, 2)
    assert [len(it.cot) > 0 for it in d.items] == [True, True, False, True, False]
    assert d.skips.total == 3 and d.skips.counts == {"invalid json": 1, "missing field: question": 1,
                                                     "non-numeric answer": 1}
    assert (run_dir / "tokenizer_src" / "tokenizer_config.json").exists()  # a from-scratch model's tokenizer
    assert "2 of 5 training examples have an empty CoT" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["cot", "kava", "nocot"])
def test_setup_data_refuses_a_cot_method_on_data_without_any_cot(method, tmp_path):
    data = tmp_path / "train.jsonl"
    write_records(data, [1, 1, 1])  # drop_last_step empties every CoT
    cfg = stage_cfg(tmp_path, data, f"method={method}")
    acc = kt.setup_accelerator(cfg)
    run_dir, _ = kt.setup_run_dir(cfg, None, main=True)
    if method == "nocot":  # learns without the CoT: fine
        assert kt.setup_data(cfg, run_dir, acc).no_cot == 3
    else:
        with pytest.raises(ValueError, match="none of the 3 training examples has a CoT"):
            kt.setup_data(cfg, run_dir, acc)


def stage_trainer(tmp_path: Path, *extra: str):
    """A `Trainer` for method cot on 16 records of different lengths, its data, and the run dir."""
    data = tmp_path / "train.jsonl"
    write_records(data, [2 + i % 3 for i in range(16)])
    cfg = stage_cfg(tmp_path, data, "method=cot", "optim.effective_batch=8", "optim.grad_clip=0", *extra)
    acc = kt.setup_accelerator(cfg)
    run_dir, _ = kt.setup_run_dir(cfg, None, main=True)
    d = kt.setup_data(cfg, run_dir, acc)
    torch.manual_seed(0)
    t = kt.setup_model_and_optimizer(cfg, d.tokenizer, acc)
    t.raw.train()
    return t, d, run_dir


def test_train_step_accumulation_equals_one_big_batch(tmp_path):
    """train_step over 4 micro-batches of 2 applies the gradient of one full-batch loss_step (the reference,
    computed on an identically initialised model); SGD(lr=1) makes the update equal minus that gradient."""
    t, d, run_dir = stage_trainer(tmp_path, "optim.micro_batch=2")
    torch.manual_seed(0)
    ref = build_reasoner(t.cfg, d.tokenizer).train()
    params = [(n, p) for n, p in t.raw.named_parameters() if p.requires_grad]
    ref_params = dict(ref.named_parameters())
    assert all(torch.equal(p, ref_params[n]) for n, p in params)
    batch = tuple(range(8))
    assert len({len(d.items[j].cot) for j in batch}) > 1  # micro-batches of different label counts

    total, log = loss_step(ref, make_batch([d.items[j] for j in batch], ref.ids, t.cfg), t.cfg)
    total.backward()
    t.opt = torch.optim.SGD([p for _, p in params], lr=1.0)
    before = {n: p.detach().clone() for n, p in params}
    r = kt.train_step(t, d.items, batch, accum=4, step=0, logger=kt.MetricLogger(run_dir, [], False, t.cfg))
    assert r.bad is None
    grads = {n: ref_params[n].grad for n, _ in params if ref_params[n].grad is not None}
    assert len(grads) > len(params) // 2  # (cot never uses the projection: no gradient, no update)
    for n, p in params:
        g = grads.get(n, torch.zeros_like(p))
        tol = 1e-5 * g.abs().max().item() + 1e-6 * before[n].abs().max().item()  # (p - g rounds at |p|)
        assert (before[n] - p.detach() - g).abs().max().item() <= tol, n
    assert all(p.grad is None for _, p in params)  # zeroed for the next step
    ref_norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).item()
    assert float(r.grad_norm) == pytest.approx(ref_norm, rel=1e-5)
    for k in ("loss/ce_teacher", "loss/total"):
        assert float(r.sums[k]) == pytest.approx(float(log[k]), rel=1e-5), k


@pytest.mark.parametrize("group", [True, False])
def test_train_step_groups_micro_batches_by_length(group, tmp_path, monkeypatch):
    """optim.group_by_length: the step's examples are split into micro-batches in order of question + CoT
    length (less padding); off: in the sampler's order. The whole step's examples are used either way."""
    t, d, run_dir = stage_trainer(tmp_path, "optim.micro_batch=2", f"optim.group_by_length={str(group).lower()}")
    seen, real = [], kt.make_batch

    def spy(items, *a, **k):
        seen.append([it.index for it in items])
        return real(items, *a, **k)

    monkeypatch.setattr(kt, "make_batch", spy)
    batch = (5, 0, 7, 2, 6, 1, 3, 4)
    length = {j: len(d.items[j].question) + len(d.items[j].cot) for j in batch}
    assert len(set(length.values())) > 1
    r = kt.train_step(t, d.items, batch, accum=4, step=0, logger=kt.MetricLogger(run_dir, [], False, t.cfg))
    assert r.bad is None
    order = sorted(batch, key=lambda j: length[j]) if group else list(batch)
    assert seen == [[d.items[j].index for j in order[i:i + 2]] for i in range(0, 8, 2)]
    if group:  # (a control: the sampler's order here is not already sorted)
        assert order != list(batch)
        widths = [max(length[j] for j in order[i:i + 2]) for i in range(0, 8, 2)]
        assert sum(widths) < sum(max(length[j] for j in batch[i:i + 2]) for i in range(0, 8, 2))


def test_train_step_with_a_nonfinite_loss_or_gradient_changes_nothing(tmp_path, monkeypatch):
    t, d, run_dir = stage_trainer(tmp_path, "optim.micro_batch=4")
    logger = kt.MetricLogger(run_dir, [], False, t.cfg)
    params = [p for p in t.raw.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt_before = ks.optimizer_tensors(t.inner_opt)[0]

    calls, real = [], kava.objective.loss_step
    def nan_second(*a, **k):  # the second micro-batch's CE is NaN
        total, log = real(*a, **k)
        calls.append(1)
        if len(calls) == 2:
            return total * float("nan"), {k: v * float("nan") if k.startswith("loss/") else v for k, v in log.items()}
        return total, log

    with monkeypatch.context() as mp:
        mp.setattr(kava.objective, "loss_step", nan_second)
        r = kt.train_step(t, d.items, tuple(range(8)), accum=2, step=0, logger=logger)
    assert r.bad == ["loss/ce_teacher"]
    # a finite loss with an infinite gradient (overflow in backward)
    hook = t.raw.special_rows.register_hook(lambda g: g + float("inf"))
    r2 = kt.train_step(t, d.items, tuple(range(8)), accum=2, step=0, logger=logger)
    hook.remove()
    assert r2.bad == ["grad_norm"] and math.isfinite(float(r2.sums["loss/total"]))
    for p, b in zip(params, before):
        assert torch.equal(p, b) and p.grad is None
    assert ks.optimizer_tensors(t.inner_opt)[0] == opt_before == {}  # AdamW never stepped


def test_save_checkpoint_then_resume_state_restores_everything(tmp_path):
    t, d, run_dir = stage_trainer(tmp_path, "optim.micro_batch=4", "method=kava", "eviction.method=random")
    logger = kt.MetricLogger(run_dir, [], False, t.cfg)
    assert kt.train_step(t, d.items, tuple(range(8)), accum=2, step=0, logger=logger).bad is None
    t.step, t.best, t.nonfinite_skipped = 1, {"val/accuracy": 0.25, "step": 1}, 3
    kt.save_checkpoint(t, run_dir)
    after_save = (torch.rand(4), t.acc.unwrap_model(t.objective).generator.get_state())

    torch.manual_seed(123)  # another initialisation, to be overwritten
    u = kt.setup_model_and_optimizer(t.cfg, d.tokenizer, t.acc)
    kt.resume_state(u, kt.latest_checkpoint(run_dir))
    assert (u.step, u.best, u.nonfinite_skipped) == (1, {"val/accuracy": 0.25, "step": 1}, 3)
    mine = dict(t.raw.named_parameters())
    for n, p in u.raw.named_parameters():
        assert torch.equal(p, mine[n]), n
    ot, ou = t.inner_opt.state_dict(), u.inner_opt.state_dict()
    as_json = lambda groups: json.loads(json.dumps(groups))  # (state.json stores betas as a list)
    assert as_json(ot["param_groups"]) == as_json(ou["param_groups"])
    assert len(ot["state"]) == len(ou["state"]) > 0
    for i, st in ot["state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(ou["state"][i][k])), (i, k)
    # the RNGs are back where they were at the save: the same draws follow
    assert torch.equal(torch.rand(4), after_save[0])
    assert torch.equal(u.acc.unwrap_model(u.objective).generator.get_state(), after_save[1])


def test_a_gpu_checkpoint_resumes_on_cpu_with_its_weights_and_a_line_about_the_rng(tmp_path, capsys):
    """A checkpoint written on a GPU holds a CUDA generator state for random eviction (16 bytes; a CPU one is
    5,056): resuming it on a CPU machine once crashed inside `Generator.set_state`. Now the weights, the
    optimizer and the step come back, the generator keeps its run.seed seeding, and a line says so."""
    from safetensors.torch import load_file, save_file

    t, d, run_dir = stage_trainer(tmp_path, "optim.micro_batch=4", "method=kava", "eviction.method=random")
    logger = kt.MetricLogger(run_dir, [], False, t.cfg)
    assert kt.train_step(t, d.items, tuple(range(8)), accum=2, step=0, logger=logger).bad is None
    t.step = 1
    kt.save_checkpoint(t, run_dir)
    ck = kt.latest_checkpoint(run_dir)
    rng = load_file(str(ck / "rng.safetensors"))
    assert rng["eviction"].numel() != 16
    rng["eviction"] = torch.arange(16, dtype=torch.uint8)  # what torch.cuda's Philox generator's get_state() gives
    save_file(rng, str(ck / "rng.safetensors"))

    u = kt.setup_model_and_optimizer(t.cfg, d.tokenizer, t.acc)
    seeded = u.acc.unwrap_model(u.objective).generator.get_state()
    kt.resume_state(u, ck)
    assert "eviction RNG state is another device type's than cpu's" in capsys.readouterr().out
    assert u.step == 1
    assert torch.equal(u.acc.unwrap_model(u.objective).generator.get_state(), seeded)
    mine = dict(t.raw.named_parameters())
    assert all(torch.equal(p, mine[n]) for n, p in u.raw.named_parameters())
    # the same-device state still restores exactly
    g = torch.Generator().manual_seed(7)
    state = g.get_state()
    g.manual_seed(8)
    assert ks.restore_generator(g, state) and torch.equal(g.get_state(), state)
    assert ks.restore_generator(g, None)


def test_fused_adamw_gives_the_multi_tensor_update_and_resumes_exactly(tmp_path, synth_root):
    """optim.fused_adamw: torch's fused AdamW kernel; the weights after 6 steps match the default multi-tensor
    AdamW to float rounding, and a fused run stopped at step 4 and resumed ends where an uninterrupted one does."""
    common = TINY + [f"run.output_dir={tmp_path}", "method=cot", "optim.max_steps=6", "run.save_every=2"]
    plain = kt.train(load_config("tiny_synth", common + ["run.name=plain"]), progress=False, data_root=synth_root)
    cfg = load_config("tiny_synth", common + ["run.name=fused", "optim.fused_adamw=true"])
    (tmp_path / "probe").mkdir()
    t, _, _ = stage_trainer(tmp_path / "probe", "optim.fused_adamw=true")
    assert t.inner_opt.defaults["fused"] is True
    fused = kt.train(cfg, progress=False, data_root=synth_root)
    assert max_diff(trainable(plain, 6), trainable(fused, 6)) <= 1e-5
    cfg_b = load_config("tiny_synth", common + ["run.name=fused_b", "optim.fused_adamw=true"])
    run_b = kt.train(cfg_b, progress=False, data_root=synth_root, stop_after=4)
    kt.train(kt.resume_config(run_b), resume=run_b, progress=False, data_root=synth_root)
    assert max_diff(trainable(fused, 6), trainable(run_b, 6)) == 0.0
    oa = load_file(str(fused / "checkpoints" / "step_6" / "optimizer.safetensors"))
    ob = load_file(str(run_b / "checkpoints" / "step_6" / "optimizer.safetensors"))
    assert max_diff(oa, ob) == 0.0


def test_a_second_trainer_on_the_same_run_dir_is_refused(tmp_path, synth_root, monkeypatch):
    """Two `kava train` on one run directory (issue 20: nothing stopped the second): while one holds the run
    directory, another start or `--resume` fails at once with an error naming the holder, and the lock is
    gone when the run ends (nothing is left in the run directory)."""
    import subprocess
    import sys

    from kava.checkpoint.rundir import LOCK_FILE, RunLock, RunLocked, lock_holder

    cfg = tiny_cfg(tmp_path, "optim.max_steps=2", "run.name=locked")
    run = Path(cfg.run.output_dir) / "locked"
    run.mkdir(parents=True)
    p = hold_lock(run)
    try:
        assert p.stdout.readline().strip() == "held"
        assert lock_holder(run).startswith(f"pid {p.pid} ")
        with pytest.raises(RunLocked, match=rf"{re.escape(str(run))} is in use by another `kava train` \(pid {p.pid} "):
            kt.train(cfg, progress=False, data_root=synth_root)
        with pytest.raises(RunLocked, match="is in use"):
            RunLock(run)
    finally:
        p.kill()
        p.wait()
    assert lock_holder(run) is None  # the kernel released the killed holder's lock: no stale lock
    kt.train(cfg, progress=False, data_root=synth_root)
    assert (run / "DONE").exists() and not (run / LOCK_FILE).exists()


# ------------------------------------------------------------------------------------------------ interrupts
def _cli(*argv):
    from kava.cli import main

    return main(list(argv))


def _sets(items):
    return [x for s in items for x in ("--set", s)]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_a_checkpoint_at_the_next_step_and_prints_the_resume_command(tmp_path, monkeypatch, capsys, sig):
    """Ctrl-C (SIGINT) or SLURM's SIGTERM during step 2: the step finishes, checkpoints/step_2 is written, the
    command exits 128 + signal with one line naming the checkpoint and `kava train --resume RUN`; the resume
    finishes the run with the losses of an uninterrupted one."""
    real = kt.run_step  # the loop's step (kt.train_step is prepare_step + run_step)

    def step(t, *a, step, **kw):
        if step == 1:
            os.kill(os.getpid(), sig)  # arrives while the step runs
        return real(t, *a, step=step, **kw)

    sets = _sets(TINY + [f"run.output_dir={tmp_path}", "optim.max_steps=5", "run.log_every=1", "run.eval_every=50",
                         "run.save_every=50"])
    monkeypatch.setattr(kt, "run_step", step)
    before = signal.getsignal(sig)
    assert _cli("train", "--config", "tiny_synth", "--no-progress", *sets) == 128 + sig
    monkeypatch.setattr(kt, "run_step", real)
    run = tmp_path / "tiny_synth-s42"
    out, err = capsys.readouterr()
    assert f"{signal.Signals(sig).name} received: saving a checkpoint after this step" in out
    assert err == (f"kava train: interrupted: {signal.Signals(sig).name}: stopped at step 2 of 5; checkpoint saved in "
                   f"{run}/checkpoints/step_2; continue with: kava train --resume {run}\n")
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_2"] and not (run / "DONE").exists()
    assert signal.getsignal(sig) == before  # the handlers are restored
    assert _cli("train", "--resume", str(run), "--no-progress") == 0
    assert json.loads((run / "DONE").read_text())["steps"] == 5
    assert _cli("train", "--config", "tiny_synth", "--no-progress", *sets, "--set", "run.name=plain") == 0
    losses = lambda r: [(m["step"], m["loss/total"]) for m in metrics(r)]  # noqa: E731
    assert losses(run) == losses(tmp_path / "plain")


def test_resume_of_a_finished_run_does_nothing_and_max_steps_extends_it(tmp_path, capsys):
    sets = _sets(TINY + [f"run.output_dir={tmp_path}", "run.eval_every=50", "optim.max_steps=3"])
    assert _cli("train", "--config", "tiny_synth", "--no-progress", *sets) == 0
    run = tmp_path / "tiny_synth-s42"
    final = {p: p.stat().st_mtime_ns for p in (run / "final").rglob("*")}
    capsys.readouterr()
    assert _cli("train", "--resume", str(run), "--no-progress") == 0
    assert f"{run} is finished (3 steps; DONE); nothing to do" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (run / "final").rglob("*")} == final  # final/ not rewritten
    assert _cli("train", "--resume", str(run), "--set", "optim.lr=1") == 2
    assert "--set may change only optim.max_steps" in capsys.readouterr().err
    assert _cli("train", "--resume", str(run), "--set", "optim.max_steps=2") == 2
    assert "is already at step 3" in capsys.readouterr().err
    assert _cli("train", "--resume", str(run), "--no-progress", "--set", "optim.max_steps=5") == 0
    out = capsys.readouterr().out
    assert f"extending {run}: optim.max_steps 3 -> 5 from step 3; the LR schedule (cosine" in out
    assert "now ends at step 5" in out and "resuming at step 3 of 5" in out
    assert json.loads((run / "DONE").read_text())["steps"] == 5 and load_config(str(run / "config.yaml")).optim.max_steps == 5
    assert [m["step"] for m in metrics(run)][-1] == 5
    lrs = {m["step"]: m["lr"] for m in metrics(run)}
    assert lrs[5] == pytest.approx(kt.lr_at(4, 5, 3e-3, 0, "cosine"))  # the new schedule's end
    assert json.loads((run / "meta.json").read_text())["extended"] == [{"from_steps": 3, "to_steps": 5, "at_step": 3}]


def test_an_extension_of_a_run_in_use_is_refused_before_it_edits_the_run(tmp_path, capsys):
    """`--resume RUN --set optim.max_steps=N` while another process holds RUN's lock: exit 2 with the "in use"
    line, and config.yaml, meta.json and DONE exactly as they were (they were rewritten before the refusal)."""
    from kava.config import save_config

    run = tmp_path / "busy"
    run.mkdir()
    save_config(tiny_cfg(tmp_path, "optim.max_steps=3"), run / "config.yaml")
    (run / "meta.json").write_text(json.dumps({"plan": {"total_steps": 3}}))
    (run / "DONE").write_text(json.dumps({"steps": 3}))
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    p = hold_lock(run)
    try:
        assert p.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert _cli("train", "--resume", str(run), "--no-progress", "--set", "optim.max_steps=900") == 2
        out, err = capsys.readouterr()
        assert f"{run} is in use by another `kava train` (pid {p.pid} " in err and "extending" not in out
        assert {p.name: p.read_bytes() for p in run.iterdir() if p.name != "train.lock"} == before
    finally:
        p.kill()
        p.wait()


def test_a_run_that_fails_at_set_up_leaves_no_run_directory(tmp_path, capsys):
    sets = _sets(TINY + [f"run.output_dir={tmp_path}", f"data.source={tmp_path / 'missing.jsonl'}", "method=cot"])
    assert _cli("train", "--config", "tiny_synth", "--no-progress", *sets) == 2
    assert "missing.jsonl: file not found" in capsys.readouterr().err
    assert not (tmp_path / "tiny_synth-s42").exists()
    (tmp_path / "tiny_synth-s42").mkdir()  # a directory the user made is never removed
    (tmp_path / "tiny_synth-s42" / "notes.txt").write_text("mine")
    assert _cli("train", "--config", "tiny_synth", "--no-progress", *sets) == 2
    assert (tmp_path / "tiny_synth-s42" / "notes.txt").exists()


def test_a_signal_during_set_up_stops_at_once_and_a_second_one_in_the_loop_too(capsys):
    from kava.training.interrupt import StopRequest

    before = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        with pytest.raises(KeyboardInterrupt):  # not armed (data, model loading): no waiting for a step
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        stop.arm()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.requested == signal.SIGTERM and "SIGTERM received" in capsys.readouterr().out
        with pytest.raises(KeyboardInterrupt):  # the second signal does not wait
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) == before
