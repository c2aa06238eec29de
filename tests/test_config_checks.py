"""Tests for vit_jax/config_checks.py and the command line's config handling (vit_jax/main.py):
overrides reach every key and model field, durations switch unit, bad values are named early."""
import ast
import dataclasses
import sys

from absl import flags
import jax.numpy as jnp
import pytest

from configs import common
from configs import fashion_mnist
from vit_jax import config_checks
from vit_jax import errors
from vit_jax import main
from vit_jax import models
from vit_jax import optim
from vit_jax import trainer


def parse(*args):
  """The config `python -m vit_jax.main ARGS` would train: flags parsed, overrides checked.
  (config_flags finds the overrides in sys.argv.)"""
  fv = flags.FlagValues()
  main.define_config_flag(fv)
  argv = ["prog", *args]
  with pytest.MonkeyPatch.context() as m:
    m.setattr(sys, "argv", argv)
    fv(argv)
  return main.checked_config(fv)


def test_a_duration_on_the_command_line_replaces_the_configs_unit():
  c = parse("--config=configs/fashion_mnist.py:vit", "--config.total_steps=3",
            "--config.lr.warmup_steps=0", "--config.log_every_epochs=1")
  assert (c.total_steps, c.total_epochs, c.total_examples) == (3, None, None)
  assert (c.lr.warmup_steps, c.lr.warmup_epochs) == (0, None)
  assert (c.log_every_epochs, c.log_every_steps) == (1, None)
  assert optim.resolve_durations(c, steps_per_epoch=469)[:3] == (3, 0, 469)
  with pytest.raises(ValueError, match="total_steps and --config.total_epochs both set"):
    parse("--config=configs/fashion_mnist.py:vit", "--config.total_steps=3",
          "--config.total_epochs=2")


def test_misspelt_keys_are_named_with_the_closest_ones():
  with pytest.raises(ValueError, match=r"--config\.totl_epochs: unknown config key\. Did you "
                                       r"mean total_epochs"):
    parse("--config=configs/fashion_mnist.py:vit", "--config.totl_epochs=1")
  with pytest.raises(ValueError, match=r"--config\.model\.dropout_rat: ViT-Mu/7 has no field "
                                       r"'dropout_rat'\. Did you mean dropout_rate"):
    parse("--config=configs/fashion_mnist.py:vit", "--config.model.dropout_rat=0.1")


def test_documented_keys_are_reachable():
  c = parse("--config=configs/fashion_mnist.py:vit", "--config.dataset.channels=1",
            "--config.model.dropout_rate=0.1", "--config.dataset.shuffle_buffer=10")
  assert (c.dataset.channels, c.model.dropout_rate, c.dataset.shuffle_buffer) == (1, 0.1, 10)


def _literal(value):
  """A command-line literal for a field value (dtypes by name)."""
  if isinstance(value, type) or hasattr(value, "dtype") and not hasattr(value, "shape"):
    return repr(jnp.dtype(value).name)
  if isinstance(value, str):
    return value  # as a user types it: --config.model.posemb=sincos2d
  text = repr(value)
  ast.literal_eval(text)  # a value the flag parser can read back
  return text


@pytest.mark.parametrize("arg", ["vit", "hybrid", "resnet", "swin"])
def test_every_field_of_the_model_is_reachable_from_the_command_line(arg):
  """Walks the fields of the config's model: each one given on the command line (its current
  value, or the model's default) lands in config.model and builds the model."""
  base = fashion_mnist.get_config(arg)
  cls = type(models.get_model(base.model_name, num_classes=10))
  named = models.get_model(base.model_name, num_classes=10, **base.model.to_dict())
  fields = models.fields(base.model_name)
  assert fields == {f.name for f in dataclasses.fields(cls)} - {"parent", "name", "num_classes"}
  args = []
  for f in sorted(fields):
    value = getattr(named, f)
    args.append(f"--config.model.{f}={_literal(value)}")
  c = parse(f"--config=configs/fashion_mnist.py:{arg}", *args)
  assert set(c.model.keys()) == fields
  model = trainer.build_model(c, 10)
  for f in fields:
    want = getattr(named, f)
    got = getattr(model, f)
    assert got == want or jnp.dtype(got) == jnp.dtype(want), f


def _valid():
  c = fashion_mnist.get_config("vit")
  return c


@pytest.mark.parametrize("change, message", [
    (dict(eval_batch_size=12), r"eval_batch_size=12 is not divisible by mesh.data x mesh.fsdp = 8"),
    (dict(batch_size=20), r"batch_size=20 is not divisible"),
    (dict(grad_accum_steps=32), r"grad_accum_steps=32: the batch per device \(128 / 8 = 16\)"),
    (dict(total_epochs=-1.0), r"total_epochs=-1.0: a duration must be a number >= 0"),
    (dict(total_epochs=None), r"Set one of total_steps, total_epochs or total_examples"),
    (dict(pp_train="decode|flipp_lr"), r"pp_train: Unknown pp op 'flipp_lr'"),
    (dict(train_split="train[:10%"), r"train_split: Cannot parse split"),
    (dict(parallel="pjit"), r"parallel='pjit'"),
    (dict(optax__name="lamb"), r"optax.name='lamb'"),
    (dict(mesh__model=3), r"mesh: "),
])
def test_validate_names_the_key_before_anything_runs(change, message):
  c = _valid()
  for k, v in change.items():
    node, *path = k.split("__")
    if path:
      c[node][path[0]] = v
    else:
      c[k] = v
  with pytest.raises(errors.ConfigError, match=message):
    config_checks.validate(c, device_count=8, process_count=1,
                           model_fields=models.fields(c.model_name))


