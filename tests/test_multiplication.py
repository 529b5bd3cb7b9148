"""iCoT's multiplication task: the generator reproduces every published valid and test line from its inputs, the
reader keeps digit-string answers as written, the scorer matches digit sequences exactly, every digit and symbol
is one token, the generated splits are deterministic and disjoint and avoid the excluded questions, and a tiny
`kava train` + `kava eval` of cot and icot runs on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kava.cli import main as cli
from kava.config import load_config
from kava.data import multiplication as mult
from kava.data.pipeline import answer_kind, synthetic_single_tokens
from kava.data.readers import detect_format, load_eval_dataset, load_records
from kava.data.records import SkipLog
from kava.data.tokenizer import build_tokenizer, tokenizer_texts
from kava.scoring import answer_matches, digit_agreement, digit_places, extract, extract_digits, score_predictions

SIZES = (4, 5, 7, 9)


def naive_line(a: int, b: int, n: int) -> str:
    """The published rule computed independently of `kava.data.multiplication`: numbers as reversed zero-padded
    strings, partial products and running sums by plain integer arithmetic."""
    def rev(x: int, w: int) -> str:
        return " ".join(str(x).zfill(w)[::-1])

    parts, sums, total = [], [], 0
    for i in range(n):
        p = a * ((b // 10**i) % 10) * 10**i
        total += p
        parts.append(rev(p, n + 1 + i))
        sums.append(rev(total, n + 1 + i))
    cot = parts[0]
    for i in range(1, n):
        cot += " + " + parts[i] + (f" ( {sums[i]} )" if i < n - 1 else "")
    return f"{rev(a, n)} * {rev(b, n)}||{cot} #### {rev(a * b, 2 * n)}"


def published(data_dir: Path, n: int, name: str) -> list[str]:
    return (data_dir / "multiplication" / f"{n}x{n}" / name).read_text().splitlines()


def test_generator_reproduces_every_published_line(data_dir):
    """8,000 of 8,000: each published valid and test line equals the generator's line for its two operands."""
    total = same = same_naive = 0
    for n in SIZES:
        for name in ("valid.txt", "test_bigbench.txt"):
            for line in published(data_dir, n, name):
                a, b, k = mult.parse_question(line.split("||")[0])
                assert k == n and 10 ** (n - 1) <= a < 10**n and 10 ** (n - 1) <= b < 10**n
                total += 1
                same += mult.mult_line(a, b, n) == line
                same_naive += naive_line(a, b, n) == line
    assert (total, same, same_naive) == (8000, 8000, 8000)


def test_reader_keeps_digit_answers_and_steps(data_dir):
    """`kava data` used to skip every line ("non-numeric answer"); now every record is read, its answer is the
    digit string as written, and its steps (one per digit of B) joined by spaces are the CoT text."""
    path = data_dir / "multiplication" / "5x5" / "valid.txt"
    assert detect_format(path) == "multiplication"
    skips = SkipLog()
    recs = load_records(path, skips=skips)
    assert len(recs) == 1000 and skips.total == 0
    for r, line in zip(recs, published(data_dir, 5, "valid.txt")):
        q, rest = line.split("||")
        cot, ans = rest.split(" #### ")
        assert (r.question, " ".join(r.steps), r.answer, r.answer_kind) == (q, cot, ans, "digits")
        assert len(r.steps) == 5 and r.steps[1].startswith("+ ") and "(" in r.steps[1] and "(" not in r.steps[-1]
    first = recs[0]
    a, b, _ = mult.parse_question(first.question)
    assert mult.read_lsd(first.answer) == a * b


def test_reader_counts_bad_lines(tmp_path, data_dir):
    lines = published(data_dir, 4, "valid.txt")[:3]
    wrong = lines[1].rsplit(" #### ", 1)[0] + " #### " + " ".join("0" * 8)  # not A x B
    path = tmp_path / "m.txt"
    path.write_text("\n".join([lines[0], wrong, lines[2], "12 * 34||4 #### 408"]) + "\n")
    skips = SkipLog()
    recs = load_records(path, "multiplication", skips=skips)
    assert [r.question for r in recs] == [lines[0].split("||")[0], lines[2].split("||")[0]]
    assert [r.index for r in recs] == [0, 2]  # the line's place in the file, the skipped one counted
    assert skips.counts == {"answer is not A x B with 2n digits": 1,
                            "not a multiplication line (A * B||CoT #### C, digits least significant first)": 1}
    assert load_records(path, "multiplication", limit=0, skips=SkipLog()) == []


