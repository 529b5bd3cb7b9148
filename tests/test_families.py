"""The family matrix (tests/family_matrix.py) on tiny random models: each check against an independent
reference (full recomputation, HF eager attention, one-by-one, the model's own forward, keys recorded at the
model's own rotary call), refusals where kava cannot run a model right, and a short CLI train + eval."""

import json
import sys
from pathlib import Path

import pytest
import torch

from family_matrix import BY_NAME, MATRIX, RUNS, support_table
from kava.config import ConfigError, load_config
from kava.data.format import IGNORE, build_student_batch, build_teacher_batch
from kava.model.families import FAMILIES, SlidingWindowTooShort
from kava.checkpoint.load import check_model
from test_model import batches, close, eager_importance
from kava.data.records import Record
from tiny import RECORDS, SPECS, tiny_reasoner, tiny_tokenizer

# heavy padding: one long question with a one-step CoT beside short questions with long CoTs
HEAVY = RECORDS + [Record("Tom has 3 apples . He buys 4 more and then 5 more and then 6 more . He gives away 2 . "
                          "He buys 7 more and then 8 more . How many does Tom have now ?", ("<<3+4=7>>",), "31", "t:5")]

NAMES = [r.name for r in RUNS]
_models: dict = {}


def model(name, attn="auto"):
    """One tiny model per (family, attention), shared by the checks (they never train it)."""
    if (name, attn) not in _models:
        _models[name, attn] = tiny_reasoner(name, attn=attn)
    return _models[name, attn]


def test_every_from_scratch_family_has_a_matrix_row_and_the_table_is_generated():
    assert {r.family for r in MATRIX} == set(FAMILIES)
    doc = Path(__file__).resolve().parents[1] / "docs" / "families.md"
    assert doc.read_text() == support_table(), "run: python tests/family_matrix.py > docs/families.md"


@pytest.mark.parametrize("name", NAMES)
def test_fast_path_equals_full_recomputation(name):
    m, tok = model(name)
    assert m.attn_implementation == BY_NAME[name].attn
    _, _, sb = batches(m, tok)
    for T in (0, 1, 3):
        with torch.no_grad():
            fast, ref = m.student_forward(sb, T), m.student_forward_naive(sb, T)
        close(fast.logits, ref.logits)
        close(fast.latents, ref.latents)
        close(fast.hidden, ref.hidden)
        assert len(fast.latent_k) == len(ref.latent_k) == max(T, 1)
        for a, b in zip(fast.latent_k + fast.latent_v, ref.latent_k + ref.latent_v):
            assert a.shape[3] == sb.num_latents  # never an empty latent KV
            close(a, b)


@pytest.mark.parametrize("attn", ["auto", "eager"])
@pytest.mark.parametrize("name", NAMES)
def test_captured_importance_equals_eager_attention(name, attn):
    m, tok = model(name, attn)
    _, tb, _ = batches(m, tok)
    ref_model, _ = model(name, "hf_eager")
    for softmax in ("cot", "prefix"):
        with torch.no_grad():
            imp = m.teacher_forward(tb, importance_softmax=softmax).importance
        ref = eager_importance(ref_model, tb, softmax)
        valid = tb.cot_valid[None, :, None, :].expand_as(ref)
        close(imp * valid, ref * valid)
        assert ref.max() > 0.01


@pytest.mark.parametrize("name", NAMES)
def test_batch_equals_one_by_one(name):
    m, tok = model(name)
    items, tb, sb = batches(m, tok, records=HEAVY)
    with torch.no_grad():
        tfull, sfull = m.teacher_forward(tb), m.student_forward(sb, 3)
        off_t = off_s = 0
        for b, it in enumerate(items):
            t1 = m.teacher_forward(build_teacher_batch([it], m.ids))
            s1 = m.student_forward(build_student_batch([it], m.ids, 5), 3)
            n_t, n_s = t1.logits.shape[0], s1.logits.shape[0]
            close(tfull.logits[off_t:off_t + n_t], t1.logits)
            close(sfull.logits[off_s:off_s + n_s], s1.logits)
            off_t, off_s = off_t + n_t, off_s + n_s
            close(tfull.hidden[:, b:b + 1], t1.hidden)
            close(sfull.hidden[:, b:b + 1], s1.hidden)
            c = len(it.cot)
            close(tfull.cot_k[:, b:b + 1, :, :c], t1.cot_k[:, :, :, :c])
            close(tfull.cot_v[:, b:b + 1, :, :c], t1.cot_v[:, :, :, :c])
            close(tfull.importance[:, b:b + 1, :, :c], t1.importance[:, :, :, :c])
            close(sfull.latents[b:b + 1], s1.latents)
            for k_full, k_one in zip(sfull.latent_k, s1.latent_k):  # every sweep
                close(k_full[:, b:b + 1], k_one)
    assert (sb.mask == 0).float().mean() > 0.3 and (tb.mask == 0).float().mean() > 0.3  # the batch really is padded (inside the sequences too)


