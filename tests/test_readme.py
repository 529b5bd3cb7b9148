"""Every command in the README has a test that runs it, or its tiny-scale twin.

The commands are read from README.md: each line of a ```bash block that runs kava (`kava ...`,
`... -m kava.cli ...`, `make demo`, `make test`), and each `kava ...` in inline code of the prose. `TWINS`
names, for every one of them, the test function that runs it. The checks:
- the README's commands and the table's keys are the same set: a command added to the README without a
  test, or a table row whose command left the README, fails here;
- the named test exists, and its source (decorators included) passes the command's subcommand and every one
  of its `--flags` as string literals, or the stated replacement (`replaced`, with the reason in `why`);
- every subcommand named in the README is a real `kava` subcommand.
Twins run at tiny scale: a CPU-sized config in place of a paper preset, local data in place of the hub.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import kava
from kava.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


@dataclass(frozen=True)
class Twin:
    test: str  # "tests/<file>.py::<function>" (a test, or the fixture that runs the command for its tests)
    replaced: dict[str, str] = field(default_factory=dict)  # README flag -> the twin's flag ("" = dropped)
    words: tuple[str, ...] = ()  # further text the function's source must contain
    why: str = ""  # why the twin differs from the README line


PRESET = "tiny_synth (CPU-sized, same code path) for the paper preset; tests/test_smollm2.py trains a pretrained LoRA model"
NO_HUB = "CI has no hub access: the same sets from a local --data-dir"
TWINS: dict[str, Twin] = {
    # ```bash blocks
    "make demo": Twin("tests/test_end_to_end.py::test_demo_end_to_end", words=('"demo"',),
                      why="`make demo` = `kava demo` in .venv; the twin runs it with fewer steps"),
    "make test": Twin("tests/test_readme.py::test_make_test_runs_this_suite"),
    "kava presets list": Twin("tests/test_packaging.py::test_wheel_in_a_fresh_venv_lists_the_presets"),
    "kava presets check": Twin("tests/test_config.py::test_presets_check_exits_zero"),
    "kava train --config llama1b_aug": Twin("tests/test_progress.py::test_cli_train_in_a_pipe_prints_progress_lines",
                                            why=PRESET),
    "kava train --config llama1b_aug --set method=pccot --set run.seed=123": Twin(
        "tests/test_end_to_end.py::test_three_seeds_train_eval_report", words=('"method=', 'run.seed='), why=PRESET),
    "kava train --resume runs/llama1b_aug-s42": Twin("tests/test_progress.py::test_resumed_run_says_where_it_resumes"),
    "kava train --resume runs/llama1b_aug-s42 --set optim.max_steps=8000": Twin(
        "tests/test_train.py::test_resume_of_a_finished_run_does_nothing_and_max_steps_extends_it", why=PRESET),
    "kava eval --checkpoint runs/llama1b_aug-s42 --datasets gsm8k,gsm8k-hard,svamp --hub": Twin(
        "tests/test_evaluate.py::test_eval_on_the_three_paper_sets_from_a_local_data_dir",
        replaced={"--hub": "--data-dir"}, words=('"gsm8k,gsm8k-hard,svamp"',), why=NO_HUB),
    "kava eval --checkpoint runs/llama1b_aug-s42 --datasets gsm8k --hub --diagnostics": Twin(
        "tests/test_end_to_end.py::test_three_seeds_train_eval_report", replaced={"--hub": "--data-dir"},
        why="the synthetic test split of three tiny kava runs; " + NO_HUB),
    "kava eval --checkpoint runs/llama1b_aug-s42/checkpoints/step_400 --datasets gsm8k --hub": Twin(
        "tests/test_evaluate.py::test_eval_takes_an_intermediate_checkpoint_and_prints_progress_without_a_tty",
        replaced={"--hub": ""}, why="the synthetic test split of a tiny run; " + NO_HUB),
    "kava eval --model-args pretrained=meta-llama/Llama-3.2-1B-Instruct --mode nocot --datasets gsm8k --hub": Twin(
        "tests/test_evaluate.py::test_eval_takes_a_plain_model_and_a_peft_adapter_in_cot_and_nocot_mode",
        replaced={"--hub": ""}, why="a tiny local model directory for the hub model, a local JSONL file; " + NO_HUB),
    "kava eval --checkpoint my-adapter/ --mode cot --datasets my_test.jsonl": Twin(
        "tests/test_evaluate.py::test_eval_takes_a_plain_model_and_a_peft_adapter_in_cot_and_nocot_mode"),
    "kava report runs/ --output report/": Twin("tests/test_report.py::test_cli_report_on_a_runs_folder"),
    "kava ask --checkpoint runs/llama1b_aug-s42 --question ... --show-latents": Twin(
        "tests/test_ask_inspect.py::test_ask_show_latents"),
    "kava inspect --checkpoint runs/llama1b_aug-s42 --question ... --cot <<2*3=6>> --answer 6": Twin(
        "tests/test_ask_inspect.py::test_inspect_writes_png"),
    "kava score --predictions preds.jsonl --dataset gsm8k --data-dir ../shared/data": Twin(
        "tests/test_scoring.py::test_cli_score", why="svamp in place of gsm8k: same reader and scorer"),
    "kava export runs/llama1b_aug-s42 --output llama1b-kava-hf": Twin("tests/test_export.py::runs"),
    "kava export runs/llama1b_aug-s42 --output llama1b-kava-hf --dtype bf16 --push-to-hub me/llama1b-kava": Twin(
        "tests/test_export.py::test_export_writes_a_model_card_drops_the_chat_template_casts_and_pushes",
        why="huggingface_hub's upload is mocked at its API boundary (CI has no hub)"),
    "accelerate launch --num_processes 4 -m kava.cli train --config llama1b_aug": Twin(
        "tests/test_readme.py::test_accelerate_launch_runs_kava_train_and_eval", words=('"train"',), why=PRESET),
    "torchrun --nproc_per_node 4 -m kava.cli train --config llama1b_aug": Twin(
        "tests/test_end_to_end.py::test_pause_tokens_train_under_two_process_ddp",
        words=('"torch.distributed.run"', '"--nproc_per_node", "2"'),
        why="`python -m torch.distributed.run` is torchrun; 2 CPU processes; " + PRESET),
    "accelerate launch --num_processes 4 -m kava.cli eval --checkpoint RUN --datasets gsm8k": Twin(
        "tests/test_readme.py::test_accelerate_launch_runs_kava_train_and_eval",
        why="the synthetic test split; sharding over processes is checked under torchrun "
            "(tests/test_end_to_end.py::test_sharded_eval_over_two_processes_equals_one)"),
    "kava sweep --configs llama1b_aug,llama1b_aug_nl,llama3b_aug,llama3b_aug_nl,qwen05b_aug,qwen05b_aug_nl --seeds "
    "42,123,456 --eval-datasets gsm8k,gsm8k-hard,svamp --hub --slurm --partition gpu --gpus-per-node 4 --nodes 1 "
    "--time 24:00:00 --script-dir slurm/": Twin(
        "tests/test_sweep.py::test_slurm_single_node",
        why="two presets, one seed; it runs the job scripts with stand-ins for torchrun, srun and python "
            "(tests/test_sweep.py::test_readme_sweep_runs_end_to_end runs one for real on a tiny config)"),
    # inline code in the prose
    "kava --debug COMMAND ...": Twin("tests/test_cli.py::test_a_real_process_exits_2_without_traceback_unless_debug"),
    "kava --version": Twin("tests/test_cli.py::test_version"),
    "kava ask": Twin("tests/test_ask_inspect.py::test_ask_prints_answer_and_pass_count"),
    "kava data SOURCE": Twin("tests/test_cli.py::test_data_shows_counts_one_formatted_pair_and_the_skipped_records"),
    "kava demo": Twin("tests/test_end_to_end.py::test_demo_end_to_end"),
    "kava eval": Twin("tests/test_evaluate.py::test_eval_finds_the_runs_own_synthetic_data_and_limit_writes_beside_the_full_eval"),
    "kava export RUN --output DIR": Twin("tests/test_export.py::runs"),
    "kava report": Twin("tests/test_report.py::test_cli_report"),
    "kava inspect": Twin("tests/test_ask_inspect.py::test_inspect_writes_png", words=('"--centered"',)),
    "kava score": Twin("tests/test_scoring.py::test_cli_score_scores_a_subset_and_says_which"),
    "kava sweep": Twin("tests/test_sweep.py::test_invalid_value_fails_whole_sweep_before_running"),
    "kava train": Twin("tests/test_progress.py::test_cli_train_in_a_pipe_prints_progress_lines"),
    "kava train --config smollm2_gsm8k": Twin("tests/test_smollm2.py::runs", words=('"smollm2_gsm8k"',)),
    "kava train --resume": Twin("tests/test_progress.py::test_resumed_run_says_where_it_resumes"),
    "kava train --resume RUN": Twin(
        "tests/test_train.py::test_a_signal_saves_a_checkpoint_at_the_next_step_and_prints_the_resume_command"),
    "kava train ... --dry-run": Twin("tests/test_cli.py::test_train_dry_run_prints_config_and_plan_and_trains_nothing"),
}


# ------------------------------------------------------------------------------------------------ parsing
def _runs_kava(tokens: list[str]) -> bool:
    if tokens[:1] == ["kava"] or tokens[:2] in (["make", "demo"], ["make", "test"]):
        return True
    return any(a == "-m" and b == "kava.cli" for a, b in zip(tokens, tokens[1:]))


def readme_commands(text: str) -> list[str]:
    """The kava commands of README `text`, each normalised to its shell words joined by one space."""
    cmds = []
    for block in re.findall(r"```(?:bash|sh|shell|console)\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n", " ", block).splitlines():
            words = shlex.split(line, comments=True)
            parts, cur = [], []
            for w in words:  # `kava sweep ... && bash slurm/submit_all.sh`: two commands
                if w == "&&":
                    parts.append(cur)
                    cur = []
                else:
                    cur.append(w)
            parts.append(cur)
            cmds += [" ".join(p) for p in parts if p and _runs_kava(p)]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    cmds += [" ".join(shlex.split(m)) for m in re.findall(r"`(kava [^`]+)`", prose)]  # not `kava` the package
    return list(dict.fromkeys(cmds))


def subcommand(cmd: str) -> list[str]:
    """The kava subcommand words of a command (`presets check` is two), [] for `kava --version` etc."""
    tokens = cmd.split()
    if tokens[:2] == ["make", "demo"]:
        return ["demo"]
    start = tokens.index("kava.cli") + 1 if "kava.cli" in tokens else 1
    rest = [t for t in tokens[start:] if not t.startswith("-")]
    if tokens[:2] == ["make", "test"] or not rest or rest[0] not in COMMANDS:
        return []
    return rest[:2] if rest[0] == "presets" else rest[:1]


def kava_flags(cmd: str) -> list[str]:
    """The `--flags` passed to kava (a launcher's own flags, before `-m kava.cli`, are not kava's)."""
    tokens = cmd.split()
    start = tokens.index("kava.cli") + 1 if "kava.cli" in tokens else 0
    return [t for t in tokens[start:] if t.startswith("--")]


def function_source(ref: str) -> str:
    path, name = ref.split("::")
    src = (ROOT / path).read_text()
    for node in ast.parse(src).body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            first = min([d.lineno for d in node.decorator_list] + [node.lineno])
            return "\n".join(src.splitlines()[first - 1:node.end_lineno])
    raise AssertionError(f"{ref}: no such function")


def quoted(word: str, src: str) -> bool:
    return re.search(rf"""["']{re.escape(word)}["']""", src) is not None


# ------------------------------------------------------------------------------------------------ tests
def test_the_parser_finds_commands_in_blocks_prose_and_after_launchers():
    text = ("Run `kava demo` or `kava`.\n```bash\nkava a --x 1   # note `kava fake`\nkava b \\\n   --y \"two words\"\n"
            "pip install kava && kava c\ntorchrun --nproc_per_node 2 -m kava.cli d --z\nmake test\necho kava\n```\n"
            "```\nkava       kava    latent   (an output table)\n```\n")
    assert readme_commands(text) == ["kava a --x 1", "kava b --y two words", "kava c",
                                     "torchrun --nproc_per_node 2 -m kava.cli d --z", "make test", "kava demo"]
    assert subcommand("kava presets check") == ["presets", "check"] and subcommand("kava --debug COMMAND ...") == []
    assert subcommand("accelerate launch --num_processes 4 -m kava.cli eval --checkpoint RUN") == ["eval"]
    assert kava_flags("accelerate launch --num_processes 4 -m kava.cli eval --checkpoint RUN") == ["--checkpoint"]


def test_every_readme_command_has_a_twin_and_every_twin_a_readme_command():
    cmds = readme_commands(README.read_text())
    assert len(cmds) >= 20
    missing = [c for c in cmds if c not in TWINS]
    stale = [c for c in TWINS if c not in cmds]
    assert not missing, f"README commands without a test (add the test and a TWINS row): {missing}"
    assert not stale, f"TWINS rows whose command is no longer in the README: {stale}"


@pytest.mark.parametrize("cmd", list(TWINS))
def test_the_twin_runs_the_command_with_its_flags(cmd):
    twin = TWINS[cmd]
    src = function_source(twin.test)
    for w in subcommand(cmd):
        assert quoted(w, src), f"{twin.test} does not run `{' '.join(subcommand(cmd))}` ({w!r} missing)"
    for flag in kava_flags(cmd):
        want = twin.replaced.get(flag, flag)
        if want:
            assert quoted(want, src), f"{twin.test} does not pass {want!r} (README: {cmd})"
    for w in twin.words:
        assert w in src, f"{twin.test}: {w!r} missing"
    assert not twin.replaced or twin.why, f"{cmd}: say why the twin replaces {twin.replaced}"


def test_every_readme_subcommand_exists():
    named = {w for c in readme_commands(README.read_text()) for w in subcommand(c)[:1]}
    assert named <= set(COMMANDS) and {"train", "eval", "report", "ask", "inspect", "score", "export", "sweep",
                                       "presets", "data", "demo"} <= named


def test_make_test_runs_this_suite():
    """`make test` is what CI runs (.ci/run runs exactly it): fetch the real test model, then pytest over tests/
    in the venv that `make setup` builds, with the SmolLM2 tests required (a failed fetch fails, never skips)."""
    make = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^test: setup\n((?:\t.+\n)+)", make, re.M)
    assert recipe, "Makefile has no `test: setup` recipe"
    lines = [line.strip().split() for line in recipe.group(1).splitlines()]
    assert lines == [["$(BIN)/python", "tests/smollm2.py"],
                     ["KAVA_REQUIRE_SMOLLM2=1", "$(BIN)/python", "-m", "pytest", "tests"]]
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == "make test" and all(not line.startswith(("pytest", "python", ".venv")) for line in ci)


def test_accelerate_launch_runs_kava_train_and_eval(tmp_path):
    """`accelerate launch ... -m kava.cli train` and `... eval`, as written (accelerate's launcher, module mode).
    On a CPU-only machine accelerate starts one process whatever --num_processes says; DDP and sharded
    evaluation over processes are checked under torchrun (tests/test_end_to_end.py)."""
    from test_sweep import TINY

    env = {**os.environ, "PYTHONPATH": str(Path(kava.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "kava.cli"]
    sets = [x for s in TINY + [f"run.output_dir={tmp_path}", "optim.max_steps=2", "run.eval_every=2",
                               "run.eval_max_cot_tokens=8", "run.eval_max_new_tokens=3"] for x in ("--set", s)]
    r = subprocess.run(launch + ["train", "--config", "tiny_synth", "--no-progress", *sets], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "tiny_synth-s42"
    assert (run / "DONE").exists() and f"run directory: {run}" in r.stdout
    r = subprocess.run(launch + ["eval", "--checkpoint", str(run), "--datasets", "synth-test", "--limit", "3"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "eval" / "synth-test-limit3" / "summary.json").exists() and "synth-test: accuracy" in r.stdout
    assert "FutureWarning" not in r.stderr + r.stdout
