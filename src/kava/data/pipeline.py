"""Config -> training and validation records (and, for from-scratch models, a local tokenizer)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from kava.config import Config
from kava.data.readers import load_records
from kava.data.records import Record, SkipLog
from kava.data.synthetic import write_synthetic


def synthetic_dir(cfg: Config, root: Path) -> Path:
    """Generate the synthetic task once per parameter set under `root` (reused by later runs)."""
    d = cfg.data
    name = f"synth_s{d.synth_seed}_n{d.synth_train_size}_e{d.synth_eval_size}_st{d.synth_min_steps}-{d.synth_max_steps}_v{d.synth_max_value}"
    out = root / name
    if not (out / "meta.json").exists():
        # write to a private temp dir, then rename: concurrent runs never read a half-written split
        tmp = root / f".{name}.{os.getpid()}.tmp"
        e = d.synth_eval_size
        write_synthetic(tmp, {"train": d.synth_train_size, "valid": e, "test": e, "hard": e, "varied": e},
                        seed=d.synth_seed, min_steps=d.synth_min_steps, max_steps=d.synth_max_steps,
                        max_value=d.synth_max_value)
        try:
            tmp.rename(out)
        except OSError:  # another process finished first; its files are identical (deterministic generator)
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_train_valid(cfg: Config, data_root: Path, skips: SkipLog) -> tuple[list[Record], list[Record], str]:
    """Training records, validation records (never a test split), and a description of both."""
    d = cfg.data
    fields = {"question": d.question_field, "steps": d.steps_field, "answer": d.answer_field}
    if d.source == "synthetic":
        root = synthetic_dir(cfg, data_root)
        styles = ["equation", "nl"] if d.cot_style == "both" else [d.cot_style]
        train = [r for st in styles for r in load_records(root / "train.jsonl", "jsonl", skips=skips, strict=d.strict,
                                                          limit=d.limit, cot_style=st)]
        valid = load_records(root / "valid.jsonl", "jsonl", skips=SkipLog(), limit=d.valid_limit,
                             cot_style=styles[0])
        desc = f"synthetic ({root}, {d.cot_style} CoT)"
    else:
        fld = fields if d.format in ("jsonl", "hub") else None
        train = load_records(d.source, d.format, d.split, fields=fld, skips=skips, strict=d.strict, limit=d.limit,
                             cot_style=d.cot_style)
        vsrc = d.valid_source or d.source
        valid = load_records(vsrc, "auto" if d.valid_source else d.format, d.valid_split, fields=fld,
                             skips=SkipLog(), limit=d.valid_limit, cot_style=d.cot_style)
        desc = f"{d.source} [{d.split}], validation {vsrc} [{d.valid_split}]"
    if "test" in (d.valid_split or "").lower() and not d.valid_source:
        raise ValueError("data.valid_split: checkpoints are selected on validation data, never on a test split")
    return train, valid, desc


def train_data_label(cfg: Config) -> str:
    """Short name of the training data, used to group runs in reports."""
    if cfg.data.source == "synthetic":
        return f"synthetic:{cfg.data.cot_style}"
    return cfg.data.source
