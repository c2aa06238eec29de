"""Tests for vit_jax/checkpoint.py: orbax training checkpoints, their manifests, atomic writes.

(The published .npz layout is tests/test_npz.py's.)
"""
import json
import os
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vit_jax import checkpoint
from vit_jax import errors

# -------------------------------------------------------------------- training checkpoints.
def _mesh(shape, names):
  return Mesh(np.array(jax.devices()[:8]).reshape(shape), names)


@jax.jit
def train_state(step=7):
  """{params, opt_state, step, rng} with a kernel sharded over 8 devices, after one update."""
  shard = NamedSharding(_mesh((8,), ("data",)), P("data"))
  params = {"dense": {"kernel": jax.lax.with_sharding_constraint(
                          jnp.arange(64.).reshape(16, 4) / 64, shard),
                      "bias": jnp.linspace(0., 1., 4)}}
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3))
  opt_state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.cos(p) + step, params)
  _, opt_state = tx.update(grads, opt_state, params)
  return {"params": params, "opt_state": opt_state, "step": jnp.asarray(step, jnp.int32),
          "rng": jax.random.key(step)}


def _assert_states_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  unkey = lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(unkey(x)), np.asarray(unkey(y)))


@pytest.mark.parametrize("async_save", [False, True])
def test_round_trip_into_another_sharding(tmp_path, async_save):
  state = train_state()
  with checkpoint.TrainCheckpointer(tmp_path, async_save=async_save) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.save(7, state)
    ckpt.wait()
    assert not ckpt.save(7, state, force=True)  # a step that exists is never overwritten
    assert not ckpt.save(6, state)  # nor, without force, is an older one saved
  mesh = _mesh((2, 4), ("a", "b"))
  kernel_sharding = NamedSharding(mesh, P("b", "a"))
  replicated = NamedSharding(mesh, P())
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          state)
  abstract["params"]["dense"]["kernel"] = jax.ShapeDtypeStruct((16, 4), jnp.float32,
                                                               sharding=kernel_sharding)
  with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 7
    restored = ckpt.restore(abstract)
  _assert_states_equal(restored, state)
  kernel = restored["params"]["dense"]["kernel"]
  assert kernel.sharding == kernel_sharding
  assert kernel.addressable_shards[0].data.shape == (4, 2)
  assert restored["opt_state"][1].hyperparams["learning_rate"] == np.float32(1e-3)


def test_max_to_keep(tmp_path):
  with checkpoint.TrainCheckpointer(tmp_path, max_to_keep=2) as ckpt:
    for step in range(1, 5):
      ckpt.save(step, train_state(step))
    assert ckpt.all_steps() == [3, 4]
    abstract = jax.eval_shape(train_state)
    assert int(ckpt.restore(abstract)["step"]) == 4
    assert int(ckpt.restore(abstract, step=3)["step"]) == 3
    with pytest.raises(FileNotFoundError, match=r"available steps: \[3, 4\]"):
      ckpt.restore(abstract, step=1)
  assert sorted(os.listdir(ckpt.directory)) == ["3", "4"]


def test_partial_tmp_directory_is_ignored(tmp_path):
  with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
    ckpt.save(1, train_state(1))
  partial = ckpt.directory / "5.orbax-checkpoint-tmp-1700000000" / "default"
  partial.mkdir(parents=True)
  (partial / "half_written").write_text("x")
  with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 1
    assert int(ckpt.restore(jax.eval_shape(train_state))["step"]) == 1
    ckpt.save(2, train_state(2))
    assert ckpt.all_steps() == [1, 2]
    assert int(ckpt.restore(jax.eval_shape(train_state))["step"]) == 2


def test_shape_mismatch_names_the_key(tmp_path):
  with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
    ckpt.save(1, train_state())
    abstract = jax.eval_shape(train_state)
    abstract["params"]["dense"]["kernel"] = jax.ShapeDtypeStruct((16, 5), jnp.float32)
    abstract["params"]["extra"] = jax.ShapeDtypeStruct((3,), jnp.float32)
    with pytest.raises(errors.CheckpointError) as e:  # a ValueError too: one `error:` line
      ckpt.restore(abstract)
  msg = str(e.value)
  assert isinstance(e.value, ValueError) and msg.startswith(f"Checkpoint {ckpt.directory}/1 ")
  assert "params/dense/kernel: checkpoint (16, 4) vs expected (16, 5)" in msg
  assert "missing from the checkpoint: params/extra (3,)" in msg


def test_restore_without_checkpoint(tmp_path):
  with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
      ckpt.restore(jax.eval_shape(train_state))


