"""Damaged checkpoints: each drill saves steps 1 and 2, damages step 2 on disk, and checks that a
new TrainCheckpointer finds step 1 (with a warning naming step 2's directory) and restores it
bitwise; `none_intact` damages both and expects CorruptCheckpointError naming what to delete.

  python -m tests.drills.corrupt
"""
import os
import shutil
import tempfile
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import checkpoint


def state(step: int, n: int = 1000):
  """A small train-state-like tree whose values depend on `step`."""
  w = jnp.arange(n, dtype=jnp.float32) / n + step
  return {"params": {"w": w.reshape(-1, 10), "b": jnp.full((7,), float(step))},
          "opt_state": {"mu": -w}, "step": jnp.asarray(step, jnp.int32)}


def _data_files(step_dir: str) -> list:
  """The array data files of a step (orbax's OCDBT `d/` files), largest first."""
  out = []
  for root, _, files in os.walk(step_dir):
    if os.path.basename(root) == "d":
      out += [os.path.join(root, f) for f in files]
  return sorted(out, key=os.path.getsize, reverse=True)


def flip_bytes(step_dir):
  path = _data_files(step_dir)[0]
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    data[len(data) // 2] ^= 0x5A
    f.seek(0)
    f.write(data)


def truncate(step_dir):
  path = _data_files(step_dir)[0]
  os.truncate(path, os.path.getsize(path) // 2)


def delete_file(step_dir):
  os.remove(_data_files(step_dir)[-1])


def half_written(step_dir):
  """A step directory that was copied or written only in part, without its manifest."""
  os.remove(os.path.join(step_dir, checkpoint.MANIFEST))
  os.remove(os.path.join(step_dir, "default", "_METADATA"))


def damaged_manifest(step_dir):
  with open(os.path.join(step_dir, checkpoint.MANIFEST), "w") as f:
    f.write('{"version": 1, "files": {"default/_MET')


def metadata_cut_short(step_dir):
  """No manifest (a kill between orbax's rename and the manifest), and orbax's metadata cut."""
  os.remove(os.path.join(step_dir, checkpoint.MANIFEST))
  path = os.path.join(step_dir, "_CHECKPOINT_METADATA")
  os.truncate(path, os.path.getsize(path) // 2)


DAMAGES = dict(flip_bytes=flip_bytes, truncate=truncate, delete_file=delete_file,
               half_written=half_written, damaged_manifest=damaged_manifest,
               metadata_cut_short=metadata_cut_short)


class _Warnings:
  def __init__(self):
    self.messages = []

  def __enter__(self):
    self._original = logging.warning
    logging.warning = lambda msg, *args: self.messages.append(msg % args if args else msg)
    return self

  def __exit__(self, *exc):
    logging.warning = self._original


def drill(workdir: str, damage: str) -> str:
  """One damage; '' when it was detected and step 1 restored bitwise, else what went wrong."""
  with checkpoint.TrainCheckpointer(workdir) as ckpt:
    ckpt.save(1, state(1))
    ckpt.save(2, state(2))
  step_dir = os.path.join(workdir, "checkpoints", "2")
  DAMAGES[damage](step_dir)
  with _Warnings() as w, checkpoint.TrainCheckpointer(workdir) as ckpt:
    latest = ckpt.latest_step()
    if latest != 1:
      return f"latest_step() is {latest}, not 1"
    restored = ckpt.restore(jax.eval_shape(lambda: state(1)))
  if not any(step_dir in m and "damaged" in m for m in w.messages):
    return f"no warning naming {step_dir}: {w.messages}"
  same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(restored),
                                                    jax.tree.leaves(state(1))))
  if not same:
    return "the restored step 1 differs from what was saved"
  if not os.path.isdir(step_dir + checkpoint.QUARANTINE):
    return f"{step_dir} was not moved aside"
  return ""


def none_intact(workdir: str) -> str:
  """Both steps damaged: CorruptCheckpointError naming both directories ('' when so)."""
  with checkpoint.TrainCheckpointer(workdir) as ckpt:
    ckpt.save(1, state(1))
    ckpt.save(2, state(2))
  dirs = [os.path.join(workdir, "checkpoints", s) for s in ("1", "2")]
  flip_bytes(dirs[0])
  truncate(dirs[1])
  try:
    with checkpoint.TrainCheckpointer(workdir) as ckpt:
      ckpt.latest_step()
  except checkpoint.CorruptCheckpointError as e:
    msg = str(e)
    if all(d in msg for d in dirs) and "rm -r" in msg:
      return ""
    return f"the error does not name both directories: {msg}"
  return "no error"


def manifest_cost(num_floats: int = 1_000_000, repeats: int = 3) -> dict:
  """Seconds to write and to verify the manifest of a state of `num_floats` float32 (x2 with its
  optimizer state), the best of `repeats`."""
  root = tempfile.mkdtemp(prefix="manifest_cost_")
  try:
    with checkpoint.TrainCheckpointer(root) as ckpt:
      ckpt.save(1, state(1, num_floats))
    step_dir = os.path.join(root, "checkpoints", "1")
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(step_dir) for f in fs)
    write, verify = [], []
    for _ in range(repeats):
      t = time.perf_counter()
      checkpoint.write_manifest(step_dir)
      write.append(time.perf_counter() - t)
      t = time.perf_counter()
      assert checkpoint.verify_step(step_dir) is None
      verify.append(time.perf_counter() - t)
    return dict(bytes=size, write_s=min(write), verify_s=min(verify))
  finally:
    shutil.rmtree(root, ignore_errors=True)


def run_all(root: str) -> dict:
  """{damage: '' or what went wrong} for every damage and none_intact."""
  out = {}
  for name in DAMAGES:
    out[name] = drill(os.path.join(root, name), name)
  out["none_intact"] = none_intact(os.path.join(root, "none_intact"))
  return out


if __name__ == "__main__":
  results = run_all(tempfile.mkdtemp(prefix="corrupt_drills_"))
  for k, v in results.items():
    print(f"  {k}: {'detected' if not v else 'MISSED: ' + v}")
  print(f"corruptions detected: {sum(not v for v in results.values())}/{len(results)}")
  print("manifest cost:", manifest_cost())
