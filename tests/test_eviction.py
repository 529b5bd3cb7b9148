"""Tests for kava.eviction: every fast function against a plain loop, importance against HF eager attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kava.eviction import (
    METHODS,
    answer_attention_importance,
    eviction_scores,
    eviction_stats,
    gather_slots,
    redundancy_scores,
    select_indices,
)

# ------------------------------------------------------------------------------------------------------
# Loop references (one example / head / query at a time)
# ------------------------------------------------------------------------------------------------------


def ref_importance(query, key, allowed, query_valid, scaling):
    B, H, A, D = query.shape
    Hkv, K = key.shape[1], key.shape[2]
    G = H // Hkv
    out = torch.zeros(B, Hkv, K, dtype=torch.float64)
    for b in range(B):
        for g in range(Hkv):
            per_head = []
            for h in range(H):
                if h // G != g:
                    continue
                acc = torch.zeros(K, dtype=torch.float64)
                rows = [a for a in range(A) if query_valid[b, a]]
                for a in rows:
                    cols = [k for k in range(K) if allowed[b, a, k]]
                    if not cols:
                        continue
                    logits = torch.stack([(query[b, h, a].double() @ key[b, g, k].double()) * scaling for k in cols])
                    p = torch.softmax(logits, 0)
                    for i, k in enumerate(cols):
                        acc[k] += p[i]
                per_head.append(acc / max(len(rows), 1))
            out[b, g] = torch.stack(per_head).max(0).values
    return out


def ref_redundancy_row(keys, valid):
    """keys [C, D], valid [C] -> [C]."""
    C = keys.shape[0]
    pos = [c for c in range(C) if valid[c]]
    out = torch.zeros(C, dtype=torch.float64)
    if not pos:
        return out
    kv = keys[pos].double()
    n = len(pos)
    cos = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            if i != j:
                cos[i, j] = F.cosine_similarity(kv[i], kv[j], dim=0)
    r = torch.softmax(-cos.sum(1) / n, 0)
    for i, c in enumerate(pos):
        out[c] = r[i]
    return out


def ref_select(method, keys, importance, valid, M, lam=0.1, rand_scores=None):
    """Direct loop over (layer, example, head). Returns idx [L,B,Hkv,M], slot_mask [B,M]."""
    L, B, Hkv, C, _ = keys.shape
    idx = torch.zeros(L, B, Hkv, M, dtype=torch.long)
    slot_mask = torch.zeros(B, M, dtype=torch.bool)
    for b in range(B):
        pos = [c for c in range(C) if valid[b, c]]
        n = len(pos)
        slot_mask[b, : min(n, M)] = True
        for layer in range(L):
            for h in range(Hkv):
                if method == "crop":
                    keep = pos[:M]
                elif method == "uniform":
                    if n <= M:
                        keep = pos
                    elif M == 1:
                        keep = [pos[0]]
                    else:
                        keep = sorted({pos[round(j * (n - 1) / (M - 1))] for j in range(M)})
                else:
                    if method in ("rkv", "cosine"):
                        red = ref_redundancy_row(keys[layer, b, h], valid[b])
                    if method == "rkv":
                        s = lam * importance[layer, b, h].double() + (1 - lam) * red
                    elif method == "cosine":
                        s = red
                    elif method == "attention":
                        s = importance[layer, b, h].double()
                    else:  # random
                        s = rand_scores[layer, b, h].double()
                    keep = sorted(sorted(pos, key=lambda c: -float(s[c]))[:M])
                idx[layer, b, h, : len(keep)] = torch.tensor(keep, dtype=torch.long)
    return idx, slot_mask


# ------------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------------

L, B, HKV, C, D, M = 2, 5, 2, 12, 8, 6


def make_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(L, B, HKV, C, D, generator=g)
    importance = torch.rand(L, B, HKV, C, generator=g)
    valid = torch.zeros(B, C, dtype=torch.bool)
    valid[0] = True  # full CoT (n = 12 >= M)
    valid[1, :9] = True  # right padding, n = 9
    valid[2, :4] = True  # n = 4 < M
    valid[3, [1, 2, 5, 7, 8, 10, 11]] = True  # holes (left padding / arbitrary), n = 7
    # example 4: no CoT at all (n = 0)
    return keys, importance, valid


# ------------------------------------------------------------------------------------------------------
# Importance
# ------------------------------------------------------------------------------------------------------


def test_importance_matches_loop_reference():
    g = torch.Generator().manual_seed(1)
    Bq, H, Hkv, A, K, Dq = 3, 4, 2, 5, 9, 8
    q = torch.randn(Bq, H, A, Dq, generator=g)
    k = torch.randn(Bq, Hkv, K, Dq, generator=g)
    allowed = torch.rand(Bq, A, K, generator=g) > 0.3
    allowed[0, 2] = False  # a row with no allowed key: contributes 0, never NaN
    qv = torch.ones(Bq, A, dtype=torch.bool)
    qv[1, 3:] = False
    qv[2] = False  # no valid query: all zeros
    out = answer_attention_importance(q, k, allowed, qv, 0.35)
    assert out.shape == (Bq, Hkv, K) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref_importance(q, k, allowed, qv, 0.35), atol=1e-6, rtol=1e-5)
    assert (out[2] == 0).all()
    assert (out * ~allowed.any(1)[:, None, :] == 0).all()  # never-allowed columns get exactly 0


def test_importance_upcasts_low_precision_inputs():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 3, 8, generator=g)
    k = torch.randn(2, 2, 6, 8, generator=g)
    allowed = torch.ones(2, 3, 6, dtype=torch.bool)
    qv = torch.ones(2, 3, dtype=torch.bool)
    out = answer_attention_importance(q.bfloat16(), k.bfloat16(), allowed, qv, 0.3)
    assert out.dtype == torch.float32
    ref = answer_attention_importance(q.bfloat16().float(), k.bfloat16().float(), allowed, qv, 0.3)
    torch.testing.assert_close(out, ref)


def test_importance_gqa_max_pools_over_the_right_heads():
    # H = 4, Hkv = 2: heads 0,1 read KV head 0; heads 2,3 read KV head 1 (HF repeat_kv).
    Bq, H, Hkv, A, K, Dq = 1, 4, 2, 2, 5, 4
    q = torch.zeros(Bq, H, A, Dq)
    k = torch.zeros(Bq, Hkv, K, Dq)
    k[0, :, 3, 0] = 1.0  # key 3 of both KV heads points along e0
    q[0, 1, :, 0] = 50.0  # only query head 1 (group of KV head 0) is peaked, on key 3
    allowed = torch.ones(Bq, A, K, dtype=torch.bool)
    qv = torch.ones(Bq, A, dtype=torch.bool)
    out = answer_attention_importance(q, k, allowed, qv, 1.0)
    assert out[0, 0, 3] > 0.99  # max over heads 0,1 picks the peaked head 1 (a mean would give ~0.6)
    torch.testing.assert_close(out[0, 1], torch.full((K,), 1.0 / K))  # heads 2,3 are uniform


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        intermediate_size=128,
        vocab_size=100,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.config._attn_implementation = "eager"
    return model, cfg


@pytest.mark.parametrize("padding", ["right", "left"])
def test_importance_equals_hf_eager_attention(padding):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model, cfg = _tiny_llama()
    Bq, T, A = 2, 14, 4
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    Dh = cfg.hidden_size // H
    ids = torch.randint(0, cfg.vocab_size, (Bq, T), generator=torch.Generator().manual_seed(3))
    attn_mask = torch.ones(Bq, T, dtype=torch.long)
    if padding == "right":
        attn_mask[1, -3:] = 0  # example 1: its last 3 "answer rows" are padding
    else:
        attn_mask[1, :5] = 0
    position_ids = (attn_mask.cumsum(-1) - 1).clamp_min(0)

    captured = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.self_attn.q_proj.register_forward_hook(lambda m, a, o, i=i: captured.__setitem__(("q", i), o)))
        hooks.append(layer.self_attn.k_proj.register_forward_hook(lambda m, a, o, i=i: captured.__setitem__(("k", i), o)))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attn_mask, position_ids=position_ids, output_attentions=True)
        cos, sin = model.model.rotary_emb(captured[("q", 0)], position_ids)
    for h in hooks:
        h.remove()

    rows = torch.arange(T - A, T)
    query_valid = attn_mask[:, rows].bool()  # [B, A]
    causal = torch.arange(T)[None, :] <= rows[:, None]  # [A, T]
    allowed = causal[None] & attn_mask.bool()[:, None, :]  # [B, A, T]
    for li in range(cfg.num_hidden_layers):
        q = captured[("q", li)].view(Bq, T, H, Dh).transpose(1, 2)
        k = captured[("k", li)].view(Bq, T, Hkv, Dh).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        mine = answer_attention_importance(q[:, :, rows], k, allowed, query_valid, Dh**-0.5)

        probs = out.attentions[li][:, :, rows, :]  # [B, H, A, T] eager softmax rows
        w = query_valid.float()
        per_head = (probs * w[:, None, :, None]).sum(2) / w.sum(1).clamp_min(1)[:, None, None]  # [B, H, T]
        expected = per_head.view(Bq, Hkv, H // Hkv, T).amax(2)
        torch.testing.assert_close(mine, expected, atol=1e-5, rtol=1e-5)
        # the CoT-column slice a caller would take is just a view of this
        torch.testing.assert_close(mine[..., 2:8], expected[..., 2:8], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------
# Redundancy and mix
# ------------------------------------------------------------------------------------------------------


def test_redundancy_matches_loop_reference_and_masks_padding():
    keys, _, valid = make_case()
    v = valid[None, :, None, :]
    r = redundancy_scores(keys, v)
    assert r.shape == (L, B, HKV, C) and r.dtype == torch.float32
    for layer in range(L):
        for b in range(B):
            for h in range(HKV):
                torch.testing.assert_close(
                    r[layer, b, h].double(), ref_redundancy_row(keys[layer, b, h], valid[b]), atol=1e-6, rtol=1e-5
                )
    assert (r[:, ~valid.any(-1)] == 0).all()  # no valid token: all zero
    assert (r * ~v == 0).all()  # padding exactly 0
    sums = r.sum(-1)
    torch.testing.assert_close(sums[:, :4], torch.ones_like(sums[:, :4]))


def test_redundancy_prefers_the_odd_key():
    keys = torch.zeros(1, 4, 3)
    keys[0, :3, 0] = 1.0  # three identical keys
    keys[0, 3, 1] = 1.0  # one orthogonal key
    keys[0, 1, 0] = 2.0  # scale doesn't matter for cosine
    r = redundancy_scores(keys, torch.ones(1, 4, dtype=torch.bool))
    assert r[0].argmax() == 3
    torch.testing.assert_close(r[0, 0], r[0, 1])


def test_eviction_scores_mix_and_lam_check():
    i, r = torch.rand(3, 5), torch.rand(3, 5)
    torch.testing.assert_close(eviction_scores(i, r, 0.25), 0.25 * i + 0.75 * r)
    assert torch.equal(eviction_scores(i, r, 1.0), i)
    assert torch.equal(eviction_scores(i, r, 0.0), r)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="lam"):
            eviction_scores(i, r, bad)


# ------------------------------------------------------------------------------------------------------
# Selection
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_select_matches_loop_reference(method):
    keys, importance, valid = make_case()
    gen = torch.Generator().manual_seed(7)
    idx, slot_mask = select_indices(
        method, keys=keys, importance=importance, valid=valid, num_slots=M, lam=0.3, generator=gen
    )
    rand_scores = torch.rand(L, B, HKV, C, generator=torch.Generator().manual_seed(7))
    ref_idx, ref_mask = ref_select(method, keys, importance, valid, M, lam=0.3, rand_scores=rand_scores)
    assert idx.shape == (L, B, HKV, M) and idx.dtype == torch.long
    assert torch.equal(slot_mask, ref_mask)
    m = slot_mask[None, :, None, :].expand_as(idx)
    assert torch.equal(idx[m], ref_idx[m])
    assert (idx[~m] == 0).all()
    assert slot_mask.sum(-1).tolist() == [6, 6, 4, 6, 0]


@pytest.mark.parametrize("method", METHODS)
def test_select_invariants(method):
    keys, importance, valid = make_case(seed=5)
    idx, slot_mask = select_indices(
        method, keys=keys, importance=importance, valid=valid, num_slots=M, generator=torch.Generator().manual_seed(0)
    )
    m = slot_mask[None, :, None, :].expand_as(idx)
    # padding never selected
    picked_valid = torch.gather(valid[None, :, None, :].expand(L, B, HKV, C), -1, idx)
    assert picked_valid[m].all()
    # strictly ascending over the used slots (time order, no duplicates)
    inc = (idx[..., 1:] > idx[..., :-1]) | ~m[..., 1:]
    assert inc.all()
    # example 2 (n = 4 < M): its 4 tokens fill slots 0..3 in order
    assert (idx[:, 2, :, :4] == torch.arange(4)).all()


def test_lambda_limits_equal_single_criterion_methods():
    keys, importance, valid = make_case(seed=3)
    kw = dict(keys=keys, importance=importance, valid=valid, num_slots=M)
    a1 = select_indices("rkv", lam=1.0, **kw)
    a2 = select_indices("attention", **kw)
    c1 = select_indices("rkv", lam=0.0, **kw)
    c2 = select_indices("cosine", **kw)
    assert torch.equal(a1[0], a2[0]) and torch.equal(c1[0], c2[0])
    assert not torch.equal(a2[0], c2[0])  # the two criteria do differ on this case


def test_crop_and_uniform_closed_form():
    keys, importance, valid = make_case()
    idx, _ = select_indices("crop", keys=keys, importance=None, valid=valid, num_slots=M)
    assert (idx[:, 0] == torch.arange(6)).all()
    assert (idx[:, 3] == torch.tensor([1, 2, 5, 7, 8, 10])).all()
    idx, _ = select_indices("uniform", keys=keys, importance=None, valid=valid, num_slots=M)
    # n = 12, M = 6: round(linspace(0, 11, 6)) = round([0, 2.2, 4.4, 6.6, 8.8, 11]) = [0, 2, 4, 7, 9, 11]
    assert (idx[:, 0] == torch.tensor([0, 2, 4, 7, 9, 11])).all()
    # single slot: the first valid token
    idx1, mask1 = select_indices("uniform", keys=keys, importance=None, valid=valid, num_slots=1)
    assert (idx1[:, 3, :, 0] == 1).all() and mask1.tolist() == [[True]] * 4 + [[False]]


def test_more_slots_than_cot_columns():
    keys, importance, valid = make_case()
    for method in METHODS:
        idx, mask = select_indices(
            method, keys=keys, importance=importance, valid=valid, num_slots=C + 3,
            generator=torch.Generator().manual_seed(0),
        )
        assert idx.shape[-1] == C + 3 and mask.sum(-1).tolist() == [12, 9, 4, 7, 0]
        assert (idx[:, 0, :, :C] == torch.arange(C)).all()  # all tokens, in order


def test_random_reproducible_and_uniform_inclusion():
    keys, importance, valid = make_case()
    kw = dict(keys=keys, importance=None, valid=valid, num_slots=M)
    a = select_indices("random", generator=torch.Generator().manual_seed(11), **kw)[0]
    b = select_indices("random", generator=torch.Generator().manual_seed(11), **kw)[0]
    c = select_indices("random", generator=torch.Generator().manual_seed(12), **kw)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    # inclusion frequency of each of the 12 tokens of example 0 should be ~ M / n = 0.5
    big_keys = torch.zeros(400, 1, 1, C, 1)
    big_valid = torch.ones(1, C, dtype=torch.bool)
    idx, _ = select_indices(
        "random", keys=big_keys, importance=None, valid=big_valid, num_slots=M, generator=torch.Generator().manual_seed(0)
    )
    freq = F.one_hot(idx, C).sum(-2).float().mean((0, 1, 2))
    assert ((freq - 0.5).abs() < 0.1).all()


def test_select_errors():
    keys, importance, valid = make_case()
    with pytest.raises(ValueError, match="allowed: rkv, attention, cosine, crop, random, uniform"):
        select_indices("topk", keys=keys, importance=importance, valid=valid, num_slots=M)
    with pytest.raises(ValueError, match="lam"):
        select_indices("crop", keys=keys, importance=importance, valid=valid, num_slots=M, lam=1.2)
    with pytest.raises(ValueError, match="needs importance"):
        select_indices("rkv", keys=keys, importance=None, valid=valid, num_slots=M)


# ------------------------------------------------------------------------------------------------------
# Gather and stats
# ------------------------------------------------------------------------------------------------------


def test_gather_slots_matches_indexing_and_keeps_grad():
    keys, importance, valid = make_case()
    x = keys.clone().requires_grad_(True)
    idx, _ = select_indices("rkv", keys=keys, importance=importance, valid=valid, num_slots=M)
    out = gather_slots(x, idx)
    assert out.shape == (L, B, HKV, M, D)
    for layer in range(L):
        for b in range(B):
            for h in range(HKV):
                assert torch.equal(out[layer, b, h], x[layer, b, h, idx[layer, b, h]])
    out.sum().backward()
    assert x.grad.abs().sum() > 0


def test_eviction_stats():
    keys, importance, valid = make_case()
    idx, mask = select_indices("crop", keys=keys, importance=None, valid=valid, num_slots=M)
    s = eviction_stats(idx, mask, valid)
    assert all(v.dim() == 0 for v in s.values())
    torch.testing.assert_close(s["masked_slot_frac"], torch.tensor(1 - 22 / 30))
    torch.testing.assert_close(s["short_cot_frac"], torch.tensor(2 / 5))
    torch.testing.assert_close(s["cot_len_mean"], torch.tensor(32 / 5))
    # crop keeps ranks 0..5 (n=12, 9, 7) and 0..3 (n=4): mean of rank/(n-1) over used slots
    rel = [r / 11 for r in range(6)] + [r / 8 for r in range(6)] + [r / 3 for r in range(4)] + [r / 6 for r in range(6)]
    torch.testing.assert_close(s["kept_rel_pos"], torch.tensor(sum(rel) / len(rel)))
    assert 0 <= float(s["kept_rel_pos"]) <= 1


def test_redundancy_forms_one_layer_pairwise_block_at_a_time(monkeypatch):
    """The [.., C, C] similarity is built per layer (the NL-CoT micro-batch-64 step ran out of memory when all
    layers' blocks were formed at once); the result equals the one-shot computation."""
    import kava.eviction as ev

    g = torch.Generator().manual_seed(0)
    keys = torch.randn(3, 2, 2, 7, 4, generator=g)
    valid = torch.rand(2, 1, 7, generator=g) > 0.3
    whole = ev._redundancy(keys, valid.expand(keys.shape[:-1]))
    seen = []
    real = ev._redundancy
    monkeypatch.setattr(ev, "_redundancy", lambda k, v: seen.append(tuple(k.shape)) or real(k, v))
    r = ev.redundancy_scores(keys, valid)
    assert seen == [(2, 2, 7, 4)] * 3
    torch.testing.assert_close(r, whole)
