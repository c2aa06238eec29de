"""Tests for vit_jax/train.py: both parallel modes, jit == pmap, exact resume, NaN stop, export."""
import json
import os
import signal

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import common
from vit_jax import checkpoint
from vit_jax import data as data_lib
from vit_jax import train

TINY = dict(hidden_size=16, mlp_dim=32, num_heads=2, num_layers=1)


def tiny_config(**kw):
  c = common.base_config()
  c.model_name = "ViT-Mu/7"
  c.model.update(TINY)
  c.dataset.name = "tfds:mnist"
  c.train_split, c.eval_split = "train[:96]", "test[:50]"
  c.pp_train = "decode|random_crop(28, pad=2)|flip_lr|value_range(-1,1)"
  c.pp_eval = "decode|value_range(-1,1)"
  c.batch_size = 16
  c.eval_batch_size = 16  # 50 = 3 full batches + 2 real rows in a padded one
  c.total_steps = 6
  c.log_every_steps = 1
  c.checkpoint_every_steps = 2
  c.optax.name = "adamw"
  c.lr.base = 1e-2
  c.lr.warmup_steps = 2
  c.wd = 1e-4
  for k, v in kw.items():
    node = c
    *path, leaf = k.split("__")
    for p in path:
      node = node[p]
    node[leaf] = v
  return c


@pytest.fixture(autouse=True)
def mock_tfds():
  with tfds.testing.mock_data(num_examples=200):
    yield


def final_params(workdir):
  return checkpoint.load_npz(os.path.join(workdir, "params.npz"))


@pytest.mark.parametrize("mode", ["jit", "pmap"])
def test_train_runs_logs_checkpoints_and_exports(tmp_path, mode):
  workdir = str(tmp_path)
  result = train.train_and_evaluate(tiny_config(parallel=mode), workdir)
  assert result["num_examples"] == 50  # every eval example counted once, the last batch padded
  assert 0.0 <= result["accuracy"] <= 1.0 and np.isfinite(result["loss"])
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  train_rows = [r for r in rows if "train_loss" in r]
  assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
  for key in ("lr", "grad_norm", "img_per_sec", "examples_seen", "train_sec", "core_hours",
              "eta_sec", "train_accuracy"):
    assert key in train_rows[-1], key
  assert train_rows[-1]["examples_seen"] == 6 * 16
  assert (result["steps"], result["examples"]) == (6, 6 * 16)
  assert 0 < result["train_seconds"] <= train_rows[-1]["train_sec"] + 60
  np.testing.assert_allclose(train_rows[0]["lr"], 0.0)  # warm-up starts at 0
  np.testing.assert_allclose(train_rows[1]["lr"], 5e-3)
  assert rows[-1]["test_num_examples"] == 50
  assert checkpoint.TrainCheckpointer(workdir).latest_step() == 6
  assert final_params(workdir)["head"]["kernel"].shape == (16, 10)


def test_jit_and_pmap_give_the_same_parameters(tmp_path):
  # No dropout: the only difference is where the batch mean is taken.
  # SGD: Adam's g / sqrt(v) would amplify float rounding in near-zero gradients.
  cfg = lambda mode: tiny_config(parallel=mode, optax__name="momentum", lr__base=0.1)
  a = train.train_and_evaluate(cfg("jit"), str(tmp_path / "jit"))
  b = train.train_and_evaluate(cfg("pmap"), str(tmp_path / "pmap"))
  pa, pb = final_params(str(tmp_path / "jit")), final_params(str(tmp_path / "pmap"))
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=2e-5), pa, pb)
  np.testing.assert_allclose(a["loss"], b["loss"], atol=1e-4)


class _Interrupt(Exception):
  pass


def _interrupting_iterator(monkeypatch, after_batches, how):
  """Makes train_iterator signal SIGTERM / raise once `after_batches` batches were taken."""
  original = data_lib.train_iterator

  def wrapped(*args, **kwargs):
    it = original(*args, **kwargs)
    for i, batch in enumerate(it):
      if i == after_batches:
        if how == "sigterm":
          os.kill(os.getpid(), signal.SIGTERM)
        else:
          raise _Interrupt()
      yield batch
  monkeypatch.setattr(data_lib, "train_iterator", wrapped)
  return original


@pytest.mark.parametrize("how", ["sigterm", "crash"])
def test_resume_is_bitwise_exact(tmp_path, monkeypatch, how):
  cfg = tiny_config(model__dropout_rate=0.1, model__droppath_rate=0.1)
  train.train_and_evaluate(cfg, str(tmp_path / "straight"))
  workdir = str(tmp_path / "interrupted")
  original = _interrupting_iterator(monkeypatch, 4, how)
  if how == "sigterm":
    # The signal arrives while step 4 runs; the run saves step 4 and returns.
    assert train.train_and_evaluate(cfg, workdir) == {"stopped_at_step": 4}
    assert checkpoint.TrainCheckpointer(workdir).latest_step() == 4
  else:
    # A crash after step 4's batch was fetched: the last checkpoint is step 2 (every 2 steps)...
    with pytest.raises(_Interrupt):
      train.train_and_evaluate(cfg, workdir)
    assert checkpoint.TrainCheckpointer(workdir).latest_step() in (2, 4)
  monkeypatch.setattr(data_lib, "train_iterator", original)
  train.train_and_evaluate(cfg, workdir)  # the same command again resumes
  a, b = final_params(str(tmp_path / "straight")), final_params(workdir)
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  cfg = tiny_config(optax__name="sgd", lr__base=1e30, lr__warmup_steps=None, grad_clip_norm=0.0,
                    checkpoint_every_steps=1, lr__decay="constant")
  with pytest.raises(train.NonFiniteLossError, match=r"at step \d.*last good checkpoint"):
    train.train_and_evaluate(cfg, str(tmp_path))
  ckpt = checkpoint.TrainCheckpointer(str(tmp_path))
  step = ckpt.latest_step()
  assert step is not None and step >= 1


