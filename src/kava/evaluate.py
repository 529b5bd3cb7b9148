"""Scored evaluation: generate (`kava.decode`) and score (`kava.scoring`) records, shard them across
processes, add the latent diagnostics (`kava.diagnostics`), and write `eval/<dataset>/`.

`evaluate_records` scores a list of records with a loaded model (training's validation uses it too);
`evaluate_run` is `kava eval`: a run, a training checkpoint, an export directory, or a plain Hugging Face model
(with its peft adapter), on named datasets or data files. Every accuracy comes with its binomial standard
error (`kava.scoring.binomial_stderr`, as lm-evaluation-harness prints it).
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from kava.checkpoint.load import (Loaded, describe_source, load_any, load_plain, model_checkpoint,
                                 plain_identity, plain_name)
from kava.checkpoint.rundir import RunDir, git_revision, read_state, versions
from kava.checkpoint.saved import META_FILE
from kava.checkpoint.state import model_identity
from kava.config import ConfigError
from kava.console import Ticker, print_line
from kava.curriculum import keeps_positions
from kava.data.format import Formatter, Tokenized, build_teacher_batch
from kava.data.pipeline import find_synthetic_dir
from kava.data.readers import COT_STYLES, check_eval_sets, hub_eval_spec, is_data_file, load_eval_dataset
from kava.data.records import Record, SkipLog
from kava.decode import DecodeGraphs, generate_for_config, input_ids, sequence_length
from kava.diagnostics import (check_shards, diagnose_batch, eval_chunks, format_diagnostics, require_latent,
                              summarize_diagnostics)
from kava.model.families import check_window
from kava.model.reasoner import LatentReasoner
from kava.scoring import answer_matches, binomial_stderr, digit_agreement, digit_places, extract, place_accuracy


class EvalProgress:
    """Progress lines when no bar shows (no TTY: SLURM, nohup, a pipe): one every `every` of the questions
    (10%) or `seconds` (60 s), whichever comes first, and one at the end; the rate is over all questions so far.

        [kava] eval gsm8k (cot): 264/1319 questions (20%) | 3.1 questions/s | ETA 5m40s
    """

    def __init__(self, total: int, label: str, enabled: bool, every: float = 0.1, seconds: float = 60.0,
                 clock=time.perf_counter):
        self.total, self.label, self.enabled = total, label, enabled
        self.step, self.seconds = max(1, int(total * every)), seconds
        self.ticker = Ticker(total, since="start", clock=clock)
        self.done = 0

    def update(self, n: int) -> None:
        self.done += n
        now = self.ticker.clock()
        units, seconds = self.ticker.since_last(self.done, now)
        due = units >= self.step or seconds >= self.seconds or self.done >= self.total
        if not (self.enabled and due):
            return
        rate, eta = self.ticker.read(self.done, now)
        print_line(f"[kava] eval {self.label}: {self.done}/{self.total} questions "
                   f"({100 * self.done / max(self.total, 1):.0f}%) | {rate:.1f} questions/s | ETA {eta}")


def evaluate_records(model: LatentReasoner, tokenizer, cfg, records: list[Record], *, mode: str | None = None,
                     batch_size: int | None = None, max_new_tokens: int | None = None, rank: int = 0,
                     world: int = 1, progress: bool = False, diagnostics=None, label: str = "",
                     position_skip: int = 0) -> tuple[list[dict], dict]:
    """Generate and score `records` (this rank's shard: indices rank, rank+world, ...).

    position_skip: positions left empty between the question and what cot mode generates (iCoT with
    `icot.keep_position`: the CoT tokens removed at the model's step, `eval_position_skip`).

    diagnostics: a `kava.diagnostics.DiagnosticsSpec` (latent ablations, oracle check, KV match; latent
    methods only): its per-example fields join the rows and its numbers the summary.
    Returns (rows, summary) for this shard; rows carry `index` so shards merge without double counting.
    """
    mode = mode or cfg.spec.eval_mode
    diag = diagnostics if diagnostics is not None and diagnostics.active else None
    if diag is not None:
        require_latent(cfg.method)  # refuses cot / nocot runs
        if mode != "latent":
            raise ValueError(f"latent diagnostics need the latent mode; got mode {mode!r}")
    fmt = Formatter.from_config(cfg, tokenizer, limits=False)
    idx = list(range(rank, len(records), world))
    bs = batch_size or cfg.run.eval_batch_size
    max_new = max_new_tokens or cfg.run.eval_max_new_tokens
    if (model.sliding_window is not None or model.max_positions is not None) and records:
        # decided on every rank from all records, before any pass: a refusal from inside one rank's shard
        # would leave the other ranks waiting in the gather
        longest = max(len(fmt.question_ids(r.question)) for r in records)
        need = sequence_length(mode, longest, num_latents=cfg.latent.num_latents, prompt_len=len(fmt.prompt_ids),
                               max_new_tokens=max_new, max_cot_tokens=cfg.run.eval_max_cot_tokens,
                               position_skip=position_skip)
        what = f"the longest question of this evaluation ({mode} mode, with its generation budget)"
        if model.max_positions is not None and need > model.max_positions:
            raise ConfigError(f"{what} spans {need} positions but the model has {model.max_positions} "
                              f"(n_positions); lower run.eval_max_cot_tokens ({cfg.run.eval_max_cot_tokens}) or "
                              f"run.eval_max_new_tokens ({max_new}), or train with more positions")
        check_window(model.sliding_window, need, what=what)
        # the teacher pass over the gold CoT too
        if diag is not None and model.sliding_window is not None and (diag.oracle or diag.kv_match):
            teacher = max(len(t.question) + len(t.cot) + len(t.prompt) + len(t.answer)
                          for t in (fmt.tokenize(r, i) for i, r in enumerate(records)))
            check_window(model.sliding_window, teacher, what="the longest gold CoT sequence of these diagnostics")
    rows: list[dict] = []
    t0, diag_wall = time.perf_counter(), 0.0
    bar = tqdm(total=len(idx), desc=f"eval {mode}", disable=not progress or None, leave=False)
    # no bar (no TTY): progress lines instead; with several processes, this rank's share
    ticker = EvalProgress(len(idx), f"{label} ({mode})" if label else mode, enabled=progress and bar.disable)
    model.eval()
    graphs = decode_graphs(model, cfg.run.eval_cuda_graphs)
    for chunk in eval_chunks(idx, bs, diag.min_batch if diag is not None else 1):
        items = [fmt.tokenize(records[i], i, need_answer=False) for i in chunk]
        gens = generate_for_config(model, tokenizer, cfg, items, mode=mode, max_new_tokens=max_new, graphs=graphs,
                                   position_skip=position_skip)
        for i, it, g in zip(chunk, items, gens):
            r = records[i]
            ext = extract(g.text, r.answer_kind, cfg.data.answer_prompt)
            prompt = tokenizer.decode(input_ids(it, mode, model.ids, cfg.latent.num_latents))
            rows.append({"index": i, "question": r.question, "gold": r.answer, "doc_hash": doc_hash(r),
                         "prompt": prompt, "prompt_hash": sha256(prompt), "generated": g.text,
                         "extracted": ext["strict"], "extracted_flexible": ext["flexible"],
                         "correct": answer_matches(ext["strict"], r.answer, r.answer_kind),
                         "correct_flexible": answer_matches(ext["flexible"], r.answer, r.answer_kind),
                         "forward_passes": g.forward_passes, "generated_tokens": g.generated_tokens,
                         **({"digits": digit_agreement(ext["strict"], r.answer),
                             "places": digit_places(ext["strict"], r.answer)} if r.answer_kind == "digits" else {})})
        if diag is not None:  # its time is not part of the throughput (wall_s, questions_per_s)
            t_d = time.perf_counter()
            for row, extra in zip(rows[-len(chunk):], diagnose_batch(model, tokenizer, cfg, records, chunk, fmt,
                                                                     diag, max_new)):
                row.update(extra)
            diag_wall += time.perf_counter() - t_d
        bar.update(len(chunk))
        ticker.update(len(chunk))
    bar.close()
    wall = time.perf_counter() - t0 - diag_wall
    summary = summarize(rows, wall, mode)
    summary["decode_graphs"] = "off" if graphs is None else (graphs.off or f"{graphs.captured} captured")
    if position_skip:
        summary["position_skip"] = position_skip
    if graphs is not None and graphs.off:
        print_line(f"[kava] eval: decoding without CUDA graphs ({graphs.off})")
    del graphs  # frees the static caches and graphs before anything else runs on the card
    return rows, summary


def teacher_forced_accuracy(model: LatentReasoner, items: list[Tokenized], batch_size: int = 64) -> dict[str, float]:
    """Next-token accuracy of `items` under teacher forcing, laid out as training lays out a CoT sequence
    (question · CoT · prompt · answer, `build_teacher_batch`): `cot`, the share of the CoT tokens whose argmax is
    the gold token given the gold tokens before it, and `answer`, the same for the prompt and answer tokens (eos
    included). Beside free generation's accuracy it tells a model that no longer predicts the tokens from one
    that predicts them but goes astray once its own tokens feed it (iCoT's removal applied to `items`: what is
    left). Run under `torch.no_grad()` in eval mode."""
    dev = model.special_rows.device
    right, total = {"cot": 0, "answer": 0}, {"cot": 0, "answer": 0}
    with model.autocast():
        for i in range(0, len(items), batch_size):
            chunk = items[i:i + batch_size]
            out = model.teacher_forward(build_teacher_batch(chunk, model.ids, with_cot=True).to(dev), need_kv=False,
                                        need_importance=False)
            h = out.label_h  # [N, d]; the head in row chunks: [N, V] logits at once can be GBs (GSM8k, V 128k)
            pred = torch.cat([model.logits(h[j:j + 4096]).argmax(-1) for j in range(0, h.shape[0], 4096)])
            ok = (pred == out.targets).tolist()
            # the labels run row by row: each item's CoT tokens, then its prompt and answer
            part = [j < len(it.cot) for it in chunk for j in range(len(it.cot) + len(it.prompt) + len(it.answer))]
            if len(part) != len(ok):
                raise RuntimeError(f"{len(ok)} labels for {len(part)} CoT, prompt and answer tokens")
            for is_cot, good in zip(part, ok):
                k = "cot" if is_cot else "answer"
                right[k] += good
                total[k] += 1
    return {k: right[k] / total[k] for k in right if total[k]}


def saved_position_skip(km, mode: str) -> int:
    """The positions cot-mode evaluation leaves empty after the question for `km` (a `Loaded` or a
    `kava.api.KavaModel`) trained with `icot.keep_position`: what its best/ or final/ meta.json records
    (`kava.train.eval_position_skip` at its step; none recorded: 0). 0 for every other model and mode; a
    training checkpoint of such a run is refused (its step's removal is not recorded with it)."""
    if km.cfg is None or not keeps_positions(km.cfg) or mode != "cot":
        return 0
    meta = Path(km.source) / META_FILE
    if km.kind != "run" or not meta.exists():
        raise ConfigError(f"{km.source}: trained with icot.keep_position; evaluate the run's best/ or final/, whose "
                          "meta.json records where the generated tokens start")
    return int(json.loads(meta.read_text()).get("position_skip", 0))


def decode_graphs(model: LatentReasoner, setting: bool | str) -> DecodeGraphs | None:
    """The CUDA graphs of an evaluation's decode steps under `run.eval_cuda_graphs`: on a GPU for auto and
    true, else None (the same static-cache step, eager)."""
    on_gpu = model.special_rows.is_cuda
    if setting is True and not on_gpu:
        raise ConfigError("run.eval_cuda_graphs: true needs the model on a CUDA device; use auto or false")
    return DecodeGraphs(model) if on_gpu and setting in (True, "auto") else None


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def doc_hash(r: Record) -> str:
    """A question's identity in predictions.jsonl (lm-evaluation-harness's `doc_hash`): the sha256 of its
    question and gold answer, so two evaluations can be matched question by question."""
    return sha256(json.dumps({"question": r.question, "answer": r.answer}, sort_keys=True, ensure_ascii=False))


def generation_settings(cfg, mode: str, *, batch_size: int | None = None, max_new_tokens: int | None = None) -> dict:
    """How `evaluate_records` decodes (summary.json's "generation"): greedy, the mode, the answer budget, the
    CoT budget (cot mode), the batch size, the answer prompt, and in latent mode M, T and the student mode."""
    out = {"mode": mode, "greedy": True, "max_new_tokens": max_new_tokens or cfg.run.eval_max_new_tokens,
           "max_cot_tokens": cfg.run.eval_max_cot_tokens if mode == "cot" else None,
           "batch_size": batch_size or cfg.run.eval_batch_size, "answer_prompt": cfg.data.answer_prompt}
    if mode == "latent":
        out.update({"num_latents": cfg.latent.num_latents, "num_sweeps": cfg.latent.num_sweeps,
                    "student_mode": cfg.spec.student_mode})
    return out


def provenance() -> dict:
    """When and with what an evaluation ran (summary.json): the UTC date, the library versions and the git
    revision of kava's checkout (None outside one), as a training run's meta.json records them."""
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": versions(),
            "git": git_revision()}


def summarize(rows: list[dict], wall: float, mode: str) -> dict:
    """Dataset-level numbers of scored rows, plus the latent diagnostics when the rows carry them."""
    n = len(rows)
    acc, flex = sum(r["correct"] for r in rows) / max(n, 1), sum(r["correct_flexible"] for r in rows) / max(n, 1)
    return {
        "mode": mode,
        "count": n,
        "accuracy": acc,
        "accuracy_stderr": binomial_stderr(acc, n),
        "accuracy_flexible": flex,
        "accuracy_flexible_stderr": binomial_stderr(flex, n),
        # digit answers: the mean share of gold digits in place (`kava.scoring.digit_agreement`)
        **({"accuracy_digits": sum(r["digits"] for r in rows) / n} if n and all("digits" in r for r in rows) else {}),
        # and the accuracy of each answer place, least significant first (`kava.scoring.place_accuracy`)
        **({"accuracy_by_place": place_accuracy([r["places"] for r in rows])}
           if n and all("places" in r for r in rows) else {}),
        "mean_forward_passes": sum(r["forward_passes"] for r in rows) / max(n, 1),
        "mean_generated_tokens": sum(r["generated_tokens"] for r in rows) / max(n, 1),
        "wall_s": wall,
        "questions_per_s": n / wall if wall > 0 else 0.0,
        **summarize_diagnostics(rows),
    }


def hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def write_eval(out_dir: Path, rows: list[dict], summary: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "predictions.jsonl", "w") as f:
        for r in sorted(rows, key=lambda r: r["index"]):
            f.write(json.dumps(r) + "\n")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))