@pytest.mark.parametrize("name", NAMES)
def test_training_logits_equal_the_models_own(name):
    m, tok = model(name)
    _, tb, _ = batches(m, tok)
    with torch.no_grad():
        t = m.teacher_forward(tb, need_kv=False, need_importance=False)
        own = m.causal_lm(inputs_embeds=m.embed(tb.ids), attention_mask=tb.mask, position_ids=tb.pos).logits
        raw = m.head(m.decoder(inputs_embeds=m.embed(tb.ids), attention_mask=tb.mask,
                               position_ids=tb.pos).last_hidden_state)
    sel = tb.targets != IGNORE
    close(t.logits, own[sel])
    processed = name in ("granite", "cohere", "gemma2", "gemma3")
    assert ((raw[sel] - own[sel]).abs().max() > 1e-2) == processed  # the processing matters at this size


@pytest.mark.parametrize("name", ["llama", "gemma2", "gemma3", "granite"])
def test_special_rows_start_at_the_scale_of_real_input_embeddings(name):
    """Reference: the model's own first hidden state (embedding output, with any scale or multiplier) of every
    vocabulary row, against that of the special rows fed the way kava feeds them."""
    m, tok = model(name)
    real = torch.arange(m.embed_tokens.weight.shape[0])[None]  # every row of the vocabulary
    with torch.no_grad():
        h_real = m.causal_lm(input_ids=real, output_hidden_states=True, position_ids=torch.zeros_like(real)
                             ).hidden_states[0][0]
        h_sp = m.decoder(inputs_embeds=m.special_rows[None].detach(), output_hidden_states=True,
                         position_ids=torch.zeros(1, 3, dtype=torch.long)).hidden_states[0][0]
    mean, std = h_real.mean(0), h_real.std()
    dev = h_sp - mean  # the 0.02*std noise that tells the three rows apart
    assert (h_sp.mean(0) - mean).abs().max() < 0.08 * std
    assert 0.01 * std < dev.std() < 0.04 * std


def _record_pre_rope_keys(m, monkeypatch):
    """Keys as each layer hands them to its modeling file's `apply_rotary_pos_emb`, by layer index."""
    seen, current = {}, {}
    for l, layer in enumerate(m.decoder.layers if hasattr(m.decoder, "layers") else m.decoder.h):
        attn = next(mod for mod in layer.modules() if "Attention" in type(mod).__name__)
        attn.register_forward_pre_hook(lambda mod, args, l=l: current.__setitem__("l", l))
        mod = sys.modules[type(attn).__module__]
        if hasattr(mod, "apply_rotary_pos_emb"):
            orig = mod.apply_rotary_pos_emb

            def spy(q, k, *a, _orig=orig, **kw):
                seen[current["l"]] = k.detach().clone()
                return _orig(q, k, *a, **kw)
            monkeypatch.setattr(mod, "apply_rotary_pos_emb", spy)
    return seen


@pytest.mark.parametrize("name", NAMES)
def test_pre_rope_keys_equal_keys_before_the_rotary_embedding(name, monkeypatch):
    m, tok = tiny_reasoner(name)  # its own model: hooks are installed on it
    _, tb, _ = batches(m, tok)
    m.check_pre_rope()
    seen = _record_pre_rope_keys(m, monkeypatch)
    with torch.no_grad():
        cached = m.teacher_forward(tb, need_importance=False)
        t = m.teacher_forward(tb, key_space="pre_rope", need_importance=False)
    B, C = tb.cot_idx.shape
    if BY_NAME[name].pre_rope == "identity":
        assert not seen
    for l in range(t.cot_k.shape[0]):
        if l not in seen:  # this layer never rotated its keys: pre-RoPE keys are the cached ones
            close(t.cot_k[l], cached.cot_k[l])
            continue
        k = seen[l]  # [B, Hkv, S, r]: r < D where the caller rotates only part of the head (StableLM)
        r = k.shape[-1]
        ref = torch.gather(k, 2, tb.cot_idx.view(B, 1, C, 1).expand(B, k.shape[1], C, r))
        close(t.cot_k[l][..., :r], ref, 1e-5)
        close(t.cot_k[l][..., r:], cached.cot_k[l][..., r:])
        assert (t.cot_k[l] - cached.cot_k[l]).abs().max() > 1e-3  # the rotation really was undone
    # and `rotate` puts them back where the cache had them
    close(m.rotate(t.cot_k, torch.gather(tb.pos, 1, tb.cot_idx)), cached.cot_k, 1e-5)


