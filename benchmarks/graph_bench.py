"""CUDA graphs of the micro-step (`optim.cuda_graphs`) against the eager step, in one process.

    python benchmarks/graph_bench.py --synth --llama1b --out benchmarks/results/graph_bench.json

--synth: the real trainer stages (`kava.train`: data, model, `train_step`) on the synthetic testbeds' shapes
  (synth_depth: 4 layers d=256; synth24m: 8 layers d=512), micro-batch 128, every method, eager then graphed
  from the same seed: seconds per optimizer step (median after the warm-up steps that capture), and the
  largest relative difference of the logged losses over the steps and of the weights after them.
--llama1b: LLaMA-3.2-1B shape (random weights, bf16, LoRA r=128 on the 7 linears), M=24, T=3, GSM8k lengths
  (eq / NL CoT): 4 distinct optimizer steps of effective batch 128 at micro-batch 32 and 64, split into
  micro-batches as the trainer does (grouped by length), eager vs graphed; samples/s and peak memory; and the
  losses and gradients of both paths on one micro-batch with dropout off.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import kava.train as kt  # noqa: E402
import step_bench as sb  # noqa: E402
from step_bench import sync  # noqa: E402
from kava.config import load_config  # noqa: E402
from kava.training.graphs import EagerReplay, GraphedStep, batch_key, graph_micro_step  # noqa: E402
from kava.objective import length_key, loss_step  # noqa: E402
from kava.model.capture import no_host_sync  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BACKEND = None  # CPU smoke test of this script: the graphs' stand-in (replay = re-run on the static buffers)
SHAPE = "llama1b"
OUT_PATH: Path | None = None
REPEAT_EAGER = False
LORA_DROPOUT = 0.1
FUSED_CE = False  # --fused-ce: optim.fused_ce
LABEL_BUCKETS = None  # --label-buckets G: optim.graph_label_buckets
LARGEST_FIRST = False  # --largest-first: the largest shape captured first (GraphedStep.precapture, as kava train does)


def dump(out: dict) -> None:
    """Write what is measured so far (a run cut short by a time limit still leaves its rows)."""
    if OUT_PATH is not None:
        OUT_PATH.parent.mkdir(parents=True, exist_ok=True)
        OUT_PATH.write_text(json.dumps(out, indent=1))
SYNTH = {
    "synth_depth": ["model.from_scratch.family=llama", "model.from_scratch.hidden_size=256",
                    "model.from_scratch.intermediate_size=768", "model.from_scratch.num_hidden_layers=4",
                    "model.from_scratch.num_attention_heads=4", "model.from_scratch.num_key_value_heads=2",
                    "model.from_scratch.max_position_embeddings=1024", "model.from_scratch.tie_word_embeddings=true"],
    "synth24m": ["model.from_scratch.family=llama", "model.from_scratch.hidden_size=512",
                 "model.from_scratch.intermediate_size=1536", "model.from_scratch.num_hidden_layers=8",
                 "model.from_scratch.num_attention_heads=8", "model.from_scratch.num_key_value_heads=2",
                 "model.from_scratch.max_position_embeddings=1024", "model.from_scratch.tie_word_embeddings=true"],
}


class NoLog:
    def log(self, *a, **k):
        pass


def trainer_steps(cfg, steps: int, root: Path, force_eager: bool = False):
    """Run `steps` optimizer steps through the trainer's own stages; (per-step seconds, losses, weights, stats).
    force_eager: graph mode exactly (the same micro-step function on the same padded batches), but "replayed"
    by running it eagerly (`EagerReplay`): the reference a graph replay must equal."""
    acc = kt.setup_accelerator(cfg)
    run_dir, _ = kt.setup_run_dir(cfg, None, True)
    data = kt.setup_data(cfg, run_dir, acc, data_root=root)
    plan = kt.make_plan(cfg, len(data.items), 1)
    t = kt.setup_model_and_optimizer(cfg, data.tokenizer, acc)
    if force_eager:
        t.graphs.backend = EagerReplay()
    t.raw.train()
    times, losses = [], []
    for step in range(steps):
        for g in t.opt.param_groups:
            g["lr"] = cfg.optim.lr
        sync()
        t0 = time.perf_counter()
        r = kt.train_step(t, data.items, kt.batch_indices(cfg, plan, len(data.items), step), accum=plan.accum,
                          step=step, logger=NoLog())
        sync()
        times.append(time.perf_counter() - t0)
        losses.append({k: float(v) for k, v in r.sums.items() if k.startswith("loss/")})
    weights = {n: p.detach().float().cpu() for n, p in t.raw.named_parameters() if p.requires_grad}
    stats = t.graphs.stats() if t.graphs is not None else {}
    return times, losses, weights, stats


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def bench_synth(steps: int, warm: int, out: dict, shapes, methods):
    root = Path(tempfile.mkdtemp(prefix="kava_graph_bench_"))
    for shape in shapes:
        spec = SYNTH[shape]
        for method in methods:
            row = {}
            try:
                res = {}
                runs = [("eager", False, False), ("eager_padded", True, True), ("graphs", True, False)]
                if REPEAT_EAGER:  # the eager reference twice: is it deterministic by itself?
                    runs.append(("eager_padded_again", True, True))
                for name, graphs, force in runs:
                    cfg = load_config("synth_depth_student", spec + [
                        f"method={method}", "model.init_from=null", "data.synth_train_size=8000",
                        "data.synth_eval_size=50", "data.valid_limit=10", f"optim.cuda_graphs={graphs}",
                        "run.grad_share_every=0", "run.log=[jsonl]", f"run.output_dir={root}",
                        f"run.name={shape}_{method}_{name}"])
                    res[name] = trainer_steps(cfg, steps, root, force_eager=force)

                def diff(x, y):
                    (_, lx, wx, _), (_, ly, wy, _) = res[x], res[y]
                    return {"max_rel_loss_diff": max(rel(a[k], b[k]) for a, b in zip(lx, ly) for k in b),
                            "max_rel_weight_diff": max(((wx[n] - wy[n]).abs().max() / wy[n].abs().max()
                                                        .clamp_min(1e-12)).item() for n in wy)}

                te, tg, st = res["eager"][0], res["graphs"][0], res["graphs"][3]
                me, mg = statistics.median(te[warm:]), statistics.median(tg[warm:])
                same = diff("graphs", "eager_padded")
                if REPEAT_EAGER:
                    print(f"{shape} {method}: eager vs eager again (same padded batches):",
                          diff("eager_padded_again", "eager_padded"), flush=True)
                row = {"eager_s": me, "graphs_s": mg, "speedup": me / mg, "first_steps_graphs_s": tg[:warm],
                       "eager_padded_s": statistics.median(res["eager_padded"][0][warm:]),
                       "graphs_vs_eager_padded": same, "eager_padded_vs_eager": diff("eager_padded", "eager"),
                       "loss_total_per_step": {k: [x["loss/total"] for x in res[k][1]] for k in res}, **st}
                print(f"{shape:11s} {method:6s} eager {me * 1e3:7.1f} ms/step  graphs {mg * 1e3:7.1f} ms/step  "
                      f"x{me / mg:5.2f}  graphs vs eager on the padded batches: {same}  {st}", flush=True)
            except Exception as e:  # report and go on: one failure must not cost the other measurements
                traceback.print_exc()
                row = {"error": repr(e)}
            out.setdefault("synth", {}).setdefault(shape, {})[method] = row
            dump(out)


def step_micro_batches(items, mb: int, group: bool):
    """One optimizer step's micro-batches, as `kava.train.train_step` forms them (`optim.group_by_length`)."""
    order = sorted(items, key=length_key) if group else list(items)
    return [order[i:i + mb] for i in range(0, len(order), mb)]


