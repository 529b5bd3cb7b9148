"""`kava score --predictions FILE.jsonl --dataset NAME`: score saved generations without a model.

The predictions file has one ``{"index": int, "prediction": str}`` per line, index into the dataset as
`load_eval_dataset` orders it; every index must appear once.
"""

from __future__ import annotations

import sys

from kava.data.readers import ANSWER_PROMPT, load_eval_dataset
from kava.scoring import score_file


def add_parser(sub) -> None:
    p = sub.add_parser("score", help="score a predictions JSONL against an evaluation set (strict and flexible)")
    p.add_argument("--predictions", required=True, help='JSONL, one {"index": int, "prediction": str} per line')
    p.add_argument("--dataset", required=True, help="gsm8k, gsm8k-hard, svamp, gsm8k-aug-valid, synth-test, ...")
    p.add_argument("--data-dir", default=None, help="local data root (default $KAVA_DATA_DIR or ./data)")
    p.add_argument("--hub", action="store_true", help="load the dataset from the Hugging Face hub")
    p.add_argument("--answer-prompt", default=ANSWER_PROMPT, help=f"marker before the answer (default {ANSWER_PROMPT!r})")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        records, desc = load_eval_dataset(args.dataset, args.data_dir, hub=args.hub)
        res = score_file(args.predictions, records, args.answer_prompt)
    except (ValueError, OSError) as e:  # DataError is a ValueError
        print(f"kava score: {e}", file=sys.stderr)
        return 1
    print(f"accuracy: {res['accuracy']:.4f}")
    print(f"accuracy_flexible: {res['accuracy_flexible']:.4f}")
    print(f"count: {res['count']}")
    print(f"dataset: {desc}")
    return 0
