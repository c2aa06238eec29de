r"""A trained model out of JAX: a TensorFlow SavedModel, a TFLite flat buffer, an ONNX graph.

  python -m vit_jax.export --weights=WORKDIR|SOURCE [--model=NAME] \
      --format=saved_model|tflite|onnx --out=DIR [--batch=N]

--weights is what `vit_jax.predict` reads (`predict.load`: a training workdir of ours, or any
`vit_jax.pretrained.load` source: a zoo name, a Hugging Face directory, an `.npz` with --model).
Every format takes uint8 images (batch, H, W, C) at the model's input size, applies the eval
preprocessing inside the graph (the weights' mean/std, or a workdir's `pp_eval` value range) and
returns float32 `logits` (batch, classes); DETR returns `logits` (batch, queries, classes + 1) and
`boxes` (batch, queries, 4), two named outputs.

How each is made:
- `saved_model`: `jax2tf.convert` (native serialization: the model is one XlaCallModule op holding
  its StableHLO) with the batch dimension polymorphic (`(b, H, W, C)`), the weights as
  tf.Variables; the `serving_default` signature takes `images` (uint8, any batch).
- `tflite`: `tf.lite.TFLiteConverter` from that SavedModel (it lowers the StableHLO to TFLite
  builtin ops); the batch stays dynamic (`Interpreter.resize_tensor_input`) where the converter
  manages it correctly (ViT; checked against JAX), else at a fixed --batch (`to_tflite`).
- `onnx`: tf2onnx's TFLite reader on a TFLite model converted at a fixed batch (--batch, default
  1).
  Why this route:
  * tf2onnx cannot read our SavedModel: it holds the model as an XlaCallModule op, which tf2onnx
    has no converter for (it fails with "Could not infer the attribute type"); and jax2tf in JAX
    0.10 has no non-native (TF-op) serialization left to give it.
  * the direct JAX -> ONNX converter on PyPI, jax2onnx (0.17.1), pins orbax-checkpoint < 0.11.37,
    which would replace the orbax 0.12 that our checkpoints need (and it pulls in equinox,
    dm-pix, netron and orbax-export besides). tf2onnx 1.17, onnx 1.23 and onnxruntime 1.32
    install beside TensorFlow 2.21 and numpy 2.4 without changing anything.
  * the fixed batch: from a TFLite model with a dynamic batch, tf2onnx mis-translates the shape
    arithmetic that the TFLite converter writes for dot_general (ONNX Runtime then fails on a
    Reshape, e.g. (3, 16, 128) to (48, 2048)); at a fixed batch every shape is static.
Families (tests/test_export.py, parity with JAX within TOLERANCE): every family of the registry
exports as a SavedModel and as TFLite (ViT with a dynamic batch, the others at a fixed
--batch); ONNX: ViT, the hybrids, BiT ResNets and DETR. For the others tf2onnx's graph is wrong
(NaN out of ONNX Runtime: Swin, DeiT, CvT, T2T; a Reshape ONNX Runtime rejects: PVT), and
`to_onnx`'s own check against JAX raises errors.UnsupportedError naming the family. An autoregressive ImageTransformer (a
sampler, not an image -> logits function) raises errors.UnsupportedError.
"""
import argparse
import os
import sys
import tempfile
from typing import Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import errors
from vit_jax import predict as predict_lib

FORMATS = ("saved_model", "tflite", "onnx")
SIGNATURE = "serving_default"
INPUT = "images"
# Max abs difference between an exported model's outputs and JAX's that the tests (and the ONNX
# export's own check) accept; measured differences are ~1e-6 (README, "Export").
TOLERANCE = 1e-4
ONNX_OPSET = 17  # tf2onnx 1.17 writes opsets up to 18
_GELU_REGISTERED = []


