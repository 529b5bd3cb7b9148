"""The static-cache decoder (`kava.decode.DecodeStep`, `DecodeGraphs`, `greedy`): its step has no host sync
(it runs on the meta device, so a CUDA graph can record it), graphs are reused per batch shape and dropped
least recently used, a capture that fails falls back to the same step run eagerly, and none of it changes a
token (against the step run eagerly, which tests/test_families.py checks against full recomputation)."""

import pytest
import torch

from kava.decode import DecodeGraphs, DecodeStep, greedy, prefill
from kava.model.capture import no_host_sync
from tiny import tiny_reasoner

ROWS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14, 15, 16, 17]]


class StandIn:
    """What `DecodeStep.capture` makes on a GPU, on a CPU: `replay` runs the recorded body."""

    def __init__(self, body):
        self.body, self.replays = body, 0

    def replay(self):
        self.replays += 1
        self.body()


@pytest.fixture
def stand_in(monkeypatch):
    made = []

    def capture(self, graphs):
        if getattr(graphs, "fail", False):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        for attr, body in self.bodies():  # the decode step, and a LatentStep's latent pass too
            setattr(self, attr, StandIn(body))
            made.append(getattr(self, attr))

    monkeypatch.setattr(DecodeStep, "capture", capture)
    return made


def decode(m, rows, n, eos=-1, graphs=None):
    with torch.no_grad():
        cache, logits, mask, last = prefill(m, rows)
        toks, steps = greedy(m, cache, logits, mask, last + 1, n, eos, graphs)
    return toks, steps.tolist()


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_the_decode_step_has_no_host_sync(family):
    """On the meta device any data-dependent op (`.item()`, `if tensor:`, a host list copied in) raises."""
    m, _ = tiny_reasoner(family)
    m.blocked_ids = [m.ids.bot, m.ids.eot]  # an exported model's head (an index on the device)
    with torch.no_grad():
        cache, logits, mask, last = prefill(m, ROWS)
    m = m.to("meta")
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys.to("meta"), layer.values.to("meta")
    step = DecodeStep(m, cache, mask.shape[1] + 4, 5)
    with torch.no_grad(), no_host_sync():
        step.load(cache, mask.to("meta"), logits.argmax(-1).to("meta"), (last + 1).to("meta"))
        step.step()
        step.step()
    assert step.out.device.type == "meta"


def test_the_meta_probe_catches_a_host_read(monkeypatch):
    """Control: the same step with one data-dependent op (the old list index of blocked ids in the head) raises
    on the meta device: the probe above can fail."""
    m, _ = tiny_reasoner("llama")
    with torch.no_grad():
        cache, logits, mask, last = prefill(m, ROWS)
    m = m.to("meta")
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys.to("meta"), layer.values.to("meta")
    head = m.logits
    monkeypatch.setattr(m, "logits", lambda h: head(h)[..., :int(h.shape[-1] + h.abs().max())])
    step = DecodeStep(m, cache, mask.shape[1] + 2, 3)
    with torch.no_grad(), no_host_sync(), pytest.raises((RuntimeError, NotImplementedError), match="meta"):
        step.load(cache, mask.to("meta"), logits.argmax(-1).to("meta"), (last + 1).to("meta"))
        step.step()


def test_graphs_give_the_eager_tokens_reuse_one_graph_per_shape_and_drop_the_least_recent(stand_in):
    m, _ = tiny_reasoner("llama")
    ref = decode(m, ROWS, 6)
    graphs = DecodeGraphs(m, max_graphs=2, check_every=1)
    assert decode(m, ROWS, 6, graphs=graphs) == ref
    assert decode(m, ROWS, 6, graphs=graphs)[0] == ref[0]  # same shape: replayed, not captured again
    assert graphs.captured == 1 and len(stand_in) == 1 and stand_in[0].replays == 2 * 5
    decode(m, ROWS, 4, graphs=graphs)  # another budget, another shape
    decode(m, ROWS[:2], 6, graphs=graphs)  # another batch size: the first shape (least recent) is dropped
    assert graphs.captured == 3 and len(graphs.steps) == 2
    assert decode(m, ROWS, 6, graphs=graphs)[0] == ref[0] and graphs.captured == 4
    with graphs:
        pass
    assert graphs.steps == {}


def test_a_failed_capture_decodes_eagerly_and_says_why(stand_in):
    m, _ = tiny_reasoner("llama")
    ref = decode(m, ROWS, 6)
    graphs = DecodeGraphs(m)
    graphs.fail = True
    assert decode(m, ROWS, 6, graphs=graphs) == ref
    assert graphs.captured == 0 and graphs.off.startswith("RuntimeError: CUDA out of memory")
    graphs.fail = False
    assert decode(m, ROWS[:2], 6, graphs=graphs)[0] == ref[0][:2] and graphs.captured == 0  # off for good


@pytest.mark.parametrize("every", [1, 3, 8])
def test_looking_for_eos_every_few_steps_returns_the_same_tokens_and_steps(stand_in, every):
    """Decoding stops once every row has emitted eos; looked at every `check_every` steps, the extra steps run
    after it change nothing returned."""
    m, _ = tiny_reasoner("llama")
    free, _ = decode(m, ROWS, 10)
    eos = free[0][2]  # a token row 0 emits third: some rows stop early, maybe all
    ref = decode(m, ROWS, 10, eos=eos)
    assert ref[0][0] == free[0][:free[0].index(eos) + 1]
    got = decode(m, ROWS, 10, eos=eos, graphs=DecodeGraphs(m, check_every=every))
    assert got == ref and [len(t) for t in got[0]] == got[1]


