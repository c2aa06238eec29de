"""Tests for vit_jax/models/t2t.py: counts, the soft split against torch's nn.Unfold, the fixed
parameters, a training forward pass on Fashion-MNIST-sized input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import models
from vit_jax.models import t2t

# 224 px, 1000 classes. The official code's counts: sum(p.numel() for p in model.parameters()) of
# t2t_vit_14/19/24 from yitu-opensource/T2T-ViT models/t2t_vit.py (Performer T2T module), which
# includes the fixed `pos_embed` and performer `w` (without them: 21,465,806 / 39,085,070 /
# 64,000,974). Equal to closed_form_count below and to the README's 21.5M / 39.2M / 64.1M.
COUNTS = {"T2T-ViT-14": 21_545_550, "T2T-ViT-19": 39_177_422, "T2T-ViT-24": 64_105_934}


def count(model, size=224):
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes["params"]))


def closed_form_count(d, depth, mlp_ratio, classes=1000, tokens=196, token_dim=64, chans=3):
  def performer(din, e=token_dim):
    return (din * 3 * e + 3 * e) + (e * e + e) + 2 * din + 2 * e + 2 * (e * e + e) + (e // 2) * e
  t2t_part = performer(chans * 49) + performer(token_dim * 9) + token_dim * 9 * d + d
  m = int(d * mlp_ratio)
  block = 4 * d + 3 * d * d + (d * d + d) + (d * m + m) + (m * d + d)
  return t2t_part + d + (tokens + 1) * d + depth * block + 2 * d + d * classes + classes


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_parameter_counts(name):
  d, depth, _, mlp_ratio = t2t.VARIANTS[name.split("-")[-1]]
  assert closed_form_count(d, depth, mlp_ratio) == COUNTS[name]
  assert count(models.get_model(name, num_classes=1000)) == COUNTS[name]


@pytest.mark.parametrize("size,split", [(28, (7, 4, 2)), (7, (3, 2, 1)), (10, (3, 2, 1))])
def test_soft_split_matches_torch_unfold(size, split):
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(0).normal(size=(2, size, size + 1, 3)).astype(np.float32)
  k, s, p = split
  want = torch.nn.Unfold(kernel_size=k, stride=s, padding=p)(
      torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 1)
  got, h, w = t2t.soft_split(jnp.asarray(x), k, s, p)
  assert (h, w) == ((size + 2 * p - k) // s + 1, (size + 1 + 2 * p - k) // s + 1)
  np.testing.assert_array_equal(np.asarray(got), want)


def test_sinusoid_table():
  table = t2t.sinusoid_table(5, 4)[0]
  assert table.shape == (5, 4)
  np.testing.assert_allclose(table[0], [0, 1, 0, 1], atol=1e-7)
  np.testing.assert_allclose(table[3], [np.sin(3), np.cos(3), np.sin(3 / 100), np.cos(3 / 100)],
                             rtol=1e-6)


def test_performer_features_init():
  w = np.asarray(t2t._performer_w_init(jax.random.PRNGKey(0), (8, 16)))
  np.testing.assert_allclose(w @ w.T, 8.0 * np.eye(8), atol=1e-4)  # orthogonal rows * sqrt(m)


def test_train_forward_28x28_greyscale_and_fixed_params(random_variables):
  m = models.get_model("T2T-ViT-14", num_classes=3, embed_dim=32, depth=1, num_heads=2,
                       token_dim=16, droppath_rate=0.1)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 28, 28, 1))
  params = random_variables(m, x)["params"]
  # 28 px: 7x7 tokens after the first split, 4x4, then 2x2 -> 4 tokens + cls.
  assert params["pos_embed"].shape == (1, 5, 32)
  assert params["tokens_to_token"]["attention1"]["w"].shape == (8, 16)

  def loss(p, rng):
    out = m.apply({"params": p}, x, train=True, rngs={"dropout": rng})
    return jnp.sum(out ** 2), out

  grads, out = jax.jit(jax.grad(loss, has_aux=True))(params, jax.random.PRNGKey(2))
  assert out.shape == (2, 3) and np.all(np.isfinite(out))
  np.testing.assert_array_equal(grads["pos_embed"], 0.0)
  np.testing.assert_array_equal(grads["tokens_to_token"]["attention2"]["w"], 0.0)
  assert np.abs(grads["tokens_to_token"]["attention2"]["kqv"]["kernel"]).max() > 0


def test_unknown_variant():
  with pytest.raises(ValueError, match="Unknown T2T-ViT variant '7'"):
    models.get_model("T2T-ViT-7")
