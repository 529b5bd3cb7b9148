"""`kava presets list | show NAME | check`."""

from __future__ import annotations

import sys


def add_parser(sub) -> None:
    p = sub.add_parser("presets", help="list, show or check the configuration presets (the paper's table)")
    p.add_argument("action", choices=["list", "show", "check"])
    p.add_argument("name", nargs="?", help="preset name (for show)")
    p.set_defaults(func=run)


def run(args) -> int:
    # imported here, as by every command: `kava --help` does not load torch (kava.config imports the owners of
    # its allowed values)
    from kava.config import load_config, preset_names
    from kava.tools.presets import PAPER_TABLE, check_preset

    if args.action == "list":
        for name in preset_names():
            tag = "paper preset" if name in PAPER_TABLE else "extra"
            cfg = load_config(name)
            print(f"{name:18s} {tag:13s} method={cfg.method} model={cfg.model.name_or_path or 'from_scratch'} data={cfg.data.source}")
        return 0
    if args.action == "show":
        if not args.name:
            print("kava presets show NAME", file=sys.stderr)
            return 2
        print(load_config(args.name).to_yaml(), end="")
        return 0
    bad = 0
    print(f"{'preset':16s} {'key':24s} {'expected':>28s} {'actual':>28s}  status  verified")
    for name in sorted(PAPER_TABLE):
        for r in check_preset(name):
            bad += not r.ok
            note = f"  ({r.note})" if r.note else ""
            print(f"{r.preset:16s} {r.key:24s} {str(r.expected):>28s} {str(r.actual):>28s}  "
                  f"{'ok' if r.ok else 'MISMATCH':6s}  {'verified' if r.verified else 'unverified'}{note}")
    print(f"{bad} mismatch(es) in {len(PAPER_TABLE)} presets")
    return 1 if bad else 0
