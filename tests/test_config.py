"""Config loader: YAML + dotted overrides, unknown keys, bad types, the shipped configs."""
from pathlib import Path

import pytest
import yaml

from r1vl.config import Config, ConfigError, dump_config, load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_equal_default_yaml():
    # configs/default.yaml spells out the embedded default: the two must not drift apart
    assert to_dict(load_config(ROOT / "configs" / "default.yaml")) == to_dict(load_config(None))


@pytest.mark.parametrize("name", ["default.yaml", "qwen2vl_2b.yaml", "qwen2vl_7b.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / name)
    assert isinstance(cfg, Config)


def test_paper_recipe_values():
    for name in ("qwen2vl_2b.yaml", "qwen2vl_7b.yaml"):
        cfg = load_config(ROOT / "configs" / name)
        assert cfg.rollout.num_generations == 4
        assert cfg.rollout.temperature == 1.0
        assert cfg.algorithm.beta == 0.04
        assert cfg.optim.lr == 1e-6
        assert cfg.rollout.max_completion_length == 1024
        assert cfg.data.max_prompt_length == 512
        assert cfg.model.dtype == "bfloat16"
        assert cfg.algorithm.accuracy_weight == 1.0 and cfg.algorithm.validity_weight == 1.0
        assert cfg.model.path != "tiny"


def test_overrides_and_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("seed: 7\ntrain:\n  max_steps: 5\nmodel:\n  tiny:\n    hidden_size: 256\n")
    cfg = load_config(f, ["train.max_steps=9", "optim.lr=3e-4", "train.resume=true", "output_dir=runs/x",
                          "algorithm.scale_rewards=false", "--warmup.steps=0"])
    assert cfg.seed == 7  # from the file
    assert cfg.train.max_steps == 9  # override beats file
    assert cfg.model.tiny.hidden_size == 256
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.train.resume is True
    assert cfg.output_dir == "runs/x"
    assert cfg.algorithm.scale_rewards is False
    assert cfg.warmup.steps == 0
    cfg2 = load_config(None, ["train.resume=runs/x/checkpoints/grpo-000010", "optim.lr=1"])
    assert cfg2.train.resume == "runs/x/checkpoints/grpo-000010"
    assert isinstance(cfg2.optim.lr, float)  # int widened to float



def test_scale_rewards_takes_trls_words_and_the_bools(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("algorithm:\n  scale_rewards: batch\n")
    assert load_config(f, []).algorithm.scale_rewards == "batch"
    assert load_config(None, ["algorithm.scale_rewards=none"]).algorithm.scale_rewards == "none"
    assert load_config(None, ["algorithm.scale_rewards=group"]).algorithm.scale_rewards == "group"
    assert load_config(None, ["algorithm.scale_rewards=true"]).algorithm.scale_rewards is True
    f.write_text("algorithm:\n  scale_rewards: 1\n")
    with pytest.raises(ConfigError, match="algorithm.scale_rewards"):
        load_config(f, [])

def test_resolved_config_roundtrip(tmp_path):
    cfg = load_config(None, ["seed=3", "rollout.num_generations=6"])
    dump_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(cfg)


@pytest.mark.parametrize("override, words", [
    ("train.max_stepz=3", ["unknown config key 'train.max_stepz'", "max_steps"]),
    ("trian.max_steps=3", ["unknown config key 'trian'"]),
    ("train.max_steps=abc", ["train.max_steps", "expected int", "'abc'"]),
    ("train.max_steps=1.5", ["train.max_steps", "expected int"]),
    ("optim.lr=fast", ["optim.lr", "expected float"]),
    ("train.resume=1.5", ["train.resume", "bool or str"]),
    ("logging.progress=maybe", ["logging.progress", "expected bool"]),
    ("train.max_steps=-1", ["train.max_steps", ">= 0"]),
    ("optim.lr=0", ["optim.lr", "> 0"]),
    ("rollout.engine=sglang", ["rollout.engine", "'hf'", "'vllm'"]),
    ("algorithm.loss_type=ppo", ["algorithm.loss_type", "grpo"]),
    ("train=3", ["train", "expected a mapping"]),
    ("model.tiny.hidden_size=64", ["head_dim", "32"]),
    ("rollout.num_generations=1", ["num_generations", ">= 2"]),
    ("novalue", ["dotted.key=value"]),
    # ranges: the key, the allowed interval and the value given
    ("rollout.top_p=1.5", ["rollout.top_p", "in (0, 1]", "1.5"]),
    ("rollout.top_p=0", ["rollout.top_p", "in (0, 1]", "got 0.0"]),
    ("optim.beta1=2", ["optim.beta1", "in [0, 1)", "got 2.0"]),
    ("optim.beta1=-0.1", ["optim.beta1", "in [0, 1)", "-0.1"]),
    ("optim.beta2=1", ["optim.beta2", "in [0, 1)", "got 1.0"]),
    ("optim.eps=-1", ["optim.eps", "> 0", "-1.0"]),
    ("optim.eps=0", ["optim.eps", "> 0", "got 0.0"]),  # AdamW: a weight whose gradient is 0 becomes 0/0 = NaN
    ("algorithm.accuracy_weight=-1", ["algorithm.accuracy_weight", ">= 0", "-1.0"]),  # as the eval CLI's
    ("algorithm.validity_weight=-0.5", ["algorithm.validity_weight", ">= 0", "-0.5"]),
    ("algorithm.epsilon_low=5", ["algorithm.epsilon_low", "in [0, 1)", "5.0"]),
    ("algorithm.epsilon_low=1", ["algorithm.epsilon_low", "in [0, 1)", "1.0"]),
    ("rollout.vllm.gpu_memory_utilization=1.2", ["rollout.vllm.gpu_memory_utilization", "in (0, 1]", "1.2"]),
    ("optim.lr=nan", ["optim.lr", "> 0", "nan"]),
    ("output_dir=", ["output_dir", "non-empty", "''"]),
    ("output_dir=' '", ["output_dir", "non-empty", "' '"]),
])
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    for w in words:
        assert w in str(e.value)


def test_range_boundaries_accepted():
    cfg = load_config(None, ["rollout.top_p=1.0", "optim.beta1=0", "optim.beta2=0.999", "optim.eps=1e-30",
                             "algorithm.epsilon_low=0", "algorithm.epsilon_high=5",
                             "rollout.vllm.gpu_memory_utilization=1"])
    assert cfg.rollout.top_p == 1.0 and cfg.optim.beta2 == 0.999 and cfg.optim.eps == 1e-30
    assert cfg.algorithm.epsilon_high == 5.0  # clip-higher: no upper bound
    assert load_config(None, ["algorithm.epsilon_low=0.999"]).algorithm.epsilon_low == 0.999
    zero = load_config(None, ["algorithm.accuracy_weight=0", "algorithm.validity_weight=0"]).algorithm
    assert (zero.accuracy_weight, zero.validity_weight) == (0.0, 0.0)


def test_output_dir_that_is_a_file(tmp_path):
    f = tmp_path / "out"
    f.write_text("")
    with pytest.raises(ConfigError, match="output_dir.*exists and is not a directory"):
        load_config(None, [f"output_dir={f}"])
    assert load_config(None, [f"output_dir={tmp_path}"]).output_dir == str(tmp_path)  # an existing dir is fine


def test_duplicate_yaml_keys(tmp_path):
    top = tmp_path / "top.yaml"
    top.write_text("seed: 1\ntrain:\n  max_steps: 5\nseed: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(top)
    assert all(w in str(e.value) for w in (str(top), "duplicate key 'seed'", "line 4", "first at line 1"))
    nested = tmp_path / "nested.yaml"
    nested.write_text("train:\n  max_steps: 5\n  save_every: 1\n  max_steps: 6\n")
    with pytest.raises(ConfigError) as e:
        load_config(nested)
    assert all(w in str(e.value) for w in (str(nested), "'max_steps'", "line 4", "first at line 2"))
    # the same key in different sections, and a merge key overridden locally, are not duplicates
    ok = tmp_path / "ok.yaml"
    ok.write_text("warmup:\n  lr: 0.001\n  steps: 3\ntrain:\n  max_steps: 5\n"
                  "optim:\n  <<: {lr: 0.5}\n  lr: 0.01\n")
    cfg = load_config(ok)
    assert (cfg.warmup.steps, cfg.train.max_steps, cfg.optim.lr) == (3, 5, 0.01)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(lst)
    unk = tmp_path / "unk.yaml"
    unk.write_text(yaml.safe_dump({"rollout": {"G": 4}}))
    with pytest.raises(ConfigError, match="rollout.G"):
        load_config(unk)


def test_cli_reports_config_errors(capsys):
    from r1vl.train import main

    assert main(["train.max_steps=abc"]) == 2
    err = capsys.readouterr().err
    assert "train.max_steps" in err and "expected int" in err
    assert "Traceback" not in err


def test_delta_must_sit_above_the_upper_clip():
    from r1vl.config import ConfigError

    assert load_config(None, ["algorithm.delta=1.5"]).algorithm.delta == 1.5
    with pytest.raises(ConfigError, match="algorithm.delta=1.1: must exceed 1 \\+ algorithm.epsilon_high"):
        load_config(None, ["algorithm.delta=1.1"])


# ---------------------------------------------------------------- audit: sections, override parsing, files


@pytest.mark.parametrize("override", ["model=", "model=null", "model={}", "data=0", "model.tiny=", "train=false"])
def test_a_section_override_is_refused(override):
    # `model=` used to reset the whole section to the defaults: the 7B recipe silently became the tiny model
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs" / "qwen2vl_7b.yaml", [override])
    msg = str(e.value)
    assert msg.startswith(f"{key}: expected a mapping") and "\n" not in msg
    assert load_config(ROOT / "configs" / "qwen2vl_7b.yaml", ["model.dtype=float16"]).model.path != "tiny"


@pytest.mark.parametrize("text, key", [
    ("model: false\n", "model"), ("data: 0\n", "data"), ("train: []\n", "train"), ("model:\n  tiny: ''\n", "model.tiny"),
])
def test_a_section_in_a_file_must_be_a_mapping(tmp_path, text, key):
    f = tmp_path / "c.yaml"
    f.write_text("seed: 1\n" + text)
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert str(e.value).startswith(f"{f}: {key}: expected a mapping")


def test_a_null_or_empty_section_in_a_file_keeps_its_defaults(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\ntrain: {}\nseed: 4\n")
    cfg = load_config(f, ["model.dtype=bfloat16"])
    assert (cfg.model.path, cfg.model.dtype, cfg.train.max_steps, cfg.seed) == ("tiny", "bfloat16", 60, 4)


@pytest.mark.parametrize("override, attr, value", [
    # a str field takes the text verbatim: YAML read a comment, a date, a bool, an int or null there
    ("output_dir=runs/exp #3", "output_dir", "runs/exp #3"),
    ("logging.wandb_run_name=lr 1e-5 #ablation", "logging.wandb_run_name", "lr 1e-5 #ablation"),
    ("output_dir=2024", "output_dir", "2024"),
    ("logging.wandb_run_name=2024-06-01", "logging.wandb_run_name", "2024-06-01"),
    ("logging.wandb_run_name=off", "logging.wandb_run_name", "off"),
    ("logging.wandb_project=010", "logging.wandb_project", "010"),
    ("data.synthetic_dir=null", "data.synthetic_dir", "null"),
    ("train.resume=runs/x #1", "train.resume", "runs/x #1"),
    ("rollout.vllm.max_model_len=None", "rollout.vllm.max_model_len", None),
])
def test_override_values_are_read_by_the_fields_type(override, attr, value, tmp_path):
    cfg = load_config(None, [override])
    got = cfg
    for part in attr.split("."):
        got = getattr(got, part)
    assert got == value and type(got) is type(value)
    dump_config(cfg, tmp_path / "config.yaml")  # the resolved config reads back the same
    assert to_dict(load_config(tmp_path / "config.yaml")) == to_dict(cfg)


@pytest.mark.parametrize("override, attr, value", [
    # read as YAML read them (these held before too)
    ("logging.wandb_run_name='a: b #c'", "logging.wandb_run_name", "a: b #c"),  # wholly quoted: unquoted
    ("logging.wandb_run_name=\"it's\"", "logging.wandb_run_name", "it's"),
    ("logging.wandb_run_name='it''s'", "logging.wandb_run_name", "it's"),
    ("logging.wandb_run_name='a' 'b'", "logging.wandb_run_name", "'a' 'b'"),
    ("train.resume='2'", "train.resume", "2"),
    ("train.resume='true'", "train.resume", "true"),
    ("train.resume=off", "train.resume", False),
    ("seed=10", "seed", 10), ("seed=-3", "seed", -3), ("seed= 7 ", "seed", 7), ("seed=0", "seed", 0),
    ("rollout.vllm.weight_bucket_bytes=1_000_000", "rollout.vllm.weight_bucket_bytes", 1000000),
    ("rollout.vllm.max_model_len=~", "rollout.vllm.max_model_len", None),
    ("rollout.vllm.max_model_len=4096", "rollout.vllm.max_model_len", 4096),
    ("optim.lr=3e-4", "optim.lr", 3e-4), ("optim.lr=.5", "optim.lr", 0.5), ("algorithm.delta=NULL", "algorithm.delta", None),
    ("model.liger=OFF", "model.liger", False), ("model.liger=Yes", "model.liger", True),
    ("rollout.vllm.enable_sleep_mode=null", "rollout.vllm.enable_sleep_mode", None),
    ("rollout.vllm.enable_sleep_mode=on", "rollout.vllm.enable_sleep_mode", True),
])
def test_override_values_read_as_before(override, attr, value):
    got = load_config(None, [override])
    for part in attr.split("."):
        got = getattr(got, part)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("override, words", [
    ("seed=010", ["seed", "expected int", "leading zeros", "'010'"]),  # was 8 (YAML 1.1 octal)
    ("train.save_every=0100", ["train.save_every", "leading zeros", "'0100'"]),  # was 64
    ("seed=1:30", ["seed", "expected int", "'1:30'"]),  # was 90 (base 60)
    ("seed=0x10", ["seed", "expected int", "'0x10'"]),
    ("rollout.vllm.max_model_len=0100", ["rollout.vllm.max_model_len", "int or null", "'0100'"]),
    ("rollout.vllm.max_model_len=", ["rollout.vllm.max_model_len", "int or null", "''"]),
    ("train.resume=1", ["train.resume", "bool or str", "'1'", "a number"]),
    ("algorithm.scale_rewards=1", ["algorithm.scale_rewards", "bool or str", "'1'", "a number"]),
    ("algorithm.scale_rewards=global", ["algorithm.scale_rewards", "'group', 'batch', 'none'", "'global'"]),
    ("model.liger=1", ["model.liger", "expected bool", "'1'"]),
    ("optim.lr=1:30", ["optim.lr", "expected float", "'1:30'"]),
    ("seed.x=1", ["'seed' is a value", "not a section"]),
])
def test_override_values_that_yaml_would_misread_are_refused(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert all(w in str(e.value) for w in words), str(e.value)


@pytest.mark.parametrize("text, key", [
    ("seed: 010\n", "seed"), ("train:\n  save_every: 0100\n", "train.save_every"), ("seed: 1:30\n", "seed"),
    ("optim:\n  lr: 010\n", "optim.lr"), ("rollout:\n  vllm:\n    max_model_len: 01024\n", "rollout.vllm.max_model_len"),
    ("algorithm:\n  reward_timeout_s: 1:30.0\n", "algorithm.reward_timeout_s"),  # was 90.0 (base 60)
    ("rollout:\n  temperature: 0:0.7\n", "rollout.temperature"),
])
def test_yaml_file_ints_with_a_leading_zero_are_refused(tmp_path, text, key):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(f)
    msg = str(e.value)
    assert msg.startswith(f"{f}: {key}: expected") and "YAML 1.1 reads as" in msg and "\n" not in msg
    ok = tmp_path / "ok.yaml"
    ok.write_text("seed: 10\ntrain:\n  save_every: 0x10\nlogging:\n  wandb_run_name: '010'\n")
    cfg = load_config(ok)
    assert (cfg.seed, cfg.train.save_every, cfg.logging.wandb_run_name) == (10, 16, "010")


@pytest.mark.parametrize("key", ["optim.lr", "warmup.lr", "rollout.temperature", "algorithm.accuracy_weight",
                                 "algorithm.validity_weight", "algorithm.beta", "optim.max_grad_norm",
                                 "algorithm.delta", "algorithm.epsilon_high", "rollout.is_cap"])
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "Infinity"])
def test_non_finite_floats_are_refused(key, value):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}={value}"])
    msg = str(e.value)
    assert msg.startswith(f"{key}: expected a finite") and f"got {float(value)!r}" in msg, msg


def test_non_finite_floats_in_a_file_are_refused(tmp_path):
    for text, key in (("optim:\n  max_grad_norm: .inf\n", "optim.max_grad_norm"),
                      ("algorithm:\n  accuracy_weight: .nan\n", "algorithm.accuracy_weight"),
                      ("algorithm:\n  validity_weight: -.inf\n", "algorithm.validity_weight")):
        f = tmp_path / "c.yaml"
        f.write_text(text)
        with pytest.raises(ConfigError, match=rf"^{f}: {key}: expected a finite"):
            load_config(f)


def test_a_file_that_is_not_utf8(tmp_path):
    f = tmp_path / "latin1.yaml"
    f.write_bytes("seed: 1\n# café config\n".encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert str(e.value) == f"{f}: not UTF-8 text (byte 0xe9 at line 2, column 6); save the file as UTF-8"
    bom = tmp_path / "bom.yaml"
    bom.write_bytes("\ufeffseed: 5\n# café\n".encode("utf-8"))
    assert load_config(bom).seed == 5


@pytest.mark.parametrize("text, where, words", [
    ("seed: 1\ntrain:\n\tmax_steps: 3\n", "line 3, column 1", ["found character '\\t'"]),
    ("seed: 1\n---\nseed: 2\n", "line 2, column 1", ["found another document", "single document"]),
    ("{seed: 1, [a]: 2}\n", "line 1, column 11", ["a key must be a single value, got a list"]),
    ("train: [1, 2\n", "line 2, column 1", ["expected ',' or ']'"]),
    ("seed: 1\n  train: 2\n", "line 2, column 8", ["mapping values are not allowed here"]),
    ("seed: \x07\n", "line 1, column 7", ["#x0007"]),
])
def test_yaml_syntax_errors_are_one_line(tmp_path, text, where, words):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(f)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{f}: not valid YAML at {where}: "), msg
    assert all(w in msg for w in words), msg


def test_file_errors_name_the_file(tmp_path):
    f = tmp_path / "unk.yaml"
    f.write_text("model:\n  tiny:\n    archh: qwen2_vl\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert str(e.value).startswith(f"{f}: unknown config key 'model.tiny.archh'")
    f.write_text("train:\n  max_steps: many\n")
    with pytest.raises(ConfigError, match=rf"^{f}: train.max_steps: expected int"):
        load_config(f)


@pytest.mark.parametrize("override", ["data.train=", "data.test=", "data.test=' '", "model.path="])
def test_empty_paths_are_refused(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{key}: expected a non-empty"):
        load_config(None, [override])


def test_own_training_data_is_not_scored_on_the_builtin_task():
    """data.train set alone: data.test's default ('synthetic') would score the held-out
    evaluations on the built-in task, with one INFO line as the only sign; refused at start."""
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.train=mine/train.jsonl"])
    msg = str(e.value)
    assert msg.startswith("data.test: 'synthetic'") and "mine/train.jsonl" in msg and "r1vl.data.synthetic" in msg
    load_config(None, ["data.train=mine/train.jsonl", "data.test=mine/test.jsonl"])
    load_config(None, ["data.train=mine/train.jsonl", "train.eval_before=false", "train.eval_after=false"])
    load_config(None, ["data.test=mine/test.jsonl"])  # the built-in task, scored on one's own file: as asked
    with pytest.raises(ConfigError, match="^data.test: 'synthetic'"):
        load_config(None, ["data.train=mine/train.jsonl", "train.eval_before=false", "train.eval_after=false",
                           "train.eval_every=5"])


def test_empty_synthetic_dir_and_resume_are_meaningful():
    cfg = load_config(None, ["data.synthetic_dir=", "train.resume="])
    assert cfg.data.synthetic_dir == "" and cfg.train.resume == ""  # <output_dir>/data; a fresh run


def test_greedy_sampling_cannot_train():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["rollout.temperature=0"])
    msg = str(e.value)
    assert msg.startswith("rollout.temperature: expected > 0 when train.max_steps > 0, got 0.0")
    assert "every advantage 0" in msg and "learn nothing" in msg
    assert load_config(None, ["rollout.temperature=0", "train.max_steps=0"]).rollout.temperature == 0.0


def _warnings(caplog, overrides, path=None):
    caplog.clear()
    with caplog.at_level("WARNING", logger="r1vl.config"):
        load_config(path, overrides)
    return [r.getMessage() for r in caplog.records if r.name == "r1vl.config"]


def test_lr_warmup_longer_than_the_schedule_warns(caplog):
    (msg,) = _warnings(caplog, ["warmup.steps=8", "warmup.warmup_steps=10"])
    assert msg.startswith("warmup.warmup_steps=10 exceeds warmup.steps=8") and "80%" in msg
    (msg,) = _warnings(caplog, ["train.max_steps=5", "algorithm.num_iterations=2", "optim.warmup_steps=20"])
    assert msg.startswith("optim.warmup_steps=20 exceeds") and "= 10" in msg and "50%" in msg
    # the peak reached at the last step, no warm-up phase, no StepGRPO steps: nothing to say
    assert _warnings(caplog, ["warmup.steps=10", "warmup.warmup_steps=10"]) == []
    assert _warnings(caplog, ["warmup.steps=0", "warmup.warmup_steps=10"]) == []
    assert _warnings(caplog, ["train.max_steps=5", "algorithm.num_iterations=2", "optim.warmup_steps=10"]) == []
    assert _warnings(caplog, ["train.max_steps=0", "optim.warmup_steps=10"]) == []
    for name in ("default.yaml", "qwen2vl_2b.yaml", "qwen2vl_7b.yaml"):
        assert _warnings(caplog, [], ROOT / "configs" / name) == []
    assert _warnings(caplog, []) == []


def test_vllm_max_model_len_must_hold_a_rollout():
    """An explicit rollout.vllm.max_model_len below prompt + image + completion would cut
    completions silently (vLLM stops at its limit with finish_reason "length")."""
    base = ["rollout.engine=vllm", "data.max_prompt_length=100", "data.max_pixels=12544",
            "rollout.max_completion_length=50"]  # 100 + 16 + 50
    assert load_config(None, base + ["rollout.vllm.max_model_len=166"]).rollout.vllm.max_model_len == 166
    with pytest.raises(ConfigError, match=r"rollout.vllm.max_model_len: expected >= 166 .* got 165"):
        load_config(None, base + ["rollout.vllm.max_model_len=165"])
    load_config(None, ["data.max_prompt_length=100", "rollout.vllm.max_model_len=10"])  # the hf engine: unused


@pytest.mark.parametrize("overrides, start", [
    # AdamW on float16 weights: its float16 moments underflow and the updates blow up (inf/NaN after
    # the first step at eps 1e-8; at eps 1e-6 a warm-up loss of 0.65 went to 12.6 and the run went on
    # with every reward 0), fused or not, at any usual eps
    (["model.dtype=float16", "optim.impl=foreach"], "model.dtype=float16 without DeepSpeed: AdamW keeps its moments"),
    (["model.dtype=float16", "train.max_steps=0", "optim.impl=for_loop"], "model.dtype=float16 without DeepSpeed"),
    (["model.dtype=float16", "optim.impl=foreach", "optim.eps=1e-6"], "model.dtype=float16 without DeepSpeed"),
    (["model.dtype=float16", "optim.impl=fused"], "model.dtype=float16 without DeepSpeed"),
    # the tiny vision tower's rotary embedding: RuntimeError at the first forward, after the build
    (["model.tiny.vision_embed_dim=40", "model.tiny.vision_num_heads=4"], "model.tiny: vision head_dim"),
    (["seed=18446744073709551616"], "seed: expected"),  # torch.manual_seed's overflow, after data
    # no 28x28 block fits: refused by the loader after the synthetic task was written
    (["data.min_pixels=1", "data.max_pixels=700"], "data.min_pixels / data.max_pixels:"),
    (["rollout.vllm.max_num_batched_tokens=0"], "rollout.vllm.max_num_batched_tokens: expected"),
    (["rollout.top_k=1"], "rollout.top_k: expected 0 (off) or >= 2"),  # greedy, as temperature 0
    # vLLM's processed log-probs are of the cut distribution: every IS ratio the kept mass (0.90 at 0.9)
    (["rollout.engine=vllm", "rollout.top_p=0.9"], "rollout.top_p=0.9 / rollout.top_k=0 with rollout.is_correction"),
    (["rollout.engine=vllm", "rollout.top_k=5"], "rollout.top_p=1.0 / rollout.top_k=5 with rollout.is_correction"),
])
def test_values_that_failed_after_start_up_are_refused_at_load(overrides, start):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert str(e.value).startswith(start), str(e.value)


def test_a_config_read_for_evaluation_skips_the_training_checks(caplog):
    """A run's saved config read for its evaluation settings (python -m r1vl.eval), or an
    evaluation's own engine config: a training choice refused or warned about today (float16,
    data.test left at synthetic, top_k=1) must not throw the run's settings away."""
    over = ["model.dtype=float16", "optim.impl=foreach", "data.train=mine.jsonl", "rollout.top_k=1",
            "rollout.max_completion_length=1024"]
    with pytest.raises(ConfigError):
        load_config(None, over)
    with caplog.at_level("WARNING"):
        cfg = load_config(None, over, training=False)
    assert cfg.rollout.max_completion_length == 1024 and not caplog.records
    seed = load_config(None, ["seed=18446744073709551615"]).seed  # torch.manual_seed takes it
    assert seed == 2**64 - 1
    with pytest.raises(ConfigError, match=r"seed: expected a value in \[-9223372036854775808, 18446744073709551615\]"):
        load_config(None, ["seed=18446744073709551616"])


def test_output_dir_below_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match=r"^output_dir: '.*afile/sub/run' lies below '.*afile', which is a file"):
        load_config(None, [f"output_dir={tmp_path / 'afile' / 'sub' / 'run'}"])
    load_config(None, [f"output_dir={tmp_path / 'new' / 'sub'}"])


def test_values_beside_the_refused_ones_still_load():
    for ok in (["model.dtype=float16", "train.max_steps=0", "warmup.steps=0"],  # nothing trained
               ["model.dtype=float16", "deepspeed=configs/ds_zero2.json"],  # (ds.check_config says more)
               ["model.tiny.vision_embed_dim=48", "model.tiny.vision_num_heads=4"],
               ["seed=-3"], ["seed=9223372036854775807"], ["data.min_pixels=1", "data.max_pixels=784"],
               ["rollout.vllm.max_num_batched_tokens=8192"], ["rollout.top_k=2"], ["rollout.top_k=1", "train.max_steps=0"],
               ["rollout.engine=vllm", "rollout.top_p=0.9", "rollout.vllm.logprobs_mode=raw_logprobs"],
               ["rollout.engine=vllm", "rollout.top_p=0.9", "rollout.is_correction=false"], ["rollout.top_p=0.9"]):
        load_config(None, ok)


def test_16_bit_weights_without_deepspeed_warn(caplog):
    """AdamW on bf16 weights (no DeepSpeed: no fp32 master copy) rounds most steps away (an
    audit: one StepGRPO step at lr 1e-6 changed 2.6% of a bf16 model's weights, 100% in fp32)."""
    (msg,) = _warnings(caplog, ["model.dtype=bfloat16", "optim.lr=1e-6"])
    assert msg.startswith("model.dtype=bfloat16 without DeepSpeed") and "0.4%" in msg and "lr=1e-06" in msg
    assert "deepspeed=configs/ds_zero2.json" in msg
    # DeepSpeed (fp32 masters), float32 weights, or nothing trained: nothing to say
    assert _warnings(caplog, ["model.dtype=bfloat16", "deepspeed=configs/ds_zero2.json"]) == []
    assert _warnings(caplog, ["model.dtype=bfloat16", "train.max_steps=0", "warmup.steps=0"]) == []


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_adamw_on_float16_weights_blows_up_whatever_its_eps(impl):
    """What model.dtype=float16 without DeepSpeed is refused for: torch's AdamW on float16
    weights (moments in float16) takes steps hundreds of times an fp32 AdamW's on the same
    gradients once a squared gradient underflows, fused or not, at eps 1e-8 and 1e-6."""
    import torch

    for eps in (1e-8, 1e-6):
        torch.manual_seed(0)
        w = torch.randn(1000) * 0.02
        p16, p32 = w.half().requires_grad_(True), w.clone().requires_grad_(True)
        kw = dict(lr=5e-4, betas=(0.9, 0.99), eps=eps, weight_decay=0.0)
        o16 = torch.optim.AdamW([p16], **kw, **{impl: True})
        o32 = torch.optim.AdamW([p32], **kw)
        worst = 0.0
        for _ in range(3):
            g = torch.randn(1000) * 1e-3  # |g| < 2.4e-3: (1 - beta2) g^2 < 6e-8, float16's smallest
            p16.grad, p32.grad = g.half(), g.clone()
            b16, b32 = p16.detach().float(), p32.detach().clone()
            o16.step(), o32.step()
            ratio = float((p16.detach().float() - b16).abs().max() / (p32.detach() - b32).abs().max())
            worst = max(worst, ratio if ratio == ratio else float("inf"))
        assert worst > 50, (impl, eps, worst)


def test_deepspeed_precision_against_model_dtype(tmp_path, caplog):
    """Under DeepSpeed the config's bf16/fp16 decides the training precision: float16 weights
    under a config with neither are refused (AdamW on the float16 weights themselves); a 16-bit
    model.dtype the config overrides, or bf16 weights without master copies, are warned about."""
    import json

    from r1vl import ds

    def conf(name, **sections):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"zero_optimization": {"stage": 2}, **sections}))
        return str(path)

    fp32, bf16, auto = conf("fp32"), conf("bf16", bf16={"enabled": True}), conf("auto", fp16={"enabled": "auto"})

    def warned(dtype, path, *extra):
        caplog.clear()
        with caplog.at_level("WARNING", logger="r1vl.ds"):
            ds.check_config(load_config(None, [f"model.dtype={dtype}", f"deepspeed={path}", *extra]))
        return [r.getMessage() for r in caplog.records]

    with pytest.raises(ds.DeepSpeedConfigError, match=r"fp32.json: model.dtype=float16 with neither bf16 nor fp16 "
                                                      r"enabled there .*AdamW keeps its moments in float16"):
        warned("float16", fp32)
    assert warned("float16", fp32, "warmup.steps=0", "train.max_steps=0") == []  # nothing trained
    (msg,) = warned("float16", bf16)
    assert msg.startswith(f"model.dtype=float16 with {bf16}, which enables bf16: the model computes and trains in "
                          "bfloat16")
    (msg,) = warned("bfloat16", fp32)
    assert msg.startswith(f"model.dtype=bfloat16 with {fp32}, which enables neither bf16 nor fp16")
    assert warned("float16", auto) == warned("bfloat16", bf16) == warned("float32", bf16) == []
