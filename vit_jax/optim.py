"""The optax chain built from a config: schedule, clipping, optimizer, weight decay, frozen groups.

Parameter groups are chosen by regexes over '/'-joined parameter names such as
`Transformer/encoderblock_3/MlpBlock_3/Dense_0/kernel`, matched with `re.fullmatch`.

Config keys read here (all under the top-level config):
  optax.name           what optax's optimizer of that name does:
                       sgd       optax.sgd: no momentum unless optax.momentum is set
                       momentum  SGD with momentum optax.momentum (0.9 when unset)
                       adam      optax.adam: no weight decay (wd > 0 is an error: use adamw)
                       adamw     optax.adamw: Adam with decoupled weight decay
  optax.momentum       SGD momentum (None: sgd none, momentum 0.9)    optax.b1, b2, eps (adam*)
  lr.base              peak learning rate
  lr.warmup_{steps,epochs,examples}   linear warm-up length (one of them, or none)
  lr.decay             cosine | linear | constant           lr.end   final learning rate
  wd                   decoupled weight decay: p <- p - lr(t) * wd * p   (0 disables); multiplied
                       by the learning rate as in optax.adamw and torch's AdamW (big_vision
                       multiplies its wd by the schedule only: its wd = ours x lr.base)
  wd_mask              regex of the parameters that decay (default: kernels only)
  grad_clip_norm       global-norm clipping (0 disables)
  freeze               regex of frozen parameters ('' freezes nothing)
"""
import re
from typing import Callable

import jax
import optax

from vit_jax import errors
from vit_jax import parallel

KERNELS_ONLY = r".*/kernel"


def param_names(tree) -> list:
  """'/'-joined names of every leaf of a params tree, in tree order (`parallel.leaf_name`)."""
  paths, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [parallel.leaf_name(path) for path, _ in paths]


def regex_mask(regex: str, params, *, what: str):
  """Bool tree: True where the leaf's name fully matches `regex`. A regex that matches nothing is
  an error (a misspelt pattern must not silently do nothing)."""
  pattern = re.compile(regex)
  names = param_names(params)
  flags = [bool(pattern.fullmatch(n)) for n in names]
  if not any(flags):
    raise errors.ConfigError(f"{what} regex {regex!r} matches no parameter; names look like "
                             f"{names[:3]} ... {names[-2:]} (matched with re.fullmatch).")
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), flags)


def make_schedule(lr_cfg, *, total_steps: int, warmup_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to lr.base, then cosine / linear decay to lr.end, or constant."""
  base, end = float(lr_cfg.base), float(lr_cfg.get("end", 0.0))
  decay_steps = max(total_steps - warmup_steps, 1)
  if lr_cfg.decay == "cosine":
    decay = optax.cosine_decay_schedule(base, decay_steps, alpha=end / base if base else 0.0)
  elif lr_cfg.decay == "linear":
    decay = optax.linear_schedule(base, end, decay_steps)
  elif lr_cfg.decay == "constant":
    decay = optax.constant_schedule(base)
  else:
    raise errors.ConfigError(f"Unknown lr.decay {lr_cfg.decay!r}: use cosine, linear or constant.")
  if not warmup_steps:
    return decay
  warmup = optax.linear_schedule(0.0, base, warmup_steps)
  return optax.join_schedules([warmup, decay], [warmup_steps])


def _base_optimizer(cfg) -> optax.GradientTransformation:
  name = cfg.optax.name
  if name in ("sgd", "momentum"):
    m = cfg.optax.get("momentum")
    m = (0.9 if name == "momentum" else 0.0) if m is None else float(m)
    return optax.trace(decay=m, nesterov=False) if m else optax.identity()
  if name == "adam" and cfg.get("wd"):
    raise errors.ConfigError(
        f"optax.name='adam' has no weight decay (as optax.adam), but wd={cfg.wd}: "
        "use optax.name='adamw' for Adam with decoupled weight decay, or wd=0.")
  if name in ("adam", "adamw"):
    return optax.scale_by_adam(b1=cfg.optax.get("b1", 0.9), b2=cfg.optax.get("b2", 0.999),
                               eps=cfg.optax.get("eps", 1e-8))
  raise errors.ConfigError(f"Unknown optax.name {name!r}: use sgd, momentum, adam or adamw.")


def make_optimizer(cfg, params, *, total_steps: int, warmup_steps: int):
  """Returns (tx, schedule). `params` may be abstract (shapes only): only names are used."""
  schedule = make_schedule(cfg.lr, total_steps=total_steps, warmup_steps=warmup_steps)
  parts = []
  if cfg.get("grad_clip_norm"):
    parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  parts.append(_base_optimizer(cfg))
  if cfg.get("wd"):
    mask = regex_mask(cfg.get("wd_mask") or KERNELS_ONLY, params, what="wd_mask")
    parts.append(optax.add_decayed_weights(cfg.wd, mask=mask))
  parts.append(optax.scale_by_learning_rate(schedule))
  tx = optax.chain(*parts)
  if cfg.get("freeze"):
    frozen = regex_mask(cfg.freeze, params, what="freeze")
    labels = jax.tree_util.tree_map(lambda f: "frozen" if f else "train", frozen)
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule


def durations(cfg, prefix: str, *, steps_per_epoch: float, batch_size: int,
              required: bool = False, default: int = 0) -> int:
  """A duration given as `{prefix}_steps`, `{prefix}_epochs` or `{prefix}_examples`, in steps.

  Exactly one may be set (None/absent means unset); none gives `default`, or an error if required.
  """
  def get(key):
    node, *rest = key.split(".")
    sub = cfg.get(node) if rest else cfg
    return None if sub is None else sub.get(rest[0] if rest else node)
  given = {u: get(f"{prefix}_{u}") for u in ("steps", "epochs", "examples")}
  given = {u: v for u, v in given.items() if v is not None}
  if len(given) > 1:
    raise errors.ConfigError(f"Set only one of {', '.join(f'{prefix}_{u}' for u in given)}.")
  if not given:
    if required:
      raise errors.ConfigError(f"Set one of {prefix}_steps, {prefix}_epochs or {prefix}_examples.")
    return default
  (unit, value), = given.items()
  if unit == "steps":
    return int(value)
  if unit == "epochs":
    return int(round(value * steps_per_epoch))
  return int(round(value / batch_size))


def resolve_durations(config, steps_per_epoch: int):
  """(total, warmup, log_every, eval_every, checkpoint_every) of a training config, in steps."""
  batch_size = int(config.batch_size)
  every = lambda name, default=0, required=False: durations(
      config, name, steps_per_epoch=steps_per_epoch, batch_size=batch_size, default=default,
      required=required)
  total = every("total", required=True)
  return (total, every("lr.warmup"), every("log_every", max(1, min(100, total // 20))),
          every("eval_every"), every("checkpoint_every"))
