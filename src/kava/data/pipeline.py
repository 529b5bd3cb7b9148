"""Config -> training and validation records (and, for from-scratch models, a local tokenizer)."""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from kava.cache import cache_root
from kava.data import multiplication
from kava.data.readers import describe_format, detect_format, load_records
from kava.data.records import Record, SkipLog
from kava.data.synthetic import pointer_tokens, write_pointer, write_synthetic

if TYPE_CHECKING:  # a type hint only: data/ sits below kava.config, which reads data.readers.FORMATS
    from kava.config import Config


def synthetic_name(cfg: Config) -> str:
    """The folder name of the synthetic task `cfg.data` describes: every generation parameter is in it."""
    d = cfg.data
    if d.synth_task == "multiplication":
        excluded = excluded_questions(cfg)
        return (f"mult{d.synth_digits}_s{d.synth_seed}_n{d.synth_train_size}_e{d.synth_eval_size}"
                + (f"_x{multiplication.exclusion_key(excluded)}" if excluded else ""))
    if d.synth_task == "pointer":
        return (f"pointer_s{d.synth_seed}_n{d.synth_train_size}_e{d.synth_eval_size}_k{d.synth_min_steps}-"
                f"{d.synth_max_steps}_N{d.synth_num_symbols}")
    return f"synth_s{d.synth_seed}_n{d.synth_train_size}_e{d.synth_eval_size}_st{d.synth_min_steps}-{d.synth_max_steps}_v{d.synth_max_value}"


def excluded_questions(cfg: Config) -> frozenset[str]:
    """The questions of the files `data.synth_exclude` names (read in any of the readers' formats)."""
    return _questions_of(tuple(cfg.data.synth_exclude))


@functools.lru_cache(maxsize=4)  # asked by every `synthetic_name` (the folder's name hashes them)
def _questions_of(paths: tuple[str, ...]) -> frozenset[str]:
    return frozenset(question_key(r.question) for path in paths for r in load_records(path, "auto", skips=SkipLog()))


def is_multiplication(cfg: Config) -> bool:
    """Whether the run trains on multiplication problems: the generated task, or a file in that format."""
    d = cfg.data
    if d.source == "synthetic":
        return d.synth_task == "multiplication"
    if d.format != "auto":
        return d.format == "multiplication"
    return Path(d.source).is_file() and detect_format(d.source) == "multiplication"


def answer_kind(cfg: Config) -> str:
    """How the run's answers are scored when no record says it (`kava.load(...).generate`): digit strings for
    multiplication, numbers otherwise (`kava.scoring.ANSWER_KINDS`)."""
    return "digits" if is_multiplication(cfg) else "number"


def synthetic_single_tokens(cfg: Config) -> list[str]:
    """Strings the local tokenizer must keep as single tokens: the pointer task's symbols and their arrow
    forms (`kava.data.synthetic.pointer_tokens`), each digit and symbol of multiplication with its space
    (`kava.data.multiplication.mult_tokens`), else none."""
    if cfg.data.source == "synthetic" and cfg.data.synth_task == "pointer":
        return pointer_tokens(cfg.data.synth_num_symbols)
    if is_multiplication(cfg):
        return multiplication.mult_tokens()
    return []


def synthetic_dir(cfg: Config, root: Path) -> Path:
    """Generate the synthetic task once per parameter set under `root` (reused by later runs)."""
    d = cfg.data
    name = synthetic_name(cfg)
    out = root / name
    if not (out / "meta.json").exists():
        # write to a private temp dir, then rename: concurrent runs never read a half-written split
        tmp = root / f".{name}.{os.getpid()}.tmp"
        e = d.synth_eval_size
        if d.synth_task == "multiplication":
            multiplication.write_multiplication(tmp, {"train": d.synth_train_size, "valid": e, "test": e},
                                                seed=d.synth_seed, digits=d.synth_digits,
                                                exclude=excluded_questions(cfg))
        elif d.synth_task == "pointer":
            write_pointer(tmp, {"train": d.synth_train_size, "valid": e, "test": e, "hard": e},
                          seed=d.synth_seed, min_hops=d.synth_min_steps, max_hops=d.synth_max_steps,
                          num_symbols=d.synth_num_symbols)
        else:
            write_synthetic(tmp, {"train": d.synth_train_size, "valid": e, "test": e, "hard": e, "varied": e},
                            seed=d.synth_seed, min_steps=d.synth_min_steps, max_steps=d.synth_max_steps,
                            max_value=d.synth_max_value)
        try:
            tmp.rename(out)
        except OSError:  # another process finished first; its files are identical (deterministic generator)
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def find_synthetic_dir(cfg: Config, run_dir: Path | None = None) -> Path:
    """The synthetic task a run trained on (`data.source: synthetic`), for `kava eval` without --data-dir.

    Looked up where training wrote it, `<output_dir>/_data/<synthetic_name>`, with the run dir's parent as
    output_dir (a moved runs folder keeps working), then `run.output_dir` as configured, then kava's cache
    (`$KAVA_CACHE/synthetic`, default `~/.cache/kava/synthetic`). If none holds it, it is generated again
    (the generator is deterministic: the same files) beside the run, or in the cache when that is not
    writable. run_dir: None for an exported model (no runs folder: the cache).
    """
    if cfg.data.source != "synthetic":
        raise ValueError(f"the run trained on {cfg.data.source!r}, not on the synthetic task: give --data-dir")
    roots = ([Path(run_dir).parent / "_data"] if run_dir is not None else []) + [
        Path(cfg.run.output_dir) / "_data", cache_root() / "synthetic"]
    for root in roots:
        if (root / synthetic_name(cfg) / "meta.json").exists():
            return root / synthetic_name(cfg)
    targets = [roots[0], roots[-1]] if run_dir is not None else [roots[-1]]
    errors = []
    for root in targets:
        try:
            root.mkdir(parents=True, exist_ok=True)
            return synthetic_dir(cfg, root)
        except OSError as e:
            errors.append(f"{root}: {e}")
    raise OSError(f"could not write the synthetic task ({'; '.join(errors)}); give --data-dir")


