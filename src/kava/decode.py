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

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kava.data.format import BlockWidths, StudentBatch, Tokenized, build_student_batch, pad_rows, positions
from kava.model.capture import no_host_sync
from kava.model.families import mixture_of_experts, text_config
from kava.model.reasoner import LatentReasoner, StudentOut
from kava.spec import MODES


# ------------------------------------------------------------------------------------------------ layout
def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}; allowed values: {', '.join(MODES)}")
    return mode


def budget(mode: str, *, max_new_tokens: int, max_cot_tokens: int = 0, prompt_len: int = 0,
           position_skip: int = 0) -> int:
    """The most tokens `mode` generates after its input: the answer's `max_new_tokens` (eos included); in cot
    mode also the CoT (`max_cot_tokens`, less the `position_skip` tokens iCoT's keep_position removed: they are
    not written) and the answer prompt (`prompt_len` tokens) it writes before the answer."""
    cot = max(0, max_cot_tokens - position_skip) + prompt_len
    return max_new_tokens + (cot if check_mode(mode) == "cot" else 0)


def input_columns(mode: str, *, num_latents: int = 0, prompt_len: int = 0) -> int:
    """Columns of `mode`'s input after the question: latent `<bot>` · M slots · `<eot>` · prompt, nocot the
    prompt, cot none (it writes the prompt itself)."""
    return {"latent": 2 + num_latents + prompt_len, "cot": 0, "nocot": prompt_len}[check_mode(mode)]


def sequence_length(mode: str, question_len: int, *, num_latents: int, prompt_len: int, max_new_tokens: int,
                    max_cot_tokens: int, position_skip: int = 0) -> int:
    """The most positions `mode` spans for a question of `question_len` tokens: the question, the mode's input
    columns (`input_columns`), the positions it skips (`position_skip`, cot mode) and what it generates
    (`budget`)."""
    return question_len + input_columns(mode, num_latents=num_latents, prompt_len=prompt_len) + position_skip + \
        budget(mode, max_new_tokens=max_new_tokens, max_cot_tokens=max_cot_tokens, prompt_len=prompt_len,
               position_skip=position_skip)


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


class DecodeStep:
    """Greedy decoding of one batch shape on a static KV cache: fixed buffers, one step that reads and writes
    only them, and on a GPU that step captured as a CUDA graph (`DecodeGraphs`).

    Buffers: `cache` S columns per layer ([B, Hkv, S, D]); `mask` [B, S] of the columns that hold keys;
    `tok` [B] the last emitted token, at position `pos` [B] and cache column `col` [1]; `out` [B, n] the tokens
    emitted so far (`out[:, 0]` is the prediction of the prefill). A step runs `tok` at column `col` (one
    forward pass), writes the next token into `out[:, col - S0 + 1]` and advances `tok`, `pos` and `col`. Every
    shape is fixed and nothing is read on the host, so replaying the step is one graph launch; the pad columns
    and the columns not written yet are masked, so the tokens equal the growing cache's (tests).
    """

    def __init__(self, model: LatentReasoner, like, columns: int, new_tokens: int, batch: int | None = None):
        """like: a cache of the batch this step will decode (its layers' head counts, head sizes and dtype); or
        None with `batch`: the layers then take their shapes from the first pass that writes them
        (`LatentStep`)."""
        from transformers.cache_utils import Cache, StaticLayer

        self.model = model
        dev = model.special_rows.device
        layers = len(like.layers) if like is not None else text_config(model.config).num_hidden_layers
        batch = like.layers[0].keys.shape[0] if like is not None else batch
        # every layer keeps every column, as `new_cache` (sliding windows never bind: `check_window`)
        self.cache = Cache(layers=[StaticLayer(max_cache_len=columns) for _ in range(layers)])
        for src, layer in zip(like.layers if like is not None else [], self.cache.layers):
            layer.lazy_initialization(src.keys[:, :, :1], src.values[:, :, :1])  # zeros of S columns
        self.mask = torch.zeros(batch, columns, dtype=torch.long, device=dev)
        self.tok = torch.zeros(batch, dtype=torch.long, device=dev)
        self.pos = torch.zeros(batch, dtype=torch.long, device=dev)
        self.col = torch.zeros(1, dtype=torch.long, device=dev)
        self.start = torch.zeros(1, dtype=torch.long, device=dev)  # S0 - 1: out's column of `tok` is col - start
        self.out = torch.zeros(batch, new_tokens, dtype=torch.long, device=dev)
        self.graph = None

    def load(self, cache, mask: torch.Tensor, first: torch.Tensor, next_pos: torch.Tensor) -> None:
        """Start from `cache` (S0 columns per layer, [B, Hkv, S0, D]) with `mask` [B, S0], the first new token
        `first` [B] and its position `next_pos` [B]."""
        S0 = mask.shape[1]
        for src, dst in zip(cache.layers, self.cache.layers, strict=True):
            dst.keys[:, :, :S0].copy_(src.keys)
            dst.values[:, :, :S0].copy_(src.values)
            dst.cumulative_length.fill_(S0)
        self.mask.zero_()
        self.mask[:, :S0].copy_(mask)
        self.tok.copy_(first)
        self.pos.copy_(next_pos)
        self.col.fill_(S0)
        self.start.fill_(S0 - 1)
        self.out[:, 0].copy_(first)

    def step(self) -> None:
        model = self.model
        self.mask.index_fill_(1, self.col, 1)
        h = model.run(model.embed(self.tok[:, None]), self.mask, self.pos[:, None], self.cache).last_hidden_state
        nxt = model.logits(h[:, -1]).argmax(-1)
        self.out.index_copy_(1, self.col - self.start, nxt[:, None])
        self.tok.copy_(nxt)
        self.pos.add_(1)
        self.col.add_(1)

    def bodies(self) -> list[tuple[str, Callable[[], None]]]:
        """(attribute, function) of each graph `capture` records: here the decode step."""
        return [("graph", self.step)]

    def capture(self, graphs: DecodeGraphs) -> None:
        """Record each of `bodies` as a CUDA graph in `graphs`' pool: one eager run on a side stream first
        (CUDA's warm-up rule), which changes only the buffers (`load` sets them before every use)."""
        if graphs.pool is None:
            graphs.pool = torch.cuda.graph_pool_handle()
        for attr, body in self.bodies():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                body()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # the graph replays autocast's weight casts: none may come from (or go into) its cache
            amp = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),
                                 enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)
            with amp, torch.cuda.graph(graph, pool=graphs.pool):
                body()
            setattr(self, attr, graph)

    def run(self) -> None:
        self.graph.replay() if self.graph is not None else self.step()


