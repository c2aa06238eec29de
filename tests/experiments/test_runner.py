"""End-to-end tests for experiments/runner.py on a tiny sweep under tfds.testing.mock_data: points
run (in-process and as subprocesses), finished points are skipped, an interrupted point resumes,
the table and plots are written, and --print-commands prints the commands."""
import csv
import json
import os
import shlex
import textwrap

import jax
from jax.experimental.compilation_cache import compilation_cache
import pytest
import tensorflow_datasets as tfds

from experiments import aggregate
from experiments import runner
from experiments import sweep as sweep_lib
from vit_jax import checkpoint
from vit_jax import data as data_lib

TINY = {"model.hidden_size": 16, "model.mlp_dim": 32, "model.num_heads": 2,
        "model.num_layers": 1, "dataset.name": "tfds:mnist", "eval_split": "test[:50]",
        "batch_size": 16, "eval_batch_size": 16, "log_every_steps": 1,
        "checkpoint_every_steps": 2, "eval_every_examples": 48, "lr.warmup_epochs": 0.0,
        "fewshot.shots": (1, 2), "fewshot.train_split": "train", "fewshot.test_split": "test[:50]",
        # tfds.testing.mock_data redirects file writes under /tmp; orbax's background writer
        # thread then misses the directories it made (a crashed run's save fails).
        "checkpoint_async": False}
CONFIG = "configs/fashion_mnist.py:vit"


def tiny_sweep(sizes=(48, 96), extra=()) -> sweep_lib.Sweep:
  """ViT-Mu/7 shrunk to one 16-wide layer, 96 training examples (6 steps of 16) per point."""
  base = sweep_lib.load_config(CONFIG)
  points = []
  for n in sizes:
    over = dict(TINY, train_split=f"train@seeded({n}, seed=0)")
    over.update(sweep_lib.examples_budget(base, "total", 96, n, batch_size=16))
    points.append(sweep_lib.Point(f"vit_n{n}", CONFIG, over, {
        "family": "ViT", "model": "ViT-Mu/7", "train_size": n, "seed": 0}))
  points += list(extra)
  return sweep_lib.Sweep("tiny", points)


@pytest.fixture
def mock_tfds():
  with tfds.testing.mock_data(num_examples=200):
    yield


@pytest.fixture(scope="module", autouse=True)
def compile_once(tmp_path_factory):
  """Every point compiles the same tiny programs: a persistent compilation cache for this module
  lets later points load them (a few seconds per point instead of ~15 on two CPU cores)."""
  keys = ("jax_persistent_cache_min_compile_time_secs", "jax_persistent_cache_min_entry_size_bytes")
  before = {k: getattr(jax.config, k) for k in keys}
  before_dir = jax.config.jax_compilation_cache_dir  # conftest.py's, for the modules after this
  compilation_cache.reset_cache()
  compilation_cache.set_cache_dir(str(tmp_path_factory.mktemp("jax_cache")))
  for k in keys:
    jax.config.update(k, 0)
  yield
  for k, v in before.items():
    jax.config.update(k, v)
  compilation_cache.set_cache_dir(before_dir)
  compilation_cache.reset_cache()


def _train_steps(workdir):
  return [r["step"] for r in aggregate.read_metrics(workdir) if "train_loss" in r]


class _Crash(Exception):
  pass


@pytest.mark.slow  # trains twice: `make test-all`
def test_interrupted_point_resumes(tmp_path, mock_tfds, monkeypatch):
  out = str(tmp_path / "out")
  s = tiny_sweep(sizes=(96,))
  workdir = runner.point_workdir(out, s.points[0])
  original = data_lib.train_iterator

  def crashing(*args, **kwargs):  # The process "dies" once step 5's batch is fetched.
    for i, batch in enumerate(original(*args, **kwargs)):
      if i == 5:
        raise _Crash()
      yield batch
  monkeypatch.setattr(data_lib, "train_iterator", crashing)
  assert runner.run_sweep(s, out, in_process=True, log=lambda _: None) == {"vit_n96": "failed"}
  assert "_Crash" in open(os.path.join(workdir, "log.txt")).read()
  assert aggregate.load_result(workdir) is None
  saved = checkpoint.TrainCheckpointer(workdir).latest_step()
  assert saved == 4  # checkpoints every 2 steps; step 5 never finished

  monkeypatch.setattr(data_lib, "train_iterator", original)
  assert runner.run_sweep(s, out, in_process=True, log=lambda _: None) == {"vit_n96": "finished"}
  steps = _train_steps(workdir)
  assert steps[:4] == [1, 2, 3, 4] and steps[-2:] == [5, 6]  # resumed after step 4
  assert steps.count(1) == 1  # not restarted from scratch
  assert aggregate.load_result(workdir)["steps"] == 6


