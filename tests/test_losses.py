"""Tests for kava.losses: closed forms, masking, stop-gradient, loop references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kava.losses import (
    codi_loss,
    combine_losses,
    elementwise,
    kv_loss,
    kv_loss_over_sweeps,
    token_cross_entropy,
)

L, B, HKV, M, D = 3, 2, 2, 4, 5


def kv_case(seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    sk, sv, tk, tv = (torch.randn(L, B, HKV, M, D, generator=g) * scale for _ in range(4))
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    return sk, sv, tk, tv, mask


def ref_kv_loss(sk, sv, tk, tv, mask, kind, layer_std):
    """Loop reference: per KV tensor, per layer, gather valid elements explicitly."""

    def one(s, t):
        errs = []
        for layer in range(L):
            sl = torch.stack([s[layer, b, :, j] for b in range(B) for j in range(M) if mask[b, j]]).double()
            tl = torch.stack([t[layer, b, :, j] for b in range(B) for j in range(M) if mask[b, j]]).double()
            if layer_std:
                sigma = tl.std()
                sl, tl = sl / sigma, tl / sigma
            errs.append(elementwise(kind, sl, tl).double().flatten())
        return torch.cat(errs).mean()

    return 0.5 * (one(sk, tk) + one(sv, tv))


# ------------------------------------------------------------------------------------------------------
# elementwise
# ------------------------------------------------------------------------------------------------------


def test_elementwise_known_values():
    a = torch.tensor([0.0, 0.0, 0.0, 1.0])
    b = torch.tensor([0.5, -2.0, 3.0, 1.0])
    torch.testing.assert_close(elementwise("l1", a, b), torch.tensor([0.5, 2.0, 3.0, 0.0]))
    torch.testing.assert_close(elementwise("mse", a, b), torch.tensor([0.25, 4.0, 9.0, 0.0]))
    # smooth_l1, beta=1: 0.5 d^2 if |d| < 1 else |d| - 0.5
    torch.testing.assert_close(elementwise("smooth_l1", a, b), torch.tensor([0.125, 1.5, 2.5, 0.0]))
    assert elementwise("mse", a.bfloat16(), b.bfloat16()).dtype == torch.float32
    with pytest.raises(ValueError, match="allowed: l1, mse, smooth_l1"):
        elementwise("huber", a, b)


# ------------------------------------------------------------------------------------------------------
# kv_loss
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["l1", "mse", "smooth_l1"])
@pytest.mark.parametrize("layer_std", [False, True])
def test_kv_loss_identical_inputs_is_zero(kind, layer_std):
    sk, sv, _, _, mask = kv_case()
    assert kv_loss(sk, sv, sk.clone(), sv.clone(), mask, kind=kind, layer_std=layer_std) == 0


def test_kv_loss_known_value():
    # one valid slot (b=0, j=0), all errors 2 on K and 0 on V
    sk = torch.zeros(1, 1, 1, 2, 3)
    tk = torch.zeros_like(sk)
    tk[..., 0, :] = 2.0
    tk[..., 1, :] = 100.0  # masked slot
    mask = torch.tensor([[True, False]])
    zeros = torch.zeros_like(sk)
    for kind, per_elem in (("l1", 2.0), ("mse", 4.0), ("smooth_l1", 1.5)):
        loss = kv_loss(sk, zeros, tk, zeros, mask, kind=kind)
        torch.testing.assert_close(loss, torch.tensor(0.5 * per_elem))  # keys and values weighted equally


@pytest.mark.parametrize("kind", ["l1", "mse", "smooth_l1"])
@pytest.mark.parametrize("layer_std", [False, True])
def test_kv_loss_matches_loop_reference(kind, layer_std):
    sk, sv, tk, tv, mask = kv_case(scale=3.0)
    tv = tv * 0.2  # different V scale, so per-tensor std matters
    loss = kv_loss(sk, sv, tk, tv, mask, kind=kind, layer_std=layer_std)
    ref = ref_kv_loss(sk, sv, tk, tv, mask, kind, layer_std)
    torch.testing.assert_close(loss.double(), ref, atol=1e-6, rtol=1e-5)


def test_kv_layer_std_is_per_layer_and_scale_invariant():
    sk, sv, tk, tv, mask = kv_case()
    base = kv_loss(sk, sv, tk, tv, mask, kind="mse", layer_std=True)
    scale = torch.tensor([1.0, 10.0, 0.01])[:, None, None, None, None]  # different per layer
    scaled = kv_loss(sk * scale, sv * scale, tk * scale, tv * scale, mask, kind="mse", layer_std=True)
    torch.testing.assert_close(base, scaled, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(kv_loss(sk * scale, sv, tk * scale, tv, mask, kind="mse"), kv_loss(sk, sv, tk, tv, mask, kind="mse"))


def test_kv_masked_slots_do_not_contribute():
    sk, sv, tk, tv, mask = kv_case()
    base = kv_loss(sk, sv, tk, tv, mask, layer_std=True)
    sk2, sv2, tk2, tv2 = sk.clone(), sv.clone(), tk.clone(), tv.clone()
    m = ~mask[None, :, None, :, None].expand_as(sk)
    sk2[m], sv2[m] = 1e6, float("nan")  # junk in masked student slots
    tk2[m], tv2[m] = -1e6, float("inf")  # and in masked target slots
    torch.testing.assert_close(kv_loss(sk2, sv2, tk2, tv2, mask, layer_std=True), base)


def test_kv_targets_detached_student_gets_grad():
    sk, sv, tk, tv, mask = kv_case()
    for t in (sk, sv, tk, tv):
        t.requires_grad_(True)
    kv_loss(sk, sv, tk, tv, mask, layer_std=True).backward()
    assert tk.grad is None and tv.grad is None
    assert sk.grad.abs().sum() > 0 and sv.grad.abs().sum() > 0
    m = ~mask[None, :, None, :, None].expand_as(sk)
    assert (sk.grad[m] == 0).all()  # masked slots get no gradient


def test_kv_all_masked_is_exact_zero_with_graph():
    sk, sv, tk, tv, _ = kv_case()
    sk.requires_grad_(True)
    mask = torch.zeros(B, M, dtype=torch.bool)
    for layer_std in (False, True):
        loss = kv_loss(sk, sv, tk, tv, mask, layer_std=layer_std)
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert torch.isfinite(sk.grad).all() and (sk.grad == 0).all()


def test_kv_loss_shape_errors():
    sk, sv, tk, tv, mask = kv_case()
    with pytest.raises(ValueError, match="slot_mask"):
        kv_loss(sk, sv, tk, tv, mask[:, :2])
    with pytest.raises(ValueError, match="L,B,Hkv,M,D"):
        kv_loss(sk, sv[:1], tk, tv, mask)


# ------------------------------------------------------------------------------------------------------
# sweeps
# ------------------------------------------------------------------------------------------------------


def _sweeps(T=3):
    g = torch.Generator().manual_seed(9)
    ks = [torch.randn(L, B, HKV, M, D, generator=g).requires_grad_(True) for _ in range(T)]
    vs = [torch.randn(L, B, HKV, M, D, generator=g).requires_grad_(True) for _ in range(T)]
    _, _, tk, tv, mask = kv_case()
    return ks, vs, tk, tv, mask


def test_sweeps_all_is_mean_and_reports_each():
    ks, vs, tk, tv, mask = _sweeps()
    loss, per = kv_loss_over_sweeps(ks, vs, tk, tv, mask, supervision="all", kind="mse", layer_std=True)
    each = [kv_loss(k, v, tk, tv, mask, kind="mse", layer_std=True) for k, v in zip(ks, vs)]
    assert len(per) == 3
    for p, e in zip(per, each):
        torch.testing.assert_close(p, e.detach())
    torch.testing.assert_close(loss, torch.stack(each).mean())
    loss.backward()
    assert all(k.grad is not None and k.grad.abs().sum() > 0 for k in ks)


def test_sweeps_last_is_final_sweep_only():
    ks, vs, tk, tv, mask = _sweeps()
    loss, per = kv_loss_over_sweeps(ks, vs, tk, tv, mask, supervision="last")
    each = [kv_loss(k, v, tk, tv, mask) for k, v in zip(ks, vs)]
    torch.testing.assert_close(loss, each[-1])
    assert len(per) == 3 and not any(p.requires_grad for p in per)
    for p, e in zip(per, each):
        torch.testing.assert_close(p, e.detach())
    loss.backward()
    assert ks[0].grad is None and ks[1].grad is None and ks[2].grad.abs().sum() > 0
    with pytest.raises(ValueError, match="allowed: last, all"):
        kv_loss_over_sweeps(ks, vs, tk, tv, mask, supervision="first")


# ------------------------------------------------------------------------------------------------------
# CODI
# ------------------------------------------------------------------------------------------------------


def ref_codi(s, t, kind, std, layers):
    sel = list(range(s.shape[0])) if layers is None else [i % s.shape[0] for i in layers]
    g = t[sel].double().std()
    vals = []
    for i in sel:
        v = elementwise(kind, s[i], t[i]).double().mean()
        if std == "layer":
            v = v / t[i].double().std()
        elif std == "global":
            v = v / g
        vals.append(v)
    return torch.stack(vals).mean()


@pytest.mark.parametrize("kind", ["l1", "mse", "smooth_l1"])
@pytest.mark.parametrize("std", ["layer", "global", "none"])
@pytest.mark.parametrize("layers", [None, [0, -1]])
def test_codi_matches_loop_reference(kind, std, layers):
    g = torch.Generator().manual_seed(4)
    scales = torch.tensor([0.5, 2.0, 5.0, 1.0])[:, None, None]
    s = torch.randn(4, 3, 16, generator=g) * scales
    t = torch.randn(4, 3, 16, generator=g) * scales
    out = codi_loss(s, t, kind=kind, std=std, layers=layers)
    torch.testing.assert_close(out.double(), ref_codi(s, t, kind, std, layers), atol=1e-6, rtol=1e-5)


def test_codi_identical_zero_teacher_detached_and_errors():
    g = torch.Generator().manual_seed(5)
    s = torch.randn(2, 3, 8, generator=g).requires_grad_(True)
    t = torch.randn(2, 3, 8, generator=g).requires_grad_(True)
    assert codi_loss(t.detach().clone(), t) == 0
    codi_loss(s, t).backward()
    assert t.grad is None and s.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="allowed: layer, global, none"):
        codi_loss(s, t, std="batch")
    with pytest.raises(ValueError, match="layers"):
        codi_loss(s, t, layers=[5])


# ------------------------------------------------------------------------------------------------------
# CE and combine
# ------------------------------------------------------------------------------------------------------


def test_token_cross_entropy_matches_torch():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(7, 11, generator=g)
    labels = torch.tensor([1, -100, 3, 10, -100, 0, 5])
    out = token_cross_entropy(logits.bfloat16(), labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, F.cross_entropy(logits.bfloat16().float(), labels, ignore_index=-100))
    torch.testing.assert_close(token_cross_entropy(logits, labels), F.cross_entropy(logits, labels))
    other = labels.masked_fill(labels == -100, 4).masked_fill(labels == 3, -1)  # a different ignore_index
    torch.testing.assert_close(
        token_cross_entropy(logits, other, ignore_index=-1), F.cross_entropy(logits, other, ignore_index=-1)
    )


def test_token_cross_entropy_all_ignored_is_zero_with_graph():
    logits = torch.randn(4, 5, requires_grad=True)
    out = token_cross_entropy(logits, torch.full((4,), -100))
    assert out.item() == 0.0 and out.requires_grad
    out.backward()
    assert (logits.grad == 0).all()


def test_combine_losses():
    a = torch.tensor(2.0, requires_grad=True)
    b = torch.tensor(3.0, requires_grad=True)
    c = torch.tensor(float("nan"), requires_grad=True)
    total, log = combine_losses({"ce": a, "kv": b, "codi": c}, {"ce": 1.0, "kv": 2.0, "codi": 0.0})
    torch.testing.assert_close(total, torch.tensor(8.0))  # zero-weight NaN term does not leak in
    assert set(log) == {"ce", "kv", "codi", "total"}
    assert not any(v.requires_grad for v in log.values())
    assert torch.isnan(log["codi"]) and log["total"] == 8.0
    total.backward()
    assert a.grad == 1.0 and b.grad == 2.0 and c.grad is None
    with pytest.raises(ValueError, match="without weight"):
        combine_losses({"ce": a, "kv": b}, {"ce": 1.0})
    with pytest.raises(ValueError, match="weights without term"):
        combine_losses({"ce": a}, {"ce": 1.0, "kv": 1.0})


@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_head_cross_entropy_equals_the_plain_cross_entropy(chunk, reduction):
    """Chunked + recomputed CE == F.cross_entropy on the full logits: value and gradients (h and head)."""
    from kava.losses import head_cross_entropy

    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(11, 8, generator=g))
    softcapped = lambda x: 3.0 * torch.tanh(head(x) / 3.0)  # noqa: E731  (a head with final processing)
    h = torch.randn(7, 8, generator=g, requires_grad=True)
    labels = torch.tensor([1, -100, 4, 10, -100, 0, 3])
    got = head_cross_entropy(h, labels, softcapped, reduction=reduction, chunk_rows=chunk)
    gh, gw = torch.autograd.grad(got, [h, head.weight])
    ref = torch.nn.functional.cross_entropy(softcapped(h).double(), labels, ignore_index=-100, reduction=reduction)
    rh, rw = torch.autograd.grad(ref, [h, head.weight])
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, rh.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, rw.float(), rtol=1e-5, atol=1e-6)
    none = head_cross_entropy(h, torch.full((7,), -100), softcapped, reduction="mean", chunk_rows=chunk)
    assert none.item() == 0.0


def test_training_losses_keep_no_vocabulary_sized_tensor_for_backward():
    """The CE terms keep only hidden states for backward: no [N, V] logits (nor their fp32 copy or log-softmax)
    stays alive from the forward to the backward. Control: the plain CE on `.logits` does keep them."""
    from kava.config import config_from_dict
    from kava.data.format import Formatter
    from kava.data.records import SkipLog
    from kava.objective import loss_step, make_batch
    from tiny import RECORDS, tiny_reasoner

    m, tok = tiny_reasoner("llama")
    V = m.head.weight.shape[0]
    cfg = config_from_dict({"method": "kava", "model": {"name_or_path": "tiny"},
                            "latent": {"num_latents": 3, "num_sweeps": 2}})
    batch = make_batch(Formatter(tok).tokenize_all(RECORDS, SkipLog()), m.ids, cfg)
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        total, _ = loss_step(m, batch, cfg)
    assert total.requires_grad and shapes
    assert not [s for s in shapes if len(s) == 2 and s[1] == V and s[0] > 1], "a [N, V] tensor is kept"
    shapes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        t = m.teacher_forward(batch.teacher, need_kv=False, need_importance=False)
        torch.nn.functional.cross_entropy(t.logits.float(), t.targets, ignore_index=-100)
    assert [s for s in shapes if len(s) == 2 and s[1] == V and s[0] > 1]


@pytest.mark.parametrize("chunk", [1, 3, 100])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("trainable", [True, False])
def test_fused_head_cross_entropy_equals_the_plain_cross_entropy(chunk, reduction, trainable):
    """The CE with its gradients formed in the forward pass == F.cross_entropy on the full logits: value and
    gradients to h and to the head's weight (when it trains), scaled by the upstream gradient; a frozen
    head gets none."""
    from kava.losses import fused_head_cross_entropy

    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    head.weight.requires_grad_(trainable)
    softcapped = lambda x: 3.0 * torch.tanh(head(x) / 3.0)  # noqa: E731  (a head with final processing)
    h = torch.randn(7, 8, generator=g, requires_grad=True)
    labels = torch.tensor([1, -100, 4, 10, -100, 0, 3])
    params = [head.weight] if trainable else []
    got = fused_head_cross_entropy(h, labels, softcapped, params, reduction=reduction, chunk_rows=chunk)
    wanted = [h] + params
    grads = torch.autograd.grad(2.5 * got, wanted)
    ref = torch.nn.functional.cross_entropy(softcapped(h).double(), labels, ignore_index=-100, reduction=reduction)
    refs = torch.autograd.grad(2.5 * ref, wanted)
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, refs, strict=True):
        torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=1e-6)
    assert head.weight.grad is None  # autograd.grad above: nothing accumulated behind the caller's back
    none = fused_head_cross_entropy(h, torch.full((7,), -100), softcapped, params, reduction="mean", chunk_rows=chunk)
    assert none.item() == 0.0


def test_fused_head_cross_entropy_keeps_no_logits_for_backward():
    """What the fused CE keeps for backward is the gradient: [N, d] and the head's weight size, never [N, V]."""
    from kava.losses import fused_head_cross_entropy

    N, d, V = 64, 16, 1000
    head = torch.nn.Linear(d, V, bias=False)
    h = torch.randn(N, d, requires_grad=True)
    labels = torch.randint(0, V, (N,))
    loss = fused_head_cross_entropy(h, labels, head, [head.weight], chunk_rows=16)
    assert sorted(tuple(t.shape) for t in loss.grad_fn.saved_tensors) == sorted([(N, d), (V, d)])
    loss.backward()
    assert h.grad.shape == (N, d) and head.weight.grad.shape == (V, d)
