"""The test suite's warning policy (tests/conftest.py, pyproject filterwarnings): a FutureWarning or
DeprecationWarning is an error when a kava frame is on its stack, even when the library that warns
attributes it to one of its own frames; other libraries' warnings, and their import-time ones, pass."""

from __future__ import annotations

import importlib
import sys
import types
import warnings

import pytest

from conftest import kava_caller, strict_showwarning

LIB = '''
import warnings
def old_api():
    warnings.warn("old_api is deprecated", FutureWarning, stacklevel=2)  # blames the caller: relay
def old_dep():
    warnings.warn("old_dep is deprecated", DeprecationWarning, stacklevel=2)
def relay(f):
    return f()
'''


def _module(name: str, src: str) -> types.ModuleType:
    mod = types.ModuleType(name)
    exec(compile(src, f"<{name}>", "exec"), mod.__dict__)
    return mod


fakelib = _module("fakelib", LIB)
probe = _module("kava._probe", "def call(f):\n    return f()\n")  # a frame of a kava module


@pytest.mark.parametrize("fn, cat", [("old_api", FutureWarning), ("old_dep", DeprecationWarning)])
def test_a_library_warning_raised_under_a_kava_call_is_an_error(fn, cat):
    f = getattr(fakelib, fn)
    with pytest.raises(cat, match=r"triggered by a call from kava\._probe; reported at <fakelib>"):
        probe.call(lambda: fakelib.relay(f))


def _shown_by_the_hook(fn) -> tuple[list[str], object]:
    """Run fn under the conftest hook with a recorder behind it: (messages handed on, fn's result)."""
    seen: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = strict_showwarning(lambda msg, cat, *a: seen.append(f"{cat.__name__}: {msg}"))
        out = fn()
    return seen, out


def test_the_same_warning_without_a_kava_frame_passes():
    seen, _ = _shown_by_the_hook(lambda: fakelib.relay(fakelib.old_api))
    assert seen == ["FutureWarning: old_api is deprecated"]  # handed on to pytest's recorder, not raised
    assert kava_caller(sys._getframe()) is None


def test_other_categories_pass_even_under_a_kava_call():
    seen, _ = _shown_by_the_hook(lambda: probe.call(lambda: warnings.warn("just so you know", UserWarning)))
    assert seen == ["UserWarning: just so you know"]


def test_a_warning_emitted_while_importing_a_library_is_not_kavas(tmp_path, monkeypatch):
    (tmp_path / "warns_on_import_xyz.py").write_text(
        "import warnings\nwarnings.warn('module-level deprecation', DeprecationWarning)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen, mod = _shown_by_the_hook(lambda: probe.call(lambda: importlib.import_module("warns_on_import_xyz")))
    sys.modules.pop("warns_on_import_xyz")
    assert mod.__name__ == "warns_on_import_xyz" and seen == ["DeprecationWarning: module-level deprecation"]


def test_kava_caller_names_the_innermost_kava_frame():
    frames = []
    probe.call(lambda: frames.append(kava_caller(sys._getframe())))
    assert frames == ["kava._probe"]


def test_pyproject_makes_warnings_attributed_to_kava_errors(pytestconfig):
    lines = pytestconfig.getini("filterwarnings")
    assert "error::FutureWarning:kava(\\..*)?$" in lines and "error::DeprecationWarning:kava(\\..*)?$" in lines
    import re

    pat = re.compile(r"kava(\..*)?$")
    assert pat.match("kava") and pat.match("kava.model.reasoner") and not pat.match("kavalier")
