"""A saved model on disk: its layout, saving it, reading its backbone back (full or LoRA), resolving paths.

A saved model (a run's `best/` or `final/`, or any directory `save_model` wrote):

    model/                  full fine-tuning: config.json + model.safetensors
                            LoRA: adapter_config.json + adapter_model.safetensors (the adapter only)
    base.json               LoRA only: where the frozen base weights come from (see below)
    base/                   LoRA on a model built from scratch: its frozen random-init weights
    tokenizer/              the tokenizer, with <bot>, <eot>, <latent> added
    kava_extra.safetensors  the special-token rows and the latent projection
    meta.json               step and validation accuracy

`base.json` records the base of a LoRA run by identity: a pretrained model (`name_or_path`, absolute when it
is a local path, and `gguf_file`), another kava checkpoint (`model.init_from`, absolute; a LoRA one is
rebuilt the same way and merged), or `base/` next to it (from-scratch weights exist nowhere else). Loading
is strict: safetensors only, every tensor of the model present and no unexpected one.

Building a `LatentReasoner` from these pieces is `kava.checkpoint.load`; exporting to a plain Hugging Face
directory is `kava.checkpoint.export`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from peft import PeftModel, get_peft_model_state_dict
from transformers import AutoModelForCausalLM

from kava.checkpoint.card import model_card
from kava.checkpoint.rundir import BEST_DIR, FINAL_DIR, RunDir, run_dir_of
from kava.config import load_config
from kava.data.format import SPECIAL_TOKENS, SpecialIds, special_ids
from kava.model.pretrained import load_pretrained_lm
from kava.model.reasoner import LatentReasoner

EXTRA_FILE = "kava_extra.safetensors"  # special-token rows + projection
BASE_FILE = "base.json"  # what a LoRA adapter was trained on
META_FILE = "meta.json"  # step and validation accuracy (a run's own meta.json is `kava.checkpoint.rundir`'s)


class CheckpointError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------ paths
def has_model(d: Path) -> bool:
    return (d / "model" / "config.json").exists() or (d / "model" / "adapter_config.json").exists()


def is_lora_checkpoint(ck: Path) -> bool:
    return (Path(ck) / "model" / "adapter_config.json").exists()


def find_checkpoint(path: str | Path, prefer: tuple[str, ...] = (BEST_DIR, FINAL_DIR)) -> Path:
    """A saved model directory: `path` itself, or its `best/` / `final/` (in the order `prefer` gives)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{path}: no such directory")
    for cand in [p / name for name in prefer] + [p]:
        if has_model(cand):
            return cand
    raise CheckpointError(f"{path}: no kava model found (expected {' or '.join(str(p / n) for n in prefer)} "
                          "holding model/ and tokenizer/; a run that has not validated or finished has none)")


def resolve_init_dir(path: str | Path) -> Path:
    """The checkpoint `model.init_from` means: the run's final model, else its best, else `path` itself."""
    return find_checkpoint(path, (FINAL_DIR, BEST_DIR))


# ------------------------------------------------------------------------------------------------ pieces
def saved_tokenizer_ids(tok, where) -> SpecialIds:
    """The special ids of a tokenizer kava saved next to trained weights; it must already hold the tokens.

    (Adding them again would give ids that need not be the ones `special_rows` was trained for.)
    """
    missing = [t for t in SPECIAL_TOKENS if t not in tok.get_vocab()]
    if missing:
        raise CheckpointError(f"{where}: tokenizer lacks kava's special tokens {missing}: it was not saved with "
                              "these weights by kava (replaced or from another model?)")
    return special_ids(tok)


