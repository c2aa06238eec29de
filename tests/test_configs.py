"""Tests for configs/: every config loads, and every key a config has is read by the code."""
import ast
import glob
import importlib
import os
import re

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import common
from configs import fashion_mnist
from vit_jax import metrics
from vit_jax import models
from vit_jax import optim
from vit_jax import parallel
from vit_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_ARGS = {
    "fashion_mnist": list(fashion_mnist.MODELS),
    # Loads only here (a DETR step compiles for minutes on 2 cores); tests/test_train_detr.py
    # trains a shrunk DETR-Mu through the trainer.
    "detr_fashion_mnist": [""],
    "image_transformer": ["2d", "1d", "full"],  # trained by tests/tasks/test_generation.py
    "deit": ["DeiT-S/16", "DeiT-Ti/16-distilled", "DeiT-B/16-distilled,epochs=100"],
    "finetune": ["cifar10,ViT-B/16", "pets,ViT-S/16", "imagenet1k,ViT-L/16", "flowers,ViT-Ti/16",
                 "cifar100,R50+ViT-B/16,lr=0.003"],
    "imagenet_scratch": ["imagenet1k,ViT-B/16", "imagenet21k,ViT-L/16,epochs=30",
                         "imagenet1k,ViT-Ti/16", "imagenet1k,BiT-R50x1",
                         "imagenet21k,R50+ViT-B/16", "imagenet1k,ViT-S/16,recipe=plain,epochs=300",
                         "imagenet1k,ViT-B/32,recipe=augreg", "imagenet21k,ViT-B/16,recipe=augreg,"
                         "aug=strong1,reg=0.1,epochs=30", "imagenet1k,Swin-B",
                         "imagenet1k,Swin-T,recipe=swin,epochs=100"],
}
# One run of two steps per config file under tfds.testing.mock_data, with the config's own
# model, optimizer and pp strings (splits and batch shrunk); ViT-S/16 and ViT-Ti/16 at 224 px take
# 30-45 s each here, so they run with `make test-all`.
TWO_STEP_RUNS = [
    ("imagenet_scratch", "imagenet1k,ViT-S/16,recipe=plain", True),
    ("finetune", "cifar10,ViT-Ti/16", True),
    ("imagenet_scratch", "imagenet1k,ViT-Ti/16", True),
    ("imagenet_scratch", "imagenet1k,ViT-Ti/16,recipe=augreg,aug=strong2,reg=0.1", True),
    ("deit", "DeiT-Ti/16-distilled", True),
    ("imagenet_scratch", "imagenet1k,Swin-T", True),
    # Relative positions and attention in ResNets (model fields on top of the recipe).
    ("imagenet_scratch", "imagenet1k,ViT-Ti/16", True, dict(posemb="relbias")),
    ("imagenet_scratch", "imagenet1k,ViT-Ti/16", True, dict(posemb="rope2d")),
    ("imagenet_scratch", "imagenet1k,NL-ResNet-50", True),
    ("imagenet_scratch", "imagenet1k,AA-ResNet-50", True),
]


def test_every_config_file_is_covered():
  files = {os.path.basename(f)[:-3] for f in glob.glob(os.path.join(ROOT, "configs", "*.py"))}
  assert files - {"__init__", "common"} == set(CONFIG_ARGS)


@pytest.mark.parametrize("module,arg", [(m, a) for m, args in CONFIG_ARGS.items() for a in args])
def test_config_loads_with_base_keys_and_a_valid_model(module, arg):
  cfg = importlib.import_module(f"configs.{module}").get_config(arg)
  base = common.base_config()
  # Configs set values; they never invent keys the trainer does not know.
  flat = lambda c: set(_leaf_paths(c))
  extra = flat(cfg) - flat(base)
  assert not {k for k in extra if not k.startswith("model.")}, extra
  # The docstring starts with the command that runs it.
  doc = importlib.import_module(f"configs.{module}").__doc__
  assert f"--config=configs/{module}.py" in doc
  # The model name and its overrides are accepted by the registry.
  models.get_model(cfg.model_name, num_classes=10, **cfg.model.to_dict())


