"""Progress: training time leaves out evaluation and saving; img/s and ETA follow from it."""
import pytest

from vit_jax import metrics


class FakeClock:
  def __init__(self):
    self.t = 100.0

  def __call__(self):
    return self.t


def test_progress_excludes_evaluation_time(monkeypatch):
  clock = FakeClock()
  monkeypatch.setattr(metrics.time, "monotonic", clock)
  p = metrics.Progress(first_step=0, total_steps=40, batch_size=8)
  clock.t += 10.0  # 10 steps of training, 1 s each
  m = p.measure(10)
  assert m["img_per_sec"] == pytest.approx(8.0)
  assert m["train_sec"] == pytest.approx(10.0)
  assert m["eta_sec"] == pytest.approx(30.0)
  with p.excluded():  # a 50 s evaluation
    clock.t += 50.0
  clock.t += 5.0  # 10 more steps at 2 steps/s
  m = p.measure(20)
  assert m["img_per_sec"] == pytest.approx(16.0)
  assert m["train_sec"] == pytest.approx(15.0)
  assert m["eta_sec"] == pytest.approx(20 / (20 / 15.0))
  assert m["examples_seen"] == 160
  assert p.train_seconds() == pytest.approx(15.0)
  assert m["core_hours"] == pytest.approx(65.0 / 3600 * p.cores)  # wall clock, evaluation included


def test_core_hours_count_the_cores_the_process_may_use(monkeypatch):
  """A run pinned to one core (`taskset -c 0`) of a 2-core machine counts one core, not two."""
  monkeypatch.setattr(metrics.os, "sched_getaffinity", lambda pid: {0}, raising=False)
  monkeypatch.setattr(metrics.os, "cpu_count", lambda: 2)
  assert metrics.usable_cores() == 1
  assert metrics.Progress(first_step=0, total_steps=1, batch_size=1).cores == 1
  monkeypatch.delattr(metrics.os, "sched_getaffinity")
  assert metrics.usable_cores() == 2


def test_progress_after_resume_counts_from_the_resumed_step(monkeypatch):
  clock = FakeClock()
  monkeypatch.setattr(metrics.time, "monotonic", clock)
  p = metrics.Progress(first_step=30, total_steps=40, batch_size=4)
  clock.t += 2.0
  m = p.measure(35)
  assert m["img_per_sec"] == pytest.approx(5 * 4 / 2.0)
  assert m["examples_seen"] == 35 * 4
  assert m["eta_sec"] == pytest.approx(2.0)


def test_progress_line_names_accuracy_only_when_the_loss_has_one():
  line = metrics.format_progress(5, 10, {"train_loss": 0.5, "train_accuracy": 0.25, "lr": 1e-3,
                                         "img_per_sec": 12.0, "eta_sec": 65})
  assert line == "step 5/10 (50%) loss 0.5000 acc 0.2500 lr 1.00e-03 12 img/s ETA 0:01:05"
  detr = metrics.format_progress(5, 10, {"train_loss": 0.5, "lr": 1e-3})
  assert "acc" not in detr and "nan" not in detr
