"""experiments/devicekit.py: a file split into pieces, stashed piece by piece and joined is the same file; a
missing or damaged piece is refused by name. experiments/devicekit.sh, the shell steps the studies' device scripts
share: every device script parses; the wait, the pack, the frozen source copy, the revision record, the carry
exclusion (also from a worktree) and the MPS start (with a stand-in daemon) do what the scripts rely on."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KIT_SH = REPO / "experiments" / "devicekit.sh"
DEVICE_SCRIPTS = sorted(REPO.glob("experiments/**/*.sh")) + sorted(REPO.glob("benchmarks/*.sh"))


def devicekit():
    path = Path(__file__).resolve().parents[1] / "experiments" / "devicekit.py"
    spec = importlib.util.spec_from_file_location("devicekit", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_split_stash_join_round_trip(tmp_path):
    dk = devicekit()
    data = os.urandom(1_000_003)
    f = tmp_path / "model.gguf"
    f.write_bytes(data)
    exclude = tmp_path / "exclude"
    m = dk.split(f, tmp_path / ".carry" / "m", piece_bytes=300_000, exclude=exclude)
    assert [p["size"] for p in m["pieces"]] == [300_000, 300_000, 300_000, 100_003]
    assert exclude.read_text() == "/.carry/\n"
    dk.split(f, tmp_path / ".carry" / "m", piece_bytes=300_000, exclude=exclude)  # idempotent
    assert exclude.read_text() == "/.carry/\n"
    stash = tmp_path / "stash"
    left = [dk.stash(tmp_path / ".carry" / "m" / f"p{k:02d}", stash) for k in (2, 0, 3)]
    assert left[-1] == ["model.gguf.01"]  # what a later call still has to carry
    with pytest.raises(SystemExit, match="1 of 4 pieces missing.*model.gguf.01"):
        dk.join(stash, tmp_path / "out" / "model.gguf")
    dk.stash(tmp_path / ".carry" / "m" / "p01", stash)
    out = dk.join(stash, tmp_path / "out" / "model.gguf")
    assert out.read_bytes() == data and not (tmp_path / "out" / "model.gguf.part").exists()
    piece = stash / "model.gguf.02"
    piece.write_bytes(b"x" + piece.read_bytes()[1:])  # same size, other bytes
    with pytest.raises(SystemExit, match="model.gguf.02: damaged"):
        dk.join(stash, tmp_path / "again.gguf")


def test_default_pieces_fit_beside_the_tree(tmp_path):
    """Every piece plus the tree a call always carries stays under the call's limit, in as few even pieces as fit;
    the tree is counted from git (tracked and untracked-not-ignored files, not ignored ones)."""
    dk = devicekit()
    size = 180_715_520  # a resume state of the 2-layer multiplication model
    for tree in (0, 15_000_000, 19_337_598, 40_000_000):
        piece = dk.piece_bytes_for(size, tree)
        n = -(-size // piece)
        assert tree + piece + dk.SPARE_BYTES <= dk.CARRY_BYTES
        assert n == -(-size // (dk.CARRY_BYTES - tree - dk.SPARE_BYTES))  # no more pieces than needed
        assert piece * (n - 1) < size <= piece * n  # even: the last piece is not a sliver
    with pytest.raises(SystemExit, match="no room"):
        dk.piece_bytes_for(size, dk.CARRY_BYTES)
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / ".gitignore").write_text("big/\n")
    (repo / "a.txt").write_bytes(b"x" * 1000)
    (repo / "big").mkdir()
    (repo / "big" / "w.bin").write_bytes(b"y" * 50_000)
    assert dk.tree_bytes(repo) == 1000 + len("big/\n")


# ------------------------------------------------------------------------------------------ devicekit.sh
def kit(script: str, cwd: Path, tmp_path: Path, **env) -> subprocess.CompletedProcess:
    """`script` run by bash with experiments/devicekit.sh sourced, as the device scripts run it (`set -uo
    pipefail`); `python3` is this interpreter (the device's python3 has kava's dependencies)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    py = bin_dir / "python3"
    py.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    py.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", **env}
    return subprocess.run(["bash", "-c", f'set -uo pipefail; source "{KIT_SH}"; {script}'], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("script", DEVICE_SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_device_script_parses(script):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("script", ["experiments/smollm2/gpu.sh", "experiments/multiplication/gpu.sh"])
def test_study_script_finds_the_kit_from_any_directory(script, tmp_path):
    """The kit is sourced next to the script, not from the working directory: a wrong verb reaches the usage line."""
    r = subprocess.run(["bash", str(REPO / script), "no-such-verb"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 2 and "usage:" in r.stdout and "devicekit.sh" not in r.stderr, r.stdout + r.stderr


def test_gsm8k_script_carries_either_model_in_pieces(tmp_path):
    """experiments/smollm2/gpu.sh `piece`: each call's carried piece of MODEL's file lands in ROOT/stash/MODEL,
    saying what is still missing; the pieces then join into the file. An unknown MODEL is refused by name."""
    dk = devicekit()
    data = os.urandom(250_000)
    f = tmp_path / "qwen2.5-coder-0.5b-instruct.gguf"
    f.write_bytes(data)
    carry, root = tmp_path / "carry", tmp_path / "root"
    m = dk.split(f, carry / "qwen05", piece_bytes=100_000, exclude=None)
    env = {**os.environ, "MODEL": "qwen05", "CARRY": str(carry), "SMOL_ROOT": str(root)}
    said = []
    for p in m["pieces"]:
        r = subprocess.run(["bash", str(REPO / "experiments/smollm2/gpu.sh"), "piece", f"p{p['file'][-2:]}"],
                           cwd=REPO, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        said.append(r.stdout.strip().rsplit("still missing: ", 1)[1])
    assert said[-1] == "none" and said[0].count(".gguf.") == 2
    assert dk.join(root / "stash" / "qwen05", tmp_path / "out.gguf").read_bytes() == data
    r = subprocess.run(["bash", str(REPO / "experiments/smollm2/gpu.sh"), "piece", "p00"], cwd=REPO,
                       env={**env, "MODEL": "llama"}, capture_output=True, text=True)
    assert r.returncode == 2 and "MODEL: llama; allowed values: smollm2, qwen05" in r.stdout


def test_wait_done_returns_at_all_done_or_when_the_time_is_up(tmp_path):
    log = tmp_path / "driver.log"
    log.write_text('{"event": "start"}\n')
    t = time.time()  # `date +%s` counts whole seconds: 2 of them are more than 1 s and at most 2 s
    assert kit(f"dk_wait_done {log} 2", tmp_path, tmp_path, DK_POLL_S="0.2").returncode == 0
    assert 0.9 <= time.time() - t < 10
    log.write_text('{"event": "start"}\n{"event": "all done", "wall_s": 3}\n')
    t = time.time()
    assert kit(f"dk_wait_done {log} 60", tmp_path, tmp_path).returncode == 0
    assert time.time() - t < 10


@pytest.mark.parametrize("driver,verb", [("multiplication", "pack"), ("smollm2", "collect")])
def test_pack_brings_back_the_small_files_and_no_weights(tmp_path, driver, verb):
    """The device side of a study: the frozen source copy (ROOT/src/kava, ROOT/driver.py), then the pack of ROOT/out
    with the driver's own filter: logs, configs, metrics and evaluations come back; weights do not."""
    root, back = tmp_path / "root", tmp_path / "back"
    back.mkdir()
    r = kit(f"dk_freeze_source {root} experiments/{driver}/driver.py", REPO, tmp_path)
    assert r.returncode == 0, r.stderr
    assert (root / "src" / "kava" / "__init__.py").exists()
    assert (root / "driver.py").read_text() == (REPO / "experiments" / driver / "driver.py").read_text()
    run = root / "out" / "runs" / "cot4-s42"
    files = {"config.yaml": "method: cot\n", "metrics.jsonl": "{}\n", "meta.json": "{}",
             "eval/mult4-test/summary.json": "{}", "best/model/adapter_model.safetensors": "weights",
             "checkpoints/step_4/model.safetensors": "weights"}
    for rel, text in files.items():
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text(text)
    (root / "out" / "logs").mkdir()
    (root / "out" / "logs" / "cot4-s42.log").write_text("[kava] step 4/12\n")
    (root / "driver.log").write_text('{"event": "all done"}\n')
    r = kit(f"dk_pack {root} {verb}", tmp_path, tmp_path, OUT=str(back))
    assert r.returncode == 0, r.stdout + r.stderr
    with tarfile.open(back / "results.tgz") as tar:
        names = set(tar.getnames())
    assert {"driver.log", "logs/cot4-s42.log", "runs/cot4-s42/config.yaml", "runs/cot4-s42/metrics.jsonl",
            "runs/cot4-s42/eval/mult4-test/summary.json"} <= names, names
    assert not [n for n in names if n.endswith(".safetensors")], names


def test_pack_needs_the_output_folder(tmp_path):
    r = kit(f"dk_pack {tmp_path} pack", tmp_path, tmp_path, OUT="")
    assert r.returncode != 0 and "set OUT" in r.stderr


def test_revision_records_the_commit_and_the_changes(tmp_path):
    r = kit(f"dk_revision {tmp_path / 'revision'}", REPO, tmp_path)
    assert r.returncode == 0, r.stderr
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert (tmp_path / "revision").read_text().splitlines()[0] == head


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_ignore_carry_once_also_from_a_worktree(tmp_path):
    repo, wt = tmp_path / "repo", tmp_path / "wt"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], cwd=repo, check=True)
    subprocess.run([*git, "worktree", "add", "-q", str(wt)], cwd=repo, check=True, capture_output=True)
    for cwd in (repo, wt, wt):
        r = kit("dk_ignore_carry", cwd, tmp_path)
        assert r.returncode == 0, r.stderr
    lines = (repo / ".git" / "info" / "exclude").read_text().splitlines()
    assert lines.count("/.carry/") == 1
    (wt / ".carry").mkdir()
    (wt / ".carry" / "piece").write_text("x")
    status = subprocess.run(["git", "status", "--porcelain"], cwd=wt, capture_output=True, text=True).stdout
    assert ".carry" not in status


def stand_in_mps(tmp_path: Path) -> Path:
    """A stand-in `nvidia-cuda-mps-control` that records how it was called (-d: start; stdin `quit`: stop)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls = tmp_path / "mps_calls"
    tool = bin_dir / "nvidia-cuda-mps-control"
    tool.write_text(f'#!/bin/sh\nif [ "$#" -gt 0 ]; then echo "$*" >> {calls}; else cat >> {calls}; fi\n')
    tool.chmod(0o755)
    return calls


def test_mps_start_keeps_the_daemon_when_every_client_works(tmp_path):
    calls = stand_in_mps(tmp_path)
    r = kit(f'dk_mps_start {tmp_path}/root 2 "print(42)" && echo "pipe=$CUDA_MPS_PIPE_DIRECTORY"', tmp_path,
            tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "MPS: on" in r.stdout and f"pipe={tmp_path}/root/mps/pipe" in r.stdout
    assert calls.read_text().split() == ["-d"]
    assert (tmp_path / "root" / "mps" / "client2.log").read_text().split() == ["42", "0"]


def test_mps_start_stops_the_daemon_when_a_client_fails(tmp_path):
    calls = stand_in_mps(tmp_path)
    r = kit(f'dk_mps_start {tmp_path}/root 2 "import sys; sys.exit(3)"; echo "rc=$? pipe=${{CUDA_MPS_PIPE_DIRECTORY:-}}"',
            tmp_path, tmp_path)
    assert "MPS: off (test failed)" in r.stdout and "rc=1 pipe=\n" in r.stdout + "\n", r.stdout + r.stderr
    assert calls.read_text().split() == ["-d", "quit"]


def test_mps_start_without_the_tool(tmp_path):
    if shutil.which("nvidia-cuda-mps-control"):
        pytest.skip("this machine has CUDA MPS")
    r = kit("dk_mps_start /nonexistent; echo rc=$?", tmp_path, tmp_path)
    assert "MPS: not available" in r.stdout and "rc=1" in r.stdout
