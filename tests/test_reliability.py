"""Reliability (issue 8): bad inputs, crashes, NaNs and unsafe files never cost a user a run or a wrong number.

Each test here guards one row of docs/failure_modes.md (which also lists the tests elsewhere that guard the
other rows). Training runs use a tiny from-scratch model on a few JSONL records (CPU, about a second each).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import kava.losses
import kava.objective
import kava.checkpoint.state as ks
import kava.train as kt
from kava.config import ConfigError, load_config
from kava.data.format import Formatter, build_teacher_batch, special_ids
from kava.data.readers import (
    load_records,
    read_gsm8k_jsonl,
    read_gsm_hard,
    read_icot,
    read_jsonl,
    read_svamp,
    records_from_rows,
)
from kava.data.records import DataError, Record, SkipLog
from kava.objective import loss_step, make_batch
from kava.checkpoint import load as loading
from kava.checkpoint.load import load_for_eval
from kava.checkpoint.saved import CheckpointError, extra_state, load_extra
from kava.checkpoint.load import build_reasoner, load_tokenizer

torch.set_num_threads(1)  # the CI's 2 CPUs are shared; tiny models run as fast on one thread



# =========================================================================================== 1. bad data, every reader
# One good record on line 1, then the bad one on line 2: counted under its reason (default) or a DataError
# naming <file>:2 (strict). Cases that a format cannot express are absent (no '####' in PAL/SVAMP/generic rows).

ICOT_OK = b"Tom has 2 apples . How many ?||<<1+1=2>> #### 2\n"
GSM8K_OK = json.dumps({"question": "Q?", "answer": "a <<1+1=2>>2\n#### 2"}).encode() + b"\n"
PAL_OK = b'{"input": "Q?", "target": 2.0}\n'
JSONL_OK = b'{"question": "Q?", "steps": ["<<1+1=2>>"], "answer": 2}\n'

LINE_CASES = {  # reader -> [(case, bad line 2, reason)]
    "icot": [
        ("missing ####", b"Q?||<<1+1=2>> 2\n", "missing ####"),
        ("duplicated ####", b"Q?||<<1+1=2>> #### 2 #### 2\n", "duplicated ####"),
        ("non-numeric answer", b"Q?||<<1+1=2>> #### two\n", "non-numeric answer"),
        ("empty answer", b"Q?||<<1+1=2>> ####\n", "empty answer"),
        ("empty question", b" ||<<1+1=2>> #### 2\n", "empty question"),
        ("invalid utf-8", b"Q\xe9?||<<1+1=2>> #### 2\n", "invalid utf-8"),
        ("wrong fields", b"Q? <<1+1=2>> #### 2\n", "missing ||"),
    ],
    "gsm8k": [
        ("missing ####", b'{"question": "Q?", "answer": "so 2"}\n', "missing ####"),
        ("duplicated ####", b'{"question": "Q?", "answer": "#### 2 #### 2"}\n', "duplicated ####"),
        ("non-numeric answer", b'{"question": "Q?", "answer": "#### two"}\n', "non-numeric answer"),
        ("empty answer", b'{"question": "Q?", "answer": "a <<1+1=2>>2\\n####  "}\n', "empty answer"),
        ("empty question", b'{"question": "  ", "answer": "#### 2"}\n', "empty question"),
        ("invalid utf-8", b'{"question": "Q\xe9?", "answer": "#### 2"}\n', "invalid utf-8"),
        ("truncated json", b'{"question": "Q?", "answer": "#### 2"\n', "invalid json"),
        ("wrong fields", b'{"problem": "Q?", "solution": "#### 2"}\n', "missing field: question"),
        ("wrong field type", b'{"question": "Q?", "answer": 2}\n', "bad field type: answer"),
    ],
    "gsm_hard": [
        ("non-numeric answer", b'{"input": "Q?", "target": "two"}\n', "non-numeric answer"),
        ("empty answer", b'{"input": "Q?", "target": null}\n', "empty answer"),
        ("empty question", b'{"input": "", "target": 2}\n', "empty question"),
        ("invalid utf-8", b'{"input": "Q\xe9?", "target": 2}\n', "invalid utf-8"),
        ("truncated json", b'{"input": "Q?", "tar\n', "invalid json"),
        ("wrong fields", b'{"question": "Q?", "target": 2}\n', "missing field: input"),
    ],
    "svamp": [  # PAL's svamp.jsonl (SVAMP.json, a JSON array, is below)
        ("non-numeric answer", b'{"input": "Q?", "target": "n/a"}\n', "non-numeric answer"),
        ("empty answer", b'{"input": "Q?", "target": ""}\n', "empty answer"),
        ("empty question", b'{"input": " ", "target": 2}\n', "empty question"),
        ("invalid utf-8", b'{"input": "Q\xff?", "target": 2}\n', "invalid utf-8"),
        ("truncated json", b'{"input": "Q?"\n', "invalid json"),
        ("wrong fields", b'{"input": "Q?", "answer": 2}\n', "missing field: target"),
    ],
    "jsonl": [
        ("non-numeric answer", b'{"question": "Q?", "steps": [], "answer": "2 apples"}\n', "non-numeric answer"),
        ("empty answer", b'{"question": "Q?", "steps": [], "answer": ""}\n', "empty answer"),
        ("empty question", b'{"question": "", "steps": [], "answer": 2}\n', "empty question"),
        ("invalid utf-8", b'{"question": "Q\xc3?", "steps": [], "answer": 2}\n', "invalid utf-8"),
        ("truncated json", b'{"question": "Q?", "steps": [\n', "invalid json"),
        ("wrong fields", b'{"q": "Q?", "steps": [], "answer": 2}\n', "missing field: question"),
        ("wrong field type", b'{"question": "Q?", "steps": 5, "answer": 2}\n', "bad field type: steps"),
        ("not an object", b'"Q?"\n', "not a json object"),
    ],
}
FIRST = {"icot": ICOT_OK, "gsm8k": GSM8K_OK, "gsm_hard": PAL_OK, "svamp": PAL_OK, "jsonl": JSONL_OK}
READ = {"icot": read_icot, "gsm8k": read_gsm8k_jsonl, "gsm_hard": read_gsm_hard, "svamp": read_svamp,
        "jsonl": read_jsonl}
LINE_PARAMS = [(r, *c) for r, cases in LINE_CASES.items() for c in cases]


@pytest.mark.parametrize("reader,case,line,reason", LINE_PARAMS, ids=[f"{p[0]}-{p[1]}" for p in LINE_PARAMS])
def test_every_reader_counts_or_raises_each_bad_record(tmp_path, reader, case, line, reason):
    path = tmp_path / ("data.txt" if reader == "icot" else "data.jsonl")
    path.write_bytes(FIRST[reader] + line)
    for call in (lambda **kw: READ[reader](path, **kw), lambda **kw: load_records(path, reader, **kw)):
        skips = SkipLog()
        recs = call(skips=skips)
        assert len(recs) == 1 and recs[0].answer == "2" and recs[0].source == f"{path}:1"
        assert skips.counts == {reason: 1} and skips.examples == {reason: [f"{path}:2"]}
        with pytest.raises(DataError, match="^" + re.escape(f"{path}:2: {reason} (strict mode")):
            call(skips=SkipLog(strict=True))


HUB_CASES = [  # rows of a Hugging Face dataset (read_hub maps them with records_from_rows); row 0 is good
    ("steps", {"question": "Q?", "steps": ["<<1+1=2>>"], "answer": "two"}, "non-numeric answer"),
    ("steps", {"question": "Q?", "steps": ["<<1+1=2>>"], "answer": None}, "empty answer"),
    ("steps", {"question": "", "steps": ["<<1+1=2>>"], "answer": "2"}, "empty question"),
    ("steps", {"question": "Q?", "cot": ["<<1+1=2>>"], "answer": "2"}, "missing field: steps"),
    ("gsm8k", {"question": "Q?", "answer": "x <<1+1=2>>2"}, "missing ####"),
    ("gsm8k", {"question": "Q?", "answer": "#### 2\n#### 3"}, "duplicated ####"),
    ("gsm_hard", {"input": "Q?", "target": float("nan")}, "non-numeric answer"),
    ("svamp", {"Body": "", "Question": "", "Answer": 2.0}, "empty question"),
    ("svamp", {"Body": "He has 2 .", "Question": "How many ?", "Answer": "2 apples"}, "non-numeric answer"),
]
HUB_FIRST = {"steps": {"question": "Q?", "steps": ["<<1+1=2>>"], "answer": "2"},
             "gsm8k": {"question": "Q?", "answer": "<<1+1=2>>2\n#### 2"},
             "gsm_hard": {"input": "Q?", "target": 2.0},
             "svamp": {"Body": "He has 2 .", "Question": "How many ?", "Answer": 2.0}}


@pytest.mark.parametrize("schema,row,reason", HUB_CASES, ids=[f"{s}-{r}" for s, _, r in HUB_CASES])
def test_hub_rows_count_or_raise_each_bad_record(schema, row, reason):
    rows = [HUB_FIRST[schema], row]
    skips = SkipLog()
    recs = records_from_rows(rows, schema, "org/set[train]", skips=skips)
    assert [r.answer for r in recs] == ["2"] and skips.examples == {reason: ["org/set[train]:1"]}
    with pytest.raises(DataError, match=rf"^org/set\[train\]:1: {reason}"):
        records_from_rows(rows, schema, "org/set[train]", skips=SkipLog(strict=True))


@pytest.mark.parametrize("case", ["invalid utf-8", "truncated", "non-numeric answer", "empty question"])
def test_svamp_json_array_bad_element(tmp_path, case):
    """SVAMP.json is one JSON array: a bad record is counted, but a broken array cannot be resynchronised,
    so undecodable bytes or truncation always raise, naming the line."""
    good = {"Body": "He has 2 pens .", "Question": "How many ?", "Answer": 2.0}
    bad = {"non-numeric answer": {**good, "Answer": "two"}, "empty question": {**good, "Body": "", "Question": ""}}
    path = tmp_path / "SVAMP.json"
    if case == "invalid utf-8":
        path.write_bytes(b'[\n {"Body": "x", "Question": "y?", "Answer": 1},\n {"Body": "\xff", "Question": "y?", '
                         b'"Answer": 2}\n]')
        with pytest.raises(DataError, match="^" + re.escape(f"{path}:3: invalid utf-8")):
            read_svamp(path)
    elif case == "truncated":
        path.write_text(json.dumps([good, good], indent=1)[:-8])
        with pytest.raises(DataError, match="^" + re.escape(f"{path}:") + r"\d+: invalid json"):
            read_svamp(path, skips=SkipLog())
    else:
        path.write_text(json.dumps([good, bad[case]], indent=1))
        skips = SkipLog()
        assert len(read_svamp(path, skips=skips)) == 1
        assert skips.examples == {case: [f"{path}:7"]}
        with pytest.raises(DataError, match="^" + re.escape(f"{path}:7: {case}")):
            read_svamp(path, skips=SkipLog(strict=True))


@pytest.mark.parametrize("reader", ["icot", "gsm8k", "gsm_hard", "svamp", "jsonl"])
def test_missing_and_empty_files_name_the_file(tmp_path, reader):
    path = tmp_path / ("d.txt" if reader == "icot" else "d.jsonl")
    for call in (lambda: READ[reader](path), lambda: load_records(path, reader)):
        with pytest.raises(DataError, match="^" + re.escape(f"{path}: file not found")):
            call()
    path.write_bytes(b"")
    for call in (lambda: READ[reader](path), lambda: load_records(path, reader)):
        with pytest.raises(DataError, match="^" + re.escape(f"{path}: no records")):
            call()
    path.write_bytes(FIRST[reader].replace(b"2", b"x"))  # every record bad: 'no records', with the reasons
    with pytest.raises(DataError, match="^" + re.escape(f"{path}: no records (skipped 1 records")):
        READ[reader](path)


@pytest.mark.parametrize("reader,line", [
    ("icot", b"Q?|| #### 2\n"),
    ("gsm8k", b'{"question": "Q?", "answer": "#### 2"}\n'),
    ("jsonl", b'{"question": "Q?", "steps": [], "answer": 2}\n'),
    ("jsonl", b'{"question": "Q?", "steps": " ", "answer": 2}\n'),
])
def test_empty_cot_is_kept_not_skipped(tmp_path, reader, line):
    """An empty CoT is legitimate (evaluation sets, and a one-step CoT after data.drop_last_step): kept by
    every reader, even in strict mode; the trainer counts such examples (test_train_with_bad_jsonl...)."""
    path = tmp_path / ("d.txt" if reader == "icot" else "d.jsonl")
    path.write_bytes(line)
    recs = load_records(path, reader, strict=True)
    assert [(r.steps, r.answer) for r in recs] == [((), "2")]


# =========================================================================================== tiny training runs
TINY = [
    "method=kava", "model.from_scratch.hidden_size=32", "model.from_scratch.intermediate_size=64",
    "model.from_scratch.num_hidden_layers=2", "optim.effective_batch=4", "optim.micro_batch=4",
    "latent.num_latents=4", "run.log=[jsonl]", "run.log_every=1", "run.eval_max_cot_tokens=8",
    "run.eval_max_new_tokens=4", "data.valid_limit=4", "data.format=jsonl",
    "data.max_question_tokens=64", "data.max_cot_tokens=64", "data.max_answer_tokens=8",
]


def good_row(i: int) -> dict:
    a, b = 3 + (7 * i) % 40, 2 + (5 * i) % 30
    return {"question": f"Tom has {a} apples and buys {b} more . How many ?",
            "steps": [f"<<{a}+{b}={a + b}>>", f"<<{a + b}*1={a + b}>>"], "answer": str(a + b)}


def write_rows(path: Path, rows: list, raw_tail: bytes = b"") -> Path:
    path.write_bytes("".join(json.dumps(r) + "\n" for r in rows).encode() + raw_tail)
    return path


# the bad training file: 12 good records, then one bad record per line (line number -> reason)
BAD_LINES = [
    ({"question": "Q?", "steps": ["<<1+1=2>>"], "answer": "two"}, "non-numeric answer"),
    ({"question": "Q?", "steps": ["<<1+1=2>>"], "answer": ""}, "empty answer"),
    ({"question": " ", "steps": ["<<1+1=2>>"], "answer": "2"}, "empty question"),
    ('{"question": "Q?", "steps": ["<<1+1=2>>"], "ans', "invalid json"),
    ({"problem": "Q?", "steps": ["<<1+1=2>>"], "answer": "2"}, "missing field: question"),
    ({"question": "Q?", "steps": [1, 2], "answer": "2"}, "bad field type: steps"),
    ([1, 2], "not a json object"),
    ({"question": "Q?", "steps": ["<<11+22=33>>"] * 60, "answer": "2"}, "CoT too long"),
    ({"question": "Tom has " + "1234567890" * 10 + " apples ?", "steps": ["<<1+1=2>>"], "answer": "2"},
     "question too long"),  # digits are single tokens: > 100 tokens whatever BPE merges
    ({"question": "Q?", "steps": ["<<1+1=2>>"], "answer": "12345678901234567890123"}, "answer too long"),
    (b'{"question": "Q \xff\xfe?", "steps": ["<<1+1=2>>"], "answer": "2"}', "invalid utf-8"),
]
N_GOOD = 12
EMPTY_COT = {"question": "Tom has 4 apples . How many ?", "steps": [], "answer": "4"}


def write_bad_file(path: Path) -> tuple[Path, dict[str, int]]:
    """Returns the path and the line of each reason."""
    out, where = b"", {}
    for i in range(N_GOOD):
        out += json.dumps(good_row(i)).encode() + b"\n"
    for j, (row, reason) in enumerate(BAD_LINES):
        line = row if isinstance(row, bytes) else (row.encode() if isinstance(row, str) else json.dumps(row).encode())
        out += line + b"\n"
        where[reason] = N_GOOD + j + 1
    out += json.dumps(EMPTY_COT).encode() + b"\n"  # kept and counted, not skipped
    path.write_bytes(out)
    return path, where


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    good = write_rows(d / "good.jsonl", [good_row(i) for i in range(32)])
    bad, where = write_bad_file(d / "bad.jsonl")
    return {"dir": d, "good": good, "bad": bad, "where": where}


def tiny_cfg(out: Path, train_file: Path, valid_file: Path, *extra: str):
    return load_config("tiny_synth", TINY + [f"data.source={train_file}", f"data.valid_source={valid_file}",
                                             f"run.output_dir={out}", *extra])


def train_quiet(cfg, **kw) -> tuple[Path, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        run = kt.train(cfg, progress=False, **kw)
    return run, buf.getvalue()


def trainable(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{step}" / "trainable.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "steps_per_s")} for r in rows]


def forbid(monkeypatch, *names: str) -> None:
    """Make kava.train's `names` fail the test if called (to prove an error comes before them)."""
    for name in names:
        def boom(*a, _n=name, **k):
            raise AssertionError(f"{_n} was called before the error")
        monkeypatch.setattr(kt, name, boom)


