"""Diagnostics that show whether the answer uses the latent thoughts (issue 11 §2), for latent runs.

All three run on a trained model of a latent method (`kava.spec.LATENT_METHODS`) in `kava eval` (docs/method.md §5 defines them):

- **Latent ablation.** The latent embeddings z ``[B, M, d]`` that the answer pass consumes (Jacobi: the
  input of the final sweep, ``StudentOut.latents``; sequential: z_1..z_M) are replaced by zeros, by the
  ``<latent>`` placeholder embedding, or by another example's latents (a fixed derangement within the
  batch). The latent-slot KV is recomputed from the replacement: one pass of the M replaced embeddings at
  the slots' columns and positions on top of the question's cache (`latent_slot_cache`), then the answer is
  decoded greedily as in normal evaluation. With the real z this reproduces the student exactly.
- **Oracle check.** The teacher's compressed CoT KV, the very targets of ``L_KV`` (`kava.objective.kv_targets`,
  the function training calls), is
  spliced into the latent slots in place of the student's latent KV (`oracle_cache`); slots without a
  target (N_C < M) are masked out of attention. The answer block attends to the question's cache and those
  entries only.
- **KV match.** Per layer, relative error ``|k_s − k_t| / |k_t|`` and cosine between the student's
  final-sweep latent K (and V) and its eviction targets, averaged over valid (KV head, slot) pairs
  (`kv_match_stats`).

Shapes: B batch, M latent slots, d hidden size, L layers, Hkv KV heads, D head dim, Qb question block width.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from kava.data.format import Formatter, StudentBatch
from kava.data.records import Record
from kava.decode import answer_from_cache, decode_texts, latent_pass
from kava.model.reasoner import LatentReasoner
from kava.objective import kv_target_batch, teacher_kv_targets
from kava.scoring import answer_matches, binomial_stderr, digit_agreement, extract
from kava.spec import LATENT_METHODS, spec_of

ABLATIONS = ("zeros", "placeholder", "shuffle")
"""Latent replacements: ``zeros``, the ``<latent>`` ``placeholder`` embedding, ``shuffle`` (another example's)."""

NO_COT = "no CoT in the record"
EMPTY_COT = "CoT empty after data.drop_last_step"


@dataclass(frozen=True)
class DiagnosticsSpec:
    """What `kava eval` measures besides accuracy (all off by default)."""

    ablations: tuple[str, ...] = ()
    oracle: bool = False
    kv_match: bool = False

    def __post_init__(self):
        bad = [a for a in self.ablations if a not in ABLATIONS]
        if bad:
            raise ValueError(f"unknown latent ablation(s) {bad}; allowed values: {', '.join(ABLATIONS)}")
        if len(set(self.ablations)) != len(self.ablations):
            raise ValueError(f"latent ablations listed twice: {list(self.ablations)}")

    @classmethod
    def everything(cls) -> "DiagnosticsSpec":
        return cls(ABLATIONS, True, True)

    @property
    def active(self) -> bool:
        return bool(self.ablations) or self.oracle or self.kv_match

    @property
    def min_batch(self) -> int:
        """Smallest batch the diagnostics can run on: a shuffle needs another example in the batch."""
        return 2 if "shuffle" in self.ablations else 1


def diagnostics_spec(ablations: str | None = None, oracle: bool = False, kv_match: bool = False,
                     everything: bool = False) -> DiagnosticsSpec:
    """The spec of `kava eval`'s flags: `ablations` a comma list (or 'all'), `everything` = --diagnostics."""
    if everything:
        return DiagnosticsSpec.everything()
    names = [a.strip() for a in (ablations or "").split(",") if a.strip()]
    if names == ["all"]:
        names = list(ABLATIONS)
    return DiagnosticsSpec(tuple(names), oracle, kv_match)


# ------------------------------------------------------------------------------------------ pure pieces
def derangement(n: int) -> torch.Tensor:
    """``perm[b] = (b + 1) mod n``: example b takes example b+1's latents (the last takes the first's), so
    no example keeps its own. ``[n]`` long. Needs n >= 2."""
    if n < 2:
        raise ValueError("the 'shuffle' latent ablation needs at least 2 examples in a batch: each example takes "
                         "another example's latents, and a batch of 1 has no other example (use a batch size >= 2)")
    return (torch.arange(n) + 1) % n


def ablate_latents(z: torch.Tensor, kind: str, placeholder: torch.Tensor | None = None) -> torch.Tensor:
    """Replace the latent embeddings. z: ``[B, M, d]`` -> ``[B, M, d]``.

    ``none``: z itself; ``zeros``: 0; ``placeholder``: the ``<latent>`` embedding ``[d]`` in every slot;
    ``shuffle``: ``z[derangement(B)]`` (example b gets example (b+1) mod B's latents).
    """
    if kind == "none":
        return z
    if kind == "zeros":
        return torch.zeros_like(z)
    if kind == "placeholder":
        if placeholder is None or placeholder.shape != z.shape[-1:]:
            raise ValueError(f"the placeholder ablation needs the <latent> embedding [d]={z.shape[-1]}; "
                             f"got {None if placeholder is None else tuple(placeholder.shape)}")
        return placeholder.to(z.dtype).expand_as(z)
    if kind == "shuffle":
        return z[derangement(z.shape[0]).to(z.device)]
    raise ValueError(f"unknown latent ablation {kind!r}; allowed values: none, {', '.join(ABLATIONS)}")


def kv_match_stats(student: torch.Tensor, target: torch.Tensor, slot_mask: torch.Tensor, eps: float = 1e-12
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """How close the student's latent K (or V) is to its eviction targets, per layer and example.

    Args:
        student, target: ``[L, B, Hkv, M, D]`` (any float dtype; fp32 math).
        slot_mask: ``[B, M]`` bool, True for slots with a target.

    Returns:
        ``rel`` ``[L, B]``: mean over the example's valid (KV head, slot) pairs of ``|s − t| / |t|``
        (vector norms over D; ``|t|`` clamped below at eps); ``cos`` ``[L, B]``: mean cosine of s and t
        (``F.cosine_similarity``, eps 1e-8); ``pairs`` ``[B]`` long: valid pairs per example (Hkv · valid
        slots). An example without valid slots gets rel = cos = 0 and pairs = 0.
    """
    if student.shape != target.shape or student.dim() != 5:
        raise ValueError(f"student and target must both be [L,B,Hkv,M,D]; got {tuple(student.shape)}, "
                         f"{tuple(target.shape)}")
    _, B, Hkv, M, _ = student.shape
    if tuple(slot_mask.shape) != (B, M):
        raise ValueError(f"slot_mask must be [B,M]={(B, M)}; got {tuple(slot_mask.shape)}")
    with torch.autocast(student.device.type, enabled=False):
        s, t = student.float(), target.float()
        rel = (s - t).norm(dim=-1) / t.norm(dim=-1).clamp_min(eps)  # [L, B, Hkv, M]
        cos = F.cosine_similarity(s, t, dim=-1, eps=1e-8)  # [L, B, Hkv, M]
        w = slot_mask.to(torch.float32)[None, :, None, :]  # [1, B, 1, M]
        pairs = slot_mask.sum(-1) * Hkv  # [B]
        den = pairs.clamp_min(1).to(torch.float32)[None, :]  # [1, B]
        return (rel * w).sum((2, 3)) / den, (cos * w).sum((2, 3)) / den, pairs


# ------------------------------------------------------------------------------------------ caches
def cache_from_kv(model: LatentReasoner, k: torch.Tensor, v: torch.Tensor) -> DynamicCache:
    """A new cache holding ``k``, ``v`` ``[L, B, Hkv, N, D]`` as its first N columns (copies)."""
    return model.cache_from(zip(k, v))


def latent_slot_cache(model: LatentReasoner, sb: StudentBatch, question_cache: DynamicCache,
                      z: torch.Tensor) -> DynamicCache:
    """The question block's KV (columns ``[0, Qb)`` of ``question_cache``) plus the KV of the latent
    embeddings ``z`` ``[B, M, d]`` run as one block at columns ``[Qb, Qb+M)`` with the slots' positions.

    This is the Jacobi model's final sweep with z in place of z^{T−1}. For the sequential (CODI) mode one
    causal block over z_1..z_M gives the same KV as M one-token passes. ``question_cache`` is not changed.
    """
    Qb, M = sb.q_block, sb.num_latents
    qk, qv = model.cache_kv(question_cache, 0, Qb)
    cache = cache_from_kv(model, qk, qv)
    model.run(z, sb.mask[:, :Qb + M], sb.pos[:, Qb:Qb + M], cache)
    return cache


def oracle_cache(model: LatentReasoner, sb: StudentBatch, question_cache: DynamicCache, slot_k: torch.Tensor,
                 slot_v: torch.Tensor, slot_mask: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
    """Splice given K/V into the latent slots: the question block's KV (columns ``[0, Qb)`` of
    ``question_cache``) followed by ``slot_k``, ``slot_v`` ``[L, B, Hkv, M, D]`` (keys as the cache stores
    them) at columns ``[Qb, Qb+M)``.

    Returns the cache and the attention mask ``[B, S]`` for what follows: ``sb.mask`` with column Qb+j set
    to ``slot_mask[:, j]`` (``[B, M]``), so slots without a target are never attended to. Position ids are
    left as they are (the answer block keeps its positions).
    """
    Qb, M = sb.q_block, sb.num_latents
    qk, qv = model.cache_kv(question_cache, 0, Qb)
    if slot_k.shape[:3] != qk.shape[:3] or slot_k.shape[3] != M or slot_k.shape != slot_v.shape:
        raise ValueError(f"slot K/V must be [L,B,Hkv,M,D] with M={M} and the cache's L,B,Hkv,D; got "
                         f"{tuple(slot_k.shape)}, {tuple(slot_v.shape)} for a cache of {tuple(qk.shape)}")
    cache = cache_from_kv(model, torch.cat([qk, slot_k.to(qk.dtype)], 3), torch.cat([qv, slot_v.to(qv.dtype)], 3))
    mask = sb.mask.clone()
    mask[:, Qb:Qb + M] = slot_mask.to(mask.dtype)
    return cache, mask


# ------------------------------------------------------------------------------------------ one batch
def require_latent(method: str) -> str:
    """The student mode of a latent method (`kava.spec`); a ValueError for a method whose answer reads no
    latents."""
    student_mode = spec_of(method).student
    if student_mode is None:
        raise ValueError(f"latent diagnostics need a latent method ({', '.join(LATENT_METHODS)}); this run's method "
                         f"is {method!r}, whose answer does not read latents")
    return student_mode


@torch.no_grad()
def diagnose_batch(model: LatentReasoner, tokenizer, cfg, records: list[Record], chunk: list[int], fmt: Formatter,
                   spec: DiagnosticsSpec, max_new_tokens: int) -> list[dict]:
    """The diagnostics of `spec` for ``records[i]``, i in ``chunk``: one dict per example, with
    ``ablations: {kind: {generated, correct}}``, ``oracle: {generated, correct}`` or ``{skipped: reason}``,
    ``kv_match: {pairs, key_space, k_rel, k_cos, v_rel, v_cos}`` (per-layer lists; None without valid slots).
    Correctness is the strict match of `kava.scoring`, as for the accuracy."""
    with model.autocast():
        return _diagnose(model, tokenizer, cfg, records, chunk, fmt, spec, max_new_tokens)


def _diagnose(model, tokenizer, cfg, records, chunk, fmt, spec, max_new_tokens) -> list[dict]:
    ids, dev = model.ids, model.special_rows.device
    M = cfg.latent.num_latents
    key_space = cfg.loss.kv_key_space
    q_items = [fmt.tokenize(records[i], i, need_answer=False) for i in chunk]
    # the layout of the scored generations
    sb, s = latent_pass(model, q_items, num_latents=M, num_sweeps=cfg.latent.num_sweeps,
                        student_mode=require_latent(cfg.method), key_space=key_space, keep_sweeps="last")
    Qb = sb.q_block
    out: list[dict] = [{} for _ in chunk]

    def decode_and_score(cache, mask) -> list[dict]:
        toks, _ = answer_from_cache(model, sb, cache, mask, max_new_tokens)
        res = []
        for i, text in zip(chunk, decode_texts(tokenizer, toks, ids.eos)):
            r = records[i]
            strict = extract(text, r.answer_kind, cfg.data.answer_prompt)["strict"]
            res.append({"generated": text, "correct": answer_matches(strict, r.answer, r.answer_kind),
                        **({"digits": digit_agreement(strict, r.answer)} if r.answer_kind == "digits" else {})})
        return res

    if spec.ablations:
        placeholder = model.embed(torch.tensor([[ids.latent]], device=dev))[0, 0]
        for kind in spec.ablations:
            z = ablate_latents(s.latents, kind, placeholder)
            for o, r in zip(out, decode_and_score(latent_slot_cache(model, sb, s.cache, z), sb.mask)):
                o.setdefault("ablations", {})[kind] = r
    if spec.oracle or spec.kv_match:
        a_items = [fmt.tokenize(records[i], i) for i in chunk]
        skip = [NO_COT if not records[i].steps else EMPTY_COT if not it.cot else None for i, it in zip(chunk, a_items)]
        if all(skip):  # no CoT target in this batch (e.g. SVAMP): nothing to compare or splice
            for o, reason in zip(out, skip):
                if spec.kv_match:
                    o["kv_match"] = {"pairs": 0, "key_space": key_space, "k_rel": None, "k_cos": None,
                                     "v_rel": None, "v_cos": None}
                if spec.oracle:
                    o["oracle"] = {"skipped": reason}
            return out
        tb = kv_target_batch(a_items, ids, cfg).to(dev)
        gen = torch.Generator(device=dev).manual_seed(cfg.run.seed * 1_000_003 + chunk[0])  # eviction: random
        _, tgt = teacher_kv_targets(model, tb, cfg, M, gen)
        tk, tv, slot_mask = tgt.k, tgt.v, tgt.slot_mask
        if spec.kv_match:
            k_rel, k_cos, pairs = kv_match_stats(s.latent_k[-1], tk, slot_mask)
            v_rel, v_cos, _ = kv_match_stats(s.latent_v[-1], tv, slot_mask)
            for b, o in enumerate(out):
                n = int(pairs[b])
                per = {name: (x[:, b].tolist() if n else None)
                       for name, x in (("k_rel", k_rel), ("k_cos", k_cos), ("v_rel", v_rel), ("v_cos", v_cos))}
                o["kv_match"] = {"pairs": n, "key_space": key_space, **per}
        if spec.oracle:
            # The targets live in the key space L_KV compares; the cache stores keys rotated at their own
            # positions. cache: copied as they are (rotated at the CoT tokens' positions, exactly what the
            # student's slots are trained to hold); pre_rope: rotated at the slots' positions.
            slot_k = model.rotate(tk, sb.pos[:, Qb:Qb + M]) if key_space == "pre_rope" else tk
            cache, mask = oracle_cache(model, sb, s.cache, slot_k, tv, slot_mask)
            for o, r, reason in zip(out, decode_and_score(cache, mask), skip):
                o["oracle"] = r if reason is None else {"skipped": reason}
    return out


def check_shards(num_questions: int, world: int, batch_size: int, min_size: int = 1) -> None:
    """Refuse, identically on every process, an evaluation whose shards `eval_chunks` could not batch (a
    shuffle needs two examples per batch). Decided from the global counts: a refusal made by some ranks
    only would leave the others waiting in the gather."""
    for rank in range(world):
        eval_chunks(list(range(rank, num_questions, world)), batch_size, min_size)


def eval_chunks(indices: list[int], batch_size: int, min_size: int = 1) -> list[list[int]]:
    """Split `indices` into batches of `batch_size`; a last batch smaller than `min_size` joins the one
    before it. Raises when no batch can reach `min_size` (a shuffle needs two examples)."""
    if min_size > 1 and (batch_size < min_size or 0 < len(indices) < min_size):
        raise ValueError(f"the 'shuffle' latent ablation gives each example another example's latents from the "
                         f"same batch, so it needs batches of at least {min_size}: got batch size {batch_size} "
                         f"and {len(indices)} question(s) on this process (raise --batch-size / the question "
                         f"count, or drop 'shuffle')")
    chunks = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    if len(chunks) > 1 and len(chunks[-1]) < min_size:
        tail = chunks.pop()
        chunks[-1] = chunks[-1] + tail
    return chunks


# ------------------------------------------------------------------------------------------ summary
def _mean(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def summarize_diagnostics(rows: list[dict]) -> dict:
    """Dataset-level numbers from per-example rows (`diagnose_batch` fields merged into prediction rows).

    ``ablations``: ``{none: accuracy, zeros: ..., placeholder: ..., shuffle: ...}`` (strict accuracy with the
    latents replaced; ``none`` is the normal accuracy). ``oracle``: ``accuracy`` over the examples with a CoT,
    ``count``, ``student_accuracy`` (normal accuracy on those same examples) and ``skipped`` ``{reason: n}``.
    ``kv_match``: per-layer lists ``k_rel, k_cos, v_rel, v_cos`` averaged over every valid (example, KV head,
    slot) pair, their means over layers in ``mean``, ``pairs``, ``examples`` (with at least one valid slot),
    ``key_space``. Keys are absent when no row carries that diagnostic.
    """
    out: dict = {}
    abl = [r for r in rows if "ablations" in r]
    if abl:
        kinds = [k for k in ABLATIONS if any(k in r["ablations"] for r in abl)]
        out["ablations"] = {"none": _mean(r["correct"] for r in abl),
                            **{k: _mean(r["ablations"][k]["correct"] for r in abl if k in r["ablations"])
                               for k in kinds}}
        counts = {"none": len(abl), **{k: sum(k in r["ablations"] for r in abl) for k in kinds}}
        out["ablations_stderr"] = {k: binomial_stderr(v, counts[k]) for k, v in out["ablations"].items()}
        if all("digits" in r for r in abl):  # digit answers: the graded score too (exact match is often 0 for all)
            out["ablations_digits"] = {"none": _mean(r["digits"] for r in abl),
                                       **{k: _mean(r["ablations"][k]["digits"] for r in abl if k in r["ablations"])
                                          for k in kinds}}
    orc = [r for r in rows if "oracle" in r]
    if orc:
        used = [r for r in orc if "correct" in r["oracle"]]
        out["oracle"] = {"accuracy": _mean(r["oracle"]["correct"] for r in used), "count": len(used),
                         "accuracy_stderr": binomial_stderr(_mean(r["oracle"]["correct"] for r in used), len(used)),
                         "student_accuracy": _mean(r["correct"] for r in used),
                         "skipped": dict(Counter(r["oracle"]["skipped"] for r in orc if "skipped" in r["oracle"]))}
        if used and all("digits" in r["oracle"] and "digits" in r for r in used):
            out["oracle"]["digits"] = _mean(r["oracle"]["digits"] for r in used)
            out["oracle"]["student_digits"] = _mean(r["digits"] for r in used)
    kvm = [r["kv_match"] for r in rows if "kv_match" in r]
    if kvm:
        have = [m for m in kvm if m["pairs"]]
        total = sum(m["pairs"] for m in have)
        res: dict = {"key_space": kvm[0]["key_space"], "pairs": total, "examples": len(have)}
        for name in ("k_rel", "k_cos", "v_rel", "v_cos"):
            if have:
                L = len(have[0][name])
                res[name] = [sum(m[name][layer] * m["pairs"] for m in have) / total for layer in range(L)]
            else:
                res[name] = None
        res["mean"] = {n: (_mean(res[n]) if res[n] else None) for n in ("k_rel", "k_cos", "v_rel", "v_cos")}
        out["kv_match"] = res
    return out


def format_diagnostics(name: str, summary: dict) -> list[str]:
    """The lines `kava eval` prints for one dataset's diagnostics."""
    lines = []
    if "ablations" in summary:
        a = summary["ablations"]
        cells = [f"none {a['none']:.4f}"] + [f"{k} {a[k]:.4f} ({a[k] - a['none']:+.4f})" for k in a if k != "none"]
        lines.append(f"{name}: accuracy with the latents replaced: " + ", ".join(cells))
        if "ablations_digits" in summary:
            d = summary["ablations_digits"]
            lines.append(f"{name}: digits in place with the latents replaced: " + ", ".join(
                [f"none {d['none']:.4f}"] + [f"{k} {d[k]:.4f} ({d[k] - d['none']:+.4f})" for k in d if k != "none"]))
    if "oracle" in summary:
        o = summary["oracle"]
        skipped = ", ".join(f"{n} ({r})" for r, n in o["skipped"].items()) or "none"
        if o["count"]:
            lines.append(f"{name}: oracle (teacher's compressed CoT KV in the latent slots): accuracy "
                         f"{o['accuracy']:.4f} on {o['count']} problems (student {o['student_accuracy']:.4f} on the "
                         f"same); skipped: {skipped}")
        else:
            lines.append(f"{name}: oracle: no problem has a CoT; skipped: {skipped}")
    if "kv_match" in summary:
        k = summary["kv_match"]
        if k["pairs"]:
            per = " ".join(f"{x:.3f}" for x in k["k_rel"])
            m = k["mean"]
            lines.append(f"{name}: KV match (final sweep vs eviction targets, {k['key_space']} keys, {k['pairs']} "
                         f"(example, KV head, slot) pairs): K rel.err {m['k_rel']:.3f} cos {m['k_cos']:.3f}, "
                         f"V rel.err {m['v_rel']:.3f} cos {m['v_cos']:.3f}; K rel.err per layer: {per}")
        else:
            lines.append(f"{name}: KV match: no example has a CoT target")
    return lines
