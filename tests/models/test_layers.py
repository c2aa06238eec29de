"""Tests for vit_jax/models/layers.py: the mixed-precision policy (bf16 matmuls, f32 elsewhere)."""
import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vit_jax.models import layers, vit

BF16 = jnp.bfloat16


def _round(x):
  """x rounded to bfloat16, back in float32: what the mixed matmul's operands hold."""
  return x.astype(BF16).astype(jnp.float32)


def _rand(key, shape):
  return jax.random.normal(jax.random.PRNGKey(key), shape, jnp.float32)


# ------------------------------------------------------------------ mixed_einsum.
@pytest.mark.parametrize("spec,sa,sb", [
    ("xyk,kn->xyn", (4, 5, 48), (48, 7)),  # Dense
    ("bqhd,bkhd->bhqk", (2, 5, 3, 16), (2, 6, 3, 16)),  # attention logits
    ("bhqk,bkhd->bqhd", (2, 3, 5, 6), (2, 6, 3, 16)),  # attention weights . values
])
def test_mixed_einsum_value_and_gradients(spec, sa, sb):
  a, b = _rand(0, sa), _rand(1, sb)
  out_shape = jnp.einsum(spec, a, b).shape
  g = _rand(2, out_shape)
  out, vjp = jax.vjp(lambda a, b: layers.mixed_einsum(spec, a, b), a, b)
  da, db = vjp(g)
  assert out.dtype == da.dtype == db.dtype == jnp.float32

  # Exact up to f32 summation order: bf16-rounded operands (and cotangent), f32 accumulation.
  sa_, sb_, so_ = spec.replace("->", ",").split(",")
  ref = jnp.einsum(spec, _round(a), _round(b), precision="highest")
  ref_da = jnp.einsum(f"{so_},{sb_}->{sa_}", _round(g), _round(b), precision="highest")
  ref_db = jnp.einsum(f"{sa_},{so_}->{sb_}", _round(a), _round(g), precision="highest")
  for got, want in ((out, ref), (da, ref_da), (db, ref_db)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  # Against the plain f32 einsum: bf16 keeps 8 significant bits (relative rounding <= 2^-9 per
  # operand), so each product is off by <= ~0.4% and the sums of K random-sign terms by about
  # 0.4% / sqrt(K) of their scale. Bound: 1% of the output's largest magnitude.
  f32_out, f32_vjp = jax.vjp(lambda a, b: jnp.einsum(spec, a, b, precision="highest"), a, b)
  for got, want in zip((out, da, db), (f32_out,) + f32_vjp(g)):
    err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
    assert 0 < err < 1e-2, err  # > 0: the bf16 rounding really happens


def test_mixed_einsum_keeps_operand_dtypes_in_gradients():
  a, b = _rand(0, (3, 4)).astype(BF16), _rand(1, (4, 2))
  da, db = jax.grad(lambda a, b: layers.mixed_einsum("ik,kj->ij", a, b).sum(), (0, 1))(a, b)
  assert da.dtype == BF16 and db.dtype == jnp.float32


@pytest.mark.parametrize("spec,match", [
    ("ik,kj", "explicit"), ("...k,kj->...j", "distinct letters"), ("iik,kj->ij", "distinct"),
    ("ik,kj->j", "one term only"), ("ik,kj,jl->il", "explicit"),
])
def test_mixed_einsum_rejects_specs_it_cannot_differentiate(spec, match):
  with pytest.raises(ValueError, match=match):
    layers.mixed_einsum(spec, jnp.ones((2, 2)), jnp.ones((2, 2)))


# ------------------------------------------------------------------ dot_general -> einsum.
@pytest.mark.parametrize("case,sl,sr,dn,spec", [
    ("Dense", (2, 5, 8), (8, 3), (((2,), (0,)), ((), ())), "abc,cd->abd"),
    ("DenseGeneral(axis=(-2,-1))", (2, 5, 3, 4), (3, 4, 6), (((2, 3), (0, 1)), ((), ())),
     "abcd,cde->abe"),
    ("batched", (4, 5, 8), (4, 8, 3), (((2,), (1,)), ((0,), (0,))), "abc,acd->abd"),
    ("batched, rhs transposed", (4, 5, 8), (4, 3, 8), (((2,), (2,)), ((0,), (0,))),
     "abc,adc->abd"),
])
def test_dot_general_spec(case, sl, sr, dn, spec):
  assert layers.dot_general_spec(len(sl), len(sr), dn) == spec, case
  negative = jax.tree_util.tree_map(lambda d: d - 4, dn)  # the same axes counted from the end
  assert layers.dot_general_spec(4, 4, negative) == layers.dot_general_spec(4, 4, dn)
  lhs, rhs = _round(_rand(0, sl)), _round(_rand(1, sr))
  want = jax.lax.dot_general(lhs, rhs, dn, precision="highest")
  got = layers.mixed_dot_general(lhs, rhs, dn)
  assert got.shape == want.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("module", [
    lambda **kw: nn.Dense(6, **kw), lambda **kw: nn.DenseGeneral(6, axis=(-2, -1), **kw),
    lambda **kw: nn.DenseGeneral((2, 3), **kw)])
def test_flax_dense_with_dense_kwargs(module):
  x = _rand(0, (2, 5, 3, 4))
  f32 = module(**layers.dense_kwargs(jnp.float32))
  mixed = module(**layers.dense_kwargs(BF16))
  params = f32.init(jax.random.PRNGKey(0), x)
  assert (jax.tree_util.tree_map(jnp.shape, mixed.init(jax.random.PRNGKey(0), x)) ==
          jax.tree_util.tree_map(jnp.shape, params))
  want = f32.apply(params, x.astype(BF16).astype(jnp.float32))
  rounded = jax.tree_util.tree_map(_round, params)
  kernel_only = flax.core.unfreeze(params)
  kernel_only["params"]["kernel"] = rounded["params"]["kernel"]
  got = mixed.apply(params, x)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, f32.apply(kernel_only, _round(x)), rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(got - want))) > 0


