"""Teacher / student passes against naive references: full recomputation, eager attention, one-by-one."""

import pytest
import torch

from kava.data.format import Formatter, build_student_batch, build_teacher_batch
from kava.data.records import SkipLog
from tiny import RECORDS, rotate_half, tiny_reasoner, unrotate_keys

FAMILIES = ["llama", "qwen2", "gpt2"]
TOL = 1e-5


def batches(m, tok, M=5, records=RECORDS, **kw):
    items = Formatter(tok, **kw).tokenize_all(records, SkipLog())
    return items, build_teacher_batch(items, m.ids), build_student_batch(items, m.ids, M)


def close(a, b, tol=TOL):
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.numel() == 0:
        return
    assert (a - b).abs().max().item() <= tol, (a - b).abs().max().item()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("T", [0, 1, 3])
def test_jacobi_fast_path_equals_full_recomputation(family, T):
    m, tok = tiny_reasoner(family)
    _, _, sb = batches(m, tok)
    with torch.no_grad():
        fast = m.student_forward(sb, T)
        ref = m.student_forward_naive(sb, T)
    close(fast.logits, ref.logits)
    close(fast.latents, ref.latents)
    close(fast.hidden, ref.hidden)
    assert len(fast.latent_k) == len(ref.latent_k) == max(T, 1)
    for a, b in zip(fast.latent_k + fast.latent_v, ref.latent_k + ref.latent_v):
        close(a, b)
    assert fast.forward_passes == 1 + T + 1
    if T == 3:  # sweeps really change the latents (the test would be vacuous otherwise)
        assert (fast.latent_k[0] - fast.latent_k[-1]).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_jacobi_with_T_equal_M_matches_sequential_latents(family):
    """Jacobi on a causal chain is exact after M sweeps: it reproduces CODI's one-latent-per-pass result."""
    m, tok = tiny_reasoner(family)
    M = 4
    _, _, sb = batches(m, tok, M=M)
    with torch.no_grad():
        jac = m.student_forward(sb, num_sweeps=M, student_mode="jacobi")
        seq = m.student_forward(sb, num_sweeps=0, student_mode="sequential")
        short = m.student_forward(sb, num_sweeps=1, student_mode="jacobi")
    close(jac.latents, seq.latents, 1e-4)
    close(jac.logits, seq.logits, 1e-4)
    close(jac.latent_k[-1], seq.latent_k[-1], 1e-4)
    assert seq.forward_passes == 1 + M + 1
    assert (short.latents - seq.latents).abs().max() > 1e-3  # one sweep is not enough


def eager_importance(family, tb, softmax="cot"):
    """Importance from `output_attentions=True` with eager attention: the independent reference.

    softmax="cot" (the paper's Listing 1): the answer rows' logits softmaxed over the CoT keys only, which
    is the eager probabilities of the CoT columns renormalised to sum to 1 per row.
    softmax="prefix": the eager probabilities of the CoT columns as they are."""
    m = family if not isinstance(family, str) else tiny_reasoner(family, attn="hf_eager")[0]
    with torch.no_grad():
        out = m.causal_lm(input_ids=None, inputs_embeds=m.embed(tb.ids), attention_mask=tb.mask,
                          position_ids=tb.pos, output_attentions=True)
    H = out.attentions[0].shape[1]
    Hkv = getattr(m.config, "num_key_value_heads", None) or H
    g = H // Hkv
    B, C = tb.cot_idx.shape
    res = torch.zeros(len(out.attentions), B, Hkv, C)
    for l, att in enumerate(out.attentions):
        for b in range(B):
            qs = tb.query_idx[b][tb.query_valid[b]]
            for kv in range(Hkv):
                per_head = []
                for h in range(kv * g, (kv + 1) * g):
                    rows = att[b, h][qs][:, tb.cot_idx[b][tb.cot_valid[b]]]  # [A, C_b]
                    if softmax == "cot":
                        rows = rows / rows.sum(-1, keepdim=True)
                    rows = torch.nn.functional.pad(rows, (0, C - rows.shape[1]))
                    per_head.append(rows.mean(0))
                res[l, b, kv] = torch.stack(per_head).max(0).values
    return res


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("softmax", ["cot", "prefix"])
def test_captured_importance_equals_eager_attention(family, softmax):
    m, tok = tiny_reasoner(family)
    _, tb, _ = batches(m, tok)
    with torch.no_grad():
        t = m.teacher_forward(tb, importance_softmax=softmax)
    ref = eager_importance(family, tb, softmax)
    valid = tb.cot_valid.view(1, *tb.cot_valid.shape, 1).transpose(-1, -2).expand_as(ref)
    close(t.importance * valid, ref * valid)
    assert ref.max() > 0.01
    if softmax == "cot":  # Listing 1: each (layer, example, KV head) row is a max of distributions over the CoT
        sums = (t.importance * valid).sum(-1)[:, tb.cot_valid.any(1)]  # examples that have a CoT
        assert sums.numel() and (sums >= 1 - 1e-5).all()


