"""The family matrix: which tiny model of each family runs which check (tests/test_families.py), and the
support table docs/families.md generated from it (tests/test_families.py::test_support_table_is_generated
keeps the committed file equal to `support_table()`)."""

from __future__ import annotations

from dataclasses import dataclass

from tiny import SPECS


@dataclass(frozen=True)
class Row:
    name: str  # a key of tiny.SPECS
    attn: str  # what model.attn_implementation: auto installs
    cli: bool = False  # a short `kava train` + `kava eval` through the CLI
    pre_rope: str = "verified"  # "verified" | "identity" (no RoPE: keys as cached) | "refused"
    refused: str = ""  # non-empty: the model is refused (the reason shown in the table)
    note: str = ""

    @property
    def family(self) -> str:
        return SPECS[self.name]["family"]


MATRIX = [
    Row("llama", "kava_sdpa", cli=True),
    Row("qwen2", "kava_sdpa", cli=True),
    Row("qwen3", "kava_sdpa", cli=True, note="q/k norms before RoPE"),
    Row("qwen3_moe", "kava_sdpa", cli=True, note="mixture of experts (4 experts, top 2)"),
    Row("mistral", "kava_sdpa", cli=True, note="no sliding window"),
    Row("mistral_window", "kava_sdpa", refused="sliding_window (6) shorter than the sequence: refused when the "
        "model is built and before any pass",
        note="a window that covers the sequence runs (tested at window = student columns)"),
    Row("gemma2", "kava_eager", cli=True, note="attention softcapping (needs eager), final logit softcapping, "
        "sqrt(d) embedding scale, sliding/global layers (window covers the sequence)"),
    Row("gemma3", "kava_sdpa", cli=True, note="local/global RoPE per layer type, final softcapping, sqrt(d) "
        "embedding scale, sliding layers (window covers the sequence)"),
    Row("phi3", "kava_sdpa", cli=True, note="partial rotary (partial_rotary_factor 0.5)"),
    Row("olmo2", "kava_sdpa", cli=True, note="k norm over all heads before RoPE"),
    Row("olmo3", "kava_sdpa", note="per-layer-type RoPE, sliding layers (window covers the sequence)"),
    Row("smollm3", "kava_sdpa", note="layers without RoPE (no_rope_layers)"),
    Row("granite", "kava_sdpa", note="logits_scaling 8, embedding_multiplier 12"),
    Row("cohere", "kava_sdpa", note="interleaved RoPE, logit_scale"),
    Row("stablelm", "kava_sdpa", note="partial rotary (0.25) applied outside apply_rotary_pos_emb"),
    Row("gpt2", "kava_sdpa", cli=True, pre_rope="identity", note="absolute positions"),
    Row("gpt_neox", "kava_sdpa", cli=True, note="partial rotary (rotary_pct 0.5), no GQA"),
]
RUNS = [r for r in MATRIX if not r.refused]
BY_NAME = {r.name: r for r in MATRIX}

CHECKS = [
    ("fast path", "`student_forward` == `student_forward_naive` at T = 0, 1, 3"),
    ("importance", "captured importance == HF eager attention (`softmax` cot and prefix), under `auto` and `eager`"),
    ("batched", "a padded batch of 4 == each example alone (teacher and student)"),
    ("logits", "training logits == the model's own `forward` logits (final scaling / softcapping)"),
    ("embed scale", "special-token rows start at the mean and scale of the model's own input embeddings"),
    ("pre_rope", "`pre_rope` keys == keys captured at the model's `apply_rotary_pos_emb` (identity without RoPE)"),
    ("train+eval", "`kava train` (6 steps, method kava) + `kava eval` through the CLI"),
]


def support_table() -> str:
    """docs/families.md, generated from MATRIX."""
    lines = [
        "# Model families",
        "",
        "<!-- generated from tests/family_matrix.py by tests/test_families.py::test_support_table_is_generated;",
        "     do not edit by hand: change the matrix, then run `python tests/family_matrix.py > docs/families.md` -->",
        "",
        "Every family below is a tiny random model (2 layers, hidden 32; `tests/tiny.py:SPECS`) run through the",
        "checks of `tests/test_families.py` in CI. `model.from_scratch.family` accepts each name in the first",
        "column. A pretrained model of another family may still work: when a model is built, kava checks that its",
        "own path reproduces the model's logits, that a sliding window covers the longest configured sequence,",
        "and (with `loss.kv_key_space: pre_rope`) that its keys un-rotate to position-independent keys; it refuses",
        "the model with the reason otherwise ([config.md](config.md#cross-field-checks)).",
        "",
        "Checks:",
        "",
    ]
    lines += [f"- **{name}**: {what}" for name, what in CHECKS]
    lines += ["", "| family | test model | attention (`auto`) | " + " | ".join(n for n, _ in CHECKS) + " | notes |",
              "|---" * (len(CHECKS) + 4) + "|"]
    for r in MATRIX:
        if r.refused:
            cells = ["refused"] * (len(CHECKS))
        else:
            cells = ["yes"] * 5 + [{"verified": "yes", "identity": "identity"}.get(r.pre_rope, "refused"),
                                   "yes" if r.cli else "–"]
        note = "; ".join(x for x in (r.refused, r.note) if x)
        lines.append(f"| `{r.family}` | `{r.name}` | `{r.attn}` | " + " | ".join(cells) + f" | {note} |")
    lines += [
        "",
        "Attention: `model.attn_implementation: auto` installs `kava_sdpa` where HF runs the model under SDPA and it",
        "has no attention softcapping, else `kava_eager` (the model's own eager attention function); `sdpa` on a",
        "softcapping model and `flash_attention_2` are refused with the reason. Sliding windows: kava keeps every",
        "column in its caches and refuses a sequence longer than the window (when the model is built, from",
        "`data.max_*_tokens`, `latent.num_latents` and the answer prompt; and before any pass), so a window never",
        "binds and nothing runs silently wrong.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(support_table(), end="")