def test_dense_kwargs_float32_is_unchanged():
  assert layers.dense_kwargs(jnp.float32) == dict(dtype=jnp.float32, param_dtype=jnp.float32)
  assert layers.activation_dtype(jnp.float32) == jnp.float32
  assert layers.activation_dtype(BF16) == jnp.float32
  assert layers.dense_kwargs(BF16)["dot_general"] is layers.mixed_dot_general


# ------------------------------------------------------------------ a bf16 ViT train step.
def _tiny_vit(dtype, **kw):
  return vit.VisionTransformer(num_classes=4, patch_size=(4, 4), hidden_size=32, mlp_dim=64,
                               num_heads=2, num_layers=2, dtype=dtype, **kw)


def _train_step(model, tx):
  def step(params, opt_state, x, y):
    def loss_fn(p):
      logits = model.apply({"params": p}, x, train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return jax.jit(step)


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*(\w+)\[[^\]]*\]\S*\s+(\w+)\((.*?)\)")


def compiled_dots(text: str):
  """(output type, operand types, op_name) of every `dot` in compiled HLO text. Operand types are
  looked up from the instructions (fusion parameters included) of the same computation."""
  dots, types = [], {}
  for line in text.splitlines():
    if line.rstrip().endswith("{") and not line.startswith(" "):
      types = {}  # a new computation
    m = _INSTR.match(line)
    if not m:
      continue
    name, out_type, op, args = m.groups()
    types[name] = out_type
    if op == "dot":
      meta = re.search(r'op_name="([^"]*)"', line)
      dots.append((out_type, tuple(types.get(n, "?") for n in re.findall(r"%([\w.\-]+)", args)),
                   meta.group(1) if meta else ""))
  return dots


@pytest.mark.parametrize("scan", [False, True])
def test_bf16_vit_train_step_dots_are_bf16_with_f32_output(scan):
  x, y = _rand(0, (8, 16, 16, 3)), jnp.arange(8) % 4
  kw = dict(scan=scan, remat_policy="dots_saveable" if scan else None)
  params = _tiny_vit(jnp.float32, **kw).init(jax.random.PRNGKey(0), x)["params"]
  assert {a.dtype for a in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}
  tx = optax.adam(1e-3)
  text = _train_step(_tiny_vit(BF16, **kw), tx).lower(
      params, tx.init(params), x, y).compile().as_text()
  dots = compiled_dots(text)
  blocks = [d for d in dots if "Transformer/" in d[2]]
  # Per block forward: q, k, v, out, 2 attention einsums, 2 MLP = 8 dots, backward 2 per dot
  # (XLA may merge or drop a few, e.g. the gradient of the first layer's input).
  assert len(blocks) >= (8 * 3 - 2) * (1 if scan else 2), len(blocks)
  bad = [d for d in blocks if d[:2] != ("f32", ("bf16", "bf16"))]
  assert not bad, bad[:5]


def _synthetic_task(n=64, classes=4, seed=0):
  """Images whose class sets a fixed pattern plus noise: learnable in ~100 steps."""
  rng = np.random.RandomState(seed)
  patterns = rng.normal(size=(classes, 16, 16, 3))
  y = np.arange(n) % classes
  x = patterns[y] + 0.5 * rng.normal(size=(n, 16, 16, 3))
  return jnp.asarray(x, jnp.float32), jnp.asarray(y)


