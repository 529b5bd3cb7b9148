"""Tiny models and a local tokenizer for tests (no downloads)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from kava.data.format import add_special_tokens
from kava.data.records import Record
from kava.model import capture
from kava.model.reasoner import LatentReasoner

WORDS = ("Tom has apples . He buys more gives away How many does have now ? The answer is : "
         "<<3+4=7>> <<7-2=5>> + - * / = << >> and then left").split()


def tiny_tokenizer():
    vocab = {"<|pad|>": 0, "<|eos|>": 1, "<|bos|>": 2, "<|unk|>": 3}
    for ch in list("0123456789") + WORDS:
        vocab.setdefault(ch, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    tk.decoder = decoders.WordPiece()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<|pad|>", eos_token="<|eos|>", bos_token="<|bos|>",
                                  unk_token="<|unk|>")
    add_special_tokens(tok)
    return tok


def tiny_config(family: str, vocab: int):
    if family == "llama":
        return LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if family == "qwen2":
        return Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    raise ValueError(family)


def tiny_reasoner(family: str = "llama", seed: int = 0, tok=None, attn: str = capture.ATTN_IMPL, **kw):
    tok = tok or tiny_tokenizer()
    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_config(tiny_config(family, len(tok)), attn_implementation=attn)
    m = LatentReasoner(lm, add_special_tokens(tok), **kw)
    return m.eval(), tok


RECORDS = [
    Record("Tom has 3 apples . He buys 4 more . How many does Tom have now ?", ("<<3+4=7>>", "<<7-2=5>>", "<<5*2=10>>"), "10", "t:1"),
    Record("Tom has 12 apples . He gives away 2 ?", ("<<12-2=10>>", "<<10+1=11>>"), "11", "t:2"),
    Record("He buys 7 more apples and then 5 more . How many ?", ("<<7+5=12>>", "<<12*3=36>>", "<<36-6=30>>", "<<30/3=10>>", "<<10+2=12>>"), "12", "t:3"),
    Record("Tom has 1 apples .", ("<<1+1=2>>",), "123", "t:4"),
]
