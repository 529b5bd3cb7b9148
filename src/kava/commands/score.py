"""`kava score --predictions FILE.jsonl --dataset NAME`: score saved generations without a model.

The predictions file has one ``{"index": int, "prediction": str}`` per line (a `kava eval`
predictions.jsonl, whose text is under ``generated``, works as is), index into the dataset as
`load_eval_dataset` orders it. The indices may be a subset (a `kava eval --limit N` run): only those are
scored, and the output says which. A bad file or dataset is one line on stderr and exit status 2.
"""

from __future__ import annotations

import sys

from kava.data.readers import ANSWER_PROMPT, load_eval_dataset
from kava.scoring import describe_indices, score_file


def add_parser(sub) -> None:
    p = sub.add_parser("score", help="score a predictions JSONL against an evaluation set (strict and flexible)")
    p.add_argument("--predictions", required=True, help='JSONL, one {"index": int, "prediction": str} per line')
    p.add_argument("--dataset", required=True,
                   help="gsm8k, gsm8k-hard, svamp, gsm8k-aug-valid, synth-test, ..., or a JSONL / text file")
    p.add_argument("--data-dir", default=None, help="local data root (default $KAVA_DATA_DIR or ./data)")
    p.add_argument("--hub", action="store_true", help="load the dataset from the Hugging Face hub")
    p.add_argument("--answer-prompt", default=ANSWER_PROMPT, help=f"marker before the answer (default {ANSWER_PROMPT!r})")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        records, desc = load_eval_dataset(args.dataset, args.data_dir, hub=args.hub)
        res = score_file(args.predictions, records, args.answer_prompt, subset=True)
    except (ValueError, OSError) as e:  # DataError is a ValueError
        print(f"kava score: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"accuracy: {res['accuracy']:.4f} ± {res['accuracy_stderr']:.4f}")
    print(f"accuracy_flexible: {res['accuracy_flexible']:.4f} ± {res['accuracy_flexible_stderr']:.4f}")
    n, of = res["count"], res["of"]
    print(f"count: {n}" + ("" if n == of else f" of {of} (a subset: indices {describe_indices(res['indices'])}; "
                                              "the accuracy is over these only)"))
    print(f"dataset: {desc}")
    return 0
