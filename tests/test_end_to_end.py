"""End-to-end paths on tiny models: `kava demo`, and train x 3 seeds -> eval -> report."""

import json
import struct

import pytest

from kava.cli import main as cli

TINY = ["model.from_scratch.hidden_size=32", "model.from_scratch.intermediate_size=64",
        "model.from_scratch.num_hidden_layers=2", "data.synth_train_size=300", "data.synth_eval_size=12",
        "data.valid_limit=4", "optim.effective_batch=8", "optim.micro_batch=8", "latent.num_latents=4",
        "run.eval_max_cot_tokens=24", "run.eval_max_new_tokens=4"]


def png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_demo_end_to_end(tmp_path, capsys):
    from kava.tools.demo import run_demo

    rows = run_demo(tmp_path / "demo", TINY + ["optim.max_steps=3", "run.eval_every=3"], eval_limit=6,
                    progress=False)
    out = capsys.readouterr().out
    assert [r["run"] for r in rows] == ["backbone", "nocot", "kava"]
    assert [r["mode"] for r in rows] == ["cot", "nocot", "latent"]
    for r in rows:
        assert r["count"] == 6 and 0.0 <= r["accuracy"] <= 1.0
        assert f"{100 * r['accuracy']:8.1f}%" in out  # the printed table is the run's own numbers
    # latent mode: 1 prefix + T=3 sweeps + 1..4 decode steps; nocot: 1..4 decode steps
    assert 5 <= rows[2]["mean_forward_passes"] <= 8
    assert 1 <= rows[1]["mean_forward_passes"] <= 4
    zeroed = rows[2]["ablations"]["zeros"]  # KaVa with its latents zeroed, printed beside its accuracy
    assert 0.0 <= zeroed <= 1.0 and f"KaVa with its latents zeroed: {100 * zeroed:.1f}%" in out
    assert "results/depth/README.md" in out
    summary = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    assert [r["accuracy"] for r in summary["rows"]] == [r["accuracy"] for r in rows]
    for name in ("accuracy_vs_passes.png", "training_curves.png"):
        w, h = png_size(tmp_path / "demo" / "report" / name)
        assert w >= 400 and h >= 300
    # a second call, through `kava demo` (what `make demo` runs), reuses the finished runs
    assert cli(["demo", "--output", str(tmp_path / "demo"), "--eval-limit", "6", "--no-progress",
                *sum((["--set", s] for s in TINY + ["optim.max_steps=3", "run.eval_every=3"]), [])]) == 0
    assert out.count("training") >= 3 and "reusing the finished run" in capsys.readouterr().out


