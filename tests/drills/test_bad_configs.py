"""Bad config overrides give a named error before anything compiles (tests/drills/bad_configs.py).
"""
import pytest

from tests.drills import bad_configs


def test_every_bad_override_is_named_before_compiling(tmp_path):
  results = bad_configs.sweep(str(tmp_path))
  assert {k: v for k, v in results.items() if v[0] != "named"} == {}
  assert len(results) == len(bad_configs.CASES) >= 30


def test_a_bad_flag_value_is_one_error_line_with_status_2(tmp_path):
  """absl rejects the value before vit_jax.main runs: still one `error:` line and exit 2."""
  verdict, line = bad_configs.try_subprocess(["--config.batch_size=abc"], 1, str(tmp_path))
  assert verdict == "named", line
  assert line == ("error: flag --config.batch_size=abc: invalid literal for int() with base 10: "
                  "'abc'")


@pytest.mark.slow  # a subprocess per case
def test_every_bad_override_is_one_error_line_through_main(tmp_path):
  results = bad_configs.sweep(str(tmp_path), bad_configs.try_subprocess)
  assert {k: v for k, v in results.items() if v[0] != "named"} == {}
