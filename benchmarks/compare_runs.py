"""Compare the training loss curves and step throughput of two kava runs (e.g. 1 GPU vs 2 GPUs DDP).

    python benchmarks/compare_runs.py RUN_A RUN_B
Throughput uses the logged tokens/s of steps 11..end (the first steps include warm-up).
"""

import json
import statistics
import sys


def load(run):
    rows = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
    return {r["step"]: r for r in rows if r.get("split") == "train"}


def main(a: str, b: str) -> None:
    ra, rb = load(a), load(b)
    steps = sorted(set(ra) & set(rb))
    diffs = [abs(ra[s]["loss/total"] - rb[s]["loss/total"]) / abs(ra[s]["loss/total"]) for s in steps]
    for s in steps[:3] + steps[-3:]:
        print(f"step {s:3d}: loss {ra[s]['loss/total']:.4f} vs {rb[s]['loss/total']:.4f}")
    print(f"{len(steps)} common steps; relative loss difference: mean {statistics.mean(diffs):.4f}, "
          f"max {max(diffs):.4f}; first-step difference {diffs[0]:.2e}")
    late = [s for s in steps if s > min(10, len(steps) // 2)]
    ta = statistics.median(ra[s]["tokens_per_s"] for s in late)
    tb = statistics.median(rb[s]["tokens_per_s"] for s in late)
    print(f"median tokens/s (steps > 10): {ta:.0f} vs {tb:.0f}; throughput ratio {tb / ta:.2f}x")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
