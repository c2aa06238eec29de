"""Tests for vit_jax/train.py: both parallel modes, jit == pmap, exact resume, NaN stop, export."""
import json
import os
from unittest import mock
import re
import shutil
import signal
import types

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import common
from vit_jax import checkpoint
from vit_jax import data as data_lib
from vit_jax import npz
from vit_jax import train
from vit_jax import trainer
from vit_jax.tasks import classification as classification_task

TINY = dict(hidden_size=16, mlp_dim=32, num_heads=2, num_layers=1)
JIT_PMAP_ATOL = 2e-5  # README: "the same parameters to within 2e-5"


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
  # tfds.testing.mock_data redirects file writes under /tmp, and orbax's background writer then
  # misses directories now and then: saves are synchronous here. (Asynchronous saves are
  # exercised on real files by tests/test_multihost.py and tests/test_main.py.)
  c.checkpoint_async = False
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


def trained(config):
  """`build(workdir)` for conftest's `shared_run`: trains `config` under mock data."""
  def build(workdir):
    with tfds.testing.mock_data(num_examples=200):
      return train.train_and_evaluate(config, workdir)
  return build


@pytest.fixture(scope="module")
def finished_run(shared_run):
  """(workdir, result) of one finished `tiny_config()` run (6 steps), made once per session and
  shared by the tests that only read such a run (each copies it first to run in it again)."""
  return shared_run("tiny", trained(tiny_config()))


@pytest.fixture(scope="module")
def stochastic_jit_run(shared_run):
  """The same for `tiny_config(parallel="jit", **STOCHASTIC)`: jit = pmap's jit side and the
  uninterrupted run the jit resume tests compare with."""
  return shared_run("tiny_stochastic_jit", trained(tiny_config(parallel="jit", **STOCHASTIC)))


def final_params(workdir):
  return npz.load_npz(os.path.join(workdir, "params.npz"))


