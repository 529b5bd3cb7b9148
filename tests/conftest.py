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
# warnings attributed to a kava module. But a call of kava's often reaches the deprecated code through torch's
# module dispatch: transformers' `deprecate_kwarg` blames its caller, which for `decoder(past_key_values=...)`
# is `torch.nn.Module._call_impl`, not kava; no module filter sees that. So each test also checks every
# FutureWarning / DeprecationWarning as it is shown: the frame it is attributed to (the caller, when the
# library blames itself with stacklevel=1), past torch's dispatch frames, is kava's -> error. A deprecation
# that one library triggers in another (peft reading transformers' `is_gradient_checkpointing`), or that a
# library emits while being imported, is not kava's call and passes.
STRICT_CATEGORIES = (FutureWarning, DeprecationWarning)
DISPATCH = ("torch.nn.modules.module",)  # frames between a caller and the module it calls


def _module_of(frame) -> str:
    return frame.f_globals.get("__name__", "") or ""


def _is_kava(frame) -> bool:
    name = _module_of(frame)
    return name == "kava" or name.startswith("kava.")


def kava_call_site(frame, filename: str, lineno: int) -> str | None:
    """The kava module that made the call a warning reports, or None.

    frame: where the search starts (inside the warnings machinery is fine); filename, lineno: the place the
    warning is attributed to (what `showwarning` receives).
    """
    while frame is not None and (_module_of(frame) == "warnings" or frame.f_globals.get("__file__") == __file__):
        frame = frame.f_back  # the warnings module itself and this hook
    emitter = site = frame
    while site is not None and not (site.f_code.co_filename == filename and site.f_lineno == lineno):
        site = site.f_back
    if site is None:  # attributed past the top of the stack, or to a synthetic place
        site = emitter
    if site is None:
        return None
    if _is_kava(site):
        return _module_of(site)
    if site is emitter:  # stacklevel=1: the deprecated code blames itself; the call is its caller's
        site = site.f_back
    while site is not None and _module_of(site).startswith(DISPATCH):
        site = site.f_back
    return _module_of(site) if site is not None and _is_kava(site) else None


def strict_showwarning(shown):
    """A `warnings.showwarning` that raises a FutureWarning / DeprecationWarning that a kava call triggered
    (see `kava_call_site`) and hands every other warning to `shown` (same signature)."""

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, STRICT_CATEGORIES):
            caller = kava_call_site(sys._getframe(1), filename, lineno)
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
