"""A deterministic synthetic multi-step arithmetic word-problem task, for models trained from scratch.

No model weights or hub data can be downloaded here, so evidence that the objectives teach latent
reasoning has to come from a task a tiny transformer can learn. Each problem tracks one running
quantity through 2-6 operations (add / subtract / multiply by a small factor / exact division), every
intermediate value kept in ``[1, max_value]``. With the CoT each step is one easy operation on numbers
the model has just written; without it the model must compose all of them internally, which is what
latent reasoning is meant to do.

Splits: ``train``, ``valid``, ``test`` (in distribution), ``hard`` (numbers up to `hard_max_value` and
one more step than `max_steps`), ``varied`` (the same operations phrased with a held-out template set
that ``train`` never uses). No question appears twice across (or within) splits.

A second task, `write_pointer` (``data.synth_task: pointer``, issue 22): k-hop pointer chasing. A random
cyclic permutation of N numeric symbols is written as shuffled ``x>y`` pairs, followed by a start symbol
and a hop count k; the answer is f^k(start) and the CoT is the chain of hops, one pair per hop. Each hop
is one lookup (a previous-token head and an induction head, about two layers), so a shallow model without
a CoT cannot answer large k in one pass. Splits ``train``, ``valid``, ``test`` (k in [k_min, k_max]) and
``hard`` (k_max+1 .. k_max+2), disjoint as above. Chance is 1/N.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

# `data.synth_task`: the generated tasks, this module's two and `kava.data.multiplication` (`kava.data.pipeline`
# dispatches on them)
SYNTH_TASKS = ("arithmetic", "pointer", "multiplication")
GENERATOR_VERSION = "kava-synthetic-1"
SPLITS = ("valid", "test", "hard", "varied", "train")  # generation order: eval splits claim questions first
DEFAULT_SIZES = {"train": 20000, "valid": 500, "test": 1000, "hard": 1000, "varied": 1000}

NAMES: tuple[tuple[str, str], ...] = (
    ("Tom", "he"), ("Mia", "she"), ("Sam", "he"), ("Lena", "she"), ("Omar", "he"), ("Ava", "she"),
    ("Ben", "he"), ("Zoe", "she"), ("Raj", "he"), ("Ivy", "she"), ("Leo", "he"), ("Nora", "she"),
    ("Max", "he"), ("Emma", "she"), ("Kai", "he"), ("Lucy", "she"),
)
ITEMS: tuple[str, ...] = (
    "apples", "marbles", "stickers", "coins", "books", "cards", "pencils", "shells",
    "stamps", "cookies", "balloons", "beads", "crayons", "buttons",
)
_PRONOUNS = {"he": ("He", "he", "him", "his"), "she": ("She", "she", "her", "her")}
_FRACTIONS = {2: "half", 3: "third", 4: "quarter", 5: "fifth", 6: "sixth", 7: "seventh", 8: "eighth", 9: "ninth"}
_SYMBOL = {"add": "+", "sub": "-", "mul": "*", "div": "/"}

# Placeholders: {name} {P}/{p} (subject pronoun, capitalised/lower) {obj} {poss} {items}, {n} the
# operand, {s} the running value before the step, {eq} "s<op>n=r", {frac} "third" for n=3.
# Each operation template is (question sentence, natural-language CoT sentence).
TEMPLATES: dict[str, dict[str, tuple]] = {
    "train": {
        "start": (
            "{name} has {n} {items}.",
            "{name} starts with {n} {items}.",
            "There are {n} {items} in {name}'s collection.",
            "{name} owns {n} {items}.",
            "At first, {name} has {n} {items}.",
            "{name} begins the day with {n} {items}.",
        ),
        "ask": (
            "How many {items} does {name} have now?",
            "How many {items} does {name} end up with?",
            "How many {items} does {p} have in the end?",
            "How many {items} does {name} have at the end?",
            "What is the number of {items} {name} has now?",
            "How many {items} are with {name} now?",
        ),
        "add": (
            ("{P} buys {n} more {items}.", "{P} buys {n} more, so {p} has {eq} {items}."),
            ("Then {p} finds {n} {items} on the way home.", "{P} finds {n}, so now {p} has {eq} {items}."),
            ("A friend gives {obj} {n} {items}.", "A friend gives {obj} {n}, so {p} has {eq} {items}."),
            ("{P} wins {n} {items} at a fair.", "Winning {n} at the fair gives {obj} {eq} {items}."),
            ("Later, {p} receives {n} {items} as a gift.", "The gift adds {n}, so {p} has {eq} {items}."),
            ("{P} collects another {n} {items}.", "Collecting {n} more makes {eq} {items}."),
        ),
        "sub": (
            ("{P} gives {n} {items} to a neighbor.", "After giving away {n}, {p} has {eq} {items}."),
            ("Then {p} loses {n} {items}.", "{P} loses {n}, so {p} has {eq} {items}."),
            ("{P} sells {n} of {poss} {items}.", "Selling {n} leaves {obj} with {eq} {items}."),
            ("{P} donates {n} {items} to the school.", "{P} donates {n}, leaving {eq} {items}."),
            ("{P} uses {n} {items} for a project.", "Using {n} leaves {eq} {items}."),
            ("A sibling takes {n} {items} from {obj}.", "The sibling takes {n}, so {p} has {eq} {items}."),
        ),
        "mul": (
            ("{P} ends up with {n} times as many {items}.", "{P} has {n} times as many, so {p} has {eq} {items}."),
            ("The number of {items} {p} owns grows {n}-fold.", "Growing {n}-fold gives {eq} {items}."),
            ("Each of {poss} {items} is swapped for {n} new ones.", "Each one becomes {n}, so {p} has {eq} {items}."),
            ("{P} multiplies {poss} {items} by {n}.", "Multiplying by {n} gives {eq} {items}."),
            ("A magic box turns the {items} into {n} times as many.", "The box makes {n} times as many, so {p} has {eq} {items}."),
            ("{P} copies {poss} pile of {items} until there are {n} equal piles.", "{P} has {n} piles of {s}, so {p} has {eq} {items}."),
        ),
        "div": (
            ("{P} splits the {items} equally into {n} groups and keeps one group.", "One of {n} equal groups is {eq} {items}."),
            ("{P} shares the {items} equally among {n} people, {p} included.", "Sharing among {n} people leaves {obj} {eq} {items}."),
            ("{P} keeps only a {frac} of {poss} {items}.", "A {frac} of them is {eq} {items}."),
            ("{P} packs the {items} into {n} equal boxes and gives away all but one box.", "One box holds {eq} {items}."),
            ("Only one out of every {n} {items} passes inspection.", "One in {n} passes, so {p} keeps {eq} {items}."),
            ("{P} divides {poss} {items} evenly among {n} jars and keeps a single jar.", "A single jar holds {eq} {items}."),
        ),
    },
    # Held out: never used for train/valid/test/hard, so the ``varied`` split measures rewording robustness.
    "varied": {
        "start": (
            "In the morning, {name} counts {n} {items}.",
            "{name}'s drawer contains {n} {items}.",
            "{name} is holding {n} {items}.",
        ),
        "ask": (
            "What is {name}'s final count of {items}?",
            "Once all of this is done, how many {items} does {name} hold?",
            "In total, how many {items} remain in {name}'s possession?",
        ),
        "add": (
            ("{name}'s aunt hands over {n} additional {items}.", "With {n} more from the aunt, {p} has {eq} {items}."),
            ("On Tuesday, {p} picks up {n} extra {items}.", "Picking up {n} extra gives {eq} {items}."),
            ("{P} is rewarded with {n} {items} for good work.", "The reward of {n} brings the total to {eq} {items}."),
        ),
        "sub": (
            ("Sadly, {n} of the {items} break and are thrown out.", "Throwing out {n} leaves {eq} {items}."),
            ("{P} hands {n} {items} to a classmate.", "Handing over {n} leaves {eq} {items}."),
            ("{P} misplaces {n} {items} during a trip.", "Misplacing {n} leaves {obj} {eq} {items}."),
        ),
        "mul": (
            ("{P} manages to make the pile of {items} {n} times bigger.", "A pile {n} times bigger has {eq} {items}."),
            ("The stock of {items} becomes {n} times its size.", "At {n} times its size the stock is {eq} {items}."),
            ("For every one of the {items}, {p} gets {n} in exchange.", "Getting {n} for each gives {eq} {items}."),
        ),
        "div": (
            ("{P} is left with just one {frac} of the {items}.", "One {frac} of them is {eq} {items}."),
            ("Of the {items}, {p} holds on to one share out of {n} equal shares.", "One share out of {n} is {eq} {items}."),
            ("A storm scatters the {items} and only one in {n} is recovered.", "Recovering one in {n} leaves {eq} {items}."),
        ),
    },
}
OPS = ("add", "sub", "mul", "div")


def _fill(template: str, who: tuple[str, str], items: str, n: int, s: int = 0, eq: str = "") -> str:
    name, pron = who
    P, p, obj, poss = _PRONOUNS[pron]
    return template.format(
        name=name, P=P, p=p, obj=obj, poss=poss, items=items, n=n, s=s, eq=eq, frac=_FRACTIONS.get(n, "")
    )


def generate_problem(
    rng: random.Random, n_steps: int, max_value: int, template_set: str = "train", max_factor: int = 5
) -> dict:
    """One problem: a start quantity and `n_steps` operations keeping every value in [1, max_value].

    Operands are at least 2 (no ``+1``/``*1``); one of the four operations is always feasible for
    max_value >= 4, so the loop never stalls.

    Returns ``{"question", "steps_eq", "steps_nl", "answer"}``; equation i reads ``<<v_{i-1} op n=v_i>>``,
    so the steps chain and the last result is the answer.
    """
    t = TEMPLATES[template_set]
    who = rng.choice(NAMES)
    items = rng.choice(ITEMS)
    s = rng.randint(2, max_value)
    sentences = [_fill(rng.choice(t["start"]), who, items, s)]
    steps_eq: list[str] = []
    steps_nl: list[str] = []
    for _ in range(n_steps):
        divisors = [d for d in range(2, max_factor + 1) if s % d == 0]
        feasible = [
            op
            for op, ok in (
                ("add", s <= max_value - 2), ("sub", s >= 3), ("mul", 2 * s <= max_value), ("div", bool(divisors))
            )
            if ok
        ]
        op = rng.choice(feasible)
        if op == "add":
            n = rng.randint(2, max_value - s)  # operands >= 2 keep the wording plural and the step non-trivial
            r = s + n
        elif op == "sub":
            n = rng.randint(2, s - 1)
            r = s - n
        elif op == "mul":
            n = rng.randint(2, min(max_factor, max_value // s))
            r = s * n
        else:
            n = rng.choice(divisors)
            r = s // n
        q_tpl, nl_tpl = rng.choice(t[op])
        eq = f"{s}{_SYMBOL[op]}{n}={r}"
        sentences.append(_fill(q_tpl, who, items, n, s))
        steps_eq.append(f"<<{eq}>>")
        steps_nl.append(_fill(nl_tpl, who, items, n, s, eq))
        s = r
    sentences.append(_fill(rng.choice(t["ask"]), who, items, 0))
    return {"question": " ".join(sentences), "steps_eq": steps_eq, "steps_nl": steps_nl, "answer": str(s)}


def _split_params(split: str, min_steps: int, max_steps: int, max_value: int, hard_max_value: int) -> tuple:
    """(min steps, max steps, max value, template set) of a split."""
    if split == "hard":
        return max_steps + 1, max_steps + 1, hard_max_value, "train"
    if split == "varied":
        return min_steps, max_steps, max_value, "varied"
    return min_steps, max_steps, max_value, "train"


def _draw_unique(size: int, draw, seen: set[str], error: str) -> tuple[list[str], int, int]:
    """`size` JSON lines of problems from `draw()` whose questions are new to this split and to `seen` (earlier
    splits; updated in place). Returns the lines and the duplicates redrawn within / across splits."""
    mine: set[str] = set()
    within = across = 0
    lines: list[str] = []
    while len(lines) < size:
        prob = draw()
        q = prob["question"]
        if q in mine:
            within += 1
        elif q in seen:
            across += 1
        else:
            mine.add(q)
            lines.append(json.dumps(prob, ensure_ascii=False))
        if within + across > 10 * size + 1000:
            raise ValueError(error)
    seen |= mine
    return lines, within, across


def check_splits(sizes: dict[str, int], order: Sequence[str], task: str) -> None:
    """Refuse a split name that is not one of `order` (a ValueError naming them)."""
    unknown = set(sizes) - set(order)
    if unknown:
        raise ValueError(f"unknown {task} splits {sorted(unknown)}; expected some of {tuple(order)}")


def write_splits(out_dir: str | Path, sizes: dict[str, int], order: Sequence[str], seed_key: str, draw,
                 suffix: str = ".jsonl") -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """Write ``<split><suffix>``, one problem a line, for each split of `order` that `sizes` names, in that order
    (eval splits first, so they claim their questions before train; `draw` remembers what earlier splits drew).

    Each split draws from its own ``random.Random`` seeded by ``f"{seed_key}:{split}"``, so its problems do not
    depend on the other splits' sizes except through deduplication. `draw(split, size, rng)` returns the split's
    lines and the count of redrawn duplicates by kind. Returns (line counts, redrawn counts) by split.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    redrawn: dict[str, dict[str, int]] = {}
    for split in order:
        if split not in sizes:
            continue
        lines, redrawn[split] = draw(split, sizes[split], random.Random(f"{seed_key}:{split}"))
        (out / f"{split}{suffix}").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        counts[split] = len(lines)
    return counts, redrawn


