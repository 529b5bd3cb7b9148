"""A small byte-level BPE tokenizer for models trained from scratch on the synthetic task.

Digits are isolated before BPE, so every number is spelled digit by digit (``"1234"`` -> 4 tokens):
arithmetic is learnable from digits, but not from arbitrary multi-digit merges a tiny vocabulary picks
up. Byte-level pre-tokenization and decoding make ``decode(encode(t)) == t`` exact for any text, so
answers parsed from generations are never altered by the tokenizer. The pointer task's symbols are the
exception: `build_tokenizer(single_tokens=...)` keeps each of them (and its arrow form ``>14``) one token,
so that a lookup is one attention step.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from kava.data.records import Record
from kava.data.readers import ANSWER_PROMPT

PAD, EOS, BOS, UNK = "<|pad|>", "<|eos|>", "<|bos|>", "<|unk|>"
SPECIAL_TOKENS = (PAD, EOS, BOS, UNK)


def tokenizer_texts(records: Iterable[Record], answer_prompt: str = ANSWER_PROMPT) -> Iterator[str]:
    """Training texts for the tokenizer: each question, step and answer, and the answer prompt.

    The prompt is yielded once per record (with its leading space, as it follows the CoT) so BPE
    weighs it as often as it occurs in training sequences.
    """
    for r in records:
        yield r.question
        yield from r.steps
        yield r.answer
        yield " " + answer_prompt


def build_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 512,
                    single_tokens: Sequence[str] = ()):
    """Train a digit-splitting byte-level BPE on `texts`, save it to `out_dir`, and return it.

    The result is a `transformers.PreTrainedTokenizerFast` with pad/eos/bos/unk set; no BOS/EOS are
    added automatically (the sequence builders place them). It reloads with `AutoTokenizer`.

    single_tokens: strings that are each kept as one token wherever they occur, matched before digit
    splitting and BPE (added tokens, longest match first), on top of `vocab_size`; the pointer task's
    symbols ``"10"`` .. ``"29"`` and ``">10"`` .. ``">29"`` (`kava.data.synthetic.pointer_tokens`). Empty (the default) leaves the
    tokenizer exactly as without the argument.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {len(alphabet) + len(SPECIAL_TOKENS)} (256 bytes + specials)")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,  # every byte is a token, so nothing is ever unknown
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if single_tokens:
        tok.add_tokens([AddedToken(t, normalized=False, single_word=False) for t in single_tokens])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=BOS,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,  # cleanup turns " ." into "." (transformers 5 already refuses it for BPE)
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    return hf
