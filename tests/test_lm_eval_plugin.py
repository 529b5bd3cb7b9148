"""`--model kava` in lm-evaluation-harness (`kava.lm_eval_plugin`), run through lm-eval's own command line
(`python -m kava.lm_eval_plugin`) on a local task (a JSONL file: lm-eval downloads nothing here).

The reference is `kava eval` on the same questions: lm-eval's accuracy must equal it, under kava's extraction
(the `kava_answer` filter) and under lm-eval's own regex filter. The run is a tiny kava model trained 200 steps at a
high learning rate, so that it writes numbers (after 3 steps it writes blanks); on synthetic questions it says 1,
and a few odd questions get other answers, so that the answers depend on the question.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval")

import kava  # noqa: E402
from kava.cli import main  # noqa: E402
from kava.config import load_config  # noqa: E402
from kava.lm_eval_plugin import KavaLM, continuation  # noqa: E402

from test_sweep import TINY  # noqa: E402

ODD = ["How many?", "balloons balloons balloons", "The answer is: 5", "17", "xxxxxxxx", "Ben has 18 stamps."]
TASK = """task: kava_q
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n\\n", "Question:"]
  do_sample: false
filter_list:
  - name: kava
    filter:
      - function: kava_answer
      - function: take_first
  - name: regex
    filter:
      - function: regex
        regex_pattern: "The answer is: (-?[0-9]+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from kava.train import train

    out = tmp_path_factory.mktemp("lm_eval")
    return train(load_config("tiny_synth", TINY + ["method=kava", f"run.output_dir={out}", "run.name=kava",
                                                   "optim.max_steps=200", "optim.lr=1e-2", "run.eval_every=200"]),
                 progress=False)


def test_lm_eval_scores_a_kava_model_in_latent_mode_as_kava_eval_does(run, tmp_path, capsys):
    synth = next((run.parent / "_data").iterdir()) / "test.jsonl"
    questions = [json.loads(x)["question"] for x in synth.read_text().splitlines()][:6] + ODD
    answers = [a.answer for a in kava.load(run).generate(questions, mode="latent")]
    assert len(set(answers)) >= 3, answers  # answers that depend on the question, or the match proves little
    # every other gold is the model's own answer: an accuracy strictly between 0 and 1
    golds = [a if i % 2 == 0 and a is not None else str(100 + i) for i, a in enumerate(answers)]
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": g}) + "\n" for q, g in zip(questions, golds)))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "kava_q.yaml").write_text(TASK.format(data=data))
    r = subprocess.run([sys.executable, "-m", "kava.lm_eval_plugin", "--model", "kava", "--model_args",
                        f"pretrained={run},mode=latent", "--tasks", "kava_q", "--include_path", str(tmp_path / "tasks"),
                        "--batch_size", "5", "--output_path", str(tmp_path / "lm"), "--log_samples"],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                            "HF_DATASETS_CACHE": str(tmp_path / "hf")})
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(next((tmp_path / "lm").rglob("results_*.json")).read_text())["results"]["kava_q"]
    samples = [json.loads(x) for x in next((tmp_path / "lm").rglob("samples_kava_q_*.jsonl")).read_text().splitlines()]

    assert main(["eval", "--checkpoint", str(run), "--datasets", str(data), "--mode", "latent", "--output",
                 str(tmp_path / "kava")]) == 0
    summary = json.loads((tmp_path / "kava" / "q" / "summary.json").read_text())
    preds = [json.loads(x) for x in (tmp_path / "kava" / "q" / "predictions.jsonl").read_text().splitlines()]
    assert 0 < summary["accuracy"] < 1 and summary["count"] == len(questions)
    assert results["exact_match,kava"] == results["exact_match,regex"] == summary["accuracy"]
    for name in ("kava", "regex"):  # question by question: the same answer
        got = {s["doc_id"]: s["filtered_resps"][0] for s in samples if s["filter"] == name}
        assert got == {p["index"]: p["extracted"] or "[invalid]" for p in preds}
    capsys.readouterr()