# ------------------------------------------------------------------------------ the function.
def affine_preprocessing(predictor: predict_lib.Predictor) -> Tuple[np.ndarray, np.ndarray]:
  """(scale, offset), each (C,) float32: the predictor's preprocessing as `pixel * scale +
  offset`, read by applying it to a black and a white image and checked on a random one. Both
  preprocessings we have are of this form ((pixel / 255 - mean) / std, value_range); a pp_eval
  that resizes, crops or otherwise mixes pixels is not, and raises UnsupportedError."""
  h, w = predictor.image_size
  c = predictor.channels
  black = np.zeros((1, h, w, c), np.uint8)
  try:
    zero = np.asarray(predictor.preprocess(black), np.float32)
    white = np.asarray(predictor.preprocess(black + 255), np.float32)
  except Exception as e:  # pylint: disable=broad-except
    raise errors.UnsupportedError(
        f"The eval preprocessing fails on a uint8 batch of the model's size {(h, w, c)} "
        f"({type(e).__name__}: {e}); export needs one that keeps the size.") from None
  if zero.shape != black.shape:
    raise errors.UnsupportedError(
        f"The eval preprocessing turns images of {(h, w, c)} into {zero.shape[1:]}: export "
        "takes images at the model's input size and can only fold a per-pixel affine map "
        "(normalisation, value_range) into the graph; resize the images before calling it.")
  offset, scale = zero[0, 0, 0], (white[0, 0, 0] - zero[0, 0, 0]) / 255.0
  probe = np.random.RandomState(0).randint(0, 256, (1, h, w, c)).astype(np.uint8)
  expected = probe.astype(np.float32) * scale + offset
  got = np.asarray(predictor.preprocess(probe), np.float32)
  if np.abs(got - expected).max() > 1e-4 * max(1.0, float(np.abs(expected).max())):
    raise errors.UnsupportedError(
        "The eval preprocessing is not a per-pixel affine map (pixel * scale + offset per "
        "channel), so it cannot be folded into the exported graph; export supports the "
        "normalisation of published weights and a pp_eval of decode and value_range.")
  return scale.astype(np.float32), offset.astype(np.float32)


def serving_function(predictor: predict_lib.Predictor
                     ) -> Tuple[Callable[[dict, jax.Array], Dict[str, jax.Array]], Tuple[str, ...]]:
  """(fn(variables, uint8 images (B, H, W, C)) -> {name: float32 output}, output names): the
  model in evaluation mode behind its preprocessing; what every format exports."""
  from vit_jax.models import detr  # pylint: disable=g-import-not-at-top
  from vit_jax.models import image_transformer  # pylint: disable=g-import-not-at-top
  model = predictor.model
  if isinstance(model, image_transformer.ImageTransformer):
    raise errors.UnsupportedError(
        "ImageTransformer is an autoregressive generator (logits for every pixel intensity, "
        "sampled pixel by pixel with a cache): it has no image -> logits function to export.")
  scale, offset = affine_preprocessing(predictor)

  def fn(variables, images):
    x = images.astype(jnp.float32) * scale + offset
    out = model.apply(variables, x, train=False)
    if isinstance(model, detr.DETR):
      return {"logits": out["logits"].astype(jnp.float32),
              "boxes": out["boxes"].astype(jnp.float32)}
    return {"logits": out.astype(jnp.float32)}

  return fn, (("logits", "boxes") if isinstance(model, detr.DETR) else ("logits",))


def _tf_module(predictor: predict_lib.Predictor, batch: Optional[int]):
  """A tf.Module holding the weights as tf.Variables and `serve`, the jax2tf-converted serving
  function for uint8 (batch or any, H, W, C)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  fn, _ = serving_function(predictor)
  h, w = predictor.image_size
  c = predictor.channels
  module = tf.Module()
  # Variables, not constants: a large model would pass the 2 GB limit of a GraphDef.
  module.variables_ = tf.nest.map_structure(tf.Variable, jax.device_get(predictor.variables))
  shape = "(b, ...)" if batch is None else None
  converted = jax2tf.convert(fn, polymorphic_shapes=[None, shape], with_gradient=False)
  spec = tf.TensorSpec((batch, h, w, c), tf.uint8, name=INPUT)
  module.serve = tf.function(lambda images: converted(module.variables_, images),
                             input_signature=[spec], autograph=False)
  return module


# ------------------------------------------------------------------------------ the formats.
def to_saved_model(predictor: predict_lib.Predictor, directory: str) -> str:
  """A SavedModel in `directory`: signature `serving_default(images: uint8 (b, H, W, C))`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  module = _tf_module(predictor, batch=None)
  tf.saved_model.save(module, directory,
                      signatures={SIGNATURE: module.serve.get_concrete_function()})
  return directory


