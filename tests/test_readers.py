"""Readers: exact record counts on the shared data, answer normalisation, and every bad-record path."""

from __future__ import annotations

import json
import re
import sys

import pytest

from kava.data import readers
from kava.data.readers import (
    EVAL_DATASETS,
    detect_format,
    load_eval_dataset,
    load_records,
    normalize_number,
    read_gsm8k_jsonl,
    read_gsm_hard,
    read_hub,
    read_icot,
    read_jsonl,
    read_svamp,
    records_from_rows,
    split_cot,
    split_sentences,
)
from kava.data.records import DataError, Record, SkipLog

COUNTS = [
    ("gsm8k/test.jsonl", "gsm8k", 1319),
    ("gsm8k/train.jsonl", "gsm8k", 7473),
    ("gsm8k-aug/test.txt", "icot", 1319),
    ("gsm8k-aug/valid.txt", "icot", 500),
    ("gsm8k-aug/train_no_aug.txt", "icot", 6973),
    ("gsm8k-aug/partial_train_sample/middletrain.txt", "icot", 3000),
    ("gsm8k-hard/gsmhardv2.jsonl", "gsm_hard", 1319),
    ("svamp/SVAMP.json", "svamp", 1000),
    ("svamp/svamp_pal.jsonl", "gsm_hard", 1000),  # PAL format; read_svamp reads it identically
]


@pytest.mark.parametrize("rel,fmt,n", COUNTS)
def test_counts_match_source_md(data_dir, rel, fmt, n):
    skips = SkipLog()
    path = data_dir / rel
    assert detect_format(path) == fmt
    recs = load_records(path, skips=skips)
    assert len(recs) == n
    assert skips.total == 0, skips.summary()
    assert all(r.question and r.answer and normalize_number(r.answer) == r.answer for r in recs)
    assert recs[0].source == f"{path}:{2 if rel.endswith('SVAMP.json') else 1}"


def test_gsm8k_first_record(data_dir):
    r = read_gsm8k_jsonl(data_dir / "gsm8k/test.jsonl", limit=1)
    assert len(r) == 1
    assert r[0].steps == ("<<16-3-4=9>>", "<<9*2=18>>")
    assert r[0].answer == "18"
    assert r[0].question.startswith("Janet’s ducks lay 16 eggs per day.")
    nl = read_gsm8k_jsonl(data_dir / "gsm8k/test.jsonl", cot_style="nl", limit=1)[0]
    assert nl.steps == (
        "Janet sells 16 - 3 - 4 = 9 duck eggs a day.",
        "She makes 9 * 2 = $18 every day at the farmer’s market.",
    )
    raw = json.loads((data_dir / "gsm8k/test.jsonl").open(encoding="utf-8").readline())["answer"]
    annotated = read_gsm8k_jsonl(data_dir / "gsm8k/test.jsonl", cot_style="nl_annotated", limit=1)[0]
    assert annotated.steps == tuple(raw.rsplit("####", 1)[0].strip().split("\n"))  # the answer text as written
    assert annotated.steps == (
        "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.",
        "She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer’s market.",
    )
    assert (annotated.question, annotated.answer) == (nl.question, nl.answer)
    with pytest.raises(DataError, match="cot_style must be one of equation, nl, nl_annotated; got 'latex'"):
        read_gsm8k_jsonl(data_dir / "gsm8k/test.jsonl", cot_style="latex")


def test_gsm8k_comma_answers_normalised(data_dir):
    path = data_dir / "gsm8k/test.jsonl"
    raw = [json.loads(line)["answer"].rsplit("####", 1)[1].strip() for line in path.open(encoding="utf-8")]
    recs = read_gsm8k_jsonl(path)
    with_comma = [(a, r.answer) for a, r in zip(raw, recs) if "," in a]
    assert len(with_comma) == 14
    assert ("2,125", "2125") in with_comma
    assert all(norm == a.replace(",", "") and "," not in norm for a, norm in with_comma)


