"""Coconut and iCoT (`kava.curriculum`): the thoughts against a naive recomputation, the schedules, the
optimizer resets, exact resume in the middle of a stage, the labels the CE counts, and both methods end to end."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

import kava.train as kt
from kava import curriculum
from kava.config import ConfigError, load_config
from kava.data.format import IGNORE, Formatter, build_student_batch, special_ids
from kava.checkpoint.load import load_any
from kava.data.records import Record, SkipLog
from kava.evaluate import evaluate_records
from kava.objective import label_counts, loss_step, make_batch
from kava.spec import SPECS
from tiny import RECORDS, tiny_reasoner, tiny_tokenizer

TINY = [
    "model.from_scratch.hidden_size=32", "model.from_scratch.intermediate_size=64",
    "model.from_scratch.num_hidden_layers=2",
    "data.synth_train_size=600", "data.synth_eval_size=20", "data.valid_limit=10",
    "optim.effective_batch=8", "optim.micro_batch=4",
    "run.log=[jsonl]", "run.log_every=1", "run.eval_max_cot_tokens=24", "run.eval_max_new_tokens=6",
]
# 600 examples / 8 = 75 steps per epoch; 0.08 epochs per stage = 6 steps: stages 0, 1, 2, 3 (= all) in 20 steps
COCONUT = ["method=coconut", "coconut.reset_every=stage", "latent.num_latents=4", "latent.projection=identity",
           "coconut.thoughts_per_step=2",
           "coconut.max_stages=2", "coconut.epochs_per_stage=0.08"]


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    return tmp_path_factory.mktemp("synth")


def cfg_of(tmp_path, *extra):
    return load_config("tiny_synth", TINY + [f"run.output_dir={tmp_path}", *extra])


def tokenized(with_steps=True):
    tok = tiny_tokenizer()
    f = Formatter(tok, drop_last_step=False, with_steps=with_steps)
    return tok, f, f.tokenize_all(RECORDS, SkipLog())


# ------------------------------------------------------------------------------------------------ data
def test_step_ends_split_the_cot_at_its_steps():
    tok, f, items = tokenized()
    for rec, it in zip(RECORDS, items):
        assert len(it.step_ends) == len(rec.steps) and it.step_ends[-1] == len(it.cot)
        assert list(it.step_ends) == sorted(set(it.step_ends))
        for j, end in enumerate(it.step_ends):  # the first j + 1 steps, token for token
            assert it.cot[:end] == f._enc(" " + " ".join(s.strip() for s in rec.steps[:j + 1]))
    assert all(it.step_ends == () for it in tokenized(with_steps=False)[2])


def test_without_steps_keeps_the_remaining_steps():
    tok, f, items = tokenized()
    it = items[2]  # 5 steps
    for skip in range(7):
        rest = curriculum.without_steps(it, skip)
        kept = RECORDS[2].steps[min(skip, 5):]
        assert rest.cot == (f._enc(" " + " ".join(kept)) if kept else [])
        assert len(rest.step_ends) == len(kept) and (not kept or rest.step_ends[-1] == len(rest.cot))
        assert rest.question == it.question and rest.answer == it.answer


# ------------------------------------------------------------------------------------------------ schedules
def test_coconut_schedule():
    cc = SimpleNamespace(thoughts_per_step=2, max_stages=3, epochs_per_stage=1.5, pad_latents_to_max=True,
                         mix_prob=0.0, reset_optimizer=True)
    assert curriculum.coconut_steps_per_stage(10, cc) == 15
    assert [curriculum.coconut_stage(s, 10, cc) for s in (0, 14, 15, 29, 30, 44, 45, 100)] == [0, 0, 1, 1, 2, 2, 3, 6]
    # (steps replaced, thoughts): stage s replaces s steps with s·c thoughts; past the last stage, every step
    assert curriculum.coconut_layout(5, 0, cc) == (0, 0)
    assert curriculum.coconut_layout(5, 2, cc) == (2, 4)
    assert curriculum.coconut_layout(1, 2, cc) == (1, 4)  # fewer steps than the stage: all of them, s·c thoughts
    assert curriculum.coconut_layout(5, 4, cc) == (5, 6)
    assert curriculum.coconut_layout(2, 4, cc) == (2, 6)
    cc.pad_latents_to_max = False
    assert curriculum.coconut_layout(2, 4, cc) == (2, 4)


def test_coconut_apply_follows_the_schedule_and_mixes_stages(tmp_path):
    tok, f, items = tokenized()
    cfg = cfg_of(tmp_path, *COCONUT)  # 2 stages of c = 2, 6 steps each at 75 steps per epoch
    for step, stage in ((0, 0), (5, 0), (6, 1), (11, 1), (12, 2), (18, 3), (500, 3)):
        ex = curriculum.for_config(cfg, 75).apply(items, step)
        assert ex.stats == {"curriculum/stage": float(stage)}
        for it, got, n in zip(items, ex.items, ex.latent_counts):
            skip, thoughts = curriculum.coconut_layout(len(it.step_ends), stage, cfg.coconut)
            assert got.cot == curriculum.without_steps(it, skip).cot and n == thoughts
        assert ex.latent_counts == [min(stage, 2) * 2] * len(items)
    # mixing: every example at a random stage 0..its steps, drawn from (run.seed, step) only
    mixed = cfg_of(tmp_path, *COCONUT, "coconut.mix_prob=1.0")
    many = items * 50
    a = curriculum.for_config(mixed, 75).apply(many, 7)
    assert a.latent_counts == curriculum.for_config(mixed, 75).apply(many, 7).latent_counts
    assert a.latent_counts != curriculum.for_config(mixed, 75).apply(many, 8).latent_counts
    assert set(a.latent_counts) == {0, 2, 4}  # stages 0, 1, 2 and beyond (4 thoughts)


def official_schedule(steps_per_epoch: int, rate: float, beyond: float, n_steps: int) -> list[float]:
    """The official iCoT loop's `scheduled_to_remove` before each batch (da03/Internalize_CoT_Step_by_Step,
    src/train.py), re-enacted with its own counters: one token every round(steps per epoch / rate) batches, the
    whole CoT (inf) once it reaches `beyond`."""
    every = int(round(steps_per_epoch / rate))
    sched, counter, out = 0, 0, []
    for step in range(n_steps):
        if step % steps_per_epoch == 0 and sched >= beyond:
            sched = float("inf")
        prev = sched
        if counter == every or every == 0:
            sched, counter = sched + 1, 0
        counter += 1
        if sched >= beyond:
            sched = float("inf")
        out.append(sched if sched >= prev else prev)
    return out


@pytest.mark.parametrize("spe, rate, beyond", [(10, 8, 20), (75, 8, 1e9), (75, 10, 15), (7, 8, 30), (3, 8, 12),
                                               (100, 3, 1e9), (25, 2, 40)])
def test_icot_schedule_is_the_official_loops(spe, rate, beyond):
    """One more token every round(steps_per_epoch / rate) steps, as the official loop counts (floor(step · rate /
    steps_per_epoch) drifts from it by up to a token per epoch where the epoch is not a multiple of the rate)."""
    ic = SimpleNamespace(tokens_per_epoch=float(rate), smoothing_lambda=None,
                         remove_all_beyond=None if beyond >= 1e9 else int(beyond), reset_optimizer=True)
    ours = [curriculum.icot_scheduled(s, spe, ic) for s in range(6 * spe)]
    theirs = [curriculum.ALL if x == float("inf") else x for x in official_schedule(spe, rate, beyond, 6 * spe)]
    assert ours == theirs


def test_icot_schedule_and_smoothing(tmp_path):
    ic = SimpleNamespace(tokens_per_epoch=8.0, smoothing_lambda=None, remove_all_beyond=20, reset_optimizer=True)
    assert [curriculum.icot_scheduled(s, 10, ic) for s in (0, 1, 2, 10, 19, 20, 99)] == \
        [0, 1, 2, 10, 19, curriculum.ALL, curriculum.ALL]  # round(10 / 8) = 1: a token every step
    p = curriculum.icot_offset_probs(1.0)
    assert p.shape == (100,) and float(p.sum()) == pytest.approx(1.0)
    assert float(p[0]) == pytest.approx(1 - torch.e ** -1) and float(p[1] / p[0]) == pytest.approx(torch.e ** -1)
    draws = curriculum.icot_removed(40000, 3, 1.0, torch.Generator().manual_seed(0))
    freq = torch.bincount(torch.tensor(draws) - 3, minlength=100).double() / len(draws)
    assert (freq[:6] - p[:6]).abs().max() < 0.01  # the offsets follow P(o) = (1 - e^-λ) e^-λo
    assert curriculum.icot_removed(5, 4, None, torch.Generator()) == [4] * 5

    tok, f, items = tokenized()
    cfg = cfg_of(tmp_path, "method=icot", "icot.tokens_per_epoch=10", "icot.smoothing_lambda=null",
                 "icot.remove_all_beyond=15")
    for step, cut in ((0, 0), (10, 1), (75, 9), (150, curriculum.ALL)):  # 75 steps per epoch: a token every 8
        ex = curriculum.for_config(cfg, 75).apply(items, step)
        assert ex.latent_counts is None
        assert [g.cot for g in ex.items] == [it.cot[min(cut, len(it.cot)):] for it in items]
    assert curriculum.for_config(cfg_of(tmp_path, "method=cot"), 75) is None  # no curriculum


def test_icot_infinite_smoothing_lambda_means_no_smoothing(tmp_path):
    """`icot.smoothing_lambda: inf` (the official code's "no smoothing") is λ null: every offset 0 (its
    formula gave NaN probabilities, and torch.multinomial failed at step 1)."""
    p = curriculum.icot_offset_probs(float("inf"))
    assert torch.equal(p, curriculum.icot_offset_probs(None)) and float(p[0]) == 1.0
    assert curriculum.icot_removed(50, 4, float("inf"), torch.Generator().manual_seed(0)) == [4] * 50
    tok, f, items = tokenized()
    cfg = cfg_of(tmp_path, "method=icot", "icot.tokens_per_epoch=10", "icot.smoothing_lambda=inf")
    assert [g.cot for g in curriculum.for_config(cfg, 75).apply(items, 75).items] == [it.cot[9:] for it in items]  # 75 // 8


def test_optimizer_resets_at_each_stage_change(tmp_path):
    cfg = cfg_of(tmp_path, *COCONUT)
    assert [s for s in range(1, 40) if curriculum.for_config(cfg, 75).reset_due(s)] == [6, 12, 18]
    assert not any(curriculum.for_config(cfg_of(tmp_path, *COCONUT, "coconut.reset_optimizer=false"), 75).reset_due(s)
                   for s in range(40))
    ic = cfg_of(tmp_path, "method=icot", "icot.tokens_per_epoch=8")
    assert [s for s in range(1, 30) if curriculum.for_config(ic, 75).reset_due(s)] == [9, 18, 27]  # a token every round(75 / 8)


def test_coconut_resets_at_every_epoch_by_default_as_the_official_run_py(tmp_path):
    """The official Coconut run.py re-creates AdamW at every epoch start when reset_optimizer is set, stage change
    or not (here 3 epochs per stage, and after the last stage too); `coconut.reset_every=stage` resets at stage
    changes only."""
    base = [c for c in COCONUT if not c.startswith(("coconut.reset_every", "coconut.epochs_per_stage"))]
    cfg = cfg_of(tmp_path, *base, "coconut.epochs_per_stage=3")
    assert cfg.coconut.reset_every == "epoch"
    assert [s for s in range(1, 800) if curriculum.for_config(cfg, 75).reset_due(s)] == list(range(75, 800, 75))
    stage = cfg_of(tmp_path, *base, "coconut.epochs_per_stage=3", "coconut.reset_every=stage")
    assert [s for s in range(1, 800) if curriculum.for_config(stage, 75).reset_due(s)] == [225, 450, 675]


def test_icot_no_reset_once_every_cot_is_gone(tmp_path):
    """As the official loop: no optimizer reset after a step whose examples had all lost their whole CoT (before,
    short CoTs meant a reset at every growth step long after nothing was left to remove)."""
    _, _, items = tokenized()
    longest = max(len(it.cot) for it in items)
    cfg = cfg_of(tmp_path, "method=icot", "icot.tokens_per_epoch=75", "icot.smoothing_lambda=null",
                 "icot.remove_all_beyond=null")  # a token every step
    resets = [s for s in range(1, longest + 20)
              if curriculum.for_config(cfg, 75).reset_due(s, previous=lambda s=s: curriculum.for_config(cfg, 75).apply(items, s - 1))]
    assert resets == list(range(1, longest + 1))  # step s removes s tokens; from s - 1 = longest on, nothing is left
    assert not curriculum.for_config(cfg, 75).apply(items, longest - 1).all_cot_removed
    assert curriculum.for_config(cfg, 75).apply(items, longest).all_cot_removed
    assert [s for s in range(1, longest + 20) if curriculum.for_config(cfg, 75).reset_due(s)] == list(range(1, longest + 20))


def test_best_checkpoint_is_chosen_at_the_furthest_curriculum_point(tmp_path):
    """iCoT keeps a best from the furthest removal only (the official loop forgets its best accuracy whenever
    more CoT is removed); without a curriculum it is the highest accuracy."""
    ic = curriculum.for_config(cfg_of(tmp_path, "method=icot", "icot.tokens_per_epoch=75",
                                      "icot.remove_all_beyond=null"), 75)  # progress = step
    best = {"val/accuracy": 0.9, "step": 4, "curriculum": 3}
    assert ic.progress(3) == 3
    assert kt.is_better(ic, best, 0.1, 4)  # more removed: replaces any accuracy
    assert kt.is_better(ic, best, 0.95, 3) and not kt.is_better(ic, best, 0.5, 3)
    # once the schedule has removed the longest CoT, accuracies compare again (the official loop keeps its best
    # across batches that had no CoT left): before, a later validation at 0% replaced a better one
    assert ic.progress(40, longest_cot=30) == ic.progress(60, longest_cot=30) == 30
    done = {"val/accuracy": 0.9, "step": 41, "curriculum": 30}
    assert not kt.is_better(ic, done, 0.0, 60, longest_cot=30)
    assert kt.is_better(ic, done, 0.95, 60, longest_cot=30)
    assert kt.is_better(ic, {"val/accuracy": 0.9, "step": 21, "curriculum": 20}, 0.1, 29, longest_cot=30)
    assert curriculum.for_config(cfg_of(tmp_path, "method=cot"), 75) is None  # no curriculum: the accuracy
    assert not kt.is_better(None, {"val/accuracy": 0.9, "step": 4}, 0.5, 60)
    assert kt.is_better(None, {"val/accuracy": 0.9, "step": 4}, 0.95, 60)


# ------------------------------------------------------------------------------------------------ Coconut's thoughts
def naive_coconut(m, ids, it, n: int):
    """One example, no padding, no cache: each thought is the last hidden state of a full pass over everything
    so far, appended as the next input embedding; then <eot> · CoT · prompt · answer."""
    x = m.embed(torch.tensor([it.question + [ids.bot]]))
    thoughts = []
    for _ in range(n):
        S = x.shape[1]
        h = m.run(x, torch.ones(1, S, dtype=torch.long), torch.arange(S)[None], m.new_cache()).last_hidden_state
        thoughts.append(h[:, -1:])
        x = torch.cat([x, h[:, -1:]], 1)
    tail = [ids.eot] + it.cot + it.prompt + it.answer
    start = x.shape[1]
    x = torch.cat([x, m.embed(torch.tensor([tail]))], 1)
    S = x.shape[1]
    h = m.run(x, torch.ones(1, S, dtype=torch.long), torch.arange(S)[None], m.new_cache()).last_hidden_state
    logits = m.logits(h[0, start:S - 1])  # position start + j predicts tail[j + 1]
    return torch.cat(thoughts, 1)[0] if thoughts else torch.zeros(0, h.shape[-1]), logits, tail[1:]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_coconut_thoughts_equal_a_naive_recomputation(family):
    m, tok = tiny_reasoner(family, projection="identity")
    _, _, items = tokenized()
    items = [curriculum.without_steps(it, k) for it, k in zip(items, (1, 0, 2, 5))]
    counts = [2, 0, 4, 3]  # per example, within one latent block of 4 (the rest masked out)
    with torch.no_grad():
        sb = build_student_batch(items, m.ids, 4, latent_counts=counts, with_cot=True)
        s = m.student_forward(sb, 0, student_mode="sequential")
        got = m.logits(s.label_h)
        assert s.forward_passes == 1 + 4 + 1
        row = (sb.label_idx // (sb.ids.shape[1] - sb.answer_start)).tolist()
        for b, (it, n) in enumerate(zip(items, counts)):
            thoughts, logits, targets = naive_coconut(m, m.ids, it, n)
            torch.testing.assert_close(s.latents[b, :n], thoughts, rtol=1e-5, atol=1e-5)
            mine = [i for i, r in enumerate(row) if r == b]
            assert s.targets[mine].tolist() == targets
            torch.testing.assert_close(got[mine], logits, rtol=1e-4, atol=1e-4)


def test_coconut_batch_labels_match_the_ce_denominators(tmp_path):
    tok, f, items = tokenized()
    cfg = cfg_of(tmp_path, *COCONUT)
    ex = curriculum.for_config(cfg, 75).apply(items, 6)  # stage 1: one step replaced by 2 thoughts
    b = make_batch(ex.items, special_ids(tok), cfg, latent_counts=ex.latent_counts)
    assert b.teacher is None and b.student.num_latents == 2
    n = int((b.student.label_tgt != IGNORE).sum())
    assert label_counts(ex.items, cfg) == {"ce_student": n}
    assert n == sum(len(it.cot) + len(it.prompt) + len(it.answer) for it in ex.items)
    assert SPECS["coconut"].terms == ("ce_student",) and SPECS["icot"].terms == ("ce_teacher",)
    m, _ = tiny_reasoner("llama", projection="identity")
    total, log = loss_step(m, b, cfg)
    assert set(log) == {"loss/ce_student", "loss/total"} and torch.isfinite(total)


# ------------------------------------------------------------------------------------------------ training
def test_coconut_resume_in_the_middle_of_a_stage_is_exact(tmp_path, synth_root):
    common = [*COCONUT, "optim.max_steps=20", "run.save_every=3"]
    a = kt.train(cfg_of(tmp_path, *common, "run.name=A"), progress=False, data_root=synth_root)
    b = tmp_path / "B"
    kt.train(cfg_of(tmp_path, *common, "run.name=B"), progress=False, data_root=synth_root, stop_after=9)
    assert kt.latest_checkpoint(b) == b / "checkpoints" / "step_9"  # stage 1 (steps 6..11)
    kt.train(cfg_of(tmp_path, *common, "run.name=B"), resume=b, progress=False, data_root=synth_root)
    wa = load_file(str(a / "checkpoints" / "step_20" / "trainable.safetensors"))
    wb = load_file(str(b / "checkpoints" / "step_20" / "trainable.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    rows = [json.loads(ln) for ln in (a / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("split") == "train"]
    assert [r["curriculum/stage"] for r in train] == [0.0] * 6 + [1.0] * 6 + [2.0] * 6 + [3.0] * 2  # 0-based step s: stage s // 6
    assert set(train[0]) >= {"loss/ce_student", "loss/total"} and "loss/ce_teacher" not in train[0]
    # the optimizer state restarted at step 18 (stage 3): AdamW's step count there is 20 - 18 = 2
    opt = load_file(str(a / "checkpoints" / "step_20" / "optimizer.safetensors"))
    steps = {float(v) for k, v in opt.items() if k.endswith(".step")}
    assert steps == {2.0}, steps


def test_icot_trains_removes_its_cot_and_answers_without_it(tmp_path, synth_root):
    cfg = cfg_of(tmp_path, "method=icot", "optim.max_steps=12", "icot.tokens_per_epoch=60",
                 "icot.remove_all_beyond=8", "run.save_every=100")
    run = kt.train(cfg, progress=False, data_root=synth_root)
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    removed = [r["curriculum/removed"] for r in rows if r.get("split") == "train"]
    # round(75 / 60) = 1: a token every step, then (from 8 on) the whole CoT (-1)
    assert removed == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, -1.0, -1.0, -1.0, -1.0]
    assert SPECS["icot"].eval_mode == "cot" and SPECS["coconut"].eval_mode == "latent"
    loaded = load_any(run, device="cpu")
    recs = [Record(r.question, r.steps, r.answer, r.source) for r in RECORDS]
    # evaluated as the official code does: free generation from the question, whatever CoT is left included
    rows, summary = evaluate_records(loaded.model, loaded.tokenizer, loaded.cfg, recs)
    assert summary["mode"] == "cot" and summary["count"] == len(recs)
    # and without a CoT on request: one pass for the question, then one per answer token
    rows, summary = evaluate_records(loaded.model, loaded.tokenizer, loaded.cfg, recs, mode="nocot")
    assert summary["mode"] == "nocot" and summary["count"] == len(recs)
    assert all(r["forward_passes"] == max(r["generated_tokens"], 1) for r in rows), rows
    done = json.loads((run / "DONE").read_text())
    # chosen among the validations after the CoT was gone: progress stops at the longest training CoT
    longest = max(len(it.cot) for it in kt.setup_data(cfg, run, Accelerator(cpu=True), data_root=synth_root).items)
    assert done["best"]["curriculum"] == longest


def test_coconut_on_another_method_s_preset_derives_m_and_the_projection_and_says_so(tmp_path, capsys):
    """`--set method=coconut` on a preset written for another method (tiny_synth: cot, M = 8, mlp) stopped with
    "= 6 thoughts, got latent.num_latents=8": M = max_stages x c and the identity projection are Coconut's own,
    derived unless the user sets them (an explicit conflict is refused: test_config_errors_name_the_key), and
    the start summary says so. A file written for coconut keeps its values (a run's config.yaml)."""
    from kava.cli import main
    from kava.config import save_config

    cfg = load_config("tiny_synth", [f"run.output_dir={tmp_path}", "method=coconut", "coconut.max_stages=4"])
    assert (cfg.latent.num_latents, cfg.latent.projection) == (8, "identity")
    cfg = load_config("tiny_synth", [f"run.output_dir={tmp_path}", "method=coconut"])
    assert (cfg.latent.num_latents, cfg.latent.projection) == (6, "identity")
    assert cfg.derived == ("latent.num_latents=6 (coconut.max_stages x coconut.thoughts_per_step; was 8)",
                           "latent.projection=identity (coconut feeds hidden states back unchanged; was mlp)")
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(str(tmp_path / "config.yaml"), resolve_paths=False)
    assert again.to_dict() == cfg.to_dict() and again.derived == ()
    assert main(["train", "--config", "tiny_synth", "--dry-run", "--set", f"run.output_dir={tmp_path}",
                 "--set", "method=coconut"]) == 0
    out = capsys.readouterr().out
    assert "  method:           coconut (full fine-tuning); derived: latent.num_latents=6 (coconut.max_stages x " in out


@pytest.mark.parametrize("override, msg", [
    (["method=coconut", "latent.num_latents=5"], "latent.num_latents: coconut answers after"),
    (["method=coconut", "latent.projection=mlp"], "latent.projection: coconut feeds"),
    (["method=coconut", "coconut.max_stages=0"], "coconut.max_stages: must be >= 1"),
    (["coconut.epochs_per_stage=0"], "coconut.epochs_per_stage: must be > 0"),
    (["coconut.mix_prob=1.5"], "coconut.mix_prob: must be in [0, 1]"),
    (["icot.smoothing_lambda=-1"], "icot.smoothing_lambda: must be > 0 or null"),
    (["icot.tokens_per_epoch=0"], "icot.tokens_per_epoch: must be > 0"),
    (["coconut.stages=3"], "coconut.stages"),
])
def test_config_errors_name_the_key(override, msg, tmp_path):
    with pytest.raises(ConfigError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        cfg_of(tmp_path, *override)


# ------------------------------------------------------------------------------------------------ keep_position
@pytest.mark.parametrize("static", [False, True])
def test_icot_keep_position_keeps_each_kept_token_at_its_place(tmp_path, static):
    """With `icot.keep_position` every token that survives the removal sits at the position it had in the full
    CoT sequence (the reference: the batch of the same items before any removal), the question's included;
    without it, everything after the removed tokens moves left by their number."""
    from kava.data.format import BlockWidths, build_teacher_batch

    tok, f, items = tokenized(with_steps=False)
    ids = special_ids(tok)
    widths = BlockWidths(q=48, c=96, a=16, static=True) if static else None
    full = build_teacher_batch(items, ids, widths=widths)
    ic = cfg_of(tmp_path, "method=icot", "icot.smoothing_lambda=1.0").icot

    def kept_positions(batch):  # per example: position of each real token, in sequence order
        return [batch.pos[b][batch.mask[b].bool()].tolist() for b in range(len(items))]

    ref = kept_positions(full)
    for keep in (True, False):
        ic.keep_position = keep
        sched = curriculum.Icot(ic, seed=0, steps_per_epoch=1)  # tokens_per_epoch 8: 8 per step
        ex = sched.apply(items, 1)
        cut = [len(a.cot) - len(b.cot) for a, b in zip(items, ex.items)]
        assert any(0 < c < len(a.cot) for c, a in zip(cut, items))  # some CoT partly removed (not vacuous)
        got = kept_positions(build_teacher_batch(ex.items, ids, widths=widths))
        for b, it in enumerate(items):
            n_q = len(it.question)
            want = ref[b][:n_q] + ref[b][n_q + cut[b]:] if keep else list(range(len(ref[b]) - cut[b]))
            assert got[b] == want, (keep, b, cut[b])
            assert ex.items[b].pos_skip == (cut[b] if keep else 0)


def test_keep_position_needs_one_cot_length(tmp_path):
    cfg = cfg_of(tmp_path, "method=icot", "icot.keep_position=true")
    _, _, items = tokenized(with_steps=False)
    assert len({len(it.cot) for it in items}) > 1
    with pytest.raises(ConfigError, match="icot.keep_position: needs every training CoT to have one length"):
        kt.check_keep_position(cfg, items)
    same = [it for it in items if len(it.cot) == len(items[0].cot)]
    kt.check_keep_position(cfg, same)  # one length: fine
    kt.check_keep_position(cfg_of(tmp_path, "method=cot", "icot.keep_position=true"), items)  # not iCoT: unused


def test_icot_keep_position_end_to_end(tmp_path):
    """iCoT with `icot.keep_position` on 2x2 multiplication (every CoT 8 tokens): best/ and final/ record where
    evaluation places the generated tokens (the tokens removed at their step), `kava eval` and the Python API
    evaluate there (the same generations as `generate(position_skip=...)`), a training checkpoint is refused
    (its step's removal is not stored with it), and so is an export (plain generation cannot skip positions)."""
    import kava
    from kava.checkpoint.export import export_model
    from kava.decode import generate_for_config
    from kava.evaluate import evaluate_run

    cfg = cfg_of(tmp_path, "method=icot", "icot.keep_position=true", "data.synth_task=multiplication",
                 "data.synth_digits=2", "data.answer_prompt=####", "data.drop_last_step=false",
                 "icot.tokens_per_epoch=75", "icot.smoothing_lambda=null", "optim.max_steps=6", "run.eval_every=3",
                 "run.save_every=3")
    run = kt.train(cfg, progress=False, data_root=tmp_path / "data")
    best = json.loads((run / "best" / "meta.json").read_text())
    final = json.loads((run / "final" / "meta.json").read_text())
    # 600 / 8 = 75 steps per epoch, 75 tokens per epoch: step s (0-based) trains with s tokens removed
    assert best["step"] == 6 and best["position_skip"] == 5 and final["position_skip"] == 5
    test = next((tmp_path / "data").glob("mult2_*")) / "test.txt"
    summary = next(iter(evaluate_run(run, [str(test)], progress=False, output=tmp_path / "eval").values()))
    assert summary["position_skip"] == 5 and summary["mode"] == "cot"
    km = kava.load(run, device="cpu")
    recs = [Record("3 4 * 5 6", (), "5 0 4 2", "t:1")]
    rows, s = km.evaluate(recs)
    assert s["position_skip"] == 5
    ref = generate_for_config(km.model, km.tokenizer, km.cfg, km.tokenize([recs[0].question]), mode="cot",
                              position_skip=5)
    assert rows[0]["generated"] == ref[0].text == km.generate(recs[0].question)[0].text
    with pytest.raises(ConfigError, match="evaluate the run's best/ or final/"):
        evaluate_run(run / "checkpoints" / "step_3", [str(test)], progress=False, output=tmp_path / "eval3")
    with pytest.raises(ConfigError, match="plain generation cannot reproduce"):
        export_model(run, tmp_path / "hf")
