"""Typed, validated run configuration: dataclasses + YAML presets + `key=value` overrides.

Every section is a dataclass; `load_config` builds them from YAML with strict checks: an unknown key,
a wrong type or a value outside its allowed set is a `ConfigError` whose message names the full key
(`optim.lr`) and what is allowed. Cross-field checks (`validate`) run before any model is loaded.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import torch
import yaml

from kava import curriculum, eviction, losses
from kava.data import format as data_format
from kava.data import readers, synthetic
from kava.model import reasoner
from kava.model.capture import ATTN_CHOICES
from kava.model.families import FAMILIES
from kava.spec import KV_METHODS, METHODS, spec_of

# The allowed values of a key come from the module that owns them (`Literal[OWNER.TUPLE]` is
# `Literal[*OWNER.TUPLE]`): a new eviction rule, data format, loss kind or method is added there only.
EVICTION_METHODS = eviction.METHODS
DATA_FORMATS = readers.FORMATS
LOSS_KINDS = losses.KINDS


class ConfigError(ValueError):
    """A bad configuration value; the message names the key."""


def _need(cond, msg: str) -> None:
    """A section's check: `msg` (which names the key and what it allows) as a ConfigError unless `cond`."""
    if not cond:
        raise ConfigError(msg)


@dataclass
class ModelConfig:
    name_or_path: str | None = None  # hub id or local dir of a HF causal LM (or of a kava run's model/)
    gguf_file: str | None = None  # a GGUF file inside name_or_path (converted once to a cached HF directory)
    tokenizer: str | None = None  # defaults to name_or_path
    # Build a model from scratch (random init, full training): a dict of HF config fields plus
    # `family:` one of kava.model.families.FAMILIES. Used for the synthetic backbone and for speed benchmarks.
    from_scratch: dict | None = None
    init_from: str | None = None  # a kava run dir whose final weights initialise this model (e.g. a CoT backbone)
    # kava.model.capture.ATTN_CHOICES: auto | sdpa | eager: kava's capturing attention over HF's SDPA kernel or the model's own eager
    # attention; auto = sdpa where HF runs the model under SDPA without softcapping (kava.model.capture:install)
    attn_implementation: str = "auto"
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False

    def check(self) -> None:
        _need(self.name_or_path or self.from_scratch or self.init_from,
              "model: set model.name_or_path (hub id or local dir), model.from_scratch, or model.init_from")
        if self.gguf_file is not None:
            _need(self.name_or_path is not None and self.from_scratch is None and self.init_from is None,
                  "model.gguf_file: names a file inside model.name_or_path; set model.name_or_path (the directory or "
                  "hub id holding it) and neither model.from_scratch nor model.init_from")
        if self.from_scratch is not None:
            fam = self.from_scratch.get("family")
            _need(fam in FAMILIES,
                  f"model.from_scratch.family: {fam!r} is not allowed; allowed values: {', '.join(FAMILIES)}")
        attn = self.attn_implementation
        _need(attn in ATTN_CHOICES,
              f"model.attn_implementation: {attn!r} is not allowed; allowed values: {', '.join(ATTN_CHOICES)}"
              + (" (kava captures the importance block inside attention and lays padding inside sequences; flash "
                 "attention kernels expose neither, so they are not supported)" if "flash" in attn else ""))


@dataclass
class LoraSection:
    r: int = 128
    alpha: int = 32
    dropout: float = 0.1
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # dropout fused into lora_A: keeps a bool mask, not each adapter's dropped input (kava.model.lora_dropout)
    fused_dropout: bool = False

    def check(self) -> None:
        _need(self.r >= 1, "lora.r: must be >= 1")
        _need(0 <= self.dropout < 1, "lora.dropout: must be in [0, 1)")
        _need(len(self.target_modules) > 0, "lora.target_modules: must not be empty")
        _need(not (self.dropout > 0 and "lm_head" in self.target_modules),
              "lora.target_modules: lm_head with lora.dropout > 0 is not supported (the CE recomputes the LM head "
              "in backward without replaying dropout draws); set lora.dropout: 0 or drop lm_head")


@dataclass
class LatentConfig:
    num_latents: int = 24  # M
    num_sweeps: int = 3  # T (0 = pause tokens)
    projection: Literal[reasoner.PROJECTIONS] = "mlp"
    proj_hidden: int | None = None  # MLP width; None = the model's hidden size
    proj_layernorm: bool = True  # CODI's projection ends with a LayerNorm

    def check(self) -> None:
        _need(self.num_latents >= 1, f"latent.num_latents: must be >= 1, got {self.num_latents}")
        _need(self.num_sweeps >= 0, f"latent.num_sweeps: must be >= 0, got {self.num_sweeps}")
        _need(self.proj_hidden is None or self.proj_hidden >= 1, "latent.proj_hidden: must be >= 1 or null")