class LatentStep(DecodeStep):
    """Latent mode on the static cache: the whole question pass (prefix, T sweeps or M sequential latents:
    `LatentReasoner.student_forward(cache=...)`, the same code as training's) and the answer block `<eot>` ·
    prompt, which emits the first token, as one more step (`latent`, CUDA-graphed beside the decode step by
    `DecodeGraphs.get_latent`); then the decode steps of `DecodeStep`. Its buffers: `sb`, the question-only
    student batch (`question_batch`) whose `mask` is the step's [B, S] mask (the answer block's columns set, the
    rest filled in by the decode steps). The tokens equal the growing cache's (tests)."""

    def __init__(self, model: LatentReasoner, sb: StudentBatch, num_sweeps: int, student_mode: str, new_tokens: int):
        n = sb.ids.shape[1]
        super().__init__(model, None, n + new_tokens - 1, new_tokens, batch=sb.ids.shape[0])
        self.num_sweeps, self.student_mode = num_sweeps, student_mode
        self.sb = dataclasses.replace(sb, ids=sb.ids.clone(), pos=sb.pos.clone(), mask=self.mask)
        self.latent_graph = None

    def load_latent(self, sb: StudentBatch) -> None:
        """Start from the question-only batch `sb` (the shape this step was made for)."""
        n = sb.ids.shape[1]
        self.sb.ids.copy_(sb.ids)
        self.sb.pos.copy_(sb.pos)
        self.mask.zero_()
        self.mask[:, :n].copy_(sb.mask)
        self.col.fill_(n)
        self.start.fill_(n - 1)

    def latent(self) -> None:
        model, sb = self.model, self.sb
        model.student_forward(sb, self.num_sweeps, student_mode=self.student_mode, keep_sweeps="none",
                              with_answer=False, cache=self.cache)
        first = answer_logits(model, sb, self.cache, sb.mask).argmax(-1)
        self.tok.copy_(first)
        self.pos.copy_(sb.pos[:, -1] + 1)
        self.out[:, 0].copy_(first)

    def bodies(self) -> list[tuple[str, Callable[[], None]]]:
        return [("latent_graph", self.latent), *super().bodies()]

    def run_latent(self) -> None:
        self.latent_graph.replay() if self.latent_graph is not None else self.latent()