def test_named_eval_sets(data_dir):
    recs, desc = load_eval_dataset("mult5-test", data_dir)
    assert len(recs) == 1000 and "test_bigbench.txt" in desc and "expected" not in desc
    assert all(r.answer_kind == "digits" for r in recs)


@pytest.mark.parametrize("text,strict,flexible", [
    (" 5 5 6 0 8 2 0 1", "5 5 6 0 8 2 0 1", "5 5 6 0 8 2 0 1"),
    ("5 5 5 6 1 + 0 0 6 #### 0 0 6", "0 0 6", "0 0 6"),
    (" #### 55608201", "5 5 6 0 8 2 0 1", "5 5 6 0 8 2 0 1"),
    (" #### x 1 2", None, "1 2"),
    ("", None, None),
])
def test_extract_digits(text, strict, flexible):
    assert extract_digits(text, "####") == {"strict": strict, "flexible": flexible}


def test_digits_are_matched_exactly_never_as_numbers():
    """Leading zeros count, a longer or shorter run is wrong, and numeric normalisation never applies."""
    assert answer_matches("0 0 6", "0 0 6", "digits")
    assert not answer_matches("6", "0 0 6", "digits")  # as numbers these would be equal
    assert answer_matches("6", "6", "number") and answer_matches("6.0", "6", "number")
    assert not answer_matches("0 0 6 0", "0 0 6", "digits") and not answer_matches("0 0", "0 0 6", "digits")
    assert not answer_matches(None, "0 0 6", "digits")
    assert extract(" 0 0 6 0<eos>", "digits", "####")["strict"] == "0 0 6 0"
    from kava.data.records import Record

    recs = [Record("1 * 2", (), "2 0", answer_kind="digits"), Record("q", (), "20")]
    res = score_predictions([" #### 2 0", " #### 20"], recs, answer_prompt="####")
    assert res["correct"] == [True, True]
    res = score_predictions([" #### 2", " #### 20.0"], recs, answer_prompt="####")
    assert res["correct"] == [False, True]
    with pytest.raises(ValueError, match="unknown answer kind"):
        extract("1", "words")


def naive_digit_share(pred, gold):
    """The graded score written out: position by position over the gold digits."""
    g = [c for c in gold if c.isdigit()]
    p = [c for c in (pred or "") if c.isdigit()]
    hits = 0
    for i in range(len(g)):
        if i < len(p) and p[i] == g[i]:
            hits += 1
    return hits / len(g)


@pytest.mark.parametrize("pred,gold", [("0 0 6", "0 0 6"), ("6", "0 0 6"), ("0 0 6 0 9", "0 0 6"), (None, "1 2"),
                                       ("1 3 3 4", "1 2 3 4"), ("9 9 9 9", "1 2 3 4"), ("", "5")])
def test_digit_agreement_is_the_share_of_gold_digits_in_place(pred, gold):
    assert digit_agreement(pred, gold) == naive_digit_share(pred, gold)
    assert (digit_agreement(pred, gold) == 1.0) == answer_matches(pred, gold, "digits") or \
        len("".join((pred or "").split())) > len("".join(gold.split()))  # extra digits: exact match fails


def test_per_place_accuracy_of_the_table_script(tmp_path):
    """`table.py --places`: the accuracy of each answer digit over a run's predictions, against a count by hand;
    a place a shorter gold does not have is averaged over the golds that have it."""
    import importlib.util

    assert digit_places("1 3 3", "1 2 3 4") == [True, False, True, False]
    assert digit_places(None, "5") == [False]
    rows = [("1 2 3", "1 2 3"), ("1 0 3", "1 2 3"), ("0 2", "1 2 3"), ("7 2 3 4", "7 2 3 4")]
    pred = tmp_path / "run" / "eval" / "mult4-test" / "predictions.jsonl"
    pred.parent.mkdir(parents=True)
    pred.write_text("".join(json.dumps({"extracted": p, "gold": g, "correct": p == g, "forward_passes": 9}) + "\n"
                            for p, g in rows))
    table = Path(__file__).resolve().parents[1] / "experiments" / "multiplication" / "table.py"
    spec = importlib.util.spec_from_file_location("mult_table", table)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.places(pred) == [3 / 4, 3 / 4, 3 / 4, 1 / 1]