def test_gsm8k_aug_test_matches_gsm8k_test(data_dir):
    aug = read_icot(data_dir / "gsm8k-aug/test.txt")
    gsm = read_gsm8k_jsonl(data_dir / "gsm8k/test.jsonl")
    assert [r.question for r in aug] == [r.question for r in gsm]
    assert [r.answer for r in aug] == [r.answer for r in gsm]
    # test.txt's CoT is GSM8k's own annotations joined by spaces, so the equation steps agree too
    assert [r.steps for r in aug] == [r.steps for r in gsm]
    assert sum(1 for r in aug if not r.steps) == 18


def test_gsm_hard_floats_and_negatives(data_dir):
    recs = read_gsm_hard(data_dir / "gsm8k-hard/gsmhardv2.jsonl")
    assert len(recs) == 1319
    assert sum("." in r.answer for r in recs) == 303
    assert sum(r.answer.startswith("-") for r in recs) == 146
    assert recs[0].answer == "-9867630" and recs[1].answer == "3431580"
    assert all(r.steps == () and "e" not in r.answer for r in recs)
    assert recs[1].question.startswith("A robe takes 2287720 bolts")


def test_svamp_two_files_agree(data_dir):
    a = read_svamp(data_dir / "svamp/SVAMP.json")
    b = read_svamp(data_dir / "svamp/svamp_pal.jsonl")
    c = read_gsm_hard(data_dir / "svamp/svamp_pal.jsonl")
    assert len(a) == len(b) == 1000
    key = lambda r: (r.question, r.steps, r.answer)  # noqa: E731 - sources differ by file name only
    assert [key(r) for r in a] == [key(r) for r in b] == [key(r) for r in c]
    assert key(a[0]) == (
        "Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on each pack. "
        "How much do you have to pay to buy each pack?",
        (),
        "51",
    )
    assert a[1].source == f"{data_dir / 'svamp/SVAMP.json'}:10"  # line numbers inside the JSON array


def test_icot_nl_and_equation_steps(data_dir):
    nl = read_icot(data_dir / "gsm8k-aug/train_no_aug.txt", limit=2)
    assert nl[0].steps == (
        "The annual budget for policing is 32 / 2 = $16 million.",
        "The combined budget for education and policing is 16 + 12 = $28 million.",
        "There is 32 - 28 = $4 million to manage public spaces.",
    )
    # lines were joined without periods: "... = $6 The total ..." still breaks into 7 steps
    assert len(nl[1].steps) == 7 and nl[1].steps[1].startswith("The total price")
    assert nl[1].question.startswith("Due to the restrictions of Coronavirus, Mr. Trent")
    eq = read_icot(data_dir / "gsm8k-aug/partial_train_sample/middletrain.txt", limit=1)[0]
    assert eq.steps == ("<<600*30/100=180>>", "<<600*10/100=60>>", "<<180+60=240>>", "<<600-240=360>>")
    assert eq.answer == "360"


@pytest.mark.parametrize(
    "value,expected",
    [
        ("2,125", "2125"), ("18", "18"), (" 18 ", "18"), (3431580.0, "3431580"), ("3431580.0", "3431580"),
        (-12.5, "-12.5"), ("-12.50", "-12.5"), (2.0107e-06, "0.0000020107"), ("1e3", "1000"), ("36.", "36"),
        (".45", "0.45"), ("2/5", "0.4"), ("-0.0", "0"), (7, "7"), ("+5", "5"), ("007", "7"),
        ("1/3", None), ("abc", None), ("", None), ("12 apples", None), (float("nan"), None), (None, None),
        (True, None), ("5/0", None),
        # commas count only as thousands separators (issue 20: every comma used to be dropped, 1,5 -> 15)
        ("1,234,567.5", "1234567.5"), ("-1,000", "-1000"), ("1,5", None), ("12,34", None), ("1,2345", None),
        ("1,,000", None),
    ],
)
def test_normalize_number(value, expected):
    assert normalize_number(value) == expected


