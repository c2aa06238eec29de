"""DETR mAP over several processes (vit_jax/evaluators/detection.py) is the mAP of the whole
split: 2 processes (and 2 simulated ones) give the 1-process numbers.

The "model" is an oracle that reads each canvas's targets and returns DETR outputs from them
(jittered boxes, some wrong classes, scores spread over (0, 1)), a function of the canvas alone, so
that the same canvas gets the same detections in any process; its mAP is well inside (0, 1) and
differs between a process's part of the split and the whole split. The 2-process run starts this
file twice as a script (`--worker`) on localhost over gloo, as tests/test_multihost.py starts
vit_jax.main, and each process runs train.evaluate (loss="detr") as training does.
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import threading

import ml_collections
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM_CLASSES = 10
SPLIT = "val"  # 11 canvases: 1 process has 3 batches of 4 (1 padded row), 2 processes 5 and 6
# canvases in 3 batches of 2 each (1 padded row on process 0)
SIZES = {"train": 4, "val": 11}
BATCH_SIZE = 4
NUM_QUERIES = 8  # > the canvases' 6 objects: 2+ queries per canvas are "no object"


def _source():
  """Canvases over ten synthetic garments (class k: a block of value 20 (k + 1)); no data files."""
  from vit_jax.data import canvases  # pylint: disable=g-import-not-at-top
  images = np.zeros((10, 28, 28), np.uint8)
  for k in range(10):
    images[k, 6:16, 4:20] = 20 * (k + 1)
  return canvases.CanvasSource(images=images, labels=np.arange(10), sizes=SIZES)


def oracle(params, batch):
  """DETR outputs from the batch's targets: query j of an image is its object j (when real), with
  the box jittered by up to 0.01 per coordinate, the class wrong for about one object in five, and
  a score in (0.1, 1); the other queries predict "no object". All of it hashes the object's box,
  so it does not depend on where the canvas sits in the batch or the split."""
  del params
  labels, boxes, mask = (np.asarray(batch[k]) for k in ("labels", "boxes", "mask"))
  b, t = labels.shape
  logits = np.full((b, NUM_QUERIES, NUM_CLASSES + 1), -8.0, np.float32)
  logits[..., NUM_CLASSES] = 8.0
  out_boxes = np.full((b, NUM_QUERIES, 4), 0.5, np.float32)
  h = np.modf(1e3 * np.sin(boxes.astype(np.float64) @ [[12.9, 78.2, 37.7, 91.3],
                                                      [45.1, 3.3, 11.7, 27.9],
                                                      [7.7, 58.3, 2.9, 66.1],
                                                      [31.3, 19.9, 83.5, 5.1]]))[0]
  h = np.abs(h)  # (b, t, 4), pseudo-random in [0, 1) per object
  for i in range(b):
    for j in np.flatnonzero(mask[i]):
      c = labels[i, j] if h[i, j, 0] > 0.2 else (labels[i, j] + 1) % NUM_CLASSES
      p = 0.1 + 0.9 * h[i, j, 1]  # the score: the class probability, "no object" the rest
      logits[i, j] = -30.0
      logits[i, j, c], logits[i, j, NUM_CLASSES] = np.log(p), np.log(1 - p + 1e-6)
      out_boxes[i, j] = boxes[i, j] + 0.01 * (2 * h[i, j, [2, 3, 1, 0]] - 1)
  return {"logits": logits, "boxes": out_boxes}


class _OracleRunner:
  """What train.evaluate takes from a Runner for loss="detr", with the oracle as the model."""
  gather_features = staticmethod(np.asarray)

  def __init__(self):
    from vit_jax import tasks  # pylint: disable=g-import-not-at-top
    self.task = tasks.get(_config())

  def predict(self):
    return oracle


def _config():
  return ml_collections.ConfigDict(dict(
      loss="detr", pp_eval="value_range(-1,1)", eval_batch_size=BATCH_SIZE,
      detr=dict(eos_coef=0.1, class_weight=1.0, bbox_weight=5.0, giou_weight=2.0, aux=True)))


def evaluate_like_training():
  """train.evaluate on SPLIT in this process (of however many)."""
  from vit_jax import train  # pylint: disable=g-import-not-at-top
  return train.evaluate(_OracleRunner(), None, _source(), _config(), SPLIT)


def _evaluator(process_index=None, process_count=None, **kw):
  from vit_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from vit_jax.evaluators import detection  # pylint: disable=g-import-not-at-top
  src = _source()
  return detection.DetectionEvaluator(oracle, lambda: data_lib.eval_iterator(
      src, split=SPLIT, pp="value_range(-1,1)", batch_size=BATCH_SIZE,
      process_index=process_index, process_count=process_count), **kw)


KEYS = ("map", "map50", "map75", "num_classes", "num_images")


def _assert_same(got, want):
  assert set(KEYS) <= set(got)
  np.testing.assert_allclose([got[k] for k in KEYS], [want[k] for k in KEYS], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def one_process():
  """The 1-process result, and that of process 0's part of the split alone (what each process
  reported before the detections were gathered): different, and neither trivial."""
  whole = evaluate_like_training()
  part = _evaluator(0, 2).run(None)  # in this one process there is nothing to gather
  assert whole["num_images"] == 11 and part["num_images"] == 5
  assert 0.3 < whole["map"] < 0.9 and whole["map50"] > whole["map75"] > whole["map"]
  assert abs(part["map"] - whole["map"]) > 1e-3  # 1000 times the tolerance of _assert_same
  return whole


def _simulated_allgathers(n):
  """allgather functions for n threads standing for n processes: each returns (n, ...), the
  arrays all n gave, once all have called it."""
  barrier, slots = threading.Barrier(n, timeout=60), [None] * n

  def make(p):
    def allgather(x):
      slots[p] = np.array(x)
      barrier.wait()
      out = np.stack(slots)
      barrier.wait()  # every thread has read the slots before any overwrites its own
      return out
    return allgather
  return [make(p) for p in range(n)]


def test_two_simulated_processes_give_the_mAP_of_the_whole_split(one_process):
  results = [None, None]

  def run(p, allgather):
    results[p] = _evaluator(p, 2, allgather=allgather).run(None)
  threads = [threading.Thread(target=run, args=(p, g))
             for p, g in enumerate(_simulated_allgathers(2))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  for r in results:
    _assert_same(r, one_process)
    assert r == one_process  # bit for bit: the rows are gathered as bytes, in split order


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow  # two fresh Python processes importing vit_jax.train: ~20 s on the 2-core machine
def test_two_processes_give_the_mAP_of_one(tmp_path, one_process):
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             XLA_FLAGS="--xla_force_host_platform_device_count=2",
             PYTHONPATH=os.pathsep.join([ROOT] + os.environ.get("PYTHONPATH", "").split(
                 os.pathsep)).rstrip(os.pathsep))
  procs = []
  for i in range(2):
    log = open(tmp_path / f"process{i}.log", "w")
    procs.append(subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--worker", f"--process_id={i}",
         "--num_processes=2", f"--port={port}", f"--out={tmp_path / f'result{i}.json'}"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    log.close()
  try:
    for p in procs:
      p.wait(timeout=300)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  logs = [(tmp_path / f"process{i}.log").read_text() for i in range(2)]
  if any(p.returncode for p in procs):
    pytest.fail("\n".join(f"process {i} exited with {p.returncode}:\n{log[-3000:]}"
                          for i, (p, log) in enumerate(zip(procs, logs))))
  for i in range(2):
    got = json.loads((tmp_path / f"result{i}.json").read_text())
    assert got["process_count"] == 2 and got["process_index"] == i
    _assert_same(got, one_process)


def _worker(argv):
  parser = argparse.ArgumentParser()
  parser.add_argument("--worker", action="store_true")
  for name in ("process_id", "num_processes", "port"):
    parser.add_argument(f"--{name}", type=int, required=True)
  parser.add_argument("--out", required=True)
  args = parser.parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  from vit_jax import parallel  # pylint: disable=g-import-not-at-top
  parallel.initialize_distributed({"coordinator_address": f"127.0.0.1:{args.port}",
                                   "num_processes": args.num_processes,
                                   "process_id": args.process_id})
  result = evaluate_like_training()
  result.update(process_index=jax.process_index(), process_count=jax.process_count())
  with open(args.out, "w") as f:
    json.dump(result, f)


if __name__ == "__main__":
  _worker(sys.argv[1:])
