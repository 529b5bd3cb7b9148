"""Where a backbone's starting weights come from: a hub id or local HF directory, a GGUF file, or a config.

GGUF files (`model.gguf_file`) are dequantized by transformers (which needs the `gguf` package). That is
slow (seconds to minutes per load) and the loaded model still carries its GGUF quantization config, which
`save_pretrained` refuses. So kava converts a GGUF file **once** into a plain Hugging Face directory
(fp32 safetensors + tokenizer) in its cache, `$KAVA_CACHE/gguf/<stem>-<key>/` (default
`~/.cache/kava/gguf/`), and every later load reads that directory. The key covers the source (path, size,
modification time), so a changed file is converted again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from kava.cache import cache_root
from kava.model.families import FAMILIES


def local_or_hub(name_or_path: str) -> str:
    """An existing local path as an absolute path (`~` expanded); anything else is taken as a hub id."""
    p = Path(name_or_path).expanduser()
    return str(p.resolve()) if p.exists() else name_or_path


def scratch_config(spec: dict, vocab_size: int, tokenizer=None):
    """HF config from a `model.from_scratch` dict (`family` + HF config fields).

    The pad / bos / eos ids default to the tokenizer's (a family's own defaults point into its real
    vocabulary, outside a small local one)."""
    spec = dict(spec)
    fam = spec.pop("family")
    if fam not in FAMILIES:
        raise ValueError(f"model.from_scratch.family: {fam!r} is not allowed; allowed values: {', '.join(FAMILIES)}")
    # a larger vocab_size in the spec pads the embedding (e.g. real-model shapes with a small local tokenizer)
    spec["vocab_size"] = max(vocab_size, spec.get("vocab_size") or 0)
    if fam == "gpt2":
        spec.setdefault("n_positions", 1024)
    if tokenizer is not None:
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if getattr(tokenizer, key, None) is not None:
                spec.setdefault(key, getattr(tokenizer, key))
    return AutoConfig.for_model(FAMILIES[fam], **spec)


def _gguf_key(name_or_path: str, gguf_file: str) -> str:
    src = Path(name_or_path).expanduser() / gguf_file
    if src.exists():
        st = src.stat()
        ident = f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    else:  # a hub repository: its id and file name
        ident = f"hub:{name_or_path}|{gguf_file}"
    return hashlib.sha256(ident.encode()).hexdigest()[:12]


def gguf_dir(name_or_path: str, gguf_file: str, *, trust_remote_code: bool = False) -> Path:
    """The plain HF directory converted from `name_or_path/gguf_file` (converted on first use, then cached)."""
    out = cache_root() / "gguf" / f"{Path(gguf_file).stem}-{_gguf_key(name_or_path, gguf_file)}"
    if (out / "config.json").exists():
        return out
    local = Path(name_or_path).expanduser()
    if local.is_dir() and not (local / gguf_file).exists():
        raise FileNotFoundError(f"model.gguf_file: {local / gguf_file} does not exist")
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise ImportError("model.gguf_file needs the `gguf` package: pip install gguf") from e
    src = str(local) if local.exists() else name_or_path
    print(f"[kava] converting {src}/{gguf_file} to a Hugging Face directory (once): {out}", flush=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
        lm = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype=torch.float32,
                                                  trust_remote_code=trust_remote_code)
        # The weights are dequantized now; what stays is a marker that makes save_pretrained refuse them.
        if hasattr(lm.config, "quantization_config"):
            del lm.config.quantization_config
        lm.hf_quantizer = None
        lm.is_quantized = False
        lm.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "kava_source.json").write_text(json.dumps({"name_or_path": src, "gguf_file": gguf_file}, indent=2))
        try:
            tmp.rename(out)
        except OSError:  # another process converted it first
            if not (out / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def looks_like_path(name: str) -> bool:
    """A string meant as a local path, never a hub id (`org/name`): absolute, `~`, `./`, `../`, a trailing or a
    second `/`."""
    return name.startswith(("/", "~", "./", "../", ".\\")) or name.endswith("/") or name.count("/") > 1


def check_local_path(name: str, key: str = "model.name_or_path") -> None:
    """A path-like `name` that does not exist is one clear error (FileNotFoundError naming `key`), not
    transformers' "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"."""
    p = Path(name).expanduser()
    if looks_like_path(name) and not p.exists():
        raise FileNotFoundError(f"{key}: {name} does not exist (looked at {p.absolute()}); a hub id looks like "
                                "org/name")


def pretrained_dir(name_or_path: str, gguf_file: str | None = None, *, trust_remote_code: bool = False) -> str:
    """What `from_pretrained` should open for a `model.name_or_path` (+ `model.gguf_file`)."""
    check_local_path(name_or_path)
    if gguf_file:
        return str(gguf_dir(name_or_path, gguf_file, trust_remote_code=trust_remote_code))
    p = Path(name_or_path).expanduser()
    return str(p) if p.exists() else name_or_path


def load_pretrained_lm(name_or_path: str, gguf_file: str | None = None, *, trust_remote_code: bool = False,
                       dtype: torch.dtype = torch.float32, attn_implementation: str | None = None):
    """A pretrained causal LM (hub id, local directory or GGUF file)."""
    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}  # kava installs its own later
    return AutoModelForCausalLM.from_pretrained(
        pretrained_dir(name_or_path, gguf_file, trust_remote_code=trust_remote_code), dtype=dtype,
        trust_remote_code=trust_remote_code, **kw)