def eval_split_by_hand(workdir, n=50, params="params.npz"):
  """(accuracy, loss) of the exported params on the first `n` test examples ("test[:50]"),
  computed here: the model applied to all of them at once, no padding, no masking, no trainer
  code. (mock_data ignores split slices: the first n of "test" are "test[:n]".)"""
  import jax.numpy as jnp
  from vit_jax import models
  examples = list(tfds.as_numpy(tfds.load("mnist", split="test", shuffle_files=False).take(n)))
  assert len(examples) == n
  data = {k: np.stack([e[k] for e in examples]) for k in ("image", "label")}
  images = data["image"].astype(np.float32) / 127.5 - 1.0  # decode|value_range(-1,1)
  model = models.get_model("ViT-Mu/7", num_classes=10, **TINY)
  weights = npz.load_npz(os.path.join(workdir, params))
  logits = np.asarray(model.apply({"params": weights}, jnp.asarray(images),
                                  train=False), np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return (float(np.mean(logits.argmax(-1) == data["label"])),
          float(-logp[np.arange(len(logp)), data["label"]].mean()))


class FakeClock:
  """Stands in for metrics.time: each training batch fetched takes 1 s, each evaluation batch
  100 s and each checkpoint save 1000 s."""

  def __init__(self, monkeypatch):
    self.t = 0.0
    monkeypatch.setattr(train.metrics_lib, "time", types.SimpleNamespace(monotonic=self.now))
    for module, name, seconds in ((data_lib, "train_iterator", 1.0),
                                  (data_lib, "eval_iterator", 100.0)):
      monkeypatch.setattr(module, name, self._ticking(getattr(module, name), seconds))
    save = checkpoint.TrainCheckpointer.save

    def slow_save(ckpt, *args, **kwargs):
      self.t += 1000.0
      return save(ckpt, *args, **kwargs)
    monkeypatch.setattr(checkpoint.TrainCheckpointer, "save", slow_save)

  def now(self):
    return self.t

  def _ticking(self, original, seconds):
    def wrapped(*args, **kwargs):
      for batch in original(*args, **kwargs):
        self.t += seconds
        yield batch
    return wrapped


@pytest.mark.parametrize("mode", ["jit", "pmap"])
def test_train_runs_logs_checkpoints_and_exports(tmp_path, monkeypatch, mode):
  workdir = str(tmp_path)
  FakeClock(monkeypatch)
  result = train.train_and_evaluate(tiny_config(parallel=mode, eval_every_steps=3), workdir)
  assert result["num_examples"] == 50  # every eval example counted once, the last batch padded
  # The evaluation's accuracy and loss are those of the exported params on the 50 examples.
  accuracy, loss = eval_split_by_hand(workdir)
  assert result["accuracy"] == pytest.approx(accuracy, abs=1e-9)
  assert round(result["accuracy"] * 50) == pytest.approx(result["accuracy"] * 50, abs=1e-6)
  np.testing.assert_allclose(result["loss"], loss, rtol=1e-5)
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  train_rows = [r for r in rows if "train_loss" in r]
  assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
  for key in ("lr", "grad_norm", "img_per_sec", "examples_seen", "train_sec", "core_hours",
              "eta_sec", "train_accuracy"):
    assert key in train_rows[-1], key
  assert train_rows[-1]["examples_seen"] == 6 * 16
  assert (result["steps"], result["examples"]) == (6, 6 * 16)
  # Training time counts the 5 batches fetched after the first (1 s each), not the evaluation of
  # step 3 (4 batches, 400 s) nor the saves of steps 2, 4 and 6 (1000 s each); the wall clock
  # (core-hours) counts everything up to step 6's row, written before its save.
  assert [r["train_sec"] for r in train_rows] == [1.0, 2.0, 3.0, 4.0, 5.0, 5.0]
  assert result["train_seconds"] == 5.0
  cores = train.metrics_lib.Progress(first_step=0, total_steps=1, batch_size=1).cores
  assert train_rows[-1]["core_hours"] == pytest.approx((5 + 400 + 2000) / 3600 * cores)
  assert train_rows[-1]["eta_sec"] == 0.0 and train_rows[2]["eta_sec"] == pytest.approx(3.0)
  np.testing.assert_allclose(train_rows[0]["lr"], 0.0)  # warm-up starts at 0
  np.testing.assert_allclose(train_rows[1]["lr"], 5e-3)
  assert rows[-1]["test_num_examples"] == 50
  assert checkpoint.TrainCheckpointer(workdir).latest_step() == 6
  assert final_params(workdir)["head"]["kernel"].shape == (16, 10)


class _Logits(__import__("flax").linen.Module):
  """A "model" whose logits are its input: evaluation cases made by hand."""

  @__import__("flax").linen.compact
  def __call__(self, x, train: bool = False):
    return x


def test_eval_step_counts_the_real_rows_of_a_padded_batch():
  """4 real rows, 3 predicted right (accuracy 0.75), and 4 padding rows (mask 0, zero labels)
  whose logits pick class 0, the arg-max of a zero label: they must count for nothing."""
  logits = np.array([[2.0, 0.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]] +
                    [[5.0, 0.0, 0.0]] * 4, np.float32)
  labels = np.zeros((8, 3), np.float32)
  labels[np.arange(4), [0, 1, 2, 1]] = 1.0  # the 4th row is wrong
  mask = np.array([1, 1, 1, 1, 0, 0, 0, 0], np.float32)
  out = jax.jit(trainer.make_eval_fn(_Logits()))({"params": {}}, dict(image=logits, label=labels,
                                                                    mask=mask))
  logp = logits[:4] - np.log(np.exp(logits[:4]).sum(-1, keepdims=True))
  assert (float(out["correct"]), float(out["count"])) == (3.0, 4.0)
  np.testing.assert_allclose(out["loss"], -np.sum(logp * labels[:4]), rtol=1e-6)


STOCHASTIC = dict(model__dropout_rate=0.1, model__droppath_rate=0.1, optax__name="adamw",
                  lr__base=1e-3)


def _max_diff(a, b):
  return max(float(np.max(np.abs(x - y)))
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_jit_and_pmap_give_the_same_parameters(tmp_path, monkeypatch, stochastic_jit_run):
  # Dropout, stochastic depth and AdamW on: the masks are drawn per example (seed, step, row), so
  # the two modes draw the same ones; what may differ is where the batch mean is reduced.
  # (Adam's g / sqrt(v) turns a rounding difference in a near-zero gradient into one of up to
  # 2 * lr: at lr 1e-2 without dropout the modes differed by 1.4e-4 here.)
  cfg = lambda mode: tiny_config(parallel=mode, **STOCHASTIC)
  jit_dir, a = stochastic_jit_run
  b = train.train_and_evaluate(cfg("pmap"), str(tmp_path / "pmap"))
  pa, pb = final_params(jit_dir), final_params(str(tmp_path / "pmap"))
  assert _max_diff(pa, pb) <= JIT_PMAP_ATOL
  np.testing.assert_allclose(a["loss"], b["loss"], atol=1e-5)
  # Keys that depend on the device layout (each device numbering its own rows from 0, as a key
  # per device would) give other masks, and parameters far apart: the test can fail.
  original = trainer.Runner.train_batch

  def per_device_rows(self, local_batch):
    out = original(self, local_batch)
    out["row"] = out["row"] % (out["row"].shape[-1])  # (devices, b): 0..b-1 on every device
    return out
  monkeypatch.setattr(trainer.Runner, "train_batch", per_device_rows)
  train.train_and_evaluate(cfg("pmap"), str(tmp_path / "per_device"))
  assert _max_diff(pa, final_params(str(tmp_path / "per_device"))) > 10 * JIT_PMAP_ATOL


class _Interrupt(Exception):
  pass


def _interrupting_iterator(monkeypatch, after_batches, how):
  """Makes train_iterator signal SIGTERM / raise once `after_batches` batches were taken."""
  original = data_lib.train_iterator

  def wrapped(*args, **kwargs):
    it = original(*args, **kwargs)
    for i, batch in enumerate(it):
      if i == after_batches:
        if how in ("sigterm", "sigint"):
          os.kill(os.getpid(), signal.SIGTERM if how == "sigterm" else signal.SIGINT)
        else:
          raise _Interrupt()
      yield batch
  monkeypatch.setattr(data_lib, "train_iterator", wrapped)
  return original


@pytest.mark.parametrize("how,mode", [
    ("sigterm", "jit"), pytest.param("crash", "jit", marks=pytest.mark.slow), ("sigint", "jit"),
    pytest.param("sigterm", "pmap", marks=pytest.mark.slow),  # jit == pmap is tested above
    pytest.param("crash", "pmap", marks=pytest.mark.slow)])
def test_resume_is_bitwise_exact(tmp_path, monkeypatch, how, mode, stochastic_jit_run):
  cfg = tiny_config(parallel=mode, **STOCHASTIC)
  if mode == "jit":
    straight = stochastic_jit_run[0]
  else:
    straight = str(tmp_path / "straight")
    train.train_and_evaluate(cfg, straight)
  workdir = str(tmp_path / "interrupted")
  original = _interrupting_iterator(monkeypatch, 4, how)
  if how in ("sigterm", "sigint"):
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
  a, b = final_params(straight), final_params(workdir)
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  cfg = tiny_config(optax__name="sgd", lr__base=1e30, lr__warmup_steps=None, grad_clip_norm=0.0,
                    checkpoint_every_steps=1, lr__decay="constant")
  # Step 1's loss is computed before its update (finite: ln 10 from the zero head); the update
  # multiplies the gradient by 1e30, so step 2's loss is NaN. Step 1's checkpoint stays.
  with pytest.raises(train.NonFiniteLossError, match=r"'train_loss': nan\} at step 2: .*The "
                                                    r"last good checkpoint \(step 1\) is kept"):
    train.train_and_evaluate(cfg, str(tmp_path))
  assert checkpoint.TrainCheckpointer(str(tmp_path)).all_steps() == [1]
  rows = [json.loads(l) for l in open(os.path.join(tmp_path, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [1]
  np.testing.assert_allclose(rows[0]["train_loss"], np.log(10), rtol=1e-6)


def test_grad_accumulation_matches_full_batch(tmp_path):
  cfg = lambda n: tiny_config(total_steps=2, grad_accum_steps=n, optax__name="momentum")
  train.train_and_evaluate(cfg(1), str(tmp_path / "a"))
  train.train_and_evaluate(cfg(2), str(tmp_path / "b"))
  pa, pb = final_params(str(tmp_path / "a")), final_params(str(tmp_path / "b"))
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=2e-5), pa, pb)


def test_eval_only_mode_reads_the_checkpoint(tmp_path, finished_run):
  cfg = tiny_config()
  workdir, trained = finished_run
  evaluated = train.evaluate_checkpoint(cfg, workdir)
  np.testing.assert_allclose(evaluated["accuracy"], trained["accuracy"])
  assert evaluated["num_examples"] == 50
  with pytest.raises(FileNotFoundError, match="No checkpoint in"):
    train.evaluate_checkpoint(cfg, str(tmp_path / "empty"))


@pytest.mark.parametrize("arg", [
    pytest.param("demo", marks=pytest.mark.slow),  # the demo's model: `make test-all`
    pytest.param("hybrid", marks=pytest.mark.slow),
    # Their convolutions / windows compile and run slowly on XLA CPU: `make test-all` runs them.
    pytest.param("resnet", marks=pytest.mark.slow),
    pytest.param("swin", marks=pytest.mark.slow),
    # 40-90 s each with a cold compilation cache; tests/models/test_{deit,pvt,cvt,t2t}.py train
    # each family quickly, and the trainer's family-specific paths (two heads, batch statistics)
    # have their own tests below.
    pytest.param("deit", marks=pytest.mark.slow), pytest.param("pvt", marks=pytest.mark.slow),
    pytest.param("cvt", marks=pytest.mark.slow), pytest.param("t2t", marks=pytest.mark.slow)])
def test_every_family_trains_from_its_fashion_mnist_config(tmp_path, arg):
  """ResNet, hybrid, Swin and ViT's successors (DeiT with its two heads, PVT, CvT with BatchNorm
  statistics, T2T) go through the same config file and trainer as ViT."""
  if not os.path.exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"):
    pytest.skip("Fashion-MNIST files missing: apt-get install dataset-fashion-mnist")
  from configs import fashion_mnist
  cfg = fashion_mnist.get_config(arg)
  cfg.train_split, cfg.eval_split, cfg.test_split = "train[:64]", "test[:40]", "test[40:56]"
  cfg.batch_size = cfg.eval_batch_size = 16
  cfg.total_epochs, cfg.total_steps = None, 2
  cfg.lr.warmup_epochs = None
  cfg.checkpoint_every_steps = 2
  result = train.train_and_evaluate(cfg, str(tmp_path))
  assert result["num_examples"] == 40 and np.isfinite(result["loss"])
  assert result["test_num_examples"] == 16
  assert checkpoint.TrainCheckpointer(str(tmp_path)).latest_step() == 2


def test_build_trainer_shapes_and_shardings_match_a_fresh_state():
  c = tiny_config(mesh__data=4, mesh__fsdp=2, sharding__min_fsdp_size=1)
  t = trainer.build_trainer(c, 10, (28, 28, 1), total_steps=6, warmup_steps=2)
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
  t = trainer.build_trainer(c, source.num_classes, (28, 28, 1), total_steps=6, warmup_steps=2)
  params = t.runner.params_for_eval(t.runner.to_run_state(jax.jit(t.init_state)(
      jax.random.PRNGKey(0))))
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


def test_grad_accumulation_moves_no_examples_between_devices():
  """Micro-batches are strided (rows i::accum): on 8 devices each micro-batch is spread over all
  of them, so the compiled step has no collective on the images or labels (only the gradients'
  all-reduce). Contiguous micro-batches made XLA all-gather the images (2 all-gathers here)."""
  c = tiny_config(grad_accum_steps=2, batch_size=32, model__dropout_rate=0.1)
  t = trainer.build_trainer(c, 10, (28, 28, 1), total_steps=6, warmup_steps=2)
  assert t.runner.mesh.devices.size == 8
  t.runner.compile(t.shardings)
  batch = t.runner.train_batch(dict(image=np.zeros((32, 28, 28, 1), np.float32),
                                    label=np.zeros((32, 10), np.float32)))
  abstract = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), t.abstract_state,
      t.shardings)
  hlo = t.runner.update.lower(abstract, batch).compile().as_text()
  for op in ("all-gather", "all-to-all", "collective-permute", "reduce-scatter"):
    assert not re.search(op + r"(-start)?\(", hlo), op
  assert re.search(r"all-reduce(-start)?\(", hlo)  # the gradients' mean is still there


def test_non_finite_parameters_are_never_saved(tmp_path, monkeypatch):
  """An update that makes a parameter inf while the loss stays finite (the loss of step s is
  computed before its update): the save after it refuses, the last good checkpoint stays."""
  import optax
  original = train.optim.make_optimizer

  def poisoned(*args, **kwargs):  # the head bias becomes inf in the update of step 3
    tx, schedule = original(*args, **kwargs)

    def update(grads, state, params=None):
      inner, count = state
      updates, inner = tx.update(grads, inner, params)
      bias = updates["head"]["bias"]
      updates["head"]["bias"] = jax.numpy.where(count >= 2, bias + np.inf, bias)
      return updates, (inner, count + 1)
    return optax.GradientTransformation(lambda p: (tx.init(p), jax.numpy.zeros([], "int32")),
                                        update), schedule
  monkeypatch.setattr(train.optim, "make_optimizer", poisoned)
  cfg = tiny_config(checkpoint_every_steps=1, log_every_steps=100)
  with pytest.raises(train.NonFiniteLossError,
                     match=r"non-finite values in params/head/bias.* at step 3.*step 2\) is kept"):
    train.train_and_evaluate(cfg, str(tmp_path))
  ckpt = checkpoint.TrainCheckpointer(str(tmp_path))
  assert ckpt.all_steps() == [1, 2]
  t = trainer.build_trainer(cfg, 10, (28, 28, 1), total_steps=6, warmup_steps=2)
  state = jax.device_get(ckpt.restore(t.abstract_state, shardings=t.shardings))
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(state)
             if np.issubdtype(np.asarray(x).dtype, np.floating))


