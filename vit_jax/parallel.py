"""Device mesh, sharding rules, multi-host set-up, global batches, and the pmap helpers.

The mesh has axes ('data', 'fsdp', 'model') and spans every device of every process. Batches are
split over 'data' x 'fsdp' and replicated over 'model'. Every leaf of the train state (parameters
and optimizer state alike) is replicated, or sharded by a rule over its '/'-joined name; leaves
no rule names are sharded over 'fsdp' on their largest divisible dimension when they have at least
`min_fsdp_size` elements. In config terms:
  mesh = {data: -1, fsdp: 1, model: 1}   plain data parallelism (the default);
  mesh = {data: 1, fsdp: -1}             FSDP over all devices: each holds ~1/N of the state;
  mesh = {data: -1, fsdp: 1, model: 2}   plus rules such as (r'MlpBlock_3/Dense_\\d/kernel',
                                         'model') for tensor parallelism inside each process.
Several processes (hosts) are JAX's own multi-controller runtime: `initialize_distributed` calls
`jax.distributed.initialize`, each process feeds its own rows of the global batch
(`global_batch`), and jit / pmap span all processes' devices.
"""
import atexit
import os
import re
import sys
import threading
from typing import Any, Dict, Optional, Sequence

from absl import logging
import jax
from jax.experimental import mesh_utils
from jax.experimental import multihost_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vit_jax import errors

AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")
PMAP_AXIS = "batch"


# ------------------------------------------------------------------------------------- the mesh.
def mesh_shape(mesh_cfg, num_devices: int) -> tuple:
  """(data, fsdp, model) sizes from `config.mesh`; one of them may be -1 (all that is left)."""
  cfg = dict(mesh_cfg.items()) if mesh_cfg else {}
  unknown = sorted(set(cfg) - set(AXES))
  if unknown:
    raise errors.ConfigError(f"Unknown mesh axis {unknown}: the mesh axes are {', '.join(AXES)}.")
  defaults = dict(data=-1, fsdp=1, model=1)
  sizes = {a: defaults[a] if cfg.get(a) is None else int(cfg[a]) for a in AXES}
  bad = {a: s for a, s in sizes.items() if s < 1 and s != -1}
  if bad:
    raise errors.ConfigError(f"mesh sizes must be >= 1 or -1 (all that is left), got {bad}.")
  free = [a for a in AXES if sizes[a] == -1]
  if len(free) > 1:
    raise errors.ConfigError(
        f"At most one mesh axis may be -1, got {', '.join(free)}; give the others "
        "explicit sizes.")
  fixed = int(np.prod([s for s in sizes.values() if s != -1]))
  if free:
    if num_devices % fixed:
      raise errors.ConfigError(
          f"mesh {sizes}: {num_devices} devices are not divisible by the fixed axes' "
          f"product {fixed}.")
    sizes[free[0]] = num_devices // fixed
  if int(np.prod(list(sizes.values()))) != num_devices:
    raise errors.ConfigError(
        f"mesh data={sizes['data']} x fsdp={sizes['fsdp']} x model={sizes['model']} "
        f"does not use the {num_devices} devices; set one axis to -1 to take the "
        "rest.")
  return tuple(sizes[a] for a in AXES)


def mesh_for_devices(mesh_cfg, num_devices: int):
  """`mesh_cfg` if it can be laid over `num_devices`, else plain data parallelism over them
  (logged): evaluation and prediction take the devices they have, whatever mesh a run was
  trained on (checkpoints restore on any mesh)."""
  try:
    mesh_shape(mesh_cfg, num_devices)
    return mesh_cfg
  except ValueError as e:
    logging.warning("The run's mesh does not fit the %d devices here (%s); using data "
                    "parallelism over them.", num_devices, e)
    return {"data": -1, "fsdp": 1, "model": 1}


