"""Tests for vit_jax/models/deit.py: counts, outputs of the distilled model, parity with Hugging
Face's torch DeiT classes through `from_hf_state_dict`."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import models
from vit_jax.models import deit

# 224 px, 1000 classes. Plain DeiT = ViT of the same size (docs/reference.md, "ViT configurations");
# distilled: HF DeiTForImageClassificationWithTeacher's counts (also test_counts_match_hf).
COUNTS = {
    "DeiT-Ti/16": 5_717_416, "DeiT-S/16": 22_050_664, "DeiT-B/16": 86_567_656,
    "DeiT-Ti/16-distilled": 5_910_800, "DeiT-S/16-distilled": 22_436_432,
    "DeiT-B/16-distilled": 87_338_192,
}


def shapes(model, size=224, channels=3):
  return jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, channels))))


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_parameter_counts(name):
  assert count(shapes(models.get_model(name, num_classes=1000))["params"]) == COUNTS[name]


def test_plain_deit_is_vit_tree_with_deit_defaults():
  m = models.get_model("DeiT-Ti/16", num_classes=10)
  assert isinstance(m, deit.DeiT) and not m.distilled
  assert (m.init_style, m.approximate_gelu, m.droppath_rate) == ("deit", False, 0.1)
  ours = flax.traverse_util.flatten_dict(shapes(m, 32)["params"])
  vit_tree = flax.traverse_util.flatten_dict(
      shapes(models.get_model("ViT-Ti/16", num_classes=10), 32)["params"])
  assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in vit_tree.items()}


def test_deit_init_is_truncated_normal():
  m = models.get_model("DeiT-S/16-distilled", num_classes=10, num_layers=1)
  p = m.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
  for leaf in (p["cls"], p["dist"], p["head"]["kernel"],
               p["Transformer"]["encoderblock_0"]["MlpBlock_3"]["Dense_0"]["kernel"]):
    leaf = np.asarray(leaf)
    assert np.abs(leaf).max() <= 2 * 0.02 + 1e-6  # truncated at two standard deviations
    assert 0.01 < leaf.std() < 0.03
  np.testing.assert_array_equal(p["Transformer"]["encoderblock_0"]["MlpBlock_3"]["Dense_0"]["bias"],
                                0.0)


def test_distilled_outputs_train_and_eval(random_variables):
  m = models.get_model("DeiT-Mu/7-distilled", num_classes=4, num_layers=2)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 28, 28, 1))
  variables = random_variables(m, x)
  posemb = variables["params"]["Transformer"]["posembed_input"]["pos_embedding"]
  assert posemb.shape == (1, 18, 128)
  rngs = {"dropout": jax.random.PRNGKey(2)}
  cls_logits, dist_logits = m.apply(variables, x, train=True, rngs=rngs)
  assert cls_logits.shape == dist_logits.shape == (2, 4)
  assert np.all(np.isfinite(cls_logits)) and not np.allclose(cls_logits, dist_logits)
  # Without stochastic depth, training outputs are deterministic and eval returns their mean.
  m0 = m.clone(droppath_rate=0.0)
  a, b = m0.apply(variables, x, train=True)
  np.testing.assert_allclose(m0.apply(variables, x, train=False), (a + b) / 2, atol=1e-6)
  feats = m0.clone(num_classes=0).apply({"params": {k: v for k, v in variables["params"].items()
                                                    if not k.startswith("head")}}, x)
  assert feats.shape == (2, 128)


def test_unknown_variant():
  with pytest.raises(ValueError, match="Unknown DeiT variant 'X'"):
    models.get_model("DeiT-X/16")


def test_plain_train_step_shape(random_variables):
  m = models.get_model("DeiT-Mu/7", num_classes=3, num_layers=1)
  x = jnp.ones((2, 28, 28, 1))
  v = random_variables(m, x)
  out = m.apply(v, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  assert out.shape == (2, 3) and out.dtype == jnp.float32


# ------------------------------------------------------------------ parity with transformers.
TINY_HF = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               image_size=32, patch_size=8, num_labels=5)


def _hf_model(cls_name, **overrides):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  cfg = transformers.DeiTConfig(**{**TINY_HF, **overrides})
  model = getattr(transformers, cls_name)(cfg).eval()
  with torch.no_grad():  # non-zero tokens and biases, so that every weight matters
    for p in model.parameters():
      p.add_(0.02 * torch.randn_like(p))
  return torch, cfg, model


def _images(torch, n=2, size=32):
  x = np.random.default_rng(0).normal(size=(n, size, size, 3)).astype(np.float32)
  return x, torch.from_numpy(x.transpose(0, 3, 1, 2))


@pytest.mark.parametrize("cls_name,eps", [("DeiTForImageClassificationWithTeacher", 1e-6),
                                          ("DeiTForImageClassification", 1e-6),
                                          # HF's default; ours stays DeiT's 1e-6 (measured
                                          # difference on this random model: 2.6e-5).
                                          ("DeiTForImageClassificationWithTeacher", 1e-12)])
def test_parity_with_hf(cls_name, eps):
  torch, cfg, hf = _hf_model(cls_name, layer_norm_eps=eps)
  x, xt = _images(torch)
  with torch.no_grad():
    want = hf(xt).logits.numpy()
  sd = {k: v.numpy() for k, v in hf.state_dict().items()}
  variables = deit.from_hf_state_dict(sd, cfg)
  kwargs = deit.model_kwargs_from_hf(cfg)
  if cls_name == "DeiTForImageClassification":
    kwargs["distill_head"] = False
  model = deit.DeiT(**kwargs)
  got = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, jnp.asarray(x))
  assert np.abs(np.asarray(got) - want).max() < 1e-4
  if cls_name == "DeiTForImageClassificationWithTeacher" and eps == 1e-6:
    with torch.no_grad():
      out = hf(xt)
    # The training outputs without drop path (DeiT's 0.1 by default) are the two heads' logits.
    cls_logits, dist_logits = model.clone(droppath_rate=0.0).apply(variables, jnp.asarray(x),
                                                                   train=True)
    assert np.abs(np.asarray(cls_logits) - out.cls_logits.numpy()).max() < 1e-4
    assert np.abs(np.asarray(dist_logits) - out.distillation_logits.numpy()).max() < 1e-4


def test_legacy_hf_names_and_leftovers():
  torch, cfg, hf = _hf_model("DeiTForImageClassificationWithTeacher")
  sd = {k: v.numpy() for k, v in hf.state_dict().items()}
  legacy = {}
  for k, v in sd.items():
    for new, old in ((".attention.q_proj.", ".attention.attention.query."),
                     (".attention.o_proj.", ".attention.output.dense."),
                     (".mlp.fc1.", ".intermediate.dense."),
                     ("deit.layers.", "deit.encoder.layer.")):
      k = k.replace(new, old)
    legacy[k] = v
  a = flax.traverse_util.flatten_dict(deit.from_hf_state_dict(sd, cfg))
  b = flax.traverse_util.flatten_dict(deit.from_hf_state_dict(legacy, cfg))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  with pytest.raises(ValueError, match="Unconverted keys.*extra"):
    deit.from_hf_state_dict({**sd, "extra.weight": np.zeros(1)}, cfg)
