"""Bad data in an image folder: unreadable and truncated files, empty class folders, a class count
that disagrees with a run's checkpoint, grey and RGBA images among RGB ones. Each is a named error
(naming the file or folder) or the documented conversion (sources.image_folder: images decode to
`dataset.channels`), and the other images come out as they are on disk.

  python -m tests.drills.data
"""
import os
import tempfile

import numpy as np
import tensorflow as tf

from vit_jax import data as data_lib
from vit_jax.data import sources

SIZE = 8


def pixels(seed: int, channels: int = 3) -> np.ndarray:
  return np.random.RandomState(seed).randint(0, 256, (SIZE, SIZE, channels)).astype(np.uint8)


def write_png(path: str, image: np.ndarray) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tf.io.write_file(path, tf.io.encode_png(image))


def write_jpeg(path: str, image: np.ndarray) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tf.io.write_file(path, tf.io.encode_jpeg(image, quality=95))


def make_folder(root: str, classes=("cat", "dog", "fox"), per_class: int = 4) -> dict:
  """root/{train,test}/<class>/<i>.png, RGB; {path: pixels} of every image written."""
  written = {}
  for split, n in (("train", per_class), ("test", 2)):
    for c, name in enumerate(classes):
      for i in range(n):
        path = os.path.join(root, split, name, f"{i}.png")
        written[path] = pixels(1000 * c + 10 * i + (split == "test"))
        write_png(path, written[path])
  return written


def read_all(root: str, split: str = "train", channels: int = 3):
  """Every image of `split`, decoded by the evaluation pipeline: (images, labels)."""
  source = sources.image_folder(root, channels=channels)
  images, labels = [], []
  for batch in data_lib.eval_iterator(source, split=split, pp=f"decode|resize({SIZE})", batch_size=4,
                                      process_index=0, process_count=1):
    keep = batch["mask"] > 0
    images.append(batch["image"][keep])
    labels.append(np.argmax(batch["label"][keep], -1))
  return source, np.concatenate(images), np.concatenate(labels)


def _error(fn) -> str:
  try:
    fn()
  except (ValueError, FileNotFoundError) as e:
    return str(e)
  return ""


def unreadable(root):
  make_folder(root)
  bad = os.path.join(root, "train", "dog", "2.png")
  with open(bad, "wb") as f:
    f.write(b"this is not an image" * 10)
  msg = _error(lambda: read_all(root))
  return "" if bad in msg else f"no error naming {bad}: {msg!r}"


def _truncated(root, ext):
  make_folder(root)
  bad = os.path.join(root, "train", "fox", f"1{ext}")
  os.remove(os.path.join(root, "train", "fox", "1.png"))
  (write_jpeg if ext == ".jpg" else write_png)(bad, pixels(7))
  os.truncate(bad, os.path.getsize(bad) // 2)
  msg = _error(lambda: read_all(root))
  return "" if bad in msg else f"no error naming {bad}: {msg!r}"


def truncated_png(root):
  return _truncated(root, ".png")


def truncated_jpeg(root):
  return _truncated(root, ".jpg")


def empty_class_folder(root):
  make_folder(root)
  os.makedirs(os.path.join(root, "train", "emu"))
  msg = _error(lambda: sources.image_folder(root))
  return "" if "emu" in msg else f"no error naming the empty class 'emu': {msg!r}"


def class_missing_from_one_split(root):
  """A class with no test images is a documented case: labels follow the union of the splits'
  class folders, so they agree between splits."""
  written = make_folder(root)
  for f in os.listdir(os.path.join(root, "test", "dog")):
    os.remove(os.path.join(root, "test", "dog", f))
  os.rmdir(os.path.join(root, "test", "dog"))
  source, images, labels = read_all(root, "test")
  want = [written[os.path.join(root, "test", c, f"{i}.png")] for c in ("cat", "fox")
          for i in range(2)]
  if source.num_classes != 3 or list(labels) != [0, 0, 2, 2]:
    return f"classes {source.class_names}, test labels {list(labels)}"
  return "" if np.array_equal(images, np.stack(want)) else "the test images changed"


def grey_and_rgba_among_rgb(root):
  """Grey becomes (v, v, v), RGBA drops its alpha (tf.io.decode_image with channels=3); the RGB
  images are unchanged."""
  written = make_folder(root)
  grey, rgba = pixels(11, 1), pixels(12, 4)
  write_png(os.path.join(root, "train", "cat", "0.png"), grey)
  write_png(os.path.join(root, "train", "dog", "0.png"), rgba)
  _, images, _ = read_all(root)
  want = []
  for c in ("cat", "dog", "fox"):
    for i in range(4):
      path = os.path.join(root, "train", c, f"{i}.png")
      want.append(np.repeat(grey, 3, -1) if (c, i) == ("cat", 0) else
                  rgba[..., :3] if (c, i) == ("dog", 0) else written[path])
  return "" if np.array_equal(images, np.stack(want)) else "decoded pixels differ"


def class_count_changed(root):
  """A run trained on 3 class folders, resumed after a 4th appeared: an error naming the head's
  shapes and the class count, before anything is compiled."""
  from tests.drills import runs  # pylint: disable=g-import-not-at-top
  from vit_jax import train  # pylint: disable=g-import-not-at-top
  make_folder(os.path.join(root, "data"))
  config = runs.get_config()
  config.dataset.name, config.dataset.data_dir = "image_folder", os.path.join(root, "data")
  config.train_split, config.eval_split = "train", ""
  config.pp_train = config.pp_eval = "decode|resize(7)|value_range(-1,1)"
  config.batch_size = config.eval_batch_size = 8  # 1 or 8 devices (report.py has 8)
  config.total_steps, config.checkpoint_async, config.export_npz = 1, False, False
  train.train_and_evaluate(config, os.path.join(root, "run"))
  write_png(os.path.join(root, "data", "train", "gnu", "0.png"), pixels(5))
  config.total_steps = 2
  msg = _error(lambda: train.train_and_evaluate(config, os.path.join(root, "run")))
  return "" if "3 classes, the data set now 4" in msg else f"unclear error: {msg!r}"


DRILLS = dict(unreadable=unreadable, truncated_png=truncated_png, truncated_jpeg=truncated_jpeg,
              empty_class_folder=empty_class_folder,
              class_missing_from_one_split=class_missing_from_one_split,
              grey_and_rgba_among_rgb=grey_and_rgba_among_rgb,
              class_count_changed=class_count_changed)


def run_all(root: str) -> dict:
  return {name: fn(os.path.join(root, name)) for name, fn in DRILLS.items()}


if __name__ == "__main__":
  results = run_all(tempfile.mkdtemp(prefix="data_drills_"))
  for k, v in results.items():
    print(f"  {k}: {'ok' if not v else 'FAILED: ' + v}")
  print(f"bad data named or converted: {sum(not v for v in results.values())}/{len(results)}")
