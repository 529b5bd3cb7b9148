"""Records -> token ids -> padded teacher / student batches, with every index later steps need.

This module is the one place that builds tensor indices (CoT span, answer-prompt position, latent slots,
answer query rows); the model, eviction and losses read them from the batch.

Sequences (SPEC §1):
    teacher: [bos] question · CoT · answer prompt · answer · eos        (labels on CoT, prompt, answer, eos)
    student: [bos] question · <bot> · z_1..z_M · <eot> · answer prompt · answer · eos   (labels on answer, eos)
    nocot:   [bos] question · answer prompt · answer · eos              (labels on answer, eos)

Each segment is tokenised on its own and concatenated, so the answer prompt and the answer are the same
token ids in every mode. Padding is on the right of each *block*: the student's question is padded to a
common width Wq and followed by `<bot>` in column Wq, so `<bot>` and the M latent slots sit in the same
columns for every example, and the answer block follows. The teacher of a latent method is laid out in
blocks [question | CoT | prompt · answer] (`BlockWidths`) with the same question block as the student, so
that both can share one pass over it (`kava.objective.loss_step`); otherwise it is right-padded as a whole.
For CUDA graphs the block widths come from a geometric series, so that few shapes occur. Pads inside a
sequence are masked out and position ids count real tokens only (`position = cumsum(mask) - 1`), so padding
never changes a result. No sequence starts with padding, so no attention row is ever fully masked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kava.data.records import Record, SkipLog

IGNORE = -100
UNLIMITED = 10**9  # a length limit that never binds (evaluation, inspection, the Python API)
SPECIAL_TOKENS = ("<bot>", "<eot>", "<latent>")
QUERY_MODES = ("answer", "cot_tail")  # `eviction.importance_queries`: the rows whose attention scores the CoT keys
CODI_POSITIONS = ("answer", "prompt")  # `loss.codi_position` (`codi_columns`)


@dataclass(frozen=True)
class SpecialIds:
    bot: int
    eot: int
    latent: int
    pad: int
    eos: int
    bos: int | None


def add_special_tokens(tokenizer) -> SpecialIds:
    """Add `<bot>`, `<eot>`, `<latent>` to the tokenizer (idempotent) and return the ids we use."""
    missing = [t for t in SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": list(missing)}, replace_extra_special_tokens=False)
    return special_ids(tokenizer)


def special_ids(tokenizer) -> SpecialIds:
    """The ids of the special tokens; an error that says the fix if the tokenizer lacks them."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise ValueError(f"tokenizer lacks the special tokens {missing}; it was not saved by kava "
                         "(call kava.data.format.add_special_tokens on it first)")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos token: kava needs one to end answers (set tokenizer.eos_token)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos  # pads are masked anyway
    return SpecialIds(vocab["<bot>"], vocab["<eot>"], vocab["<latent>"], pad, eos, tokenizer.bos_token_id)


@dataclass
class Tokenized:
    """One record as token-id segments."""

    question: list[int]  # includes bos if the model uses one
    cot: list[int]
    prompt: list[int]
    answer: list[int]  # includes eos
    index: int  # position in the record list
    # Answer tokens before the first non-whitespace one: BPE tokenizers that split " 18" into
    # ' ', '1', '8' (LLaMA-3, Qwen2.5, SmolLM2, the synthetic tokenizer) give 1; GPT-2 ('Ġ18') gives 0.
    answer_lead: int = 0
    # End (exclusive, in `cot` tokens) of each CoT step: `cot[:step_ends[j]]` is the first j + 1 steps. Coconut
    # (`kava.curriculum`) replaces whole steps; () when the steps are unknown (then the CoT is one step).
    step_ends: tuple[int, ...] = ()
    # Position ids skipped between the question and the CoT's first token: iCoT with `icot.keep_position` (the
    # removed tokens' positions stay empty, so what is left keeps its original positions). 0 otherwise.
    pos_skip: int = 0


