"""The kill loop (tests/drills/kill_loop.py): killed runs resume to the uninterrupted run's
parameters, bitwise."""
import functools
import os
import signal

import jax
import pytest

from tests.drills import kill_loop
from tests.drills import runs
from vit_jax import parallel
from vit_jax import train

pytestmark = pytest.mark.skipif(not os.path.exists(runs.FASHION_MNIST),
                                reason="Fashion-MNIST files missing (`make data`)")


def reference_in_process(workdir, total_steps):
  """The uninterrupted run here, on one of conftest's 8 devices (the subprocesses have one):
  bitwise the subprocess's result (checked by test_the_kill_loop_survives_many_kills)."""
  config = runs.get_config()
  config.total_steps = total_steps
  with pytest.MonkeyPatch.context() as m:
    m.setattr(parallel, "make_mesh", functools.partial(parallel.make_mesh,
                                                       devices=jax.devices()[:1]))
    train.train_and_evaluate(config, workdir)
  return workdir


def test_a_kill_between_a_checkpoints_files_is_survived_bitwise(tmp_path):
  """One SIGKILL between the files of a save (orbax writing commit_success.txt of step 2 or 3),
  a restart, and the final parameters equal the uninterrupted run's."""
  ref = reference_in_process(str(tmp_path / "reference"), total_steps=6)
  result = kill_loop.kill_loop(str(tmp_path / "run"), 1, sig=signal.SIGKILL, seed=0,
                               reference=ref, total_steps=6, log=lambda s: None)
  assert result["failures"] == []
  assert result["hooks"] == {"metadata": 1}
  assert (result["applied"], result["survived"]) == (1, 1)
  assert result["bitwise_equal"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_the_kill_loop_survives_many_kills(tmp_path, sig):
  """8 kills: for SIGKILL every hook point twice and 4 at random moments; for SIGTERM 8 at random
  moments, each run exiting within kill_loop.TERM_BOUND_S. The reference runs in a subprocess."""
  result = kill_loop.kill_loop(str(tmp_path / "run"), 8, sig=sig, seed=1, log=print)
  assert result["failures"] == []
  assert result["applied"] == result["survived"] == 8
  assert result["bitwise_equal"]
  if sig == signal.SIGKILL:
    assert result["hooks"] == {h: 1 for h in kill_loop.HOOKS}
  else:
    assert len(result["term_exit_s"]) == 8 and max(result["term_exit_s"]) < kill_loop.TERM_BOUND_S
