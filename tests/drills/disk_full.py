"""Disk full while saving: the save fails with DiskFullError saying so, the previous checkpoint
stays intact and restorable.

  python -m tests.drills.disk_full

As root the checkpoints go to a real 1 MiB tmpfs (step 1 fits, step 2 does not); otherwise orbax's
write of the step's `_METADATA` is patched to raise OSError(ENOSPC).
"""
import contextlib
import errno
import os
import subprocess
import tempfile

import jax
import numpy as np

from tests.drills import corrupt
from vit_jax import checkpoint

TMPFS_BYTES = 1 << 20
STATE_FLOATS = 80_000  # ~0.6 MB on disk with its optimizer-state twin: one fits in the tmpfs


@contextlib.contextmanager
def small_disk(path: str):
  """A TMPFS_BYTES tmpfs at `path` (root only); yields 'tmpfs', or None when it cannot mount."""
  os.makedirs(path, exist_ok=True)
  if os.geteuid() != 0 or subprocess.run(
      ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", path],
      capture_output=True).returncode != 0:
    yield None
    return
  try:
    yield "tmpfs"
  finally:
    subprocess.run(["umount", "-l", path], check=False)


@contextlib.contextmanager
def patched_full_disk(step: int):
  """orbax's write of step `step`'s `_METADATA` raises OSError(ENOSPC)."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  cls = type(epath.Path("/"))
  original = cls.write_text

  def write_text(self, *args, **kwargs):
    if f"/{step}.orbax-checkpoint-tmp" in str(self) and str(self).endswith("_METADATA"):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
    return original(self, *args, **kwargs)
  cls.write_text = write_text
  try:
    yield
  finally:
    cls.write_text = original


def drill(root: str, async_save: bool, use_tmpfs: bool = True) -> tuple:
  """('' or what went wrong, 'tmpfs' | 'patched write')."""
  workdir = os.path.join(root, f"async_{async_save}_tmpfs_{use_tmpfs}")
  disk = small_disk(workdir) if use_tmpfs else contextlib.nullcontext()
  with disk as kind:
    kind = kind or "patched write"
    ctx = patched_full_disk(2) if kind == "patched write" else contextlib.nullcontext()
    error = None
    with ctx:
      ckpt = checkpoint.TrainCheckpointer(workdir, async_save=async_save)
      try:
        ckpt.save(1, corrupt.state(1, STATE_FLOATS))
        ckpt.wait()
        ckpt.save(2, corrupt.state(2, STATE_FLOATS))
        ckpt.wait()
      except checkpoint.DiskFullError as e:
        error = e
      finally:
        try:
          ckpt.close()
        except checkpoint.DiskFullError:
          pass
    if error is None:
      return "no DiskFullError", kind
    if "disk is full" not in str(error) or "step 1) is intact" not in str(error):
      return f"unclear message: {error}", kind
    with checkpoint.TrainCheckpointer(workdir) as ckpt:
      if ckpt.all_steps() != [1]:
        return f"steps after the failed save: {ckpt.all_steps()}", kind
      restored = ckpt.restore(jax.eval_shape(lambda: corrupt.state(1, STATE_FLOATS)))
    same = all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(restored), jax.tree.leaves(corrupt.state(1, STATE_FLOATS))))
    return ("" if same else "step 1 changed"), kind


def run_all(root: str) -> dict:
  return {f"{'async' if a else 'sync'} save{'' if t else ', patched'}": drill(root, a, t)
          for a in (False, True) for t in (True, False)}


if __name__ == "__main__":
  results = run_all(tempfile.mkdtemp(prefix="disk_full_"))
  for k, (v, kind) in results.items():
    print(f"  {k} ({kind}): {'previous checkpoint intact' if not v else 'FAILED: ' + v}")
  print(f"disk-full saves survived: {sum(not v for v, _ in results.values())}/{len(results)}")