def test_listing1_importance_differs_from_the_prefix_softmax():
    """The two scores are different quantities (else the option would be vacuous): the prefix softmax
    leaves mass on the question keys, so its CoT slice sums to less than 1."""
    m, tok = tiny_reasoner("llama")
    _, tb, _ = batches(m, tok)
    with torch.no_grad():
        cot = m.teacher_forward(tb, importance_softmax="cot").importance
        pre = m.teacher_forward(tb, importance_softmax="prefix").importance
    assert (pre.sum(-1) < 0.99).any() and (cot - pre).abs().max() > 1e-2


def test_unrotate_inverts_rope_and_matches_pre_rope_projection():
    m, tok = tiny_reasoner("llama")
    _, tb, sb = batches(m, tok)
    m.check_pre_rope()  # its probe pass must not be the one the hook below records
    captured = {}
    layer0 = m.decoder.layers[0].self_attn
    h = layer0.k_proj.register_forward_hook(lambda mod, i, o: captured.setdefault("k", o))
    with torch.no_grad():
        t = m.teacher_forward(tb, key_space="pre_rope")
    h.remove()
    B, C = tb.cot_idx.shape
    D = m.config.head_dim
    k_pre = captured["k"].view(B, -1, m.config.num_key_value_heads, D).transpose(1, 2)  # [B, Hkv, S, D]
    ref = torch.gather(k_pre, 2, tb.cot_idx.view(B, 1, C, 1).expand(B, k_pre.shape[1], C, D))
    close(t.cot_k[0], ref)
    # and the plain math: rotate then unrotate is the identity
    k = torch.randn(2, 2, 7, D)
    cos, sin = m.rotary(k, torch.arange(7).expand(2, 7))
    rot = k * cos.unsqueeze(1) + rotate_half(k) * sin.unsqueeze(1)
    close(unrotate_keys(rot, cos, sin), k)


def test_special_rows_replace_embeddings_and_padding_columns():
    m, tok = tiny_reasoner("llama")
    items, tb, sb = batches(m, tok)
    x = m.embed(sb.ids)
    Qb, M = sb.q_block, sb.num_latents
    for b in range(len(items)):
        assert torch.equal(x[b, Qb], m.special_rows[2])  # first latent placeholder
        assert torch.equal(x[b, Qb - 1], m.special_rows[0])  # <bot> follows the padded question block
        assert torch.equal(x[b, Qb + M], m.special_rows[1])  # <eot>


