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
    ("optim.eps=-1", ["optim.eps", ">= 0", "-1.0"]),
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
    cfg = load_config(None, ["rollout.top_p=1.0", "optim.beta1=0", "optim.beta2=0.999", "optim.eps=0",
                             "algorithm.epsilon_low=0", "algorithm.epsilon_high=5",
                             "rollout.vllm.gpu_memory_utilization=1"])
    assert cfg.rollout.top_p == 1.0 and cfg.optim.beta2 == 0.999 and cfg.optim.eps == 0.0
    assert cfg.algorithm.epsilon_high == 5.0  # clip-higher: no upper bound
    assert load_config(None, ["algorithm.epsilon_low=0.999"]).algorithm.epsilon_low == 0.999


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