def make_mesh(mesh_cfg=None, devices: Optional[Sequence[Any]] = None) -> Mesh:
  """The ('data', 'fsdp', 'model') mesh over `devices` (default: all devices of all processes;
  a TPU topology's compile-only devices for the planner), in the order
  `mesh_utils.create_device_mesh` finds fast for the hardware's topology.

  Raises ValueError when the sizes do not multiply to the device count, or when a 'model' group
  (devices holding the same batch rows) would span processes: each process feeds its own rows.
  """
  given, devices = devices, jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  if all(getattr(d, "platform", "") == "tpu" for d in devices) or given is None:
    # TPU devices (attached, or a topology's compile-only ones: vit_jax.plan) are laid out along
    # the physical torus.
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  else:  # other platforms' devices keep the given order
    grid = np.asarray(devices, dtype=object).reshape(shape)
  groups = grid.reshape(-1, shape[-1])
  if any(len({d.process_index for d in g}) > 1 for g in groups):
    raise errors.ConfigError(
        f"mesh.model={shape[-1]} spans processes (each has "
        f"{len(grid.flat) // len({d.process_index for d in grid.flat})} devices); "
        "a model-parallel group must lie within one process: lower mesh.model.")
  return Mesh(grid, AXES)


def activation_rules(per_example: bool = False):
  """Flax logical axis rules for the activations models annotate (layers.TOKENS): the 'batch'
  axis over data x fsdp. `per_example`: the model runs on one example under a vmap whose
  spmd_axis_name carries the batch split instead, so 'batch' (of size 1) is left alone."""
  return (("batch", None if per_example else BATCH_AXES),)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows over 'data' x 'fsdp', replicated over 'model'."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# ------------------------------------------------------------------------------ sharding rules.
def fsdp_spec(shape, fsdp_size: int, min_size: int, axis: str = "fsdp") -> P:
  """Shards the largest dimension divisible by `fsdp_size` over `axis`; arrays of fewer than
  `min_size` elements, or with no divisible dimension, are replicated."""
  if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):  # stable: first of equals
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = axis
      return P(*spec)
  return P()


