"""Tests for experiments/sweep.py: overrides become flags that vit_jax.main parses into the same
config; durations in the base config's units; experiment files and their args; the shipped sweeps."""
import math
import shlex

import pytest

from configs import common
from experiments import sweep
from vit_jax import optim

FMNIST = "configs/fashion_mnist.py:vit"


def _main_config(argv):
  """The config vit_jax.main builds from a command line (its own flag definition)."""
  return sweep._parse_flags([a for a in argv if a.startswith("--config")])


def test_leaf_overrides_are_plain_flags():
  p = sweep.Point("a", FMNIST, {"seed": 3, "train_split": "train@seeded(1000, seed=3)",
                                "fewshot.shots": (1, 5), "mixup": 0.2, "lr.base": 1e-4})
  assert sweep.override_flags(p) == [
      "--config.seed=3", "--config.train_split=train@seeded(1000, seed=3)",
      "--config.fewshot.shots=(1, 5)", "--config.mixup=0.2", "--config.lr.base=0.0001"]
  c = sweep.build_config(p)
  assert (c.seed, c.train_split, c.fewshot.shots, c.mixup, c.lr.base) == (
      3, "train@seeded(1000, seed=3)", (1, 5), 0.2, 1e-4)


def test_new_keys_and_none_fold_into_their_configdict():
  # config.model only holds what the config changed; ml_collections' flags cannot add a field
  # or set a float to None, so these become one dict flag per ConfigDict.
  p = sweep.Point("a", FMNIST, {"model.hidden_size": 16, "model": {"num_layers": 1},
                                "lr.warmup_epochs": None, "lr.warmup_steps": 3, "lr.base": 0.01})
  flags = sweep.override_flags(p)
  assert len(flags) == 2 and flags[0].startswith("--config.model={")
  c = sweep.build_config(p)
  base = sweep.load_config(FMNIST)
  assert dict(c.model) == dict(base.model, hidden_size=16, num_layers=1)
  assert (c.lr.warmup_epochs, c.lr.warmup_steps, c.lr.base, c.lr.decay) == (
      None, 3, 0.01, base.lr.decay)


def test_bad_overrides_name_the_key():
  with pytest.raises(ValueError, match="'modle.x' is not a key"):
    sweep.override_flags(sweep.Point("a", FMNIST, {"modle.x": 1}))
  with pytest.raises(ValueError, match="'total_epochs' cannot be set to None"):
    sweep.override_flags(sweep.Point("a", FMNIST, {"total_epochs": None}))
  with pytest.raises(ValueError, match="must start with a letter"):
    sweep.Point("../x", FMNIST)
  with pytest.raises(ValueError, match="two points named"):
    sweep.Sweep("s", [sweep.Point("a", FMNIST), sweep.Point("a", FMNIST)])


def test_command_is_what_main_parses():
  p = sweep.Point("a", FMNIST, {"model.hidden_size": 16, "total_epochs": 0.5,
                                "fewshot.train_split": "train[:100]"})
  argv = sweep.command(p, "/tmp/w", python="python")
  assert argv[:5] == ["python", "-m", "vit_jax.main", f"--config={FMNIST}", "--workdir=/tmp/w"]
  # Through a shell and back, then main's parser: the same config as build_config.
  again = _main_config(shlex.split(shlex.join(argv)))
  assert again.to_dict() == sweep.build_config(p).to_dict()


@pytest.mark.parametrize("unit", ["steps", "epochs", "examples"])
@pytest.mark.parametrize("n", [1000, 3000, 60000])
def test_examples_budget_gives_the_same_steps_in_every_unit(unit, n):
  c = common.base_config()
  c.batch_size = 256
  c.total_steps = c.total_epochs = c.total_examples = None
  c[f"total_{unit}"] = {"steps": 7, "epochs": 2.5, "examples": 999}[unit]
  over = sweep.examples_budget(c, "total", 20480, n)
  assert list(over) == [f"total_{unit}"]
  c[f"total_{unit}"] = over[f"total_{unit}"]
  steps = optim.durations(c, "total", steps_per_epoch=math.ceil(n / 256), batch_size=256)
  assert steps == 80  # 20480 / 256


def test_parse_arg_types_and_errors():
  d = dict(examples=10, sizes=(1, 2), models=("a",), name="x")
  assert sweep.parse_arg("examples=40,sizes=3/4,models=b/c", d) == dict(
      examples=40, sizes=(3, 4), models=("b", "c"), name="x")
  assert sweep.parse_arg(None, d) == d
  with pytest.raises(ValueError, match="key one of examples, sizes"):
    sweep.parse_arg("budget=3", d)


def test_fmnist_data_scaling_points():
  s = sweep.load_experiment(
      "experiments/fmnist_data_scaling.py:models=vit,seeds=0/1,evals=1")
  assert len(s.points) == 10
  p = {q.name: q for q in s.points}["vit_n3000_s1"]
  assert p.tags == {"family": "ViT", "model": "ViT-Mu/7", "train_size": 3000, "seed": 1,
                    "budget_examples": 20480}
  c = sweep.build_config(p)
  assert (c.train_split, c.seed, c.fewshot.shots) == ("train@seeded(3000, seed=1)", 1,
                                                      (1, 5, 10, 25))
  spe = math.ceil(3000 / c.batch_size)
  d = lambda k: optim.durations(c, k, steps_per_epoch=spe, batch_size=c.batch_size)
  assert c.batch_size == 128  # 20480 examples = 160 steps; warm-up 10%; one mid-run eval
  assert (d("total"), d("lr.warmup"), d("eval_every")) == (160, 16, 80)


def test_fmnist_data_scaling_default_has_three_families():
  s = sweep.load_experiment("experiments/fmnist_data_scaling.py")
  assert len(s.points) == 15
  assert {p.tags["family"] for p in s.points} == {"ResNet", "ViT", "Hybrid"}
  for p in s.points:
    c = sweep.build_config(p)  # every command parses
    assert (c.eval_every_steps, c.eval_every_epochs, c.eval_every_examples) == (None,) * 3
    # The recipe of the committed results, whatever configs/fashion_mnist.py now says.
    assert c.pp_train == "decode|flip_lr|value_range(-1,1)"
    assert c.model.get("posemb", "learn") == "learn"


def test_paper_scale_points_build():
  s = sweep.load_experiment("experiments/paper_scale.py")
  names = [p.name for p in s.points]
  assert "imagenet21k_n1281167_ViT-B_16_s0" in names and "imagenet1k_ViT-H_14_s0" in names
  for p in s.points:
    c = sweep.build_config(p)
    assert c.model_name == p.tags["model"]