def question_key(question: str) -> str:
    """Questions compared across files: whitespace runs collapsed, ends stripped."""
    return " ".join(question.split())


def valid_questions(vsrc: str, d) -> set[str]:
    """Every question of the validation source (all of it, not only the first `valid_limit`)."""
    fld = {"question": d.question_field, "steps": d.steps_field, "answer": d.answer_field}
    fmt = "auto" if d.valid_source else d.format
    recs = load_records(vsrc, fmt, d.valid_split, fields=fld if fmt in ("jsonl", "hub") else None,
                        skips=SkipLog(), cot_style=d.cot_style)
    return {question_key(r.question) for r in recs}


def exclude_questions(train: list[Record], questions: set[str], skips: SkipLog) -> list[Record]:
    """`train` without the records whose question is in `questions`; each dropped one is a counted skip."""
    kept = []
    for r in train:
        if question_key(r.question) in questions:
            skips.skip("question in the validation set", r.source or r.question[:40])
        else:
            kept.append(r)
    return kept


def load_train_valid(cfg: Config, data_root: Path, skips: SkipLog, valid_skips: SkipLog | None = None
                     ) -> tuple[list[Record], list[Record], str]:
    """Training records, validation records (never a test split), and a description of both. Bad records are
    counted in `skips` (training) and `valid_skips` (validation; never strict)."""
    d = cfg.data
    vskips = SkipLog() if valid_skips is None else valid_skips
    fields = {"question": d.question_field, "steps": d.steps_field, "answer": d.answer_field}
    if d.source == "synthetic" and d.synth_task == "multiplication":
        root = synthetic_dir(cfg, data_root)
        train = load_records(root / "train.txt", "multiplication", skips=skips, strict=d.strict, limit=d.limit)
        vsrc = d.valid_source or root / "valid.txt"
        valid = load_records(vsrc, "auto", skips=vskips, limit=d.valid_limit)
        desc = f"multiplication {d.synth_digits}x{d.synth_digits} ({root}), validation {vsrc}"
    elif d.source == "synthetic":
        root = synthetic_dir(cfg, data_root)
        styles = ["equation", "nl"] if d.cot_style == "both" else [d.cot_style]
        train = [r for st in styles for r in load_records(root / "train.jsonl", "jsonl", skips=skips, strict=d.strict,
                                                          limit=d.limit, cot_style=st)]
        valid = load_records(root / "valid.jsonl", "jsonl", skips=vskips, limit=d.valid_limit,
                             cot_style=styles[0])
        desc = f"synthetic ({root}, {d.cot_style} CoT)"
    else:
        fld = fields if d.format in ("jsonl", "hub") else None
        train = load_records(d.source, d.format, d.split, fields=fld, skips=skips, strict=d.strict, limit=d.limit,
                             cot_style=d.cot_style)
        vsrc = d.valid_source or d.source
        valid = load_records(vsrc, "auto" if d.valid_source else d.format, d.valid_split, fields=fld,
                             skips=vskips, limit=d.valid_limit, cot_style=d.cot_style)
        desc = (f"{d.source} [{d.split}, {describe_format(d.source, d.format, d.split)}], validation {vsrc} "
                f"[{d.valid_split}]")
        if d.exclude_valid_questions:
            train = exclude_questions(train, valid_questions(vsrc, d), skips)
            desc += ", validation questions excluded from training"
    if "test" in (d.valid_split or "").lower() and not d.valid_source:
        raise ValueError("data.valid_split: checkpoints are selected on validation data, never on a test split")
    return train, valid, desc


def train_data_label(cfg: Config) -> str:
    """Short name of the training data, used to group runs in reports."""
    if cfg.data.source == "synthetic" and cfg.data.synth_task == "multiplication":
        return f"multiplication:{cfg.data.synth_digits}x{cfg.data.synth_digits}"
    if cfg.data.source == "synthetic":
        return f"synthetic:{cfg.data.cot_style}"
    return cfg.data.source
