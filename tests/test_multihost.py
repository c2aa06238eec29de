"""Training on 8 devices, and on 2 processes x 4 devices, gives the 1-device parameters.

In-process runs use the 8 fake CPU devices of conftest.py (the 1-device reference restricts the
mesh to the first one). Multi-process runs start `python -m vit_jax.main --distributed` twice on
localhost (4 fake CPU devices each, gloo collectives); this module is also their config file:
  python -m vit_jax.main --config=tests/test_multihost.py:fsdp,jit --workdir=...
All runs read the same 256 Fashion-MNIST images: the in-memory source gives every process its
rows of the same global batches, so the runs see the same data whatever the process count.
"""
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import common
from vit_jax import checkpoint
from vit_jax import parallel
from vit_jax import train
from vit_jax.data import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.relpath(os.path.abspath(__file__), ROOT)
MODEL_RULES = ((r"MlpBlock_3/Dense_\d/kernel", "model"),
               (r"MultiHeadDotProductAttention_1/(query|key|value)/kernel", (None, "model", None)))


def get_config(arg: str = "dp,jit"):
  """A tiny ViT on 256 Fashion-MNIST images; arg = '{dp|fsdp|tp},{jit|pmap}[,ids][,probe]'. With
  `ids` every process logs the example ids of each batch it takes (`log_example_ids`), with
  `probe` what latest_step() returned and listed (`probe_latest_step`); this module is the config
  file the subprocesses load."""
  kind, mode, *extra = (arg or "dp,jit").split(",")
  if "ids" in extra:
    log_example_ids()
  if "probe" in extra:
    probe_latest_step()
  c = common.base_config()
  c.model_name = "ViT-Mu/7"
  c.model.update(hidden_size=16, mlp_dim=32, num_heads=2, num_layers=1)
  c.dataset.name = "fashion_mnist"
  c.train_split, c.eval_split = "train[:256]", "test[:40]"
  c.pp_train = "decode|random_crop(28, pad=2)|flip_lr|value_range(-1,1)"
  c.pp_eval = "decode|value_range(-1,1)"
  c.mixup = 0.2  # partners across the global batch: the same pairs whatever the process count
  c.batch_size = 32
  c.eval_batch_size = 32  # 2 processes: 20 test images each, in 2 batches of 16 (one padded)
  c.total_steps = 4
  c.log_every_steps = 1
  c.checkpoint_every_steps = 2
  # Momentum SGD: Adam's g / sqrt(v) would amplify rounding in near-zero gradients. A constant
  # rate: a run of 2 steps is then the start of a run of 4, and can be resumed into one.
  c.optax.name = "momentum"
  c.lr.base = 0.1
  c.lr.decay = "constant"
  c.parallel = mode
  if kind == "fsdp":
    c.mesh.data, c.mesh.fsdp = 1, -1
    c.sharding.min_fsdp_size = 256  # shards the kernels and the embedding of this tiny model
  elif kind == "tp":
    c.mesh.data, c.mesh.fsdp, c.mesh.model = -1, 2, 2
    c.sharding.rules = MODEL_RULES
  elif kind != "dp":
    raise ValueError(f"Unknown kind {kind!r}: use dp, fsdp or tp.")
  return c


def log_example_ids(set_attr=setattr):
  """Wraps data.train_iterator so that each batch taken appends {"step", "ids"} (the step it is
  for, 0-based) to WORKDIR/ids.{process count}x.process{P}.jsonl, WORKDIR being
  train_and_evaluate's. In-process,
  pass a MonkeyPatch's setattr so that the wrapping ends with the test."""
  from vit_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  if getattr(data_lib.train_iterator, "logs_ids", False):
    return
  original = data_lib.train_iterator

  def wrapped(source, *, start_step=0, **kwargs):
    path = os.path.join(_current_workdir["dir"],
                        f"ids.{jax.process_count()}x.process{jax.process_index()}.jsonl")
    for i, batch in enumerate(original(source, start_step=start_step, **kwargs)):
      with open(path, "a") as f:
        f.write(json.dumps({"step": start_step + i, "ids": batch["id"].tolist()}) + "\n")
      yield batch
  wrapped.logs_ids = True
  set_attr(data_lib, "train_iterator", wrapped)
  # The workdir: train_and_evaluate's argument, remembered by wrapping it too.
  original_train = train.train_and_evaluate

  def train_and_remember(config, workdir, **kw):
    _current_workdir["dir"] = workdir
    return original_train(config, workdir, **kw)
  set_attr(train, "train_and_evaluate", train_and_remember)