def test_finetune_without_weights_names_the_flag_before_reading_data(tmp_path, monkeypatch):
  from configs import finetune
  read = []
  monkeypatch.setattr(data_lib, "get_source", lambda *a, **k: read.append(1))
  cfg = finetune.get_config("cifar10,ViT-Ti/16")
  with pytest.raises(ValueError, match=r"--config\.pretrained\.path="):
    train.train_and_evaluate(cfg, str(tmp_path))
  assert not read and not os.listdir(tmp_path)


def test_resume_with_a_changed_config_lists_the_keys(tmp_path):
  workdir = str(tmp_path)
  config = lambda **kw: tiny_config(lr__warmup_steps=None, **kw)  # cosine from 1e-2, no warm-up
  train.train_and_evaluate(config(total_steps=2), workdir)
  changed = config(total_steps=4, seed=3, lr__base=0.5, pp_eval="decode|value_range(0,1)")
  with pytest.raises(ValueError, match=r"lr\.base: 0\.01 -> 0\.5; seed: 0 -> 3[.;] .*"
                                       r"--allow_config_change"):
    train.train_and_evaluate(changed, workdir)
  # A shorter run is a schedule change too; the error says what it does to the learning rate
  # (the 2-step cosine is at 0 at step 2, so is a 1-step one: the same here, still refused).
  with pytest.raises(ValueError, match=r"total duration: 2 -> 1 steps, which moves the learning "
                                       r"rate at the resume step 2 from 0 to 0 \(a longer total"):
    train.train_and_evaluate(config(total_steps=1), workdir)
  # Longer, with other evaluation and saving keys: allowed, with both learning rates said: the
  # 2-step cosine ended at 0, the 4-step one is half-way, at 5e-3.
  longer = config(total_steps=4, pp_eval="decode|value_range(0,1)", checkpoint_every_steps=1)
  warnings = []
  with mock.patch.object(train.logging, "warning",
                         lambda msg, *a: warnings.append(msg % a if a else msg)):
    result = train.train_and_evaluate(longer, workdir)
  assert result["steps"] == 2
  assert any("total duration: 2 -> 4 steps, which moves the learning rate at the resume step 2 "
             "from 0 to 0.005: the cosine decay is stretched" in w for w in warnings), warnings
  # Allowed explicitly: resumes, keeps the old config.json as config.step4.json.
  changed = config(total_steps=6, seed=3)
  assert train.train_and_evaluate(changed, workdir, allow_config_change=True)["steps"] == 2
  assert json.load(open(os.path.join(workdir, "config.step4.json")))["seed"] == 0
  assert json.load(open(os.path.join(workdir, "config.json")))["seed"] == 3


