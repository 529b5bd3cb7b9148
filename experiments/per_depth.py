"""Accuracy against reasoning depth (number of dependent operations) for synthetic runs, mean ± std over seeds.

    python experiments/per_depth.py RUN [RUN ...] --data-dir runs/depth/_data/synth_... --output results/depth

Each run's `eval/synth-test/predictions.jsonl` is joined with the split's `test.jsonl` on the question index;
a problem's depth is its number of operations (`len(steps_eq)`). Runs are grouped by their name without the
`-s<seed>` suffix. Writes depth.md, depth.json and accuracy_vs_depth.png. On the pointer task (meta.json
`task: pointer`) the depth is the hop count k, and chance (1/N) is a row of the table and a line of the plot.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path


def _predictions(run: Path, split: str) -> str:
    """predictions.jsonl of `kava eval`, or its gzip (as kept in results/)."""
    p = run / "eval" / f"synth-{split}" / "predictions.jsonl"
    return p.read_text() if p.exists() else gzip.decompress(p.with_suffix(".jsonl.gz").read_bytes()).decode()


def run_depth_accuracy(run: Path, data_dir: Path, split: str = "test") -> dict[int, tuple[int, int]]:
    """depth -> (correct, count) for one run's evaluation of `split`."""
    depths = [len(json.loads(line)["steps_eq"]) for line in (data_dir / f"{split}.jsonl").read_text().splitlines()]
    out: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for line in _predictions(run, split).splitlines():
        row = json.loads(line)
        d = depths[row["index"]]
        out[d][0] += int(bool(row["correct"]))
        out[d][1] += 1
    return {d: (c, n) for d, (c, n) in sorted(out.items())}


def _mean_std(xs: list[float]) -> str:
    if not xs:
        return "–"
    m = 100 * statistics.fmean(xs)
    return f"{m:.1f} ± {100 * statistics.stdev(xs):.1f}" if len(xs) > 1 else f"{m:.1f}"


def write_depth_table(runs: list[Path], data_dir: Path, out_dir: Path, split: str = "test") -> dict:
    groups: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    seeds: dict[str, list[str]] = defaultdict(list)
    for run in runs:
        ev = run / "eval" / f"synth-{split}"
        if not ((ev / "predictions.jsonl").exists() or (ev / "predictions.jsonl.gz").exists()):
            continue
        name = re.sub(r"-s\d+$", "", run.name)
        seeds[name].append(run.name)
        acc = run_depth_accuracy(run, data_dir, split)
        for d, (c, n) in acc.items():
            groups[name][d].append(c / n)
        groups[name][0].append(sum(c for c, _ in acc.values()) / sum(n for _, n in acc.values()))  # 0 = all
    if not groups:
        return {}
    depths = sorted({d for g in groups.values() for d in g if d > 0})
    meta_path = data_dir / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    pointer = meta.get("task") == "pointer"
    chance = meta.get("chance") if pointer else None
    what = "hop count k" if pointer else "number of operations"
    col = "k" if pointer else "depth"
    lines = [f"| run | seeds | all | " + " | ".join(f"{col} {d}" for d in depths) + " |",
             "|---|---|---|" + "---|" * len(depths)]
    for name in sorted(groups):
        g = groups[name]
        lines.append(f"| {name} | {len(seeds[name])} | {_mean_std(g[0])} | "
                     + " | ".join(_mean_std(g.get(d, [])) for d in depths) + " |")
    if chance is not None:
        c = f"{100 * chance:.1f}"
        lines.append(f"| chance (1/N, N={meta['num_symbols']}) | | {c} | " + " | ".join(c for _ in depths) + " |")
    out_dir.mkdir(parents=True, exist_ok=True)
    table = "\n".join(lines) + "\n"
    (out_dir / "depth.md").write_text(f"Accuracy (%) on synth-{split} by {what}, mean ± std over seeds.\n\n{table}")
    res = {name: {str(d): v for d, v in g.items()} for name, g in groups.items()}
    (out_dir / "depth.json").write_text(json.dumps({"split": split, "accuracy": res, "runs": seeds,
                                                    "chance": chance}, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name in sorted(groups):
        g = groups[name]
        ys = [100 * statistics.fmean(g[d]) for d in depths]
        es = [100 * statistics.stdev(g[d]) if len(g[d]) > 1 else 0.0 for d in depths]
        ax.errorbar(depths, ys, yerr=es, marker="o", capsize=3, label=name)
    if chance is not None:
        ax.axhline(100 * chance, color="grey", linestyle=":", label=f"chance (1/{meta['num_symbols']})")
    ax.set_xlabel("hops k" if pointer else "reasoning depth (operations)")
    ax.set_ylabel(f"accuracy on synth-{split} (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "accuracy_vs_depth.png", dpi=120)
    plt.close(fig)
    print(table)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--split", default="test")
    a = ap.parse_args()
    write_depth_table([Path(r) for r in a.runs], Path(a.data_dir), Path(a.output), a.split)


if __name__ == "__main__":
    main()