@pytest.fixture(scope="module")
def bad_run(files, tmp_path_factory):
    """`kava train` (kava method) on the bad JSONL file with a good validation file: 2 steps."""
    out = tmp_path_factory.mktemp("bad_run")
    run, stdout = train_quiet(tiny_cfg(out, files["bad"], files["good"], "optim.max_steps=2", "run.name=bad"))
    return run, stdout


# =========================================================================================== 1b. bad data through `kava train`
def test_train_with_bad_jsonl_counts_each_reason_in_skips_json(bad_run, files):
    run, stdout = bad_run
    skips = json.loads((run / "skips.json").read_text())
    expected = {reason: 1 for _, reason in BAD_LINES}
    assert skips["by_reason"] == expected and skips["total"] == len(BAD_LINES)
    for reason, line in files["where"].items():
        assert skips["examples"][reason] == [f"{files['bad']}:{line}"], reason
    done = json.loads((run / "DONE").read_text())
    assert done["skipped_records"] == len(BAD_LINES)
    meta = json.loads((run / "meta.json").read_text())
    assert meta["train_examples"] == N_GOOD + 1 and meta["train_examples_without_cot"] == 1
    # reported at the start and again at the end of the run
    summary = f"skipped {len(BAD_LINES)} records ("
    assert stdout.count(summary) == 2 and stdout.rstrip().splitlines()[-1].endswith(str(run / "skips.json"))
    assert "1 of 13 training examples have an empty CoT" in stdout


