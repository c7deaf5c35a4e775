"""Strict config: every error path names the key path, the value and what is allowed."""

import dataclasses
from pathlib import Path

import pytest

from diffusion.config import Config, ConfigError, config_from_dict, load_config

REPO = Path(__file__).resolve().parents[2]


def test_repository_params_yaml_loads():
    cfg = load_config(REPO / "params.yaml")
    assert cfg.data.source == "mnist"
    assert cfg.model.preset == "mnist_fast"
    assert cfg.model.base_channels == 16          # from the preset
    assert cfg.model.num_classes == 10            # given beside the preset


def test_defaults_are_valid_and_frozen():
    cfg = load_config(None)
    assert isinstance(cfg, Config)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0


@pytest.mark.parametrize("raw, fragment", [
    ({"train": {"lr": -0.001}}, "train.lr = -0.001: must be > 0.0"),
    ({"train": {"lr": 0}}, "train.lr = 0.0: must be > 0.0"),
    ({"diffusion": {"timesteps": 1}}, "diffusion.timesteps = 1: must be >= 2"),
    ({"diffusion": {"schedule": "quadratic"}},
     "diffusion.schedule = 'quadratic': expected one of 'linear', 'cosine'"),
    ({"train": {"steps": 1.5}}, "train.steps = 1.5: expected an integer"),
    ({"train": {"budget_minutes": -1}}, "train.budget_minutes = -1.0: must be >= 0.0"),
    ({"evaluate": {"precision": "int8"}}, "evaluate.precision = 'int8': expected one of 'auto', 'fp32'"),
    ({"evaluate": {"confidence_threshold": 0}}, "evaluate.confidence_threshold = 0.0: must be > 0.0"),
    ({"train": {"steps": True}}, "train.steps = True: expected an integer"),
    ({"train": {"ema_warmup": "yes"}}, "train.ema_warmup = 'yes': expected true or false"),
    ({"train": {"lr": "fast"}}, "train.lr = 'fast': expected a number"),
    ({"train": {"colour": 3}}, "train.colour = 3: unknown key; allowed keys: steps,"),
    ({"trian": {"lr": 1e-3}}, "trian: unknown section; allowed sections: data, model,"),
    ({"model": {"preset": "huge"}}, "model.preset = 'huge': expected one of 'custom', 'tiny'"),
    ({"model": {"channel_mult": 2}}, "model.channel_mult = 2: expected a list of an integer"),
    ({"model": {"channel_mult": [1, "x"]}}, "model.channel_mult[1] = 'x': expected an integer"),
    ({"model": {"dropout": 1.0}}, "model.dropout = 1.0: must be < 1.0"),
    ({"train": {"precision": "fp8"}}, "train.precision = 'fp8': expected one of 'auto', 'fp32', 'bf16', 'fp16'"),
    ({"data": {"resolution": 30}, "model": {"channel_mult": [1, 2, 2]}},
     "data.resolution = 30: must be divisible by 4 for 3 levels"),
    ({"model": {"attention_resolutions": [5]}},
     "model.attention_resolutions contains 5: feature-map sizes of this model are [28, 14, 7]"),
    ({"evaluate": {"steps": 2000}}, "evaluate.steps = 2000: must be <= diffusion.timesteps (1000)"),
    ({"model": "big"}, "model = 'big': expected a mapping"),
])
def test_each_bad_value_is_named(raw, fragment):
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw, "params.yaml")
    assert fragment in str(err.value)
    assert str(err.value).startswith("params.yaml: invalid configuration")


def test_all_errors_are_reported_at_once():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"train": {"lr": -1, "steps": "many", "bogus": 1}})
    text = str(err.value)
    assert "train.lr" in text and "train.steps" in text and "train.bogus" in text


def test_yaml_exponent_strings_are_numbers(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-3 as a string; the loader accepts it for float keys only.
    p = tmp_path / "params.yaml"
    p.write_text("train:\n  lr: 1e-3\n")
    assert load_config(p).train.lr == pytest.approx(1e-3)
    p.write_text("train:\n  steps: 1e3\n")
    with pytest.raises(ConfigError, match="train.steps = '1e3': expected an integer"):
        load_config(p)


def test_overrides_go_through_the_same_checks(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("train:\n  lr: 0.001\n")
    cfg = load_config(p, ["train.lr=2e-4", "model.channel_mult=[1,2]", "model.attention_resolutions=[]"])
    assert cfg.train.lr == pytest.approx(2e-4)
    assert cfg.model.channel_mult == (1, 2)
    with pytest.raises(ConfigError, match=r"train.lr = -5.0: must be > 0.0"):
        load_config(p, ["train.lr=-5"])
    with pytest.raises(ConfigError, match=r"train.nope = 1: unknown key"):
        load_config(p, ["train.nope=1"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(p, ["lr=1"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(p, ["train.lr"])


def test_preset_then_explicit_keys():
    cfg = config_from_dict({"model": {"preset": "ddpm_cifar10", "dropout": 0.0},
                            "data": {"resolution": 32, "channels": 3}})
    assert cfg.model.base_channels == 128 and cfg.model.channel_mult == (1, 2, 2, 2)
    assert cfg.model.dropout == 0.0


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml: file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml: expected a mapping of sections"):
        load_config(listy)


def test_hash_ignores_excluded_keys_only():
    a = load_config(None)
    b = load_config(None, ["train.steps=5"])
    c = load_config(None, ["train.lr=0.5"])
    assert a.hash() != b.hash()
    assert a.hash(exclude=["train.steps"]) == b.hash(exclude=["train.steps"])
    assert a.hash(exclude=["train.steps"]) != c.hash(exclude=["train.steps"])
