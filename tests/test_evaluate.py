"""Greedy inference: batched == one-by-one, exact forward-pass counts, and cache-free naive decoding.

The tiny random model never emits eos on its own, so `eos_models` copies the LM-head row of a token it does
generate into the eos row: the two logits tie and argmax takes the lower id (eos), so eos is emitted exactly
where that token would have been. Examples then stop at different steps (and some not at all): the case
where batching and per-example counting can go wrong.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kava.config import config_from_dict
from kava.data.format import Formatter, build_student_batch
from kava.decode import generate
from kava.evaluate import evaluate_records
from kava.data.records import Record
from tiny import RECORDS, tiny_reasoner

M, T = 4, 2
MAX_NEW, MAX_COT = 8, 10
EXTRA = [  # more question lengths (short and long) than RECORDS has
    Record("Tom has 5 .", ("<<5+1=6>>", "<<6+1=7>>"), "7", "t:5"),
    Record("Tom has 3 apples and then 4 more apples and then 5 more apples . He gives away 2 . How many does "
           "Tom have now ?", ("<<3+4=7>>", "<<7+5=12>>", "<<12-2=10>>"), "10", "t:6"),
]
ALL = RECORDS + EXTRA
CASES = [("latent", "jacobi"), ("latent", "sequential"), ("cot", None), ("nocot", None)]



def kw(mode, student_mode):
    return dict(mode=mode, num_latents=M, num_sweeps=T, student_mode=student_mode or "jacobi",
                max_new_tokens=MAX_NEW, max_cot_tokens=MAX_COT)


def question_items(tok, records=ALL):
    fmt = Formatter(tok)
    return [fmt.tokenize(r, i, need_answer=False) for i, r in enumerate(records)]


@pytest.fixture(scope="module")
def eos_models():
    """Per mode: a tiny llama whose eos row copies the head row of a token it generates, chosen so the
    examples stop at as many different steps as possible."""
    out = {}
    for mode, sm in CASES:
        m, tok = tiny_reasoner("llama", seed=1)
        items = question_items(tok)
        with torch.no_grad():
            plain = generate(m, items, **kw(mode, sm))
        eos = m.ids.eos
        best, best_score = None, -1
        for t in sorted({t for g in plain for t in g.token_ids}):
            firsts = [g.token_ids.index(t) if t in g.token_ids else None for g in plain]
            score = len(set(firsts)) + (None in firsts)
            if score > best_score:
                best, best_score = t, score
        with torch.no_grad():
            m.head.weight[eos] = m.head.weight[best]
        assert eos < best
        out[(mode, sm)] = m, tok
    return out


def check_stops_vary(gens, eos):
    stopped = [g.token_ids[-1] == eos for g in gens]
    assert any(stopped) and not all(stopped), [g.token_ids for g in gens]  # the test is not vacuous
    assert len({len(g.token_ids) for g in gens if g.token_ids[-1] == eos}) >= 2 or sum(stopped) == 1


class CountCalls:
    """Counts forward calls of the decoder (the independent pass counter)."""

    def __init__(self, model):
        self.n = 0
        self.h = model.decoder.register_forward_hook(self._hook)

    def _hook(self, *a):
        self.n += 1

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.h.remove()


def capture_logits(m, monkeypatch) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    real = m.logits
    monkeypatch.setattr(m, "logits", lambda h: seen.append(real(h)) or seen[-1])
    return seen


@pytest.mark.parametrize("mode, student_mode", CASES)
def test_batched_generation_equals_one_by_one(eos_models, mode, student_mode, monkeypatch):
    m, tok = eos_models[(mode, student_mode)]
    items = question_items(tok)
    assert len({len(it.question) for it in items}) == len(items)  # all question lengths differ
    seen = capture_logits(m, monkeypatch)
    batched = generate(m, items, tokenizer=tok, **kw(mode, student_mode))
    batched_logits = list(seen)
    check_stops_vary(batched, m.ids.eos)
    for b, (it, g) in enumerate(zip(items, batched)):
        seen.clear()
        (one,) = generate(m, [it], tokenizer=tok, **kw(mode, student_mode))
        assert g.token_ids == one.token_ids
        assert g.text == one.text
        assert g.forward_passes == one.forward_passes and g.generated_tokens == one.generated_tokens
        # padding never leaks in: the logits each token was picked from agree too
        assert len(seen) == len(one.token_ids)
        for k, lg in enumerate(seen):
            assert (batched_logits[k][b] - lg[0]).abs().max().item() <= 1e-4
    # also in another batch composition / order
    rev = generate(m, items[::-1], **kw(mode, student_mode))
    assert [g.token_ids for g in rev[::-1]] == [g.token_ids for g in batched]


@pytest.mark.parametrize("mode, student_mode", CASES)
def test_rounded_question_width_changes_no_generation(eos_models, mode, student_mode, monkeypatch):
    """Evaluation pads the question block to a multiple of 16 columns (few shapes on a GPU): the same tokens
    and logits as the batch's own width."""
    import kava.decode as ev

    m, tok = eos_models[(mode, student_mode)]
    items = question_items(tok)
    widths = []
    real_build = ev.build_student_batch
    monkeypatch.setattr(ev, "build_student_batch", lambda *a, **k: widths.append(k["widths"].q) or real_build(*a, **k))
    seen = capture_logits(m, monkeypatch)
    rounded = generate(m, items, tokenizer=tok, **kw(mode, student_mode))
    rounded_logits = list(seen)
    if mode == "latent":
        assert widths[-1] % 16 == 0 and widths[-1] > max(len(it.question) for it in items)
    monkeypatch.setattr(ev, "QUESTION_WIDTH_STEP", 1)
    seen.clear()
    own = generate(m, items, tokenizer=tok, **kw(mode, student_mode))
    if mode == "latent":
        assert widths[-1] == max(len(it.question) for it in items)
    check_stops_vary(own, m.ids.eos)
    assert [g.token_ids for g in rounded] == [g.token_ids for g in own]
    assert [g.forward_passes for g in rounded] == [g.forward_passes for g in own]
    assert len(seen) == len(rounded_logits)
    for a, b in zip(rounded_logits, seen):
        assert (a - b).abs().max().item() <= 1e-4


@pytest.mark.parametrize("mode, student_mode", CASES)
def test_forward_pass_counts_are_exact(eos_models, mode, student_mode):
    m, tok = eos_models[(mode, student_mode)]
    items = question_items(tok)
    eos = m.ids.eos
    counted = []
    for it in items:
        with CountCalls(m) as c:
            (g,) = generate(m, [it], **kw(mode, student_mode))
        counted.append(c.n)
        ids = g.token_ids
        stopped = ids[-1] == eos
        assert g.generated_tokens == len(ids) - stopped
        decode_steps = len(ids)  # one emitted token (eos included) per decode step
        if mode == "latent":
            setup = 1 + (T if student_mode == "jacobi" else M)
            assert c.n == setup + decode_steps
        elif mode == "cot":
            budget = MAX_NEW + MAX_COT + len(it.prompt)
            assert len(ids) <= budget
            assert c.n == decode_steps
            if stopped:
                assert c.n == 1 + g.generated_tokens
            else:
                assert len(ids) == budget
        else:
            assert c.n == decode_steps and len(ids) <= MAX_NEW
        assert g.forward_passes == c.n
    # batched per-example accounting equals the one-by-one decoder calls
    with CountCalls(m) as c:
        batched = generate(m, items, **kw(mode, student_mode))
    assert [g.forward_passes for g in batched] == counted
    assert c.n == max(counted)  # the batch runs until its last example is done


