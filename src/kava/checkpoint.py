"""Checkpoint I/O in one place: saving a trained model, loading it back (full or LoRA), and resolving paths.

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

Exporting to a plain Hugging Face directory is `kava.export`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from kava.data.format import SPECIAL_TOKENS, SpecialIds, special_ids
from kava.model import capture
from kava.model.pretrained import load_pretrained_lm
from kava.methods import student_mode
from kava.model.reasoner import LatentReasoner

EXTRA_FILE = "kava_extra.safetensors"  # special-token rows + projection
BASE_FILE = "base.json"  # what a LoRA adapter was trained on


class CheckpointError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------ paths
def has_model(d: Path) -> bool:
    return (d / "model" / "config.json").exists() or (d / "model" / "adapter_config.json").exists()


def is_lora_checkpoint(ck: Path) -> bool:
    return (Path(ck) / "model" / "adapter_config.json").exists()


def find_checkpoint(path: str | Path, prefer: tuple[str, ...] = ("best", "final")) -> Path:
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
    return find_checkpoint(path, ("final", "best"))


def run_dir_of(ck: Path) -> Path:
    """The run directory a checkpoint belongs to (the checkpoint itself when it stands alone)."""
    return ck.parent if (ck.parent / "config.yaml").exists() else ck


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


def check_adapter_keys(lm, model_dir: Path) -> None:
    """A LoRA adapter kava saved must hold exactly the adapter tensors of the model (peft only warns)."""
    from peft import get_peft_model_state_dict

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


def save_model(model: LatentReasoner, tokenizer, out_dir: str | Path, meta: dict | None = None) -> None:
    """Save a loadable model (layout in the module docstring)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.lm.save_pretrained(out / "model")
    if _is_peft(model.lm):
        base = getattr(model, "base_source", None)
        if base is None:
            raise CheckpointError("a LoRA model without a recorded base (build it with kava.model.loading."
                                  "build_reasoner): its adapter could not be loaded again")
        if base["kind"] == "scratch":  # random-init weights exist nowhere else
            model.lm.get_base_model().config.save_pretrained(out / "base")
            save_file(base_state_dict(model.lm), str(out / "base" / "model.safetensors"), metadata={"format": "pt"})
        (out / BASE_FILE).write_text(json.dumps(base, indent=2))
    tokenizer.save_pretrained(out / "tokenizer")
    save_file(extra_state(model), str(out / EXTRA_FILE))
    if meta is not None:
        (out / "meta.json").write_text(json.dumps(meta, indent=2))


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
    from peft import PeftModel

    if not (model_dir / "adapter_model.safetensors").exists():
        raise CheckpointError(f"{model_dir}: no adapter_model.safetensors (kava loads only safetensors checkpoints)")
    base = load_base(_base_of(ck, cfg), ck, dtype=dtype)
    lm = PeftModel.from_pretrained(base, model_dir)
    check_adapter_keys(lm, model_dir)
    return lm.merge_and_unload() if merged else lm


def run_config(ck: Path):
    """The resolved config of the run a checkpoint belongs to."""
    from kava.config import load_config

    run_dir = run_dir_of(ck)
    if not (run_dir / "config.yaml").exists():
        raise CheckpointError(f"{ck}: no config.yaml next to the checkpoint")
    return load_config(str(run_dir / "config.yaml"))


def load_for_eval(run_or_ckpt: str | Path, *, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32):
    """One call: (model, tokenizer, cfg) from a kava run dir or checkpoint dir (best/, else final/), in eval
    mode. LoRA checkpoints are loaded unmerged, as validation during training saw them."""
    ck = find_checkpoint(run_or_ckpt)
    cfg = run_config(ck)
    tok = AutoTokenizer.from_pretrained(ck / "tokenizer")
    ids = saved_tokenizer_ids(tok, ck / "tokenizer")
    lm = load_lm(ck, dtype=dtype, cfg=cfg)
    model = LatentReasoner(lm, ids, projection=cfg.latent.projection, proj_hidden=cfg.latent.proj_hidden,
                           proj_layernorm=cfg.latent.proj_layernorm, attn_implementation=cfg.model.attn_implementation)
    load_extra(model, load_file(str(ck / EXTRA_FILE)))
    model.to(device).eval()
    return model, tok, cfg



