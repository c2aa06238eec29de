"""Training-state checkpoints (orbax): atomic saves, checksum manifests, resume.

Training state (params, optimizer state, step, rng — any pytree of jax.Arrays) goes through
`TrainCheckpointer`, a thin wrapper over `orbax.checkpoint.CheckpointManager`, which adds a
checksum manifest to every step (`write_manifest`, `verify_step`). `write_atomic` is the one
atomic file write of the package. Published `.npz` weights are `vit_jax/npz.py`'s.
"""
import concurrent.futures
import contextlib
import errno
import hashlib
import itertools
import json
import os
import pathlib
import re
import uuid
from typing import Any, Optional, Union

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from vit_jax import errors
from vit_jax import parallel

PyTree = Any


def _path(path: Union[str, os.PathLike]):
  """`path` as a `pathlib.Path` when it is local, else as an `epath.Path` (gs://, ...).

  Local files go through the standard library, not through epath: the manifest is hashed and
  written on a background thread, and a file-system mock that patches epath process-wide for a
  moment (`tfds.testing.mock_data` does, whenever a dataset is built) would otherwise send that
  thread's reads and writes elsewhere."""
  text = os.fspath(path)
  return epath.Path(text) if _is_remote(text) else pathlib.Path(text)


def _is_remote(path: str) -> bool:
  """Whether `path` names a remote file system (gs://, s3://, ...) rather than a local path."""
  return "://" in path


def _size(path) -> int:
  st = path.stat()
  return int(st.st_size if hasattr(st, "st_size") else st.length)


def write_atomic(path: Union[str, os.PathLike], data: Union[str, bytes]) -> None:
  """Writes `data` (text as UTF-8, or bytes) to `path` so that the file appears only once
  complete: it goes to a temporary name next to it, which is then renamed over `path`; a failed
  write leaves `path` as it was and no temporary file. Any path works (local, gs://); the
  parent directory is created when missing."""
  path = _path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f"{path.name}.tmp-{uuid.uuid4().hex}"
  try:
    if isinstance(data, str):
      tmp.write_text(data)
    else:
      tmp.write_bytes(data)
    tmp.replace(path)
  finally:
    if tmp.exists():
      tmp.unlink()


def _stored_shape(x) -> tuple:
  """Shape as orbax stores the leaf: typed PRNG keys are stored as their raw key data."""
  if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
    return tuple(jax.eval_shape(jax.random.key_data, x).shape)
  return tuple(np.shape(x))


# The manifest of a step (`write_manifest`) comes in parts, one per process that saved it: process
# 0's is `vit_jax_manifest.json` (the whole manifest of a one-process save, and the name a manifest
# had before there were parts), process P's `vit_jax_manifest.process{P}.json`. Each part is
# {"version", "process", "num_processes", "files": {path: [bytes, sha256]}}.
MANIFEST = "vit_jax_manifest.json"
_PART_RE = re.compile(r"vit_jax_manifest(?:\.process(\d+))?\.json")
# The files of a step that process P writes (orbax 0.12.8, OCDBT; seen in a 2-process save):
# `default/ocdbt.process_P/` (its array shards and their OCDBT manifest) and
# `default/array_metadatas/process_P`. The rest -- `_CHECKPOINT_METADATA`, `commit_success.txt`,
# `default/{_METADATA,_sharding,manifest.ocdbt,d/}` (the merged OCDBT root) -- is process 0's.
_OWNED_RE = re.compile(r"(?:^|/)(?:ocdbt\.process_|array_metadatas/process_)(\d+)(?:/|$)")
QUARANTINE = ".corrupt"  # a corrupt step directory is renamed `{step}.corrupt[-N]`
_REASON_BYTES = 512  # a verifier's problem as the processes exchange it (UTF-8, cut there)


class CorruptCheckpointError(errors.CheckpointError):
  """A checkpoint whose files are damaged, cut short, missing or unreadable; the message names
  the directory and what to delete."""


class DiskFullError(OSError):
  """A checkpoint save ran out of disk space; the previous checkpoint is intact."""


def _part_name(process: int) -> str:
  return MANIFEST if process == 0 else f"vit_jax_manifest.process{process}.json"


def _process_of(rel: str) -> Optional[int]:
  """The process whose own file or directory `rel` (relative to the step directory) is, or None
  for the shared ones, which process 0 writes."""
  m = _OWNED_RE.search(rel)
  return int(m.group(1)) if m else None


