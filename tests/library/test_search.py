"""The points of a sweep (diffusion/search.py) and the checks of ``sweep.space`` (diffusion/config.py)."""

from pathlib import Path

import pytest

from diffusion.config import ConfigError, config_from_dict, load_config
from diffusion.search import draw_points, trial_config

REPO = Path(__file__).resolve().parents[2]
SPACE = {"train.lr": [1e-3, 2e-3, 1.0], "train.warmup_steps": {"low": 10, "high": 1000, "log": True},
         "train.ema_decay": {"low": 0.99, "high": 0.9999, "log": False}}


def test_points_are_seeded_stratified_and_in_range():
    points = draw_points(SPACE, 6, seed=3)
    assert points == draw_points(SPACE, 6, seed=3) != draw_points(SPACE, 6, seed=4)
    assert sorted(p["train.lr"] for p in points) == [1e-3, 1e-3, 2e-3, 2e-3, 1.0, 1.0]   # each choice twice
    steps = sorted(p["train.warmup_steps"] for p in points)
    assert all(isinstance(s, int) and 10 <= s <= 1000 for s in steps)
    assert steps[0] < 32 and steps[-1] > 316         # one draw per log-slice: both ends are covered
    assert all(0.99 <= p["train.ema_decay"] <= 0.9999 for p in points)


def test_a_trial_that_changes_the_preset_gets_its_architecture():
    base = load_config(REPO / "params.yaml")             # mnist_fast, 10 classes
    cfg = trial_config(base, {"model.preset": "tiny", "train.lr": 5e-3})
    assert (cfg.model.base_channels, cfg.model.channel_mult, cfg.model.attention_resolutions) == (16, (1, 2), ())
    assert cfg.model.num_classes == 10 and cfg.train.lr == 5e-3
    assert trial_config(base, {"train.lr": 5e-3}).model == base.model


@pytest.mark.parametrize("space, fragment", [
    ({"train.lrr": [1e-3]}, "sweep.space.train.lrr: unknown config key"),
    ({"sweep.trials": [2]}, "sweep.space.sweep.trials: unknown config key"),
    ({"train.lr": []}, "sweep.space.train.lr = []: expected a non-empty list of choices or {low, high, log}"),
    ({"train.lr": [1e-3, "fast"]}, "sweep.space.train.lr[1] = 'fast': expected a number"),
    ({"train.lr": {"low": 1e-2, "high": 1e-3}}, "sweep.space.train.lr: low = 0.01 must be < high = 0.001"),
    ({"train.lr": {"low": 0.5, "high": 2.0}}, "sweep.space.train.lr.high = 2.0: must be <= 1.0"),
    ({"train.ema_warmup": {"low": 0, "high": 1}}, "sweep.space.train.ema_warmup = {'low': 0, 'high': 1}: "
                                                 "expected a non-empty list of choices (true or false)"),
    ({"diffusion.target": ["eps", "x0"]}, "sweep.space.diffusion.target[1] = 'x0': expected one of 'eps', 'v'"),
    ({"evaluate.steps": [4, 8]}, "sweep.space.evaluate.steps: not a key a sweep may vary (model.*, diffusion.*, "
                                 "train.* but train.out_dir, "),
    ({"evaluate.steps": [4, 8]}, "evaluate.* would give trials different yardsticks"),
    ({"train.checkpoint_every": [10]}, "sweep.space.train.checkpoint_every: not a key a sweep may vary"),
])
def test_a_bad_space_names_its_key_path(space, fragment):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"sweep": {"space": space}}, "params.yaml")
    assert fragment in str(err.value)


def test_the_sweep_section_is_not_part_of_the_config_hash():
    # a checkpoint or Ray run of the pipeline resumes whatever the sweep section says
    assert config_from_dict({"sweep": {"trials": 3, "space": {"train.lr": [1e-3]}}}).hash() == \
        config_from_dict({}).hash()


def test_sweep_checkpoint_every_must_be_positive():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["sweep.checkpoint_every=0"])
    assert "sweep.checkpoint_every" in str(err.value)
