"""`python -m kava.lm_eval_plugin ...`: lm-eval's command line (the same flags) with the kava model registered."""

import kava.lm_eval_plugin  # noqa: F401  (registers --model kava and the kava_answer filter)

if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
