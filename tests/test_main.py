"""Tests for vit_jax/main.py: the command line's errors name what is wrong."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args, timeout=180):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.run([sys.executable, "-m", "vit_jax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_misspelt_config_key_is_named(tmp_path):
  p = run_main("--config=configs/fashion_mnist.py:vit", f"--workdir={tmp_path}",
               "--config.lr.bsae=0.1")
  assert p.returncode != 0
  assert "bsae" in p.stderr


def test_unknown_model_name_lists_known(tmp_path):
  p = run_main("--config=configs/fashion_mnist.py:vit", f"--workdir={tmp_path}",
               "--config.model_name=ViT-Q/7")
  assert p.returncode == 2
  assert "Unknown ViT variant 'Q'" in p.stderr


def test_missing_data_dir_is_named(tmp_path):
  missing = str(tmp_path / "no_such_dir")
  p = run_main("--config=configs/fashion_mnist.py:vit", f"--workdir={tmp_path / 'w'}",
               f"--config.dataset.data_dir={missing}")
  assert p.returncode == 2
  assert missing in p.stderr
