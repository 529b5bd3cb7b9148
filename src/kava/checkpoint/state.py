"""The training state of a run: `checkpoints/step_<n>/`, what an exact resume needs, written atomically.

    trainable.safetensors   every trainable tensor (LoRA adapter or full weights, projection, special rows)
    optimizer.safetensors   AdamW's tensors (its scalars and param groups in state.json)
    rng.safetensors         torch CPU / CUDA RNGs and the random-eviction generator, per process
    state.json              step, method, model and tokenizer identity, best validation, non-finite skips

The data position needs no state of its own: the examples of step s are a pure function of (seed, s)
(`kava.train.batch_indices`). Every directory is written to `<dir>.tmp` and renamed (`atomic_dir_write`), so
a crash never leaves a half-written checkpoint, best/ or final/ in place of a good one.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file

from kava.checkpoint.rundir import STATE_FILE, RunDir, read_state
from kava.checkpoint.saved import CheckpointError
from kava.data.format import special_ids

KEEP = 2  # step checkpoints kept (the newest)


def atomic_dir_write(final: Path, write) -> None:
    """Write into `<final>.tmp`, then rename: a crash mid-write never replaces the last good checkpoint.

    A failed write (disk full, unwritable directory, ...) removes the partial `.tmp` directory and raises an
    OSError naming the directory; whatever `final` held before is untouched.
    """
    tmp = final.with_name(final.name + ".tmp")
    old = final.with_name(final.name + ".old")
    if old.exists() and not final.exists():  # a crash between the two renames below: the old copy is good
        old.rename(final)
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        write(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise OSError(f"could not write {final}: {e} (disk full or not writable?); nothing was replaced: "
                          f"the previous {final.name} and the earlier checkpoints are intact") from e
        raise
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda_{i}"] = s
    return out


def restore_rng(t: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(t["torch_cpu"])
    if torch.cuda.is_available():
        states = [t[k] for k in sorted(t) if k.startswith("cuda_")]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def restore_generator(gen: torch.Generator, saved: torch.Tensor | None) -> bool:
    """Set `gen` to `saved` (a `get_state()`); False, leaving `gen` as it is, when `saved` is another device
    type's state (a run resumed on a CPU machine from a GPU checkpoint, or back: its sizes differ). None: nothing
    was saved, True."""
    if saved is None:
        return True
    if saved.numel() != gen.get_state().numel():
        return False
    gen.set_state(saved)
    return True


def model_identity(cfg) -> dict:
    """What a checkpoint's trainable tensors belong to: the backbone, its tokenizer and the LoRA shape."""
    m = cfg.model
    ident = {"name_or_path": m.name_or_path, "tokenizer": m.tokenizer, "from_scratch": m.from_scratch,
             "init_from": m.init_from, "lora": dataclasses.asdict(cfg.lora) if cfg.lora is not None else None}
    if m.gguf_file is not None:  # only when set: identities written before the key existed still match
        ident["gguf_file"] = m.gguf_file
    return json.loads(json.dumps(ident))  # as state.json stores it


def tokenizer_identity(tokenizer) -> dict:
    """Vocabulary size and the ids kava uses (bot, eot, latent, pad, eos, bos)."""
    return {"size": len(tokenizer), "special_ids": list(special_ids(tokenizer).__dict__.values())}


def check_resume_state(state: dict, cfg, ck: Path) -> None:
    """Refuse a checkpoint written for another method or model (before any data or model is loaded)."""
    if state.get("method") != cfg.method:
        raise ValueError(f"{ck}: checkpoint method {state.get('method')!r} != config method {cfg.method!r} "
                         "(config.yaml was edited?); a checkpoint resumes only the method that wrote it")
    saved, mine = state.get("model"), model_identity(cfg)  # "model" is absent in older checkpoints
    if saved is not None and saved != mine:
        diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        raise ValueError(f"{ck}: checkpoint is from a different model: model.{', model.'.join(diff)} differ "
                         f"(checkpoint {({k: saved.get(k) for k in diff})}, config {({k: mine.get(k) for k in diff})})")


