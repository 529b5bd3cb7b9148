"""`kava report RUN_DIR... [--output DIR] [--group-by preset|method]`: table (mean ± std over seeds) and plots."""

from __future__ import annotations

from kava.tools.report import write_report


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="aggregate run dirs into report.md/report.csv and plots")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (or a folder of them)")
    p.add_argument("--output", default="report", help="output folder (default ./report)")
    p.add_argument("--group-by", choices=["preset", "method"], default="preset",
                   help="group runs by (preset or method, train data) or by (method, train data)")
    p.set_defaults(func=run)


def run(args) -> int:
    res = write_report(args.runs, args.output, args.group_by)
    md = res["paths"]["report.md"].read_text(encoding="utf-8")
    print(md, end="")
    print("wrote " + ", ".join(str(p) for p in res["paths"].values()))
    return 0 if res["rows"] else 1