def test_one_token_per_digit_and_symbol(tmp_path, data_dir):
    """The local tokenizer of a multiplication run: every whitespace-separated digit or symbol of the published
    lines is one token, and decoding gives the text back exactly."""
    cfg = load_config("mult5_scratch")
    recs = load_records(data_dir / "multiplication" / "5x5" / "valid.txt")
    tok = build_tokenizer(tokenizer_texts(recs[:200], cfg.data.answer_prompt), tmp_path / "tok", vocab_size=300,
                          single_tokens=synthetic_single_tokens(cfg))
    for r in recs[:50]:
        for text in (r.question, " " + " ".join(r.steps), " " + cfg.data.answer_prompt, " " + r.answer):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert len(ids) == len(text.split()) and tok.decode(ids) == text
    assert answer_kind(cfg) == "digits" and answer_kind(load_config("tiny_synth")) == "number"


def test_the_official_layout_keeps_both_separators_when_the_cot_is_removed(tmp_path, data_dir):
    """data.question_suffix "$" with answer_prompt "$ ####" gives the official iCoT sequence question SEP CoT
    SEP #### answer: one token each, and with every CoT token removed (iCoT's end) question SEP SEP ####
    answer; the digits read back and score as before."""
    from kava.curriculum import for_config
    from kava.data.format import Formatter, add_special_tokens, build_teacher_batch

    cfg = load_config("mult4_scratch", ["data.question_suffix=$", "data.answer_prompt='$ ####'", "method=icot"])
    recs = load_records(data_dir / "multiplication" / "4x4" / "valid.txt")[:8]
    tok = build_tokenizer(tokenizer_texts(recs, cfg.data.answer_prompt), tmp_path / "tok", vocab_size=300,
                          single_tokens=synthetic_single_tokens(cfg))
    ids = add_special_tokens(tok)
    sep, hashes = (tok.convert_tokens_to_ids(tok.tokenize(x))[0] for x in (" $", " ####"))
    plain = Formatter.from_config(load_config("mult4_scratch"), tok).tokenize_all(recs, SkipLog())
    items = Formatter.from_config(cfg, tok).tokenize_all(recs, SkipLog())
    for it, p in zip(items, plain):
        assert it.question == p.question + [sep] and it.cot == p.cot and it.answer == p.answer
        assert it.prompt == [sep, hashes] and p.prompt == [hashes]
    gone = for_config(cfg, steps_per_epoch=1).apply(items, 10_000).items  # far past the longest CoT: all removed
    tb = build_teacher_batch(gone, ids)
    for b, it in enumerate(items):
        row = tb.ids[b][tb.mask[b].bool()].tolist()
        assert row == it.question + [sep, hashes] + it.answer  # question (its SEP) · SEP #### · answer eos
    text = tok.decode(items[0].question + items[0].prompt + items[0].answer[:-1])
    assert extract(text, "digits", cfg.data.answer_prompt)["strict"] == recs[0].answer


def test_generated_splits_are_deterministic_disjoint_and_exclude(tmp_path):
    """Each split is a pure function of (seed, digits, split); no question repeats within or across splits; none
    of the excluded questions is drawn (2-digit operands: 8,100 pairs, so collisions are certain)."""
    sizes = {"train": 1500, "valid": 200, "test": 200}
    exclude = [mult.question(a, b, 2) for a in range(10, 40) for b in range(10, 40)]  # 900 of the 8,100 pairs
    m1 = mult.write_multiplication(tmp_path / "a", sizes, seed=3, digits=2, exclude=exclude)
    mult.write_multiplication(tmp_path / "b", sizes, seed=3, digits=2, exclude=exclude)
    m3 = mult.write_multiplication(tmp_path / "c", {"train": 10, "valid": 200, "test": 200}, seed=3, digits=2,
                                   exclude=exclude)
    split = {s: (tmp_path / "a" / f"{s}.txt").read_text().splitlines() for s in sizes}
    for s in sizes:
        assert split[s] == (tmp_path / "b" / f"{s}.txt").read_text().splitlines()
    for s in ("valid", "test"):  # train's size does not change the eval splits
        assert split[s] == (tmp_path / "c" / f"{s}.txt").read_text().splitlines()
    qs = [ln.split("||")[0] for s in sizes for ln in split[s]]
    assert len(qs) == len(set(qs)) == 1900 and not set(qs) & set(exclude)
    assert all(mult.mult_line(*mult.parse_question(ln.split("||")[0])) == ln for s in sizes for ln in split[s])
    assert all(ln[2] != "0" and ln.split(" * ")[1][2] != "0" for s in sizes for ln in split[s])  # leading digits
    assert m1["redrawn"]["train"]["excluded"] > 0 and m1["redrawn"]["train"]["within_or_across_splits"] > 0
    assert m1["counts"] == sizes and m3["exclusion_key"] == m1["exclusion_key"] == mult.exclusion_key(exclude)
    with pytest.raises(ValueError, match="at most half"):
        mult.write_multiplication(tmp_path / "d", {"train": 50}, digits=1)