@pytest.mark.slow  # trains two points: `make test-all`
def test_in_process_sweep_runs_skips_and_aggregates(tmp_path, mock_tfds):
  out = str(tmp_path / "out")
  s = tiny_sweep()
  status = runner.run_sweep(s, out, in_process=True, log=lambda _: None)
  assert status == {"vit_n48": "finished", "vit_n96": "finished"}
  for p in s.points:
    workdir = runner.point_workdir(out, p)
    assert _train_steps(workdir) == [1, 2, 3, 4, 5, 6]
    rows = aggregate.read_metrics(workdir)
    assert [r["step"] for r in rows if "test_accuracy" in r] == [3, 6]  # periodic and final
    final = rows[-1]
    result = aggregate.load_result(workdir)
    assert result["final"]["test_accuracy"] == final["test_accuracy"]
    assert set(result["final"]) >= {"fewshot_1shot_accuracy", "fewshot_2shot_accuracy"}
    assert json.load(open(os.path.join(workdir, "config.json")))["train_split"] == \
        p.overrides["train_split"]

  with open(os.path.join(out, "results.csv")) as f:
    table = list(csv.DictReader(f))
  assert [r["name"] for r in table] == ["vit_n48", "vit_n96"]
  for r, n in zip(table, (48, 96)):
    final = aggregate.read_metrics(runner.point_workdir(out, s.points[0 if n == 48 else 1]))[-1]
    assert (r["family"], r["model"], r["train_size"], r["steps"], r["examples_seen"]) == (
        "ViT", "ViT-Mu/7", str(n), "6", "96.0")
    assert float(r["accuracy"]) == final["test_accuracy"]
    assert float(r["fewshot_2shot_accuracy"]) == final["fewshot_2shot_accuracy"]
    assert int(r["num_params"]) > 0 and float(r["core_hours"]) > 0
  for name in ("accuracy_vs_data.png", "accuracy_vs_compute.png"):
    with open(os.path.join(out, name), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"

  # Rerun: nothing is trained again.
  before = open(os.path.join(runner.point_workdir(out, s.points[0]), "metrics.jsonl")).read()
  assert runner.run_sweep(s, out, in_process=True, log=lambda _: None) == {
      "vit_n48": "done", "vit_n96": "done"}
  assert open(os.path.join(runner.point_workdir(out, s.points[0]), "metrics.jsonl")).read() == \
      before

  # The same name with another definition is refused rather than resumed.
  changed = sweep_lib.Sweep("tiny", [sweep_lib.Point(
      "vit_n48", CONFIG, dict(s.points[0].overrides, seed=1), s.points[0].tags)])
  with pytest.raises(ValueError, match="another definition"):
    runner.run_sweep(changed, out, in_process=True, log=lambda _: None)


def test_print_commands(tmp_path, capsys):
  out = str(tmp_path / "out")
  exp = tmp_path / "exp.py"
  exp.write_text(textwrap.dedent(f"""
      from experiments import sweep
      def get_sweep(arg=None):
        return sweep.Sweep("tiny", [
            sweep.Point("a", "{CONFIG}", {{"seed": int(arg or 0), "model.hidden_size": 16}}),
            sweep.Point("b", "{CONFIG}", {{"train_split": "train@seeded(1000, seed=0)"}})])
      """))
  assert runner.main([f"{exp}:7", f"--out={out}", "--print-commands", "--python=python"]) == 0
  lines = capsys.readouterr().out.strip().split("\n")
  assert lines[0].startswith("# tiny: run from") and len(lines) == 3
  a, b = (shlex.split(line) for line in lines[1:])
  assert a[:5] == ["python", "-m", "vit_jax.main", f"--config={CONFIG}",
                   f"--workdir={os.path.join(out, 'points', 'a')}"]
  assert "--config.seed=7" in a and "--config.train_split=train@seeded(1000, seed=0)" in b
  s = sweep_lib.load_experiment(f"{exp}:7")
  assert sweep_lib._parse_flags(a[3:4] + a[5:]).to_dict() == \
      sweep_lib.build_config(s.points[0]).to_dict()
  assert json.load(open(os.path.join(out, "sweep.json")))["points"][1]["name"] == "b"
  assert runner.main([f"{exp}", f"--out={out}", "--print-commands", "--only=^b$"]) == 0
  assert len(capsys.readouterr().out.strip().split("\n")) == 2
  with pytest.raises(SystemExit):
    runner.main([f"{exp}", f"--out={out}", "--print-commands", "--only=zzz"])
  assert "error: --only='zzz' matches none" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--parallel=0"], "--parallel must be at least 1, got 0"),
    (["--parallel=2", "--in-process"], "--in-process runs one point at a time"),
    ([f"--parallel={len(os.sched_getaffinity(0)) + 1}", "--pin"], "usable cores"),
    (["--only=("], "is not a regular expression"),
])
def test_bad_flags_stop_with_one_line_before_any_work(tmp_path, capsys, flags, message):
  out = tmp_path / "out"
  with pytest.raises(SystemExit) as e:
    runner.main(["experiments/fmnist_data_scaling.py", f"--out={out}", *flags])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert message in err and "Traceback" not in err
  assert not out.exists()  # No plan measured, no sweep.json written.