def test_icot_question_with_bars_splits_at_the_last_bars_before_the_cot(tmp_path):
    """A `||` inside the question stays in it (issue 20: the line was cut at its first `||`); a line without
    a separator before the CoT is counted, not guessed."""
    path = tmp_path / "bars.txt"
    path.write_text("Q d || with bars?||<<1+2=3>> #### 3\n"
                    "How many? a||b||<<2*3=6>> <<6+1=7>> #### 7\n"
                    "no separator <<1+1=2>> #### 2\n"
                    "nl style||She adds 2 and 2. #### 4\n"
                    "the bars come after #### 5 || x\n")
    skips = SkipLog()
    recs = read_icot(path, skips)
    assert [(r.question, r.steps, r.answer) for r in recs] == [
        ("Q d || with bars?", ("<<1+2=3>>",), "3"),
        ("How many? a||b", ("<<2*3=6>>", "<<6+1=7>>"), "7"),
        ("nl style", ("She adds 2 and 2.",), "4")]
    assert skips.counts == {"missing ||": 2} and skips.examples["missing ||"] == [f"{path}:3", f"{path}:5"]


def test_icot_bars_in_the_cot_and_angles_in_the_question_are_skips_with_their_reason(tmp_path):
    """A natural-language CoT holding `||` was cut there, silently (its first part read as the question's);
    with two `||` and no equation the split cannot be known, and iCoT's reader drops such lines: counted
    skips, as is a `||` inside an equation CoT. A `<<` in the question was "missing ||"; it says why."""
    path = tmp_path / "bars.txt"
    path.write_text("Q?||She has 2 || 3 apples, so 5. #### 5\n"
                    "nl style || two parts||She adds 2 and 2. #### 4\n"
                    "Q?||<<1+1=2>> || <<2+1=3>> #### 3\n"
                    "Is 3 << 2 twelve?||<<3*4=12>> #### 12\n"
                    "Q?||She has 2 and 3, so 5. #### 5\n")
    skips = SkipLog()
    recs = read_icot(path, skips)
    assert [(r.question, r.steps) for r in recs] == [("Q?", ("She has 2 and 3, so 5.",))]
    assert skips.examples == {"|| more than once in a natural-language line": [f"{path}:1", f"{path}:2"],
                              "|| in the CoT": [f"{path}:3"], "<< in the question": [f"{path}:4"]}
    assert skips.total == 4


def test_split_sentences_and_cot():
    assert split_sentences("It costs $3.50 each. He buys 2.5 kg! Mr. Lee pays 7. Done") == [
        "It costs $3.50 each.", "He buys 2.5 kg!", "Mr. Lee pays 7.", "Done",
    ]
    assert split_cot("  ") == ()
    assert split_cot("<<1+2=3>> <<3*2=6>>") == ("<<1+2=3>>", "<<3*2=6>>")
    assert split_cot("He has 3. She has 4.") == ("He has 3.", "She has 4.")


# ----------------------------------------------------------------------------------------------------
# bad records: one good line then one bad line, counted under its reason, or DataError at <path>:2

GOOD_ICOT = b"Tom has 2 apples. How many?||<<1+1=2>> #### 2\n"
GOOD_GSM8K = json.dumps({"question": "Q?", "answer": "a <<1+1=2>>2\n#### 2"}).encode() + b"\n"