def _files(root, prefix: str = "", owner: Optional[int] = None):
  """(relative path, Path) of every file under `root` but the manifest parts (and their temporary
  files), sorted; with `owner`, only that process's files (other processes' directories are not
  even listed). Works for any epath (gs:// too)."""
  for child in sorted(root.iterdir(), key=lambda c: c.name):
    rel = prefix + child.name
    if child.is_dir():
      if owner is None or _process_of(rel + "/") in (None, owner):
        yield from _files(child, rel + "/", owner)
    elif not (prefix == "" and rel.startswith("vit_jax_manifest")) and (
        owner is None or (_process_of(rel) or 0) == owner):
      yield rel, child


def _sha256(path) -> str:
  digest = hashlib.sha256()
  with path.open("rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      digest.update(chunk)
  return digest.hexdigest()


def write_manifest(step_dir: Union[str, os.PathLike], *, process_index: Optional[int] = None,
                   process_count: Optional[int] = None) -> None:
  """Writes this process's part of the manifest of a finalized checkpoint: the size and SHA-256
  of the files this process wrote (`_OWNED_RE`; with one process, every file), as
  `{step_dir}/vit_jax_manifest.json` (process 0) or `vit_jax_manifest.process{P}.json`,
  atomically (a temporary file renamed). Every process calls it for its own files; the process
  index and count default to JAX's. Orbax writes no checksums of its own: a flipped byte in an
  array file restores silently (measured with orbax 0.12.8)."""
  step_dir = _path(step_dir)
  p = jax.process_index() if process_index is None else int(process_index)
  n = jax.process_count() if process_count is None else int(process_count)
  files = {rel: [_size(f), _sha256(f)]
           for rel, f in _files(step_dir, owner=p if n > 1 else None)}
  write_atomic(step_dir / _part_name(p), json.dumps(
      {"version": 2, "process": p, "num_processes": n, "files": files}, indent=1))


def _read_part(path) -> Optional[dict]:
  """A manifest part's {path: [bytes, sha256]} and process count (None when damaged). A
  manifest written before there were parts has no count: it is a whole manifest (count 1)."""
  try:
    part = json.loads(path.read_text())
    files, count = part["files"], int(part.get("num_processes", 1))
    if isinstance(files, dict) and all(isinstance(v, list) and len(v) == 2
                                       for v in files.values()):
      return {"files": files, "num_processes": count}
  except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
    pass
  return None


def _structure_problem(step_dir) -> Optional[str]:
  """Orbax's two metadata files are there and parse as JSON (None), or what is wrong."""
  for rel in ("_CHECKPOINT_METADATA", "default/_METADATA"):
    if not (step_dir / rel).exists():
      return f"{rel} is missing (a half-written or half-copied directory)"
    try:
      json.loads((step_dir / rel).read_text())
    except (ValueError, UnicodeDecodeError):
      return f"{rel} is not valid JSON (damaged or cut short)"
  return None


def verify_step(step_dir: Union[str, os.PathLike], *, share: tuple = (0, 1)) -> Optional[str]:
  """None when the checkpoint in `step_dir` is intact, else what is wrong with it (a phrase).

  Every file listed in the manifest parts (`write_manifest`) is there with its size and SHA-256.
  Where parts are missing -- none at all (a checkpoint saved before manifests existed), or only
  some (a process killed between orbax's final rename and its part, or a part still being
  written) -- orbax's two metadata files must also be there and parse as JSON; orbax's atomic
  rename vouches for the files no part lists.

  `share=(i, n)`: the work of verifier i of n (processes checking one step together; the step
  is intact when every share is): the files of the parts of processes i, i + n, ... are hashed,
  and verifier 0 also reads every part (the process count of the save, hence which parts are
  missing) and checks orbax's metadata where one is.
  """
  step_dir = _path(step_dir)
  index, count = share
  if not step_dir.is_dir():
    return "not a directory"
  parts = {}
  for child in step_dir.iterdir():
    m = _PART_RE.fullmatch(child.name)
    if m:
      parts[int(m.group(1) or 0)] = child
  expected = 1
  for p, path in sorted(parts.items()):
    if p % count != index and index != 0:
      continue
    part = _read_part(path)
    if part is None:
      return f"{path.name} is damaged"
    expected = max(expected, part["num_processes"])
    if p % count != index:
      continue
    for rel, (size, sha) in sorted(part["files"].items()):
      f = step_dir / rel
      if not f.exists():
        return f"{rel} is missing"
      actual = _size(f)
      if actual != size:
        return f"{rel} has {actual} bytes, {size} were written (cut short or appended to)"
      if _sha256(f) != sha:
        return f"{rel} does not match its checksum (bytes changed on disk)"
  if index == 0 and set(parts) != set(range(expected)):
    return _structure_problem(step_dir)
  return None


def _is_disk_full(e: BaseException) -> bool:
  """Whether `e`, or an exception it was raised from, is 'no space left on device' (orbax and
  TensorStore re-raise the OSError of a full disk as other types, keeping its text)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False


# Below this many bytes per replica, a replicated array is written whole by one replica instead of
# in slices by all of them (orbax's "replica-parallel" saving). Orbax slices every replicated
# array by default, each slice one more dispatched (and, per shape, compiled) device operation:
# for a small model that is most of a save. The tests' tiny run on 8 CPU devices cut 558 slices
# per save; its 3 saves took 4.9 s with slicing and 1.7 s without (cProfile, one run each), and
# once compiled a save of such a state takes 0.44x the time (benchmarks/README.md, "Small
# replicated states"). Arrays with larger slices are still written in parallel.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def _whole_small_replicas() -> None:
  """Registers orbax's jax.Array handler with `MIN_REPLICA_SLICE_BYTES` (orbax reads its type
  handlers from one process-wide registry; this replaces only that option of the default)."""
  from orbax.checkpoint._src.metadata import array_metadata_store  # pylint: disable=g-import-not-at-top
  current = ocp.type_handlers.get_type_handler(jax.Array)
  if getattr(current, "_min_slice_bytes_for_replica_parallel", None) == MIN_REPLICA_SLICE_BYTES:
    return  # registered already (orbax logs a warning at every re-registration)
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(
          array_metadata_store=array_metadata_store.Store(),
          min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES), override=True)


class TrainCheckpointer:
  """Training-state checkpoints under `{workdir}/checkpoints/{step}` (orbax CheckpointManager).

  The state is any pytree of jax.Arrays (e.g. {params, opt_state, step, rng}; optax states and
  typed PRNG keys included). Saves are atomic: orbax writes `{step}.orbax-checkpoint-tmp*` and
  renames it when complete, so an interrupted save is never listed or restored; the leftover tmp
  directories of killed runs are deleted at the first save of a TrainCheckpointer (synchronously:
  orbax's own `cleanup_tmp_directories` lists the directory from a background thread while the
  caller goes on, which breaks under file-system mocks such as `tfds.testing.mock_data`).
  Only the newest `max_to_keep` steps are kept (None: all).

  Integrity: once a save is final (at the end of a synchronous `save()`; an asynchronous one at
  the next save, `wait()` or `close()`), every process hashes the files it wrote and writes its
  part of the step's manifest (`write_manifest`), on a background thread: `save()` does not
  wait for the hashing; `wait()`, `close()`, `restore()` and `latest_step()` do (a save that
  would delete a step still being hashed waits for it too).
  `latest_step()` checks the newest steps against their manifests (`verify_step`), each process
  hashing its share of the files; the processes agree on the verdict (one damaged share makes
  the step damaged everywhere): a damaged step is renamed `{step}.corrupt` by process 0 with a
  warning naming it, every process waits for the rename before it lists the steps again, and the
  one before it is used; when none is intact, CorruptCheckpointError names the directories to
  delete. A save that fills the disk raises DiskFullError; the previous checkpoint is
  untouched.

  Every process must call every method — orbax coordinates the processes and writes each array
  shard from the process that holds it, and `latest_step()` and `restore()` exchange the
  verdicts of their checks; do not guard calls by process index.
  """

  def __init__(self, workdir: Union[str, os.PathLike], *, max_to_keep: Optional[int] = 3,
               async_save: bool = False):
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"max_to_keep={max_to_keep}: must be >= 1, or None to keep all steps.")
    workdir = os.fspath(workdir)
    if not _is_remote(workdir):  # orbax needs absolute paths; `--workdir=workdirs/demo` is relative
      workdir = os.path.abspath(workdir)
    self.directory = epath.Path(workdir) / "checkpoints"
    _whole_small_replicas()
    # An explicit registry so that a fresh manager can read a step's metadata before any
    # save/restore (without it `metadata(step).item_metadata` is None).
    registry = ocp.handlers.create_default_handler_registry(
        default=ocp.StandardCheckpointHandler())
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(max_to_keep),
        create=True, enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          handler_registry=registry)
    self._max_to_keep = max_to_keep
    self._tmp_dirs_removed = False  # at the first save: an evaluation never touches them
    self._verified = set()  # steps checked (or saved) by this instance
    self._unfinished = []  # steps saved that orbax has not finished yet
    self._hashing = []  # (step, Future) of the manifest parts being written in the background
    self._hasher = None  # the single thread writing them, started with the first
    self._saving = None  # the step of the save in flight (for the disk-full message)
    self._async = async_save

  def _remove_tmp_dirs(self) -> None:
    """Deletes the `{step}.orbax-checkpoint-tmp*` directories that killed saves left (process 0,
    at this run's first save: no save of this run is in flight, and a run that only reads, such
    as an evaluation next to a training run, never deletes the trainer's save in progress)."""
    if jax.process_index() != 0 or not self.directory.exists():
      return
    for child in self.directory.iterdir():
      if ".orbax-checkpoint-tmp" in child.name and child.is_dir():
        logging.info("Deleting %s, the unfinished save of a stopped run.", child)
        child.rmtree()

  def _step_dir(self, step: int) -> epath.Path:
    return self.directory / str(step)

  def latest_step(self) -> Optional[int]:
    """The newest intact checkpoint's step, or None when there is no checkpoint.

    Newer damaged ones (`verify_step`) are renamed `{step}.corrupt` by process 0 with a warning
    naming them; CorruptCheckpointError when every checkpoint is damaged. With several processes
    every process must call it: they check each step together and return the same step."""
    self._collect(wait=True)
    bad = []
    for step, vouched in self._candidates():
      if vouched:
        break
      reason = self._verify(step)
      if reason is None:
        self._verified.add(step)
        break
      bad.append((step, reason))
    else:
      if bad:
        dirs = " ".join(str(self._step_dir(s)) for s, _ in bad)
        raise CorruptCheckpointError(
            "No intact checkpoint in {}: {}. Delete the damaged step directories to train from "
            "scratch (rm -r {}), or put back intact copies.".format(
                self.directory, "; ".join(f"step {s}: {r}" for s, r in bad), dirs))
      return None
    for s, reason in bad:
      self._quarantine(s, reason, step)
    if bad:
      if jax.process_count() > 1:  # nobody lists the steps again before process 0 renamed
        multihost_utils.sync_global_devices("vit_jax_checkpoint_quarantine")
      self._manager.reload()
    return step

  def _candidates(self):
    """(step, whether this instance saved or verified it) of the steps kept, newest first; with
    several processes, process 0's (broadcast one at a time, so that every process goes through
    the same steps even where their listings differ)."""
    steps = sorted(self._manager.all_steps(), reverse=True)
    for i in itertools.count():
      step = steps[i] if i < len(steps) else -1
      vouched = step in self._verified or step in self._unfinished
      if jax.process_count() > 1:
        step, vouched = (int(v) for v in multihost_utils.broadcast_one_to_all(
            np.array([step, vouched], np.int32)))
      if step < 0:
        return
      yield step, bool(vouched)

  def _verify(self, step: int) -> Optional[str]:
    """`verify_step` of `step`, each process hashing its share of the files; with several
    processes, the first problem any of them found (the same answer on every process)."""
    index, count = jax.process_index(), jax.process_count()
    if count == 1:
      return verify_step(self._step_dir(step))
    try:  # an error here must not leave the other processes waiting for this one's verdict
      reason = verify_step(self._step_dir(step), share=(index, count))
    except Exception as e:  # pylint: disable=broad-except
      reason = f"process {index} could not check it ({type(e).__name__}: {e})"
    mine = np.zeros(_REASON_BYTES, np.uint8)
    text = (reason or "").encode()[:_REASON_BYTES]
    mine[:len(text)] = np.frombuffer(text, np.uint8)
    found = [bytes(r).rstrip(b"\0").decode(errors="replace")
             for r in np.asarray(multihost_utils.process_allgather(mine))]
    return next((r for r in found if r), None)

  def _quarantine(self, step: int, reason: str, fallback: int) -> None:
    """Renames a damaged step directory out of orbax's sight (process 0; the others only warn),
    so that the run resuming from `fallback` can save `step` again."""
    src = self._step_dir(step)
    if jax.process_index() != 0:
      logging.warning("Checkpoint %s is damaged (%s): process 0 moves it aside; resuming from the "
                      "checkpoint of step %d instead.", src, reason, fallback)
      return
    dst, n = self.directory / f"{step}{QUARANTINE}", 1
    while dst.exists():
      dst, n = self.directory / f"{step}{QUARANTINE}-{n}", n + 1
    logging.warning("Checkpoint %s is damaged (%s): moved to %s; resuming from the checkpoint of "
                    "step %d instead. Delete %s when you no longer need it.", src, reason, dst,
                    fallback, dst)
    src.rename(dst)

  def all_steps(self) -> list:
    """Steps of the complete checkpoints kept, ascending."""
    return sorted(self._manager.all_steps())

  def _finish(self, *, hashes: bool = False) -> None:
    """Waits for the save in flight, then starts writing the manifest parts of the finished saves
    on the background thread (with `hashes`, waits for them as well)."""
    with self._disk_full_as_error():
      self._manager.wait_until_finished()
      done = set(self._manager.all_steps())
      for step in self._unfinished:
        if step in done:
          if self._hasher is None:
            self._hasher = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="vit_jax_manifest")
          self._hashing.append((step, self._hasher.submit(
              write_manifest, self._step_dir(step), process_index=jax.process_index(),
              process_count=jax.process_count())))
          self._verified.add(step)
      self._unfinished = []
      self._saving = None
    self._collect(wait=hashes)

  def _collect(self, *, wait: bool) -> None:
    """Raises the error of a manifest part that could not be written; with `wait`, waits for
    those still being written."""
    while self._hashing and (wait or self._hashing[0][1].done()):
      step, future = self._hashing.pop(0)
      self._saving = step
      with self._disk_full_as_error():
        future.result()
      self._saving = None

  @contextlib.contextmanager
  def _disk_full_as_error(self):
    try:
      yield
    except DiskFullError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      if not _is_disk_full(e):
        raise
      kept = [s for s in self._manager.all_steps() if s != self._saving]
      raise DiskFullError(
          errno.ENOSPC,
          f"The disk is full: saving the checkpoint of step {self._saving} in {self.directory} "
          f"failed ({type(e).__name__}). The previous checkpoint "
          f"({'step ' + str(max(kept)) if kept else 'none yet'}) is intact; free some space (or "
          "lower keep_checkpoints) and run the same command again to resume.") from e

  def save(self, step: int, state: PyTree, *, force: bool = False) -> bool:
    """Saves `state` as `step`; returns whether it saved.

    A step that is already saved is skipped (never overwritten), and so, unless `force`, is a step
    below latest_step(). With `async_save` it returns once the arrays are copied off the devices;
    `wait()` blocks until the checkpoint is complete. Either way it returns before the step's
    files are hashed for its manifest (see the class docstring). DiskFullError when the disk
    fills up (here, or for an asynchronous save at the next save, `wait()` or `close()`).
    """
    step = int(step)
    self._finish()
    if not self._tmp_dirs_removed:
      self._remove_tmp_dirs()
      self._tmp_dirs_removed = True
    if step in self._manager.all_steps():  # orbax would raise StepAlreadyExistsError with force
      logging.info("Checkpoint of step %d already in %s; not saving it again.", step,
                   self.directory)
      return False
    if self._max_to_keep is not None:  # orbax deletes the steps beyond the newest max_to_keep
      kept = sorted(set(self._manager.all_steps()) | {step})[-self._max_to_keep:]
      if any(s not in kept for s, _ in self._hashing):
        self._collect(wait=True)
    self._saving = step
    with self._disk_full_as_error():
      saved = self._manager.save(step, args=ocp.args.StandardSave(state), force=force)
    if saved:
      self._unfinished.append(step)
      if not self._async:
        self._finish()
    return saved

  def restore(self, abstract_state: PyTree, step: Optional[int] = None, *,
              shardings: Optional[PyTree] = None) -> PyTree:
    """Restores step `step` (default: the latest intact one, see latest_step) into the structure,
    dtypes and shardings of `abstract_state` (jax.ShapeDtypeStruct leaves with `.sharding`, e.g.
    from `jax.eval_shape`, or arrays), possibly different from the shardings it was saved with.
    `shardings`, a tree of the same structure, replaces the leaves' own.

    Raises FileNotFoundError when there is no such checkpoint, errors.CheckpointError (a
    ValueError) naming every key whose shape differs from the checkpoint's, or that only one of
    them has, and CorruptCheckpointError (naming the directory to delete) when the files are
    damaged or orbax cannot read them.
    """
    self._finish(hashes=True)
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    elif step not in self._manager.all_steps():
      raise FileNotFoundError(f"No checkpoint for step {step} in {self.directory}; "
                              f"available steps: {self.all_steps()}.")
    elif step not in self._verified:
      reason = self._verify(step)
      if reason is not None:
        raise CorruptCheckpointError(
            f"Checkpoint {self._step_dir(step)} is damaged: {reason}. Delete it (rm -r "
            f"{self._step_dir(step)}) or restore another step ({self.all_steps()}).")
      self._verified.add(step)
    if shardings is not None:
      abstract_state = jax.tree_util.tree_map(
          lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
          shardings)
    self._check_shapes(abstract_state, step)
    try:
      return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except Exception as e:  # pylint: disable=broad-except
      first = (str(e).strip().splitlines() or [""])[0][:300]
      raise CorruptCheckpointError(
          f"Checkpoint {self._step_dir(step)} cannot be read ({type(e).__name__}: {first}). If "
          f"its files are damaged, delete it (rm -r {self._step_dir(step)}) and run again: the "
          "run resumes from the checkpoint before it.") from e

  def stored_tree(self, step: int) -> Optional[PyTree]:
    """The tree a step's checkpoint holds, its leaves orbax's array metadata (`.shape`,
    `.dtype`), read without restoring anything; None when orbax cannot read it."""
    stored = self._manager.metadata(step).item_metadata
    return getattr(stored, "tree", stored)

  def _check_shapes(self, abstract_state: PyTree, step: int) -> None:
    """Compares the checkpoint's stored shapes with `abstract_state`'s, naming each mismatch
    (orbax's own error names neither the key nor the tree position)."""
    stored = self.stored_tree(step)
    if stored is None:
      return  # metadata unreadable: leave the checking to orbax
    have = {parallel.leaf_name(p): tuple(m.shape) for p, m in
            jax.tree_util.tree_flatten_with_path(stored, is_leaf=lambda x: hasattr(x, "shape"))[0]}
    want = {parallel.leaf_name(p): _stored_shape(x)
            for p, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    lines = [f"  {k}: checkpoint {have[k]} vs expected {want[k]}"
             for k in sorted(set(have) & set(want)) if have[k] != want[k]]
    lines += [f"  missing from the checkpoint: {k} {want[k]}"
              for k in sorted(set(want) - set(have))]
    lines += [f"  unexpected in the checkpoint: {k} {have[k]}"
              for k in sorted(set(have) - set(want))]
    head = [k for k in set(have) & set(want) if have[k] != want[k] and "head/" in k]
    if head:
      lines.append(f"  ({head[0]} is sized by the data set's class count: the checkpoint's has "
                   f"{have[head[0]][-1]} classes, the data set now {want[head[0]][-1]}. Did its "
                   "class folders or the data set change? Restore them, or use another workdir.)")
    if lines:
      raise errors.CheckpointError(
          f"Checkpoint {self.directory / str(step)} does not match the state to restore into:\n"
          + "\n".join(lines) + "\nBuild the abstract state from the same model and optimizer "
          "config as the run that saved it (to start from other weights, use "
          "npz.load_pretrained), or use another workdir.")

  def wait(self) -> None:
    """Blocks until pending (async) saves are complete and their manifests written."""
    self._finish(hashes=True)

  def close(self) -> None:
    """Waits for pending saves and their manifests, and releases orbax's resources. A failed save
    raises here too (orbax keeps raising its error); the resources are released all the same."""
    try:
      self._finish(hashes=True)
    except Exception:
      try:
        self._manager.close()
      except Exception:  # pylint: disable=broad-except
        pass  # the same failure again: the first one is raised
      raise
    finally:
      if self._hasher is not None:
        self._hasher.shutdown(wait=True)
        self._hasher, self._hashing = None, []
    with self._disk_full_as_error():
      self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
