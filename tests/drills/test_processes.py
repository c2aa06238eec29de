"""A process of a two-process run killed: the other exits, naming it, within a bound; a restart of
both resumes (tests/drills/processes.py)."""
import os

import pytest

from tests.drills import processes
from tests.drills import runs


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(runs.FASHION_MNIST), reason="`make data`")
def test_a_killed_process_is_reported_and_both_resume(tmp_path):
  r = processes.drill(str(tmp_path / "run"))
  assert r["problems"] == []
  assert r["survivor_rc"] != 0 and r["names_process"], r["error"]
  assert r["exit_s"] < processes.EXIT_BOUND_S
  assert r["finished"] and r["resumed_from"] >= 2
