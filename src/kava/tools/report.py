"""Aggregate run directories into a results table (mean ± sample std over seeds) and plots.

A run dir holds ``meta.json`` (method, preset, train_data, seed), ``config.yaml``, ``metrics.jsonl``
(train lines with ``loss/*`` terms, val lines with ``val/accuracy``) and ``eval/<dataset>/summary.json``.
Runs are grouped by (preset or method, method, train_data), or by (method, train_data) with ``group_by="method"``:
a group never mixes methods, and pools only runs whose resolved configs differ in the seed alone (`seed_groups`:
two runs of one seed are never pooled; rows of one name are labelled by what tells them apart). Unfinished
runs (no DONE) are marked. Evaluations of a best/ or final/ that has since moved on, and `--limit` tests, are
left out with a note (`load_run`).
Latent diagnostics, when present, get their own tables and plots: latent ablations and the oracle check
(``ablations`` / ``oracle`` in summary.json), KV match per layer (``kv_match``, ``kv_match.png``) and the
per-term gradient shares over steps (``grad_share/*`` lines of metrics.jsonl, ``grad_shares.png``).
Missing pieces (no eval, a dataset absent for some runs, unreadable files) become "–" cells and notes,
never an exception: a report over a half-finished sweep is still worth reading.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kava.checkpoint.rundir import RunDir
from kava.spec import report_order

METHOD_ORDER = report_order()  # nocot, cot, then the latent methods (`kava.spec`)
DATASET_ORDER = ("gsm8k", "gsm8k-hard", "svamp", "gsm8k-aug-valid")
DASH = "–"


@dataclass
class Run:
    path: Path
    method: str
    preset: str | None
    train_data: str
    seed: int | None
    evals: dict[str, dict] = field(default_factory=dict)  # dataset -> summary.json
    metrics: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    config: dict | None = None  # config.yaml flattened (`a.b` keys), less SEED_KEYS; None without one
    finished: bool | None = None  # DONE written; None for a folder kava did not train (a plain model's evals)


# what the seeds of one experiment may differ in: runs whose configs differ in anything else are not pooled
SEED_KEYS = ("run.seed", "run.name", "run.output_dir")


def flat_config(cfg: dict, prefix: str = "") -> dict:
    """A nested config as `{"optim.max_steps": 4, ...}` (lists and scalars as leaves)."""
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict) and v:
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _read_json(path: Path, notes: list[str]) -> dict | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        notes.append(f"{path}: unreadable ({e.__class__.__name__})")
        return None
    if not isinstance(obj, dict):
        notes.append(f"{path}: not a JSON object")
        return None
    return obj


def load_run(path: str | Path, include_limited: bool = False) -> Run:
    """Everything a report needs from one run dir; what is missing is noted, not raised. An evaluation of
    another model than the run's best/ or final/ now (`RunDir.stale_eval`) is left out with a note, and so is
    a `kava eval --limit N` smoke test unless `include_limited` (then as `<dataset>-limit<N>`)."""
    path = Path(path)
    rd = RunDir(path)
    notes: list[str] = []
    meta = _read_json(rd.meta, notes) if rd.meta.exists() else None
    try:
        cfg = yaml.safe_load(rd.config.read_text(encoding="utf-8")) if rd.config.exists() else None
    except (OSError, yaml.YAMLError):
        cfg = None
        notes.append(f"{rd.config}: unreadable; this run is grouped only with runs without a config")
    cfg = cfg if isinstance(cfg, dict) else None
    if meta is None:  # fall back on the resolved config so a run killed before meta.json still shows up
        notes.append(f"{path}: no usable meta.json; method, preset, seed and data read from config.yaml")
        c = cfg or {}
        meta = {"method": c.get("method"), "preset": c.get("preset"),
                "train_data": (c.get("data") or {}).get("source"), "seed": (c.get("run") or {}).get("seed")}
    run = Run(path, str(meta.get("method") or "unknown"), meta.get("preset"), str(meta.get("train_data") or "?"),
              meta.get("seed"), notes=notes, finished=rd.finished() if rd.started() else None)
    if cfg is not None:
        run.config = {k: v for k, v in flat_config(cfg).items() if k not in SEED_KEYS}
    for summ in sorted(rd.eval.glob("*/summary.json")):
        s = _read_json(summ, notes)
        if s is not None and (why := rd.stale_eval(s)):  # the run was extended, or has a new best/, since
            notes.append(f"{summ.parent}: left out: {why} (kava eval it again)")
        elif s is not None and isinstance(s.get("accuracy"), (int, float)):
            name = str(s.get("dataset") or summ.parent.name)
            if s.get("checkpoint_step") is not None:  # an intermediate checkpoint (eval/<dataset>-step<N>/)
                name += f"-step{s['checkpoint_step']}"
            if s.get("limit"):  # a `kava eval --limit N` smoke test (eval/<dataset>-limit<N>/): not the dataset
                name += f"-limit{s['limit']}"
                if not include_limited:
                    notes.append(f"{summ.parent}: left out: a --limit {s['limit']} test (--include-limited shows it)")
                    continue
            run.evals[name] = s
        elif s is not None:
            notes.append(f"{summ}: no numeric 'accuracy'")
    if not run.evals:
        notes.append(f"{path}: no eval results")
    mpath = rd.metrics
    if mpath.exists():
        bad = 0
        for line in mpath.read_text(encoding="utf-8").splitlines():
            try:
                obj = json.loads(line) if line.strip() else None
            except ValueError:
                obj = None
                bad += 1
            if isinstance(obj, dict) and isinstance(obj.get("step"), (int, float)):
                run.metrics.append(obj)
        if bad:
            notes.append(f"{mpath}: {bad} unreadable line(s) skipped")
    return run


def find_run_dirs(paths: list[str | Path]) -> tuple[list[Path], list[str]]:
    """Run dirs among `paths`; a dir that is not a run (no meta.json/config.yaml/eval) but has runs below
    it (one level) is expanded, so ``kava report runs/`` works."""
    out, notes = [], []
    is_run = lambda p: any(f.exists() for f in (RunDir(p).meta, RunDir(p).config, RunDir(p).eval, RunDir(p).metrics))
    for p in map(Path, paths):
        if not p.is_dir():
            notes.append(f"{p}: not a directory, skipped")
        elif is_run(p):
            out.append(p)
        else:
            subs = sorted(c for c in p.iterdir() if c.is_dir() and is_run(c))
            out.extend(subs)
            if not subs:
                notes.append(f"{p}: no run found, skipped")
    return out, notes


def mean_std(xs: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n-1); std is None for a single value."""
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def _method_rank(method: str) -> int:
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