def test_preset_excludes_the_published_sets_from_training(tmp_path, data_dir):
    """The presets' data: the published valid and test questions are never in the generated training set, and
    validation reads the published valid.txt."""
    from kava.data.pipeline import load_train_valid

    root = data_dir / "multiplication" / "4x4"
    cfg = load_config("mult4_scratch", [f"data.synth_exclude=[{root / 'valid.txt'}, {root / 'test_bigbench.txt'}]",
                                        f"data.valid_source={root / 'valid.txt'}", "data.synth_train_size=3000",
                                        "data.synth_eval_size=10", "data.valid_limit=null"])
    train, valid, desc = load_train_valid(cfg, tmp_path, SkipLog())
    held = {ln.split("||")[0] for name in ("valid.txt", "test_bigbench.txt") for ln in published(data_dir, 4, name)}
    assert len(train) == 3000 and not {r.question for r in train} & held
    assert len(valid) == 1000 and "valid.txt" in desc
    meta = json.loads(next(tmp_path.glob("mult4_*_x*")).joinpath("meta.json").read_text())
    assert meta["excluded_questions"] == 2000


TINY = ["model.from_scratch.n_embd=32", "model.from_scratch.n_layer=1", "data.synth_digits=2",
        "data.synth_exclude=[]", "data.valid_source=null", "data.synth_train_size=300", "data.synth_eval_size=8",
        "data.valid_limit=4", "optim.effective_batch=16", "optim.micro_batch=16", "optim.max_steps=4",
        "run.eval_every=2", "run.eval_batch_size=8", "icot.tokens_per_epoch=20"]


@pytest.mark.parametrize("method", ["cot", "icot"])
def test_train_and_eval_end_to_end(method, tmp_path):
    """`kava train` from scratch on generated 2x2 products, then `kava eval` on its own test split: every problem
    scored as a digit string, in free generation (iCoT generates whatever CoT it still writes)."""
    sets = [f"method={method}", f"run.output_dir={tmp_path}", f"run.name={method}"]
    assert cli(["train", "--config", "mult4_scratch", "--no-progress", *sum((["--set", s] for s in TINY + sets), [])]) == 0
    rd = tmp_path / method
    assert cli(["eval", "--checkpoint", str(rd), "--datasets", "synth-test"]) == 0
    s = json.loads((rd / "eval" / "synth-test" / "summary.json").read_text())
    assert s["count"] == 8 and s["mode"] == "cot" and 0.0 <= s["accuracy"] <= 1.0
    rows = [json.loads(x) for x in (rd / "eval" / "synth-test" / "predictions.jsonl").read_text().splitlines()]
    assert all(len(r["gold"].split()) == 4 for r in rows)
    assert all(r["correct"] == answer_matches(r["extracted"], r["gold"], "digits") for r in rows)
    # the graded score: per row from the extracted answer, and its mean in the summary
    assert all(r["digits"] == naive_digit_share(r["extracted"], r["gold"]) for r in rows)
    assert s["accuracy_digits"] == pytest.approx(sum(r["digits"] for r in rows) / len(rows))
    done = json.loads((rd / "DONE").read_text())
    assert ("curriculum" in done["best"]) == (method == "icot")
    vals = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    vals = [v for v in vals if v.get("split") == "val"]
    assert vals and all(0.0 <= v["val/digits"] <= 1.0 for v in vals) and "val/digits" in done["best"]
    # each answer place's accuracy, in the summary and at every validation: the naive count of the predictions
    by_place = [sum(r["extracted"] is not None and len("".join(r["extracted"].split())) > k and
                    "".join(r["extracted"].split())[k] == r["gold"].split()[k] for r in rows) / len(rows)
                for k in range(4)]
    assert s["accuracy_by_place"] == pytest.approx(by_place)
    assert sum(s["accuracy_by_place"]) / 4 == pytest.approx(s["accuracy_digits"])  # all golds have 4 digits
    assert all(sorted(k for k in v if k.startswith("val/place")) == [f"val/place{k}" for k in range(4)] for v in vals)
    assert all(sum(v[f"val/place{k}"] for k in range(4)) / 4 == pytest.approx(v["val/digits"]) for v in vals)
    # the teacher-forced accuracy of what is left of the gold CoT and of the answer, at every validation
    assert all(0.0 <= v["val/tf_answer"] <= 1.0 and 0.0 <= v.get("val/tf_cot", 0.0) <= 1.0 for v in vals)


