"""The docs stay true to the code: docs/config.md documents every config key with its real default, and
docs/method.md only points at functions and files that exist.

- Every key of the `kava.config` dataclasses (walked recursively) has a row in docs/config.md whose
  default cell, read the way `--set key=<cell>` reads it, equals the dataclass default; a `Literal` key's
  row lists every allowed value; and no row documents a key that does not exist.
- Every `kava.module:attr` (or `src/kava/x.py::attr`) reference in docs/method.md imports and resolves; a
  reference used as link text links to that module's file.
- Every relative link in both docs, the results pages and the studies' READMEs points to an existing file, and
  every experiments/ or benchmarks/ path they (or the study scripts, presets and library) name exists.
- The preset table in docs/config.md is the one `render_preset_table()` builds from `kava.tools.presets`.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
import typing
from pathlib import Path
from typing import Literal, get_args, get_origin

import pytest

import kava.config as kc
from kava.tools import presets

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CONFIG_MD = DOCS / "config.md"
METHOD_MD = DOCS / "method.md"


# ------------------------------------------------------------------------------------------ config keys
def config_keys(cls=kc.Config, prefix: str = ""):
    """(dotted key, type hint, default) for every leaf field, recursing into (optional) sections."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        section = tp if dataclasses.is_dataclass(tp) else next(
            (a for a in get_args(tp) if dataclasses.is_dataclass(a)), None)
        if section is not None:
            yield from config_keys(section, prefix + f.name + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        yield prefix + f.name, tp, default


def _cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def config_rows() -> dict[str, list[str]]:
    """Rows of the key tables of docs/config.md (header `| key | type | default | ...`): key -> cells."""
    rows: dict[str, list[str]] = {}
    in_key_table = False
    for line in CONFIG_MD.read_text().splitlines():
        if not line.startswith("|"):
            in_key_table = False
            continue
        cells = _cells(line)
        if cells[:3] == ["key", "type", "default"]:
            in_key_table = True
            continue
        m = re.fullmatch(r"`([a-z_][\w.]*)`", cells[0])
        if in_key_table and m:
            assert m.group(1) not in rows, f"docs/config.md documents {m.group(1)} twice"
            assert len(cells) == 6, f"docs/config.md: row of {m.group(1)} needs 6 cells, has {len(cells)}"
            rows[m.group(1)] = cells
    return rows


KEYS = list(config_keys())


def test_walk_finds_every_section():
    sections = {k.split(".")[0] for k, _, _ in KEYS if "." in k}
    assert sections == {"model", "lora", "latent", "coconut", "icot", "eviction", "loss", "data", "optim", "run"}
    assert len(KEYS) > 70


@pytest.mark.parametrize("key,tp,default", KEYS, ids=[k for k, _, _ in KEYS])
def test_config_key_is_documented_with_its_default(key, tp, default):
    rows = config_rows()
    assert key in rows, f"config key {key!r} is missing from docs/config.md (add a table row for it)"
    cells = rows[key]  # key | type | default | allowed | what it does | methods
    cell = cells[2].strip("`")
    _, parsed = kc.parse_override(f"{key}={cell}")
    value = kc._coerce(tp, parsed, key)  # exactly what `--set key=<cell>` would give
    assert value == default, f"docs/config.md: default of {key} is {cell!r}, the dataclass says {default!r}"
    if get_origin(tp) is Literal:
        for allowed in get_args(tp):
            assert f"`{allowed}`" in cells[3], f"docs/config.md: {key} does not list allowed value {allowed!r}"
    assert cells[4], f"docs/config.md: {key} has no description"


def test_config_doc_has_no_stale_keys():
    real = {k for k, _, _ in KEYS}
    stale = sorted(set(config_rows()) - real)
    assert not stale, f"docs/config.md documents keys that kava.config does not have: {stale}"


def choices_rows() -> list[list[str]]:
    """Rows of docs/method.md's table "Choices the paper leaves open": choice | option | default | what we do."""
    text = METHOD_MD.read_text()
    table = text[text.index("## Choices the paper leaves open"):]
    table = table[:table.index("\n## ", 1)]
    return [_cells(ln) for ln in table.splitlines() if ln.startswith("|")][2:]


CHOICE_KEYS = [(k, d) for k, tp, d in KEYS if get_origin(tp) is Literal and k.split(".")[0] in ("latent", "eviction", "loss")]


@pytest.mark.parametrize("key,default", CHOICE_KEYS, ids=[k for k, _ in CHOICE_KEYS])
def test_method_doc_names_every_method_option_with_its_default(key, default):
    """Each option of the method (a Literal key of latent, eviction, loss) has a row in method.md's table of
    choices the paper leaves open, whose default cell says the dataclass default. (The softmax of `I` was
    described there as a fixed choice, the opposite of the default `eviction.importance_softmax: cot`.)"""
    for cells in choices_rows():
        keys = re.findall(r"`([a-z_]+\.[\w.]+)", cells[1])
        if key in keys:
            values = [re.sub(r"\s*\(.*\)$", "", v).strip("`") for v in cells[2].split(", ")]
            assert values[keys.index(key)] == default, f"docs/method.md: default of {key} is {cells[2]!r}, not {default!r}"
            return
    pytest.fail(f"docs/method.md: no row of 'Choices the paper leaves open' names {key}")


# ------------------------------------------------------------------------------------------ presets
def _fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return "/".join(v)
    return str(v)


def render_preset_table() -> str:
    """The paper-preset tables of docs/config.md, from `kava.tools.presets` (✓ = independently verified)."""
    def cell(name, key, value):
        return _fmt(value) + (" ✓" if presets.is_verified(name, key, value) else "")

    per_row = [*presets.ROW_KEYS, "optim.effective_batch", "optim.grad_clip"]
    common = [k for k in presets.COMMON if k not in per_row]
    lines = ["| preset | " + " | ".join(f"`{k.split('.')[-1]}`" for k in per_row) + " |",
             "|---|" + "---|" * len(per_row)]
    for name in sorted(presets.PAPER_TABLE):
        exp = presets.expected_values(name)
        lines.append(f"| `{name}` | " + " | ".join(cell(name, k, exp[k]) for k in per_row) + " |")
    lines += ["", "| key (same in every paper preset) | value |", "|---|---|"]
    first = sorted(presets.PAPER_TABLE)[0]
    for k in common:
        v = presets.COMMON[k]
        assert all(presets.is_verified(n, k, v) == presets.is_verified(first, k, v) for n in presets.PAPER_TABLE)
        lines.append(f"| `{k}` | {cell(first, k, v)} |")
    return "\n".join(lines)


def test_preset_table_matches_kava_presets():
    assert render_preset_table() in CONFIG_MD.read_text(), (
        "the preset table in docs/config.md is out of date; paste the output of "
        "tests.test_docs.render_preset_table()")


# ------------------------------------------------------------------------------------------ method.md refs
REF_RE = re.compile(r"(?<![\w./])(kava(?:\.[a-z_]\w*)+):([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")
PATH_REF_RE = re.compile(r"((?:\.\./)?[\w/]+\.py)::([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")
LINKED_REF_RE = re.compile(r"\[`?(kava(?:\.[a-z_]\w*)+):[\w.]+`?\]\(([^)\s#]+)(?:#[^)]*)?\)")
LINK_RE = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _resolve(module: str, attr: str):
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _defined_in(path: Path, dotted: str) -> bool:
    """`dotted` (`name` or `Class.method`) is defined at the top of the Python file `path` (read, not imported)."""
    body = ast.parse(path.read_text()).body
    for part in dotted.split("."):
        found = next((n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                      and n.name == part), None)
        if found is None:
            return False
        body = found.body
    return True


def method_refs() -> list[tuple[str, str]]:
    """`kava.module:attr` references of docs/method.md."""
    if not METHOD_MD.exists():
        return []  # test_method_doc_has_references reports it
    return sorted(set(REF_RE.findall(METHOD_MD.read_text())))


def method_path_refs() -> list[tuple[str, str]]:
    """`path/to/file.py::name` references of docs/method.md (paths from the repo root or from docs/)."""
    if not METHOD_MD.exists():
        return []
    return sorted(set(PATH_REF_RE.findall(METHOD_MD.read_text())))


def test_method_doc_has_references():
    assert METHOD_MD.exists(), "docs/method.md is missing"
    modules = {m for m, _ in method_refs()}
    for m in ("kava.model.reasoner", "kava.model.capture", "kava.eviction", "kava.losses", "kava.objective",
              "kava.data.format", "kava.evaluate"):
        assert m in modules, f"docs/method.md references nothing in {m}"


@pytest.mark.parametrize("module,attr", method_refs(), ids=lambda x: x)
def test_method_reference_resolves(module, attr):
    try:
        _resolve(module, attr)
    except (ImportError, AttributeError) as e:
        pytest.fail(f"docs/method.md references {module}:{attr}, which does not exist ({e})")


@pytest.mark.parametrize("path,name", method_path_refs(), ids=lambda x: x)
def test_method_path_reference_resolves(path, name):
    file = (DOCS / path) if path.startswith("../") else (ROOT / path)
    assert file.exists(), f"docs/method.md references {path}::{name}, but {path} does not exist"
    assert _defined_in(file, name), f"docs/method.md references {path}::{name}, which {path} does not define"


def test_linked_references_point_to_their_module_file():
    for module, target in LINKED_REF_RE.findall(METHOD_MD.read_text()):
        want = Path(inspect.getfile(importlib.import_module(module))).resolve()
        got = (DOCS / target).resolve()
        assert got == want, f"docs/method.md: a reference to {module} links to {target}, not to {want}"


# ------------------------------------------------------------------------------------------ links
def github_anchors(md: Path) -> set[str]:
    """Heading anchors as GitHub makes them (lower case, punctuation dropped, spaces -> '-')."""
    anchors, fenced = set(), False
    for line in md.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


RESULT_MDS = sorted((ROOT / "results").rglob("README.md")) + [ROOT / "README.md", ROOT / "benchmarks" / "RESULTS.md"]
# each study's README (what it is, how to run it, where its results are) and the index of the studies
STUDY_MDS = sorted((ROOT / "experiments").rglob("README.md")) + [ROOT / "benchmarks" / "README.md"]


@pytest.mark.parametrize("doc", [METHOD_MD, CONFIG_MD, *RESULT_MDS, *STUDY_MDS],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_exist(doc):
    """Every relative link of the docs and of the results pages points to a file (results: the run files that
    back each number; a `runs/` folder left out by .gitignore once broke them) and to a heading that exists."""
    links = LINK_RE.findall(doc.read_text())
    assert links or doc in RESULT_MDS, f"{doc.name} has no links"
    for target in links:
        if re.match(r"[a-z]+:", target):
            continue  # URLs
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        assert path.exists(), f"{doc.name}: link {target!r} points to a missing file"
        if anchor and path.suffix == ".md":
            assert anchor in github_anchors(path), f"{doc.name}: link {target!r}: no heading with that anchor"


# a path into the studies or the speed scripts, as the pages and scripts write it (`experiments/depth/gpu.sh`)
STUDY_PATH_RE = re.compile(r"(?<![\w./$-])((?:experiments|benchmarks)/[\w./-]*\w)")
NAMING_PATHS = sorted({*RESULT_MDS, *STUDY_MDS, *DOCS.glob("*.md"), *(ROOT / "experiments").rglob("*.sh"),
                       *(ROOT / "experiments").rglob("*.py"), *(ROOT / "benchmarks").glob("*.sh"),
                       *(ROOT / "benchmarks").glob("*.py"), *(ROOT / "src" / "kava").rglob("*.py"),
                       *(ROOT / "src" / "kava" / "configs").glob("*.yaml")})


@pytest.mark.parametrize("doc", NAMING_PATHS, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_study_paths_exist(doc):
    """Every experiments/... or benchmarks/... path that a page, a study script, a preset or the library names
    exists: a results page cites the scripts that produced its numbers, and a script moved into its study's
    folder must take every citation with it."""
    missing = []
    for i, line in enumerate(doc.read_text().splitlines(), 1):
        for m in STUDY_PATH_RE.finditer(line):
            written = line[:m.start()].rstrip().endswith(("--out", "--output")) or '"--out", default=' in line
            if not written and not (ROOT / m.group(1)).exists():  # an output a command will write need not exist
                missing.append(f"{doc.relative_to(ROOT)}:{i}: {m.group(1)}")
    assert not missing, missing


INTERNAL_WORDS = re.compile(r"SPEC §|\bissue \d+|the issue's|\binstrument not measured\b")


def test_no_internal_words_in_the_readme_docs_or_help(capsys):
    """A reader has only the repository: no references to the project's internal spec or issue numbers in the
    README, the docs or any `kava ... --help`."""
    from kava.cli import main

    found = [f"{p.relative_to(ROOT)}:{i}" for p in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
             for i, line in enumerate(p.read_text().splitlines(), 1) if INTERNAL_WORDS.search(line)]
    for cmd in ([], ["train"], ["eval"], ["report"], ["ask"], ["inspect"], ["export"], ["score"], ["data"],
                ["presets"], ["sweep"], ["demo"]):
        with pytest.raises(SystemExit):
            main([*cmd, "--help"])
        found += [f"kava {' '.join(cmd)} --help: {line.strip()}" for line in capsys.readouterr().out.splitlines()
                  if INTERNAL_WORDS.search(line)]
    assert not found, found
