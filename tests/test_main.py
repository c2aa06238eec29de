"""Tests for vit_jax/main.py: the command line's errors name what is wrong."""
import json
import os
import shlex
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One device (conftest.py gives this process, and its children, 8), compiled at LLVM level 0 as
# the rest of the suite is (conftest.py: no checked result changes; the README commands test
# compiles 3 models).
ONE_DEVICE = {"XLA_FLAGS": "--xla_backend_optimization_level=0"}


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


# ------------------------------------------------------ a bug is not a user error (issue 34.13).
CONFIG = os.path.relpath(os.path.abspath(__file__), ROOT)


def get_config(arg: str = "bug"):
  """This module is also a config file: test_multihost's tiny run with an injected bug of ours,
  a ValueError that is no user error (`bug`: in train_and_evaluate; `bug_on_1`: on process 1
  only, when it takes its 3rd training batch, the other process then waiting in the step)."""
  from tests import test_multihost  # pylint: disable=g-import-not-at-top
  from vit_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from vit_jax import train  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  def bug(*a, **kw):
    raise ValueError("an internal bug")
  if arg == "bug":
    train.train_and_evaluate = bug
  elif arg == "bug_on_1":
    original = data_lib.train_iterator

    def train_iterator(*a, **kw):
      for i, batch in enumerate(original(*a, **kw)):
        if i == 2 and jax.process_index() == 1:
          bug()
        yield batch
    data_lib.train_iterator = train_iterator
  config = test_multihost.get_config("dp,jit")
  config.total_steps = 1000
  config.checkpoint_every_steps = 1000
  return config


def test_a_bug_keeps_its_traceback(tmp_path):
  """main.py used to turn every ValueError into a one-line user error, internal bugs included."""
  p = run_main(f"--config={CONFIG}:bug", f"--workdir={tmp_path}", env=ONE_DEVICE)
  assert p.returncode == 1
  assert "Traceback" in p.stderr and "ValueError: an internal bug" in p.stderr
  assert "error: an internal bug" not in p.stderr


def test_a_bug_on_one_process_stops_both_at_once(tmp_path):
  """Process 1 fails with a bug while process 0 waits for it in a training step: both exit
  within 60 s (they used to hang in jax.distributed's shutdown barrier until its 300-s
  timeout), process 1 with the traceback."""
  from tests import test_multihost  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  procs = test_multihost.start_processes("bug_on_1", workdir, config=CONFIG)
  deadline, exited = time.monotonic() + 240, {}
  while len(exited) < 2 and time.monotonic() < deadline:
    exited.update({i: time.monotonic() for i, p in enumerate(procs)
                   if i not in exited and p.poll() is not None})
    time.sleep(0.2)
  for p in procs:
    p.kill()
    p.wait()
  logs = [open(p.log_path).read() for p in procs]
  assert "ValueError: an internal bug" in logs[1] and "Traceback" in logs[1], logs[1][-3000:]
  assert sorted(exited) == [0, 1], f"still running: {logs[0][-2000:]}\n{logs[1][-2000:]}"
  assert procs[1].returncode == 1 and procs[0].returncode != 0
  assert abs(exited[0] - exited[1]) < 60