def test_a_finished_run_rerun_leaves_the_workdir_as_it_was(tmp_path, finished_run):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished_run[0], workdir)
  first = finished_run[1]
  before = {f: open(os.path.join(workdir, f), "rb").read()
            for f in ("metrics.jsonl", "config.json", "complete.json", "params.npz")}
  again = train.train_and_evaluate(tiny_config(eval_every_steps=3), workdir)
  assert again["already_complete"] and again["step"] == 6
  assert again["accuracy"] == first["accuracy"]
  after = {f: open(os.path.join(workdir, f), "rb").read() for f in before}
  assert after == before


def test_sigterm_during_a_slow_evaluation_exits_within_the_grace_period(tmp_path, monkeypatch):
  """Each evaluation batch takes 2 s (a slow fake data set, 4 batches); SIGTERM lands in the
  evaluation of step 4: the run saves step 4 and returns well within 30 s."""
  import threading
  import time
  original = data_lib.eval_iterator
  started = threading.Event()

  def slow(*args, **kwargs):
    for batch in original(*args, **kwargs):
      started.set()
      time.sleep(2.0)
      yield batch
  monkeypatch.setattr(data_lib, "eval_iterator", slow)
  cfg = tiny_config(eval_every_steps=4, checkpoint_every_steps=100)
  sent = {}

  def send():
    started.wait(120)
    sent["t"] = time.monotonic()
    os.kill(os.getpid(), signal.SIGTERM)
  threading.Thread(target=send, daemon=True).start()
  result = train.train_and_evaluate(cfg, str(tmp_path))
  elapsed = time.monotonic() - sent["t"]
  assert result == {"stopped_at_step": 4}
  assert elapsed < 30 and elapsed < 2 * 2.0 + 10  # one batch, the save, not the whole eval
  assert checkpoint.TrainCheckpointer(str(tmp_path)).latest_step() == 4


