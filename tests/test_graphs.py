"""CUDA graphs of the micro-step (`kava.training.graphs`), checked on CPU.

What a graph needs, each against an independent reference:
- padded (static-shape) batches give the losses and gradients of the unpadded batch;
- the micro-step has no data-dependent op or host sync: it runs on the meta device, where any such op raises
  (and, as a control, HF's own mask check does raise there without `no_host_sync`);
- the capture/replay plumbing (static buffers, gradient accumulation, warm-up undone, shape buckets, eager
  fallback) equals plain eager steps, through a stand-in backend that replays by re-running on the buffers;
- `kava train` with that backend equals `kava train` without graphs, step for step.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import kava.train as kt
from kava.config import ConfigError, load_config
from kava.data.format import Formatter
from kava.data.records import SkipLog
from kava.data.format import block_widths, bucket_width, build_student_batch, build_teacher_batch, label_totals
from kava.training.graphs import EagerReplay, GraphedStep, batch_key, batch_volume, model_graph_exclusion
from kava.objective import Batch, length_key, loss_step, make_batch
from kava.model.capture import no_host_sync
from kava.checkpoint.load import build_reasoner
from kava.spec import METHODS
from tiny import RECORDS, tiny_tokenizer

SMALL = ["model.from_scratch.hidden_size=32", "model.from_scratch.intermediate_size=64",
         "model.from_scratch.num_hidden_layers=2", "latent.num_latents=3", "latent.num_sweeps=2"]
# Coconut answers after max_stages x thoughts_per_step raw hidden states (3 x 1 with SMALL's 3 latents)
METHOD_EXTRA = {"coconut": ["latent.projection=identity", "coconut.thoughts_per_step=1"]}


def setup(method: str, *extra: str, family: str = "llama"):
    cfg = load_config("tiny_synth", SMALL + [f"method={method}", f"model.from_scratch.family={family}",
                                             *METHOD_EXTRA.get(method, []), *extra])
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = build_reasoner(cfg, tok).train()
    items = Formatter(tok, drop_last_step=False).tokenize_all(RECORDS, SkipLog())
    return cfg, model, items


def grads_of(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def run_step(model, batch, cfg, den=None, **kw):
    model.zero_grad(set_to_none=True)
    batch.ce_den = den
    total, log = loss_step(model, batch, cfg, **kw)
    total.backward()
    return {k: v.item() for k, v in log.items()}, grads_of(model)


def close(a: dict, b: dict, rel: float = 1e-5):
    """a equals b; a gradient present on one side only must be all zero (a graph allocates every .grad)."""
    for k in a.keys() ^ b.keys():
        assert not (a.get(k, b.get(k)) != 0).any(), k
    a, b = {k: a[k] for k in a.keys() & b.keys()}, {k: b[k] for k in a.keys() & b.keys()}
    for k in a:
        x, y = torch.as_tensor(a[k]).float(), torch.as_tensor(b[k]).float()
        assert torch.allclose(x, y, rtol=rel, atol=rel * max(1.0, y.abs().max().item())), k


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("growth", [1.25, 2.0])
def test_padded_batches_give_the_same_losses_and_gradients(method, growth):
    """The static block layout (question | CoT | answer, widths from the series, capacities from the widths)
    gives the losses and gradients of the unpadded batch."""
    cfg, model, items = setup(method)
    plain = make_batch(items, model.ids, cfg)
    padded = make_batch(items, model.ids, cfg, buckets=growth)
    coconut = method == "coconut"  # no teacher; its answer block holds the CoT
    w = block_widths(items, growth, with_cot=method not in ("nocot", "coconut"), cot_in_answer=coconut)
    if not coconut:
        assert padded.teacher.ids.shape[1] == w.q + w.c + w.a > plain.teacher.ids.shape[1]
        assert padded.teacher.label_idx.numel() == len(items) * ((w.c if method != "nocot" else 0) + w.a)
        assert padded.teacher.q_block == w.q
    else:
        assert padded.teacher is None and plain.teacher is None and w.c == 0
    if padded.student is not None:
        assert (padded.student.q_block, padded.student.ids.shape[1]) == (w.q + 1, w.q + 1 + 3 + w.a)
        assert padded.student.ids.shape[1] > plain.student.ids.shape[1]
        assert padded.student.label_idx.numel() == len(items) * w.a
        # every label slot, pads included, at its own position: an index backward serializes repeats
        assert padded.student.label_idx.unique().numel() == padded.student.label_idx.numel()
    if not coconut:
        assert padded.teacher.label_idx.unique().numel() == padded.teacher.label_idx.numel()
    assert padded.num_tokens == plain.num_tokens  # pads are not tokens
    den = {"ce_teacher": 37.0, "ce_student": 5.0}  # step-wide denominators: padding must not change the sums
    for d in (None, den):
        log_a, g_a = run_step(model, plain, cfg, d)
        log_b, g_b = run_step(model, padded, cfg, d)
        close(log_a, log_b)
        close(g_a, g_b)


@pytest.mark.parametrize("method", ["pccot", "codi", "kava"])
@pytest.mark.parametrize("buckets", [None, 1.25])
def test_shared_question_pass_gives_the_losses_and_gradients_of_separate_passes(method, buckets):
    """Latent methods run the question block once for teacher and student (`loss_step`, the default). The
    reference: the teacher right-padded as a whole in one pass, the student recomputing its question."""
    cfg, model, items = setup(method)
    shared = make_batch(items, model.ids, cfg, buckets=buckets)
    assert shared.teacher.q_block is not None and shared.student.q_block == shared.teacher.q_block + 1
    ref = Batch(build_teacher_batch(items, model.ids, query_mode=cfg.eviction.importance_queries,
                                    tail_window=cfg.eviction.cot_tail_window, codi_position=cfg.loss.codi_position),
                build_student_batch(items, model.ids, cfg.latent.num_latents, codi_position=cfg.loss.codi_position),
                shared.num_tokens)
    assert ref.teacher.q_block is None  # (the reference layout cannot share)
    den = {"ce_teacher": 37.0, "ce_student": 5.0}
    for d in (None, den):
        log_a, g_a = run_step(model, shared, cfg, d)
        log_b, g_b = run_step(model, ref, cfg, d, share_question=False)
        log_c, g_c = run_step(model, shared, cfg, d, share_question=False)  # block layout, two passes
        close(log_a, log_b)
        close(g_a, g_b)
        close(log_a, log_c)
        close(g_a, g_c)
        assert g_a and all(v.abs().max() > 0 for k, v in g_a.items() if "lora" in k or "proj" in k)


def test_the_shared_question_pass_runs_fewer_tokens():
    """With sharing, the question block goes through the model once (teacher), not twice."""
    cfg, model, items = setup("kava")
    batch = make_batch(items, model.ids, cfg)
    seen = []
    real = model.decoder.forward

    def spy(*a, **k):
        seen.append(k["inputs_embeds"].shape[1])
        return real(*a, **k)

    model.decoder.forward = spy
    try:
        for share in (True, False):
            seen.clear()
            loss_step(model, batch, cfg, share_question=share)
            columns = sum(seen)
            if share:
                shared_columns = columns
    finally:
        del model.decoder.forward
    assert columns - shared_columns == batch.teacher.q_block


def on_meta(model, batch):
    """The model and batch on the meta device: shapes without data, so any op whose result depends on the
    data (`.item()`, `nonzero`, boolean indexing, `if tensor:`) raises."""
    model = model.to("meta")
    if batch.teacher is not None:  # (coconut has no teacher pass)
        batch.teacher = batch.teacher.to("meta")
    if batch.student is not None:
        batch.student = batch.student.to("meta")
    if batch.ce_den is not None:
        batch.ce_den = {k: torch.tensor(v, device="meta") for k, v in batch.ce_den.items()}
    return model, batch


@pytest.fixture
def meta_autocast(monkeypatch):
    """The losses open `torch.autocast(<device>, enabled=False)` regions; autocast knows no "meta" device."""
    real = torch.autocast

    class Autocast(real):
        def __init__(self, device_type, *a, **k):
            super().__init__("cpu" if device_type == "meta" else device_type, *a, **k)

    monkeypatch.setattr(torch, "autocast", Autocast)


@pytest.mark.parametrize("method, family, sets", [(m, "llama", ()) for m in METHODS] + [
    ("kava", f, ()) for f in ("qwen2", "gpt2", "gemma2", "mistral", "phi3", "olmo2")] + [
    (m, "llama", ("optim.fused_ce=true",)) for m in ("kava", "cot")])  # the CE's gradients in the forward pass
def test_micro_step_has_no_host_sync(method, family, sets, meta_autocast):
    extra = ["loss.codi_layers=[0,-1]"] if method == "codi" else []  # the layer subset is indexed too
    cfg, model, items = setup(method, *extra, *sets, family=family)
    batch = make_batch(items, model.ids, cfg, buckets=1.25)
    batch.ce_den = {"ce_teacher": 37.0, "ce_student": 5.0}
    model, batch = on_meta(model, batch)
    with no_host_sync():
        total, log = loss_step(model, batch, cfg)
        total.backward()
    assert total.device.type == "meta" and log["loss/total"].device.type == "meta"


def test_the_meta_probe_catches_a_host_sync(meta_autocast):
    """Control: HF's all-ones mask check (a host read) is what `no_host_sync` turns off; without it the
    probe raises, so the test above can fail."""
    cfg, model, items = setup("nocot")
    model, batch = on_meta(model, make_batch(items, model.ids, cfg, buckets=1.25))
    with pytest.raises(RuntimeError, match="meta"):
        loss_step(model, batch, cfg)


def fresh_batches(model, cfg, items, buckets):
    """Three batches of one shape (the records permuted) and one of another shape."""
    orders = [[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2]]
    same = [make_batch([items[i] for i in o], model.ids, cfg, buckets=buckets) for o in orders]
    other = make_batch(items[:2], model.ids, cfg, buckets=buckets)
    return same, other


LORA_DROPOUT = ["lora.r=4", "lora.alpha=8", "lora.dropout=0.3", "lora.target_modules=[q_proj,v_proj]"]


@pytest.mark.parametrize("method, extra", [("kava", []), ("codi", []), ("cot", []), ("coconut", []),
                                           ("kava", LORA_DROPOUT)],
                         ids=["kava", "codi", "cot", "coconut", "kava_lora_dropout"])
def test_graphed_step_equals_eager_steps(method, extra):
    """Replays on the static buffers accumulate exactly what eager steps accumulate; capturing (its warm-up
    runs) leaves the gradients and the RNG as they were (with dropout, the replays draw the masks the eager
    steps draw); a new shape gets its own graph, beyond max_graphs none."""
    cfg, model, items = setup(method, *extra)
    if extra:  # LoRA B starts at zero, which would hide the dropout masks from the loss
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
    same, other = fresh_batches(model, cfg, items, buckets=1.25)
    assert batch_key(same[0]) == batch_key(same[2]) != batch_key(other)
    den = {k: torch.tensor(v) for k, v in {"ce_teacher": 50.0, "ce_student": 6.0}.items()}

    def fn(b):
        total, log = loss_step(model, b, cfg)
        (total / 2).backward()
        return log

    # reference: eager micro-steps accumulating into .grad
    torch.manual_seed(7)
    model.zero_grad(set_to_none=True)
    ref_logs = []
    for b in [*same, other]:
        b.ce_den = den
        ref_logs.append({k: v.item() for k, v in fn(b).items()})
    ref = grads_of(model)

    torch.manual_seed(7)
    model.zero_grad(set_to_none=True)
    step = GraphedStep(fn, list(model.parameters()), max_graphs=2, backend=EagerReplay())
    logs = []
    for i, b in enumerate([*same, other]):
        logs.append({k: v.item() for k, v in step(b).items()})
        if i == 0:  # the capture ran the step twice (capture + replay); only the replay may count
            one = grads_of(model)
    for a, b in zip(logs, ref_logs):
        close(a, b)
    close(grads_of(model), ref)
    assert step.stats() == {"graphs/captured": 2, "graphs/replays": 4, "graphs/eager": 0, "graphs/disabled": 0}

    torch.manual_seed(7)
    model.zero_grad(set_to_none=False)
    fn(same[0])
    close(one, grads_of(model))  # after the first call: exactly one micro-step's gradient

    third = make_batch(items[:3], model.ids, cfg, buckets=1.25)
    third.ce_den = den
    assert batch_key(third) not in step.graphs
    assert step(third) is None and step.stats()["graphs/eager"] == 1  # max_graphs reached: run it eagerly


def test_replaced_gradients_are_refused():
    cfg, model, items = setup("kava")
    b = make_batch(items, model.ids, cfg, buckets=1.25)

    def fn(batch):
        total, log = loss_step(model, batch, cfg)
        total.backward()
        return log

    step = GraphedStep(fn, list(model.parameters()), backend=EagerReplay())
    step(b)
    model.zero_grad(set_to_none=True)  # the trainer must zero in place instead
    with pytest.raises(RuntimeError, match="set_to_none=False"):
        step(b)


TRAIN = ["model.from_scratch.hidden_size=32", "model.from_scratch.intermediate_size=64",
         "model.from_scratch.num_hidden_layers=2", "data.synth_train_size=200", "data.synth_eval_size=10",
         "data.valid_limit=4", "optim.effective_batch=8", "optim.micro_batch=4", "latent.num_latents=4",
         "run.log=[jsonl]", "run.log_every=1", "run.eval_max_cot_tokens=8", "run.eval_max_new_tokens=4",
         "optim.max_steps=3", "run.eval_every=100", "run.grad_share_every=2"]


def stand_in_graphs(monkeypatch):
    """`kava train`'s graphs through the stand-in backend (no GPU here: it replays by re-running on the buffers)."""
    real = kt.setup_graphs
    monkeypatch.setattr(kt, "setup_graphs", lambda c, a, r: real(c, a, r, backend=EagerReplay()))