def test_config_args_errors_name_the_known_ones():
  with pytest.raises(ValueError, match="Unknown fashion_mnist config arg 'vitt'.*vit, hybrid"):
    fashion_mnist.get_config("vitt")
  from configs import deit
  with pytest.raises(ValueError, match="Unknown deit config model.*DeiT-Ti/16, "):
    deit.get_config("DeiT-M/16")
  with pytest.raises(ValueError, match=r"Unknown option\(s\) \['lr'\]; known: teacher, epochs"):
    deit.get_config("DeiT-S/16,lr=1")
  from configs import imagenet_scratch
  with pytest.raises(ValueError, match="recipe=swin is not for ViT-B/16"):
    imagenet_scratch.get_config("imagenet1k,ViT-B/16,recipe=swin")
  with pytest.raises(ValueError, match="recipe=vit is not for Swin-B"):
    imagenet_scratch.get_config("imagenet1k,Swin-B,recipe=vit")


def _leaf_paths(cfg, prefix=""):
  for k, v in cfg.items():
    if isinstance(v, ml_collections.ConfigDict) and k != "model":
      yield from _leaf_paths(v, f"{prefix}{k}.")
    else:
      yield prefix + k


def test_every_base_key_is_read(tmp_path, monkeypatch):
  """Runs training (and the code paths that read the other keys) while recording every key
  access; a key that nothing reads is dead configuration and fails this test."""
  read = set()
  original = ml_collections.ConfigDict.__getitem__
  owner = {}

  def recording(self, key):
    value = original(self, key)
    if isinstance(key, str) and "." not in key:
      read.add(owner.get(id(self), "?") + key)
    return value

  cfg = common.base_config()
  cfg.model_name = "ViT-Mu/7"
  cfg.model.update(dict(hidden_size=16, mlp_dim=32, num_heads=2, num_layers=1))
  cfg.dataset.name = "tfds:mnist"
  cfg.train_split, cfg.eval_split = "train[:32]", "test[:16]"
  cfg.batch_size = cfg.eval_batch_size = 16
  cfg.total_steps = 2
  cfg.checkpoint_every_steps = 2
  cfg.fewshot.shots = (1,)
  cfg.fewshot.train_split = "train[:40]"
  cfg.fewshot.test_split = "test[:16]"
  cfg.checkpoint_async = False  # see tests/test_train.py's tiny_config

  def walk(c, prefix=""):
    owner[id(c)] = prefix
    for k, v in c.items():
      if isinstance(v, ml_collections.ConfigDict):
        walk(v, f"{prefix}{k}.")
  walk(cfg)
  monkeypatch.setattr(ml_collections.ConfigDict, "__getitem__", recording)
  with tfds.testing.mock_data(num_examples=64):
    train.train_and_evaluate(cfg, str(tmp_path))
  # Keys read only on other paths: the SGD optimizer, a pretrained checkpoint, multi-host init.
  sgd = common.base_config()
  sgd.optax.name = "momentum"
  walk(sgd)
  optim.make_optimizer(sgd, {"w": {"kernel": 0.0}}, total_steps=1, warmup_steps=0)
  monkeypatch.setattr(parallel.jax.distributed, "initialize", lambda **kw: None)
  parallel.initialize_distributed(cfg.distributed)
  read_paths = set(read)
  other_paths = {
      "pretrained.strict",  # read when pretrained.path is set
      "dataset.prepare",  # read when the data set is missing
      "dataset.channels",  # image_folder sources
      "dataset.tfds_fallback", "dataset.tfds_data_dir",  # fashion_mnist sources
      # read when distill.teacher is set (tests/test_train.py's distillation tests)
      "distill.model", "distill.type", "distill.alpha", "distill.tau",
  }
  unread = [k for k in _leaf_paths(common.base_config())
            if k not in read_paths and not k.startswith("model") and k not in other_paths]
  assert not unread, f"config keys nothing reads: {unread}"


