"""Latent diagnostics (issue 11 §2) against naive references.

- ablations: the answer logits with replaced latents equal a full-sequence recomputation over
  `question · <bot> · z' · <eot> · prompt · answer` (no cache reuse); with the real latents (or, at T=0, the
  placeholder) nothing changes; the shuffle is a derangement and a batch of one is refused.
- oracle: splicing the student's own latent KV reproduces its answer logits; masked slots equal a
  full recomputation whose attention mask hides those columns; rotate/unrotate are inverse and match HF.
- KV match: per-layer relative error and cosine equal explicit loops.
- evaluation: generations with replaced latents equal greedy decoding by full recomputation; oracle skips are
  counted by reason; the summary's numbers are the rows' means.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kava import losses
from kava.config import config_from_dict
from kava.data.format import Formatter, build_student_batch, build_teacher_batch
from kava.data.records import Record, SkipLog
from kava.diagnostics import (EMPTY_COT, NO_COT, DiagnosticsSpec, ablate_latents, derangement, eval_chunks,
                              format_diagnostics, kv_match_stats, latent_slot_cache, oracle_cache,
                              summarize_diagnostics)
from kava.evaluate import evaluate_records
from kava.objective import loss_step, make_batch, teacher_kv_targets
from kava.model.reasoner import StudentOut
from tiny import RECORDS, rotate_keys, tiny_reasoner, unrotate_keys

M, T = 4, 2
TOL = 1e-5
STUDENTS = [("llama", "jacobi", T), ("llama", "jacobi", 0), ("gpt2", "jacobi", T), ("llama", "sequential", 0),
         ("qwen2", "sequential", 0)]


def close(a, b, tol=TOL):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert (a.float() - b.float()).abs().max().item() <= tol, (a.float() - b.float()).abs().max().item()


def student_batch(m, tok, records=RECORDS, with_answer=True):
    items = Formatter(tok).tokenize_all(records, SkipLog(), need_answer=with_answer)
    return items, build_student_batch(items, m.ids, M, with_answer=with_answer)


def answer_logits(m, sb, cache, mask=None):
    """Teacher-forced answer logits from a cache holding the question block and the slots."""
    res = StudentOut(None, None, None, head=m.logits, cache=cache)
    sb = sb if mask is None else type(sb)(**{**sb.__dict__, "mask": mask})
    return m.answer_pass(sb, res).logits


def full_logits(m, sb, z, mask=None):
    """Naive reference: the whole sequence question · <bot> · z · <eot> · prompt · answer in one pass, no cache."""
    Qb, P = sb.q_block, sb.answer_start
    x = torch.cat([m.embed(sb.ids[:, :Qb]), z, m.embed(sb.ids[:, P:])], 1)
    mask = sb.mask if mask is None else mask
    h = m.decoder(inputs_embeds=x, attention_mask=mask, position_ids=sb.pos, use_cache=False).last_hidden_state
    sel = sb.targets[:, P:] != -100
    return m.logits(h[:, P:][sel])


# ------------------------------------------------------------------------------------------ ablations
def test_derangement_and_replacements():
    for n in (2, 3, 7):
        p = derangement(n)
        assert sorted(p.tolist()) == list(range(n)) and all(p[b] != b for b in range(n))
    z = torch.randn(3, M, 8)
    ph = torch.randn(8)
    assert torch.equal(ablate_latents(z, "none"), z)
    assert torch.equal(ablate_latents(z, "zeros"), torch.zeros_like(z))
    pl = ablate_latents(z, "placeholder", ph)
    assert all(torch.equal(pl[b, j], ph) for b in range(3) for j in range(M))
    sh = ablate_latents(z, "shuffle")
    for b in range(3):  # every example holds another example's latents, all M of them
        assert torch.equal(sh[b], z[(b + 1) % 3]) and not torch.equal(sh[b], z[b])
    with pytest.raises(ValueError, match="at least 2 examples"):
        ablate_latents(z[:1], "shuffle")
    with pytest.raises(ValueError, match="unknown latent ablation"):
        ablate_latents(z, "noise")
    with pytest.raises(ValueError, match="placeholder"):
        ablate_latents(z, "placeholder")
    with pytest.raises(ValueError, match="unknown latent ablation"):
        DiagnosticsSpec(("zero",))


@pytest.mark.parametrize("family, student_mode, sweeps", STUDENTS)
@pytest.mark.parametrize("kind", ["none", "zeros", "placeholder", "shuffle"])
def test_ablated_answer_equals_full_recomputation(family, student_mode, sweeps, kind):
    m, tok = tiny_reasoner(family, seed=2)
    _, sb = student_batch(m, tok)
    with torch.no_grad():
        s = m.student_forward(sb, sweeps, student_mode=student_mode, with_answer=False)
        ph = m.embed(torch.tensor([[m.ids.latent]]))[0, 0]
        z = ablate_latents(s.latents, kind, ph)
        fast = answer_logits(m, sb, latent_slot_cache(m, sb, s.cache, z))
        ref = full_logits(m, sb, z)
        close(fast, ref)
        pause = student_mode == "jacobi" and sweeps == 0  # there every latent is the placeholder (a shuffle is a no-op)
        if kind == "zeros" or (kind != "none" and not pause):  # the replacement really changes the answer
            assert (fast - answer_logits(m, sb, latent_slot_cache(m, sb, s.cache, s.latents))).abs().max() > 1e-3


@pytest.mark.parametrize("family, student_mode, sweeps", STUDENTS)
def test_ablation_with_the_real_latents_changes_nothing(family, student_mode, sweeps):
    """Rebuilding the slots' KV from the latents the answer pass saw reproduces the student's own answer."""
    m, tok = tiny_reasoner(family, seed=3)
    _, sb = student_batch(m, tok)
    with torch.no_grad():
        student = m.student_forward(sb, sweeps, student_mode=student_mode)  # the normal path, answer included
        s = m.student_forward(sb, sweeps, student_mode=student_mode, with_answer=False)
        close(answer_logits(m, sb, latent_slot_cache(m, sb, s.cache, ablate_latents(s.latents, "none"))),
              student.logits)
        if student_mode == "jacobi" and sweeps == 0:  # pause tokens: the latents are the placeholder itself
            ph = m.embed(torch.tensor([[m.ids.latent]]))[0, 0]
            close(answer_logits(m, sb, latent_slot_cache(m, sb, s.cache, ablate_latents(s.latents, "placeholder", ph))),
                  student.logits)


# ------------------------------------------------------------------------------------------ oracle
@pytest.mark.parametrize("family, student_mode, sweeps", STUDENTS)
def test_oracle_splice_of_the_students_own_kv_reproduces_its_answer(family, student_mode, sweeps):
    m, tok = tiny_reasoner(family, seed=4)
    _, sb = student_batch(m, tok)
    B = sb.ids.shape[0]
    with torch.no_grad():
        student = m.student_forward(sb, sweeps, student_mode=student_mode)
        s = m.student_forward(sb, sweeps, student_mode=student_mode, with_answer=False, keep_sweeps="last")
        cache, mask = oracle_cache(m, sb, s.cache, s.latent_k[-1], s.latent_v[-1], torch.ones(B, M, dtype=torch.bool))
        assert torch.equal(mask, sb.mask)
        close(answer_logits(m, sb, cache, mask), student.logits, 1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_oracle_masked_slots_equal_recomputation_with_hidden_columns(family):
    """Slots without a target are invisible: garbage there changes nothing, and the answer equals a full pass
    whose attention mask hides those columns (positions unchanged)."""
    m, tok = tiny_reasoner(family, seed=5)
    _, sb = student_batch(m, tok)
    B, Qb = sb.ids.shape[0], sb.q_block
    n = torch.tensor([M, 2, 0, 1])[:B]  # valid slots per example, one with none
    slot_mask = torch.arange(M)[None, :] < n[:, None]
    with torch.no_grad():
        s = m.student_forward(sb, T, with_answer=False)
        k, v = s.latent_k[-1].clone(), s.latent_v[-1].clone()
        off = ~slot_mask[None, :, None, :, None].expand_as(k)
        k[off] = 50 * torch.randn(int(off.sum()))
        v[off] = 50 * torch.randn(int(off.sum()))
        cache, mask = oracle_cache(m, sb, s.cache, k, v, slot_mask)
        assert torch.equal(mask[:, Qb:Qb + M], slot_mask.long())
        got = answer_logits(m, sb, cache, mask)
        close(got, full_logits(m, sb, s.latents, mask))
        assert (got - answer_logits(m, sb, *oracle_cache(m, sb, s.cache, k, v, torch.ones_like(slot_mask)))
                ).abs().max() > 1e-3  # unmasked, the garbage would matter


def test_rotate_is_the_inverse_of_unrotate_and_matches_hf():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    m, _ = tiny_reasoner("llama")
    L, B, Hkv, N, D = 2, 3, 2, 5, 16
    k = torch.randn(L, B, Hkv, N, D)
    pos = torch.randint(0, 100, (B, N))
    cos, sin = m.rotary(k[0], pos)
    _, hf = apply_rotary_pos_emb(k[0], k[0], cos, sin)
    close(rotate_keys(k[0], cos, sin), hf, 1e-6)
    close(m.rotate(m.unrotate(k, pos), pos), k, 1e-5)
    close(m.unrotate(m.rotate(k, pos), pos), k, 1e-5)
    close(unrotate_keys(hf, cos, sin), k[0], 1e-5)


@pytest.mark.parametrize("softmax", ["cot", "prefix"])
def test_eviction_targets_are_the_kv_loss_targets(softmax):
    """The KV match and the oracle use the very targets the training loss uses (`kava.objective.kv_targets`,
    through `teacher_kv_targets`): L_KV from them equals loss_step's `loss/kv` on the same batch, whichever
    importance score the run was trained with."""
    m, tok = tiny_reasoner("llama", seed=6)
    cfg = config_from_dict({"method": "kava", "model": {"name_or_path": "tiny"},
                            "latent": {"num_latents": 2, "num_sweeps": T}, "data": {"drop_last_step": False},
                            "eviction": {"lam": 1.0, "importance_softmax": softmax}})
    M = cfg.latent.num_latents  # fewer slots than CoT tokens: the selection (hence the score) matters
    items = Formatter(tok, drop_last_step=False).tokenize_all(RECORDS, SkipLog())
    batch = make_batch(items, m.ids, cfg)
    with torch.no_grad():
        _, log = loss_step(m, batch, cfg)
        _, tgt = teacher_kv_targets(m, batch.teacher, cfg, M)
        tk, tv, slot_mask = tgt.k, tgt.v, tgt.slot_mask
        s = m.student_forward(batch.student, T, keep_sweeps="last")
        mine = losses.kv_loss(s.latent_k[-1], s.latent_v[-1], tk, tv, slot_mask, kind=cfg.loss.kv_loss,
                              layer_std=cfg.loss.kv_layer_std)
    assert mine.item() == pytest.approx(log["loss/kv"].item(), rel=1e-6)
    assert slot_mask.sum(-1).tolist() == [min(len(i.cot), M) for i in items]
    import dataclasses

    other = dataclasses.replace(cfg, eviction=dataclasses.replace(
        cfg.eviction, importance_softmax="prefix" if softmax == "cot" else "cot"))
    with torch.no_grad():  # the other score keeps other tokens, so ignoring the option would fail the check above
        tk_other = teacher_kv_targets(m, batch.teacher, other, M)[1].k
    assert (tk_other - tk).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------ KV match
def test_kv_match_stats_equal_loops():
    torch.manual_seed(0)
    L, B, Hkv, D = 3, 4, 2, 8
    s, t = torch.randn(L, B, Hkv, M, D), torch.randn(L, B, Hkv, M, D)
    s[:, 1] = t[:, 1]  # a perfect match
    s[:, 2] = -2 * t[:, 2]  # opposite direction, twice the length
    slot_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    rel, cos, pairs = kv_match_stats(s, t, slot_mask)
    assert pairs.tolist() == [Hkv * int(r.sum()) for r in slot_mask]
    for l in range(L):
        for b in range(B):
            rs, cs = [], []
            for h in range(Hkv):
                for j in range(M):
                    if slot_mask[b, j]:
                        rs.append((torch.linalg.vector_norm(s[l, b, h, j] - t[l, b, h, j])
                                   / torch.linalg.vector_norm(t[l, b, h, j])).item())
                        cs.append(F.cosine_similarity(s[l, b, h, j], t[l, b, h, j], dim=0).item())
            assert rel[l, b].item() == pytest.approx(sum(rs) / len(rs) if rs else 0.0, abs=1e-6)
            assert cos[l, b].item() == pytest.approx(sum(cs) / len(cs) if cs else 0.0, abs=1e-6)
    assert torch.allclose(rel[:, 1], torch.zeros(L)) and torch.allclose(cos[:, 1], torch.ones(L))
    assert torch.allclose(rel[:, 2], torch.full((L,), 3.0)) and torch.allclose(cos[:, 2], -torch.ones(L))


def test_summary_weights_layers_by_valid_pairs():
    rows = [
        {"correct": True, "ablations": {"zeros": {"correct": False}, "shuffle": {"correct": True}},
         "oracle": {"correct": True}, "kv_match": {"pairs": 2, "key_space": "cache", "k_rel": [1.0, 2.0],
                                                   "k_cos": [0.0, 0.5], "v_rel": [1.0, 1.0], "v_cos": [0.1, 0.1]}},
        {"correct": False, "ablations": {"zeros": {"correct": False}, "shuffle": {"correct": False}},
         "oracle": {"skipped": NO_COT}, "kv_match": {"pairs": 0, "key_space": "cache", "k_rel": None,
                                                     "k_cos": None, "v_rel": None, "v_cos": None}},
        {"correct": True, "ablations": {"zeros": {"correct": True}, "shuffle": {"correct": False}},
         "oracle": {"correct": False}, "kv_match": {"pairs": 6, "key_space": "cache", "k_rel": [3.0, 4.0],
                                                    "k_cos": [1.0, 1.0], "v_rel": [0.0, 0.0], "v_cos": [0.5, 0.5]}},
    ]
    s = summarize_diagnostics(rows)
    assert s["ablations"] == {"none": pytest.approx(2 / 3), "zeros": pytest.approx(1 / 3),
                              "shuffle": pytest.approx(1 / 3)}
    # the binomial standard error of every accuracy: sqrt(p (1 - p) / (n - 1))
    assert s["ablations_stderr"] == {"none": pytest.approx((2 / 9 / 2) ** 0.5), "zeros": pytest.approx((2 / 9 / 2) ** 0.5),
                                     "shuffle": pytest.approx((2 / 9 / 2) ** 0.5)}
    assert s["oracle"] == {"accuracy": 0.5, "accuracy_stderr": pytest.approx(0.5), "count": 2,
                           "student_accuracy": 1.0, "skipped": {NO_COT: 1}}
    k = s["kv_match"]
    assert k["pairs"] == 8 and k["examples"] == 2 and k["key_space"] == "cache"
    assert k["k_rel"] == pytest.approx([(2 + 18) / 8, (4 + 24) / 8])
    assert k["v_cos"] == pytest.approx([(0.2 + 3) / 8, (0.2 + 3) / 8])
    assert k["mean"]["k_rel"] == pytest.approx(((2 + 18) / 8 + (4 + 24) / 8) / 2)
    text = "\n".join(format_diagnostics("ds", s))
    assert "zeros 0.3333 (-0.3333)" in text and "oracle" in text and f"skipped: 1 ({NO_COT})" in text
    assert summarize_diagnostics([{"correct": True}]) == {}
    assert "ablations_digits" not in s and "digits" not in s["oracle"]  # number answers: no graded score


def test_digit_answers_summarise_the_digits_in_place_with_the_latents_replaced():
    """Multiplication's students are often at 0% exact match with and without their latents: the share of digits
    in place (`kava.scoring.digit_agreement`, per row) is what can still differ, so it is averaged alongside."""
    rows = [{"correct": False, "digits": 0.5, "ablations": {"zeros": {"correct": False, "digits": 0.25}},
             "oracle": {"correct": True, "digits": 1.0}},
            {"correct": False, "digits": 0.7, "ablations": {"zeros": {"correct": False, "digits": 0.05}},
             "oracle": {"skipped": NO_COT}}]
    s = summarize_diagnostics(rows)
    assert s["ablations"] == {"none": 0.0, "zeros": 0.0}
    assert s["ablations_digits"] == {"none": pytest.approx(0.6), "zeros": pytest.approx(0.15)}
    assert s["oracle"]["digits"] == 1.0 and s["oracle"]["student_digits"] == 0.5
    assert "zeros 0.1500 (-0.4500)" in "\n".join(format_diagnostics("ds", s))


# ------------------------------------------------------------------------------------------ evaluation
EVAL_RECORDS = RECORDS + [
    Record("Tom has 5 .", (), "5", "t:no-cot"),  # no CoT at all (SVAMP-like)
    Record("Tom has 9 apples and then 2 more .", ("<<9+2=11>>", "<<11*1=11>>"), "11", "t:5"),
]


def naive_greedy(m, prefix: torch.Tensor, budget: int) -> list[int]:
    """Greedy decoding by full recomputation of [1, S, d] embeddings for every token (no cache)."""
    out, x = [], prefix
    for _ in range(budget):
        S = x.shape[1]
        h = m.decoder(inputs_embeds=x, attention_mask=torch.ones(1, S, dtype=torch.long),
                      position_ids=torch.arange(S)[None], use_cache=False).last_hidden_state
        tok = int(m.logits(h[:, -1]).argmax(-1))
        out.append(tok)
        if tok == m.ids.eos:
            break
        x = torch.cat([x, m.embed(torch.tensor([[tok]]))], 1)
    return out


def eval_cfg(method, **run):
    return config_from_dict({"method": method, "model": {"name_or_path": "tiny"},
                             "latent": {"num_latents": M, "num_sweeps": T},
                             "run": {"eval_max_new_tokens": 5, **run}})


@pytest.mark.parametrize("method", ["kava", "codi"])
def test_evaluate_with_diagnostics(method):
    m, tok = tiny_reasoner("llama", seed=7)
    cfg = eval_cfg(method)
    spec = DiagnosticsSpec.everything()
    rows, summ = evaluate_records(m, tok, cfg, EVAL_RECORDS, batch_size=3, diagnostics=spec)
    plain_rows, plain = evaluate_records(m, tok, cfg, EVAL_RECORDS, batch_size=3)
    assert [r["generated"] for r in rows] == [r["generated"] for r in plain_rows]  # diagnostics change nothing
    assert summ["accuracy"] == plain["accuracy"] == summ["ablations"]["none"]
    assert list(summ["ablations"]) == ["none", "zeros", "placeholder", "shuffle"]
    for kind in ("zeros", "placeholder", "shuffle"):
        assert summ["ablations"][kind] == pytest.approx(sum(r["ablations"][kind]["correct"] for r in rows) / len(rows))
    # oracle: the record without steps and the one whose single step drop_last_step removes are counted
    reasons = {r["index"]: r["oracle"].get("skipped") for r in rows}
    assert reasons[3] == EMPTY_COT and reasons[4] == NO_COT
    assert summ["oracle"]["skipped"] == {EMPTY_COT: 1, NO_COT: 1} and summ["oracle"]["count"] == len(rows) - 2
    # KV match: valid pairs = Hkv * min(N_C, M) per example
    fmt = Formatter(tok)
    n_c = [len(fmt.tokenize(r).cot) for r in EVAL_RECORDS]
    hkv = m.config.num_key_value_heads
    assert [r["kv_match"]["pairs"] for r in rows] == [hkv * min(n, M) for n in n_c]
    assert summ["kv_match"]["pairs"] == hkv * sum(min(n, M) for n in n_c)
    assert len(summ["kv_match"]["k_rel"]) == m.num_layers

    # replaced latents, decoded greedily, equal a cache-free decode of question · <bot> · z' · <eot> · prompt
    q_items = [fmt.tokenize(r, i, need_answer=False) for i, r in enumerate(EVAL_RECORDS)]
    ph = m.embed(torch.tensor([[m.ids.latent]]))[0]
    with torch.no_grad():
        for it, row in zip(q_items, rows):
            for kind, z in (("zeros", torch.zeros(1, M, m.hidden_size)), ("placeholder", ph.expand(M, -1)[None])):
                prefix = torch.cat([m.embed(torch.tensor([it.question + [m.ids.bot]])), z,
                                    m.embed(torch.tensor([[m.ids.eot] + it.prompt]))], 1)
                toks = naive_greedy(m, prefix, 5)
                text = tok.decode(toks[:-1] if toks[-1] == m.ids.eos else toks, skip_special_tokens=True)
                assert row["ablations"][kind]["generated"] == text, (kind, row["index"])
    # batch composition changes nothing but the shuffle's partner
    rows2, _ = evaluate_records(m, tok, cfg, EVAL_RECORDS, batch_size=2, diagnostics=spec)
    for a, b in zip(rows, rows2):
        for kind in ("zeros", "placeholder"):
            assert a["ablations"][kind] == b["ablations"][kind]
        assert a["oracle"] == b["oracle"]
        assert a["kv_match"]["pairs"] == b["kv_match"]["pairs"]
        if a["kv_match"]["pairs"]:
            assert a["kv_match"]["k_rel"] == pytest.approx(b["kv_match"]["k_rel"], rel=1e-4)


def test_shuffle_needs_two_examples_per_batch_and_cot_runs_are_refused():
    m, tok = tiny_reasoner("llama", seed=8)
    cfg = eval_cfg("kava")
    shuffle = DiagnosticsSpec(("shuffle",))
    with pytest.raises(ValueError, match="shuffle.*batches of at least 2"):
        evaluate_records(m, tok, cfg, RECORDS, batch_size=1, diagnostics=shuffle)
    with pytest.raises(ValueError, match="shuffle"):
        evaluate_records(m, tok, cfg, RECORDS[:1], batch_size=4, diagnostics=shuffle)
    # a last batch of one joins the one before it, so the shuffle always has a partner
    assert eval_chunks(list(range(5)), 2, 2) == [[0, 1], [2, 3, 4]]
    assert eval_chunks(list(range(5)), 2) == [[0, 1], [2, 3], [4]]
    rows, s = evaluate_records(m, tok, cfg, RECORDS[:3], batch_size=2, diagnostics=shuffle)
    assert set(s["ablations"]) == {"none", "shuffle"} and all("shuffle" in r["ablations"] for r in rows)
    with pytest.raises(ValueError, match="latent method"):
        evaluate_records(m, tok, eval_cfg("cot"), RECORDS, diagnostics=DiagnosticsSpec(oracle=True))
    with pytest.raises(ValueError, match="latent mode"):
        evaluate_records(m, tok, cfg, RECORDS, mode="nocot", diagnostics=DiagnosticsSpec(kv_match=True))


def test_shuffle_refusal_is_decided_from_the_global_count():
    """Every process must refuse together (a refusal on some ranks only would leave the others waiting in the
    gather): 5 questions over 4 processes leave ranks 1-3 a single question each, and rank 0 two."""
    from kava.diagnostics import check_shards

    with pytest.raises(ValueError, match="shuffle"):
        check_shards(5, 4, 8, 2)
    check_shards(8, 4, 8, 2)  # two per rank: fine
    check_shards(5, 4, 8, 1)  # no shuffle: any split is fine
    check_shards(0, 1, 8, 2)  # nothing to evaluate


def test_cli_flags_build_the_spec():
    from kava.diagnostics import diagnostics_spec

    assert diagnostics_spec() == DiagnosticsSpec()
    assert not diagnostics_spec().active
    assert diagnostics_spec("zeros, shuffle") == DiagnosticsSpec(("zeros", "shuffle"))
    assert diagnostics_spec("all", oracle=True) == DiagnosticsSpec(("zeros", "placeholder", "shuffle"), True)
    assert diagnostics_spec(everything=True) == DiagnosticsSpec.everything()
    with pytest.raises(ValueError, match="allowed values: zeros, placeholder, shuffle"):
        diagnostics_spec("zero")


def test_data_without_cot_is_skipped_and_counted():
    m, tok = tiny_reasoner("llama", seed=9)
    recs = [Record("Tom has 5 .", (), "5", "s:1"), Record("Tom has 7 apples .", (), "7", "s:2"),
            Record("He buys 3 .", (), "3", "s:3")]
    rows, s = evaluate_records(m, tok, eval_cfg("kava"), recs, batch_size=2,
                               diagnostics=DiagnosticsSpec(oracle=True, kv_match=True))
    assert s["oracle"] == {"accuracy": None, "accuracy_stderr": None, "count": 0, "student_accuracy": None,
                           "skipped": {NO_COT: 3}}
    assert s["kv_match"]["pairs"] == 0 and s["kv_match"]["k_rel"] is None
    text = "\n".join(format_diagnostics("svamp", s))
    assert "oracle: no problem has a CoT; skipped: 3 (no CoT in the record)" in text
    assert "KV match: no example has a CoT target" in text