class DecodeGraphs:
    """The `DecodeStep`s (and latent mode's `LatentStep`s) of one evaluation, captured as CUDA graphs, one per
    batch shape (at most `max_graphs`; the least recently used is dropped), sharing one memory pool (they never
    run at once). Its static caches
    and graphs are freed with it (`kava.evaluate` keeps one per evaluation), or at the end of a `with` block.
    A capture that fails turns graphs off for the rest of it (`off` says why) and the steps run eagerly."""

    def __init__(self, model: LatentReasoner, max_graphs: int = 8, check_every: int = 8):
        self.model, self.max_graphs, self.check_every = model, max_graphs, check_every
        self.steps: dict[tuple, DecodeStep] = {}
        self.pool = None  # made by the first capture
        self.off: str | None = mixture_of_experts(model.config)  # why the steps run eagerly, or None
        self.captured = 0

    def get(self, like, columns: int, new_tokens: int) -> DecodeStep:
        """The step for batches shaped like the cache `like`, `columns` wide, emitting `new_tokens`."""
        key = (columns, new_tokens, *((*l.keys.shape[:2], l.keys.shape[3], l.values.shape[3], l.keys.dtype)
                                      for l in like.layers))  # all but the cache's column count
        return self._step(key, lambda: DecodeStep(self.model, like, columns, new_tokens))

    def get_latent(self, sb: StudentBatch, num_sweeps: int, student_mode: str, new_tokens: int) -> LatentStep:
        """The `LatentStep` for question-only student batches shaped like `sb`, loaded with `sb` (its capture
        runs on this batch's data)."""
        key = ("latent", *sb.ids.shape, sb.q_block, sb.num_latents, num_sweeps, student_mode, new_tokens)

        def make():
            step = LatentStep(self.model, sb, num_sweeps, student_mode, new_tokens)
            step.load_latent(sb)
            return step

        step = self._step(key, make)
        step.load_latent(sb)
        return step

    def _step(self, key: tuple, make: Callable[[], DecodeStep]) -> DecodeStep:
        """The step of `key`, made by `make` and captured the first time (a failed capture turns graphs off and
        the step runs eagerly); the least recently used one dropped beyond `max_graphs`."""
        step = self.steps.pop(key, None)
        if step is None:
            if len(self.steps) >= self.max_graphs:
                self.steps.pop(next(iter(self.steps)))
            step = make()
            if self.off is None and not self.model.training:
                try:
                    step.capture(self)
                    self.captured += 1
                except RuntimeError as e:  # out of memory, or an op that cannot be captured
                    self.off = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    step = make()
        self.steps[key] = step  # most recently used last
        return step

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.steps.clear()
        return False