def _loss_curve(dtype, steps):
  x, y = _synthetic_task()
  params = _tiny_vit(jnp.float32).init(jax.random.PRNGKey(0), x[:1])["params"]
  tx = optax.adam(1e-3)
  state, step = tx.init(params), _train_step(_tiny_vit(dtype), tx)
  losses = []
  for i in range(steps):
    sl = slice(16 * (i % 4), 16 * (i % 4 + 1))
    params, state, loss = step(params, state, x[sl], y[sl])
    losses.append(float(loss))
  return np.array(losses)


def _check_band(steps, learned):
  f32, bf16 = _loss_curve(jnp.float32, steps), _loss_curve(BF16, steps)
  # Band: every step within 0.05 + 10% of the f32 loss; the mean gap within 0.02 + 5%.
  gap = np.abs(bf16 - f32)
  assert np.all(gap <= 0.05 + 0.10 * f32), (gap.max(), f32, bf16)
  assert gap.mean() <= 0.02 + 0.05 * f32.mean(), gap.mean()
  assert f32[-1] < learned * f32[0] and bf16[-1] < learned * bf16[0]  # both really learn
  return f32, bf16


def test_bf16_loss_curve_tracks_f32_quick():
  _check_band(25, learned=0.7)


@pytest.mark.slow
def test_bf16_loss_curve_tracks_f32_100_steps():
  _check_band(100, learned=0.3)


@pytest.mark.parametrize("family", ["hybrid", pytest.param("swin", marks=pytest.mark.slow), "bit"])
def test_every_family_takes_the_policy(family):
  """Same parameter tree in bf16 and f32 (all f32), f32 logits, close to the f32 model's."""
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  tiny = {
      "hybrid": ("R+ViT-Ti/16", dict(num_layers=1, hidden_size=16, mlp_dim=32, num_heads=2,
                                     resnet=dict(num_layers=(), base_width=8, gn_groups=4),
                                     patch_size=(2, 2))),
      "swin": ("Swin-T", dict(embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=2,
                              img_size=16)),
      "bit": ("BiT-R50x1", dict(num_layers=(1,), base_width=8, gn_groups=4, root="small")),
  }[family]
  x = _rand(0, (2, 16, 16, 3))
  f32 = models.get_model(tiny[0], num_classes=5, **tiny[1])
  bf16 = models.get_model(tiny[0], num_classes=5, dtype=BF16, **tiny[1])
  params = f32.init(jax.random.PRNGKey(0), x)
  # A head of zeros would hide the body's differences: random head weights.
  params = jax.tree_util.tree_map_with_path(
      lambda p, a: _rand(3, a.shape) * 0.1 if "head" in jax.tree_util.keystr(p) else a, params)
  assert (jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), bf16.init(jax.random.PRNGKey(0), x))
          == jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), params))
  want, got = f32.apply(params, x), bf16.apply(params, x)
  assert got.dtype == jnp.float32
  err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
  assert 0 < err < 3e-2, err


@pytest.mark.parametrize("kernel,stride,padding", [
    (1, 1, "SAME"), (1, 2, "SAME"), (1, 2, "VALID"), (1, 2, ((0, 0), (0, 0))),
    (3, 2, "SAME"), (1, 1, ((1, 1), (1, 1)))])
def test_conv_general_dilated_matches_lax_with_its_gradients(kernel, stride, padding):
  # 1x1 kernels go through a dot; the rest (and padding that adds pixels) through lax.
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 9, 5))
  ref = nn.Conv(7, (kernel, kernel), strides=(stride, stride), padding=padding)
  ours = ref.clone(conv_general_dilated=layers.conv_general_dilated)
  v = ref.init(jax.random.PRNGKey(1), x)
  loss = lambda m: lambda v, x: jnp.sum(jnp.sin(m.apply(v, x)))
  np.testing.assert_allclose(ours.apply(v, x), ref.apply(v, x), atol=1e-6)
  g_ref = jax.grad(loss(ref), argnums=(0, 1))(v, x)
  g_ours = jax.grad(loss(ours), argnums=(0, 1))(v, x)
  for a, b in zip(jax.tree_util.tree_leaves(g_ours), jax.tree_util.tree_leaves(g_ref)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  jaxpr = str(jax.make_jaxpr(lambda x: ours.apply(v, x))(x))
  assert ("conv_general_dilated" in jaxpr) == (kernel != 1 or padding == ((1, 1), (1, 1)))