def leaf_name(path) -> str:
  """A tree path as the '/'-joined name the sharding rules match, e.g.
  'params/Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel'."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _check_rule(regex: str, kind, mesh: Mesh):
  if kind == "replicate" or kind in mesh.axis_names:
    return kind
  if isinstance(kind, (tuple, list)):
    for entry in kind:
      names = entry if isinstance(entry, (tuple, list)) else (entry,)
      unknown = [n for n in names if n is not None and n not in mesh.axis_names]
      if unknown:
        raise errors.ConfigError(f"Sharding rule {regex!r}: {unknown} are not mesh axes "
                                 f"({', '.join(mesh.axis_names)}).")
    return P(*(tuple(e) if isinstance(e, list) else e for e in kind))
  raise errors.ConfigError(
      f"Sharding rule {regex!r} has kind {kind!r}: use 'replicate', a mesh axis "
      f"({', '.join(mesh.axis_names)}), or a PartitionSpec-like tuple such as "
      "(None, 'model').")


def _check_spec(name: str, shape, spec: P, mesh: Mesh) -> P:
  if len(spec) != len(shape):
    raise errors.ConfigError(
        f"Sharding rule spec {spec} has {len(spec)} entries but {name} has shape "
        f"{tuple(shape)}.")
  for dim, entry in zip(shape, spec):
    size = int(np.prod([mesh.shape[a] for a in (entry if isinstance(entry, tuple) else (entry,))
                        if a is not None]))
    if dim % size:
      raise errors.ConfigError(f"Sharding rule spec {spec} splits a dimension of {dim} of {name} "
                               f"{tuple(shape)} into {size} parts, which does not divide it.")
  return spec


def state_shardings(abstract_state, mesh: Mesh, *, min_fsdp_size: int = 2 ** 14,
                    rules: Sequence = ()):
  """NamedShardings for every leaf of a train state (params and optimizer state alike).

  `rules` are (regex, kind) pairs searched in '/'-joined leaf names (`leaf_name`), first match
  wins. kind is 'replicate'; a mesh axis name ('fsdp', 'model'): the leaf's largest dimension
  divisible by that axis is sharded over it, whatever its size; or a PartitionSpec-like tuple,
  e.g. (None, 'model') or (('fsdp', 'model'), None), that must fit the leaf. Unmatched leaves
  with at least `min_fsdp_size` elements are sharded over 'fsdp'. Optimizer moments carry their
  parameter's name in their path (e.g. 'opt_state/.../mu/Transformer/...'), so a rule without
  '^' gives them their parameter's sharding.
  """
  compiled = [(re.compile(r), _check_rule(r, kind, mesh)) for r, kind in rules]

  def one(path, leaf):
    shape = tuple(getattr(leaf, "shape", ()))
    name = leaf_name(path)
    kind = next((k for r, k in compiled if r.search(name)), None)
    if kind == "replicate" or not shape:
      spec = P()
    elif isinstance(kind, P):
      spec = _check_spec(name, shape, kind, mesh)
    elif kind is not None:
      spec = fsdp_spec(shape, mesh.shape[kind], 0, axis=kind)
    else:
      spec = fsdp_spec(shape, mesh.shape["fsdp"], min_fsdp_size)
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(one, abstract_state)


def device_bytes(tree) -> Dict[Any, int]:
  """Bytes of `tree`'s arrays held on each of this process's devices."""
  out = {}
  for x in jax.tree_util.tree_leaves(tree):
    for shard in x.addressable_shards:
      out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
  return out


# ---------------------------------------------------------------------------- global batches.
def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """This process's numpy rows -> global jax.Arrays sharded over the batch axes.

  With several processes each passes its own rows (B / processes of them); the global batch is
  their concatenation in process order (in the order of the mesh's devices).
  """
  sharding = batch_sharding(mesh)
  position = {d: i for i, d in np.ndenumerate(mesh.devices)}  # (data, fsdp, model) of a device
  local_shards = len({position[d][:2] for d in mesh.local_devices})
  out = {}
  for k, v in local_batch.items():
    v = np.asarray(v)
    if v.shape[0] % local_shards:
      raise errors.ConfigError(
          f"This process's batch has {v.shape[0]} rows ({k!r}), not divisible by "
          f"its {local_shards} batch shards (mesh data x fsdp over its devices); "
          "make batch_size a multiple of data x fsdp.")
    out[k] = jax.make_array_from_process_local_data(sharding, v)
  return out


# --------------------------------------------------------------------- host copies of arrays.
def to_host(tree):
  """Every leaf as a numpy array; arrays sharded across processes are gathered first, so every
  process must call this with the same tree."""
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)
  return jax.tree_util.tree_map(one, tree)


def from_host(tree, shardings):
  """Numpy leaves, the same full value on every process -> global arrays with `shardings`."""
  return jax.tree_util.tree_map(
      lambda x, s: jax.make_array_from_process_local_data(s, np.asarray(x), np.shape(x)),
      tree, shardings)


# ------------------------------------------------------------------------------- pmap mode.
def pmap_shard(local_batch: dict) -> dict:
  """(B_local, ...) -> (local_devices, B_local / local_devices, ...)."""
  n = jax.local_device_count()
  def split(x):
    if x.shape[0] % n:
      raise errors.ConfigError(f"per-process batch {x.shape[0]} is not divisible by the "
                               f"{n} local devices")
    return x.reshape((n, x.shape[0] // n) + x.shape[1:])
  return {k: split(np.asarray(v)) for k, v in local_batch.items()}


def replicate(tree):
  """A copy of `tree` on every local device, for pmap (leading axis = local devices). Global
  arrays sharded across processes are gathered first (every process must call this)."""
  devices = jax.local_devices()
  sharding = NamedSharding(Mesh(np.asarray(devices), (PMAP_AXIS,)), P(PMAP_AXIS))
  return jax.tree_util.tree_map(
      lambda x: jax.device_put(np.stack([x] * len(devices)), sharding), to_host(tree))


def unreplicate(tree):
  """The first local device's copy, as numpy."""
  return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_shards[0].data)[0]
                                if hasattr(x, "addressable_shards") else np.asarray(x)[0], tree)


