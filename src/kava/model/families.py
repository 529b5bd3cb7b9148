"""Model families kava is tested on, and the per-model facts the passes depend on.

`FAMILIES` maps a `model.from_scratch.family` name to its transformers `model_type`. Every name here has a
row in the test matrix (`tests/family_matrix.py`), which also generates `docs/families.md`; a test keeps the
two in step. A pretrained model of another family may still load: the build-time checks of
`kava.model.reasoner:LatentReasoner.check_backbone` refuse it if kava's passes would not reproduce it.
"""

from __future__ import annotations

FAMILIES: dict[str, str] = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3_moe",
    "mistral": "mistral",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "phi3": "phi3",
    "olmo2": "olmo2",
    "olmo3": "olmo3",
    "smollm3": "smollm3",
    "granite": "granite",
    "cohere": "cohere",
    "stablelm": "stablelm",
    "gpt2": "gpt2",
    "gpt_neox": "gpt_neox",
}


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def sliding_window(config) -> int | None:
    """The attention window of the model's sliding-window layers, or None if every layer sees all keys.

    A query at column i sees keys in columns (i - W, i] (HF's convention, for its mask and its cache)."""
    c = text_config(config)
    w = getattr(c, "sliding_window", None)
    if w is None or getattr(c, "use_sliding_window", True) is False:
        return None
    types = getattr(c, "layer_types", None)
    if types is not None and "sliding_attention" not in types:
        return None
    return int(w)


def mixture_of_experts(config) -> str | None:
    """Why the model's passes cannot be captured as CUDA graphs if it routes tokens to experts (data-dependent
    shapes), or None for a dense model. Training's and decoding's graphs both ask this."""
    tc = text_config(config)
    if any(getattr(tc, k, None) for k in ("num_experts", "num_local_experts", "n_routed_experts")):
        return f"a mixture-of-experts model ({tc.model_type}: token routing gives data-dependent shapes)"
    return None


class SlidingWindowTooShort(ValueError):
    """A sequence longer than the model's sliding window: kava refuses it (see docs/families.md)."""


def check_window(w: int | None, columns: int, what: str = "this batch") -> None:
    """Refuse `columns` > the sliding window `w` (`sliding_window(config)`; None: no window). kava keeps every
    column in its cache (so the latent blocks can be re-run and the CoT KV read) and lays batches out with
    padding inside sequences, so a window that binds would make the latent and answer blocks see other keys
    than the model would: refused, never run."""
    if w is not None and columns > w:
        raise SlidingWindowTooShort(
            f"{what} spans {columns} columns but the model's sliding_window is {w}: kava does not support a "
            "sliding window shorter than the sequence (its latent and answer blocks would attend differently "
            "than the model); lower data.max_question_tokens / max_cot_tokens / max_answer_tokens or "
            "latent.num_latents, or use a model whose window covers the sequence")
