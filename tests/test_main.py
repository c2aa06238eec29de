"""Tests for vit_jax/main.py: the command line's errors name what is wrong."""
import json
import os
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_DEVICE = {"XLA_FLAGS": ""}  # (conftest.py gives this process, and its children, 8)


def run_main(*args, timeout=180, env=None):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
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


def stderr_lines(p):
  return [l for l in p.stderr.splitlines() if l.strip()]


def test_a_user_error_is_one_plain_line_and_verbose_shows_the_traceback(tmp_path):
  p = run_main("--config=configs/fashion_mnist.py:vit", f"--workdir={tmp_path}",
               "--config.totl_epochs=1")
  assert p.returncode == 2
  lines = stderr_lines(p)
  assert len(lines) <= 2 and "Traceback" not in p.stderr, p.stderr
  assert "--config.totl_epochs: unknown config key. Did you mean total_epochs" in lines[0]
  p = run_main("--config=configs/fashion_mnist.py:vit", f"--workdir={tmp_path}",
               "--config.totl_epochs=1", "--verbose")
  assert p.returncode != 0 and "Traceback" in p.stderr


def test_eval_batch_size_the_devices_do_not_divide_is_named_before_training(tmp_path):
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  p = run_main("--config=configs/fashion_mnist.py:vit", f"--workdir={tmp_path / 'w'}",
               "--config.eval_batch_size=100", env=env)
  assert p.returncode == 2
  assert "eval_batch_size=100 is not divisible by mesh.data x mesh.fsdp = 8" in p.stderr
  assert not os.path.exists(tmp_path / "w")  # before anything was written


def test_help_lists_the_config_files_and_where_keys_are_documented():
  p = run_main("--help")  # (absl exits with 1 after printing the help)
  for name in ("configs/fashion_mnist.py", "configs/finetune.py", "configs/imagenet_scratch.py",
               "configs/common.py", "allow_config_change", "verbose"):
    assert name in p.stdout, name
  assert "`vit`" in p.stdout and "`hybrid`" in p.stdout  # the args of fashion_mnist.py


def _readme_commands():
  """The `python -m vit_jax.main` commands of the README's 'Using it' section, as written."""
  with open(os.path.join(ROOT, "README.md")) as f:
    text = f.read()
  section = text.split("## Using it", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
  commands = []
  for line in section.replace("\\\n", " ").splitlines():
    line = line.split("#", 1)[0].strip()
    if line.startswith("python -m vit_jax.main"):
      commands.append(shlex.split(line)[3:])
  return commands


@pytest.mark.skipif(not os.path.exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"),
                    reason="Fashion-MNIST files missing: apt-get install dataset-fashion-mnist")
def test_the_readme_commands_run_as_written(tmp_path):
  """Each command of 'Using it', on 64 training images (one step per epoch) and 200 test images;
  the workdirs under tmp_path. Also: quiet logs, and a finished run rerun changes nothing."""
  commands = _readme_commands()
  assert len(commands) == 4 and commands[0] == ["--help"]
  small = ["--config.train_split=train[:64]", "--config.eval_split=test[:200]",
           "--config.eval_batch_size=100", "--progress_every_secs=1000"]
  for args in commands[1:]:
    args = [a.replace("workdirs/", f"{tmp_path}/") for a in args]
    p = run_main(*args, *small, timeout=400, env=ONE_DEVICE)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "test accuracy:" in p.stdout
    # Quiet: no INFO line from another library (orbax, TFDS ...), progress at first and last step.
    info = [l for l in stderr_lines(p) if l.startswith("I")]
    assert all(("main.py" in l or "train.py" in l) for l in info), info
    if "--mode=eval" not in args:
      assert sum("step " in l and "ETA" in l for l in info) == 2
  steps = [json.loads(l)["step"] for l in open(tmp_path / "fmnist_vit" / "metrics.jsonl")]
  assert steps[-1] == 5  # 5 epochs of one step
  lr_run = [json.loads(l) for l in open(tmp_path / "fmnist_vit_lr" / "metrics.jsonl")]
  assert lr_run[-1]["step"] == 2  # 2 epochs of one step
  # The first command again: complete, nothing written.
  before = open(tmp_path / "fmnist_vit" / "metrics.jsonl").read()
  p = run_main(*[a.replace("workdirs/", f"{tmp_path}/") for a in commands[1]], *small,
               env=ONE_DEVICE)
  assert p.returncode == 0 and "already complete at step 5" in p.stdout
  assert open(tmp_path / "fmnist_vit" / "metrics.jsonl").read() == before
