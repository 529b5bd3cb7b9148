"""Per-term gradient share (issue 11 §2): how hard each loss term pulls on the trainable parameters.

Every ``run.grad_share_every`` optimizer steps the trainer takes one of the step's micro-batches (main process;
the k-th measurement the (k − 1) mod n-th of n, `grad_share_micro`)
and computes, for each loss term i with a non-zero weight w_i, the gradient of ``w_i · L_i`` (weighted as
in the total loss) on all trainable parameters with a separate ``torch.autograd.grad`` call on one shared
forward pass. Logged to metrics.jsonl (docs/method.md §4):

    grad/<term>        |g_i|                      (L2 norm over all trainable parameters)
    grad_share/<term>  |g_i| / Σ_j |g_j|          (sums to 1 over the terms)
    grad/total         |Σ_i g_i|                  (the norm of the total loss's gradient, before clipping)
    grad_cos/<term>    cos(g_i, g_ce_student)     (alignment with the answer CE; latent methods only)

The measurement does not touch ``.grad`` and runs under a forked RNG, so turning it on leaves training
unchanged.
"""

from __future__ import annotations

import math

import torch

from kava.objective import loss_step


def share_metrics(grads: dict[str, list[torch.Tensor | None]], reference: str | None = "ce_student") -> dict[str, float]:
    """Norms, shares and cosines of per-term gradients.

    Args:
        grads: term -> one gradient per trainable parameter (same parameter order for every term; None
            where the term does not reach that parameter, i.e. zero).
        reference: the term whose gradient the cosines are taken against (skipped when absent).

    Returns:
        ``grad/<term>``, ``grad_share/<term>``, ``grad/total`` and ``grad_cos/<term>`` (see module docstring)
        as floats. Shares are 0 when every gradient is 0; a cosine with a zero vector is 0.
    """
    names = list(grads)
    if len({len(g) for g in grads.values()}) > 1:
        raise ValueError("every term needs one entry per trainable parameter, in the same order (None where the "
                         f"term has no gradient); got lengths {[len(g) for g in grads.values()]}")
    f64 = lambda g: g.detach().double()  # noqa: E731  (sums over ~1e9 elements: accumulate in fp64)
    norms = {n: math.sqrt(_sq_norm(grads[n])) for n in names}
    total_sq = 0.0
    for per_param in zip(*grads.values()):  # one parameter at a time: no flattened copy of all gradients
        present = [f64(g) for g in per_param if g is not None]
        if present:
            total_sq += float((sum(present) ** 2).sum())
    dots = {}
    if reference in grads:
        dots = {n: sum(float((f64(a) * f64(b)).sum()) for a, b in zip(grads[n], grads[reference])
                       if a is not None and b is not None) for n in names if n != reference}
    return _metrics(names, norms, math.sqrt(total_sq), dots, reference)


def _sq_norm(grads) -> float:
    return sum(float((g.detach().double() ** 2).sum()) for g in grads if g is not None)


def grad_shares(model, batch, cfg, generator: torch.Generator | None = None,
                reference: str | None = "ce_student") -> dict[str, float]:
    """Per-term gradient norms and shares of `cfg.method`'s loss on one micro-batch: the numbers of
    `share_metrics`, without holding every term's gradient at once.

    One forward pass (`kava.objective.loss_step`), then one ``torch.autograd.grad`` per term with a non-zero
    weight, the reference term first: only its gradient is kept (for the cosines), every other one is reduced
    to its norm and its dot product with the reference and dropped. The norm of the total's gradient comes
    from one more ``autograd.grad`` of the weighted sum. At most two gradient copies are alive at a time (one
    per term before: a memory spike for full fine-tuning of a large model). ``.grad`` is not touched.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    terms: dict = {}
    loss_step(model, batch, cfg, generator, terms_out=terms)
    live = [(n, t, w) for n, (t, w) in terms.items() if w != 0.0 and t.requires_grad]
    live.sort(key=lambda x: x[0] != reference)  # the reference first (stable: the rest keep their order)
    names = [n for n, _, _ in live]
    norms, dots, ref = {}, {}, None
    for name, term, w in live:
        g = torch.autograd.grad(w * term.float(), params, retain_graph=True, allow_unused=True)
        norms[name] = math.sqrt(_sq_norm(g))
        if name == reference:
            ref = g
        elif ref is not None:
            dots[name] = sum(float((a.detach().double() * b.detach().double()).sum()) for a, b in zip(g, ref)
                             if a is not None and b is not None)
        del g
    ref = None  # freed before the total's gradient: two copies at most
    total = sum(w * t.float() for _, t, w in live)
    total_norm = math.sqrt(_sq_norm(torch.autograd.grad(total, params, allow_unused=True))) if live else 0.0
    return _metrics(names, norms, total_norm, dots, reference)


def _metrics(names, norms: dict[str, float], total_norm: float, dots: dict[str, float],
             reference: str | None) -> dict[str, float]:
    """The logged numbers from per-term norms, the total's norm and dot products with the reference."""
    norm_sum = sum(norms.values())
    out = {f"grad/{n}": norms[n] for n in names}
    out.update({f"grad_share/{n}": (norms[n] / norm_sum if norm_sum > 0 else 0.0) for n in names})
    out["grad/total"] = total_norm
    if reference in norms:
        for n in names:
            if n != reference:
                den = norms[n] * norms[reference]
                out[f"grad_cos/{n}"] = dots[n] / den if den > 0 else 0.0
    return {k: (v if math.isfinite(v) else float("nan")) for k, v in out.items()}


def grad_share_due(cfg, done_steps: int) -> bool:
    """Whether optimizer step `done_steps` (1-based) measures gradient shares: every `run.grad_share_every`
    steps, for methods with more than one loss term (`kava.spec.MethodSpec.terms`; not Coconut, a latent
    method with one term)."""
    every = cfg.run.grad_share_every
    return bool(every) and len(cfg.spec.terms) > 1 and done_steps % every == 0


def grad_share_micro(cfg, done_steps: int, num_micro: int) -> int:
    """Which of the step's `num_micro` micro-batches (of the main process) a due step measures: the k-th
    measurement takes micro-batch (k − 1) mod num_micro. With `optim.group_by_length` the micro-batches are
    ordered by length, so the measurements rotate over the length groups instead of always the shortest."""
    return (done_steps // cfg.run.grad_share_every - 1) % num_micro


def measure(model, batch, cfg, device: torch.device, autocast) -> dict[str, float]:
    """`grad_shares` under the trainer's autocast with the RNG forked (dropout, random eviction), so the
    training run is the same with and without the measurement."""
    devices = [torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), autocast:
        return grad_shares(model, batch, cfg)
