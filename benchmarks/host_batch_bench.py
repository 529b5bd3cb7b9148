"""Host time of the batch builders per optimizer step (CPU, no model): the part of a step a small model cannot
hide behind GPU work (the multiplication runs: a 2-layer GPT-2 at batch 128).

    python benchmarks/host_batch_bench.py            # 128 items shaped like 4x4 multiplication (9 | 46 | 1 | 9 tokens)
    python benchmarks/host_batch_bench.py --cot 74 --question 11 --answer 11     # 5x5
"""

from __future__ import annotations

import argparse
import random
import time

from kava.data.format import BlockWidths, SpecialIds, Tokenized, build_student_batch, build_teacher_batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--question", type=int, default=9)
    ap.add_argument("--cot", type=int, default=46)
    ap.add_argument("--answer", type=int, default=9)
    ap.add_argument("--repeats", type=int, default=50)
    a = ap.parse_args()
    rng = random.Random(0)
    ids = SpecialIds(bot=1, eot=2, latent=3, pad=0, eos=4, bos=None)

    def seg(n):
        return [rng.randrange(5, 300) for _ in range(n)]

    items = [Tokenized(question=seg(a.question), cot=seg(a.cot), prompt=seg(1), answer=seg(a.answer), index=i)
             for i in range(a.batch)]
    widths = BlockWidths(q=a.question, c=a.cot, a=a.answer + 2, static=True)
    cases = {"teacher (plain)": lambda: build_teacher_batch(items, ids),
             "teacher (graph widths)": lambda: build_teacher_batch(items, ids, widths=widths),
             "no-cot teacher": lambda: build_teacher_batch(items, ids, with_cot=False),
             "student, M = 5": lambda: build_student_batch(items, ids, 5, widths=widths)}
    for name, f in cases.items():
        f()
        t = time.perf_counter()
        for _ in range(a.repeats):
            f()
        print(f"{name:24s} {1e3 * (time.perf_counter() - t) / a.repeats:6.2f} ms per {a.batch}-example batch")


if __name__ == "__main__":
    main()