def train_metrics(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if r.get("split") == "train" and "loss/total" in r]


CURRICULUM = {"coconut": ["latent.projection=identity", "coconut.thoughts_per_step=2", "coconut.max_stages=2",
                          "coconut.epochs_per_stage=0.04"]}  # 25 steps per epoch: a new stage (0, 2, 4 thoughts) each step


@pytest.mark.parametrize("method", ["kava", "cot", "coconut"])
def test_train_with_graphs_equals_train_without(method, tmp_path, monkeypatch):
    """The trainer's graph path (padded batches, device denominators, gradients zeroed in place, gradient
    shares measured beside it) trains exactly like the eager path: same losses at every step, and parameters
    the method never uses (cot: the projection) keep no gradient, so AdamW does not weight-decay them in
    either. (Other weights differ by Adam's amplification of rounding-level gradient differences. No dropout
    here: padding changes the shape of the dropout draws, so masked runs are compared on equal padding in
    `test_graphed_step_equals_eager_steps`.)"""
    runs, weights = {}, {}
    for mode in ("off", "on"):
        cfg = load_config("tiny_synth", TRAIN + [f"method={method}", f"optim.cuda_graphs={mode == 'on'}",
                                                 f"run.output_dir={tmp_path}", f"run.name=graphs_{mode}",
                                                 *CURRICULUM.get(method, [])])
        if mode == "on":
            stand_in_graphs(monkeypatch)
        run_dir = kt.train(cfg, progress=False, data_root=tmp_path / "synth")
        assert json.loads((run_dir / "meta.json").read_text())["cuda_graphs"] is (mode == "on")
        runs[mode] = train_metrics(run_dir)
        weights[mode] = load_file(str(run_dir / "checkpoints" / "step_3" / "trainable.safetensors"))
    off, on = runs["off"], runs["on"]
    assert weights["off"].keys() == weights["on"].keys()
    assert any(k.startswith("proj.") for k in weights["on"]) == (method != "coconut")  # identity: no weights
    if method == "cot":  # the projection gets no gradient: untouched by AdamW in both (no weight decay)
        for k in [k for k in weights["off"] if k.startswith("proj.")]:
            assert torch.equal(weights["on"][k], weights["off"][k]), k
    assert len(off) == len(on) == 3
    assert on[-1]["graphs/captured"] >= (3 if method == "coconut" else 1)  # coconut: one shape per stage
    assert on[-1]["graphs/replays"] == 6 and on[-1]["graphs/eager"] == 0
    assert ("loss/ce_teacher" in on[-1]) == (method != "coconut")
    for a, b in zip(off, on):
        for k in [k for k in a if k.startswith("loss/")] + ["grad_norm"]:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), k