BAD = [
    ("icot", GOOD_ICOT + b"Q?||<<1+1=2>> 2\n", "missing ####"),
    ("icot", GOOD_ICOT + b"Q?||<<1+1=2>> #### 2 #### 3\n", "duplicated ####"),
    ("icot", GOOD_ICOT + b"Q? <<1+1=2>> #### 2\n", "missing ||"),
    ("icot", GOOD_ICOT + b"Q?||He has 1 || 1. #### 2\n", "|| more than once in a natural-language line"),
    ("icot", GOOD_ICOT + b"Q?||<<1+1=2>> || <<2*1=2>> #### 2\n", "|| in the CoT"),
    ("icot", GOOD_ICOT + b"Is 1 << 1 two?||<<1+1=2>> #### 2\n", "<< in the question"),
    ("icot", GOOD_ICOT + b"Q?||<<1+1=2>> #### two\n", "non-numeric answer"),
    ("icot", GOOD_ICOT + b"Q?||<<1+1=2>> ####   \n", "empty answer"),
    ("icot", GOOD_ICOT + b"   ||<<1+1=2>> #### 2\n", "empty question"),
    ("icot", GOOD_ICOT + b"Q \xff\xfe?||<<1+1=2>> #### 2\n", "invalid utf-8"),
    ("gsm8k", GOOD_GSM8K + b'{"question": "Q?", "answer": "#### 2"', "invalid json"),
    ("gsm8k", GOOD_GSM8K + b'{"problem": "Q?", "solution": "#### 2"}\n', "missing field: question"),
    ("gsm8k", GOOD_GSM8K + b'{"question": "Q?", "solution": "#### 2"}\n', "missing field: answer"),
    ("gsm8k", GOOD_GSM8K + b'{"question": "Q?", "answer": "x 2"}\n', "missing ####"),
    ("gsm8k", GOOD_GSM8K + b'{"question": "Q?", "answer": "#### 1 #### 2"}\n', "duplicated ####"),
    ("gsm8k", GOOD_GSM8K + b'{"question": "Q?", "answer": "#### n/a"}\n', "non-numeric answer"),
    ("gsm8k", GOOD_GSM8K + b'{"question": "", "answer": "#### 2"}\n', "empty question"),
    ("gsm8k", GOOD_GSM8K + b'{"question": "Q\xc3?", "answer": "#### 2"}\n', "invalid utf-8"),
    ("gsm8k", GOOD_GSM8K + b"[1, 2]\n", "not a json object"),
    ("gsm_hard", b'{"input": "Q?", "target": 2.0}\n{"input": "Q?", "answer": 2.0}\n', "missing field: target"),
    ("gsm_hard", b'{"input": "Q?", "target": 2.0}\n{"input": "Q?", "target": null}\n', "empty answer"),
    ("jsonl", b'{"question": "Q?", "steps": [], "answer": 2}\n{"question": "Q?", "answer": 2}\n', "missing field: steps"),
    ("jsonl", b'{"question": "Q?", "steps": [], "answer": 2}\n{"question": "Q?", "steps": [1], "answer": 2}\n',
     "bad field type: steps"),
]


@pytest.mark.parametrize("fmt,content,reason", BAD, ids=[f"{f}-{r}" for f, _, r in BAD])
def test_bad_record_counted_or_raised(tmp_path, fmt, content, reason):
    path = tmp_path / ("data.txt" if fmt == "icot" else "data.jsonl")
    path.write_bytes(content)
    skips = SkipLog()
    recs = load_records(path, fmt, skips=skips)
    assert len(recs) == 1 and recs[0].answer == "2"
    assert skips.counts == {reason: 1}
    assert skips.examples[reason] == [f"{path}:2"]
    with pytest.raises(DataError) as e:
        load_records(path, fmt, strict=True)
    assert f"{path}:2: {reason}" in str(e.value)


def test_svamp_json_array_bad_element(tmp_path):
    path = tmp_path / "SVAMP.json"
    rows = [{"Body": "He has 3 pens", "Question": "How many?", "Answer": 3.0}, {"Body": "x", "Question": "y?"}]
    path.write_text(json.dumps(rows, indent=1))
    skips = SkipLog()
    recs = load_records(path, skips=skips)
    assert [(r.question, r.answer) for r in recs] == [("He has 3 pens. How many?", "3")]
    assert skips.counts == {"missing field: Answer": 1}
    assert skips.examples["missing field: Answer"] == [f"{path}:7"]
    path.write_text(json.dumps(rows)[:-5])  # truncated array: cannot resynchronise, so always an error
    with pytest.raises(DataError, match="invalid json"):
        load_records(path)


