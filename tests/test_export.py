"""`kava export` and `kava.load` on tiny runs (full fine-tuning and LoRA, tied embeddings).

References: the run as kava loads it (`load_for_eval`, the path `kava eval` used before export existed) and
the predictions `kava eval` wrote. The exported directory is read back with plain transformers only.
(The real-model version, where greedy answers are text worth reading, is in test_smollm2.py.)
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import kava
from kava.checkpoint.load import load_for_eval
from kava.cli import main
from kava.config import load_config
from kava.data.format import Formatter
from kava.data.pipeline import synthetic_dir
from kava.data.readers import load_records

from test_sweep import TINY

N = 4
RUNS = {
    "cot": ["method=cot"],
    "nocot": ["method=nocot"],
    "kava": ["method=kava", "lora.r=4", "lora.alpha=8", "lora.dropout=0.0", "lora.target_modules=[q_proj,v_proj]"],
}
COMMON = ["run.eval_every=3", "run.eval_max_new_tokens=5", "run.eval_max_cot_tokens=8"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    data = synthetic_dir(load_config("tiny_synth", TINY), out / "_data")
    res = {}
    for name, extra in RUNS.items():
        sets = TINY + COMMON + extra + [f"run.output_dir={out}", f"run.name={name}"]
        assert main(["train", "--config", "tiny_synth", "--no-progress", *[x for s in sets for x in ("--set", s)]]) == 0
        assert main(["eval", "--checkpoint", str(out / name), "--datasets", "synth-test", "--data-dir", str(data),
                     "--limit", str(N)]) == 0
        assert main(["export", str(out / name), "--output", str(out / f"{name}-hf")]) == 0
        got = out / name / "eval" / f"synth-test-limit{N}" / "predictions.jsonl"  # --limit N: beside the full eval
        preds = [json.loads(x) for x in got.read_text().split("\n") if x]
        res[name] = (out / name, out / f"{name}-hf", preds)
    return res, load_records(data / "test.jsonl", "jsonl")[:N]


def hf_generate(model, tok, text: str) -> str:
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**enc)[0, enc["input_ids"].shape[1]:].tolist()
    if ids and ids[-1] == tok.eos_token_id:
        ids = ids[:-1]
    return tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("name", ["cot", "nocot"])
def test_plain_transformers_generate_reproduces_kava_eval(runs, name):
    (run, hf, preds), recs = runs[0][name], runs[1]
    model = AutoModelForCausalLM.from_pretrained(hf).eval()
    tok = AutoTokenizer.from_pretrained(hf)
    prompt = json.loads((hf / "kava.json").read_text())["answer_prompt"]
    for r, p in zip(recs, preds):
        text = r.question.strip() + ("" if name == "cot" else " " + prompt)
        assert hf_generate(model, tok, text) == p["generated"]


@pytest.mark.parametrize("name", ["cot", "kava"])
def test_exported_weights_equal_the_run(runs, name):
    """Logits at every position of a teacher sequence: the plain HF model vs the run as kava loads it; the
    tied head's real-token rows are the run's own, and the three new rows hold the trained special rows."""
    (run, hf, _), recs = runs[0][name], runs[1]
    ref, tok, cfg = load_for_eval(run)
    model = AutoModelForCausalLM.from_pretrained(hf).eval()
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert cfg.model.from_scratch["tie_word_embeddings"] and head.data_ptr() == emb.data_ptr()
    ids = ref.ids
    special = [ids.bot, ids.eot, ids.latent]
    torch.testing.assert_close(emb[special], ref.special_rows.detach(), rtol=0, atol=0)
    item = Formatter(tok, answer_prompt=cfg.data.answer_prompt).tokenize(recs[0])
    seq = torch.tensor([item.question + item.cot + item.prompt + item.answer])
    with torch.no_grad():
        got = model(seq).logits[0]
        want = ref.logits(ref.decoder(inputs_embeds=ref.embed(seq)).last_hidden_state)[0]
    real = [i for i in range(want.shape[-1]) if i not in special]
    torch.testing.assert_close(got[:, real], want[:, real], rtol=0, atol=1e-5)


def test_kava_load_reproduces_kava_eval_for_latent_runs(runs):
    (run, hf, preds), recs = runs[0]["kava"], runs[1]
    for src in (hf, run):
        m = kava.load(src)
        assert m.method == "kava" and m.default_mode == "latent"
        got = m.generate([r.question for r in recs])
        assert [a.text for a in got] == [p["generated"] for p in preds]
        assert [a.forward_passes for a in got] == [p["forward_passes"] for p in preds]
    settings = json.loads((hf / "kava.json").read_text())
    assert (settings["num_latents"], settings["num_sweeps"], settings["mode"]) == (4, 3, "latent")
    with pytest.raises(ValueError, match="has no latent mode"):
        kava.load(runs[0]["cot"][1]).generate("x", mode="latent")


def test_eval_and_ask_accept_an_export_dir(runs, capsys, tmp_path):
    (run, hf, preds), recs = runs[0]["kava"], runs[1]
    assert main(["ask", "--checkpoint", str(hf), "--question", recs[1].question]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"answer: {preds[1]['generated'].strip()}"
    capsys.readouterr()
    assert main(["export", str(run), "--output", str(hf)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kava export: error: ") and "exists and is not empty" in err and err.count("\n") == 1
    with pytest.raises(FileExistsError, match="not empty"):
        main(["--debug", "export", str(run), "--output", str(hf)])
