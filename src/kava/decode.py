"""Generation on the KV cache for every mode: batched greedy decoding and its forward-pass accounting.

Modes (`kava.spec.MODES`):
    latent: prefix pass (question · <bot> · placeholders), T sweeps (or M sequential passes for CODI),
            then <eot> · answer prompt and greedy answer decoding.        passes = 1 + T + decode steps
    cot:    question prefill, then greedy CoT · answer prompt · answer.   passes = 1 + generated tokens
    nocot:  question · answer prompt prefill, then greedy answer.         passes = decode steps

A *decode step* is one forward call that emits a token (the eos included); `generated_tokens` excludes
the eos. Counts are per example: an example stops counting once it has emitted eos.

Each mode's layout is asked of this module, never recomputed: `budget` (the tokens a mode generates),
`sequence_length` (the longest sequence it decodes: what a sliding window must cover), `passes` (the forward
passes before the first decode step) and `latent_pass` (the question-only student pass of latent mode).

Evaluation (`kava.evaluate`), the diagnostics (`kava.diagnostics`), `kava ask` and `kava.load(...).generate`
(`kava.api`) all decode through this module; `kava inspect` and `kava export` ask it for the layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kava.data.format import BlockWidths, StudentBatch, Tokenized, build_student_batch, pad_rows, positions
from kava.model.capture import no_host_sync
from kava.model.reasoner import LatentReasoner, StudentOut
from kava.spec import MODES


# ------------------------------------------------------------------------------------------------ layout
def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}; allowed values: {', '.join(MODES)}")
    return mode


def budget(mode: str, *, max_new_tokens: int, max_cot_tokens: int = 0, prompt_len: int = 0) -> int:
    """The most tokens `mode` generates after its input: the answer's `max_new_tokens` (eos included); in cot
    mode also the CoT (`max_cot_tokens`) and the answer prompt (`prompt_len` tokens) it writes before the answer."""
    return max_new_tokens + (max_cot_tokens + prompt_len if check_mode(mode) == "cot" else 0)


def input_columns(mode: str, *, num_latents: int = 0, prompt_len: int = 0) -> int:
    """Columns of `mode`'s input after the question: latent `<bot>` · M slots · `<eot>` · prompt, nocot the
    prompt, cot none (it writes the prompt itself)."""
    return {"latent": 2 + num_latents + prompt_len, "cot": 0, "nocot": prompt_len}[check_mode(mode)]


def sequence_length(mode: str, question_len: int, *, num_latents: int, prompt_len: int, max_new_tokens: int,
                    max_cot_tokens: int) -> int:
    """The longest sequence `mode` decodes for a question of `question_len` tokens: the question, the mode's
    input columns (`input_columns`) and what it generates (`budget`)."""
    return question_len + input_columns(mode, num_latents=num_latents, prompt_len=prompt_len) + budget(
        mode, max_new_tokens=max_new_tokens, max_cot_tokens=max_cot_tokens, prompt_len=prompt_len)


def input_ids(item: Tokenized, mode: str, ids, num_latents: int = 0) -> list[int]:
    """The token ids `mode` feeds the model for a question-only item, before it generates: latent question ·
    `<bot>` · M `<latent>` slots (their embeddings are the latents the sweeps compute) · `<eot>` · prompt,
    nocot question · prompt, cot the question. `kava eval` writes them, decoded, as each prediction's prompt."""
    return item.question + {"latent": [ids.bot] + [ids.latent] * num_latents + [ids.eot] + item.prompt,
                            "nocot": item.prompt, "cot": []}[check_mode(mode)]


def passes(mode: str, *, student_mode: str = "jacobi", num_latents: int = 0, num_sweeps: int = 0) -> int:
    """Forward passes of `mode` before its first decode step: latent 1 prefix + T sweeps (jacobi) or + M
    sequential latents (sequential); cot and nocot none (the prefill's logits give the first token). A
    generation's `forward_passes` is this plus its decode steps."""
    if check_mode(mode) != "latent":
        return 0
    return 1 + (num_latents if student_mode == "sequential" else num_sweeps)


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    forward_passes: int
    generated_tokens: int