def test_an_eager_micro_batch_out_of_memory_gives_the_pool_back_and_redoes_the_step(tmp_path, monkeypatch, capsys):
    """A micro-batch of a shape beyond optim.max_graphs runs eagerly beside the graphs' pool; when that runs out
    of memory, the trainer turns graphs off (the pool given back, a line saying so) and redoes the whole step
    eagerly: the run trains on with the losses of a run without graphs, instead of stopping on the OOM."""
    import kava.objective

    runs = {}
    for mode in ("off", "on"):
        cfg = load_config("tiny_synth", TRAIN + ["method=cot", f"optim.cuda_graphs={mode == 'on'}",
                                                 "optim.max_graphs=1", f"run.output_dir={tmp_path}",
                                                 f"run.name=oom_{mode}"])
        if mode == "on":
            stand_in_graphs(monkeypatch)
            forward, raised = kava.objective.Objective.forward, []

            def oom_once(self, *a, **k):  # the first eager micro-batch: what a full card does
                if not raised:
                    raised.append(1)
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
                return forward(self, *a, **k)

            monkeypatch.setattr(kava.objective.Objective, "forward", oom_once)
        runs[mode] = train_metrics(kt.train(cfg, progress=False, data_root=tmp_path / "synth"))
    out = capsys.readouterr().out
    assert raised == [1]
    assert "CUDA graphs: out of memory in an eager micro-batch at step" in out and "OutOfMemoryError" in out
    off, on = runs["off"], runs["on"]
    assert len(off) == len(on) == 3 and on[-1]["graphs/disabled"] == 1
    for a, b in zip(off, on):
        for k in [k for k in a if k.startswith("loss/")] + ["grad_norm"]:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), k


