"""`kava ask` and `kava inspect` on a tiny trained kava run; the similarity function against a loop."""

from __future__ import annotations

import io
import re
import struct

import pytest
import torch

from kava.cli import main
from kava.config import load_config
from kava.data.format import Formatter
from kava.data.records import Record
from kava.decode import generate
from kava.tools.inspect_latents import inspect_example, latent_cot_similarity, nearest_tokens
from kava.checkpoint.load import load_for_eval
from kava.scoring import extract_answer

from test_sweep import TINY

Q = "Ivy has 26 buttons . She finds 5 more . How many buttons does Ivy have ?"
COT = "<<26+5=31>> <<31*2=62>>"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from kava.train import train

    d = tmp_path_factory.mktemp("ask")  # (one torch thread: tests/conftest.py)
    return train(load_config("tiny_synth", TINY + ["method=kava", f"run.output_dir={d}", "run.name=kava"]),
                 progress=False)


@pytest.fixture(scope="module")
def loaded(run_dir):
    return load_for_eval(run_dir / "best")


def test_ask_prints_answer_and_pass_count(run_dir, loaded, capsys):
    assert main(["ask", "--checkpoint", str(run_dir), "--question", Q]) == 0
    out = capsys.readouterr().out.splitlines()
    model, tok, cfg = loaded
    item = Formatter(tok, answer_prompt=cfg.data.answer_prompt).tokenize(Record(Q, (), ""), need_answer=False)
    g = generate(model, [item], mode="latent", num_latents=4, num_sweeps=3, max_new_tokens=cfg.run.eval_max_new_tokens,
                 tokenizer=tok)[0]
    assert out[0] == f"answer: {g.text.strip()}"
    assert out[1] == f"extracted: {extract_answer(g.text, cfg.data.answer_prompt)['strict']}"
    m = re.fullmatch(r"forward passes: (\d+) \(1 prefix \+ (\d+) sweeps \+ (\d+) decode steps\)", out[2])
    passes, sweeps, steps = map(int, m.groups())
    assert sweeps == cfg.latent.num_sweeps == 3 and steps == len(g.token_ids) >= 1
    assert passes == 1 + sweeps + steps == g.forward_passes
    assert re.fullmatch(r"time: \d+\.\d{3} s", out[3])


def test_ask_counts_the_eos_step(loaded, monkeypatch):
    """The untrained tiny model never emits eos; force it to, so the eos pass must be counted."""
    from kava.commands.ask import answer

    model, tok, cfg = loaded
    head = model.logits
    bias = torch.zeros(model.head.weight.shape[0])
    bias[model.ids.eos] = 1e4
    monkeypatch.setattr(model, "logits", lambda h: head(h) + bias)
    lines = answer(model, tok, cfg, Q, mode="latent")
    assert lines[0] == "answer: " and lines[1] == "extracted: None"
    assert lines[2] == "forward passes: 5 (1 prefix + 3 sweeps + 1 decode steps)"


def test_ask_show_latents(run_dir, loaded, capsys):
    assert main(["ask", "--checkpoint", str(run_dir), "--question", Q, "--show-latents"]) == 0
    lat = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("latent")]
    assert [ln.split(":")[0] for ln in lat] == [f"latent {i:>2}" for i in range(1, 5)]  # M = 4 slots

    model, tok, _ = loaded
    z = torch.randn(3, model.hidden_size)
    got = nearest_tokens(model, tok, z, k=5)
    p = torch.softmax(model.head(z).float(), -1)
    for row, pz in zip(got, p):
        want = pz.topk(5)
        assert [t for t, _ in row] == [tok.decode([i]) if "\ufffd" not in tok.decode([i])
                                       else tok.convert_ids_to_tokens(i) for i in want.indices.tolist()]
        assert [x for _, x in row] == pytest.approx(want.values.tolist())
        assert all(a >= b for (_, a), (_, b) in zip(row, row[1:]))


