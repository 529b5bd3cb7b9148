"""`kava export RUN_DIR --output DIR`: a plain Hugging Face model directory (LoRA merged, special tokens in
the tokenizer and embedding, greedy generation config) plus kava.json / kava_projection.safetensors for
latent reasoning through `kava.load(DIR)`."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a plain Hugging Face model directory from a trained run")
    p.add_argument("checkpoint", metavar="RUN", help="run dir (uses best/, else final/) or a checkpoint dir")
    p.add_argument("--output", required=True, help="new directory to write")
    p.set_defaults(func=run)


def run(args) -> int:
    from kava.checkpoint.export import export_model

    out = export_model(args.checkpoint, args.output)
    print(f"exported to {out}: load it with transformers' AutoModelForCausalLM / AutoTokenizer, or with "
          f"kava.load({str(out)!r}) for latent reasoning")
    return 0