@pytest.mark.parametrize("name", ["data.txt", "data.jsonl", "SVAMP.json"])
def test_empty_and_missing_files(tmp_path, name):
    path = tmp_path / name
    with pytest.raises(DataError, match=re.escape(f"{path}: file not found")):
        load_records(path)
    path.write_text("\n")
    with pytest.raises(DataError, match=re.escape(f"{path}: no records")):
        load_records(path)
    for reader in (read_icot, read_gsm8k_jsonl, read_gsm_hard, read_svamp, read_jsonl):
        with pytest.raises(DataError, match="no records"):
            reader(path)
    (tmp_path / "missing").mkdir()
    with pytest.raises(DataError, match="file not found"):
        read_icot(tmp_path / "missing" / name)


def test_all_bad_records_is_no_records(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("a||b #### x\nc||d\n")
    skips = SkipLog()
    with pytest.raises(DataError, match=r"no records \(skipped 2 records"):
        read_icot(path, skips)
    assert skips.counts == {"non-numeric answer": 1, "missing ####": 1}


def test_generic_jsonl_and_dispatch(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [
        {"q": "A?", "cot": "<<2*3=6>> <<6+1=7>>", "a": "7"},
        {"q": "B?", "cot": "He has 2.5 kg. Then 3 more.", "a": 5.5},
        {"q": "C?", "cot": ["<<1+1=2>>", " "], "a": "1,002"},
        {"q": "D?", "cot": None, "a": "4"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs = read_jsonl(path, question_field="q", steps_field="cot", answer_field="a")
    assert [(r.question, r.steps, r.answer) for r in recs] == [
        ("A?", ("<<2*3=6>>", "<<6+1=7>>"), "7"),
        ("B?", ("He has 2.5 kg.", "Then 3 more."), "5.5"),
        ("C?", ("<<1+1=2>>",), "1002"),
        ("D?", (), "4"),
    ]
    assert detect_format(path) == "jsonl"
    via = load_records(path, fields={"question": "q", "steps": "cot", "answer": "a"}, limit=2)
    assert via == recs[:2]
    assert read_jsonl(path, "q", None, "a")[0].steps == ()
    with pytest.raises(DataError, match="unknown data format"):
        load_records(path, "csv")


def test_directory_with_split_and_limit(data_dir):
    recs = load_records(data_dir / "gsm8k-aug", split="valid", limit=3)
    assert len(recs) == 3 and recs[0].source.endswith("valid.txt:1")
    with pytest.raises(DataError, match="split="):
        load_records(data_dir / "gsm8k-aug")
    with pytest.raises(DataError, match="no file nope"):
        load_records(data_dir / "gsm8k-aug", split="nope")


def test_hub_detection():
    assert detect_format("whynlp/gsm8k-aug") == "hub"
    assert detect_format("openai/gsm8k") == "hub"
    with pytest.raises(DataError, match="file not found"):
        detect_format("data/train.txt")  # looks like owner/name, but has a file extension
    with pytest.raises(DataError, match="needs split="):
        load_records("whynlp/gsm8k-aug")


# ----------------------------------------------------------------------------------------------------
# hub schema mapping, with locally built datasets (no network)

HUB_ROWS = {
    "steps": [{"question": "Q1?", "steps": ["<<16-3-4=9>>", "<<9*2=18>>"], "answer": "18"}],
    "cot": [{"question": "Q1?", "cot": "<<16-3-4=9>> <<9*2=18>>", "answer": "18"}],
    "gsm8k": [{"question": "Q1?", "answer": "She sells 16 - 3 - 4 = <<16-3-4=9>>9.\nShe makes 9*2 = <<9*2=18>>18.\n#### 18"}],
    "gsm_hard": [{"input": "Q1?", "code": "def solution(): ...", "target": 18.0}],
    "svamp": [{"ID": "chal-1", "Body": "Q1", "Question": "How many?", "Equation": "( 9.0 * 2.0 )", "Answer": 18.0,
               "Type": "Multiplication"}],
}
HUB_EXPECTED = {
    "steps": Record("Q1?", ("<<16-3-4=9>>", "<<9*2=18>>"), "18", "hub[train]:0"),
    "cot": Record("Q1?", ("<<16-3-4=9>>", "<<9*2=18>>"), "18", "hub[train]:0"),
    "gsm8k": Record("Q1?", ("<<16-3-4=9>>", "<<9*2=18>>"), "18", "hub[train]:0"),
    "gsm_hard": Record("Q1?", (), "18", "hub[train]:0"),
    "svamp": Record("Q1. How many?", (), "18", "hub[train]:0"),
}


@pytest.mark.parametrize("schema", sorted(HUB_ROWS))
def test_records_from_dataset_rows(schema):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(HUB_ROWS[schema])
    assert readers.infer_schema(ds.column_names) == schema
    assert records_from_rows(ds, schema, "hub[train]") == [HUB_EXPECTED[schema]]


def test_records_from_rows_skips_and_nl():
    datasets = pytest.importorskip("datasets")
    rows = HUB_ROWS["gsm8k"] + [{"question": "Q2?", "answer": "no marker"}]
    skips = SkipLog()
    recs = records_from_rows(datasets.Dataset.from_list(rows), "gsm8k", "openai/gsm8k[test]", cot_style="nl", skips=skips)
    assert recs[0].steps == ("She sells 16 - 3 - 4 = 9.", "She makes 9*2 = 18.")
    assert skips.examples == {"missing ####": ["openai/gsm8k[test]:1"]}
    with pytest.raises(DataError, match=r"openai/gsm8k\[test\]:1: missing ####"):
        records_from_rows(rows, "gsm8k", "openai/gsm8k[test]", skips=SkipLog(strict=True))
    fields = [{"problem": "P?", "solution": ["s1", "s2"], "final": 3}]
    out = records_from_rows(fields, "fields", "x", fields={"question": "problem", "steps": "solution", "answer": "final"})
    assert out == [Record("P?", ("s1", "s2"), "3", "x:0")]


def test_a_records_index_is_its_entrys_place_with_the_skipped_ones_counted(tmp_path):
    """`Record.index` in every reader: the line, element or row the record came from, each skipped one before it
    counted (blank lines are no entries), also when the `SkipLog` already holds skips of another file."""
    def earlier():
        skips = SkipLog()
        skips.skip("empty question", "another.jsonl:1")
        return skips

    rows = [{"question": "Q0?", "answer": "x #### 1"}, {"question": "Q1?", "answer": "no marker"}, "not a row",
            {"question": "Q3?", "answer": "x #### 3"}]
    assert [r.index for r in records_from_rows(rows, "gsm8k", "h", skips=earlier())] == [0, 3]
    jl = tmp_path / "a.jsonl"
    jl.write_text('{"question": "Q0?", "answer": 1}\nnot json\n\n[1]\n{"question": "", "answer": 2}\n'
                  '{"question": "Q5?", "answer": 5}\n')
    assert [r.index for r in read_jsonl(jl, steps_field=None, skips=earlier())] == [0, 4]
    arr = tmp_path / "a.json"
    arr.write_text('[{"input": "Q0?", "target": 1}, 7, {"input": "Q2?", "target": "x"}, {"input": "Q3?", "target": 3}]')
    assert [r.index for r in read_gsm_hard(arr, skips=earlier())] == [0, 3]
    txt = tmp_path / "a.txt"
    txt.write_text("Q0||<<1+1=2>> #### 2\nno bars\n\nQ2||<<2+2=4>> #### 4\nQ3||<<3+3=6>> #### 6\n")
    assert [r.index for r in read_icot(txt, skips=earlier())] == [0, 2, 3]
    assert [r.index for r in read_icot(txt, limit=2)] == [0, 2]


def test_read_hub_uses_schema_and_config(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(hub_id, config=None, split=None):
        calls.append((hub_id, config, split))
        schema = {"openai/gsm8k": "gsm8k", "whynlp/gsm8k-aug-nl": "steps", "ChilleD/SVAMP": "svamp"}.get(hub_id, "cot")
        return datasets.Dataset.from_list(HUB_ROWS[schema])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert read_hub("openai/gsm8k", "test")[0].steps == ("<<16-3-4=9>>", "<<9*2=18>>")
    assert read_hub("whynlp/gsm8k-aug-nl", "validation")[0].source == "whynlp/gsm8k-aug-nl[validation]:0"
    assert read_hub("someone/unknown", "train")[0].steps == ("<<16-3-4=9>>", "<<9*2=18>>")  # schema inferred: cot
    assert load_records("openai/gsm8k", split="test")[0].answer == "18"
    recs, desc = load_eval_dataset("svamp", hub=True)
    assert recs[0].question == "Q1. How many?" and desc == "SVAMP (hub ChilleD/SVAMP, split train+test), 1 problems (expected 1000)"
    assert calls[0] == ("openai/gsm8k", "main", "test") and calls[-1] == ("ChilleD/SVAMP", None, "train+test")

    def failing(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(DataError, match="whynlp/gsm8k-aug: could not load split 'train'.*no network"):
        read_hub("whynlp/gsm8k-aug", "train")


def test_read_hub_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(ImportError, match=re.escape("pip install 'kava-latent[hub]'")):
        read_hub("whynlp/gsm8k-aug", "train")


# ----------------------------------------------------------------------------------------------------
# evaluation sets


@pytest.mark.parametrize(
    "name,n,rel",
    [
        ("gsm8k", 1319, "gsm8k/test.jsonl"),
        ("gsm8k-hard", 1319, "gsm8k-hard/gsmhardv2.jsonl"),
        ("svamp", 1000, "svamp/SVAMP.json"),
        ("gsm8k-aug-valid", 500, "gsm8k-aug/valid.txt"),
    ],
)
def test_load_eval_dataset(data_dir, name, n, rel):
    recs, desc = load_eval_dataset(name, data_dir)
    assert len(recs) == n
    assert desc == f"{EVAL_DATASETS[name].label} ({data_dir / rel}), {n} problems"
    assert desc.startswith({"gsm8k": "gsm8k test (", "gsm8k-hard": "GSM-Hard (", "svamp": "SVAMP (",
                            "gsm8k-aug-valid": "gsm8k-aug valid ("}[name])


def test_load_eval_dataset_env_and_errors(data_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("KAVA_DATA_DIR", str(data_dir))
    assert len(load_eval_dataset("gsm8k")[0]) == 1319
    with pytest.raises(DataError, match="unknown evaluation set"):
        load_eval_dataset("mmlu", data_dir)
    with pytest.raises(DataError, match="only locally"):
        load_eval_dataset("synth-test", hub=True)
    with pytest.raises(DataError, match="file not found"):
        load_eval_dataset("synth-test", tmp_path)


# ---------------------------------------------------------------------------------------- equation-only GSM8k
def test_gsm8k_equation_form_reproduces_gsm8k_aug_test_and_valid_exactly(data_dir, tmp_path):
    """GSM8k-Aug's test/valid files are GSM8k's calculator annotations joined by spaces: the `gsm8k` reader
    with cot_style=equation plus `icot_line` must give them back line for line (1,319 of 1,319)."""
    from kava.data.readers import gsm8k_icot_lines, icot_line, read_gsm8k_jsonl, read_icot, write_icot

    lines = gsm8k_icot_lines(data_dir / "gsm8k" / "test.jsonl")
    ref = (data_dir / "gsm8k-aug" / "test.txt").read_text().splitlines()
    assert len(lines) == len(ref) == 1319
    assert sum(a == b for a, b in zip(lines, ref)) == 1319
    # the records agree too (answers normalised on both sides: "2,125" -> "2125")
    out = tmp_path / "test_eq.txt"
    assert write_icot(lines, out) == 1319 and out.read_text().splitlines() == ref
    mine = read_gsm8k_jsonl(data_dir / "gsm8k" / "test.jsonl", "equation")
    theirs = read_icot(data_dir / "gsm8k-aug" / "test.txt")
    assert [(r.question, r.steps, r.answer) for r in mine] == [(r.question, r.steps, r.answer) for r in theirs]
    assert icot_line(mine[0]) == ref[0]
    # the valid file: 500 lines, each one a GSM8k *train* question in the same form
    train_lines = set(gsm8k_icot_lines(data_dir / "gsm8k" / "train.jsonl"))
    valid = (data_dir / "gsm8k-aug" / "valid.txt").read_text().splitlines()
    assert len(valid) == 500 and all(v in train_lines for v in valid)


def test_exclude_valid_questions_gives_the_6973_train_questions_and_counts_the_500(data_dir):
    """GSM8k train minus GSM8k-Aug's valid questions: exactly the questions of train_no_aug.txt; the 500
    dropped ones are counted skips (and without the option nothing is dropped)."""
    from kava.config import load_config
    from kava.data.pipeline import load_train_valid, question_key
    from kava.data.records import SkipLog

    sets = ["model.name_or_path=unused", f"data.source={data_dir}/gsm8k/train.jsonl", "data.format=gsm8k", "data.cot_style=equation",
            f"data.valid_source={data_dir}/gsm8k-aug/valid.txt", "data.valid_limit=50"]
    skips = SkipLog()
    train, valid, desc = load_train_valid(load_config(None, sets + ["data.exclude_valid_questions=true"]),
                                          data_dir, skips)
    text = (data_dir / "gsm8k-aug" / "train_no_aug.txt").read_text(encoding="utf-8")
    nl = [ln.split("||")[0] for ln in text.split("\n") if ln.strip()]  # not splitlines: U+2028 is in questions
    assert len(train) == len(nl) == 6973
    assert sorted(question_key(r.question) for r in train) == sorted(question_key(q) for q in nl)  # iCoT shuffled
    assert skips.counts == {"question in the validation set": 500}
    assert len(valid) == 50 and "excluded" in desc  # valid_limit limits validation, not the exclusion
    skips2 = SkipLog()
    train2, _, _ = load_train_valid(load_config(None, sets), data_dir, skips2)
    assert len(train2) == 7473 and skips2.total == 0


def test_format_is_decided_by_the_majority_of_the_first_records_not_the_first_line(tmp_path, capsys):
    """A GSM8k JSONL whose first line is truncated is still GSM8k: 51 good records read, the bad line counted
    as invalid json, and the guess (and how it was made) named where the source is shown."""
    from kava.cli import main

    good = [json.dumps({"question": f"Tom has {i} apples . He buys 1 more . How many ?",
                        "answer": f"He has <<{i}+1={i + 1}>> {i + 1}.\n#### {i + 1}"}) for i in range(51)]
    p = tmp_path / "gsm8k_test.jsonl"
    p.write_text('{"question": "cut short", "answ\n' + "\n".join(good) + "\n")
    assert readers.detect_format_reason(p) == ("gsm8k", "detected from 49 of the first 50 records")
    skips = SkipLog()
    recs = load_records(p, skips=skips)
    assert len(recs) == 51 and recs[0].steps == ("<<0+1=1>>",) and dict(skips.counts) == {"invalid json": 1}
    assert main(["data", str(p), "--output", str(tmp_path / "out"), "--num-latents", "2"]) == 0
    out = capsys.readouterr().out
    assert f"source: {p} (format gsm8k (auto: detected from 49 of the first 50 records))" in out
    assert "records: 51; skipped 1 records (invalid json: 1)" in out
    # a tie goes to the earliest format; no JSON object at all in a .jsonl: generic JSONL, which reports the lines
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"question": "q", "steps": [], "answer": "1"}) + "\n" + good[0] + "\n")
    assert readers.detect_format(mixed) == "jsonl"
    junk = tmp_path / "junk.jsonl"
    junk.write_text("not json\n")
    assert readers.detect_format_reason(junk) == ("jsonl", "none of the first 1 records is a JSON object")


def test_a_missing_relative_file_says_where_it_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=re.escape(f"data/x.jsonl: file not found (looked at {tmp_path}/data/x.jsonl)")):
        load_records("data/x.jsonl")