def test_validate_accepts_every_shipped_config():
  for arg in fashion_mnist.MODELS:
    c = fashion_mnist.get_config(arg)
    config_checks.validate(c, device_count=8, process_count=1,
                           model_fields=models.fields(c.model_name))


def test_resume_changes_list_what_alters_the_run_and_ignore_the_rest():
  a = common.base_config()
  b = common.base_config()
  b.seed, b.lr.base, b.model.dropout_rate = 1, 0.5, 0.1
  b.eval_every_steps, b.fewshot.shots, b.mesh.fsdp, b.total_steps = 10, (5,), 2, 100
  assert config_checks.resume_changes(a, b) == [
      "lr.base: 0.001 -> 0.5", 'model.dropout_rate: "<unset>" -> 0.1', "seed: 0 -> 1"]


def test_keys_added_since_a_run_started_are_ignored_while_switched_off():
  old = common.base_config().to_dict()
  # a config.json written before these keys existed
  del old["distill"], old["ema_decay"], old["repeated_aug"]
  new = common.base_config()
  assert config_checks.resume_changes(old, new) == []
  new.distill.teacher = "workdirs/teacher"
  assert config_checks.resume_changes(old, new)[0].startswith("distill.alpha")


# ------------------------------------------------------------- model fields vs images, types.
@pytest.mark.parametrize("name,fields,shape,match", [
    ("ViT-Mu/7", dict(patch_size=(5, 5)), (28, 28, 1),
     r"model\.patch_size=\(5, 5\) does not divide the 28x28 images: the last 3 rows"),
    ("ViT-Mu/7", dict(hidden_size=16, num_heads=3), (28, 28, 1),
     r"model\.num_heads=3 does not divide model\.hidden_size=16"),
    ("Swin-T", dict(window_size=9, img_size=28), (28, 28, 3),
     r"model\.window_size=9 is larger than the first stage's 7x7 feature map"),
    ("Swin-T", dict(embed_dim=8, num_heads=(3, 1, 1, 1), img_size=28), (28, 28, 3),
     r"stage 0 has 3 heads for 8 features"),
])
def test_model_shapes_names_the_field(name, fields, shape, match):
  model = models.get_model(name, num_classes=10, **fields)
  with pytest.raises(errors.ConfigError, match=match):
    config_checks.model_shapes(model, shape)


@pytest.mark.parametrize("name,fields,shape", [
    ("ViT-Mu/7", {}, (28, 28, 1)),
    ("ViT-B/16", {}, (224, 224, 3)),
    ("Swin-T", dict(img_size=28), (28, 28, 3)),  # window 7 == the first 7x7 map: allowed
    ("Swin-T", {}, (224, 224, 3)),  # the published model: its last stages are clamped
])
def test_model_shapes_accepts_what_works(name, fields, shape):
  config_checks.model_shapes(models.get_model(name, num_classes=10, **fields), shape)


@pytest.mark.parametrize("field,value,match", [
    ("patch_size", 7, r"model\.patch_size=7: ViT-Mu/7's patch_size is a tuple, e\.g\. \(16, 16\)"),
    ("hidden_size", 16.5, r"model\.hidden_size=16\.5: ViT-Mu/7's hidden_size is an int"),
    ("scan", 1, r"model\.scan=1: ViT-Mu/7's scan is a bool"),
    ("classifier", 3, r"model\.classifier=3: ViT-Mu/7's classifier is a string"),
])
def test_a_model_field_of_the_wrong_type_is_named(field, value, match):
  def config(**model):
    c = common.base_config()
    c.model_name, c.total_steps, c.batch_size, c.eval_batch_size = "ViT-Mu/7", 1, 8, 8
    c.model.update(model)
    return c
  check = lambda c: config_checks.validate(c, device_count=1, process_count=1,
                                           model_fields=models.fields(c.model_name))
  with pytest.raises(errors.ConfigError, match=match):
    check(config(**{field: value}))
  check(config(patch_size=(7, 7), hidden_size=16, scan=True, classifier="gap",
               dropout_rate=0))  # the right types (an int for a float field is fine)


def test_keep_checkpoints_below_one_is_named():
  c = common.base_config()
  c.total_steps, c.keep_checkpoints = 1, 0
  with pytest.raises(errors.ConfigError, match=r"keep_checkpoints=0: must be an int >= 1"):
    config_checks.validate(c, device_count=1, process_count=1)


def test_a_union_typed_model_field_takes_either_type():
  c = common.base_config()
  c.model_name, c.total_steps, c.batch_size, c.eval_batch_size = "Swin-T", 1, 8, 8
  c.model.img_size = (28, 28)  # Swin's img_size: an int or (H, W)
  config_checks.validate(c, device_count=1, process_count=1,
                         model_fields=models.fields(c.model_name))