def test_max_to_keep_must_be_positive(tmp_path):
  with pytest.raises(ValueError, match="max_to_keep"):
    checkpoint.TrainCheckpointer(tmp_path, max_to_keep=0)


def test_relative_workdir_saves_and_restores(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # `--workdir=workdirs/demo`, as the Makefile's demo passes it
  with checkpoint.TrainCheckpointer("workdirs/demo") as ckpt:
    ckpt.save(7, train_state(7))
    assert int(ckpt.restore(jax.eval_shape(train_state))["step"]) == 7
  assert os.listdir(tmp_path / "workdirs" / "demo" / "checkpoints") == ["7"]


# ------------------------------------------------ integrity: manifests, damage, full disks.
def _step_dir(ckpt, step):
  return os.path.join(str(ckpt.directory), str(step))


@pytest.mark.parametrize("async_save", [False, True])
def test_every_finished_save_gets_a_manifest(tmp_path, async_save):
  with checkpoint.TrainCheckpointer(tmp_path, async_save=async_save) as ckpt:
    ckpt.save(1, train_state(1))
    ckpt.wait()
    path = os.path.join(_step_dir(ckpt, 1), checkpoint.MANIFEST)
    files = json.load(open(path))["files"]
  assert "default/_METADATA" in files and "_CHECKPOINT_METADATA" in files
  size, sha = files["default/_METADATA"]
  assert size == os.path.getsize(os.path.join(_step_dir(ckpt, 1), "default", "_METADATA"))
  assert len(sha) == 64
  assert checkpoint.verify_step(_step_dir(ckpt, 1)) is None
  assert not [f for f in os.listdir(_step_dir(ckpt, 1)) if ".tmp" in f]


def test_manifests_ignore_a_file_system_mock_of_another_thread(tmp_path):
  """The manifest is hashed on a background thread while the main thread may be building a
  dataset under `tfds.testing.mock_data`, which patches epath process-wide for that moment
  (a CI run failed so): local files are read and written past epath."""
  from tensorflow_datasets.testing import test_utils  # pylint: disable=g-import-not-at-top
  with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
    ckpt.save(1, train_state(1))
  step_dir = _step_dir(ckpt, 1)
  before = json.load(open(os.path.join(step_dir, checkpoint.MANIFEST)))
  os.remove(os.path.join(step_dir, checkpoint.MANIFEST))
  with test_utils.MockFs():
    checkpoint.write_manifest(step_dir)
    assert checkpoint.verify_step(step_dir) is None
  assert json.load(open(os.path.join(step_dir, checkpoint.MANIFEST))) == before


def test_small_replicated_arrays_are_saved_whole_not_in_replica_slices(tmp_path, monkeypatch):
  from orbax.checkpoint._src.serialization import replica_slices  # pylint: disable=g-import-not-at-top
  sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P())
  state = {"w": jax.device_put(np.arange(4096, dtype=np.float32), sharding)}
  assert jax.device_count() == 8
  sliced = []
  original = replica_slices.ReplicaSlice.data
  monkeypatch.setattr(replica_slices.ReplicaSlice, "data",
                      lambda self: sliced.append(self.slice_args) or original(self))
  for min_bytes, step in ((checkpoint.MIN_REPLICA_SLICE_BYTES, 1), (0, 2)):
    monkeypatch.setattr(checkpoint, "MIN_REPLICA_SLICE_BYTES", min_bytes)
    sliced.clear()
    with checkpoint.TrainCheckpointer(tmp_path / str(step)) as ckpt:
      ckpt.save(step, state)
      restored = ckpt.restore(state, step)
    np.testing.assert_array_equal(restored["w"], np.arange(4096, dtype=np.float32))
    if min_bytes:
      assert not [s for s in sliced if s is not None]  # one whole array, no slices
    else:
      assert len([s for s in sliced if s is not None]) == 8  # orbax's default: 8 slices
  monkeypatch.undo()
  checkpoint.TrainCheckpointer(tmp_path / "3")  # the process-wide handler back to ours


def _biggest_data_file(step_dir):
  files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs
           if os.path.basename(r) == "d"]
  return max(files, key=os.path.getsize)


