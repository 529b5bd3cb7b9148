"""Synthetic task: determinism, split hygiene, arithmetic correctness, and held-out templates."""

from __future__ import annotations

import ast
import json
import operator
import re
import time

import pytest

from kava.data import synthetic
from kava.data.readers import load_eval_dataset, load_records, read_jsonl
from kava.data.synthetic import OPS, TEMPLATES, question_sentences, write_synthetic

SIZES = {"train": 3000, "valid": 200, "test": 300, "hard": 300, "varied": 300}
EQ_RE = re.compile(r"<<([^=<>]+)=([^<>]+)>>")
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def safe_eval(expr: str) -> float:
    """Evaluate + - * / on numeric literals only (no names, calls or attributes)."""

    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        raise ValueError(f"not plain arithmetic: {expr!r}")

    return ev(ast.parse(expr, mode="eval"))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    meta = write_synthetic(out, SIZES, seed=0)
    rows = {s: [json.loads(line) for line in (out / f"{s}.jsonl").open(encoding="utf-8")] for s in SIZES}
    return out, meta, rows


def test_files_and_meta(synth):
    out, meta, rows = synth
    assert {s: len(r) for s, r in rows.items()} == SIZES == meta["counts"]
    assert json.loads((out / "meta.json").read_text()) == meta
    assert meta["max_value"] == 99 and meta["hard_max_value"] == 999 and meta["hard_steps"] == 5
    assert set(meta["duplicates_removed"]) == set(SIZES)
    for r in rows["train"][:50]:
        assert set(r) == {"question", "steps_eq", "steps_nl", "answer"}


def test_deterministic(synth, tmp_path):
    out, _, _ = synth
    write_synthetic(tmp_path / "same", SIZES, seed=0)
    for name in [f"{s}.jsonl" for s in SIZES] + ["meta.json"]:
        assert (tmp_path / "same" / name).read_bytes() == (out / name).read_bytes(), name
    write_synthetic(tmp_path / "other", {"test": 300}, seed=1)
    assert (tmp_path / "other" / "test.jsonl").read_bytes() != (out / "test.jsonl").read_bytes()
    # a split's own stream does not depend on which other splits are requested
    write_synthetic(tmp_path / "alone", {"test": 300}, seed=0)
    assert (tmp_path / "alone" / "test.jsonl").read_bytes() == (out / "test.jsonl").read_bytes()


def test_no_question_in_two_splits(synth):
    _, _, rows = synth
    seen: dict[str, str] = {}
    for split, rs in rows.items():
        for r in rs:
            assert r["question"] not in seen, (split, seen.get(r["question"]))
            seen[r["question"]] = split


def test_dedup_counts_removed_duplicates(tmp_path, monkeypatch):
    # shrink the question space so collisions are certain
    monkeypatch.setattr(synthetic, "NAMES", (("Tom", "he"),))
    monkeypatch.setattr(synthetic, "ITEMS", ("apples",))
    sizes = {"test": 60, "train": 300}
    meta = write_synthetic(tmp_path, sizes, seed=0, min_steps=1, max_steps=1, max_value=6)
    assert meta["counts"] == sizes
    removed = meta["duplicates_removed"]
    assert removed["train"]["across_splits"] > 0 and removed["train"]["within_split"] > 0
    test_q = {json.loads(line)["question"] for line in (tmp_path / "test.jsonl").open()}
    train_q = [json.loads(line)["question"] for line in (tmp_path / "train.jsonl").open()]
    assert not test_q & set(train_q) and len(set(train_q)) == len(train_q)
    with pytest.raises(ValueError, match="too many duplicates"):
        write_synthetic(tmp_path / "x", {"test": 3000}, seed=0, min_steps=1, max_steps=1, max_value=4)


def _values(r: dict) -> list[int]:
    return [int(n) for eq in r["steps_eq"] for n in re.findall(r"\d+", eq)]