def test_pre_rope_is_refused_when_unrotating_does_not_give_position_free_keys():
    """The build-time check catches a wrong un-rotation (here: pretending SmolLM3's no-RoPE layer rotates)."""
    m, _ = tiny_reasoner("smollm3")
    use, ltype, apply = m.ropes.layers[0]
    m.ropes.layers[1] = (True, ltype, apply)
    with pytest.raises(ValueError, match="loss.kv_key_space: pre_rope is not supported for smollm3.*position"):
        m.check_pre_rope()


def test_sliding_window_shorter_than_the_sequence_is_refused_not_run():
    m, tok = tiny_reasoner("mistral_window")
    _, tb, sb = batches(m, tok)
    for run in (lambda: m.teacher_forward(tb), lambda: m.student_forward(sb, 0), lambda: m.student_forward(sb, 3)):
        with pytest.raises(SlidingWindowTooShort, match="sliding_window is 6"):
            run()
    cfg = load_config("tiny_synth", [f"model.from_scratch={json.dumps(SPECS['mistral_window'])}"])
    with pytest.raises(ConfigError, match="model: .*sliding_window is 6.*data.max_question_tokens"):
        check_model(m, cfg, tok)


def test_sliding_window_that_covers_the_sequence_runs_exactly():
    """Window = the student batch's columns exactly: every latent and answer query sees what it would."""
    tok = tiny_tokenizer()
    m, _ = tiny_reasoner("mistral", tok=tok)
    _, tb, sb = batches(m, tok)
    w = sb.ids.shape[1]
    m.config.sliding_window = w
    with torch.no_grad():
        for T in (0, 3):
            close(m.student_forward(sb, T).logits, m.student_forward_naive(sb, T).logits)
    assert tb.ids.shape[1] > w
    with pytest.raises(SlidingWindowTooShort):
        m.teacher_forward(tb)


def test_attn_implementation_choices_and_refusals():
    assert tiny_reasoner("llama", attn="sdpa")[0].attn_implementation == "kava_sdpa"
    assert tiny_reasoner("llama", attn="eager")[0].attn_implementation == "kava_eager"
    with pytest.raises(ValueError, match="model.attn_implementation: sdpa.*softcapping"):
        tiny_reasoner("gemma2", attn="sdpa")
    with pytest.raises(ValueError, match="model.attn_implementation: 'flash_attention_2'.*flash"):
        tiny_reasoner("llama", attn="flash_attention_2")
    with pytest.raises(ConfigError, match="model.attn_implementation: 'flash_attention_2'.*flash"):
        load_config("tiny_synth", ["model.attn_implementation=flash_attention_2"])


def test_a_model_whose_logits_kava_would_not_reproduce_is_refused():
    m, _ = tiny_reasoner("granite")
    m.logits_scaling = None  # as kava was before: the LM head alone
    with pytest.raises(ValueError, match="does not reproduce the model's own logits"):
        m.check_backbone()