@pytest.mark.parametrize("module,arg,fields", [
    pytest.param(m, a, *(rest or ({},)), marks=[pytest.mark.slow] if slow else [],
                 id="-".join([m, a] + [f"{k}={v}" for k, v in (rest or [{}])[0].items()]))
    for m, a, slow, *rest in TWO_STEP_RUNS])
def test_config_builds_and_runs_two_steps(tmp_path, monkeypatch, module, arg, fields):
  cfg = importlib.import_module(f"configs.{module}").get_config(arg)
  cfg.model.update(fields)
  cfg.train_split, cfg.eval_split = "train[:16]", "train[16:24]"
  cfg.test_split = "test[:8]" if cfg.test_split else ""
  cfg.batch_size = cfg.eval_batch_size = 8
  if cfg.repeated_aug > 1:  # DeiT's x3: a batch that both the repeats and the 8 devices divide
    cfg.batch_size = 8 * cfg.repeated_aug
  cfg.total_epochs, cfg.total_steps = None, 2
  cfg.lr.warmup_epochs = cfg.lr.warmup_examples = None  # DeiT and Swin warm up in epochs
  cfg.lr.warmup_steps = 1
  cfg.fewshot.shots = ()  # 25 shots of 1000 classes do not fit in mock data
  cfg.eval_every_steps = cfg.checkpoint_every_steps = None
  cfg.log_every_steps = 1
  if cfg.pretrained.required:
    cfg.pretrained.required = False  # weights cannot be downloaded here
  cfg.checkpoint_async = False  # see tests/test_train.py's tiny_config
  # The TFDS names are the configs' own; mock_data stands in for the files.
  with tfds.testing.mock_data(num_examples=32, policy=tfds.testing.MockPolicy.USE_CODE):
    result = train.train_and_evaluate(cfg, str(tmp_path))
  assert result["steps"] == 2 and np.isfinite(result["loss"])
  if cfg.test_split:
    assert result["test_num_examples"] == 8
  # The recipe's learning rate drives the optimizer: 0 at step 1 (warm-up), lr.base at step 2.
  # (Its other values are checked against their sources by test_recipes_match_the_reference_tables.)
  rows = [r for r in metrics.read_jsonl(str(tmp_path / "metrics.jsonl")) if "train_loss" in r]
  assert [r["step"] for r in rows] == [1, 2]
  assert rows[0]["lr"] == 0.0 and rows[1]["lr"] == pytest.approx(cfg.lr.base, rel=1e-6)


# ------------------------------------------ recipes against docs/reference.md's source tables.
RECIPE_SECTION = "## Recipe hyper-parameters"
CONFIG_SPAN = re.compile(r"`([a-z_0-9]+)\.py:([^`]*)`")


def _cell_literal(cell):
  """A table cell's value: the Python literal in its single code span; None when it has none."""
  spans = re.findall(r"`([^`]*)`", cell)
  return (True, ast.literal_eval(spans[0])) if len(spans) == 1 else (False, None)


def recipe_rows(path=os.path.join(ROOT, "docs", "reference.md")):
  """(line, configs, key, expected value) of every row of the section's tables (see the section's
  "How to read them"): `ours` if the row departs from the source, else `published`."""
  text = open(path).read()
  section = text[text.index(RECIPE_SECTION):]
  section = section[:section.index("\n## ", len(RECIPE_SECTION))]
  rows, configs, continued = [], [], False
  for line in section.splitlines():
    if line.startswith("Configs:") or (continued and line.startswith("`")):
      configs = (configs if continued else []) + CONFIG_SPAN.findall(line)
      continued = True
      continue
    continued = False
    if not line.startswith("| ") or line.startswith("| config |"):
      continue
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    assert len(cells) == 5, line
    where, key, published, ours, note = cells
    has_published, published_value = _cell_literal(published)
    has_ours, ours_value = _cell_literal(ours)
    assert note, f"row without a source: {line}"
    if has_ours:
      assert not has_published or published_value != ours_value, (
          f"`ours` repeats the published value; leave it empty: {line}")
      assert "departure" in note or "convention" in note, f"a departure needs its reason: {line}"
    else:
      assert not ours and has_published, f"no value to check: {line}"
    rows.append((line, CONFIG_SPAN.findall(where) or list(configs), key.strip("`"),
                 ours_value if has_ours else published_value))
  return rows