def load_saved_lm(model_dir: Path, **kw):
    """A full model kava saved: safetensors only, every tensor present and expected (HF itself only warns
    about missing tensors and initialises them at random, which would give silently wrong numbers)."""
    if not list(Path(model_dir).glob("*.safetensors")):
        raise CheckpointError(f"{model_dir}: no .safetensors weights (kava loads only safetensors checkpoints)")
    lm, info = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True, output_loading_info=True, **kw)
    missing, unexpected = sorted(info.get("missing_keys", ())), sorted(info.get("unexpected_keys", ()))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
    if missing or unexpected or mismatched:
        raise CheckpointError(f"{model_dir}: weights do not match the model's config.json: missing {missing}, "
                              f"unexpected {unexpected}" + (f", wrong shape {mismatched}" if mismatched else ""))
    return lm


def read_adapter_config(model_dir: str | Path) -> dict:
    """A peft adapter directory's adapter_config.json, read before peft does: a damaged one is an error naming
    the file (peft's is json's bare "Expecting value: line 1 column 63")."""
    f = Path(model_dir) / "adapter_config.json"
    try:
        return json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: not valid JSON ({e}); the adapter's config is damaged") from None


def check_adapter_keys(lm, model_dir: Path) -> None:
    """A LoRA adapter kava saved must hold exactly the adapter tensors of the model (peft only warns)."""
    f = Path(model_dir) / "adapter_model.safetensors"
    saved = set(load_file(str(f)))
    expected = set(get_peft_model_state_dict(lm))
    missing, unexpected = sorted(expected - saved), sorted(saved - expected)
    if missing or unexpected:
        raise CheckpointError(f"{f}: adapter tensors do not match adapter_config.json: missing {missing}, "
                              f"unexpected {unexpected}")


def extra_state(model: LatentReasoner) -> dict[str, torch.Tensor]:
    """The non-backbone trainable tensors: special-token rows and the projection."""
    out = {"special_rows": model.special_rows.detach().contiguous()}
    for k, v in model.proj.state_dict().items():
        out[f"proj.{k}"] = v.detach().contiguous()
    return out


def load_extra(model: LatentReasoner, state: dict[str, torch.Tensor], strict_proj: bool = True) -> None:
    """Load `extra_state`; strict about keys (a projection of another kind or width is refused)."""
    if "special_rows" not in state:
        raise CheckpointError(f"{EXTRA_FILE}: missing key special_rows")
    if state["special_rows"].shape != model.special_rows.shape:
        raise CheckpointError(f"special_rows has shape {tuple(state['special_rows'].shape)}, model expects "
                              f"{tuple(model.special_rows.shape)}: checkpoint is from a different model")
    with torch.no_grad():
        model.special_rows.copy_(state["special_rows"])
    proj = {k[5:]: v for k, v in state.items() if k.startswith("proj.")}
    if not strict_proj and set(proj) != set(model.proj.state_dict()):
        return  # initialising a new method from a backbone: keep the fresh projection
    missing, unexpected = model.proj.load_state_dict(proj, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"projection keys do not match: missing {missing}, unexpected {unexpected} "
                              "(checkpoint from a different latent.projection setting?)")


# ------------------------------------------------------------------------------------------------ save
def _is_peft(lm) -> bool:
    return hasattr(lm, "peft_config")


def base_state_dict(peft_lm) -> dict[str, torch.Tensor]:
    """The frozen base weights under a peft model, with the base model's own key names (adapters left out,
    tied weights once)."""
    out, seen = {}, set()
    for k, v in peft_lm.get_base_model().state_dict().items():
        if "lora_" in k:
            continue
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if ptr in seen:  # a tied weight (lm_head = embed_tokens): HF re-ties it on load
            continue
        seen.add(ptr)
        out[k.replace(".base_layer.", ".")] = v.detach().contiguous().cpu()
    return out


