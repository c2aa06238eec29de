"""vit_jax/resume.py: a resumed run's config and data order against its workdir, and the configs
kept. (tests/test_train.py resumes whole runs through the loop.)"""
import json
import os

from absl import logging
import pytest

from configs import common
from vit_jax import errors
from vit_jax import resume


def _started(workdir, **overrides):
  config = common.base_config()
  config.total_steps = 100
  for k, v in overrides.items():
    setattr(config, k, v)
  resume.save_config(str(workdir), config, start_step=0)
  return config


def _check(workdir, config, *, allow=False, start_step=40):
  resume.check_config(str(workdir), config, start_step=start_step,
                      total_steps=int(config.total_steps), steps_per_epoch=10,
                      allow_config_change=allow)


def test_a_changed_key_is_an_error_naming_it_unless_allowed(tmp_path, monkeypatch):
  config = _started(tmp_path)
  _check(tmp_path, config)  # the same config resumes
  config.seed = 3
  with pytest.raises(errors.ConfigError, match=r"at step 40 .*seed: 0 -> 3.*--allow_config_change"):
    _check(tmp_path, config)
  _check(tmp_path, config, start_step=0)  # a fresh start checks nothing
  warnings = []
  monkeypatch.setattr(logging, "warning", lambda msg, *a: warnings.append(msg % a))
  _check(tmp_path, config, allow=True)
  assert "seed: 0 -> 3" in warnings[0] and "Resuming anyway" in warnings[0]


def test_a_longer_total_resumes_and_a_shorter_one_does_not(tmp_path, monkeypatch):
  config = _started(tmp_path)
  warnings = []
  monkeypatch.setattr(logging, "warning", lambda msg, *a: warnings.append(msg % a))
  config.total_steps = 200
  _check(tmp_path, config)
  assert "total duration: 100 -> 200 steps" in warnings[0] and "stretched" in warnings[0]
  config.total_steps = 50
  with pytest.raises(errors.ConfigError, match=r"total duration: 100 -> 50 steps.*longer total"):
    _check(tmp_path, config)


def test_a_resumed_run_with_another_config_keeps_the_one_it_started_with(tmp_path):
  config = _started(tmp_path)
  first = (tmp_path / "config.json").read_text()
  resume.save_config(str(tmp_path), config, start_step=40)  # unchanged: nothing new written
  assert os.listdir(tmp_path) == ["config.json"]
  config.seed = 3
  resume.save_config(str(tmp_path), config, start_step=40)
  assert (tmp_path / "config.step40.json").read_text() == first
  assert json.loads((tmp_path / "config.json").read_text())["seed"] == 3