def bench_llama(out: dict, micro_batches=(32, 64), styles=("eq", "nl"), reps: int = 3, methods=("kava", "pccot"),
                steps: int = 4, group: bool = True, modes=("eager", "graphs")):
    """`steps` distinct optimizer steps of 128 GSM8k-length samples, each split as the trainer does; one warm-up
    pass over all of them (it captures every shape), then `reps` timed passes: samples/s and peak memory."""
    lengths = json.loads((Path(__file__).parent / "gsm8k_lengths.json").read_text())
    for style in styles:
        for mb in micro_batches:
            for method in methods:
                row = {"steps": steps, "group_by_length": group, "lora_dropout": LORA_DROPOUT,
                       "fused_dropout": sb.FUSED_DROPOUT, "fused_ce": FUSED_CE, "graph_label_buckets": LABEL_BUCKETS,
                       "largest_first": LARGEST_FIRST}
                try:
                    model = sb.build(SHAPE, sb.LORA_BAR, lora_dropout=LORA_DROPOUT)
                    model.train()
                    cfg = sb.cfg_for(method, **({"optim.fused_ce": True} if FUSED_CE else {}),
                                     **({"optim.graph_label_buckets": LABEL_BUCKETS} if LABEL_BUCKETS else {}))
                    items = sb.sample_items(128 * steps, style, lengths, model.config.vocab_size, model.ids.eos, seed=1)
                    params = [p for p in model.parameters() if p.requires_grad]
                    opt = torch.optim.AdamW(params, lr=1e-5, fused=DEV == "cuda")
                    accum = 128 // mb
                    for key in modes:
                        graphs = key == "graphs"
                        pad = 1.25 if graphs else None
                        plan = [[sb.device_batch(m, model, cfg, pad) for m in step_micro_batches(
                            items[s * 128:(s + 1) * 128], mb, group)] for s in range(steps)]
                        gs = GraphedStep(functools.partial(graph_micro_step, model, cfg, accum, DEV), params,
                                         max_graphs=32, backend=BACKEND) if graphs else None
                        if gs is not None and LARGEST_FIRST:
                            gs.precapture([b for bs in plan for b in bs])

                        def run():
                            for batches in plan:
                                for b in batches:
                                    # eager: no host reads either (as in training); also where a graph is refused
                                    if gs is None or gs(b) is None:  # (None: not graphed, e.g. capture out of memory)
                                        with torch.autocast(DEV, dtype=torch.bfloat16), no_host_sync():
                                            total, _ = loss_step(model, b, cfg)
                                        (total / accum).backward()
                                opt.step()
                                opt.zero_grad(set_to_none=gs is None)

                        torch.cuda.reset_peak_memory_stats()
                        # cudaMalloc retries (the allocator freed its cache and synchronised to find room): a step
                        # near the card's memory pays for them, which a peak alone does not show
                        retries0 = torch.cuda.memory_stats().get("num_alloc_retries", 0)
                        times = sb.time_steps(run, reps, warmup=1)  # the warm-up pass captures every shape
                        med = statistics.median(times) / steps
                        row[key] = {"s_per_opt_step": med, "samples_per_s": 128 / med, "peak_gib":
                                    torch.cuda.max_memory_allocated() / 2**30,
                                    "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
                                    "alloc_retries": torch.cuda.memory_stats().get("num_alloc_retries", 0) - retries0,
                                    "shapes": len({batch_key(b) for bs in plan for b in bs}), **(gs.stats() if gs else {})}
                        print(f"{SHAPE} {style} mb{mb} {method:5s} {key:6s} p={LORA_DROPOUT}{' fused' if sb.FUSED_DROPOUT else ''}{' fused-ce' if FUSED_CE else ''}{f' label-buckets {LABEL_BUCKETS}' if LABEL_BUCKETS else ''}{' largest-first' if LARGEST_FIRST else ''} {med:.3f} s/step (128 samples) "
                              f"{128 / med:6.1f} samples/s  peak {row[key]['peak_gib']:.1f} GiB (reserved {row[key]['peak_reserved_gib']:.1f}) "
                              f"({row[key]['shapes']} shapes, {row[key]['alloc_retries']} alloc retries)", flush=True)
                        if gs is not None:  # free the graphs' memory pool before the next measurement
                            gs.graphs.clear()
                        del gs, run, plan
                        opt.zero_grad(set_to_none=True)
                        gc.collect()
                        torch.cuda.empty_cache()
                    if "eager" in row and "graphs" in row:
                        row["speedup"] = row["eager"]["s_per_opt_step"] / row["graphs"]["s_per_opt_step"]
                except Exception as e:
                    traceback.print_exc()
                    row["error"] = repr(e)
                model = opt = params = None  # nothing of this model may outlive its row
                gc.collect()
                torch.cuda.empty_cache()
                out.setdefault("llama1b", {}).setdefault(style, {}).setdefault(f"mb{mb}", {})[method] = row
                dump(out)