# ------------------------------------------------------------------------------------------------ export
EXPORT_FILE = "kava.json"  # latent settings beside an exported model
PROJECTION_FILE = "kava_projection.safetensors"


def _bos_template(tok, bos_id: int | None) -> None:
    """Make `tokenizer(text)` give exactly what kava trained on: [bos] + text ids (no eos, nothing else)."""
    from tokenizers import processors

    for attr, value in (("add_bos_token", bos_id is not None), ("add_eos_token", False)):
        if hasattr(tok, attr):
            try:
                setattr(tok, attr, value)
            except (AttributeError, TypeError, ValueError):
                pass
    backend = getattr(tok, "_tokenizer", None)
    if backend is None:
        raise CheckpointError("kava export needs a fast (tokenizers) tokenizer")
    if bos_id is None:
        backend.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B", special_tokens=[])
    else:
        bos = tok.convert_ids_to_tokens(bos_id)
        backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                               special_tokens=[(bos, bos_id)])


def export_model(run_or_ckpt: str | Path, output: str | Path, *, dtype: torch.dtype = torch.float32) -> Path:
    """Write a plain Hugging Face model directory from a kava run (best/, else final/) or checkpoint.

    - LoRA adapters are merged into the weights.
    - `<bot>`, `<eot>`, `<latent>` are in the tokenizer; the embedding is resized to hold them and their
      trained rows are written there. With tied embeddings the LM head follows the embedding, so its rows for
      real tokens are unchanged (checked); the new head rows are never predicted (`suppress_tokens` in
      generation_config.json, and kava blocks them too).
    - `tokenizer(question)` prepends BOS as training did (no chat template: kava trains on raw text).
    - generation_config.json: greedy, eos = kava's eos.
    - `kava.json` (method, mode, M, T, answer prompt, the run's config) and `kava_projection.safetensors`
      (the latent projection) sit beside it; `kava.load(DIR)` uses them for latent reasoning.
    """
    from kava.evaluate import default_mode

    import kava

    ck = find_checkpoint(run_or_ckpt)
    cfg = run_config(ck)
    out = Path(output)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose another --output")
    tok = AutoTokenizer.from_pretrained(ck / "tokenizer")
    ids = saved_tokenizer_ids(tok, ck / "tokenizer")
    lm = load_lm(ck, dtype=dtype, merged=True, cfg=cfg)
    extra = load_file(str(ck / EXTRA_FILE))
    rows = extra["special_rows"]

    emb = lm.get_input_embeddings()
    V = emb.weight.shape[0]
    head_before = lm.get_output_embeddings().weight[:V].detach().clone()
    tied = lm.get_output_embeddings().weight.data_ptr() == emb.weight.data_ptr()
    special = [ids.bot, ids.eot, ids.latent]
    if max(special) >= V:
        lm.resize_token_embeddings(max(special) + 1, mean_resizing=False)
    with torch.no_grad():
        w = lm.get_input_embeddings().weight
        for j, tid in enumerate(special):
            w[tid] = rows[j].to(w.dtype)
        head = lm.get_output_embeddings().weight
        if not tied and head.shape[0] > V:
            head[V:] = 0.0
    head = lm.get_output_embeddings().weight
    assert (head.data_ptr() == lm.get_input_embeddings().weight.data_ptr()) == tied, "resizing untied the LM head"
    real = [i for i in range(V) if i not in special]
    if not torch.equal(head[real], head_before[real]):
        raise CheckpointError("export: resizing the embedding changed the LM head rows of real tokens")

    # kava's capturing attention is not needed (nor known) outside kava: its plain counterpart
    lm.config._attn_implementation = "eager" if lm.config._attn_implementation == capture.EAGER_IMPL else "sdpa"
    gc = lm.generation_config
    gc.do_sample = False
    for k in ("temperature", "top_p", "top_k", "min_p", "typical_p"):
        if hasattr(gc, k):
            setattr(gc, k, None)
    gc.eos_token_id, gc.pad_token_id, gc.bos_token_id = ids.eos, ids.pad, ids.bos
    gc.suppress_tokens = special
    from kava.data.format import Formatter

    prompt_len = len(Formatter(tok, answer_prompt=cfg.data.answer_prompt).prompt_ids)
    gc.max_new_tokens = cfg.run.eval_max_new_tokens + (  # kava's budget: CoT + prompt + answer
        cfg.run.eval_max_cot_tokens + prompt_len if cfg.method == "cot" else 0)
    lm.config.pad_token_id, lm.config.eos_token_id, lm.config.bos_token_id = ids.pad, ids.eos, ids.bos

    _bos_template(tok, ids.bos)
    out.mkdir(parents=True, exist_ok=True)
    lm.save_pretrained(out)
    tok.save_pretrained(out)
    save_file({k[5:]: v.contiguous() for k, v in extra.items() if k.startswith("proj.")} or {},
              str(out / PROJECTION_FILE), metadata={"format": "pt"})
    meta = json.loads((ck / "meta.json").read_text()) if (ck / "meta.json").exists() else {}
    settings = {
        "kava_version": kava.__version__, "source": str(ck.resolve()), "step": meta.get("step"),
        "method": cfg.method, "mode": default_mode(cfg.method),
        "num_latents": cfg.latent.num_latents, "num_sweeps": cfg.latent.num_sweeps,
        "student_mode": student_mode(cfg.method),
        "answer_prompt": cfg.data.answer_prompt,
        "nocot_input": "question + ' ' + answer_prompt (the tokenizer prepends BOS)",
        "special_tokens": {"<bot>": ids.bot, "<eot>": ids.eot, "<latent>": ids.latent},
        "projection": {"kind": cfg.latent.projection, "hidden": cfg.latent.proj_hidden,
                       "layernorm": cfg.latent.proj_layernorm},
        "max_new_tokens": cfg.run.eval_max_new_tokens, "max_cot_tokens": cfg.run.eval_max_cot_tokens,
        "config": cfg.to_dict(),
    }
    (out / EXPORT_FILE).write_text(json.dumps(settings, indent=2))
    # what a user of the plain directory will do must give the ids kava trained on
    t2 = AutoTokenizer.from_pretrained(out)
    probe = "Tom has 3 apples."
    want = ([ids.bos] if ids.bos is not None else []) + t2(probe, add_special_tokens=False)["input_ids"]
    if t2(probe)["input_ids"] != want:
        raise CheckpointError(f"export: the saved tokenizer does not prepend BOS as training did "
                              f"({t2(probe)['input_ids']} != {want})")
    return out


def load_exported(d: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer, cfg) from a directory `export_model` wrote (strict: every tensor, the projection)."""
    from kava.config import config_from_dict

    d = Path(d)
    settings = json.loads((d / EXPORT_FILE).read_text())
    cfg = config_from_dict(settings["config"])
    tok = AutoTokenizer.from_pretrained(d)
    ids = saved_tokenizer_ids(tok, d)
    lm = load_saved_lm(d, dtype=dtype)
    model = LatentReasoner(lm, ids, projection=cfg.latent.projection, proj_hidden=cfg.latent.proj_hidden,
                           proj_layernorm=cfg.latent.proj_layernorm, attn_implementation=cfg.model.attn_implementation)
    emb = model.embed_tokens.weight
    state = {"special_rows": torch.stack([emb[i] for i in (ids.bot, ids.eot, ids.latent)]).float()}
    state.update({f"proj.{k}": v for k, v in load_file(str(d / PROJECTION_FILE)).items()})
    load_extra(model, state)
    model.blocked_ids = [ids.bot, ids.eot, ids.latent]
    model.to(device).eval()
    return model, tok, cfg
