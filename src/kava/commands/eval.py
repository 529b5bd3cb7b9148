"""`kava eval --checkpoint RUN_DIR --datasets gsm8k,gsm8k-hard,svamp [--data-dir DIR] [--mode ...]`.

Parses the flags and calls `kava.evaluate.evaluate_run`: it shards the questions across processes when
launched with `accelerate launch` / `torchrun`; rank 0 gathers and writes
`RUN_DIR/eval/<dataset>/{predictions.jsonl, summary.json}` (`eval/<dataset>-limit<N>/` under `--limit N`).
A run trained on the synthetic task finds its own data for the synth-* sets without `--data-dir`.

Any model: `--checkpoint` takes a run dir, `RUN/checkpoints/step_<n>` (written to `eval/<dataset>-step<n>/`),
a `kava export` dir, a plain Hugging Face model dir or a peft adapter dir; `--model-args pretrained=ID,peft=DIR`
(lm-evaluation-harness style; also gguf_file=, tokenizer=, trust_remote_code=) names a hub model or a GGUF file.
A plain model runs in cot (default) or nocot mode with kava's answer prompt; its results go to
`runs/<name>-<mode>/eval/`, where `kava report runs/` finds them; <name> is the model's identity (base, GGUF
file, adapter: `base+adapter`), recorded as "model_args" in summary.json. `--datasets` also takes data files (JSONL,
JSON, iCoT text: the readers' formats, detected; no CoT needed) and Hugging Face dataset ids (`org/name[:split]`);
`--question-field`, `--answer-field`, `--steps-field` name the columns of a JSON/JSONL file or hub dataset.

lm-evaluation-harness's flags are read where they mean a kava one (`--model hf`, `--model_args`, `--tasks` naming a
kava set, `--output_path`, `--batch_size`, `--log_samples`: predictions.jsonl is always written, `--num_fewshot 0`,
`--limit 0.01`: a fraction of each set); the others (few-shot prompts, chat templates, `--device`, `--seed`) are
refused in one line that says what kava does instead (`LM_EVAL_REFUSED`). lm-eval tasks themselves run on a kava
model through `python -m kava.lm_eval_plugin` (`kava.lm_eval_plugin`).

Runs of a latent method (`kava.spec.LATENT_METHODS`) can add diagnostics (docs/method.md §5, `kava.diagnostics`):
`--latent-ablations zeros,placeholder,shuffle` (accuracy with the latents replaced), `--oracle` (the
teacher's compressed CoT KV in the latent slots), `--kv-match` (student latent KV vs eviction targets per
layer), or `--diagnostics` for all three.
"""

from __future__ import annotations

import argparse

LM_EVAL_MODELS = ("hf", "hf-auto", "huggingface")  # lm-eval's names of its transformers model: what --model-args loads
# lm-eval flags with no kava counterpart: why, and what to do instead (one line each)
LM_EVAL_REFUSED = {
    "num_fewshot": "kava eval has no few-shot prompt: each question is asked alone, on the raw-text prompt kava trains "
                   "on; drop --num_fewshot (0 is what kava does)",
    "apply_chat_template": "kava eval feeds raw text, as kava trains (no chat template); drop --apply_chat_template "
                           "(a plain model gets the same raw-text prompt: --mode cot or nocot)",
    "device": "kava eval picks the device itself (cuda when there is one, else cpu); choose GPUs with "
              "CUDA_VISIBLE_DEVICES, several with `accelerate launch -m kava.cli eval`",
    "seed": "kava eval decodes greedily: nothing is drawn at random; drop --seed (a run's seed is run.seed)",
}


def parse_limit(text: str) -> int | float:
    """`--limit N` (the first N questions) or, as lm-evaluation-harness reads it, a fraction 0 < F < 1 of each set."""
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if 0 < v < 1:
        return v
    if v >= 1 and v == int(v):
        return int(v)
    raise ValueError(f"--limit must be a positive number of questions or a fraction between 0 and 1, got {text}")


