"""The run directory has one owner, `kava.checkpoint.rundir`: no other library module spells a run directory's
file names (the source is read with `ast`; tests may spell them), and its helpers read what the hand-written
code read."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

import kava
from kava.checkpoint import rundir
from kava.checkpoint.rundir import RunDir, own_tokenizer, read_state, run_dir_of, step_of

SRC = Path(kava.__file__).resolve().parent
OWNER = SRC / "checkpoint" / "rundir.py"

# names no other module may hold as a string constant
NAMES = ("config.yaml", "state.json", "DONE", "tokenizer_src", "skips.json", "metrics.jsonl", "checkpoints",
         "wandb.json", "train.lock")
# names other files share, or common words: refused where they name a path (`x / "best"`)
JOINED = ("meta.json", "best", "final", "eval", "tb")
# a synthetic data set's own meta.json (kava.data); a saved model's is `kava.checkpoint.saved.META_FILE`
ELSEWHERE = {("meta.json", "data")}


def literals(tree: ast.AST, rel: str) -> list[tuple[int, str]]:
    """(line, name) of every run-dir file name that module `rel` (`tree`) spells (NAMES, JOINED, ELSEWHERE)."""
    joined = {id(n.right) for n in ast.walk(tree) if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Div)}
    return sorted((n.lineno, n.value) for n in ast.walk(tree) if isinstance(n, ast.Constant)
                  and (n.value in NAMES or n.value in JOINED and id(n) in joined
                       and (n.value, rel.split("/")[0]) not in ELSEWHERE))


def test_no_run_dir_file_name_outside_its_owner():
    found = []
    for p in sorted(SRC.rglob("*.py")):
        if p == OWNER:
            continue
        rel = str(p.relative_to(SRC))
        found += [f"{rel}:{line}: {name!r}" for line, name in literals(ast.parse(p.read_text()), rel)]
    assert found == [], "run-dir file names spelled outside kava.checkpoint.rundir (use RunDir):\n" + "\n".join(found)


def test_the_check_is_not_vacuous():
    code = ('import json\n'
            'def f(run_dir, ck):\n'
            '    s = json.loads((ck / "state.json").read_text())\n'
            '    return run_dir / "best", (run_dir / "DONE").exists(), {"best": 1}, "eval"\n')
    assert literals(ast.parse(code), "x.py") == [(3, "state.json"), (4, "DONE"), (4, "best")]
    assert literals(ast.parse('out / "meta.json"'), "data/synthetic.py") == []
    assert literals(ast.parse('out / "meta.json"'), "train.py") == [(1, "meta.json")]
    assert literals(ast.parse('META_FILE = "meta.json"'), "checkpoint/saved.py") == []
    assert (OWNER.read_text().count('"state.json"'), OWNER.read_text().count('"config.yaml"')) == (1, 1)


def test_run_dir_paths_are_the_documented_layout(tmp_path):
    rd = RunDir(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in (
        rd.config, rd.meta, rd.skips, rd.metrics, rd.done, rd.tokenizer_src, rd.checkpoints, rd.best, rd.final,
        rd.eval, rd.tb, rd.wandb, rd.lock, rd.step(7))] == [
        "config.yaml", "meta.json", "skips.json", "metrics.jsonl", "DONE", "tokenizer_src", "checkpoints", "best",
        "final", "eval", "tb", "wandb.json", "train.lock", "checkpoints/step_7"]
    assert rundir.LOCK_FILE == "train.lock"


def test_reads_and_latest_checkpoint(tmp_path):
    rd = RunDir(tmp_path)
    assert not rd.started() and not rd.finished() and rd.read_done() is None and rd.read_meta() == {}
    assert rd.latest_checkpoint() is None and rd.step_dirs() == []
    for n in (2, 10):
        rd.step(n).mkdir(parents=True)
        (rd.step(n) / "state.json").write_text(json.dumps({"step": n, "tokenizer": None}))
    rd.step(11).mkdir()  # no state.json: being written
    (rd.checkpoints / "step_12.tmp").mkdir()  # an atomic write's temporary
    (rd.checkpoints / "other").mkdir()
    assert rd.latest_checkpoint() == rd.step(10)  # by step, not by name (step_10 sorts before step_2)
    assert rd.step_dirs() == [rd.step(2), rd.step(10), rd.step(11)]
    assert read_state(rd.step(10)) == {"step": 10, "tokenizer": None}
    assert [step_of(p) for p in ("a/step_3", "step_12.tmp", "best", "step_")] == [3, None, None, None]
    rd.config.write_text("method: cot\n")
    rd.done.write_text(json.dumps({"steps": 10}))
    rd.meta.write_text(json.dumps({"method": "cot"}))
    assert rd.started() and rd.finished() and rd.read_done() == {"steps": 10} and rd.read_meta() == {"method": "cot"}
    assert run_dir_of(rd.step(10)) == tmp_path and run_dir_of(rd.best) == tmp_path
    assert run_dir_of(tmp_path / "elsewhere" / "best") == tmp_path / "elsewhere" / "best"  # stands alone


@pytest.mark.parametrize("from_scratch, tokenizer, init_from, own", [
    ({"hidden_size": 8}, None, None, True),
    ({"hidden_size": 8}, "some/tokenizer", None, False),
    ({"hidden_size": 8}, None, "runs/a", False),
    (None, None, None, False),
])
def test_own_tokenizer_is_the_rule_train_and_load_used(from_scratch, tokenizer, init_from, own, tmp_path):
    cfg = SimpleNamespace(model=SimpleNamespace(from_scratch=from_scratch, tokenizer=tokenizer, init_from=init_from))
    m = cfg.model
    assert own_tokenizer(cfg) == own == (m.from_scratch is not None and not m.tokenizer and not m.init_from)
    assert RunDir(tmp_path).tokenizer_dir(cfg) == (str(tmp_path / "tokenizer_src") if own else None)


def test_extend_rewrites_config_drops_done_and_records_it(tmp_path):
    rd = RunDir(tmp_path)
    rd.done.write_text("{}")
    rd.meta.write_text(json.dumps({"method": "cot"}))
    cfg = SimpleNamespace(optim=SimpleNamespace(max_steps=9), to_yaml=lambda: "optim:\n  max_steps: 9\n")
    rd.extend(cfg, before=5, at=5)
    assert rd.config.read_text() == "optim:\n  max_steps: 9\n" and not rd.done.exists() and not rd.lock.exists()
    assert rd.read_meta()["extended"] == [{"from_steps": 5, "to_steps": 9, "at_step": 5}]


def test_check_tokenizer_refuses_a_changed_tokenizer(tmp_path, monkeypatch):
    from kava.checkpoint import state
    from kava.checkpoint.saved import CheckpointError

    monkeypatch.setattr(state, "tokenizer_identity", lambda tok: tok)
    (tmp_path / "state.json").write_text(json.dumps({"tokenizer": {"size": 5}}))
    state.check_tokenizer(tmp_path, {"size": 5})
    with pytest.raises(CheckpointError, match=r"the tokenizer changed since the checkpoint was written \(checkpoint "
                                              r"\{'size': 5\}, now \{'size': 6\}\); why$"):
        state.check_tokenizer(tmp_path, {"size": 6}, "; why")
    (tmp_path / "state.json").write_text(json.dumps({}))  # older checkpoints recorded none
    state.check_tokenizer(tmp_path, {"size": 6})