def llama_equality(out: dict, style: str = "eq", mb: int = 16):
    """Losses and gradients, eager vs one graph replay, dropout off (bf16)."""
    lengths = json.loads((Path(__file__).parent / "gsm8k_lengths.json").read_text())
    try:
        model = sb.build(SHAPE, sb.LORA_BAR, lora_dropout=0.0)
        model.train()
        with torch.no_grad():  # LoRA B starts at 0: give the adapters a gradient path that matters
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 1e-3)
        cfg = sb.cfg_for("kava")
        items = sb.sample_items(mb, style, lengths, model.config.vocab_size, model.ids.eos, seed=2)
        params = [p for p in model.parameters() if p.requires_grad]
        res = {}
        for name, pad, graphs in (("eager", None, False), ("eager_padded", 1.25, False), ("graphs", 1.25, True)):
            b = sb.device_batch(items, model, cfg, pad)
            model.zero_grad(set_to_none=not graphs)
            fn = functools.partial(graph_micro_step, model, cfg, 1, DEV)
            if graphs:
                gs = GraphedStep(fn, params, backend=BACKEND)
                log = gs(b)
                for p in params:  # one clean replay: zero, replay once
                    p.grad.zero_()
                log = gs(b)
            else:
                log = fn(b)
            res[name] = ({k: float(v) for k, v in log.items()}, [p.grad.detach().float().clone() for p in params])

        def diff(x, y):
            (lx, gx), (ly, gy) = res[x], res[y]
            return {"max_rel_loss_diff": max(rel(lx[k], ly[k]) for k in ly),
                    "max_rel_grad_diff": max(((a - b).norm() / b.norm().clamp_min(1e-12)).item()
                                             for a, b in zip(gx, gy))}

        out["equality_bf16"] = {"graphs_vs_eager_same_padded_batch": diff("graphs", "eager_padded"),
                                "padded_vs_unpadded_eager": diff("eager_padded", "eager"),
                                "graphs_vs_eager_unpadded": diff("graphs", "eager")}
        print("llama1b eager vs graphs (bf16, dropout 0):", out["equality_bf16"], flush=True)
    except Exception as e:
        traceback.print_exc()
        out["equality_bf16"] = {"error": repr(e)}


