"""Config loading and validation: shipped presets, `kava presets check`, error messages, overrides."""

from __future__ import annotations

import shutil

import pytest
import yaml

import kava.config as kc
import kava.tools.presets
from kava.cli import main as cli_main
from kava.config import Config, ConfigError, check_world_size, config_from_dict, load_config, parse_override

SHIPPED = sorted(p.stem for p in kc.CONFIG_DIR.glob("*.yaml"))
MINIMAL = {"model": {"name_or_path": "some/model"}}  # the smallest valid config


def test_configs_directory_is_not_empty():
    assert {"tiny_synth", "llama1b_aug", "llama1b_aug_nl", "llama3b_aug", "llama3b_aug_nl", "qwen05b_aug",
            "qwen05b_aug_nl"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_loads_validates_and_round_trips(name, tmp_path):
    cfg = load_config(name)
    assert isinstance(cfg, Config)
    assert cfg.preset == name
    raw = yaml.safe_load((kc.CONFIG_DIR / f"{name}.yaml").read_text())
    # every value written in the YAML is what the typed config holds (nothing silently dropped or renamed)
    for section, values in raw.items():
        if isinstance(values, dict) and section != "model":
            for k, v in values.items():
                got = getattr(getattr(cfg, section), k)
                assert got == v or (isinstance(got, float) and float(v) == got), (name, section, k, v, got)
        elif not isinstance(values, dict) and values is not None:
            assert getattr(cfg, section) == values
    # the resolved YAML a run saves (config.yaml) loads back to the same config (resume depends on it)
    p = tmp_path / "config.yaml"
    kc.save_config(cfg, p)
    again = load_config(str(p), resolve_paths=False)  # as resume reads it (kava.train.resume_config)
    assert again == cfg
    assert again.hash() == cfg.hash()


def test_paper_presets_are_latent_kava_and_tiny_synth_is_cot():
    for name in kava.tools.presets.PAPER_TABLE:
        cfg = load_config(name)
        assert cfg.method == "kava" and cfg.lora is not None and cfg.model.name_or_path
    tiny = load_config("tiny_synth")
    assert tiny.method == "cot" and tiny.lora is None and tiny.model.from_scratch["family"] == "llama"


# -------------------------------------------------------------------------------------- presets check
def test_presets_check_exits_zero(capsys):
    assert cli_main(["presets", "check"]) == 0
    out = capsys.readouterr().out
    assert "0 mismatch(es)" in out and "MISMATCH" not in out
    for name in kava.tools.presets.PAPER_TABLE:
        assert name in out


def test_presets_check_fails_when_the_table_changes(monkeypatch, capsys):
    row = list(kava.tools.presets.PAPER_TABLE["llama3b_aug"])
    row[6] = 3e-4  # lr 2e-4 -> 3e-4
    monkeypatch.setitem(kava.tools.presets.PAPER_TABLE, "llama3b_aug", tuple(row))
    assert cli_main(["presets", "check"]) != 0
    out = capsys.readouterr().out
    line = [ln for ln in out.splitlines() if "MISMATCH" in ln]
    assert len(line) == 1 and "llama3b_aug" in line[0] and "optim.lr" in line[0], out


def test_presets_check_fails_when_a_preset_yaml_changes(monkeypatch, tmp_path, capsys):
    cdir = tmp_path / "configs"
    shutil.copytree(kc.CONFIG_DIR, cdir)
    text = (cdir / "qwen05b_aug.yaml").read_text()
    data = yaml.safe_load(text)
    data["eviction"]["lam"] = 0.5
    (cdir / "qwen05b_aug.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.setattr(kc, "CONFIG_DIR", cdir)
    assert cli_main(["presets", "check"]) != 0
    out = capsys.readouterr().out
    bad = [ln for ln in out.splitlines() if "MISMATCH" in ln]
    assert len(bad) == 1 and "qwen05b_aug" in bad[0] and "eviction.lam" in bad[0], out


def test_presets_check_covers_common_values(monkeypatch, capsys):
    monkeypatch.setitem(kava.tools.presets.COMMON, "latent.num_latents", 16)
    assert cli_main(["presets", "check"]) != 0
    bad = [ln for ln in capsys.readouterr().out.splitlines() if "MISMATCH" in ln]
    assert len(bad) == len(kava.tools.presets.PAPER_TABLE)  # one per preset


# -------------------------------------------------------------------------------------- errors
def err(data=None, overrides=None) -> str:
    with pytest.raises(ConfigError) as e:
        config_from_dict({**MINIMAL, **(data or {})}, overrides)
    return str(e.value)


def test_minimal_config_is_valid():
    cfg = config_from_dict(MINIMAL)
    assert cfg.method == "kava" and cfg.latent.num_latents == 24


def test_unknown_top_level_key_is_named():
    msg = err({"optimizer": {"lr": 1.0}})
    assert "optimizer" in msg and "unknown key" in msg
    assert "optim" in msg and "run" in msg  # lists the allowed keys


@pytest.mark.parametrize("dotted", ["optim.lrr", "loss.kv_los", "eviction.lambda", "model.from_scrach", "run.sed"])
def test_unknown_nested_key_is_named_with_its_section(dotted):
    msg = err(overrides=[f"{dotted}=1"])
    assert dotted in msg and "unknown key" in msg
    section = dotted.split(".")[0]
    assert f"allowed keys in {section}" in msg


def test_unknown_key_inside_a_null_section_is_named():
    msg = err({"lora": None}, ["lora.rank=4"])
    assert "lora.rank" in msg


def test_unknown_key_from_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {name_or_path: x}\nlatent: {num_latent: 3}\n")
    with pytest.raises(ConfigError, match=r"latent\.num_latent\b"):
        load_config(str(p))


@pytest.mark.parametrize("override, key, expected", [
    ("optim.lr=abc", "optim.lr", "number"),
    ("run.seed=1.5", "run.seed", "integer"),
    ("run.seed=true", "run.seed", "integer"),
    ("optim.max_steps=ten", "optim.max_steps", "int or null"),
    ("model.gradient_checkpointing=maybe", "model.gradient_checkpointing", "true or false"),
    ("lora.target_modules=q_proj", "lora.target_modules", "list"),
    ("optim.betas=[0.9, x]", "optim.betas[1]", "number"),
    ("latent=3", "latent", "mapping"),
    ("model.name_or_path=[a, b]", "model.name_or_path", "str or null"),
    ("lora.r=abc", "lora.r", "integer"),  # inside an optional section: the nested key is named
])
def test_wrong_types_name_the_key_and_expected_type(override, key, expected):
    msg = err(overrides=[override])
    assert msg.startswith(key + ":") or f"{key}:" in msg, msg
    assert expected in msg, msg


@pytest.mark.parametrize("override, key, allowed", [
    ("latent.num_latents=-1", "latent.num_latents", ">= 1"),
    ("latent.num_latents=0", "latent.num_latents", ">= 1"),
    ("latent.num_sweeps=-2", "latent.num_sweeps", ">= 0"),
    ("eviction.lam=1.5", "eviction.lam", "[0, 1]"),
    ("eviction.lam=-0.1", "eviction.lam", "[0, 1]"),
    ("loss.kv_loss=huber", "loss.kv_loss", "l1, mse, smooth_l1"),
    ("loss.codi_loss=cosine", "loss.codi_loss", "l1, mse, smooth_l1"),
    ("loss.codi_std=batch", "loss.codi_std", "layer, global, none"),
    ("eviction.method=lru", "eviction.method", "rkv, attention, cosine, crop, random, uniform"),
    ("method=quiet_star", "method", "cot, nocot, icot, pccot, codi, coconut, kava"),
    ("loss.alpha_kv=-1", "loss.alpha_kv", ">= 0"),
    ("optim.lr=0", "optim.lr", "> 0"),
    ("optim.warmup_ratio=1.0", "optim.warmup_ratio", "[0, 1)"),
    ("run.log=[jsonl, mlflow]", "run.log", "jsonl, stdout, tensorboard, wandb"),
    ("model.from_scratch={family: mamba}", "model.from_scratch.family", "llama, qwen2, qwen3"),
    ("lora.dropout=1.0", "lora.dropout", "[0, 1)"),
    ("loss.codi_layers=[]", "loss.codi_layers", "non-empty"),
    # these used to pass and fail much later (eval_batch_size=0 at the first validation, after an epoch)
    # or act oddly (eval_every=-1 evaluated every step, 0 meant "per epoch")
    ("run.eval_every=0", "run.eval_every", ">= 1 or null"),
    ("run.save_every=-1", "run.save_every", ">= 1 or null"),
    ("run.eval_batch_size=0", "run.eval_batch_size", ">= 1"),
    ("run.eval_max_new_tokens=0", "run.eval_max_new_tokens", ">= 1"),
    ("run.eval_max_cot_tokens=-1", "run.eval_max_cot_tokens", ">= 0"),
])
def test_invalid_values_name_the_key_and_allowed_values(override, key, allowed):
    msg = err(overrides=[override])
    assert key in msg, msg
    assert allowed in msg, msg


def test_kv_supervision_all_needs_kava():
    for method in ("cot", "nocot", "pccot", "codi"):
        msg = err(overrides=[f"method={method}", "loss.kv_supervision=all"])
        assert "loss.kv_supervision" in msg and "kava" in msg and repr(method) in msg
    cfg = config_from_dict(MINIMAL, ["method=kava", "loss.kv_supervision=all"])
    assert cfg.loss.kv_supervision == "all"


@pytest.mark.parametrize("eff, micro", [(10, 4), (4, 8), (128, 48)])
def test_effective_batch_must_be_a_multiple_of_micro_batch(eff, micro):
    msg = err(overrides=[f"optim.effective_batch={eff}", f"optim.micro_batch={micro}"])
    assert "optim.effective_batch" in msg and "optim.micro_batch" in msg
    assert str(eff) in msg and str(micro) in msg


def test_model_source_is_required():
    with pytest.raises(ConfigError, match="model.name_or_path"):
        config_from_dict({})


def test_unknown_preset_and_missing_file_are_named(tmp_path):
    with pytest.raises(ConfigError, match="tiny_synth"):  # lists the presets
        load_config("no_such_preset")
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(bad))


def test_relative_paths_in_a_yaml_file_are_read_from_its_directory(tmp_path, monkeypatch):
    """A config file's relative data and model paths are read from its directory (from anywhere); a hub id,
    `synthetic`, and a preset's or a `--set` path stay as written (the current directory); a run's own
    config.yaml is read as kava wrote it."""
    exp = tmp_path / "exp"
    (exp / "backbone").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    (exp / "cfg.yaml").write_text(yaml.safe_dump({
        "method": "kava", "model": {"name_or_path": "org/model", "init_from": "backbone"},
        "data": {"source": "../data/train.jsonl", "valid_source": "whynlp/gsm8k-aug"}}))
    monkeypatch.chdir(tmp_path / "data")
    cfg = load_config(str(exp / "cfg.yaml"))
    assert cfg.data.source == str(tmp_path / "data" / "train.jsonl")
    assert cfg.model.init_from == str(exp / "backbone")
    assert cfg.model.name_or_path == "org/model" and cfg.data.valid_source == "whynlp/gsm8k-aug"
    monkeypatch.chdir(exp)
    assert load_config("cfg.yaml").data.source == str(tmp_path / "data" / "train.jsonl")  # a relative config path
    assert load_config("cfg.yaml", ["data.source=../x.jsonl"]).data.source == "../x.jsonl"  # --set: as written
    assert load_config("cfg.yaml", resolve_paths=False).data.source == "../data/train.jsonl"
    assert load_config("smollm2_gsm8k").data.source == "../shared/data/gsm8k-aug/train_no_aug.txt"  # a preset


def test_hugging_face_training_arguments_names_are_aliases_printed_with_the_canonical_key(tmp_path, capsys):
    cfg = load_config("tiny_synth", ["learning_rate=1e-4", "per_device_train_batch_size=16", "max_grad_norm=1.5",
                                     "logging_steps=5", "eval_steps=7", "save_steps=9", "report_to=none"])
    assert (cfg.optim.lr, cfg.optim.micro_batch, cfg.optim.grad_clip) == (1e-4, 16, 1.5)
    assert (cfg.run.log_every, cfg.run.eval_every, cfg.run.save_every, cfg.run.log) == (5, 7, 9, [])
    out = capsys.readouterr().out
    assert "[kava] learning_rate (a Hugging Face TrainingArguments name) is kava's optim.lr: optim.lr=1e-4" in out
    assert "is kava's optim.micro_batch" in out and "is kava's run.log: run.log=[]" in out
    f = tmp_path / "hf.yaml"
    f.write_text(yaml.safe_dump({"method": "cot", "model": {"name_or_path": "org/m"}, "learning_rate": 2e-4,
                                 "report_to": ["wandb"], "max_steps": -1}))
    cfg = load_config(str(f))
    assert cfg.optim.lr == 2e-4 and cfg.run.log == ["wandb"] and cfg.optim.max_steps is None
    assert load_config(str(f), ["optim.lr=3e-4"]).optim.lr == 3e-4  # --set wins over the file, under either name
    f.write_text(yaml.safe_dump({"model": {"name_or_path": "org/m"}, "learning_rate": 2e-4, "optim": {"lr": 1e-3}}))
    with pytest.raises(ConfigError, match="learning_rate and optim.lr are both given"):
        load_config(str(f))


def test_hugging_face_precision_and_accumulation_names_set_kava_s_keys(tmp_path, capsys):
    """`--set bf16=true` and `--set gradient_accumulation_steps=4` were unknown keys with no hint. bf16 is
    optim.precision; HF's accumulation steps give kava's effective batch (micro-batch x steps, kept on any number
    of processes); fp16, which kava does not train in, is refused naming optim.precision."""
    cfg = load_config("tiny_synth", ["bf16=true", "per_device_train_batch_size=16", "gradient_accumulation_steps=4"])
    assert (cfg.optim.precision, cfg.optim.micro_batch, cfg.optim.effective_batch) == ("bf16", 16, 64)
    out = capsys.readouterr().out
    assert "[kava] bf16 (a Hugging Face TrainingArguments name) sets kava's optim.precision: optim.precision=bf16" in out
    assert ("sets kava's optim.effective_batch: optim.effective_batch=64 = optim.micro_batch 16 x 4; kava keeps this "
            "effective batch on any number of processes") in out
    assert load_config("tiny_synth", ["bf16=false", "fp16=false"]).optim.precision == "fp32"  # HF: full precision
    assert load_config("tiny_synth", ["gradient_accumulation_steps=2"]).optim.effective_batch == 2 * 64  # the preset's
    f = tmp_path / "hf.yaml"  # in a file too; beside the kava key it names, refused
    f.write_text(yaml.safe_dump({"model": {"name_or_path": "org/m"}, "bf16": True, "optim": {"micro_batch": 4}}))
    assert load_config(str(f), ["gradient_accumulation_steps=3"]).optim.effective_batch == 12
    f.write_text(yaml.safe_dump({"model": {"name_or_path": "org/m"}, "gradient_accumulation_steps": 2,
                                 "optim": {"effective_batch": 64}}))
    with pytest.raises(ConfigError, match="gradient_accumulation_steps and optim.effective_batch are both given"):
        load_config(str(f))
    for item, msg in (("fp16=true", "fp16=true: kava trains in bf16 or fp32, not fp16; set optim.precision=bf16"),
                      ("bf16=yes please", "bf16: expected true or false"),
                      ("gradient_accumulation_steps=0", "gradient_accumulation_steps: expected a positive integer"),
                      ("optim.bf16=true", "unknown key optim.bf16; did you mean optim.precision?")):
        with pytest.raises(ConfigError) as e:
            load_config("tiny_synth", [item])
        assert str(e.value).startswith(msg), e.value


@pytest.mark.parametrize("requested, precision, cuda, refused", [
    ("bf16", "auto", True, False), ("bf16", "bf16", True, False), ("no", "auto", True, False), (None, "fp32", True, False),
    ("fp16", "auto", True, True), ("bf16", "fp32", True, True), ("bf16", "auto", False, True), ("fp8", "bf16", True, True),
])
def test_accelerate_launch_mixed_precision_is_honoured_or_refused_naming_optim_precision(requested, precision, cuda,
                                                                                         refused):
    """`accelerate launch --mixed_precision X` sets ACCELERATE_MIXED_PRECISION, which kava's own Accelerator (given
    optim.precision) ignored in silence. Where X is what kava runs it goes through; otherwise it is refused
    naming optim.precision. "no" is what the launcher sets when not asked: not checked."""
    cfg = load_config("tiny_synth", [f"optim.precision={precision}"])
    if not refused:
        kc.check_launcher_precision(cfg, requested, cuda)
        return
    with pytest.raises(ConfigError) as e:
        kc.check_launcher_precision(cfg, requested, cuda)
    assert str(e.value).startswith(f"accelerate launch --mixed_precision {requested} (ACCELERATE_MIXED_PRECISION): "
                                   "kava takes the precision from optim.precision") and "set optim.precision" in str(e.value)


def test_kava_train_checks_the_launcher_s_precision_before_it_writes_anything(tmp_path, monkeypatch):
    from kava.train import train

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    cfg = load_config("tiny_synth", [f"run.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="accelerate launch --mixed_precision fp16"):
        train(cfg, progress=False)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("item, hint", [
    ("optim.lrr=1", "unknown key optim.lrr; did you mean optim.lr?"),
    ("lr=1", "unknown key lr; did you mean optim.lr?"),
    ("warmup=0.1", "unknown key warmup; did you mean optim.warmup_ratio?"),
    ("run.nme=x", "unknown key run.nme; did you mean run.name?"),
    ("optim.learning_rate=1", "unknown key optim.learning_rate; did you mean optim.lr? (learning_rate is its "
                              "Hugging Face name"),
    ("lerning_rate=1", "unknown key lerning_rate; did you mean optim.lr? (Hugging Face name: learning_rate)"),
])
def test_an_unknown_key_suggests_the_closest_one(item, hint):
    with pytest.raises(ConfigError) as e:
        load_config("tiny_synth", [item])
    assert str(e.value).startswith(hint)


# -------------------------------------------------------------------------------------- overrides
@pytest.mark.parametrize("item, key, value", [
    ("run.seed=7", "run.seed", 7),
    ("optim.lr=0.5", "optim.lr", 0.5),
    ("optim.max_steps=null", "optim.max_steps", None),
    ("model.gradient_checkpointing=true", "model.gradient_checkpointing", True),
    ("lora=null", "lora", None),
    ("lora.target_modules=[q_proj,v_proj]", "lora.target_modules", ["q_proj", "v_proj"]),
    ("loss.codi_layers=[-1, 0]", "loss.codi_layers", [-1, 0]),
    ("data.answer_prompt=Final: x=y", "data.answer_prompt", "Final: x=y"),  # split on the first '=' only
    (" run.name = abc", "run.name", "abc"),
    # text that YAML would read as a mapping, a comment or an error stays text
    ("data.answer_prompt=The answer is:", "data.answer_prompt", "The answer is:"),
    ("data.answer_prompt=####", "data.answer_prompt", "####"),
    ("data.answer_prompt=$ ####", "data.answer_prompt", "$ ####"),  # ` #` is no comment on a command line
    ("data.answer_prompt='$ ####'", "data.answer_prompt", "$ ####"),
    ("data.answer_prompt=a: b: c", "data.answer_prompt", "a: b: c"),
    ("run.eval_every=~", "run.eval_every", None),
    ("model.from_scratch={family: gpt2}", "model.from_scratch", {"family": "gpt2"}),
])
def test_parse_override_values(item, key, value):
    k, v = parse_override(item)
    assert k == key and v == value and type(v) is type(value)


def test_overrides_reach_the_typed_config():
    cfg = load_config("tiny_synth", [
        "optim.lr=1e-4",  # YAML 1.1 reads this as a string; the float field converts it
        "optim.weight_decay=0",  # an int for a float field
        "run.seed=123", "run.eval_every=null", "data.drop_last_step=true", "run.log=[jsonl,stdout]",
        "lora.r=4", "lora.target_modules=[q_proj,v_proj]", "model.from_scratch.hidden_size=32",
        "method=kava", "loss.kv_supervision=all", "data.answer_prompt=The answer is:",
    ])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.weight_decay == 0.0 and isinstance(cfg.optim.weight_decay, float)
    assert cfg.run.seed == 123 and cfg.run.eval_every is None
    assert cfg.data.drop_last_step is True
    assert cfg.run.log == ["jsonl", "stdout"]
    # tiny_synth has lora: null; setting a field creates the section with the other defaults
    assert cfg.lora.r == 4 and cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.lora.alpha == 32
    fs = cfg.model.from_scratch
    assert fs["hidden_size"] == 32 and fs["num_hidden_layers"] == 4 and fs["family"] == "llama"
    assert cfg.method == "kava" and cfg.loss.kv_supervision == "all"
    assert cfg.data.answer_prompt == "The answer is:"
    assert load_config("tiny_synth").model.from_scratch["hidden_size"] == 128  # the preset itself is untouched


def test_override_without_equals_and_into_a_scalar_fail():
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("optim.lr")
    with pytest.raises(ConfigError, match="optim.lr"):
        config_from_dict(MINIMAL, ["optim.lr.x=1"])


def test_train_cli_collects_repeated_set_flags():
    from kava.cli import build_parser

    args = build_parser().parse_args(["train", "--config", "tiny_synth", "--set", "optim.lr=1e-3",
                                      "--set", "run.seed=3"])
    assert args.overrides == ["optim.lr=1e-3", "run.seed=3"]
    cfg = load_config(args.config, args.overrides)
    assert cfg.optim.lr == 1e-3 and cfg.run.seed == 3


# -------------------------------------------------------------------------------------- world size
def test_check_world_size():
    cfg = config_from_dict(MINIMAL, ["optim.effective_batch=128", "optim.micro_batch=32"])
    assert check_world_size(cfg, 1) == 4
    assert check_world_size(cfg, 2) == 2
    assert check_world_size(cfg, 4) == 1
    for world in (3, 8):  # 128 % 96 != 0; 32 x 8 = 256 > 128
        with pytest.raises(ConfigError) as e:
            check_world_size(cfg, world)
        msg = str(e.value)
        assert "optim.effective_batch" in msg and "optim.micro_batch" in msg and f"{world} processes" in msg
    cfg = config_from_dict(MINIMAL, ["optim.effective_batch=12", "optim.micro_batch=2"])
    assert check_world_size(cfg, 3) == 2 and check_world_size(cfg, 6) == 1
    with pytest.raises(ConfigError):
        check_world_size(cfg, 4)


def test_synthetic_students_drop_the_last_cot_step():
    """SPEC §1 (and both predecessors): the latent students' teacher drops the last CoT step, which restates the
    answer; otherwise the distillation targets carry little computation. The CoT backbones keep the whole chain."""
    from kava.tools.demo import stage_config

    for name in ("synth_student", "synth_depth_student"):
        assert load_config(name).data.drop_last_step is True, name
    for name in ("synth_backbone", "synth_depth_backbone"):
        assert load_config(name).data.drop_last_step is False, name
    from pathlib import Path

    assert stage_config("kava", Path("/tmp/x"), []).data.drop_last_step is True
    assert stage_config("backbone", Path("/tmp/x"), []).data.drop_last_step is False


def test_lora_on_the_lm_head_with_dropout_is_refused():
    """The CE recomputes the head in backward without replaying dropout draws."""
    with pytest.raises(ConfigError, match="lora.target_modules: lm_head with lora.dropout"):
        load_config("tiny_synth", ["lora.r=4", "lora.dropout=0.1", "lora.target_modules=[q_proj,lm_head]"])
    load_config("tiny_synth", ["lora.r=4", "lora.dropout=0.0", "lora.target_modules=[q_proj,lm_head]"])


def test_allowed_values_come_from_their_owners():
    """The config's allowed values are the tuples of the modules that dispatch on them, not a second spelling: a new
    projection, importance rule, query mode, CODI position, CoT style or synthetic task is added in one place."""
    from typing import get_args

    from kava import config as c
    from kava.data import format as data_format
    from kava.data import readers, synthetic
    from kava.model import reasoner

    def allowed(section, key):
        return get_args(section.__annotations__[key] if not isinstance(section.__annotations__[key], str)
                        else eval(section.__annotations__[key], vars(c)))

    assert allowed(c.LatentConfig, "projection") == reasoner.PROJECTIONS
    assert allowed(c.EvictionConfig, "importance_softmax") == reasoner.IMPORTANCE_SOFTMAX
    assert allowed(c.EvictionConfig, "importance_queries") == data_format.QUERY_MODES
    assert allowed(c.LossConfig, "codi_position") == data_format.CODI_POSITIONS
    assert allowed(c.DataConfig, "cot_style") == (*readers.COT_STYLES, "both")
    assert allowed(c.DataConfig, "synth_task") == synthetic.SYNTH_TASKS
    # spelled as the owner's name in kava/config.py (equal values written out again would drift apart later)
    owners = {(c.LatentConfig, "projection"): "reasoner.PROJECTIONS",
              (c.EvictionConfig, "importance_softmax"): "reasoner.IMPORTANCE_SOFTMAX",
              (c.EvictionConfig, "importance_queries"): "data_format.QUERY_MODES",
              (c.LossConfig, "codi_position"): "data_format.CODI_POSITIONS",
              (c.DataConfig, "cot_style"): "readers.COT_STYLES", (c.DataConfig, "synth_task"): "synthetic.SYNTH_TASKS"}
    for (section, key), owner in owners.items():
        assert owner in str(section.__annotations__[key]), (key, section.__annotations__[key])


def test_nl_annotated_cot_style_is_for_gsm8k_text_only():
    """data.cot_style nl_annotated (GSM8k's answer lines with their <<...>> annotations) loads for a GSM8k-style
    source and is refused, naming the key, for the synthetic generator, which has no such form."""
    sets = ["data.cot_style=nl_annotated", "data.source=../shared/data/gsm8k/train.jsonl"]
    cfg = load_config("smollm2_gsm8k_nl", sets, resolve_paths=False)
    assert cfg.data.cot_style == "nl_annotated"
    with pytest.raises(ConfigError, match="data.cot_style: 'nl_annotated' .* has no synthetic form"):
        load_config("tiny_synth", ["data.cot_style=nl_annotated"])