class Formatter:
    """Tokenises records into segments, enforcing the length limits (counted skips)."""

    def __init__(self, tokenizer, *, answer_prompt: str = "The answer is:", drop_last_step: bool = True,
                 max_question_tokens: int = 256, max_cot_tokens: int = 256, max_answer_tokens: int = 16,
                 with_steps: bool = False, compact_digits: bool = False, question_suffix: str = ""):
        """with_steps: also find where each CoT step ends (`Tokenized.step_ends`, for Coconut; one more
        tokenisation per step). question_suffix: text written after every question, before the CoT (or the
        latents, or the answer prompt), e.g. the separator of iCoT's official layout."""
        self.tok = tokenizer
        self.question_suffix = question_suffix.strip()
        self.with_steps = with_steps
        self.compact_digits = compact_digits
        self.ids = special_ids(tokenizer)
        self.drop_last_step = drop_last_step
        self.max_q, self.max_c, self.max_a = max_question_tokens, max_cot_tokens, max_answer_tokens
        self._blank_ids: dict[int, bool] = {}
        self.prompt_ids = self._enc(" " + answer_prompt.strip())
        if not self.prompt_ids:
            raise ValueError("data.answer_prompt tokenises to nothing")

    @classmethod
    def from_config(cls, cfg, tokenizer, *, limits: bool = True, drop_last_step: bool | None = None) -> "Formatter":
        """The formatter a run's config describes: `data.answer_prompt`, `data.drop_last_step` (unless
        `drop_last_step` is given) and, with `limits` (training), the `data.max_*_tokens` limits; without them
        (evaluation, inspection, the Python API) nothing is too long."""
        d = cfg.data
        lim = (d.max_question_tokens, d.max_cot_tokens, d.max_answer_tokens) if limits else (UNLIMITED,) * 3
        return cls(tokenizer, answer_prompt=d.answer_prompt,
                   drop_last_step=d.drop_last_step if drop_last_step is None else drop_last_step,
                   max_question_tokens=lim[0], max_cot_tokens=lim[1], max_answer_tokens=lim[2],
                   with_steps=limits and cfg.spec.student_cot,  # training only: Coconut's step boundaries
                   compact_digits=d.mult_compact, question_suffix=d.question_suffix)

    def _enc(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"] if text else []

    def cot_steps(self, steps) -> list[str]:
        """The CoT steps that are trained on (the last one dropped with `drop_last_step`), stripped."""
        steps = list(steps)
        if self.drop_last_step and steps:
            steps = steps[:-1]  # the last step usually restates the answer (SPEC §1)
        return [s.strip() for s in steps if s.strip()]

    def cot_text(self, steps) -> str:
        return " ".join(self.cot_steps(steps))

    def step_ends(self, steps: list[str], cot: list[int]) -> tuple[int, ...]:
        """Where each step ends in the CoT's tokens (`Tokenized.step_ends`). The CoT is tokenised as one text, so
        a step ends where the tokens of the text up to it are a prefix of the whole; a tokenizer that merges
        across a step boundary (not seen with byte-level BPE, where each step starts with a space) gets the
        longest common prefix there, so the ends stay increasing and the last is len(cot)."""
        ends, prev = [], 0
        for j in range(1, len(steps)):
            ids = self._enc(" " + " ".join(steps[:j]))
            n = 0
            while n < min(len(ids), len(cot)) and ids[n] == cot[n]:
                n += 1
            prev = max(prev, n)
            ends.append(prev)
        return tuple(ends + [len(cot)]) if steps else ()

    def question_ids(self, question: str, ids: list[int] | None = None) -> list[int]:
        """BOS (if the model has one) and the question's tokens (`ids`: already tokenised)."""
        bos = [self.ids.bos] if self.ids.bos is not None else []
        return bos + (self._enc(question.strip()) if ids is None else ids)

    def texts(self, rec: Record) -> tuple[str, list[str], str]:
        """(question, CoT steps, answer) as they are tokenised: the steps trained on (`cot_steps`), and with
        `compact_digits` a digit-string record (multiplication) written without spaces (``5632*7434``), so that a
        tokenizer that splits digits but keeps spaces apart (SmolLM2, Qwen2.5) spends one token per digit."""
        q, steps, a = rec.question.strip(), self.cot_steps(rec.steps), rec.answer.strip()
        if self.compact_digits and rec.answer_kind == "digits":
            q, a, steps = q.replace(" ", ""), a.replace(" ", ""), [st.replace(" ", "") for st in steps]
        if self.question_suffix:
            q = f"{q} {self.question_suffix}"
        return q, steps, a

    def tokenize(self, rec: Record, index: int = 0, skips: SkipLog | None = None, *,
                 need_answer: bool = True) -> Tokenized | None:
        """Segments of one record, or None (and a counted skip) when a limit is exceeded."""
        q, steps, ans = self.texts(rec)
        cot_text = " ".join(steps)
        c = self._enc(" " + cot_text) if cot_text else []
        a = (self._enc(" " + ans) + [self.ids.eos]) if need_answer else []
        return self._segments(rec, index, skips, self.question_ids(q), c, a, steps)

    def _segments(self, rec: Record, index: int, skips: SkipLog | None, q: list[int], c: list[int], a: list[int],
                  steps: list[str]) -> Tokenized | None:
        """The length limits on tokenised segments, then the `Tokenized`."""
        where = rec.source or f"record {index}"
        reason = None
        if len(q) > self.max_q:
            reason = "question too long"
        elif len(c) > self.max_c:
            reason = "CoT too long"
        elif len(a) > self.max_a + 1:
            reason = "answer too long"
        if reason:
            if skips is None:
                raise ValueError(f"{where}: {reason}")
            skips.skip(reason, where)
            return None
        return Tokenized(q, c, list(self.prompt_ids), a, index, self.answer_lead(a),
                         self.step_ends(steps, c) if self.with_steps else ())

    def answer_lead(self, answer: list[int]) -> int:
        """How many leading answer tokens decode to whitespace only (the eos is never counted)."""
        n = 0
        while n < len(answer) - 1 and self._blank(answer[n]):
            n += 1
        return n

    def _blank(self, token: int) -> bool:
        if token not in self._blank_ids:  # one decode per token id, not per record
            self._blank_ids[token] = not self.tok.decode([token]).strip()
        return self._blank_ids[token]

    def tokenize_all(self, records: list[Record], skips: SkipLog, *, need_answer: bool = True,
                     chunk: int = 4096) -> list[Tokenized]:
        """`tokenize` of every record (the skipped ones left out and counted), with the question, CoT and answer
        texts of `chunk` records tokenised in one batched call each: the same ids as one record at a time
        (tests/test_format.py), several times faster on large training sets."""
        out = []
        for start in range(0, len(records), chunk):
            recs = records[start:start + chunk]
            texts = [self.texts(r) for r in recs]
            steps = [st for _, st, _ in texts]
            qs = self._enc_batch([q for q, _, _ in texts])
            cs = self._enc_batch([" " + " ".join(st) if st else "" for st in steps])
            ans = self._enc_batch([" " + a for _, _, a in texts]) if need_answer else None
            for k, r in enumerate(recs):
                t = self._segments(r, start + k, skips, self.question_ids(texts[k][0], qs[k]), cs[k],
                                   ans[k] + [self.ids.eos] if need_answer else [], steps[k])
                if t is not None:
                    out.append(t)
        return out

    def _enc_batch(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        core = getattr(self.tok, "_tokenizer", None)  # a fast tokenizer's Rust core: ids, no Python-side encodings
        if core is not None and not self.tok.init_kwargs.get("add_prefix_space") and core.truncation is None:
            ids = [e.ids for e in core.encode_batch(texts, add_special_tokens=False)]
        else:
            ids = self.tok(texts, add_special_tokens=False)["input_ids"]
        return [i if t else [] for i, t in zip(ids, texts)]


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only: [B, S] -> [B, S]."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def pad_rows(rows: list[list[int]], width: int, value: int) -> torch.Tensor:
    """Right-pad each row to `width` with `value`: ``[B, width]`` long."""
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


@dataclass(frozen=True)
class BlockWidths:
    """Block widths shared by a teacher and a student batch:
    q: the question block (the question alone; the student's `<bot>` follows in column q);
    c: the teacher's CoT block (0 without CoT); a: the answer block (<eot> · prompt · answer for the student;
    the teacher's prompt · answer fits it).
    static: the label and query-row capacities follow from the widths, so a batch's shape is fixed by these
    three numbers (CUDA graphs, `kava.training.graphs`); False: as many as the batch has.
    t_labels, s_labels: with `static`, the teacher's and the student's label capacities (`label_idx`: the rows
    the LM head and the CE run on), when bucketed on their own (`optim.graph_label_buckets`); 0: the block
    area, B·(c + a) and B·a, which counts every pad of a short CoT or answer as a row."""

    q: int
    c: int
    a: int
    static: bool = True
    t_labels: int = 0
    s_labels: int = 0


def bucket_width(n: int, growth: float, start: int = 8) -> int:
    """The smallest width >= n of the series start, roundup8(start·growth), ... (geometric, multiples of 8):
    maxima over a micro-batch fall into a handful of such widths, so few graphs cover a whole epoch."""
    w = start
    while w < n:
        w = max(w + 8, -(-int(w * growth) // 8) * 8)
    return w


def label_totals(items: list[Tokenized], *, with_cot: bool = True, cot_in_answer: bool = False) -> tuple[int, int]:
    """Labelled tokens of the teacher batch (`build_teacher_batch(with_cot=...)`: CoT, prompt and answer, or the
    answer alone) and of the student batch (answer, plus CoT and prompt with `cot_in_answer`) over `items`."""
    t = sum(len(it.cot) + len(it.prompt) + len(it.answer) if with_cot else len(it.answer) for it in items)
    s = sum((len(it.cot) + len(it.prompt)) * cot_in_answer + len(it.answer) for it in items)
    return t, s


def block_widths(items: list[Tokenized], growth: float | None = None, *, with_cot: bool = True,
                 cot_in_answer: bool = False, label_growth: float | None = None) -> BlockWidths:
    """The block widths of `items` (see `BlockWidths`): the longest of each block, or with `growth` (CUDA
    graphs) bucketed up the geometric series of `bucket_width`, and static. cot_in_answer: the student's
    answer block also holds the CoT (Coconut's remaining steps, `build_student_batch(with_cot=True)`).
    label_growth (with `growth`): the label capacities are the labelled totals bucketed up the series of this
    growth, not the block areas (fewer LM-head rows; two more numbers in the batch's shape)."""
    q = max(len(it.question) for it in items)
    c = max(len(it.cot) for it in items) if with_cot else 0
    a = max(1 + len(it.cot) * cot_in_answer + len(it.prompt) + len(it.answer) for it in items)
    if growth is None:
        return BlockWidths(q, c, a, static=False)
    t_lab, s_lab = (bucket_width(max(n, 1), label_growth) for n in label_totals(items, with_cot=with_cot,
                                                                                cot_in_answer=cot_in_answer)) \
        if label_growth is not None else (0, 0)
    return BlockWidths(bucket_width(q, growth), bucket_width(c, growth) if with_cot else 0, bucket_width(a, growth),
                       t_labels=t_lab, s_labels=s_lab)


def _labels(targets: torch.Tensor, capacity: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat positions of targets [B, S] that are not IGNORE, and those targets: ([N], [N]); with `capacity`,
    N is padded up to it with target IGNORE (a CE term skips them) at distinct unlabelled positions, in order
    (position 0 once they run out): the backward of an index accumulates repeated positions one after the
    other, and thousands of pads on one position cost milliseconds a step on a GPU."""
    flat = targets.reshape(-1)
    labelled = flat != IGNORE
    idx = labelled.nonzero().squeeze(1)  # host tensors: the batch is built on the CPU
    n = max(1, idx.numel()) if capacity is None else capacity
    if idx.numel() > n:
        raise ValueError(f"{idx.numel()} labelled positions exceed the static capacity {n}")
    pad = n - idx.numel()
    free = (~labelled).nonzero().squeeze(1)[:pad]
    tgt = torch.cat([flat[idx], torch.full((pad,), IGNORE, dtype=torch.long)])
    idx = torch.cat([idx, free, torch.zeros(pad - free.numel(), dtype=torch.long)])
    return idx, tgt


def _map_tensors(batch, fn):
    """A batch of the same type with `fn` applied to each tensor field (the others as they are)."""
    return type(batch)(**{k: (fn(v) if torch.is_tensor(v) else v) for k, v in batch.__dict__.items()})


@dataclass
class TeacherBatch:
    """Teacher (or No-CoT) batch. B examples, S columns, C = longest CoT, A = most answer query rows.

    ids, mask, pos, targets: [B, S]; targets[b, i] is the token position i must predict, or IGNORE.
    cot_idx: [B, C] column of each CoT token (clamped for padding); cot_valid: [B, C].
    prompt_last: [B] column of the last answer-prompt token (its hidden state predicts the first answer token).
    codi_col: [B] column whose hidden states L_CODI compares (see `codi_columns`).
    query_idx, query_valid: [B, A] columns whose attention over the CoT keys defines importance.
    answer_start: [B] column of the first answer token.
    label_idx, label_tgt: [N] flat (row-major over [B, S]) positions that have a target, and the targets;
        built on the host so that selecting them never needs a device sync (CUDA graphs, `kava.training.graphs`).
        Static-shape batches pad them with position 0 and target IGNORE.
    q_block: in the block layout, the question block's width Wq (the question is in columns [0, Wq), the
        same as the student's); None when right-padded as a whole.
    """

    ids: torch.Tensor
    mask: torch.Tensor
    pos: torch.Tensor
    targets: torch.Tensor
    cot_idx: torch.Tensor
    cot_valid: torch.Tensor
    prompt_last: torch.Tensor
    codi_col: torch.Tensor
    query_idx: torch.Tensor
    query_valid: torch.Tensor
    answer_start: torch.Tensor
    label_idx: torch.Tensor
    label_tgt: torch.Tensor
    q_block: int | None = None

    def to(self, device) -> "TeacherBatch":
        return _map_tensors(self, lambda v: v.to(device, non_blocking=True))

    def pin(self) -> "TeacherBatch":
        """The same batch in page-locked host memory (its `to(cuda)` copies then run asynchronously)."""
        return _map_tensors(self, torch.Tensor.pin_memory)


@dataclass
class StudentBatch:
    """Latent student batch. Columns: question block [0, Qb) (the question right-padded to Wq = Qb - 1,
    then <bot> in column Qb - 1), latent slots [Qb, Qb+M), answer block [Qb+M, S) (<eot> · prompt · answer
    · eos, right-padded).

    ids, mask, pos, targets: [B, S] (latent columns hold the `<latent>` placeholder id).
    prompt_last: [B] column of the last answer-prompt token. q_block = Qb, num_latents = M (ints).
    codi_col: [B] column whose hidden states L_CODI compares (see `codi_columns`).
    label_idx, label_tgt: [N] flat positions (row-major over the answer block [B, S - Qb - M]) that have a
        target, and the targets (see `TeacherBatch`).
    """

    ids: torch.Tensor
    mask: torch.Tensor
    pos: torch.Tensor
    targets: torch.Tensor
    prompt_last: torch.Tensor
    codi_col: torch.Tensor
    q_block: int
    num_latents: int
    label_idx: torch.Tensor
    label_tgt: torch.Tensor

    @property
    def answer_start(self) -> int:
        return self.q_block + self.num_latents

    def to(self, device) -> "StudentBatch":
        return _map_tensors(self, lambda v: v.to(device, non_blocking=True))

    def pin(self) -> "StudentBatch":
        """The same batch in page-locked host memory (its `to(cuda)` copies then run asynchronously)."""
        return _map_tensors(self, torch.Tensor.pin_memory)


def codi_columns(items: list[Tokenized], prompt_last: list[int], codi_position: str) -> torch.Tensor:
    """The column whose hidden states L_CODI compares, per example: [B].

    "answer": the position that predicts the first non-whitespace answer token, i.e. the last prompt
    token plus the whitespace-only answer tokens before the digits (`Tokenized.answer_lead`). Comparing
    at the position that predicts a constant ' ' distils nothing about the answer.
    "prompt": the last answer-prompt token, whatever it predicts.
    """
    if codi_position not in CODI_POSITIONS:
        raise ValueError(f"loss.codi_position: {codi_position!r}; allowed values: {', '.join(CODI_POSITIONS)}")
    lead = [it.answer_lead if codi_position == "answer" else 0 for it in items]
    return torch.tensor([p + n for p, n in zip(prompt_last, lead)])


def build_teacher_batch(items: list[Tokenized], ids: SpecialIds, *, with_cot: bool = True,
                        query_mode: str = "answer", tail_window: int = 8,
                        codi_position: str = "answer", widths: BlockWidths | None = None) -> TeacherBatch:
    """Teacher batch (`with_cot=False` gives the No-CoT sequence).

    Default layout: each sequence right-padded to the longest. With `widths`: blocks [question | CoT |
    prompt · answer] of these widths, each right-padded (the question block is the student's, see
    `TeacherBatch.q_block`); static widths also fix the label / query-row capacities, so that the batch's
    shape depends on `widths` only. Pads inside a sequence are masked and skipped by the positions: both
    layouts give the same losses. An item's `pos_skip` is added to the positions from its first CoT token on.
    """
    seqs, first_lab, cot_k, p_last, q_k, a_start, col_of = [], [], [], [], [], [], []
    skips = []  # (row, its columns after the question, Tokenized.pos_skip) of each item that skips positions
    for it in items:  # k: index in the sequence of real tokens; col_of[k]: its column
        cot = it.cot if with_cot else []
        seq = it.question + cot + it.prompt + it.answer
        n_q, n_c, n_p, n_a = len(it.question), len(cot), len(it.prompt), len(it.answer)
        # the labelled tokens run from here to the end: CoT, prompt and answer; without CoT the answer alone
        first_lab.append(n_q if with_cot else n_q + n_p)
        cols = range(len(seq)) if widths is None else \
            list(range(n_q)) + [widths.q + j for j in range(n_c)] + [widths.q + widths.c + j for j in range(n_p + n_a)]
        seqs.append(seq)
        col_of.append(cols)
        if it.pos_skip:
            skips.append((len(seqs) - 1, cols[n_q:], it.pos_skip))
        cot_k.append(range(n_q, n_q + n_c))
        p_last.append(cols[n_q + n_c + n_p - 1])
        a_start.append(cols[n_q + n_c + n_p])
        if query_mode == "answer":  # answer prompt + answer tokens (not eos)
            q_k.append(range(n_q + n_c, n_q + n_c + n_p + n_a - 1))
        elif query_mode == "cot_tail":  # the last α CoT positions, as R-KV does at decode time
            q_k.append(range(max(n_q, n_q + n_c - tail_window), n_q + n_c))
        else:
            raise ValueError(f"eviction.importance_queries: {query_mode!r}; allowed values: {', '.join(QUERY_MODES)}")
    B = len(items)
    S = max(len(s) for s in seqs) if widths is None else widths.q + widths.c + widths.a
    if widths is None or not widths.static:
        C = max(1, max(len(c) for c in cot_k))
        A = max(1, max(len(q) for q in q_k))
        capacity = None
    else:
        C = max(1, widths.c)
        A = widths.a if query_mode == "answer" else tail_window
        capacity = widths.t_labels or B * ((widths.c if with_cot else 0) + widths.a)
    if widths is not None:
        for it in items:  # the student's answer block holds <eot> too
            if len(it.question) > widths.q or len(it.prompt) + len(it.answer) >= widths.a or \
                    (with_cot and len(it.cot) > widths.c):
                raise ValueError(f"record {it.index} does not fit the block widths {widths}")
    # built in numpy and handed over once: a torch op per row costs microseconds that add up to ms per step
    t_ids = np.full((B, S), ids.pad, dtype=np.int64)
    mask = np.zeros((B, S), dtype=np.int64)
    targets = np.full((B, S), IGNORE, dtype=np.int64)
    rows, tcols, tvals = [], [], []
    for b, (s, f, cols) in enumerate(zip(seqs, first_lab, col_of)):
        t_ids[b, cols] = s
        mask[b, cols] = 1
        k0 = max(f - 1, 0)  # the column of each real token predicts the next one: from the one before the first label
        rows += [b] * (len(s) - 1 - k0)
        tcols += cols[k0:len(s) - 1]
        tvals += s[k0 + 1:]
    targets[rows, tcols] = tvals
    t_ids, mask, targets = torch.from_numpy(t_ids), torch.from_numpy(mask), torch.from_numpy(targets)
    cot_cols = [[cols[k] for k in ks] for cols, ks in zip(col_of, cot_k)]
    q_cols = [[cols[k] for k in ks] for cols, ks in zip(col_of, q_k)]
    cot_valid = pad_rows([[1] * len(c) for c in cot_cols], C, 0).bool()
    cot_idx = pad_rows(cot_cols, C, 0)
    query_valid = pad_rows([[1] * len(q) for q in q_cols], A, 0).bool()
    query_idx = pad_rows(q_cols, A, 0)
    label_idx, label_tgt = _labels(targets, capacity)
    pos = positions(mask)
    for b, cols, skip in skips:
        pos[b, list(cols)] += skip
    return TeacherBatch(t_ids, mask, pos, targets, cot_idx, cot_valid, torch.tensor(p_last),
                        codi_columns(items, p_last, codi_position), query_idx, query_valid, torch.tensor(a_start),
                        label_idx, label_tgt, None if widths is None else widths.q)


def build_student_batch(items: list[Tokenized], ids: SpecialIds, num_latents: int, *,
                        with_answer: bool = True, codi_position: str = "answer",
                        widths: BlockWidths | None = None, latent_counts: list[int] | None = None,
                        with_cot: bool = False) -> StudentBatch:
    """Student batch with <bot> and M latent placeholder slots in common columns (see `StudentBatch`).

    `with_answer=False` builds only `question · <bot> · slots · <eot> · prompt` for inference.
    widths: the block widths Wq = widths.q, Ab = widths.a, and with static widths the label capacity B·Ab, or
    `widths.s_labels` (see `build_teacher_batch`); default: the longest question and answer block.
    latent_counts: how many of the M slots each example uses (Coconut's curriculum; default all M). Its other
    slots are masked out, and the position ids count real columns only, so its answer block follows its own
    latents exactly as in a sequence without the unused slots.
    with_cot: the answer block is <eot> · CoT · prompt · answer, with the CoT labelled as well (Coconut: the
    steps that thoughts have not replaced yet).
    """
    B, M = len(items), num_latents
    counts = [M] * B if latent_counts is None else list(latent_counts)
    if len(counts) != B or any(not 0 <= c <= M for c in counts):
        raise ValueError(f"latent_counts: {B} counts in [0, {M}] needed, got {counts}")
    q_rows = [it.question for it in items]
    a_rows = [[ids.eot] + (it.cot if with_cot else []) + it.prompt + (it.answer if with_answer else [])
              for it in items]
    Wq = max(len(q) for q in q_rows) if widths is None else widths.q
    Ab = max(len(a) for a in a_rows) if widths is None else widths.a
    if max(len(q) for q in q_rows) > Wq or max(len(a) for a in a_rows) > Ab:
        raise ValueError(f"a record does not fit the block widths {widths}")
    Qb = Wq + 1
    q_ids = pad_rows(q_rows, Wq, ids.pad)
    q_mask = pad_rows([[1] * len(q) for q in q_rows], Wq, 0)
    a_ids = pad_rows(a_rows, Ab, ids.pad)
    a_mask = pad_rows([[1] * len(a) for a in a_rows], Ab, 0)
    s_ids = torch.cat([q_ids, torch.full((B, 1), ids.bot, dtype=torch.long),
                       torch.full((B, M), ids.latent, dtype=torch.long), a_ids], 1)
    lat_mask = pad_rows([[1] * c for c in counts], M, 0)
    mask = torch.cat([q_mask, torch.ones(B, 1, dtype=torch.long), lat_mask, a_mask], 1)
    targets = torch.full_like(s_ids, IGNORE)
    p_last, rows, tcols, tvals = [], [], [], []  # the labels, written in one indexed assignment
    for b, it in enumerate(items):
        cot = it.cot if with_cot else []
        # column Qb + M (<eot>) predicts the first CoT token; the prompt is labelled like the teacher's when the
        # CoT is (Coconut), whether steps remain or not; column start - 1 predicts the first answer token
        labelled = cot + (it.prompt if with_cot else [])
        start = Qb + M + 1 + len(cot) + len(it.prompt)  # first answer column
        rows += [b] * len(labelled)
        tcols += range(Qb + M, Qb + M + len(labelled))
        tvals += labelled
        p_last.append(start - 1)
        if with_answer:
            rows += [b] * len(it.answer)
            tcols += range(start - 1, start - 1 + len(it.answer))
            tvals += it.answer
    targets[torch.tensor(rows, dtype=torch.long), torch.tensor(tcols, dtype=torch.long)] = \
        torch.tensor(tvals, dtype=torch.long)
    capacity = (widths.s_labels or B * Ab) if widths is not None and widths.static else None
    label_idx, label_tgt = _labels(targets[:, Qb + M:], capacity)
    return StudentBatch(s_ids, mask, positions(mask), targets, torch.tensor(p_last),
                        codi_columns(items, p_last, codi_position), Qb, M, label_idx, label_tgt)
