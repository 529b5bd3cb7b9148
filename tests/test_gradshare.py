"""Per-term gradient shares: the norms equal an independent loop with one backward per term (and a fresh
forward each time), the per-term gradients add up to the total loss's gradient, shares sum to 1, and turning
the measurement on in the trainer logs it without changing training."""

from __future__ import annotations

import json

import pytest
import torch

import kava.train as kt
from kava.config import config_from_dict, load_config
from kava.data.format import Formatter
from kava.data.records import SkipLog
from kava.training.gradshare import grad_share_due, grad_share_micro, grad_shares, share_metrics
from kava.objective import loss_step, make_batch
from kava.spec import METHODS, spec_of
from tiny import RECORDS, tiny_reasoner


def test_share_metrics_by_hand():
    g = {"a": [torch.tensor([3.0, 0.0]), None], "b": [torch.tensor([0.0, 4.0]), torch.tensor([[0.0]])],
         "ce_student": [torch.tensor([-3.0, 0.0]), torch.tensor([[0.0]])]}
    out = share_metrics(g)
    assert out["grad/a"] == pytest.approx(3.0) and out["grad/b"] == pytest.approx(4.0)
    assert out["grad/ce_student"] == pytest.approx(3.0)
    assert out["grad_share/a"] == pytest.approx(0.3) and out["grad_share/b"] == pytest.approx(0.4)
    assert sum(v for k, v in out.items() if k.startswith("grad_share/")) == pytest.approx(1.0)
    assert out["grad/total"] == pytest.approx(4.0)  # (3,0,0) + (0,4,0) + (-3,0,0)
    assert out["grad_cos/a"] == pytest.approx(-1.0) and out["grad_cos/b"] == pytest.approx(0.0)
    assert "grad_cos/ce_student" not in out
    zero = share_metrics({"a": [torch.zeros(2)], "b": [None]})
    assert zero["grad_share/a"] == zero["grad_share/b"] == 0.0 and zero["grad/total"] == 0.0
    with pytest.raises(ValueError, match="one entry per trainable parameter"):
        share_metrics({"a": [torch.zeros(2)], "b": [torch.zeros(2), None]})


def reference_norms(m, batch, cfg) -> tuple[dict[str, float], list[torch.Tensor]]:
    """One fresh forward and one .backward() per term; the norm of the accumulated .grad."""
    params = [p for p in m.parameters() if p.requires_grad]
    names = {}
    loss_step(m, batch, cfg, terms_out=names)
    out, summed = {}, [torch.zeros_like(p) for p in params]
    for name, (_, w) in names.items():
        if w == 0:
            continue
        m.zero_grad(set_to_none=True)
        terms: dict = {}
        loss_step(m, batch, cfg, terms_out=terms)
        (w * terms[name][0]).backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        out[name] = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()
        summed = [s + g for s, g in zip(summed, grads)]
    m.zero_grad(set_to_none=True)
    total, _ = loss_step(m, batch, cfg)
    total.backward()
    full = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    for s, f in zip(summed, full):  # the terms' gradients add up to the total's
        assert (s - f).abs().max().item() <= 1e-5 * max(f.abs().max().item(), 1e-8)
    return out, full


@pytest.mark.parametrize("method, extra", [("kava", {}), ("codi", {}), ("pccot", {"alpha_codi": 0.0})])
def test_grad_shares_equal_one_backward_per_term(method, extra):
    m, tok = tiny_reasoner("llama", seed=3)
    cfg = config_from_dict({"method": method, "model": {"name_or_path": "tiny"},
                            "latent": {"num_latents": 4, "num_sweeps": 2}, "data": {"drop_last_step": False},
                            "loss": extra})
    items = Formatter(tok, drop_last_step=False).tokenize_all(RECORDS, SkipLog())
    batch = make_batch(items, m.ids, cfg)
    got = grad_shares(m, batch, cfg)
    assert all(p.grad is None for p in m.parameters())  # .grad untouched
    ref, full = reference_norms(m, batch, cfg)
    expected_terms = {"kava": {"ce_teacher", "ce_student", "codi", "kv"}, "codi": {"ce_teacher", "ce_student", "codi"},
                      "pccot": {"ce_teacher", "ce_student"}}[method]  # a zero weight is not measured
    assert set(ref) == expected_terms
    assert {k.split("/")[1] for k in got if k.startswith("grad_share/")} == expected_terms
    for name, norm in ref.items():
        assert norm > 0
        assert got[f"grad/{name}"] == pytest.approx(norm, rel=1e-5)
        assert got[f"grad_share/{name}"] == pytest.approx(norm / sum(ref.values()), rel=1e-5)
    assert sum(got[f"grad_share/{n}"] for n in ref) == pytest.approx(1.0)
    total_norm = torch.sqrt(sum((g.double() ** 2).sum() for g in full)).item()
    assert got["grad/total"] == pytest.approx(total_norm, rel=1e-5)
    assert -1.0 <= got["grad_cos/ce_teacher"] <= 1.0


TINY = ["model.from_scratch.hidden_size=32", "model.from_scratch.intermediate_size=64",
        "model.from_scratch.num_hidden_layers=2", "data.synth_train_size=200", "data.synth_eval_size=8",
        "data.valid_limit=4", "optim.effective_batch=8", "optim.micro_batch=4", "latent.num_latents=4",
        "run.log=[jsonl]", "run.log_every=1", "run.eval_max_new_tokens=4", "optim.max_steps=4", "method=kava",
        "run.save_every=100", "model.from_scratch.attention_dropout=0.1", "eviction.method=random"]  # RNG users


