"""Tests for vit_jax/models/cvt.py: counts, BatchNorm state, parity with Hugging Face's torch
`CvtForImageClassification`."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import models
from vit_jax.models import cvt

# 224 px, 1000 classes: HF CvtForImageClassification's counts (docs/reference.md; CvT-W24 is what
# HF builds from microsoft/cvt-w24-384-22k's layout with a 1000-class head; test_counts_match_hf).
COUNTS = {"CvT-13": 19_997_480, "CvT-21": 31_622_696, "CvT-W24": 277_196_392}


def count(model, size=224):
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes["params"]))


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_parameter_counts(name):
  # The parameters do not depend on the input size (no position embeddings): 64 px is faster.
  assert count(models.get_model(name, num_classes=1000), size=64) == COUNTS[name]


def test_count_independent_of_size():
  m = models.get_model("CvT-13", num_classes=1000)
  assert count(m, size=224) == COUNTS["CvT-13"]


@pytest.mark.slow
def test_counts_match_hf():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  for name, want in COUNTS.items():
    dims, depths, heads = cvt.VARIANTS[name[4:]]
    cfg = transformers.CvtConfig(embed_dim=list(dims), depth=list(depths), num_heads=list(heads),
                                 num_labels=1000)
    with torch.device("meta"):
      hf = transformers.CvtForImageClassification(cfg)
    assert sum(p.numel() for p in hf.parameters()) == want, name


def test_tree_and_batch_stats():
  m = models.get_model("CvT-13", num_classes=10, depths=(1, 1, 1))
  v = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
  assert set(v) == {"params", "batch_stats"}
  p = {"/".join(k): x.shape for k, x in flax.traverse_util.flatten_dict(v["params"]).items()}
  bs = {"/".join(k): x.shape for k, x in flax.traverse_util.flatten_dict(v["batch_stats"]).items()}
  assert p["stage_0/embed/proj/kernel"] == (7, 7, 3, 64)
  assert p["stage_2/cls_token"] == (1, 1, 384)
  assert "stage_1/cls_token" not in p
  assert p["stage_2/block_0/attn/conv_proj_k/conv/kernel"] == (3, 3, 1, 384)
  assert p["stage_2/block_0/attn/query/kernel"] == (384, 6, 64)
  assert bs["stage_2/block_0/attn/conv_proj_v/bn/var"] == (384,)
  assert len(bs) == 3 * 3 * 2  # 3 blocks x (q, k, v) x (mean, var)


def test_train_forward_28x28_greyscale_updates_batch_stats(random_variables):
  m = models.get_model("CvT-13", num_classes=3, embed_dims=(16, 32, 48), depths=(1, 1, 1),
                       num_heads=(1, 2, 3), droppath_rate=0.1)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 28, 28, 1))
  variables = random_variables(m, x)
  is_conv = lambda mdl, method: method == "__call__" and mdl.name == "conv"
  out, state = jax.jit(lambda v, x: m.apply(
      v, x, train=True, mutable=["batch_stats", "intermediates"], capture_intermediates=is_conv,
      rngs={"dropout": jax.random.PRNGKey(2)}))(variables, x)
  assert out.shape == (4, 3) and np.all(np.isfinite(out))
  # Every projection's statistics move from (mean 0, var 1) by 0.1 towards the batch statistics
  # of its conv's output (momentum 0.9, torch's 0.1), over batch and positions.
  convs = jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]
  assert len(convs) == 3 * 3  # 3 blocks x (q, k, v)
  for path, h in convs:
    where = jax.tree_util.keystr(path[:-3])  # ['stage_0']['block_0']['attn']['conv_proj_q']
    bn = state["batch_stats"]
    for k in [getattr(p, "key") for p in path[:-3]] + ["bn"]:
      bn = bn[k]
    h = np.asarray(h, np.float64)
    np.testing.assert_allclose(bn["mean"], 0.1 * h.mean((0, 1, 2)), rtol=1e-4, atol=1e-6,
                               err_msg=where)
    np.testing.assert_allclose(bn["var"], 0.9 + 0.1 * h.var((0, 1, 2)), rtol=1e-4, err_msg=where)
  ev = m.apply({**variables, **state}, x[:1], train=False)  # uses the running averages
  assert ev.shape == (1, 3) and np.all(np.isfinite(ev))


def test_unknown_variant():
  with pytest.raises(ValueError, match="Unknown CvT variant '99'"):
    models.get_model("CvT-99")


def test_parity_with_hf():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  # HF's CvtStage indexes its drop path list by the stage, so depth must exceed the stage index.
  cfg = transformers.CvtConfig(embed_dim=[8, 16, 24], depth=[1, 2, 3], num_heads=[1, 2, 3],
                               num_labels=5)
  hf = transformers.CvtForImageClassification(cfg).eval()
  with torch.no_grad():  # non-trivial BatchNorm statistics, LayerNorms and biases
    for name, b in hf.named_buffers():
      if name.endswith("running_mean"):
        b.copy_(0.1 * torch.randn_like(b))
      elif name.endswith("running_var"):
        b.copy_(0.5 + torch.rand_like(b))
    for p in hf.parameters():
      p.add_(0.05 * torch.randn_like(p))
  x = np.random.default_rng(0).normal(size=(2, 48, 48, 3)).astype(np.float32)
  with torch.no_grad():
    want = hf(torch.from_numpy(x.transpose(0, 3, 1, 2))).logits.numpy()
  sd = {k: v.numpy() for k, v in hf.state_dict().items()}
  variables = cvt.from_hf_state_dict(sd, cfg)
  model = cvt.ConvolutionalVisionTransformer(**cvt.model_kwargs_from_hf(cfg))
  got = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, jnp.asarray(x))
  assert np.abs(np.asarray(got) - want).max() < 1e-4