def test_bad_validation_records_are_counted_like_training_ones(files, tmp_path):
    """Validation records a reader skips are counted (issue 20: a throwaway SkipLog dropped them uncounted): in
    the start summary, meta.json (`valid_skips`) and skips.json (`validation`), beside the training skips."""
    run, stdout = train_quiet(tiny_cfg(tmp_path, files["good"], files["bad"], "optim.max_steps=1", "run.name=vbad",
                                       "data.valid_limit=null"))
    read_time = {reason: 1 for _, reason in BAD_LINES if not reason.endswith("too long")}  # no length limits
    skips = json.loads((run / "skips.json").read_text())
    assert skips["total"] == 0 and skips["validation"]["by_reason"] == read_time
    assert skips["validation"]["examples"]["non-numeric answer"] == [f"{files['bad']}:{files['where']['non-numeric answer']}"]
    meta = json.loads((run / "meta.json").read_text())
    n_valid = N_GOOD + 3 + 1  # the good rows, the three too-long ones and the empty CoT
    assert meta["valid_skips"] == {"total": len(read_time), "by_reason": read_time} and meta["valid_examples"] == n_valid
    assert f"validation:       {n_valid} records; skipped {len(read_time)} records (" in stdout


def test_strict_mode_raises_naming_the_line_before_the_model_loads(files, tmp_path, monkeypatch):
    forbid(monkeypatch, "build_reasoner")
    line = min(files["where"].values())
    with pytest.raises(DataError, match="^" + re.escape(f"{files['bad']}:{line}: non-numeric answer (strict mode")):
        kt.train(tiny_cfg(tmp_path, files["bad"], files["good"], "data.strict=true", "optim.max_steps=1"),
                 progress=False)
    # a length limit (checked at tokenization) is strict too
    long_cot = write_rows(tmp_path / "long.jsonl", [good_row(i) for i in range(8)] + [BAD_LINES[7][0]])
    with pytest.raises(DataError, match="^" + re.escape(f"{long_cot}:9: CoT too long")):
        kt.train(tiny_cfg(tmp_path, long_cot, files["good"], "data.strict=true", "run.name=long"), progress=False)


