"""`kava inspect --checkpoint RUN_DIR --question "..." --cot "<<a=b>> <<c=d>>" --answer N [--output PNG]`.

Heatmaps of the cosine similarity (or, with `--centered`, the centred cosine) between the student's latent KV
(final sweep) and the teacher's CoT KV, keys and values, in a grid of a few layers (`--layers` picks them,
`all` draws every one), with the CoT tokens eviction keeps marked; prints, per layer, the CoT tokens kept by
the most KV heads.
"""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="plot latent-KV vs teacher-CoT-KV similarity for one question")
    p.add_argument("--checkpoint", required=True, help="run dir (uses best/, else final/) of a latent method")
    p.add_argument("--question", required=True)
    p.add_argument("--cot", required=True, help='the chain of thought, e.g. "<<3+4=7>> <<7*2=14>>"')
    p.add_argument("--answer", required=True)
    p.add_argument("--output", help="PNG path (default RUN_DIR/inspect.png)")
    p.add_argument("--layers", help="comma list of layers to draw, or 'all' (default: 4 spread over the depth, "
                                    "first and last included; the printed lines cover every layer)")
    p.add_argument("--centered", action="store_true",
                   help="centred cosine: subtract each layer's mean latent and mean CoT vector first (the raw "
                        "cosine is high everywhere when keys share a common direction)")
    p.add_argument("--key-space", choices=["cache", "pre_rope"], help="default: the config's loss.kv_key_space")
    p.set_defaults(func=run)


def run(args) -> int:
    import sys
    from pathlib import Path

    import torch

    import kava
    from kava.spec import LATENT_METHODS
    from kava.tools.inspect_latents import inspect_example, most_kept, plot_similarity

    km = kava.load(args.checkpoint, device="cuda" if torch.cuda.is_available() else "cpu", dtype=torch.float32)
    model, tok, cfg = km.model, km.tokenizer, km.cfg
    if not cfg.spec.latent:
        print(f"kava inspect: a {cfg.method!r} checkpoint has no latents; use a run of {', '.join(LATENT_METHODS)}",
              file=sys.stderr)
        return 2
    ins = inspect_example(model, tok, cfg, args.question, args.cot, args.answer, key_space=args.key_space,
                          centered=args.centered)
    L = ins.sim_k.shape[0]
    if args.layers == "all":
        layers = list(range(L))
    else:
        try:
            layers = [int(x) for x in args.layers.split(",")] if args.layers else None
        except ValueError:
            layers = [-1]
    if layers and not all(0 <= x < L for x in layers):
        print(f"kava inspect: --layers must be 'all' or a comma list of layers in 0..{L - 1}", file=sys.stderr)
        return 2
    out = plot_similarity(ins, args.output or km.run_dir / "inspect.png", layers)
    print(f"saved {out}")
    M = ins.sim_k.shape[1]
    print(f"CoT tokens kept most often ({ins.eviction}, {M} slots, {ins.num_kv_heads} KV heads):")
    for layer in range(L):
        kept = most_kept(ins, layer)
        print(f"layer {layer}: " + "  ".join(f"{t!r}@{p}×{c}" for p, t, c in kept))
    return 0
