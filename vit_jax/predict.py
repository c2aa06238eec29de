r"""Top-5 predictions for your own images, and what the model attends to.

  python -m vit_jax.predict --weights=SOURCE [--model=NAME] [--labels=imagenet|imagenet21k|FILE] \
      [--attention_dir=DIR] IMAGE...

SOURCE is anything `vit_jax.pretrained.load` takes (an `.npz` with --model, a Hugging Face
directory, a zoo name) or a training workdir of ours (its config.json and latest checkpoint; its
class names come from its data set). Images are read with PIL, converted to the model's channels,
resized (bilinear) to its input size and normalised as the weights expect (a workdir: its
`pp_eval` string). They run in batches of --batch_size; a file that cannot be read is reported by
name and the others still run (exit status 1 then).

--attention_dir writes, per image, PNGs over the image:
- ViT/DeiT (hybrids too): `*_rollout.png`, attention rollout (Abnar & Zuidema, 2020): per layer
  the head-averaged attention plus the identity (the residual), rows renormalised, multiplied
  from the first layer to the last; shown is the class token's row over the patch grid (a model
  without a class token, classifier 'gap'/'map': the mean over all query rows). `*_head{h}.png`:
  the last layer's attention of the class token (or the mean query) for each head.
- Swin: not a rollout (windows change between blocks and stages): the attention each token
  receives in the first, unshifted block of the last stage, averaged over the queries of its
  window (`*_rollout.png`: also over heads; `*_head{h}.png`: per head).
- BiT ResNets have no attention: no maps, a note on stderr.
and `*_grid.png`: the image, the rollout and the per-head maps side by side.
Attention weights come from the `intermediates/attention_weights` that `layers.Attention` sows
when that collection is mutable.
"""
import argparse
import dataclasses
import os
import sys
from typing import Any, Callable, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import errors
from vit_jax import pretrained
from vit_jax.models import resnet
from vit_jax.models import swin
from vit_jax.models import vit


@dataclasses.dataclass
class Predictor:
  """A model ready for images: variables, input size, preprocessing, class names."""
  model: Any
  variables: dict
  image_size: Tuple[int, int]
  channels: int
  preprocess: Callable[[np.ndarray], np.ndarray]  # uint8 (B, H, W, C) -> float32 model input
  class_names: Optional[Tuple[str, ...]]


