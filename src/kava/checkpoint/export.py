"""`kava export`: a plain Hugging Face model directory from a kava run, plus what latent reasoning needs.

    config.json, model.safetensors, generation_config.json   the backbone, LoRA merged, special rows written
    tokenizer files                                          <bot>, <eot>, <latent> added; BOS prepended; no
                                                             chat template (training used none)
    kava.json                                                method, mode, M, T, answer prompt, the run's config
    kava_projection.safetensors                              the latent projection
    README.md                                                the model card (`kava.checkpoint.card`)

`push_to_hub` uploads such a directory (`huggingface_hub`, the token of `hf auth login` or `HF_TOKEN`), its card
naming the repository (`kava.checkpoint.card.card_for_repo`).

`kava.checkpoint.load.load_exported` (and so `kava.load`) reads such a directory back.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import processors
from transformers import AutoTokenizer

from kava import __version__
from kava.checkpoint.card import card_for_repo, model_card
from kava.checkpoint.rundir import run_dir_of
from kava.checkpoint.saved import (BASE_FILE, EXTRA_FILE, META_FILE, CheckpointError, find_checkpoint, load_lm,
                                   run_config, saved_tokenizer_ids)
from kava.config import ConfigError
from kava.curriculum import keeps_positions
from kava.data.format import Formatter
from kava.decode import budget
from kava.model import capture

EXPORT_FILE = "kava.json"  # latent settings beside an exported model
PROJECTION_FILE = "kava_projection.safetensors"


def _bos_template(tok, bos_id: int | None) -> None:
    """Make `tokenizer(text)` give exactly what kava trained on: [bos] + text ids (no eos, nothing else)."""
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


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def export_model(run_or_ckpt: str | Path, output: str | Path, *, dtype: torch.dtype | str = torch.float32,
                 license: str | None = None) -> Path:
    """Write a plain Hugging Face model directory from a kava run (best/, else final/) or checkpoint.

    - LoRA adapters are merged into the weights.
    - `<bot>`, `<eot>`, `<latent>` are in the tokenizer; the embedding is resized to hold them and their
      trained rows are written there. With tied embeddings the LM head follows the embedding, so its rows for
      real tokens are unchanged (checked); the new head rows are never predicted (`suppress_tokens` in
      generation_config.json, and kava blocks them too).
    - `tokenizer(question)` prepends BOS as training did; a chat template the base tokenizer had is dropped
      (kava trains on raw text: `apply_chat_template` would give another prompt than training's).
    - `dtype` (`fp32`, `bf16`, `fp16` or a torch dtype): the saved weights; the merge and the checks run in fp32.
    - README.md: the model card (base model, method, data, the run's evaluation results, how to load it; `license`:
      its Hub license id, `kava.checkpoint.card.license_meta`).
    - generation_config.json: greedy, eos = kava's eos.
    - `kava.json` (method, mode, M, T, answer prompt, the run's config) and `kava_projection.safetensors`
      (the latent projection) sit beside it; `kava.load(DIR)` uses them for latent reasoning.
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"--dtype {dtype}: allowed values: {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    ck = find_checkpoint(run_or_ckpt)
    cfg = run_config(ck)
    if keeps_positions(cfg):
        # a plain `generate` counts positions on from the question; this model's CoT and answer sit further on
        raise ConfigError(f"{ck}: trained with icot.keep_position, which plain generation cannot reproduce; "
                          "evaluate it with kava eval (it skips the positions its meta.json records)")
    out = Path(output)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose another --output")
    tok = AutoTokenizer.from_pretrained(ck / "tokenizer")
    ids = saved_tokenizer_ids(tok, ck / "tokenizer")
    lm = load_lm(ck, dtype=torch.float32, merged=True, cfg=cfg)
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
    prompt_len = len(Formatter.from_config(cfg, tok, limits=False).prompt_ids)
    gc.max_new_tokens = budget(cfg.spec.eval_mode, max_new_tokens=cfg.run.eval_max_new_tokens,  # cot: + CoT + prompt
                               max_cot_tokens=cfg.run.eval_max_cot_tokens, prompt_len=prompt_len)
    lm.config.pad_token_id, lm.config.eos_token_id, lm.config.bos_token_id = ids.pad, ids.eos, ids.bos

    _bos_template(tok, ids.bos)
    tok.chat_template = None  # training never used it: a plain user must not get another prompt
    out.mkdir(parents=True, exist_ok=True)
    lm.to(dtype).save_pretrained(out)
    tok.save_pretrained(out)
    for stale in ("chat_template.jinja", "chat_template.json"):
        (out / stale).unlink(missing_ok=True)
    save_file({k[5:]: v.contiguous() for k, v in extra.items() if k.startswith("proj.")} or {},
              str(out / PROJECTION_FILE), metadata={"format": "pt"})
    meta = json.loads((ck / META_FILE).read_text()) if (ck / META_FILE).exists() else {}
    settings = {
        "kava_version": __version__, "source": str(ck.resolve()), "step": meta.get("step"),
        "method": cfg.method, "mode": cfg.spec.eval_mode,
        "num_latents": cfg.latent.num_latents, "num_sweeps": cfg.latent.num_sweeps,
        "student_mode": cfg.spec.student_mode,
        "answer_prompt": cfg.data.answer_prompt,
        "nocot_input": "question + ' ' + answer_prompt (the tokenizer prepends BOS)",
        "special_tokens": {"<bot>": ids.bot, "<eot>": ids.eot, "<latent>": ids.latent},
        "projection": {"kind": cfg.latent.projection, "hidden": cfg.latent.proj_hidden,
                       "layernorm": cfg.latent.proj_layernorm},
        "max_new_tokens": cfg.run.eval_max_new_tokens, "max_cot_tokens": cfg.run.eval_max_cot_tokens,
        "config": cfg.to_dict(),
    }
    (out / EXPORT_FILE).write_text(json.dumps(settings, indent=2))
    base = json.loads((ck / BASE_FILE).read_text()) if (ck / BASE_FILE).exists() else None
    (out / "README.md").write_text(model_card(cfg, base=base, run_dir=run_dir_of(ck), step=meta.get("step"),
                                              exported=True, dtype=str(dtype).removeprefix("torch."),
                                              license=license))
    # what a user of the plain directory will do must give the ids kava trained on
    t2 = AutoTokenizer.from_pretrained(out)
    probe = "Tom has 3 apples."
    want = ([ids.bos] if ids.bos is not None else []) + t2(probe, add_special_tokens=False)["input_ids"]
    if t2(probe)["input_ids"] != want:
        raise CheckpointError(f"export: the saved tokenizer does not prepend BOS as training did "
                              f"({t2(probe)['input_ids']} != {want})")
    if getattr(t2, "chat_template", None):
        raise CheckpointError(f"export: {out} still carries a chat template that training did not use")
    return out


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = False) -> list[str]:
    """Upload an exported directory to the Hugging Face Hub repository `repo_id` (created when missing), its card's
    loading code naming `repo_id`; returns the uploaded files. A hub failure (no token, no access) is an OSError
    naming the repository."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    card = folder / "README.md"
    if card.exists():  # the copy on disk is the one on the Hub
        card.write_text(card_for_repo(card.read_text(), repo_id))
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          commit_message=f"kava export ({json.loads((folder / EXPORT_FILE).read_text())['method']})")
    except Exception as e:  # noqa: BLE001 - network, auth, permissions: one line, the export stays on disk
        raise OSError(f"--push-to-hub {repo_id}: {type(e).__name__}: {e}; the export is in {folder} "
                      "(log in with `hf auth login` or set HF_TOKEN)") from e
    return files