def test_dispatch_bound_waits_for_the_step_ahead_steps_back():
  waited = []
  bound = train.DispatchBound(ahead=2, wait=waited.append)
  for step in range(1, 6):
    bound.push({"step": step})
    # After dispatching step k, every step up to k - 2 has finished: at most 2 are queued.
    assert waited == [{"step": s} for s in range(1, step - 1)]
  with pytest.raises(ValueError, match="ahead must be at least 1"):
    train.DispatchBound(ahead=0)


def test_the_loop_keeps_at_most_two_steps_in_flight(tmp_path, monkeypatch):
  """A stop signal waits for the queued steps before its save: the loop bounds them (without
  the bound, 33 steps were queued at a SIGTERM in a loaded demo run)."""
  seen = {"pushed": 0, "waited": []}

  class Recording(train.DispatchBound):
    def __init__(self):
      super().__init__(wait=lambda outputs: seen["waited"].append(
          jax.block_until_ready(outputs)))

    def push(self, step_outputs):
      seen["pushed"] += 1
      super().push(step_outputs)
  monkeypatch.setattr(train, "DispatchBound", Recording)
  train.train_and_evaluate(tiny_config(log_every_steps=100), str(tmp_path))
  assert seen["pushed"] == 6 and len(seen["waited"]) == 4  # steps 1-4 waited on, in order
  assert all(set(m) >= {"train_loss"} for m in seen["waited"])


