"""Tiny training runs in subprocesses, and this module as their config file.

  python -m vit_jax.main --config=tests/drills/runs.py:ARG --workdir=DIR

The config: a 1-layer ViT on 512 in-memory Fashion-MNIST images, batch 16, a checkpoint every step
(asynchronous, on real files, the last 2 kept), one device (XLA_FLAGS: the parent's compiler flags only). ARG may be `swin` (a tiny Swin-T instead) or `procs` (see processes.py), and may name a point
at which the process SIGKILLs itself (`die=EVENT@STEP`), so that a kill lands exactly inside a
checkpoint save:
  metadata  orbax writes the arrays' `_METADATA` (the array files of the step are written)
  commit    orbax writes `commit_success.txt` (between the step's files)
  rename    orbax renames the finished temporary directory (the step is not yet final)
  manifest  the manifest is written under its temporary name, not yet renamed (the step is final)
The hook patches etils' Path class in that subprocess only.
"""
import os
import signal
import subprocess
import sys
import time

from configs import common

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = "tests/drills/runs.py"
EVENTS = ("metadata", "commit", "rename", "manifest")
FASHION_MNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"


def get_config(arg: str = ""):
  for part in filter(None, (arg or "").split(",")):
    key, _, value = part.partition("=")
    if key == "die":
      event, _, step = value.partition("@")
      die_at(event, int(step))
    elif key not in ("swin", "procs"):
      raise ValueError(f"Unknown drill arg {part!r}: use die=EVENT@STEP ({', '.join(EVENTS)}), "
                       "swin or procs.")
  c = common.base_config()
  c.model_name = "ViT-Mu/7"
  c.model.update(hidden_size=16, mlp_dim=32, num_heads=2, num_layers=1, dropout_rate=0.1)
  if "swin" in (arg or "").split(","):  # a tiny Swin: 7x7 map at the first stage
    c.model_name = "Swin-T"
    c.model = dict(embed_dim=8, depths=(1, 1), num_heads=(1, 1), img_size=28)
  c.dataset.name = "fashion_mnist"
  c.dataset.tfds_fallback = False
  c.train_split, c.eval_split = "train[:512]", ""
  c.pp_train = "decode|random_crop(28, pad=2)|flip_lr|value_range(-1,1)"
  c.pp_eval = "decode|value_range(-1,1)"
  c.batch_size = c.eval_batch_size = 16
  c.total_steps = 12
  c.log_every_steps = 1
  c.checkpoint_every_steps = 1
  c.keep_checkpoints = 2
  c.checkpoint_async = True
  if "procs" in (arg or "").split(","):  # tests/drills/processes.py: 2 processes, 1 device each
    c.distributed.heartbeat_timeout_seconds = 10
    c.checkpoint_every_steps = 2
  c.optax.name = "adamw"
  c.lr.base = 1e-3
  c.lr.warmup_steps = 2
  return c


def die_at(event: str, step: int) -> None:
  """SIGKILLs this process at `event` of the checkpoint save of `step` (see the docstring)."""
  if event not in EVENTS:
    raise ValueError(f"Unknown event {event!r}: use one of {', '.join(EVENTS)}.")
  from etils import epath  # pylint: disable=g-import-not-at-top
  cls = type(epath.Path("/"))
  tmp = f"/{step}.orbax-checkpoint-tmp"

  def hit(path, name):
    path = str(path)
    if event == "metadata":
      return name == "write_text" and tmp in path and path.endswith("/_METADATA")
    if event == "commit":
      return name == "write_text" and tmp in path and path.endswith("/commit_success.txt")
    if event == "rename":
      return name == "rename" and path.endswith(tmp)
    return name == "replace" and f"/{step}/vit_jax_manifest.json.tmp" in path

  for name in ("write_text", "rename", "replace"):
    original = getattr(cls, name)

    def wrapped(self, *args, _original=original, _name=name, **kwargs):
      if hit(self, _name):
        os.kill(os.getpid(), signal.SIGKILL)
      return _original(self, *args, **kwargs)
    setattr(cls, name, wrapped)


def compile_flags() -> str:
  """This process's XLA_FLAGS without the device count: the compiler options (tests/conftest.py
  sets the optimisation level), which a subprocess must share for its results to be bitwise
  those of a run in this process."""
  return " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                  if not f.startswith("--xla_force_host_platform_device_count"))


def env(**extra):
  """One CPU device (this process's compiler flags), quiet TensorFlow, and the tests' persistent
  compilation cache."""
  out = {**os.environ, "XLA_FLAGS": compile_flags(), "JAX_PLATFORMS": "cpu",
         "TF_CPP_MIN_LOG_LEVEL": "3"}
  out.setdefault("JAX_COMPILATION_CACHE_DIR",
                 os.path.join(ROOT, ".pytest_cache", "jax_compilation_cache"))
  out.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  out.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
  out.update(extra)
  return out


def main_args(workdir: str, arg: str = "", *overrides: str):
  return [sys.executable, "-m", "vit_jax.main", f"--config={CONFIG}:{arg}",
          f"--workdir={workdir}", "--progress_every_secs=1000", *overrides]


def start(workdir: str, arg: str = "", *overrides: str, log_path=None) -> subprocess.Popen:
  """`python -m vit_jax.main` on this module's config, in the background; output to log_path."""
  log = open(log_path or f"{workdir}.log", "a")
  p = subprocess.Popen(main_args(workdir, arg, *overrides), cwd=ROOT, env=env(), stdout=log,
                       stderr=subprocess.STDOUT, start_new_session=True)
  log.close()
  p.log_path = log.name
  return p


def run(workdir: str, arg: str = "", *overrides: str, timeout: float = 300):
  """Runs to the end; (return code, output)."""
  p = subprocess.run(main_args(workdir, arg, *overrides), cwd=ROOT, env=env(),
                     capture_output=True, text=True, timeout=timeout)
  return p.returncode, p.stdout + p.stderr


def params(workdir: str) -> dict:
  """The exported final params.npz as {name: array}."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  with np.load(os.path.join(workdir, "params.npz")) as f:
    return dict(f)


def bitwise_equal(a: dict, b: dict) -> bool:
  return set(a) == set(b) and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and
                                  a[k].tobytes() == b[k].tobytes() for k in a)


def trained_steps(workdir: str) -> int:
  """The last step in metrics.jsonl (0 before the first)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = f.read().splitlines()
  import json  # pylint: disable=g-import-not-at-top
  steps = [json.loads(l).get("step", 0) for l in lines if l.strip().endswith("}")]
  return max(steps, default=0)


def wait_until(predicate, timeout: float, proc=None, poll: float = 0.02) -> bool:
  """Polls `predicate` until true (True), `timeout` passes or `proc` exits (False)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return True
    if proc is not None and proc.poll() is not None:
      return predicate()
    time.sleep(poll)
  return False
