"""kava's cache directory, `$KAVA_CACHE` (default `~/.cache/kava`): converted GGUF models (`gguf/`), the
synthetic task of exported models (`synthetic/`), the SmolLM2 test model (`smollm2/`)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """kava's cache directory: `$KAVA_CACHE`, default `~/.cache/kava`."""
    return Path(os.environ.get("KAVA_CACHE") or Path.home() / ".cache" / "kava").expanduser()