def test_a_streamed_run_resumed_with_another_process_count_is_an_error(tmp_path):
  """TFDS sources stream a part of the split per process: the order depends on the count, which
  data_order.json keeps (in-memory sources do not need it: tests/test_multihost.py)."""
  workdir = str(tmp_path)
  train.train_and_evaluate(tiny_config(total_steps=2), workdir)
  path = os.path.join(workdir, "data_order.json")
  assert json.load(open(path)) == {"process_count": 1}
  json.dump({"process_count": 2}, open(path, "w"))  # as if 2 processes had trained it
  with pytest.raises(ValueError, match=r"trained with 2 processes .* Resume with 2 processes"):
    train.train_and_evaluate(tiny_config(total_steps=4), workdir)
  assert train.train_and_evaluate(tiny_config(total_steps=4), workdir,
                                  allow_config_change=True)["steps"] == 2


def test_validation_during_training_and_the_test_split_once_at_the_end(tmp_path):
  cfg = tiny_config(train_split="train[:80]", eval_split="train[80:96]", test_split="test[:20]",
                    eval_every_steps=3)
  result = train.train_and_evaluate(cfg, str(tmp_path))
  assert result["split"] == "val" and result["num_examples"] == 16  # carved from train: "val"
  assert result["test_split"] == "test[:20]" and result["test_num_examples"] == 20
  rows = [json.loads(l) for l in open(os.path.join(str(tmp_path), "metrics.jsonl"))]
  evals = [r for r in rows if "val_accuracy" in r]
  assert [r["step"] for r in evals] == [3, 6]
  assert [r["step"] for r in rows if "final_test_accuracy" in r] == [6]  # only at the end
  assert not any("train_num_examples" in r for r in rows)  # no clash with training metrics


# ------------------------------------------------ distillation, EMA and BatchNorm statistics.
def _ce(logits, target):
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return float(-(target * logp).sum(-1).mean())


def test_loss_terms_are_deits_distillation_losses():
  rng = np.random.default_rng(0)
  cls, dist, teacher = (rng.normal(size=(4, 5)).astype(np.float32) for _ in range(3))
  labels = np.eye(5, dtype=np.float32)[[0, 3, 1, 4]]
  hard_target = np.eye(5, dtype=np.float32)[teacher.argmax(-1)]
  loss, logits = classification_task.loss_terms((cls, dist), labels, teacher, type="hard",
                                                alpha=0.5)
  np.testing.assert_allclose(loss, 0.5 * _ce(cls, labels) + 0.5 * _ce(dist, hard_target),
                             rtol=1e-5)
  np.testing.assert_allclose(logits, (cls + dist) / 2, rtol=1e-6)
  tau = 3.0
  p_t = np.exp(teacher / tau) / np.exp(teacher / tau).sum(-1, keepdims=True)
  # DeiT's code: kl_div(..., reduction='sum') * T^2 / outputs_kd.numel() (batch x classes).
  kl_sum = (p_t * (np.log(p_t) - np.log(np.exp(dist / tau) / np.exp(dist / tau).sum(
      -1, keepdims=True)))).sum()
  loss, _ = classification_task.loss_terms((cls, dist), labels, teacher, type="soft",
                                           alpha=0.1, tau=tau)
  np.testing.assert_allclose(loss, 0.9 * _ce(cls, labels) + 0.1 * kl_sum * tau ** 2 / dist.size,
                             rtol=1e-5)
  # No teacher: both heads learn the labels; one head with a teacher distils through it.
  loss, _ = classification_task.loss_terms((cls, dist), labels)
  np.testing.assert_allclose(loss, (_ce(cls, labels) + _ce(dist, labels)) / 2, rtol=1e-5)
  loss, _ = classification_task.loss_terms(cls, labels, teacher, alpha=1.0)
  np.testing.assert_allclose(loss, _ce(cls, hard_target), rtol=1e-5)


class _TinyBN(__import__("flax").linen.Module):
  """Dense -> BatchNorm -> head: the smallest model with batch statistics."""
  num_classes: int = 3

  @__import__("flax").linen.compact
  def __call__(self, x, train: bool = False):
    nn = __import__("flax").linen
    x = nn.Dense(4)(x.reshape((x.shape[0], -1)))
    x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
    return nn.Dense(self.num_classes, name="head")(x)


