"""Every family of the registry keeps the model contract (vit_jax.models.VisionModel)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fashion_mnist
from vit_jax import models

# One small instance per family: the CPU-size models of configs/fashion_mnist.py, and DETR-Mu.
CASES = {arg: (name, overrides) for arg, (name, overrides, _, _) in fashion_mnist.MODELS.items()}
CASES["detr"] = ("DETR-Mu", {})
CASES["imt"] = ("ImageTransformer-2D", dict(hidden_size=16, mlp_dim=32, num_heads=2, num_layers=1,
                                            query_shape=(7, 7), memory_flange=(7, 7)))
GENERATIVE = ("imt",)  # built with num_classes=0 (vit_jax/tasks/generation.py)

def test_the_cases_cover_every_family():
  families = {type(models.get_model(name, num_classes=0, **kw)) for name, kw in CASES.values()}
  assert families == {cls for _, cls in models._FAMILIES}  # pylint: disable=protected-access


@pytest.mark.parametrize("arg", sorted(CASES))
def test_a_family_keeps_the_contract(arg, random_variables):
  name, overrides = CASES[arg]
  model = models.get_model(name, num_classes=0 if arg in GENERATIVE else 10, **overrides)
  assert isinstance(model, models.VisionModel)
  size = 64 if arg == "detr" else 28
  x = jax.random.normal(jax.random.PRNGKey(0), (2, size, size, 1 if arg != "detr" else 3))
  if arg in GENERATIVE:
    x = jax.random.randint(jax.random.PRNGKey(0), x.shape, 0, 256).astype(jnp.float32)
  extra = (jnp.ones((2, size, size), bool),) if arg == "detr" else ()
  # Shaped as model.init's (traced by eval_shape, not compiled: its random initialisers took most
  # of this test's 12-17 s); the forward passes below run on them.
  variables = random_variables(model, x, *extra, train=False)
  assert set(variables) <= {"params", "batch_stats"}, set(variables)
  out = model.apply(variables, x, *extra, train=False)
  if arg in GENERATIVE:
    assert out.shape == (2, size, size, 1, 256)  # logits of every intensity
  elif arg == "detr":
    assert out["logits"].shape[:2] == out["boxes"].shape[:2] and out["logits"].shape[-1] == 11
  else:
    assert out.shape == (2, 10)
    features = model.clone(num_classes=0).apply(variables, x, train=False)
    assert features.ndim == 2 and features.shape[0] == 2
  # Training draws from the `dropout` rng alone and updates only batch_stats.
  mutable = [k for k in variables if k == "batch_stats"]
  train_out = model.apply(variables, x, *extra, train=True,
                          rngs={"dropout": jax.random.PRNGKey(2)}, mutable=mutable)
  out_t, state = train_out if mutable else (train_out, {})
  assert set(state) == set(mutable)
  leaves = jax.tree_util.tree_leaves(out_t)
  assert all(np.all(np.isfinite(np.asarray(l))) for l in leaves)
