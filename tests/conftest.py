"""Test set-up: 8 fake CPU devices (must happen before jax is imported anywhere)."""
import os

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
