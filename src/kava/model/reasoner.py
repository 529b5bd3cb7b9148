"""One backbone, two modes (SPEC §1–§2): the CoT teacher pass and the latent student passes.

`LatentReasoner` wraps any HF causal LM (optionally with LoRA adapters). It owns two small trainable
pieces besides the adapters: the embedding rows of `<bot>`, `<eot>`, `<latent>` (`special_rows`, so the
frozen vocabulary embedding and a tied LM head never receive gradient), and the latent projection.

All passes feed `inputs_embeds`, explicit `position_ids` and a 2D attention mask (pads may sit inside a
sequence; see `kava.data.format`). Logits are computed only at the positions that have a target, so the
[tokens × vocabulary] GEMM is paid for labelled tokens only.

Shapes: B batch, S columns, L layers, Hkv KV heads, D head dim, d hidden, C CoT tokens, M latent slots.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from transformers import DynamicCache
from transformers.cache_utils import StaticLayer

from kava.data.format import SpecialIds, StudentBatch, TeacherBatch
from kava.model import capture
from kava.model.capture import ImportanceCapture
from kava.model.compat import cache_kwarg

PROJECTIONS = ("mlp", "identity")  # `latent.projection`: CODI's MLP, or the hidden state as it is (Coconut)
IMPORTANCE_SOFTMAX = ("cot", "prefix")  # `eviction.importance_softmax` (docs/method.md §3)
from kava.model.families import check_window, sliding_window, text_config
from kava.model.rope import LayerRopes, RopeUnsupported


class Projection(nn.Module):
    """Maps a last-layer hidden state to the next latent's input embedding (CODI/PCCoT style MLP)."""

    def __init__(self, d: int, kind: str = "mlp", hidden: int | None = None, layernorm: bool = True):
        super().__init__()
        self.kind = kind
        if kind == "identity":
            self.net = nn.Identity()
        elif kind == "mlp":
            w = hidden or d
            layers = [nn.Linear(d, w), nn.GELU(), nn.Linear(w, d)]
            if layernorm:
                layers.append(nn.LayerNorm(d))
            self.net = nn.Sequential(*layers)
        else:
            raise ValueError(f"latent.projection: {kind!r}; allowed values: {', '.join(PROJECTIONS)}")

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


def embedding_stats(emb: nn.Module, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean row [d] and overall std (0-dim) of what the input-embedding module outputs over its vocabulary
    (its forward, so any scale it applies inside is included), fp32, in chunks of rows."""
    V = emb.weight.shape[0]
    total, sq, n = 0.0, 0.0, 0
    for i in range(0, V, chunk):
        ids = torch.arange(i, min(i + chunk, V), device=emb.weight.device)
        x = emb(ids.unsqueeze(0))[0].float()  # [rows, d]
        total = total + x.sum(0)
        sq = sq + (x * x).sum()
        n += x.shape[0]
    mean = total / n
    var = sq / (n * mean.numel()) - mean.mean() ** 2
    return mean, var.clamp_min(0).sqrt()


def truncate_cache(cache: DynamicCache, length: int) -> None:
    """Keep the first `length` columns (negative `crop` means "remove n" in every transformers 5.x). A static
    cache (`kava.decode.DecodeStep`) only moves its write position back to `length`, on the device: no host read,
    so a CUDA graph can record it; its later columns are overwritten by the next pass."""
    if is_static(cache):
        for layer in cache.layers:
            layer.cumulative_length.fill_(length)
        return
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def is_static(cache) -> bool:
    """A cache of fixed-size layers that `update` writes at a device-side position (`StaticLayer`)."""
    return bool(cache.layers) and isinstance(cache.layers[0], StaticLayer)


class _Labelled:
    """`label_h` [N, d]: the last hidden state at the batch's `label_idx` (row-major; padded rows have target
    IGNORE). The training CE reads it through `kava.losses.head_cross_entropy`, which never keeps the [N, V]
    logits for backward; `logits` computes them on demand (tests, diagnostics)."""

    label_h: torch.Tensor | None
    head: object

    @property
    def logits(self) -> torch.Tensor:
        """[N, V] = the model's head (with its final processing) on `label_h`."""
        return self.head(self.label_h)