def _dataset_key(ds: str) -> tuple[int, str]:
    return (DATASET_ORDER.index(ds) if ds in DATASET_ORDER else len(DATASET_ORDER), ds)


def aggregate(run_dirs: list[str | Path], group_by: str = "preset", include_limited: bool = False) -> list[dict]:
    """One row per group, in the methods' order (`kava.spec.report_order`), then others.

    Row: ``group, method, preset, train_data, runs, seeds, notes`` and ``datasets[ds]`` with
    ``accuracy`` and ``accuracy_flexible`` (mean, std in %, std None for n=1), ``n``,
    ``forward_passes`` / ``forward_passes_std``, ``values`` (per-run accuracy %), and ``run_data`` (the
    loaded `Run`s, for plotting). include_limited: `kava eval --limit` tests too (`load_run`).
    """
    if group_by not in ("preset", "method"):
        raise ValueError(f"group_by must be 'preset' or 'method', got {group_by!r}")
    rows = []
    for name, train_data, runs, split_note in seed_groups([load_run(d, include_limited) for d in run_dirs],
                                                          group_by):
        runs.sort(key=lambda r: (r.seed is None, r.seed if isinstance(r.seed, int) else 0, str(r.path)))
        notes = [n for r in runs for n in r.notes] + ([split_note] if split_note else [])
        datasets = {}
        for ds in sorted({ds for r in runs for ds in r.evals}, key=_dataset_key):
            have = [r for r in runs if ds in r.evals]
            if len(have) < len(runs):
                lacking = ", ".join(str(r.path) for r in runs if ds not in r.evals)
                notes.append(f"{name} ({train_data}): {ds} missing for {lacking}; shown over n={len(have)}")
            acc = mean_std([100 * float(r.evals[ds]["accuracy"]) for r in have])
            flex = [100 * float(r.evals[ds]["accuracy_flexible"]) for r in have
                    if isinstance(r.evals[ds].get("accuracy_flexible"), (int, float))]
            passes = [float(r.evals[ds]["mean_forward_passes"]) for r in have
                      if isinstance(r.evals[ds].get("mean_forward_passes"), (int, float))]
            fp = mean_std(passes) if passes else (None, None)
            datasets[ds] = {
                "accuracy": acc[0], "accuracy_std": acc[1], "n": len(have),
                "accuracy_flexible": mean_std(flex)[0] if flex else None,
                "forward_passes": fp[0], "forward_passes_std": fp[1],
                "values": [100 * float(r.evals[ds]["accuracy"]) for r in have],
                **diagnostics_cell([r.evals[ds] for r in have]),
            }
        rows.append({
            "group": name, "method": runs[0].method, "preset": runs[0].preset, "train_data": train_data,
            "runs": [str(r.path) for r in runs], "seeds": [r.seed for r in runs],
            "unfinished": [str(r.path) for r in runs if r.finished is False],
            "datasets": datasets, "notes": notes, "run_data": runs, "grad_shares": grad_share_curves(runs),
        })
    rows.sort(key=lambda r: (_method_rank(r["method"]), r["group"], r["train_data"]))
    return rows


