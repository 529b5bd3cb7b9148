"""Each mode's layout is `kava.decode`'s: `budget`, `sequence_length`, `passes` and `latent_pass` give what the
code they replaced computed inline (evaluate's sliding-window check, export's generation budget, load's longest
training sequence, `kava ask`'s pass count, the question-only student pass of decode, the diagnostics,
`kava inspect` and `kava ask --show-latents`)."""

from __future__ import annotations

import itertools

import pytest
import torch

from kava.checkpoint.load import longest_sequence
from kava.config import config_from_dict
from kava.data.format import Formatter, build_student_batch
from kava.decode import (answer_from_cache, budget, generate, input_columns, latent_pass, passes, question_batch,
                         sequence_length)
from kava.spec import MODES
from tiny import RECORDS, tiny_reasoner, tiny_tokenizer

GRID = list(itertools.product(MODES, (0, 3, 24), (1, 16), (0, 5, 128), (0, 4)))  # mode, M, max_new, max_cot, prompt


# ------------------------------------------------------------------------------------------------ the formulas
def old_budget(mode, max_new, max_cot, prompt):  # decode._generate, checkpoint.export (gc.max_new_tokens)
    return max_new + (max_cot + prompt if mode == "cot" else 0)


def old_window(mode, longest, M, max_new, max_cot, prompt):  # evaluate.evaluate_records' sliding-window check
    extra = {"latent": 2 + M, "cot": max_cot}.get(mode, 0)
    return longest + extra + prompt + max_new


def old_passes(mode, student, M, T):  # commands/ask.answer
    if mode != "latent":
        return 0
    return 1 + M if student == "sequential" else 1 + T


@pytest.mark.parametrize("mode, M, max_new, max_cot, prompt", GRID)
def test_budget_and_sequence_length_are_the_old_formulas(mode, M, max_new, max_cot, prompt):
    assert budget(mode, max_new_tokens=max_new, max_cot_tokens=max_cot, prompt_len=prompt) == \
        old_budget(mode, max_new, max_cot, prompt)
    for longest in (1, 37):
        assert sequence_length(mode, longest, num_latents=M, prompt_len=prompt, max_new_tokens=max_new,
                               max_cot_tokens=max_cot) == old_window(mode, longest, M, max_new, max_cot, prompt)
    assert input_columns(mode, num_latents=M, prompt_len=prompt) == {"latent": 2 + M + prompt, "cot": 0,
                                                                      "nocot": prompt}[mode]


@pytest.mark.parametrize("mode", ["jacobi", "latent ", "", "COT"])
def test_an_unknown_mode_is_refused_as_generate_refuses_it(mode):
    for f in (lambda: budget(mode, max_new_tokens=1), lambda: passes(mode), lambda: input_columns(mode)):
        with pytest.raises(ValueError, match=f"mode {mode!r}; allowed values: latent, cot, nocot"):
            f()


@pytest.mark.parametrize("M, max_cot, prompt_text", [(4, 10, "The answer is:"), (24, 3, "The answer is:"),
                                                       (6, 50, ""), (1, 1, "")])
def test_longest_training_sequence_is_the_old_formula(M, max_cot, prompt_text):
    tok = tiny_tokenizer()
    cfg = config_from_dict({"method": "kava", "model": {"name_or_path": "x"}, "latent": {"num_latents": M},
                            "data": {"max_cot_tokens": max_cot, "max_question_tokens": 33, "max_answer_tokens": 7,
                                     "answer_prompt": prompt_text}})
    d = cfg.data
    prompt = len(tok(d.answer_prompt, add_special_tokens=False)["input_ids"]) if d.answer_prompt else 0
    old = d.max_question_tokens + max(d.max_cot_tokens, cfg.latent.num_latents + 2) + prompt + d.max_answer_tokens + 4
    assert longest_sequence(cfg, tok) == old


def test_export_budget_is_the_old_one_for_every_eval_mode():
    from kava.spec import SPECS

    for name, spec in SPECS.items():
        assert budget(spec.eval_mode, max_new_tokens=16, max_cot_tokens=128, prompt_len=4) == \
            old_budget(spec.eval_mode, 16, 128, 4), name


