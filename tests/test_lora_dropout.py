"""LoRA input dropout fused into lora_A (`kava.model.lora_dropout`, `lora.fused_dropout`): the function of
peft's dropout + lora_A, without keeping each adapter's dropped input for backward."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import kava.model.lora_dropout as ld
from kava.config import load_config
from kava.checkpoint.load import build_reasoner
from tiny import tiny_tokenizer


def fixed_mask(monkeypatch, mask):
    monkeypatch.setattr(ld, "dropout", lambda x, p: (x * mask / (1 - p), mask))


def test_dropout_matmul_equals_dropout_then_linear_in_values_and_gradients(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 5, 8) > 0.3
    fixed_mask(monkeypatch, mask)
    y = ld._DropoutMatmul.apply(x, w, 0.3)
    ref = nn.functional.linear(x * mask / 0.7, w)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(ref)
    g = torch.autograd.grad((y * dy).sum(), (x, w))
    g_ref = torch.autograd.grad((ref * dy).sum(), (x, w))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: ld._DropoutMatmul.apply(a, b, 0.3), (x, w))


def test_dropout_keeps_with_probability_one_minus_p_and_rescales():
    torch.manual_seed(0)
    x = torch.randn(200_000)
    y, m = ld.dropout(x, 0.1)
    assert m.dtype == torch.bool and abs(m.float().mean().item() - 0.9) < 0.005
    torch.testing.assert_close(y, x * m / 0.9)
    torch.testing.assert_close(ld._scaled(x, m, 1 / 0.9), y)


def saved_storages(fn) -> list[tuple[int, int, torch.dtype]]:
    """(storage id, bytes, dtype) of every distinct tensor `fn` saves for backward."""
    seen = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), (t.untyped_storage().nbytes(), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return [(k, *v) for k, v in seen.items()]


def tiny_peft(p: float = 0.1):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2))
    lm = get_peft_model(lm, LoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules=["q_proj", "v_proj",
                                                                                      "down_proj"]))
    with torch.no_grad():  # LoRA B starts at zero, which would hide the gradient of A
        for n, prm in lm.named_parameters():
            if "lora_B" in n:
                prm.normal_(0, 0.1)
    return lm


def test_the_fused_adapter_keeps_no_dropped_copy_of_its_input():
    """peft's dropout + lora_A keep, beside the input x the frozen layer keeps anyway, a dropped copy of x
    (float) and the mask; the fused layer keeps x itself and a bool mask only."""
    unfused = tiny_peft()
    fused = copy.deepcopy(unfused)
    assert ld.fuse_lora_dropout(fused) == 3 * 2
    x = torch.randn(2, 7, 32, requires_grad=True)
    big = 2 * 7 * 32

    def float_copies(layer):  # activations saved for backward (weights aside), and the masks
        layer.train()
        weights = {p.untyped_storage().data_ptr() for p in layer.parameters()}
        saved = [s for s in saved_storages(lambda: layer(x)) if s[0] not in weights]
        return [s for s in saved if s[2].is_floating_point and s[1] >= big * 4], \
            [s for s in saved if s[2] == torch.bool and s[1] >= big]

    base_u = unfused.base_model.model.model.layers[0].self_attn.q_proj
    base_f = fused.base_model.model.model.layers[0].self_attn.q_proj
    floats_u, masks_u = float_copies(base_u)
    floats_f, masks_f = float_copies(base_f)
    assert [s[0] for s in floats_f] == [x.untyped_storage().data_ptr()]  # x itself, no copy
    assert len(floats_u) == 2  # control: x and its dropped copy
    assert len(masks_f) == 1


def test_fused_peft_model_equals_peft_with_the_same_masks(monkeypatch):
    """Train mode, masks drawn from the same generator in the same order: peft's dropout module and the
    fused layer give the same loss and gradients; eval mode and the state-dict keys are unchanged."""
    unfused = tiny_peft()
    fused = copy.deepcopy(unfused)
    ld.fuse_lora_dropout(fused)
    assert set(fused.state_dict()) == set(unfused.state_dict())
    gen = torch.Generator()

    def drawn(x, p):
        m = torch.rand(x.shape, generator=gen) >= p
        return x * m / (1 - p), m

    monkeypatch.setattr(ld, "dropout", drawn)

    class SameMaskDropout(nn.Module):
        def __init__(self, p):
            super().__init__()
            self.p = p

        def forward(self, x):
            return ld.dropout(x, self.p)[0] if self.training else x

    for m in unfused.modules():
        if hasattr(m, "lora_dropout"):
            for k in m.lora_dropout:
                m.lora_dropout[k] = SameMaskDropout(m.lora_dropout[k].p)
    ids = torch.randint(0, 50, (3, 9))
    res = []
    for lm in (unfused, fused):
        lm.train()
        gen.manual_seed(0)
        loss = lm(input_ids=ids, labels=ids).loss
        loss.backward()
        res.append((loss.detach(), {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}))
    (la, ga), (lb, gb) = res
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-6)
    assert ga.keys() == gb.keys() and any("lora_A" in n for n in ga)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-5, atol=1e-6)
    unfused.eval(), fused.eval()
    with torch.no_grad():
        torch.testing.assert_close(unfused(input_ids=ids).logits, fused(input_ids=ids).logits)


@pytest.mark.parametrize("p, on, fused", [(0.1, True, True), (0.0, True, False), (0.1, False, False)])
def test_build_reasoner_fuses_lora_dropout_when_asked(p, on, fused):
    cfg = load_config("tiny_synth", ["model.from_scratch.hidden_size=32", "model.from_scratch.intermediate_size=64",
                                     "model.from_scratch.num_hidden_layers=2", f"lora.dropout={p}",
                                     f"lora.fused_dropout={str(on).lower()}"])
    m = build_reasoner(cfg, tiny_tokenizer())
    n = sum(isinstance(x, ld.DropoutLinear) for x in m.modules())
    assert (n > 0) == fused
    assert not any(isinstance(x, nn.Dropout) and x.p > 0 for x in m.modules() if fused)


def test_a_fused_reasoner_trains_and_evaluates_like_peft():
    """lora.fused_dropout through `build_reasoner` and `loss_step` (the real dropout kernel): the same
    eval-mode outputs as peft's layers from the same seed, and a training step that reaches every adapter."""
    from kava.data.format import Formatter
    from kava.data.records import SkipLog
    from kava.objective import loss_step, make_batch
    from tiny import RECORDS

    def build(on):
        cfg = load_config("tiny_synth", ["model.from_scratch.hidden_size=32", "model.from_scratch.intermediate_size=64",
                                         "model.from_scratch.num_hidden_layers=2", "latent.num_latents=3",
                                         "lora.dropout=0.3", f"lora.fused_dropout={str(on).lower()}"])
        torch.manual_seed(0)
        m = build_reasoner(cfg, tiny_tokenizer())
        with torch.no_grad():
            for n, prm in m.named_parameters():
                if "lora_B" in n:
                    prm.copy_(torch.linspace(-0.1, 0.1, prm.numel()).view_as(prm))
        return cfg, m

    (cfg, fused), (_, plain) = build(True), build(False)
    assert any(isinstance(x, ld.DropoutLinear) for x in fused.modules())
    items = Formatter(tiny_tokenizer(), drop_last_step=False).tokenize_all(RECORDS, SkipLog())
    batch = make_batch(items, fused.ids, cfg)
    fused.eval(), plain.eval()
    with torch.no_grad():
        a, _ = loss_step(fused, batch, cfg)
        b, _ = loss_step(plain, batch, cfg)
    torch.testing.assert_close(a, b)
    fused.train()
    total, _ = loss_step(fused, batch, cfg)
    total.backward()
    grads = [p.grad for n, p in fused.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
