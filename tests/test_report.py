"""Report: hand-built run dirs, aggregated numbers checked against hand-computed mean / sample std, the
markdown and CSV carry them, missing pieces show as "–" with a note, and both plots are real PNGs."""

from __future__ import annotations

import csv
import json
import math
import struct

import pytest

from kava.cli import main
from kava.tools.report import aggregate, write_report

KAVA = {"method": "kava", "preset": "llama1b_aug", "train_data": "whynlp/gsm8k-aug"}
COT = {"method": "cot", "preset": None, "train_data": "whynlp/gsm8k-aug"}
NOCOT = {"method": "nocot", "preset": None, "train_data": "whynlp/gsm8k-aug"}


def make_run(root, name, meta, seed, evals, n_steps=6, bad_metrics_line=False, max_steps=None, finished=True):
    """A run dir as training + evaluation write it. evals: dataset -> (accuracy, flexible, forward passes)."""
    d = root / name
    (d / "eval").mkdir(parents=True)
    (d / "meta.json").write_text(json.dumps({**meta, "seed": seed}))
    (d / "config.yaml").write_text(f"method: {meta['method']}\nrun:\n  seed: {seed}\n  name: {name}\n"
                                   + (f"optim:\n  max_steps: {max_steps}\n" if max_steps else ""))
    if finished:
        (d / "DONE").write_text(json.dumps({"steps": max_steps or n_steps}))
    lines = []
    for step in range(0, n_steps * 10, 10):
        lo = {"step": step, "split": "train", "loss/total": 5.0 / (1 + step) + seed * 1e-3, "loss/ce_teacher": 2.0 / (1 + step), "lr": 1e-4}
        if meta["method"] == "kava":
            lo |= {"loss/ce_student": 3.0 / (1 + step), "loss/codi": 0.5 / (1 + step), "loss/kv": 1.0 / (1 + step)}
        lines.append(json.dumps(lo))
        if step % 20 == 0:
            lines.append(json.dumps({"step": step, "split": "val", "val/accuracy": step / 100}))
    if bad_metrics_line:
        lines.insert(2, "{not json")
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    for ds, (acc, flex, passes) in evals.items():
        (d / "eval" / ds).mkdir()
        (d / "eval" / ds / "summary.json").write_text(json.dumps({
            "dataset": ds, "description": f"{ds} (local)", "count": 100, "accuracy": acc, "accuracy_flexible": flex,
            "mean_forward_passes": passes, "mean_generated_tokens": passes - 1, "questions_per_s": 10.0, "wall_s": 10.0,
            "hardware": "cpu", "checkpoint": str(d / "best"), "config_hash": "abc", "mode": "latent"}))
    return d


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    return [
        make_run(root, "kava-s42", KAVA, 42, {"gsm8k": (0.50, 0.55, 7.0), "gsm8k-hard": (0.10, 0.10, 7.0), "svamp": (0.40, 0.40, 7.0)}),
        make_run(root, "kava-s123", KAVA, 123, {"gsm8k": (0.60, 0.65, 7.0), "gsm8k-hard": (0.20, 0.20, 7.0), "svamp": (0.45, 0.50, 7.0)},
                 bad_metrics_line=True),
        make_run(root, "kava-s456", KAVA, 456, {"gsm8k": (0.70, 0.75, 7.3), "gsm8k-hard": (0.30, 0.30, 7.0)}),  # no svamp
        make_run(root, "cot-s42", COT, 42, {"gsm8k": (0.616, 0.62, 65.0), "gsm8k-hard": (0.25, 0.25, 80.0)}),
        make_run(root, "nocot-s42", NOCOT, 42, {}),  # trained, never evaluated
    ]


def test_aggregate_numbers(runs):
    rows = aggregate(runs)
    assert [r["group"] for r in rows] == ["nocot", "cot", "llama1b_aug"]  # nocot, cot, ..., kava order
    nocot, cot, kava = rows
    assert kava["seeds"] == [42, 123, 456] and len(kava["runs"]) == 3
    g = kava["datasets"]["gsm8k"]
    assert g["n"] == 3 and g["accuracy"] == pytest.approx(60.0) and g["accuracy_std"] == pytest.approx(10.0)
    assert g["accuracy_flexible"] == pytest.approx(65.0)
    assert g["forward_passes"] == pytest.approx(7.1) and g["forward_passes_std"] == pytest.approx(math.sqrt(0.03))
    s = kava["datasets"]["svamp"]
    assert s["n"] == 2 and s["accuracy"] == pytest.approx(42.5) and s["accuracy_std"] == pytest.approx(math.sqrt(12.5))
    assert any("svamp missing" in n and "kava-s456" in n for n in kava["notes"])
    c = cot["datasets"]["gsm8k"]
    assert c["n"] == 1 and c["accuracy"] == pytest.approx(61.6) and c["accuracy_std"] is None
    assert "svamp" not in cot["datasets"]
    assert nocot["datasets"] == {} and any("no eval results" in n for n in nocot["notes"])
    assert any("unreadable line" in n for n in kava["notes"])


