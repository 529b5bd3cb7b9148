"""`kava export RUN --output DIR [--dtype bf16|fp16|fp32] [--license ID] [--push-to-hub REPO]`: a plain Hugging
Face model directory (and model card) from a trained run, uploaded to the Hub when asked."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a plain Hugging Face model directory from a trained run")
    p.add_argument("checkpoint", metavar="RUN", help="run dir (uses best/, else final/) or a checkpoint dir")
    p.add_argument("--output", required=True, help="new directory to write")
    # no argparse `choices`: its refusal is the usage and the error (4 lines); export_model's is one
    p.add_argument("--dtype", default="fp32", help="saved weights: fp32 (default), bf16 or fp16")
    p.add_argument("--push-to-hub", metavar="REPO", help="then upload the directory to this Hub repository "
                                                         "(created when missing; huggingface_hub's login or HF_TOKEN)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    p.add_argument("--license", metavar="ID", help="the model card's Hub license id (mit, apache-2.0, llama3.2, ...); "
                                                  "default other, pointing at the base model's license")
    p.set_defaults(func=run)


def run(args) -> int:
    from kava.checkpoint.export import export_model, push_to_hub

    out = export_model(args.checkpoint, args.output, dtype=args.dtype, license=args.license)
    print(f"exported to {out}: load it with transformers' AutoModelForCausalLM / AutoTokenizer, or with "
          f"kava.load({str(out)!r}) for latent reasoning; model card: {out / 'README.md'}")
    if args.push_to_hub:
        files = push_to_hub(out, args.push_to_hub, private=args.private)
        print(f"pushed {len(files)} files to https://huggingface.co/{args.push_to_hub}: {', '.join(files)}")
    return 0
