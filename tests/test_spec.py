"""The method table (`kava.spec`): every row is a method the rest of kava runs as the row says, and the modules
that ask about a method read the table instead of naming methods."""

from __future__ import annotations

import ast
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
    assert cfg.spec is SPECS[method] and cfg.is_latent == SPECS[method].latent
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