def _one_update(model, mode, config, batch, steps=1):
  import jax.numpy as jnp
  import optax
  from vit_jax import parallel
  tx = optax.sgd(0.1)
  variables = dict(model.init(jax.random.PRNGKey(0), batch["image"][:1], train=False))
  state = trainer.new_state(variables, tx, ema=bool(config.ema_decay))
  history = [state["params"]]
  if mode == "pmap":
    fn = jax.pmap(trainer.make_update_fn(model, tx, lambda s: 0.1, config, axis_name="batch"),
                  axis_name="batch")
    st = parallel.replicate(state)
    for _ in range(steps):
      st, _ = fn(st, parallel.pmap_shard(batch))
      history.append(parallel.unreplicate(st)["params"])
    return parallel.unreplicate(st), history
  fn = jax.jit(trainer.make_update_fn(model, tx, lambda s: 0.1, config))
  batch = jax.tree_util.tree_map(jnp.asarray, batch)
  for _ in range(steps):
    state, _ = fn(state, batch)
    history.append(state["params"])
  return state, history


def _bn_batch(n=16):
  rng = np.random.default_rng(1)
  return dict(image=rng.normal(2.0, 3.0, size=(n, 2, 2, 1)).astype(np.float32),
              label=np.eye(3, dtype=np.float32)[rng.integers(0, 3, n)],
              row=np.arange(n, dtype=np.int32))


def test_batch_stats_are_updated_averaged_over_devices_and_used_in_evaluation():
  config = tiny_config()
  model = _TinyBN()
  batch = _bn_batch()
  st_jit, history = _one_update(model, "jit", config, batch)
  st_pmap, _ = _one_update(model, "pmap", config, batch)
  # By hand: the Dense layer's output on the batch with the initial params, and the running
  # averages (momentum 0.5, from mean 0 and var 1) of its statistics. Under jit they are the
  # global batch's; under pmap each device's (2 contiguous rows), averaged over the devices
  # (make_update_fn's docstring): the same mean, but a variance without the spread between the
  # devices' means.
  dense = jax.tree_util.tree_map(np.asarray, history[0]["Dense_0"])
  h = batch["image"].reshape(16, -1).astype(np.float64) @ dense["kernel"] + dense["bias"]
  per_device = h.reshape(jax.device_count(), -1, h.shape[-1])
  want = {"jit": dict(mean=0.5 * h.mean(0), var=0.5 + 0.5 * h.var(0)),
          "pmap": dict(mean=0.5 * h.mean(0), var=0.5 + 0.5 * per_device.var(1).mean(0))}
  assert np.abs(want["jit"]["var"] - want["pmap"]["var"]).min() > 0.1  # the case tells them apart
  for mode, st in (("jit", st_jit), ("pmap", st_pmap)):
    assert jax.tree_util.tree_structure(st["batch_stats"]) == jax.tree_util.tree_structure(
        {"BatchNorm_0": {"mean": 0, "var": 0}})
    for key, value in want[mode].items():
      np.testing.assert_allclose(st["batch_stats"]["BatchNorm_0"][key], value, rtol=1e-5,
                                 atol=1e-6, err_msg=f"{mode} {key}")
  # Evaluation normalises with the running averages (not the batch's statistics): its loss and
  # correct count are those of the forward pass computed here with them.
  eval_step = jax.jit(trainer.make_eval_fn(model))
  variables = trainer.model_variables(st_jit)
  assert set(variables) == {"params", "batch_stats"}
  out = eval_step(variables, dict(image=batch["image"], label=batch["label"],
                                  mask=np.ones(16, np.float32)))
  p = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), st_jit["params"])
  stats = st_jit["batch_stats"]["BatchNorm_0"]
  h = batch["image"].reshape(16, -1) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
  h = (h - stats["mean"]) / np.sqrt(np.asarray(stats["var"], np.float64) + 1e-5)
  logits = (h * p["BatchNorm_0"]["scale"] + p["BatchNorm_0"]["bias"]) @ p["head"]["kernel"] + (
      p["head"]["bias"])
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  labels = batch["label"].argmax(-1)
  assert float(out["count"]) == 16
  assert float(out["correct"]) == np.sum(logits.argmax(-1) == labels)
  np.testing.assert_allclose(out["loss"], -logp[np.arange(16), labels].sum(), rtol=1e-5)


def test_ema_of_the_params_follows_the_updates():
  config = tiny_config(ema_decay=0.75)
  state, history = _one_update(_TinyBN(), "jit", config, _bn_batch(), steps=2)
  p0, p1, p2 = [jax.tree_util.tree_leaves(h)[0] for h in history]
  expected = 0.75 * (0.75 * p0 + 0.25 * p1) + 0.25 * p2
  np.testing.assert_allclose(jax.tree_util.tree_leaves(state["ema_params"])[0], expected,
                             rtol=1e-6)


