r"""Inference speed of the exported formats beside JAX, in one process.

  python -m benchmarks.export_speed [--models=vit,resnet] [--batch=32] [--rounds=5]

For each of configs/fashion_mnist.py's MODELS named: the model (random weights) is exported by
vit_jax.export as a SavedModel, a TFLite model and an ONNX graph (the last two at the fixed batch
--batch), and the four run the same uint8 batch of Fashion-MNIST-sized images in turns
(harness.interleave): JAX (jax.jit of export.serving_function), the SavedModel's signature (TF
eager call of the loaded signature; XLA inside its XlaCallModule), tf.lite.Interpreter (XNNPACK,
default threads) and ONNX Runtime (CPU provider, default threads). Each reports the median of its
turns, img/s and its speed relative to JAX (> 1: faster than JAX). One JSON line per model and
format, and an `environment` line naming the CPU.
"""
import argparse
import os
import tempfile

import numpy as np

from benchmarks import harness


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default="vit,resnet")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  import onnxruntime  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tests import test_export  # pylint: disable=g-import-not-at-top  (the same test models)
  from vit_jax import export  # pylint: disable=g-import-not-at-top
  harness.emit(dict(kind="environment", cpu_name=harness.cpu_model(), tensorflow=tf.__version__,
                    onnxruntime=onnxruntime.__version__, **harness.environment()))
  for family in args.models.split(","):
    predictor = test_export.make_predictor(family)
    h, w = predictor.image_size
    x = np.random.RandomState(0).randint(0, 256, (args.batch, h, w, 1)).astype(np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
      fn, _ = export.serving_function(predictor)
      jitted = jax.jit(fn)
      saved = export.to_saved_model(predictor, os.path.join(tmp, "saved_model"))
      serve = tf.saved_model.load(saved).signatures[export.SIGNATURE]
      lite = tf.lite.Interpreter(model_path=export.to_tflite(
          "", os.path.join(tmp, "m.tflite"), predictor=predictor, batch=args.batch))
      lite.allocate_tensors()
      runner = lite.get_signature_runner()
      session = onnxruntime.InferenceSession(
          export.to_onnx(predictor, os.path.join(tmp, "m.onnx"), batch=args.batch),
          providers=["CPUExecutionProvider"])
      xt = tf.constant(x)
      fns = {
          "jax": lambda: jax.block_until_ready(jitted(predictor.variables, x)),
          "saved_model": lambda: serve(images=xt)["logits"].numpy(),
          "tflite": lambda: runner(images=x),
          "onnx": lambda: session.run(None, {export.INPUT: x}),
      }
      for f in fns.values():  # compile / warm up
        f()
      times = harness.interleave(fns, args.rounds, close_with="jax")
    base = harness.median(times["jax"])
    for name, ts in times.items():
      t = harness.median(ts)
      harness.emit(dict(kind="export_speed", model=family, format=name, batch=args.batch,
                        median_s=round(t, 5), img_per_s=round(args.batch / t, 1),
                        speed_vs_jax=round(base / t, 3), rounds=len(ts),
                        load_average=harness.load_average()))


if __name__ == "__main__":
  main()
