"""A save that fills the disk leaves the previous checkpoint intact (tests/drills/disk_full.py)."""
import pytest

from tests.drills import disk_full


@pytest.mark.parametrize("async_save", [False, True])
@pytest.mark.parametrize("use_tmpfs", [True, False])
def test_disk_full_keeps_the_previous_checkpoint(tmp_path, async_save, use_tmpfs):
  problem, kind = disk_full.drill(str(tmp_path), async_save, use_tmpfs)
  assert problem == ""
  if not use_tmpfs:
    assert kind == "patched write"
