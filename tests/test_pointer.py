"""The k-hop pointer-chasing task (issue 22): determinism, disjoint splits, answers and CoT checked by an
independent naive computation, single-token symbols, numeric scoring, config validation, and a tiny
`kava train` + `kava eval` of cot and nocot on it. The arithmetic task stays byte-identical."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from kava.cli import main as cli
from kava.config import ConfigError, load_config
from kava.data.pipeline import synthetic_dir, synthetic_name, synthetic_single_tokens
from kava.data.readers import load_eval_dataset, load_records
from kava.data.synthetic import (parse_pointer_question, pointer_symbols, pointer_tokens, write_pointer,
                                 write_synthetic)
from kava.data.tokenizer import build_tokenizer, tokenizer_texts
from kava.scoring import extract_answer, numbers_match

SIZES = {"train": 2000, "valid": 200, "test": 300, "hard": 300}
PAIR = re.compile(r"(\d+)>(\d+)")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    out = tmp_path_factory.mktemp("pointer")
    meta = write_pointer(out, SIZES, seed=0, min_hops=1, max_hops=5, num_symbols=20)
    rows = {s: [json.loads(line) for line in (out / f"{s}.jsonl").open(encoding="utf-8")] for s in SIZES}
    return out, meta, rows


def naive(question: str) -> tuple[dict[int, int], int, int]:
    """The map, start and hop count read off the question text with regexes only (not the generator's parser)."""
    pairs = PAIR.findall(question)
    start = int(re.search(r"Start: (\d+)\.", question).group(1))
    hops = int(re.search(r"Hops: (\d+)\.$", question).group(1))
    return {int(x): int(y) for x, y in pairs}, start, hops


def test_files_meta_and_chance(task):
    out, meta, rows = task
    assert {s: len(r) for s, r in rows.items()} == SIZES == meta["counts"]
    assert json.loads((out / "meta.json").read_text()) == meta
    assert meta["task"] == "pointer" and meta["num_symbols"] == 20 and meta["chance"] == 1 / 20
    assert meta["symbols"] == [str(i) for i in range(10, 30)] and meta["hard_hops"] == [6, 7]
    assert not (out / "varied.jsonl").exists()
    for r in rows["train"][:20]:
        assert set(r) == {"question", "steps_eq", "steps_nl", "answer", "hops"}


def test_deterministic_and_split_streams_independent(task, tmp_path):
    out, _, _ = task
    write_pointer(tmp_path / "same", SIZES, seed=0, min_hops=1, max_hops=5)
    for name in [f"{s}.jsonl" for s in SIZES] + ["meta.json"]:
        assert (tmp_path / "same" / name).read_bytes() == (out / name).read_bytes(), name
    write_pointer(tmp_path / "other", {"test": 300}, seed=1, min_hops=1, max_hops=5)
    assert (tmp_path / "other" / "test.jsonl").read_bytes() != (out / "test.jsonl").read_bytes()
    write_pointer(tmp_path / "alone", {"test": 300}, seed=0, min_hops=1, max_hops=5)
    assert (tmp_path / "alone" / "test.jsonl").read_bytes() == (out / "test.jsonl").read_bytes()


def test_splits_are_disjoint(task):
    _, meta, rows = task
    seen: dict[str, str] = {}
    for split, rs in rows.items():
        for r in rs:
            assert r["question"] not in seen, (split, seen.get(r["question"]))
            seen[r["question"]] = split
    assert set(meta["duplicates_removed"]) == set(SIZES)


def test_duplicates_are_redrawn_when_the_space_is_small(tmp_path):
    # N = 4, k = 1: 6 cycles x 24 pair orders x 4 starts = 576 questions, so collisions are certain
    meta = write_pointer(tmp_path, {"test": 60, "train": 300}, seed=0, min_hops=1, max_hops=1, num_symbols=4)
    removed = meta["duplicates_removed"]["train"]
    assert removed["across_splits"] > 0 and removed["within_split"] > 0
    test_q = {json.loads(x)["question"] for x in (tmp_path / "test.jsonl").open()}
    train_q = [json.loads(x)["question"] for x in (tmp_path / "train.jsonl").open()]
    assert not test_q & set(train_q) and len(set(train_q)) == len(train_q)
    with pytest.raises(ValueError, match="too many duplicates"):
        write_pointer(tmp_path / "x", {"test": 1000}, seed=0, min_hops=1, max_hops=1, num_symbols=4)


@pytest.mark.parametrize("split", sorted(SIZES))
def test_answer_is_f_to_the_k_of_start_and_cot_is_the_hop_chain(task, split):
    _, _, rows = task
    lo, hi = (6, 7) if split == "hard" else (1, 5)
    ks = set()
    for r in rows[split]:
        f, start, k = naive(r["question"])
        # a permutation of the 20 symbols 10..29, written as 20 pairs, forming a single cycle
        assert sorted(f) == sorted(f.values()) == list(range(10, 30)) and len(PAIR.findall(r["question"])) == 20
        x, cycle = start, 0
        while True:
            x, cycle = f[x], cycle + 1
            if x == start:
                break
        assert cycle == 20
        x = start
        chain = [x]
        for _ in range(k):
            x = f[x]
            chain.append(x)
        assert r["answer"] == str(chain[-1]) and r["hops"] == k and lo <= k <= hi
        assert r["steps_eq"] == [f"{a}>{b}" for a, b in zip(chain, chain[1:])]
        assert r["steps_nl"] == [f"{a} points to {b}." for a, b in zip(chain, chain[1:])]
        assert len(set(chain)) == k + 1  # every hop lands on a new symbol
        ks.add(k)
        pf, ps, pk = parse_pointer_question(r["question"])  # the generator's own parser agrees
        assert ({int(a): int(b) for a, b in pf.items()}, int(ps), pk) == (f, start, k)
    assert ks == set(range(lo, hi + 1))


def test_answers_score_numerically(task):
    """The answer goes through kava's reader (normalize_number) and scorer unchanged: no record is skipped as
    non-numeric, and a CoT generation and a bare No-CoT answer both extract and match."""
    out, _, rows = task
    from kava.data.records import SkipLog

    for split in ("test", "hard"):
        skips = SkipLog()
        recs, _ = load_eval_dataset(f"synth-{split}", out, skips=skips)
        assert skips.total == 0 and [r.answer for r in recs] == [r["answer"] for r in rows[split]]
        for style in ("equation", "nl"):
            recs = load_records(out / f"{split}.jsonl", cot_style=style)
            assert [list(r.steps) for r in recs] == [x["steps_eq" if style == "equation" else "steps_nl"]
                                                     for x in rows[split]]
    r = rows["test"][0]
    gen = " " + " ".join(r["steps_eq"]) + " The answer is: " + r["answer"]
    ext = extract_answer(gen)
    assert ext == {"strict": r["answer"], "flexible": r["answer"]} and numbers_match(ext["strict"], r["answer"])
    assert extract_answer(" " + r["answer"])["strict"] == r["answer"]
    wrong = " " + " ".join(r["steps_nl"][:-1]) + " The answer is: 99"
    assert not numbers_match(extract_answer(wrong)["strict"], r["answer"])


def test_symbols_are_single_tokens(task, tmp_path):
    """Each symbol occurrence is one token: a pair x>y is the two tokens `x` `>y` (the target with its arrow), the
    answer and the NL CoT hold the plain form; decoding gives the text back exactly."""
    out, meta, rows = task
    recs = load_records(out / "train.jsonl") + load_records(out / "train.jsonl", cot_style="nl")
    cfg = load_config("synth_pointer_backbone")
    assert synthetic_single_tokens(cfg) == pointer_tokens(20) == meta["symbols"] + [">" + s for s in meta["symbols"]]
    tok = build_tokenizer(tokenizer_texts(recs), tmp_path / "tok", vocab_size=512,
                          single_tokens=synthetic_single_tokens(cfg))
    vocab = tok.get_vocab()
    for s in meta["symbols"]:
        assert tok.encode(s, add_special_tokens=False) == [vocab[s]]
        assert tok.encode(">" + s, add_special_tokens=False) == [vocab[">" + s]]
        assert tok.encode(" " + s, add_special_tokens=False)[-1] == vocab[s]  # ' ' then the symbol
    symbol_or_arrow = re.compile(r">?\d\d")
    for r in rows["test"][:50] + rows["hard"][:50]:
        for text in (r["question"], " ".join(r["steps_eq"]), " ".join(r["steps_nl"]), " The answer is: " + r["answer"]):
            ids = tok.encode(text, add_special_tokens=False)
            assert tok.decode(ids) == text
            pieces = [p for p in tok.convert_ids_to_tokens(ids) if any(c.isdigit() for c in p)]
            # every number is one token, with its arrow when it follows one (the hop count k <= 7 is one digit)
            assert pieces == [m for m in re.findall(r">?\d+", text)]
            assert all(symbol_or_arrow.fullmatch(p) for p in pieces if p != str(r["hops"]))
        q = tok.convert_ids_to_tokens(tok.encode(r["question"], add_special_tokens=False))
        assert len(q) == 20 * 3 + 10  # 20 x (x, '>y', ' ' or '.') + ' Start' ':' ' ' s '.' ' Hops' ':' ' ' k '.'
        cot = tok.convert_ids_to_tokens(tok.encode(" " + " ".join(r["steps_eq"]), add_special_tokens=False))
        assert len(cot) == 3 * r["hops"]  # ' ' x '>y' per hop
    # digits outside the symbol set still split one by one, as in the arithmetic tokenizer
    assert tok.convert_ids_to_tokens(tok.encode("3456", add_special_tokens=False)) == ["3", "4", "5", "6"]
    assert tok.convert_ids_to_tokens(tok.encode("1234", add_special_tokens=False)) == ["12", "3", "4"]  # longest match


def test_arithmetic_is_unchanged(tmp_path):
    """The default task's files, folder name and tokenizer are what they were before the pointer task."""
    write_synthetic(tmp_path / "a", {"train": 200, "valid": 20, "test": 20, "hard": 20, "varied": 20}, seed=3)
    digest = hashlib.sha256(b"".join((tmp_path / "a" / n).read_bytes() for n in
                                     ("train.jsonl", "valid.jsonl", "test.jsonl", "hard.jsonl", "varied.jsonl",
                                      "meta.json"))).hexdigest()
    assert digest == ARITHMETIC_DIGEST
    cfg = load_config("tiny_synth")
    assert cfg.data.synth_task == "arithmetic" and synthetic_single_tokens(cfg) == []
    assert synthetic_name(cfg) == "synth_s0_n20000_e300_st2-3_v20"
    recs = load_records(tmp_path / "a" / "train.jsonl")
    a = build_tokenizer(tokenizer_texts(recs), tmp_path / "t1", vocab_size=300)
    b = build_tokenizer(tokenizer_texts(recs), tmp_path / "t2", vocab_size=300, single_tokens=())
    assert (tmp_path / "t1" / "tokenizer.json").read_bytes() == (tmp_path / "t2" / "tokenizer.json").read_bytes()
    assert len(a) == len(b) == 300


# sha256 of write_synthetic(seed=3, train 200, others 20) at 8297f61, before the pointer task existed
ARITHMETIC_DIGEST = "3ab0c9392c34cde7f937fc7bcc12b2c164ae9a36973a4befe0d605275cff9ba6"


def test_pipeline_writes_the_pointer_task_from_the_config(tmp_path):
    cfg = load_config("synth_pointer_backbone", ["data.synth_train_size=50", "data.synth_eval_size=10"])
    assert synthetic_name(cfg) == "pointer_s0_n50_e10_k1-6_N20"
    d = synthetic_dir(cfg, tmp_path)
    meta = json.loads((d / "meta.json").read_text())
    assert meta["counts"] == {"valid": 10, "test": 10, "hard": 10, "train": 50}
    assert meta["min_hops"] == 1 and meta["max_hops"] == 6 and meta["hard_hops"] == [7, 8]
    assert synthetic_single_tokens(cfg) == pointer_tokens(20)
    other = load_config("synth_pointer_backbone", ["data.synth_num_symbols=30"])
    assert synthetic_name(other) != synthetic_name(cfg)  # every generation parameter is in the folder name


@pytest.mark.parametrize("override, msg", [
    (["data.synth_task=graph"], "data.synth_task: 'graph' is not allowed; allowed values: arithmetic, pointer"),
    (["data.synth_num_symbols=1"], "data.synth_num_symbols: must be in [2, 90]"),
    (["data.synth_num_symbols=91"], "data.synth_num_symbols: must be in [2, 90]"),
    (["data.synth_num_symbols=abc"], "data.synth_num_symbols: expected an integer"),
    (["data.synth_num_symbols=8"], "data.synth_max_steps: the pointer task's hard split"),  # 6 + 2 hops >= 8
    (["data.synth_min_steps=0"], "data.synth_min_steps / data.synth_max_steps"),
    (["data.synth_hops=3"], "unknown key data.synth_hops"),
])
def test_config_validation_names_the_key(override, msg):
    with pytest.raises(ConfigError, match=re.escape(msg)):
        load_config("synth_pointer_backbone", override)


def test_arithmetic_ignores_the_pointer_keys():
    load_config("tiny_synth", ["data.synth_num_symbols=3"])  # only checked for synth_task: pointer


def test_generator_refuses_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_symbols"):
        pointer_symbols(91)
    with pytest.raises(ValueError, match="max_hops \\+ 2 < num_symbols"):
        write_pointer(tmp_path, {"test": 3}, min_hops=1, max_hops=4, num_symbols=6)
    with pytest.raises(ValueError, match="min_hops"):
        write_pointer(tmp_path, {"test": 3}, min_hops=3, max_hops=2)
    with pytest.raises(ValueError, match="unknown pointer splits"):
        write_pointer(tmp_path, {"varied": 3})


TINY = ["model.from_scratch.hidden_size=32", "model.from_scratch.intermediate_size=64",
        "data.synth_train_size=200", "data.synth_eval_size=8", "data.valid_limit=4", "optim.effective_batch=8",
        "optim.micro_batch=8", "optim.max_steps=3", "run.eval_every=3", "run.eval_max_cot_tokens=40",
        "run.eval_max_new_tokens=4", "run.eval_batch_size=8"]


@pytest.mark.parametrize("method", ["cot", "nocot"])
def test_train_and_eval_end_to_end(method, tmp_path):
    """`kava train` from scratch on the pointer task, then `kava eval` on synth-test and synth-hard: the run's
    own data is found without --data-dir, the tokenizer keeps the symbols whole, every problem is scored."""
    sets = [f"method={method}", f"run.output_dir={tmp_path}", f"run.name={method}"]
    assert cli(["train", "--config", "synth_pointer_backbone", "--no-progress",
                *sum((["--set", s] for s in TINY + sets), [])]) == 0
    rd = tmp_path / method
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(rd / "tokenizer_src"))
    assert all(len(tok.encode(s, add_special_tokens=False)) == 1 for s in pointer_tokens(20))
    assert cli(["eval", "--checkpoint", str(rd), "--datasets", "synth-test,synth-hard"]) == 0
    for split in ("test", "hard"):
        s = json.loads((rd / "eval" / f"synth-{split}" / "summary.json").read_text())
        assert s["count"] == 8 and s["mode"] == method and 0.0 <= s["accuracy"] <= 1.0
        preds = [json.loads(x) for x in (rd / "eval" / f"synth-{split}" / "predictions.jsonl").read_text().splitlines()]
        assert sorted(p["index"] for p in preds) == list(range(8))


