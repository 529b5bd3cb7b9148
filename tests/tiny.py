"""Tiny models and a local tokenizer for tests (no downloads)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from kava.data.format import add_special_tokens
from kava.data.records import Record
from kava.model.pretrained import scratch_config
from kava.model.reasoner import LatentReasoner

WORDS = ("Tom has apples . He buys more gives away How many does have now ? The answer is : "
         "<<3+4=7>> <<7-2=5>> + - * / = << >> and then left").split()


def tiny_tokenizer(kava_tokens: bool = True):
    """kava_tokens=False: a plain tokenizer, as a Hugging Face model ships it (no <bot>, <eot>, <latent>)."""
    vocab = {"<|pad|>": 0, "<|eos|>": 1, "<|bos|>": 2, "<|unk|>": 3}
    for ch in list("0123456789") + WORDS:
        vocab.setdefault(ch, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    tk.decoder = decoders.WordPiece()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<|pad|>", eos_token="<|eos|>", bos_token="<|bos|>",
                                  unk_token="<|unk|>")
    if kava_tokens:
        add_special_tokens(tok)
    return tok


BASE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256)

# `model.from_scratch` specs of the family matrix (tests/family_matrix.py): 2 layers, hidden 32, and whatever
# makes the family's peculiarity matter at this size (a small final softcap, partial rotary, no-RoPE layers).
SPECS = {
    "llama": dict(family="llama", **BASE),
    "qwen2": dict(family="qwen2", **BASE),
    "qwen3": dict(family="qwen3", head_dim=8, **BASE),
    "qwen3_moe": dict(family="qwen3_moe", head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      **BASE),
    "mistral": dict(family="mistral", sliding_window=None, **BASE),
    "mistral_window": dict(family="mistral", sliding_window=6, **BASE),
    "gemma2": dict(family="gemma2", head_dim=8, query_pre_attn_scalar=8, attn_logit_softcapping=2.0,
                   final_logit_softcapping=0.5, sliding_window=4096, **BASE),
    "gemma3": dict(family="gemma3", head_dim=8, query_pre_attn_scalar=8, sliding_window=4096,
                   final_logit_softcapping=0.5, layer_types=["sliding_attention", "full_attention"], **BASE),
    "phi3": dict(family="phi3", partial_rotary_factor=0.5, **BASE),
    "olmo2": dict(family="olmo2", **BASE),
    "olmo3": dict(family="olmo3", sliding_window=4096, layer_types=["sliding_attention", "full_attention"], **BASE),
    "smollm3": dict(family="smollm3", no_rope_layers=[1, 0], **BASE),
    "granite": dict(family="granite", logits_scaling=8.0, embedding_multiplier=12.0, **BASE),
    "cohere": dict(family="cohere", logit_scale=0.0625, **BASE),
    "stablelm": dict(family="stablelm", partial_rotary_factor=0.25, **BASE),
    "gpt2": dict(family="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=256),
    "gpt_neox": dict(family="gpt_neox", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, rotary_pct=0.5, max_position_embeddings=256),
}
# the older tests' models (hidden 64); kept so their pinned numbers stay as they were
LEGACY = {
    "llama": dict(family="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
    "qwen2": dict(family="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
    "gpt2": dict(family="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=256),
}


def tiny_config(family: str, vocab: int, tok=None):
    """family: a LEGACY name (hidden 64) or a SPECS name (hidden 32; "mistral_window" etc.)."""
    spec = LEGACY.get(family) or SPECS[family]
    return scratch_config(spec, vocab_size=vocab, tokenizer=tok)


def tiny_reasoner(family: str = "llama", seed: int = 0, tok=None, attn: str | None = "auto", **kw):
    """attn: `model.attn_implementation` (auto / sdpa / eager: kava's capturing attention), or "hf_eager" for
    HF's plain eager attention untouched by kava (the independent reference)."""
    tok = tok or tiny_tokenizer()
    torch.manual_seed(seed)
    hf_attn = "eager" if attn == "hf_eager" else None
    lm = AutoModelForCausalLM.from_config(tiny_config(family, len(tok), tok), attn_implementation=hf_attn)
    m = LatentReasoner(lm, add_special_tokens(tok), attn_implementation=None if attn == "hf_eager" else attn, **kw)
    return m.eval(), tok


RECORDS = [
    Record("Tom has 3 apples . He buys 4 more . How many does Tom have now ?", ("<<3+4=7>>", "<<7-2=5>>", "<<5*2=10>>"), "10", "t:1"),
    Record("Tom has 12 apples . He gives away 2 ?", ("<<12-2=10>>", "<<10+1=11>>"), "11", "t:2"),
    Record("He buys 7 more apples and then 5 more . How many ?", ("<<7+5=12>>", "<<12*3=36>>", "<<36-6=30>>", "<<30/3=10>>", "<<10+2=12>>"), "12", "t:3"),
    Record("Tom has 1 apples .", ("<<1+1=2>>",), "123", "t:4"),
]


# The plain math of Llama's half-split rotary embedding, a reference for the RoPE tests (kava itself calls each
# layer's own RoPE: `kava.model.rope`).
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def unrotate_keys(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo HF's rotary embedding: k_pre = k·cos − rotate_half(k)·sin (a rotation by −θ).

    k: [B, Hkv, N, D]; cos, sin: [B, N, D] (as the model's rotary module returns them for those positions).
    """
    cos, sin = cos.unsqueeze(1).to(k.dtype), sin.unsqueeze(1).to(k.dtype)
    return k * cos - rotate_half(k) * sin


def rotate_keys(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's rotary embedding of keys: k_rot = k·cos + rotate_half(k)·sin (the inverse of `unrotate_keys`).

    k: [B, Hkv, N, D]; cos, sin: [B, N, D].
    """
    cos, sin = cos.unsqueeze(1).to(k.dtype), sin.unsqueeze(1).to(k.dtype)
    return k * cos + rotate_half(k) * sin