# ------------------------------------------------------------------------------------------------ the passes
@pytest.fixture(scope="module")
def model():
    return tiny_reasoner("llama", seed=3)


def items_of(tok, records=RECORDS):
    fmt = Formatter(tok)
    return [fmt.tokenize(r, i, need_answer=False) for i, r in enumerate(records)]


@pytest.mark.parametrize("student, M, T", [("jacobi", 4, 0), ("jacobi", 4, 1), ("jacobi", 3, 3),
                                           ("sequential", 4, 2), ("sequential", 0, 2)])
def test_passes_count_the_student_pass_and_generate(model, student, M, T):
    m, tok = model
    items = items_of(tok)
    assert passes("latent", student_mode=student, num_latents=M, num_sweeps=T) == old_passes("latent", student, M, T)
    with torch.no_grad():
        _, s = latent_pass(m, items, num_latents=M, num_sweeps=T, student_mode=student)
        gens = generate(m, items, mode="latent", num_latents=M, num_sweeps=T, student_mode=student, max_new_tokens=3)
    assert s.forward_passes == passes("latent", student_mode=student, num_latents=M, num_sweeps=T)
    assert all(g.forward_passes == passes("latent", student_mode=student, num_latents=M, num_sweeps=T)
               + len(g.token_ids) for g in gens)
    for mode in ("cot", "nocot"):
        assert passes(mode, student_mode=student, num_latents=M, num_sweeps=T) == old_passes(mode, student, M, T) == 0


def inline_pass(m, items, M, T, student, key_space, keep_sweeps, rounded):
    """The code `latent_pass` replaced: decode / the diagnostics (rounded), `kava inspect` / `kava ask` (not)."""
    dev = m.special_rows.device
    sb = (question_batch(m, items, M) if rounded else build_student_batch(items, m.ids, M, with_answer=False)).to(dev)
    return sb, m.student_forward(sb, T, student_mode=student, key_space=key_space, keep_sweeps=keep_sweeps,
                                 with_answer=False)


@pytest.mark.parametrize("student, key_space, keep_sweeps, rounded", [
    ("jacobi", "cache", "all", True),  # decode._generate
    ("jacobi", "pre_rope", "last", True),  # diagnostics (kv match in pre-RoPE key space)
    ("sequential", "cache", "last", True),
    ("jacobi", "cache", "last", False),  # kava inspect
    ("jacobi", "pre_rope", "last", False),
    ("sequential", "cache", "all", False),  # kava ask --show-latents
])
def test_latent_pass_is_the_inline_pass_bitwise(model, student, key_space, keep_sweeps, rounded):
    m, tok = model
    for items in (items_of(tok), items_of(tok, RECORDS[:1])):
        with torch.no_grad():
            sb, s = latent_pass(m, items, num_latents=4, num_sweeps=2, student_mode=student, key_space=key_space,
                                keep_sweeps=keep_sweeps, round_width=rounded)
            sb0, s0 = inline_pass(m, items, 4, 2, student, key_space, keep_sweeps, rounded)
            toks, _ = answer_from_cache(m, sb, s.cache, sb.mask, 4)
            toks0, _ = answer_from_cache(m, sb0, s0.cache, sb0.mask, 4)
        assert sb.q_block == sb0.q_block and (sb.q_block - 1) % 16 == 0 if rounded else sb.q_block == sb0.q_block
        for a, b in ((sb.ids, sb0.ids), (sb.mask, sb0.mask), (sb.pos, sb0.pos), (s.latents, s0.latents)):
            assert torch.equal(a, b)
        assert len(s.latent_k) == len(s0.latent_k) == (1 if keep_sweeps == "last" or student == "sequential" else 2)
        for a, b in zip(s.latent_k + s.latent_v, s0.latent_k + s0.latent_v):
            assert torch.equal(a, b)
        assert s.forward_passes == s0.forward_passes and toks == toks0
