"""The library does not import the CLI layer: importing any module of kava except `kava.cli` and
`kava.commands.*` (and calling what `kava demo` / `kava sweep` call) leaves `kava.commands` unloaded."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import kava

SRC = Path(kava.__file__).resolve().parents[1]


def library_modules() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages([str(SRC / "kava")], prefix="kava.")]
    return sorted(n for n in ["kava", *names] if n != "kava.cli" and not n.startswith("kava.commands"))


PROBE = """
import importlib, json, sys
bad = {}
for name in json.loads(sys.argv[1]):
    importlib.import_module(name)
    cli = sorted(m for m in sys.modules if m == "kava.cli" or m.startswith("kava.commands"))
    if cli:
        bad[name] = cli
        break
print(json.dumps(bad))
"""


def test_the_walk_finds_the_library_and_leaves_out_the_cli():
    mods = library_modules()
    for name in ("kava.train", "kava.evaluate", "kava.tools.demo", "kava.tools.sweep", "kava.api", "kava.model.reasoner",
                 "kava.data.pipeline", "kava.training.progress"):
        assert name in mods
    assert "kava.cli" not in mods and not [m for m in mods if m.startswith("kava.commands")]
    on_disk = {p.stem for p in (SRC / "kava").glob("*.py")} - {"__init__", "cli"}
    assert {m.split(".")[1] for m in mods if m.count(".") == 1} >= on_disk


def test_no_library_module_imports_the_cli_layer():
    r = subprocess.run([sys.executable, "-c", PROBE, json.dumps(library_modules())], capture_output=True, text=True,
                       env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {}


def test_demo_and_sweep_evaluate_through_the_library(monkeypatch, tmp_path):
    """The functions `run_demo` and `run_local` call at run time (lazily imported) come from the library:
    after a sweep that evaluates, `kava.commands` is still not loaded in a fresh interpreter."""
    code = f"""
import sys
import kava.evaluate, kava.tools.sweep
calls = []
kava.evaluate.evaluate_run = lambda run_dir, names, **kw: calls.append(names)
import kava.train
kava.train.train = lambda cfg, resume=None, **kw: None
from kava.tools.sweep import expand, run_local
runs = expand(["tiny_synth"], [1], [], output_dir={str(tmp_path)!r})
run_local(runs, eval_datasets=["synth-test"], progress=False)
assert calls == [["synth-test"]], calls
print(sorted(m for m in sys.modules if m.startswith("kava.commands") or m == "kava.cli"))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"