def test_no_example_with_a_cot_is_refused_before_the_model_loads(files, tmp_path, monkeypatch):
    forbid(monkeypatch, "build_reasoner")
    no_cot = write_rows(tmp_path / "nocot.jsonl", [{**good_row(i), "steps": []} for i in range(8)])
    with pytest.raises(ValueError, match="none of the 8 training examples has a CoT.*data.steps_field"):
        kt.train(tiny_cfg(tmp_path, no_cot, files["good"]), progress=False)
    # one step each, dropped as the last step: the same
    one = write_rows(tmp_path / "one.jsonl", [{**good_row(i), "steps": good_row(i)["steps"][:1]} for i in range(8)])
    with pytest.raises(ValueError, match="none of the 8 .*drop_last_step=True"):
        kt.train(tiny_cfg(tmp_path, one, files["good"], "data.drop_last_step=true", "run.name=one"), progress=False)


def test_a_batch_of_empty_cots_gives_finite_losses():
    """Examples without a CoT have no KV targets: every term stays finite (masked, not 0/0)."""
    from tiny import tiny_tokenizer

    cfg = load_config("tiny_synth", TINY)
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = build_reasoner(cfg, tok)
    recs = [Record("Tom has 3 apples .", (), "3", "t:1"), Record("He buys 4 more ?", (), "4", "t:2")]
    items = Formatter(tok).tokenize_all(recs, SkipLog())
    total, log = loss_step(model, make_batch(items, model.ids, cfg), cfg)
    total.backward()
    assert {"loss/kv", "loss/codi", "loss/ce_student", "loss/ce_teacher"} <= set(log)
    assert all(torch.isfinite(v).all() for v in log.values()) and log["loss/kv"] == 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# =========================================================================================== 2. bad configuration
def test_world_size_is_checked_before_data_and_model(files, tmp_path, monkeypatch):
    import accelerate

    monkeypatch.setattr(accelerate.Accelerator, "num_processes", property(lambda self: 3))
    forbid(monkeypatch, "load_train_valid", "build_reasoner")
    with pytest.raises(ConfigError, match=r"optim\.effective_batch \(4\) is not divisible by optim\.micro_batch "
                                          r"\(4\) x 3 processes"):
        kt.train(tiny_cfg(tmp_path, files["good"], files["good"]), progress=False)
    assert not (tmp_path / "tiny_synth-s42").exists()  # nothing written either