def test_a_preset_trained_with_another_method_is_a_group_of_its_own(runs, tmp_path):
    """`kava train --config llama1b_aug --set method=pccot` shares the preset with the kava runs, not their row."""
    pc = make_run(tmp_path / "more", "pccot-s42", {**KAVA, "method": "pccot"}, 42, {"gsm8k": (0.1, 0.1, 7.0)})
    rows = aggregate(runs + [pc])
    assert [(r["group"], r["method"]) for r in rows] == [
        ("nocot", "nocot"), ("cot", "cot"), ("llama1b_aug", "pccot"), ("llama1b_aug", "kava")]
    assert rows[2]["datasets"]["gsm8k"]["accuracy"] == pytest.approx(10.0) and len(rows[3]["runs"]) == 3


def test_only_runs_that_differ_by_seed_alone_are_pooled_unfinished_ones_marked_legends_distinct(tmp_path, monkeypatch):
    """Ten seed-42 runs of one preset, 4 to 60 steps, one unfinished, became one "± std over seeds" row, and the
    training-curve legend had nine identical "tiny_synth seed 42" entries. Runs pool only when their configs
    differ in the seed alone; two runs of one config and one seed are never pooled; rows and legend entries
    are told apart; an unfinished run is marked."""
    from pathlib import Path

    from matplotlib.figure import Figure

    root = tmp_path / "runs"
    meta = {"method": "cot", "preset": "tiny_synth", "train_data": "synthetic:equation"}
    steps = [4, 8, 12, 16, 20, 30, 40, 50, 60]
    for i, n in enumerate(steps):
        make_run(root, f"r{n}", meta, 42, {"synth-test": (0.1 * (i % 3), 0.1, 20.0)}, max_steps=n, finished=n != 60)
    for seed in (1, 2, 3):  # one experiment over three seeds: pooled
        make_run(root, f"s{seed}", meta, seed, {"synth-test": (0.2 + seed / 10, 0.3, 20.0)}, max_steps=100)
    for name in ("again-a", "again-b"):  # a rerun of one config and one seed (r8's): not pooled with it
        make_run(root, name, meta, 42, {"synth-test": (0.5, 0.5, 20.0)}, max_steps=8)
        (root / name / "config.yaml").write_text((root / "r8" / "config.yaml").read_text())
    figs = {}
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, p, *a, **k: (figs.__setitem__(Path(p).name, self),
                                                                    real(self, p, *a, **k))[1])
    res = write_report([root], tmp_path / "out")
    rows = res["rows"]
    by = {r["group"]: r for r in rows}
    assert len(rows) == 8 + 1 + 3  # r8 and its two reruns: three rows
    for n in (4, 12, 60):
        assert by[f"tiny_synth (optim.max_steps={n})"]["runs"] == [str(root / f"r{n}")]
    pooled = by["tiny_synth (optim.max_steps=100)"]
    assert pooled["seeds"] == [1, 2, 3] and pooled["datasets"]["synth-test"]["accuracy_std"] is not None
    assert [by[f"tiny_synth (optim.max_steps=8; {n})"]["runs"] for n in ("r8", "again-a", "again-b")] == [
        [str(root / n)] for n in ("r8", "again-a", "again-b")]
    assert any("3 runs of one config with the same seed (42): not pooled" in n
               for n in by["tiny_synth (optim.max_steps=8; r8)"]["notes"])
    assert all(r["datasets"]["synth-test"]["accuracy_std"] is None for r in rows if r is not pooled)
    assert by["tiny_synth (optim.max_steps=60)"]["unfinished"] == [str(root / "r60")]
    md = res["paths"]["report.md"].read_text()
    assert "| tiny_synth (optim.max_steps=60) | cot | synthetic:equation | 1 (1 unfinished) |" in md
    assert f"seed 42: `{root / 'r60'}` (unfinished: no DONE" in md
    curves = figs["training_curves.png"]
    panels = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in curves.axes if ax.get_legend()]
    assert panels and all(len(labels) == len(set(labels)) == 14 for labels in panels), panels  # one per run
    assert "tiny_synth (optim.max_steps=60) seed 42 (unfinished)" in panels[0]
    assert "tiny_synth (optim.max_steps=8; again-a) seed 42" in panels[0]


