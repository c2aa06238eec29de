"""Tests for vit_jax/trainer.py: the EMA of the BatchNorm statistics (the rest of the trainer's
parts are exercised through the loop in tests/test_train.py)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from tests.test_train import _TinyBN
from tests.test_train import tiny_config
from vit_jax import data as data_lib
from vit_jax import npz
from vit_jax import parallel
from vit_jax import train
from vit_jax import trainer


def _batch(n=16, seed=1):
  rng = np.random.default_rng(seed)
  return dict(image=rng.normal(2.0, 3.0, size=(n, 2, 2, 1)).astype(np.float32),
              label=np.eye(3, dtype=np.float32)[rng.integers(0, 3, n)],
              row=np.arange(n, dtype=np.int32))


def _updates(mode, decay=0.5, steps=3):
  """The states after each of `steps` updates of _TinyBN (the first: the initial state)."""
  model, tx = _TinyBN(), optax.sgd(0.1)
  config = tiny_config(ema_decay=decay)
  state = trainer.new_state(dict(model.init(jax.random.PRNGKey(0), _batch()["image"][:1])), tx,
                            ema=True)
  states = [jax.device_get(state)]
  if mode == "pmap":
    fn = jax.pmap(trainer.make_update_fn(model, tx, lambda s: 0.1, config, axis_name="batch"),
                  axis_name="batch")
    state = parallel.replicate(state)
  else:
    fn = jax.jit(trainer.make_update_fn(model, tx, lambda s: 0.1, config))
  for i in range(steps):
    batch = _batch(seed=i)
    state, _ = fn(state, parallel.pmap_shard(batch) if mode == "pmap" else batch)
    states.append(jax.device_get(parallel.unreplicate(state) if mode == "pmap" else state))
  return states


@pytest.mark.parametrize("mode", ["jit", "pmap"])
def test_the_ema_keeps_an_average_of_the_batchnorm_statistics_too(mode):
  """The EMA weights used to be evaluated with the live statistics (timm's ModelEmaV3 averages a
  model's buffers with its weights; so does this EMA, with the same decay). Under pmap the live
  statistics are the devices' averaged (not jit's: see make_update_fn), and so is their EMA."""
  states = _updates(mode)
  for key in ("mean", "var"):
    live = [s["batch_stats"]["BatchNorm_0"][key] for s in states]
    expected = live[0]
    for x in live[1:]:
      expected = 0.5 * expected + 0.5 * x
    got = states[-1]["ema_batch_stats"]["BatchNorm_0"][key]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert np.abs(got - live[-1]).max() > 1e-3  # the average is not the live value
  ema = trainer.model_variables(states[-1], ema=True)
  assert ema["batch_stats"] is states[-1]["ema_batch_stats"]
  assert ema["params"] is states[-1]["ema_params"]
  live = trainer.model_variables(states[-1])
  assert live["batch_stats"] is states[-1]["batch_stats"]


def test_a_batchnorm_run_exports_and_evaluates_the_ema_statistics(tmp_path):
  """CvT (BatchNorm in its projections): batch_stats_ema.npz is exported beside params_ema.npz,
  and the `ema_` metrics are those of the EMA weights with the EMA statistics."""
  config = tiny_config(ema_decay=0.5, total_steps=4, lr__base=0.05, checkpoint_every_steps=4)
  config.model_name = "CvT-13"
  config.model = dict(embed_dims=(16, 32, 48), depths=(1, 1, 1), num_heads=(1, 2, 3))
  with tfds.testing.mock_data(num_examples=200):
    result = train.train_and_evaluate(config, str(tmp_path))
    files = {n: npz.load_npz(os.path.join(tmp_path, n)) for n in
             ("params.npz", "params_ema.npz", "batch_stats.npz", "batch_stats_ema.npz")}
    flat = lambda t: {"/".join(k): v for k, v in
                      __import__("flax").traverse_util.flatten_dict(t).items()}
    live, ema = flat(files["batch_stats.npz"]), flat(files["batch_stats_ema.npz"])
    assert set(live) == set(ema)
    assert max(np.abs(live[k] - ema[k]).max() for k in live) > 1e-4
    source = data_lib.get_source(config.dataset)
    batches = list(data_lib.eval_iterator(source, split=config.eval_split, pp=config.pp_eval,
                                          batch_size=50))
  assert len(batches) == 1 and batches[0]["mask"].all()  # the whole split, no padding
  model = trainer.build_model(config, 10)
  variables = {"params": files["params_ema.npz"],
               "batch_stats": files["batch_stats_ema.npz"]}
  images, labels = jnp.asarray(batches[0]["image"]), batches[0]["label"]
  apply = jax.jit(model.apply)  # one compile; op by op, CvT took over a minute on 2 cores
  loss = lambda v: float(optax.softmax_cross_entropy(apply(v, images), labels).mean())
  accuracy = np.mean(np.argmax(np.asarray(apply(variables, images)), -1) ==
                     np.argmax(labels, -1))
  assert result["metrics"]["ema_test_accuracy"] == pytest.approx(accuracy, abs=1e-6)
  assert result["metrics"]["ema_test_loss"] == pytest.approx(loss(variables), rel=1e-5)
  # With the live statistics (what the EMA weights used to be evaluated with) the loss differs
  # by more than 5x the tolerance above (measured: 3.2e-4 on 2.37).
  with_live = dict(variables, batch_stats=files["batch_stats.npz"])
  assert abs(loss(with_live) - loss(variables)) > 5 * 1e-5 * loss(variables)