def eval_dir_name(dataset: str, limit: int | None, available: int, step: int | None = None) -> str:
    """The folder under `eval/` of one evaluation: the dataset's name, `<dataset>-step<N>` for a training
    checkpoint `checkpoints/step_<N>`, then `-limit<N>` when `limit` cut the set short (a smoke test never
    overwrites the full evaluation, nor is read as one)."""
    name = dataset if step is None else f"{dataset}-step{step}"
    return f"{name}-limit{limit}" if limit and limit < available else name


def limit_count(limit: int | float | None, available: int) -> int | None:
    """How many questions of a set of `available` `--limit` keeps: N (an int), or a fraction 0 < F < 1 of the set
    as lm-evaluation-harness reads `--limit 0.01`, rounded (at least one); None without a limit."""
    if not limit:
        return None
    return limit if isinstance(limit, int) else max(1, round(limit * available))


def dataset_label(name: str) -> str:
    """A dataset's name in eval/ and in the summary: a named set as is, a data file by its stem, a hub dataset
    id by its set's name (`openai/gsm8k` is gsm8k; `org/name:split` is `org__name-split`: `hub_eval_spec`)."""
    if is_data_file(name):
        return Path(name).stem
    hub = hub_eval_spec(name)
    return hub.name if hub is not None else name


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "model"


