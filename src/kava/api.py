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

from kava.checkpoint import EXPORT_FILE, find_checkpoint, load_exported, load_for_eval, run_dir_of
from kava.methods import student_mode


@dataclass
class Answer:
    question: str
    text: str  # the generated answer segment (cot mode: CoT, answer prompt and answer)
    answer: str | None  # the number after the answer prompt (strict extraction), None if there is none
    forward_passes: int
    token_ids: list[int]  # generated ids (eos included when it was generated)


class KavaModel:
    """A trained kava model (any method) with its tokenizer and config, ready to answer questions."""

    def __init__(self, model, tokenizer, cfg, source: Path, exported: bool):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.source, self.exported = source, exported

    @property
    def method(self) -> str:
        return self.cfg.method

    @property
    def default_mode(self) -> str:
        from kava.evaluate import default_mode

        return default_mode(self.cfg.method)

    @property
    def run_dir(self) -> Path:
        """Where results of this model go (`eval/`, `inspect.png`): the run dir, or the export dir."""
        return self.source if self.exported else run_dir_of(self.source)

    def check_mode(self, mode: str) -> str:
        if mode not in ("latent", "cot", "nocot"):
            raise ValueError(f"mode {mode!r}; allowed values: latent, cot, nocot")
        if mode == "latent" and not self.cfg.is_latent:
            raise ValueError(f"a {self.cfg.method!r} model has no latent mode; use mode='cot' or 'nocot'")
        return mode

    def tokenize(self, questions: list[str]):
        from kava.data.format import Formatter
        from kava.data.records import Record

        fmt = Formatter(self.tokenizer, answer_prompt=self.cfg.data.answer_prompt, max_question_tokens=10**9)
        return [fmt.tokenize(Record(q, (), "", "api"), i, need_answer=False) for i, q in enumerate(questions)]

    @torch.no_grad()
    def generate(self, questions: str | list[str], mode: str | None = None, *, max_new_tokens: int | None = None,
                 batch_size: int | None = None) -> list[Answer]:
        """Greedy answers, as `kava eval` computes them. mode: latent | cot | nocot (default: the method's)."""
        from kava.evaluate import generate
        from kava.scoring import extract_answer

        if isinstance(questions, str):
            questions = [questions]
        mode = self.check_mode(mode or self.default_mode)
        cfg = self.cfg
        bs = batch_size or cfg.run.eval_batch_size
        self.model.eval()
        out: list[Answer] = []
        for start in range(0, len(questions), bs):
            chunk = questions[start:start + bs]
            gens = generate(self.model, self.tokenize(chunk), mode=mode, num_latents=cfg.latent.num_latents,
                            num_sweeps=cfg.latent.num_sweeps,
                            student_mode=student_mode(cfg.method),
                            max_new_tokens=max_new_tokens or cfg.run.eval_max_new_tokens,
                            max_cot_tokens=cfg.run.eval_max_cot_tokens, tokenizer=self.tokenizer)
            for q, g in zip(chunk, gens):
                out.append(Answer(q, g.text, extract_answer(g.text, cfg.data.answer_prompt)["strict"],
                                  g.forward_passes, list(g.token_ids)))
        return out

    def evaluate(self, records, **kw):
        """`kava.evaluate.evaluate_records` on this model: (rows, summary)."""
        from kava.evaluate import evaluate_records

        return evaluate_records(self.model, self.tokenizer, self.cfg, records, **kw)


def load(path: str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None
         ) -> KavaModel:
    """A kava run directory (its best/, else final/ model), a saved checkpoint, or a `kava export` directory.

    device: default cuda when available, else cpu; dtype: default bf16 on cuda, fp32 on cpu.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    p = Path(path)
    if (p / EXPORT_FILE).exists():
        model, tok, cfg = load_exported(p, device=device, dtype=dtype)
        return KavaModel(model, tok, cfg, p, exported=True)
    ck = find_checkpoint(p)
    model, tok, cfg = load_for_eval(ck, device=device, dtype=dtype)
    return KavaModel(model, tok, cfg, ck, exported=False)
