"""Tests for vit_jax/predict.py: predictions and attention maps for real Fashion-MNIST test images
from a model trained here, and the attention maps of each family."""
import gzip
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fashion_mnist
from vit_jax import models
from vit_jax import npz
from vit_jax import predict
from vit_jax import pretrained
from vit_jax import train

FMNIST = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fmnist_test_images(n):
  with gzip.open(FMNIST, "rb") as f:
    data = np.frombuffer(f.read(), np.uint8, offset=16)
  return data.reshape(-1, 28, 28)[:n]


@pytest.fixture(scope="module")
def workdir(shared_run, tmp_path_factory):
  """A tiny ViT (class token, 2 layers) trained for 4 steps on Fashion-MNIST by vit_jax.train,
  starting from a Hugging Face directory through `config.pretrained.path` (when transformers is
  installed), which the test checks the run started from. Made once per session (conftest's
  `shared_run`)."""
  if not os.path.exists(FMNIST):
    pytest.skip(f"{FMNIST} missing (make data)")
  c = fashion_mnist.get_config("vit")
  c.model.update(hidden_size=16, mlp_dim=32, num_heads=2, num_layers=2, classifier="token",
                 posemb="learn")
  c.train_split, c.eval_split, c.test_split = "train[:256]", "test[:64]", ""
  c.total_epochs = None
  c.total_steps = 4
  c.lr.warmup_epochs = None
  c.lr.warmup_steps = 1
  c.batch_size = 32
  c.eval_batch_size = 32
  c.log_every_steps = 2
  c.checkpoint_every_steps = 4
  c.checkpoint_async = False
  start = None
  try:
    import transformers
    hf_dir = str(tmp_path_factory.mktemp("hf_start"))
    transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        image_size=28, patch_size=7, num_channels=1, num_labels=10)).save_pretrained(hf_dir)
    c.pretrained.path = hf_dir
    start = pretrained.load(hf_dir)[1]
  except ImportError:
    pass

  def build(path):
    result = train.train_and_evaluate(c, path)
    if start is not None:  # 4 Adam steps at lr <= 2e-3 move no parameter by more than ~1e-2
      final = npz.load_npz(os.path.join(path, "params.npz"))
      diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                 for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(start)))
      assert diff < 0.02, diff
    return result
  return shared_run("fmnist_vit_from_hf", build)[0]


@pytest.fixture
def image_files(tmp_path):
  from PIL import Image
  paths = []
  for i, img in enumerate(fmnist_test_images(3)):
    paths.append(str(tmp_path / f"test{i}.png"))
    Image.fromarray(img).save(paths[-1])
  return paths


def test_predict_and_attention_maps_on_fashion_mnist(workdir, image_files, tmp_path, capsys):
  bad = tmp_path / "broken.png"
  bad.write_bytes(b"not an image")
  out_dir = tmp_path / "maps"
  rc = predict.main([f"--weights={workdir}", f"--attention_dir={out_dir}", "--batch_size=2",
                     image_files[0], str(bad), *image_files[1:]])
  assert rc == 1  # one unreadable file; the others still ran
  captured = capsys.readouterr()
  assert f"{bad}: cannot read the image" in captured.err
  for p in image_files:
    assert p in captured.out
  # The workdir's own class names (its data set's), not ImageNet's: every top-5 line names one.
  names = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot")
  lines = [l for l in captured.out.splitlines() if "%" in l]
  assert lines and all(any(f"{n} (" in l for n in names) for l in lines), lines
  assert captured.out.count("%") == 5 * len(image_files)  # top-5 lines per image
  # rollout, one PNG per head (2) and the grid, for every readable image
  pngs = sorted(os.listdir(out_dir))
  assert len(pngs) == 4 * len(image_files)
  assert "000_test0_rollout.png" in pngs and "002_test2_grid.png" in pngs
  for name in pngs:
    with open(out_dir / name, "rb") as f:
      assert f.read(8) == PNG_MAGIC

  predictor = predict.load(workdir)
  assert predictor.class_names[9] == "Ankle boot" and predictor.image_size == (28, 28)
  results = predict.predict(predictor, image_files, batch_size=2)
  for r in results:
    assert r["probs"].shape == (10,)
    np.testing.assert_allclose(r["probs"].sum(), 1.0, atol=1e-5)
    probs = [p for _, _, p in r["top"]]
    assert len(probs) == 5 and probs == sorted(probs, reverse=True)
    assert r["top"][0][1] == predictor.class_names[r["top"][0][0]]
  # Batching changes nothing: one batch of 3 gives the same probabilities as batches of 2.
  one = predict.predict(predictor, image_files, batch_size=8)
  np.testing.assert_allclose(np.stack([r["probs"] for r in one]),
                             np.stack([r["probs"] for r in results]), atol=1e-6)

  images = np.stack([r["image"] for r in results])
  x = predictor.preprocess(images)
  assert x.shape == (3, 28, 28, 1)
  np.testing.assert_allclose(x, images.reshape(x.shape) / 127.5 - 1.0, atol=1e-6)  # value_range
  maps = predict.attention_maps(predictor, x)
  assert maps["rollout"].shape == (3, 4, 4) and maps["heads"].shape == (3, 2, 4, 4)
  # Recomputed here from the attention weights the 2 blocks sow (each (B, heads, 17, 17): cls
  # and 16 patches): rollout = prod over blocks of (mean over heads + I) / 2, from the first block
  # up; the maps are the class token's row over the patches, and the last block's heads' rows.
  inter = predictor.model.apply(predictor.variables, jnp.asarray(x), train=False,
                                mutable=["intermediates"])[1]["intermediates"]
  weights = [np.asarray(w, np.float64) for path, w in sorted(
      jax.tree_util.tree_flatten_with_path(inter)[0], key=lambda pw: jax.tree_util.keystr(pw[0]))
             if "attention_weights" in jax.tree_util.keystr(path)]
  weights = [w for stack in weights for w in (stack if stack.ndim == 5 else [stack])]
  assert [w.shape for w in weights] == [(3, 2, 17, 17)] * 2
  rollout = np.eye(17)
  for w in weights:
    rollout = 0.5 * (w.mean(1) + np.eye(17)) @ rollout
  np.testing.assert_allclose(maps["rollout"], rollout[:, 0, 1:].reshape(3, 4, 4), rtol=1e-5)
  np.testing.assert_allclose(maps["heads"], weights[-1][:, :, 0, 1:].reshape(3, 2, 4, 4),
                             rtol=1e-5)