@pytest.mark.parametrize("fails", [1, 2])
def test_a_validation_out_of_memory_beside_the_pool_decodes_eagerly_then_turns_graphs_off(fails, tmp_path,
                                                                                          monkeypatch, capsys):
    """Decoding a validation beside the training graphs' pool that runs out of memory: it is decoded again without
    the decoding's graphs (a line says so), and if that runs out of memory too, the training graphs are turned
    off (the pool given back, a line saying so) and it is decoded once more. Either way the run goes on with the
    losses and the validations of a run without graphs."""
    runs, vals = {}, {}
    for mode in ("off", "on"):
        cfg = load_config("tiny_synth", TRAIN + ["method=cot", f"optim.cuda_graphs={mode == 'on'}",
                                                 "run.eval_every=2", f"run.output_dir={tmp_path}",
                                                 f"run.name=valoom_{mode}"])
        if mode == "on":
            stand_in_graphs(monkeypatch)
            evaluate, raised = kt.evaluate_records, []

            def oom(model, tok, c, *a, **k):  # the first validation does not fit beside the pool, `fails` times
                if len(raised) < fails:
                    raised.append(c.run.eval_cuda_graphs)
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
                return evaluate(model, tok, c, *a, **k)

            monkeypatch.setattr(kt, "evaluate_records", oom)
        run_dir = kt.train(cfg, progress=False, data_root=tmp_path / "synth")
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        runs[mode] = train_metrics(run_dir)
        vals[mode] = [r["val/accuracy"] for r in rows if "val/accuracy" in r]
    out = capsys.readouterr().out
    assert raised == ["auto", False][:fails]  # the second attempt decodes without graphs
    assert "validation after step 2: out of memory beside the training graphs" in out
    turned_off = "CUDA graphs: out of memory in the validation after step 2" in out
    assert turned_off == (fails == 2)
    off, on = runs["off"], runs["on"]
    assert len(off) == len(on) == 3 and on[-1]["graphs/disabled"] == (fails == 2)
    assert on[-1]["graphs/replays"] >= (3 if fails == 1 else 1)
    assert vals["on"] == vals["off"] and len(vals["on"]) >= 1
    for a, b in zip(off, on):
        for k in [k for k in a if k.startswith("loss/")] + ["grad_norm"]:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), k