def test_a_mixture_of_experts_model_decodes_eagerly_and_says_why(stand_in):
    m, _ = tiny_reasoner("qwen3_moe")
    graphs = DecodeGraphs(m)
    assert decode(m, ROWS, 5, graphs=graphs) == decode(m, ROWS, 5)
    assert graphs.captured == 0 and stand_in == [] and "mixture-of-experts" in graphs.off


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cot_generation_with_a_position_skip_equals_full_recomputation_at_those_positions(family):
    """iCoT's keep_position at evaluation (`generate(position_skip=s)`): the generated tokens run at positions
    q+s, q+s+1, .. (each row's q; read off the decoder's calls), and each is the argmax of a cache-free
    recomputation of question + tokens at positions 0..q-1, q+s, q+s+1, .."""
    from kava.data.format import Tokenized
    from kava.decode import generate

    m, _ = tiny_reasoner(family)
    items = [Tokenized(question=row, cot=[], prompt=[30], answer=[], index=i) for i, row in enumerate(ROWS)]
    skip, seen = 7, []
    hook = m.decoder.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw["position_ids"].clone()),
                                               with_kwargs=True)
    got = generate(m, items, mode="cot", max_new_tokens=3, max_cot_tokens=5, position_skip=skip)
    hook.remove()
    steps = [p[:, 0].tolist() for p in seen[1:]]  # after the prefill: one [B, 1] call per decode step
    assert steps == [[len(row) + skip + j for row in ROWS] for j in range(len(steps))] and steps
    with torch.no_grad():
        for row, g in zip(ROWS, got):
            toks = list(g.token_ids)
            x = torch.tensor([row + toks])
            pos = torch.tensor([list(range(len(row))) + [len(row) + skip + j for j in range(len(toks))]])
            h = m.run(m.embed(x), torch.ones_like(x), pos, m.new_cache()).last_hidden_state[0]
            ref = m.logits(h)[len(row) - 1:-1]  # the prediction of each generated token
            chosen = ref.gather(1, torch.tensor(toks)[:, None])[:, 0]
            assert (ref.max(1).values - chosen).max().item() <= 1e-4, (family, toks, ref.argmax(1).tolist())
    with pytest.raises(ValueError, match="position_skip is for cot mode"):
        generate(m, items, mode="nocot", position_skip=skip, max_new_tokens=3)


def test_a_position_skip_takes_its_tokens_off_the_cot_budget():
    """With position_skip s the generation writes at most max_cot_tokens - s CoT tokens: it then ends where it
    would without the skip (so a model whose positions just fit stays within them)."""
    from kava.data.format import Tokenized
    from kava.decode import generate

    m, _ = tiny_reasoner("llama")
    items = [Tokenized(question=ROWS[0], cot=[], prompt=[30], answer=[], index=0)]
    kw = dict(mode="cot", max_new_tokens=3, max_cot_tokens=6)  # no eos in a tiny model: every budget is spent
    assert [len(generate(m, items, position_skip=s, **kw)[0].token_ids) for s in (0, 4, 9)] == [10, 6, 4]


def latent_items(tok, n=None):
    from kava.data.format import Formatter
    from tiny import RECORDS

    return [Formatter(tok).tokenize(r, i, need_answer=False) for i, r in enumerate(RECORDS[:n])]


@pytest.mark.parametrize("student, T", [("jacobi", 2), ("sequential", 2)])
def test_the_latent_step_has_no_host_sync(student, T):
    """The whole latent pass on the static cache (`LatentStep.latent`: prefix, sweeps or sequential latents,
    answer block) runs on the meta device, where any data-dependent op raises: a CUDA graph can record it."""
    from kava.decode import LatentStep, question_batch

    m, tok = tiny_reasoner("llama")
    sb = question_batch(m, latent_items(tok), 3)
    m = m.to("meta")
    sb = sb.to("meta")
    step = LatentStep(m, sb, T, student, 4)
    with torch.no_grad(), no_host_sync():
        step.load_latent(sb)
        step.latent()
        step.step()
    assert step.out.device.type == "meta"


def test_latent_graphs_replay_the_latent_pass_and_the_decode_step_per_shape(stand_in):
    """With graphs, latent mode captures its latent pass and its decode step once per batch shape, replays both
    (the first token from the latent pass, the rest from decode steps), and gives the eager generations; the
    step of a shape already seen is reused with the new batch's data."""
    from kava.decode import DecodeGraphs, generate

    m, tok = tiny_reasoner("llama")
    items = latent_items(tok)
    kw = dict(mode="latent", num_latents=3, num_sweeps=2, max_new_tokens=4)
    with torch.no_grad():
        ref = generate(m, items, **kw)
        graphs = DecodeGraphs(m, check_every=1)
        assert [g.token_ids for g in generate(m, items, graphs=graphs, **kw)] == [g.token_ids for g in ref]
        assert graphs.captured == 1 and len(stand_in) == 2  # the latent pass and the decode step
        latent, dec = stand_in
        assert latent.replays == 1 and dec.replays == 3
        other = items[::-1]  # the same shape (question width, batch), other data: replayed, not captured again
        ref2 = generate(m, other, **kw)
        assert [g.token_ids for g in generate(m, other, graphs=graphs, **kw)] == [g.token_ids for g in ref2]
        assert graphs.captured == 1 and latent.replays == 2
        generate(m, items[:2], graphs=graphs, **kw)  # another batch size: another shape
        assert graphs.captured == 2