def write_meta(out_dir: str | Path, meta: dict) -> dict:
    """Write ``meta.json`` (sorted keys, so the bytes depend on the content only); return `meta`."""
    (Path(out_dir) / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return meta


def write_synthetic(
    out_dir: str | Path,
    sizes: dict[str, int],
    seed: int = 0,
    min_steps: int = 2,
    max_steps: int = 4,
    max_value: int = 99,
    *,
    hard_max_value: int | None = None,
    max_factor: int = 5,
) -> dict:
    """Write ``<split>.jsonl`` for each split in `sizes` plus ``meta.json``; return the meta.

    Each split draws from its own ``random.Random`` seeded by (seed, split), so a split's problems do
    not depend on the other splits' sizes, except through deduplication: eval splits are generated
    first (valid, test, hard, varied) and a later question already seen anywhere is redrawn and
    counted in ``meta["duplicates_removed"]``. hard_max_value defaults to ``10 * (max_value + 1) - 1``
    (999 for 99).
    """
    check_splits(sizes, SPLITS, "synthetic")
    if not 1 <= min_steps <= max_steps:
        raise ValueError(f"need 1 <= min_steps <= max_steps, got {min_steps}, {max_steps}")
    if max_value < 4:
        raise ValueError(f"max_value must be at least 4, got {max_value}")
    hard_max_value = 10 * (max_value + 1) - 1 if hard_max_value is None else hard_max_value
    seen: set[str] = set()

    def draw(split: str, size: int, rng: random.Random) -> tuple[list[str], dict[str, int]]:
        lo, hi, vmax, tset = _split_params(split, min_steps, max_steps, max_value, hard_max_value)
        lines, within, across = _draw_unique(
            int(size), lambda: generate_problem(rng, rng.randint(lo, hi), vmax, tset, max_factor), seen,
            f"synthetic split {split}: too many duplicates; raise max_value or max_steps")
        return lines, {"within_split": within, "across_splits": across}

    counts, removed = write_splits(out_dir, sizes, SPLITS, f"{GENERATOR_VERSION}:{seed}", draw)
    return write_meta(out_dir, {
        "generator": GENERATOR_VERSION,
        "seed": seed,
        "min_steps": min_steps,
        "max_steps": max_steps,
        "max_value": max_value,
        "max_factor": max_factor,
        "hard_steps": max_steps + 1,
        "hard_max_value": hard_max_value,
        "counts": counts,
        "duplicates_removed": removed,
        "files": {s: f"{s}.jsonl" for s in counts},
        "fields": ["question", "steps_eq", "steps_nl", "answer"],
        "template_sets": {"varied": "varied", **{s: "train" for s in SPLITS if s != "varied"}},
    })


def question_sentences(question: str) -> list[str]:
    """The sentences a generated question was assembled from (templates never contain '. ')."""
    parts: Sequence[str] = question.replace("? ", "?\n").replace(". ", ".\n").split("\n")
    return [p for p in parts if p]


# ----------------------------------------------------------------------------------------------------
# k-hop pointer chasing (issue 22): a task whose serial depth is the hop count k


POINTER_VERSION = "kava-pointer-1"
POINTER_SPLITS = ("valid", "test", "hard", "train")  # no ``varied``: the task has no templates to hold out
POINTER_BASE = 10  # symbol i is the number 10 + i: two digits each, so none is a prefix of another
POINTER_MAX_SYMBOLS = 90  # 10..99


def pointer_symbols(num_symbols: int) -> list[str]:
    """The N symbol names, ``"10"`` .. ``str(10 + N - 1)``: numbers, so the answer goes through kava's
    numeric answer scoring unchanged."""
    if not 2 <= num_symbols <= POINTER_MAX_SYMBOLS:
        raise ValueError(f"num_symbols must be in [2, {POINTER_MAX_SYMBOLS}], got {num_symbols}")
    return [str(POINTER_BASE + i) for i in range(num_symbols)]


def pointer_tokens(num_symbols: int) -> list[str]:
    """What the tokenizer of a pointer run keeps as single tokens: each symbol ``"14"`` and its arrow form
    ``">14"`` (`kava.data.tokenizer.build_tokenizer(single_tokens=...)`).

    A pair ``14>20`` is then the two tokens ``14`` ``>20``, and one hop is the textbook two-layer circuit: a
    previous-token head writes "after 14" into the ``>20`` token, and an induction head at the query ``14``
    (in the CoT, or the start) attends to it and copies ``>20``. With ``>`` a token of its own, the target
    sits two tokens after its source and the query is the ``>`` token, so the model must compose heads on
    both sides; at N = 8 on CPU that did not learn the lookup within 1500 steps, the arrow form did
    (results/pointer/README.md). The answer and the NL CoT use the plain form.
    """
    syms = pointer_symbols(num_symbols)
    return syms + [">" + s for s in syms]


def generate_pointer_problem(rng: random.Random, hops: int, num_symbols: int = 20) -> dict:
    """One problem: a random cyclic permutation f of N symbols, shuffled ``x>y`` pairs, a start, k hops.

    f is a uniformly random single N-cycle, so no start sits in a short cycle: f^1(s) .. f^k(s) are k
    distinct symbols, none equal to s, for every k < N (a general permutation would let fixed points and
    2-cycles answer some problems without any hop). Question::

        25>11 12>17 ... 19>13. Start: 14. Hops: 3.

    CoT: one pair per hop, ``steps_eq = ["14>20", "20>13", "13>25"]`` and
    ``steps_nl = ["14 points to 20.", ...]``; the answer is f^k(start) (``"25"``). The hop count is
    written in digits; for k >= 10 its text coincides with a symbol token (harmless: it follows "Hops:").
    """
    if not 1 <= hops < num_symbols:
        raise ValueError(f"need 1 <= hops < num_symbols, got hops={hops}, num_symbols={num_symbols}")
    syms = pointer_symbols(num_symbols)
    cycle = syms[:]
    rng.shuffle(cycle)
    f = {cycle[i]: cycle[(i + 1) % num_symbols] for i in range(num_symbols)}
    pairs = list(f.items())
    rng.shuffle(pairs)
    start = rng.choice(syms)
    chain = [start]
    for _ in range(hops):
        chain.append(f[chain[-1]])
    question = " ".join(f"{x}>{y}" for x, y in pairs) + f". Start: {start}. Hops: {hops}."
    steps_eq = [f"{a}>{b}" for a, b in zip(chain, chain[1:])]
    steps_nl = [f"{a} points to {b}." for a, b in zip(chain, chain[1:])]
    return {"question": question, "steps_eq": steps_eq, "steps_nl": steps_nl, "answer": chain[-1], "hops": hops}


def parse_pointer_question(question: str) -> tuple[dict[str, str], str, int]:
    """(the map x -> y, start, hops) of a generated pointer question (the inverse of its layout)."""
    body, start_part, hops_part = question.rsplit(". ", 2)
    f = dict(pair.split(">") for pair in body.split(" "))
    return f, start_part.removeprefix("Start: "), int(hops_part.removeprefix("Hops: ").rstrip("."))


def _pointer_hop_range(split: str, min_hops: int, max_hops: int) -> tuple[int, int]:
    """(fewest, most) hops of a split: ``hard`` is the two depths past training, k_max+1 .. k_max+2."""
    return (max_hops + 1, max_hops + 2) if split == "hard" else (min_hops, max_hops)


def write_pointer(
    out_dir: str | Path,
    sizes: dict[str, int],
    seed: int = 0,
    min_hops: int = 1,
    max_hops: int = 4,
    num_symbols: int = 20,
) -> dict:
    """Write ``<split>.jsonl`` for each pointer split in `sizes` plus ``meta.json``; return the meta.

    Splits as `write_synthetic`: each draws from its own ``random.Random`` seeded by (seed, split); the
    eval splits (valid, test, hard) claim questions first and a question already seen anywhere is redrawn
    (counted in ``meta["duplicates_removed"]``), so the splits are disjoint. k is uniform over the split's
    hop range. The hard split needs k_max+2 < N (every hop lands on a new symbol).
    """
    check_splits(sizes, POINTER_SPLITS, "pointer")
    if not 1 <= min_hops <= max_hops:
        raise ValueError(f"need 1 <= min_hops <= max_hops, got {min_hops}, {max_hops}")
    pointer_symbols(num_symbols)  # range check
    if max_hops + 2 >= num_symbols:
        raise ValueError(f"need max_hops + 2 < num_symbols (the hard split's hops stay on one cycle), "
                         f"got max_hops={max_hops}, num_symbols={num_symbols}")
    seen: set[str] = set()

    def draw(split: str, size: int, rng: random.Random) -> tuple[list[str], dict[str, int]]:
        lo, hi = _pointer_hop_range(split, min_hops, max_hops)
        lines, within, across = _draw_unique(
            int(size), lambda: generate_pointer_problem(rng, rng.randint(lo, hi), num_symbols), seen,
            f"pointer split {split}: too many duplicates; raise num_symbols")
        return lines, {"within_split": within, "across_splits": across}

    counts, removed = write_splits(out_dir, sizes, POINTER_SPLITS, f"{POINTER_VERSION}:{seed}", draw)
    return write_meta(out_dir, {
        "generator": POINTER_VERSION,
        "task": "pointer",
        "seed": seed,
        "min_hops": min_hops,
        "max_hops": max_hops,
        "hard_hops": [max_hops + 1, max_hops + 2],
        "num_symbols": num_symbols,
        "symbols": pointer_symbols(num_symbols),
        "chance": 1 / num_symbols,
        "counts": counts,
        "duplicates_removed": removed,
        "files": {s: f"{s}.jsonl" for s in counts},
        "fields": ["question", "steps_eq", "steps_nl", "answer", "hops"],
    })