def check_tokenizer(ck: Path, tokenizer, hint: str = "") -> None:
    """Refuse a tokenizer other than the one checkpoint `ck` was trained with (`tokenizer_identity`; checkpoints
    written before state.json recorded it pass). hint: what the message adds after the two identities."""
    saved, now = read_state(ck).get("tokenizer"), tokenizer_identity(tokenizer)
    if saved is not None and saved != now:
        raise CheckpointError(f"{ck}: the tokenizer changed since the checkpoint was written (checkpoint {saved}, "
                              f"now {now}){hint}")


def latest_checkpoint(run_dir: Path) -> Path | None:
    """`RunDir.latest_checkpoint`: the newest complete `checkpoints/step_<n>`, or None."""
    return RunDir(run_dir).latest_checkpoint()


def gather_rng(rng: dict[str, torch.Tensor], num_processes: int) -> dict[str, torch.Tensor]:
    """Every process's RNG state in one dict (a collective: every rank calls it). Rank 0's under the plain keys
    (the single-process layout), rank r's under `rank<r>.<key>`: each rank draws its own dropout masks and
    random evictions, so an exact resume gives each its own state back."""
    if num_processes == 1:
        return rng
    states = gather_object([rng])
    out = dict(states[0])
    for r, st in enumerate(states[1:], start=1):
        out.update({f"rank{r}.{k}": v for k, v in st.items()})
    return out


def rng_of_rank(saved: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor] | None:
    """This process's part of `gather_rng`'s dict; None when the checkpoint holds none for `rank` (written
    by fewer processes, or by kava before per-rank states)."""
    if rank == 0:
        return {k: v for k, v in saved.items() if not k.startswith("rank")}
    mine = {k.split(".", 1)[1]: v for k, v in saved.items() if k.startswith(f"rank{rank}.")}
    return mine or None


def write_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     rng: dict[str, torch.Tensor], state: dict) -> Path:
    """`run_dir/checkpoints/step_<step>`: the trainable tensors of `model`, the optimizer, `rng` (all processes',
    `gather_rng`) and `state` (state.json, with the optimizer's scalars added); the `KEEP` newest are kept."""
    ck = RunDir(run_dir).step(step)

    def write(d: Path):
        save_file(trainable_state(model), str(d / "trainable.safetensors"))
        ot, ometa = optimizer_tensors(optimizer)
        save_file(ot, str(d / "optimizer.safetensors"))
        save_file({k: v.contiguous() for k, v in rng.items()}, str(d / "rng.safetensors"))
        (d / STATE_FILE).write_text(json.dumps({**state, "optimizer": ometa}))

    atomic_dir_write(ck, write)
    for old in RunDir(run_dir).step_dirs()[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return ck


def read_checkpoint(ck: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
                    ) -> tuple[dict, dict[str, torch.Tensor]]:
    """Load checkpoint `ck` into `model` (its trainable tensors: keys and shapes checked) and `optimizer`.
    Returns (state.json, every process's saved RNG states: pass them to `rng_of_rank`)."""
    state = read_state(ck)
    load_trainable(ck, model)
    load_optimizer(optimizer, load_file(str(ck / "optimizer.safetensors")), state["optimizer"])
    return state, load_file(str(ck / "rng.safetensors"))


def is_step_checkpoint(path: Path) -> bool:
    """Whether `path` is a training checkpoint (`checkpoints/step_<n>/`) rather than a loadable model."""
    return (Path(path) / STATE_FILE).exists() and (Path(path) / "trainable.safetensors").exists()


def load_trainable(ck: Path, model: torch.nn.Module) -> None:
    """The trainable tensors of checkpoint `ck` into `model`: every key present and expected, every shape equal."""
    saved = load_file(str(ck / "trainable.safetensors"))
    mine = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    missing, unexpected = sorted(set(mine) - set(saved)), sorted(set(saved) - set(mine))
    if missing or unexpected:
        raise CheckpointError(f"{ck}: checkpoint keys do not match the model: missing {len(missing)} "
                              f"{missing[:5]}, unexpected {len(unexpected)} {unexpected[:5]} "
                              "(different model or method?)")
    shapes = [f"{n}: checkpoint {tuple(saved[n].shape)}, model {tuple(p.shape)}" for n, p in mine.items()
              if saved[n].shape != p.shape]
    if shapes:
        raise CheckpointError(f"{ck}: checkpoint shapes do not match the model ({len(shapes)} tensors): "
                              f"{'; '.join(shapes[:5])} (different model?)")
    with torch.no_grad():
        for n, p in mine.items():
            p.copy_(saved[n])
