"""`kava eval --checkpoint RUN_DIR --datasets gsm8k,gsm8k-hard,svamp [--data-dir DIR] [--mode ...]`.

Shards the questions across processes when launched with `accelerate launch` / `torchrun`; rank 0
gathers and writes `RUN_DIR/eval/<dataset>/{predictions.jsonl, summary.json}`.

Latent runs (pccot, codi, kava) can add diagnostics (docs/method.md §5, `kava.diagnostics`):
`--latent-ablations zeros,placeholder,shuffle` (accuracy with the latents replaced), `--oracle` (the
teacher's compressed CoT KV in the latent slots), `--kv-match` (student latent KV vs eviction targets per
layer), or `--diagnostics` for all three.
"""

from __future__ import annotations

import json
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a trained run on GSM8k / GSM8k-Hard / SVAMP / synthetic splits")
    p.add_argument("--checkpoint", required=True,
                   help="run dir (uses best/, else final/), a checkpoint dir, or a `kava export` dir")
    p.add_argument("--datasets", default="gsm8k,gsm8k-hard,svamp",
                   help="comma list of: gsm8k, gsm8k-hard, svamp, gsm8k-aug-valid, synth-test, synth-hard, synth-varied")
    p.add_argument("--data-dir", help="local data root (../shared/data layout); default $KAVA_DATA_DIR or ./data")
    p.add_argument("--hub", action="store_true", help="load the datasets from the Hugging Face hub")
    p.add_argument("--mode", choices=["latent", "cot", "nocot"], help="default: the method's own mode")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--limit", type=int, help="first N questions only (smoke tests)")
    p.add_argument("--output", help="where to write results (default RUN_DIR/eval)")
    g = p.add_argument_group("latent diagnostics (pccot, codi, kava runs; docs/method.md §5)")
    g.add_argument("--latent-ablations", metavar="LIST",
                   help="comma list of zeros, placeholder, shuffle (or 'all'): accuracy with the latents replaced")
    g.add_argument("--oracle", action="store_true",
                   help="accuracy with the teacher's compressed CoT KV in the latent slots (needs the CoT in the data)")
    g.add_argument("--kv-match", action="store_true",
                   help="per-layer relative error and cosine of the student's latent KV vs its eviction targets")
    g.add_argument("--diagnostics", action="store_true", help="all of the above")
    p.set_defaults(func=run)


def diagnostics_spec(ablations: str | None = None, oracle: bool = False, kv_match: bool = False,
                     everything: bool = False):
    """The `kava.diagnostics.DiagnosticsSpec` of the command-line flags."""
    from kava.diagnostics import ABLATIONS, DiagnosticsSpec

    if everything:
        return DiagnosticsSpec.everything()
    names = [a.strip() for a in (ablations or "").split(",") if a.strip()]
    if names == ["all"]:
        names = list(ABLATIONS)
    return DiagnosticsSpec(tuple(names), oracle, kv_match)


def evaluate_run(checkpoint: str, datasets: list[str], *, data_dir=None, hub=False, mode=None, batch_size=None,
                 max_new_tokens=None, limit=None, output=None, progress=True, diagnostics=None) -> dict[str, dict]:
    import torch
    from accelerate import PartialState
    from accelerate.utils import gather_object

    import kava
    from kava.data.readers import load_eval_dataset
    from kava.diagnostics import format_diagnostics
    from kava.evaluate import hardware, summarize, write_eval

    state = PartialState(cpu=not torch.cuda.is_available())  # multi-process CPU runs shard too
    km = kava.load(checkpoint, device=state.device)
    cfg = km.cfg
    out_root = Path(output) if output else km.run_dir / "eval"
    results = {}
    for name in datasets:
        records, desc = load_eval_dataset(name, data_dir, hub=hub)
        if limit:
            records = records[:limit]
            desc += f" (first {limit})"
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
            write_eval(out_root / name, rows, summary)
            results[name] = summary
            print(f"{name}: accuracy {summary['accuracy']:.4f} ({summary['count']} problems: {desc}); "
                  f"forward passes/question {summary['mean_forward_passes']:.1f}; "
                  f"{summary['questions_per_s']:.1f} questions/s")
            for line in format_diagnostics(name, summary):
                print(line)
    return results


def run(args) -> int:
    names = [d.strip() for d in args.datasets.split(",") if d.strip()]
    evaluate_run(args.checkpoint, names, data_dir=args.data_dir, hub=args.hub, mode=args.mode,
                 batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, limit=args.limit,
                 output=args.output, diagnostics=diagnostics_spec(args.latent_ablations, args.oracle, args.kv_match,
                                                                  args.diagnostics))
    return 0
