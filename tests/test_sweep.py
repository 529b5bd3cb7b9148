"""`kava sweep`: matrix expansion, up-front validation, statuses, SLURM scripts (content, syntax, and what
they launch when run with fake torchrun/srun/scontrol), and a real two-run local sweep that a second
invocation skips."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
from pathlib import Path

import pytest

from kava.cli import build_parser, main
from kava.config import ConfigError, load_config, save_config
from kava.tools.sweep import expand, parse_grid, run_local, split_list

PRESETS = ["llama1b_aug", "llama1b_aug_nl", "llama3b_aug", "llama3b_aug_nl", "qwen05b_aug", "qwen05b_aug_nl"]
TINY = ("model.from_scratch.hidden_size=32 model.from_scratch.intermediate_size=64 "
        "model.from_scratch.num_hidden_layers=2 data.synth_train_size=300 data.synth_eval_size=10 "
        "data.valid_limit=5 optim.effective_batch=8 optim.micro_batch=8 optim.max_steps=3 latent.num_latents=4 "
        "run.log=[jsonl]").split()



@pytest.fixture
def no_train(monkeypatch):
    """Replace training by a recorder: (run name, resume) per call."""
    calls = []

    def fake(cfg, resume=None, **kw):
        calls.append((cfg.run.name, resume))
        return Path(cfg.run.output_dir) / cfg.run.name

    monkeypatch.setattr("kava.train.train", fake)
    return calls


# ------------------------------------------------------------------------------------------------ expansion
def test_six_presets_three_seeds_give_18_distinct_runs():
    runs = expand(PRESETS, [42, 123, 456])
    assert len(runs) == 18 and len({r.name for r in runs}) == 18
    assert {(r.cfg.preset, r.cfg.run.seed) for r in runs} == set(itertools.product(PRESETS, [42, 123, 456]))
    for r in runs:
        assert r.name == f"{r.cfg.preset}-s{r.seed}" == r.cfg.run.name
        assert r.run_dir == Path(r.cfg.run.output_dir) / r.name


def test_grid_product_and_fixed_overrides(tmp_path):
    grid = parse_grid(["loss.kv_supervision=last,all", "eviction.lam=0.0,0.5,1.0"])
    runs = expand(["llama1b_aug"], [1, 2], grid, ["optim.lr=1e-4"], output_dir=str(tmp_path))
    assert len(runs) == 12 and len({r.name for r in runs}) == 12
    got = {(r.cfg.loss.kv_supervision, r.cfg.eviction.lam, r.cfg.run.seed) for r in runs}
    assert got == set(itertools.product(["last", "all"], [0.0, 0.5, 1.0], [1, 2]))
    assert all(r.cfg.optim.lr == 1e-4 and r.run_dir == tmp_path / r.name for r in runs)
    assert runs[0].name == "llama1b_aug-last-0.0-s1" and runs[-1].name == "llama1b_aug-all-1.0-s2"
    # a value shared by two grid keys would make `1.0-1.0` ambiguous: names carry the key then
    runs = expand(["llama1b_aug"], [7], parse_grid(["eviction.lam=0.0,1.0", "loss.alpha_kv=1.0,2.0"]))
    assert [r.name for r in runs][1] == "llama1b_aug-lam_0.0-alpha_kv_2.0-s7"
    assert split_list("a,[b,c],{d: 1, e: 2}") == ["a", "[b,c]", "{d: 1, e: 2}"]
    runs = expand(["tiny_synth"], [1], parse_grid(["run.log=[jsonl],[jsonl,stdout]"]))
    assert [r.cfg.run.log for r in runs] == [["jsonl"], ["jsonl", "stdout"]]


def test_invalid_value_fails_whole_sweep_before_running(tmp_path, no_train, capsys):
    out = tmp_path / "runs"
    # the bad value is the *last* combination: nothing may have run before the error
    rc = main(["sweep", "--configs", "tiny_synth", "--seeds", "1,2", "--grid", "eviction.lam=0.5,2.0",
               "--output-dir", str(out)])
    assert rc == 2 and "eviction.lam" in capsys.readouterr().err
    assert no_train == [] and not out.exists()
    assert main(["sweep", "--configs", "tiny_synth", "--set", "optim.lrr=1", "--output-dir", str(out)]) == 2
    assert "optim.lrr" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="run.seed"):
        expand(["tiny_synth"], [1], fixed=["run.seed=3"])
    with pytest.raises(ConfigError, match="unknown preset"):
        expand(["no_such_preset"], [1])


# ------------------------------------------------------------------------------------------------ statuses
def _fake_dirs(tmp_path):
    runs = expand(["tiny_synth"], [1, 2, 3, 4], fixed=TINY, output_dir=str(tmp_path))
    done, ckpt, none, started = runs
    for r in (done, ckpt, started):
        r.run_dir.mkdir(parents=True)
        save_config(r.cfg, r.run_dir / "config.yaml")
    (done.run_dir / "DONE").write_text("{}")
    (ckpt.run_dir / "checkpoints" / "step_5").mkdir(parents=True)
    (ckpt.run_dir / "checkpoints" / "step_5" / "state.json").write_text("{}")
    return runs


def test_dry_run_statuses_and_local_actions(tmp_path, no_train, capsys, monkeypatch):
    runs = _fake_dirs(tmp_path)
    argv = ["sweep", "--configs", "tiny_synth", "--seeds", "1,2,3,4", "--output-dir", str(tmp_path)]
    argv += [x for o in TINY for x in ("--set", o)]
    assert main(argv + ["--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    status = {ln.split()[0]: ln.split()[1] for ln in lines[:4]}
    assert status == {"tiny_synth-s1": "done", "tiny_synth-s2": "resume", "tiny_synth-s3": "new",
                      "tiny_synth-s4": "restart"}
    assert "optim.max_steps=3" in lines[0] and "run.seed=1" in lines[0]
    assert lines[4].endswith("1 done, 1 resume, 1 restart, 1 new")
    assert no_train == []

    evals = []
    monkeypatch.setattr("kava.evaluate.evaluate_run", lambda run_dir, names, **kw: evals.append((run_dir, names)))
    result = run_local(runs, eval_datasets=["synth-test"])
    assert result == {"tiny_synth-s1": "skipped", "tiny_synth-s2": "done", "tiny_synth-s3": "done",
                      "tiny_synth-s4": "done"}
    assert no_train == [("tiny_synth-s2", runs[1].run_dir), ("tiny_synth-s3", None), ("tiny_synth-s4", None)]
    assert not runs[3].run_dir.exists()  # the start without a checkpoint was cleared for `train`
    assert [Path(d).name for d, _ in evals] == [r.name for r in runs]  # done runs get their missing eval too

    # resuming a run whose saved config differs would silently change it: refused, naming the key
    cfg = load_config(str(runs[1].run_dir / "config.yaml"), ["optim.lr=0.5"])
    save_config(cfg, runs[1].run_dir / "config.yaml")
    assert main(argv + ["--dry-run"]) == 2
    assert "optim.lr" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ SLURM
def _sbatch_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("#SBATCH")]


def _fake_bin(tmp_path: Path) -> Path:
    """torchrun / srun / python record their argv (one per line); scontrol lists more hosts than a pipe
    buffer holds, so `| head -n1` cuts it off by SIGPIPE as it can on a large allocation."""
    b = tmp_path / "bin"
    if b.exists():
        return b
    b.mkdir()
    for name in ("torchrun", "srun", "python"):
        (b / name).write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > "$REC/{name}"\n')
    (b / "scontrol").write_text('#!/bin/bash\nprintf "node%05d\\n" $(seq 1 20000)\n')
    for p in b.iterdir():
        p.chmod(0o755)
    return b


def _run_script(script: Path, tmp_path: Path, env: dict) -> dict[str, list[str]]:
    rec = tmp_path / "rec"
    rec.mkdir(exist_ok=True)
    for p in rec.iterdir():
        p.unlink()
    e = {**os.environ, **env, "REC": str(rec), "PATH": f"{_fake_bin(tmp_path)}:{os.environ['PATH']}"}
    res = subprocess.run(["bash", str(script)], env=e, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    return {p.name: p.read_text().splitlines() for p in rec.iterdir()}


def _kava_args(argv: list[str]) -> list[str]:
    i = argv.index("-m")
    assert argv[i + 1] == "kava.cli"
    return argv[i + 2:]


def test_slurm_single_node(tmp_path, capsys):
    out, sd = tmp_path / "runs", tmp_path / "scripts"
    done = out / "qwen05b_aug-s42"
    done.mkdir(parents=True)
    (done / "DONE").write_text("{}")
    rc = main(["sweep", "--configs", "llama1b_aug,qwen05b_aug", "--seeds", "42", "--slurm", "--script-dir", str(sd),
               "--partition", "gpu", "--nodes", "1", "--gpus-per-node", "4", "--cpus-per-task", "32", "--time", "12:00:00",
               "--output-dir", str(out), "--set", "optim.lr=1e-4", "--eval-datasets", "gsm8k,svamp", "--hub",
               "--env-setup", "true"])
    assert rc == 0, capsys.readouterr().out
    scripts = sorted(sd.glob("*.sbatch"))
    assert [p.name for p in scripts] == ["llama1b_aug-s42.sbatch"]  # the DONE run gets no script
    text = scripts[0].read_text()
    assert _sbatch_lines(text) == [
        "#SBATCH --job-name=llama1b_aug-s42", "#SBATCH --partition=gpu", "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4", "#SBATCH --cpus-per-task=32",
        "#SBATCH --time=12:00:00", f"#SBATCH --output={(sd / 'logs').resolve()}/llama1b_aug-s42-%j.out"]
    lines = [ln.strip() for ln in text.splitlines()]
    assert 'torchrun --standalone --nproc_per_node 4 -m kava.cli train "${TRAIN_ARGS[@]}"' in lines
    assert 'python -m kava.cli eval --checkpoint "$RUN_DIR" --datasets gsm8k,svamp --hub' in lines
    assert "srun" not in text and "MASTER_ADDR" not in text
    assert (sd / "logs").is_dir()
    submit = (sd / "submit_all.sh").read_text()
    assert [ln for ln in submit.splitlines() if ln.startswith("sbatch")] == ["sbatch llama1b_aug-s42.sbatch"]
    for p in scripts + [sd / "submit_all.sh"]:
        subprocess.run(["bash", "-n", str(p)], check=True)

    # run it with a fake torchrun: the arguments rebuild exactly the planned config
    (run,) = expand(["llama1b_aug"], [42], fixed=["optim.lr=1e-4"], output_dir=str(out))
    rec = _run_script(scripts[0], tmp_path, {})
    assert rec["torchrun"][:4] == ["--standalone", "--nproc_per_node", "4", "-m"]
    args = build_parser().parse_args(_kava_args(rec["torchrun"]))
    assert args.command == "train" and args.no_progress
    assert load_config(args.config, args.overrides).to_dict() == run.cfg.to_dict()
    assert rec["python"] == ["-m", "kava.cli", "eval", "--checkpoint", str(run.run_dir.resolve()),
                             "--datasets", "gsm8k,svamp", "--hub"]
    # a requeued job with a checkpoint resumes; a finished one launches nothing
    (run.run_dir / "checkpoints" / "step_10").mkdir(parents=True)
    (run.run_dir / "checkpoints" / "step_10" / "state.json").write_text("{}")
    rec = _run_script(scripts[0], tmp_path, {})
    assert _kava_args(rec["torchrun"]) == ["train", "--resume", str(run.run_dir.resolve()), "--no-progress"]
    (run.run_dir / "DONE").write_text("{}")
    assert "torchrun" not in _run_script(scripts[0], tmp_path, {})


def test_slurm_multi_node(tmp_path, capsys):
    sd = tmp_path / "scripts"
    rc = main(["sweep", "--configs", "llama1b_aug", "--seeds", "42,123", "--slurm", "--script-dir", str(sd),
               "--nodes", "2", "--gpus-per-node", "2", "--cpus-per-task", "16", "--time", "2-00:00:00",
               "--output-dir", str(tmp_path / "runs"), "--env-setup", "true"])
    assert rc == 0, capsys.readouterr().out
    scripts = sorted(sd.glob("*.sbatch"))
    assert [p.name for p in scripts] == ["llama1b_aug-s123.sbatch", "llama1b_aug-s42.sbatch"]
    text = scripts[1].read_text()
    assert "#SBATCH --nodes=2" in text and "#SBATCH --gpus-per-node=2" in text and "#SBATCH --cpus-per-task=16" in text
    assert "#SBATCH --time=2-00:00:00" in text and "#SBATCH --job-name=llama1b_aug-s42" in text
    assert "#SBATCH --partition" not in text  # not given: the cluster's default
    lines = [ln.strip() for ln in text.splitlines()]
    assert 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in lines
    assert ("srun --nodes $SLURM_NNODES --ntasks-per-node 1 --cpus-per-task $SLURM_CPUS_PER_TASK torchrun "
            "--nnodes $SLURM_NNODES --nproc_per_node 2 --rdzv_backend c10d --rdzv_endpoint $MASTER_ADDR:29500 "
            '--rdzv_id $SLURM_JOB_ID -m kava.cli train "${TRAIN_ARGS[@]}"') in lines
    assert "eval" not in text  # no --eval-datasets
    for p in scripts + [sd / "submit_all.sh"]:
        subprocess.run(["bash", "-n", str(p)], check=True)
    rec = _run_script(scripts[1], tmp_path, {"SLURM_NNODES": "2", "SLURM_JOB_ID": "777",
                                             "SLURM_JOB_NODELIST": "node[001-002]", "SLURM_CPUS_PER_TASK": "16"})
    assert rec["srun"][:17] == ["--nodes", "2", "--ntasks-per-node", "1", "--cpus-per-task", "16", "torchrun",
                                "--nnodes", "2", "--nproc_per_node", "2", "--rdzv_backend", "c10d",
                                "--rdzv_endpoint", "node00001:29500", "--rdzv_id", "777"]
    assert _kava_args(rec["srun"])[:3] == ["train", "--config", "llama1b_aug"]
    # 128 = effective batch; micro 32 x 8 GPUs does not divide it: refused before writing anything
    rc = main(["sweep", "--configs", "llama1b_aug", "--seeds", "1", "--slurm", "--script-dir", str(tmp_path / "x"),
               "--nodes", "2", "--gpus-per-node", "4"])
    assert rc == 2 and "optim.effective_batch" in capsys.readouterr().err and not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------ local, for real
def test_local_tiny_sweep_then_skip(tmp_path, capsys, monkeypatch):
    data = tmp_path / "evaldata"
    data.mkdir()
    rows = [{"question": "Ivy has 3 buttons. She finds 4 more. How many?", "steps_eq": ["<<3+4=7>>"], "answer": "7"},
            {"question": "Tom has 5 apples and eats 2. How many?", "steps_eq": ["<<5-2=3>>"], "answer": "3"}]
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["sweep", "--configs", "tiny_synth", "--seeds", "1,2", "--output-dir", str(tmp_path / "runs"),
            "--no-progress", "--eval-datasets", "synth-test", "--data-dir", str(data)]
    argv += [x for o in TINY + ["run.eval_max_cot_tokens=8"] for x in ("--set", o)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "2 trained, 0 already done, 0 failed" in out
    for seed in (1, 2):
        rd = tmp_path / "runs" / f"tiny_synth-s{seed}"
        assert (rd / "DONE").exists() and (rd / "final" / "model").is_dir()
        assert load_config(str(rd / "config.yaml")).run.seed == seed
        assert json.loads((rd / "eval" / "synth-test" / "summary.json").read_text())["count"] == 2

    def boom(*a, **k):
        raise AssertionError("a DONE run was trained again")

    monkeypatch.setattr("kava.train.train", boom)
    monkeypatch.setattr("kava.evaluate.evaluate_run", boom)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "0 trained, 2 already done, 0 failed" in out and out.count(": done") == 2


def _fake_hub(root: Path) -> Path:
    """A stand-in `datasets` package (first on PYTHONPATH) whose `load_dataset` serves rows from local files:
    the hub, offline, at its API boundary."""
    pkg = root / "fakehub" / "datasets"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "import json, os\n"
        "class Dataset(list):\n"
        "    column_names = []\n"
        "def load_dataset(name, config=None, split=None):\n"
        "    path = os.path.join(os.environ['FAKE_HUB'], name.replace('/', '__') + '.jsonl')\n"
        "    return Dataset(json.loads(x) for x in open(path))\n")
    rows = {"openai__gsm8k": [{"question": "Tom has 3 apples . He buys 4 more . How many ?",
                               "answer": "<<3+4=7>>\n#### 7"}, {"question": "Tom has 5 .", "answer": "#### 5"}],
            "ChilleD__SVAMP": [{"Body": "Tom has 12 apples", "Question": "He gives away 2 . How many ?", "Answer": 10.0}]}
    for name, rs in rows.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    return root / "fakehub"


def test_readme_sweep_runs_end_to_end(tmp_path, capsys):
    """The README's sweep on a tiny config, for real: `kava sweep ... --eval-datasets gsm8k,svamp --hub --slurm`
    writes the job script; running it (torchrun's stand-in runs `python -m kava.cli` itself, one process)
    trains the run and evaluates it on both sets from the hub (served offline). Without --hub or --data-dir, and
    no ./data, the sweep refuses before anything is written."""
    import sys

    import kava

    out, sd = tmp_path / "runs", tmp_path / "scripts"
    base = ["sweep", "--configs", "tiny_synth", "--seeds", "42", "--eval-datasets", "gsm8k,svamp", "--slurm",
            "--partition", "gpu", "--gpus-per-node", "1", "--nodes", "1", "--time", "1:00:00", "--script-dir",
            str(sd), "--output-dir", str(out), "--env-setup", "true", "--set", "run.eval_max_cot_tokens=4",
            "--set", "run.eval_max_new_tokens=2", *[x for o in TINY for x in ("--set", o)]]
    cwd = os.getcwd()
    os.chdir(tmp_path)  # no ./data here
    try:
        assert main(base) == 2
        err = capsys.readouterr().err
        assert "--eval-datasets: gsm8k: data/gsm8k/test.jsonl" in err and "give --data-dir DIR" in err and "--hub" in err
        assert not sd.exists()
        assert main(base + ["--hub"]) == 0
    finally:
        os.chdir(cwd)
    (script,) = sd.glob("*.sbatch")
    b = tmp_path / "bin"
    b.mkdir()
    (b / "torchrun").write_text('#!/bin/bash\nwhile [ "$1" != "-m" ]; do shift; done\nshift 2\nexec "$PY" -m kava.cli "$@"\n')
    (b / "python").write_text('#!/bin/bash\nexec "$PY" "$@"\n')
    for p in b.iterdir():
        p.chmod(0o755)
    src = str(Path(kava.__file__).parents[1])
    env = {**os.environ, "PY": sys.executable, "PATH": f"{b}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{_fake_hub(tmp_path / 'hub')}:{src}", "FAKE_HUB": str(tmp_path / "hub")}
    res = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    run = out / "tiny_synth-s42"
    assert (run / "DONE").exists()
    for name, n in (("gsm8k", 2), ("svamp", 1)):
        s = json.loads((run / "eval" / name / "summary.json").read_text())
        assert s["count"] == n and "hub" in s["description"]
    assert "gsm8k: accuracy" in res.stdout and "svamp: accuracy" in res.stdout