def test_grad_accumulation_matches_full_batch(tmp_path):
  cfg = lambda n: tiny_config(total_steps=2, grad_accum_steps=n, optax__name="momentum")
  a = train.train_and_evaluate(cfg(1), str(tmp_path / "a"))
  b = train.train_and_evaluate(cfg(2), str(tmp_path / "b"))
  pa, pb = final_params(str(tmp_path / "a")), final_params(str(tmp_path / "b"))
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=2e-5), pa, pb)


def test_eval_only_mode_reads_the_checkpoint(tmp_path):
  cfg = tiny_config()
  trained = train.train_and_evaluate(cfg, str(tmp_path))
  evaluated = train.evaluate_checkpoint(cfg, str(tmp_path))
  np.testing.assert_allclose(evaluated["accuracy"], trained["accuracy"])
  assert evaluated["num_examples"] == 50
  with pytest.raises(FileNotFoundError, match="No checkpoint in"):
    train.evaluate_checkpoint(cfg, str(tmp_path / "empty"))


@pytest.mark.parametrize("arg", [
    "hybrid",
    # Their convolutions / windows compile and run slowly on XLA CPU: `make test-all` runs them.
    pytest.param("resnet", marks=pytest.mark.slow),
    pytest.param("swin", marks=pytest.mark.slow)])
def test_every_family_trains_from_its_fashion_mnist_config(tmp_path, arg):
  """ResNet, hybrid and Swin go through the same config file and trainer as ViT."""
  if not os.path.exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"):
    pytest.skip("Fashion-MNIST files missing: apt-get install dataset-fashion-mnist")
  from configs import fashion_mnist
  cfg = fashion_mnist.get_config(arg)
  cfg.train_split, cfg.eval_split = "train[:64]", "test[:40]"
  cfg.batch_size = cfg.eval_batch_size = 16
  cfg.total_epochs, cfg.total_steps = None, 2
  cfg.lr.warmup_epochs = None
  cfg.checkpoint_every_steps = 2
  result = train.train_and_evaluate(cfg, str(tmp_path))
  assert result["num_examples"] == 40 and np.isfinite(result["loss"])
  assert checkpoint.TrainCheckpointer(str(tmp_path)).latest_step() == 2


def test_build_trainer_shapes_and_shardings_match_a_fresh_state():
  c = tiny_config(mesh__data=4, mesh__fsdp=2, sharding__min_fsdp_size=1)
  t = train.build_trainer(c, 10, (28, 28, 1), total_steps=6, warmup_steps=2)
  state = jax.jit(t.init_state, out_shardings=t.shardings)(jax.random.PRNGKey(0))
  got = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), state)
  want = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), t.abstract_state)
  assert got == want
  kernel = state["params"]["Transformer"]["encoderblock_0"]["MlpBlock_3"]["Dense_0"]["kernel"]
  assert kernel.sharding == t.shardings["params"]["Transformer"]["encoderblock_0"]["MlpBlock_3"][
      "Dense_0"]["kernel"]
  assert "fsdp" in str(kernel.sharding.spec)  # sharded over the fsdp axis, as asked
  assert float(t.schedule(2)) == pytest.approx(1e-2)  # warm-up ends at the peak


@pytest.mark.parametrize("mode", ["jit", "pmap"])
def test_evaluations_during_training_compile_nothing_new(mode):
  import jax.monitoring
  c = tiny_config(fewshot__shots=(1, 2), fewshot__train_split="train",
                  fewshot__test_split="test[:20]", parallel=mode)
  source = data_lib.get_source(c.dataset)
  t = train.build_trainer(c, source.num_classes, (28, 28, 1), total_steps=6, warmup_steps=2)
  params = t.runner.to_run_state(jax.jit(t.init_state)(jax.random.PRNGKey(0)))["params"]
  compiles = []
  listener = lambda event, _, **kw: (
      compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    first = train.evaluate_all(t.runner, params, source, c)
    n_first = len(compiles)
    second = train.evaluate_all(t.runner, params, source, c)
    assert len(compiles) == n_first  # the second evaluation reuses every compiled function
    assert first == second and {"test_accuracy", "fewshot_1shot_accuracy"} <= set(first)
    t.runner._features = None  # the listener does see a fresh feature function compile
    train.evaluate_all(t.runner, params, source, c)
    assert len(compiles) > n_first
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
