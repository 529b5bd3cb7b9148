"""Every way kava gets a model:

- the one a config describes (`load_tokenizer`, `build_reasoner`): a hub id / local dir / GGUF file, a model
  built from scratch, or a kava run (`model.init_from`, full or LoRA);
- a saved checkpoint (`load_for_eval`: a run's best/, else final/, or a checkpoint directory);
- an exported directory (`load_exported`, `kava.checkpoint.export`);
- either of the last two (`load_any`: what `kava.load`, `kava eval`, `ask`, `inspect` open).

Loading never executes remote code unless `model.trust_remote_code: true`; kava's own checkpoints are
safetensors only, loaded with strict key checks (`kava.checkpoint.saved`).
"""

from __future__ import annotations

from pathlib import Path

import json
from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from kava.checkpoint.export import EXPORT_FILE, PROJECTION_FILE
from kava.checkpoint.saved import (EXTRA_FILE, find_checkpoint, load_extra, load_lm, load_saved_lm,
                                   resolve_init_dir, run_config, run_dir_of, saved_tokenizer_ids)
from kava.config import Config, ConfigError, config_from_dict
from kava.data.format import SpecialIds, add_special_tokens
from kava.model.families import SlidingWindowTooShort, check_window
from kava.model.lora_dropout import fuse_lora_dropout
from kava.model.pretrained import local_or_hub, load_pretrained_lm, pretrained_dir, scratch_config
from kava.model.reasoner import LatentReasoner


def load_tokenizer(cfg: Config, tokenizer_dir: str | None = None):
    m = cfg.model
    if tokenizer_dir or m.tokenizer:
        src = str(Path(tokenizer_dir or m.tokenizer).expanduser())
    elif m.name_or_path:  # the model's own (for a GGUF file: the tokenizer converted with it)
        src = pretrained_dir(m.name_or_path, m.gguf_file, trust_remote_code=m.trust_remote_code)
    else:
        src = None
    trained = None  # a kava model's tokenizer: must carry the special tokens its weights were trained with
    if m.init_from and not tokenizer_dir:
        init_dir = resolve_init_dir(m.init_from)
        src = str(init_dir / "tokenizer")
        trained = src if (init_dir / EXTRA_FILE).exists() else None
    if src is None:
        raise ValueError("no tokenizer: set model.tokenizer (or model.name_or_path), or build one for from_scratch")
    tok = AutoTokenizer.from_pretrained(src, trust_remote_code=m.trust_remote_code)
    if trained:
        saved_tokenizer_ids(tok, trained)
    add_special_tokens(tok)
    return tok


def build_reasoner(cfg: Config, tokenizer, *, dtype: torch.dtype = torch.float32) -> LatentReasoner:
    """The backbone (with LoRA if configured) wrapped as a `LatentReasoner`."""
    ids: SpecialIds = add_special_tokens(tokenizer)
    m = cfg.model
    extra = None
    if m.init_from:
        src = resolve_init_dir(m.init_from)
        lm = load_lm(src, dtype=dtype, merged=True)  # a LoRA run: its adapter folded into its base
        if (src / EXTRA_FILE).exists():
            extra = load_file(str(src / EXTRA_FILE))
        base = {"kind": "init_from", "path": str(src.resolve())}
    elif m.from_scratch is not None:
        hf_cfg = scratch_config(m.from_scratch, vocab_size=len(tokenizer), tokenizer=tokenizer)
        lm = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
        base = {"kind": "scratch"}
    else:
        lm = load_pretrained_lm(m.name_or_path, m.gguf_file, dtype=dtype, trust_remote_code=m.trust_remote_code)
        base = {"kind": "pretrained", "name_or_path": local_or_hub(m.name_or_path), "gguf_file": m.gguf_file,
                "trust_remote_code": m.trust_remote_code}
    if lm.config.pad_token_id is None:
        lm.config.pad_token_id = ids.pad
    if m.gradient_checkpointing:  # `activation_checkpointing_enable` replaces the deprecated gradient_... name
        enable = getattr(lm, "activation_checkpointing_enable", None) or lm.gradient_checkpointing_enable
        enable()
    if cfg.lora is not None:
        lm = get_peft_model(lm, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                           target_modules=list(cfg.lora.target_modules), bias="none"))
        if cfg.lora.fused_dropout:
            fuse_lora_dropout(lm)
        if dtype != torch.float32:
            keep_adapter_inputs_in_compute_dtype(lm)
    model = LatentReasoner(lm, ids, projection=cfg.latent.projection, proj_hidden=cfg.latent.proj_hidden,
                           proj_layernorm=cfg.latent.proj_layernorm, attn_implementation=m.attn_implementation)
    check_model(model, cfg, tokenizer)
    model.base_source = base  # what a saved LoRA adapter needs to be loaded again (kava.checkpoint.saved.save_model)
    if extra is not None:
        load_extra(model, extra, strict_proj=False)
    return model