@dataclass
class CoconutConfig:
    """Coconut's curriculum (Hao et al. 2024; `kava.curriculum`): at stage s the first s CoT steps are replaced by
    s·c continuous thoughts. Defaults: the official GSM8k configuration."""

    thoughts_per_step: int = 2  # c
    max_stages: int = 3  # stages after the last one replace every step (latent.num_latents = max_stages · c)
    epochs_per_stage: float = 3.0
    reset_optimizer: bool = True  # a fresh AdamW state at each `reset_every` boundary
    # "epoch": at every epoch start, as the official run.py with reset_optimizer; "stage": at stage changes only
    reset_every: Literal["epoch", "stage"] = "epoch"
    mix_prob: float = 0.0  # share of examples trained at a random stage (official `uniform_prob`)
    pad_latents_to_max: bool = True  # past the last stage every example gets max_stages · c thoughts

    def check(self) -> None:
        _need(self.thoughts_per_step >= 1, f"coconut.thoughts_per_step: must be >= 1, got {self.thoughts_per_step}")
        _need(self.max_stages >= 1, f"coconut.max_stages: must be >= 1, got {self.max_stages}")
        _need(self.epochs_per_stage > 0, f"coconut.epochs_per_stage: must be > 0, got {self.epochs_per_stage}")
        _need(0 <= self.mix_prob <= 1, f"coconut.mix_prob: must be in [0, 1], got {self.mix_prob}")


@dataclass
class IcotConfig:
    """Stepwise internalization (Deng et al. 2024; `kava.curriculum`): CoT tokens removed from the front as
    training goes on. Defaults: the official GSM8k command."""

    tokens_per_epoch: float = 8.0  # scheduled removal grows by this many tokens per epoch
    smoothing_lambda: float | None = 4.0  # each example removes P(o) ∝ exp(-λ·o) extra tokens; null or inf: none
    remove_all_beyond: int | None = 39  # once the schedule reaches this many tokens, remove the whole CoT
    reset_optimizer: bool = True  # a fresh AdamW state whenever the scheduled removal grows
    # the kept CoT tokens, the prompt and the answer keep their original position ids (the official
    # --keep_position); evaluation places the generated tokens after the removed ones. Needs one CoT length
    keep_position: bool = False

    def check(self) -> None:
        _need(self.tokens_per_epoch > 0, f"icot.tokens_per_epoch: must be > 0, got {self.tokens_per_epoch}")
        _need(self.smoothing_lambda is None or self.smoothing_lambda > 0,
              f"icot.smoothing_lambda: must be > 0 or null (no smoothing), got {self.smoothing_lambda}")
        _need(self.remove_all_beyond is None or self.remove_all_beyond >= 1,
              f"icot.remove_all_beyond: must be >= 1 or null, got {self.remove_all_beyond}")


@dataclass
class EvictionConfig:
    method: Literal[EVICTION_METHODS] = "rkv"
    lam: float = 0.1  # λ: weight of importance vs redundancy
    importance_queries: Literal[data_format.QUERY_MODES] = "answer"
    cot_tail_window: int = 8  # α: the last α CoT positions as queries when importance_queries=cot_tail
    # "cot": the paper's Listing 1 (softmax of the query rows' logits over the CoT keys only);
    # "prefix": the model's own softmax over every visible key, restricted to the CoT columns afterwards.
    importance_softmax: Literal[reasoner.IMPORTANCE_SOFTMAX] = "cot"

    def check(self) -> None:
        _need(0.0 <= self.lam <= 1.0, f"eviction.lam: must be in [0, 1], got {self.lam}")
        _need(self.cot_tail_window >= 1, f"eviction.cot_tail_window: must be >= 1, got {self.cot_tail_window}")


