"""The rows of results/multiplication/README.md from run folders: test accuracy (exact match), the share of gold
digits in place, forward passes, the evaluated checkpoint, and for latent students the same with the latents
replaced. Reads each run's eval/<set>/predictions.jsonl and best/meta.json, so it also grades evaluations written
before summary.json had `accuracy_digits`.

    python experiments/multiplication/table.py results/multiplication/2026-12-06b/icot-fc/runs/*
    python experiments/multiplication/table.py --places RUN...    # accuracy % of each answer digit instead
    python experiments/multiplication/table.py --curve RUN...     # iCoT: validation at the end of each token
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kava.scoring import digit_agreement, digit_places, extract


def grade(pred_file: Path) -> dict:
    rows = [json.loads(x) for x in pred_file.read_text().splitlines()]
    out = {"n": len(rows), "exact": sum(r["correct"] for r in rows) / len(rows),
           "digits": sum(digit_agreement(r["extracted"], r["gold"]) for r in rows) / len(rows),
           "passes": sum(r["forward_passes"] for r in rows) / len(rows)}
    kinds = sorted({k for r in rows for k in r.get("ablations", {})})
    for k in kinds:  # the ablation rows keep the generation only: extracted here as the accuracy is
        got = [extract(r["ablations"][k]["generated"], "digits", "####")["strict"] for r in rows]
        out[k] = sum(digit_agreement(g, r["gold"]) for g, r in zip(got, rows)) / len(rows)
    return out


def places(pred_file: Path) -> list[float]:
    """Accuracy of each answer digit (place 0 = the least significant) over the predictions of `pred_file`."""
    rows = [json.loads(x) for x in pred_file.read_text().splitlines()]
    per = [digit_places(r["extracted"], r["gold"]) for r in rows]
    width = max(map(len, per))
    return [sum(p[k] for p in per if k < len(p)) / sum(k < len(p) for p in per) for k in range(width)]


def curve(metrics: Path) -> list[tuple[int, int, float, float]]:
    """iCoT's validation against CoT tokens removed: (tokens removed, step, exact, digits in place) of the last
    validation at each removal count (the count logged by the training row at or before it)."""
    removed, last = None, {}
    for line in metrics.read_text().splitlines():
        r = json.loads(line)
        if "curriculum/removed" in r:
            removed = int(r["curriculum/removed"])
        elif r.get("split") == "val" and removed is not None:
            last[removed] = (removed, r["step"], r["val/accuracy"], r.get("val/digits", float("nan")))
    return [last[k] for k in sorted(last)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--places", action="store_true", help="the accuracy of each answer digit, least significant first")
    ap.add_argument("--curve", action="store_true", help="iCoT: validation exact / digits % at the end of each token")
    a = ap.parse_args()
    if a.curve:
        for run in a.runs:
            cells = ", ".join(f"{k}: {100 * e:.1f}/{100 * d:.0f}" for k, _, e, d in curve(run / "metrics.jsonl"))
            print(f"{run.name} (tokens removed: exact/digits %): {cells}")
        return
    if a.places:
        for run in a.runs:
            for pred in sorted(run.glob("eval/*/predictions.jsonl")):
                cells = " | ".join(f"{100 * x:.0f}" for x in places(pred))
                print(f"| {run.name} ({pred.parent.name}) | {cells} |")
        return
    print("| run | test exact % | digits in place % | latents zeroed / shuffled: digits % | passes | checkpoint step |")
    print("|---|---|---|---|---|---|")
    for run in a.runs:
        for pred in sorted(run.glob("eval/*/predictions.jsonl")):
            g = grade(pred)
            step = json.loads((run / "best" / "meta.json").read_text()).get("step") \
                if (run / "best" / "meta.json").exists() else "?"
            abl = f"{100 * g['zeros']:.1f} / {100 * g['shuffle']:.1f}" if "zeros" in g else "-"
            where = "/".join(run.parts[-4:-2] + (run.name,)) if len(run.parts) >= 4 else run.name
            print(f"| {where} ({pred.parent.name}) | {100 * g['exact']:.1f} | {100 * g['digits']:.1f} | {abl} | "
                  f"{g['passes']:.0f} | {step} |")


if __name__ == "__main__":
    main()
