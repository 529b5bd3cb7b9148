"""`kava export` and `kava.load` on tiny runs (full fine-tuning and LoRA, tied embeddings).

References: the run as kava loads it (`load_for_eval`, the path `kava eval` used before export existed) and
the predictions `kava eval` wrote. The exported directory is read back with plain transformers only.
(The real-model version, where greedy answers are text worth reading, is in test_smollm2.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

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


def test_export_writes_a_model_card_drops_the_chat_template_casts_and_pushes(runs, tmp_path, monkeypatch, capsys):
    """`kava export --dtype bf16 --push-to-hub REPO`: the model card (method, data, the run's eval results, how to
    load it), no chat template that training did not use (one planted in the run's tokenizer), bf16 weights,
    and `upload_folder` (mocked at the huggingface_hub API boundary) receives exactly the exported files."""
    import shutil

    import huggingface_hub
    import yaml
    from safetensors import safe_open

    src, _, _ = runs[0]["cot"]
    run = tmp_path / "cot"
    shutil.copytree(src, run)
    tok = AutoTokenizer.from_pretrained(run / "best" / "tokenizer")
    tok.chat_template = "{% for m in messages %}<|bos|>{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(run / "best" / "tokenizer")
    assert AutoTokenizer.from_pretrained(run / "best" / "tokenizer").chat_template
    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: calls.append(
        ("upload", kw["repo_id"], sorted(p.name for p in Path(kw["folder_path"]).iterdir()))))
    out = tmp_path / "cot-hf"
    assert main(["export", str(run), "--output", str(out), "--dtype", "bf16", "--push-to-hub", "me/tiny-cot"]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert calls[0] == ("create", "me/tiny-cot", {"repo_type": "model", "private": False, "exist_ok": True})
    assert calls[1] == ("upload", "me/tiny-cot", files)
    pushed = (out / "README.md").read_text()  # what the Hub shows: its loading code names the repository
    assert "THIS_DIR" not in pushed and 'AutoModelForCausalLM.from_pretrained("me/tiny-cot")' in pushed
    assert 'kava.load(snapshot_download("me/tiny-cot"))' in pushed
    assert {"README.md", "config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "kava.json", "kava_projection.safetensors"} <= set(files)
    assert "chat_template.jinja" not in files and AutoTokenizer.from_pretrained(out).chat_template is None
    assert f"pushed {len(files)} files to https://huggingface.co/me/tiny-cot" in capsys.readouterr().out
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers" and "cot" in front["tags"] and "base_model" not in front
    summary = json.loads((run / "eval" / f"synth-test-limit{N}" / "summary.json").read_text())
    assert f"| synth-test-limit{N} |" not in card and "model-index" not in front  # a smoke test is not a result
    assert f"Partial evaluations, not results: synth-test-limit{N} (`--limit`: the first {N} questions)." in card
    (run / "eval" / "synth-test").mkdir()
    (run / "eval" / "synth-test" / "summary.json").write_text(json.dumps({**summary, "limit": None}))
    from kava.checkpoint.card import model_card

    card = model_card(load_config(str(run / "config.yaml")), run_dir=run, step=3)
    assert f"| synth-test | 3 | cot | {100 * summary['accuracy']:.1f} | {100 * summary['accuracy_stderr']:.1f} | {N} |" in card
    assert "- **Method:** `cot`" in card and "synthetic arithmetic task" in card and "AutoModelForCausalLM" in card
    assert kava.load(out).generate("Tom has 3 apples .")[0].token_ids  # the bf16 export loads back
    # a hub failure is one line naming the repository; the export stays on disk
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, *a, **k: (_ for _ in ()).throw(
        RuntimeError("401 Unauthorized")))
    assert main(["export", str(run), "--output", str(tmp_path / "again"), "--push-to-hub", "me/x"]) == 2
    err = capsys.readouterr().err
    assert "--push-to-hub me/x: RuntimeError: 401 Unauthorized" in err and err.count("\n") == 1
    assert "log in with `hf auth login` or set HF_TOKEN" in err  # the CLI huggingface_hub installs now
    assert (tmp_path / "again" / "README.md").exists()


def test_a_saved_lora_model_carries_the_card_not_peft_s_placeholder(runs):
    run, _, _ = runs[0]["kava"]
    card = (run / "best" / "model" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\n") and "## How to load it" in card
    assert "- **Method:** `kava`, 4 latent tokens, 3 sweeps; LoRA r=4" in card and "kava.load(\"RUN_DIR\")" in card
    assert "[More Information Needed]" not in card  # peft's placeholder text


def _summary(folder: str, source: str, kind: str, count: int, accuracy: float, **extra) -> dict:
    return {"dataset": folder.split("-limit")[0], "dataset_source": source, "dataset_kind": kind, "count": count,
            "accuracy": accuracy, "accuracy_stderr": 0.01, "mode": "latent", "mean_forward_passes": 7.0,
            "model_kind": "run", "checkpoint_name": "best", "model_step": 300, **extra}


@pytest.mark.parametrize("preset, license, want", [
    ("tiny_synth", None, {"license": "other"}),
    ("llama1b_aug", None, {"license": "other", "license_link": "https://huggingface.co/meta-llama/Llama-3.2-1B-Instruct"}),
    ("llama1b_aug", "llama3.2", {"license": "llama3.2"}),
])
def test_the_card_front_matter_is_hub_ready(tmp_path, preset, license, want):
    """The card lacked license, pipeline_tag and model-index, listed `--limit` tests and ad-hoc evaluations of a
    local file as results, and repeated the kava tag for the kava method. Now: a license (the one given, else
    `other` pointing at the base model's), pipeline_tag text-generation, each tag once, and the results as
    model-index: the full evaluations of published sets only, the others listed as partial."""
    import yaml

    from kava.checkpoint.card import model_card

    evals = {"gsm8k": _summary("gsm8k", "gsm8k", "named", 1319, 0.4125),
             "gsm8k-limit2": _summary("gsm8k-limit2", "gsm8k", "named", 2, 1.0, limit=2),
             "my_test": _summary("my_test", "/data/my_test.jsonl", "file", 2, 1.0),
             "svamp-step100": _summary("svamp-step100", "svamp", "named", 1000, 0.3, checkpoint_step=100,
                                       model_kind="step", model_step=100)}
    for folder, s in evals.items():
        (tmp_path / "eval" / folder).mkdir(parents=True)
        (tmp_path / "eval" / folder / "summary.json").write_text(json.dumps(s))
    card = model_card(load_config(preset, ["method=kava"]), run_dir=tmp_path, step=300, license=license)
    front = yaml.safe_load(card.split("---\n")[1])
    assert {k: front.get(k) for k in ("license", "license_link") if k in front} == want
    assert front["pipeline_tag"] == "text-generation" and front["tags"] == ["kava", "latent-reasoning"]
    assert front["model-index"] == [{"name": preset, "results": [{
        "task": {"type": "text-generation"},
        "dataset": {"name": "gsm8k test", "type": "openai/gsm8k", "config": "main", "split": "test"},
        "metrics": [{"type": "accuracy", "value": 41.25, "name": "accuracy (latent mode, strict)"}]}]}]
    table = card.split("## Evaluation results")[1].split("## How to load it")[0]
    assert "| gsm8k | 300 | latent | 41.2 |" in table and "| svamp-step100 | 100 |" in table  # an earlier step: a row
    assert "| my_test |" not in table and "| gsm8k-limit2 |" not in table
    assert ("Partial evaluations, not results: gsm8k-limit2 (`--limit`: the first 2 questions); my_test (a local "
            "data file, 2 questions).") in table