def longest_sequence(cfg: Config, tokenizer) -> int:
    """Columns of the longest teacher or student sequence the config allows (question, CoT or latents,
    answer prompt, answer, and the special tokens around them)."""
    d = cfg.data
    prompt = len(tokenizer(d.answer_prompt, add_special_tokens=False)["input_ids"]) if d.answer_prompt else 0
    middle = max(d.max_cot_tokens, cfg.latent.num_latents + 2)
    return d.max_question_tokens + middle + prompt + d.max_answer_tokens + 4


def check_model(model: LatentReasoner, cfg: Config, tokenizer) -> None:
    """Model-build-time refusals (ValueError / ConfigError naming the key): kava's logits path must reproduce
    the model's own, a sliding window must cover the longest configured sequence, and `pre_rope` keys must be
    verifiable for this model (`kava.model.reasoner:LatentReasoner.check_pre_rope`)."""
    model.check_backbone()
    try:
        check_window(model.sliding_window, longest_sequence(cfg, tokenizer),
                     "the longest configured sequence (data.max_*_tokens, latent.num_latents, data.answer_prompt)")
    except SlidingWindowTooShort as e:
        raise ConfigError(f"model: {e}") from None
    if cfg.loss.kv_key_space == "pre_rope" and cfg.spec.kv:
        try:
            model.check_pre_rope()
        except ValueError as e:
            raise ConfigError(str(e)) from None


def keep_adapter_inputs_in_compute_dtype(lm) -> None:
    """Stop peft from casting every adapter input to the fp32 adapter dtype (and back).

    Over a bf16 backbone peft keeps LoRA weights in fp32 and, by default, copies each input activation
    [B, S, d] to fp32 for the adapter and the result back: several full-size copies per module per pass.
    Under autocast the fp32 adapter weights are cast once per step instead (autocast caches leaf casts),
    so the activations never leave bf16. Requires running under autocast (`LatentReasoner.autocast`).
    """
    for m in lm.modules():
        if isinstance(m, BaseTunerLayer):
            m.cast_input_dtype_enabled = False


# ------------------------------------------------------------------------------------------------ saved models
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


def load_exported(d: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer, cfg) from a directory `export_model` wrote (strict: every tensor, the projection)."""
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


@dataclass
class Loaded:
    """A trained model with its tokenizer and config, and where it came from."""

    model: LatentReasoner
    tokenizer: object
    cfg: Config
    source: Path  # the checkpoint directory (a run's best/ or final/) or the export directory
    exported: bool

    @property
    def run_dir(self) -> Path:
        """Where results of this model go (`eval/`, `inspect.png`): the run dir, or the export dir."""
        return self.source if self.exported else run_dir_of(self.source)


def load_any(path: str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None
             ) -> Loaded:
    """A kava run directory (its best/, else final/ model), a saved checkpoint, or a `kava export` directory.

    device: default cuda when available, else cpu; dtype: default bf16 on cuda, fp32 on cpu.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    p = Path(path)
    if (p / EXPORT_FILE).exists():
        return Loaded(*load_exported(p, device=device, dtype=dtype), p, exported=True)
    ck = find_checkpoint(p)
    return Loaded(*load_for_eval(ck, device=device, dtype=dtype), ck, exported=False)
