"""Compare two trees written by experiments/refactor/equivalence.sh: every file byte for byte, except for
what legitimately differs between two checkouts and two runs:

- the tree's own root path (each file's text with it replaced by ROOT, and SRC_ROOT for the checkout),
- in JSON / JSONL files the keys in VOLATILE (git revision, wall-clock timings, measured throughput, and the
  config hash, which covers run.output_dir),
- in the captured stdout, lines with a wall-clock rate ("questions/s", "steps/s").

    python experiments/refactor/compare_run_dirs.py A B [--allow KEY ...]

Prints one line per differing file (and, for JSON, which keys differ) and exits 1 if any file differs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

# git revision, wall-clock timings and measured throughput; config_hash is a hash of the whole resolved config,
# run.output_dir (a path) included: config.yaml itself is compared (paths scrubbed)
VOLATILE = {"git", "date", "tokens_per_s", "wall_s", "questions_per_s", "grad_share_s", "config_hash"}  # date: when it ran
RATE = re.compile(r"questions/s|steps/s|\d+m\d+s|ETA")


def scrub(value, root: str, allow: set[str]):
    if isinstance(value, dict):
        return {k: scrub(v, root, allow) for k, v in value.items() if k not in VOLATILE | allow}
    if isinstance(value, list):
        return [scrub(v, root, allow) for v in value]
    if isinstance(value, str):
        return value.replace(root, "ROOT")
    return value


def load(path: Path, root: str, allow: set[str]):
    text = path.read_text(errors="replace")
    if path.suffix == ".json":
        return scrub(json.loads(text), root, allow)
    if path.suffix == ".jsonl":
        return [scrub(json.loads(ln), root, allow) for ln in text.splitlines() if ln.strip()]
    if path.suffix in (".out", ".yaml", ".txt", ".md"):
        return [ln.replace(root, "ROOT") for ln in text.splitlines() if not RATE.search(ln)]
    return path.read_bytes()


def json_diff(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if a.get(k, "<absent>") != b.get(k, "<absent>"):
                out += json_diff(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{prefix}{k}.")
        return out
    return [prefix.rstrip(".") or "(value)"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--allow", action="append", default=[], help="a further JSON key to leave out")
    args = ap.parse_args()
    A, B = Path(args.a).resolve(), Path(args.b).resolve()
    allow = set(args.allow)
    fa = {p.relative_to(A) for p in A.rglob("*") if p.is_file()}
    fb = {p.relative_to(B) for p in B.rglob("*") if p.is_file()}
    bad = 0
    for rel in sorted(fa ^ fb):
        print(f"only in {'A' if rel in fa else 'B'}: {rel}")
        bad += 1
    same = 0
    for rel in sorted(fa & fb):
        a, b = load(A / rel, str(A), allow), load(B / rel, str(B), allow)
        if a == b:
            same += 1
            continue
        bad += 1
        if isinstance(a, bytes):
            print(f"differs (bytes): {rel}")
        elif isinstance(a, dict):
            print(f"differs: {rel}: keys {json_diff(a, b)}")
        elif rel.suffix == ".jsonl" and len(a) == len(b):
            keys = sorted({k for x, y in zip(a, b) for k in json_diff(x, y)})
            print(f"differs: {rel}: keys {keys}")
        else:
            extra = [ln for ln in b if ln not in a][:3], [ln for ln in a if ln not in b][:3]
            print(f"differs: {rel}: lines only in B {extra[0]}, only in A {extra[1]}")
    print(f"{same} files identical (after scrubbing paths and {sorted(VOLATILE | allow)}), {bad} differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
