"""The command line's own behaviour: `--version`, `train --dry-run`, and user errors as one line + exit 2."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import kava
from kava.cli import main

from test_sweep import TINY


def sets(items):
    return [x for s in items for x in ("--set", s)]


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"kava {kava.__version__}"


def test_train_dry_run_prints_config_and_plan_and_trains_nothing(tmp_path, capsys):
    assert main(["train", "--config", "tiny_synth", "--dry-run",
                 *sets(TINY + [f"run.output_dir={tmp_path}", "optim.max_steps=7"])]) == 0
    out = capsys.readouterr().out
    assert "method: cot" in out and "max_steps: 7" in out  # the resolved config
    plan = dict(ln.strip().split(":", 1) for ln in out.split("plan:\n")[1].splitlines())
    assert plan["steps"].split()[0] == "7"
    assert plan["train"].split()[0] == "300"  # data.synth_train_size
    assert plan["batch"].strip() == "effective 8 = micro 8 x 1 process(es) x 1 accumulation"
    assert not (tmp_path / "tiny_synth-s42").exists()


@pytest.mark.parametrize("argv,expect", [
    (["train", "--config", "tiny_synth", "--set", "optim.lrr=1"], "unknown key optim.lrr"),
    (["train", "--config", "no/such/file.yaml"], "config file not found: no/such/file.yaml"),
    (["eval", "--checkpoint", "{tmp}", "--datasets", "synth-test"], "no kava model found"),
    (["eval", "--checkpoint", "{tmp}", "--datasets", "gsm8k", "--data-dir", "{tmp}"], "gsm8k/test.jsonl: file not found"),
    (["ask", "--checkpoint", "{tmp}/missing", "--question", "x"], "missing: no such directory"),
    # argparse's `choices` printed its usage and the error (4 lines)
    (["export", "{tmp}", "--output", "{tmp}/out", "--dtype", "xx"], "--dtype xx: allowed values: fp32, bf16, fp16"),
    # json's bare "Expecting value: line 1 column 39" named no file
    (["eval", "--checkpoint", "{tmp}/adapter", "--datasets", "synth-test"],
     "{tmp}/adapter/adapter_config.json: not valid JSON (Expecting value: line 1 column 39"),
])
def test_user_errors_are_one_line_with_exit_status_2(argv, expect, tmp_path, capsys):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text('{"base_model_name_or_path": "x", "r": ')
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kava {argv[0]}: error: ") and expect.replace("{tmp}", str(tmp_path)) in err \
        and err.count("\n") == 1, err


@pytest.mark.parametrize("argv, expect", [
    (["report", "{tmp}/nothing"], "kava report: error: no run directory in {tmp}/nothing"),
    (["score", "--predictions", "{tmp}/p.jsonl", "--dataset", "nosuch"], "kava score: error: unknown evaluation set"),
    (["train"], "kava train: give --config PRESET_OR_YAML"),
    (["eval", "--datasets", "gsm8k"], "kava eval: give --checkpoint DIR or --model-args"),
    (["train", "--config", "tiny_synth", "--set", "model.from_scratch=null", "--set", "model.name_or_path=./no/such/model",
      "--set", "run.output_dir={tmp}", "--set", "data.synth_train_size=40", "--set", "data.synth_eval_size=4"],
     "kava train: error: model.name_or_path: ./no/such/model does not exist (looked at {cwd}/no/such/model)"),
])
def test_user_and_usage_errors_go_to_stderr_with_exit_status_2(argv, expect, tmp_path, capsys):
    import os

    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert expect.format(tmp=tmp_path, cwd=os.getcwd()) in err and err.count("\n") == 1, (out, err)
    assert not (tmp_path / "tiny_synth-s42").exists()  # the failed set-up left no run directory


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_missing_optional_package_is_one_line(tmp_path, capsys):
    argv = ["train", "--config", "tiny_synth", "--no-progress",
            *sets(TINY + [f"run.output_dir={tmp_path}", "run.log=[jsonl,wandb]"])]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "the optional package 'wandb' is not installed: pip install wandb" in err and err.count("\n") == 1


def test_a_real_process_exits_2_without_traceback_unless_debug(tmp_path):
    src = str(Path(kava.__file__).parents[1])
    cmd = [sys.executable, "-m", "kava.cli", "eval", "--checkpoint", str(tmp_path), "--datasets", "synth-test"]
    r = subprocess.run(cmd, capture_output=True, text=True, env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = subprocess.run(cmd[:3] + ["--debug"] + cmd[3:], capture_output=True, text=True,
                       env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"})
    assert r.returncode == 1 and "Traceback" in r.stderr and "CheckpointError" in r.stderr


def test_data_shows_counts_one_formatted_pair_and_the_skipped_records(tmp_path, capsys):
    """`kava data SOURCE` on a local iCoT text file with one malformed line."""
    src = tmp_path / "train.txt"
    src.write_text("Tom has 3 apples and buys 4 more . How many ?||<<3+4=7>> <<7*2=14>> #### 14\n"
                   "no separator on this line\n"
                   "He has 5 pens and loses 2 . How many ?||<<5-2=3>> #### 3\n")
    assert main(["data", str(src), "--output", str(tmp_path / "out"), "--num-latents", "4"]) == 0
    out = capsys.readouterr().out
    assert f"source: {src}" in out
    counts = next(ln for ln in out.splitlines() if ln.startswith("records: "))
    assert counts.startswith("records: 2; skipped 1 records")
    teacher = next(ln for ln in out.splitlines() if ln.strip().startswith("teacher:"))
    student = next(ln for ln in out.splitlines() if ln.strip().startswith("student:"))
    # the teacher sees the CoT without its last step (data.drop_last_step), then the answer prompt and answer
    assert "<<3+4=7>> The answer is: 14" in teacher and "<<7*2=14>>" not in teacher
    assert student.count("<latent>") == 4 and "<bot>" in student and "<eot>" in student and "<<" not in student