@dataclass
class LossConfig:
    ce_student: float = 1.0
    ce_teacher: float = 1.0
    alpha_codi: float = 10.0  # α1
    alpha_kv: float = 1.0  # α2
    kv_loss: Literal[LOSS_KINDS] = "smooth_l1"
    kv_layer_std: bool = True
    kv_supervision: Literal[losses.SUPERVISION] = "last"
    kv_key_space: Literal["cache", "pre_rope"] = "cache"
    codi_loss: Literal[LOSS_KINDS] = "smooth_l1"
    codi_std: Literal[losses.CODI_STD] = "layer"
    codi_layers: list[int] | None = None  # None = all transformer layers
    # Where L_CODI compares teacher and student: "answer" = the position that predicts the first
    # non-whitespace answer token (as the official CODI code); "prompt" = the last answer-prompt token.
    codi_position: Literal[data_format.CODI_POSITIONS] = "answer"

    def check(self) -> None:
        for k in ("ce_student", "ce_teacher", "alpha_codi", "alpha_kv"):
            _need(getattr(self, k) >= 0, f"loss.{k}: must be >= 0, got {getattr(self, k)}")
        if self.codi_layers is not None:
            _need(len(self.codi_layers) > 0, "loss.codi_layers: must be null (all layers) or a non-empty list")


@dataclass
class DataConfig:
    source: str = "synthetic"  # hub id, local file, or "synthetic" (generated into the run dir)
    format: Literal[DATA_FORMATS] = "auto"
    split: str = "train"
    valid_source: str | None = None  # None: the source's validation split (hub) or `synthetic`
    valid_split: str = "validation"
    question_field: str = "question"
    steps_field: str = "steps"
    answer_field: str = "answer"
    # for synthetic data and GSM8k-style JSONL; "both" (synthetic only) trains on each problem in both styles
    cot_style: Literal[(*readers.COT_STYLES, "both")] = "equation"
    drop_last_step: bool = True
    answer_prompt: str = "The answer is:"
    # written after every question (a space between): with answer_prompt "$ ####", "$" gives iCoT's official
    # multiplication layout `question SEP CoT SEP #### answer`, whose two separators stay when the CoT is removed
    question_suffix: str = ""
    max_question_tokens: int = 256
    max_cot_tokens: int = 256
    max_answer_tokens: int = 16
    strict: bool = False
    limit: int | None = None  # use the first N training records
    valid_limit: int | None = 200
    # drop training records whose question is also a validation question (counted skip): e.g. GSM8k's train
    # file holds the 500 questions of GSM8k-Aug's valid split
    exclude_valid_questions: bool = False
    # synthetic task generation (used when source == "synthetic")
    # arithmetic: multi-step word problems; pointer: k-hop pointer chasing over synth_num_symbols symbols,
    # k in [synth_min_steps, synth_max_steps] (the hard split: synth_max_steps + 1 .. + 2); multiplication:
    # iCoT's synth_digits x synth_digits products (kava.data.multiplication)
    synth_task: Literal[synthetic.SYNTH_TASKS] = "arithmetic"
    synth_train_size: int = 20000
    synth_eval_size: int = 500
    synth_min_steps: int = 2
    synth_max_steps: int = 4
    synth_max_value: int = 99
    synth_seed: int = 0
    synth_num_symbols: int = 20  # pointer task: N, the symbols 10 .. 10+N-1 (chance 1/N)
    synth_digits: int = 4  # multiplication: digits of each operand
    # multiplication: tokenise its lines without spaces (5632*7434||55561+006490(551111)...), one token per digit
    # and symbol for tokenizers that split digits but keep the space apart (SmolLM2, Qwen2.5)
    mult_compact: bool = False
    # multiplication: files (any readers' format) whose questions no generated split may hold, e.g. the
    # published valid and test sets
    synth_exclude: list[str] = field(default_factory=list)
    tokenizer_vocab_size: int = 512  # local tokenizer for from_scratch models

    def check(self) -> None:
        _need(self.cot_style != "both" or self.source == "synthetic",
              "data.cot_style: 'both' is only available for data.source: synthetic; allowed values: equation, nl, "
              "nl_annotated")
        _need(self.cot_style != "nl_annotated" or self.source != "synthetic",
              "data.cot_style: 'nl_annotated' (GSM8k's answer text with its <<...>> annotations) has no synthetic "
              "form; allowed values for data.source: synthetic: equation, nl, both")
        for k in ("max_question_tokens", "max_cot_tokens", "max_answer_tokens"):
            _need(getattr(self, k) >= 1, f"data.{k}: must be >= 1")
        _need(self.synth_min_steps >= 1 and self.synth_max_steps >= self.synth_min_steps,
              "data.synth_min_steps / data.synth_max_steps: need 1 <= min <= max")
        if self.synth_task == "multiplication":
            _need(1 <= self.synth_digits <= 20, f"data.synth_digits: must be in [1, 20], got {self.synth_digits}")
        if self.synth_task == "pointer":
            _need(2 <= self.synth_num_symbols <= 90, f"data.synth_num_symbols: must be in [2, 90] (the symbols are "
                                                     f"the numbers 10..99), got {self.synth_num_symbols}")
            _need(self.synth_max_steps + 2 < self.synth_num_symbols,
                  f"data.synth_max_steps: the pointer task's hard split has synth_max_steps + 2 hops, which must be "
                  f"fewer than data.synth_num_symbols; got synth_max_steps={self.synth_max_steps}, "
                  f"synth_num_symbols={self.synth_num_symbols}")