def test_verify_step_names_what_is_wrong(tmp_path):
  with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
    ckpt.save(1, train_state(1))
  step_dir = _step_dir(ckpt, 1)
  path = _biggest_data_file(step_dir)
  rel = os.path.relpath(path, step_dir)
  data = open(path, "rb").read()
  open(path, "wb").write(data[:10] + bytes([data[10] ^ 1]) + data[11:])
  assert checkpoint.verify_step(step_dir) == (f"{rel} does not match its checksum (bytes changed "
                                              "on disk)")
  open(path, "wb").write(data[:-5])
  assert checkpoint.verify_step(step_dir) == (f"{rel} has {len(data) - 5} bytes, {len(data)} were "
                                              "written (cut short or appended to)")
  os.remove(path)
  assert checkpoint.verify_step(step_dir) == f"{rel} is missing"
  os.remove(os.path.join(step_dir, checkpoint.MANIFEST))  # no manifest: structure only
  assert checkpoint.verify_step(step_dir) is None
  os.remove(os.path.join(step_dir, "default", "_METADATA"))
  assert "default/_METADATA is missing" in checkpoint.verify_step(step_dir)


def test_a_damaged_latest_step_is_moved_aside_and_the_previous_restored(tmp_path, caplog):
  with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, train_state(step))
  for step in (2, 3):
    os.truncate(_biggest_data_file(_step_dir(ckpt, step)), 3)
  with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 1
    assert ckpt.all_steps() == [1]
    _assert_states_equal(ckpt.restore(jax.eval_shape(train_state)), train_state(1))
    ckpt.save(2, train_state(2))  # the run goes on and saves step 2 again
    assert ckpt.all_steps() == [1, 2]
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert any(f"{_step_dir(ckpt, 3)} is damaged" in w and "step 1 instead" in w for w in warnings)
  assert sorted(os.listdir(ckpt.directory)) == ["1", "2", "2.corrupt", "3.corrupt"]


def test_an_explicitly_requested_damaged_step_is_an_error(tmp_path):
  with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
    ckpt.save(1, train_state(1))
    ckpt.save(2, train_state(2))
  os.remove(_biggest_data_file(_step_dir(ckpt, 1)))
  with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
    with pytest.raises(checkpoint.CorruptCheckpointError,
                       match=r"checkpoints/1 is damaged: .* is missing\. Delete it"):
      ckpt.restore(jax.eval_shape(train_state), step=1)


def test_no_intact_checkpoint_is_an_error_naming_the_directories(tmp_path):
  with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
    ckpt.save(1, train_state(1))
  open(os.path.join(_step_dir(ckpt, 1), checkpoint.MANIFEST), "w").write("{")
  with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
    with pytest.raises(checkpoint.CorruptCheckpointError,
                       match=rf"No intact checkpoint .* step 1: {checkpoint.MANIFEST} is damaged\. "
                             rf".*rm -r {_step_dir(ckpt, 1)}") as e:
      ckpt.latest_step()
  assert isinstance(e.value, errors.CheckpointError)  # a user error: one `error:` line, exit 2


def test_unfinished_saves_of_a_killed_run_are_deleted(tmp_path):
  with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
    ckpt.save(1, train_state(1))
  leftover = ckpt.directory / "2.orbax-checkpoint-tmp-1700000000" / "default"
  leftover.mkdir(parents=True)
  with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 1  # reading leaves it (it may be a running trainer's save)
    assert len(os.listdir(ckpt.directory)) == 2
    ckpt.save(2, train_state(2))
    assert sorted(os.listdir(ckpt.directory)) == ["1", "2"]


def test_a_full_disk_is_named_and_the_previous_checkpoint_kept(tmp_path, monkeypatch):
  import errno
  from etils import epath
  cls = type(epath.Path("/"))
  original = cls.write_text

  def full(self, *args, **kwargs):
    if "/2.orbax-checkpoint-tmp" in str(self):
      raise OSError(errno.ENOSPC, "No space left on device", str(self))
    return original(self, *args, **kwargs)
  with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
    ckpt.save(1, train_state(1))
    monkeypatch.setattr(cls, "write_text", full)
    with pytest.raises(checkpoint.DiskFullError,
                       match=r"The disk is full: saving the checkpoint of step 2 .* The previous "
                             r"checkpoint \(step 1\) is intact") as e:
      ckpt.save(2, train_state(2))
    assert e.value.errno == errno.ENOSPC
    monkeypatch.setattr(cls, "write_text", original)
  with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
    assert ckpt.all_steps() == [1]
    _assert_states_equal(ckpt.restore(jax.eval_shape(train_state)), train_state(1))


def test_disk_full_is_recognised_through_wrapping_errors():
  wrapped = ValueError('RESOURCE_EXHAUSTED: Failed writing "x": No space left on device '
                       "[os_error_code='28']")
  assert checkpoint._is_disk_full(wrapped)
  try:
    try:
      raise OSError(28, "disk")
    except OSError as inner:
      raise RuntimeError("save failed") from inner
  except RuntimeError as outer:
    assert checkpoint._is_disk_full(outer)
  assert not checkpoint._is_disk_full(ValueError("shape mismatch"))


