"""Tests for experiments/cost.py: a point's work is read from its config and data, the plan
multiplies it by each set-up's measured speed (measured once per set-up, cached in plan.json),
finished points cost nothing, and the measurement itself times the trainer's real step."""
import json
import os

import pytest
import tensorflow_datasets as tfds

from experiments import cost
from experiments import sweep as sweep_lib
from tests.experiments.test_runner import TINY, tiny_sweep


@pytest.fixture
def mock_tfds():
  with tfds.testing.mock_data(num_examples=200):
    yield


def test_point_work_counts_steps_and_every_evaluated_example(mock_tfds):
  c = sweep_lib.build_config(tiny_sweep().points[0])
  c.test_split = ""
  # 96 examples of batch 16: 6 steps; evaluation every 48 examples (3 steps): at step 3 and at
  # the end; each evaluates test[:50] and the few-shot probe's train (200) and test[:50] splits.
  assert cost.point_work(c) == {"steps": 6, "eval_examples": 2 * (50 + 200 + 50)}
  c.test_split = "test[:30]"  # evaluated once, at the end
  assert cost.point_work(c)["eval_examples"] == 2 * 300 + 30


def test_plan_measures_each_setup_once_and_skips_finished_points(tmp_path, mock_tfds):
  wide = sweep_lib.Point("wide", "configs/fashion_mnist.py:vit", dict(
      TINY, **{"model.hidden_size": 32, "train_split": "train@seeded(96, seed=0)",
               "total_epochs": 1.0, "test_split": ""}), {})
  points = tiny_sweep(extra=[wide]).points
  calls = []

  def fake_measure(config):
    calls.append(config.model.hidden_size)
    return dict(step_s=float(config.model.hidden_size) / 16, compile_s=10.0, eval_example_s=0.01)

  p = cost.plan(points, str(tmp_path), finished=lambda n: n == "vit_n96",
                measure_fn=fake_measure, log=lambda s: None)
  assert calls == [16, 32]  # the two tiny points share one set-up; the finished one is skipped
  rows = {r["name"]: r for r in p["points"]}
  assert rows["vit_n96"]["seconds"] == 0
  # vit_n48: 6 steps, 2 evaluations of 300 examples and the test split (200) at the end.
  assert rows["vit_n48"]["seconds"] == pytest.approx(10 + 6 * 1.0 + 800 * 0.01)
  # wide: 1 epoch of 96 (6 steps), 2 evaluations, no test split.
  assert rows["wide"]["seconds"] == pytest.approx(10 + 6 * 2.0 + 600 * 0.01)
  assert p["total_seconds"] == pytest.approx(rows["vit_n48"]["seconds"] + rows["wide"]["seconds"])
  assert "2 point(s) to run" in cost.describe(p)
  assert "one point at a time (" in cost.describe(p)
  assert "--parallel=2 overlaps them by an amount not modelled" in cost.describe(p, parallel=2)
  # Cached: a second plan measures nothing.
  cost.plan(points, str(tmp_path), finished=lambda n: False, measure_fn=fake_measure,
            log=lambda s: None)
  assert calls == [16, 32]
  with open(os.path.join(tmp_path, cost.PLAN_FILE)) as f:
    assert len(json.load(f)["rates"]) == 2


def test_measure_times_the_trainers_step(mock_tfds):
  c = sweep_lib.build_config(tiny_sweep().points[0])
  r = cost.measure(c, steps=2)
  assert set(r) == {"step_s", "compile_s", "eval_example_s"}
  assert 0 < r["step_s"] < r["compile_s"] and 0 < r["eval_example_s"] < r["step_s"]
