"""The JAX side of the benchmarks: the trainer's own update function on synthetic batches.

The train step is `vit_jax.trainer.make_update_fn`, set up by `trainer.build_trainer` (model,
`optim.make_optimizer`'s chain, state) from `configs.common.base_config()` (AdamW, global-norm
clipping 1.0, constant schedule here), jitted with the state donated, as `trainer.Runner` does on
one device. Inference is the model's `apply` with `train=False`.
"""
import time
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from benchmarks import harness
from configs import common
from vit_jax import trainer


def make_config(name: str, batch: int, overrides: Optional[dict] = None
                ) -> ml_collections.ConfigDict:
  """base_config() for model `name` at global batch `batch`, with model field `overrides`."""
  c = common.base_config()
  c.model_name = name
  c.model.update(dict(overrides or {}))
  c.batch_size = batch
  c.total_steps = 1000
  c.lr.decay = "constant"
  return c


class JaxStep:
  """One jitted train step or inference forward, compiled once, runnable many times.

  `lower_s` and `compile_s` time `jit(...).lower(...)` and `.compile()` (the first step's compile
  time, without running it); `first_run_s` is the first call after that.
  """

  def __init__(self, config, *, mode: str = "train", image_size: int = 224,
               num_classes: int = 1000, compiler_options: Optional[dict] = None,
               donate: bool = True, seed: int = 0, channels: int = 3):
    if mode not in ("train", "inference"):
      raise ValueError(f"mode must be 'train' or 'inference', got {mode!r}.")
    self.config, self.mode, self.donate = config, mode, donate
    self.compiler_options = dict(compiler_options or {})
    b = int(config.batch_size)
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((b, image_size, image_size, channels), dtype=np.float32)
    labels = np.eye(num_classes, dtype=np.float32)[rng.integers(0, num_classes, b)]
    self.batch = dict(image=jnp.asarray(images), label=jnp.asarray(labels),
                      row=jnp.arange(b, dtype=jnp.int32))
    # The trainer's own set-up (model, optimizer, state); the step is jitted here on one device.
    self._trainer = trainer.build_trainer(config, num_classes, (image_size, image_size, channels),
                                        total_steps=1000, warmup_steps=0)
    self.model = self._trainer.model
    self._fn, self._abstract_args = self._build()
    self.args = None
    self.lower_s = self.compile_s = self.first_run_s = None
    self.compiled = None
    self._seed = seed

  def _build(self):
    """(jitted function, abstract arguments) of the step, without touching real arrays."""
    t = self._trainer
    batch = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), self.batch)
    if self.mode == "inference":
      fn = jax.jit(lambda p, x: t.model.apply({"params": p}, x, train=False))
      return fn, (t.abstract_state["params"], batch["image"])
    fn = jax.jit(trainer.make_update_fn(t.model, t.tx, t.schedule, self.config),
                 donate_argnums=(0,) if self.donate else ())
    return fn, (t.abstract_state, batch)

  def lower(self):
    t = time.perf_counter()
    self.lowered = self._fn.lower(*self._abstract_args)
    self.lower_s = time.perf_counter() - t
    return self.lowered

  def compile(self):
    if self.lower_s is None:
      self.lower()
    t = time.perf_counter()
    self.compiled = self.lowered.compile(compiler_options=self.compiler_options or None)
    self.compile_s = time.perf_counter() - t
    return self.compiled

  def materialize(self):
    """Real parameters (and optimizer state) on the device, then one run (the warm-up)."""
    if self.compiled is None:
      self.compile()
    rng = jax.random.PRNGKey(self._seed)
    if self.mode == "inference":
      self.args = [jax.jit(self._trainer.init_params)(rng), self.batch["image"]]
    else:
      self.args = [jax.jit(self._trainer.init_state)(rng), self.batch]
    self.first_run_s = harness.time_call(self)

  def __call__(self):
    """One step; returns when it is done. Train steps carry the (donated) state forward."""
    out = self.compiled(*self.args)
    if self.mode == "train":
      self.args[0] = out[0]
    jax.block_until_ready(out)

  def flops(self) -> Optional[float]:
    """Model FLOPs of one call: XLA's cost analysis of the same step lowered with unrolled layers
    and no rematerialisation (a scanned body would be counted once, recomputation would count
    twice)."""
    if self.config.model.get("scan") or self.config.model.get("remat_policy"):
      cfg = ml_collections.ConfigDict(self.config.to_dict())
      cfg.model.scan = False
      cfg.model.remat_policy = None
      other = JaxStep(cfg, mode=self.mode, image_size=self.batch["image"].shape[1],
                      num_classes=self.batch["label"].shape[1])
      return harness.cost_flops(other.lower())
    if self.lower_s is None:
      self.lower()
    return harness.cost_flops(self.lowered)