def test_ema_is_evaluated_and_exported_beside_the_raw_weights(tmp_path):
  result = train.train_and_evaluate(tiny_config(ema_decay=0.5, total_steps=2), str(tmp_path))
  assert "ema_test_accuracy" in result["metrics"] and "test_accuracy" in result["metrics"]
  ema = npz.load_npz(os.path.join(tmp_path, "params_ema.npz"))
  raw = final_params(str(tmp_path))
  # Step 1 (warm-up, lr 0) leaves the params p0; so the EMA after step 2 is 0.5 p0 + 0.5 p2, and
  # the head starts at zero: the EMA head is half the raw one.
  for k in ("kernel", "bias"):
    assert np.abs(raw["head"][k]).max() > 1e-4
    np.testing.assert_allclose(ema["head"][k], 0.5 * raw["head"][k], rtol=1e-6, atol=1e-12)
  # The ema_ metrics are the EMA weights' (the test[:50] evaluation, recomputed here).
  accuracy, loss = eval_split_by_hand(str(tmp_path), params="params_ema.npz")
  assert result["metrics"]["ema_test_accuracy"] == pytest.approx(accuracy, abs=1e-9)
  np.testing.assert_allclose(result["metrics"]["ema_test_loss"], loss, rtol=1e-5)


def test_distillation_from_a_finished_workdir(tmp_path, monkeypatch, finished_run):
  """The teacher's logits on the student's own first batch make the loss: checked against the
  DeiT losses computed here. The student's head starts at zero (uniform predictions), so every
  gradient but the head's is zero and its first step (warm-up: lr 0) changes nothing."""
  from vit_jax import models
  teacher_dir = str(tmp_path / "teacher")
  shutil.copytree(finished_run[0], teacher_dir)
  batches = []
  original = data_lib.train_iterator

  def recording(*args, **kwargs):
    for i, batch in enumerate(original(*args, **kwargs)):
      if i == 0:
        batches.append(batch)
      yield batch
  monkeypatch.setattr(data_lib, "train_iterator", recording)
  runs = {"hard": dict(), "soft": dict(distill__type="soft", distill__tau=2.0)}
  logged = {}
  for name, kw in runs.items():
    workdir = str(tmp_path / name)
    train.train_and_evaluate(tiny_config(total_steps=1, distill__teacher=teacher_dir,
                                         distill__alpha=1.0, **kw), workdir)
    logged[name], = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))
                     if "train_loss" in l]
  images, labels = batches[0]["image"], batches[0]["label"]
  np.testing.assert_array_equal(batches[1]["image"], images)  # both students saw this batch
  teacher = models.get_model("ViT-Mu/7", num_classes=10, **TINY)
  t_logits = np.asarray(teacher.apply({"params": final_params(teacher_dir)}, images), np.float64)
  student = final_params(str(tmp_path / "hard"))  # = its initial params (lr 0 at step 1)
  np.testing.assert_array_equal(student["head"]["kernel"], 0.0)
  features = np.asarray(models.get_model("ViT-Mu/7", num_classes=0, **TINY).apply(
      {"params": {k: v for k, v in student.items() if k != "head"}}, images), np.float64)

  def head_grad_norm(target):  # d CE(softmax(0), target) / d (head kernel, head bias)
    d_logits = (0.1 - target) / len(target)
    return np.sqrt(np.sum((features.T @ d_logits) ** 2) + np.sum(d_logits.sum(0) ** 2))
  # Hard: cross-entropy against the teacher's arg-max (uniform prediction: the loss is ln 10
  # whatever the target; the gradient tells the target).
  hard_target = np.eye(10)[t_logits.argmax(-1)]
  np.testing.assert_allclose(logged["hard"]["train_loss"], np.log(10), rtol=1e-6)
  np.testing.assert_allclose(logged["hard"]["grad_norm"], head_grad_norm(hard_target), rtol=1e-4)
  assert abs(head_grad_norm(hard_target) - head_grad_norm(labels)) > 1e-2  # labels: another
  # Soft: tau^2 x KL(softmax(teacher / tau) || softmax(student / tau)) summed, divided by
  # batch x classes (DeiT's code); the student's softmax is uniform.
  tau = 2.0
  p_t = np.exp(t_logits / tau) / np.exp(t_logits / tau).sum(-1, keepdims=True)
  kl = np.sum(p_t * (np.log(p_t) - np.log(0.1)))
  assert kl > 1e-3  # the teacher is far enough from uniform for the check to mean something
  np.testing.assert_allclose(logged["soft"]["train_loss"], tau ** 2 * kl / p_t.size, rtol=1e-4)
  with pytest.raises(ValueError, match="distill.type='medium'"):
    train.train_and_evaluate(tiny_config(distill__teacher=teacher_dir, distill__type="medium"),
                             str(tmp_path / "bad"))
