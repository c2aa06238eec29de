"""Split arithmetic: slices, percentages, seeded subsets, host chunks."""
import numpy as np
import pytest

from vit_jax.data import splits

SIZES = {"train": 1000, "test": 333}


def _one(split):
  (part,) = splits.resolve(split, SIZES)
  return part


def test_whole_and_absolute_slices():
  base, idx = _one("train")
  assert base == "train" and np.array_equal(idx, np.arange(1000))
  assert np.array_equal(_one("train[:100]")[1], np.arange(100))
  assert np.array_equal(_one("train[900:]")[1], np.arange(900, 1000))
  assert np.array_equal(_one("train[-10:]")[1], np.arange(990, 1000))
  assert np.array_equal(_one("test[10:-300]")[1], np.arange(10, 33))


def test_percentages_floor():
  assert np.array_equal(_one("test[:10%]")[1], np.arange(33))  # floor(33.3)
  assert np.array_equal(_one("test[10%:20%]")[1], np.arange(33, 66))
  assert np.array_equal(_one("test[-10%:]")[1], np.arange(300, 333))
  assert len(_one("train[:2.5%]")[1]) == 25
  # Consecutive percentage slices tile the split.
  parts = [_one(f"test[{a}%:{a + 25}%]")[1] for a in range(0, 100, 25)]
  assert np.array_equal(np.concatenate(parts), np.arange(333))


def test_seeded_subset_prefix_property():
  small = _one("train@seeded(100, seed=3)")[1]
  large = _one("train@seeded(400, seed=3)")[1]
  assert len(small) == 100 and len(large) == 400
  assert np.all(np.diff(small) > 0)  # sorted, no repeats
  assert set(small) <= set(large)
  other = _one("train@seeded(100, seed=4)")[1]
  assert set(other) != set(small)
  # The subset is drawn from the slice.
  sub = _one("train[500:]@seeded(50)")[1]
  assert sub.min() >= 500 and len(sub) == 50
  assert np.array_equal(sub, _one("train[500:]@seeded(50, seed=0)")[1])
  # The whole slice as a "subset" is the slice.
  assert np.array_equal(_one("test@seeded(333, seed=9)")[1], np.arange(333))


@pytest.mark.parametrize("split, match", [
    ("valid", "Unknown split 'valid'.*'test', 'train'"),
    ("train[:2000]", "out of range.*1000 examples"),
    ("train[50:10]", "selects no examples"),
    ("train[:150%]", "out of range"),
    ("train[a:b]", "Bad slice bound"),
    ("train@seeded(2000)", "asks for 2000 examples out of 1000"),
    ("train@random(10)", "Cannot parse"),
    ("train@seeded(10, sed=1)", "Cannot parse"),
    ("train@seeded(0)", "N >= 1"),
    ("train[1:2:3]", "Cannot parse the slice"),
])
def test_bad_splits_name_the_problem(split, match):
  with pytest.raises(ValueError, match=match):
    _one(split)


def test_concatenated_parts():
  parts = splits.resolve("train[:10]+test[-5:]+train[990:]@seeded(4, seed=1)", SIZES)
  assert [base for base, _ in parts] == ["train", "test", "train"]
  assert np.array_equal(parts[1][1], np.arange(328, 333))
  assert splits.num_examples(parts) == 19
  with pytest.raises(ValueError, match="overlap in 'train'"):
    splits.resolve("train[:10]+train[5:20]", SIZES)


def test_host_chunks_partition_evenly():
  parts = splits.resolve("test[:10%]", SIZES)  # 33 examples
  chunks = [splits.host_chunk(parts, p, 4) for p in range(4)]
  assert [splits.num_examples(c) for c in chunks] == [8, 8, 8, 9]
  assert np.array_equal(np.concatenate([c[0][1] for c in chunks]), np.arange(33))


def test_host_chunks_span_parts():
  parts = splits.resolve("train[:5]+test[:4]", SIZES)
  chunks = [splits.host_chunk(parts, p, 3) for p in range(3)]
  assert [[(b, i.tolist()) for b, i in c] for c in chunks] == [
      [("train", [0, 1, 2])], [("train", [3, 4]), ("test", [0])], [("test", [1, 2, 3])]]
  assert splits.host_chunk(splits.resolve("test[:2]", SIZES), 0, 3) == []