def to_tflite(saved_model_dir: str, path: str, *,
              predictor: Optional[predict_lib.Predictor] = None,
              batch: Optional[int] = None) -> str:
  """A TFLite model at `path`: with `batch` None, converted from the SavedModel of
  `to_saved_model` (dynamic batch); with a batch size, converted from `predictor` at that fixed
  batch. The TFLite converter of TF 2.21 cannot lower StableHLO's dynamic_gather, which JAX
  writes for indexing such as `x[:, 0]` and `x[:, ::2]` when the batch is symbolic: such models
  (all but ViT and the hybrids here) raise UnsupportedError asking for a fixed batch. Given
  `predictor`, a dynamic-batch model is checked against JAX first (the hybrids' is wrong and
  raises UnsupportedError too)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if batch is not None:
    return _write(path, _tflite_fixed_batch(predictor, batch))
  converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir, [SIGNATURE])
  try:
    flat = converter.convert()
  except Exception as e:  # pylint: disable=broad-except
    if "dynamic_gather" not in str(e):
      raise
    raise errors.UnsupportedError(
        "The TFLite converter cannot lower this model with a dynamic batch (StableHLO "
        "dynamic_gather, from indexing along other axes of a batch-polymorphic array); export "
        "it at a fixed batch: --batch=N.") from None
  if predictor is not None:
    _check_tflite(predictor, flat)
  return _write(path, flat)


def _check_tflite(predictor: predict_lib.Predictor, flat: bytes):
  """The dynamic-batch TFLite model at batches 1 and 3 against JAX: UnsupportedError when they
  disagree by more than TOLERANCE (the hybrid's dynamic-batch model gives wrong logits, by ~1)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  fn, names = serving_function(predictor)
  h, w = predictor.image_size
  for batch in (1, 3):
    probe = np.random.RandomState(batch).randint(
        0, 256, (batch, h, w, predictor.channels)).astype(np.uint8)
    expected = jax.device_get(jax.jit(fn)(predictor.variables, probe))
    interpreter = tf.lite.Interpreter(model_content=flat)
    interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"], probe.shape)
    interpreter.allocate_tensors()
    got = interpreter.get_signature_runner()(images=probe)
    for name in names:
      diff = float(np.abs(got[name] - expected[name]).max())
      if not diff <= TOLERANCE:
        raise errors.UnsupportedError(
            f"{type(predictor.model).__name__}: the dynamic-batch TFLite model disagrees with "
            f"JAX on {name!r} at batch {batch} (max abs difference {diff:.3g}, allowed "
            f"{TOLERANCE:g}); export it at a fixed batch: --batch=N.")


def _tflite_fixed_batch(predictor: predict_lib.Predictor, batch: int) -> bytes:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if batch < 1:
    raise errors.ConfigError(f"--batch={batch}: a fixed batch size is >= 1.")
  module = _tf_module(predictor, batch=batch)
  converter = tf.lite.TFLiteConverter.from_concrete_functions(
      [module.serve.get_concrete_function()], module)
  return converter.convert()


def to_onnx(predictor: predict_lib.Predictor, path: str, *, batch: int = 1) -> str:
  """An ONNX model at `path` (opset ONNX_OPSET) for uint8 (batch, H, W, C), through a TFLite
  model of that fixed batch and tf2onnx (see the module docstring for why)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    import onnx  # pylint: disable=g-import-not-at-top
    import tf2onnx  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.UnsupportedError(
        f"ONNX export needs tf2onnx and onnx ({e}): pip install -e '.[export]'.") from None
  _, names = serving_function(predictor)
  _register_tflite_gelu()
  flat = _tflite_fixed_batch(predictor, batch)
  with tempfile.TemporaryDirectory() as tmp:
    tflite_path = _write(os.path.join(tmp, "model.tflite"), flat)
    outputs = _tflite_output_tensors(flat)
    proto, _ = tf2onnx.convert.from_tflite(tflite_path, opset=ONNX_OPSET)
  # Name the graph's input and outputs as the SavedModel's signature does.
  rename = {proto.graph.input[0].name: INPUT}
  rename.update({outputs[n]: n for n in names})
  for node in proto.graph.node:
    node.input[:] = [rename.get(i, i) for i in node.input]
    node.output[:] = [rename.get(o, o) for o in node.output]
  for value in list(proto.graph.input) + list(proto.graph.output):
    value.name = rename.get(value.name, value.name)
  onnx.checker.check_model(proto)
  _check_onnx(predictor, proto.SerializeToString(), batch)
  _write(path, proto.SerializeToString())
  return path


def _check_onnx(predictor: predict_lib.Predictor, serialized: bytes, batch: int):
  """ONNX Runtime on a random uint8 batch against JAX: UnsupportedError when they disagree by
  more than TOLERANCE (tf2onnx translates some TFLite graphs wrongly, see the module docstring),
  so that no wrong graph is written."""
  import onnxruntime  # pylint: disable=g-import-not-at-top
  fn, names = serving_function(predictor)
  h, w = predictor.image_size
  probe = np.random.RandomState(0).randint(
      0, 256, (batch, h, w, predictor.channels)).astype(np.uint8)
  expected = jax.device_get(jax.jit(fn)(predictor.variables, probe))
  try:
    session = onnxruntime.InferenceSession(serialized, providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {INPUT: probe})))
  except Exception as e:  # pylint: disable=broad-except  (onnxruntime's own Fail, ...)
    raise errors.UnsupportedError(
        f"{type(predictor.model).__name__}: the ONNX graph that tf2onnx made does not run in "
        f"ONNX Runtime ({type(e).__name__}: {str(e)[:300]}); this family does not export to ONNX "
        "with tf2onnx 1.17. Use --format=saved_model or tflite.") from None
  for name in names:
    diff = float(np.abs(got[name] - expected[name]).max())
    if not diff <= TOLERANCE:  # NaN fails too
      raise errors.UnsupportedError(
          f"{type(predictor.model).__name__}: the ONNX graph that tf2onnx made disagrees with "
          f"JAX on {name!r} (max abs difference {diff:.3g} on a random batch, allowed "
          f"{TOLERANCE:g}); this family does not export to ONNX with tf2onnx 1.17. Use "
          "--format=saved_model or tflite.")


def _register_tflite_gelu():
  """tf2onnx 1.17 has no converter for TFLite's GELU (the TFLite converter fuses the model's
  GELU into one op), and the opsets it writes have no Gelu: spell it out in ONNX ops, as
  x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3)) (= the tanh form) when TFLite's is approximate,
  else x / 2 * (1 + erf(x / sqrt(2)))."""
  if _GELU_REGISTERED:
    return
  from tf2onnx import utils  # pylint: disable=g-import-not-at-top
  from tf2onnx.handler import tfl_op  # pylint: disable=g-import-not-at-top

  @tfl_op("TFL_GELU")
  class _TflGelu:  # pylint: disable=unused-variable

    @classmethod
    def version_1(cls, ctx, node, **kwargs):
      del kwargs
      approximate = bool(node.get_attr_value("approximate", 0))
      x, out = node.input[0], node.output[0]
      shape, dtype = ctx.get_shape(out), ctx.get_dtype(out)
      ctx.remove_node(node.name)
      const = lambda v: ctx.make_const(utils.make_name("gelu_c"),
                                       np.array(v, np.float32)).output[0]
      op = lambda t, *ins, **kw: ctx.make_node(t, list(ins), **kw).output[0]
      if approximate:
        cube = op("Mul", op("Mul", x, x), const(0.044715))
        z = op("Mul", op("Mul", x, op("Add", cube, const(1.0))), const(2 * np.sqrt(2 / np.pi)))
        ctx.make_node("Mul", [x, op("Sigmoid", z)], outputs=[out], shapes=[shape],
                      dtypes=[dtype])
      else:
        erf = op("Erf", op("Mul", x, const(1 / np.sqrt(2))))
        ctx.make_node("Mul", [op("Mul", x, const(0.5)), op("Add", erf, const(1.0))],
                      outputs=[out], shapes=[shape], dtypes=[dtype])

  _GELU_REGISTERED.append(True)


def _tflite_output_tensors(flat: bytes) -> Dict[str, str]:
  """{signature output name: tensor name} of a TFLite model's serving signature."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  interpreter = tf.lite.Interpreter(model_content=flat)
  signature = interpreter._get_full_signature_list()  # pylint: disable=protected-access
  (sig,) = signature.values()
  tensors = {d["index"]: d["name"] for d in interpreter.get_tensor_details()}
  return {name: tensors[index] for name, index in sig["outputs"].items()}


