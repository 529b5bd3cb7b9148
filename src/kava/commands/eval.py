"""`kava eval --checkpoint RUN_DIR --datasets gsm8k,gsm8k-hard,svamp [--data-dir DIR] [--mode ...]`.

Parses the flags and calls `kava.evaluate.evaluate_run`: it shards the questions across processes when
launched with `accelerate launch` / `torchrun`; rank 0 gathers and writes
`RUN_DIR/eval/<dataset>/{predictions.jsonl, summary.json}` (`eval/<dataset>-limit<N>/` under `--limit N`).
A run trained on the synthetic task finds its own data for the synth-* sets without `--data-dir`.

Latent runs (pccot, codi, kava) can add diagnostics (docs/method.md §5, `kava.diagnostics`):
`--latent-ablations zeros,placeholder,shuffle` (accuracy with the latents replaced), `--oracle` (the
teacher's compressed CoT KV in the latent slots), `--kv-match` (student latent KV vs eviction targets per
layer), or `--diagnostics` for all three.
"""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a trained run on GSM8k / GSM8k-Hard / SVAMP / synthetic splits")
    p.add_argument("--checkpoint", required=True,
                   help="run dir (uses best/, else final/), a checkpoint dir, or a `kava export` dir")
    p.add_argument("--datasets", default="gsm8k,gsm8k-hard,svamp",
                   help="comma list of: gsm8k, gsm8k-hard, svamp, gsm8k-aug-valid, synth-test, synth-hard, synth-varied")
    p.add_argument("--data-dir", help="local data root (../shared/data layout); default $KAVA_DATA_DIR or ./data, "
                   "and for synth-* sets of a synthetic-task run that run's own data")
    p.add_argument("--hub", action="store_true", help="load the datasets from the Hugging Face hub")
    p.add_argument("--mode", choices=["latent", "cot", "nocot"], help="default: the method's own mode")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--limit", type=int, help="first N questions only (smoke tests); written to eval/<dataset>-limit<N>/")
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


def run(args) -> int:
    from kava.diagnostics import diagnostics_spec
    from kava.evaluate import evaluate_run

    names = [d.strip() for d in args.datasets.split(",") if d.strip()]
    evaluate_run(args.checkpoint, names, data_dir=args.data_dir, hub=args.hub, mode=args.mode,
                 batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, limit=args.limit,
                 output=args.output, diagnostics=diagnostics_spec(args.latent_ablations, args.oracle, args.kv_match,
                                                                  args.diagnostics))
    return 0