def naive_decode(m, prefix_embeds: torch.Tensor, budget: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding that recomputes the whole sequence from scratch (no cache) for every token.
    Returns the tokens and the logits each one was picked from."""
    out: list[int] = []
    logits: list[torch.Tensor] = []
    x = prefix_embeds
    for _ in range(budget):
        S = x.shape[1]
        h = m.decoder(inputs_embeds=x, attention_mask=torch.ones(1, S, dtype=torch.long),
                      position_ids=torch.arange(S)[None], use_cache=False).last_hidden_state
        logits.append(m.logits(h[:, -1]))
        tok = int(logits[-1].argmax(-1))
        out.append(tok)
        if tok == m.ids.eos:
            break
        x = torch.cat([x, m.embed(torch.tensor([[tok]]))], 1)
    return out, logits


def naive_latents(m, it, student_mode):
    """Latent embeddings by full recomputation: Jacobi (the model's naive reference) or one latent at a time."""
    sb = build_student_batch([it], m.ids, M, with_answer=False)
    if student_mode == "jacobi":
        return m.student_forward_naive(sb, T).latents
    q = m.embed(sb.ids[:, :sb.q_block])
    zs = []
    for _ in range(M):
        x = torch.cat([q] + zs, 1)
        S = x.shape[1]
        h = m.decoder(inputs_embeds=x, attention_mask=torch.ones(1, S, dtype=torch.long),
                      position_ids=torch.arange(S)[None], use_cache=False).last_hidden_state
        zs.append(m.proj(h[:, -1:]))
    return torch.cat(zs, 1)


@pytest.mark.parametrize("mode, student_mode", CASES)
def test_greedy_decoding_equals_naive_recomputation(eos_models, mode, student_mode, monkeypatch):
    m, tok = eos_models[(mode, student_mode)]
    items = question_items(tok)
    ids = m.ids
    with torch.no_grad():
        gens = generate(m, items, **kw(mode, student_mode))
        for it, g in zip(items, gens):
            if mode == "cot":
                ref, ref_logits = naive_decode(m, m.embed(torch.tensor([it.question])),
                                               MAX_NEW + MAX_COT + len(it.prompt))
            elif mode == "nocot":
                ref, ref_logits = naive_decode(m, m.embed(torch.tensor([it.question + it.prompt])), MAX_NEW)
            else:
                z = naive_latents(m, it, student_mode)
                prefix = torch.cat([m.embed(torch.tensor([it.question + [ids.bot]])), z,
                                    m.embed(torch.tensor([[ids.eot] + it.prompt]))], 1)
                ref, ref_logits = naive_decode(m, prefix, MAX_NEW)
            assert g.token_ids == ref
            # the cached decoder sees the same inputs at the same positions: the same logits, not just argmax
            seen = capture_logits(m, monkeypatch)
            (one,) = generate(m, [it], **kw(mode, student_mode))
            monkeypatch.undo()
            assert one.token_ids == ref and len(seen) == len(ref_logits)
            for a, b in zip(seen, ref_logits):
                assert (a - b).abs().max().item() <= 1e-4
    check_stops_vary(gens, ids.eos)
    assert max(len(g.token_ids) for g in gens) > 3


@pytest.mark.parametrize("method", ["kava", "codi", "cot", "nocot"])
def test_evaluate_records_batched_equals_one_by_one(eos_models, method):
    mode = {"kava": "latent", "codi": "latent"}.get(method, method)
    sm = {"kava": "jacobi", "codi": "sequential"}.get(method)
    m, tok = eos_models[(mode, sm)]
    cfg = config_from_dict({"method": method, "model": {"name_or_path": "tiny"},
                            "latent": {"num_latents": M, "num_sweeps": T},
                            "run": {"eval_max_new_tokens": MAX_NEW, "eval_max_cot_tokens": MAX_COT}})
    rows_b, summ_b = evaluate_records(m, tok, cfg, ALL, batch_size=4)
    rows_1, summ_1 = evaluate_records(m, tok, cfg, ALL, batch_size=1)
    assert rows_b == rows_1
    assert [r["index"] for r in rows_b] == list(range(len(ALL)))
    assert summ_b["mode"] == mode and summ_b["count"] == len(ALL)
    for k in ("accuracy", "mean_forward_passes", "mean_generated_tokens"):
        assert summ_b[k] == summ_1[k]
    gens = generate(m, question_items(tok), tokenizer=tok, **kw(mode, sm))
    assert [r["forward_passes"] for r in rows_b] == [g.forward_passes for g in gens]
    assert [r["generated"] for r in rows_b] == [g.text for g in gens]
    assert summ_b["mean_forward_passes"] == pytest.approx(sum(g.forward_passes for g in gens) / len(gens))
    # sharding over ranks covers every record once, with the same rows
    shards = [evaluate_records(m, tok, cfg, ALL, batch_size=2, rank=r, world=3)[0] for r in range(3)]
    assert sorted((r for s in shards for r in s), key=lambda r: r["index"]) == rows_b


@pytest.mark.parametrize("mode", ["latent", "cot", "nocot"])
def test_each_prediction_records_the_exact_prompt_fed_and_the_question_s_hash(mode, monkeypatch):
    """predictions.jsonl had the question but not the prompt the model was given (the answer prompt in nocot
    mode, the latent slots): each row now has the input ids decoded (`prompt`), its sha256 and the sha256 of
    the question and gold answer (`doc_hash`), as lm-evaluation-harness's samples_*.jsonl do."""
    import hashlib
    import json

    import kava.decode as kd

    m, tok = tiny_reasoner("llama")
    cfg = config_from_dict({"method": {"latent": "kava"}.get(mode, mode), "model": {"name_or_path": "tiny"},
                            "latent": {"num_latents": M, "num_sweeps": T},
                            "run": {"eval_max_new_tokens": 2, "eval_max_cot_tokens": 2}})
    fed = []
    prefill, latent_pass = kd.prefill, kd.latent_pass
    monkeypatch.setattr(kd, "prefill", lambda model, rows: fed.extend(rows) or prefill(model, rows))

    def spy(model, items, **kw):  # the student batch's ids without the question block's padding
        sb, s = latent_pass(model, items, **kw)
        Wq = sb.ids.shape[1] - 1 - M - (1 + len(items[0].prompt))
        fed.extend(it.question + sb.ids[b, Wq:].tolist() for b, it in enumerate(items))
        return sb, s

    monkeypatch.setattr(kd, "latent_pass", spy)
    rows, _ = evaluate_records(m, tok, cfg, ALL[:3], batch_size=2)
    assert [r["prompt"] for r in rows] == [tok.decode(ids) for ids in fed]
    sha = lambda t: hashlib.sha256(t.encode()).hexdigest()  # noqa: E731
    q = ALL[0].question
    want = {"cot": f"<|bos|>{q}", "nocot": f"<|bos|>{q} The answer is:",
            "latent": f"<|bos|>{q}<bot>{'<latent>' * M}<eot> The answer is:"}[mode]
    assert tok.decode(tok(want, add_special_tokens=False)["input_ids"]) == rows[0]["prompt"]
    assert [r["prompt_hash"] for r in rows] == [sha(r["prompt"]) for r in rows]
    assert [r["doc_hash"] for r in rows] == [sha(json.dumps({"question": r.question, "answer": r.answer},
                                                            sort_keys=True)) for r in ALL[:3]]


# ------------------------------------------------------------------------------------ evaluate_run (kava eval)
@pytest.fixture(scope="module")
def synth_run(tmp_path_factory):
    """A 2-step tiny cot run on the synthetic task; its data lives in <runs>/_data as training wrote it."""
    from kava.config import load_config
    from kava.train import train

    from test_sweep import TINY

    out = tmp_path_factory.mktemp("runs")
    cfg = load_config("tiny_synth", TINY + [f"run.output_dir={out}", "optim.max_steps=2", "run.eval_every=2",
                                            "run.eval_max_cot_tokens=12", "run.eval_max_new_tokens=3"])
    return train(cfg, progress=False), cfg


def _questions(path):
    import json

    return [json.loads(ln)["question"] for ln in path.read_text().splitlines()]


def test_eval_finds_the_runs_own_synthetic_data_and_limit_writes_beside_the_full_eval(synth_run, capsys):
    import json

    from kava.cli import main as cli
    from kava.data.pipeline import synthetic_name

    rd, cfg = synth_run
    data = rd.parent / "_data" / synthetic_name(cfg)  # where training generated it
    test_questions = _questions(data / "test.jsonl")
    assert cli(["eval", "--checkpoint", str(rd), "--datasets", "synth-test", "--limit", "4"]) == 0  # no --data-dir
    assert str(data / "test.jsonl") in capsys.readouterr().out
    limited = rd / "eval" / "synth-test-limit4"
    rows = [json.loads(ln) for ln in (limited / "predictions.jsonl").read_text().splitlines()]
    assert [r["question"] for r in rows] == test_questions[:4]
    s4 = json.loads((limited / "summary.json").read_text())
    assert s4["count"] == 4 and s4["limit"] == 4 and s4["dataset"] == "synth-test"
    before = (limited / "predictions.jsonl").read_bytes()

    assert cli(["eval", "--checkpoint", str(rd), "--datasets", "synth-test"]) == 0
    full = json.loads((rd / "eval" / "synth-test" / "summary.json").read_text())
    assert full["count"] == len(test_questions) == 10 and "limit" not in full
    assert (limited / "predictions.jsonl").read_bytes() == before  # the smoke test is still there, untouched
    # a limit that does not cut the set is the full evaluation
    assert cli(["eval", "--checkpoint", str(rd), "--datasets", "synth-test", "--limit", "50"]) == 0
    assert not (rd / "eval" / "synth-test-limit50").exists()

    from kava.tools.report import load_run

    run = load_run(rd, include_limited=True)  # the report keeps the two apart
    assert run.evals["synth-test"]["count"] == 10 and run.evals["synth-test-limit4"]["count"] == 4
    capsys.readouterr()


def test_eval_counts_a_skipped_line_of_a_data_file_in_the_summary_and_on_stderr(synth_run, tmp_path, capsys):
    """A data file with one bad line in five: the skip was only free text in the description (exit 0, nothing
    on stderr); it is a counted field of summary.json and a line on stderr naming the line."""
    import json

    from kava.cli import main as cli
    from kava.data.pipeline import synthetic_name

    rd, cfg = synth_run
    lines = (rd.parent / "_data" / synthetic_name(cfg) / "test.jsonl").read_text().splitlines()[:4]
    f = tmp_path / "mine.jsonl"
    f.write_text("\n".join(lines[:2] + ['{"question": "no answer here"}'] + lines[2:]) + "\n")
    assert cli(["eval", "--checkpoint", str(rd), "--datasets", str(f), "--max-new-tokens", "2",
                "--output", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    s = json.loads((tmp_path / "out" / "mine" / "summary.json").read_text())
    assert s["count"] == 4 and s["skipped"]["total"] == 1 and sum(s["skipped"]["by_reason"].values()) == 1
    assert s["skipped"]["examples"] == {r: [f"{f}:3"] for r in s["skipped"]["by_reason"]}
    assert err.count("\n") == 1 and "[kava] eval mine: skipped 1 records (" in err and f"{f}:3" in err, err
    assert cli(["eval", "--checkpoint", str(rd), "--datasets", "synth-test", "--limit", "2", "--max-new-tokens", "2",
                "--output", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "synth-test-limit2" / "summary.json").read_text())["skipped"]["total"] == 0
    assert capsys.readouterr().err.startswith("[kava] eval: --limit 2 evaluates only")  # and no skip line


def test_eval_writes_each_question_s_place_in_its_file_and_kava_score_reads_it_so(synth_run, tmp_path, capsys):
    """predictions.jsonl's "index" is the question's place in the data file, a skipped line counted (it was the
    place among the questions read, which `kava score` then matched against other questions)."""
    import json

    from kava.cli import main as cli
    from kava.data.pipeline import synthetic_name

    rd, cfg = synth_run
    lines = (rd.parent / "_data" / synthetic_name(cfg) / "test.jsonl").read_text().splitlines()[:4]
    f = tmp_path / "mine.jsonl"
    f.write_text("\n".join(lines[:1] + ['{"question": "no answer here"}'] + lines[1:]) + "\n")
    assert cli(["eval", "--checkpoint", str(rd), "--datasets", str(f), "--max-new-tokens", "2",
                "--output", str(tmp_path / "out")]) == 0
    d = tmp_path / "out" / "mine"
    rows = [json.loads(ln) for ln in (d / "predictions.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 2, 3, 4]
    assert [r["question"] for r in rows] == [json.loads(ln)["question"] for ln in lines]
    s = json.loads((d / "summary.json").read_text())
    capsys.readouterr()
    assert cli(["score", "--predictions", str(d / "predictions.jsonl"), "--dataset", str(f)]) == 0
    out = capsys.readouterr().out
    assert f"accuracy: {s['accuracy']:.4f}" in out and "count: 4\n" in out, out


def test_a_missing_synthetic_folder_is_generated_again_identically(synth_run, tmp_path, monkeypatch):
    import dataclasses
    import shutil

    from kava.data.pipeline import find_synthetic_dir, synthetic_name

    rd, cfg = synth_run
    data = rd.parent / "_data" / synthetic_name(cfg)
    assert find_synthetic_dir(cfg, rd) == data
    files = {p.name: p.read_bytes() for p in data.glob("*.jsonl")}
    assert set(files) == {"train.jsonl", "valid.jsonl", "test.jsonl", "hard.jsonl", "varied.jsonl"}
    # a runs folder moved to another machine, without its _data, and run.output_dir pointing nowhere
    moved = tmp_path / "moved" / rd.name
    shutil.copytree(rd, moved)
    away = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, output_dir=str(tmp_path / "elsewhere")))
    again = find_synthetic_dir(away, moved)
    assert again == tmp_path / "moved" / "_data" / synthetic_name(cfg)  # beside the run, as training put it
    assert {p.name: p.read_bytes() for p in again.glob("*.jsonl")} == files
    monkeypatch.setenv("KAVA_CACHE", str(tmp_path / "cache"))  # an exported model: no runs folder -> the cache
    cached = find_synthetic_dir(away, None)
    assert cached == tmp_path / "cache" / "synthetic" / synthetic_name(cfg)
    assert {p.name: p.read_bytes() for p in cached.glob("*.jsonl")} == files
    assert not (tmp_path / "elsewhere").exists()


def test_find_synthetic_dir_refuses_a_run_on_other_data():
    from kava.config import load_config
    from kava.data.pipeline import find_synthetic_dir

    with pytest.raises(ValueError, match="give --data-dir"):
        find_synthetic_dir(load_config("smollm2_gsm8k"), None)


def test_summary_records_date_versions_git_generation_settings_and_model(synth_run, tmp_path, capsys):
    """summary.json had no date, versions, git revision, generation settings or model identity (lm-eval's
    results_*.json has them all)."""
    import json
    from datetime import datetime, timezone

    import torch
    import transformers

    import kava
    from kava.checkpoint.rundir import git_revision
    from kava.checkpoint.state import model_identity
    from kava.cli import main as cli

    rd, cfg = synth_run
    before = datetime.now(timezone.utc).replace(microsecond=0)
    assert cli(["eval", "--checkpoint", str(rd), "--datasets", "synth-test", "--limit", "2", "--batch-size", "3",
                "--output", str(tmp_path)]) == 0
    s = json.loads((tmp_path / "synth-test-limit2" / "summary.json").read_text())
    date = datetime.fromisoformat(s["date"])
    assert date.tzinfo == timezone.utc and before <= date <= datetime.now(timezone.utc)
    assert (s["versions"]["kava"], s["versions"]["torch"], s["versions"]["transformers"]) == (
        kava.__version__, torch.__version__, transformers.__version__)
    assert s["git"] == git_revision()
    assert s["generation"] == {"mode": "cot", "greedy": True, "max_new_tokens": 3, "max_cot_tokens": 12,
                               "batch_size": 3, "answer_prompt": "The answer is:"}
    assert s["model"] == {"source": str((rd / "best").resolve()), "identity": model_identity(cfg)}
    capsys.readouterr()


def test_a_limited_evaluation_warns_once_and_stays_out_of_the_card_and_the_report(synth_run, tmp_path, capsys):
    """`kava eval --limit N` results flowed into the model card and `kava report`'s tables without a word. It
    warns in one stderr line (lm-evaluation-harness: --limit is for testing), and the card and the report leave
    it out, with a line (`kava report --include-limited` shows it as <dataset>-limit<N>)."""
    import shutil

    from kava.checkpoint.card import model_card
    from kava.cli import main as cli

    src, cfg = synth_run
    rd = tmp_path / "run"
    shutil.copytree(src, rd, ignore=shutil.ignore_patterns("eval"))
    data = src.parent / "_data"
    capsys.readouterr()
    assert cli(["eval", "--checkpoint", str(rd), "--datasets", "synth-test,synth-hard", "--limit", "2",
                "--data-dir", str(next(data.iterdir()))]) == 0
    err = capsys.readouterr().err
    assert err == ("[kava] eval: --limit 2 evaluates only the first 2 questions: for testing, not a result (written to "
                   "eval/<set>-limit2/; left out of the model card, and of `kava report` unless --include-limited)\n")
    card = model_card(cfg, run_dir=rd, step=2, exported=False)
    assert "| synth-test-limit2 |" not in card and "Not evaluated yet" in card
    assert ("Partial evaluations, not results: synth-hard-limit2 (`--limit`: the first 2 questions); "
            "synth-test-limit2 (`--limit`: the first 2 questions).") in card
    assert cli(["report", str(rd), "--output", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "limit2" not in md.split("## Notes")[0]
    assert f"- {rd / 'eval' / 'synth-test-limit2'}: left out: a --limit 2 test (--include-limited shows it)" in md
    assert cli(["report", str(rd), "--output", str(tmp_path / "rep2"), "--include-limited"]) == 0
    md = (tmp_path / "rep2" / "report.md").read_text()
    assert "| group | method | train data | runs | synth-hard-limit2 | synth-test-limit2 |" in md
    capsys.readouterr()


def test_eval_dir_name():
    from kava.evaluate import eval_dir_name

    assert eval_dir_name("gsm8k", None, 1319) == "gsm8k"
    assert eval_dir_name("gsm8k", 20, 1319) == "gsm8k-limit20"
    assert eval_dir_name("gsm8k", 1319, 1319) == "gsm8k" and eval_dir_name("gsm8k", 5000, 1319) == "gsm8k"


def test_eval_on_the_three_paper_sets_from_a_local_data_dir(synth_run, data_dir, capsys):
    """`kava eval --datasets gsm8k,gsm8k-hard,svamp` (the README's, with --data-dir for --hub): one eval folder
    per set, each on that set's first questions."""
    import json

    from kava.cli import main as cli
    from kava.data.readers import load_eval_dataset

    rd, _ = synth_run
    assert cli(["eval", "--checkpoint", str(rd), "--datasets", "gsm8k,gsm8k-hard,svamp", "--data-dir", str(data_dir),
                "--limit", "2", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    for name in ("gsm8k", "gsm8k-hard", "svamp"):
        recs, desc = load_eval_dataset(name, data_dir)
        d = rd / "eval" / f"{name}-limit2"
        rows = [json.loads(ln) for ln in (d / "predictions.jsonl").read_text().splitlines()]
        assert [(r["question"], r["gold"]) for r in rows] == [(r.question, r.answer) for r in recs[:2]]
        s = json.loads((d / "summary.json").read_text())
        assert s["dataset"] == name and s["count"] == 2 and s["mode"] == "cot"
        assert f"{name}: accuracy" in out


@pytest.mark.parametrize("mode", ["latent", "cot", "nocot"])
def test_a_question_beyond_the_sliding_window_is_refused_on_every_rank(mode):
    """The window check is decided from all records before any pass: the rank whose shard holds only short
    questions refuses too (a refusal inside one rank's shard left the others waiting in the gather)."""
    from kava.model.families import SlidingWindowTooShort

    m, tok = tiny_reasoner("mistral")
    method = {"latent": "kava"}.get(mode, mode)
    cfg = config_from_dict({"method": method, "model": {"name_or_path": "tiny"},
                            "latent": {"num_latents": M, "num_sweeps": T},
                            "run": {"eval_max_new_tokens": MAX_NEW, "eval_max_cot_tokens": MAX_COT}})
    fmt = Formatter(tok)
    q = [len(fmt.question_ids(r.question)) for r in ALL]
    longest = max(range(len(ALL)), key=lambda i: q[i])
    assert longest % 2 == 1  # only rank 1 of 2 holds it
    extra = {"latent": 2 + M, "cot": MAX_COT}.get(mode, 0) + len(fmt.prompt_ids) + MAX_NEW
    m.config.sliding_window = sorted(q)[-2] + extra  # every other question fits, the longest does not
    short = [r for i, r in enumerate(ALL) if i != longest]
    rows, _ = evaluate_records(m, tok, cfg, short, batch_size=1)  # all fit: evaluated as usual
    assert len(rows) == len(short)
    for rank in (0, 1):
        with pytest.raises(SlidingWindowTooShort, match="longest question of this evaluation"):
            evaluate_records(m, tok, cfg, ALL, batch_size=1, rank=rank, world=2)


def test_diagnostics_check_the_window_over_the_gold_cot_up_front():
    """The oracle / KV-match diagnostics run the teacher over question + gold CoT + answer: that length is
    checked against the window before any pass too, on every rank."""
    from kava.diagnostics import diagnostics_spec
    from kava.model.families import SlidingWindowTooShort

    m, tok = tiny_reasoner("mistral")
    cfg = config_from_dict({"method": "kava", "model": {"name_or_path": "tiny"},
                            "latent": {"num_latents": M, "num_sweeps": T},
                            "run": {"eval_max_new_tokens": MAX_NEW, "eval_max_cot_tokens": MAX_COT}})
    fmt = Formatter(tok)
    latent = max(len(fmt.question_ids(r.question)) for r in ALL) + 2 + M + len(fmt.prompt_ids) + MAX_NEW
    gold = max(sum(map(len, (t.question, t.cot, t.prompt, t.answer))) for t in
               (fmt.tokenize(r, i) for i, r in enumerate(ALL)))
    assert gold > latent  # the gold CoT sequence is the longer one
    m.config.sliding_window = latent  # every latent generation fits; the teacher's gold sequence does not
    for rank in (0, 1):
        with pytest.raises(SlidingWindowTooShort, match="gold CoT"):
            evaluate_records(m, tok, cfg, ALL, batch_size=2, rank=rank, world=2,
                             diagnostics=diagnostics_spec(oracle=True))


@pytest.mark.parametrize("mode", ["latent", "cot"])
def test_decoding_reads_the_device_once_per_step_not_once_per_example(mode, monkeypatch):
    """Greedy decoding keeps its bookkeeping on the device: at most one read per decode step (has every example
    emitted eos?) and one `tolist` of the tokens at the end, never one read per example and step (which made
    GPU decoding slow). With CUDA graphs the stop is looked at every `DecodeGraphs.check_every` steps."""
    from kava.model.capture import no_host_sync

    m, tok = tiny_reasoner("llama")
    reads = []
    for name in ("__bool__", "item"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, _r=real, _n=name: reads.append(_n) or _r(self))
    with no_host_sync():  # as on a GPU: HF's mask check off
        gens = generate(m, question_items(tok), tokenizer=tok, **kw(mode, "jacobi"))
    steps = max(g.forward_passes for g in gens) - (1 + T if mode == "latent" else 0)
    assert len(gens) == len(ALL) and max(g.generated_tokens for g in gens) > 1
    assert set(reads) <= {"__bool__"} and 0 < len(reads) <= steps


# ------------------------------------------------------------------------------------ kava eval on any model
def test_eval_takes_an_intermediate_checkpoint_and_prints_progress_without_a_tty(synth_run, capsys):
    """`--checkpoint RUN/checkpoints/step_N` (what `--help` promises): the run's model rebuilt with that step's
    weights, written to eval/<dataset>-step<N>-limit<M>/; the same answers as the final model of that step.
    The standard error is in the summary, and without a TTY (capsys) progress lines are printed."""
    import json

    from kava.cli import main as cli
    from kava.tools.report import load_run

    rd, _ = synth_run
    assert cli(["eval", "--checkpoint", str(rd / "checkpoints" / "step_2"), "--datasets", "synth-test",
                "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert "[kava] eval synth-test (cot): 3/3 questions (100%)" in out and " ± " in out
    d = rd / "eval" / "synth-test-step2-limit3"
    step = [json.loads(ln) for ln in (d / "predictions.jsonl").read_text().splitlines()]
    s = json.loads((d / "summary.json").read_text())
    assert s["checkpoint_step"] == 2 and s["model_kind"] == "step" and s["count"] == 3
    p = s["accuracy"]
    assert s["accuracy_stderr"] == pytest.approx((p * (1 - p) / 2) ** 0.5)
    assert cli(["eval", "--checkpoint", str(rd), "--datasets", "synth-test", "--limit", "3"]) == 0  # final/ = step 2
    final = [json.loads(ln) for ln in (rd / "eval" / "synth-test-limit3" / "predictions.jsonl").read_text().splitlines()]
    assert [r["generated"] for r in step] == [r["generated"] for r in final]
    assert "synth-test-step2-limit3" in load_run(rd, include_limited=True).evals  # apart from the final model's
    capsys.readouterr()


def test_an_evaluation_records_its_step_and_goes_stale_when_the_run_is_extended(tmp_path, capsys):
    """A run evaluated, then extended (`kava train --resume RUN --set optim.max_steps=N`): summary.json named
    best/ (or final/) but no step, `eval`/`ask` never said which step they loaded, and `kava report` and the
    export's model card kept showing the old numbers. The step is recorded and printed; an evaluation of a
    best/ or final/ that now holds another step is left out of both, with a line saying why."""
    import json

    from kava.checkpoint.export import export_model
    from kava.cli import main as cli
    from kava.tools.report import load_run

    from test_sweep import TINY

    sets = [x for o in TINY + [f"run.output_dir={tmp_path}", "optim.max_steps=2", "run.eval_every=2", "run.name=r",
                               "run.eval_max_cot_tokens=4", "run.eval_max_new_tokens=2"] for x in ("--set", o)]
    assert cli(["train", "--config", "tiny_synth", "--no-progress", *sets]) == 0
    rd = tmp_path / "r"
    capsys.readouterr()
    assert cli(["eval", "--checkpoint", str(rd / "final"), "--datasets", "synth-test"]) == 0
    assert f"[kava] eval: {rd / 'final'} (the run's final/, step 2)" in capsys.readouterr().out
    s = json.loads((rd / "eval" / "synth-test" / "summary.json").read_text())
    assert (s["checkpoint_name"], s["model_step"], s["model_kind"]) == ("final", 2, "run")
    assert "synth-test" in load_run(rd).evals

    assert cli(["train", "--resume", str(rd), "--no-progress", "--set", "optim.max_steps=4"]) == 0
    capsys.readouterr()
    assert cli(["ask", "--checkpoint", str(rd / "final"), "--question", "Tom has 3 apples ."]) == 0
    out, err = capsys.readouterr()
    assert f"[kava] ask: {rd / 'final'} (the run's final/, step 4)\n" in err and out.startswith("answer: ")
    run = load_run(rd)
    assert "synth-test" not in run.evals
    assert f"{rd / 'eval' / 'synth-test'}: left out: evaluated final/ at step 2; final/ is now the model of step 4 " \
           "(kava eval it again)" in run.notes
    card = (export_model(rd / "final", tmp_path / "hf") / "README.md").read_text()
    assert "| synth-test |" not in card and "Not evaluated yet" in card
    assert "Left out, evaluations of another model of this run: synth-test (final/ at step 2)." in card
    assert cli(["eval", "--checkpoint", str(rd / "final"), "--datasets", "synth-test"]) == 0  # again: current
    assert load_run(rd).evals["synth-test"]["model_step"] == 4
    capsys.readouterr()


def _plain_model(tmp_path):
    """A Hugging Face model directory as the hub ships one (no kava tokens), and a peft adapter trained on it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tiny import tiny_config, tiny_tokenizer

    tok = tiny_tokenizer(kava_tokens=False)
    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_config(tiny_config("llama", len(tok), tok))
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")  # so the adapter names this directory
    peft_lm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in peft_lm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # a trained adapter: it changes the answers
    peft_lm.save_pretrained(tmp_path / "adapter")
    return tok


def _reference(model_dir, records, mode, adapter=None, max_new=4):
    """Greedy answers of plain transformers `generate` on kava's input ids (question, and in nocot mode the
    answer prompt), with kava's budget (cot: CoT 128 + prompt + answer): what kava eval must print for a model
    it did not train."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kava.data.format import Formatter, add_special_tokens

    lm = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    add_special_tokens(tok)  # kava's prompt ids: the three added tokens never appear in them
    if adapter is not None:
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, adapter).merge_and_unload()
    fmt = Formatter(tok)
    out = []
    for r in records:
        ids = fmt.question_ids(r.question) + (fmt.prompt_ids if mode == "nocot" else [])
        budget = max_new + (128 + len(fmt.prompt_ids) if mode == "cot" else 0)
        with torch.no_grad():
            gen = lm.generate(torch.tensor([ids]), max_new_tokens=budget, do_sample=False,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        out.append(tok.decode(gen[:-1] if gen[-1] == tok.eos_token_id else gen, skip_special_tokens=True))
    return out


def test_eval_takes_a_plain_model_and_a_peft_adapter_in_cot_and_nocot_mode(tmp_path, monkeypatch, capsys):
    """The base model (the first baseline), its peft adapter (a directory, or lm-eval's model args) and a
    custom GSM8k JSONL test file: answers equal plain transformers' greedy generate on kava's prompt; results go
    to runs/<name>-<mode>/eval/<file stem>/ with a meta.json, which `kava report runs/` lists."""
    import json

    from kava.cli import main as cli
    from kava.data.readers import load_records
    from kava.tools.report import load_run

    _plain_model(tmp_path)
    test = tmp_path / "my_test.jsonl"
    test.write_text("".join(json.dumps({"question": q, "answer": f"<<{a}>> #### {n}"}) + "\n" for q, a, n in [
        ("Tom has 3 apples . He buys 4 more . How many ?", "3+4=7", 7), ("Tom has 12 apples .", "12-2=10", 10),
        ("He buys 7 more apples .", "7+5=12", 12)]))
    recs = load_records(test)
    monkeypatch.chdir(tmp_path)
    got = {}
    for name, argv in {"base-cot": ["--checkpoint", "base", "--mode", "cot"],
                       "base-nocot": ["--checkpoint", "base", "--mode", "nocot"],
                       "base+adapter-nocot": ["--checkpoint", "adapter", "--mode", "nocot"],
                       "via-args": ["--model-args", "pretrained=base,peft=adapter", "--mode", "nocot",
                                    "--output", "via-args"]}.items():
        assert cli(["eval", *argv, "--datasets", str(test), "--max-new-tokens", "4"]) == 0
        d = (tmp_path / "via-args" if name == "via-args" else tmp_path / "runs" / name / "eval") / "my_test"
        s = json.loads((d / "summary.json").read_text())
        assert s["dataset"] == "my_test" and s["count"] == 3 and s["model_kind"] == "plain"
        assert "format gsm8k" in s["description"] and "accuracy_stderr" in s
        assert s["mode"] == s["method"] == name.split("-")[-1] if name != "via-args" else s["mode"] == "nocot"
        got[name] = [json.loads(ln)["generated"] for ln in (d / "predictions.jsonl").read_text().splitlines()]
    assert got["base-cot"] == _reference(tmp_path / "base", recs, "cot")
    assert got["base-nocot"] == _reference(tmp_path / "base", recs, "nocot")
    assert got["base+adapter-nocot"] == got["via-args"] == _reference(tmp_path / "base", recs, "nocot",
                                                                      adapter=tmp_path / "adapter")
    assert got["base+adapter-nocot"] != got["base-nocot"]  # the adapter is applied
    run = load_run(tmp_path / "runs" / "base-nocot")
    assert run.method == "nocot" and run.evals["my_test"]["count"] == 3
    assert cli(["eval", "--checkpoint", "base", "--mode", "latent", "--datasets", str(test)]) == 2
    assert "a plain model (no kava training) has no latent mode" in capsys.readouterr().err


def test_a_peft_evaluation_has_its_own_folder_and_records_its_model_args(tmp_path, monkeypatch, capsys):
    """`--model-args pretrained=D` and `pretrained=D,peft=A` wrote the same runs/D-nocot/eval/<set>/ (the
    adapter's numbers replaced the base's, and `kava report` showed them as the base's). Each model identity
    (base, adapter, GGUF file) has its folder; summary.json and the folder's meta.json record the model args;
    `--checkpoint ADAPTER` is the same model as `pretrained=BASE,peft=ADAPTER`, and a folder of the same name
    holding another model is refused."""
    import json

    from kava.cli import main as cli
    from kava.tools.report import aggregate, find_run_dirs

    _plain_model(tmp_path)
    test = tmp_path / "t.jsonl"
    test.write_text("".join(json.dumps({"question": q, "answer": f"#### {n}"}) + "\n" for q, n in [
        ("Tom has 3 apples . He buys 4 more . How many ?", 7), ("Tom has 12 apples .", 12)]))
    monkeypatch.chdir(tmp_path)
    common = ["--mode", "nocot", "--datasets", str(test), "--max-new-tokens", "4"]
    assert cli(["eval", "--model-args", "pretrained=base", *common]) == 0
    assert cli(["eval", "--model-args", "pretrained=base,peft=adapter", *common]) == 0
    base, adapted = tmp_path / "runs" / "base-nocot", tmp_path / "runs" / "base+adapter-nocot"
    sb = json.loads((base / "eval" / "t" / "summary.json").read_text())
    sa = json.loads((adapted / "eval" / "t" / "summary.json").read_text())
    assert sb["model_args"] == {"pretrained": str(tmp_path / "base")}
    assert sa["model_args"] == {"pretrained": str(tmp_path / "base"), "peft": str(tmp_path / "adapter")}
    assert json.loads((adapted / "meta.json").read_text())["model_args"] == sa["model_args"]
    preds = lambda d: (d / "eval" / "t" / "predictions.jsonl").read_text()  # noqa: E731
    assert preds(base) != preds(adapted)  # the base's evaluation is still the base's
    assert sorted(r["group"] for r in aggregate(find_run_dirs([tmp_path / "runs"])[0])) == ["base+adapter-nocot",
                                                                                           "base-nocot"]
    before = preds(adapted)
    assert cli(["eval", "--checkpoint", "adapter", *common]) == 0  # the same model: the same folder
    assert preds(adapted) == before and sorted(p.name for p in (tmp_path / "runs").iterdir()) == [
        "base+adapter-nocot", "base-nocot"]
    # another model whose directory is also called "base": refused, not mixed in
    (tmp_path / "other").mkdir()
    import shutil

    shutil.copytree(tmp_path / "base", tmp_path / "other" / "base")
    capsys.readouterr()
    assert cli(["eval", "--model-args", f"pretrained={tmp_path / 'other' / 'base'}", *common]) == 2
    assert "holds the evaluations of another model" in capsys.readouterr().err
    assert json.loads((base / "eval" / "t" / "summary.json").read_text()) == sb


def test_eval_reads_a_file_without_cot_field_names_and_hub_dataset_ids(synth_run, tmp_path, monkeypatch, capsys):
    """A `{"question", "answer"}` JSONL failed with "missing field: steps" (evaluation needs no CoT);
    `--datasets openai/gsm8k` was an "unknown evaluation set"; there were no field-mapping flags. The hub is
    not reachable here: `datasets.load_dataset` is replaced, and the test checks what it was asked for."""
    import json
    import sys
    import types

    from kava.checkpoint.card import result_set
    from kava.cli import main as cli

    rd, _ = synth_run
    qs = ["Tom has 3 apples .", "He buys 4 more .", "How many ?"]
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"question": q, "answer": n}) + "\n" for q, n in zip(qs, (3, "4", 7))))
    run = lambda *a: cli(["eval", "--checkpoint", str(rd), "--max-new-tokens", "2", "--output",  # noqa: E731
                          str(tmp_path / "out"), *a])
    assert run("--datasets", str(plain)) == 0
    s = json.loads((tmp_path / "out" / "plain" / "summary.json").read_text())
    assert s["count"] == 3 and s["skipped"]["total"] == 0
    assert s["dataset_kind"] == "file" and result_set(s) is None  # the model card: partial, not a result
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_text("".join(json.dumps({"problem": q, "solution": n, "steps": "x"}) + "\n" for q, n in zip(qs, (3, 4, 7))))
    assert run("--datasets", str(renamed), "--question-field", "problem", "--answer-field", "solution") == 0
    rows = [json.loads(ln) for ln in (tmp_path / "out" / "renamed" / "predictions.jsonl").read_text().splitlines()]
    assert [(r["question"], r["gold"]) for r in rows] == list(zip(qs, ("3", "4", "7")))

    asked = []

    class Rows(list):
        column_names = ["problem", "solution"]

    def load_dataset(hub_id, config=None, split=None):
        asked.append((hub_id, config, split))
        if hub_id == "openai/gsm8k":
            return Rows({"question": q, "answer": f"<<1+2=3>> #### {n}"} for q, n in zip(qs, (3, 4, 7)))
        return Rows({"problem": q, "solution": n} for q, n in zip(qs, (3, 4, 7)))

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    capsys.readouterr()
    assert run("--datasets", "openai/gsm8k") == 0  # no --hub: an org/name id is the hub's
    assert asked == [("openai/gsm8k", "main", "test")]
    s = json.loads((tmp_path / "out" / "gsm8k" / "summary.json").read_text())
    assert s["dataset"] == "gsm8k" and s["count"] == 3 and "hub openai/gsm8k main, split test" in s["description"]
    assert s["dataset_kind"] == "hub" and result_set(s).name == "gsm8k"
    assert run("--datasets", "someone/math-qa:validation", "--question-field", "problem",
               "--answer-field", "solution") == 0
    assert asked[-1] == ("someone/math-qa", None, "validation")
    d = tmp_path / "out" / "someone__math-qa-validation"
    s = json.loads((d / "summary.json").read_text())
    assert s["count"] == 3 and result_set(s).hub_id == "someone/math-qa" and result_set(s).hub_split == "validation"
    assert [json.loads(ln)["gold"] for ln in (d / "predictions.jsonl").read_text().splitlines()] == ["3", "4", "7"]
    # field names for a named set: refused before the model loads
    monkeypatch.setattr("kava.evaluate.load_any", lambda *a, **k: pytest.fail("the model was loaded"))
    capsys.readouterr()
    assert run("--datasets", "gsm8k", "--question-field", "problem") == 2
    assert "apply to data files and hub datasets, not to the named set gsm8k" in capsys.readouterr().err


@pytest.mark.parametrize("datasets, expect", [
    ("gsm8k,nosuch", "unknown evaluation set 'nosuch'"),
    ("gsm8k", "gsm8k: {empty}/gsm8k/test.jsonl: file not found (from --data-dir)"),
    ("missing.jsonl", "missing.jsonl: file not found"),
])
def test_eval_checks_the_dataset_names_before_the_model_loads(tmp_path, monkeypatch, capsys, datasets, expect):
    from kava.cli import main as cli

    monkeypatch.setattr("kava.evaluate.load_any", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    assert cli(["eval", "--checkpoint", str(tmp_path), "--datasets", datasets, "--data-dir", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert expect.format(empty=tmp_path / "empty") in err and err.count("\n") == 1, err


@pytest.mark.parametrize("flag, value", [("--limit", "-1"), ("--limit", "0"), ("--limit", "1.5"), ("--limit", "x"),
                                         ("--max-new-tokens", "0"), ("--batch-size", "0"), ("--batch-size", "-2")])
def test_eval_refuses_a_non_positive_limit_batch_size_or_token_budget(tmp_path, monkeypatch, capsys, flag, value):
    """`--limit -1` evaluated all questions but the last, and 0 (for any of the three) fell back to the
    default: each is one line on stderr and exit 2, before the model loads. `--limit` also takes a fraction
    (lm-eval's 0.01), so 1.5 is neither."""
    from kava.cli import main as cli

    monkeypatch.setattr("kava.evaluate.load_any", lambda *a, **k: pytest.fail("the model was loaded"))
    assert cli(["eval", "--checkpoint", str(tmp_path), "--datasets", "synth-test", flag, value]) == 2
    what = " of questions or a fraction between 0 and 1" if flag == "--limit" else ""
    assert capsys.readouterr().err == f"kava eval: {flag} must be a positive number{what}, got {value}\n"


# lm-evaluation-harness's command line, as its users type it (`lm_eval --model hf --model_args ... --tasks ...`)
LM_EVAL_REFUSED = [
    (["--num_fewshot", "5"], "--num_fewshot: kava eval has no few-shot prompt"),
    (["--apply_chat_template"], "--apply_chat_template: kava eval feeds raw text, as kava trains (no chat template)"),
    (["--device", "cuda:0"], "--device: kava eval picks the device itself (cuda when there is one, else cpu); choose "
                             "GPUs with CUDA_VISIBLE_DEVICES"),
    (["--seed", "1234"], "--seed: kava eval decodes greedily: nothing is drawn at random"),
    (["--model", "vllm"], "--model vllm: kava eval loads a kava run with --checkpoint RUN and a Hugging Face model with "
                          "--model-args pretrained=ID (lm-eval's --model hf)"),
    (["--tasks", "gsm8k_cot"], "--tasks gsm8k_cot: not a kava evaluation set"),
]


@pytest.mark.parametrize("argv, expect", LM_EVAL_REFUSED, ids=[a[0] for a, _ in LM_EVAL_REFUSED])
def test_lm_eval_flags_without_a_kava_counterpart_are_one_line_naming_what_to_do(tmp_path, monkeypatch, capsys,
                                                                                   argv, expect):
    """They failed with the top-level usage and `unrecognized arguments` (and `--model hf` was read as an
    abbreviation of --model-args): each is now one line on stderr, exit 2, before the model loads."""
    from kava.cli import main as cli

    monkeypatch.setattr("kava.evaluate.load_any", lambda *a, **k: pytest.fail("the model was loaded"))
    assert cli(["eval", "--checkpoint", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kava eval: {expect}") and err.count("\n") == 1 and "usage" not in err, err


def test_lm_eval_flags_that_mean_kava_flags_are_taken(synth_run, tmp_path, monkeypatch, capsys):
    """`--model hf --model_args pretrained=DIR --tasks SET --output_path DIR --log_samples --num_fewshot 0
    --batch_size N --limit 0.25`: the same evaluation as kava's own flags with `--limit` = a quarter of the set
    (rounded, said in the output); the predictions equal those of `--model-args ... --datasets ... --limit N`."""
    import json

    from kava.checkpoint.export import export_model
    from kava.cli import main as cli

    src, _ = synth_run
    model = export_model(src, tmp_path / "hf")
    data = str(next((src.parent / "_data").iterdir()))
    n = len((Path(data) / "test.jsonl").read_text().splitlines())  # 10
    assert cli(["eval", "--model", "hf", "--model_args", f"pretrained={model}", "--tasks", "synth-test", "--data-dir",
                data, "--output_path", str(tmp_path / "lm"), "--log_samples", "--num_fewshot", "0", "--batch_size",
                "3", "--limit", "0.25"]) == 0
    out = capsys.readouterr().out
    k = round(0.25 * n)
    assert "[kava] eval: --tasks synth-test is --datasets synth-test" in out
    assert f"({k} problems: " in out and f"(first {k}: --limit 0.25 of {n}, rounded)" in out
    assert cli(["eval", "--model-args", f"pretrained={model}", "--datasets", "synth-test", "--data-dir", data,
                "--output", str(tmp_path / "kava"), "--batch-size", "3", "--limit", str(k)]) == 0
    got, want = (json.loads((tmp_path / d / f"synth-test-limit{k}" / "summary.json").read_text()) for d in ("lm", "kava"))
    assert got["limit"] == want["limit"] == k and got["limit_fraction"] == 0.25 and got["count"] == k
    assert got["model_args"] == want["model_args"] and got["generation"] == want["generation"]
    rows = [(tmp_path / d / f"synth-test-limit{k}" / "predictions.jsonl").read_text().splitlines() for d in ("lm", "kava")]
    assert [json.loads(r)["generated"] for r in rows[0]] == [json.loads(r)["generated"] for r in rows[1]]
    capsys.readouterr()


def test_a_generation_budget_past_learned_positions_is_a_clear_error_before_any_pass():
    """GPT-2's position table ends at n_positions: a budget that would decode past it is refused up front,
    naming the keys, instead of an index error deep inside a decode step; a budget that fits runs."""
    from kava.config import ConfigError

    m, tok = tiny_reasoner("gpt2")
    assert m.max_positions == m.config.n_positions and tiny_reasoner("llama")[0].max_positions is None
    cfg = config_from_dict({"method": "cot", "model": {"name_or_path": "tiny"},
                            "run": {"eval_max_new_tokens": 4, "eval_max_cot_tokens": m.max_positions}})
    with pytest.raises(ConfigError, match="run.eval_max_cot_tokens"):
        evaluate_records(m, tok, cfg, ALL, batch_size=2)
    cfg = config_from_dict({"method": "cot", "model": {"name_or_path": "tiny"},
                            "run": {"eval_max_new_tokens": 4, "eval_max_cot_tokens": 8}})
    rows, _ = evaluate_records(m, tok, cfg, ALL, batch_size=2)
    assert len(rows) == len(ALL)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("skip", [0, 2])
def test_teacher_forced_accuracy_equals_one_sequence_at_a_time(family, skip):
    """`teacher_forced_accuracy` (the training layout, batched and padded, the head in row chunks) counts what a
    naive reference counts: each sequence alone, unpadded, the argmax at every position against the next gold
    token, split into CoT tokens and prompt + answer tokens; with iCoT's kept positions (`pos_skip`), the
    positions from the first CoT token on shifted by it."""
    import dataclasses

    from kava.data.format import positions
    from kava.evaluate import teacher_forced_accuracy

    m, tok = tiny_reasoner(family)
    items = [Formatter(tok).tokenize(r, i) for i, r in enumerate(RECORDS)]
    items = [dataclasses.replace(it, cot=it.cot[min(skip, len(it.cot)):], pos_skip=min(skip, len(it.cot)))
             for it in items]

    def forward(it, seq):  # the logits of `seq` alone, unpadded, at its positions
        x = torch.tensor([seq])
        ones = torch.ones_like(x)
        pos = positions(ones)
        pos[:, len(it.question):] += it.pos_skip
        return m.logits(m.run(m.embed(x), ones, pos, m.new_cache()).last_hidden_state[0])

    with torch.no_grad():  # gold tokens the model mostly predicts: its own greedy tokens, every third one changed
        for n, it in enumerate(items):
            seq = list(it.question)
            for j in range(len(it.cot) + len(it.prompt) + len(it.answer)):
                nxt = int(forward(it, seq)[-1].argmax())
                seq.append((nxt + 1) % len(tok) if j % 3 == 2 else nxt)
            c, p = len(it.question) + len(it.cot), len(it.question) + len(it.cot) + len(it.prompt)
            items[n] = dataclasses.replace(it, cot=seq[len(it.question):c], prompt=seq[c:p], answer=seq[p:])
    right, total = {"cot": 0, "answer": 0}, {"cot": 0, "answer": 0}
    with torch.no_grad():
        got = teacher_forced_accuracy(m, items, batch_size=3)
        for it in items:
            seq = it.question + it.cot + it.prompt + it.answer
            pred = forward(it, seq)[len(it.question) - 1:-1].argmax(-1).tolist()
            for j, (p, g) in enumerate(zip(pred, seq[len(it.question):])):
                k = "cot" if j < len(it.cot) else "answer"
                right[k] += p == g
                total[k] += 1
    assert got == pytest.approx({k: right[k] / total[k] for k in right})
    for k in right:  # neither all right nor all wrong: the counts say something
        assert 0 < right[k] < total[k], (k, right, total)