def greedy(model: LatentReasoner, cache, logits: torch.Tensor, mask: torch.Tensor, next_pos: torch.Tensor,
            max_new: int, eos: int) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy decoding from `logits` [B, V] (the prediction of the first new token) on `cache`.

    mask: [B, S0] attention mask of what the cache holds; next_pos: [B] position of the first new token.
    Returns (tokens per example, eos included if emitted; steps [B] = forward calls that emitted a token).
    """
    B = logits.shape[0]
    # the bookkeeping lives on the host: one device read per step (the tokens), not one per example
    done, steps = [False] * B, [0] * B
    out: list[list[int]] = [[] for _ in range(B)]
    ones = torch.ones(B, 1, dtype=mask.dtype, device=mask.device)
    for step in range(max_new):
        tok = logits.argmax(-1)
        for b, t in enumerate(tok.tolist()):
            if not done[b]:
                out[b].append(t)
                steps[b] += 1
                done[b] = t == eos
        if all(done) or step == max_new - 1:
            break
        mask = torch.cat([mask, ones], 1)
        h = model.run(model.embed(tok[:, None]), mask, (next_pos + step)[:, None], cache).last_hidden_state
        logits = model.logits(h[:, -1])
    return out, torch.tensor(steps)


def answer_from_cache(model: LatentReasoner, sb, cache, mask: torch.Tensor,
                      max_new: int) -> tuple[list[list[int]], torch.Tensor]:
    """Run the answer block `<eot> · prompt` of a question-only student batch on `cache` (which holds the
    question block and the M latent slots), then decode greedily (see `greedy`).

    mask: [B, Qb+M+Ab] attention mask of the whole student sequence (`sb.mask`, or with latent slots
    switched off, as the oracle check does). The answer block is never padded (`<eot>` and the prompt are
    the same ids for every example), so its last column predicts the first answer token.
    """
    A0 = sb.answer_start
    out = model.run(model.embed(sb.ids[:, A0:]), mask, sb.pos[:, A0:], cache)
    logits = model.logits(out.last_hidden_state[:, -1])
    return greedy(model, cache, logits, mask, sb.pos[:, -1] + 1, max_new, model.ids.eos)


@torch.no_grad()
def generate(model: LatentReasoner, items: list[Tokenized], *, mode: str, num_latents: int = 24,
             num_sweeps: int = 3, student_mode: str = "jacobi", max_new_tokens: int = 16,
             max_cot_tokens: int = 128, tokenizer=None) -> list[Generation]:
    """Greedy generations for a batch of question-only items (see module docstring for the modes)."""
    # on a GPU, HF's "is the mask all ones?" would be one more device read per decode step
    with model.autocast(), no_host_sync(enabled=model.special_rows.is_cuda):
        return _generate(model, items, mode=mode, num_latents=num_latents, num_sweeps=num_sweeps,
                         student_mode=student_mode, max_new_tokens=max_new_tokens, max_cot_tokens=max_cot_tokens,
                         tokenizer=tokenizer)


QUESTION_WIDTH_STEP = 16


def question_width(model: LatentReasoner, n: int) -> int:
    """Columns of a batch's question block: its longest question rounded up to a multiple of 16, so that the
    same few shapes recur over an evaluation (on a GPU each new shape costs attention-kernel planning). Pads
    are masked: the same generations. Not under a sliding window, which counts columns (`check_window`)."""
    return n if model.sliding_window is not None else -(-n // QUESTION_WIDTH_STEP) * QUESTION_WIDTH_STEP


def question_batch(model: LatentReasoner, items: list[Tokenized], num_latents: int):
    """The student batch of question-only items that latent evaluation (and the diagnostics) run: the
    question block `question_width` wide, `<bot>`, the slots, `<eot>` · prompt."""
    widths = BlockWidths(q=question_width(model, max(len(it.question) for it in items)), c=0,
                         a=max(1 + len(it.prompt) for it in items), static=False)
    return build_student_batch(items, model.ids, num_latents, with_answer=False, widths=widths)


def latent_pass(model: LatentReasoner, items: list[Tokenized], *, num_latents: int, num_sweeps: int,
                student_mode: str = "jacobi", key_space: str = "cache", keep_sweeps: str = "all",
                round_width: bool = True) -> tuple[StudentBatch, StudentOut]:
    """The question-only student pass of latent mode: `question_batch` (`round_width=False`: the question
    block as wide as the longest question) on the model's device, then the prefix pass and the T sweeps (or M
    sequential latents) on a new cache (`LatentReasoner.student_forward`, no answer pass). Returns (the batch,
    the student's output: latents, their KV per `key_space` / `keep_sweeps`, and the cache that the answer
    block runs on, `answer_from_cache`). Run it under `torch.no_grad()` and `model.autocast()` as the caller
    needs."""
    if round_width:
        sb = question_batch(model, items, num_latents)
    else:
        sb = build_student_batch(items, model.ids, num_latents, with_answer=False)
    sb = sb.to(model.special_rows.device)
    s = model.student_forward(sb, num_sweeps, student_mode=student_mode, key_space=key_space, keep_sweeps=keep_sweeps,
                              with_answer=False)
    return sb, s


def prefill(model: LatentReasoner, rows: list[list[int]]):
    """One pass over token rows of different lengths (right-padded to `question_width`) on a new cache.

    Returns (cache, logits ``[B, V]`` predicting each row's next token, mask ``[B, S]`` of the cache, last
    ``[B]`` each row's last column, so its next token sits at position ``last + 1``)."""
    dev = model.special_rows.device
    S = question_width(model, max(len(r) for r in rows))
    x = pad_rows(rows, S, model.ids.pad).to(dev)
    mask = pad_rows([[1] * len(r) for r in rows], S, 0).to(dev)
    cache = model.new_cache()
    out = model.run(model.embed(x), mask, positions(mask), cache)
    last = torch.tensor([len(r) - 1 for r in rows], device=dev)
    logits = model.logits(out.last_hidden_state[torch.arange(len(rows), device=dev), last])
    return cache, logits, mask, last


def _generate(model, items, *, mode, num_latents, num_sweeps, student_mode, max_new_tokens, max_cot_tokens,
              tokenizer) -> list[Generation]:
    ids = model.ids
    if check_mode(mode) == "latent":
        sb, s = latent_pass(model, items, num_latents=num_latents, num_sweeps=num_sweeps, student_mode=student_mode)
        toks, steps = answer_from_cache(model, sb, s.cache, sb.mask, max_new_tokens)
        base_passes = s.forward_passes
    else:
        rows = [input_ids(it, mode, ids) for it in items]
        cache, logits, mask, last = prefill(model, rows)
        new = budget(mode, max_new_tokens=max_new_tokens, max_cot_tokens=max_cot_tokens,
                     prompt_len=len(items[0].prompt))
        toks, steps = greedy(model, cache, logits, mask, last + 1, new, ids.eos)
        base_passes = 0
    res = []
    for b, t in enumerate(toks):
        content = t[:-1] if t and t[-1] == ids.eos else t
        text = tokenizer.decode(content, skip_special_tokens=True) if tokenizer is not None else ""
        res.append(Generation(text, t, base_passes + int(steps[b]), len(content)))
    return res


def generate_for_config(model: LatentReasoner, tokenizer, cfg, items: list[Tokenized], *, mode: str,
                        max_new_tokens: int | None = None) -> list[Generation]:
    """`generate` with a run's settings: M, T and the student mode of its method (`kava.spec`), and the answer
    and CoT budgets `run.eval_max_new_tokens` (or `max_new_tokens`) and `run.eval_max_cot_tokens`."""
    return generate(model, items, mode=mode, num_latents=cfg.latent.num_latents, num_sweeps=cfg.latent.num_sweeps,
                    student_mode=cfg.spec.student_mode, max_new_tokens=max_new_tokens or cfg.run.eval_max_new_tokens,
                    max_cot_tokens=cfg.run.eval_max_cot_tokens, tokenizer=tokenizer)


def decode_texts(tokenizer, toks: list[list[int]], eos: int) -> list[str]:
    """The text of generated token lists, without their eos and special tokens."""
    return [tokenizer.decode(t[:-1] if t and t[-1] == eos else t, skip_special_tokens=True) for t in toks]
