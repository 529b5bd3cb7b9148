"""CUDA graphs for the training micro-step (`optim.cuda_graphs`).

A KaVa step is six model passes (teacher, prefix, T sweeps, answer) and their backward: tens of thousands
of small kernels, so on a GPU the step is bound by kernel launches, not by arithmetic. A CUDA graph records
one micro-batch's forward + backward once and replays it with a single launch.

What makes the micro-step capturable (checked on CPU by running it on the meta device, see tests):
- static shapes: batches are laid out in blocks [question | CoT | answer] whose widths come from a geometric
  series (`optim.graph_buckets`, `kava.data.format.block_widths`), and the label and query-row capacities
  follow from the widths, so three numbers fix a batch's shape (about 10-20 shapes over GSM8k at any
  micro-batch); pads are masked, so the losses and gradients equal the unpadded batch's;
- no host sync: the labelled positions come from the host-built batch (`label_idx`), the CE denominators are
  device tensors, and HF's "is the mask all ones?" check is off (`capture.no_host_sync`);
- the gradients are accumulated in place into `.grad` tensors that exist before the capture (made by the
  first capture's warm-up, for the parameters the step reaches) and are never replaced (the trainer zeroes
  them with `set_to_none=False`).

One graph per batch shape, up to `optim.max_graphs`; a batch of a new shape beyond that runs eagerly (counted).
The largest shape of the first steps is captured before training (`GraphedStep.precapture`), so that the
smaller ones fit in its memory.
A capture that fails (out of memory, say) turns graphs off for the run under `optim.cuda_graphs: auto`; so does
an eager micro-batch that runs out of memory beside the graphs' pool, after which the trainer redoes that step
eagerly (`kava.train.run_step`), and a validation whose decoding runs out of memory beside it even without the
decoding's own graphs, which then runs again (`kava.train.validate`): a full card costs the graphs, not the run.
The first capture runs the step eagerly a few times on a side stream first (CUDA's warm-up rule); every capture
restores the gradients and the RNG states as they were before it, so capturing changes neither what the
optimizer sees nor the dropout masks of later steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Callable

import torch

from kava.config import ConfigError, check_world_size, graph_exclusion, use_bf16
from kava.model.capture import no_host_sync
from kava.model.families import mixture_of_experts, text_config
from kava.objective import Batch, loss_step


def batch_key(batch: Batch) -> tuple:
    """Everything a captured graph bakes in: every tensor's shape and dtype, and the ints of the batch."""
    key = []
    for part in (batch.teacher, batch.student):
        if part is None:
            key.append(None)
            continue
        for f in dataclasses.fields(part):
            v = getattr(part, f.name)
            key.append((f.name, tuple(v.shape), v.dtype) if torch.is_tensor(v) else (f.name, v))
    key.append(tuple(sorted(batch.ce_den)) if batch.ce_den is not None else None)
    return tuple(key)


def batch_volume(batch: Batch) -> int:
    """What a micro-batch's activation memory grows with: the columns its passes compute (teacher and student,
    pads included) plus the rows its LM head runs on (`label_idx`)."""
    return sum(part.ids.numel() + part.label_idx.numel() for part in (batch.teacher, batch.student) if part is not None)


def _tensors(batch: Batch):
    """(name, tensor) of every tensor in the batch, in a fixed order."""
    for pname, part in (("teacher", batch.teacher), ("student", batch.student)):
        if part is None:
            continue
        for f in dataclasses.fields(part):
            v = getattr(part, f.name)
            if torch.is_tensor(v):
                yield f"{pname}.{f.name}", v
    for k in sorted(batch.ce_den or {}):
        yield f"ce_den.{k}", batch.ce_den[k]


def clone_batch(batch: Batch) -> Batch:
    """A copy with fresh tensors: the static input buffers of one graph."""
    def part(p):
        if p is None:
            return None
        return dataclasses.replace(p, **{f.name: getattr(p, f.name).clone() for f in dataclasses.fields(p)
                                         if torch.is_tensor(getattr(p, f.name))})
    den = None if batch.ce_den is None else {k: v.clone() for k, v in batch.ce_den.items()}
    return Batch(part(batch.teacher), part(batch.student), batch.num_tokens, den)


def copy_batch_(dst: Batch, src: Batch) -> None:
    """Copy `src`'s tensors into `dst`'s (same `batch_key`)."""
    for (name, d), (_, s) in zip(_tensors(dst), _tensors(src), strict=True):
        d.copy_(s, non_blocking=True)