def test_three_seeds_train_eval_report(tmp_path, capsys):
    """Three real (tiny) training runs, evaluated, then `kava report`: mean ± std over the seeds."""
    from kava.config import load_config
    from kava.data.pipeline import synthetic_dir

    runs = []
    for seed in (1, 2, 3):
        assert cli(["train", "--config", "tiny_synth", "--no-progress", *sum((["--set", s] for s in TINY + [
            "method=kava", "optim.max_steps=3", "run.eval_every=3", f"run.seed={seed}", f"run.name=kava-s{seed}",
            f"run.output_dir={tmp_path}", "run.log=[jsonl]", "run.grad_share_every=1"]), [])]) == 0
        runs.append(tmp_path / f"kava-s{seed}")
    data_dir = synthetic_dir(load_config("tiny_synth", TINY), tmp_path / "_data")
    accs = []
    for rd in runs:
        assert cli(["eval", "--checkpoint", str(rd), "--datasets", "synth-test,synth-hard", "--data-dir",
                    str(data_dir), "--limit", "6", "--diagnostics"]) == 0
        s = json.loads((rd / "eval" / "synth-test-limit6" / "summary.json").read_text())  # 6 of 12
        assert s["count"] == 6 and s["mode"] == "latent" and s["config_hash"]
        assert set(s["ablations"]) == {"none", "zeros", "placeholder", "shuffle"} and s["ablations"]["none"] == s["accuracy"]
        assert s["oracle"]["count"] + sum(s["oracle"]["skipped"].values()) == 6
        assert s["kv_match"]["pairs"] > 0 and len(s["kv_match"]["k_rel"]) == 2  # two layers
        out = capsys.readouterr().out
        assert "accuracy with the latents replaced" in out and "oracle" in out and "KV match" in out
        accs.append(100 * s["accuracy"])
        lines = (rd / "eval" / "synth-test-limit6" / "predictions.jsonl").read_text().splitlines()
        assert sorted(json.loads(x)["index"] for x in lines) == list(range(6))
    assert cli(["report", *map(str, runs), "--output", str(tmp_path / "rep"), "--group-by", "method",
                "--include-limited"]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    mean = sum(accs) / 3
    assert f"{mean:.1f}" in md and "n=3" in md
    assert "## Latent ablations and oracle check" in md and "## KV match" in md and "## Gradient share" in md
    for name in ("accuracy_vs_passes.png", "training_curves.png", "kv_match.png", "grad_shares.png"):
        w, h = png_size(tmp_path / "rep" / name)
        assert w >= 400 and h >= 300
    capsys.readouterr()


@pytest.mark.parametrize("argv", [["--help"], ["presets", "check"]])
def test_cli_entry_points(argv, capsys):
    try:
        rc = cli(argv)
    except SystemExit as e:  # argparse exits 0 after --help
        rc = e.code
    assert rc == 0
    out = capsys.readouterr().out
    if argv == ["--help"]:
        for cmd in ("demo", "train", "eval", "score", "report", "ask", "inspect", "sweep", "presets", "data"):
            assert cmd in out
    else:
        assert "0 mismatch(es)" in out


def test_sharded_eval_over_two_processes_equals_one(tmp_path):
    """`kava eval` under torchrun with 2 CPU processes: every question scored once, same predictions."""
    import os
    import subprocess
    import sys

    from kava.config import load_config
    from kava.data.pipeline import synthetic_dir

    sets = sum((["--set", s] for s in TINY + ["method=kava", "optim.max_steps=2", "run.eval_every=2",
                                               "run.name=k", f"run.output_dir={tmp_path}", "run.log=[jsonl]"]), [])
    assert cli(["train", "--config", "tiny_synth", "--no-progress", *sets]) == 0
    data_dir = synthetic_dir(load_config("tiny_synth", TINY), tmp_path / "_data")
    common = ["eval", "--checkpoint", str(tmp_path / "k"), "--datasets", "synth-test", "--data-dir", str(data_dir),
              "--limit", "11", "--batch-size", "4"]
    assert cli(common + ["--output", str(tmp_path / "one")]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "kava.cli", *common, "--output", str(tmp_path / "two")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    one = [json.loads(x) for x in (tmp_path / "one" / "synth-test-limit11" / "predictions.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "two" / "synth-test-limit11" / "predictions.jsonl").read_text().splitlines()]
    assert [x["index"] for x in two] == list(range(11))  # 11 questions over 2 ranks: none lost, none twice
    assert [x["generated"] for x in two] == [x["generated"] for x in one]
    assert [x["forward_passes"] for x in two] == [x["forward_passes"] for x in one]
    s2 = json.loads((tmp_path / "two" / "synth-test-limit11" / "summary.json").read_text())
    assert s2["count"] == 11 and s2["processes"] == 2


def test_pause_tokens_train_under_two_process_ddp(tmp_path):
    """T=0 (pause tokens) under DDP on 2 CPU processes: the projection gets no gradient, which DDP with
    find_unused_parameters off refuses at the second step unless the projection is frozen."""
    import os
    import subprocess
    import sys

    sets = sum((["--set", s] for s in TINY + ["method=kava", "latent.num_sweeps=0", "optim.max_steps=3",
                                               "optim.effective_batch=8", "optim.micro_batch=4",
                                               "run.eval_every=3", "run.name=t0", f"run.output_dir={tmp_path}",
                                               "run.log=[jsonl]"]), [])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "kava.cli", "train", "--config", "tiny_synth", "--no-progress", *sets],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, _launch_failure(r)
    steps = [json.loads(x) for x in (tmp_path / "t0" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [s["step"] for s in steps if "loss/total" in s]
    assert train_steps and max(train_steps) == 3
    assert (tmp_path / "t0" / "DONE").exists()


@pytest.mark.parametrize("method", ["kava", "nocot"])
def test_two_process_ddp_gives_the_one_process_loss_curve(tmp_path, method):
    """Loss parity (issue 15) on CPU: 2 DDP processes (gloo) at the same effective batch give the single
    process's loss curve and weights. One process accumulates 2 micro-batches of 4; two processes take one
    each: the step's examples, the CE normalisation (whole-step label counts) and the gradient are the same,
    up to the order of floating-point reductions."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    def sets(name):
        return sum((["--set", s] for s in TINY + [f"method={method}", "optim.max_steps=4", "optim.effective_batch=8",
                                                   "optim.micro_batch=4", "run.eval_every=4", f"run.name={name}",
                                                   f"run.output_dir={tmp_path}", "run.log=[jsonl]",
                                                   "run.log_every=1", "run.grad_share_every=0"]), [])

    assert cli(["train", "--config", "tiny_synth", "--no-progress", *sets("one")]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "kava.cli", "train", "--config", "tiny_synth", "--no-progress", *sets("two")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, _launch_failure(r)

    def losses(name):
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return {row["step"]: row["loss/total"] for row in rows if "loss/total" in row}

    one, two = losses("one"), losses("two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    for step in one:
        assert abs(one[step] - two[step]) <= 1e-4 * abs(one[step]), (step, one[step], two[step])
    w1 = load_file(str(next((tmp_path / "one" / "final").rglob("model.safetensors"))))
    w2 = load_file(str(next((tmp_path / "two" / "final").rglob("model.safetensors"))))
    assert w1.keys() == w2.keys()
    for k in w1:
        assert (w1[k] - w2[k]).abs().max() <= 1e-4, k


def _launch_failure(r) -> str:
    """What a failed torchrun launch says: each rank's kava error line, then the end of stderr."""
    lines = [line for line in (r.stdout + r.stderr).splitlines() if "kava" in line and "error" in line.lower()]
    return "\n".join(lines[:10]) + "\n...\n" + r.stderr[-2000:]


RESUME_SCRIPT = """
import json, sys
from kava.config import load_config
from kava.train import train
sets = json.loads(sys.argv[2])
cfg = load_config("tiny_synth", sets)
from kava.cli import leave_process_group
try:
    if sys.argv[1] == "full":
        train(cfg, progress=False)
    else:  # stop after 2 of 4 steps (a checkpoint at step 2), then resume in a fresh train() call
        run_dir = train(cfg, progress=False, stop_after=2)
        train(cfg, resume=run_dir, progress=False)
finally:  # as the CLI does: a gloo group alive at exit can abort a rank (SIGABRT) after its work is done
    leave_process_group()
"""


def test_two_process_resume_is_exact_with_dropout(tmp_path):
    """Exact resume under DDP: each process draws its own LoRA-dropout masks (its micro-batch has its own
    shapes), so each must get its own RNG state back, not process 0's."""
    import os
    import subprocess
    import sys

    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def run(mode, name):
        sets = TINY + ["method=kava", "optim.max_steps=4", "optim.effective_batch=8", "optim.micro_batch=4",
                       "run.eval_every=2", "run.save_every=2", f"run.name={name}", f"run.output_dir={tmp_path}",
                       "run.log=[jsonl]", "run.log_every=1", "run.grad_share_every=0", "lora.r=4",
                       "lora.dropout=0.3", "data.max_question_tokens=200"]
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            str(script), mode, json.dumps(sets)], env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, _launch_failure(r)
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return {row["step"]: row["loss/total"] for row in rows if "loss/total" in row}

    full, resumed = run("full", "full"), run("resume", "resumed")
    assert sorted(full) == sorted(resumed) == [1, 2, 3, 4]
    assert resumed == full  # bitwise: the same draws on every process


NAN_ON_RANK1_SCRIPT = """
import json, os, sys
import torch
import kava.losses
from kava.config import load_config
from kava.train import NonFiniteLoss, train
real, calls = kava.losses.codi_loss, []
def codi(*a, **k):  # NaN in the CODI term of process 1's second micro-batch (optimizer step 2), nowhere else
    calls.append(1)
    out = real(*a, **k)
    return out * float("nan") if os.environ["RANK"] == "1" and len(calls) == 2 else out
kava.losses.codi_loss = codi
from kava.cli import leave_process_group
try:
    train(load_config("tiny_synth", json.loads(sys.argv[1])), progress=False)
except NonFiniteLoss as e:
    print(f"rank {os.environ['RANK']}: {e}", flush=True)
    sys.exit(3)
finally:  # as the CLI does (a gloo group alive at exit can abort a rank)
    leave_process_group()
"""


def test_a_nonfinite_term_on_one_process_is_named_by_every_process(tmp_path):
    """Process 1's CODI term turns NaN: every process stops at that step and names loss/codi (process 0, whose
    own terms were finite, used to report it as a non-finite gradient)."""
    import os
    import subprocess
    import sys

    script = tmp_path / "nan.py"
    script.write_text(NAN_ON_RANK1_SCRIPT)
    sets = TINY + ["method=pccot", "optim.max_steps=3", "optim.effective_batch=8", "optim.micro_batch=4",
                   "run.eval_every=100", "run.save_every=100", "run.name=nan", f"run.output_dir={tmp_path}",
                   "run.log=[jsonl]", "run.grad_share_every=0"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), json.dumps(sets)], env=dict(os.environ, OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=300)
    lines = sorted(x for x in r.stdout.splitlines() if x.startswith("rank "))
    assert len(lines) == 2, _launch_failure(r)
    for rank, line in enumerate(lines):
        assert line.startswith(f"rank {rank}: non-finite loss at optimizer step 2 in term(s) ['loss/codi']"), line
