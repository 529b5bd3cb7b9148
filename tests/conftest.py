"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared data root. Data files are read in place (never copied into the repo): $KAVA_DATA_DIR,
    default /work/shared/data."""
    d = Path(os.environ.get("KAVA_DATA_DIR", "/work/shared/data"))
    if not d.is_dir():
        pytest.skip(f"data directory {d} not found; set KAVA_DATA_DIR to the shared data folder")
    return d