def test_plain_lm_eval_runs_the_kava_model_when_the_task_yaml_names_kava_s_filter(run, tmp_path):
    """`lm_eval --model kava` itself, no wrapper: lm-eval imports a task file's `!function` references before it
    asks its registry for the model, so a task YAML given by path whose filter is
    `!function kava.lm_eval_plugin.KavaAnswer` registers the kava model on the way. Same accuracy as `kava eval`."""
    synth = next((run.parent / "_data").iterdir()) / "test.jsonl"
    questions = [json.loads(x)["question"] for x in synth.read_text().splitlines()][:6] + ODD
    answers = [a.answer for a in kava.load(run).generate(questions, mode="latent")]
    golds = [a if i % 2 == 0 and a is not None else str(100 + i) for i, a in enumerate(answers)]
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": g}) + "\n" for q, g in zip(questions, golds)))
    task = TASK.format(data=data).replace("      - function: kava_answer",
                                          "      - function: !function kava.lm_eval_plugin.KavaAnswer")
    (tmp_path / "kava_q.yaml").write_text(task)
    lm_eval = os.path.join(os.path.dirname(sys.executable), "lm_eval")
    r = subprocess.run([lm_eval, "--model", "kava", "--model_args", f"pretrained={run},mode=latent",
                        "--tasks", str(tmp_path / "kava_q.yaml"), "--batch_size", "5",
                        "--output_path", str(tmp_path / "lm")],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                            "HF_DATASETS_CACHE": str(tmp_path / "hf")})
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(next((tmp_path / "lm").rglob("results_*.json")).read_text())["results"]["kava_q"]
    assert main(["eval", "--checkpoint", str(run), "--datasets", str(data), "--mode", "latent", "--output",
                 str(tmp_path / "kava")]) == 0
    summary = json.loads((tmp_path / "kava" / "q" / "summary.json").read_text())
    assert 0 < summary["accuracy"] < 1
    assert results["exact_match,kava"] == results["exact_match,regex"] == summary["accuracy"]


def test_continuation_leads_with_the_fed_prompt_and_stops_at_the_task_s_stop_sequences():
    assert continuation(" 42", "latent", "The answer is:", []) == " The answer is: 42"
    assert continuation(" 42", "nocot", " The answer is: ", []) == " The answer is: 42"
    assert continuation(" <<2*3=6>> The answer is: 6", "cot", "The answer is:", [""]) == " <<2*3=6>> The answer is: 6"
    assert continuation(" 12\n\nQuestion: next", "latent", "The answer is:", ["Question:", "\n\n"]) == " The answer is: 12"


def test_the_kava_model_refuses_log_likelihoods_sampling_and_unknown_arguments(run):
    from lm_eval.api.instance import Instance

    lm = KavaLM(pretrained=str(run), mode="latent", device="cuda:0")  # lm-eval's default device, here without a GPU
    with pytest.raises(NotImplementedError, match="scores no log-likelihoods: in latent mode the answer follows latents"):
        lm.loglikelihood([])
    with pytest.raises(NotImplementedError, match="hf --model_args pretrained=EXPORT_DIR"):
        KavaLM(pretrained=str(run), mode="cot").loglikelihood_rolling([])
    req = Instance("generate_until", {}, ("Tom has 3 apples .", {"until": [], "do_sample": True}), 0, ("t", 0, 1))
    with pytest.raises(ValueError, match="task t asks do_sample=True: kava decodes greedily"):
        lm.generate_until([req])
    with pytest.raises(ValueError, match="--model_args dtype: the kava model takes pretrained=, mode= and max_new_tokens="):
        KavaLM(pretrained=str(run), dtype="bfloat16")
    with pytest.raises(ValueError, match="mode 'sideways'"):
        KavaLM(pretrained=str(run), mode="sideways")
