"""Tokenizer: exact round trips, one token per digit, special tokens, and reload with AutoTokenizer."""

from __future__ import annotations

import pytest

from kava.data.records import Record
from kava.data.synthetic import write_synthetic
from kava.data.readers import load_records
from kava.data.tokenizer import SPECIAL_TOKENS, build_tokenizer, tokenizer_texts

ROUND_TRIP = [
    "1234",
    " The answer is: 1234",
    "Tom has 12 apples. He buys 3 bags of 12, so he has 12*3=36 apples.",
    "<<16-3-4=9>> <<9*2=18>>",
    "Janet’s ducks lay 16 eggs  per day.\n\tShe sells them for $2.50 each.  ",
    "ünïcödé 漢字 ☃ 🙂 -3.5e-06 1,234,567",
    "",
    "   leading and trailing   ",
    "spaces before punctuation . , ! ? do n't it 's",  # what clean_up_tokenization_spaces would alter
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    write_synthetic(root / "data", {"train": 2000}, seed=0)
    records = load_records(root / "data" / "train.jsonl") + load_records(root / "data" / "train.jsonl", cot_style="nl")
    tok = build_tokenizer(tokenizer_texts(records), root / "tok", vocab_size=512)
    return root / "tok", tok


def test_round_trip_and_digits(tok_dir):
    _, tok = tok_dir
    assert len(tok) == 512
    for text in ROUND_TRIP:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    assert tok.convert_ids_to_tokens(tok.encode("1234", add_special_tokens=False)) == ["1", "2", "3", "4"]
    assert len(tok.encode("999999", add_special_tokens=False)) == 6
    # no learned merge contains a digit next to anything else
    for token in tok.get_vocab():
        if token not in SPECIAL_TOKENS and any(c.isdigit() for c in token):
            assert len(token) == 1, token


def test_merges_learned_from_texts(tok_dir):
    _, tok = tok_dir
    # frequent words of the corpus become single tokens; a byte-level fallback covers everything else
    assert tok.convert_ids_to_tokens(tok.encode(" apples", add_special_tokens=False)) == ["Ġapples"]
    assert tok.unk_token_id not in tok.encode("漢字 ☃", add_special_tokens=False)


def test_special_tokens_and_reload(tok_dir):
    from transformers import AutoTokenizer

    path, tok = tok_dir
    assert (tok.pad_token, tok.eos_token, tok.bos_token, tok.unk_token) == SPECIAL_TOKENS
    ids = {tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id}
    assert len(ids) == 4 and None not in ids
    loaded = AutoTokenizer.from_pretrained(path)
    assert (loaded.pad_token, loaded.eos_token, loaded.bos_token, loaded.unk_token) == SPECIAL_TOKENS
    assert loaded.pad_token_id == tok.pad_token_id and loaded.eos_token_id == tok.eos_token_id
    for text in ROUND_TRIP:
        ids = loaded.encode(text, add_special_tokens=False)
        assert ids == tok.encode(text, add_special_tokens=False)
        assert loaded.decode(ids) == text
    # special tokens are single ids and are not added implicitly
    assert loaded.encode("<|eos|>", add_special_tokens=False) == [loaded.eos_token_id]
    assert loaded.encode("12", add_special_tokens=True) == loaded.encode("12", add_special_tokens=False)


def test_tokenizer_texts():
    recs = [Record("Q?", ("<<1+1=2>>", "<<2*3=6>>"), "6"), Record("R?", (), "7")]
    assert list(tokenizer_texts(recs)) == [
        "Q?", "<<1+1=2>>", "<<2*3=6>>", "6", " The answer is:", "R?", "7", " The answer is:",
    ]


def test_vocab_too_small(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(["abc"], tmp_path, vocab_size=100)