def test_a_missing_experiment_file_is_named(tmp_path, capsys):
  with pytest.raises(SystemExit):
    runner.main([str(tmp_path / "nope.py"), "--plan"])
  assert f"No experiment file {str(tmp_path / 'nope.py')!r}" in capsys.readouterr().err


@pytest.mark.slow
def test_subprocesses_run_in_parallel_and_a_crash_stays_in_its_point(tmp_path):
  # The children run vit_jax.main under the same mock data, through a two-line launcher.
  launcher = tmp_path / "mock_main.py"
  launcher.write_text(textwrap.dedent("""
      import tensorflow_datasets as tfds
      from absl import app
      from vit_jax import main
      with tfds.testing.mock_data(num_examples=200):
        app.run(main.main)
      """))
  bad = sweep_lib.Point("broken", CONFIG, dict(TINY, model_name="ViT-Nope/7"))
  s = tiny_sweep(sizes=(96,), extra=[bad])
  out = str(tmp_path / "out")
  status = runner.run_sweep(s, out, parallel=2, main=(str(launcher),), log=lambda _: None)
  assert status == {"vit_n96": "finished", "broken": "failed"}
  assert "Unknown ViT variant 'Nope'" in open(
      os.path.join(runner.point_workdir(out, bad), "log.txt")).read()
  assert _train_steps(runner.point_workdir(out, s.points[0])) == [1, 2, 3, 4, 5, 6]
  with open(os.path.join(out, "results.csv")) as f:
    assert [r["name"] for r in csv.DictReader(f)] == ["vit_n96"]


def test_core_slots_split_the_cores_into_disjoint_shares():
  assert runner.core_slots(2, [3, 0, 1, 2]) == [[0, 1], [2, 3]]
  assert runner.core_slots(2, [0, 1, 2]) == [[0, 1], [2]]
  assert runner.core_slots(1, [5, 4]) == [[4, 5]]
  with pytest.raises(ValueError, match="--parallel=3 needs at least 3 usable cores"):
    runner.core_slots(3, [0, 1])


def test_pinned_points_run_on_their_own_cores(tmp_path):
  # The launcher records the affinity it was started with, then exits without training.
  launcher = tmp_path / "affinity_main.py"
  launcher.write_text(textwrap.dedent("""
      import os, sys, time
      workdir = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--workdir=")][0]
      with open(os.path.join(workdir, "cores.txt"), "w") as f:
        f.write(",".join(map(str, sorted(os.sched_getaffinity(0)))))
      time.sleep(1)  # Both points run at once.
      """))
  cores = sorted(os.sched_getaffinity(0))
  if len(cores) < 2:
    pytest.skip("needs two usable cores")
  s = tiny_sweep(sizes=(96, 128))
  out = str(tmp_path / "out")
  runner.run_sweep(s, out, parallel=2, pin=True, main=(str(launcher),), log=lambda _: None,
                   aggregate_results=False)
  seen = sorted(open(os.path.join(runner.point_workdir(out, p), "cores.txt")).read()
                for p in s.points)
  assert seen == sorted(",".join(map(str, c)) for c in runner.core_slots(2, cores))


def test_points_share_a_compilation_cache_unless_the_user_set_one(tmp_path, monkeypatch):
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  env = runner._child_env(str(tmp_path / "out"))
  assert env["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "out" / "jax_cache")
  assert sweep_lib.REPO_ROOT in env["PYTHONPATH"].split(os.pathsep)
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/elsewhere")
  assert runner._child_env(str(tmp_path))["JAX_COMPILATION_CACHE_DIR"] == "/elsewhere"
