"""Batch formatting invariants, checked by decoding the built tensors back to text.

The reference is the record's own text: whatever columns the batch builders claim hold the question, CoT,
answer prompt, answer, latent slots or labels must decode to exactly those pieces (whitespace-insensitive,
since the two tokenizers space their decodings differently).
"""

from __future__ import annotations

import pytest
import torch

from kava.data.format import (IGNORE, BlockWidths, Formatter, SpecialIds, Tokenized, add_special_tokens,
                              build_student_batch, build_teacher_batch, special_ids)
from kava.data.records import DataError, Record, SkipLog
from kava.data.tokenizer import build_tokenizer, tokenizer_texts
from tiny import RECORDS, tiny_tokenizer

PROMPT = "The answer is:"
M = 5


def norm(s: str) -> str:
    return "".join(s.split())


@pytest.fixture(scope="module", params=["tiny", "bpe"])
def tok(request, tmp_path_factory):
    if request.param == "tiny":
        return tiny_tokenizer()
    t = build_tokenizer(tokenizer_texts(RECORDS), tmp_path_factory.mktemp("bpe"), vocab_size=300)
    add_special_tokens(t)
    return t


def dec(tok, ids) -> str:
    ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
    return norm(tok.decode(ids, skip_special_tokens=True))


def cot_text(rec: Record, drop_last: bool = True) -> str:
    steps = rec.steps[:-1] if drop_last else rec.steps
    return " ".join(steps)


def items_for(tok, records=RECORDS, **kw):
    skips = SkipLog()
    items = Formatter(tok, **kw).tokenize_all(records, skips)
    assert skips.total == 0
    return items


def test_special_tokens_are_added_once_and_distinct(tok):
    ids = add_special_tokens(tok)
    n = len(tok)
    assert add_special_tokens(tok) == ids and len(tok) == n  # idempotent
    assert len({ids.bot, ids.eot, ids.latent, ids.eos, ids.pad}) == 5
    for name, i in (("<bot>", ids.bot), ("<eot>", ids.eot), ("<latent>", ids.latent)):
        assert tok.convert_ids_to_tokens(i) == name
    assert ids.eos == tok.eos_token_id and ids.bos == tok.bos_token_id


@pytest.mark.parametrize("drop_last", [True, False])
def test_teacher_sequence_labels_and_indices(tok, drop_last):
    ids = special_ids(tok)
    items = items_for(tok, drop_last_step=drop_last)
    tb = build_teacher_batch(items, ids)
    B, S = tb.ids.shape
    assert B == len(RECORDS)
    for b, rec in enumerate(RECORDS):
        row, mask, tgt = tb.ids[b], tb.mask[b], tb.targets[b]
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # right padding only
        assert (row[n:] == ids.pad).all()
        assert torch.equal(tb.pos[b, :n], torch.arange(n))
        assert row[0] == ids.bos and row[n - 1] == ids.eos
        cot = cot_text(rec, drop_last)
        assert dec(tok, row[:n]) == norm(rec.question + cot + PROMPT + rec.answer)
        # labels: next-token targets, exactly on every token after the question (CoT, prompt, answer, eos)
        lab = (tgt != IGNORE).nonzero().flatten()
        assert torch.equal(tgt[lab], row[lab + 1])
        first = int(lab[0]) + 1
        assert torch.equal(lab + 1, torch.arange(first, n))
        assert dec(tok, row[:first]) == norm(rec.question)
        assert dec(tok, tgt[lab]) == norm(cot + PROMPT + rec.answer) and tgt[lab][-1] == ids.eos
        # CoT columns
        cols = tb.cot_idx[b][tb.cot_valid[b]]
        assert dec(tok, row[cols]) == norm(cot)
        if len(cols):
            assert torch.equal(cols, torch.arange(first, first + len(cols)))
        else:
            assert cot == ""  # the one-step record has no CoT once its last step is dropped
        # last prompt token: the column whose hidden state predicts the first answer token
        pl = int(tb.prompt_last[b])
        assert dec(tok, row[:pl + 1]) == norm(rec.question + cot + PROMPT)
        assert dec(tok, row[pl + 1:n]) == norm(rec.answer)
        assert dec(tok, row[first + len(cols):pl + 1]) == norm(PROMPT)
        assert tgt[pl] == row[pl + 1] and int(tb.answer_start[b]) == pl + 1
        # importance queries (answer mode): answer prompt + answer tokens, eos excluded
        q = tb.query_idx[b][tb.query_valid[b]]
        assert torch.equal(q, torch.arange(first + len(cols), n - 1))
        assert dec(tok, row[q]) == norm(PROMPT + rec.answer)
    assert S == max(int(m.sum()) for m in tb.mask)
    assert not tb.cot_valid[3].any() if drop_last else tb.cot_valid[3].sum() > 0