def _normalise(mean, std, channels):
  mean = np.asarray(mean[:channels], np.float32)
  std = np.asarray(std[:channels], np.float32)
  return lambda x: ((x.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)


def load(source: str, model: Optional[str] = None) -> Predictor:
  """A Predictor for `source`: a training workdir, or any `pretrained.load` source."""
  from vit_jax import workdirs  # pylint: disable=g-import-not-at-top
  if workdirs.is_workdir(source):
    return _load_workdir(source)
  info = pretrained.load_with_info(source, model=model)
  return Predictor(info.model, {"params": info.params}, info.image_size, info.channels,
                   _normalise(info.mean, info.std, info.channels), info.class_names)


def _load_workdir(workdir: str) -> Predictor:
  """The run in `workdir` (workdirs.load: its latest checkpoint, or its exported weights), its
  preprocessing from `pp_eval` and its class names from its data set."""
  from vit_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from vit_jax import workdirs  # pylint: disable=g-import-not-at-top
  from vit_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  run = workdirs.load(workdir)
  config, shape = run.config, run.image_shape
  source = data_lib.get_source(config.dataset)
  ops = [op for op in preprocess.parse(config.pp_eval, channels=shape[-1])
         if op.name not in ("decode", "decode_and_crop")]

  def pp(images: np.ndarray) -> np.ndarray:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    u = tf.zeros((images.shape[0], preprocess.num_random(ops)), tf.float32)
    return preprocess.apply(ops, tf.constant(images), u).numpy()

  return Predictor(run.model, run.variables, shape[:2], shape[-1], pp, tuple(source.class_names))


# ------------------------------------------------------------------------------ predictions.
def read_image(path: str, size: Tuple[int, int], channels: int) -> np.ndarray:
  """uint8 (H, W, C) at `size`; ValueError naming the file when it cannot be read."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as im:
      im = im.convert("L" if channels == 1 else "RGB")
      if im.size != (size[1], size[0]):
        im = im.resize((size[1], size[0]), Image.BILINEAR)
      x = np.asarray(im, np.uint8)
  except Exception as e:  # pylint: disable=broad-except
    raise errors.DataError(f"{path}: cannot read the image ({type(e).__name__}: {e})") from None
  return x[..., None] if x.ndim == 2 else x


def predict(predictor: Predictor, paths: Sequence[str], *, batch_size: int = 32,
            top: int = 5) -> List[dict]:
  """One dict per path: {path, probs (K,), top [(class, name, prob)], image (uint8)} or
  {path, error}."""
  results, good = [], []
  for path in paths:
    try:
      results.append({"path": path, "image": read_image(path, predictor.image_size,
                                                        predictor.channels)})
      good.append(results[-1])
    except errors.DataError as e:
      results.append({"path": path, "error": str(e)})
  apply = jax.jit(lambda v, x: jax.nn.softmax(predictor.model.apply(v, x, train=False), -1))
  for start in range(0, len(good), batch_size):
    chunk = good[start:start + batch_size]
    x = predictor.preprocess(np.stack([r["image"] for r in chunk]))
    pad = batch_size - len(chunk) if len(good) > batch_size else 0  # one compiled shape
    x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x
    probs = np.asarray(apply(predictor.variables, jnp.asarray(x)))[:len(chunk)]
    for r, p in zip(chunk, probs):
      order = np.argsort(-p)[:top]
      r["probs"] = p
      r["top"] = [(int(i), _name(predictor.class_names, i), float(p[i])) for i in order]
  return results


def _name(names, i) -> str:
  return names[i] if names is not None and i < len(names) else f"class {i}"


# ------------------------------------------------------------------------------ attention maps.
def _is_vit(model) -> bool:
  return isinstance(model, vit.VisionTransformer)


def _prefix_tokens(model) -> int:
  if getattr(model, "distilled", False):
    return 2
  return int(model.classifier == "token")


def _attention_weights(intermediates, prefix: Tuple[str, ...]) -> List[np.ndarray]:
  """The sown attention weights under `prefix`, in block order, each (B, H, N, N)."""
  flat = jax.tree_util.tree_flatten_with_path(intermediates)[0]
  found = []
  for path, leaf in flat:
    keys = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
    if keys[:len(prefix)] == prefix and "attention_weights" in keys:
      found.append((keys, np.asarray(leaf)))
  out = []
  for keys, w in sorted(found, key=lambda kw: _block_index(kw[0])):
    out.extend(list(w) if w.ndim == 5 else [w])  # scanned: (L, B, H, N, N)
  return out


def _block_index(keys) -> int:
  for k in keys:
    if isinstance(k, str) and k.startswith(("encoderblock_", "blocks_")):
      return int(k.split("_")[-1])
  return 0


def attention_maps(predictor: Predictor, x: np.ndarray) -> Optional[dict]:
  """{'rollout': (B, h, w), 'heads': (B, H, h, w), 'what': str} on the model's token grid for the
  preprocessed batch `x`; None for models without attention (ResNets)."""
  model = predictor.model
  if isinstance(model, resnet.ResNet):
    return None
  run = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"])[1])
  inter = jax.device_get(run(predictor.variables, jnp.asarray(x))["intermediates"])
  b, height, width = x.shape[:3]
  if _is_vit(model):
    weights = _attention_weights(inter, ("Transformer",))
    p = _prefix_tokens(model)
    n = weights[0].shape[-1]
    eye = np.eye(n, dtype=np.float64)
    rollout = np.broadcast_to(eye, (b, n, n))
    for w in weights:
      a = w.astype(np.float64).mean(1) + eye
      rollout = (a / a.sum(-1, keepdims=True)) @ rollout
    last = weights[-1].astype(np.float64)
    if p:
      roll, heads = rollout[:, 0, p:], last[:, :, 0, p:]
      what = "class-token"
    else:
      roll, heads = rollout[:, :, p:].mean(1), last[:, :, :, p:].mean(2)
      what = "mean-query"
    g = n - p
    gh = int(round(np.sqrt(g * height / width)))
    gw = g // gh
    return {"rollout": roll.reshape(b, gh, gw), "heads": heads.reshape(b, -1, gh, gw),
            "what": f"attention rollout ({what} row); last layer per head"}
  if isinstance(model, swin.SwinTransformer):
    stages = len(tuple(model.depths))
    w = _attention_weights(inter, (f"layers_{stages - 1}", "blocks_0"))[0]  # (B*nW, H, N, N)
    win = int(round(np.sqrt(w.shape[-1])))
    h, wd = -(-height // model.patch_size), -(-width // model.patch_size)
    for _ in range(stages - 1):
      h, wd = (h + 1) // 2, (wd + 1) // 2
    hp, wp = h + (-h % win), wd + (-wd % win)
    received = w.astype(np.float64).mean(2)  # (B*nW, H, N): averaged over the window's queries
    received = received.transpose(0, 2, 1).reshape(-1, win, win, received.shape[1])
    grid = swin.window_reverse(received, win, hp, wp)[:, :h, :wd]  # (B, h, w, H)
    heads = grid.transpose(0, 3, 1, 2)
    return {"rollout": heads.mean(1), "heads": heads,
            "what": "Swin: attention received in the last stage's first block (not a rollout)"}
  return None


def _overlay(ax, image: np.ndarray, heat: np.ndarray, title: str):
  h, w = image.shape[:2]
  ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray",
            extent=(0, w, h, 0))
  heat = heat - heat.min()
  heat = heat / heat.max() if heat.max() > 0 else heat
  ax.imshow(heat, cmap="jet", alpha=0.5, interpolation="bilinear", extent=(0, w, h, 0))
  ax.set_title(title, fontsize=8)
  ax.axis("off")


def write_attention_pngs(directory: str, stem: str, image: np.ndarray, maps: dict,
                         b: int) -> List[str]:
  """`{stem}_rollout.png`, `{stem}_head{h}.png` and `{stem}_grid.png` for batch row `b`."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)
  written = []

  def save(fig, name):
    path = os.path.join(directory, f"{stem}_{name}.png")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    written.append(path)

  fig = Figure(figsize=(3, 3))
  _overlay(fig.subplots(), image, maps["rollout"][b], "rollout")
  save(fig, "rollout")
  heads = maps["heads"][b]
  for h, heat in enumerate(heads):
    fig = Figure(figsize=(3, 3))
    _overlay(fig.subplots(), image, heat, f"head {h}")
    save(fig, f"head{h}")
  cols = 2 + len(heads)
  fig = Figure(figsize=(2 * cols, 2.3))
  axes = fig.subplots(1, cols)
  axes[0].imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray")
  axes[0].set_title("image", fontsize=8)
  axes[0].axis("off")
  _overlay(axes[1], image, maps["rollout"][b], "rollout")
  for h, heat in enumerate(heads):
    _overlay(axes[2 + h], image, heat, f"last layer, head {h}")
  save(fig, "grid")
  return written


# ------------------------------------------------------------------------------ command line.
def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m vit_jax.predict", description=__doc__.split(
      "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--weights", required=True, help="a weights source or a training workdir")
  parser.add_argument("--model", default=None, help="model name for an .npz (e.g. ViT-B/16)")
  parser.add_argument("--labels", default=None,
                      help="imagenet, imagenet21k or a file with one class name per line")
  parser.add_argument("--top", type=int, default=5)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--attention_dir", default=None, help="write attention maps here")
  parser.add_argument("images", nargs="+")
  args = parser.parse_args(argv)
  try:
    predictor = load(args.weights, args.model)
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.labels:
    names = pretrained.class_names(args.labels)
    classes = predictor.variables["params"]["head"]["kernel"].shape[-1]
    if len(names) != classes:
      raise SystemExit(f"--labels={args.labels} has {len(names)} names; the model predicts "
                       f"{classes} classes.")
    predictor.class_names = names
  results = predict(predictor, args.images, batch_size=args.batch_size, top=args.top)
  failed = 0
  for r in results:
    if "error" in r:
      failed += 1
      print(f"error: {r['error']}", file=sys.stderr)
      continue
    print(r["path"])
    for i, name, p in r["top"]:
      print(f"  {p:7.2%}  {name} ({i})")
  if args.attention_dir:
    good, maps = [r for r in results if "error" not in r], None
    for start in range(0, len(good), args.batch_size):
      chunk = good[start:start + args.batch_size]
      maps = attention_maps(predictor, predictor.preprocess(np.stack([r["image"] for r in chunk])))
      if maps is None:
        print(f"note: {type(predictor.model).__name__} has no attention; no maps written.",
              file=sys.stderr)
        break
      for b, r in enumerate(chunk):
        stem = f"{start + b:03d}_{os.path.splitext(os.path.basename(r['path']))[0]}"
        r["attention_pngs"] = write_attention_pngs(args.attention_dir, stem, r["image"], maps, b)
    print(f"attention maps in {args.attention_dir} ({maps['what'] if maps else 'none'})")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