class CudaGraphs:
    """Capture and replay through `torch.cuda.CUDAGraph`; all graphs share one memory pool (they never run
    at the same time, and their outputs are read before the next replay).

    Only the first capture is preceded by eager warm-up runs on a side stream (CUDA's rule: lazy
    initialisation such as cuBLAS handles and the autograd engine's streams must not happen inside a capture).
    The warm-up also creates `.grad` for every parameter the step reaches, outside the pool, so that the
    captured backward accumulates into them in place. Warming up again for a later shape would run a whole
    eager step outside the pool while the pool holds the earlier graphs' memory: twice the memory of one
    step, which ran a LLaMA-1B micro-batch of 64 out of 141 GB."""

    def __init__(self, warmup: int = 2):
        if warmup < 1:
            raise ValueError("CudaGraphs needs at least one warm-up run (it creates the gradients in place)")
        self.warmup = warmup
        self.warmed = False
        self.pool = torch.cuda.graph_pool_handle()

    def will_run(self) -> bool:
        """Whether the next `capture` executes the step (and so changes gradients)."""
        return not self.warmed

    def capture(self, fn: Callable[[], dict]):
        if not self.warmed:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            try:
                with torch.cuda.stream(side):
                    for _ in range(self.warmup):
                        fn()
            finally:  # also after a failed warm-up: its gradient kernels finish before anything restores them
                torch.cuda.current_stream().wait_stream(side)
                torch.cuda.synchronize()
            torch.cuda.empty_cache()  # the warm-up's memory goes back to the device, for the pool
            self.warmed = True
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = fn()
        return graph, out

    @staticmethod
    def replay(graph) -> None:
        graph.replay()

    def release(self) -> None:
        """After the graphs are dropped: give their pool's memory back to the device."""
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


class EagerReplay:
    """Stand-in for `CudaGraphs` on CPU (tests): "capture" runs the function once, "replay" runs it again on the
    same static buffers. What a real graph would get wrong (a value baked in at capture instead of read from
    the buffers) gives wrong results here too, as long as it is read on the Python side."""

    @staticmethod
    def will_run() -> bool:
        return True

    def capture(self, fn: Callable[[], dict]):
        out = fn()

        def replay():  # like a graph: the new results land in the output tensors of the capture
            new = fn()
            with torch.no_grad():
                for k, v in new.items():
                    out[k].copy_(v)

        return replay, out

    @staticmethod
    def replay(graph) -> None:
        graph()

    def release(self) -> None:
        pass


class GraphedStep:
    """The micro-step `fn(batch) -> log` (forward + backward, gradients accumulated into `.grad`), captured
    once per batch shape and replayed.

    params: the trainable parameters. The first capture's warm-up gives `.grad` to those the step reaches;
    those tensors must stay (the trainer zeroes them in place); the others keep `.grad` None, so AdamW leaves
    them alone exactly as in an eager run (a zero gradient would still be weight-decayed).
    `__call__` returns the step's log (fresh tensors), or None when the batch was not graphed: a new shape
    beyond `max_graphs`, or a capture that failed (`fallback=True`: graphs are then off for the run, with
    the reason in `disabled`; `fallback=False` re-raises). The caller then runs `fn` eagerly.
    """

    def __init__(self, fn: Callable[[Batch], dict], params: list[torch.nn.Parameter], *, max_graphs: int = 16,
                 backend=None, fallback: bool = True):
        self.fn = fn
        self.params = [p for p in params if p.requires_grad]
        self.max_graphs = max_graphs
        self.backend = backend if backend is not None else CudaGraphs()
        self.fallback = fallback
        self.graphs: dict[tuple, tuple] = {}  # key -> (graph, static batch, static log)
        self.replays = 0
        self.eager = 0  # micro-batches run eagerly (max_graphs reached, or graphs off after a failed capture)
        self.disabled: str | None = None
        self._grads: dict[torch.nn.Parameter, torch.Tensor] | None = None  # what the graphs accumulate into

    def _check_grads(self) -> None:
        for p, g in (self._grads or {}).items():
            if p.grad is not g:
                raise RuntimeError("a captured CUDA graph accumulates into the .grad tensors it saw at capture; "
                                   "they were replaced (zero them with zero_grad(set_to_none=False))")

    def _capture(self, batch: Batch):
        static = clone_batch(batch)
        runs = self.backend.will_run()  # warm-up (or the stand-in) executes the step: undo what it changes
        saved = {p: (None if p.grad is None else p.grad.clone()) for p in self.params} if runs else {}
        # the RNG too (dropout masks; a capture advances the CUDA generator as well): when a shape is captured
        # (a resume captures every shape again) must not change the random stream the replays draw from
        rng = torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        try:
            graph, log = self.backend.capture(lambda: self.fn(static))
        finally:
            torch.set_rng_state(rng[0])
            if rng[1] is not None:
                torch.cuda.set_rng_state_all(rng[1])
            with torch.no_grad():
                for p, s in saved.items():
                    if p.grad is None:
                        continue
                    if s is None:
                        p.grad.zero_()  # created by the warm-up: it was 0 (None) before; keep the tensor
                    else:
                        p.grad.copy_(s)
        if self._grads is None:
            self._grads = {p: p.grad for p in self.params if p.grad is not None}
        else:
            new = [p for p in self.params if p.grad is not None and p not in self._grads]
            if new:  # its .grad would live in the graph's pool, overwritten at every replay, not accumulated
                for p in new:
                    p.grad = None
                raise RuntimeError(f"this batch shape reaches {len(new)} parameter(s) that the first captured shape "
                                   "did not; their gradients cannot be accumulated by a graph")
        return graph, static, log

    def precapture(self, batches: list[Batch]) -> Batch | None:
        """Capture, before training, the largest shape of `batches` (`batch_volume`; the micro-batches of the
        first steps): every graph allocates from one pool, and a capture carves its blocks from what the earlier
        ones freed, so the largest first lets the smaller shapes fit in its memory instead of each adding its
        own. Nothing else changes: a capture leaves the gradients and the RNG as they were. Returns the batch
        captured (None: nothing to capture, or graphs off)."""
        if self.disabled is not None or not batches:
            return None
        big = max(batches, key=batch_volume)
        key = batch_key(big)
        if key in self.graphs or len(self.graphs) >= self.max_graphs:
            return None
        self._check_grads()
        try:
            self.graphs[key] = self._capture(big)
        except Exception as err:
            if not self.fallback:
                raise
            self.turn_off(err, "capture failed")
            return None
        return big

    def turn_off(self, err: BaseException, what: str) -> None:
        """Graphs off for the rest of the run: every captured graph dropped and its pool's memory given back
        (`disabled` says why; later micro-batches run eagerly)."""
        self.disabled = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        self.graphs.clear()
        self.backend.release()
        print(f"[kava] CUDA graphs: {what} ({self.disabled}); training continues without graphs "
              "(set optim.cuda_graphs=false to skip the attempt)", flush=True)

    def __call__(self, batch: Batch) -> dict | None:
        if self.disabled is not None:
            self.eager += 1
            return None
        self._check_grads()
        key = batch_key(batch)
        entry = self.graphs.get(key)
        if entry is None:
            if len(self.graphs) >= self.max_graphs:
                self.eager += 1
                return None
            try:
                entry = self.graphs[key] = self._capture(batch)
            except Exception as err:  # out of memory, an op that cannot be captured, ...
                if not self.fallback:
                    raise
                self.turn_off(err, "capture failed")
                self.eager += 1
                return None
        graph, static, log = entry
        copy_batch_(static, batch)
        self.backend.replay(graph)
        self.replays += 1
        return {k: v.clone() for k, v in log.items()}

    def stats(self) -> dict[str, int]:
        """What `metrics.jsonl` logs: graphs captured, replays, eager micro-batches, and 1 once a failed
        capture turned graphs off (`disabled` says why; the start-up line said "on")."""
        return {"graphs/captured": len(self.graphs), "graphs/replays": self.replays, "graphs/eager": self.eager,
                "graphs/disabled": int(self.disabled is not None)}