def seed_groups(runs: list[Run], group_by: str = "preset") -> list[tuple[str, str, list[Run], str | None]]:
    """The runs as groups of seeds of one experiment: (label, train data, runs, a note or None).

    Runs are pooled only when they share the name (preset or method, by `group_by`), the method, the training
    data and the whole resolved config apart from `SEED_KEYS`: runs of one preset trained for 4 and for 60
    steps are two rows. Two runs of one config and one seed are never pooled (their spread is not a spread
    over seeds): each is a row of its own, with a note. Rows that would share a name are told apart by the
    config keys they differ in (`tiny_synth (optim.max_steps=4)`), else by their directory's name."""
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        name = (r.preset or r.method) if group_by == "preset" else r.method
        # a group never mixes methods: `--config llama1b_aug --set method=pccot` is a row of its own
        key = json.dumps(r.config, sort_keys=True, default=str) if r.config is not None else None
        groups.setdefault((name, r.method, r.train_data, key), []).append(r)
    out: list[tuple[tuple, list[Run], str | None]] = []
    for k, members in groups.items():
        seeds = [r.seed for r in members if r.seed is not None]
        if len(seeds) == len(set(seeds)):
            out.append((k, members, None))
            continue
        same = sorted({s for s in seeds if seeds.count(s) > 1}, key=str)
        note = (f"{k[0]} ({k[2]}): {len(members)} runs of one config with the same seed "
                f"({', '.join(map(str, same))}): not pooled, one row each")
        out += [(k, [r], note) for r in members]
    labels = []
    for k, members, _ in out:
        twins = [m for kk, m, _ in out if kk[:3] == k[:3]]  # rows that would share the name, method and data
        labels.append(k[0] if len(twins) == 1 else f"{k[0]} ({_difference(members, twins)})")
    return [(label, k[2], members, note) for label, (k, members, note) in zip(labels, out)]


def _difference(members: list[Run], twins: list[list[Run]]) -> str:
    """What tells one row (`members`) from the others of its name (`twins`, itself included): the config keys
    whose values differ between them (at most three, `key=value`), and the directory name of its run where
    another row has the same config (one seed run twice)."""
    cfgs = [m[0].config or {} for m in twins]
    keys = sorted(k for k in set().union(*cfgs) if len({json.dumps(c.get(k), default=str) for c in cfgs}) > 1)
    mine = members[0].config or {}
    text = ", ".join(f"{k}={mine.get(k)}" for k in keys[:3]) + (", ..." if len(keys) > 3 else "")
    text = text if len(text) <= 60 else text[:57] + "..."
    if sum(c == mine for c in cfgs) > 1:
        text += ("; " if text else "") + ", ".join(r.path.name for r in members)
    return text


# ----------------------------------------------------------------------------------------------------
# latent diagnostics (kava.diagnostics in eval summaries, kava.training.gradshare in metrics.jsonl)