def greedy(model: LatentReasoner, cache, logits: torch.Tensor, mask: torch.Tensor, next_pos: torch.Tensor,
           max_new: int, eos: int, graphs: DecodeGraphs | None = None) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy decoding from `logits` [B, V] (the prediction of the first new token) on `cache`, through a
    `DecodeStep` (static cache; from `graphs`, CUDA-graphed, when given).

    mask: [B, S0] attention mask of what the cache holds; next_pos: [B] position of the first new token.
    Returns (tokens per example, eos included if emitted; steps [B] = forward calls that emitted a token).
    Decoding stops once every example has emitted eos (looked at every `graphs.check_every` steps: one
    device read each; the tokens after an example's eos are never returned).
    """
    S = mask.shape[1] + max_new - 1  # the cache's columns and one per decode step
    if graphs is not None:
        step, every = graphs.get(cache, S, max_new), graphs.check_every
    else:
        step, every = DecodeStep(model, cache, S, max_new), 1
    step.load(cache, mask, logits.argmax(-1), next_pos)
    return decode_rest(step, max_new, eos, every)


def decode_rest(step: DecodeStep, max_new: int, eos: int, every: int) -> tuple[list[list[int]], torch.Tensor]:
    """The decode steps of `greedy` on a loaded `step` whose `out[:, 0]` holds the first token: (tokens per
    example, eos included if emitted; steps [B]). Looks for eos every `every` steps (one device read each)."""
    emitted = 1
    while emitted < max_new:
        if (emitted - 1) % every == 0 and bool((step.out[:, :emitted] == eos).any(1).all()):
            break
        step.run()
        emitted += 1
    out: list[list[int]] = []
    for row in step.out[:, :emitted].tolist():  # one device read
        out.append(row[:row.index(eos) + 1] if eos in row else row)
    return out, torch.tensor([len(t) for t in out])


def answer_from_cache(model: LatentReasoner, sb, cache, mask: torch.Tensor, max_new: int,
                      graphs: DecodeGraphs | None = None) -> tuple[list[list[int]], torch.Tensor]:
    """Run the answer block `<eot> · prompt` of a question-only student batch on `cache` (which holds the
    question block and the M latent slots), then decode greedily (see `greedy`).

    mask: [B, Qb+M+Ab] attention mask of the whole student sequence (`sb.mask`, or with latent slots
    switched off, as the oracle check does). The answer block is never padded (`<eot>` and the prompt are
    the same ids for every example), so its last column predicts the first answer token.
    """
    logits = answer_logits(model, sb, cache, mask)
    return greedy(model, cache, logits, mask, sb.pos[:, -1] + 1, max_new, model.ids.eos, graphs)


def answer_logits(model: LatentReasoner, sb, cache, mask: torch.Tensor) -> torch.Tensor:
    """The answer block `<eot>` · prompt of a question-only student batch on `cache` (the question block and the
    latents): the logits [B, V] of its last column, which predict the first answer token."""
    A0 = sb.answer_start
    out = model.run(model.embed(sb.ids[:, A0:]), mask, sb.pos[:, A0:], cache)
    return model.logits(out.last_hidden_state[:, -1])


@torch.no_grad()
def generate(model: LatentReasoner, items: list[Tokenized], *, mode: str, num_latents: int = 24,
             num_sweeps: int = 3, student_mode: str = "jacobi", max_new_tokens: int = 16,
             max_cot_tokens: int = 128, tokenizer=None, graphs: DecodeGraphs | None = None,
             position_skip: int = 0) -> list[Generation]:
    """Greedy generations for a batch of question-only items (see module docstring for the modes); `graphs`
    replays the decode steps as CUDA graphs. position_skip (cot mode): the generated tokens start that many
    positions after the question (iCoT with `icot.keep_position`: the positions of the removed CoT tokens), and
    the CoT budget shrinks by as many tokens, so that a generation spans the positions it would without them."""
    if position_skip and check_mode(mode) != "cot":
        raise ValueError(f"position_skip is for cot mode (iCoT's keep_position); got mode {mode!r}")
    # on a GPU, HF's "is the mask all ones?" would be one more device read per decode step
    with model.autocast(), no_host_sync(enabled=model.special_rows.is_cuda):
        return _generate(model, items, mode=mode, num_latents=num_latents, num_sweeps=num_sweeps,
                         student_mode=student_mode, max_new_tokens=max_new_tokens, max_cot_tokens=max_cot_tokens,
                         tokenizer=tokenizer, graphs=graphs, position_skip=position_skip)


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
              tokenizer, graphs, position_skip) -> list[Generation]:
    ids = model.ids
    if check_mode(mode) == "latent" and graphs is not None and graphs.off is None:
        # the whole latent pass on the static cache (`LatentStep`): on a GPU one graph before the decode steps
        sb = question_batch(model, items, num_latents).to(model.special_rows.device)
        step = graphs.get_latent(sb, num_sweeps, student_mode, max_new_tokens)
        step.run_latent()
        toks, steps = decode_rest(step, max_new_tokens, ids.eos, graphs.check_every)
        base_passes = passes("latent", student_mode=student_mode, num_latents=num_latents, num_sweeps=num_sweeps)
    elif check_mode(mode) == "latent":
        sb, s = latent_pass(model, items, num_latents=num_latents, num_sweeps=num_sweeps, student_mode=student_mode)
        toks, steps = answer_from_cache(model, sb, s.cache, sb.mask, max_new_tokens, graphs)
        base_passes = s.forward_passes
    else:
        rows = [input_ids(it, mode, ids) for it in items]
        cache, logits, mask, last = prefill(model, rows)
        new = budget(mode, max_new_tokens=max_new_tokens, max_cot_tokens=max_cot_tokens,
                     prompt_len=len(items[0].prompt), position_skip=position_skip)
        toks, steps = greedy(model, cache, logits, mask, last + 1 + position_skip, new, ids.eos, graphs)
        base_passes = 0
    res = []
    for b, t in enumerate(toks):
        content = t[:-1] if t and t[-1] == ids.eos else t
        text = tokenizer.decode(content, skip_special_tokens=True) if tokenizer is not None else ""
        res.append(Generation(text, t, base_passes + int(steps[b]), len(content)))
    return res


def generate_for_config(model: LatentReasoner, tokenizer, cfg, items: list[Tokenized], *, mode: str,
                        max_new_tokens: int | None = None, graphs: DecodeGraphs | None = None,
                        position_skip: int = 0) -> list[Generation]:
    """`generate` with a run's settings: M, T and the student mode of its method (`kava.spec`), and the answer
    and CoT budgets `run.eval_max_new_tokens` (or `max_new_tokens`) and `run.eval_max_cot_tokens`."""
    return generate(model, items, mode=mode, num_latents=cfg.latent.num_latents, num_sweeps=cfg.latent.num_sweeps,
                    student_mode=cfg.spec.student_mode, max_new_tokens=max_new_tokens or cfg.run.eval_max_new_tokens,
                    max_cot_tokens=cfg.run.eval_max_cot_tokens, tokenizer=tokenizer, graphs=graphs,
                    position_skip=position_skip)


def decode_texts(tokenizer, toks: list[list[int]], eos: int) -> list[str]:
    """The text of generated token lists, without their eos and special tokens."""
    return [tokenizer.decode(t[:-1] if t and t[-1] == eos else t, skip_special_tokens=True) for t in toks]
