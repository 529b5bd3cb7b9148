"""The Python entry point for notebooks and scripts: `kava.load(...)` -> `generate(questions, mode=...)`.

```python
import kava
m = kava.load("runs/llama1b_aug-s42")          # a run (best/, else final/), a checkpoint, or a `kava export` dir
for a in m.generate(["Tom has 3 apples and buys 4 more. How many apples does he have?"]):
    print(a.answer, a.text, a.forward_passes)
```

`kava ask` and `kava eval` go through the same object, so a notebook sees exactly their answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kava.checkpoint.load import describe_source, load_any
from kava.checkpoint.rundir import run_dir_of
from kava.data.format import Formatter
from kava.data.pipeline import answer_kind
from kava.data.records import Record
from kava.decode import generate_for_config
from kava.evaluate import evaluate_records, saved_position_skip
from kava.scoring import extract
from kava.spec import MODES


@dataclass
class Answer:
    question: str
    text: str  # the generated answer segment (cot mode: CoT, answer prompt and answer)
    answer: str | None  # the number after the answer prompt (strict extraction), None if there is none
    forward_passes: int
    token_ids: list[int]  # generated ids (eos included when it was generated)


class KavaModel:
    """A trained kava model (any method) with its tokenizer and config, ready to answer questions."""

    def __init__(self, model, tokenizer, cfg, source: Path, exported: bool, kind: str = "run",
                 model_args: dict | None = None):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.source, self.exported = source, exported
        self.kind, self.model_args = kind, model_args  # `kava.checkpoint.load.Loaded`'s

    def describe(self) -> str:
        """Which model this is: its directory, and for a kava model which checkpoint and training step
        (`kava.checkpoint.load.describe_source`)."""
        return describe_source(self.source, self.kind, self.model_args)

    @property
    def method(self) -> str:
        return self.cfg.method

    @property
    def default_mode(self) -> str:
        return self.cfg.spec.eval_mode

    @property
    def run_dir(self) -> Path:
        """Where results of this model go (`eval/`, `inspect.png`): the run dir, or the export dir."""
        return self.source if self.exported else run_dir_of(self.source)

    def check_mode(self, mode: str) -> str:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}; allowed values: {', '.join(MODES)}")
        if mode == "latent" and not self.cfg.spec.latent:
            raise ValueError(f"a {self.cfg.method!r} model has no latent mode; use mode='cot' or 'nocot'")
        return mode

    def tokenize(self, questions: list[str]):
        fmt = Formatter.from_config(self.cfg, self.tokenizer, limits=False)
        return [fmt.tokenize(Record(q, (), "", "api"), i, need_answer=False) for i, q in enumerate(questions)]

    @torch.no_grad()
    def generate(self, questions: str | list[str], mode: str | None = None, *, max_new_tokens: int | None = None,
                 batch_size: int | None = None) -> list[Answer]:
        """Greedy answers, as `kava eval` computes them. mode: latent | cot | nocot (default: the method's)."""
        if isinstance(questions, str):
            questions = [questions]
        mode = self.check_mode(mode or self.default_mode)
        cfg = self.cfg
        bs = batch_size or cfg.run.eval_batch_size
        self.model.eval()
        out: list[Answer] = []
        kind = answer_kind(cfg)  # may read the data file's head: once, not per answer
        for start in range(0, len(questions), bs):
            chunk = questions[start:start + bs]
            gens = generate_for_config(self.model, self.tokenizer, cfg, self.tokenize(chunk), mode=mode,
                                       max_new_tokens=max_new_tokens, position_skip=saved_position_skip(self, mode))
            for q, g in zip(chunk, gens):
                out.append(Answer(q, g.text, extract(g.text, kind, cfg.data.answer_prompt)["strict"],
                                  g.forward_passes, list(g.token_ids)))
        return out

    def evaluate(self, records, **kw):
        """`kava.evaluate.evaluate_records` on this model: (rows, summary)."""
        kw.setdefault("position_skip", saved_position_skip(self, kw.get("mode") or self.default_mode))
        return evaluate_records(self.model, self.tokenizer, self.cfg, records, **kw)


def load(path: str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None
         ) -> KavaModel:
    """A kava run directory (its best/, else final/ model), a saved checkpoint, or a `kava export` directory
    (`kava.checkpoint.load.load_any`).

    device: default cuda when available, else cpu; dtype: default bf16 on cuda, fp32 on cpu.
    """
    m = load_any(path, device=device, dtype=dtype)
    return KavaModel(m.model, m.tokenizer, m.cfg, m.source, m.exported, m.kind, m.model_args)
