"""Device mesh, sharding rules, global batches, and the pmap helpers.

The mesh has axes ('data', 'fsdp'): the batch is split over both; parameters and optimizer state
are replicated, or sharded over 'fsdp' on their largest divisible dimension when they are at least
`min_fsdp_size` elements. `config.mesh` = {data: -1, fsdp: 1} gives plain data parallelism.
"""
import re
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_cfg=None, devices: Optional[Sequence[Any]] = None) -> Mesh:
  """Mesh of all devices (all processes) with axes data x fsdp; -1 takes what is left."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  data = int(mesh_cfg.get("data", -1)) if mesh_cfg else -1
  fsdp = int(mesh_cfg.get("fsdp", 1)) if mesh_cfg else 1
  if data == -1 and fsdp == -1:
    raise ValueError("At most one of mesh.data and mesh.fsdp may be -1.")
  if data == -1:
    data = n // fsdp
  if fsdp == -1:
    fsdp = n // data
  if data * fsdp != n:
    raise ValueError(f"mesh data={data} x fsdp={fsdp} does not use the {n} devices; "
                     "set one of them to -1 to take the rest.")
  return Mesh(np.asarray(devices).reshape(data, fsdp), BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape, fsdp_size: int, min_size: int) -> P:
  """Shards the largest dimension divisible by `fsdp_size` over 'fsdp'; small arrays replicate."""
  if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def state_shardings(abstract_state, mesh: Mesh, *, min_fsdp_size: int = 2 ** 14,
                    rules: Sequence = ()):
  """NamedShardings for every leaf of a train state (params and optimizer state alike).

  `rules` are (regex, 'replicate' | 'fsdp') pairs over '/'-joined leaf paths, first match wins;
  unmatched leaves follow the size rule. Optimizer moments have their parameter's shape, so they
  get their parameter's sharding.
  """
  fsdp_size = mesh.shape["fsdp"]
  compiled = [(re.compile(r), kind) for r, kind in rules]

  def one(path, leaf):
    name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                    for k in path)
    kind = next((k for r, k in compiled if r.search(name)), None)
    if kind == "replicate" or not getattr(leaf, "shape", ()):
      return NamedSharding(mesh, P())
    if kind not in (None, "fsdp"):
      raise ValueError(f"Unknown sharding rule kind {kind!r}: use 'replicate' or 'fsdp'.")
    min_size = 0 if kind == "fsdp" else min_fsdp_size
    return NamedSharding(mesh, fsdp_spec(leaf.shape, fsdp_size, min_size))

  return jax.tree_util.tree_map_with_path(one, abstract_state)


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """This process's numpy rows -> global jax.Arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


# ----------------------------------------------------------------------------- pmap mode.
def pmap_shard(local_batch: dict) -> dict:
  """(B_local, ...) -> (local_devices, B_local / local_devices, ...)."""
  n = jax.local_device_count()
  def split(x):
    if x.shape[0] % n:
      raise ValueError(f"per-process batch {x.shape[0]} is not divisible by the "
                       f"{n} local devices")
    return x.reshape((n, x.shape[0] // n) + x.shape[1:])
  return {k: split(np.asarray(v)) for k, v in local_batch.items()}


PMAP_AXIS = "batch"


def replicate(tree):
  """A tree on every local device, for pmap (leading axis = local devices)."""
  devices = jax.local_devices()
  sharding = NamedSharding(Mesh(np.asarray(devices), (PMAP_AXIS,)), P(PMAP_AXIS))
  return jax.tree_util.tree_map(
      lambda x: jax.device_put(np.stack([np.asarray(x)] * len(devices)), sharding),
      jax.device_get(tree))


def unreplicate(tree):
  """The first local device's copy, as numpy."""
  return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_shards[0].data)[0]
                                if hasattr(x, "addressable_shards") else np.asarray(x)[0], tree)


def initialize_distributed(cfg=None):
  """`jax.distributed.initialize` from config keys (coordinator_address, num_processes,
  process_id) or, when they are unset, from the cluster's environment (SLURM, TPU, ...)."""
  kwargs = {}
  if cfg is not None:
    for key in ("coordinator_address", "num_processes", "process_id"):
      if cfg.get(key) is not None:
        kwargs[key] = cfg.get(key)
  jax.distributed.initialize(**kwargs)
