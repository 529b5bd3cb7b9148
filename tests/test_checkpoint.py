"""LoRA runs through the CLI: train -> eval / ask / inspect -> init_from, against the live training model.

The reference is the model as it was in memory when training saved it: a spy on `save_model` records, for
`final/`, the model's logits on a fixed batch and its greedy answers to the test questions. Everything
loaded back from disk (unmerged for eval, merged for init_from) must reproduce them.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import kava.train as kt
from kava.checkpoint.load import load_for_eval
from kava.checkpoint.saved import CheckpointError, find_checkpoint
from kava.cli import main
from kava.config import load_config
from kava.data.format import Formatter, build_student_batch, build_teacher_batch
from kava.data.pipeline import synthetic_dir
from kava.data.readers import load_records
from kava.decode import generate
from kava.checkpoint.load import build_reasoner, load_tokenizer

from test_sweep import TINY

LORA = ["method=kava", "lora.r=4", "lora.alpha=8", "lora.dropout=0.0", "lora.target_modules=[q_proj,v_proj]",
        "run.eval_max_new_tokens=4", "run.eval_every=3"]
N_EVAL = 4


def sets(items):
    return [x for s in items for x in ("--set", s)]


def probe(model, tok, cfg, records):
    """Teacher and student logits on two training-style examples, and greedy answers to `records`."""
    fmt = Formatter(tok, answer_prompt=cfg.data.answer_prompt, max_question_tokens=10**9, max_cot_tokens=10**9,
                    max_answer_tokens=10**9)
    items = [fmt.tokenize(r, i) for i, r in enumerate(records[:2])]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        t = model.teacher_forward(build_teacher_batch(items, model.ids), need_kv=False, need_importance=False)
        s = model.student_forward(build_student_batch(items, model.ids, cfg.latent.num_latents),
                                  cfg.latent.num_sweeps)
        q = [fmt.tokenize(r, i, need_answer=False) for i, r in enumerate(records)]
        gens = generate(model, q, mode="latent", num_latents=cfg.latent.num_latents, num_sweeps=cfg.latent.num_sweeps,
                        max_new_tokens=cfg.run.eval_max_new_tokens, tokenizer=tok)
    model.train(was_training)
    return {"teacher": t.logits.clone(), "student": s.logits.clone(), "answers": [g.text for g in gens]}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    cfg = load_config("tiny_synth", TINY + LORA + [f"run.output_dir={out}"])
    test_recs = load_records(synthetic_dir(cfg, out / "_data") / "test.jsonl", "jsonl")[:N_EVAL]
    seen = {}
    real_save = kt.save_model

    def spy(model, tok, d, meta=None, cfg=None):
        real_save(model, tok, d, meta, cfg)
        seen[d.name.removesuffix(".tmp")] = probe(model, tok, cfg, test_recs)

    mp = pytest.MonkeyPatch()
    mp.setattr(kt, "save_model", spy)
    try:
        assert main(["train", "--config", "tiny_synth", "--no-progress",
                     *sets(TINY + LORA + [f"run.output_dir={out}", "run.name=lora"])]) == 0
    finally:
        mp.undo()
    return out / "lora", seen["final"], test_recs, out


def test_lora_checkpoint_holds_the_adapter_and_its_base(lora_run):
    run, _, _, _ = lora_run
    ck = find_checkpoint(run)
    assert ck.name == "best"
    for d in (run / "best", run / "final"):
        assert sorted(p.name for p in (d / "model").iterdir()) == ["README.md", "adapter_config.json",
                                                                     "adapter_model.safetensors"]
        assert json.loads((d / "base.json").read_text()) == {"kind": "scratch"}
        base = load_file(str(d / "base" / "model.safetensors"))
        assert not any("lora" in k or "base_layer" in k for k in base)
        assert "model.layers.0.self_attn.q_proj.weight" in base


def test_lora_run_reloads_as_trained(lora_run):
    run, ref, _, _ = lora_run
    model, tok, cfg = load_for_eval(run / "final")
    assert hasattr(model.lm, "peft_config")  # unmerged, as validation saw it
    got = probe(model, tok, cfg, lora_run[2])
    torch.testing.assert_close(got["teacher"], ref["teacher"], rtol=0, atol=1e-5)
    torch.testing.assert_close(got["student"], ref["student"], rtol=0, atol=1e-5)
    assert got["answers"] == ref["answers"]
    with model.lm.disable_adapter():  # the adapter matters at that tolerance: without it the logits move
        base = probe(model, tok, cfg, lora_run[2])
    assert (base["teacher"] - ref["teacher"]).abs().max() > 1e-3


def test_lora_run_evaluates_asks_and_inspects_through_the_cli(lora_run, capsys):
    run, ref, recs, out = lora_run
    shutil.rmtree(run / "best")  # eval falls back to final/, whose answers the spy recorded
    data = synthetic_dir(load_config("tiny_synth", TINY), out / "_data")
    assert main(["eval", "--checkpoint", str(run), "--datasets", "synth-test", "--data-dir", str(data),
                 "--limit", str(N_EVAL)]) == 0
    got = run / "eval" / f"synth-test-limit{N_EVAL}" / "predictions.jsonl"  # --limit N: beside the full eval
    rows = [json.loads(x) for x in got.read_text().splitlines()]
    assert [r["generated"] for r in rows] == ref["answers"]
    capsys.readouterr()
    assert main(["ask", "--checkpoint", str(run), "--question", recs[0].question]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"answer: {ref['answers'][0].strip()}"
    png = out / "inspect.png"
    assert main(["inspect", "--checkpoint", str(run), "--question", recs[0].question, "--cot",
                 " ".join(recs[0].steps), "--answer", recs[0].answer, "--output", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_init_from_a_lora_run_starts_from_its_merged_weights(lora_run):
    run, ref, recs, out = lora_run
    cfg = load_config("tiny_synth", TINY + LORA + ["model.from_scratch=null", f"model.init_from={run}"])
    tok = load_tokenizer(cfg)
    model = build_reasoner(cfg, tok)  # the init run's adapter folded in, and a fresh (zero) LoRA on top
    got = probe(model, tok, cfg, recs)
    torch.testing.assert_close(got["teacher"], ref["teacher"], rtol=0, atol=1e-4)
    torch.testing.assert_close(got["student"], ref["student"], rtol=0, atol=1e-4)
    assert got["answers"] == ref["answers"]
    # and through the CLI: train on top of it, then evaluate the new LoRA run (base = the first run)
    assert main(["train", "--config", "tiny_synth", "--no-progress",
                 *sets(TINY + LORA + ["model.from_scratch=null", f"model.init_from={run}", "optim.max_steps=2",
                                      "run.eval_every=2", f"run.output_dir={out}", "run.name=child"])]) == 0
    child = out / "child" / "final"
    assert json.loads((child / "base.json").read_text()) == {"kind": "init_from",
                                                             "path": str((run / "final").resolve())}
    m2, _, _ = load_for_eval(child)
    assert hasattr(m2.lm, "peft_config")


def test_a_damaged_adapter_config_is_named_by_export_and_eval(lora_run, tmp_path, capsys):
    """A truncated adapter_config.json: the error was json's "Expecting value: line 1 column 63" alone."""
    run, _, _, _ = lora_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for d in ("best", "final"):
        f = copy / d / "model" / "adapter_config.json"
        if f.exists():
            f.write_text(f.read_text()[:60])
    ck = find_checkpoint(copy)
    capsys.readouterr()
    for argv in (["export", str(copy), "--output", str(tmp_path / "hf")], ["eval", "--checkpoint", str(ck / "model"),
                                                                          "--datasets", "synth-test"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"{ck / 'model' / 'adapter_config.json'}: not valid JSON (" in err and err.count("\n") == 1, err


def test_lora_loading_is_strict(lora_run, tmp_path):
    run, _, _, _ = lora_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    f = copy / "final" / "model" / "adapter_model.safetensors"
    sd = load_file(str(f))
    gone = sorted(sd)[0]
    save_file({k: v for k, v in sd.items() if k != gone}, str(f))
    with pytest.raises(CheckpointError, match=rf"adapter tensors do not match.*missing \['{gone}'\]"):
        load_for_eval(copy / "final")
    # a run built on another run's final model: that model gone -> one clear error
    child = tmp_path / "child"
    shutil.copytree(run / "final", child / "final")
    shutil.copy(run / "config.yaml", child / "config.yaml")
    (child / "final" / "base.json").write_text(json.dumps({"kind": "init_from", "path": str(tmp_path / "gone")}))
    with pytest.raises(CheckpointError, match="its base model .*gone.* is gone"):
        load_for_eval(child / "final")
    with pytest.raises(CheckpointError, match="no kava model found"):
        find_checkpoint(tmp_path)
