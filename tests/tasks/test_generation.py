"""The generation task (loss="generation"): its loss and bits/dim are the likelihood computed by
hand, and it trains, resumes and samples through the one trainer."""
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import image_transformer as imt_config
from vit_jax import errors
from vit_jax import config_checks
from vit_jax import train
from vit_jax import tasks
from vit_jax.tasks import generation

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_loss_is_the_mean_nll_per_intensity_and_bits_per_dim_its_log2():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 3, 1, 256)).astype(np.float32)
  images = rng.integers(0, 256, size=(2, 3, 3, 1)).astype(np.float32)
  task = tasks.get(imt_config.get_config())
  loss, metrics = task.loss(jnp.asarray(logits), {"image": jnp.asarray(images)})
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, images.astype(int)[..., None], -1)
  np.testing.assert_allclose(float(loss), nll.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["train_bits_per_dim"]), nll.mean() / math.log(2),
                             rtol=1e-5)
  # A uniform model: exactly 8 bits per dimension.
  _, m = task.loss(jnp.zeros((2, 3, 3, 1, 256)), {"image": jnp.asarray(images)})
  np.testing.assert_allclose(float(m["train_bits_per_dim"]), 8.0, rtol=1e-6)


def test_config_checks_refuse_what_generation_cannot_take():
  c = imt_config.get_config()
  config_checks.validate(c, device_count=1, process_count=1)
  for key, value, match in (("pp_train", "decode|value_range(-1,1)", "value_range"),
                            ("label_smoothing", 0.1, "label_smoothing"),
                            ("model_name", "ViT-Mu/7", "autoregressive")):
    bad = imt_config.get_config()
    bad[key] = value
    with pytest.raises(errors.ConfigError, match=match):
      config_checks.validate(bad, device_count=1, process_count=1)
  bad = imt_config.get_config()
  bad.loss = "pixelcnn"
  with pytest.raises(errors.ConfigError, match="generation"):
    config_checks.validate(bad, device_count=1, process_count=1)
  bad = imt_config.get_config()
  bad.evals = ("task", "fewshots")
  with pytest.raises(errors.ConfigError, match="fewshot"):
    config_checks.validate(bad, device_count=1, process_count=1)


def _small(workdir_config=None, **kw):
  c = imt_config.get_config("2d")
  c.model.update(dict(hidden_size=16, mlp_dim=32, num_heads=2, num_layers=1))
  c.train_split, c.eval_split, c.test_split = "train[:64]", "train[64:96]", "test[:20]"
  c.batch_size, c.eval_batch_size = 16, 16
  c.total_epochs = None
  c.total_steps = 4
  c.lr.warmup_steps = 1
  c.checkpoint_every_steps = 2
  c.log_every_steps = 1
  c.update(kw)
  return c


def test_trains_evaluates_resumes_and_samples(tmp_path):
  """Four steps; then the last checkpoint removed and the run resumed from step 2: the same
  parameters bit for bit. val and test bits/dim are the likelihood of those splits under the
  final weights (computed here); the sample CLI draws images from the workdir."""
  import shutil  # pylint: disable=g-import-not-at-top
  from vit_jax import npz  # pylint: disable=g-import-not-at-top
  full = str(tmp_path / "full")
  result = train.train_and_evaluate(_small(), full)
  assert result["split"] == "val" and result["num_examples"] == 32
  assert result["test_num_examples"] == 20
  a = npz.load_npz(os.path.join(full, "params.npz"))
  shutil.rmtree(os.path.join(full, "checkpoints", "4"))
  os.remove(os.path.join(full, "complete.json"))
  resumed = train.train_and_evaluate(_small(), full)
  assert resumed["steps"] == 2
  b = npz.load_npz(os.path.join(full, "params.npz"))
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)

  # bits/dim by hand: the model's log-likelihood of the 32 validation images.
  from vit_jax import workdirs, data as data_lib  # pylint: disable=g-import-not-at-top
  run = workdirs.load(full)
  source = data_lib.get_source(run.config.dataset)
  images = np.concatenate([bt["image"][bt["mask"] > 0] for bt in data_lib.eval_iterator(
      source, split="train[64:96]", pp="decode", batch_size=16)])
  assert images.shape == (32, 28, 28, 1) and images.max() > 1  # intensities, not [-1, 1]
  logits = run.model.apply(run.variables, jnp.asarray(images, jnp.float32))
  nll = np.asarray(generation.nll_per_image(logits, jnp.asarray(images)), np.float64)
  np.testing.assert_allclose(result["bits_per_dim"], nll.sum() / (32 * 784 * math.log(2)),
                             rtol=1e-5)
  # From the uniform model's 8 bits (the head starts at zero), 4 steps at lr 1e-3 learn a little.
  assert 1.0 < result["bits_per_dim"] < 8.0 and 1.0 < result["test_bits_per_dim"] < 8.0

  out = tmp_path / "samples.png"
  proc = subprocess.run([sys.executable, "-m", "vit_jax.sample", f"--workdir={full}", "--num=2",
                         f"--out={out}", f"--npy={tmp_path / 's.npy'}"], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  drawn = np.load(tmp_path / "s.npy")
  assert drawn.shape == (2, 28, 28, 1) and drawn.dtype == np.uint8 and out.exists()
  assert len(np.unique(drawn)) > 2  # drawn from the model's categorical, not a constant


def test_sample_names_a_directory_without_a_run(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "vit_jax.sample", f"--workdir={tmp_path}",
                         f"--out={tmp_path / 'x.png'}"], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 2 and "no training run" in proc.stderr, proc.stderr[-2000:]