def test_precapture_takes_the_largest_shape_and_changes_nothing():
    """`GraphedStep.precapture` captures the largest of the given batches (`batch_volume`) and nothing else: the
    gradients and the RNG are as before, that shape later replays without a new capture, a second call adds
    nothing, and the steps then accumulate what eager steps do."""
    cfg, model, items = setup("kava")
    small = make_batch(items[:2], model.ids, cfg, buckets=1.25)
    big = make_batch(items, model.ids, cfg, buckets=1.25)
    assert batch_volume(big) > batch_volume(small) and batch_key(big) != batch_key(small)
    den = {k: torch.tensor(v) for k, v in {"ce_teacher": 50.0, "ce_student": 6.0}.items()}
    small.ce_den = big.ce_den = den

    def fn(b):
        total, log = loss_step(model, b, cfg)
        total.backward()
        return log

    model.zero_grad(set_to_none=True)
    for b in (small, big):
        fn(b)
    ref = grads_of(model)

    model.zero_grad(set_to_none=True)
    step = GraphedStep(fn, list(model.parameters()), backend=EagerReplay())
    rng = torch.get_rng_state()
    assert step.precapture([small, big]) is big
    assert torch.equal(torch.get_rng_state(), rng) and all(p.grad is None or not p.grad.any()
                                                           for p in model.parameters())
    assert list(step.graphs) == [batch_key(big)] and step.precapture([small, big]) is None
    step(small)
    step(big)
    close(grads_of(model), ref)
    assert step.stats() == {"graphs/captured": 2, "graphs/replays": 2, "graphs/eager": 0, "graphs/disabled": 0}


def test_training_captures_the_largest_shape_of_the_first_steps_first(tmp_path, monkeypatch):
    """`kava train` with graphs captures, before its first step, the largest micro-batch shape of its first
    steps; the run still equals one without graphs (`test_train_with_graphs_equals_train_without`)."""
    order = []
    stand_in_graphs(monkeypatch)
    capture = GraphedStep._capture

    def spy(self, batch):
        order.append(batch)
        return capture(self, batch)

    monkeypatch.setattr(GraphedStep, "_capture", spy)
    seen = []
    build = kt.make_batch

    def record(*a, **k):
        b = build(*a, **k)
        seen.append(b)
        return b

    monkeypatch.setattr(kt, "make_batch", record)
    cfg = load_config("tiny_synth", TRAIN + ["method=kava", "optim.cuda_graphs=true", "optim.max_steps=6",
                                             f"run.output_dir={tmp_path}", "run.name=precapture"])
    kt.train(cfg, progress=False, data_root=tmp_path / "synth")
    volumes = {batch_key(b): batch_volume(b) for b in seen}
    assert len(volumes) >= 2  # several shapes, so the order means something
    assert batch_volume(order[0]) == max(volumes.values())
    assert len({batch_key(b) for b in order}) == len(order)  # each shape captured once