def _config_value(cfg, key):
  """The value behind a table key: a config key, `model.X` as the model is built, or
  `pp_train[op]` (the op of that name in the pipeline string, None if there is none)."""
  pp = re.fullmatch(r"(pp_train|pp_eval)\[(\w+)\]", key)
  if pp:
    ops = [op.replace(" ", "") for op in cfg[pp.group(1)].split("|")]
    found = [op for op in ops if re.fullmatch(pp.group(2) + r"(\(.*\))?", op)]
    assert len(found) <= 1, (key, ops)
    return found[0] if found else None
  if key.startswith("model."):
    model = models.get_model(cfg.model_name, num_classes=1000, **cfg.model.to_dict())
    return getattr(model, key[len("model."):])
  node = cfg
  for part in key.split("."):
    node = node[part]
  return node


def test_recipes_match_the_reference_tables():
  """Every hyper-parameter of docs/reference.md's recipe tables, in the config it names: the
  published value, or the documented departure from it."""
  rows = recipe_rows()
  built = {}
  for line, configs, key, expected in rows:
    assert configs, f"row without configs: {line}"
    for module, arg in configs:
      if (module, arg) not in built:
        built[module, arg] = importlib.import_module(f"configs.{module}").get_config(arg)
      got = _config_value(built[module, arg], key)
      if isinstance(expected, str) and key.startswith("pp_"):
        expected = expected.replace(" ", "")
      if isinstance(expected, float):
        assert got == pytest.approx(expected, rel=1e-12, abs=0.0), (module, arg, key, got)
      else:
        assert got == expected and type(got) is type(expected), (module, arg, key, got)
  # Each recipe file is in the tables (fashion_mnist.py: this repository's own CPU recipes).
  # fashion_mnist and image_transformer are our own CPU recipes, not published ones.
  assert {m for _, configs, _, _ in rows for m, _ in configs} == set(CONFIG_ARGS) - {
      "fashion_mnist", "image_transformer"}
  assert len(rows) > 150


def test_recipe_table_reader_catches_a_wrong_value(tmp_path):
  """The check above fails for a config that disagrees with its table, and for a table row that
  calls the published value a departure."""
  text = open(os.path.join(ROOT, "docs", "reference.md")).read()
  row = "| | `lr.warmup_epochs` | `5.0` | | Table 9; `--warmup-epochs` |"
  assert row in text
  wrong = tmp_path / "reference.md"
  wrong.write_text(text.replace(row, row.replace("`5.0`", "`6.0`")))
  (_, configs, key, expected), = [r for r in recipe_rows(str(wrong)) if "`6.0`" in r[0]]
  cfg = importlib.import_module("configs.deit").get_config(configs[0][1])
  assert (key, expected, _config_value(cfg, key)) == ("lr.warmup_epochs", 6.0, 5.0)
  wrong.write_text(text.replace(row, "| | `lr.warmup_epochs` | `5.0` | `5.0` | departure: no |"))
  with pytest.raises(AssertionError, match="`ours` repeats the published value"):
    recipe_rows(str(wrong))


def test_the_defaults_never_choose_on_the_test_split():
  """The base config evaluated on `test` during training (metrics named test_accuracy, like the
  result's once-at-the-end test figure) and probed few-shot on it; now both are carved from the
  training data and the test split is evaluated once, at the end."""
  from vit_jax import train
  c = common.base_config()
  assert train.eval_prefix(c) == "val"
  assert c.test_split == "test" and c.eval_split != c.test_split
  assert "test" not in (c.fewshot.train_split + c.fewshot.test_split)