_current_workdir = {}


def probe_latest_step(delay_s: float = 3.0):
  """For the drill of a damaged newest checkpoint, in each process of the run: every
  `latest_step()` appends {"latest", "listed"} (the step it returned, then the steps this
  process lists) to WORKDIR/latest_step.process{P}.jsonl, and the process exits at once (code 3)
  when a step newer than the one returned is still listed: the run would hang at the next save
  of that step (a process that lists it skips the save, the others wait for it), and a raised
  error would wait for JAX's shutdown barrier (300 s). Renaming a damaged step
  directory (`{step}.corrupt`) takes `delay_s` longer, as on a file system that copies a directory
  to rename it (GCS): a process that does not wait for the rename lists the old step."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  cls = type(epath.Path("/"))
  if getattr(cls.rename, "slowed", False):
    return
  rename = cls.rename

  def slow_rename(self, target, *args, **kwargs):
    if checkpoint.QUARANTINE in os.path.basename(str(target)):
      time.sleep(delay_s)
    return rename(self, target, *args, **kwargs)
  slow_rename.slowed = True
  cls.rename = slow_rename
  latest_step = checkpoint.TrainCheckpointer.latest_step

  def probed(self):
    step = latest_step(self)
    listed = self.all_steps()
    path = os.path.join(str(self.directory.parent),
                        f"latest_step.process{jax.process_index()}.jsonl")
    with open(path, "a") as f:
      f.write(json.dumps({"latest": step, "listed": listed}) + "\n")
    if listed and max(listed) != step:
      sys.stderr.write(f"process {jax.process_index()}: latest_step() returned {step}, but the "
                       f"steps listed after it are {listed}\n")
      sys.stderr.flush()
      os._exit(3)
    return step
  checkpoint.TrainCheckpointer.latest_step = probed


def example_ids(workdir, num_processes):
  """{step: ids of the global batch (process 0's rows, then process 1's ...)}, the last record
  of each step winning (a resumed run takes the batches after its checkpoint again)."""
  per_process = []
  for p in range(num_processes):
    steps = {}
    with open(os.path.join(workdir, f"ids.{num_processes}x.process{p}.jsonl")) as f:
      for line in f:
        r = json.loads(line)
        steps[r["step"]] = r["ids"]
    per_process.append(steps)
  return {s: sum((pp[s] for pp in per_process), []) for s in per_process[0]}


pytestmark = pytest.mark.skipif(
    not all(os.path.isfile(os.path.join(sources.FASHION_MNIST_DIR, f))
            for pair in sources.FASHION_MNIST_FILES.values() for f in pair),
    reason=f"Fashion-MNIST files not in {sources.FASHION_MNIST_DIR} (`make data`)")


def assert_params_close(a, b, atol=1e-5):
  assert set(a) == set(b)
  for k in a:
    np.testing.assert_allclose(a[k], b[k], atol=atol, rtol=0, err_msg=k)


def npz_params(workdir):
  with np.load(os.path.join(workdir, "params.npz")) as f:
    return dict(f)


def checkpoint_params(workdir, step):
  """The params of a step's checkpoint as flat numpy arrays, restored on one device."""
  path = os.path.join(workdir, "checkpoints", str(step), "default")
  ckpt = ocp.StandardCheckpointer()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
      ckpt.metadata(path).item_metadata, is_leaf=lambda m: hasattr(m, "shape"))
  params = ckpt.restore(path, target)["params"]
  return {parallel.leaf_name(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The 1-device run of 4 steps (checkpoints of steps 2 and 4): its workdir."""
  workdir = str(tmp_path_factory.mktemp("one_device"))
  one_device = functools.partial(parallel.make_mesh, devices=jax.devices()[:1])
  with pytest.MonkeyPatch.context() as m:
    m.setattr(parallel, "make_mesh", one_device)
    log_example_ids(m.setattr)
    train.train_and_evaluate(get_config("dp,jit"), workdir)
  return workdir


def run_in_process(config, workdir):
  """train_and_evaluate here (8 devices, 1 process), logging the example ids."""
  with pytest.MonkeyPatch.context() as m:
    log_example_ids(m.setattr)
    return train.train_and_evaluate(config, workdir)


# ----------------------------------------------------------------------- 8 devices, 1 process.
@pytest.mark.parametrize("arg", [
    pytest.param("fsdp,jit", marks=pytest.mark.slow),  # with its reference run: `make test-all`
    pytest.param("dp,jit", marks=pytest.mark.slow),  # steps 3-4 of the 2-process test below
    pytest.param("fsdp,pmap", marks=pytest.mark.slow),  # jit == pmap: tests/test_train.py
    pytest.param("tp,jit", marks=pytest.mark.slow),
])
def test_eight_devices_match_one_device(tmp_path, monkeypatch, reference, arg):
  saved = []  # (step, {leaf name: (sharding spec, shard shape)}, bytes per device) of each save
  original_save = checkpoint.TrainCheckpointer.save

  def spy(self, step, state, **kw):
    specs = {parallel.leaf_name(p): (x.sharding.spec, x.addressable_shards[0].data.shape)
             for p, x in jax.tree_util.tree_flatten_with_path(state["params"])[0]}
    saved.append((step, specs, parallel.device_bytes(state["params"])))
    return original_save(self, step, state, **kw)
  monkeypatch.setattr(checkpoint.TrainCheckpointer, "save", spy)

  workdir = str(tmp_path)
  result = train.train_and_evaluate(get_config(arg), workdir)
  assert_params_close(npz_params(workdir), npz_params(reference))
  np.testing.assert_allclose(result["loss"], metrics(reference)[-1]["test_loss"], atol=1e-5)

  assert [s for s, _, _ in saved] == [2, 4]
  step, specs, per_device = saved[-1]
  total = sum(v.nbytes for v in npz_params(reference).values())
  mlp = "Transformer/encoderblock_0/MlpBlock_3"
  kind = arg.split(",")[0]
  if kind == "dp":
    assert all(spec == jax.sharding.PartitionSpec() for spec, _ in specs.values())
    assert set(per_device.values()) == {total}
  elif kind == "fsdp":
    # Saved sharded (and, under jit, trained sharded: the step's in and out shardings).
    assert specs[f"{mlp}/Dense_0/kernel"] == (jax.sharding.PartitionSpec(None, "fsdp"), (16, 4))
    assert specs["embedding/kernel"][1] == (7, 7, 1, 2)
    assert specs["head/kernel"] == (jax.sharding.PartitionSpec(), (16, 10))  # 160 < 256
    assert len(per_device) == 8 and max(per_device.values()) < 0.3 * total
  else:  # tp: the MLP split over 'model', the rest replicated (min_fsdp_size 2**14)
    assert specs[f"{mlp}/Dense_1/kernel"] == (jax.sharding.PartitionSpec("model", None), (16, 16))
    assert specs["head/kernel"][0] == jax.sharding.PartitionSpec()


# --------------------------------------------------------------------- 2 processes x 4 devices.
def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_processes(arg, workdir, *flags, num_processes=2, config=CONFIG):
  """`python -m vit_jax.main --distributed` as processes 0..n-1 of one run on localhost, with
  `config` (default: this module) as the config file."""
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  os.makedirs(workdir, exist_ok=True)
  procs = []
  for i in range(num_processes):
    log = open(f"{workdir}.process{i}.log", "w")
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "vit_jax.main", "--distributed", f"--config={config}:{arg}",
         f"--workdir={workdir}", f"--config.distributed.coordinator_address=127.0.0.1:{port}",
         f"--config.distributed.num_processes={num_processes}",
         f"--config.distributed.process_id={i}", *flags],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    procs[-1].log_path = log.name
    log.close()
  return procs


def wait_for(procs, timeout=540):
  """Waits for every process; fails with the end of their logs unless all exit with 0."""
  deadline = time.monotonic() + timeout
  try:
    for p in procs:
      p.wait(timeout=max(1, deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
      p.wait()
  logs = [open(p.log_path).read() for p in procs]
  if any(p.returncode != 0 for p in procs):
    pytest.fail("\n".join(f"process {i} exited with {p.returncode}:\n{log[-3000:]}"
                          for i, (p, log) in enumerate(zip(procs, logs))))
  return logs


def run_processes(arg, workdir, *flags):
  procs = start_processes(arg, workdir, *flags)
  return procs, wait_for(procs)


def assert_only_process_0_wrote(workdir, procs, steps):
  rows = metrics(workdir)
  assert [r["step"] for r in rows if "train_loss" in r] == steps  # one row per step, not two
  events = [f for f in os.listdir(workdir) if f.startswith("events.out.tfevents")]
  assert len(events) == 1 and f".{procs[0].pid}." in events[0], events  # TensorBoard


@pytest.mark.slow  # two processes, then one: ~80 s with its reference run (`make test-all`)
def test_two_processes_fsdp_checkpoint_resumes_in_one_process(tmp_path, reference):
  """2 processes train 2 steps with FSDP over all 8 devices; 1 process restores their sharded
  checkpoint (on its own data-parallel mesh) and trains on to step 4: the 1-device result."""
  workdir = str(tmp_path / "run")
  procs, logs = run_processes("fsdp,jit,ids", workdir, "--config.total_steps=2")
  assert "test accuracy" in logs[0] and "test accuracy" not in logs[1]  # printed by process 0
  assert_params_close(npz_params(workdir), checkpoint_params(reference, 2))
  assert_only_process_0_wrote(workdir, procs, [1, 2])
  final_eval = metrics(workdir)[-1]
  assert final_eval["test_num_examples"] == 40  # every test image once, across both processes

  # One process evaluates the 2-process checkpoint: the same numbers.
  evaluated = train.evaluate_checkpoint(get_config("dp,jit"), workdir)
  assert evaluated["num_examples"] == 40
  np.testing.assert_allclose(evaluated["accuracy"], final_eval["test_accuracy"])
  np.testing.assert_allclose(evaluated["loss"], final_eval["test_loss"], atol=1e-5)

  run_in_process(get_config("dp,jit"), workdir)
  assert_params_close(npz_params(workdir), npz_params(reference))
  assert [r["step"] for r in metrics(workdir) if "train_loss" in r] == [1, 2, 3, 4]
  # Every step took exactly the examples of the uninterrupted 1-process run, mixup partners
  # included (the parameters above would differ otherwise).
  want, two, one = example_ids(reference, 1), example_ids(workdir, 2), example_ids(workdir, 1)
  assert [two[s] for s in (0, 1)] == [want[s] for s in (0, 1)]
  assert [one[s] for s in (2, 3)] == [want[s] for s in (2, 3)]


@pytest.mark.slow
def test_one_process_checkpoint_resumes_in_two_pmap_processes(tmp_path, reference):
  """The 1-device run's checkpoint of step 2, resumed by 2 processes in pmap mode."""
  workdir = str(tmp_path / "run")
  shutil.copytree(os.path.join(reference, "checkpoints", "2"),
                  os.path.join(workdir, "checkpoints", "2"))
  procs, _ = run_processes("dp,pmap,ids", workdir)
  assert_params_close(npz_params(workdir), npz_params(reference))
  assert [r["step"] for r in metrics(workdir) if "train_loss" in r] == [3, 4]
  want, two = example_ids(reference, 1), example_ids(workdir, 2)
  assert [two[s] for s in (2, 3)] == [want[s] for s in (2, 3)]
  np.testing.assert_allclose(metrics(workdir)[-1]["test_loss"], metrics(reference)[-1]["test_loss"],
                             atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("arg", ["dp,jit", "fsdp,pmap"])
def test_two_processes_match_one_device(tmp_path, reference, arg):
  workdir = str(tmp_path / "run")
  procs, _ = run_processes(arg, workdir)
  assert_params_close(npz_params(workdir), npz_params(reference))
  assert_only_process_0_wrote(workdir, procs, [1, 2, 3, 4])
  for key in ("test_accuracy", "test_loss", "test_num_examples"):
    np.testing.assert_allclose(metrics(workdir)[-1][key], metrics(reference)[-1][key], atol=1e-5)


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
  workdir = str(tmp_path / "run")
  procs = start_processes("dp,jit", workdir, "--config.total_steps=100000",
                          "--config.checkpoint_every_steps=100000")
  deadline = time.monotonic() + 400
  path = os.path.join(workdir, "metrics.jsonl")
  while not (os.path.exists(path) and open(path).read().count("\n") >= 2):
    assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no progress"
    time.sleep(0.5)
  os.kill(procs[1].pid, signal.SIGTERM)  # only process 1 is told
  logs = wait_for(procs, timeout=150)
  stopped = int(logs[0].split("stopped at step ")[1].split(";")[0])
  assert 2 <= stopped < 100000
  assert checkpoint.TrainCheckpointer(workdir).latest_step() == stopped
  for log in logs:
    assert f"saved the checkpoint of step {stopped} in" in log


@pytest.mark.slow  # two 2-process runs: 35-40 s here idle, 64 s with a cold compilation cache
def test_two_processes_agree_on_a_damaged_newest_checkpoint(tmp_path):
  """Issue 34, items 10 and 11. A 2-process FSDP run saves steps 2 and 4, each process writing
  the manifest part of its own files. A byte of step 4 that process 1 wrote is flipped; both
  processes, restarted, must agree that step 4 is damaged (only process 1 hashes that file), and
  process 0 must have renamed it before either lists the steps again (the rename is slowed down
  by 3 s: `probe_latest_step`). Both resume from step 2 and end with the uninterrupted run's
  parameters."""
  workdir = str(tmp_path / "run")
  no_test_split = "--config.test_split="  # the full test split at the end: minutes, not tested
  run_processes("fsdp,jit", workdir, no_test_split)
  step_dir = os.path.join(workdir, "checkpoints", "4")
  parts = {p: json.load(open(os.path.join(step_dir, name)))["files"]
           for p, name in ((0, checkpoint.MANIFEST), (1, "vit_jax_manifest.process1.json"))}
  files = {os.path.relpath(os.path.join(r, f), step_dir) for r, _, fs in os.walk(step_dir)
           for f in fs if not f.startswith("vit_jax_manifest")}
  own = {f for f in files if "ocdbt.process_1/" in f or f.endswith("array_metadatas/process_1")}
  assert set(parts[1]) == own and set(parts[0]) == files - own
  shards = [f for f in own if "/d/" in f]
  assert shards, f"process 1 wrote no array data: {sorted(files)}"
  uninterrupted = npz_params(workdir)

  path = os.path.join(step_dir, max(shards, key=lambda f: os.path.getsize(
      os.path.join(step_dir, f))))
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    data[len(data) // 2] ^= 0x5A
    f.seek(0)
    f.write(data)
  run_processes("fsdp,jit,probe", workdir, no_test_split,
                "--config.distributed.heartbeat_timeout_seconds=10")
  for p in (0, 1):
    with open(os.path.join(workdir, f"latest_step.process{p}.jsonl")) as f:
      assert json.loads(f.readline()) == {"latest": 2, "listed": [2]}, f"process {p}"
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "4.corrupt"]
  assert_params_close(npz_params(workdir), uninterrupted)
  assert [r["step"] for r in metrics(workdir) if "train_loss" in r][-2:] == [3, 4]
