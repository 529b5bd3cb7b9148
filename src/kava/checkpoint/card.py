"""The model card (README.md) of a kava model: what the Hugging Face Hub shows, and what a reader of a saved
model directory needs.

`model_card` writes the card of a `kava export` directory and of a run's `best/model/` or `final/model/`
(`kava.checkpoint.saved.save_model`, in place of peft's empty placeholder): the base model, the method, the
training data and recipe, the run's evaluation results (`RUN/eval/*/summary.json`, with their standard errors),
and how to load it. A result is a full evaluation of a published set (a named set or a Hub dataset: `result_set`);
`--limit` tests and local data files are listed as partial, and evaluations of another step of the run are left
out, each with a line. The YAML front matter (huggingface_hub's `ModelCardData`) holds the license, the pipeline
tag, the tags, the results as `model-index`, and `base_model` and `datasets` only when they are hub ids: a local
path (a cache directory, a GGUF conversion) means nothing on the Hub, so it is described in the text. An exported
card names its directory `THIS_DIR` until `card_for_repo` (at `kava export --push-to-hub`) names the repository.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from huggingface_hub import EvalResult, ModelCardData

from kava.data.readers import EVAL_DATASETS, HUB_DATASETS, EvalDataset, hub_eval_spec

PAPER = "https://arxiv.org/abs/2510.02312"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
HERE = "THIS_DIR"  # an exported card's name for its own directory, until it has a Hub repository


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


def result_set(s: dict) -> EvalDataset | None:
    """The published set evaluation `s` (a summary.json) ran on: a named set or a Hub dataset; None for a local
    data file, whose questions nobody else can read (an ad-hoc check of two questions, say): no result."""
    name = s.get("dataset_source", s.get("dataset"))  # older summaries name the set by its label only
    if s.get("dataset_kind") == "file" or not isinstance(name, str):
        return None
    return EVAL_DATASETS.get(name) or hub_eval_spec(name)


def sort_evaluations(evals: list[dict], step: int | None) -> tuple[list[dict], list[str]]:
    """(the card's results, the lines naming the rest) of `evals` (`eval_results`): results are the full
    evaluations of a published set (`result_set`) of the model of step `step`; evaluations of another model of
    the run (`other_model`: extended, or validated better, since) are left out, `--limit` tests and local data
    files listed as partial."""
    results, other, partial = [], [], []
    for s in evals:
        if why := other_model(s, step):
            other.append(f"{s['folder']} ({why})")
        elif s.get("limit"):
            partial.append(f"{s['folder']} (`--limit`: the first {s['limit']} questions)")
        elif result_set(s) is None:
            partial.append(f"{s['folder']} (a local data file, {s.get('count', '?')} questions)")
        else:
            results.append(s)
    notes = [f"Left out, evaluations of another model of this run: {'; '.join(other)}.", ""] if other else []
    if partial:
        notes += [f"Partial evaluations, not results: {'; '.join(partial)}.", ""]
    return results, notes


def _results_table(results: list[dict], notes: list[str]) -> list[str]:
    if not results:
        return ["Not evaluated yet: `kava eval --checkpoint RUN --datasets gsm8k,gsm8k-hard,svamp --hub`.", "", *notes]
    lines = ["| evaluation | step | mode | accuracy (%) | ± stderr | problems | forward passes / question |",
             "|---|---|---|---|---|---|---|"]
    for s in results:
        err = s.get("accuracy_stderr")
        at = s.get("model_step", s.get("checkpoint_step"))
        lines.append(f"| {s['folder']} | {'?' if at is None else at} | {s.get('mode', '?')} | "
                     f"{100 * s['accuracy']:.1f} | {'' if err is None else f'{100 * err:.1f}'} | "
                     f"{s.get('count', '?')} | {s.get('mean_forward_passes', float('nan')):.1f} |")
    return lines + ["", "Greedy decoding; strict extraction (the number after `The answer is:`); `-stepN`: an "
                        "intermediate checkpoint; step: the training step of the model evaluated.", "", *notes]


def model_index(results: list[dict], step: int | None) -> list[EvalResult]:
    """The Hub's `model-index` entries of the card's results, those of the model of step `step` only (a `-stepN`
    evaluation of another training checkpoint is of other weights): accuracy in %, strict extraction."""
    out = []
    for s in results:
        if s.get("checkpoint_step") not in (None, step):
            continue
        spec = result_set(s)
        out.append(EvalResult(task_type="text-generation", dataset_type=spec.hub_id or spec.name,
                              dataset_name=spec.label, dataset_config=spec.hub_config, dataset_split=spec.hub_split,
                              metric_type="accuracy", metric_value=round(100 * s["accuracy"], 2),
                              metric_name=f"accuracy ({s.get('mode', '?')} mode, strict)"))
    return out


def license_meta(license: str | None, base_hub: str | None) -> tuple[dict, str]:
    """(front-matter keys, the card's line) of the license: the one given (`kava export --license ID`), else
    `other`, pointing at the base model on the Hub whose license its weights carry."""
    if license:
        return {"license": license}, f"`{license}`"
    if base_hub:
        return ({"license": "other", "license_link": f"https://huggingface.co/{base_hub}"},
                f"that of the base model `{base_hub}`; `kava export --license ID` sets another")
    return {"license": "other"}, "not chosen; `kava export --license ID` sets it"


def model_card(cfg, *, base: dict | None = None, run_dir: Path | None = None, step: int | None = None,
               exported: bool = True, dtype: str | None = None, license: str | None = None) -> str:
    """The README.md of a kava model. exported: a `kava export` directory (plain transformers loads it);
    else a run's saved model directory (`kava.load` loads the run). license: a Hub license id (`license_meta`)."""
    base_text, base_hub = describe_base(cfg, base)
    d = cfg.data
    data_hub = [x for x in (d.source, d.valid_source) if x and x.lower() in HUB_DATASETS]
    results, notes = sort_evaluations(eval_results(run_dir), step)
    lic, lic_text = license_meta(license, base_hub)
    name = cfg.preset or cfg.method
    meta = ModelCardData(
        **lic, library_name="transformers" if exported or cfg.lora is None else "peft", pipeline_tag="text-generation",
        tags=list(dict.fromkeys(["kava", "latent-reasoning", cfg.method])), base_model=base_hub,
        datasets=data_hub or None, model_name=name, eval_results=model_index(results, step) or None)
    latent = cfg.spec.latent
    fine_tune = (f"LoRA r={cfg.lora.r}, alpha={cfg.lora.alpha} on {', '.join(cfg.lora.target_modules)}"
                 if cfg.lora is not None else "full fine-tuning")
    data = "the synthetic arithmetic task (`data.source: synthetic`)" if d.source == "synthetic" else f"`{d.source}`"
    lines = ["---", meta.to_yaml(), "---", "",
             f"# {name} ({cfg.method})", "",
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
             *([f"- **Weights:** {dtype}"] if dtype else []),
             f"- **License:** {lic_text}", "",
             "## Evaluation results", "", *_results_table(results, notes), "## How to load it", ""]
    if exported:
        lines += ["```python",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  f'model = AutoModelForCausalLM.from_pretrained("{HERE}")',
                  f'tok = AutoTokenizer.from_pretrained("{HERE}")   # prepends BOS as training did',
                  'enc = tok("Tom has 3 apples and buys 4 more. How many apples does he have?"'
                  + ('' if cfg.spec.eval_mode == "cot" else f' + " {d.answer_prompt}"') + ', return_tensors="pt")',
                  "print(tok.decode(model.generate(**enc)[0, enc['input_ids'].shape[1]:], skip_special_tokens=True))",
                  "```", ""]
        if latent:
            lines += ["Latent reasoning needs kava (the projection is in `kava_projection.safetensors`, M, T and "
                      "the answer prompt in `kava.json`):", ""]
    lines += ["```python", "import kava   # pip install kava-latent",
              f'model = kava.load("{HERE if exported else "RUN_DIR"}")',
              'print(model.generate(["Tom has 3 apples and buys 4 more. How many?"])[0].answer)', "```", ""]
    if not exported:
        lines += ["`kava export RUN_DIR --output DIR` writes a plain Hugging Face directory of this model (LoRA "
                  "merged).", ""]
    return "\n".join(lines)


def card_for_repo(card: str, repo_id: str) -> str:
    """An exported card as the Hub repository `repo_id` shows it: its loading code names the repository instead
    of `THIS_DIR` (kava reads a local directory: the repository's download)."""
    return card.replace(f'model = kava.load("{HERE}")', "from huggingface_hub import snapshot_download\n"
                        f'model = kava.load(snapshot_download("{repo_id}"))').replace(f'"{HERE}"', f'"{repo_id}"')