def test_cuda_graphs_on_is_refused_where_impossible():
    with pytest.raises(ConfigError, match="optim.cuda_graphs.*eviction.method: random"):
        load_config("tiny_synth", ["method=kava", "optim.cuda_graphs=true", "eviction.method=random"])
    with pytest.raises(ConfigError, match="optim.cuda_graphs.*optim.compile"):
        load_config("tiny_synth", ["optim.cuda_graphs=true", "optim.compile=true"])
    with pytest.raises(ConfigError, match="optim.graph_buckets"):
        load_config("tiny_synth", ["optim.graph_buckets=1.0"])
    cfg = load_config("tiny_synth", ["optim.cuda_graphs=true"])

    class CpuAcc:
        device, num_processes, is_main_process = torch.device("cpu"), 1, True

    with pytest.raises(ConfigError, match="optim.cuda_graphs: true is not possible with no CUDA device"):
        kt.setup_graphs(cfg, CpuAcc(), None)
    auto = load_config("tiny_synth")
    assert auto.optim.cuda_graphs == "auto"  # the default
    assert kt.setup_graphs(auto, CpuAcc(), None) is None  # auto: off where impossible


def test_mixture_of_experts_models_are_not_graphed():
    """Token routing gives data-dependent shapes: auto leaves a MoE model eager, true refuses it."""
    cfg, model, _ = setup("kava", family="qwen3_moe")
    assert "mixture-of-experts" in model_graph_exclusion(model)
    assert model_graph_exclusion(setup("kava")[1]) is None

    class Acc:
        device, num_processes, is_main_process = torch.device("cpu"), 1, True

    assert kt.setup_graphs(cfg, Acc(), model, backend=EagerReplay()) is None
    on = load_config("tiny_synth", SMALL + ["optim.cuda_graphs=true"])
    with pytest.raises(ConfigError, match="mixture-of-experts"):
        kt.setup_graphs(on, Acc(), model, backend=EagerReplay())


class FailingCapture(EagerReplay):
    """A backend whose capture runs the step (dirtying gradients and RNG) and then fails, as an out-of-memory
    inside a CUDA capture would."""

    def capture(self, fn):
        fn()
        torch.rand(3)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.40 GiB")


def test_a_failed_capture_falls_back_to_eager_with_everything_restored():
    cfg, model, items = setup("kava", *LORA_DROPOUT)
    b = make_batch(items, model.ids, cfg, buckets=1.25)

    def fn(batch):
        total, log = loss_step(model, batch, cfg)
        total.backward()
        return log

    torch.manual_seed(3)
    rng = torch.get_rng_state()
    step = GraphedStep(fn, list(model.parameters()), backend=FailingCapture())  # fallback (auto) by default
    assert step(b) is None  # the caller runs this micro-batch eagerly
    assert "OutOfMemoryError" in step.disabled and step.graphs == {}
    assert torch.equal(torch.get_rng_state(), rng)  # the failed attempt drew no dropout masks
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())  # nor left gradients
    assert step(b) is None and step.stats() == {"graphs/captured": 0, "graphs/replays": 0, "graphs/eager": 2,
                                                "graphs/disabled": 1}
    strict = GraphedStep(fn, list(model.parameters()), backend=FailingCapture(), fallback=False)  # "true"
    with pytest.raises(torch.OutOfMemoryError):
        strict(b)


def test_sliding_window_models_are_not_graphed():
    """Padding to static shapes could take a batch past the window: auto leaves such a model eager."""
    cfg, model, _ = setup("kava", family="mistral")
    model.config.sliding_window = None
    assert model_graph_exclusion(model) is None  # no window
    model.config.sliding_window = 4096
    assert "sliding-window" in model_graph_exclusion(model)


def test_a_shape_that_reaches_a_new_parameter_is_not_graphed():
    """A graph can only accumulate into gradients that existed before its capture: a later shape reaching a
    parameter the first one did not is refused (under auto: graphs off, eager from then on), and that
    parameter's gradient is not left pointing into the graph's memory."""
    cfg, model, items = setup("cot")
    big, small = (make_batch(items[:k], model.ids, cfg, buckets=1.25) for k in (4, 2))

    def fn(b):
        total, log = loss_step(model, b, cfg)
        if b.teacher.ids.shape[0] == 2:  # only this shape reaches the (otherwise unused) projection
            total = total + model.proj(model.special_rows[:1]).sum()
        total.backward()
        return log

    step = GraphedStep(fn, list(model.parameters()), backend=EagerReplay())
    assert step(big) is not None
    assert step(small) is None and "first captured shape did not" in step.disabled
    assert all(p.grad is None for p in model.proj.parameters())


def test_the_lm_head_runs_under_the_step_autocast():
    """The CE's head recomputation must not fall into the fp32 regions of the losses: under bf16 autocast
    the head's GEMM runs in bf16 (four fp32 GEMMs over [N, d] x [d, V] per term would be the cost)."""
    cfg, model, items = setup("kava")
    batch = make_batch(items, model.ids, cfg)
    seen = []
    hook = model.head.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, _ = loss_step(model, batch, cfg)
    total.backward()  # the backward recomputes the head too
    hook.remove()
    assert len(seen) >= 4 and set(seen) == {torch.bfloat16}


