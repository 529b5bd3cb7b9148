"""`kava score --predictions FILE.jsonl --dataset NAME`: score saved generations without a model.

The predictions file has one ``{"index": int, "prediction": str}`` per line (a `kava eval`
predictions.jsonl, whose text is under ``generated``, works as is), the index being the problem's place in the
dataset's file, skipped entries counted (`Record.index`, as `kava eval` writes it). The indices may be a subset
(a `kava eval --limit N` run): only those are scored, and the output says which; predictions for records the
reader skipped are counted, not scored. A bad file or dataset is one line on stderr and exit status 2.
"""

from __future__ import annotations

import sys

from kava.data.readers import ANSWER_PROMPT, load_eval_dataset
from kava.data.records import SkipLog
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
    skips = SkipLog()
    try:
        records, desc = load_eval_dataset(args.dataset, args.data_dir, hub=args.hub, skips=skips)
        res = score_file(args.predictions, records, args.answer_prompt, subset=True, skipped=skips.total)
    except (ValueError, OSError) as e:  # DataError is a ValueError
        print(f"kava score: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"accuracy: {res['accuracy']:.4f} ± {res['accuracy_stderr']:.4f}")
    print(f"accuracy_flexible: {res['accuracy_flexible']:.4f} ± {res['accuracy_flexible_stderr']:.4f}")
    n, of = res["count"], res["of"]
    print(f"count: {n}" + ("" if n == of else f" of {of} (a subset: indices {describe_indices(res['indices'])}; "
                                              "the accuracy is over these only)"))
    if res["skipped_predictions"]:
        print(f"not scored: {len(res['skipped_predictions'])} predictions for records the reader skipped (indices "
              f"{describe_indices(res['skipped_predictions'])})")
    print(f"dataset: {desc}")
    return 0
