"""A non-editable install works: a wheel built from this tree, installed into a fresh venv, ships the presets.

The wheel is built offline from a copy of the tree (`pip wheel --no-deps --no-build-isolation`), installed
with `--no-deps --no-index` into a new venv, and the venv reaches the already installed dependencies through
a `.pth` line (a directory listed there is added to sys.path without running its own .pth files, so the
development install of kava stays invisible). Nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from kava.tools.presets import PAPER_TABLE

ROOT = Path(__file__).resolve().parents[1]


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def test_wheel_in_a_fresh_venv_lists_the_presets(tmp_path):
    src = tmp_path / "src_copy"
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, src / f)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(tmp_path / "dist"), str(src)], env=env)
    (wheel,) = (tmp_path / "dist").glob("kava_latent-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(n).stem for n in names if n.startswith("kava/configs/") and n.endswith(".yaml")}
    assert set(PAPER_TABLE) <= shipped

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        env=env)
    site = Path(run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    (site / "_kava_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch, yaml, ... as installed

    out = run([str(venv / "bin" / "kava"), "presets", "list"], cwd=tmp_path, env=env)
    listed = {ln.split()[0]: ln for ln in out.splitlines() if ln.strip()}
    for name in PAPER_TABLE:
        assert "paper preset" in listed[name], out
    assert len([ln for ln in listed.values() if "paper preset" in ln]) == 6
    where = run([str(py), "-c", "import kava.config as c; print(c.__file__); print(c.CONFIG_DIR)"], cwd=tmp_path,
                env=env).split()
    assert all(Path(w).is_relative_to(venv) for w in where), where  # the installed copy, not this tree

    # the installed command: its version is the package's, and the demo runs end to end (a few steps per stage)
    version = next(ln.split('"')[1] for ln in (ROOT / "pyproject.toml").read_text().splitlines()
                   if ln.startswith("version"))
    assert run([str(venv / "bin" / "kava"), "--version"], cwd=tmp_path, env=env).strip() == f"kava {version}"
    out = run([str(venv / "bin" / "kava"), "demo", "--output", str(tmp_path / "demo"), "--set", "optim.max_steps=2",
               "--eval-limit", "4", "--no-progress"], cwd=tmp_path, env=env, timeout=600)
    assert "KaVa with its latents zeroed" in out, out[-2000:]