@pytest.mark.parametrize("window", [1, 4, 1000])
def test_cot_tail_queries_are_the_last_cot_columns(tok, window):
    ids = special_ids(tok)
    items = items_for(tok)
    tb = build_teacher_batch(items, ids, query_mode="cot_tail", tail_window=window)
    for b in range(len(items)):
        cols = tb.cot_idx[b][tb.cot_valid[b]].tolist()
        assert tb.query_idx[b][tb.query_valid[b]].tolist() == (cols[-window:] if cols else [])
    assert tb.query_valid[0].sum() == min(window, int(tb.cot_valid[0].sum()))
    assert not tb.query_valid[3].any()  # no CoT, no queries
    with pytest.raises(ValueError, match="answer, cot_tail"):
        build_teacher_batch(items, ids, query_mode="middle")


def test_nocot_sequence_labels_only_the_answer(tok):
    ids = special_ids(tok)
    items = items_for(tok)
    tb = build_teacher_batch(items, ids, with_cot=False)
    for b, rec in enumerate(RECORDS):
        row, tgt = tb.ids[b], tb.targets[b]
        n = int(tb.mask[b].sum())
        assert dec(tok, row[:n]) == norm(rec.question + PROMPT + rec.answer)
        lab = (tgt != IGNORE).nonzero().flatten()
        assert torch.equal(tgt[lab], row[lab + 1])
        assert dec(tok, tgt[lab]) == norm(rec.answer) and tgt[lab][-1] == ids.eos
        assert torch.equal(lab + 1, torch.arange(int(lab[0]) + 1, n))
        pl = int(tb.prompt_last[b])
        assert dec(tok, row[:pl + 1]) == norm(rec.question + PROMPT) and pl == int(lab[0])
    assert not tb.cot_valid.any()


def test_student_sequence_labels_latent_slots_and_positions(tok):
    ids = special_ids(tok)
    items = items_for(tok)
    sb = build_student_batch(items, ids, M)
    tb = build_teacher_batch(items, ids)
    Qb = sb.q_block
    B, S = sb.ids.shape
    q_lens = []
    for b, rec in enumerate(RECORDS):
        row, mask, tgt = sb.ids[b], sb.mask[b].bool(), sb.targets[b]
        real = row[mask]
        n = len(real)
        assert (row[~mask] == ids.pad).all()
        # positions count real tokens only, pads in between included
        assert torch.equal(sb.pos[b][mask], torch.arange(n))
        # real tokens: question · <bot> · <latent>*M · <eot> · prompt · answer · eos
        bot = (real == ids.bot).nonzero().flatten().tolist()
        eot = (real == ids.eot).nonzero().flatten().tolist()
        assert len(bot) == 1 and len(eot) == 1
        bot, eot = bot[0], eot[0]
        q_lens.append(bot)
        assert eot == bot + M + 1 and (real[bot + 1:eot] == ids.latent).all()
        assert (real == ids.latent).sum() == M
        assert real[0] == ids.bos and real[-1] == ids.eos
        assert dec(tok, real[:bot]) == norm(rec.question)
        assert dec(tok, real[eot + 1:]) == norm(PROMPT + rec.answer)
        # the latent slots sit in the same columns for every example
        assert (row[Qb:Qb + M] == ids.latent).all() and mask[Qb:Qb + M].all()
        assert row[Qb - 1] == ids.bot and row[Qb + M] == ids.eot  # <bot> too, after the padded question
        # labels: exactly the answer tokens and eos, as next-token targets
        lab = (tgt != IGNORE).nonzero().flatten()
        assert torch.equal(tgt[lab], row[lab + 1]) and mask[lab + 1].all()
        assert dec(tok, tgt[lab]) == norm(rec.answer) and tgt[lab][-1] == ids.eos
        # last prompt token
        pl = int(sb.prompt_last[b])
        assert pl == int(lab[0])
        assert dec(tok, row[Qb + M + 1:pl + 1]) == norm(PROMPT)
        # prompt and answer are the same token ids as in the teacher sequence
        t_n = int(tb.mask[b].sum())
        t_pl = int(tb.prompt_last[b])
        n_ans = t_n - t_pl - 1
        assert torch.equal(row[pl + 1:pl + 1 + n_ans], tb.ids[b, t_pl + 1:t_n])
        n_prompt = pl - (Qb + M)
        assert torch.equal(row[Qb + M + 1:pl + 1], tb.ids[b, t_pl + 1 - n_prompt:t_pl + 1])
        assert sb.answer_start == Qb + M
    assert Qb == max(q_lens) + 1  # question block = longest question + <bot>
    assert sb.num_latents == M and S == Qb + M + max(int(m[Qb + M:].sum()) for m in sb.mask)


