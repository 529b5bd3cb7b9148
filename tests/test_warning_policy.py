"""The test suite's warning policy (tests/conftest.py, pyproject filterwarnings).

A FutureWarning or DeprecationWarning is an error when a call of kava's triggered it: the warning is
attributed to a kava frame, or to torch's module dispatch right above a kava frame (transformers'
`deprecate_kwarg` blames `Module._call_impl`), or the deprecated code blames itself and kava called it.
A deprecation that one library triggers in another under a kava call, and one emitted while a library is
imported, pass.
"""

from __future__ import annotations

import importlib
import re
import sys
import types
import warnings

import pytest
import torch

from conftest import kava_call_site, strict_showwarning

LIB = '''
import warnings
import torch


def old_api():  # blames its caller, as deprecation helpers do
    warnings.warn("old_api is deprecated", FutureWarning, stacklevel=2)


def old_dep():
    warnings.warn("old_dep is deprecated", DeprecationWarning, stacklevel=2)


class Thing:
    @property
    def old_prop(self):  # blames itself (stacklevel=1), as transformers' is_gradient_checkpointing does
        warnings.warn("old_prop is deprecated", FutureWarning)
        return 1


class Layer(torch.nn.Module):  # a deprecated forward kwarg: the caller is torch's Module.__call__
    def forward(self, x, old_kw=None):
        if old_kw is not None:
            warnings.warn("old_kw is deprecated", FutureWarning, stacklevel=2)
        return x


def internal():  # the library calling its own deprecated API
    return old_api()


def reads_prop(t):
    return t.old_prop
'''


def _module(name: str, src: str) -> types.ModuleType:
    mod = types.ModuleType(name)
    exec(compile(src, f"<{name}>", "exec"), mod.__dict__)
    return mod


lib = _module("fakelib", LIB)
probe = _module("kava._probe", "def call(f, *a, **k):\n    return f(*a, **k)\n")  # a frame of a kava module


def _run_under_hook(fn) -> tuple[list[str], object]:
    """fn under the conftest hook with a recorder behind it: (warnings handed on, fn's result)."""
    seen: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = strict_showwarning(lambda msg, cat, *a: seen.append(f"{cat.__name__}: {msg}"))
        out = fn()
    return seen, out


@pytest.mark.parametrize("call, cat, msg", [
    (lambda: probe.call(lib.old_api), FutureWarning, "old_api"),
    (lambda: probe.call(lib.old_dep), DeprecationWarning, "old_dep"),
    (lambda: probe.call(lib.Layer(), torch.ones(1), old_kw=1), FutureWarning, "old_kw"),
    (lambda: probe.call(getattr, lib.Thing(), "old_prop"), FutureWarning, "old_prop"),
], ids=["blames-kava", "deprecation-warning", "through-module-dispatch", "self-blaming-property"])
def test_a_deprecation_that_kava_triggers_is_an_error(call, cat, msg):
    with pytest.raises(cat, match=rf"{msg} is deprecated \[{cat.__name__} triggered by a call from kava\._probe"):
        _run_under_hook(call)


def test_the_autouse_fixture_applies_it_to_every_test():
    with pytest.raises(FutureWarning, match=r"triggered by a call from kava\._probe; reported at <kava\._probe>"):
        probe.call(lib.old_api)


@pytest.mark.parametrize("call, msg", [
    (lambda: lib.old_api(), "old_api"),  # no kava frame at all
    (lambda: probe.call(lib.internal), "old_api"),  # the library's own call, under a kava call
    (lambda: probe.call(lib.reads_prop, lib.Thing()), "old_prop"),  # another library reads the property
], ids=["no-kava-frame", "library-internal", "library-reads-property"])
def test_a_deprecation_that_another_library_triggers_passes(call, msg):
    seen, _ = _run_under_hook(call)
    assert seen == [f"FutureWarning: {msg} is deprecated"]  # handed on to pytest's recorder, not raised


def test_other_categories_pass_even_from_kava():
    seen, _ = _run_under_hook(lambda: probe.call(warnings.warn, "just so you know", UserWarning))
    assert seen == ["UserWarning: just so you know"]


def test_a_warning_emitted_while_importing_a_library_is_not_kavas(tmp_path, monkeypatch):
    (tmp_path / "warns_on_import_xyz.py").write_text(
        "import warnings\nwarnings.warn('module-level deprecation', DeprecationWarning)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen, mod = _run_under_hook(lambda: probe.call(importlib.import_module, "warns_on_import_xyz"))
    sys.modules.pop("warns_on_import_xyz")
    assert mod.__name__ == "warns_on_import_xyz" and seen == ["DeprecationWarning: module-level deprecation"]


def test_kava_call_site_without_a_kava_frame_is_none():
    f = sys._getframe()
    assert kava_call_site(f, f.f_code.co_filename, f.f_lineno) is None


def test_pyproject_makes_warnings_attributed_to_kava_errors(pytestconfig):
    lines = pytestconfig.getini("filterwarnings")
    assert "error::FutureWarning:kava(\\..*)?$" in lines and "error::DeprecationWarning:kava(\\..*)?$" in lines
    pat = re.compile(r"kava(\..*)?$")
    assert pat.match("kava") and pat.match("kava.model.reasoner") and not pat.match("kavalier")
