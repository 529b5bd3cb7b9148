"""Shared pytest fixtures."""

from __future__ import annotations

import os
import sys
import warnings
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


# ------------------------------------------------------------------------------------------------ warnings
# A deprecation that kava's own code triggers is an error in the tests. pyproject's filterwarnings handles the
# warnings attributed to a kava module; but a library's deprecation helper usually attributes its warning to
# the library's own caller (transformers' `deprecate_kwarg` reports `torch.nn.Module.__call__` for a kava
# call that passes `past_key_values=`), which no module filter can see. So each test also checks the stack of
# every FutureWarning / DeprecationWarning as it is shown: a kava frame on it means kava made the call.
STRICT_CATEGORIES = (FutureWarning, DeprecationWarning)


def kava_caller(frame) -> str | None:
    """The innermost kava module on the stack above `frame`, None if there is none or if an import is in
    between (a library's import-time warning is not a call kava made)."""
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if name == "kava" or name.startswith("kava."):
            return name
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return None
        frame = frame.f_back
    return None


def strict_showwarning(shown):
    """A `warnings.showwarning` that raises a FutureWarning / DeprecationWarning with a kava caller and hands
    every other warning to `shown` (same signature)."""

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, STRICT_CATEGORIES):
            caller = kava_caller(sys._getframe(1))
            if caller is not None:
                raise category(f"{message} [{category.__name__} triggered by a call from {caller}; "
                               f"reported at {filename}:{lineno}]")
        shown(message, category, filename, lineno, file, line)

    return showwarning


@pytest.fixture(autouse=True)
def _kava_deprecations_are_errors():
    with warnings.catch_warnings():  # restores the filters and `showwarning` after the test
        for cat in STRICT_CATEGORIES:  # every occurrence reaches showwarning (not only the first per place)
            warnings.filterwarnings("always", category=cat)
        # pytest's recorder (or Python's printer under -p no:warnings) still gets all the others
        warnings.showwarning = strict_showwarning(warnings.showwarning)
        yield
