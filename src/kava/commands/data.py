"""`kava data SOURCE`: count records, show one formatted teacher and student sequence, report skips."""

from __future__ import annotations

from kava.data.readers import COT_STYLES


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="inspect a data source: counts, one formatted example, skipped records")
    p.add_argument("source", nargs="?", default="synthetic",
                   help="file, directory, hub id, an evaluation set name (gsm8k, svamp, ...) or 'synthetic'")
    p.add_argument("--format", default="auto")
    p.add_argument("--split", default=None)
    p.add_argument("--cot-style", choices=COT_STYLES, default="equation")
    p.add_argument("--data-dir", help="for evaluation set names")
    p.add_argument("--tokenizer", help="HF tokenizer (local dir or hub id) for the formatted view; "
                                       "default: a tokenizer built from the records")
    p.add_argument("--num-latents", type=int, default=24)
    p.add_argument("--output", default="runs/_data", help="where synthetic data and the built tokenizer go")
    p.add_argument("--strict", action="store_true")
    p.add_argument("--write-icot", metavar="FILE",
                   help="also write the records as an iCoT text file (question||steps #### answer); e.g. GSM8k "
                        "JSONL with --cot-style equation gives GSM8k-Aug's equation-only form")
    p.set_defaults(func=run)


def describe(source: str, *, fmt="auto", split=None, cot_style="equation", data_dir=None, tokenizer=None,
             num_latents=24, output="runs/_data", strict=False, write_icot=None) -> dict:
    from pathlib import Path

    from transformers import AutoTokenizer

    from kava.config import Config
    from kava.data.format import UNLIMITED, Formatter, add_special_tokens, build_student_batch, build_teacher_batch
    from kava.data.pipeline import synthetic_dir
    from kava.data.readers import EVAL_DATASETS, describe_format, detect_format, load_eval_dataset, load_records
    from kava.data.readers import gsm8k_icot_lines, icot_line
    from kava.data.readers import write_icot as write_icot_file
    from kava.data.records import SkipLog

    skips = SkipLog(strict=strict)
    if source == "synthetic":
        d = synthetic_dir(Config(), Path(output))
        recs = load_records(d / (f"{split or 'train'}.jsonl"), "jsonl", skips=skips, cot_style=cot_style)
        where = str(d / f"{split or 'train'}.jsonl")
    elif source in EVAL_DATASETS:
        recs, where = load_eval_dataset(source, data_dir, skips=skips, cot_style=cot_style)
    else:
        recs = load_records(source, fmt, split, skips=skips, cot_style=cot_style)
        where = f"{source} ({describe_format(source, fmt, split)})"
    print(f"source: {where}")
    print(f"records: {len(recs)}; {skips.summary()}")
    for reason, ex in skips.examples.items():
        print(f"  {reason}: e.g. {', '.join(ex)}")
    if write_icot:
        gsm8k = source not in EVAL_DATASETS and source != "synthetic" and (
            fmt == "gsm8k" or (fmt == "auto" and detect_format(Path(source)) == "gsm8k"))
        lines = (gsm8k_icot_lines(source) if gsm8k and cot_style == "equation" else [icot_line(r) for r in recs])
        n = write_icot_file(lines, write_icot)
        print(f"wrote {n} records in the iCoT text format: {write_icot}")
    if not recs:
        return {"records": 0, "skips": skips.as_dict()}
    if tokenizer:
        tok = AutoTokenizer.from_pretrained(tokenizer)
    else:
        from kava.data.tokenizer import build_tokenizer, tokenizer_texts

        tok = build_tokenizer(tokenizer_texts(recs[:2000]), Path(output) / "inspect_tokenizer")
    ids = add_special_tokens(tok)
    item = Formatter(tok, max_question_tokens=UNLIMITED, max_cot_tokens=UNLIMITED, max_answer_tokens=UNLIMITED).tokenize(recs[0], 0)
    tb = build_teacher_batch([item], ids)
    sb = build_student_batch([item], ids, num_latents)
    show = lambda t: tok.decode(t, skip_special_tokens=False)  # noqa: E731
    print("\nrecord 0:", recs[0].source)
    print("  teacher:", show(tb.ids[0].tolist()))
    print("  teacher labels on:", show([t for t in tb.targets[0].tolist() if t >= 0]))
    print(f"  CoT tokens: {int(tb.cot_valid.sum())}; answer-prompt position {int(tb.prompt_last[0])}")
    print("  student:", show(sb.ids[0].tolist()))
    print("  student labels on:", show([t for t in sb.targets[0].tolist() if t >= 0]))
    big = Formatter(tok, max_question_tokens=UNLIMITED, max_cot_tokens=UNLIMITED, max_answer_tokens=UNLIMITED)
    lens = [len(big.tokenize(r, i).cot) for i, r in enumerate(recs[:2000])]
    print(f"  CoT length (tokens, first {len(lens)}): mean {sum(lens) / len(lens):.1f}, max {max(lens)}, "
          f"shorter than M={num_latents}: {sum(x < num_latents for x in lens) / len(lens):.1%}")
    return {"records": len(recs), "skips": skips.as_dict()}


def run(args) -> int:
    describe(args.source, fmt=args.format, split=args.split, cot_style=args.cot_style, data_dir=args.data_dir,
             tokenizer=args.tokenizer, num_latents=args.num_latents, output=args.output, strict=args.strict,
             write_icot=args.write_icot)
    return 0