# ------------------------------------------------------------------------------------------------ the recipe's use
def graph_micro_step(model, cfg, accum: int, amp_device: str | None, batch) -> dict:
    """One micro-batch's forward and backward (`total / accum` into `.grad`), free of host syncs: what
    `kava.training.graphs` captures. Same math as the eager micro-step of `train_step`. amp_device: bf16 autocast on
    that device type (no weight-cast cache: a graph replays the casts), or None."""
    amp = torch.autocast(amp_device, dtype=torch.bfloat16, cache_enabled=False) if amp_device else \
        contextlib.nullcontext()
    with no_host_sync(), amp:
        total, log = loss_step(model, batch, cfg)
        (total / accum).backward()
    return log


def model_graph_exclusion(model) -> str | None:
    """Why this loaded model's passes cannot be captured (`graph_exclusion` covers what the config says)."""
    tc = text_config(model.config)
    if (why := mixture_of_experts(model.config)) is not None:
        return why
    if model.sliding_window is not None:
        return (f"a sliding-window model ({tc.model_type}, window {model.sliding_window}: the padding to static "
                "shapes could take a batch past the window)")
    return None


def setup_graphs(cfg, acc, raw, backend=None) -> GraphedStep | None:
    """`optim.cuda_graphs`: true (refused with the reason when impossible), auto (on when possible), false."""
    if cfg.optim.cuda_graphs is False:
        return None
    why = graph_exclusion(cfg, cuda=acc.device.type == "cuda" or backend is not None,
                          world_size=acc.num_processes) or model_graph_exclusion(raw)
    if why is not None:
        if cfg.optim.cuda_graphs is True:
            raise ConfigError(f"optim.cuda_graphs: true is not possible with {why}; use auto or false")
        if acc.is_main_process and acc.device.type == "cuda":  # on a CPU, "off" is no news
            print(f"[kava] CUDA graphs: off ({why})")
        return None
    if acc.is_main_process:
        print(f"[kava] CUDA graphs: on (optim.cuda_graphs={cfg.optim.cuda_graphs}; block widths bucketed with growth "
              f"{cfg.optim.graph_buckets}; 'graphs/*' in metrics.jsonl)")
    fn = functools.partial(graph_micro_step, raw, cfg, check_world_size(cfg, acc.num_processes),
                           "cuda" if use_bf16(cfg) else None)
    return GraphedStep(fn, list(raw.parameters()), max_graphs=cfg.optim.max_graphs, backend=backend,
                       fallback=cfg.optim.cuda_graphs == "auto")
