"""Every way kava gets a model:

- the one a config describes (`load_tokenizer`, `build_reasoner`): a hub id / local dir / GGUF file, a model
  built from scratch, or a kava run (`model.init_from`, full or LoRA);
- a saved checkpoint (`load_for_eval`: a run's best/, else final/, or a checkpoint directory);
- an exported directory (`load_exported`, `kava.checkpoint.export`);
- a training checkpoint `RUN/checkpoints/step_<n>` (`load_step`: the run's model rebuilt, its trainable tensors in);
- a plain Hugging Face model, or a peft adapter on one (`load_plain`: the base model a researcher compares
  against, in cot or nocot mode, with kava's answer prompt);
- any of these (`load_any`: what `kava.load`, `kava eval`, `ask`, `inspect` open).

Loading never executes remote code unless `model.trust_remote_code: true`; kava's own checkpoints are
safetensors only, loaded with strict key checks (`kava.checkpoint.saved`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from kava.checkpoint.export import EXPORT_FILE, PROJECTION_FILE
from kava.checkpoint.rundir import BEST_DIR, FINAL_DIR, RunDir, read_state, run_dir_of, saved_step
from kava.checkpoint.saved import (EXTRA_FILE, CheckpointError, find_checkpoint, has_model, load_extra, load_lm,
                                   load_saved_lm, read_adapter_config, resolve_init_dir, run_config,
                                   saved_tokenizer_ids)
from kava.checkpoint.state import check_tokenizer, is_step_checkpoint, load_trainable
from kava.config import Config, ConfigError, config_from_dict, load_config
from kava.data.format import SpecialIds, add_special_tokens
from kava.decode import sequence_length
from kava.model.families import SlidingWindowTooShort, check_window
from kava.model.lora_dropout import fuse_lora_dropout
from kava.model.pretrained import check_local_path, local_or_hub, load_pretrained_lm, pretrained_dir, scratch_config
from kava.model.reasoner import LatentReasoner
from kava.spec import MODES


def load_tokenizer(cfg: Config, tokenizer_dir: str | None = None):
    m = cfg.model
    if tokenizer_dir or m.tokenizer:
        if not tokenizer_dir:
            check_local_path(m.tokenizer, "model.tokenizer")
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
    if cfg.spec.student == "jacobi" and cfg.latent.num_sweeps == 0:
        # T=0 (pause tokens) never calls the projection: a trainable parameter without a gradient makes
        # DDP (find_unused_parameters off) fail at the next step, and AdamW would decay it for nothing
        model.proj.requires_grad_(False)
    model.base_source = base  # what a saved LoRA adapter needs to be loaded again (kava.checkpoint.saved.save_model)
    if extra is not None:
        load_extra(model, extra, strict_proj=False)
    return model


def longest_sequence(cfg: Config, tokenizer) -> int:
    """Columns of the longest teacher or student sequence the config allows (question, CoT or latents,
    answer prompt, answer, and the special tokens around them)."""
    d = cfg.data
    prompt = len(tokenizer(d.answer_prompt, add_special_tokens=False)["input_ids"]) if d.answer_prompt else 0
    # the teacher's question · CoT · prompt · answer is cot mode's layout, the student's latent mode's
    return 4 + max(sequence_length(mode, d.max_question_tokens, num_latents=cfg.latent.num_latents, prompt_len=prompt,
                                   max_new_tokens=d.max_answer_tokens, max_cot_tokens=d.max_cot_tokens)
                   for mode in MODES)


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


def load_step(ck: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer, cfg) from a training checkpoint `RUN/checkpoints/step_<n>`: the run's model built
    again from its config.yaml (and tokenizer), then its trainable tensors loaded with strict key checks."""
    ck = Path(ck)
    rd = RunDir(ck.parent.parent)
    if not rd.started():
        raise CheckpointError(f"{ck}: a training checkpoint outside its run directory (no {rd.config})")
    cfg = load_config(str(rd.config), resolve_paths=False)
    if cfg.model.from_scratch is not None and cfg.lora is not None:
        raise CheckpointError(f"{ck}: a step checkpoint of a LoRA run on a model built from scratch holds the adapter "
                              f"only; the random base weights are saved with {rd.best} and {rd.final}: evaluate one "
                              "of those")
    tok = load_tokenizer(cfg, rd.tokenizer_dir(cfg))
    check_tokenizer(ck, tok)
    model = build_reasoner(cfg, tok, dtype=dtype)  # the trainable set of training (pause tokens: no projection)
    load_trainable(ck, model)
    model.to(device).eval()
    return model, tok, cfg