def cpu_smoke_setup():
    global BACKEND, SHAPE
    BACKEND, SHAPE = EagerReplay(), "tiny"
    real = kt.setup_graphs
    kt.setup_graphs = lambda c, a, r, backend=None: real(c, a, r, backend=BACKEND)
    torch.cuda.reset_peak_memory_stats = lambda: None
    torch.cuda.max_memory_allocated = lambda: 0
    torch.cuda.max_memory_reserved = lambda: 0
    torch.cuda.memory_stats = lambda: {}
    torch.cuda.empty_cache = lambda: None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--synth", action="store_true")
    ap.add_argument("--llama1b", action="store_true")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warm", type=int, default=5, help="first steps excluded from the median (captures)")
    ap.add_argument("--micro-batches", default="32,64")
    ap.add_argument("--styles", default="eq,nl")
    ap.add_argument("--methods", default="kava,pccot,codi,nocot,cot", help="synthetic methods")
    ap.add_argument("--shapes", default="synth_depth,synth24m", help="synthetic shapes")
    ap.add_argument("--llama-methods", default="kava,pccot")
    ap.add_argument("--llama-steps", type=int, default=4, help="distinct optimizer steps timed per pass")
    ap.add_argument("--llama-modes", default="eager,graphs")
    ap.add_argument("--no-group", action="store_true", help="micro-batches in sampling order (no length grouping)")
    ap.add_argument("--lora-dropout", type=float, default=0.1)
    ap.add_argument("--fused-dropout", action="store_true", help="lora.fused_dropout (kava.model.lora_dropout)")
    ap.add_argument("--fused-ce", action="store_true", help="optim.fused_ce (kava.losses.fused_head_cross_entropy)")
    ap.add_argument("--label-buckets", type=float, default=None, metavar="G",
                    help="optim.graph_label_buckets=G (kava.data.format.block_widths)")
    ap.add_argument("--shape", default=None, help="the --llama1b run's model shape (step_bench.SHAPES: llama1b, "
                    "qwen05b, llama3b); default llama1b")
    ap.add_argument("--largest-first", action="store_true", help="capture the largest shape first (GraphedStep.precapture)")
    ap.add_argument("--skip-equality", action="store_true", help="skip the LLaMA-shape eager-vs-graph check")
    ap.add_argument("--repeat-eager", action="store_true", help="synthetic: run the eager reference twice")
    ap.add_argument("--out", default="benchmarks/results/graph_bench.json")
    args = ap.parse_args()
    global OUT_PATH, REPEAT_EAGER, LORA_DROPOUT, FUSED_CE, LABEL_BUCKETS, LARGEST_FIRST, SHAPE
    OUT_PATH, REPEAT_EAGER, LORA_DROPOUT = Path(args.out), args.repeat_eager, args.lora_dropout
    sb.FUSED_DROPOUT = args.fused_dropout
    FUSED_CE, LABEL_BUCKETS, LARGEST_FIRST = args.fused_ce, args.label_buckets, args.largest_first
    SHAPE = args.shape or SHAPE
    if DEV == "cpu":
        cpu_smoke_setup()
    out = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu", "torch": torch.__version__}
    import transformers

    out["transformers"] = transformers.__version__
    if args.synth:
        bench_synth(args.steps, args.warm, out, args.shapes.split(","), args.methods.split(","))
    if args.llama1b:
        if not args.skip_equality:
            llama_equality(out)
        bench_llama(out, tuple(int(x) for x in args.micro_batches.split(",")), args.styles.split(","),
                    methods=args.llama_methods.split(","), steps=args.llama_steps, group=not args.no_group,
                    modes=args.llama_modes.split(","))
    dump(out)


if __name__ == "__main__":
    main()
