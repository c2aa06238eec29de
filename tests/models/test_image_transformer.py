"""The Image Transformer's attention is what it claims: causal in its generation order, and
local where it says so (checked by gradients of every output w.r.t. every input embedding)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import errors
from vit_jax import models
from vit_jax.models import image_transformer as imt

SMALL = dict(hidden_size=16, mlp_dim=32, num_heads=2, num_layers=2)
# On an 8x8 grid: 2D blocks of 2x4 with 2 rows above and 2 columns either side; 1D blocks of 8
# with 8 before.
KINDS = {"2D": dict(query_shape=(2, 4), memory_flange=(2, 2)),
         "1D": dict(block_length=8, memory_length=8), "Full": {}}


def _dependence(variant):
  """(D, plan): D[i, j] = |d logits at generation step i / d embedding at step j| summed."""
  model = models.get_model(f"ImageTransformer-{variant}", num_classes=0, **SMALL,
                           **KINDS[variant])
  shape = (8, 8, 1)
  images = jnp.zeros((1,) + shape)
  variables = model.init(jax.random.PRNGKey(0), images)
  # The head starts at zero (the uniform model): give it weights, or nothing depends on anything.
  head = variables["params"]["head"]
  head["kernel"] = jax.random.normal(jax.random.PRNGKey(2), head["kernel"].shape)
  order = model.plan(8, 8)[0]
  emb = jax.random.normal(jax.random.PRNGKey(1), (1, 64, SMALL["hidden_size"]))

  def out(e):  # logits in generation order, summed over the 256 values with fixed weights
    logits = model.apply(variables, e, shape, method=imt.ImageTransformer.decode)
    w = jnp.linspace(-1, 1, 256)
    return (logits.reshape(64, 256)[order] * w).sum(-1)
  jac = jax.jacrev(out)(emb)  # (64, 1, 64, D)
  return np.abs(np.asarray(jac)).sum((1, 3)), model.plan(8, 8)


@pytest.mark.parametrize("variant", sorted(KINDS))
def test_output_at_a_position_depends_only_on_earlier_intensities(variant):
  dep, _ = _dependence(variant)
  later = np.triu(np.ones((64, 64), bool))  # j >= i: the intensity itself and after it
  assert dep[later].max() == 0.0
  # ... and on every earlier one that its memory holds (not vacuously zero): step i sees step
  # i - 1 (the one before it) for every i > 0.
  assert (dep[np.arange(1, 64), np.arange(63)] > 0).all()


def test_full_attention_sees_every_earlier_intensity():
  dep, _ = _dependence("Full")
  assert (dep[np.tril(np.ones((64, 64), bool), -1)] > 0).all()


def test_local_1d_sees_its_block_and_memory_only():
  dep, _ = _dependence("1D")
  # Step i in block b = i // 8 attends to steps [8b - 8, i]; with 2 layers the receptive field
  # grows by one memory: [8b - 16, i]; and step j's input is the embedding of step j - 1.
  for i in range(64):
    first = max(0, 8 * (i // 8) - 17)
    assert first == 0 or dep[i, :first].max() == 0.0, i
    assert (dep[i, first:i] > 0).all(), i


def test_local_2d_order_and_window():
  order, queries, memory, mask = imt.attention_plan("local_2d", 8, 8, query_shape=(2, 4),
                                                    memory_flange=(2, 2))
  # Block raster order: the first block is rows 0-1, columns 0-3, raster inside.
  np.testing.assert_array_equal(order[:8], [0, 1, 2, 3, 8, 9, 10, 11])
  np.testing.assert_array_equal(order[8:16], [4, 5, 6, 7, 12, 13, 14, 15])
  assert queries.shape == (8, 8) and memory.shape == (8, 4 * 8) and mask.shape == (8, 8, 32)
  # One layer: the raster pixels a query of block (rows 4-5, cols 4-7) sees are within rows 2-5,
  # columns 2-9 (clipped to 7), and before it in the order.
  step_of = np.argsort(order)
  b = 5  # block row 2, column 1
  for qi, q in enumerate(queries[b]):
    seen = {order[m] for m, ok in zip(memory[b], mask[b, qi]) if ok}
    r, c = divmod(order[q], 8)
    want = {rr * 8 + cc for rr in range(2, 6) for cc in range(2, 8)
            if step_of[rr * 8 + cc] <= q}
    assert seen == want, (r, c)


def test_plan_errors_name_the_field():
  with pytest.raises(errors.ConfigError, match="query_shape"):
    imt.attention_plan("local_2d", 28, 28, query_shape=(5, 7), memory_flange=(1, 1))
  with pytest.raises(errors.ConfigError, match="block_length"):
    imt.attention_plan("local_1d", 28, 28, block_length=100, memory_length=10)
  with pytest.raises(errors.ConfigError, match="attention"):
    imt.attention_plan("axial", 28, 28)


def test_sampling_fixes_every_intensity_from_the_model():
  """A model whose logits prefer intensity 200 everywhere (head bias) samples 200 at
  temperature -> 0, and the sampler visits every position."""
  model = models.get_model("ImageTransformer-2D", num_classes=0, **SMALL, **KINDS["2D"])
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))
  params = jax.tree_util.tree_map(lambda x: x, variables["params"])
  params["head"]["bias"] = params["head"]["bias"].at[200].set(1e4)
  out = imt.sample(model, {"params": params}, (8, 8, 1), jax.random.PRNGKey(0), num=2,
                   temperature=0.5)
  np.testing.assert_array_equal(np.asarray(out), 200.0)


@pytest.mark.parametrize("variant", sorted(KINDS))
def test_memory_slices_hold_the_positions_the_plan_lists(variant):
  """The model's static slices (memory_blocks) put, slot for slot, the positions the plan's
  indices name wherever its mask can allow them (in-image slots)."""
  kind = imt.VARIANTS[variant]
  kw = dict(imt.ImageTransformer(**KINDS[variant])._plan_kwargs())  # the model's defaults too
  _, queries, memory, mask = imt.attention_plan(kind, 8, 8, **kw)
  x = jnp.arange(64, dtype=jnp.float32)[None, :, None] + 1.0  # step t holds t + 1
  blocks = np.asarray(imt.memory_blocks(x, kind, 8, 8, **kw))[0, :, :, 0]  # (nb, M)
  assert blocks.shape == memory.shape
  inside = mask.any(1)  # slots some query may see
  np.testing.assert_array_equal(blocks[inside], memory[inside] + 1)
  np.testing.assert_array_equal(queries.reshape(-1), np.arange(64))  # contiguous query blocks