@dataclass
class OptimConfig:
    lr: float = 8e-4
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    effective_batch: int = 128
    micro_batch: int = 32
    grad_clip: float = 2.0
    epochs: float = 10.0
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    compile: bool = False
    # CUDA graphs of the micro-step (kava.training.graphs): auto (on for one CUDA process when nothing excludes them:
    # DDP, compile, gradient checkpointing, random eviction, MoE and sliding-window models), true (refused where
    # excluded), false
    cuda_graphs: bool | Literal["auto"] = "auto"
    graph_buckets: float = 1.25  # with CUDA graphs, block widths are padded up a geometric series of this growth
    max_graphs: int = 32  # captured shapes at most; a batch of a further shape runs eagerly
    # with graphs, the LM head and the CE run on the batch's labelled total padded up a geometric series of this
    # growth, not on the block area (B x (CoT + answer) widths, every pad a row): fewer rows, more shapes. null:
    # the area. Off until measured on a GPU (benchmarks/gpu_next.sh labels)
    graph_label_buckets: float | None = None
    # split each optimizer step's examples into micro-batches of similar length (question + CoT): less padding;
    # the step's CE gradient is unchanged (step-wide denominators), per-micro-batch normalisers regroup
    group_by_length: bool = True
    # AdamW's fused kernel (torch's `fused=True`: one kernel over every parameter instead of a multi-tensor loop);
    # the same update up to float rounding. Off until measured on a GPU (benchmarks/train_loop_bench.py)
    fused_adamw: bool = False
    # the CE's gradients formed in the forward pass (kava.losses.fused_head_cross_entropy): one head matmul fewer
    # per labelled row than the checkpointed CE; a trainable head keeps a gradient of its size. Off until measured
    fused_ce: bool = False

    def check(self) -> None:
        _need(self.lr > 0, f"optim.lr: must be > 0, got {self.lr}")
        _need(0 <= self.warmup_ratio < 1, f"optim.warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        _need(self.weight_decay >= 0, "optim.weight_decay: must be >= 0")
        _need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas: two numbers in [0, 1)")
        _need(self.micro_batch >= 1, "optim.micro_batch: must be >= 1")
        _need(self.effective_batch >= self.micro_batch and self.effective_batch % self.micro_batch == 0,
              f"optim.effective_batch ({self.effective_batch}) must be a multiple of optim.micro_batch "
              f"({self.micro_batch})")
        _need(self.grad_clip >= 0, "optim.grad_clip: must be >= 0 (0 disables)")
        _need(self.epochs > 0, "optim.epochs: must be > 0")
        _need(self.max_steps is None or self.max_steps >= 1, "optim.max_steps: must be >= 1 or null")
        _need(self.graph_buckets > 1.0, f"optim.graph_buckets: must be > 1 (the growth of the width series), got "
                                        f"{self.graph_buckets}")
        _need(self.max_graphs >= 1, f"optim.max_graphs: must be >= 1, got {self.max_graphs}")
        _need(self.graph_label_buckets is None or self.graph_label_buckets > 1.0,
              f"optim.graph_label_buckets: null or > 1 (the growth of the label series), got {self.graph_label_buckets}")


@dataclass
class RunConfig:
    seed: int = 42
    output_dir: str = "runs"
    name: str | None = None  # run dir name; default <preset or method>-s<seed>
    log: list[str] = field(default_factory=lambda: ["jsonl", "tensorboard"])  # + "wandb"
    wandb_project: str = "kava"
    wandb_entity: str | None = None  # W&B team or user; None = the logged-in user's default
    wandb_tags: list[str] = field(default_factory=list)
    log_every: int = 10
    eval_every: int | None = None  # optimizer steps; None = once per epoch
    save_every: int | None = None  # optimizer steps; None = at each evaluation
    eval_max_new_tokens: int = 16
    eval_max_cot_tokens: int = 128
    eval_batch_size: int = 64
    # evaluation replays each batch shape's decode step as a CUDA graph (kava.decode.DecodeGraphs): auto (on a
    # GPU), true (refused without one), false (the same static-cache step, eager)
    eval_cuda_graphs: bool | Literal["auto"] = "auto"
    nan_policy: Literal["stop", "skip"] = "stop"
    grad_share_every: int = 50  # per-term gradient norms every N optimizer steps (methods of 2+ loss terms); 0 = off
    deterministic: bool = False

    def check(self) -> None:
        allowed_logs = {"jsonl", "tensorboard", "wandb", "stdout"}
        bad = [x for x in self.log if x not in allowed_logs]
        _need(not bad, f"run.log: unknown backend(s) {bad}; allowed values: {', '.join(sorted(allowed_logs))}")
        _need(self.log_every >= 1, "run.log_every: must be >= 1")
        _need(bool(self.wandb_project.strip()), "run.wandb_project: must not be empty")
        _need(self.wandb_entity is None or bool(self.wandb_entity.strip()),
              "run.wandb_entity: must not be empty (null = default)")
        bad = [t for t in self.wandb_tags if not t.strip() or len(t) > 64]
        _need(not bad, f"run.wandb_tags: each tag must be 1-64 characters, got {bad}")
        for k in ("eval_every", "save_every"):
            _need(getattr(self, k) is None or getattr(self, k) >= 1,
                  f"run.{k}: must be >= 1 or null, got {getattr(self, k)}")
        _need(self.grad_share_every >= 0, f"run.grad_share_every: must be >= 0 (0 = off), got {self.grad_share_every}")
        _need(self.eval_batch_size >= 1, f"run.eval_batch_size: must be >= 1, got {self.eval_batch_size}")
        _need(self.eval_max_new_tokens >= 1, f"run.eval_max_new_tokens: must be >= 1, got {self.eval_max_new_tokens}")
        _need(self.eval_max_cot_tokens >= 0, f"run.eval_max_cot_tokens: must be >= 0, got {self.eval_max_cot_tokens}")


@dataclass
class Config:
    method: Literal[METHODS] = "kava"  # kava.spec.SPECS
    preset: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSection | None = field(default_factory=LoraSection)  # null = full fine-tuning
    latent: LatentConfig = field(default_factory=LatentConfig)
    coconut: CoconutConfig = field(default_factory=CoconutConfig)
    icot: IcotConfig = field(default_factory=IcotConfig)
    eviction: EvictionConfig = field(default_factory=EvictionConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    # what `config_from_dict` derived instead of reading ("key=value (why)"), for the start summary; not a
    # field, so never saved: the run's config.yaml holds the values themselves
    derived: typing.ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def hash(self) -> str:
        """Short hash of the resolved config (for eval summaries)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

    @property
    def spec(self):
        """The method's row of `kava.spec.SPECS` (`kava.spec.MethodSpec`)."""
        return spec_of(self.method)


# --------------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with type checks that name the key.


def _type_name(tp) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp, value: Any, key: str):
    origin = get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key)
            except ConfigError as e:
                errors.append(str(e))
        if len(errors) == 1 and not errors[0].startswith(f"{key}: "):
            raise ConfigError(errors[0])  # a nested error (e.g. lora.rank in an optional section) names its key
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; allowed values: {', '.join(map(str, allowed))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _from_dict(tp, value, key + ".")
    if origin is list:
        (item,) = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `8e-4` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def _leaf_keys(cls=None, prefix: str = "") -> list[str]:
    """Every dotted key of the config (sections walked, optional ones too)."""
    cls = cls or Config
    out = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        sec = tp if dataclasses.is_dataclass(tp) else next((a for a in get_args(tp) if dataclasses.is_dataclass(a)), None)
        out += _leaf_keys(sec, prefix + f.name + ".") if sec is not None else [prefix + f.name]
    return out


def did_you_mean(key: str, names: list[str], prefix: str = "") -> str:
    """`; did you mean optim.lr?` for a mistyped key: the closest name of its section, or (at the top level,
    where a key may have lost its section) the closest key anywhere; "" when nothing is close."""
    import difflib

    if key in HF_ALIASES or key in HF_DERIVED:  # a Hugging Face name inside a section (optim.learning_rate)
        return (f"; did you mean {HF_ALIASES.get(key) or HF_DERIVED[key]}? ({key} is its Hugging Face name, "
                "accepted at the top level)")
    by_leaf = {k.rsplit(".", 1)[-1]: k for k in _leaf_keys()} if not prefix else {}
    if key in by_leaf:  # a key without its section (lr -> optim.lr)
        return f"; did you mean {by_leaf[key]}?"
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {prefix}{close[0]}?"
    close = difflib.get_close_matches(key, list(by_leaf), n=1, cutoff=0.6)
    if close:
        return f"; did you mean {by_leaf[close[0]]}?"
    close = difflib.get_close_matches(key, list(HF_ALIASES), n=1, cutoff=0.75) if not prefix else []
    return f"; did you mean {HF_ALIASES[close[0]]}? (Hugging Face name: {close[0]})" if close else ""


def _from_dict(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        hint = did_you_mean(unknown[0], sorted(names), prefix)
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(prefix + u for u in unknown)}{hint} "
            f"(allowed keys in {prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(names))})"
        )
    kwargs = {name: _coerce(hints[name], value, prefix + name) for name, value in data.items()}
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------------
# Presets, YAML and overrides.

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # package data: ships in the wheel


