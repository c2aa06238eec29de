"""Tests for vit_jax/workdirs.py: one loader for evaluation-only mode, predict and the teacher."""
import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tests.test_train import tiny_config
from tests.test_train import trained
from vit_jax import npz
from vit_jax import predict
from vit_jax import train
from vit_jax import workdirs


@pytest.fixture(autouse=True)
def mock_tfds():
  with tfds.testing.mock_data(num_examples=200):
    yield


@pytest.fixture(scope="module")
def runs(shared_run):
  """A finished teacher (ViT, 2 steps) and a student distilled from it (1 step), each kept with
  its checkpoints and exports; made once per session (conftest's `shared_run`)."""
  teacher = shared_run("teacher", trained(tiny_config(total_steps=2)))[0]
  student = shared_run("student", trained(tiny_config(total_steps=1,
                                                      distill__teacher=teacher)))[0]
  return teacher, student


def test_a_distilled_run_is_evaluated_and_predicted_from_its_checkpoint(runs, tmp_path):
  """Its checkpoint holds the frozen teacher; eval-only mode and predict rebuilt the state
  without one and failed on 'unexpected in the checkpoint: teacher/...'."""
  teacher, student = runs
  config = tiny_config(total_steps=1, distill__teacher=teacher)
  evaluated = train.evaluate_checkpoint(config, student)
  # The checkpoint's weights are the exported ones: the same accuracy as the run's own result.
  with open(os.path.join(student, workdirs.COMPLETE)) as f:
    done = __import__("json").load(f)
  assert evaluated["accuracy"] == done["accuracy"]
  run = workdirs.load(student)
  assert run.step == 1
  exported = npz.load_npz(os.path.join(student, "params.npz"))
  np.testing.assert_array_equal(run.variables["params"]["head"]["kernel"],
                                exported["head"]["kernel"])
  p = predict.load(student)
  assert p.model.num_classes == 10 and len(p.class_names) == 10


def test_without_checkpoints_the_exported_weights_are_loaded(runs, tmp_path):
  _, student = runs
  copy = str(tmp_path / "exported")
  shutil.copytree(student, copy)
  shutil.rmtree(os.path.join(copy, "checkpoints"))
  run = workdirs.load(copy)
  assert run.step is None
  np.testing.assert_array_equal(run.variables["params"]["head"]["kernel"],
                                workdirs.load(student).variables["params"]["head"]["kernel"])


def test_a_teacher_of_another_class_count_is_an_error_naming_both(runs, tmp_path):
  """load_pretrained used to re-initialise a head of another count to zeros, and hard
  distillation then targeted class 0: the count is now checked, from the checkpoint and from the
  exported weights."""
  teacher, _ = runs
  with pytest.raises(ValueError, match=r"teacher.* predicts 10 classes, the data set has 5"):
    workdirs.teacher(tiny_config(distill__teacher=teacher), 5, (28, 28, 1))
  exported = str(tmp_path / "exported")
  shutil.copytree(teacher, exported)
  shutil.rmtree(os.path.join(exported, "checkpoints"))
  params = npz.load_npz(os.path.join(exported, "params.npz"))
  params["head"] = dict(kernel=params["head"]["kernel"][:, :5], bias=params["head"]["bias"][:5])
  train.export(params, os.path.join(exported, "params.npz"))  # a 5-class teacher
  with pytest.raises(ValueError, match=r"teacher.* predicts 5 classes, the data set has 10"):
    workdirs.teacher(tiny_config(distill__teacher=exported), 10, (28, 28, 1))


def test_an_unfinished_teacher_is_an_error(runs, tmp_path):
  teacher, _ = runs
  unfinished = str(tmp_path / "unfinished")
  shutil.copytree(teacher, unfinished)
  os.remove(os.path.join(unfinished, workdirs.COMPLETE))
  with pytest.raises(FileNotFoundError, match="has not finished"):
    workdirs.teacher(tiny_config(distill__teacher=unfinished), 10, (28, 28, 1))
  os.makedirs(tmp_path / "empty")
  shutil.copy(os.path.join(teacher, workdirs.CONFIG), tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="without checkpoints or params.npz"):
    workdirs.teacher(tiny_config(distill__teacher=str(tmp_path / "empty")), 10, (28, 28, 1))