def _write(path: str, data: bytes) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)
  return path


def export(predictor: predict_lib.Predictor, fmt: str, out: str, *,
           batch: Optional[int] = None) -> List[str]:
  """Writes `fmt` into the directory `out`; returns the paths written: `saved_model/` (any
  batch), `model.tflite` (a dynamic batch, converted from a SavedModel written beside it; or
  `batch`) or `model.onnx` (`batch`, default 1)."""
  if fmt not in FORMATS:
    raise errors.ConfigError(f"--format={fmt!r}: choose one of {', '.join(FORMATS)}.")
  os.makedirs(out, exist_ok=True)
  if fmt == "onnx":
    return [to_onnx(predictor, os.path.join(out, "model.onnx"), batch=batch or 1)]
  if fmt == "tflite" and batch is not None:
    return [to_tflite("", os.path.join(out, "model.tflite"), predictor=predictor, batch=batch)]
  saved = to_saved_model(predictor, os.path.join(out, "saved_model"))
  if fmt == "saved_model":
    return [saved]
  return [saved, to_tflite(saved, os.path.join(out, "model.tflite"), predictor=predictor)]


# ------------------------------------------------------------------------------ command line.
def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m vit_jax.export", description=__doc__.split(
      "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--weights", required=True, help="a weights source or a training workdir")
  parser.add_argument("--model", default=None, help="model name for an .npz (e.g. ViT-B/16)")
  parser.add_argument("--format", required=True, choices=FORMATS)
  parser.add_argument("--out", required=True, help="directory to write into")
  parser.add_argument("--batch", type=int, default=None,
                      help="a fixed batch size for tflite (default: dynamic) and onnx (default 1)")
  args = parser.parse_args(argv)
  try:
    predictor = predict_lib.load(args.weights, args.model)
    paths = export(predictor, args.format, args.out, batch=args.batch)
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  h, w = predictor.image_size
  print(f"{args.format}: uint8 images (batch, {h}, {w}, {predictor.channels}) -> "
        f"{', '.join(serving_function(predictor)[1])}")
  for p in paths:
    print(f"  {p}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
