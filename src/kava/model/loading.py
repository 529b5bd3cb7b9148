"""Build the tokenizer and the `LatentReasoner` from a config: hub id / local dir, from scratch, or a kava run.

Loading never executes remote code unless `model.trust_remote_code: true`; kava's own checkpoints are
safetensors only, loaded with strict key checks.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig, Qwen2Config

from kava.config import Config
from kava.data.format import SPECIAL_TOKENS, SpecialIds, add_special_tokens, special_ids
from kava.model import capture  # noqa: F401  (registers the kava_sdpa attention implementation)
from kava.model.reasoner import LatentReasoner

FAMILIES = {"llama": LlamaConfig, "qwen2": Qwen2Config, "gpt2": GPT2Config}
EXTRA_FILE = "kava_extra.safetensors"  # special-token rows + projection


class CheckpointError(RuntimeError):
    pass


def scratch_config(spec: dict, vocab_size: int):
    """HF config from a `model.from_scratch` dict (`family` + HF config fields)."""
    spec = dict(spec)
    fam = spec.pop("family")
    cls = FAMILIES[fam]
    # a larger vocab_size in the spec pads the embedding (e.g. real-model shapes with a small local tokenizer)
    spec["vocab_size"] = max(vocab_size, spec.get("vocab_size") or 0)
    if fam == "gpt2":
        spec.setdefault("n_positions", 1024)
    return cls(**spec)


def resolve_init_dir(path: str) -> Path:
    """A kava run dir (its final model), a checkpoint dir, or a plain HF model dir."""
    p = Path(path)
    for cand in (p / "final", p / "best", p):
        if (cand / "model" / "config.json").exists():
            return cand
    raise CheckpointError(f"{path}: no kava model found (expected {p}/final/model/config.json)")


def saved_tokenizer_ids(tok, where) -> SpecialIds:
    """The special ids of a tokenizer kava saved next to trained weights; it must already hold the tokens.

    (Adding them again would give ids that need not be the ones `special_rows` was trained for.)
    """
    missing = [t for t in SPECIAL_TOKENS if t not in tok.get_vocab()]
    if missing:
        raise CheckpointError(f"{where}: tokenizer lacks kava's special tokens {missing}: it was not saved with "
                              "these weights by kava (replaced or from another model?)")
    return special_ids(tok)


def load_tokenizer(cfg: Config, tokenizer_dir: str | None = None):
    src = tokenizer_dir or cfg.model.tokenizer or cfg.model.name_or_path
    trained = None  # a kava model's tokenizer: must carry the special tokens its weights were trained with
    if cfg.model.init_from and not tokenizer_dir:
        init_dir = resolve_init_dir(cfg.model.init_from)
        src = str(init_dir / "tokenizer")
        trained = src if (init_dir / EXTRA_FILE).exists() else None
    if src is None:
        raise ValueError("no tokenizer: set model.tokenizer (or model.name_or_path), or build one for from_scratch")
    tok = AutoTokenizer.from_pretrained(src, trust_remote_code=cfg.model.trust_remote_code)
    if trained:
        saved_tokenizer_ids(tok, trained)
    add_special_tokens(tok)
    return tok


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


def build_reasoner(cfg: Config, tokenizer, *, dtype: torch.dtype = torch.float32) -> LatentReasoner:
    """The backbone (with LoRA if configured) wrapped as a `LatentReasoner`."""
    ids: SpecialIds = add_special_tokens(tokenizer)
    m = cfg.model
    extra = None
    if m.init_from:
        src = resolve_init_dir(m.init_from)
        if (src / "model" / "adapter_config.json").exists():
            lm = AutoModelForCausalLM.from_pretrained(src / "model", dtype=dtype, attn_implementation=capture.ATTN_IMPL)
        else:
            lm = load_saved_lm(src / "model", dtype=dtype, attn_implementation=capture.ATTN_IMPL)
        if (src / EXTRA_FILE).exists():
            extra = load_file(str(src / EXTRA_FILE))
    elif m.from_scratch is not None:
        hf_cfg = scratch_config(m.from_scratch, vocab_size=len(tokenizer))
        hf_cfg._attn_implementation = capture.ATTN_IMPL
        lm = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype, attn_implementation=capture.ATTN_IMPL)
    else:
        lm = AutoModelForCausalLM.from_pretrained(
            m.name_or_path, dtype=dtype, attn_implementation=capture.ATTN_IMPL,
            trust_remote_code=m.trust_remote_code)
    if lm.config.pad_token_id is None:
        lm.config.pad_token_id = ids.pad
    if m.gradient_checkpointing:
        lm.gradient_checkpointing_enable()
    if cfg.lora is not None:
        from peft import LoraConfig, get_peft_model

        lm = get_peft_model(lm, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                           target_modules=list(cfg.lora.target_modules), bias="none"))
        if dtype != torch.float32:
            keep_adapter_inputs_in_compute_dtype(lm)
    model = LatentReasoner(lm, ids, projection=cfg.latent.projection, proj_hidden=cfg.latent.proj_hidden,
                           proj_layernorm=cfg.latent.proj_layernorm)
    if extra is not None:
        load_extra(model, extra, strict_proj=False)
    return model


def keep_adapter_inputs_in_compute_dtype(lm) -> None:
    """Stop peft from casting every adapter input to the fp32 adapter dtype (and back).

    Over a bf16 backbone peft keeps LoRA weights in fp32 and, by default, copies each input activation
    [B, S, d] to fp32 for the adapter and the result back: several full-size copies per module per pass.
    Under autocast the fp32 adapter weights are cast once per step instead (autocast caches leaf casts),
    so the activations never leave bf16. Requires running under autocast (`LatentReasoner.autocast`).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in lm.modules():
        if isinstance(m, BaseTunerLayer):
            m.cast_input_dtype_enabled = False


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