def preset_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        return p
    cand = CONFIG_DIR / f"{name_or_path}.yaml"
    if cand.exists():
        return cand
    raise ConfigError(f"unknown preset {name_or_path!r}; presets: {', '.join(preset_names())} (or give a YAML path)")


def _set_nested(d: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = d
    for i, p in enumerate(parts[:-1]):
        nxt = cur.get(p)
        if nxt is None:
            nxt = {}
            cur[p] = nxt
        if not isinstance(nxt, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: is not a section, cannot set {dotted}")
        cur = nxt
    cur[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """`optim.lr=1e-4` -> ("optim.lr", 1e-4); the value is parsed as YAML (numbers, bools, lists, null)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=1e-4)")
    key, raw = item.split("=", 1)
    text = raw.strip()
    try:
        value = yaml.safe_load(raw) if text else ""
    except yaml.YAMLError:
        value = text
    # Plain text that YAML would misread stays text: `The answer is:` is not a mapping, `####` not a comment.
    if isinstance(value, dict) and not text.startswith("{"):
        value = text
    if value is None and text not in ("null", "~", "Null", "NULL"):
        value = text
    # ... nor is ` #` inside it a comment: YAML would read `$ ####` as `$` (a command line holds no comments)
    if any(c + "#" in text for c in " \t") and text[0] not in "'\"[{":
        value = text
    return key.strip(), value


# Hugging Face TrainingArguments names accepted for kava's keys (at the top level of a YAML file or in --set)
HF_ALIASES = {
    "learning_rate": "optim.lr", "per_device_train_batch_size": "optim.micro_batch",
    "max_grad_norm": "optim.grad_clip", "num_train_epochs": "optim.epochs", "max_steps": "optim.max_steps",
    "weight_decay": "optim.weight_decay", "warmup_ratio": "optim.warmup_ratio",
    "lr_scheduler_type": "optim.schedule", "logging_steps": "run.log_every", "eval_steps": "run.eval_every",
    "save_steps": "run.save_every", "report_to": "run.log", "seed": "run.seed", "output_dir": "run.output_dir",
    "run_name": "run.name", "gradient_checkpointing": "model.gradient_checkpointing",
}

# Hugging Face names whose kava key holds another quantity: the bf16 / fp16 flags are `optim.precision`, and since
# kava's batch key is the effective batch (kept whatever the process count), HF's accumulation steps become
# `optim.micro_batch` x steps (`derived_value`)
HF_DERIVED = {"bf16": "optim.precision", "fp16": "optim.precision",
              "gradient_accumulation_steps": "optim.effective_batch"}


def derived_value(alias: str, value: Any, section: dict) -> tuple[Any, str]:
    """(kava's value for the `HF_DERIVED` name `alias`, how it was derived) given the config's `section`."""
    if alias == "gradient_accumulation_steps":
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"gradient_accumulation_steps: expected a positive integer, got {value!r}")
        micro = section.get("micro_batch", OptimConfig.micro_batch)
        return micro * value, (f" = optim.micro_batch {micro} x {value}; kava keeps this effective batch on any "
                               "number of processes (the accumulation adapts)")
    if not isinstance(value, bool):
        raise ConfigError(f"{alias}: expected true or false, got {value!r}")
    return ("bf16" if value else "fp32"), ""


def _alias_value(alias: str, value: Any) -> Any:
    if alias == "report_to":  # a name or a list; "none" = no backend but kava's own jsonl, "all" = every one
        names = [value] if isinstance(value, str) else list(value or [])
        if "all" in names:
            return ["tensorboard", "wandb"]
        return [n for n in names if n != "none"]
    if alias == "max_steps" and value == -1:  # HF's "no limit"
        return None
    return value


def apply_aliases(data: dict) -> None:
    """Replace Hugging Face TrainingArguments names (`HF_ALIASES`) by kava's keys, in place, printing the
    canonical name; an alias given beside its kava key is refused."""
    for alias in [k for k in data if k in HF_ALIASES]:
        key = HF_ALIASES[alias]
        section, leaf = key.split(".")
        sec = data.get(section)
        if isinstance(sec, dict) and leaf in sec:
            raise ConfigError(f"{alias} and {key} are both given ({alias} is the Hugging Face name of {key}); "
                              "keep one")
        if sec is None:
            data[section] = sec = {}
        sec[leaf] = _alias_value(alias, data.pop(alias))
        print(f"[kava] {alias} (a Hugging Face TrainingArguments name) is kava's {key}: {key}={sec[leaf]}", flush=True)
    if data.get("fp16") is True:
        raise ConfigError("fp16=true: kava trains in bf16 or fp32, not fp16; set optim.precision=bf16 (or bf16=true)")
    if data.get("fp16") is False:  # HF's default: full precision unless bf16 says otherwise
        data.pop("fp16")
    for alias in [k for k in data if k in HF_DERIVED]:  # after the aliases: optim.micro_batch may come from one
        key = HF_DERIVED[alias]
        section, leaf = key.split(".")
        sec = data.get(section)
        if sec is None:
            data[section] = sec = {}
        if not isinstance(sec, dict) or leaf in sec:
            raise ConfigError(f"{alias} and {key} are both given ({alias} is the Hugging Face name of {key}); keep one")
        sec[leaf], how = derived_value(alias, data.pop(alias), sec)
        print(f"[kava] {alias} (a Hugging Face TrainingArguments name) sets kava's {key}: {key}={sec[leaf]}{how}",
              flush=True)


def config_from_dict(data: dict, overrides: list[str] | None = None) -> Config:
    data = copy.deepcopy(data or {})
    file_method, file_keys = data.get("method", Config.method), _given_keys(data)
    set_keys, names = set(), {**HF_ALIASES, **HF_DERIVED}
    for item in overrides or []:
        key, value = parse_override(item)
        set_keys.add(names.get(key, key))
        # an override wins over the file's value, under either name
        for name in ([names[key]] if key in names else []) + [a for a, k in names.items() if k == key]:
            section, _, leaf = name.rpartition(".")
            holder = data.get(section) if section else data
            if isinstance(holder, dict):
                holder.pop(leaf, None)
        _set_nested(data, key, value)
    apply_aliases(data)
    cfg = _from_dict(Config, data)
    # a file's keys were chosen for its own method: under another one (`--set method=...`) only `--set` is explicit
    explicit = set_keys | (file_keys if file_method == cfg.method else set())
    cfg.derived = derive_method_keys(cfg, explicit)
    validate(cfg)
    return cfg


def _given_keys(data: dict, prefix: str = "") -> set[str]:
    """The dotted keys a (nested) config dict sets."""
    out = set()
    for k, v in data.items():
        out |= _given_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
    return out


def derive_method_keys(cfg: Config, explicit: set[str]) -> tuple[str, ...]:
    """Set, in place, the keys the method fixes that `explicit` (the keys the user chose for this method) does
    not name: Coconut's M = coconut.max_stages x coconut.thoughts_per_step thoughts and its identity projection
    (a preset's latent.num_latents is the one of its own method). Returns what changed, for the start summary;
    an explicit value that disagrees is left for `validate` to refuse."""
    cls = curriculum.schedule_class(cfg)
    out = cls.derive(cfg, explicit) if cls is not None else []
    return tuple(out)


# Keys that name local files or directories (or hub ids): relative ones in a YAML file are read from its directory.
PATH_KEYS = ("data.source", "data.valid_source", "data.synth_exclude", "model.name_or_path", "model.tokenizer",
             "model.init_from")


def resolve_relative_paths(data: dict, base: Path) -> None:
    """The rule for relative paths in a YAML config file (in place): a `PATH_KEYS` value that starts with
    ``./`` or ``../``, or that exists beside the file, is made absolute against the file's directory `base`;
    anything else stays as written (a hub id, ``synthetic``, an absolute or ``~`` path, or a path from the
    current directory). A preset shipped in the wheel has no directory of its own: its paths, and `--set`
    values, are read from the current directory."""
    def resolved(value):
        if isinstance(value, list):  # a list of paths (data.synth_exclude): each one by the same rule
            return [resolved(v) for v in value]
        if not isinstance(value, str) or not value or value == "synthetic" or value.startswith("~"):
            return value
        if Path(value).is_absolute():
            return value
        if value.startswith(("./", "../")) or (base / value).exists():
            return os.path.normpath(base.absolute() / value)
        return value

    for dotted in PATH_KEYS:
        section, key = dotted.split(".")
        sec = data.get(section)
        if isinstance(sec, dict) and key in sec:
            sec[key] = resolved(sec[key])


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None, *,
                resolve_paths: bool = True) -> Config:
    """Load a preset name (`llama1b_aug`) or a YAML path, apply `key=value` overrides, validate.

    resolve_paths: a YAML file's relative paths are read from its directory (`resolve_relative_paths`); off for
    a run's own config.yaml, which kava wrote with the paths as the run used them."""
    data: dict = {}
    if name_or_path:
        path = resolve_config_path(name_or_path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        data.setdefault("preset", path.stem)
        if resolve_paths and path.resolve().parent != CONFIG_DIR:
            resolve_relative_paths(data, path.parent)
    return config_from_dict(data, overrides)


def validate(cfg: Config) -> None:
    """Each section's own checks (`check()`), then the rules across sections; each error names the key(s) and the
    allowed values."""
    sections = [getattr(cfg, f.name) for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))]
    for section in sections:  # lora is None under full fine-tuning
        section.check()
    if (cls := curriculum.schedule_class(cfg)) is not None and (bad := cls.check(cfg)):
        raise ConfigError(bad[0])  # what the method's curriculum needs of the rest of the config
    if not cfg.spec.kv and cfg.loss.kv_supervision == "all":
        kv = " or ".join(repr(m) for m in KV_METHODS)
        raise ConfigError(
            f"loss.kv_supervision: 'all' supervises latent KV, which only method {kv} has (method is {cfg.method!r}); "
            f"use kv_supervision: last or method: {KV_METHODS[0]}"
        )
    if cfg.optim.cuda_graphs is True and (why := graph_exclusion(cfg)) is not None:
        raise ConfigError(f"optim.cuda_graphs: true is not possible with {why}; use auto or false")
    if cfg.model.gradient_checkpointing and cfg.spec.latent:
        raise ConfigError(
            f"model.gradient_checkpointing: HF decoders drop the KV cache under gradient checkpointing, and "
            f"method {cfg.method!r} needs it for its latent passes; use it only with method cot or nocot")


def use_bf16(cfg: Config) -> bool:
    """bf16 autocast: `optim.precision` auto or bf16, on a GPU (fp32 on CPU)."""
    return torch.cuda.is_available() and cfg.optim.precision in ("auto", "bf16")


def check_launcher_precision(cfg: Config, requested: str | None, cuda: bool) -> None:
    """`accelerate launch --mixed_precision X` sets ACCELERATE_MIXED_PRECISION=X (`requested`), but kava hands its
    own Accelerator `optim.precision`, so an X other than what kava runs would be dropped in silence: refused,
    naming the key. "no" says nothing: `accelerate launch` sets it when not asked."""
    if requested in (None, "", "no"):
        return
    runs = "bf16" if cuda and cfg.optim.precision in ("auto", "bf16") else "fp32"
    if requested != runs:
        raise ConfigError(f"accelerate launch --mixed_precision {requested} (ACCELERATE_MIXED_PRECISION): kava takes "
                          f"the precision from optim.precision (auto: bf16 on a GPU, fp32 on CPU), which runs {runs} "
                          f"here{'' if cuda else ' (no GPU)'}; drop --mixed_precision and set optim.precision")


def graph_exclusion(cfg: Config, *, cuda: bool = True, world_size: int = 1) -> str | None:
    """Why the micro-step cannot be captured as a CUDA graph (`kava.training.graphs`), or None."""
    if not cuda:
        return "no CUDA device"
    if world_size > 1:
        return f"{world_size} processes (DDP's gradient hooks run inside backward)"
    if cfg.optim.compile:
        return "optim.compile: true"
    if cfg.model.gradient_checkpointing:
        return "model.gradient_checkpointing: true"
    if cfg.spec.kv and cfg.eviction.method == "random":
        return "eviction.method: random (its generator is not part of the graph)"
    return None


def check_world_size(cfg: Config, world_size: int) -> int:
    """Gradient-accumulation steps that keep the configured effective batch on `world_size` processes."""
    per_step = cfg.optim.micro_batch * world_size
    if cfg.optim.effective_batch % per_step:
        raise ConfigError(
            f"optim.effective_batch ({cfg.optim.effective_batch}) is not divisible by optim.micro_batch "
            f"({cfg.optim.micro_batch}) x {world_size} processes; change one of them"
        )
    return cfg.optim.effective_batch // per_step


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(cfg.to_yaml())
