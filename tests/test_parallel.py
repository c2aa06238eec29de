"""Tests for vit_jax/parallel.py: mesh, sharding rules, sharded state creation, global batches,
pmap helpers and the multi-host set-up (8 fake CPU devices, one process)."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from vit_jax import models
from vit_jax import parallel


# ------------------------------------------------------------------------------------- the mesh.
@pytest.mark.parametrize("cfg, shape", [
    (None, (8, 1, 1)),
    (dict(data=-1, fsdp=1), (8, 1, 1)),
    (dict(data=1, fsdp=-1), (1, 8, 1)),
    (dict(data=2, fsdp=2, model=2), (2, 2, 2)),
    (dict(data=-1, model=2), (4, 1, 2)),
    (dict(data=2, fsdp=-1, model=1), (2, 4, 1)),
])
def test_make_mesh_shapes(cfg, shape):
  mesh = parallel.make_mesh(cfg)
  assert mesh.axis_names == ("data", "fsdp", "model")
  assert tuple(mesh.shape.values()) == shape
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


def test_make_mesh_on_given_devices():
  mesh = parallel.make_mesh(dict(data=1, fsdp=-1), devices=jax.devices()[:1])
  assert tuple(mesh.shape.values()) == (1, 1, 1)
  assert list(mesh.devices.flat) == jax.devices()[:1]
  mesh = parallel.make_mesh(dict(data=2, fsdp=-1), devices=jax.devices()[::-1])
  assert [d.id for d in mesh.devices.flat] == [d.id for d in jax.devices()[::-1]]


@pytest.mark.parametrize("cfg, match", [
    (dict(data=-1, fsdp=-1), "At most one mesh axis may be -1"),
    (dict(data=3, fsdp=1), "does not use the 8 devices"),
    (dict(data=-1, fsdp=3), "not divisible by the fixed axes' product 3"),
    (dict(data=0), "must be >= 1 or -1"),
    (dict(data=-1, tensor=2), "Unknown mesh axis"),
])
def test_make_mesh_errors(cfg, match):
  with pytest.raises(ValueError, match=match):
    parallel.make_mesh(cfg)


def test_model_axis_must_stay_within_a_process():
  devices = [types.SimpleNamespace(id=i, process_index=i // 4) for i in range(8)]  # 2 x 4
  with pytest.raises(ValueError, match="mesh.model=8 spans processes"):
    parallel.make_mesh(dict(data=1, model=8), devices=devices)


# ------------------------------------------------------------------------------ sharding rules.
@pytest.mark.parametrize("shape, n, min_size, spec", [
    ((16, 32), 8, 0, P(None, "fsdp")),       # the largest dimension
    ((32, 16), 8, 0, P("fsdp", None)),
    ((20, 16), 8, 0, P(None, "fsdp")),       # the largest *divisible* dimension
    ((7, 7, 1, 64), 8, 0, P(None, None, None, "fsdp")),
    ((3, 5), 8, 0, P()),                     # nothing divisible: replicated
    ((16, 32), 8, 513, P()),                 # 512 elements, below the threshold
    ((16, 32), 8, 512, P(None, "fsdp")),     # at the threshold
    ((16, 32), 1, 0, P()),                   # no fsdp axis
    ((), 8, 0, P()),
])
def test_fsdp_spec(shape, n, min_size, spec):
  assert parallel.fsdp_spec(shape, n, min_size) == spec


def _state_fn(num_layers=1, hidden=16, mlp=32):
  model = models.get_model("ViT-Mu/7", num_classes=10, hidden_size=hidden, mlp_dim=mlp,
                           num_heads=2, num_layers=num_layers)
  tx = optax.sgd(0.1, momentum=0.9)

  def init_state(rng):
    params = model.init(rng, jnp.zeros((1, 28, 28, 1)), train=False)["params"]
    return dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  return init_state


def _specs(shardings):
  return {parallel.leaf_name(p): s.spec
          for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}


def test_state_shardings_rules_over_real_names():
  abstract = jax.eval_shape(_state_fn(), jax.random.PRNGKey(0))
  mesh = parallel.make_mesh(dict(data=2, fsdp=2, model=2))
  rules = [(r"MlpBlock_3/Dense_\d/kernel", "model"),
           (r"head/", "replicate"),
           (r"MultiHeadDotProductAttention_1/query/kernel", (None, "model", None)),
           (r"embedding/bias", "fsdp")]
  specs = _specs(parallel.state_shardings(abstract, mesh, min_fsdp_size=512, rules=rules))
  mlp = "Transformer/encoderblock_0/MlpBlock_3"
  attn = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1"
  assert specs[f"params/{mlp}/Dense_0/kernel"] == P(None, "model")  # (16, 32): 32 is larger
  assert specs[f"params/{mlp}/Dense_1/kernel"] == P("model", None)  # (32, 16)
  assert specs[f"params/{attn}/query/kernel"] == P(None, "model", None)  # (16, 2, 8)
  assert specs["params/embedding/bias"] == P("fsdp")  # 16 elements: the rule beats the size
  assert specs["params/head/kernel"] == P()  # (16, 10), 160 elements
  # Unmatched: sharded over fsdp from 512 elements on, on the largest divisible dimension.
  assert specs["params/embedding/kernel"] == P(None, None, None, "fsdp")  # 784 elements
  assert specs["params/Transformer/posembed_input/pos_embedding"] == P()  # (1, 17, 16): 272
  assert specs[f"params/{attn}/key/kernel"] == P()  # 256 elements
  assert specs["step"] == P()
  # The optimizer's momentum has its parameter's name in its path, so the same sharding.
  trace = {k: v for k, v in specs.items() if k.startswith("opt_state") and "trace" in k}
  assert len(trace) == sum(k.startswith("params/") for k in specs)
  for k, v in trace.items():
    assert v == specs["params/" + k.split("/trace/")[1]], k


def test_state_shardings_size_threshold():
  abstract = jax.eval_shape(_state_fn(), jax.random.PRNGKey(0))
  mesh = parallel.make_mesh(dict(data=1, fsdp=-1))
  specs = _specs(parallel.state_shardings(abstract, mesh, min_fsdp_size=512))
  sizes = {parallel.leaf_name(p): x.size
           for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  for name, spec in specs.items():
    assert (spec != P()) == (sizes[name] >= 512), (name, sizes[name], spec)
  assert specs["params/embedding/kernel"] == P(None, None, None, "fsdp")
  assert specs["params/Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"] == P(None, "fsdp")


@pytest.mark.parametrize("rule, match", [
    ((r"kernel", "shard"), "has kind 'shard': use 'replicate', a mesh axis"),
    ((r"kernel", (None, "tensor")), r"\['tensor'\] are not mesh axes"),
    ((r"head/kernel", ("fsdp",)), r"has 1 entries but \S*head/kernel has shape \(16, 10\)"),
    ((r"head/kernel", (None, "fsdp")), r"splits a dimension of 10 .* into 8 parts"),
])
def test_state_shardings_rule_errors(rule, match):
  abstract = jax.eval_shape(_state_fn(), jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match=match):
    parallel.state_shardings(abstract, parallel.make_mesh(dict(data=1, fsdp=-1)), rules=[rule])


def test_state_is_created_directly_sharded():
  """FSDP over 8 devices: each device holds ~1/8 of the parameters, and the jitted init never
  holds the whole state on one device."""
  init_state = _state_fn(hidden=32, mlp=256)
  rng = jax.random.PRNGKey(0)
  abstract = jax.eval_shape(init_state, rng)
  leaves = jax.tree_util.tree_leaves(abstract["params"])
  total = sum(x.size * x.dtype.itemsize for x in leaves)
  shardings = parallel.state_shardings(abstract, parallel.make_mesh(dict(data=1, fsdp=-1)),
                                       min_fsdp_size=1024)
  init = jax.jit(init_state, out_shardings=shardings).lower(rng).compile()
  # Compiled per-device buffers (params, momentum, temporaries) stay below one full copy.
  memory = init.memory_analysis()
  assert memory.output_size_in_bytes + memory.temp_size_in_bytes < total
  state = init(rng)
  for x, s in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(shardings)):
    assert x.sharding == s
  per_device = parallel.device_bytes(state["params"])
  assert len(per_device) == 8
  # Leaves of >= 1024 elements with a dimension divisible by 8 are split 8 ways, the rest kept.
  expected = sum(x.size * x.dtype.itemsize // (8 if x.size >= 1024 and
                                               any(d % 8 == 0 for d in x.shape) else 1)
                 for x in leaves)
  assert set(per_device.values()) == {expected}
  assert expected / total < 0.2  # 1/8 plus the small replicated leaves (biases, norms, head)


def test_device_bytes_counts_every_shard():
  mesh = parallel.make_mesh(dict(data=2, fsdp=4))
  x = jax.device_put(np.zeros((8, 16), np.float32), jax.sharding.NamedSharding(mesh, P("fsdp")))
  y = jax.device_put(np.zeros((3,), np.int32), parallel.replicated(mesh))
  assert set(parallel.device_bytes({"x": x, "y": y}).values()) == {2 * 16 * 4 + 3 * 4}


# ---------------------------------------------------------------------------- global batches.
def test_global_batch_rows_follow_the_batch_axes():
  mesh = parallel.make_mesh(dict(data=-1, model=2))  # 4 row shards, each on 2 devices
  rows = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  batch = parallel.global_batch({"image": rows}, mesh)["image"]
  np.testing.assert_array_equal(np.asarray(batch), rows)
  position = {d: i for i, d in np.ndenumerate(mesh.devices)}
  for shard in batch.addressable_shards:
    data_index = position[shard.device][0]
    np.testing.assert_array_equal(np.asarray(shard.data), rows[4 * data_index:4 * data_index + 4])


def test_global_batch_error_names_the_fix():
  with pytest.raises(ValueError, match="12 rows .* not divisible by its 8 batch shards"):
    parallel.global_batch({"image": np.zeros((12, 2))}, parallel.make_mesh())


# --------------------------------------------------------------------- host copies of arrays.
def test_from_host_and_to_host_round_trip():
  abstract = jax.eval_shape(_state_fn(), jax.random.PRNGKey(0))
  shardings = parallel.state_shardings(abstract, parallel.make_mesh(dict(data=1, fsdp=-1)),
                                       min_fsdp_size=512)
  rng = np.random.default_rng(0)
  host = jax.tree_util.tree_map(lambda a: rng.normal(size=a.shape).astype(a.dtype), abstract)
  arrays = parallel.from_host(host, shardings)
  for x, s in zip(jax.tree_util.tree_leaves(arrays), jax.tree_util.tree_leaves(shardings)):
    assert x.sharding == s
  back = parallel.to_host(arrays)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, host)
  assert all(isinstance(x, np.ndarray) for x in jax.tree_util.tree_leaves(back))


# ------------------------------------------------------------------------------- pmap mode.
def test_pmap_helpers():
  batch = parallel.pmap_shard({"image": np.arange(32).reshape(16, 2)})
  assert batch["image"].shape == (8, 2, 2)
  np.testing.assert_array_equal(batch["image"][3], [[12, 13], [14, 15]])
  with pytest.raises(ValueError, match="per-process batch 12 is not divisible by the 8 local"):
    parallel.pmap_shard({"image": np.zeros((12, 2))})
  tree = {"w": np.arange(6.0).reshape(2, 3), "step": np.int32(4)}
  replicated = parallel.replicate(tree)
  assert replicated["w"].shape == (8, 2, 3) and len(replicated["w"].addressable_shards) == 8
  out = jax.pmap(lambda t: jax.tree_util.tree_map(lambda x: x + 1, t))(replicated)
  back = parallel.unreplicate(out)
  np.testing.assert_array_equal(back["w"], tree["w"] + 1)
  assert back["step"] == 5


def test_replicate_gathers_sharded_global_arrays():
  mesh = parallel.make_mesh(dict(data=1, fsdp=-1))
  w = np.arange(64.0).reshape(8, 8)
  sharded = jax.device_put(w, jax.sharding.NamedSharding(mesh, P("fsdp")))
  np.testing.assert_array_equal(parallel.unreplicate(parallel.replicate({"w": sharded}))["w"], w)


# ---------------------------------------------------------------------------------- multi-host.
@pytest.fixture
def fake_initialize(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  updates = []
  monkeypatch.setattr(jax.config, "update", lambda k, v: updates.append((k, v)))
  return calls, updates


@pytest.mark.parametrize("cfg, kwargs", [
    (None, {}),  # everything from the cluster's environment
    (dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1),
     dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1)),
    (dict(num_processes=None, local_device_ids="0, 1,2"), dict(local_device_ids=[0, 1, 2])),
    (dict(local_device_ids="all"), dict(local_device_ids=[])),  # all visible, SLURM per node
])
def test_initialize_distributed_arguments(fake_initialize, cfg, kwargs):
  calls, updates = fake_initialize
  parallel.initialize_distributed(cfg)
  assert calls == [kwargs]
  assert updates == [("jax_cpu_collectives_implementation", "gloo")]


def test_initialize_distributed_error_names_the_keys(monkeypatch):
  def fail(**_):
    raise ValueError("coordinator_address should be defined.")
  monkeypatch.setattr(jax.distributed, "initialize", fail)
  monkeypatch.setattr(jax.config, "update", lambda *_: None)
  with pytest.raises(ValueError, match="should be defined.*config.distributed.coordinator_addr"):
    parallel.initialize_distributed({})


def test_no_preemption_sync_with_one_process():
  assert parallel.reached_preemption_sync_point(1) is False
