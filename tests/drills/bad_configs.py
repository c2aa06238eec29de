"""Bad config overrides: each must give a named error (a vit_jax.errors.UserError, such as a
ConfigError, whose message names the key, raised by this project's code) before anything is compiled; never a traceback from
inside JAX, Flax or TensorFlow.

  python -m tests.drills.bad_configs [--subprocess]

In-process, each case goes the way `python -m vit_jax.main` goes (flag parsing, checked_config,
then train_and_evaluate) with a listener counting compilations. `--subprocess` also runs each
through `python -m vit_jax.main` and checks its exit status (2) and its one-line `error:`.
"""
import os
import subprocess
import sys
import tempfile
import traceback

from absl import flags

from tests.drills import runs
from vit_jax import errors

# (name, overrides, text the error must contain, devices[, config arg]). On 28x28 images: ViT
# patch 7, width 16, 2 heads; the `swin` config's first stage has a 7x7 map (patch 4).
CASES = [
    ("int given text", ["--config.batch_size=abc"], "batch_size", 1),
    ("float given text", ["--config.lr.base=fast"], "lr.base", 1),
    ("bool given text", ["--config.checkpoint_async=maybe"], "checkpoint_async", 1),
    ("model int given text", ["--config.model.hidden_size=wide"], "model.hidden_size", 1),
    ("model tuple given an int", ["--config.model.patch_size=7"], "model.patch_size", 1),
    ("model float given text", ["--config.model.dropout_rate=high"], "model.dropout_rate", 1),
    ("unknown key", ["--config.lr.bsae=0.1"], "lr.bsae", 1),
    ("unknown model field", ["--config.model.hiden_size=32"], "hiden_size", 1),
    ("unknown model name", ["--config.model_name=ViT-Q/7"], "ViT-Q/7", 1),
    ("patch does not divide the image", ["--config.model.patch_size=(5,5)"], "patch_size", 1),
    ("heads do not divide the width", ["--config.model.num_heads=3"], "num_heads", 1),
    ("window larger than the feature map", ["--config.model.window_size=9"], "window_size", 1,
     "swin"),
    ("Swin heads not dividing a stage", ["--config.model.num_heads=(3,1)"], "num_heads", 1,
     "swin"),
    ("batch not divisible by the devices", ["--config.batch_size=12"], "batch_size=12", 8),
    ("eval batch not divisible by the devices", ["--config.eval_batch_size=20"],
     "eval_batch_size=20", 8),
    ("grad accumulation not dividing the batch", ["--config.grad_accum_steps=3"],
     "grad_accum_steps", 1),
    ("negative total", ["--config.total_steps=-5"], "total_steps", 1),
    ("negative checkpoint interval", ["--config.checkpoint_every_steps=-1"],
     "checkpoint_every_steps", 1),
    ("negative warm-up", ["--config.lr.warmup_steps=-2"], "lr.warmup_steps", 1),
    ("zero batch", ["--config.batch_size=0"], "batch_size", 1),
    ("keep no checkpoints", ["--config.keep_checkpoints=0"], "keep_checkpoints", 1),
    ("unknown data set", ["--config.dataset.name=imagenet"], "imagenet", 1),
    ("unknown TFDS data set", ["--config.dataset.name=tfds:no_such_data_set"],
     "no_such_data_set", 1),
    ("pp op typo", ["--config.pp_train=decode|random_crop(28)|flip_lrr"], "flip_lrr", 1),
    ("pp argument typo", ["--config.pp_eval=decode|value_range(-1,1"], "pp_eval", 1),
    ("pp keyword typo", ["--config.pp_train=decode|random_crop(28, pda=2)"], "pda", 1),
    ("split typo", ["--config.train_split=trian[:10]"], "trian", 1),
    ("lr decay typo", ["--config.lr.decay=cosin"], "cosin", 1),
    ("optimizer typo", ["--config.optax.name=adamm"], "adamm", 1),
    ("label smoothing out of range", ["--config.label_smoothing=1.5"], "label_smoothing", 1),
    ("mesh larger than the devices", ["--config.mesh.data=3"], "mesh", 1),
    ("parallel mode typo", ["--config.parallel=pjit"], "pjit", 1),
]

_COMPILE_EVENTS = ("/jax/compilation_cache/compile_requests_use_cache",
                   "/jax/compilation_cache/cache_misses")