def save_model(model: LatentReasoner, tokenizer, out_dir: str | Path, meta: dict | None = None, cfg=None) -> None:
    """Save a loadable model (layout in the module docstring). cfg: the run's config, for the model card
    `model/README.md` (`kava.checkpoint.card`), which replaces peft's empty placeholder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.lm.save_pretrained(out / "model")
    if cfg is not None:
        (out / "model" / "README.md").write_text(model_card(
            cfg, base=getattr(model, "base_source", None), run_dir=out.parent, step=(meta or {}).get("step"),
            exported=False))
    if _is_peft(model.lm):
        base = getattr(model, "base_source", None)
        if base is None:
            raise CheckpointError("a LoRA model without a recorded base (build it with kava.checkpoint.load."
                                  "build_reasoner): its adapter could not be loaded again")
        if base["kind"] == "scratch":  # random-init weights exist nowhere else
            model.lm.get_base_model().config.save_pretrained(out / "base")
            save_file(base_state_dict(model.lm), str(out / "base" / "model.safetensors"), metadata={"format": "pt"})
        (out / BASE_FILE).write_text(json.dumps(base, indent=2))
    tokenizer.save_pretrained(out / "tokenizer")
    save_file(extra_state(model), str(out / EXTRA_FILE))
    if meta is not None:
        (out / META_FILE).write_text(json.dumps(meta, indent=2))


# ------------------------------------------------------------------------------------------------ load
def _base_of(ck: Path, cfg=None) -> dict:
    """The base description of a LoRA checkpoint (older ones without base.json: from the run's config)."""
    f = ck / BASE_FILE
    if f.exists():
        return json.loads(f.read_text())
    m = cfg.model if cfg is not None else None
    if m is not None and m.init_from:
        return {"kind": "init_from", "path": str(resolve_init_dir(m.init_from).resolve())}
    if m is not None and m.name_or_path:
        return {"kind": "pretrained", "name_or_path": m.name_or_path, "gguf_file": getattr(m, "gguf_file", None),
                "trust_remote_code": m.trust_remote_code}
    raise CheckpointError(f"{ck}: LoRA adapter without {BASE_FILE} and without a base model in config.yaml")


def load_base(base: dict, ck: Path, *, dtype: torch.dtype = torch.float32):
    """The plain HF model a LoRA adapter was trained on."""
    kind = base.get("kind")
    if kind == "pretrained":
        return load_pretrained_lm(base["name_or_path"], base.get("gguf_file"), dtype=dtype,
                                  trust_remote_code=bool(base.get("trust_remote_code")))
    if kind == "init_from":
        src = Path(base["path"])
        if not has_model(src):
            raise CheckpointError(f"{ck}: its base model {src} (the run's model.init_from) is gone; the LoRA "
                                  "adapter cannot be used without it")
        return load_lm(src, dtype=dtype, merged=True)
    if kind == "scratch":
        return load_saved_lm(ck / "base", dtype=dtype)
    raise CheckpointError(f"{ck / BASE_FILE}: unknown base kind {kind!r}")


def load_lm(ck: str | Path, *, dtype: torch.dtype = torch.float32, merged: bool = False, cfg=None):
    """The backbone of a saved model: its full weights, or its base with the LoRA adapter loaded strictly
    (a peft model; `merged=True` folds the adapter into the weights and returns a plain HF model)."""
    ck = Path(ck)
    model_dir = ck / "model"
    if not is_lora_checkpoint(ck):
        return load_saved_lm(model_dir, dtype=dtype)
    if not (model_dir / "adapter_model.safetensors").exists():
        raise CheckpointError(f"{model_dir}: no adapter_model.safetensors (kava loads only safetensors checkpoints)")
    read_adapter_config(model_dir)  # before the base loads
    base = load_base(_base_of(ck, cfg), ck, dtype=dtype)
    lm = PeftModel.from_pretrained(base, model_dir)
    check_adapter_keys(lm, model_dir)
    return lm.merge_and_unload() if merged else lm


def run_config(ck: Path):
    """The resolved config of the run a checkpoint belongs to."""
    rd = RunDir(run_dir_of(ck))
    if not rd.started():
        raise CheckpointError(f"{ck}: no {rd.config.name} next to the checkpoint")
    return load_config(str(rd.config), resolve_paths=False)