def _random_predictor(model, size, channels=3):
  """Random normal(0, 0.3) variables (no init to compile): the properties below hold for any."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, channels)))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: 0.3 * rng.standard_normal(s.shape).astype(s.dtype), shapes)
  return predict.Predictor(model, variables, (size, size), channels,
                           lambda im: im.astype(np.float32) / 127.5 - 1, None)


def test_rollout_of_a_model_without_class_token_uses_the_mean_query():
  model = models.get_model("ViT-Mu/8", num_classes=3, hidden_size=16, mlp_dim=32, num_heads=2,
                           num_layers=3, classifier="gap")
  pred = _random_predictor(model, 32)
  x = np.random.RandomState(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  maps = predict.attention_maps(pred, x)
  assert "mean-query" in maps["what"] and maps["rollout"].shape == (2, 4, 4)
  # Without prefix tokens the rollout is row-stochastic, so the mean row sums to one.
  np.testing.assert_allclose(maps["rollout"].sum((1, 2)), 1.0, atol=1e-6)
  np.testing.assert_allclose(maps["heads"].sum((2, 3)), 1.0, atol=1e-5)


def test_swin_maps_and_resnet_has_none():
  model = models.get_model("Swin-T", num_classes=3, embed_dim=8, depths=(2, 2), num_heads=(1, 2),
                           window_size=4, img_size=32, droppath_rate=0.0)
  pred = _random_predictor(model, 32)
  maps = predict.attention_maps(pred, np.zeros((2, 32, 32, 3), np.float32))
  # 32 px / patch 4 = 8x8, merged to 4x4 in the last stage (one 4x4 window, 2 heads).
  assert maps["heads"].shape == (2, 2, 4, 4) and "not a rollout" in maps["what"]
  np.testing.assert_allclose(maps["rollout"], maps["heads"].mean(1))
  # Averaged over the 16 queries of the single window, each head's map sums to one.
  np.testing.assert_allclose(maps["heads"].sum((2, 3)), 1.0, atol=1e-5)
  resnet = models.get_model("BiT-R26x1", num_classes=3, num_layers=(1,), base_width=8, gn_groups=2)
  assert predict.attention_maps(_random_predictor(resnet, 32), np.zeros((1, 32, 32, 3))) is None


def test_a_run_trained_on_another_mesh_predicts_and_evaluates_on_these_devices(workdir,
                                                                            tmp_path):
  """config.json says mesh fsdp=3, which these 8 devices cannot hold: prediction and eval-only
  mode take data parallelism over the devices here (they failed on the saved mesh before) and
  give what the run's own mesh gives."""
  import json
  import shutil
  import ml_collections
  copy = str(tmp_path / "run")
  shutil.copytree(workdir, copy)
  path = os.path.join(copy, "config.json")
  with open(path) as f:
    saved = json.load(f)
  saved["mesh"] = {"data": 1, "fsdp": 3, "model": 1}
  with open(path, "w") as f:
    json.dump(saved, f)
  images = fmnist_test_images(4)[..., None]  # (4, 28, 28, 1) uint8
  same = lambda p: np.asarray(p.model.apply(p.variables, p.preprocess(images), train=False))
  np.testing.assert_array_equal(same(predict.load(copy)), same(predict.load(workdir)))
  cfg = ml_collections.ConfigDict(saved)
  with open(os.path.join(workdir, "config.json")) as f:
    original = ml_collections.ConfigDict(json.load(f))
  assert train.evaluate_checkpoint(cfg, copy) == train.evaluate_checkpoint(original, workdir)