def test_edited_config_yaml_fails_on_resume_naming_the_key(bad_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(bad_run[0], run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    for mutate, key in [(lambda c: c["latent"].update(num_latent=3), "latent.num_latent"),
                        (lambda c: c["latent"].update(num_latents=0), "latent.num_latents"),
                        (lambda c: c["latent"].update(num_sweeps=-1), "latent.num_sweeps"),
                        (lambda c: c["optim"].update(micro_batch=3), "optim.micro_batch"),
                        (lambda c: c.update(method="cot") or c["loss"].update(kv_supervision="all"),
                         "loss.kv_supervision"),
                        (lambda c: c["optim"].update(lr="fast"), "optim.lr")]:
        c = json.loads(json.dumps(cfg))
        mutate(c)
        (run / "config.yaml").write_text(yaml.safe_dump(c))
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            kt.resume_config(run)


def save_tokenizer_without(src: Path, dst: Path, *, pad: bool, eos: bool) -> Path:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    if not pad:
        tok.pad_token = None
    if not eos:
        tok.eos_token = None
    tok.save_pretrained(dst)
    return dst


def test_tokenizer_without_pad_falls_back_to_eos_and_trains(bad_run, files, tmp_path):
    tok_dir = save_tokenizer_without(bad_run[0] / "tokenizer_src", tmp_path / "nopad", pad=False, eos=True)
    cfg = tiny_cfg(tmp_path, files["good"], files["good"], f"model.tokenizer={tok_dir}", "optim.max_steps=1")
    tok = load_tokenizer(cfg)
    assert tok.pad_token_id is None
    ids = special_ids(tok)
    assert ids.pad == ids.eos == tok.eos_token_id
    assert build_reasoner(cfg, tok).lm.config.pad_token_id == ids.eos
    items = Formatter(tok).tokenize_all([Record("Tom has 3 apples and buys 4 more .", ("<<3+4=7>>",), "7"),
                                        Record("Tom ?", (), "1")], SkipLog())
    tb = build_teacher_batch(items, ids)
    pads = tb.mask == 0
    assert pads.any() and (tb.ids[pads] == ids.eos).all()  # padding uses eos, and is masked out
    run, _ = train_quiet(cfg)
    assert (run / "DONE").exists()
    assert all(torch.isfinite(v).all() for v in trainable(run, 1).values())


def test_tokenizer_without_pad_and_eos_fails_before_the_model(bad_run, files, tmp_path, monkeypatch):
    tok_dir = save_tokenizer_without(bad_run[0] / "tokenizer_src", tmp_path / "noeos", pad=False, eos=False)
    cfg = tiny_cfg(tmp_path, files["good"], files["good"], f"model.tokenizer={tok_dir}")
    with pytest.raises(ValueError, match="tokenizer has no eos token"):
        load_tokenizer(cfg)
    forbid(monkeypatch, "build_reasoner")
    with pytest.raises(ValueError, match="tokenizer has no eos token"):
        kt.train(cfg, progress=False)


def test_saved_tokenizer_without_special_tokens_is_refused(bad_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(bad_run[0], run)
    load_for_eval(run)  # intact: loads
    shutil.rmtree(run / "final" / "tokenizer")
    shutil.copytree(run / "tokenizer_src", run / "final" / "tokenizer")  # the same tokenizer, minus <bot> etc.
    with pytest.raises(CheckpointError, match=r"final/tokenizer: tokenizer lacks kava's special tokens "
                                              r"\['<bot>', '<eot>', '<latent>'\]"):
        load_for_eval(run / "final")  # (a run dir alone means best/, as in kava eval)
    # initialising a new run from it (model.init_from) is refused the same way
    cfg = load_config("tiny_synth", TINY + [f"model.init_from={run}"])
    with pytest.raises(CheckpointError, match="lacks kava's special tokens"):
        load_tokenizer(cfg)


# =========================================================================================== 3. faults
@pytest.fixture(scope="module")
def ref_run(files, tmp_path_factory):
    """An uninterrupted 6-step kava run (random eviction: its generator state must survive a resume)."""
    out = tmp_path_factory.mktemp("ref")
    cfg = tiny_cfg(out, files["good"], files["good"], "optim.max_steps=6", "run.save_every=2",
                   "eviction.method=random", "run.name=ref")
    return train_quiet(cfg)[0]


class Killed(BaseException):
    """Stands in for SIGKILL: nothing in train() catches it, so the disk is left as a kill leaves it
    (metrics are appended and closed per line; a real SIGKILL is tested in test_train.py)."""


def resumed_equals_reference(run: Path, ref: Path) -> None:
    out, _ = train_quiet(kt.resume_config(run), resume=run)
    assert out == run and (run / "DONE").exists()
    assert max_diff(trainable(ref, 6), trainable(run, 6)) <= 1e-6
    assert max_diff(load_file(str(ref / "final" / "model" / "model.safetensors")),
                    load_file(str(run / "final" / "model" / "model.safetensors"))) <= 1e-6
    assert metrics(run) == metrics(ref)  # no lines of the interrupted attempt survive


def test_killed_before_the_first_checkpoint_resumes_from_scratch(files, tmp_path, monkeypatch, ref_run):
    cfg = tiny_cfg(tmp_path, files["good"], files["good"], "optim.max_steps=6", "run.save_every=2",
                   "eviction.method=random", "run.name=ref")
    real_log = kt.MetricLogger.log

    def log_then_die(self, payload, step):
        real_log(self, payload, step)
        if step == 2:  # step 2 is done and logged, its checkpoint not yet written
            raise Killed()

    with monkeypatch.context() as mp:
        mp.setattr(kt.MetricLogger, "log", log_then_die)
        with pytest.raises(Killed):
            train_quiet(cfg)
    run = tmp_path / "ref"
    assert ks.latest_checkpoint(run) is None and len(metrics(run)) == 2
    with pytest.raises(FileExistsError, match="--resume"):  # a plain re-run points at --resume ...
        kt.train(cfg, progress=False)
    resumed_equals_reference(run, ref_run)  # ... which now works (it used to say 'no checkpoint')


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(files, tmp_path, monkeypatch, ref_run):
    cfg = tiny_cfg(tmp_path, files["good"], files["good"], "optim.max_steps=6", "run.save_every=2",
                   "eviction.method=random", "run.name=ref")
    calls = []
    real_save = ks.save_file

    def full_disk_on_5th(*a, **k):  # checkpoint step_2 = calls 1-3; call 5 is step_4's optimizer file
        calls.append(1)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(*a, **k)

    with monkeypatch.context() as mp:
        mp.setattr(ks, "save_file", full_disk_on_5th)
        with pytest.raises(OSError) as e:
            train_quiet(cfg)
    run = tmp_path / "ref"
    ck = run / "checkpoints"
    msg = str(e.value)
    assert f"could not write {ck / 'step_4'}" in msg and "No space left on device" in msg and "intact" in msg
    assert sorted(p.name for p in ck.iterdir()) == ["step_2"]  # the partial step_4.tmp was removed
    assert ks.latest_checkpoint(run) == ck / "step_2"
    for f in ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors"):  # loadable ...
        assert all(torch.isfinite(v.float()).all() for v in load_file(str(ck / "step_2" / f)).values())
    # a SIGKILL in the middle of a write leaves a .tmp directory: never taken for a checkpoint
    shutil.copytree(ck / "step_2", ck / "step_6.tmp")
    state = json.loads((ck / "step_6.tmp" / "state.json").read_text())
    (ck / "step_6.tmp" / "state.json").write_text(json.dumps({**state, "step": 6}))
    assert ks.latest_checkpoint(run) == ck / "step_2"
    with open(run / "metrics.jsonl", "ab") as f:  # a full disk also cuts the last metrics line short
        f.write(b'{"step": 5, "split": "train", "loss/to')
    resumed_equals_reference(run, ref_run)  # ... and exactly the state an uninterrupted run had at step 2
    assert not (ck / "step_6.tmp").exists()


KILL_IN_WRITE = r"""
import json, sys, time
import torch
import kava.checkpoint.state as ks
import kava.train as kt
from kava.config import load_config

torch.set_num_threads(1)
real, calls = ks.save_file, []

def save_then_hang(tensors, path, *a, **k):
    real(tensors, path, *a, **k)
    calls.append(path)
    if len(calls) == 4:  # step_4/trainable.safetensors is on disk, the rest of that checkpoint is not
        open(sys.argv[2], "w").write(path)
        time.sleep(600)  # the parent SIGKILLs us here

ks.save_file = save_then_hang
kt.train(load_config("tiny_synth", json.loads(sys.argv[1])), progress=False)
"""


def test_sigkill_while_writing_a_checkpoint_then_resume(files, tmp_path, ref_run):
    """A real SIGKILL in the middle of a checkpoint write (test_train.py kills between steps)."""
    import signal
    import subprocess
    import sys
    import time

    overrides = TINY + [f"data.source={files['good']}", f"data.valid_source={files['good']}",
                        f"run.output_dir={tmp_path}", "optim.max_steps=6", "run.save_every=2",
                        "eviction.method=random", "run.name=ref"]
    marker = tmp_path / "IN_WRITE"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen([sys.executable, "-c", KILL_IN_WRITE, json.dumps(overrides), str(marker)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while not marker.exists():
            if proc.poll() is not None:
                raise AssertionError(f"child exited early: {proc.stdout.read().decode()[-3000:]}")
            assert time.time() < deadline, "child did not reach the kill point"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    run = tmp_path / "ref"
    ck = run / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step_2", "step_4.tmp"]
    assert [p.name for p in (ck / "step_4.tmp").iterdir()] == ["trainable.safetensors"]
    assert ks.latest_checkpoint(run) == ck / "step_2"
    resumed_equals_reference(run, ref_run)
    assert not (ck / "step_4.tmp").exists()


def test_metrics_write_failure_names_the_file(tmp_path):
    cfg = load_config("tiny_synth")
    logger = kt.MetricLogger(tmp_path, ["jsonl"], True, cfg)
    logger.log({"loss/total": 1.0}, 1)
    (tmp_path / "metrics.jsonl").unlink()
    (tmp_path / "metrics.jsonl").mkdir()  # any OSError on append (ENOSPC, EIO, ...) takes the same path
    with pytest.raises(OSError, match=re.escape(f"could not append to {tmp_path / 'metrics.jsonl'}: ") +
                       ".*" + re.escape(f"kava train --resume {tmp_path}")):
        logger.log({"loss/total": 1.0}, 2)


def test_atomic_dir_write_never_replaces_the_last_good_copy(tmp_path):
    final = tmp_path / "step_2"
    ks.atomic_dir_write(final, lambda d: save_file({"w": torch.ones(2)}, str(d / "a.safetensors")))

    def crash_on_second_file(d: Path):
        save_file({"w": torch.zeros(2)}, str(d / "a.safetensors"))
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        ks.atomic_dir_write(final, crash_on_second_file)
    assert torch.equal(load_file(str(final / "a.safetensors"))["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_2"]
    # a crash between 'rename old away' and 'rename new in' leaves only <name>.old: the next write restores it
    final.rename(tmp_path / "step_2.old")
    with pytest.raises(RuntimeError):
        ks.atomic_dir_write(final, crash_on_second_file)
    assert torch.equal(load_file(str(final / "a.safetensors"))["w"], torch.ones(2))


def test_unwritable_output_dir_fails_first_naming_it(files, tmp_path, monkeypatch):
    forbid(monkeypatch, "load_train_valid", "build_reasoner")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")  # works as root too, where chmod does not stop writes
    with pytest.raises(OSError, match=re.escape(f"cannot write to the output directory {blocker / 'out' / 'x'}")):
        kt.train(tiny_cfg(blocker / "out", files["good"], files["good"], "run.name=x"), progress=False)
    # a directory that exists but refuses writes (read-only mount, full disk): found by the write probe
    real_write = Path.write_text

    def read_only(self, *a, **k):
        if self.name.startswith(".write_test"):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_write(self, *a, **k)

    with monkeypatch.context() as mp:
        mp.setattr(Path, "write_text", read_only)
        with pytest.raises(OSError, match=re.escape(f"cannot write to the output directory {tmp_path / 'x'}: "
                                                    "[Errno 30] Read-only file system")):
            kt.train(tiny_cfg(tmp_path, files["good"], files["good"], "run.name=x"), progress=False)
    if os.geteuid() != 0:  # as root chmod does not stop writes
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(OSError, match=re.escape(f"cannot write to the output directory {ro / 'x'}")):
                kt.train(tiny_cfg(ro, files["good"], files["good"], "run.name=x"), progress=False)
        finally:
            ro.chmod(0o700)


# =========================================================================================== 4. numerics
def inject(monkeypatch, term: str, at_calls: set[int], value: float = float("inf")) -> None:
    """Add `value` to loss term `term` on the given (1-based) calls; one micro-batch per optimizer step here."""
    calls = []

    def hit() -> bool:
        calls.append(1)
        return len(calls) in at_calls

    if term in ("ce_teacher", "ce_student"):
        real_ce = kava.objective.ce

        def ce(out, den, name, *rest):
            loss = real_ce(out, den, name, *rest)
            return loss + value if name == term and hit() else loss

        monkeypatch.setattr(kava.objective, "ce", ce)
    elif term == "codi":
        real_codi = kava.losses.codi_loss
        monkeypatch.setattr(kava.losses, "codi_loss", lambda *a, **k: real_codi(*a, **k) + (value if hit() else 0.0))
    elif term == "kv":
        real_kv = kava.losses.kv_loss_over_sweeps

        def kv(*a, **k):
            out, per = real_kv(*a, **k)
            return (out + value if hit() else out), per

        monkeypatch.setattr(kava.losses, "kv_loss_over_sweeps", kv)
    elif term == "grad_norm":  # a finite loss whose gradient is inf (overflow in backward)
        class InfGrad(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                ctx.shape = x.shape
                return x.sum() * 0

            @staticmethod
            def backward(ctx, g):
                return torch.full(ctx.shape, value)

        real_step = kava.objective.loss_step

        def step(model, *a, **k):
            total, log = real_step(model, *a, **k)
            return (total + InfGrad.apply(model.special_rows) if hit() else total), log

        monkeypatch.setattr(kava.objective, "loss_step", step)


NONFINITE = [("ce_teacher", "inf"), ("ce_student", "-inf"), ("codi", "inf"), ("kv", "inf"), ("kv", "nan"),
             ("grad_norm", "inf")]


@pytest.mark.parametrize("term,value", NONFINITE)
def test_nonfinite_term_stops_with_step_term_and_last_good_state(files, tmp_path, monkeypatch, term, value):
    inject(monkeypatch, term, {2}, float(value))
    cfg = tiny_cfg(tmp_path, files["good"], files["good"], "optim.max_steps=3", "run.save_every=100")
    with pytest.raises(kt.NonFiniteLoss) as e:
        train_quiet(cfg)
    msg = str(e.value)
    label = "grad_norm" if term == "grad_norm" else f"loss/{term}"
    assert "at optimizer step 2 " in msg and f"['{label}']" in msg and "nan_policy=skip" in msg
    run = tmp_path / "tiny_synth-s42"
    assert ks.latest_checkpoint(run) == run / "checkpoints" / "step_1" and f"{run / 'checkpoints' / 'step_1'}" in msg
    good = trainable(run, 1)
    assert all(torch.isfinite(v).all() for v in good.values())
    assert not (run / "DONE").exists() and [r["step"] for r in metrics(run)] == [1]


def test_nan_policy_skip_counts_inf_loss_and_inf_gradient(files, tmp_path, monkeypatch):
    inject(monkeypatch, "kv", {2})
    inject(monkeypatch, "grad_norm", {3})
    cfg = tiny_cfg(tmp_path, files["good"], files["good"], "optim.max_steps=4", "run.nan_policy=skip")
    run, _ = train_quiet(cfg)
    assert json.loads((run / "DONE").read_text())["nonfinite_skipped"] == 2
    skipped = [r for r in metrics(run) if "nonfinite_skipped" in r]
    assert [(r["step"], r["bad_terms"]) for r in skipped] == [(2, ["loss/kv"]), (3, ["grad_norm"])]
    assert all(torch.isfinite(v).all() for v in trainable(run, 4).values())
    assert all(torch.isfinite(v).all() for v in load_file(str(run / "final" / "model" / "model.safetensors")).values())


# =========================================================================================== 5. safe loading
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz", ".joblib"}


def test_run_dir_holds_safetensors_and_text_only(bad_run):
    run = bad_run[0]
    files = [p for p in run.rglob("*") if p.is_file()]
    suffixes = {p.suffix for p in files}
    assert not suffixes & PICKLE_SUFFIXES, suffixes
    assert suffixes <= {"", ".safetensors", ".json", ".jsonl", ".yaml", ".md"}, suffixes  # .md: the model card
    for p in files:  # every weight file parses as safetensors; everything else is plain text
        if p.suffix == ".safetensors":
            with safe_open(str(p), "pt") as f:
                assert list(f.keys()), p
        else:
            p.read_bytes().decode("utf-8")
    assert {p.name for p in files if p.suffix == ".safetensors"} >= {
        "trainable.safetensors", "optimizer.safetensors", "rng.safetensors", "model.safetensors",
        "kava_extra.safetensors"}


def test_loading_and_resuming_never_unpickle(bad_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(bad_run[0], run)

    def no_pickle(*a, **k):
        raise AssertionError("torch.load (pickle) was called")

    monkeypatch.setattr(torch, "load", no_pickle)
    load_for_eval(run)
    (run / "DONE").unlink()
    train_quiet(kt.resume_config(run), resume=run)


def tampered(bad_run, tmp_path, edit) -> Path:
    run = tmp_path / "run"
    shutil.copytree(bad_run[0], run)
    f = run / "checkpoints" / "step_2" / "trainable.safetensors"
    sd = load_file(str(f))
    edit(sd)
    save_file(sd, str(f))
    return run


def test_resume_with_tampered_trainable_lists_missing_and_unexpected(bad_run, tmp_path):
    dropped = []

    def edit(sd):
        dropped.append(sorted(sd)[3])
        del sd[dropped[0]]
        sd["lm.model.extra.weight"] = torch.zeros(3)

    run = tampered(bad_run, tmp_path, edit)
    with pytest.raises(CheckpointError) as e:
        train_quiet(kt.resume_config(run), resume=run)
    msg = str(e.value)
    assert f"missing 1 ['{dropped[0]}']" in msg and "unexpected 1 ['lm.model.extra.weight']" in msg
    assert "step_2" in msg


def test_resume_with_mis_shaped_tensor_lists_it(bad_run, tmp_path):
    run = tampered(bad_run, tmp_path, lambda sd: sd.update(special_rows=torch.zeros(3, 64)))
    with pytest.raises(CheckpointError, match=r"shapes do not match.*special_rows: checkpoint \(3, 64\), "
                                              r"model \(3, 32\)"):
        train_quiet(kt.resume_config(run), resume=run)


@pytest.mark.parametrize("edit,expect", [
    (lambda c: c.update(method="cot"), "checkpoint method 'kava' != config method 'cot'"),
    (lambda c: c["model"]["from_scratch"].update(hidden_size=64), "different model: model.from_scratch differ"),
    (lambda c: c.update(lora={"r": 4}), "different model: model.lora differ"),
])
def test_resume_refuses_a_checkpoint_of_another_method_or_model_before_loading(bad_run, tmp_path, monkeypatch,
                                                                               edit, expect):
    run = tmp_path / "run"
    shutil.copytree(bad_run[0], run)
    c = yaml.safe_load((run / "config.yaml").read_text())
    edit(c)
    (run / "config.yaml").write_text(yaml.safe_dump(c))
    forbid(monkeypatch, "load_train_valid", "build_reasoner")
    with pytest.raises(ValueError, match=expect):
        kt.train(kt.resume_config(run), resume=run, progress=False)


def test_resume_refuses_a_changed_tokenizer_before_the_model_loads(bad_run, tmp_path, monkeypatch):
    """On resume the tokenizer is rebuilt from its source (the special tokens are added again): if the source
    changed, the trained special rows / embeddings would meet other ids."""
    run = tmp_path / "run"
    shutil.copytree(bad_run[0], run)
    shutil.rmtree(run / "tokenizer_src")
    save_tokenizer_without(bad_run[0] / "tokenizer_src", run / "tokenizer_src", pad=False, eos=True)
    forbid(monkeypatch, "build_reasoner")
    with pytest.raises(CheckpointError, match="step_2: the tokenizer changed since the checkpoint was written"):
        kt.train(kt.resume_config(run), resume=run, progress=False)


def test_older_checkpoint_without_model_identity_still_fails_clearly(bad_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(bad_run[0], run)
    st = run / "checkpoints" / "step_2" / "state.json"
    state = json.loads(st.read_text())
    del state["model"]
    st.write_text(json.dumps(state))
    c = yaml.safe_load((run / "config.yaml").read_text())
    c["model"]["from_scratch"]["intermediate_size"] = 48
    (run / "config.yaml").write_text(yaml.safe_dump(c))
    with pytest.raises(CheckpointError, match=r"shapes do not match.*mlp.*checkpoint \(64, 32\), model \(48, 32\)"):
        train_quiet(kt.resume_config(run), resume=run)


def test_eval_load_checks_every_tensor_and_safetensors_only(bad_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(bad_run[0], run)
    f = run / "final" / "model" / "model.safetensors"
    sd = load_file(str(f))
    gone = sorted(k for k in sd if "layers.1.mlp.down_proj" in k)[0]
    save_file({**{k: v for k, v in sd.items() if k != gone}, "model.extra.weight": torch.zeros(2)}, str(f),
              metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"missing \['{gone}'\], unexpected \['model.extra.weight'\]"):
        load_for_eval(run / "final")
    f.unlink()
    torch.save(sd, f.with_name("pytorch_model.bin"))  # a pickle where safetensors belong
    with pytest.raises(CheckpointError, match="safetensors"):
        load_for_eval(run / "final")


def test_load_extra_refuses_another_models_tensors():
    from tiny import tiny_reasoner

    model, _ = tiny_reasoner()
    state = extra_state(model)
    with pytest.raises(CheckpointError, match=r"special_rows has shape \(3, 32\), model expects \(3, 64\)"):
        load_extra(model, {**state, "special_rows": torch.zeros(3, 32)})
    with pytest.raises(CheckpointError, match="missing key special_rows"):
        load_extra(model, {k: v for k, v in state.items() if k != "special_rows"})
    with pytest.raises(CheckpointError, match="projection keys do not match"):
        load_extra(model, {"special_rows": state["special_rows"]})  # saved with projection: identity
    load_extra(model, state)


class _Stop(Exception):
    pass


def test_trust_remote_code_is_off_unless_turned_on(monkeypatch):
    seen = []

    class Fake:
        @staticmethod
        def from_pretrained(*a, **k):
            seen.append(k.get("trust_remote_code", "not passed"))
            raise _Stop()

    monkeypatch.setattr(loading, "AutoTokenizer", Fake)
    monkeypatch.setattr(loading, "AutoModelForCausalLM", Fake)
    monkeypatch.setattr("kava.model.pretrained.AutoModelForCausalLM", Fake)  # pretrained models load there
    from tiny import tiny_tokenizer

    for on in (False, True):
        overrides = ["model.name_or_path=some-org/some-model"] + (["model.trust_remote_code=true"] if on else [])
        cfg = load_config(None, overrides)
        assert cfg.model.trust_remote_code is on
        for call in (lambda: load_tokenizer(cfg), lambda: build_reasoner(cfg, tiny_tokenizer())):
            with pytest.raises(_Stop):
                call()
        assert seen[-2:] == [on, on]
    assert load_config("tiny_synth").model.trust_remote_code is False
    assert all(load_config(p).model.trust_remote_code is False for p in ("llama1b_aug", "qwen05b_aug"))


# =========================================================================================== the failure-modes doc
def test_failure_modes_doc_names_only_existing_tests():
    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "failure_modes.md").read_text()
    cited = set(re.findall(r"(test_\w+\.py)::(test_\w+)(\[[^\]]*\])?", doc))
    assert len(cited) > 40
    ids = {p[0] + "-" + p[1] for p in LINE_PARAMS} | {f"{t}-{v}" for t, v in NONFINITE}
    for file, name, param in cited:
        src = (root / "tests" / file).read_text()
        assert re.search(rf"^def {name}\(", src, re.M), f"docs/failure_modes.md cites {file}::{name}, which is gone"
        if param and file == "test_reliability.py" and name != "test_svamp_json_array_bad_element":
            assert param[1:-1] in ids, param
    for name in re.findall(r"^def (test_\w+)\(", Path(__file__).read_text(), re.M):  # and every test here is listed
        assert name in doc or name == "test_failure_modes_doc_names_only_existing_tests", name


def test_nonfinite_loss_through_the_cli_is_one_line_naming_the_step_and_term(files, tmp_path, monkeypatch, capsys):
    from kava.cli import main

    inject(monkeypatch, "ce_teacher", {2})
    sets = TINY + [f"data.source={files['good']}", f"data.valid_source={files['good']}", f"run.output_dir={tmp_path}",
                   "optim.max_steps=3", "run.save_every=100"]
    assert main(["train", "--config", "tiny_synth", "--no-progress", *[x for s in sets for x in ("--set", s)]]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kava train: error: non-finite loss at optimizer step 2 in term(s) ['loss/ce_teacher']; "
                          f"last good state saved in {tmp_path / 'tiny_synth-s42' / 'checkpoints' / 'step_1'}")
    assert err.count("\n") == 1 and "Traceback" not in err