def save_model(model: LatentReasoner, tokenizer, out_dir: str | Path, meta: dict | None = None) -> None:
    """Save a loadable model: model/ (full weights or LoRA adapter, safetensors), tokenizer/, extra tensors."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.lm.save_pretrained(out / "model", safe_serialization=True)
    tokenizer.save_pretrained(out / "tokenizer")
    save_file(extra_state(model), str(out / EXTRA_FILE))
    if meta is not None:
        (out / "meta.json").write_text(json.dumps(meta, indent=2))


def load_for_eval(run_or_ckpt: str | Path, *, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32):
    """One call: (model, tokenizer, cfg) from a kava run dir or checkpoint dir, in eval mode."""
    from kava.config import config_from_dict
    import yaml

    p = Path(run_or_ckpt)
    ck = resolve_init_dir(str(p))
    run_dir = ck.parent if (ck.parent / "config.yaml").exists() else ck
    if not (run_dir / "config.yaml").exists():
        raise CheckpointError(f"{p}: no config.yaml next to the checkpoint")
    cfg = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    tok = AutoTokenizer.from_pretrained(ck / "tokenizer")
    ids = saved_tokenizer_ids(tok, ck / "tokenizer")
    model_dir = ck / "model"
    if (model_dir / "adapter_config.json").exists():
        from peft import PeftModel

        if not (model_dir / "adapter_model.safetensors").exists():
            raise CheckpointError(f"{model_dir}: no adapter_model.safetensors (kava loads only safetensors checkpoints)")

        base_src = cfg.model.name_or_path
        if cfg.model.init_from:
            base_src = str(resolve_init_dir(cfg.model.init_from) / "model")
        if base_src is None:
            raise CheckpointError(f"{model_dir}: LoRA adapter without a base model in config.yaml")
        base = AutoModelForCausalLM.from_pretrained(base_src, dtype=dtype, attn_implementation=capture.ATTN_IMPL,
                                                    trust_remote_code=cfg.model.trust_remote_code)
        lm = PeftModel.from_pretrained(base, model_dir)
        check_adapter_keys(lm, model_dir)
    else:
        lm = load_saved_lm(model_dir, dtype=dtype, attn_implementation=capture.ATTN_IMPL)
    model = LatentReasoner(lm, ids, projection=cfg.latent.projection, proj_hidden=cfg.latent.proj_hidden,
                           proj_layernorm=cfg.latent.proj_layernorm)
    load_extra(model, load_file(str(ck / EXTRA_FILE)))
    model.to(device).eval()
    return model, tok, cfg
