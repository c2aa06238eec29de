"""Tests for vit_jax/models/pvt.py: counts, small inputs, the pooling helper, parity with Hugging
Face's torch `PvtForImageClassification` / `PvtV2ForImageClassification`."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import models
from vit_jax.models import pvt

# 224 px, 1000 classes: the counts of HF's PvtForImageClassification / PvtV2ForImageClassification
# built from the same configurations (docs/reference.md; checked by test_counts_match_hf).
COUNTS = {
    "PVT-Tiny": 13_229_288, "PVT-Small": 24_485_864, "PVT-Medium": 44_208_104,
    "PVT-Large": 61_369_320,
    "PVTv2-B0": 3_666_760, "PVTv2-B1": 14_009_000, "PVTv2-B2": 25_362_856,
    "PVTv2-B3": 45_238_696, "PVTv2-B4": 62_556_072, "PVTv2-B5": 81_956_008,
    # B2 with linear SRA: the 8x8/4x4/2x2 reduction convs become 1x1 convs (and stage 4 gains one).
    "PVTv2-B2-Li": 22_553_512,
}


def count(model, size=224):
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes["params"]))


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_parameter_counts(name):
  assert count(models.get_model(name, num_classes=1000)) == COUNTS[name]


def _hf_config(name, transformers, **extra):
  kw = pvt.config_from_name(name)
  common = dict(hidden_sizes=list(kw["hidden_sizes"]), depths=list(kw["depths"]),
                mlp_ratios=list(kw["mlp_ratios"]), patch_sizes=list(kw["patch_sizes"]),
                strides=list(kw["strides"]), num_attention_heads=[1, 2, 5, 8], **extra)
  if kw["version"] == 1:
    return transformers.PvtConfig(sequence_reduction_ratios=[8, 4, 2, 1], **common)
  return transformers.PvtV2Config(sr_ratios=[8, 4, 2, 1],
                                  linear_attention=kw["linear_attention"], **common)


@pytest.mark.slow
def test_counts_match_hf():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  for name, want in COUNTS.items():
    cfg = _hf_config(name, transformers, num_labels=1000)
    cls = (transformers.PvtV2ForImageClassification if cfg.model_type == "pvt_v2"
           else transformers.PvtForImageClassification)
    with torch.device("meta"):
      hf = cls(cfg)
    assert sum(p.numel() for p in hf.parameters()) == want, name


def test_adaptive_avg_pool_matrix():
  np.testing.assert_allclose(pvt.adaptive_avg_pool_matrix(14, 7),
                             np.kron(np.eye(7), [[0.5, 0.5]]))
  # torch's bins for 8 -> 7: [0,2), [1,3), [2,4), [3,5), [4,6), [5,7), [6,8).
  m = pvt.adaptive_avg_pool_matrix(8, 7)
  assert m[0].tolist() == [0.5, 0.5, 0, 0, 0, 0, 0, 0]
  assert m[6].tolist() == [0, 0, 0, 0, 0, 0, 0.5, 0.5]
  np.testing.assert_allclose(pvt.adaptive_avg_pool_matrix(3, 7).sum(1), 1.0)  # upsampling too


def test_tree_names():
  shapes = jax.eval_shape(lambda: models.get_model("PVT-Tiny", num_classes=10).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))["params"]
  flat = {"/".join(k): v.shape for k, v in flax.traverse_util.flatten_dict(shapes).items()}
  assert flat["stage_0/patch_embed/proj/kernel"] == (4, 4, 3, 64)
  assert flat["stage_0/pos_embed"] == (1, 256, 64)
  assert flat["stage_3/cls_token"] == (1, 1, 512)
  assert flat["stage_3/pos_embed"] == (1, 5, 512)
  assert flat["stage_0/block_1/attn/sr/kernel"] == (8, 8, 64, 64)
  assert flat["stage_0/block_1/attn/query/kernel"] == (64, 1, 64)
  assert "stage_3/block_0/attn/sr/kernel" not in flat
  assert flat["norm/scale"] == (512,) and flat["head/kernel"] == (512, 10)


@pytest.mark.parametrize("name,overrides", [
    ("PVT-Tiny", dict(hidden_sizes=(16, 32, 32, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4),
                      patch_sizes=(2, 2, 2, 2), strides=(2, 2, 2, 2), sr_ratios=(4, 2, 1, 1),
                      droppath_rate=0.1, dropout_rate=0.1)),
    ("PVTv2-B0", dict(hidden_sizes=(16, 32, 32, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4),
                      sr_ratios=(4, 2, 1, 1), droppath_rate=0.1)),
    ("PVTv2-B2-Li", dict(hidden_sizes=(16, 32, 32, 64), depths=(1, 1, 1, 1),
                         num_heads=(1, 2, 2, 4), droppath_rate=0.1)),
])
def test_train_forward_28x28_greyscale(name, overrides, random_variables):
  model = models.get_model(name, num_classes=3, **overrides)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 28, 28, 1))
  variables = random_variables(model, x)
  rngs = {"dropout": jax.random.PRNGKey(2)}
  out = jax.jit(lambda v, x: model.apply(v, x, train=True, rngs=rngs))(variables, x)
  assert out.shape == (2, 3) and out.dtype == jnp.float32 and np.all(np.isfinite(out))


def test_too_small_input_is_a_clear_error():
  with pytest.raises(ValueError, match="smaller than the spatial reduction 8"):
    count(models.get_model("PVT-Tiny", num_classes=3), size=28)


# ------------------------------------------------------------------ parity with transformers.
def _parity(cfg_kwargs, v2: bool, size: int):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  if v2:
    cfg = transformers.PvtV2Config(**cfg_kwargs)
    hf = transformers.PvtV2ForImageClassification(cfg).eval()
  else:
    cfg = transformers.PvtConfig(**cfg_kwargs)
    hf = transformers.PvtForImageClassification(cfg).eval()
  with torch.no_grad():  # non-trivial LayerNorms and biases, so that every weight matters
    for p in hf.parameters():
      p.add_(0.05 * torch.randn_like(p))
  x = np.random.default_rng(0).normal(size=(2, size, size, 3)).astype(np.float32)
  with torch.no_grad():
    want = hf(torch.from_numpy(x.transpose(0, 3, 1, 2))).logits.numpy()
  sd = {k: v.numpy() for k, v in hf.state_dict().items()}
  model = pvt.PyramidVisionTransformer(**pvt.model_kwargs_from_hf(cfg))
  got = jax.jit(lambda v, x: model.apply(v, x, train=False))(pvt.from_hf_state_dict(sd, cfg),
                                                             jnp.asarray(x))
  return np.abs(np.asarray(got) - want).max()


TINY = dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 2, 1, 1], num_attention_heads=[1, 2, 2, 4],
            mlp_ratios=[2, 2, 2, 2], num_labels=5)


def test_parity_pvt_v1():
  # 64 px: maps 16, 8, 4, 2 with reductions 8, 4, 2, 1 -> keys/values from 2x2, 2x2, 2x2, 2x2(+cls).
  assert _parity(dict(TINY, image_size=64, sequence_reduction_ratios=[8, 4, 2, 1]), False,
                 64) < 1e-4


@pytest.mark.parametrize("linear", [False, True])
def test_parity_pvt_v2(linear):
  # 64 px: maps 16, 8, 4, 2; the linear variant pools 16 -> 7 and 4 -> 7 with unequal bins.
  assert _parity(dict(TINY, sr_ratios=[8, 4, 2, 1], linear_attention=linear), True, 64) < 1e-4


def test_unknown_names():
  with pytest.raises(ValueError, match="Unknown PVT model 'PVTv2-B1-Li'"):
    models.get_model("PVTv2-B1-Li")
  with pytest.raises(ValueError, match="Unknown PVT model 'PVT-Huge'"):
    models.get_model("PVT-Huge")