def test_embed_equals_a_row_lookup_in_value_and_gradient():
    """embed's per-token `where`s against the naive lookup of a [V + 3, d] table (the three special rows
    appended): the same embeddings, and the same gradients for the token table and the special rows."""
    m, tok = tiny_reasoner("llama")
    _, _, sb = batches(m, tok)
    ids = sb.ids
    x = m.embed(ids)
    g = torch.randn_like(x)
    ga = torch.autograd.grad((x * g).sum(), [m.embed_tokens.weight, m.special_rows])
    V = m.embed_tokens.weight.shape[0]
    table = torch.cat([m.embed_tokens.weight, m.special_rows])
    idx = ids.clamp(max=V - 1)
    for j, tid in enumerate((m.ids.bot, m.ids.eot, m.ids.latent)):
        idx = torch.where(ids == tid, V + j, idx)
    ref = torch.nn.functional.embedding(idx, table, padding_idx=m.embed_tokens.padding_idx)  # no grad at pad
    gb = torch.autograd.grad((ref * g).sum(), [m.embed_tokens.weight, m.special_rows])
    assert torch.equal(x, ref)
    for a, b in zip(ga, gb):
        close(a, b)
    assert ga[1].abs().sum() > 0  # the batch has special tokens, so their rows get a gradient


@pytest.mark.parametrize("q_len,cached", [(7, 0), (1, 9), (5, 6)])
def test_grouped_query_sdpa_equals_hf_repeat_kv_path(q_len, cached):
    """The folded-GQA attention (no KV head copies) gives HF's SDPA output and gradients, with padding masks,
    on a fresh pass, a one-token decode step and a block on top of a cache."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from kava.model.capture import grouped_query_sdpa

    torch.manual_seed(0)
    B, H, Hkv, D = 3, 8, 2, 16
    K = cached + q_len
    q = torch.randn(B, H, q_len, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hkv, K, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hkv, K, D, dtype=torch.float64, requires_grad=True)
    keep = torch.ones(B, K, dtype=torch.bool)
    keep[0, 1] = keep[2, :2] = False  # padding holes; no row is fully masked
    causal = torch.arange(K)[None, :] <= (torch.arange(q_len) + cached)[:, None]  # [q, K]
    mask = (causal[None] & keep[:, None]).unsqueeze(1)  # [B, 1, q, K]
    module = SimpleNamespace(num_key_value_groups=H // Hkv, is_causal=True)
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
    out = grouped_query_sdpa(q, k, v, mask, scaling=0.3)
    assert out.shape == ref.shape == (B, q_len, H, D)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    w = torch.randn_like(ref)
    g_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))
    g_out = torch.autograd.grad((out * w).sum(), (q, k, v))
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # control: pairing query head h with KV head h % Hkv (not h // G) gives a different output
    wrong = torch.nn.functional.scaled_dot_product_attention(q, k.repeat(1, H // Hkv, 1, 1), v.repeat(1, H // Hkv, 1, 1),
                                                             attn_mask=mask, scale=0.3).transpose(1, 2)
    assert not torch.allclose(wrong, ref)


@pytest.mark.parametrize("student_mode,T", [("jacobi", 2), ("sequential", 0)])
def test_latents_enter_in_the_token_embedding_dtype(student_mode, T):
    """A bf16 backbone under autocast with an fp32 projection output (CUDA autocast runs the projection's
    LayerNorm in fp32): the latents are fed back in bf16, so the latent columns' keys and the whole cache stay
    bf16 (fp32 latents ran the latent columns in fp32 and promoted the cache, which broke the static decoder)."""
    m, tok = tiny_reasoner("llama")
    m.to(torch.bfloat16)
    m.special_rows.data = m.special_rows.data.float()  # the fp32 master copies, as a bf16 LoRA run keeps them
    m.proj.float()
    m.proj.register_forward_hook(lambda mod, inp, out: out.float())
    _, _, sb = batches(m, tok)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        s = m.student_forward(sb, T, student_mode=student_mode, with_answer=False)
        assert m.proj(m.special_rows[:1]).dtype == torch.float32  # the hook is in force
    assert s.latents.dtype == torch.bfloat16
    assert {t.dtype for t in s.latent_k + s.latent_v} == {torch.bfloat16}
    assert {t.dtype for layer in s.cache.layers for t in (layer.keys, layer.values)} == {torch.bfloat16}