ABLATION_KINDS = ("none", "zeros", "placeholder", "shuffle")
KV_STATS = ("k_rel", "k_cos", "v_rel", "v_cos")


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _stat(xs: list[float]) -> dict | None:
    """``{mean, std, n}`` of the values (std None for one value), None for none."""
    if not xs:
        return None
    m, sd = mean_std(xs)
    return {"mean": m, "std": sd, "n": len(xs)}


def diagnostics_cell(summaries: list[dict]) -> dict:
    """Latent diagnostics of one (group, dataset) over its runs' eval summaries (those that have them).

    ``ablations``: kind -> ``{mean, std, n}`` of the accuracy in % with the latents replaced (``none`` = the
    normal accuracy of the same runs); ``oracle`` and ``oracle_student``: the oracle's accuracy in % and the
    student's on the same problems; ``kv_match``: stat -> per-layer mean over runs (runs with the most layers
    decide L; a run with another layer count is left out of the per-layer mean) and ``kv_match_mean``:
    stat -> ``{mean, std, n}`` of each run's mean over layers. Empty when no summary carries diagnostics.
    """
    out: dict = {}
    abl = [s["ablations"] for s in summaries if isinstance(s.get("ablations"), dict)]
    if abl:
        out["ablations"] = {k: _stat([100 * a[k] for a in abl if _num(a.get(k))]) for k in ABLATION_KINDS
                            if any(_num(a.get(k)) for a in abl)}
    orc = [s["oracle"] for s in summaries if isinstance(s.get("oracle"), dict)]
    if orc:
        out["oracle"] = _stat([100 * o["accuracy"] for o in orc if _num(o.get("accuracy"))])
        out["oracle_student"] = _stat([100 * o["student_accuracy"] for o in orc if _num(o.get("student_accuracy"))])
        out["oracle_count"] = [o.get("count") for o in orc]
    kvm = [s["kv_match"] for s in summaries if isinstance(s.get("kv_match"), dict)
           and isinstance(s["kv_match"].get("k_rel"), list)]
    if kvm:
        L = max(len(k["k_rel"]) for k in kvm)
        same = [k for k in kvm if all(isinstance(k.get(st), list) and len(k[st]) == L for st in KV_STATS)]
        out["kv_match"] = {st: [statistics.fmean(k[st][layer] for k in same) for layer in range(L)]
                           for st in KV_STATS}
        out["kv_match_mean"] = {st: _stat([statistics.fmean(k[st]) for k in same]) for st in KV_STATS}
        out["kv_key_space"] = same[0].get("key_space") if same else None
    return out


def grad_share_curves(runs: list[Run]) -> dict[str, dict]:
    """``grad_share/<term>`` over steps from the runs' metrics.jsonl: term -> ``{steps, mean, std, n}``
    (mean and sample std over the runs that logged that step; lists aligned with ``steps``)."""
    per: dict[str, dict[int, list[float]]] = {}
    for run in runs:
        for m in run.metrics:
            for k, v in m.items():
                if k.startswith("grad_share/") and _num(v):
                    per.setdefault(k.split("/", 1)[1], {}).setdefault(int(m["step"]), []).append(float(v))
    out = {}
    for term in sorted(per, key=lambda t: (t not in ("ce_student", "ce_teacher", "codi", "kv"), t)):
        steps = sorted(per[term])
        stats = [mean_std(per[term][st]) for st in steps]
        out[term] = {"steps": steps, "mean": [m for m, _ in stats], "std": [sd for _, sd in stats],
                     "n": [len(per[term][st]) for st in steps]}
    return out


def _pm(st: dict | None, nd: int = 1) -> str:
    if st is None:
        return DASH
    return f"{st['mean']:.{nd}f}" + ("" if st["std"] is None else f" ± {st['std']:.{nd}f}") + f" (n={st['n']})"