def test_group_by_method_and_train_data(runs, tmp_path):
    other = make_run(tmp_path / "more", "kava-nl-s42", {**KAVA, "preset": "llama1b_aug_nl", "train_data": "synthetic:nl"}, 42,
                     {"gsm8k": (0.3, 0.3, 7.0)})
    rows = aggregate(runs + [other], group_by="method")
    assert [(r["group"], r["train_data"]) for r in rows] == [
        ("nocot", "whynlp/gsm8k-aug"), ("cot", "whynlp/gsm8k-aug"), ("kava", "synthetic:nl"), ("kava", "whynlp/gsm8k-aug")]
    assert rows[3]["datasets"]["gsm8k"]["n"] == 3
    with pytest.raises(ValueError, match="group_by"):
        aggregate(runs, group_by="seed")


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_write_report(runs, tmp_path):
    res = write_report([runs[0].parent], tmp_path / "out")  # a folder of runs is expanded
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| llama1b_aug | kava | whynlp/gsm8k-aug | 3 | 60.0 ± 10.0 (n=3) | 20.0 ± 10.0 (n=3) | 42.5 ± 3.5 (n=2) |" in md
    assert "| cot | cot | whynlp/gsm8k-aug | 1 | 61.6 (n=1) | 25.0 (n=1) | – |" in md
    assert "| nocot | nocot | whynlp/gsm8k-aug | 1 | – | – | – |" in md
    assert "| cot | cot | whynlp/gsm8k-aug | 1 | 65.0 | 80.0 | – |" in md  # forward passes table
    assert "## Notes" in md and "no eval results" in md and "svamp missing" in md
    assert md.index("| nocot |") < md.index("| cot |") < md.index("| llama1b_aug |")

    with open(tmp_path / "out" / "report.csv", newline="") as f:
        rows = {r["group"]: r for r in csv.DictReader(f)}
    k = rows["llama1b_aug"]
    assert (k["gsm8k/accuracy_mean"], k["gsm8k/accuracy_std"], k["gsm8k/n"]) == ("60.0000", "10.0000", "3")
    assert k["svamp/accuracy_std"] == f"{math.sqrt(12.5):.4f}" and k["gsm8k/forward_passes"] == "7.1000"
    assert rows["cot"]["svamp/accuracy_mean"] == "" and rows["cot"]["gsm8k/accuracy_std"] == ""
    assert k["seeds"] == "42 123 456"

    for name in ("accuracy_vs_passes.png", "training_curves.png"):
        p = res["paths"][name]
        w, h = png_size(p)
        assert w >= 400 and h >= 300 and p.stat().st_size > 10_000, (name, w, h, p.stat().st_size)
    # five loss terms + val/accuracy -> two rows of three panels; one dataset row of three panels
    assert png_size(res["paths"]["training_curves.png"])[1] > png_size(res["paths"]["accuracy_vs_passes.png"])[1]


def test_report_survives_missing_pieces(tmp_path):
    """Empty run dirs, unreadable meta, nonexistent paths: notes, a table of dashes, still two PNGs."""
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.yaml").write_text("method: codi\nrun:\n  seed: 7\ndata:\n  source: synthetic\n")
    broken = tmp_path / "broken"
    (broken / "eval" / "gsm8k").mkdir(parents=True)
    (broken / "meta.json").write_text("{")
    (broken / "eval" / "gsm8k" / "summary.json").write_text('{"dataset": "gsm8k"}')
    res = write_report([bare, broken, tmp_path / "nope"], tmp_path / "out")
    md = res["paths"]["report.md"].read_text()
    assert "| codi | codi | synthetic | 1 (1 unfinished) |" in md and "| unknown | unknown | ? | 1 |" in md
    assert "nope: not a directory" in md and "no numeric 'accuracy'" in md and "no usable meta.json" in md
    for name in ("accuracy_vs_passes.png", "training_curves.png"):
        png_size(res["paths"][name])


def test_cli_report(runs, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["report", *map(str, runs), "--output", str(out), "--group-by", "method"]) == 0
    text = capsys.readouterr().out
    assert "| kava | kava | whynlp/gsm8k-aug | 3 | 60.0 ± 10.0 (n=3) |" in text
    assert (out / "report.csv").exists() and (out / "training_curves.png").exists()


