"""The method table (`kava.spec`): every row is a method the rest of kava runs as the row says, and the modules
that ask about a method read the table instead of naming methods."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from kava.config import ConfigError, config_from_dict
from kava.data.format import Formatter
from kava.data.records import SkipLog
from kava.decode import generate_for_config
from kava.objective import loss_step, make_batch
from kava.spec import KV_METHODS, LATENT_METHODS, METHODS, MODES, SPECS, MethodSpec, report_order, spec_of
from tiny import RECORDS, tiny_reasoner

SRC = Path(__file__).resolve().parents[1] / "src" / "kava"


def cfg_of(method: str, **extra):
    # Coconut answers after max_stages x thoughts_per_step thoughts (3 x 1 here), each a raw hidden state
    latent = {"num_latents": 3, "num_sweeps": 2, **({"projection": "identity"} if method == "coconut" else {})}
    return config_from_dict({"method": method, "model": {"name_or_path": "tiny"}, "latent": latent,
                             "coconut": {"thoughts_per_step": 1, "max_stages": 3},
                             "data": {"drop_last_step": False}, **extra})


def test_the_table_of_the_paper():
    assert METHODS == ("cot", "nocot", "icot", "pccot", "codi", "coconut", "kava")
    assert LATENT_METHODS == ("pccot", "codi", "coconut", "kava") and KV_METHODS == ("kava",)
    assert {m: s.eval_mode for m, s in SPECS.items()} == {"cot": "cot", "nocot": "nocot", "icot": "cot",
                                                          "pccot": "latent", "codi": "latent", "coconut": "latent",
                                                          "kava": "latent"}
    assert {m: s.student_mode for m, s in SPECS.items()} == {"cot": "jacobi", "nocot": "jacobi", "icot": "jacobi",
                                                             "pccot": "jacobi", "codi": "sequential",
                                                             "coconut": "sequential", "kava": "jacobi"}
    assert {m: s.curriculum for m, s in SPECS.items() if s.curriculum} == {"icot": "icot", "coconut": "coconut"}
    assert [m for m, s in SPECS.items() if not s.teacher] == ["coconut"]
    assert report_order() == ("nocot", "cot", "icot", "pccot", "codi", "coconut", "kava")
    assert all(s.eval_mode in MODES for s in SPECS.values())


def test_a_row_is_checked():
    with pytest.raises(ValueError, match="student 'parallel'"):
        MethodSpec("x", teacher_cot=True, student="parallel", codi=False, kv=False)
    with pytest.raises(ValueError, match="compare a latent student"):
        MethodSpec("x", teacher_cot=True, student=None, codi=False, kv=True)
    with pytest.raises(ValueError, match="unknown method 'x'; allowed values: cot, nocot"):
        spec_of("x")
    with pytest.raises(ConfigError, match="method: 'x' is not allowed; allowed values: cot, nocot, icot, pccot, codi, "
                                          "coconut, kava"):
        cfg_of("x")


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_the_terms_and_decodes_in_the_mode_its_row_names(method):
    m, tok = tiny_reasoner("llama", seed=1)
    cfg = cfg_of(method)
    assert cfg.spec is SPECS[method]
    items = Formatter.from_config(cfg, tok).tokenize_all(RECORDS, SkipLog())
    batch = make_batch(items, m.ids, cfg)
    assert (batch.student is not None) == cfg.spec.latent
    _, log = loss_step(m, batch, cfg)
    assert sorted(k[5:] for k in log if k.startswith("loss/") and k != "loss/total") == sorted(cfg.spec.terms)
    with torch.no_grad():
        q = Formatter.from_config(cfg, tok, limits=False).tokenize_all(RECORDS[:2], SkipLog(), need_answer=False)
        gens = generate_for_config(m, tok, cfg, q, mode=cfg.spec.eval_mode, max_new_tokens=2)
    base = 1 + (cfg.latent.num_sweeps if cfg.spec.student == "jacobi" else cfg.latent.num_latents) \
        if cfg.spec.latent else 0
    assert all(g.forward_passes == base + len(g.token_ids) for g in gens)


def test_no_module_names_a_method_to_decide_what_it_does():
    """Outside the table (and the report's labels), no library module compares `method` with a method's name:
    adding a method is a row in `kava.spec.SPECS`."""
    found = []
    for p in SRC.rglob("*.py"):
        if p.name == "spec.py":
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Compare) and any(isinstance(c, ast.Constant) and c.value in METHODS
                                                     for c in [node.left, *node.comparators]):
                text = ast.unparse(node)
                if "method" in text:
                    found.append(f"{p.relative_to(SRC)}: {text}")
    assert found == []


_NAME = r"`?(?:%s)`?" % "|".join(sorted(METHODS, key=len, reverse=True))
_SEP = r"(?:\s*,\s*(?:or\s+|and\s+)?|\s*/\s*|\s+or\s+|\s+and\s+)"
METHOD_LIST = re.compile(rf"(?<![\w.`-]){_NAME}(?:{_SEP}{_NAME}){{2,}}(?![\w`-])")  # "cot, nocot or kava"


def test_no_module_writes_a_list_of_the_methods():
    """Lists of methods written by hand fell behind the table (help texts without icot and coconut, a model card
    that read just "coconut."): outside `kava.spec`, no string names three methods in a row, no dict is keyed by
    three methods, and no dict maps to inference modes (`MethodSpec.eval_mode` restated)."""
    assert METHOD_LIST.search("train a method (cot, nocot, pccot, codi, kava)") and METHOD_LIST.search(
        "a trained `pccot`, `codi` or `kava` model") and not METHOD_LIST.search("--mode latent, cot or nocot")
    found = []
    for p in SRC.rglob("*.py"):
        if p == SRC / "spec.py":
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            where = f"{p.relative_to(SRC)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                found += [f"{where}: {m.group(0)!r}" for m in METHOD_LIST.finditer(node.value)]
            elif isinstance(node, ast.Dict):
                keys = [k.value for k in node.keys if isinstance(k, ast.Constant) and k.value in METHODS]
                values = [v.value if isinstance(v, ast.Constant) else None for v in node.values]
                if len(keys) >= 3 or (len(values) >= 2 and all(v in MODES for v in values)):
                    found.append(f"{where}: {ast.unparse(node)[:80]}")
    assert found == []


@pytest.mark.parametrize("method", METHODS)
def test_the_model_card_and_the_help_name_every_method(method):
    from kava.checkpoint.card import model_card
    from kava.cli import build_parser

    spec = spec_of(method)
    assert spec.title.split(":")[0].lower().replace("-", "") == method  # "No-CoT: ..." for nocot
    assert f"): {spec.title}." in model_card(cfg_of(method))
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    assert f"train a method ({', '.join(METHODS)})" in " ".join(parser.format_help().split())
    if spec.latent:
        assert method in sub["eval"].format_help().split("latent diagnostics (")[1].split(")")[0]
