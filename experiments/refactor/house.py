"""The shape of the house for a checkout: lines per module, the floor of each module, and the counts of
upward imports, function-local kava imports and import circles (modules and folders).

    python experiments/refactor/house.py SRC_ROOT [--modules]

Floors are those of tests/test_layering.py (FLOORS); modules of the old house (before issue 20) are put on the
floor of the module that took their place (OLD), so both checkouts are measured with one yardstick.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parents[2]  # the repository root
spec = importlib.util.spec_from_file_location("layering", HERE / "tests" / "test_layering.py")
OLD = {  # module before issue 20 -> its floor (the floor of its successor)
    "kava.methods": 3, "kava.checkpoint": 4, "kava.model.loading": 4, "kava.graphs": 4, "kava.gradshare": 4,
    "kava.progress": 4, "kava.demo": 8, "kava.sweep": 8, "kava.report": 8, "kava.presets": 8,
    "kava.inspect_latents": 8,
}
if "--old-loading-in-model" in sys.argv:  # count the old model/loading.py on the model folder's floor (2)
    OLD["kava.model.loading"] = 2
    sys.argv.remove("--old-loading-in-model")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("src_root")
    ap.add_argument("--modules", action="store_true", help="print every module's lines and floor")
    args = ap.parse_args()
    src = Path(args.src_root).resolve() / "src"
    import kava  # noqa: F401  (test_layering imports it; any checkout's will do for the helpers)

    lay = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lay)
    lay.SRC = src
    lay.FLOORS.update(OLD)
    mods, imports = lay.import_graph()
    lines = {m: len(p.read_text().splitlines()) for m, p in mods.items()}
    floors = {m: lay.floor_of(m) for m in mods}
    if args.modules:
        for m in sorted(mods, key=lambda m: (floors[m], m)):
            print(f"  floor {floors[m]}  {lines[m]:5d}  {m}")
    up = sorted({(m, t) for m, t, _, _ in imports if floors[t] > floors[m] and (m, t) not in lay.ALLOWED_LOCAL})
    lib = [(m, t) for m, t, top, _ in imports if not top and floors[m] < lay.FLOORS["kava.cli"]]
    local_lib = [x for x in lib if x not in lay.ALLOWED_LOCAL]
    local_all = [(m, t) for m, t, top, _ in imports if not top]
    edges, folders = defaultdict(set), defaultdict(set)
    for m, t, _, _ in imports:
        if (m, t) in lay.ALLOWED_LOCAL:
            continue
        edges[m].add(t)
        if lay.folder_of(m) != lay.folder_of(t):
            folders[lay.folder_of(m)].add(lay.folder_of(t))
    top_level = sorted(m for m in mods if m.count(".") == 1 and not (src / "kava" / m.split(".")[1]).is_dir())
    packages = sorted(m for m in mods if m.count(".") == 1 and (src / "kava" / m.split(".")[1]).is_dir())
    biggest = sorted(lines.items(), key=lambda x: -x[1])[:5]
    print(f"modules: {len(mods)} ({sum(lines.values())} lines); top level: {len(top_level)} modules + "
          f"{len(packages)} packages ({', '.join(p.split('.')[1] + '/' for p in packages)})")
    print(f"largest: " + ", ".join(f"{m} {n}" for m, n in biggest))
    print(f"floors: " + "; ".join(f"{f}: {sum(1 for v in floors.values() if v == f)}" for f in sorted(set(floors.values()))))
    print(f"upward imports (module pairs): {len(up)}" + (f"  {up}" if up else ""))
    print(f"function-local kava imports: {len(local_all)} in all, {len(local_lib)} in the library "
          f"(outside cli/commands, kava.load's door aside)")
    print(f"module circles: {lay.cycles(edges)}")
    print(f"folder circles: {lay.cycles(folders)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