def test_cli_report_on_a_runs_folder(runs, tmp_path, capsys):
    """`kava report runs/ --output report/`: the folder's runs, the same report as listing them one by one."""
    assert main(["report", str(runs[0].parent), "--output", str(tmp_path / "folder")]) == 0
    assert main(["report", *map(str, runs), "--output", str(tmp_path / "listed")]) == 0
    capsys.readouterr()
    folder, listed = ((tmp_path / d / "report.csv").read_text() for d in ("folder", "listed"))
    assert folder == listed and "kava" in folder and "cot" in folder


def add_diagnostics(run_dir, ds, ablations, oracle, kv, shares):
    """Write latent diagnostics into a run as `kava eval --diagnostics` and `run.grad_share_every` do.
    kv: stat -> per-layer list; shares: step -> {term: share}."""
    p = run_dir / "eval" / ds / "summary.json"
    s = json.loads(p.read_text())
    s["ablations"] = ablations
    s["oracle"] = {"accuracy": oracle[0], "count": 40, "student_accuracy": oracle[1], "skipped": {"no CoT in the record": 2}}
    s["kv_match"] = {"key_space": "cache", "pairs": 100, "examples": 40, **kv,
                     "mean": {k: sum(v) / len(v) for k, v in kv.items()}}
    p.write_text(json.dumps(s))
    with open(run_dir / "metrics.jsonl", "a") as f:
        for step, sh in shares.items():
            f.write(json.dumps({"step": step, "split": "train", **{f"grad_share/{t}": v for t, v in sh.items()},
                                **{f"grad/{t}": 10 * v for t, v in sh.items()}}) + "\n")


def test_report_diagnostics_tables_and_plots(runs, tmp_path):
    kv1 = {"k_rel": [1.0, 0.5], "k_cos": [0.2, 0.4], "v_rel": [0.9, 0.8], "v_cos": [0.1, 0.3]}
    kv2 = {"k_rel": [0.8, 0.3], "k_cos": [0.4, 0.6], "v_rel": [0.7, 0.6], "v_cos": [0.3, 0.5]}
    add_diagnostics(runs[0], "gsm8k", {"none": 0.5, "zeros": 0.2, "placeholder": 0.3, "shuffle": 0.1}, (0.8, 0.55), kv1,
                    {50: {"ce_student": 0.7, "ce_teacher": 0.2, "codi": 0.06, "kv": 0.04},
                     100: {"ce_student": 0.6, "ce_teacher": 0.2, "codi": 0.1, "kv": 0.1}})
    add_diagnostics(runs[1], "gsm8k", {"none": 0.6, "zeros": 0.4, "placeholder": 0.3, "shuffle": 0.2}, (0.9, 0.65), kv2,
                    {50: {"ce_student": 0.5, "ce_teacher": 0.3, "codi": 0.1, "kv": 0.1}})
    rows = aggregate(runs)
    kava = rows[2]
    g = kava["datasets"]["gsm8k"]
    a = g["ablations"]
    assert list(a) == ["none", "zeros", "placeholder", "shuffle"]
    assert a["zeros"]["mean"] == pytest.approx(30.0) and a["zeros"]["std"] == pytest.approx(math.sqrt(200))
    assert a["zeros"]["n"] == 2 and a["placeholder"]["std"] == pytest.approx(0.0)
    assert g["oracle"]["mean"] == pytest.approx(85.0) and g["oracle_student"]["mean"] == pytest.approx(60.0)
    assert g["kv_match"]["k_rel"] == pytest.approx([0.9, 0.4]) and g["kv_match"]["v_cos"] == pytest.approx([0.2, 0.4])
    assert g["kv_match_mean"]["k_cos"]["mean"] == pytest.approx((0.3 + 0.5) / 2)
    assert "ablations" not in kava["datasets"]["svamp"] and "ablations" not in rows[1]["datasets"]["gsm8k"]
    shares = kava["grad_shares"]
    assert list(shares) == ["ce_student", "ce_teacher", "codi", "kv"]
    assert shares["kv"]["steps"] == [50, 100] and shares["kv"]["mean"] == pytest.approx([0.07, 0.1])
    assert shares["kv"]["n"] == [2, 1] and shares["kv"]["std"][1] is None
    assert rows[1]["grad_shares"] == {}  # cot: nothing logged

    res = write_report(runs, tmp_path / "out")
    md = res["paths"]["report.md"].read_text()
    assert ("| llama1b_aug | whynlp/gsm8k-aug | gsm8k | 55.0 ± 7.1 (n=2) | 30.0 ± 14.1 (n=2) | 30.0 ± 0.0 (n=2) "
            "| 15.0 ± 7.1 (n=2) | 85.0 ± 7.1 (n=2) | 60.0 ± 7.1 (n=2) |") in md
    assert "| llama1b_aug | gsm8k | 1 | 0.400 | 0.500 | 0.700 | 0.400 |" in md  # per-layer KV match, layer 1
    assert "| llama1b_aug | whynlp/gsm8k-aug | kv | 50 | 0.070 | 100 | 0.100 | 0.085 |" in md
    with open(res["paths"]["report.csv"], newline="") as f:
        row = {r["group"]: r for r in csv.DictReader(f)}["llama1b_aug"]
    assert row["gsm8k/ablation_zeros_mean"] == "30.0000" and row["gsm8k/oracle_mean"] == "85.0000"
    assert row["gsm8k/kv_k_rel_mean"] == f"{(0.75 + 0.55) / 2:.4f}" and "svamp/ablation_zeros_mean" not in row
    for name in ("kv_match.png", "grad_shares.png"):
        w, h = png_size(res["paths"][name])
        assert w >= 400 and h >= 300
    plain = write_report([runs[3]], tmp_path / "plain")  # a cot run: no diagnostics, no such plots
    assert "kv_match.png" not in plain["paths"] and not (tmp_path / "plain" / "grad_shares.png").exists()
    assert "Latent ablations" not in plain["paths"]["report.md"].read_text()