# ------------------------------------- manifests: per-process parts, off the training thread.
def test_save_returns_before_hashing_and_wait_waits_for_it(tmp_path, monkeypatch):
  """Issue 34, item 10: the manifest's hashing runs on a background thread; `save()` returns while
  it is blocked, `wait()` returns once it is done, with a manifest that verifies."""
  original, caller = checkpoint._sha256, threading.current_thread()
  started, release, on_caller = threading.Event(), threading.Event(), []

  def blocking_sha256(path):
    if threading.current_thread() is caller:
      on_caller.append(str(path))  # the old behaviour: hashing on the training thread
    else:
      started.set()
      assert release.wait(60)
    return original(path)
  monkeypatch.setattr(checkpoint, "_sha256", blocking_sha256)
  ckpt = checkpoint.TrainCheckpointer(tmp_path)
  try:
    assert ckpt.save(1, train_state(1))
    assert on_caller == [], "save() hashed the files on the caller's thread"
    assert started.wait(30), "no background thread hashed the files"
    manifest = os.path.join(_step_dir(ckpt, 1), checkpoint.MANIFEST)
    assert not os.path.exists(manifest)
    waiter = threading.Thread(target=ckpt.wait)
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive(), "wait() returned while the manifest was being written"
    release.set()
    waiter.join(60)
    assert not waiter.is_alive() and on_caller == []
    assert os.path.exists(manifest) and checkpoint.verify_step(_step_dir(ckpt, 1)) is None
  finally:
    release.set()
    ckpt.close()


PROCESS_1_FILES = ("default/array_metadatas/process_1", "default/ocdbt.process_1/manifest.ocdbt",
                   "default/ocdbt.process_1/d/88bc599dd9ce3186d5183d4280e99645")


def _two_process_step(tmp_path):
  """A step directory laid out as a 2-process save is (orbax 0.12.8; measured): a real
  1-process save, plus the files that process 1 writes in its own directories."""
  with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
    ckpt.save(1, train_state(1))
  step_dir = _step_dir(ckpt, 1)
  os.remove(os.path.join(step_dir, checkpoint.MANIFEST))
  for i, rel in enumerate(PROCESS_1_FILES):
    os.makedirs(os.path.dirname(os.path.join(step_dir, rel)), exist_ok=True)
    with open(os.path.join(step_dir, rel), "wb") as f:
      f.write(bytes(range(256)) * (i + 1))
  return step_dir


def _all_files(step_dir):
  return {os.path.relpath(os.path.join(r, f), step_dir) for r, _, fs in os.walk(step_dir)
          for f in fs if not f.startswith("vit_jax_manifest")}


def test_each_process_hashes_and_lists_only_its_own_files(tmp_path, monkeypatch):
  """Issue 34, item 10: with 2 processes, each one's manifest part lists exactly the files it
  wrote (process 0: the shared metadata and its shards); verification splits along the parts."""
  step_dir = _two_process_step(tmp_path)
  hashed = {}
  original = checkpoint._sha256
  monkeypatch.setattr(checkpoint, "_sha256", lambda p: hashed.setdefault(
      jax.process_index(), []).append(os.path.relpath(str(p), step_dir)) or original(p))
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  for p in (0, 1):
    monkeypatch.setattr(jax, "process_index", lambda p=p: p)
    checkpoint.write_manifest(step_dir)
  monkeypatch.undo()
  parts = {p: json.load(open(os.path.join(step_dir, name)))
           for p, name in ((0, checkpoint.MANIFEST), (1, "vit_jax_manifest.process1.json"))}
  everything = _all_files(step_dir)
  assert set(parts[1]["files"]) == set(PROCESS_1_FILES)
  assert set(parts[0]["files"]) == everything - set(PROCESS_1_FILES)
  assert "default/ocdbt.process_0/manifest.ocdbt" in parts[0]["files"]
  assert "_CHECKPOINT_METADATA" in parts[0]["files"]
  assert {p: set(h) for p, h in hashed.items()} == {p: set(parts[p]["files"]) for p in (0, 1)}
  assert [parts[p]["num_processes"] for p in (0, 1)] == [2, 2]
  assert not [f for f in os.listdir(step_dir) if ".tmp" in f]

  assert checkpoint.verify_step(step_dir) is None
  with open(os.path.join(step_dir, PROCESS_1_FILES[2]), "r+b") as f:
    f.write(b"\xff")
  problem = f"{PROCESS_1_FILES[2]} does not match its checksum (bytes changed on disk)"
  assert checkpoint.verify_step(step_dir) == problem  # one process checks every part
  assert checkpoint.verify_step(step_dir, share=(1, 2)) == problem  # process 1's share
  assert checkpoint.verify_step(step_dir, share=(0, 2)) is None  # not in process 0's share