def test_place_accuracy_averages_each_place_over_the_answers_that_have_it():
    from kava.scoring import digit_places, place_accuracy

    places = [digit_places("1 2 3", "1 2 4"), digit_places("9 2", "1 2 3 4"), digit_places(None, "5 6")]
    assert places == [[True, True, False], [False, True, False, False], [False, False]]
    assert place_accuracy(places) == pytest.approx([1 / 3, 2 / 3, 0.0, 0.0])
    assert place_accuracy([]) == []


def test_the_validation_line_shows_the_digits_in_place_for_digit_answers():
    from kava.training.progress import validation_line

    best = {"val/accuracy": 0.0, "val/digits": 0.3, "step": 500}
    assert validation_line(1000, 0.0, best, 0.3125) == \
        "[kava] step 1000: val accuracy 0.0000, digits 0.3125 (best 0.0000 at step 500)"
    assert validation_line(1000, 0.5, best) == "[kava] step 1000: val accuracy 0.5000 (best 0.0000 at step 500)"


def test_equal_accuracy_is_decided_by_the_digits_in_place(tmp_path):
    """A latent student at 0% exact match keeps the validation with more digits in place, not its first one;
    a higher accuracy still wins whatever the digits, and without digits (number answers) ties keep the first."""
    import kava.train as kt

    best = {"val/accuracy": 0.0, "val/digits": 0.30, "step": 500}
    assert kt.is_better(None, best, 0.0, 999, digits=0.45)
    assert not kt.is_better(None, best, 0.0, 999, digits=0.25)
    assert kt.is_better(None, {**best, "val/accuracy": 0.1}, 0.2, 999, digits=0.0)
    assert not kt.is_better(None, {**best, "val/accuracy": 0.2}, 0.1, 999, digits=0.99)
    assert not kt.is_better(None, {"val/accuracy": 0.0, "step": 500}, 0.0, 999)


def _driver():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "experiments" / "multiplication" / "driver.py"
    spec = importlib.util.spec_from_file_location("mult_driver", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_driver_jobs_are_valid_configs_and_pack_keeps_no_weights(tmp_path, data_dir):
    """Every job of experiments/multiplication/driver.py resolves to a valid config (a typo in a job costs device
    time otherwise), and `pack` keeps the run files but no weights or data."""
    d = _driver()
    for name, (preset, _) in d.JOBS.items():
        cfg = load_config(preset, d.job_sets(name, data_dir, tmp_path, 42, []))
        assert cfg.data.synth_task == "multiplication" and cfg.run.name == f"{name}-s42"
        assert cfg.data.valid_source.endswith("valid.txt") and len(cfg.data.synth_exclude) == 2
    assert set(d.expand("gate,icot")) == {"cot4", "nocot4", "cot5", "nocot5", "cot5-6l", "nocot5-6l", "icot4", "icot5"}
    for name, dep in d.AFTER.items():  # a student starts from its CoT run of the same seed
        assert f"model.init_from={d.run_dir(tmp_path, dep, 7)}" in d.job_sets(name, data_dir, tmp_path, 7, [])
        assert d.method_of(dep) == "cot"
    run = tmp_path / "out" / "runs" / "cot4-s42"
    for f in ("config.yaml", "metrics.jsonl", "eval/mult4-test/summary.json", "best/model/model.safetensors",
              "checkpoints/step_5/state.json", "checkpoints/step_5/model.safetensors", "DONE"):
        (run / f).parent.mkdir(parents=True, exist_ok=True)
        (run / f).write_text("x")
    (tmp_path / "out" / "runs" / "_data" / "mult4").mkdir(parents=True)
    (tmp_path / "out" / "runs" / "_data" / "mult4" / "train.txt").write_text("x")
    import argparse
    import tarfile

    d.pack(argparse.Namespace(out=str(tmp_path / "out"), tar=str(tmp_path / "r.tgz")))
    names = set(tarfile.open(tmp_path / "r.tgz").getnames())
    assert names == {f"runs/cot4-s42/{f}" for f in ("config.yaml", "metrics.jsonl", "eval/mult4-test/summary.json",
                                                       "checkpoints/step_5/state.json", "DONE")}
