"""The real `kava train` loop on a preset: steps/s per variant, and where a step's wall time goes.

    python benchmarks/train_loop_bench.py --preset mult4_scratch --steps 400 --profile-steps 60 \
        --set data.valid_source=DATA/multiplication/4x4/valid.txt \
        --variant icot=method=icot,icot.tokens_per_epoch=0.2 --variant cot=method=cot \
        --out $OUT/loop_bench.json

Each variant is one `kava.train.train(cfg, stop_after=steps)` in its own run directory (the synthetic data is
generated once, under --workdir). Steps/s is the median of the run's train lines after the first (which holds
the CUDA-graph captures). With --profile-steps K, a second run of K steps goes under torch.profiler and the
script prints what share of the wall time the GPU was busy (the union of kernel intervals) and the host calls
that waited longest: a step that is host-bound leaves the GPU idle, one that is GPU-bound waits in the sync.

The default data size (20,000) is small to keep the set-up short; pass icot.tokens_per_epoch scaled by
20,000 / 808,000 to keep the official removal rate per step (8 per epoch -> 0.198).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

from kava.config import load_config
from kava.train import train


def busy_share(prof, skip: int = 10) -> tuple[float, float, int]:
    """Over the optimizer steps after the first `skip` (from the start of step skip+1's `Optimizer.step` to the
    end of the last one): (the share of that window in which at least one GPU kernel ran, the window's
    seconds per step, the steps in it). Kernel intervals are merged, so overlapping kernels count once."""
    # the host-side record of each step (the profiler also mirrors it as a GPU annotation: not counted)
    opt = sorted((e.time_range for e in prof.events() if e.name.startswith("Optimizer.step")
                  and e.device_type == torch.autograd.DeviceType.CPU), key=lambda r: r.start)
    if len(opt) <= skip + 1:
        raise ValueError(f"only {len(opt)} optimizer steps profiled; need more than {skip + 1}")
    w0, w1 = opt[skip].start, opt[-1].end
    spans = sorted((max(e.time_range.start, w0), min(e.time_range.end, w1)) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith("Optimizer.")
                   and e.time_range.end > w0
                   and e.time_range.start < w1)
    busy, end = 0.0, float("-inf")
    for s, e in spans:
        if s > end:
            busy += e - s
            end = e
        elif e > end:
            busy += e - end
            end = e
    n = len(opt) - 1 - skip
    return busy / (w1 - w0), (w1 - w0) / 1e6 / n, n  # time_range is in microseconds


def run_variant(name: str, sets: list[str], args, *, steps: int, profile: bool) -> dict:
    out = Path(args.workdir)
    cfg = load_config(args.preset, [*args.set, *sets, f"run.output_dir={out}", f"run.name={name}",
                                    f"data.synth_train_size={args.train_size}", "data.synth_exclude=[]",
                                    "run.eval_every=1000000", "run.save_every=1000000", "run.log_every=50"])
    shutil.rmtree(out / name, ignore_errors=True)
    if not profile:
        t0 = time.perf_counter()
        run_dir = train(cfg, progress=False, stop_after=steps)
        wall = time.perf_counter() - t0
        if steps < 100:
            raise SystemExit(f"--steps {steps}: at least 100 (train lines come every 50 steps; the first is dropped)")
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        rates = [x["steps_per_s"] for x in lines if x.get("split") == "train" and "steps_per_s" in x][1:]
        toks = [x["tokens_per_s"] for x in lines if x.get("split") == "train" and "tokens_per_s" in x][1:]
        peak = max((x.get("peak_mem_gib", 0.0) for x in lines), default=0.0)
        graphs = {k: v for k, v in lines[-1].items() if k.startswith("graphs/")}
        return {"variant": name, "sets": sets, "steps": steps, "wall_s": wall,
                "steps_per_s": statistics.median(rates) if rates else None,
                "tokens_per_s": statistics.median(toks) if toks else None, "peak_mem_gib": peak, **graphs}
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                    if torch.cuda.is_available() else [])
    with torch.profiler.profile(activities=acts) as prof:
        t0 = time.perf_counter()
        train(cfg, progress=False, stop_after=steps)
        wall = time.perf_counter() - t0
    waits = {}
    for e in prof.key_averages():
        if e.key.startswith(("cuda", "aten::item", "aten::_local_scalar_dense", "aten::copy_", "Optimizer")):
            waits[e.key] = e.cpu_time_total / 1e6
    top = dict(sorted(waits.items(), key=lambda kv: -kv[1])[:8])
    res = {"variant": name + "+profile", "steps": steps, "wall_s": wall,
           **dict(zip(("gpu_busy_share", "s_per_step", "steps_in_window"), busy_share(prof))),
           "host_calls_s": top}
    table = prof.key_averages().table(sort_by="self_cuda_time_total" if torch.cuda.is_available()
                                      else "self_cpu_time_total", row_limit=25)
    where = Path(args.out) if args.out else Path(args.workdir) / "loop_bench.json"
    where.with_name(f"{where.stem}.{name}.profile.txt").write_text(table)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", required=True)
    ap.add_argument("--set", action="append", default=[], help="a config override for every variant")
    ap.add_argument("--variant", action="append", required=True, help="NAME=key=value,key=value")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--profile-steps", type=int, default=0)
    ap.add_argument("--train-size", type=int, default=20000)
    ap.add_argument("--workdir", default="/tmp/kava_loop_bench")
    ap.add_argument("--out")
    args = ap.parse_args()
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    results = []
    for spec in args.variant:
        name, _, rest = spec.partition("=")
        sets = [s for s in rest.split(",") if s]
        r = run_variant(name, sets, args, steps=args.steps, profile=False)
        print(json.dumps(r), flush=True)
        results.append(r)
        if args.profile_steps:
            r = run_variant(name, sets, args, steps=args.profile_steps, profile=True)
            print(json.dumps(r), flush=True)
            results.append(r)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": dev, "torch": torch.__version__, "preset": args.preset,
                                              "set": args.set, "results": results}, indent=1))


if __name__ == "__main__":
    main()