@pytest.mark.parametrize("split", sorted(SIZES))
def test_equations_evaluate_and_chain(synth, split):
    _, meta, rows = synth
    lo, hi, vmax = (5, 5, 999) if split == "hard" else (2, 4, 99)
    for r in rows[split]:
        eqs = [EQ_RE.fullmatch(s) for s in r["steps_eq"]]
        assert all(eqs), r["steps_eq"]
        assert lo <= len(eqs) <= hi
        assert len(r["steps_nl"]) == len(eqs)
        prev = None
        for m, nl in zip(eqs, r["steps_nl"]):
            expr, result = m.group(1), m.group(2)
            assert safe_eval(expr) == int(result)
            left = int(re.match(r"\d+", expr).group())
            if prev is None:
                assert re.search(rf"\b{left}\b", r["question"])  # the start quantity is stated
            else:
                assert left == prev
            assert f"{expr}={result}" in nl  # the NL step carries the same equation
            assert 1 <= int(result) <= vmax
            prev = int(result)
        assert str(prev) == r["answer"]
        assert max(_values(r)) <= vmax


def test_hard_has_larger_numbers(synth):
    _, _, rows = synth
    test_max = max(max(_values(r)) for r in rows["test"])
    hard_vals = [max(_values(r)) for r in rows["hard"]]
    assert test_max <= 99 < max(hard_vals)
    assert sum(v > 99 for v in hard_vals) > 0.8 * len(hard_vals)


def _template_regex(tpl: str) -> re.Pattern:
    parts = re.split(r"(\{\w+\})", tpl)
    return re.compile("".join(".+?" if p.startswith("{") else re.escape(p) for p in parts))


def _patterns(tset: str) -> list[re.Pattern]:
    t = TEMPLATES[tset]
    return [_template_regex(x) for x in t["start"] + t["ask"]] + [_template_regex(q) for op in OPS for q, _ in t[op]]


def test_template_sets(synth):
    for op in OPS:
        assert len(TEMPLATES["train"][op]) >= 6
        assert not {q for q, _ in TEMPLATES["train"][op]} & {q for q, _ in TEMPLATES["varied"][op]}
    train_p, varied_p = _patterns("train"), _patterns("varied")
    _, _, rows = synth
    for split, rs in rows.items():
        own, other = (varied_p, train_p) if split == "varied" else (train_p, varied_p)
        for r in rs[:300]:
            for sent in question_sentences(r["question"]):
                assert any(p.fullmatch(sent) for p in own), (split, sent)
                assert not any(p.fullmatch(sent) for p in other), (split, sent)
    # every train template is actually drawn
    train_sents = [s for r in rows["train"] for s in question_sentences(r["question"])]
    assert all(any(p.fullmatch(s) for s in train_sents) for p in train_p)


def test_readers_read_synthetic(synth):
    out, _, rows = synth
    eq = read_jsonl(out / "test.jsonl", steps_field="steps_eq")
    nl = read_jsonl(out / "test.jsonl", steps_field="steps_nl")
    assert [r.steps for r in eq] == [tuple(r["steps_eq"]) for r in rows["test"]]
    assert [r.steps for r in nl] == [tuple(r["steps_nl"]) for r in rows["test"]]
    assert load_records(out / "test.jsonl") == eq
    assert load_records(out, split="test", cot_style="nl") == nl
    for split in ("test", "hard", "varied", "valid"):
        recs, desc = load_eval_dataset(f"synth-{split}", out)
        assert len(recs) == SIZES[split]
        assert desc == f"synthetic {split} ({out / f'{split}.jsonl'}), {SIZES[split]} problems"


def test_speed_100k_under_30s(tmp_path):
    t = time.perf_counter()
    write_synthetic(tmp_path, {"train": 20000}, seed=3)
    assert time.perf_counter() - t < 6.0  # 20k in 6 s is the rate that makes 100k take < 30 s


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown synthetic splits"):
        write_synthetic(tmp_path, {"dev": 10})
    with pytest.raises(ValueError, match="min_steps"):
        write_synthetic(tmp_path, {"test": 10}, min_steps=3, max_steps=2)