@dataclass
class TeacherOut(_Labelled):
    label_h: torch.Tensor  # [N, d] at the N labelled positions
    targets: torch.Tensor  # [N]
    hidden: torch.Tensor  # [L, B, d] every layer's output at the CoDI column (`TeacherBatch.codi_col`)
    head: object = field(default=None, repr=False)  # `LatentReasoner.logits`
    cot_k: torch.Tensor | None = None  # [L, B, Hkv, C, D]
    cot_v: torch.Tensor | None = None  # [L, B, Hkv, C, D]
    importance: torch.Tensor | None = None  # [L, B, Hkv, C]
    # with share_question: every layer's (keys, values) of the question block, [B, Hkv, Wq, D] each
    question_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None


@dataclass
class StudentOut(_Labelled):
    label_h: torch.Tensor | None  # [N, d] at labelled answer positions (after the answer pass)
    targets: torch.Tensor | None  # [N]
    hidden: torch.Tensor | None  # [L, B, d] at the CoDI column (`StudentBatch.codi_col`)
    head: object = field(default=None, repr=False)
    latent_k: list[torch.Tensor] = field(default_factory=list)  # per sweep: [L, B, Hkv, M, D]
    latent_v: list[torch.Tensor] = field(default_factory=list)
    latents: torch.Tensor | None = None  # [B, M, d] the latent embeddings the answer pass saw
    forward_passes: int = 0
    cache: DynamicCache | None = None  # question · <bot> · latents (· answer block, if it ran)


