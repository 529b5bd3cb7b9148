"""kava models in lm-evaluation-harness: the model `kava` and the filter `kava_answer`.

lm-eval 0.4 looks models up in a registry that only its own modules fill (it reads no plugin entry points), so
`register_model` has to run in the lm-eval process before the model is asked for. Importing this package does it;
running it is lm-eval's own command line (the same flags) with kava registered:

    python -m kava.lm_eval_plugin --model kava --model_args pretrained=RUN_OR_EXPORT,mode=latent \\
        --tasks TASK [--include_path TASK_DIR] [--batch_size 16] [--output_path OUT --log_samples]

or from Python: `import kava.lm_eval_plugin`, then `lm_eval.simple_evaluate(model="kava", model_args=...)`.

`generate_until` decodes with kava (`kava.api.KavaModel.generate`: the same greedy answers as `kava eval` and
`kava ask`), on the context lm-eval renders as the question. It returns what follows the question as if the model
had written it: in latent and nocot modes kava feeds the answer prompt itself, so the prompt leads the answer
(`" The answer is: 42"`); cot mode writes CoT, prompt and answer. The text is cut at the task's stop sequences;
the token budget is kava's (the run's `run.eval_max_new_tokens`, or `max_new_tokens=`), not the task's
`max_gen_toks`. `kava_answer` reads the answer as `kava eval` does (`kava.scoring.extract`, strict).
Log-likelihood requests are refused: a latent model's answer depends on latents it computes from the question,
which no scored continuation goes through.
"""

from __future__ import annotations

import torch
from lm_eval.api.filter import Filter
from lm_eval.api.model import LM
from lm_eval.api.registry import register_filter, register_model

from kava.api import load
from kava.data.readers import ANSWER_PROMPT
from kava.scoring import extract

INVALID = "[invalid]"  # lm-eval's regex filter's word for "no answer found"


def continuation(answer: str, mode: str, answer_prompt: str, until: list[str]) -> str:
    """The text after the question: the generated `answer` (cot mode: CoT, prompt and answer; latent and nocot:
    the answer, after the prompt kava fed, which is put in front), cut at the first stop sequence of `until`."""
    text = answer if mode == "cot" else f" {answer_prompt.strip()}{answer}"
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


@register_model("kava")
class KavaLM(LM):
    """A kava run, checkpoint or `kava export` directory (`kava.load`) as an lm-eval model that generates.

    model_args: pretrained= (required), mode= (latent, cot or nocot; default the method's own), max_new_tokens=
    (the answer budget; default the run's). lm-eval's --batch_size is the decoding batch ("auto": the run's
    `run.eval_batch_size`); its --device defaults to cuda:0, which falls back to cpu where there is no GPU.
    """

    def __init__(self, pretrained: str | None = None, mode: str | None = None, max_new_tokens: int | str | None = None,
                 batch_size: int | str | None = None, max_batch_size=None, device: str | None = None, **unknown):
        super().__init__()
        if unknown:
            raise ValueError(f"--model_args {', '.join(unknown)}: the kava model takes pretrained=, mode= and "
                             "max_new_tokens=")
        if not pretrained:
            raise ValueError("--model kava needs --model_args pretrained=RUN_OR_EXPORT_DIR[,mode=latent]")
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"
        self.kava = load(pretrained, device=device)
        self.mode = self.kava.check_mode(mode or self.kava.default_mode)
        self.max_new_tokens = int(max_new_tokens) if max_new_tokens else None
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else None

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        for r in requests:
            if (r.args[1] or {}).get("do_sample"):
                raise ValueError(f"task {r.task_name} asks do_sample=True: kava decodes greedily (set do_sample: "
                                 "false in its generation_kwargs)")
        answers = self.kava.generate([r.args[0] for r in requests], self.mode, max_new_tokens=self.max_new_tokens,
                                     batch_size=self.batch_size)
        out = []
        for r, a in zip(requests, answers):
            until = (r.args[1] or {}).get("until") or []
            text = continuation(a.text, self.mode, self.kava.cfg.data.answer_prompt,
                                [until] if isinstance(until, str) else until)
            self.cache_hook.add_partial("generate_until", r.args, text)
            out.append(text)
        return out

    def _refuse(self):
        why = ("in latent mode the answer follows latents computed from the question, which no scored continuation "
               "goes through" if self.mode == "latent" else
               "for cot and nocot models use lm-eval's hf model on a `kava export` directory (--model hf "
               "--model_args pretrained=EXPORT_DIR), which scores them as plain transformers models")
        raise NotImplementedError(f"the kava model generates (generate_until tasks) and scores no log-likelihoods: "
                                  f"{why}")

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        self._refuse()

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        self._refuse()

    def apply_chat_template(self, chat_history, add_generation_prompt=True) -> str:
        raise NotImplementedError("kava models are trained on raw text without a chat template; drop "
                                  "--apply_chat_template")


@register_filter("kava_answer")
class KavaAnswer(Filter):
    """The answer as `kava eval` reads it: the first number after the last answer prompt (`kava.scoring.extract`,
    strict; the text itself when it holds no prompt), "[invalid]" when there is none. Put `take_first` after it."""

    def __init__(self, answer_prompt: str = ANSWER_PROMPT, **kwargs) -> None:
        super().__init__(**kwargs)
        self.answer_prompt = answer_prompt

    def apply(self, resps, docs):
        return [[extract(r, "number", self.answer_prompt)["strict"] or INVALID for r in rs] for rs in resps]
