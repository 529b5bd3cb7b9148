"""The model card (README.md) of a kava model: what the Hugging Face Hub shows, and what a reader of a saved
model directory needs.

`model_card` writes the card of a `kava export` directory and of a run's `best/model/` or `final/model/`
(`kava.checkpoint.saved.save_model`, in place of peft's empty placeholder): the base model, the method, the
training data and recipe, the run's evaluation results (`RUN/eval/*/summary.json`, with their standard errors;
`--limit` tests and evaluations of another step of the run are left out, with a line), and how to load it. Its YAML front matter names `base_model` and `datasets` only when they are hub ids: a
local path (a cache directory, a GGUF conversion) means nothing on the Hub, so it is described in the text.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from kava.data.readers import HUB_DATASETS

PAPER = "https://arxiv.org/abs/2510.02312"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def hub_id(name: str | None) -> str | None:
    """`name` when it is a hub id (`org/name`, not an existing or absolute/relative-looking path), else None."""
    if not name or not _HUB_ID.fullmatch(name) or Path(name).expanduser().exists():
        return None
    return name


def describe_base(cfg, base: dict | None = None) -> tuple[str, str | None]:
    """(a sentence naming the base model, its hub id or None), from the saved `base.json` or the config."""
    m = cfg.model
    kind = (base or {}).get("kind")
    name = (base or {}).get("name_or_path") or m.name_or_path
    gguf = (base or {}).get("gguf_file") or m.gguf_file
    if kind == "init_from" or (kind is None and m.init_from):
        return f"initialised from the kava run `{(base or {}).get('path') or m.init_from}`", None
    if kind == "scratch" or (kind is None and m.from_scratch is not None):
        fam = (m.from_scratch or {}).get("family", "?")
        return f"a {fam} model built from scratch (random initialisation, config in `kava.json`)", None
    hid = hub_id(name)
    where = f"`{hid}` on the Hugging Face Hub" if hid else f"the local model `{name}`"
    return where + (f" (GGUF file `{gguf}`, dequantized)" if gguf else ""), hid


def eval_results(run_dir: Path | None) -> list[dict]:
    """The run's evaluations (`RUN/eval/*/summary.json`), sorted by folder name."""
    out = []
    for p in sorted(Path(run_dir).glob("eval/*/summary.json")) if run_dir is not None else []:
        try:
            s = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(s, dict) and isinstance(s.get("accuracy"), (int, float)):
            out.append({"folder": p.parent.name, **s})
    return out


def other_model(s: dict, step: int | None) -> str | None:
    """Why evaluation `s` (a summary.json) is not of the model of training step `step` the card describes, or
    None: it evaluated the run's best/ or final/ ("checkpoint_name") at another step ("model_step"; an
    evaluation that did not record it is kept, its step shown as ?). Evaluations of training checkpoints
    (`-stepN`) are kept: they name their step."""
    which, at = s.get("checkpoint_name"), s.get("model_step")
    if step is None or at is None or at == step or s.get("model_kind", "run") != "run" or which is None:
        return None
    return f"{which}/ at step {at}"


def _results_table(evals: list[dict], step: int | None = None) -> list[str]:
    """The card's table of `evals` (`eval_results`), leaving out, with a line naming them, those of another
    model than the one of step `step` (`other_model`: the run was extended, or validated better, since) and
    `kava eval --limit` tests."""
    left = [(s["folder"], why) for s in evals if (why := other_model(s, step))]
    limited = [s["folder"] for s in evals if s.get("limit") and not other_model(s, step)]
    evals = [s for s in evals if not other_model(s, step) and not s.get("limit")]
    out = [f"Left out, evaluations of another model of this run: "
           f"{'; '.join(f'{f} ({why})' for f, why in left)}.", ""] if left else []
    if limited:  # `kava eval --limit N`: a smoke test, not a result
        out += [f"Left out, `--limit` tests (the first questions only): {', '.join(limited)}.", ""]
    if not evals:
        return ["Not evaluated yet: `kava eval --checkpoint RUN --datasets gsm8k,gsm8k-hard,svamp --hub`.", "", *out]
    lines = ["| evaluation | step | mode | accuracy (%) | ± stderr | problems | forward passes / question |",
             "|---|---|---|---|---|---|---|"]
    for s in evals:
        err = s.get("accuracy_stderr")
        at = s.get("model_step", s.get("checkpoint_step"))
        lines.append(f"| {s['folder']} | {'?' if at is None else at} | {s.get('mode', '?')} | "
                     f"{100 * s['accuracy']:.1f} | {'' if err is None else f'{100 * err:.1f}'} | "
                     f"{s.get('count', '?')} | {s.get('mean_forward_passes', float('nan')):.1f} |")
    return lines + ["", "Greedy decoding; strict extraction (the number after `The answer is:`); `-stepN`: an "
                        "intermediate checkpoint; step: the training step of the model evaluated.", "", *out]