def test_ask_reads_stdin_until_eof(run_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{Q}\n\nTom has 3 apples .\n"))
    assert main(["ask", "--checkpoint", str(run_dir), "--mode", "nocot", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("answer: ") == 2 and "> " not in out  # no prompt when stdin is not a terminal
    for n, steps in re.findall(r"forward passes: (\d+) \((\d+) decode steps\)", out):
        assert n == steps and 1 <= int(n) <= 4  # nocot: every pass emits a token


def _naive_similarity(lat: torch.Tensor, cot: torch.Tensor) -> torch.Tensor:
    L, H, M, D = lat.shape
    C = cot.shape[2]
    out = torch.zeros(L, M, C)
    for l in range(L):
        for i in range(M):
            a = torch.cat([lat[l, h, i] for h in range(H)])
            for j in range(C):
                b = torch.cat([cot[l, h, j] for h in range(H)])
                out[l, i, j] = (a @ b) / (a.norm() * b.norm())
    return out


def test_latent_cot_similarity_matches_loop():
    g = torch.Generator().manual_seed(0)
    lat, cot = torch.randn(3, 2, 4, 5, generator=g), torch.randn(3, 2, 6, 5, generator=g)
    sim = latent_cot_similarity(lat, cot)
    assert sim.shape == (3, 4, 6)
    torch.testing.assert_close(sim, _naive_similarity(lat, cot), atol=1e-5, rtol=1e-5)
    same = latent_cot_similarity(cot[:, :, :4] * 3.0, cot)  # slot i is CoT token i, scaled
    torch.testing.assert_close(torch.diagonal(same, dim1=1, dim2=2), torch.ones(3, 4))
    # the heads are concatenated, not averaged: opposite halves in two heads cancel to 0
    x = torch.randn(1, 1, 1, 5, generator=g)
    a, b = torch.cat([x, x], 1), torch.cat([x, -x], 1)
    assert latent_cot_similarity(a, b).abs().item() < 1e-6


def test_inspect_writes_png(run_dir, loaded, tmp_path, capsys):
    png = tmp_path / "sim.png"
    assert main(["inspect", "--checkpoint", str(run_dir), "--question", Q, "--cot", COT, "--answer", "62",
                 "--output", str(png)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"saved {png}"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    w, h = struct.unpack(">II", data[16:24])
    assert w > 800 and h > 400 and len(data) > 20_000
    assert [ln.split(":")[0] for ln in out[2:]] == ["layer 0", "layer 1"]
    assert main(["inspect", "--checkpoint", str(run_dir), "--question", Q, "--cot", COT, "--answer", "62",
                 "--output", str(tmp_path / "centred.png"), "--centered", "--layers", "all"]) == 0
    assert (tmp_path / "centred.png").read_bytes() != data  # another similarity drawn
    capsys.readouterr()

    model, tok, cfg = loaded
    ins = inspect_example(model, tok, cfg, Q, COT, "62")
    C = len(tok(" " + COT, add_special_tokens=False)["input_ids"])
    L, H, M = 2, ins.num_kv_heads, cfg.latent.num_latents
    assert ins.sim_k.shape == ins.sim_v.shape == (L, M, C) and len(ins.cot_tokens) == C
    assert ins.sim_k.abs().max() <= 1 + 1e-5
    # every KV head keeps min(M, C) distinct CoT tokens
    assert ins.kept.sum(-1).tolist() == [H * min(M, C)] * L
    first = out[2].split(": ", 1)[1].split("  ")[0]  # the token kept by most heads in layer 0
    assert first.endswith(f"×{int(ins.kept[0].max())}")


@pytest.mark.parametrize("setting", ["eviction.importance_softmax=prefix", "eviction.method=attention",
                                     "eviction.importance_queries=cot_tail"])
def test_inspect_uses_the_runs_eviction_settings(setting):
    """`kava inspect` marks the CoT tokens training kept as the L_KV targets, under every `eviction.*` setting of
    the run (issue 20: it ignored `eviction.importance_softmax`, so a run trained with `prefix` was inspected
    with the `cot` softmax). Reference: the teacher pass and `select_indices` written out with the setting."""
    import dataclasses

    from kava import eviction
    from kava.config import config_from_dict
    from kava.data.format import build_teacher_batch
    from tiny import RECORDS, tiny_reasoner

    model, tok = tiny_reasoner("llama", seed=2)  # a model on which the two softmaxes keep different tokens
    key, value = setting.split("=")
    cfg = config_from_dict({"method": "kava", "model": {"name_or_path": "tiny"},
                            "latent": {"num_latents": 3, "num_sweeps": 2},
                            "eviction": {"lam": 1.0, key.split(".")[1]: value}})  # lam 1: importance decides
    ev, rec = cfg.eviction, RECORDS[0]
    cot = " ".join(rec.steps)
    ins = inspect_example(model, tok, cfg, rec.question, cot, rec.answer)
    item = Formatter(tok, answer_prompt=cfg.data.answer_prompt, drop_last_step=False).tokenize(
        Record(rec.question, (cot,), rec.answer))
    tb = build_teacher_batch([item], model.ids, query_mode=ev.importance_queries, tail_window=ev.cot_tail_window)
    with torch.no_grad():
        t = model.teacher_forward(tb, need_kv=True, need_importance=True, importance_softmax=ev.importance_softmax)
    idx, mask = eviction.select_indices(ev.method, keys=t.cot_k, importance=t.importance, valid=tb.cot_valid,
                                        num_slots=3, lam=ev.lam)
    C = tb.cot_valid.shape[1]
    want = (torch.nn.functional.one_hot(idx[:, 0], C) * mask[0, None, None, :, None]).sum(2).clamp(max=1).sum(1)
    assert torch.equal(ins.kept, want)
    if key == "eviction.importance_softmax":  # and the option matters here: the cot softmax keeps other tokens
        other = dataclasses.replace(cfg, eviction=dataclasses.replace(ev, importance_softmax="cot"))
        assert not torch.equal(inspect_example(model, tok, other, rec.question, cot, rec.answer).kept, want)
        assert ins.eviction == "rkv λ=1, prefix softmax"


def test_centred_cosine_removes_the_common_direction():
    g = torch.Generator().manual_seed(1)
    lat, cot = torch.randn(2, 2, 4, 5, generator=g), torch.randn(2, 2, 6, 5, generator=g)
    common = 50.0 * torch.randn(2, 2, 1, 5, generator=g)  # what every slot and token share
    raw = latent_cot_similarity(lat + common, cot + common)
    assert raw.min().item() > 0.9  # the raw cosine says "all similar"
    want = _naive_similarity(lat - lat.mean(2, keepdim=True), cot - cot.mean(2, keepdim=True))
    torch.testing.assert_close(latent_cot_similarity(lat + common, cot + common, centered=True), want, atol=1e-4, rtol=1e-4)


def test_inspect_plot_is_a_readable_grid_of_a_few_layers(tmp_path):
    """A 60-layer model (the SmolLM2-135M-sized case that drew one 15,480-pixel row): by default 4 layers
    spread over the depth, keys and values side by side, a few thousand pixels at most; more layers wrap
    into columns of pairs."""
    from kava.tools.inspect_latents import Inspection, default_layers, plot_similarity

    L, M, C = 60, 6, 24
    g = torch.Generator().manual_seed(0)
    ins = Inspection([f"t{j}" for j in range(C)], torch.rand(L, M, C, generator=g) * 2 - 1,
                     torch.rand(L, M, C, generator=g) * 2 - 1, torch.randint(0, 3, (L, C), generator=g), 2,
                     "rkv λ=0.1", "cache")
    assert default_layers(L) == [0, 20, 39, 59] and default_layers(3) == [0, 1, 2]
    w, h = _png_size(plot_similarity(ins, tmp_path / "few.png"))
    assert 1000 <= w <= 2500 and 1000 <= h <= 2500, (w, h)
    w5, h5 = _png_size(plot_similarity(ins, tmp_path / "5.png", list(range(5))))
    assert w5 > 1.8 * w and h5 < h, (w5, h5)  # 5 layers: 2 columns of (keys, values), 3 rows


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])
