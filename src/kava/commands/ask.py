"""`kava ask --checkpoint RUN_DIR [--question "..."] [--show-latents] [--mode latent|cot|nocot]`.

Answers one question, or each line read from stdin until EOF (a `> ` prompt when stdin is a terminal):
the generated answer segment, the extracted number, forward passes and time. Uses the same checkpoint
`kava eval` scores (best/, else final/), and names it, with its training step, in a line on stderr.
"""

from __future__ import annotations

import sys
import time


def add_parser(sub) -> None:
    p = sub.add_parser("ask", help="answer a question with a trained run (interactive without --question)")
    p.add_argument("--checkpoint", required=True,
                   help="run dir (uses best/, else final/), a checkpoint dir, or a `kava export` dir")
    p.add_argument("--question", help="the question; without it, one question per stdin line until EOF")
    p.add_argument("--mode", choices=["latent", "cot", "nocot"], help="default: the method's own mode")
    p.add_argument("--show-latents", action="store_true",
                   help="top-5 vocabulary tokens of each latent slot through the LM head (latent mode)")
    p.add_argument("--max-new-tokens", type=int, help="answer tokens (default: the config's run.eval_max_new_tokens)")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.set_defaults(func=run)


def answer(model, tok, cfg, question: str, *, mode: str, max_new_tokens: int | None = None,
           show_latents: bool = False) -> list[str]:
    """The printed lines for one question (a function, so the REPL and --question share it)."""
    import torch

    from kava.api import KavaModel
    from kava.decode import latent_pass, passes
    from kava.tools.inspect_latents import nearest_tokens

    km = model if isinstance(model, KavaModel) else KavaModel(model, tok, cfg, None, exported=False)
    model, tok, cfg = km.model, km.tokenizer, km.cfg
    T, M = cfg.latent.num_sweeps, cfg.latent.num_latents
    t0 = time.perf_counter()
    g = km.generate([question], mode, max_new_tokens=max_new_tokens)[0]
    if model.special_rows.is_cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    steps = len(g.token_ids)  # decode steps: forward calls that emitted a token (eos included)
    pre = passes(mode, student_mode=cfg.spec.student_mode, num_latents=M, num_sweeps=T)  # before the first step
    if mode != "latent":  # the prefill's logits give the first token: every pass is a decode step
        how = ""
    elif cfg.spec.student_mode == "sequential":
        how = f"1 prefix + {M} sequential latents + "
    else:
        how = f"1 prefix + {T} sweeps + "
    lines = [f"answer: {g.text.strip()}", f"extracted: {g.answer}",
             f"forward passes: {g.forward_passes} ({how}{steps} decode steps)", f"time: {dt:.3f} s"]
    assert g.forward_passes == pre + steps, "forward-pass accounting disagrees with evaluate.generate"
    if show_latents:
        if mode != "latent":
            lines.append(f"(no latents in mode {mode})")
        else:
            with torch.no_grad():
                _, s = latent_pass(model, km.tokenize([question]), num_latents=M, num_sweeps=T,
                                   student_mode=cfg.spec.student_mode, round_width=False)
            for i, toks in enumerate(nearest_tokens(model, tok, s.latents[0], k=5), 1):
                lines.append(f"latent {i:>2}: " + "  ".join(f"{t!r} {p:.3f}" for t, p in toks))
    return lines


def run(args) -> int:
    import kava

    km = kava.load(args.checkpoint, device=args.device)
    print(f"[kava] ask: {km.describe()}", file=sys.stderr, flush=True)  # stdout: the answers only
    mode = args.mode or km.default_mode
    if mode == "latent" and not km.cfg.spec.latent:
        print(f"kava ask: a {km.method!r} checkpoint has no latent mode; use --mode cot or nocot", file=sys.stderr)
        return 2

    def one(q: str) -> None:
        print("\n".join(answer(km, None, None, q, mode=mode, max_new_tokens=args.max_new_tokens,
                               show_latents=args.show_latents)), flush=True)

    if args.question is not None:
        one(args.question)
        return 0
    tty = sys.stdin.isatty()
    while True:
        if tty:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        if line.strip():
            one(line.strip())
    return 0