class _Compiles:
  """Counts compilations (and persistent-cache lookups, which stand for one) while active."""

  def __enter__(self):
    import jax.monitoring  # pylint: disable=g-import-not-at-top
    self.count = 0
    self._event = lambda event, **kw: self._hit(event in _COMPILE_EVENTS)
    self._duration = lambda event, _, **kw: self._hit(
        event == "/jax/core/compile/backend_compile_duration")
    jax.monitoring.register_event_listener(self._event)
    jax.monitoring.register_event_duration_secs_listener(self._duration)
    return self

  def _hit(self, yes):
    self.count += bool(yes)

  def __exit__(self, *exc):
    import jax.monitoring  # pylint: disable=g-import-not-at-top
    jax.monitoring.unregister_event_listener(self._event)
    jax.monitoring.unregister_event_duration_listener(self._duration)


def _ours(tb) -> bool:
  """Whether the innermost frame of a traceback is this project's (or absl's flag parser's)."""
  frames = traceback.extract_tb(tb)
  return bool(frames) and "site-packages" not in frames[-1].filename


def try_in_process(overrides, devices: int, workdir: str, arg: str = ""):
  """('named', message) | ('unnamed', traceback text) | ('compiled first', message) |
  ('accepted', '') for one case, the way vit_jax.main runs it."""
  from vit_jax import main as main_lib  # pylint: disable=g-import-not-at-top
  from vit_jax import train  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  fv = flags.FlagValues()
  main_lib.define_config_flag(fv)
  argv = ["main", f"--config={runs.CONFIG}:{arg}", *overrides]
  saved_argv, sys.argv = sys.argv, argv  # config_flags finds the overrides in sys.argv
  try:
    with _Compiles() as compiles:
      fv(argv)
      config = main_lib.checked_config(fv)
      mesh_devices = jax.devices()[:devices]
      from vit_jax import parallel  # pylint: disable=g-import-not-at-top
      original = parallel.make_mesh
      parallel.make_mesh = lambda cfg=None, devices=None: original(cfg, devices=mesh_devices)
      original_count = jax.device_count
      jax.device_count = lambda *a: len(mesh_devices)
      try:
        train.train_and_evaluate(config, workdir)
      finally:
        parallel.make_mesh, jax.device_count = original, original_count
  except (flags.Error, errors.UserError) as e:
    if compiles.count:
      return "compiled first", f"{type(e).__name__}: {e}"
    if not _ours(e.__traceback__) and not isinstance(e, flags.Error):
      return "unnamed", "".join(traceback.format_exception(e))
    return "named", f"{type(e).__name__}: {e}"
  except Exception as e:  # pylint: disable=broad-except
    return "unnamed", "".join(traceback.format_exception(e))
  finally:
    sys.argv = saved_argv
  return "accepted", ""


def try_subprocess(overrides, devices: int, workdir: str, arg: str = ""):
  """('named', the error line) when `python -m vit_jax.main` exits with 2 and one `error:` line
  without a traceback, else ('unnamed', its stderr)."""
  env = runs.env(XLA_FLAGS=f"{runs.compile_flags()} "
                          f"--xla_force_host_platform_device_count={devices}")
  p = subprocess.run(runs.main_args(workdir, arg, *overrides), cwd=runs.ROOT, env=env,
                     capture_output=True, text=True, timeout=300)
  errors = [l for l in p.stderr.splitlines() if l.startswith("error: ")]
  if p.returncode == 2 and len(errors) == 1 and "Traceback" not in p.stderr:
    return "named", errors[0]
  return "unnamed", f"exit {p.returncode}:\n{p.stderr[-2000:]}"


def sweep(root: str, how=try_in_process, cases=CASES, log=None) -> dict:
  """{case name: (verdict, message)}; a 'named' verdict whose message lacks the case's expected
  text becomes 'vague'."""
  out = {}
  for i, (name, overrides, expect, devices, *arg) in enumerate(cases):
    verdict, msg = how(overrides, devices, os.path.join(root, str(i)), *arg)
    if verdict == "named" and expect not in msg:
      verdict = "vague"
    out[name] = (verdict, msg)
    if log:
      log(f"  {name}: {verdict}: {msg.strip().splitlines()[0] if msg.strip() else ''}")
  return out


def count(results: dict) -> str:
  named = sum(v == "named" for v, _ in results.values())
  return f"bad configs named: {named}/{len(results)}"


if __name__ == "__main__":
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"  # before jax is imported
  import logging as std_logging  # pylint: disable=g-import-not-at-top
  std_logging.getLogger("absl").setLevel(std_logging.ERROR)
  how = try_subprocess if "--subprocess" in sys.argv else try_in_process
  results = sweep(tempfile.mkdtemp(prefix="bad_configs_"), how, log=print)
  print(count(results) + (" (through python -m vit_jax.main)" if how is try_subprocess else ""))