class LatentReasoner(nn.Module):
    def __init__(self, lm: nn.Module, ids: SpecialIds, *, projection: str = "mlp", proj_hidden: int | None = None,
                 proj_layernorm: bool = True, attn_implementation: str | None = "auto"):
        """attn_implementation (`model.attn_implementation`): auto | sdpa | eager installs kava's capturing
        attention (`kava.model.capture:install`); None leaves the model's own (then no importance capture)."""
        super().__init__()
        self.lm = lm
        self.ids = ids
        base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # unwrap peft
        if attn_implementation is not None:
            self.attn_implementation = capture.install(base, attn_implementation)
        self.causal_lm = base
        self.decoder = base.base_model  # LlamaModel / Qwen2Model / GPT2Model: returns hidden states
        self.head = base.get_output_embeddings()
        emb = base.get_input_embeddings()
        self.embed_tokens = emb
        d = emb.weight.shape[1]
        self.hidden_size = d
        # Trainable rows for <bot>, <eot>, <latent>, initialised at the mean embedding (plus small noise so
        # the three differ); the vocabulary embedding itself may stay frozen. The statistics are of what the
        # embedding module outputs (Gemma scales by sqrt(d) inside it), since `embed` feeds these rows as is.
        with torch.no_grad():
            mean, std = embedding_stats(emb)
            g = torch.Generator().manual_seed(0)
            init = mean.unsqueeze(0) + 0.02 * torch.randn(3, d, generator=g).to(mean.device) * std
        self.special_rows = nn.Parameter(init)  # fp32 master copy even over a bf16 backbone (cast in `embed`)
        self.proj = Projection(d, projection, proj_hidden, proj_layernorm)
        cfg = base.config
        self.num_layers = cfg.num_hidden_layers
        self.ropes = LayerRopes(self.decoder, cfg)
        self._pre_rope_checked = False  # each layer's own RoPE, for `unrotate` / `rotate`
        tc = text_config(cfg)
        # The model's own processing of its LM head output (the training CE must see the same logits)
        self.logits_scaling = getattr(tc, "logits_scaling", None)  # Granite: logits / logits_scaling
        self.logit_scale = getattr(tc, "logit_scale", None)  # Cohere: logits * logit_scale
        self.final_softcap = getattr(tc, "final_logit_softcapping", None)  # Gemma2/3: cap * tanh(logits / cap)
        self.blocked_ids: list[int] = []  # token ids the head must never predict (set for exported models)

    # ---------------------------------------------------------------------------------- basic pieces
    @property
    def config(self):
        return self.causal_lm.config

    @property
    def sliding_window(self) -> int | None:
        """The window of the model's sliding-window layers (None: every layer sees every key)."""
        return sliding_window(self.config)

    @property
    def max_positions(self) -> int | None:
        """How many positions a model with learned absolute position embeddings has (GPT-2's `n_positions`: a
        later position indexes past its table); None for rotary models, which take any."""
        c = text_config(self.config)
        return int(c.n_positions) if c.model_type == "gpt2" else None

    @property
    def rotary(self):
        """The decoder's rotary-embedding module; None for absolute-position models (GPT-2)."""
        return self.ropes.rotary

    def _probe(self, length: int = 8) -> torch.Tensor:
        """[1, length] ids of ordinary tokens (no kava special token) for the build-time checks."""
        V = self.embed_tokens.weight.shape[0]
        special = {self.ids.bot, self.ids.eot, self.ids.latent}
        ids = [i for i in range(V // 3, V) if i not in special][:length]
        return torch.tensor([ids], device=self.embed_tokens.weight.device)

    def _tolerance(self) -> float:
        return 1e-4 if self.embed_tokens.weight.dtype == torch.float32 else 3e-2

    def check_backbone(self) -> None:
        """Refuse (ValueError) a model whose logits kava's own path would not reproduce.

        kava feeds `inputs_embeds` from `embed` and applies `logits` to the decoder's last hidden state; on a
        probe of ordinary tokens both must give the model's own `forward(input_ids).logits` (an embedding
        multiplier applied only to input ids, or a final logit processing `logits` does not know, fails)."""
        x = self._probe()
        mask = torch.ones_like(x)
        pos = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        was = self.training
        self.eval()
        try:
            with torch.no_grad(), self.autocast():
                ref = self.causal_lm(input_ids=x, attention_mask=mask, position_ids=pos, use_cache=False).logits[0]
                h = self.decoder(inputs_embeds=self.embed(x), attention_mask=mask, position_ids=pos,
                                 use_cache=False).last_hidden_state[0]
                got = self.logits(h)
        finally:
            self.train(was)
        ref, got = ref.float(), got.float()
        err, scale = (got - ref).abs().max().item(), ref.abs().max().item()
        if not err <= self._tolerance() * scale + 1e-6:
            raise ValueError(
                f"{type(self.causal_lm).__name__}: kava's path (inputs_embeds from the embedding module, LM head "
                f"+ known final processing) does not reproduce the model's own logits (max |diff| {err:.3g}, max "
                f"|logit| {scale:.3g}); this family's embedding or logit processing is not supported by kava")

    def check_pre_rope(self) -> None:
        """Refuse (`RopeUnsupported`) `pre_rope` keys kava cannot produce for this model.

        The keys of a RoPE model before the rotary embedding do not depend on absolute position: running the
        same tokens at positions p and p + 11 must give the same `unrotate`d cache keys in every layer."""
        self.ropes._check()
        if self.ropes.rotary is not None:
            self._check_shift_invariance()
        self._pre_rope_checked = True

    def _check_shift_invariance(self) -> None:
        x = self._probe()
        N = x.shape[1]
        keys = []
        was = self.training
        self.eval()
        try:
            with torch.no_grad(), self.autocast():
                for shift in (0, 11):
                    pos = torch.arange(shift, shift + N, device=x.device).unsqueeze(0)
                    cache = self.new_cache()
                    self.run(self.embed(x), torch.ones_like(x), pos, cache)
                    keys.append(self.ropes.unrotate(self.cache_kv(cache, 0, N)[0].float(), pos).float())
        finally:
            self.train(was)
        err, scale = (keys[0] - keys[1]).abs().max().item(), keys[0].abs().max().item()
        if not err <= 10 * self._tolerance() * scale + 1e-6:
            raise RopeUnsupported(
                f"loss.kv_key_space: pre_rope is not supported for {self.config.model_type}: undoing each layer's "
                f"rotary embedding does not give position-independent keys (max |diff| {err:.3g}, max |key| "
                f"{scale:.3g}); use kv_key_space: cache")

    def autocast(self):
        """bf16 autocast when the backbone weights are bf16 (GPU inference and LoRA training), else a no-op."""
        dtype = self.embed_tokens.weight.dtype
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.embed_tokens.weight.device.type, dtype=dtype)

    def compile_layers(self) -> None:
        """torch.compile each decoder layer (dynamic shapes): fuses the norm / RoPE / LoRA elementwise work
        and cuts kernel launches; the passes themselves stay eager Python."""
        for layer in self.decoder.layers:
            layer.compile(dynamic=True)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, S] -> embeddings [B, S, d]; special tokens come from `special_rows`."""
        V = self.embed_tokens.weight.shape[0]
        x = self.embed_tokens(ids.clamp(max=V - 1))
        rows = self.special_rows.to(x.dtype)
        # a `where` per special token, not rows[slot]: an index's backward accumulates every position's gradient
        # into the rows one position after the other (milliseconds a step on a GPU); a where's is a masked sum
        for j, tid in enumerate((self.ids.bot, self.ids.eot, self.ids.latent)):
            x = torch.where((ids == tid).unsqueeze(-1), rows[j], x)
        return x

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """LM head and the model's own final processing (Granite `logits_scaling`, Cohere `logit_scale`,
        Gemma final softcapping) on selected hidden states [N, d] -> [N, V]."""
        out = self.head(h)
        if self.logits_scaling is not None:
            out = out / self.logits_scaling
        if self.logit_scale is not None:
            out = out * self.logit_scale
        if self.final_softcap is not None:
            out = torch.tanh(out / self.final_softcap) * self.final_softcap
        if self.blocked_ids:  # an exported model's head has rows for <bot>/<eot>/<latent>: never predict them
            out = out.index_fill(-1, self._blocked_index(out.device), float("-inf"))
        return out

    def _blocked_index(self, device) -> torch.Tensor:
        """`blocked_ids` as a tensor on `device`, made once (a host list copied at every call would be a
        host-to-device copy inside each decode step: not allowed in a CUDA graph)."""
        key = (tuple(self.blocked_ids), str(device))
        if getattr(self, "_blocked", (None,))[0] != key:
            self._blocked = (key, torch.tensor(self.blocked_ids, device=device))
        return self._blocked[1]

    def run(self, embeds, mask, pos, cache, hidden_states: bool = False):
        """One decoder pass of a block of columns on top of `cache` (which it extends in place).

        embeds: ``[B, n, d]`` input embeddings of the new columns; mask: ``[B, S]`` attention mask of every
        column the block attends to (the cache's and its own); pos: ``[B, n]`` their position ids. Returns the
        HF decoder output (``last_hidden_state`` ``[B, n, d]``; all layers' with `hidden_states`). Every pass
        of kava (teacher, student, decoding) goes through here.
        """
        check_window(self.sliding_window, mask.shape[1])  # mask covers every column this pass attends to
        return self.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True,
                            output_hidden_states=hidden_states, **{cache_kwarg(type(self.decoder)): cache})

    def cache_from(self, kv) -> DynamicCache:
        """A new cache whose layer i starts with the i-th (keys, values) of `kv`, each [B, Hkv, N, D] (copies:
        appending to it never changes the given tensors)."""
        cache = self.new_cache()
        for i, (k, v) in enumerate(kv):
            cache.update(k, v, i)
        return cache

    def new_cache(self) -> DynamicCache:
        """A cache whose every layer keeps every column (also for sliding-window layers: `check_window`
        refuses sequences a window would cut), so the latent block can be cropped and re-run."""
        return DynamicCache()

    @staticmethod
    def cache_kv(cache: DynamicCache, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Columns [start, end) of every layer: ([L, B, Hkv, end-start, D], same)."""
        ks = torch.stack([layer.keys[:, :, start:end] for layer in cache.layers])
        vs = torch.stack([layer.values[:, :, start:end] for layer in cache.layers])
        return ks, vs

    def unrotate(self, k: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Keys as stored in the cache -> keys before each layer's rotary embedding (`kava.model.rope`).
        k: [L, B, Hkv, N, D]; pos: [B, N]. The first call verifies the model (`check_pre_rope`)."""
        if not self._pre_rope_checked:
            self.check_pre_rope()
        return self.ropes.unrotate(k, pos)

    def rotate(self, k: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Keys before the rotary embedding -> as the cache would store them at positions `pos`.
        k: [L, B, Hkv, N, D]; pos: [B, N]. The inverse of `unrotate`; identity without rotary embedding."""
        return self.ropes.rotate(k, pos)

    @staticmethod
    def _labelled(h: torch.Tensor, idx: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states [N, d] at the batch's labelled positions `idx` (flat over h's [B, S]) and their
        targets [N]. The positions come from the host-built batch, so no mask-to-index sync happens here."""
        return h.reshape(-1, h.shape[-1])[idx], tgt

    @staticmethod
    def _at(hs: tuple[torch.Tensor, ...], cols: torch.Tensor) -> torch.Tensor:
        """Every layer's output at one column per example: hidden_states[1:] -> [L, B, d]."""
        B = cols.shape[0]
        ar = torch.arange(B, device=cols.device)
        return torch.stack([h[ar, cols] for h in hs[1:]])

    # ---------------------------------------------------------------------------------- teacher
    def teacher_forward(self, tb: TeacherBatch, *, need_kv: bool = True, need_importance: bool = True,
                        key_space: str = "cache", importance_softmax: str = "cot",
                        share_question: bool = False) -> TeacherOut:
        """The teacher pass: hidden states at the labelled positions (for the CE) and at the CoDI column, CoT
        KV, importance.

        importance_softmax: "cot" (the paper's Listing 1) softmaxes the query rows' logits over the CoT
        keys only; "prefix" keeps the model's own probabilities over every visible key, CoT columns sliced.
        share_question: run the question block [0, Wq) (`tb.q_block`) as a pass of its own and the rest on its
        cache, and return the question's KV in `question_kv` for the student, which then does not recompute
        it (`student_forward(question_kv=...)`). Causal attention makes the question's KV independent of
        what follows, so the results are those of one pass; the question's activations then get the
        gradients of both the teacher's and the student's losses, as two separate passes would (with
        dropout active, teacher and student share one draw on the question).
        """
        x = self.embed(tb.ids)
        cache = self.new_cache() if need_kv or share_question else None
        W = 0  # columns [0, W) already in the cache
        question_kv = h_question = None
        if share_question:
            if tb.q_block is None:
                raise ValueError("share_question needs a teacher batch in the block layout (TeacherBatch.q_block)")
            W = tb.q_block
            h_question = self.run(x[:, :W], tb.mask[:, :W], tb.pos[:, :W], cache).last_hidden_state
            question_kv = [(layer.keys, layer.values) for layer in cache.layers]  # the next pass appends copies
        if need_importance:
            if importance_softmax == "cot":
                key_mask = torch.zeros_like(tb.mask, dtype=torch.bool)  # [B, S]: True on the CoT columns
                key_mask.scatter_(1, tb.cot_idx, tb.cot_valid)
            elif importance_softmax == "prefix":
                key_mask = None
            else:
                raise ValueError(f"eviction.importance_softmax: {importance_softmax!r}; allowed values: "
                                 f"{', '.join(IMPORTANCE_SOFTMAX)}")
            rows = (tb.query_idx - W).clamp(min=0)  # rows of this pass (padding rows, invalid, point at 0)
            with ImportanceCapture(rows, tb.query_valid, key_mask) as cap:
                out = self.run(x[:, W:], tb.mask, tb.pos[:, W:], cache, hidden_states=True)
        else:
            out = self.run(x[:, W:], tb.mask, tb.pos[:, W:], cache, hidden_states=True)
        h = out.last_hidden_state if h_question is None else torch.cat([h_question, out.last_hidden_state], 1)
        label_h, targets = self._labelled(h, tb.label_idx, tb.label_tgt)
        res = TeacherOut(label_h, targets, self._at(out.hidden_states, tb.codi_col - W), head=self.logits,
                         question_kv=question_kv)
        if need_kv:
            L = len(cache.layers)
            B, C = tb.cot_idx.shape
            k_all = torch.stack([layer.keys for layer in cache.layers])  # [L, B, Hkv, S, D]
            v_all = torch.stack([layer.values for layer in cache.layers])
            _, _, Hkv, S, D = k_all.shape
            gidx = tb.cot_idx.view(1, B, 1, C, 1).expand(L, B, Hkv, C, D)
            res.cot_k = torch.gather(k_all, 3, gidx)
            res.cot_v = torch.gather(v_all, 3, gidx)
            if key_space == "pre_rope":
                res.cot_k = self.unrotate(res.cot_k, torch.gather(tb.pos, 1, tb.cot_idx))
        if need_importance:
            imp = cap.stacked()  # [L, B, Hkv, S]
            res.importance = torch.gather(imp, 3, tb.cot_idx.view(1, B, 1, C).expand(imp.shape[0], B, imp.shape[2], C))
        return res

    # ---------------------------------------------------------------------------------- student
    def _shift_project(self, h_bot: torch.Tensor, h_slots: torch.Tensor) -> torch.Tensor:
        """Jacobi update: slot 1 <- proj(h at <bot>), slot i+1 <- proj(h at slot i). [B,d],[B,M,d] -> [B,M,d]."""
        return self.project(torch.cat([h_bot.unsqueeze(1), h_slots[:, :-1]], 1))

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """proj(h) [..., d] -> the next latents' input embeddings, in the dtype of the token embeddings. Under
        CUDA autocast the projection's LayerNorm returns fp32: fed back as is, the latent columns would run their
        residual stream and attention in fp32, and their fp32 keys would promote the whole cache (`torch.cat`)."""
        return self.proj(h).to(self.embed_tokens.weight.dtype)

    def student_forward(self, sb: StudentBatch, num_sweeps: int, *, student_mode: str = "jacobi",
                        key_space: str = "cache", keep_sweeps: str = "all", with_answer: bool = True,
                        question_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                        cache=None) -> StudentOut:
        """Latent student (SPEC §2): prefix pass, T Jacobi sweeps on the cached question, answer pass.

        student_mode="jacobi": prefix over question·<bot>·M placeholders gives z⁰ (shifted, projected); sweep t runs
        all M latents z^{t-1} at once on top of the question's cache and yields z^t; the answer pass runs on
        the cache of the last sweep. T=0: the answer attends to the placeholders (pause tokens).
        student_mode="sequential" (CODI): one latent per pass, z_{k+1} = proj(h_k), M passes after the prefix.
        keep_sweeps: "all" returns the latent KV of every sweep, "last" only the final one, "none" none.
        question_kv: the question block's KV from the teacher pass (`teacher_forward(share_question=True)`):
        the prefix pass then starts at <bot> on top of it; the same results as computing it here (up to
        dropout draws).
        cache: a static cache to run on instead of a new one (`kava.decode.DecodeStep`, whose CUDA graph records
        this pass): written from column 0, and `sb.mask` then spans all of its columns, every pass gets it
        whole, and causal masking hides the columns after each pass (no host read anywhere).
        """
        M, Qb = sb.num_latents, sb.q_block
        W = 0 if question_kv is None else Qb - 1  # columns [0, W) already in the cache; <bot> is column Qb - 1
        if question_kv is not None and question_kv[0][0].shape[2] != W:
            raise ValueError(f"question_kv covers {question_kv[0][0].shape[2]} columns; this batch's question "
                             f"block has {W}")
        if cache is not None and (question_kv is not None or not is_static(cache)):
            raise ValueError("student_forward(cache=...) takes a static cache, without question_kv")
        if cache is None:
            cache = self.new_cache() if question_kv is None else self.cache_from(question_kv)
            upto = lambda n: sb.mask[:, :n]  # noqa: E731  (the columns the cache holds after the pass)
        else:
            truncate_cache(cache, 0)
            upto = lambda n: sb.mask  # noqa: E731
        lat_pos = sb.pos[:, Qb:Qb + M]
        lk, lv = [], []
        passes = 0

        def record(z_cols_end: int):
            if keep_sweeps == "none":
                return
            k, v = self.cache_kv(cache, Qb, z_cols_end)
            if key_space == "pre_rope":
                k = self.unrotate(k, lat_pos[:, : z_cols_end - Qb])
            lk.append(k)
            lv.append(v)

        if student_mode == "jacobi":
            pre = self.run(self.embed(sb.ids[:, W:Qb + M]), upto(Qb + M), sb.pos[:, W:Qb + M], cache)
            passes += 1
            h = pre.last_hidden_state  # columns [W, Qb + M)
            if num_sweeps == 0:
                z = self.embed(sb.ids[:, Qb:Qb + M])
                record(Qb + M)
            else:
                z = self._shift_project(h[:, Qb - 1 - W], h[:, Qb - W:])
                for t in range(num_sweeps):
                    truncate_cache(cache, Qb)
                    out = self.run(z, upto(Qb + M), lat_pos, cache)
                    passes += 1
                    if keep_sweeps == "all" or t == num_sweeps - 1:
                        record(Qb + M)
                    if t < num_sweeps - 1:
                        h = out.last_hidden_state
                        z = torch.cat([z[:, :1], self.project(h[:, :-1])], 1)  # slot 1 stays
        elif student_mode == "sequential":
            pre = self.run(self.embed(sb.ids[:, W:Qb]), upto(Qb), sb.pos[:, W:Qb], cache)
            passes += 1
            zs = []
            if M:  # M = 0: Coconut's stage 0, a CoT between <bot> and <eot>
                z_k = self.project(pre.last_hidden_state[:, -1]).unsqueeze(1)  # [B, 1, d] at <bot>
            for k in range(M):
                zs.append(z_k)
                # a row whose slot k is masked out (`StudentBatch` with latent_counts) computes a thought
                # that no later column sees
                out = self.run(z_k, upto(Qb + k + 1), lat_pos[:, k:k + 1], cache)
                passes += 1
                z_k = self.project(out.last_hidden_state)
            z = torch.cat(zs, 1) if zs else pre.last_hidden_state[:, :0]  # [B, M, d]
            record(Qb + M)
        else:
            raise ValueError(f"student mode {student_mode!r}; allowed values: jacobi, sequential")

        res = StudentOut(label_h=None, targets=None, hidden=None, head=self.logits, latent_k=lk, latent_v=lv, latents=z,
                         forward_passes=passes, cache=cache)
        if with_answer:
            self.answer_pass(sb, res)
        return res

    def answer_pass(self, sb: StudentBatch, res: StudentOut) -> StudentOut:
        """<eot> · prompt · answer on top of the latents' cache; fills label_h, targets, hidden in `res`."""
        A0 = sb.answer_start
        out = self.run(self.embed(sb.ids[:, A0:]), sb.mask, sb.pos[:, A0:], res.cache, hidden_states=True)
        res.label_h, res.targets = self._labelled(out.last_hidden_state, sb.label_idx, sb.label_tgt)
        res.hidden = self._at(out.hidden_states, sb.codi_col - A0)
        res.forward_passes += 1
        return res

    def student_forward_naive(self, sb: StudentBatch, num_sweeps: int, key_space: str = "cache") -> StudentOut:
        """Reference for tests and benchmarks: every sweep recomputes the whole sequence, no cache reuse."""
        M, Qb = sb.num_latents, sb.q_block
        P = Qb + M
        q_emb = self.embed(sb.ids[:, :Qb])
        z = self.embed(sb.ids[:, Qb:P])
        lk, lv = [], []

        def full(zz, hidden=False, with_answer=False):
            x = torch.cat([q_emb, zz] + ([self.embed(sb.ids[:, P:])] if with_answer else []), 1)
            end = x.shape[1]
            cache = self.new_cache()
            out = self.run(x, sb.mask[:, :end], sb.pos[:, :end], cache, hidden_states=hidden)
            return out, cache

        out, cache = full(z)
        if num_sweeps > 0:
            h = out.last_hidden_state
            z = self._shift_project(h[:, Qb - 1], h[:, Qb:P])  # <bot> is column Qb - 1
            for t in range(num_sweeps):
                out, cache = full(z)
                k, v = self.cache_kv(cache, Qb, P)
                if key_space == "pre_rope":
                    k = self.unrotate(k, sb.pos[:, Qb:P])
                lk.append(k)
                lv.append(v)
                if t < num_sweeps - 1:
                    h = out.last_hidden_state
                    z = torch.cat([z[:, :1], self.project(h[:, Qb:P - 1])], 1)
        else:
            k, v = self.cache_kv(cache, Qb, P)
            lk.append(self.unrotate(k, sb.pos[:, Qb:P]) if key_space == "pre_rope" else k)
            lv.append(v)
        out, _ = full(z, hidden=True, with_answer=True)
        label_h, targets = self._labelled(out.last_hidden_state[:, P:], sb.label_idx, sb.label_tgt)
        hidden = self._at(out.hidden_states, sb.codi_col)
        return StudentOut(label_h, targets, hidden, self.logits, lk, lv, z, forward_passes=num_sweeps + 2)