# ---------------------------------------------------------------------------------- multi-host.
def initialize_distributed(cfg=None) -> None:
  """Joins this process to a multi-process run: `jax.distributed.initialize`, before any other
  JAX call.

  From `cfg` (config.distributed): coordinator_address ('host:port' of process 0),
  num_processes, process_id, local_device_ids ('0,1,2,3'; 'all' for one process per node under
  SLURM, where JAX would otherwise give each process only the GPU numbered SLURM_LOCALID). Unset
  keys are detected from the cluster's environment (SLURM, Open MPI, Cloud TPU pods, ...).
  Cross-process collectives on CPU devices use `cfg.cpu_collectives` (default 'gloo').
  """
  cfg = cfg or {}
  kwargs = {k: cfg.get(k) for k in ("coordinator_address", "num_processes", "process_id")
            if cfg.get(k) is not None}
  ids = cfg.get("local_device_ids")
  if isinstance(ids, str) and ids.strip():
    # An empty list: no restriction, and JAX's cluster detection leaves it alone.
    kwargs["local_device_ids"] = ([] if ids.strip() == "all" else
                                  [int(i) for i in ids.replace(" ", "").split(",")])
  elif isinstance(ids, (int, tuple, list)):
    kwargs["local_device_ids"] = [ids] if isinstance(ids, int) else list(ids)
  # How long the coordination service waits for a silent process (heartbeat) before it stops the
  # others with an error naming the missing task, and at start-up and shutdown (JAX's defaults:
  # 100, 300 and 300 s), when the config sets them (c.distributed.heartbeat_timeout_seconds = 20).
  for key in ("heartbeat_timeout_seconds", "initialization_timeout", "shutdown_timeout_seconds"):
    if cfg.get(key) is not None:
      kwargs[key] = int(cfg.get(key))
  jax.config.update("jax_cpu_collectives_implementation", cfg.get("cpu_collectives") or "gloo")
  try:
    jax.distributed.initialize(**kwargs)
  except ValueError as e:
    raise errors.ConfigError(
        f"jax.distributed.initialize failed: {e}. Outside SLURM, Open MPI and Cloud TPU set "
        "config.distributed.coordinator_address ('host:port' of process 0), num_processes and "
        "process_id (--config.distributed.KEY=VALUE).") from e
  _watch_for_failures()


_FAILED_KEY = "vit_jax/failed"  # in the coordination service's key-value store


def report_failure(message: str) -> None:
  """Tells the other processes that this one stops on an error (`message`, one line): their
  watchers (started by initialize_distributed) exit them at once. Without it they would wait in
  their next collective until the coordination service's heartbeat timeout (100 s by default)
  notices that this process is gone."""
  client = jax._src.distributed.global_state.client  # pylint: disable=protected-access
  if client is None:
    return
  try:
    client.key_value_set(_FAILED_KEY, f"process {jax.process_index()}: {message}")
  except Exception:  # pylint: disable=broad-except
    pass  # another process reported first, or the service is gone: the others know


def _watch_for_failures() -> None:
  """A daemon thread that exits this process (status 1, one `error:` line naming the failed
  process) when another reports a failure (report_failure)."""
  client = jax._src.distributed.global_state.client  # pylint: disable=protected-access
  me = f"process {jax.process_index()}:"

  stop = threading.Event()

  def watch():
    while not stop.is_set():
      try:  # short waits: a thread left inside the client's call at exit aborts the process
        message = client.blocking_key_value_get(_FAILED_KEY, 1000)
      except Exception:  # pylint: disable=broad-except
        continue  # a timeout, or the service is shutting down with the run
      if not message.startswith(me):
        print(f"error: stopping: {message}", file=sys.stderr, flush=True)
        os._exit(1)  # pylint: disable=protected-access
      return
  thread = threading.Thread(target=watch, name="vit_jax-failure-watcher", daemon=True)
  thread.start()

  def join():  # registered after jax.distributed's shutdown, so it runs before it
    stop.set()
    thread.join(timeout=5.0)
  atexit.register(join)
  logging.info("Process %d of %d: %d local and %d global devices.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def reached_preemption_sync_point(step: int) -> bool:
  """True on every process at the same step once any process got SIGTERM (JAX's preemption
  service, started by `jax.distributed.initialize`). Every process must call it at every step;
  with one process it is False."""
  return jax.process_count() > 1 and multihost_utils.reached_preemption_sync_point(step)