def _diagnostic_tables(rows: list[dict]) -> list[str]:
    """Markdown sections for the latent ablations, oracle check, KV match and gradient shares (only those
    some run has)."""
    lines: list[str] = []
    cells = [(r, ds, c) for r in rows for ds, c in sorted(r["datasets"].items(), key=lambda x: _dataset_key(x[0]))]
    abl = [(r, ds, c) for r, ds, c in cells if c.get("ablations") or c.get("oracle")]
    if abl:
        head = ["group", "train data", "dataset", *ABLATION_KINDS, "oracle", "student on the oracle's problems"]
        lines += ["## Latent ablations and oracle check (accuracy %)", "",
                  "`none` is the normal accuracy; the other columns replace the latent embeddings the answer reads "
                  "(zeros, the `<latent>` placeholder, another example's latents) and recompute the slots' KV. "
                  "The oracle puts the teacher's compressed CoT KV (the `L_KV` targets) into the latent slots; it "
                  "counts only problems with a CoT, next to the student's accuracy on those problems "
                  "(definitions: kava docs/method.md §5).", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r, ds, c in abl:
            a = c.get("ablations") or {}
            lines.append("| " + " | ".join([r["group"], r["train_data"], ds, *[_pm(a.get(k)) for k in ABLATION_KINDS],
                                              _pm(c.get("oracle")), _pm(c.get("oracle_student"))]) + " |")
        lines.append("")
    kv = [(r, ds, c) for r, ds, c in cells if c.get("kv_match")]
    if kv:
        head = ["group", "train data", "dataset", "keys", "K rel. error", "K cosine", "V rel. error", "V cosine"]
        lines += ["## KV match: student's final-sweep latent KV vs its eviction targets", "",
                  "Per (example, KV head, valid slot) vector: relative error |s − t| / |t| and cosine, averaged, then "
                  "averaged over layers (mean ± std over runs). Per layer: the table below and `kv_match.png`.", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r, ds, c in kv:
            mm = c["kv_match_mean"]
            lines.append("| " + " | ".join([r["group"], r["train_data"], ds, str(c.get("kv_key_space") or DASH),
                                              *[_pm(mm[st], 3) for st in KV_STATS]]) + " |")
        lines += ["", "| group | dataset | layer | K rel. error | K cosine | V rel. error | V cosine |",
                  "|---|---|---|---|---|---|---|"]
        for r, ds, c in kv:
            for layer in range(len(c["kv_match"]["k_rel"])):
                lines.append(f"| {r['group']} | {ds} | {layer} | " + " | ".join(
                    f"{c['kv_match'][st][layer]:.3f}" for st in KV_STATS) + " |")
        lines += ["", "![KV match per layer](kv_match.png)", ""]
    gs = [r for r in rows if r.get("grad_shares")]
    if gs:
        lines += ["## Gradient share of each loss term", "",
                  "Share of each term in the sum of per-term gradient norms, |g_term| / Σ |g|, on the trainable "
                  "parameters (`run.grad_share_every`), mean over runs: at the "
                  "first and last measured step and averaged over all measured steps.", "",
                  "| group | train data | term | first step | share | last step | share | mean over steps |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in gs:
            for term, cur in r["grad_shares"].items():
                lines.append(f"| {r['group']} | {r['train_data']} | {term} | {cur['steps'][0]} | {cur['mean'][0]:.3f} "
                             f"| {cur['steps'][-1]} | {cur['mean'][-1]:.3f} | {statistics.fmean(cur['mean']):.3f} |")
        lines += ["", "![gradient shares](grad_shares.png)", ""]
    return lines


def plot_kv_match(rows: list[dict], path: Path) -> bool:
    """Four panels (K/V relative error, K/V cosine), x layer, one line per (group, dataset). False (nothing
    written) when no run has KV-match numbers."""
    names = short_labels(rows)
    series = [(i, f"{names[i]} · {ds}", c["kv_match"]) for i, r in enumerate(rows)
              for ds, c in sorted(r["datasets"].items(), key=lambda x: _dataset_key(x[0])) if c.get("kv_match")]
    if not series:
        return False
    titles = {"k_rel": "K relative error", "k_cos": "K cosine", "v_rel": "V relative error", "v_cos": "V cosine"}
    from matplotlib.ticker import MaxNLocator

    fig, axes = _figure(4, max_cols=2, layout="constrained")
    styles = ["-", "--", ":", "-."]
    for ax, st in zip(axes, KV_STATS):
        for k, (gi, label, kv) in enumerate(series):
            ax.plot(range(len(kv[st])), kv[st], styles[k % len(styles)], color=_color(gi), marker="o", label=label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        _label_axes(ax, titles[st], "layer", titles[st], legend=False)
    # one legend for the four panels, below them: never over the data
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(3, len(labels)), fontsize="small")
    fig.suptitle("KV match: final-sweep latent KV vs eviction targets (mean over runs)")
    fig.savefig(path, bbox_inches="tight")
    return True


def plot_grad_shares(rows: list[dict], path: Path) -> bool:
    """One panel per group: gradient share of each loss term vs step (mean over runs, ± std band). False
    (nothing written) when no run logged gradient shares."""
    gs = [r for r in rows if r.get("grad_shares")]
    if not gs:
        return False
    from matplotlib.ticker import MaxNLocator

    names = dict(zip((id(r) for r in rows), short_labels(rows)))
    fig, axes = _figure(len(gs))
    positive = [m for r in gs for cur in r["grad_shares"].values() for m in cur["mean"] if m > 0]
    floor = min(0.1, 0.5 * min(positive)) if positive else 1e-3
    for ax, r in zip(axes, gs):
        for k, (term, cur) in enumerate(r["grad_shares"].items()):
            xs, ys = cur["steps"], cur["mean"]
            ax.plot(xs, ys, color=_color(k), marker="o" if len(xs) < 3 else None, label=term)
            if any(sd is not None for sd in cur["std"]):
                lo = [m - (sd or 0.0) for m, sd in zip(ys, cur["std"])]
                hi = [m + (sd or 0.0) for m, sd in zip(ys, cur["std"])]
                ax.fill_between(xs, lo, hi, color=_color(k), alpha=0.2)
        ax.set_yscale("log")  # the KV term's share can be < 1%: a linear axis would hide it
        ax.set_ylim(floor, 1.0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # optimizer steps
        _label_axes(ax, f"{names[id(r)]} ({len(r['runs'])} run(s))", "step", "gradient share")
    fig.suptitle("Per-term gradient share |g_term| / Σ|g| (log scale)")
    fig.tight_layout()
    fig.savefig(path)
    return True


# ----------------------------------------------------------------------------------------------------
# writing


def fmt_acc(cell: dict | None) -> str:
    """``56.5 ± 1.2 (n=3)``; a single seed shows ``56.5 (n=1)``; missing shows a dash."""
    if cell is None:
        return DASH
    if cell["accuracy_std"] is None:
        return f"{cell['accuracy']:.1f} (n={cell['n']})"
    return f"{cell['accuracy']:.1f} ± {cell['accuracy_std']:.1f} (n={cell['n']})"


def _fmt(x: float | None, nd: int = 1) -> str:
    return DASH if x is None else f"{x:.{nd}f}"


def datasets_of(rows: list[dict]) -> list[str]:
    return sorted({ds for r in rows for ds in r["datasets"]}, key=_dataset_key)


def _md_table(rows: list[dict], datasets: list[str], cell) -> list[str]:
    head = ["group", "method", "train data", "runs"] + datasets
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        n = str(len(r["runs"])) + (f" ({len(r['unfinished'])} unfinished)" if r.get("unfinished") else "")
        cells = [r["group"], r["method"], r["train_data"], n]
        cells += [cell(r["datasets"].get(ds)) for ds in datasets]
        out.append("| " + " | ".join(cells) + " |")
    return out


def render_markdown(rows: list[dict], notes: list[str], group_by: str) -> str:
    datasets = datasets_of(rows)
    n_runs = sum(len(r["runs"]) for r in rows)
    lines = [
        "# KaVa results", "",
        f"{n_runs} run(s) in {len(rows)} group(s), grouped by "
        f"({'preset or method' if group_by == 'preset' else 'method'}, train data).", "",
        "## Accuracy (%), strict match", "",
        "Mean ± sample standard deviation over seeds (runs whose configs differ only in the seed); n = number "
        "of runs with that dataset.", "",
        *_md_table(rows, datasets, fmt_acc), "",
        "## Accuracy (%), flexible extract (last number)", "",
        *_md_table(rows, datasets, lambda c: _fmt(c and c["accuracy_flexible"])), "",
        "## Forward passes per question (mean over seeds)", "",
        *_md_table(rows, datasets, lambda c: _fmt(c and c["forward_passes"])), "",
        *_diagnostic_tables(rows),
        "## Plots", "", "![accuracy vs forward passes](accuracy_vs_passes.png)", "",
        "![training curves](training_curves.png)", "",
        "## Runs", "",
    ]
    for r in rows:
        for path, seed in zip(r["runs"], r["seeds"]):
            late = " (unfinished: no DONE; its evaluation is of the model it had then)" if path in r.get(
                "unfinished", ()) else ""
            lines.append(f"- {r['group']} ({r['train_data']}), seed {seed}: `{path}`{late}")
    all_notes = notes + [n for r in rows for n in r["notes"]]
    if all_notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in all_notes]]
    return "\n".join(lines) + "\n"


def _diag_columns(rows: list[dict], ds: str) -> list[tuple[str, object]]:
    """(column suffix, getter of a dataset cell) for the latent diagnostics some row has on `ds`."""
    cells = [r["datasets"][ds] for r in rows if ds in r["datasets"]]
    mean = lambda st: None if st is None else st["mean"]  # noqa: E731
    cols: list[tuple[str, object]] = []
    if any(c.get("ablations") for c in cells):
        cols += [(f"ablation_{k}_mean", lambda c, k=k: mean((c.get("ablations") or {}).get(k)))
                 for k in ABLATION_KINDS]
    if any(c.get("oracle") for c in cells):
        cols += [("oracle_mean", lambda c: mean(c.get("oracle"))),
                 ("oracle_student_mean", lambda c: mean(c.get("oracle_student")))]
    if any(c.get("kv_match") for c in cells):
        cols += [(f"kv_{st}_mean", lambda c, st=st: mean((c.get("kv_match_mean") or {}).get(st))) for st in KV_STATS]
    return cols


def write_csv(rows: list[dict], path: Path) -> None:
    """Machine-readable twin of the table: numbers unformatted (accuracy in %), empty cells where missing;
    latent-diagnostic columns (ablations, oracle, KV match means over layers) for datasets that have them."""
    datasets = datasets_of(rows)
    head = ["group", "method", "preset", "train_data", "n_runs", "seeds", "n_unfinished"]
    diag = {ds: _diag_columns(rows, ds) for ds in datasets}
    for ds in datasets:
        head += [f"{ds}/accuracy_mean", f"{ds}/accuracy_std", f"{ds}/n", f"{ds}/accuracy_flexible_mean", f"{ds}/forward_passes"]
        head += [f"{ds}/{name}" for name, _ in diag[ds]]
    num = lambda x: "" if x is None else f"{x:.4f}"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(head)
        for r in rows:
            line = [r["group"], r["method"], r["preset"] or "", r["train_data"], len(r["runs"]),
                    " ".join(str(s) for s in r["seeds"]), len(r.get("unfinished", ()))]
            for ds in datasets:
                c = r["datasets"].get(ds)
                line += ["", "", 0, "", ""] if c is None else [
                    num(c["accuracy"]), num(c["accuracy_std"]), c["n"], num(c["accuracy_flexible"]), num(c["forward_passes"])]
                line += ["" if c is None else num(get(c)) for _, get in diag[ds]]
            w.writerow(line)


def _figure(n_panels: int, width: float = 5.0, height: float = 4.0, max_cols: int = 3, layout: str | None = None):
    """A Figure without pyplot (no global backend state; renders with Agg)."""
    from matplotlib.figure import Figure

    ncols = min(n_panels, max_cols) or 1
    nrows = max(1, math.ceil(n_panels / ncols))
    fig = Figure(figsize=(width * ncols, height * nrows), dpi=100, layout=layout)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes


def _color(i: int) -> str:
    return f"C{i % 10}"


def short_labels(rows: list[dict]) -> list[str]:
    """Legend names of the rows: the group (preset or method: the run names without the seed), with the
    training data's file stem only where two groups would otherwise share a name (never a whole data path)."""
    base = [str(r["group"]) for r in rows]
    out = []
    for b, r in zip(base, rows):
        data = str(r.get("train_data") or "")
        stem = Path(data.split(":")[0]).stem if "/" in data or "." in data else data
        out.append(f"{b} [{stem}]" if base.count(b) > 1 and stem else b)
    return out


def plot_accuracy_vs_passes(rows: list[dict], path: Path) -> None:
    """One panel per dataset: x forward passes per question, y accuracy % (0 to 100: panels and reports
    compare at a glance), one marker per group with seed std as error bars; the paper's point is latent
    methods sit left of CoT at similar height. Legends name the groups, never data paths."""
    datasets = datasets_of(rows)
    names = short_labels(rows)
    fig, axes = _figure(max(1, len(datasets)))
    if not datasets:
        axes[0].text(0.5, 0.5, "no evaluation results", ha="center", va="center")
    for ax, ds in zip(axes, datasets):
        for i, r in enumerate(rows):
            c = r["datasets"].get(ds)
            if c is None or c["forward_passes"] is None:
                continue
            ax.errorbar(c["forward_passes"], c["accuracy"], yerr=c["accuracy_std"] or 0, xerr=c["forward_passes_std"] or 0,
                        fmt="o", capsize=4, color=_color(i), label=f"{names[i]} (n={c['n']})")
        ax.set_ylim(0, 100)
        _label_axes(ax, ds, "forward passes per question", "accuracy (%)")
    fig.suptitle("Accuracy vs forward passes (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path)


def _label_axes(ax, title: str, xlabel: str, ylabel: str, legend: bool = True) -> None:
    """Title, axis labels, grid, and a legend when something was labelled."""
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def plot_training_curves(rows: list[dict], path: Path) -> None:
    """One panel per loss term found in the runs' metrics.jsonl (plus val/accuracy), one line per run."""
    names = short_labels(rows)
    runs = [(i, names[i], run) for i, r in enumerate(rows) for run in r["run_data"]]
    label = [f"{group} seed {run.seed}" for _, group, run in runs]
    # distinct legend entries: a label two runs share gets the run directory's name instead
    label = {id(run): (lb if label.count(lb) == 1 else f"{group} {run.path.name}")
             for lb, (_, group, run) in zip(label, runs)}
    keys = sorted({k for _, _, run in runs for m in run.metrics if m.get("split", "train") == "train"
                   for k in m if k.startswith("loss/")}, key=lambda k: (k != "loss/total", k))
    if any("val/accuracy" in m for _, _, run in runs for m in run.metrics):
        keys.append("val/accuracy")
    fig, axes = _figure(max(1, len(keys)))
    if not keys:
        axes[0].text(0.5, 0.5, "no training metrics", ha="center", va="center")
    styles = ["-", "--", ":", "-."]
    for ax, key in zip(axes, keys):
        seen: dict[int, int] = {}
        for gi, group, run in runs:
            pts = [(m["step"], m[key]) for m in run.metrics if isinstance(m.get(key), (int, float))
                   and (key.startswith("val/") or m.get("split", "train") == "train")]
            if not pts:
                continue
            k = seen[gi] = seen.get(gi, -1) + 1
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, ys, styles[k % len(styles)], color=_color(gi), marker="o" if len(xs) < 3 else None,
                    label=label[id(run)] + (" (unfinished)" if run.finished is False else ""))
        _label_axes(ax, key, "step", key)
    fig.suptitle("Training curves")
    fig.tight_layout()
    fig.savefig(path)


def write_report(run_paths: list[str | Path], output: str | Path, group_by: str = "preset",
                 include_limited: bool = False) -> dict:
    """Write report.md, report.csv, accuracy_vs_passes.png and training_curves.png into `output` (and
    kv_match.png, grad_shares.png when a run has those diagnostics); return the rows and the paths written."""
    dirs, notes = find_run_dirs(run_paths)
    rows = aggregate(dirs, group_by, include_limited)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    paths = {n: out / n for n in ("report.md", "report.csv", "accuracy_vs_passes.png", "training_curves.png")}
    paths["report.md"].write_text(render_markdown(rows, notes, group_by), encoding="utf-8")
    write_csv(rows, paths["report.csv"])
    plot_accuracy_vs_passes(rows, paths["accuracy_vs_passes.png"])
    plot_training_curves(rows, paths["training_curves.png"])
    for name, plot in (("kv_match.png", plot_kv_match), ("grad_shares.png", plot_grad_shares)):
        if plot(rows, out / name):  # only when some run has these diagnostics
            paths[name] = out / name
    return {"rows": rows, "notes": notes, "paths": paths}
