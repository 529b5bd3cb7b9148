"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared data root. Data files are read in place (never copied into the repo): $KAVA_DATA_DIR,
    default /work/shared/data."""
    repo = Path(__file__).resolve().parents[1]
    candidates = [os.environ.get("KAVA_DATA_DIR"), repo.parent / "shared" / "data", "/work/shared/data"]
    d = next((Path(c) for c in candidates if c and Path(c).is_dir()), Path(candidates[1]))
    if not d.is_dir():
        pytest.skip(f"data directory {d} not found; set KAVA_DATA_DIR to the shared data folder")
    return d


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run fastest single-threaded, and CI machines are shared: avoid thread oversubscription."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