def test_bucket_widths_form_a_geometric_series():
    widths = sorted({bucket_width(n, 1.25) for n in range(1, 400)})
    assert widths[:8] == [8, 16, 24, 32, 40, 56, 72, 96] and all(w % 8 == 0 for w in widths)
    assert all(b / a <= 1.5 for a, b in zip(widths[2:], widths[3:]))  # padding costs at most ~1.25-1.5x
    for n in (1, 8, 9, 57, 399):
        w = bucket_width(n, 1.25)
        assert w >= n and (w == 8 or max(x for x in widths if x < w) < n)  # the smallest width that fits


def test_few_static_shapes_cover_gsm8k_length_batches():
    """With GSM8k's question and CoT lengths (benchmarks/gsm8k_lengths.json), the static shapes of random
    micro-batches fall into a handful of keys: the default max_graphs covers them."""
    import random
    from pathlib import Path

    from kava.data.format import SpecialIds, Tokenized

    lengths = json.loads((Path(__file__).parents[1] / "benchmarks" / "gsm8k_lengths.json").read_text())
    ids = SpecialIds(bot=1000, eot=1001, latent=1002, pad=0, eos=999, bos=None)
    cfg = load_config("tiny_synth", ["method=kava"])
    rng = random.Random(0)
    for style in ("eq", "nl"):
        items = [Tokenized([5] * q, [6] * c, [7] * 5, [8, 9, 999], i) for i, (q, c) in
                 enumerate(zip(lengths["question"], lengths["cot_" + style]))]
        keys = {batch_key(make_batch(rng.sample(items, 32), ids, cfg, buckets=1.25)) for _ in range(150)}
        assert len(keys) <= cfg.optim.max_graphs, (style, len(keys))


def test_sharing_and_grouping_compute_far_fewer_columns_on_gsm8k_lengths():
    """On GSM8k's question / CoT lengths (eq CoT, steps of 128, micro-batch 32, M=24, T=3), a step's
    forward columns (teacher + student + sweeps, padding included) with the shared question pass and
    length-grouped micro-batches are at least 1.5x fewer than with two question passes and micro-batches in
    sampling order (the teacher right-padded as a whole; or both in the static widths of CUDA graphs)."""
    import random
    from pathlib import Path

    from kava.data.format import SpecialIds, Tokenized

    lengths = json.loads((Path(__file__).parents[1] / "benchmarks" / "gsm8k_lengths.json").read_text())
    ids = SpecialIds(bot=1000, eot=1001, latent=1002, pad=0, eos=999, bos=None)
    cfg = load_config("tiny_synth", ["method=kava", "latent.num_latents=24", "latent.num_sweeps=3"])
    M, T = 24, 3
    items = [Tokenized([5] * q, [6] * c, [7] * 5, [8, 9, 999], i) for i, (q, c) in
             enumerate(zip(lengths["question"], lengths["cot_eq"]))]

    def columns(micro, shared: bool, buckets):
        b = make_batch(micro, ids, cfg, buckets=buckets)
        if shared:
            student = b.student.ids.shape[1] - (b.student.q_block - 1)  # the question block ran in the teacher
            return len(micro) * (b.teacher.ids.shape[1] + student + T * M)
        if buckets is None:  # compact teacher, the student recomputes the question
            tb = build_teacher_batch(micro, ids)
            return len(micro) * (tb.ids.shape[1] + b.student.ids.shape[1] + T * M)
        return len(micro) * (b.teacher.ids.shape[1] + b.student.ids.shape[1] + T * M)  # static, two passes

    rng = random.Random(0)
    for buckets in (None, 1.25):
        old = new = 0
        for _ in range(20):
            step = rng.sample(items, 128)
            grouped = sorted(step, key=length_key)
            old += sum(columns(step[i:i + 32], False, buckets) for i in range(0, 128, 32))
            new += sum(columns(grouped[i:i + 32], True, buckets) for i in range(0, 128, 32))
        assert old / new >= 1.5, (buckets, old / new)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("head", ["trainable", "frozen"])
