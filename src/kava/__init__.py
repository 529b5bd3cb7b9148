"""kava: latent reasoning via compressed KV-cache distillation (KaVa), with its baselines and evaluation.

`kava.load(RUN_OR_EXPORT_DIR)` returns a model whose `generate(questions, mode=...)` answers as `kava eval`
does (see `kava.api`).
"""

__version__ = "0.1.0"


def load(path, **kw):
    """`kava.api.load`: a trained run, checkpoint or exported directory, ready to `generate`."""
    from kava.api import load as _load

    return _load(path, **kw)