def default_eval_root(km, mode: str) -> Path:
    """Where `kava eval` writes without --output: `RUN/eval` for a kava run or export; for a plain model
    `runs/<name>-<mode>/eval`, beside kava's runs, with a meta.json that `kava report runs/` reads. The name is
    the model's identity (`kava.checkpoint.load.plain_name`: the base, its GGUF file, its peft adapter), so an
    adapter's evaluation never lands in its base model's folder; a folder whose meta.json names another model
    (two bases of one directory name) is refused."""
    if km.kind != "plain":
        return RunDir(km.run_dir).eval
    rd = RunDir(Path("runs") / f"{_slug(plain_name(km.model_args))}-{mode}")
    other = rd.read_meta().get("model_args")
    if other is not None and other != km.model_args:
        raise ValueError(f"{rd.path} holds the evaluations of another model ({other}), not of {km.model_args}; "
                         "give --output DIR")
    return rd.eval


def evaluate_run(checkpoint: str | Path | None, datasets: list[str], *, data_dir=None, hub: bool = False, mode=None,
                 batch_size=None, max_new_tokens=None, limit=None, output=None, progress: bool = True,
                 diagnostics=None, model_args: dict | None = None, fields: dict | None = None) -> dict[str, dict]:
    """Evaluate a run (its best/, else final/), a checkpoint (`checkpoints/step_<n>` too), a `kava export`
    directory, a plain Hugging Face model directory or a peft adapter (`kava.checkpoint.load.load_any`), or the
    model `model_args` names (`kava.checkpoint.load.load_plain`: pretrained=, peft=, gguf_file=, ...), on named
    datasets or data files: what `kava eval` does. Returns {dataset: summary} (on the main process; {} on the
    others).

    The dataset names (and files) are checked before the model loads. Questions are sharded across processes
    (`accelerate launch` / `torchrun`); the main process gathers them and writes
    `<output or default_eval_root>/<eval_dir_name>/{predictions.jsonl, summary.json}`.
    data_dir: the local data root; for the synthetic splits of a run trained on the synthetic task it defaults
    to that run's own data (`kava.data.pipeline.find_synthetic_dir`).
    diagnostics: a `kava.diagnostics.DiagnosticsSpec` (latent runs).
    fields: the columns of data files and hub datasets (keys question, answer, steps: `load_eval_dataset`).
    limit: the first N questions of each set, or a fraction 0 < F < 1 of each (`limit_count`); a test, written
    to `eval/<set>-limit<N>/`.
    A record the reader skipped (a bad line of a data file) is counted in summary.json's "skipped" (as a run's
    skips.json) and named in a line on stderr; the accuracy is over the records read.
    """
    check_eval_sets(datasets, data_dir, hub, synthetic_found=True, fields=fields)  # before any model loads
    if len({dataset_label(n) for n in datasets}) != len(datasets):
        raise ValueError(f"--datasets {','.join(datasets)}: two of them share an eval/ folder name")
    state = PartialState(cpu=not torch.cuda.is_available())  # multi-process CPU runs shard too
    if model_args is not None:
        args = dict(model_args)
        km = Loaded(*load_plain(args.pop("pretrained"), mode=mode, device=state.device, **args),
                    Path(model_args["pretrained"]), exported=False, kind="plain",
                    model_args=plain_identity(model_args))
    else:
        km = load_any(checkpoint, device=state.device, mode=mode)
    cfg = km.cfg
    step = read_state(km.source)["step"] if km.kind == "step" else None
    which, model_step = model_checkpoint(km.source, km.kind)  # summary.json: `kava report` checks it is current
    skip = saved_position_skip(km, mode or cfg.spec.eval_mode)
    if state.is_main_process:
        print(f"[kava] eval: {describe_source(km.source, km.kind, km.model_args)}", flush=True)
    out_root = Path(output) if output else default_eval_root(km, mode or cfg.spec.eval_mode)
    results, warned = {}, False
    for name in datasets:
        root = data_dir
        if root is None and not hub and name.startswith("synth-") and cfg.data.source == "synthetic":
            root = find_synthetic_dir(cfg, None if km.exported else km.run_dir)
        # the CoT (used by the oracle diagnostics) in the style the run trained on
        style = cfg.data.cot_style if cfg.data.cot_style in COT_STYLES else COT_STYLES[0]
        skips = SkipLog()
        records, desc = load_eval_dataset(name, root, hub=hub, cot_style=style, skips=skips, fields=fields)
        label = dataset_label(name)
        available = len(records)
        n = limit_count(limit, available)
        if n is not None and n < available:
            records = records[:n]
            fraction = isinstance(limit, float)
            desc += f" (first {n}: --limit {limit:g} of {available}, rounded)" if fraction else f" (first {n})"
            if state.is_main_process and not warned:  # once, as lm-evaluation-harness warns
                first, tag = ("the first questions of each set", "<N>") if fraction else (f"the first {n} questions", n)
                print(f"[kava] eval: --limit {limit:g} evaluates only {first}: for testing, not a result (written to "
                      f"eval/<set>-limit{tag}/; left out of the model card, and of `kava report` unless "
                      "--include-limited)", file=sys.stderr, flush=True)
                warned = True
        if diagnostics is not None and diagnostics.active:  # before any rank starts: all refuse, or none
            check_shards(len(records), state.num_processes, batch_size or cfg.run.eval_batch_size,
                         diagnostics.min_batch)
        rows, s = evaluate_records(km.model, km.tokenizer, cfg, records, mode=mode, batch_size=batch_size,
                                   max_new_tokens=max_new_tokens, rank=state.process_index,
                                   world=state.num_processes, progress=progress and state.is_main_process,
                                   diagnostics=diagnostics, label=label, position_skip=skip)
        rows = gather_object(rows)
        walls = gather_object([s["wall_s"]])
        if state.is_main_process:
            assert len({r["index"] for r in rows}) == len(rows) == len(records), "sharding counted an example twice"
            for r in rows:  # the index `kava score` reads: the record's place in its file, skipped entries counted
                rec = records[r["index"]]
                r["index"] = r["index"] if rec.index is None else rec.index
            summary = summarize(rows, max(walls), s["mode"])
            kind = "file" if is_data_file(name) else "hub" if hub_eval_spec(name) else "named"  # the card's results
            summary.update({"dataset": label, "dataset_source": name, "dataset_kind": kind, "description": desc,
                            "hardware": hardware(), "processes": state.num_processes, "checkpoint": str(km.source),
                            "config_hash": cfg.hash(), "method": cfg.method, "model_kind": km.kind,
                            "model_args": km.model_args,
                            "checkpoint_name": which, "model_step": model_step, "skipped": skips.as_dict(),
                            "model": {"source": str(km.source.resolve()), "identity": model_identity(cfg)},
                            "generation": generation_settings(cfg, s["mode"], batch_size=batch_size,
                                                              max_new_tokens=max_new_tokens),
                            **provenance()})
            if step is not None:
                summary["checkpoint_step"] = step
            if "position_skip" in s:  # iCoT's keep_position
                summary["position_skip"] = s["position_skip"]
            if len(records) < available:
                summary["limit"] = n
                if isinstance(limit, float):
                    summary["limit_fraction"] = limit
            write_eval(out_root / eval_dir_name(label, n, available, step), rows, summary)
            if km.kind == "plain" and not output:  # `kava report runs/` lists the base model beside the runs
                RunDir(out_root.parent).meta.write_text(json.dumps({
                    "method": cfg.method, "preset": out_root.parent.name, "train_data": "none (not trained by kava)",
                    "model": str(km.source), "model_args": km.model_args}, indent=2))
            results[label] = summary
            print(f"{label}: accuracy {summary['accuracy']:.4f} ± {summary['accuracy_stderr']:.4f} "
                  f"({summary['count']} problems: {desc}); flexible {summary['accuracy_flexible']:.4f} ± "
                  f"{summary['accuracy_flexible_stderr']:.4f}; "
                  + (f"digits in place {summary['accuracy_digits']:.4f}; " if "accuracy_digits" in summary else "")
                  + "forward passes/question "
                  f"{summary['mean_forward_passes']:.1f}; {summary['questions_per_s']:.1f} questions/s")
            for line in format_diagnostics(label, summary):
                print(line)
            if skips.total:  # unread questions are not in the accuracy: say so where a warning is looked for
                print(f"[kava] eval {label}: {skips.summary()}, not evaluated (first: "
                      f"{'; '.join(ex[0] for ex in skips.examples.values())}); summary.json \"skipped\" counts them",
                      file=sys.stderr, flush=True)
            print(f"[kava] wrote {out_root / eval_dir_name(label, n, available, step)}", flush=True)
    return results
