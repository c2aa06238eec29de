"""Bad image-folder data: named errors or documented conversions (tests/drills/data.py)."""
import pytest

from tests.drills import data


@pytest.mark.parametrize("name", [n for n in data.DRILLS if n != "class_count_changed"])
def test_bad_data_is_named_or_converted(tmp_path, name):
  assert data.DRILLS[name](str(tmp_path)) == ""


@pytest.mark.slow  # two short training runs
def test_a_changed_class_count_is_named_on_resume(tmp_path):
  assert data.class_count_changed(str(tmp_path)) == ""
