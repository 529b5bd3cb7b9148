"""Batched greedy inference on the KV cache, forward-pass accounting, and scored evaluation.

Modes:
    latent: prefix pass (question · <bot> · placeholders), T sweeps (or M sequential passes for CODI),
            then <eot> · answer prompt and greedy answer decoding.        passes = 1 + T + decode steps
    cot:    question prefill, then greedy CoT · answer prompt · answer.   passes = 1 + generated tokens
    nocot:  question · answer prompt prefill, then greedy answer.         passes = decode steps

A *decode step* is one forward call that emits a token (the eos included); `generated_tokens` excludes
the eos. Counts are per example: an example stops counting once it has emitted eos.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kava.data.format import BlockWidths, Formatter, Tokenized, _pad, _positions, build_student_batch
from kava.model.capture import no_host_sync
from kava.model.families import check_window
from kava.data.records import Record
from kava.methods import student_mode
from kava.model.reasoner import LatentReasoner

MODES = ("latent", "cot", "nocot")


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    forward_passes: int
    generated_tokens: int


def _greedy(model: LatentReasoner, cache, logits: torch.Tensor, mask: torch.Tensor, next_pos: torch.Tensor,
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
        h = model._run(model.embed(tok[:, None]), mask, (next_pos + step)[:, None], cache).last_hidden_state
        logits = model.logits(h[:, -1])
    return out, torch.tensor(steps)


def answer_from_cache(model: LatentReasoner, sb, cache, mask: torch.Tensor,
                      max_new: int) -> tuple[list[list[int]], torch.Tensor]:
    """Run the answer block `<eot> · prompt` of a question-only student batch on `cache` (which holds the
    question block and the M latent slots), then decode greedily (see `_greedy`).

    mask: [B, Qb+M+Ab] attention mask of the whole student sequence (`sb.mask`, or with latent slots
    switched off, as the oracle check does). The answer block is never padded (`<eot>` and the prompt are
    the same ids for every example), so its last column predicts the first answer token.
    """
    A0 = sb.answer_start
    out = model._run(model.embed(sb.ids[:, A0:]), mask, sb.pos[:, A0:], cache)
    logits = model.logits(out.last_hidden_state[:, -1])
    return _greedy(model, cache, logits, mask, sb.pos[:, -1] + 1, max_new, model.ids.eos)


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


def _generate(model, items, *, mode, num_latents, num_sweeps, student_mode, max_new_tokens, max_cot_tokens,
              tokenizer) -> list[Generation]:
    ids = model.ids
    dev = model.special_rows.device
    if mode == "latent":
        sb = question_batch(model, items, num_latents).to(dev)
        s = model.student_forward(sb, num_sweeps, mode=student_mode, with_answer=False)
        toks, steps = answer_from_cache(model, sb, s.cache, sb.mask, max_new_tokens)
        base_passes = s.forward_passes
    elif mode in ("cot", "nocot"):
        rows = [it.question + (it.prompt if mode == "nocot" else []) for it in items]
        S = question_width(model, max(len(r) for r in rows))
        x = _pad(rows, S, ids.pad).to(dev)
        mask = _pad([[1] * len(r) for r in rows], S, 0).to(dev)
        pos = _positions(mask)
        cache = model.new_cache()
        out = model._run(model.embed(x), mask, pos, cache)
        last = torch.tensor([len(r) - 1 for r in rows], device=dev)
        logits = model.logits(out.last_hidden_state[torch.arange(len(rows), device=dev), last])
        budget = max_new_tokens + (max_cot_tokens + len(items[0].prompt) if mode == "cot" else 0)
        toks, steps = _greedy(model, cache, logits, mask, last + 1, budget, ids.eos)
        base_passes = 0
    else:
        raise ValueError(f"mode {mode!r}; allowed values: {', '.join(MODES)}")
    res = []
    for b, t in enumerate(toks):
        content = t[:-1] if t and t[-1] == ids.eos else t
        text = tokenizer.decode(content, skip_special_tokens=True) if tokenizer is not None else ""
        res.append(Generation(text, t, base_passes + int(steps[b]), len(content)))
    return res


def default_mode(method: str) -> str:
    return {"cot": "cot", "nocot": "nocot"}.get(method, "latent")


def evaluate_records(model: LatentReasoner, tokenizer, cfg, records: list[Record], *, mode: str | None = None,
                     batch_size: int | None = None, max_new_tokens: int | None = None, rank: int = 0,
                     world: int = 1, progress: bool = False, diagnostics=None) -> tuple[list[dict], dict]:
    """Generate and score `records` (this rank's shard: indices rank, rank+world, ...).

    diagnostics: a `kava.diagnostics.DiagnosticsSpec` (latent ablations, oracle check, KV match; latent
    methods only): its per-example fields join the rows and its numbers the summary.
    Returns (rows, summary) for this shard; rows carry `index` so shards merge without double counting.
    """
    from kava.diagnostics import diagnose_batch, eval_chunks, student_mode_of
    from kava.scoring import extract_answer, numbers_match

    mode = mode or default_mode(cfg.method)
    diag = diagnostics if diagnostics is not None and diagnostics.active else None
    if diag is not None:
        student_mode_of(cfg.method)  # refuses cot / nocot runs
        if mode != "latent":
            raise ValueError(f"latent diagnostics need the latent mode; got mode {mode!r}")
    fmt = Formatter(tokenizer, answer_prompt=cfg.data.answer_prompt, drop_last_step=cfg.data.drop_last_step,
                    max_question_tokens=10**9, max_cot_tokens=10**9, max_answer_tokens=10**9)
    idx = list(range(rank, len(records), world))
    bs = batch_size or cfg.run.eval_batch_size
    max_new = max_new_tokens or cfg.run.eval_max_new_tokens
    if model.sliding_window is not None and records:
        # decided on every rank from all records, before any pass: a refusal from inside one rank's shard
        # would leave the other ranks waiting in the gather
        longest = max(len(fmt.question_ids(r.question)) for r in records)
        extra = {"latent": 2 + cfg.latent.num_latents, "cot": cfg.run.eval_max_cot_tokens}.get(mode, 0)
        check_window(model.sliding_window, longest + extra + len(fmt.prompt_ids) + max_new,
                     what=f"the longest question of this evaluation ({mode} mode, with its generation budget)")
        if diag is not None and (diag.oracle or diag.kv_match):  # the teacher pass over the gold CoT too
            teacher = max(len(t.question) + len(t.cot) + len(t.prompt) + len(t.answer)
                          for t in (fmt.tokenize(r, i) for i, r in enumerate(records)))
            check_window(model.sliding_window, teacher, what="the longest gold CoT sequence of these diagnostics")
    rows: list[dict] = []
    t0, diag_wall = time.perf_counter(), 0.0
    from tqdm.auto import tqdm

    bar = tqdm(total=len(idx), desc=f"eval {mode}", disable=not progress or None, leave=False)
    model.eval()
    for chunk in eval_chunks(idx, bs, diag.min_batch if diag is not None else 1):
        items = [fmt.tokenize(records[i], i, need_answer=False) for i in chunk]
        gens = generate(model, items, mode=mode, num_latents=cfg.latent.num_latents,
                        num_sweeps=cfg.latent.num_sweeps, student_mode=student_mode(cfg.method),
                        max_new_tokens=max_new, max_cot_tokens=cfg.run.eval_max_cot_tokens, tokenizer=tokenizer)
        for i, g in zip(chunk, gens):
            ext = extract_answer(g.text, cfg.data.answer_prompt)
            r = records[i]
            rows.append({"index": i, "question": r.question, "gold": r.answer, "generated": g.text,
                         "extracted": ext["strict"], "extracted_flexible": ext["flexible"],
                         "correct": numbers_match(ext["strict"], r.answer),
                         "correct_flexible": numbers_match(ext["flexible"], r.answer),
                         "forward_passes": g.forward_passes, "generated_tokens": g.generated_tokens})
        if diag is not None:  # its time is not part of the throughput (wall_s, questions_per_s)
            t_d = time.perf_counter()
            for row, extra in zip(rows[-len(chunk):], diagnose_batch(model, tokenizer, cfg, records, chunk, fmt,
                                                                     diag, max_new)):
                row.update(extra)
            diag_wall += time.perf_counter() - t_d
        bar.update(len(chunk))
    bar.close()
    wall = time.perf_counter() - t0 - diag_wall
    return rows, summarize(rows, wall, mode)


def summarize(rows: list[dict], wall: float, mode: str) -> dict:
    """Dataset-level numbers of scored rows, plus the latent diagnostics when the rows carry them."""
    from kava.diagnostics import summarize_diagnostics

    n = len(rows)
    return {
        "mode": mode,
        "count": n,
        "accuracy": sum(r["correct"] for r in rows) / max(n, 1),
        "accuracy_flexible": sum(r["correct_flexible"] for r in rows) / max(n, 1),
        "mean_forward_passes": sum(r["forward_passes"] for r in rows) / max(n, 1),
        "mean_generated_tokens": sum(r["generated_tokens"] for r in rows) / max(n, 1),
        "wall_s": wall,
        "questions_per_s": n / wall if wall > 0 else 0.0,
        **summarize_diagnostics(rows),
    }


def hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def write_eval(out_dir: Path, rows: list[dict], summary: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "predictions.jsonl", "w") as f:
        for r in sorted(rows, key=lambda r: r["index"]):
            f.write(json.dumps(r) + "\n")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))


def eval_dir_name(dataset: str, limit: int | None, available: int) -> str:
    """The folder under `eval/` of one evaluation: the dataset's name, or `<dataset>-limit<N>` when `limit`
    cut the set short (a smoke test never overwrites the full evaluation, nor is read as one)."""
    return f"{dataset}-limit{limit}" if limit and limit < available else dataset


def evaluate_run(checkpoint: str | Path, datasets: list[str], *, data_dir=None, hub: bool = False, mode=None,
                 batch_size=None, max_new_tokens=None, limit=None, output=None, progress: bool = True,
                 diagnostics=None) -> dict[str, dict]:
    """Evaluate a run (its best/, else final/), a checkpoint or a `kava export` directory on named datasets:
    what `kava eval` does. Returns {dataset: summary} (on the main process; {} on the others).

    Questions are sharded across processes (`accelerate launch` / `torchrun`); the main process gathers them
    and writes `<output or RUN_DIR/eval>/<eval_dir_name>/{predictions.jsonl, summary.json}`.
    data_dir: the local data root; for the synthetic splits of a run trained on the synthetic task it defaults
    to that run's own data (`kava.data.pipeline.find_synthetic_dir`).
    diagnostics: a `kava.diagnostics.DiagnosticsSpec` (latent runs).
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object

    import kava
    from kava.data.pipeline import find_synthetic_dir
    from kava.data.readers import load_eval_dataset
    from kava.diagnostics import format_diagnostics

    state = PartialState(cpu=not torch.cuda.is_available())  # multi-process CPU runs shard too
    km = kava.load(checkpoint, device=state.device)
    cfg = km.cfg
    out_root = Path(output) if output else km.run_dir / "eval"
    results = {}
    for name in datasets:
        root = data_dir
        if root is None and not hub and name.startswith("synth-") and cfg.data.source == "synthetic":
            root = find_synthetic_dir(cfg, None if km.exported else km.run_dir)
        # the CoT (used by the oracle diagnostics) in the style the run trained on
        style = cfg.data.cot_style if cfg.data.cot_style in ("equation", "nl") else "equation"
        records, desc = load_eval_dataset(name, root, hub=hub, cot_style=style)
        available = len(records)
        if limit:
            records = records[:limit]
            desc += f" (first {limit})"
        if diagnostics is not None and diagnostics.active:  # before any rank starts: all refuse, or none
            from kava.diagnostics import check_shards

            check_shards(len(records), state.num_processes, batch_size or cfg.run.eval_batch_size,
                         diagnostics.min_batch)
        rows, s = km.evaluate(records, mode=mode, batch_size=batch_size, max_new_tokens=max_new_tokens,
                              rank=state.process_index, world=state.num_processes,
                              progress=progress and state.is_main_process, diagnostics=diagnostics)
        rows = gather_object(rows)
        walls = gather_object([s["wall_s"]])
        if state.is_main_process:
            assert len({r["index"] for r in rows}) == len(rows) == len(records), "sharding counted an example twice"
            summary = summarize(rows, max(walls), s["mode"])
            summary.update({"dataset": name, "description": desc, "hardware": hardware(),
                            "processes": state.num_processes, "checkpoint": str(km.source), "config_hash": cfg.hash(),
                            "method": cfg.method})
            if len(records) < available:
                summary["limit"] = limit
            write_eval(out_root / eval_dir_name(name, limit, available), rows, summary)
            results[name] = summary
            print(f"{name}: accuracy {summary['accuracy']:.4f} ({summary['count']} problems: {desc}); "
                  f"forward passes/question {summary['mean_forward_passes']:.1f}; "
                  f"{summary['questions_per_s']:.1f} questions/s")
            for line in format_diagnostics(name, summary):
                print(line)
    return results