def test_fused_ce_gives_the_losses_and_gradients_of_the_checkpointed_ce(method, head):
    """`optim.fused_ce` (the CE's gradients formed in the forward pass) against the checkpointed CE: the same
    loss terms and gradients, with the step-wide denominators and without, for a trained head (full
    fine-tuning, tied to the embedding here) and a frozen one (which gets no gradient either way)."""
    cfg, model, items = setup(method)
    fused = load_config("tiny_synth", SMALL + [f"method={method}", *METHOD_EXTRA.get(method, []),
                                               "optim.fused_ce=true"])
    if head == "frozen":
        model.head.weight.requires_grad_(False)
    model.eval()  # no dropout draws: the two steps see the same model
    batch = make_batch(items, model.ids, cfg, buckets=1.25)
    for den in (None, {"ce_teacher": 37.0, "ce_student": 5.0}):
        log_a, g_a = run_step(model, batch, cfg, den)
        log_b, g_b = run_step(model, batch, fused, den)
        close(log_a, log_b)
        close(g_a, g_b)
        assert ("lm.model.embed_tokens.weight" in g_b) == (head == "trainable")  # (tied: frozen with the head)
        assert g_b and all(v.abs().max() > 0 for k, v in g_b.items() if "proj" in k)



@pytest.mark.parametrize("method", METHODS)
def test_label_buckets_give_the_same_losses_and_gradients_on_fewer_rows(method):
    """`optim.graph_label_buckets`: the label capacities are the labelled totals bucketed up the series, not the
    block areas. Every real label is kept once, the pads sit at distinct positions, and the losses and gradients
    equal the unpadded batch's."""
    cfg, model, items = setup(method, "optim.graph_label_buckets=1.5")
    area = make_batch(items, model.ids, setup(method)[0], buckets=1.25)
    plain = make_batch(items, model.ids, cfg)
    bucketed = make_batch(items, model.ids, cfg, buckets=1.25)
    coconut = method == "coconut"
    t_real, s_real = label_totals(items, with_cot=method not in ("nocot", "coconut"), cot_in_answer=coconut)
    for part, ref, real in (("teacher", area.teacher, t_real), ("student", area.student, s_real)):
        b = getattr(bucketed, part)
        if b is None:
            continue
        n = b.label_idx.numel()
        assert n == bucket_width(real, 1.5) and real <= n < ref.label_idx.numel(), (part, n, real)
        assert int((b.label_tgt != -100).sum()) == real  # every label, once
        assert b.label_idx.unique().numel() == n
        assert b.ids.shape == ref.ids.shape  # the block widths are those of the area layout
    assert batch_key(bucketed) != batch_key(area)
    den = {"ce_teacher": 37.0, "ce_student": 5.0}
    for d in (None, den):
        log_a, g_a = run_step(model, plain, cfg, d)
        log_b, g_b = run_step(model, bucketed, cfg, d)
        close(log_a, log_b)
        close(g_a, g_b)


def test_label_buckets_cut_the_lm_head_rows_on_gsm8k_lengths():
    """On GSM8k's lengths (eq and NL CoT, length-grouped micro-batches of 32 and 64, kava), bucketing the labelled
    totals (growth 1.5) runs the LM head on at most 1.35x the real label rows, where the block areas run it on
    over 1.7x (the teacher's alone; the student's answer block is mostly pads). The price: more shapes, up to
    twice as many (27 against 18 at eq, micro-batch 32, over these 160 micro-batches), so more captures and, past
    optim.max_graphs, eager micro-batches: what the GPU measurement has to weigh."""
    import random
    from pathlib import Path

    from kava.data.format import SpecialIds, Tokenized

    lengths = json.loads((Path(__file__).parents[1] / "benchmarks" / "gsm8k_lengths.json").read_text())
    ids = SpecialIds(bot=1000, eot=1001, latent=1002, pad=0, eos=999, bos=None)
    for style in ("eq", "nl"):
        items = [Tokenized([5] * q, [6] * c, [7] * 5, [8, 9, 999], i) for i, (q, c) in
                 enumerate(zip(lengths["question"], lengths["cot_" + style]))]
        for mb in (32, 64):
            rows, keys, teacher = {}, {}, {}
            for on in (False, True):
                rng = random.Random(0)  # the same micro-batches for both
                cfg = load_config("tiny_synth", ["method=kava", f"optim.graph_label_buckets={1.5 if on else 'null'}"])
                r = real = t_rows = t_real = 0
                ks = set()
                for _ in range(40):
                    grouped = sorted(rng.sample(items, 128), key=length_key)
                    for i in range(0, 128, mb):
                        b = make_batch(grouped[i:i + mb], ids, cfg, buckets=1.25)
                        r += b.teacher.label_idx.numel() + b.student.label_idx.numel()
                        real += int((b.teacher.label_tgt != -100).sum() + (b.student.label_tgt != -100).sum())
                        t_rows += b.teacher.label_idx.numel()
                        t_real += int((b.teacher.label_tgt != -100).sum())
                        ks.add(batch_key(b))
                rows[on], keys[on], teacher[on] = r / real, len(ks), t_rows / t_real
            assert rows[True] <= 1.35 and teacher[False] > 1.7, (style, mb, rows, teacher)
            assert keys[False] < keys[True] <= 2 * keys[False], (style, mb, keys)