def _experiment(rel: str):
    """experiments/<rel>.py, imported by path (e.g. "pointer/watch")."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / f"{rel}.py"
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_validation_stopping_rule():
    """experiments/pointer/watch.py: plateau = the last `patience` evals add at most min_delta to the best before;
    the watcher stops a run there only at or above the floor (a flat start near zero is not a plateau to stop at)."""
    w = _experiment("pointer/watch")
    assert not w.plateaued([0.1, 0.2, 0.3], patience=4)  # too few evals
    assert w.plateaued([0.1, 0.5, 0.5, 0.502, 0.49, 0.5], patience=4, min_delta=0.005)
    assert not w.plateaued([0.1, 0.5, 0.5, 0.502, 0.49, 0.51], patience=4, min_delta=0.005)
    flat_zero = [0.0, 0.01, 0.0, 0.0, 0.0, 0.01]
    assert w.plateaued(flat_zero, 4) and w.stop_reason(flat_zero, 0.995, 4, 0.005, floor=0.9) is None
    assert "plateau" in w.stop_reason([0.5, 0.95, 0.95, 0.95, 0.95, 0.95], 0.995, 4, 0.005, floor=0.9)
    assert ">= 0.995" in w.stop_reason([0.2, 0.996], 0.995, 4, 0.005, floor=0.9)
    assert w.stop_reason([0.5, 0.95, 0.95, 0.95, 0.95, 0.95], None, 0, 0.005, floor=0.0) is None  # patience 0: never


def test_per_depth_tables_the_pointer_task_by_k_with_chance(task, tmp_path):
    out, _, rows = task
    d = _experiment("per_depth")
    run = tmp_path / "nocot-s42"
    (run / "eval" / "synth-test").mkdir(parents=True)
    preds = [{"index": i, "correct": r["hops"] == 1} for i, r in enumerate(rows["test"])]  # right exactly at k = 1
    (run / "eval" / "synth-test" / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    res = d.write_depth_table([run], out, tmp_path / "res", "test")
    assert res["nocot"]["1"] == [1.0] and all(res["nocot"][str(k)] == [0.0] for k in range(2, 6))
    md = (tmp_path / "res" / "depth.md").read_text()
    assert "by hop count k" in md and "| k 1 |" in md and "| chance (1/N, N=20) | | 5.0 | 5.0 |" in md
    assert json.loads((tmp_path / "res" / "depth.json").read_text())["chance"] == 0.05
