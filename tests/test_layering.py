"""The shape of the house: every module sits on a floor (`FLOORS`) and imports only its own floor or those
below; no import circle, between modules or between folders; the library's kava imports sit at module top
(the one exception: `kava.load`, the lazy door that keeps `import kava` light); no private name crosses a
module. And the library does not import the CLI layer: importing any module of kava except `kava.cli` and
`kava.commands.*` (and calling what `kava demo` / `kava sweep` call) leaves `kava.commands` unloaded.

The graph is read from the source (`ast`), so a function-local import counts as much as a top-level one.
A new module needs a floor here; docs/architecture.md draws the same floors.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import pkgutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import kava

SRC = Path(kava.__file__).resolve().parents[1]


# modules that import an optional extra at their top: imported only where it is installed
OPTIONAL = {"kava.lm_eval_plugin": "lm_eval"}


def library_modules() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages([str(SRC / "kava")], prefix="kava.")]
    missing = [m for m, pkg in OPTIONAL.items() if importlib.util.find_spec(pkg) is None]
    return sorted(n for n in ["kava", *names] if n != "kava.cli" and not n.startswith("kava.commands")
                  and not any(n == m or n.startswith(m + ".") for m in missing))


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


# ------------------------------------------------------------------------------------------ floors
# Floor of each module (a package prefix covers its modules). Ground floor: what a method, an eviction rule, a
# loss is, and the pure math; up to the CLI. Imports go to the same floor or below, never up.
FLOORS = {
    "kava": 0,  # __version__; `kava.load` is the lazy door to kava.api (ALLOWED_LOCAL)
    "kava.spec": 0, "kava.eviction": 0, "kava.losses": 0, "kava.cache": 0, "kava.console": 0, "kava.data.records": 0,
    "kava.model.families": 0, "kava.model.compat": 0, "kava.model.rope": 0, "kava.model.lora_dropout": 0,
    "kava.data.readers": 1, "kava.data.synthetic": 1, "kava.data.multiplication": 1, "kava.data.format": 1,
    "kava.data.tokenizer": 1,
    "kava.model.capture": 1, "kava.model.pretrained": 1,
    "kava.config": 2, "kava.scoring": 2, "kava.model.reasoner": 2, "kava.curriculum": 2,
    "kava.objective": 3, "kava.decode": 3, "kava.data.pipeline": 3,
    "kava.checkpoint": 4, "kava.training": 4,
    "kava.diagnostics": 5,
    "kava.evaluate": 6,
    "kava.train": 7, "kava.api": 7,
    "kava.tools": 8, "kava.lm_eval_plugin": 8,  # lm-evaluation-harness's `--model kava`, beside the tools
    "kava.cli": 9, "kava.commands": 9,
}
ALLOWED_LOCAL = {("kava", "kava.api")}  # kava.load: `import kava` stays light


def module_names() -> dict[str, Path]:
    out = {}
    for p in (SRC / "kava").rglob("*.py"):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def floor_of(name: str) -> int:
    while name not in FLOORS:
        assert "." in name, f"{name}: no floor in tests/test_layering.py FLOORS"
        name = name.rsplit(".", 1)[0]
    return FLOORS[name]


def folder_of(name: str) -> str:
    """The folder a module lives in (kava.data, kava.checkpoint, ...), or the module itself at the top level."""
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or (SRC / "kava" / parts[-1]).is_dir() and len(parts) == 2 \
        else name


def kava_imports(mods: dict[str, Path]):
    """(importer, imported module, top-level?, names imported) for every kava import of every module."""
    def resolve(name):
        while name and name not in mods:
            name = name.rsplit(".", 1)[0] if "." in name else ""
        return name

    for m, path in mods.items():
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        typing_only = {id(n) for b in tree.body if isinstance(b, ast.If) and ast.unparse(b.test) == "TYPE_CHECKING"
                       for n in ast.walk(b)}  # type hints only: no import at run time
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                targets = [(resolve(a.name), ()) for a in node.names if a.name.split(".")[0] == "kava"]
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "kava":
                targets = []
                for a in node.names:  # `from kava.checkpoint import load` imports a module
                    sub = f"{node.module}.{a.name}"
                    targets.append((sub, ()) if sub in mods else (resolve(node.module), (a.name,)))
            else:
                continue
            for t, names in targets:
                if t and t != m:
                    yield m, t, id(node) in top, names


def import_graph():
    mods = module_names()
    return mods, list(kava_imports(mods))


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_floor():
    for name in module_names():
        floor_of(name)


def test_no_module_imports_a_higher_floor():
    _, imports = import_graph()
    up = sorted({(m, t, floor_of(m), floor_of(t)) for m, t, _, _ in imports
                 if floor_of(t) > floor_of(m) and (m, t) not in ALLOWED_LOCAL})
    assert up == [], "upward imports (importer, imported, floors): " + repr(up)


def test_no_import_circle_between_modules_or_folders():
    _, imports = import_graph()
    edges, folders = defaultdict(set), defaultdict(set)
    for m, t, _, _ in imports:
        if (m, t) in ALLOWED_LOCAL:
            continue
        edges[m].add(t)
        if folder_of(m) != folder_of(t):
            folders[folder_of(m)].add(folder_of(t))
    assert cycles(edges) == [], "module circles"
    assert cycles(folders) == [], "folder circles"


def test_library_imports_sit_at_module_top():
    """Function-local kava imports hide the graph; only the CLI layer (fast `kava --help`) and `kava.load` use
    them."""
    _, imports = import_graph()
    local = sorted({(m, t) for m, t, top, _ in imports if not top and floor_of(m) < FLOORS["kava.cli"]
                    and (m, t) not in ALLOWED_LOCAL})
    assert local == [], "function-local imports in the library: " + repr(local)


def test_no_private_name_crosses_a_module():
    _, imports = import_graph()
    private = sorted({(m, t, n) for m, t, _, names in imports for n in names if n.startswith("_")
                      and n != "__version__"})
    assert private == [], "private names imported from another module: " + repr(private)
    # nor reached as an attribute of a module object (`model._run` used to be called from evaluate / diagnostics)
    for m, path in module_names().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("_run", "_pad", "_positions", "_greedy", "_ce"):
                raise AssertionError(f"{m}: uses the private {node.attr}")


def test_the_layering_check_catches_a_circle_and_an_upward_import():
    """The checks above are not vacuous: the circle and the upward import of the old house are caught."""
    assert cycles({"kava.diagnostics": {"kava.evaluate"}, "kava.evaluate": {"kava.diagnostics"}}) == [
        ["kava.diagnostics", "kava.evaluate"]]
    assert cycles({"kava.model": {"kava.checkpoint"}, "kava.checkpoint": {"kava.model"}}) != []
    assert floor_of("kava.checkpoint.saved") > floor_of("kava.model.reasoner")  # checkpoint -> model only
    assert floor_of("kava.evaluate") > floor_of("kava.diagnostics") > floor_of("kava.decode")