def model_card(cfg, *, base: dict | None = None, run_dir: Path | None = None, step: int | None = None,
               exported: bool = True, dtype: str | None = None) -> str:
    """The README.md of a kava model. exported: a `kava export` directory (plain transformers loads it);
    else a run's saved model directory (`kava.load` loads the run)."""
    base_text, base_hub = describe_base(cfg, base)
    d = cfg.data
    data_hub = [x for x in (d.source, d.valid_source) if x and x.lower() in HUB_DATASETS]
    meta = {"library_name": "transformers" if exported else "peft" if cfg.lora is not None else "transformers",
            "tags": ["kava", "latent-reasoning", cfg.method]}
    if base_hub:
        meta["base_model"] = base_hub
    if data_hub:
        meta["datasets"] = data_hub
    latent = cfg.spec.latent
    fine_tune = (f"LoRA r={cfg.lora.r}, alpha={cfg.lora.alpha} on {', '.join(cfg.lora.target_modules)}"
                 if cfg.lora is not None else "full fine-tuning")
    data = "the synthetic arithmetic task (`data.source: synthetic`)" if d.source == "synthetic" else f"`{d.source}`"
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
             f"# {cfg.preset or cfg.method} ({cfg.method})", "",
             f"Trained with `kava` (the KaVa method and its baselines, [arXiv 2510.02312]({PAPER})): "
             f"{cfg.spec.title}.", "",
             f"- **Base model:** {base_text}",
             f"- **Method:** `{cfg.method}`" + (f", {cfg.latent.num_latents} latent tokens, {cfg.latent.num_sweeps} "
                                                f"sweeps" if latent else "") + f"; {fine_tune}",
             f"- **Training data:** {data} (split `{d.split}`, {d.cot_style} CoT), validation "
             f"`{d.valid_source or d.source}`",
             f"- **Recipe:** lr {cfg.optim.lr:g} ({cfg.optim.schedule}), effective batch {cfg.optim.effective_batch}, "
             + (f"{cfg.optim.max_steps} steps" if cfg.optim.max_steps else f"{cfg.optim.epochs:g} epochs")
             + (f"; this is the model of step {step}" if step is not None else "") + f", seed {cfg.run.seed}",
             f"- **Prompt:** raw text, no chat template: `question` then, for the answer, `{d.answer_prompt}`",
             *([f"- **Weights:** {dtype}"] if dtype else []), "",
             "## Evaluation results", "", *_results_table(eval_results(run_dir), step), "## How to load it", ""]
    if exported:
        lines += ["```python",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  'model = AutoModelForCausalLM.from_pretrained("THIS_DIR")',
                  'tok = AutoTokenizer.from_pretrained("THIS_DIR")   # prepends BOS as training did',
                  'enc = tok("Tom has 3 apples and buys 4 more. How many apples does he have?"'
                  + ('' if cfg.spec.eval_mode == "cot" else f' + " {d.answer_prompt}"') + ', return_tensors="pt")',
                  "print(tok.decode(model.generate(**enc)[0, enc['input_ids'].shape[1]:], skip_special_tokens=True))",
                  "```", ""]
        if latent:
            lines += ["Latent reasoning needs kava (the projection is in `kava_projection.safetensors`, M, T and "
                      "the answer prompt in `kava.json`):", ""]
    lines += ["```python", "import kava   # pip install kava-latent",
              f'model = kava.load("{"THIS_DIR" if exported else "RUN_DIR"}")',
              'print(model.generate(["Tom has 3 apples and buys 4 more. How many?"])[0].answer)', "```", ""]
    if not exported:
        lines += ["`kava export RUN_DIR --output DIR` writes a plain Hugging Face directory of this model (LoRA "
                  "merged).", ""]
    return "\n".join(lines)