def test_plots_fixed_accuracy_axis_short_legends_outside_the_data_and_integer_steps(runs, tmp_path, monkeypatch):
    """accuracy_vs_passes.png: y from 0 to 100 in every panel, legends name the groups (no data path);
    kv_match.png: one legend outside every panel, nothing drawn outside the saved image; grad_shares.png:
    integer step ticks. The figures are checked as saved (Figure.savefig spied)."""
    from pathlib import Path

    from matplotlib.figure import Figure

    long = {"method": "codi", "preset": None, "train_data": "../shared/data/gsm8k-aug/train_no_aug.txt"}
    runs.append(make_run(runs[0].parent, "codi-s42", long, 42, {"gsm8k": (0.3, 0.3, 8.0)}))
    kv = {"k_rel": [1.0, 0.5], "k_cos": [0.2, 0.4], "v_rel": [0.9, 0.8], "v_cos": [0.1, 0.3]}
    add_diagnostics(runs[0], "gsm8k", {"none": 0.5, "zeros": 0.2}, (0.8, 0.55), kv,
                    {1: {"ce_student": 0.7, "kv": 0.3}, 2: {"ce_student": 0.6, "kv": 0.4}})
    figs = {}
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, p, *a, **k: (figs.__setitem__(Path(p).name, self),
                                                                    real(self, p, *a, **k))[1])
    res = write_report(runs, tmp_path / "out")
    acc = figs["accuracy_vs_passes.png"]
    panels = [ax for ax in acc.axes if ax.get_visible()]
    assert len(panels) == 3 and all(ax.get_ylim() == (0.0, 100.0) for ax in panels)
    labels = {t.get_text() for ax in panels if ax.get_legend() for t in ax.get_legend().get_texts()}
    assert labels == {"llama1b_aug (n=3)", "llama1b_aug (n=2)", "cot (n=1)", "codi (n=1)"}, labels

    kvf = figs["kv_match.png"]
    assert all(ax.get_legend() is None for ax in kvf.axes) and len(kvf.legends) == 1
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    r = FigureCanvasAgg(kvf).get_renderer()
    kvf.draw(r)  # the layout as saved
    box = kvf.legends[0].get_window_extent(r)
    assert not any(box.overlaps(ax.get_window_extent(r)) for ax in kvf.axes if ax.get_visible())
    assert [t.get_text() for t in kvf.legends[0].get_texts()] == ["llama1b_aug · gsm8k"]
    fig_box = kvf.bbox
    for ax in kvf.axes:  # titles and axis labels lie inside the figure
        for t in (ax.title, ax.xaxis.label, ax.yaxis.label):
            e = t.get_window_extent(r)
            assert e.x0 >= fig_box.x0 - 1 and e.x1 <= fig_box.x1 + 1 and e.y0 >= fig_box.y0 - 1 and e.y1 <= fig_box.y1 + 1
    w, h = png_size(res["paths"]["kv_match.png"])
    assert 600 <= w <= 1400 and 600 <= h <= 1400, (w, h)

    (gax,) = [ax for ax in figs["grad_shares.png"].axes if ax.get_visible()]
    lo, hi = gax.get_xlim()
    ticks = [t for t in gax.get_xticks() if lo <= t <= hi]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
