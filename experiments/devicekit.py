"""Getting a large file onto a device machine in pieces (each device call carries at most 64 MiB).

A device call copies the working tree, and ignored paths only where `carry` names them; files outside the tree
(e.g. /root/stash) stay while the machine is held. So a file of N pieces travels in N calls, each carrying one
piece folder and moving it out of the tree, then one call joins and checks it:

    here:       python experiments/devicekit.py split FILE --into .carry/qwen        # .carry/qwen/p00 .. pNN
    call k:     (carry [.carry/qwen/pKK])  python3 experiments/devicekit.py stash .carry/qwen/pKK --to /root/stash
    last call:  python3 experiments/devicekit.py join --from /root/stash --out /root/models/FILE

`split` writes `manifest.json` (name, size, sha256, pieces) into every piece folder, so that any call can tell
what is still missing; `join` refuses a missing or damaged piece and checks the whole file's sha256.
(`.carry/` must be in `.git/info/exclude`: `split` adds it.)

Also a study driver's deadline (`read_deadline`, `write_deadline`): a driver started in one call stops its jobs
still training at OUT/deadline, which a later call moves once the lease's time left is known. The drivers import
this file from beside themselves (their frozen device copy: `dk_freeze_source`) or from experiments/.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

CARRY_BYTES = 64 * 2**20  # what one device call carries: the tracked tree, untracked files and the carried paths
SPARE_BYTES = 4_000_000  # for manifests and small carries beside a piece (.carry/mult, .carry/base: ~1.6 MB)


def tree_bytes(repo: Path = Path(".")) -> int:
    """Bytes of the files every call carries: tracked plus untracked-not-ignored (as `git ls-files` sees them)."""
    out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True).stdout
    names = [n for n in out.decode().split("\0") if n]
    return sum((repo / n).stat().st_size for n in names if (repo / n).is_file())


def piece_bytes_for(size: int, tree: int) -> int:
    """Even pieces, as few as fit beside a tree of `tree` bytes in one call (the tree grows with every result
    committed: a fixed 49.5 MB piece stopped fitting at a 19 MB tree)."""
    room = CARRY_BYTES - tree - SPARE_BYTES
    if room < 1_000_000:
        raise SystemExit(f"the tracked tree ({tree} bytes) leaves no room for a piece in a {CARRY_BYTES}-byte call")
    n = max(1, -(-size // room))
    return -(-size // n)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def split(file: Path, into: Path, piece_bytes: int | None = None,
          exclude: Path | None = Path(".git/info/exclude")) -> dict:
    """`file` cut into pieces of `piece_bytes` (default: `piece_bytes_for` this repository's tree), each in its own
    folder `into/pNN` with the manifest; `/.carry/` is added to `exclude` (the repository's ignore file) if missing."""
    size = file.stat().st_size
    if piece_bytes is None:
        piece_bytes = piece_bytes_for(size, tree_bytes())
    n = max(1, -(-size // piece_bytes))
    manifest = {"name": file.name, "size": size, "sha256": sha256(file), "pieces": []}
    if into.exists():
        shutil.rmtree(into)
    with open(file, "rb") as f:
        for k in range(n):
            data = f.read(piece_bytes)
            folder = into / f"p{k:02d}"
            folder.mkdir(parents=True)
            (folder / f"{file.name}.{k:02d}").write_bytes(data)
            manifest["pieces"].append({"file": f"{file.name}.{k:02d}", "size": len(data),
                                       "sha256": hashlib.sha256(data).hexdigest()})
    for k in range(n):
        (into / f"p{k:02d}" / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    if exclude is not None and exclude.parent.is_dir():  # pieces must never be committed
        lines = exclude.read_text(errors="replace").split() if exclude.exists() else []
        if "/.carry/" not in lines:
            with open(exclude, "a") as fh:
                fh.write("/.carry/\n")
    return manifest


def stash(piece_dir: Path, to: Path) -> list[str]:
    """Copy a carried piece folder's files to `to` (outside the tree); return the pieces still missing there."""
    to.mkdir(parents=True, exist_ok=True)
    for p in piece_dir.iterdir():
        shutil.copyfile(p, to / p.name)
    return missing(to)


def missing(stash_dir: Path) -> list[str]:
    manifest = json.loads((stash_dir / "manifest.json").read_text())
    return [p["file"] for p in manifest["pieces"] if not (stash_dir / p["file"]).exists()
            or (stash_dir / p["file"]).stat().st_size != p["size"]]


def join(stash_dir: Path, out: Path) -> Path:
    """The pieces in `stash_dir` joined into `out`, each piece and the whole checked against the manifest."""
    manifest = json.loads((stash_dir / "manifest.json").read_text())
    gone = missing(stash_dir)
    if gone:
        raise SystemExit(f"{len(gone)} of {len(manifest['pieces'])} pieces missing in {stash_dir}: {', '.join(gone)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    with open(tmp, "wb") as f:
        for p in manifest["pieces"]:
            data = (stash_dir / p["file"]).read_bytes()
            if hashlib.sha256(data).hexdigest() != p["sha256"]:
                raise SystemExit(f"{stash_dir / p['file']}: damaged (sha256 differs from the manifest)")
            f.write(data)
    if tmp.stat().st_size != manifest["size"] or sha256(tmp) != manifest["sha256"]:
        raise SystemExit(f"{tmp}: the joined file does not match the manifest's size and sha256")
    tmp.rename(out)
    return out


DEADLINE_FILE = "deadline"  # in a driver's OUT: epoch seconds


def read_deadline(out: Path, default: float | None) -> float | None:
    """OUT/deadline (epoch seconds, written by `write_deadline`) if it exists, else `default` (the driver's own)."""
    f = Path(out) / DEADLINE_FILE
    return float(f.read_text()) if f.exists() else default


def write_deadline(out: Path, seconds: float) -> float:
    """Set the running driver's deadline `seconds` from now (a driver's `deadline` verb); returns it."""
    t = time.time() + seconds
    (Path(out) / DEADLINE_FILE).write_text(f"{t:.1f}\n")
    return t


def clear_deadline(out: Path) -> None:
    """At a driver's start: a deadline file from an earlier call is not this call's."""
    (Path(out) / DEADLINE_FILE).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split")
    s.add_argument("file", type=Path)
    s.add_argument("--into", type=Path, required=True)
    s.add_argument("--piece-bytes", type=int, default=None, help="default: even pieces that fit beside the tree")
    t = sub.add_parser("stash")
    t.add_argument("piece_dir", type=Path)
    t.add_argument("--to", type=Path, required=True)
    j = sub.add_parser("join")
    j.add_argument("--from", dest="stash_dir", type=Path, required=True)
    j.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    if a.cmd == "split":
        m = split(a.file, a.into, a.piece_bytes)
        print(f"{a.file}: {m['size']} bytes, sha256 {m['sha256']}, {len(m['pieces'])} pieces in {a.into}/p00 ..")
    elif a.cmd == "stash":
        gone = stash(a.piece_dir, a.to)
        print(f"stashed {a.piece_dir.name} in {a.to}; still missing: {', '.join(gone) or 'none'}")
    else:
        print(f"joined and checked: {join(a.stash_dir, a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