def test_student_inference_batch_ends_at_the_prompt(tok):
    ids = special_ids(tok)
    fmt = Formatter(tok)
    items = [fmt.tokenize(r, i, need_answer=False) for i, r in enumerate(RECORDS)]
    assert all(it.answer == [] for it in items)
    sb = build_student_batch(items, ids, M, with_answer=False)
    assert (sb.targets == IGNORE).all()
    for b, rec in enumerate(RECORDS):
        assert int(sb.prompt_last[b]) == sb.ids.shape[1] - 1  # every prompt has the same length: no padding
        assert dec(tok, sb.ids[b, sb.answer_start + 1:]) == norm(PROMPT)


def test_custom_answer_prompt(tok):
    ids = special_ids(tok)
    items = items_for(tok, answer_prompt="  How many ?  ")
    tb = build_teacher_batch(items, ids)
    for b, rec in enumerate(RECORDS):
        pl = int(tb.prompt_last[b])
        assert dec(tok, tb.ids[b, :pl + 1]).endswith(norm("How many ?"))


def lengths(tok, rec):
    """Independent token counts: (question incl. bos, CoT, answer excl. eos)."""
    enc = lambda s: len(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    cot = cot_text(rec)
    return 1 + enc(rec.question), (enc(" " + cot) if cot else 0), enc(" " + rec.answer)


@pytest.mark.parametrize("limit", ["question", "cot", "answer", "all"])
def test_length_limits_skip_and_count_by_reason(tok, limit):
    lens = [lengths(tok, r) for r in RECORDS]
    # limits that cut the longest record(s) of the chosen kind(s)
    lim = {"max_question_tokens": 10**6, "max_cot_tokens": 10**6, "max_answer_tokens": 10**6}
    if limit in ("question", "all"):
        lim["max_question_tokens"] = sorted(l[0] for l in lens)[-2]
    if limit in ("cot", "all"):
        lim["max_cot_tokens"] = sorted(l[1] for l in lens)[-2]
    if limit in ("answer", "all"):
        lim["max_answer_tokens"] = sorted(l[2] for l in lens)[-2]
    expected = {}
    kept = []
    for i, (q, c, a) in enumerate(lens):
        reason = ("question too long" if q > lim["max_question_tokens"] else "CoT too long"
                  if c > lim["max_cot_tokens"] else "answer too long" if a > lim["max_answer_tokens"] else None)
        if reason:
            expected[reason] = expected.get(reason, 0) + 1
        else:
            kept.append(i)
    assert expected  # the limits really cut something
    skips = SkipLog()
    fmt = Formatter(tok, **lim)
    items = fmt.tokenize_all(RECORDS, skips)
    assert dict(skips.counts) == expected
    assert skips.total == len(RECORDS) - len(kept)
    assert [it.index for it in items] == kept
    for reason in expected:  # examples name the record
        assert all(w.startswith("t:") for w in skips.examples[reason])
    # without a skip log a too-long record raises, naming it; strict mode raises DataError
    bad = next(i for i in range(len(RECORDS)) if i not in kept)
    with pytest.raises(ValueError, match=RECORDS[bad].source):
        fmt.tokenize(RECORDS[bad], bad)
    with pytest.raises(DataError, match="too long"):
        fmt.tokenize_all(RECORDS, SkipLog(strict=True))


def test_limits_are_inclusive(tok):
    lens = [lengths(tok, r) for r in RECORDS]
    fmt = Formatter(tok, max_question_tokens=max(l[0] for l in lens), max_cot_tokens=max(l[1] for l in lens),
                    max_answer_tokens=max(l[2] for l in lens))
    skips = SkipLog()
    assert len(fmt.tokenize_all(RECORDS, skips)) == len(RECORDS) and skips.total == 0


def test_single_example_batches_have_no_padding(tok):
    ids = special_ids(tok)
    for it in items_for(tok):
        tb = build_teacher_batch([it], ids)
        sb = build_student_batch([it], ids, M)
        assert tb.mask.all() and sb.mask.all()
        assert torch.equal(tb.pos[0], torch.arange(tb.ids.shape[1]))
        assert torch.equal(sb.pos[0], torch.arange(sb.ids.shape[1]))


def gpt2_style_tokenizer():
    """Byte-level word tokenizer in which ' 18' is one token ('Ġ18'), as GPT-2's BPE does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "Tom has 3 apples . How many ? The answer is : 18 19 <<3+15=18>>".split()
    vocab = {"<|pad|>": 0, "<|eos|>": 1, "<|bos|>": 2, "<|unk|>": 3}
    for w in words:
        vocab.setdefault("Ġ" + w, len(vocab))
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    t = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<|pad|>", eos_token="<|eos|>", bos_token="<|bos|>",
                                unk_token="<|unk|>")
    add_special_tokens(t)
    return t


@pytest.mark.parametrize("kind", ["splits_space", "gpt2_style", "no_space_token"])
@pytest.mark.parametrize("position", ["answer", "prompt"])
def test_codi_column_predicts_the_first_answer_digit(kind, position, tmp_path):
    """L_CODI compares the hidden states that predict the first non-whitespace answer token (SPEC §4).

    Reference: the label at that column, decoded. With a BPE that splits ' 18' into ' ', '1', '8' (the
    synthetic tokenizer, as LLaMA-3 / Qwen2.5 / SmolLM2) it is one past the prompt; with 'Ġ18' (GPT-2) or
    no space token at all it is the prompt's last token. codi_position=prompt keeps the prompt column."""
    rec = Record("Tom has 3 apples . How many ?", ("<<3+15=18>>", "<<18+1=19>>"), "18", "t")
    if kind == "splits_space":
        t = build_tokenizer(tokenizer_texts([rec] * 20), tmp_path / "tok", vocab_size=300)
        add_special_tokens(t)
    else:
        t = gpt2_style_tokenizer() if kind == "gpt2_style" else tiny_tokenizer()
    ids = special_ids(t)
    it = Formatter(t, answer_prompt=PROMPT).tokenize(rec)
    first = t.decode(it.answer[:1])
    assert (first == " ") == (kind == "splits_space"), repr(first)  # the premise of each case
    assert it.answer_lead == (1 if kind == "splits_space" else 0)
    tb = build_teacher_batch([it], ids, codi_position=position)
    sb = build_student_batch([it], ids, M, codi_position=position)
    for b in (tb, sb):
        col = int(b.codi_col[0])
        assert col == int(b.prompt_last[0]) + (it.answer_lead if position == "answer" else 0)
        predicted = t.decode([int(b.targets[0, col])]).strip()
        if position == "answer":
            assert predicted in ("1", "18"), predicted  # the first digit (or the whole number for 'Ġ18')
        else:
            assert int(b.targets[0, col]) == it.answer[0]
    with pytest.raises(ValueError, match="codi_position"):
        build_teacher_batch([it], ids, codi_position="middle")


@pytest.mark.parametrize("chunk", [1, 3, 4096])
def test_batched_tokenization_equals_one_record_at_a_time(tok, chunk, data_dir):
    """`tokenize_all` tokenises `chunk` records per call; every segment, index, answer lead, step end and skip equals
    `tokenize` one record at a time (GSM8k lines, multiplication lines, the tiny records, an empty CoT)."""
    from kava.data.readers import load_records

    recs = (list(RECORDS) + [Record("Q with no CoT?", (), "7", "t:empty")]
            + load_records(data_dir / "gsm8k-aug" / "valid.txt", limit=20)
            + load_records(data_dir / "multiplication" / "4x4" / "valid.txt", limit=10))
    for kw in ({}, {"max_cot_tokens": 30, "with_steps": True, "drop_last_step": False}):
        fmt = Formatter(tok, **kw)
        s1, s2 = SkipLog(), SkipLog()
        batched = fmt.tokenize_all(recs, s1, chunk=chunk)
        single = [t for t in (fmt.tokenize(r, i, s2) for i, r in enumerate(recs)) if t is not None]
        assert batched == single and s1.as_dict() == s2.as_dict()
        assert fmt.tokenize_all(recs, SkipLog(), need_answer=False, chunk=chunk) == [
            t for t in (fmt.tokenize(r, i, SkipLog(), need_answer=False) for i, r in enumerate(recs)) if t is not None]
    assert 0 < s1.total < len(recs) - 5  # the limits cut some, not all


def naive_teacher_tensors(items, pad, with_cot, widths):
    """ids, mask and targets [B, S] written one element at a time: each token at its column (blocks
    [question | CoT | prompt · answer] with `widths`, else one after another), and at each real column the
    next token as target when that one is labelled (CoT, prompt and answer; without CoT the answer only)."""
    seqs = [it.question + (it.cot if with_cot else []) + it.prompt + it.answer for it in items]
    S = max(map(len, seqs)) if widths is None else widths.q + widths.c + widths.a
    ids = torch.full((len(items), S), pad)
    mask = torch.zeros((len(items), S), dtype=torch.long)
    targets = torch.full((len(items), S), IGNORE)
    for b, (it, seq) in enumerate(zip(items, seqs)):
        n_q, n_c = len(it.question), len(it.cot) if with_cot else 0
        first = n_q if with_cot else n_q + len(it.prompt)
        for k, tok in enumerate(seq):
            col = k if widths is None else k if k < n_q else widths.q + (k - n_q) if k < n_q + n_c else \
                widths.q + widths.c + (k - n_q - n_c)
            ids[b, col] = tok
            mask[b, col] = 1
            if k + 1 < len(seq) and k + 1 >= first:
                targets[b, col] = seq[k + 1]
    return ids, mask, targets


@pytest.mark.parametrize("with_cot", [True, False])
@pytest.mark.parametrize("layout", ["plain", "widths", "static"])
def test_teacher_batch_equals_an_element_by_element_build(with_cot, layout):
    """The vectorised builder (numpy rows, one label write) against the naive one, on random segment lengths
    (empty CoTs and questions of one token included), in both layouts."""
    import random

    rng = random.Random(7)
    ids = SpecialIds(bot=1, eot=2, latent=3, pad=0, eos=4, bos=None)
    for _ in range(25):
        def seg(lo, hi):
            return [rng.randrange(5, 300) for _ in range(rng.randint(lo, hi))]
        items = [Tokenized(question=seg(1, 12), cot=seg(0, 40), prompt=seg(1, 3), answer=seg(1, 9), index=i)
                 for i in range(rng.randint(1, 20))]
        widths = None if layout == "plain" else BlockWidths(
            q=max(len(i.question) for i in items) + rng.randint(0, 2), c=max(len(i.cot) for i in items) + rng.randint(0, 2),
            a=max(len(i.prompt) + len(i.answer) for i in items) + 1 + rng.randint(0, 2), static=layout == "static")
        tb = build_teacher_batch(items, ids, with_cot=with_cot, widths=widths)
        want = naive_teacher_tensors(items, ids.pad, with_cot, widths)
        for got, ref in zip((tb.ids, tb.mask, tb.targets), want):
            assert got.dtype == torch.long and torch.equal(got, ref)
        flat = want[2].reshape(-1)
        n = int((flat != IGNORE).sum())
        assert torch.equal(tb.label_tgt[:n], flat[flat != IGNORE]) and (tb.label_tgt[n:] == IGNORE).all()
