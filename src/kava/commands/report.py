"""`kava report RUN_DIR... [--output DIR] [--group-by preset|method]`: table (mean ± std over seeds) and plots.

No run directory among the paths (a typo, an empty folder) is a user error: one line on stderr, exit 2.
`kava eval --limit N` tests are left out (noted) unless `--include-limited`.
"""

from __future__ import annotations

import sys

from kava.tools.report import find_run_dirs, write_report


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="aggregate run dirs into report.md/report.csv and plots")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (or a folder of them)")
    p.add_argument("--output", default="report", help="output folder (default ./report)")
    p.add_argument("--group-by", choices=["preset", "method"], default="preset",
                   help="group runs by (preset or method, train data) or by (method, train data)")
    p.add_argument("--include-limited", action="store_true",
                   help="also `kava eval --limit N` tests (as <dataset>-limit<N> columns); left out by default")
    p.set_defaults(func=run)


def run(args) -> int:
    dirs, notes = find_run_dirs(args.runs)
    if not dirs:
        print(f"kava report: error: no run directory in {', '.join(args.runs)} ({'; '.join(notes)})", file=sys.stderr)
        return 2
    res = write_report(args.runs, args.output, args.group_by, args.include_limited)
    md = res["paths"]["report.md"].read_text(encoding="utf-8")
    print(md, end="")
    print("wrote " + ", ".join(str(p) for p in res["paths"].values()))
    if not res["rows"]:
        print(f"kava report: error: no run in {', '.join(args.runs)} has evaluation results (kava eval first)",
              file=sys.stderr)
        return 2
    return 0
