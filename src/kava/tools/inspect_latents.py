"""Looking inside the latents: nearest vocabulary tokens, and latent-KV vs teacher-CoT-KV similarity.

Why: KaVa claims the student's M latent slots take over the role of the teacher's compressed CoT cache.
Two cheap views test that on one question: which tokens each latent embedding resembles (through the LM
head), and per layer how similar each latent slot's keys/values are to every CoT token's keys/values,
next to which CoT tokens eviction kept as the slots' targets.

Shapes: L layers, Hkv KV heads, D head dim, M latent slots, C CoT tokens, d hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from kava.data.format import Formatter
from kava.decode import latent_pass
from kava.eviction import NEEDS_IMPORTANCE
from kava.data.records import Record
from kava.objective import kv_target_batch, teacher_kv_targets


@torch.no_grad()
def nearest_tokens(model, tokenizer, latents: torch.Tensor, k: int = 5) -> list[list[tuple[str, float]]]:
    """Top-k tokens of each latent decoded through the LM head: latents [M, d] -> M lists of (text, prob).

    The latent is an input embedding (the projection's output), so `head(latent)` with tied embeddings is
    its similarity to each vocabulary embedding; the softmax makes the scores comparable across slots.
    """
    probs = torch.softmax(model.logits(latents.reshape(-1, latents.shape[-1])).float(), dim=-1)  # [M, V]
    top = probs.topk(k, dim=-1)
    return [[(token_text(tokenizer, i), p) for i, p in zip(ids, ps)]
            for ids, ps in zip(top.indices.tolist(), top.values.tolist())]


def token_text(tokenizer, i: int) -> str:
    """A token's text; its raw vocabulary entry when it is a partial UTF-8 byte sequence (decodes to �)."""
    text = tokenizer.decode([i])
    return tokenizer.convert_ids_to_tokens(i) if "\ufffd" in text else text


def latent_cot_similarity(latent: torch.Tensor, cot: torch.Tensor, centered: bool = False) -> torch.Tensor:
    """Per-layer cosine similarity of latent slots and CoT tokens, heads concatenated.

    latent: [L, Hkv, M, D] (keys or values of one example); cot: [L, Hkv, C, D] -> [L, M, C] fp32, where
    sim[l, i, j] = cos(concat_h latent[l, h, i], concat_h cot[l, h, j]).
    centered: first subtract, per layer, the mean over the M slots from the latents and the mean over the C
    tokens from the CoT: keys and values share a large common direction (attention sinks, biases) that makes
    every raw cosine high; the centred one shows which slot resembles which token.
    """
    L, H, M, D = latent.shape
    a = latent.float().permute(0, 2, 1, 3).reshape(L, M, H * D)  # [L, M, H*D]
    b = cot.float().permute(0, 2, 1, 3).reshape(L, -1, H * D)  # [L, C, H*D]
    if centered:
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(1, 2)


@dataclass
class Inspection:
    cot_tokens: list[str]  # C decoded CoT tokens
    sim_k: torch.Tensor  # [L, M, C]
    sim_v: torch.Tensor  # [L, M, C]
    kept: torch.Tensor  # [L, C] number of KV heads whose eviction kept each CoT token
    num_kv_heads: int
    eviction: str  # "rkv λ=0.1"
    key_space: str
    centered: bool = False


@torch.no_grad()
def inspect_example(model, tokenizer, cfg, question: str, cot: str, answer: str,
                    key_space: str | None = None, centered: bool = False) -> Inspection:
    """Teacher on question·cot·answer, student (final sweep) on the question, similarity and eviction.

    The CoT is used as given (no last-step dropping): the user chose what to look at.
    key_space defaults to the config's `loss.kv_key_space`, the space the KV loss compared keys in.
    """
    if not cfg.spec.latent:
        raise ValueError(f"kava inspect needs a latent method's checkpoint; this one is {cfg.method!r}")
    key_space = key_space or cfg.loss.kv_key_space
    fmt = Formatter.from_config(cfg, tokenizer, limits=False, drop_last_step=False)
    item = fmt.tokenize(Record(question, (cot,), str(answer), "inspect"))
    if not item.cot:
        raise ValueError("--cot is empty: nothing to compare the latents with")
    ev = cfg.eviction
    # the targets of training (`kava.objective.kv_targets`): every `eviction.*` setting of the run
    dev = model.special_rows.device
    tb = kv_target_batch([item], model.ids, cfg).to(dev)
    t, tgt = teacher_kv_targets(model, tb, cfg, cfg.latent.num_latents, torch.Generator(device=dev).manual_seed(0),
                                key_space=key_space)
    _, s = latent_pass(model, [item], num_latents=cfg.latent.num_latents, num_sweeps=cfg.latent.num_sweeps,
                       student_mode=cfg.spec.student_mode, key_space=key_space, keep_sweeps="last", round_width=False)
    lk, lv = s.latent_k[-1][:, 0], s.latent_v[-1][:, 0]  # [L, Hkv, M, D]
    ck, cv = t.cot_k[:, 0], t.cot_v[:, 0]  # [L, Hkv, C, D]
    idx, slot_mask = tgt.idx, tgt.slot_mask
    L, _, H, M = idx.shape
    C = ck.shape[2]
    hit = F.one_hot(idx[:, 0], C) * slot_mask[0, None, None, :, None]  # [L, Hkv, M, C]
    kept = hit.sum(2).clamp(max=1).sum(1)  # [L, C] heads that kept the token
    desc = f"{ev.method} λ={ev.lam:g}" if ev.method == "rkv" else ev.method
    if ev.method in NEEDS_IMPORTANCE and ev.importance_softmax != "cot":
        desc += f", {ev.importance_softmax} softmax"
    return Inspection([token_text(tokenizer, i) for i in item.cot], latent_cot_similarity(lk, ck, centered).cpu(),
                      latent_cot_similarity(lv, cv, centered).cpu(), kept.cpu(), H, desc, key_space, centered)


def most_kept(ins: Inspection, layer: int, n: int | None = None) -> list[tuple[int, str, int]]:
    """The (n) CoT tokens kept by the most heads in `layer`: (position, text, heads), ties in time order."""
    counts = ins.kept[layer].tolist()
    order = sorted((p for p, c in enumerate(counts) if c > 0), key=lambda p: (-counts[p], p))[:n]
    return [(p, ins.cot_tokens[p], counts[p]) for p in order]


def default_layers(num_layers: int, n: int = 4) -> list[int]:
    """The layers `kava inspect` draws by default: `n` spread over the depth, the first and the last included."""
    if num_layers <= n:
        return list(range(num_layers))
    return sorted({round(i * (num_layers - 1) / (n - 1)) for i in range(n)})


def plot_similarity(ins: Inspection, path: str | Path, layers: list[int] | None = None):
    """A grid: one row of (keys, values) heatmaps per layer, in up to 3 columns of such pairs; kept CoT tokens
    in bold red, with a marker row above each heatmap whose shade is the fraction of KV heads that kept the
    token. layers: default `default_layers` (4 spread over the depth). Returns the path."""
    import math

    from matplotlib.figure import Figure

    layers = default_layers(ins.sim_k.shape[0]) if layers is None else layers
    M, C = ins.sim_k.shape[1:]
    w, h = min(max(3.5, 0.28 * C + 1.6), 12.0), max(2.6, 0.3 * M + 1.9)  # one heatmap, inches
    pairs = 1 if len(layers) <= 4 else 2 if len(layers) <= 12 else 3
    nrows = math.ceil(len(layers) / pairs)
    fig = Figure(figsize=(2 * pairs * w + 0.8, nrows * h + 0.9), dpi=100, layout="constrained")
    axes = fig.subplots(nrows, 2 * pairs, squeeze=False)
    labels = [repr(t)[1:-1].replace(" ", "␣") or "∅" for t in ins.cot_tokens]  # spaces visible
    rotation = 0 if max(map(len, labels)) <= 3 else 90
    font = 8 if C <= 40 else 6
    im = None
    for k, layer in enumerate(layers):
        frac = (ins.kept[layer].float() / ins.num_kv_heads).numpy()
        r, c0 = divmod(k, pairs)
        for j, (kind, sim) in enumerate((("keys", ins.sim_k), ("values", ins.sim_v))):
            ax = axes[r, 2 * c0 + j]
            im = ax.imshow(sim[layer].numpy(), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto",
                           extent=(-0.5, C - 0.5, M + 0.5, 0.5))
            ax.scatter(range(C), [0.1] * C, c=frac, cmap="Greens", vmin=0, vmax=1, marker="v", s=30,
                       edgecolors="k", linewidths=0.3, clip_on=False)
            ax.set_ylim(M + 0.5, -0.3)
            ax.set_xticks(range(C), labels, rotation=rotation, fontsize=font, fontfamily="monospace")
            for tick, f in zip(ax.get_xticklabels(), frac):
                if f > 0:
                    tick.set_fontweight("bold")
                    tick.set_color("firebrick")
            ax.set_yticks(range(1, M + 1))
            ax.tick_params(axis="y", labelsize=8)
            ax.set_title(f"layer {layer} {kind}", fontsize=10)
            if j == 0 and c0 == 0:
                ax.set_ylabel("latent slot")
            if r == nrows - 1:
                ax.set_xlabel("teacher CoT token")
    for ax in axes.ravel()[2 * len(layers):]:
        ax.set_visible(False)
    fig.colorbar(im, ax=axes, shrink=0.5, label=("centred " if ins.centered else "") + "cosine similarity")
    shown = "all layers" if len(layers) == ins.sim_k.shape[0] else f"layers {', '.join(map(str, layers))} of " \
                                                                     f"{ins.sim_k.shape[0]}"
    fig.suptitle(f"student latent KV vs teacher CoT KV ({ins.key_space} keys, {shown}); bold red / ▼ = kept by "
                 f"{ins.eviction} eviction (▼ shade: fraction of {ins.num_kv_heads} KV heads)", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
