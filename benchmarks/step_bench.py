"""Training-step and evaluation throughput at real model shapes (random weights), fast path vs naive reference.

    python benchmarks/step_bench.py --shapes llama1b --cot eq,nl --out benchmarks/results/step_bench.json

For each model shape and CoT style: the time of one optimizer step (forward + backward + AdamW) at
micro-batch 32 with LoRA r=128 for `cot`, `pccot` and `kava`, a per-phase breakdown, tokens/s, MFU and
peak memory; the naive reference step (every sweep recomputes the whole sequence; importance read from
`output_attentions` under eager attention) measured in the same process; and a loss-equality check
between the fast and naive steps in float32. Evaluation: questions/s on 1,319 GSM8k-length questions in
latent mode vs cot mode (a fixed 65-token CoT).

FLOPs (for MFU) count the matmuls of every pass: per processed token 2·N_linear (forward) + 2·N_linear
(backward, input gradients; frozen base weights get no weight gradient) + 6·N_lora (adapter forward,
input and weight gradients) + attention (4·ctx·d_model forward, 8·ctx·d_model backward), plus the LM head
on labelled tokens only (3 × 2·d·V). Peak: 989 TFLOP/s (H100 SXM dense bf16).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from kava import eviction, losses
from kava.config import config_from_dict
from kava.data.format import SpecialIds, Tokenized
from kava.objective import loss_step, make_batch
from kava.model import capture
from kava.model.reasoner import LatentReasoner

SHAPES = {
    "llama1b": dict(family="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
                    head_dim=64),
    "qwen05b": dict(family="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                    num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "llama3b": dict(family="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                    num_attention_heads=24, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
                    head_dim=128),
}
SHAPES["tiny"] = dict(family="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True)
PEAK_TFLOPS = 989.0
COMPILE = False  # --compile: also time cot and kava with torch.compile'd decoder layers
FUSED_DROPOUT = False  # --fused-dropout: lora.fused_dropout (kava.model.lora_dropout)
NAIVE_CASTS = False  # --peft-casts: keep peft's default fp32 adapter-input casts (to measure their cost)
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # CPU only for a smoke test of the script


def reset_peak():
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else 0.0


def empty_cache():
    if DEV == "cuda":
        torch.cuda.empty_cache()


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()
LORA_BAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_PRESET = ["q_proj", "k_proj", "v_proj", "o_proj"]


def build(shape: str, targets: list[str], dtype=torch.bfloat16, lora_dropout: float = 0.1, eos_never: bool = False):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from kava.checkpoint.load import keep_adapter_inputs_in_compute_dtype, scratch_config
    from kava.model.lora_dropout import fuse_lora_dropout

    spec = dict(SHAPES[shape])
    hf = scratch_config(spec, spec["vocab_size"])
    torch.manual_seed(0)
    with torch.device(DEV):
        lm = AutoModelForCausalLM.from_config(hf, dtype=dtype, attn_implementation=capture.ATTN_IMPL)
    lm = get_peft_model(lm, LoraConfig(r=128, lora_alpha=32, lora_dropout=lora_dropout, target_modules=targets))
    if FUSED_DROPOUT:  # lora.fused_dropout
        fuse_lora_dropout(lm)
    if dtype != torch.float32 and not NAIVE_CASTS:
        keep_adapter_inputs_in_compute_dtype(lm)
    V = hf.vocab_size
    # eval: an eos id outside the vocabulary is never generated, so every question decodes the same length
    ids = SpecialIds(bot=V, eot=V + 1, latent=V + 2, pad=0, eos=V + 7 if eos_never else V - 1, bos=None)
    m = LatentReasoner(lm, ids).to(DEV)
    return m


def sample_items(n: int, style: str, lengths: dict, V: int, eos: int, seed: int = 0) -> list[Tokenized]:
    rng = random.Random(seed)
    items = []
    for i in range(n):
        j = rng.randrange(len(lengths["question"]))
        q = [rng.randrange(100, V) for _ in range(lengths["question"][j])]
        c = [rng.randrange(100, V) for _ in range(lengths["cot_" + style][j])]
        prompt = [100 + (x % (V - 100)) for x in (791, 4320, 374, 25, 220)]  # 5 fixed tokens (any ids work)
        ans = [rng.randrange(100, V - 1) for _ in range(2)] + [eos]
        items.append(Tokenized(q, c, prompt, ans, i))
    return items


def cfg_for(method: str, **kw):
    d = {"method": method, "model": {"name_or_path": "bench"},
         "loss": {"kv_loss": "smooth_l1", "kv_layer_std": True, "alpha_codi": 10, "alpha_kv": 1}}
    for k, v in kw.items():
        sec, key = k.split(".")
        d.setdefault(sec, {})[key] = v
    return config_from_dict(d)


class PhaseTimer:
    """Synchronising per-phase timer (only for the breakdown run; the timed steps never sync)."""

    def __init__(self):
        self.t: dict[str, float] = {}

    @contextmanager
    def __call__(self, name):
        sync()
        t0 = time.perf_counter()
        yield
        sync()
        self.t[name] = self.t.get(name, 0.0) + time.perf_counter() - t0


def naive_loss_step(model: LatentReasoner, batch, cfg):
    """Reference: eager attention + output_attentions for importance, full recomputation for each sweep."""
    tb, sb = batch.teacher, batch.student
    lm = model.causal_lm
    lm.set_attn_implementation("eager")
    try:
        out = model.decoder(inputs_embeds=model.embed(tb.ids), attention_mask=tb.mask, position_ids=tb.pos,
                            use_cache=True, output_hidden_states=True, output_attentions=True)
    finally:
        lm.set_attn_implementation(capture.ATTN_IMPL)
    B, C = tb.cot_idx.shape
    cache = out.past_key_values
    k_all = torch.stack([layer.keys for layer in cache.layers])
    v_all = torch.stack([layer.values for layer in cache.layers])
    L, _, Hkv, S, D = k_all.shape
    gidx = tb.cot_idx.view(1, B, 1, C, 1).expand(L, B, Hkv, C, D)
    cot_k, cot_v = torch.gather(k_all, 3, gidx), torch.gather(v_all, 3, gidx)
    imp = []
    for att in out.attentions:  # [B, H, S, S]
        H = att.shape[1]
        rows = torch.gather(att.float(), 2, tb.query_idx.view(B, 1, -1, 1).expand(B, H, tb.query_idx.shape[1], S))
        cols = torch.gather(rows, 3, tb.cot_idx.view(B, 1, 1, C).expand(B, H, rows.shape[2], C))
        w = tb.query_valid.float().view(B, 1, -1, 1)
        mean = (cols * w).sum(2) / w.sum(2).clamp(min=1)
        imp.append(mean.view(B, Hkv, H // Hkv, C).amax(2))
    importance = torch.stack(imp)
    sel = tb.targets != -100
    ce_t = losses.token_cross_entropy(model.logits(out.last_hidden_state[sel]), tb.targets[sel])
    t_hidden = model._at(out.hidden_states, tb.prompt_last)
    s = model.student_forward_naive(sb, cfg.latent.num_sweeps)
    idx, slot_mask = eviction.select_indices("rkv", keys=cot_k.detach(), importance=importance, valid=tb.cot_valid,
                                             num_slots=sb.num_latents, lam=cfg.eviction.lam)
    kv, _ = losses.kv_loss_over_sweeps(s.latent_k[-1:], s.latent_v[-1:], eviction.gather_slots(cot_k, idx),
                                       eviction.gather_slots(cot_v, idx), slot_mask, kind=cfg.loss.kv_loss,
                                       layer_std=cfg.loss.kv_layer_std)
    terms = {"ce_teacher": ce_t, "ce_student": losses.token_cross_entropy(s.logits, s.targets),
             "codi": losses.codi_loss(s.hidden, t_hidden), "kv": kv}
    total, log = losses.combine_losses(terms, {"ce_teacher": 1.0, "ce_student": 1.0, "codi": 10.0, "kv": 1.0})
    return total, {f"loss/{k}": v for k, v in log.items()}


def count_flops(model: LatentReasoner, batch, method: str, cfg) -> float:
    """Matmul FLOPs of one training micro-step (see module docstring)."""
    c = model.config
    d, L, V = c.hidden_size, c.num_hidden_layers, c.vocab_size
    n_lin = sum(p.numel() for n, p in model.decoder.named_parameters()
                if p.dim() == 2 and "embed" not in n and "lora" not in n)
    n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)

    def pass_flops(tokens: int, ctx: float) -> float:
        return tokens * (4 * n_lin + 6 * n_lora + 12 * ctx * d * L)

    tb = batch.teacher
    T_len = tb.mask.sum(1).float()
    f = pass_flops(int(T_len.sum()), float(T_len.mean()) / 2)
    f += 6 * d * V * int((tb.targets != -100).sum())
    if batch.student is not None:
        sb = batch.student
        B, M, Qb = sb.ids.shape[0], sb.num_latents, sb.q_block
        q = sb.mask[:, :Qb].sum(1).float().mean()
        shared = tb.q_block is not None  # the question ran once, in the teacher pass (`loss_step`)
        f += pass_flops(B * (1 + M) if shared else B * (Qb + M), float(q + M) / 2)  # prefix
        f += cfg.latent.num_sweeps * pass_flops(B * M, float(q + M / 2))
        A = sb.ids.shape[1] - Qb - M
        f += pass_flops(B * A, float(q + M + A / 2))
        f += 6 * d * V * int((sb.targets != -100).sum())
    return f


def device_batch(items, model, cfg, buckets: float | None = None):
    """`make_batch` on the benchmark device (`buckets`: the static layout of CUDA graphs)."""
    batch = make_batch(items, model.ids, cfg, buckets=buckets)
    batch.teacher = batch.teacher.to(DEV)
    batch.student = batch.student.to(DEV) if batch.student else None
    return batch


def optimizer_step_fn(model, opt, batch, cfg, loss_fn=loss_step):
    """One training step (bf16 autocast forward, backward, AdamW) as a closure to time."""

    def step():
        with torch.autocast(DEV, dtype=torch.bfloat16):
            total, _ = loss_fn(model, batch, cfg)
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def time_steps(fn, n: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def bench_train(shape, style, targets, lengths, reps, micro_batch, methods, naive=True, check_equal=True):
    model = build(shape, targets)
    model.train()
    V = model.config.vocab_size
    items = sample_items(micro_batch, style, lengths, V, model.ids.eos, seed=1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=DEV == "cuda")
    rows = {}
    for method in methods:
        cfg = cfg_for(method)
        batch = device_batch(items, model, cfg)
        reset_peak()
        times = time_steps(optimizer_step_fn(model, opt, batch, cfg), reps)
        peak = peak_gib()
        timer = PhaseTimer()
        with torch.autocast(DEV, dtype=torch.bfloat16):
            total, _ = loss_step(model, batch, cfg, timer=timer)
        with timer("backward"):
            total.backward()
        with timer("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
        med = statistics.median(times)
        flops = count_flops(model, batch, method, cfg)
        ntok = batch.num_tokens
        rows[method] = {"median_s": med, "min_s": min(times), "max_s": max(times), "reps": len(times),
                        "tokens_per_s": ntok / med, "mfu": flops / med / (PEAK_TFLOPS * 1e12),
                        "tflops_per_step": flops / 1e12, "peak_gib": peak,
                        "breakdown_s": {k: round(v, 4) for k, v in timer.t.items()}}
        print(f"  {shape:8s} {style:2s} {method:6s} median {med:.3f}s [{min(times):.3f}, {max(times):.3f}] "
              f"MFU {rows[method]['mfu']:.1%} peak {peak:.1f} GiB  {rows[method]['breakdown_s']}", flush=True)
    if COMPILE:
        model.compile_layers()
        for method in [m for m in methods if m in ("cot", "kava")]:
            cfg = cfg_for(method)
            batch = device_batch(items, model, cfg)
            reset_peak()
            times = time_steps(optimizer_step_fn(model, opt, batch, cfg), reps, warmup=4)
            med = statistics.median(times)
            rows[method + "+compile"] = {"median_s": med, "min_s": min(times), "max_s": max(times),
                                         "reps": len(times), "peak_gib": peak_gib(),
                                         "mfu": count_flops(model, batch, method, cfg) / med / (PEAK_TFLOPS * 1e12)}
            print(f"  {shape:8s} {style:2s} {method}+compile median {med:.3f}s [{min(times):.3f}, {max(times):.3f}] "
                  f"MFU {rows[method + '+compile']['mfu']:.1%} peak {peak_gib():.1f} GiB", flush=True)
    if naive:
        cfg = cfg_for("kava")
        batch = device_batch(items, model, cfg)
        reset_peak()
        times = time_steps(optimizer_step_fn(model, opt, batch, cfg, naive_loss_step), max(3, reps // 2), warmup=1)
        med = statistics.median(times)
        rows["naive_kava"] = {"median_s": med, "min_s": min(times), "max_s": max(times), "reps": len(times),
                              "peak_gib": peak_gib()}
        rows["speedup_vs_naive"] = med / rows["kava"]["median_s"]
        print(f"  {shape:8s} {style:2s} naive  median {med:.3f}s  -> kava is {rows['speedup_vs_naive']:.2f}x faster",
              flush=True)
    if check_equal:
        rows["equality_fp32"] = loss_equality(shape, targets, lengths, style)
    del model, opt
    empty_cache()
    return rows


def loss_equality(shape, targets, lengths, style, n=8):
    """Fast vs naive loss terms in float32, dropout off: relative differences."""
    model = build(shape, targets, dtype=torch.float32, lora_dropout=0.0)
    model.eval()
    items = sample_items(n, style, lengths, model.config.vocab_size, model.ids.eos, seed=2)
    cfg = cfg_for("kava")
    batch = device_batch(items, model, cfg)
    with torch.no_grad():
        _, fast = loss_step(model, batch, cfg)
        _, ref = naive_loss_step(model, batch, cfg)
    out = {k: abs(float(fast[k]) - float(ref[k])) / max(abs(float(ref[k])), 1e-12) for k in ref}
    print(f"  {shape:8s} {style:2s} fast vs naive relative diff (fp32): {out}", flush=True)
    del model
    empty_cache()
    return out


def profile_call(fn, out_path, label: str = ""):
    """Profile one call of `fn`: wall time, kernel count, GPU busy fraction, top ops by device time."""
    from torch.profiler import ProfilerActivity, profile

    sync()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])) as prof:
        t0 = time.perf_counter()
        fn()
        sync()
        wall = time.perf_counter() - t0
    ka = prof.key_averages()
    table = ka.table(sort_by="cuda_time_total" if DEV == "cuda" else "cpu_time_total", row_limit=30)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time for e in kernels) / 1e6 if kernels else 0.0
    summary = f"{label}wall {wall:.3f}s, {len(kernels)} kernels, kernel time {busy:.3f}s ({busy / wall:.0%} busy)\n"
    with open(out_path, "a") as f:
        f.write(summary + table + "\n")
    print("  profile:", summary, flush=True)


def profile_kava(shape, style, lengths, micro_batch, out_path):
    """One profiled kava step: top kernels by CUDA time, kernel-launch count, GPU busy fraction."""
    model = build(shape, LORA_BAR)
    model.train()
    items = sample_items(micro_batch, style, lengths, model.config.vocab_size, model.ids.eos, seed=1)
    cfg = cfg_for("kava")
    batch = device_batch(items, model, cfg)

    def step():
        with torch.autocast(DEV, dtype=torch.bfloat16):
            total, _ = loss_step(model, batch, cfg)
        total.backward()
        model.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    profile_call(step, out_path)
    del model
    empty_cache()


def bench_eval(shape, lengths, n_questions=1319, batch_size=128, cot_tokens=65, profile_path=None):
    """Questions/s of `generate` in latent and cot mode at one batch size, for each decoder this kava has:
    `graphs` (the static-cache step replayed as CUDA graphs, `kava.decode.DecodeGraphs`) and `static` (the same
    step eager) in a kava with them, `dynamic` (the growing DynamicCache) in one before them (BASE=...).
    Batch sizes below 64 time 8 batches, not 1,319 questions; `latency_s` is the mean wall time of one batch."""
    import contextlib

    import kava.decode as decode

    model = build(shape, LORA_PRESET, eos_never=True)
    model.eval()
    V = model.config.vocab_size
    n_questions = n_questions if batch_size >= 64 else min(n_questions, 8 * batch_size)
    items = sample_items(n_questions, "eq", lengths, V, model.ids.eos, seed=3)
    decoders = ("graphs", "static") if hasattr(decode, "DecodeGraphs") else ("dynamic",)
    res, tokens = {}, {}
    for decoder in decoders:
        for mode, kw in (("latent", dict(max_new_tokens=4)),
                         ("cot", dict(max_new_tokens=4, max_cot_tokens=cot_tokens))):
            graphs = decode.DecodeGraphs(model) if decoder == "graphs" else None
            if graphs is not None:
                kw = dict(kw, graphs=graphs)
            with torch.autocast(DEV, dtype=torch.bfloat16):  # warm-up (kernel selection, allocator, captures)
                for i in range(0, min(n_questions, 4 * batch_size), batch_size):
                    decode.generate(model, items[i:i + batch_size], mode=mode, num_latents=24, num_sweeps=3, **kw)
            passes, batches, toks = 0, 0, []
            sync()
            t0 = time.perf_counter()
            for i in range(0, n_questions, batch_size):
                with torch.autocast(DEV, dtype=torch.bfloat16):
                    gens = decode.generate(model, items[i:i + batch_size], mode=mode, num_latents=24, num_sweeps=3,
                                           **kw)
                passes += sum(g.forward_passes for g in gens)
                toks += [g.token_ids for g in gens]
                batches += 1
            sync()
            wall = time.perf_counter() - t0
            key = mode if decoder == decoders[0] else f"{mode}/{decoder}"
            res[key] = {"decoder": decoder, "questions_per_s": n_questions / wall, "wall_s": wall,
                        "latency_s": wall / batches, "forward_passes_per_q": passes / n_questions,
                        "peak_gib": peak_gib(),
                        **({"graphs": graphs.off or f"{graphs.captured} captured"} if graphs is not None else {})}
            if key != mode:  # the same step replayed and run eagerly: the same tokens?
                same = sum(a == b for a, b in zip(toks, tokens[mode]))
                res[key]["same_tokens_as_" + decoders[0]] = f"{same}/{len(toks)}"
                print(f"  eval {shape} batch {batch_size} {decoder} {mode}: {same}/{len(toks)} generations equal to "
                      f"{decoders[0]}'s", flush=True)
            tokens[mode] = toks
            print(f"  eval {shape} batch {batch_size} {decoder:7s} {mode:6s} {n_questions / wall:8.1f} q/s  "
                  f"{wall / batches * 1e3:8.1f} ms/batch  {passes / n_questions:.1f} passes/q"
                  f"{'  graphs ' + res[key]['graphs'] if graphs is not None else ''}", flush=True)
            del graphs
            empty_cache()
    res["latent_speedup"] = res["latent"]["questions_per_s"] / res["cot"]["questions_per_s"]
    if profile_path:  # one batch of each mode
        for mode, kw in (("latent", dict(max_new_tokens=4)), ("cot", dict(max_new_tokens=4, max_cot_tokens=cot_tokens))):
            def one():
                with torch.autocast(DEV, dtype=torch.bfloat16):
                    decode.generate(model, items[:batch_size], mode=mode, num_latents=24, num_sweeps=3, **kw)
            profile_call(one, profile_path, label=f"eval {mode} batch {batch_size}: ")
    del model
    empty_cache()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="llama1b")
    ap.add_argument("--cot", default="eq,nl")
    ap.add_argument("--methods", default="cot,pccot,kava")
    ap.add_argument("--targets", default="bar,preset")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--no-naive", action="store_true")
    ap.add_argument("--eval", action="store_true")
    ap.add_argument("--eval-only", action="store_true", help="only the evaluation-throughput benchmark")
    ap.add_argument("--profile", help="write a profiler table of one LLaMA-shape kava step here")
    ap.add_argument("--lengths", default=str(Path(__file__).with_name("gsm8k_lengths.json")))
    ap.add_argument("--out", default="benchmarks/results/step_bench.json")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--peft-casts", action="store_true")
    ap.add_argument("--eval-profile", help="append profiler tables of one eval batch per mode here")
    ap.add_argument("--eval-batch-sizes", default="128", help="evaluation batch sizes, e.g. 64,128,256")
    ap.add_argument("--eval-questions", type=int, default=1319,
                    help="questions timed per batch size (below batch 64: at most 8 batches)")
    a = ap.parse_args()
    global COMPILE, NAIVE_CASTS
    COMPILE, NAIVE_CASTS = a.compile, a.peft_casts
    lengths = json.load(open(a.lengths))
    import transformers, peft

    result = {"device": torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu", "torch": torch.__version__,
              "transformers": transformers.__version__, "peft": peft.__version__, "command": " ".join(sys.argv),
              "micro_batch": a.micro_batch, "train": {}, "eval": {}}
    if a.profile:
        profile_kava(a.shapes.split(",")[0], "nl", lengths, a.micro_batch, a.profile)
    for shape in a.shapes.split(","):
        for tname in ([] if a.eval_only else a.targets.split(",")):
            targets = LORA_BAR if tname == "bar" else LORA_PRESET
            for style in a.cot.split(","):
                first = tname == a.targets.split(",")[0]
                key = f"{shape}/{style}/{tname}"
                result["train"][key] = bench_train(shape, style, targets, lengths, a.reps, a.micro_batch,
                                                   a.methods.split(","), naive=first and not a.no_naive,
                                                   check_equal=first and not a.no_naive)
                Path(a.out).parent.mkdir(parents=True, exist_ok=True)
                json.dump(result, open(a.out, "w"), indent=2)
        if a.eval or a.eval_only:
            for bs in (int(x) for x in a.eval_batch_sizes.split(",")):
                result["eval"][f"{shape}/batch{bs}"] = bench_eval(shape, lengths, batch_size=bs, profile_path=a.eval_profile,
                                                                  n_questions=a.eval_questions)
                json.dump(result, open(a.out, "w"), indent=2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
