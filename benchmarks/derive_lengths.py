"""Derive GSM8k-AUG-like token-length samples from the GSM8k test set (character lengths, rescaled).

We cannot run the LLaMA tokenizer here, so each GSM8k test problem's character lengths (question,
equation-only CoT, natural-language CoT) are scaled so that their means match the token means users
report for LLaMA-3 (question 70, equation CoT 45, NL CoT 130). The shape of the distribution is GSM8k's.

    python benchmarks/derive_lengths.py ../shared/data/gsm8k/test.jsonl > benchmarks/gsm8k_lengths.json
"""

import json
import re
import statistics
import sys

TARGET = {"question": 70, "cot_eq": 45, "cot_nl": 130}


def main(path: str) -> None:
    rows = []
    for line in open(path):
        d = json.loads(line)
        sol = d["answer"].split("####")[0]
        rows.append({"question": len(d["question"]), "cot_eq": len(" ".join(re.findall(r"<<[^>]*>>", sol))),
                     "cot_nl": len(re.sub(r"<<[^>]*>>", "", sol).strip())})
    scale = {k: TARGET[k] / statistics.mean(r[k] for r in rows) for k in TARGET}
    out = {k: [max(1, round(r[k] * scale[k])) for r in rows] for k in TARGET}
    out["source"] = f"{path}: character lengths x {{{', '.join(f'{k}: {v:.3f}' for k, v in scale.items())}}}"
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1])
