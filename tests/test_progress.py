"""`kava train` output: the start summary, and a progress line every `run.log_every` steps when no progress
bar is shown (no TTY: SLURM, nohup, a pipe; or --no-progress); `kava eval`'s progress lines, from the same
console helpers (`kava.console`)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import kava
from kava.config import load_config
from kava.console import format_duration
from kava.evaluate import EvalProgress
from kava.training.progress import ProgressLine
from kava.train import train

from test_sweep import TINY

LINE = re.compile(r"^\[kava\] step (\d+)/(\d+) \((\d+)%\) \| loss (\S+) \| (\S+) steps/s \| ETA (\S+)$")


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (7.4, "7s"), (59.6, "1m00s"), (145, "2m25s"),
                                           (3725, "1h02m05s"), (-3, "0s")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_progress_line_rate_and_eta_over_the_last_window(capsys):
    t = iter([100.0, 110.0, 112.0])  # loop start, then the two lines
    p = ProgressLine(total=100, start_step=0, enabled=True, clock=lambda: next(t))
    p.update(20, 1.5)  # 20 steps in 10 s: 2 steps/s, 80 left -> 40 s
    p.update(30, 0.25)  # 10 steps in 2 s: 5 steps/s, 70 left -> 14 s
    assert capsys.readouterr().out.splitlines() == [
        "[kava] step 20/100 (20%) | loss 1.5000 | 2.00 steps/s | ETA 40s",
        "[kava] step 30/100 (30%) | loss 0.2500 | 5.00 steps/s | ETA 14s"]


def test_progress_line_after_resume_counts_from_the_resumed_step(capsys):
    t = iter([0.0, 4.0])
    ProgressLine(total=10, start_step=6, enabled=True, clock=lambda: next(t)).update(8, 2.0)
    assert capsys.readouterr().out.strip() == "[kava] step 8/10 (80%) | loss 2.0000 | 0.50 steps/s | ETA 4s"


def test_disabled_progress_line_prints_nothing(capsys):
    ProgressLine(total=10, start_step=0, enabled=False).update(5, 1.0)
    assert capsys.readouterr().out == ""


def test_eval_progress_prints_when_due_with_the_rate_since_the_start(capsys):
    t = iter([0.0, 1.0, 2.0, 70.0, 72.0, 80.0])  # start, then one reading per update
    p = EvalProgress(total=40, label="gsm8k (cot)", enabled=True, clock=lambda: next(t))
    p.update(2)  # 2 of 40: under 10% and under 60 s -> nothing
    p.update(2)  # 4 = 10% -> due: 4 in 2 s
    p.update(1)  # 5: 68 s since the last line -> due: 5 in 70 s
    p.update(1)  # 6: not due
    p.update(34)  # the end is always due: 40 in 80 s
    assert capsys.readouterr().out.splitlines() == [
        "[kava] eval gsm8k (cot): 4/40 questions (10%) | 2.0 questions/s | ETA 18s",
        "[kava] eval gsm8k (cot): 5/40 questions (12%) | 0.1 questions/s | ETA 8m10s",
        "[kava] eval gsm8k (cot): 40/40 questions (100%) | 0.5 questions/s | ETA 0s"]


def test_disabled_eval_progress_prints_nothing(capsys):
    p = EvalProgress(total=4, label="x", enabled=False)
    p.update(4)
    assert capsys.readouterr().out == ""


def _cfg(tmp_path, extra=()):
    return load_config("tiny_synth", TINY + [f"run.output_dir={tmp_path}", "optim.max_steps=6", "run.log_every=2",
                                             "run.eval_every=6", *extra])


def test_train_without_a_tty_prints_the_summary_and_a_line_every_log_every_steps(tmp_path, capsys):
    run_dir = train(_cfg(tmp_path), progress=True)  # capsys: stderr is no TTY, so tqdm shows no bar
    out = capsys.readouterr().out.splitlines()
    head = out.index("[kava] train cot: 6 steps")
    plan = dict(ln.strip().split(":", 1) for ln in out[head + 1:head + 10])
    assert plan["run dir"].strip() == str(run_dir) == str(tmp_path / "tiny_synth-s42")
    assert plan["method"].strip() == "cot (full fine-tuning)" and plan["model"].strip() == "from_scratch"
    meta = json.loads((run_dir / "meta.json").read_text())
    assert plan["train"].strip() == f"{meta['train_examples']} examples (of 300 records, after the length limits); " \
                                    "skipped 0 records"
    assert plan["validation"].strip() == "5 records; skipped 0 records" and plan["steps"].split()[0] == "6"
    assert plan["batch"].strip() == "effective 8 = micro 8 x 1 process(es) x 1 accumulation"
    assert plan["world size"].strip() == "1" and "synthetic" in plan["data"]
    lines = [m.groups() for m in map(LINE.match, out) if m]
    assert [(s, n, pct) for s, n, pct, *_ in lines] == [("2", "6", "33"), ("4", "6", "67"), ("6", "6", "100")]
    logged = {r["step"]: r["loss/total"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
              if r.get("split") == "train" and "loss/total" in r}
    assert [float(loss) for _, _, _, loss, *_ in lines] == pytest.approx([logged[2], logged[4], logged[6]], abs=5e-5)
    assert all(float(rate) > 0 for *_, rate, _ in lines) and lines[-1][-1] == "0s"


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_with_a_progress_bar_there_are_no_progress_lines(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Tty())  # a terminal: tqdm draws its bar there
    train(_cfg(tmp_path), progress=True)
    out = capsys.readouterr().out
    assert "[kava] train cot: 6 steps" in out and not any(map(LINE.match, out.splitlines()))
    assert "train cot" in sys.stderr.getvalue()  # the bar


VAL = re.compile(r"^\[kava\] step (\d+): val accuracy (\d\.\d{4}) \(best (\d\.\d{4}) at step (\d+)\)$")


@pytest.mark.parametrize("tty", [False, True])
def test_each_validation_prints_its_accuracy_and_the_best_so_far_with_and_without_a_bar(tmp_path, capsys,
                                                                                      monkeypatch, tty):
    """Training printed no validation accuracy and no best step: one line per validation, whether a bar is
    drawn (a TTY: written above it) or not, with the numbers metrics.jsonl and best/ hold."""
    if tty:
        monkeypatch.setattr(sys, "stderr", _Tty())  # a terminal: tqdm draws its bar there
    run_dir = train(_cfg(tmp_path, ["run.eval_every=2"]), progress=True)
    got = [m.groups() for m in map(VAL.match, capsys.readouterr().out.splitlines()) if m]
    vals = [(r["step"], r["val/accuracy"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r.get("split") == "val"]
    assert [int(s) for s, *_ in got] == [s for s, _ in vals] == [2, 4, 6]
    assert [float(a) for _, a, _, _ in got] == pytest.approx([a for _, a in vals], abs=5e-5)
    best_acc, best_step = -1.0, -1
    for (step, acc), (*_, shown, shown_step) in zip(vals, got):  # the best so far: a higher accuracy replaces it
        if acc > best_acc:
            best_acc, best_step = acc, step
        assert float(shown) == pytest.approx(best_acc, abs=5e-5) and int(shown_step) == best_step
    final_best = json.loads((run_dir / "best" / "meta.json").read_text())
    assert int(got[-1][3]) == final_best["step"]
    if tty:
        assert "train cot" in sys.stderr.getvalue()  # the bar was drawn


def test_resumed_run_says_where_it_resumes(tmp_path, capsys):
    cfg = _cfg(tmp_path, ["run.save_every=2"])
    run_dir = train(cfg, progress=False, stop_after=4)
    capsys.readouterr()
    from kava.cli import main

    assert main(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "[kava] train cot: resuming at step 4 of 6" in out and out[-1] == f"run directory: {run_dir}"
    assert [m.group(1) for m in map(LINE.match, out) if m] == ["6"]


def test_cli_train_in_a_pipe_prints_progress_lines(tmp_path):
    """A real process with stdout and stderr piped, as under SLURM or nohup."""
    src = str(Path(kava.__file__).parents[1])
    sets = [x for s in TINY + [f"run.output_dir={tmp_path}", "optim.max_steps=4", "run.log_every=2"]
            for x in ("--set", s)]
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "kava.cli", "train", "--config", "tiny_synth", *sets],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[0] == "[kava] train cot: 4 steps" and out[1].split(":", 1)[0].strip() == "run dir"
    assert [m.group(1) for m in map(LINE.match, out) if m] == ["2", "4"]
    assert out[-1] == f"run directory: {tmp_path / 'tiny_synth-s42'}"
    assert "FutureWarning" not in r.stderr and "DeprecationWarning" not in r.stderr, r.stderr