CLI_TINY = ["data.synth_train_size=48", "data.synth_eval_size=4", "data.valid_limit=2", "optim.effective_batch=4",
            "optim.micro_batch=4", "optim.max_steps=6", "latent.num_latents=3", "run.eval_every=6",
            "run.eval_max_new_tokens=3", "run.eval_max_cot_tokens=8", "method=kava", "run.log=[jsonl]",
            "data.max_question_tokens=100", "data.max_cot_tokens=80", "data.max_answer_tokens=8"]


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory):
    from kava.data.pipeline import synthetic_dir

    return synthetic_dir(load_config("tiny_synth", CLI_TINY), tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("name", [r.name for r in MATRIX if r.cli])
def test_cli_train_and_eval(name, tmp_path, synth_data, capsys):
    from kava.cli import main as cli

    spec = json.dumps(SPECS[name])
    sets = CLI_TINY + [f"model.from_scratch={spec}", f"run.output_dir={tmp_path}", f"run.name={name}"]
    assert cli(["train", "--config", "tiny_synth", "--no-progress", *sum((["--set", s] for s in sets), [])]) == 0
    rd = tmp_path / name
    logs = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss/total"] for x in logs if "loss/total" in x]
    assert losses and all(v == v and abs(v) < 1e4 for v in losses)  # finite
    assert any("loss/kv" in x for x in logs)
    saved = json.loads((rd / "final" / "model" / "config.json").read_text())
    assert saved["model_type"] == FAMILIES[SPECS[name]["family"]]
    assert cli(["eval", "--checkpoint", str(rd), "--datasets", "synth-test", "--data-dir", str(synth_data),
                "--limit", "4"]) == 0
    s = json.loads((rd / "eval" / "synth-test" / "summary.json").read_text())
    assert s["count"] == 4 and s["mode"] == "latent" and 0 <= s["accuracy"] <= 1
    capsys.readouterr()


@pytest.mark.parametrize("name", NAMES)
def test_static_cache_decoding_equals_full_recomputation(name):
    """Greedy decoding on the static cache (`kava.decode.greedy`: the step that CUDA graphs replay) on rows of
    different lengths, right-padded in one batch: every emitted token is the argmax of the model's logits
    recomputed over the whole unpadded sequence without a cache (up to float ties)."""
    from kava.data.format import positions
    from kava.decode import greedy, prefill

    m, _ = model(name)
    rows, n = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24], [25, 26, 27, 28]], 8
    with torch.no_grad():
        cache, logits, mask, last = prefill(m, rows)
        got, steps = greedy(m, cache, logits, mask, last + 1, n, eos=-1)
        assert steps.tolist() == [n] * len(rows)
        for row, toks in zip(rows, got):
            x = torch.tensor([row + toks])
            ones = torch.ones_like(x)
            full = m.logits(m.run(m.embed(x), ones, positions(ones), m.new_cache()).last_hidden_state[0])
            ref = full[len(row) - 1:-1]  # the prediction of each emitted token
            chosen = ref.gather(1, torch.tensor(toks)[:, None])[:, 0]
            assert (ref.max(1).values - chosen).max().item() <= 1e-4, (name, toks, ref.argmax(1).tolist())


@pytest.mark.parametrize("name", NAMES)
def test_static_latent_decoding_equals_the_growing_cache(name, monkeypatch):
    """Latent mode on the static cache (`kava.decode.LatentStep`: the prefix, the sweeps or the sequential
    latents, the answer block and the decode steps, all of which CUDA graphs replay on a GPU), run eagerly here,
    gives the generations and forward-pass counts of the growing cache (`latent_pass` + `answer_from_cache`), for
    Jacobi sweeps (T = 2 and T = 0) and CoDI's sequential latents, on questions of different lengths."""
    from kava.decode import DecodeGraphs, DecodeStep, generate

    from tiny import RECORDS
    from kava.data.format import Formatter

    m, tok = model(name)
    monkeypatch.setattr(DecodeStep, "capture", lambda self, graphs: None)  # no GPU: the steps run eagerly
    items = [Formatter(tok).tokenize(r, i, need_answer=False) for i, r in enumerate(RECORDS)]
    for student, T in (("jacobi", 2), ("jacobi", 0), ("sequential", 2)):
        kw = dict(mode="latent", num_latents=3, num_sweeps=T, student_mode=student, max_new_tokens=5)
        with torch.no_grad():
            ref = generate(m, items, **kw)
            graphs = DecodeGraphs(m, check_every=1)
            got = generate(m, items, graphs=graphs, **kw)
        # a mixture of experts decodes eagerly on the growing cache (`DecodeGraphs.off`): data-dependent routing
        kind = "DecodeStep" if graphs.off is not None else "LatentStep"
        assert [type(s).__name__ for s in graphs.steps.values()] == [kind], (name, student)
        assert (graphs.off is not None) == ("moe" in name)
        assert [g.token_ids for g in got] == [g.token_ids for g in ref], (name, student, T)
        assert [g.forward_passes for g in got] == [g.forward_passes for g in ref]
