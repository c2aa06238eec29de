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


def test_the_cases_cover_every_family():
  families = {type(models.get_model(name, num_classes=10, **kw)) for name, kw in CASES.values()}
  assert families == {cls for _, cls in models._FAMILIES}  # pylint: disable=protected-access


@pytest.mark.parametrize("arg", sorted(CASES))
def test_a_family_keeps_the_contract(arg):
  name, overrides = CASES[arg]
  model = models.get_model(name, num_classes=10, **overrides)
  assert isinstance(model, models.VisionModel)
  size = 64 if arg == "detr" else 28
  x = jax.random.normal(jax.random.PRNGKey(0), (2, size, size, 1 if arg != "detr" else 3))
  extra = (jnp.ones((2, size, size), bool),) if arg == "detr" else ()
  variables = jax.jit(lambda: model.init(jax.random.PRNGKey(1), x, *extra, train=False))()
  assert set(variables) <= {"params", "batch_stats"}, set(variables)
  out = model.apply(variables, x, *extra, train=False)
  if arg == "detr":
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