def test_trainer_logs_shares_without_changing_training(tmp_path):
    def run(name, every):
        cfg = load_config("tiny_synth", TINY + [f"run.output_dir={tmp_path}", f"run.name={name}",
                                                f"run.grad_share_every={every}"])
        d = kt.train(cfg, progress=False, data_root=tmp_path / "synth")
        return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]

    on, off = run("measured", 2), run("plain", 0)
    share_lines = [r for r in on if any(k.startswith("grad_share/") for k in r)]
    assert [r["step"] for r in share_lines] == [2, 4]
    assert not any(k.startswith("grad") and k != "grad_norm" for r in off for k in r)
    for r in share_lines:
        assert {k for k in r if k.startswith("grad_share/")} == {f"grad_share/{t}" for t in
                                                                ("ce_teacher", "ce_student", "codi", "kv")}
        assert sum(v for k, v in r.items() if k.startswith("grad_share/")) == pytest.approx(1.0)
        assert r["split"] == "train" and r["grad/total"] > 0
    loss_on = [r for r in on if "loss/total" in r]
    loss_off = [r for r in off if "loss/total" in r]
    assert [r["loss/total"] for r in loss_on] == [r["loss/total"] for r in loss_off]  # bitwise: RNG untouched
    assert [r["grad_norm"] for r in loss_on] == [r["grad_norm"] for r in loss_off]


def test_due_only_for_latent_methods():
    cfg = config_from_dict({"method": "kava", "model": {"name_or_path": "x"}, "run": {"grad_share_every": 3}})
    assert [s for s in range(1, 10) if grad_share_due(cfg, s)] == [3, 6, 9]
    assert not any(grad_share_due(config_from_dict({"method": "cot", "model": {"name_or_path": "x"}}), s)
                   for s in range(1, 200))
    off = config_from_dict({"method": "kava", "model": {"name_or_path": "x"}, "run": {"grad_share_every": 0}})
    assert not any(grad_share_due(off, s) for s in range(1, 200))
    with pytest.raises(ValueError, match="run.grad_share_every"):
        config_from_dict({"method": "kava", "model": {"name_or_path": "x"}, "run": {"grad_share_every": -1}})


@pytest.mark.parametrize("method", METHODS)
def test_due_only_for_methods_with_more_than_one_loss_term(method):
    """A share of one term is always 1: Coconut (latent, one term: ce_student) was measured too."""
    cfg = config_from_dict({"method": method, "model": {"name_or_path": "x"}, "run": {"grad_share_every": 3}})
    assert any(grad_share_due(cfg, s) for s in range(1, 10)) == (len(spec_of(method).terms) > 1)
    if method == "coconut":  # latent, but one term: it was measured before
        assert not grad_share_due(cfg, 3)


def test_grad_shares_hold_at_most_two_gradients_and_equal_share_metrics(monkeypatch):
    """The streaming measurement gives `share_metrics` over every term's full gradient (cosines included),
    while at most two gradient copies are alive at any autograd call (the reference and the current one)."""
    import weakref

    m, tok = tiny_reasoner("llama", seed=3)
    cfg = config_from_dict({"method": "kava", "model": {"name_or_path": "tiny"},
                            "latent": {"num_latents": 4, "num_sweeps": 2}, "data": {"drop_last_step": False}})
    items = Formatter(tok, drop_last_step=False).tokenize_all(RECORDS, SkipLog())
    batch = make_batch(items, m.ids, cfg)
    params = [p for p in m.parameters() if p.requires_grad]
    terms: dict = {}
    loss_step(m, batch, cfg, terms_out=terms)
    full = {n: list(torch.autograd.grad(w * t.float(), params, retain_graph=True, allow_unused=True))
            for n, (t, w) in terms.items() if w != 0}
    expected = share_metrics(full)
    del full

    real, alive, peak = torch.autograd.grad, [], []

    def tracking(*a, **k):
        peak.append(sum(any(r() is not None for r in refs) for refs in alive))  # gradient sets still alive
        out = real(*a, **k)
        alive.append([weakref.ref(g) for g in out if g is not None])
        return out

    monkeypatch.setattr(torch.autograd, "grad", tracking)
    got = grad_shares(m, batch, cfg)
    assert len(peak) == 5 and max(peak) <= 1  # 4 terms + the total; before each call only the reference lives
    assert got.keys() == expected.keys() and "grad_cos/kv" in got
    for k in got:
        assert got[k] == pytest.approx(expected[k], rel=1e-6, abs=1e-9), k


def test_measurements_rotate_over_the_steps_micro_batches():
    """Grouped by length, micro-batch 0 is always the step's shortest: the k-th measurement takes the
    (k - 1) mod n-th micro-batch, so every length group is measured in turn."""
    cfg = config_from_dict({"method": "kava", "model": {"name_or_path": "x"}, "run": {"grad_share_every": 50}})
    due = [s for s in range(1, 501) if grad_share_due(cfg, s)]
    assert [grad_share_micro(cfg, s, 4) for s in due] == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert {grad_share_micro(cfg, s, 3) for s in due} == {0, 1, 2}
    assert all(grad_share_micro(cfg, s, 1) == 0 for s in due)