PLAIN_MODES = ("cot", "nocot")


def load_plain(pretrained: str, *, peft: str | None = None, gguf_file: str | None = None,
               tokenizer: str | None = None, mode: str | None = None, trust_remote_code: bool = False,
               device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer, cfg) for a plain Hugging Face causal LM (hub id, local directory, GGUF file), with a
    peft adapter on it when `peft` is given: no latents, so `mode` is cot (default) or nocot; the config is
    that of kava's method of the same name (which evaluates in that mode) with kava's defaults (answer prompt
    "The answer is:", evaluation budgets)."""
    mode = mode or "cot"
    if mode not in PLAIN_MODES:
        raise ValueError(f"--mode {mode}: a plain model (no kava training) has no latent mode; use cot or nocot")
    method = mode  # the methods cot and nocot evaluate in the modes of their names
    if tokenizer is None and peft is not None and (Path(peft) / "tokenizer_config.json").exists():
        tokenizer = str(peft)  # an adapter saved with its tokenizer
    cfg = config_from_dict({"method": method, "lora": None, "model": {
        "name_or_path": pretrained, "gguf_file": gguf_file, "tokenizer": tokenizer, "trust_remote_code": trust_remote_code}})
    tok = load_tokenizer(cfg)
    lm = load_pretrained_lm(pretrained, gguf_file, dtype=dtype, trust_remote_code=trust_remote_code)
    if peft is not None:
        from peft import PeftModel

        if not (Path(peft) / "adapter_config.json").exists():
            raise CheckpointError(f"peft={peft}: no adapter_config.json (not a peft adapter directory)")
        read_adapter_config(peft)
        lm = PeftModel.from_pretrained(lm, peft).merge_and_unload()
    ids = add_special_tokens(tok)
    if lm.config.pad_token_id is None:
        lm.config.pad_token_id = ids.pad
    model = LatentReasoner(lm, ids, attn_implementation=cfg.model.attn_implementation)
    check_model(model, cfg, tok)
    # kava's three tokens were added for its own formats; a head with rows for them must never predict them
    model.blocked_ids = [i for i in (ids.bot, ids.eot, ids.latent) if i < model.head.weight.shape[0]]
    model.to(device).eval()
    return model, tok, cfg


def adapter_base(adapter: Path) -> str:
    """The base model a peft adapter directory names (`base_model_name_or_path` of adapter_config.json)."""
    base = read_adapter_config(adapter).get("base_model_name_or_path")
    if not base:
        raise CheckpointError(f"{adapter / 'adapter_config.json'}: no base_model_name_or_path; give the base with "
                              "--model-args pretrained=BASE,peft=ADAPTER")
    return base


def parse_model_args(text: str) -> dict:
    """lm-evaluation-harness style ``pretrained=ID_OR_DIR,peft=ADAPTER,gguf_file=F,tokenizer=T,
    trust_remote_code=true`` -> keyword arguments of `load_plain`."""
    out: dict = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in ("pretrained", "peft", "gguf_file", "tokenizer", "trust_remote_code"):
            raise ValueError(f"--model-args {item!r}: expected key=value with key one of pretrained, peft, gguf_file, "
                             "tokenizer, trust_remote_code")
        out[key] = value.strip().lower() in ("1", "true", "yes") if key == "trust_remote_code" else value.strip()
    if "pretrained" not in out:
        raise ValueError(f"--model-args {text!r}: pretrained=ID_OR_DIR is required")
    return out


def plain_identity(model_args: dict) -> dict:
    """What makes a plain model (`load_plain`'s arguments) one model: pretrained, peft, gguf_file, tokenizer,
    trust_remote_code, the ones given, a local path made absolute (a hub id kept). Two evaluations are of the
    same model when these are equal; summary.json records them as "model_args"."""
    out = {}
    for key in ("pretrained", "peft", "gguf_file", "tokenizer", "trust_remote_code"):
        value = model_args.get(key)
        if value in (None, False, ""):
            continue
        out[key] = local_or_hub(value) if key in ("pretrained", "peft", "tokenizer") else value
    return out


def plain_name(identity: dict) -> str:
    """A readable name of a plain model (`plain_identity`): the base's directory name (or hub id), then
    `+<GGUF file stem>`, `+<adapter directory name>` and `+tok-<tokenizer name>` when given, e.g.
    `Llama-3.2-1B+my-adapter`."""
    name = lambda v: Path(v).name if Path(v).exists() else v  # noqa: E731
    parts = [name(identity["pretrained"])]
    if identity.get("gguf_file"):
        parts.append(Path(identity["gguf_file"]).stem)
    if identity.get("peft"):
        parts.append(name(identity["peft"]))
    if identity.get("tokenizer"):
        parts.append("tok-" + name(identity["tokenizer"]))
    return "+".join(parts)


@dataclass
class Loaded:
    """A model with its tokenizer and config, and where it came from."""

    model: LatentReasoner
    tokenizer: object
    cfg: Config
    source: Path  # the checkpoint directory (a run's best/ or final/, a step_<n>), the export directory, or the model
    exported: bool
    kind: str = "run"  # run (best/, final/, a saved model) | step | export | plain (a HF model, with its peft adapter)
    model_args: dict | None = None  # a plain model's identity (`plain_identity`); None for a kava model

    @property
    def run_dir(self) -> Path:
        """Where results of this model go (`eval/`, `inspect.png`): the run dir, or the export dir."""
        return self.source if self.exported else run_dir_of(self.source)


def model_checkpoint(source: str | Path, kind: str) -> tuple[str | None, int | None]:
    """(which checkpoint, its training step) of a loaded model (`Loaded.source`, `Loaded.kind`): ("best" or
    "final", step) for a run's saved model, ("step_<n>", n) for a training checkpoint, (None, step) for a
    `kava export` directory (the step it was exported at) or a saved model outside a run, (None, None) for a
    plain model."""
    source = Path(source)
    if kind == "step":
        return source.name, read_state(source)["step"]
    if kind == "export":
        return None, json.loads((source / EXPORT_FILE).read_text()).get("step")
    if kind == "run":
        inside = source.name in (BEST_DIR, FINAL_DIR) and run_dir_of(source) != source
        return (source.name if inside else None), saved_step(source)
    return None, None


def describe_source(source: str | Path, kind: str, model_args: dict | None = None) -> str:
    """The model `kava eval` and `kava ask` say they loaded: `runs/x/best (the run's best/, step 200)`,
    `RUN/checkpoints/step_40 (training checkpoint, step 40)`, `DIR (kava export of step 200)`, or a plain
    model's args."""
    if kind == "plain":
        return "plain model " + ",".join(f"{k}={v}" for k, v in (model_args or {"pretrained": source}).items())
    which, step = model_checkpoint(source, kind)
    at = f"step {step}" if step is not None else "step not recorded"
    what = {"step": "training checkpoint", "export": "kava export of"}.get(kind) or (
        f"the run's {which}/," if which else "saved model,")
    return f"{source} ({what} {at})"


def load_any(path: str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
             mode: str | None = None) -> Loaded:
    """A kava run directory (its best/, else final/ model), a saved checkpoint, a training checkpoint
    (`checkpoints/step_<n>`), a `kava export` directory, a plain Hugging Face model directory (config.json) or a
    peft adapter directory (adapter_config.json, on the base it names). `mode`: for a plain model (cot or nocot).

    device: default cuda when available, else cpu; dtype: default bf16 on cuda, fp32 on cpu.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    p = Path(path)
    if (p / EXPORT_FILE).exists():
        return Loaded(*load_exported(p, device=device, dtype=dtype), p, exported=True, kind="export")
    if is_step_checkpoint(p):
        return Loaded(*load_step(p, device=device, dtype=dtype), p, exported=False, kind="step")
    if p.name == "model" and has_model(p.parent):  # best/model/ (peft's adapter files): the whole saved model
        p = p.parent
    if p.is_dir() and not any(has_model(c) for c in (p, RunDir(p).best, RunDir(p).final)):
        if (p / "adapter_config.json").exists():
            base = adapter_base(p)
            return Loaded(*load_plain(base, peft=str(p), mode=mode, device=device, dtype=dtype), p,
                          exported=False, kind="plain", model_args=plain_identity({"pretrained": base, "peft": str(p)}))
        if (p / "config.json").exists():
            return Loaded(*load_plain(str(p), mode=mode, device=device, dtype=dtype), p, exported=False, kind="plain",
                          model_args=plain_identity({"pretrained": str(p)}))
    try:
        ck = find_checkpoint(p)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; also accepted: RUN/checkpoints/step_<n>, a `kava export` dir, a Hugging Face "
                              "model dir (config.json) or a peft adapter dir (adapter_config.json)") from None
    return Loaded(*load_for_eval(ck, device=device, dtype=dtype), ck, exported=False)
