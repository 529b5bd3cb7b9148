"""experiments/devicekit.py: a file split into pieces, stashed piece by piece and joined is the same file; a
missing or damaged piece is refused by name."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest


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
