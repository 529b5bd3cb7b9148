"""kava: latent reasoning via compressed KV-cache distillation (KaVa), with its baselines and evaluation."""

__version__ = "0.1.0"
