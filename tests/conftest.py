"""Test set-up: 8 fake CPU devices (must happen before jax is imported anywhere), and training
runs shared by the tests of a session (`shared_run`)."""
import functools
import json
import os
import shutil

import pytest

# Compiling, not running, is most of the suite's time (its models are tiny): LLVM's optimisation
# level 0 compiles about a quarter faster (measured on test_pvt/cvt/swin with an empty cache: 158 ->
# 118 s) and changes no result the tests check (the torch parity tests pass under it).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # as vit_jax/__init__.py says why
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# CPU devices only (libtpu, installed for vit_jax.plan, would otherwise look for a TPU and warn).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same tiny models: a persistent compilation cache (keyed by the HLO, so
# never stale) shared by this session and the subprocesses it starts.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                   ".pytest_cache", "jax_compilation_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def _shared_run(tmp_path_factory, key: str, build):
  """(workdir, result) of a training run made once per test session and shared by every
  pytest-xdist worker: `build(workdir)` runs it (returning train_and_evaluate's result, a JSON
  dict) the first time any worker asks for `key`; the others wait on a file lock and read it. The
  directory lies in the session's temporary root, common to the workers. Tests must not change
  it: copy it first (shutil.copytree) to run in it again."""
  import filelock  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # the session's root, above each worker's own
  workdir = root / f"shared_run_{key}"
  done = root / f"shared_run_{key}.json"
  with filelock.FileLock(str(root / f"shared_run_{key}.lock")):
    if not done.exists():
      if workdir.exists():
        shutil.rmtree(workdir)  # a build that failed half-way
      result = build(str(workdir))
      done.write_text(json.dumps(result, default=float))
  return str(workdir), json.loads(done.read_text())


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory):
  """`shared_run(key, build) -> (workdir, result)`: see `_shared_run`."""
  return functools.partial(_shared_run, tmp_path_factory)


def random_variables_of(model, *args, **kwargs):
  """Variables shaped as `model.init(key, *args, **kwargs)`'s without running (or compiling) the
  random initialisers -- on XLA:CPU an eager PVT or DETR init took 30-36 s on a loaded 2-core
  machine, eval_shape under 1 s: LayerNorm/BatchNorm scales 1 + N(0, 0.05^2), BatchNorm running
  means 0 and variances 1, everything else N(0, 0.05^2); deterministic (numpy seed 0)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args, **kwargs))
  rng = np.random.default_rng(0)

  def fill(path, s):
    last = getattr(path[-1], "key", None)
    if last == "mean" and path[0].key == "batch_stats":
      return jnp.zeros(s.shape, s.dtype)
    if last == "var" and path[0].key == "batch_stats":
      return jnp.ones(s.shape, s.dtype)
    base = 1.0 if last == "scale" else 0.0
    return jnp.asarray(base + 0.05 * rng.normal(size=s.shape), s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


# The quick suite's longest tests (minutes each with an empty compilation cache), run first: the
# pytest-xdist workers take tests in collection order and steal from each other's queues, so a
# long test collected last keeps one worker busy while the others have run out of work (a
# fresh-clone run ended with 10 minutes of one worker running three of these alone).
LONG_TESTS = ("test_a_batchnorm_run_exports_and_evaluates_the_ema_statistics",
              "test_a_distilled_run_is_evaluated_and_predicted_from_its_checkpoint",
              "test_the_readme_commands_run_as_written",
              "test_the_notebook_runs_with_tiny_parameters",
              "test_trains_evaluates_resumes_and_samples",
              "test_tiny_sasa_resnet_trains_on_fashion_mnist_sized_images")


def pytest_collection_modifyitems(items):
  items.sort(key=lambda item: item.name not in LONG_TESTS)  # stable: the rest keep their order