def test_a_missing_manifest_part_falls_back_to_orbax_metadata(tmp_path):
  """A process killed between orbax's final rename and its manifest part: the parts written are
  checked, orbax's rename vouches for the rest (as for a step without any manifest)."""
  step_dir = _two_process_step(tmp_path)
  for p in (0, 1):
    checkpoint.write_manifest(step_dir, process_index=p, process_count=2)
  os.remove(os.path.join(step_dir, "vit_jax_manifest.process1.json"))
  assert checkpoint.verify_step(step_dir) is None
  assert checkpoint.verify_step(step_dir, share=(1, 2)) is None
  # Process 0's part missing: process 1's names the process count; its files are checked, and
  # orbax's metadata, which no part lists now.
  os.remove(os.path.join(step_dir, checkpoint.MANIFEST))
  checkpoint.write_manifest(step_dir, process_index=1, process_count=2)
  assert checkpoint.verify_step(step_dir) is None
  os.remove(os.path.join(step_dir, "_CHECKPOINT_METADATA"))
  assert checkpoint.verify_step(step_dir) == ("_CHECKPOINT_METADATA is missing (a half-written "
                                              "or half-copied directory)")
  assert checkpoint.verify_step(step_dir, share=(1, 2)) is None  # process 0's share to see
  os.truncate(os.path.join(step_dir, PROCESS_1_FILES[0]), 3)
  assert "has 3 bytes" in checkpoint.verify_step(step_dir, share=(1, 2))


def test_a_manifest_written_before_there_were_parts_still_verifies(tmp_path):
  with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
    ckpt.save(1, train_state(1))
  step_dir = _step_dir(ckpt, 1)
  path = os.path.join(step_dir, checkpoint.MANIFEST)
  files = json.load(open(path))["files"]
  with open(path, "w") as f:
    json.dump({"version": 1, "files": files}, f)  # the format of vit_jax before issue 34
  assert checkpoint.verify_step(step_dir) is None
  with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 1
  os.truncate(_biggest_data_file(step_dir), 3)
  assert "has 3 bytes" in checkpoint.verify_step(step_dir)


def test_a_save_that_deletes_a_step_being_hashed_waits_for_it(tmp_path, monkeypatch):
  """max_to_keep=1: saving step 2 deletes step 1, so it waits for step 1's manifest first (else
  the hashing thread would read a directory being deleted)."""
  original = checkpoint._sha256

  def slow(path):
    time.sleep(0.05)
    return original(path)
  monkeypatch.setattr(checkpoint, "_sha256", slow)
  with checkpoint.TrainCheckpointer(tmp_path, max_to_keep=1) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, train_state(step))
  assert os.listdir(ckpt.directory) == ["3"]
  assert checkpoint.verify_step(_step_dir(ckpt, 3)) is None


def test_the_checkpoint_save_benchmark_runs(capsys):
  from benchmarks import checkpoint_save  # pylint: disable=g-import-not-at-top
  results = checkpoint_save.main(["--mib=2", "--rounds=1"])
  assert set(results) == set(checkpoint_save.CONTENDERS)
  assert results["ours"]["hash_s"] > 0 and results["orbax"]["bytes"] > 1 << 20
  assert "| ours_async |" in capsys.readouterr().out


# ---------------------------------------------------------------------------- atomic writes.
def test_write_atomic_replaces_whole_files_or_nothing(tmp_path, monkeypatch):
  path = tmp_path / "sub" / "config.json"  # the parent is created
  checkpoint.write_atomic(path, "first")
  checkpoint.write_atomic(path, b"second")
  assert path.read_bytes() == b"second" and os.listdir(tmp_path / "sub") == ["config.json"]

  import pathlib  # pylint: disable=g-import-not-at-top
  cls, original = type(pathlib.Path("/")), type(pathlib.Path("/")).write_text  # local files

  def cut_short(self, data, *args, **kwargs):
    original(self, data[:3], *args, **kwargs)
    raise OSError(28, "No space left on device", str(self))
  monkeypatch.setattr(cls, "write_text", cut_short)
  with pytest.raises(OSError, match="No space left"):
    checkpoint.write_atomic(path, "third, cut short")
  assert path.read_bytes() == b"second"  # the previous file untouched
  assert os.listdir(tmp_path / "sub") == ["config.json"]  # no temporary file left behind