def add_parser(sub) -> None:
    from kava.spec import LATENT_METHODS

    p = sub.add_parser("eval", help="evaluate a trained run on GSM8k / GSM8k-Hard / SVAMP / synthetic splits")
    p.add_argument("--checkpoint",
                   help="run dir (uses best/, else final/), a checkpoint dir (RUN/checkpoints/step_N too), a "
                        "`kava export` dir, a Hugging Face model dir or a peft adapter dir")
    p.add_argument("--model-args", "--model_args", metavar="pretrained=ID[,peft=DIR,gguf_file=F]",
                   help="a plain model instead of --checkpoint, lm-eval style: pretrained= (hub id or dir), peft=, "
                        "gguf_file=, tokenizer=, trust_remote_code=")
    p.add_argument("--datasets",
                   help="comma list of: gsm8k, gsm8k-hard, svamp, gsm8k-aug-valid, synth-test, synth-hard, "
                        "synth-varied, data files (.jsonl, .json, .txt), or Hugging Face dataset ids "
                        "(org/name[:split], default split test; openai/gsm8k is gsm8k from the hub); default "
                        "gsm8k,gsm8k-hard,svamp")
    for key, what in (("question", "the question"), ("answer", "the gold answer (a number)"),
                      ("steps", "the CoT (a list of steps or one string; optional: evaluation needs none)")):
        p.add_argument(f"--{key}-field", metavar="NAME",
                       help=f"the field of a JSON/JSONL file or hub dataset holding {what}")
    p.add_argument("--data-dir", help="local data root (../shared/data layout); default $KAVA_DATA_DIR or ./data, "
                   "and for synth-* sets of a synthetic-task run that run's own data")
    p.add_argument("--hub", action="store_true", help="load the datasets from the Hugging Face hub")
    p.add_argument("--mode", choices=["latent", "cot", "nocot"],
                   help="default: the method's own mode (cot for a plain model)")
    p.add_argument("--batch-size", "--batch_size", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--limit", type=str, help="first N questions only, or a fraction 0 < F < 1 of each set (smoke "
                   "tests: a warning; written to eval/<dataset>-limit<N>/, left out of the model card and of `kava "
                   "report`)")
    p.add_argument("--output", "--output_path", help="where to write results (default RUN_DIR/eval; "
                                                     "runs/<name>-<mode>/eval for a plain model)")
    h = p.add_argument_group("lm-evaluation-harness spellings", "--model_args, --output_path, --batch_size, "
                             "--limit 0.01 and the three below are read as kava's flags; --num_fewshot N, "
                             "--apply_chat_template, --device and --seed are refused with a hint")
    h.add_argument("--model", metavar="hf", help="lm-eval's model type: hf is what --model-args loads")
    h.add_argument("--tasks", metavar="LIST", help="kava's set names (gsm8k, ...): read as --datasets")
    h.add_argument("--log_samples", action="store_true", help="always on: each set's predictions.jsonl")
    for flag in LM_EVAL_REFUSED:  # an optional value, so that `--seed` alone gets the hint, not a usage error
        h.add_argument(f"--{flag}", nargs="?", const="", help=argparse.SUPPRESS)
    g = p.add_argument_group(f"latent diagnostics ({', '.join(LATENT_METHODS)} runs; docs/method.md §5)")
    g.add_argument("--latent-ablations", metavar="LIST",
                   help="comma list of zeros, placeholder, shuffle (or 'all'): accuracy with the latents replaced")
    g.add_argument("--oracle", action="store_true",
                   help="accuracy with the teacher's compressed CoT KV in the latent slots (needs the CoT in the data)")
    g.add_argument("--kv-match", action="store_true",
                   help="per-layer relative error and cosine of the student's latent KV vs its eviction targets")
    g.add_argument("--diagnostics", action="store_true", help="all of the above")
    p.set_defaults(func=run)


def run(args) -> int:
    import sys

    from kava.checkpoint.load import parse_model_args
    from kava.data.readers import EVAL_DATASETS, is_data_file
    from kava.diagnostics import diagnostics_spec
    from kava.evaluate import evaluate_run

    for flag, why in LM_EVAL_REFUSED.items():
        value = getattr(args, flag)
        if value is not None and not (flag == "num_fewshot" and value == "0"):
            print(f"kava eval: --{flag}: {why}", file=sys.stderr)
            return 2
    if args.model is not None and args.model not in LM_EVAL_MODELS:
        print(f"kava eval: --model {args.model}: kava eval loads a kava run with --checkpoint RUN and a Hugging Face "
              "model with --model-args pretrained=ID (lm-eval's --model hf); to run lm-eval tasks on a kava model: "
              "python -m kava.lm_eval_plugin --model kava --model_args pretrained=RUN", file=sys.stderr)
        return 2
    if args.tasks and args.datasets:
        print("kava eval: give --datasets or --tasks (lm-eval's name for it), not both", file=sys.stderr)
        return 2
    if args.tasks and (other := [t for t in args.tasks.split(",") if t.strip() and t.strip() not in EVAL_DATASETS
                                 and not is_data_file(t.strip())]):
        print(f"kava eval: --tasks {','.join(other)}: not a kava evaluation set (--datasets takes "
              f"{', '.join(sorted(EVAL_DATASETS))}, data files or hub dataset ids); to run lm-eval tasks on a kava "
              "model: python -m kava.lm_eval_plugin --model kava --model_args pretrained=RUN --tasks ...",
              file=sys.stderr)
        return 2
    if args.tasks:
        print(f"[kava] eval: --tasks {args.tasks} is --datasets {args.tasks}: kava's prompt and scoring of the same "
              "questions, not lm-eval's task (its few-shot prompt)", flush=True)
    if bool(args.checkpoint) == bool(args.model_args):
        print("kava eval: give --checkpoint DIR or --model-args pretrained=ID_OR_DIR[,peft=ADAPTER] (one of them)",
              file=sys.stderr)
        return 2
    try:
        limit = parse_limit(args.limit) if args.limit is not None else None
    except ValueError as e:
        print(f"kava eval: {e}", file=sys.stderr)
        return 2
    # 0 would fall back to the default and -1 cut one question off (records[:-1]), silently
    for flag, v in (("--batch-size", args.batch_size), ("--max-new-tokens", args.max_new_tokens)):
        if v is not None and v < 1:
            print(f"kava eval: {flag} must be a positive number, got {v}", file=sys.stderr)
            return 2
    names = [d.strip() for d in (args.datasets or args.tasks or "gsm8k,gsm8k-hard,svamp").split(",") if d.strip()]
    model_args = parse_model_args(args.model_args) if args.model_args else None
    fields = {"question": args.question_field, "answer": args.answer_field, "steps": args.steps_field}
    evaluate_run(args.checkpoint, names, model_args=model_args, data_dir=args.data_dir, hub=args.hub, mode=args.mode,
                 fields={k: v for k, v in fields.items() if v} or None,
                 batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, limit=limit,
                 output=args.output, diagnostics=diagnostics_spec(args.latent_ablations, args.oracle, args.kv_match,
                                                                  args.diagnostics))
    return 0
