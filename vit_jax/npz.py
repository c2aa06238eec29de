"""Published `.npz` parameters: the ViT release's flat layout, read, adapted and written.

Published `.npz` files (docs/reference.md) hold one array per '/'-joined parameter name:
  `load_npz`        file -> nested params in our model's numbering, GroupNorm params squeezed.
  `load_pretrained` adapts such params to a freshly initialised model (head, pre_logits, position
                    embedding resolution, scanned layout) and reports every mismatch by name.
  `resize_posemb`   a position embedding's square grid resized (bilinear), its prefix rows kept.
  `save_npz`        params -> the same flat layout (unscanned), written atomically.

Training state (orbax) is `vit_jax/checkpoint.py`'s; weights of other sources (Hugging Face, BiT)
are `vit_jax/pretrained.py`'s, which converts them to this layout first.
"""
import io
import math
import os
import re
import zipfile
from typing import Any, Callable, Mapping, Optional, Union

from absl import logging
import flax
import jax
import numpy as np
import scipy.ndimage

from vit_jax import checkpoint
from vit_jax import errors
from vit_jax import parallel
from vit_jax.models import vit

Params = Any

# Per-class numbering (linen's default) of an encoder block -> the old global numbering that the
# published files and our `Encoder1DBlock` use.
_PER_CLASS_TO_GLOBAL = {
    "LayerNorm_0": "LayerNorm_0",
    "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
    "LayerNorm_1": "LayerNorm_2",
    "MlpBlock_0": "MlpBlock_3",
}
_BLOCK_RE = re.compile(r"encoderblock_\d+")
_GROUPNORM_RE = re.compile(r"(gn\w*|GroupNorm_\d+)")


def _gfile():
  """`tf.io.gfile` (local, gs://, ...), imported on first use: TensorFlow takes seconds to import
  and only the `.npz` reading needs it."""
  from tensorflow.io import gfile  # pylint: disable=g-import-not-at-top
  return gfile


def _tf_errors():
  """`tf.errors`: what `tf.io.gfile` raises for a file it cannot read (a seek past a cut-short
  end, a GCS failure)."""
  from tensorflow import errors as tf_errors  # pylint: disable=g-import-not-at-top
  return tf_errors


def _flatten(tree) -> dict:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def _unflatten(flat: Mapping[str, Any]) -> dict:
  return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def _renumber_block(block: dict) -> dict:
  """One encoder block in per-class numbering -> global numbering; anything else is unchanged."""
  if set(block) == set(_PER_CLASS_TO_GLOBAL):
    return {_PER_CLASS_TO_GLOBAL[k]: v for k, v in block.items()}
  return block


def _canonicalize(params: dict) -> dict:
  """Our numbering for encoder blocks, GroupNorm params (1,1,1,C) -> (C,). Idempotent."""
  params = dict(params)
  if isinstance(params.get("Transformer"), Mapping):
    enc = dict(params["Transformer"])
    for k, v in enc.items():
      if _BLOCK_RE.fullmatch(k):
        enc[k] = _renumber_block(dict(v))
      elif k == "encoderblock" and isinstance(v, Mapping) and "block" in v:  # scanned layout
        enc[k] = {**v, "block": _renumber_block(dict(v["block"]))}
    params["Transformer"] = enc
  flat = _flatten(params)
  for key, v in flat.items():
    *path, leaf = key.split("/")
    if (path and _GROUPNORM_RE.fullmatch(path[-1]) and leaf in ("scale", "bias")
        and np.ndim(v) == 4 and np.shape(v)[:3] == (1, 1, 1)):
      flat[key] = np.reshape(v, (-1,))
  return _unflatten(flat)


def load_npz(path: Union[str, os.PathLike]) -> Params:
  """Reads a published ViT/hybrid `.npz` (flat '/'-joined names) into nested params.

  Encoder blocks in per-class numbering (LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1,
  MlpBlock_0) are renamed to the global numbering our model uses (LayerNorm_0,
  MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3); GroupNorm params stored as (1,1,1,C)
  become (C,). Leaves are numpy arrays. Reads through `tf.io.gfile`, so any path TensorFlow's file
  systems know works (local, gs://).
  """
  gfile, path = _gfile(), os.fspath(path)
  if not gfile.exists(path):
    raise errors.MissingFileError(f"{path} does not exist: expected a published or exported .npz "
                                  "(a local path or gs://); check the path.")
  try:
    with gfile.GFile(path, "rb") as f:
      with np.load(f, allow_pickle=False) as archive:
        flat = {k: archive[k] for k in archive.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile, _tf_errors().OpError) as e:
    raise errors.CheckpointError(
        f"{path} cannot be read as an .npz ({type(e).__name__}: {e}): the file is damaged or cut "
        "short, or not an .npz. Download or export it again.") from e
  if not flat:
    raise errors.CheckpointError(f"{path} holds no arrays; expected a ViT .npz with keys like "
                                 "'Transformer/encoder_norm/scale'. Download or export it again.")
  return _canonicalize(_unflatten(flat))


def save_npz(params: Params, path: Union[str, os.PathLike]) -> None:
  """Writes params as a flat '/'-joined `.npz` in the published layout, atomically.

  Scanned params are unrolled first (`encoderblock` -> `encoderblock_{i}`). Arrays of dtypes that
  numpy cannot store natively (bfloat16, ...) are written as float32. The file appears under
  `path` only once complete: it is written next to it under a temporary name and renamed. With
  several processes, every process must call this when arrays are sharded across processes (it
  gathers them); let only one process write, e.g. `if jax.process_index() == 0`.
  """
  params = flax.core.unfreeze(params)
  if "encoderblock" in params.get("Transformer", {}):
    params = vit.scan_to_unrolled(params)
  flat = {}
  for k, v in _flatten(parallel.to_host(params)).items():
    flat[k] = v.astype(np.float32) if not v.dtype.isbuiltin else v
  buf = io.BytesIO()
  np.savez(buf, **flat)
  checkpoint.write_atomic(path, buf.getvalue())


def _num_prefix_tokens(params: Mapping[str, Any], model_config=None) -> int:
  """The position-embedding rows before the grid: the class token's (`cls`), then DeiT's
  distillation token's (`dist`)."""
  dist = int("dist" in params)
  if model_config is not None and model_config.get("classifier") is not None:
    return int(model_config["classifier"] == "token") + dist
  return int("cls" in params) + dist


def _grid_side(n: int, what: str, shape) -> int:
  side = math.isqrt(n)
  if side * side != n:
    raise errors.CheckpointError(
        f"{what} position embedding {tuple(shape)} has {n} grid tokens, not a square grid; only "
        "square grids can be resized: load it into a model of the checkpoint's image size.")
  return side


def resize_posemb(posemb: np.ndarray, num_tokens: int, *, prefix_old: int, prefix_new: int,
                  prefix_fill: Optional[np.ndarray] = None) -> np.ndarray:
  """Position embedding (1, prefix_old + g*g, D) -> (1, num_tokens, D) for a new square grid.

  The prefix (cls) rows are kept (dropped if the model has none; taken from `prefix_fill` if only
  the model has them). The grid is resized bilinearly as in the JAX release:
  `scipy.ndimage.zoom(order=1)`, which maps corner to corner (align_corners semantics: output index
  i samples input coordinate i * (g_old - 1) / (g_new - 1)).
  """
  posemb = np.asarray(posemb)
  tok, grid = posemb[:, :prefix_old], posemb[0, prefix_old:]
  gs_old = _grid_side(len(grid), "checkpoint", posemb.shape)
  gs_new = _grid_side(num_tokens - prefix_new, "model", (1, num_tokens, posemb.shape[-1]))
  if gs_new != gs_old:
    logging.info("Resizing position embedding grid %dx%d -> %dx%d", gs_old, gs_old, gs_new, gs_new)
    zoom = (gs_new / gs_old, gs_new / gs_old, 1)
    grid = scipy.ndimage.zoom(grid.reshape(gs_old, gs_old, -1), zoom, order=1)
    assert grid.shape[:2] == (gs_new, gs_new), grid.shape  # zoom rounds the output size
  grid = grid.reshape(1, gs_new * gs_new, -1)
  if prefix_new <= prefix_old:
    tok = tok[:, :prefix_new]
  elif prefix_fill is None:
    raise ValueError(f"The model has {prefix_new} prefix token(s), the checkpoint {prefix_old}: "
                     "pass prefix_fill (the model's own position embedding) for the missing rows.")
  else:
    tok = np.concatenate([tok, np.asarray(prefix_fill)[:, prefix_old:prefix_new]], axis=1)
  return np.concatenate([tok, grid], axis=1).astype(posemb.dtype)


def _shapes(flat: Mapping[str, Any]) -> dict:
  return {k: tuple(np.shape(v)) for k, v in sorted(flat.items())}


def load_pretrained(path_or_params: Union[str, os.PathLike, Params], init_params: Params, *,
                    model_config: Optional[Mapping[str, Any]] = None, strict: bool = True,
                    reinit_head: Optional[bool] = None,
                    log: Callable[[str], None] = logging.info) -> Params:
  """Adapts published ViT params (a `.npz` path or a params tree) to `init_params`' model.

  `init_params` are a freshly initialised model's params (`variables["params"]`); they define the
  target tree. In order:
  - numbering and GroupNorm shapes are canonicalised as in `load_npz`;
  - scanned/unrolled layout follows `init_params` (`vit.unrolled_to_scan` / `scan_to_unrolled`);
  - `pre_logits` and `head` in the checkpoint but not in the model are dropped;
  - the head is taken from `init_params` when `reinit_head` is True, or (default None) when the
    checkpoint's head is absent, has another shape (class count), or sat on dropped pre_logits;
  - a position embedding of another length is resized: prefix tokens (cls, and DeiT's dist) are
    split off and kept, the square grid is resized bilinearly (`resize_posemb`:
    scipy.ndimage.zoom order=1, as in the JAX release); the number of prefix tokens comes from
    `model_config["classifier"]` when given, else from whether `init_params` has `cls`, plus one
    when it has `dist`;
  - leaves are cast to `init_params`' dtypes.
  Remaining mismatches (keys missing from the checkpoint, unexpected keys, mis-shaped keys) raise
  one `errors.CheckpointError` (a ValueError) naming all of them, unless `strict=False`: then they
  are logged through `log`, and missing/mis-shaped keys keep their initialised values.

  Returns a params tree with `init_params`' structure: checkpoint leaves are numpy arrays, the rest
  are `init_params`' own leaves; `jax.device_put` it with the training shardings.
  """
  init = flax.core.unfreeze(init_params)
  if set(init) == {"params"}:
    raise ValueError("init_params looks like a variables dict; pass variables['params'].")
  if isinstance(path_or_params, (str, os.PathLike)):
    restored = load_npz(path_or_params)
  else:
    restored = _canonicalize(parallel.to_host(flax.core.unfreeze(path_or_params)))
  if set(restored) == {"params"}:
    restored = restored["params"]

  init_enc, ckpt_enc = init.get("Transformer", {}), restored.get("Transformer", {})
  if "encoderblock" in init_enc and any(_BLOCK_RE.fullmatch(k) for k in ckpt_enc):
    restored = jax.tree.map(np.asarray, vit.unrolled_to_scan(restored))
  elif "encoderblock" in ckpt_enc and any(_BLOCK_RE.fullmatch(k) for k in init_enc):
    restored = vit.scan_to_unrolled(restored)

  dropped = set()
  for name in ("pre_logits", "head"):
    if name in restored and name not in init:
      log(f"load_pretrained: dropping checkpoint '{name}' (the model has none).")
      del restored[name]
      dropped.add(name)
  if "head" in init:
    init_head, ckpt_head = _flatten(init["head"]), _flatten(restored.get("head", {}))
    # A head trained on top of pre_logits is meaningless without them.
    auto = _shapes(init_head) != _shapes(ckpt_head) or "pre_logits" in dropped
    if reinit_head or (reinit_head is None and auto):
      log("load_pretrained: head re-initialised "
          f"(checkpoint {_shapes(ckpt_head)} -> model {_shapes(init_head)}).")
      restored["head"] = init["head"]

  try:
    posemb = restored["Transformer"]["posembed_input"]["pos_embedding"]
    posemb_init = init["Transformer"]["posembed_input"]["pos_embedding"]
  except KeyError:
    posemb = posemb_init = None
  if posemb is not None and np.shape(posemb) != np.shape(posemb_init) and (
      np.shape(posemb)[-1] == np.shape(posemb_init)[-1]):
    prefix_new = _num_prefix_tokens(init, model_config)
    restored["Transformer"]["posembed_input"]["pos_embedding"] = resize_posemb(
        posemb, np.shape(posemb_init)[1], prefix_old=_num_prefix_tokens(restored),
        prefix_new=prefix_new, prefix_fill=posemb_init)
    log(f"load_pretrained: position embedding {np.shape(posemb)} -> {np.shape(posemb_init)}.")

  want, have = _flatten(init), _flatten(restored)
  missing = sorted(set(want) - set(have))
  unexpected = sorted(set(have) - set(want))
  misshaped = sorted(k for k in set(want) & set(have) if np.shape(want[k]) != np.shape(have[k]))
  if missing or unexpected or misshaped:
    lines = ([f"  missing from the checkpoint: {k} {tuple(np.shape(want[k]))}" for k in missing] +
             [f"  unexpected in the checkpoint: {k} {tuple(np.shape(have[k]))}"
              for k in unexpected] +
             [f"  mis-shaped: {k}: checkpoint {tuple(np.shape(have[k]))} vs model "
              f"{tuple(np.shape(want[k]))}" for k in misshaped])
    what = (f"Checkpoint {os.fspath(path_or_params)}"
            if isinstance(path_or_params, (str, os.PathLike)) else "Checkpoint")
    msg = "\n".join([f"{what} does not match the model ({len(lines)} key(s)):"] + lines)
    if strict:
      raise errors.CheckpointError(
          msg + "\nLoad it into the model it was saved from (its name, class count and options), "
          "or pass strict=False to keep the initialised values for missing and mis-shaped keys "
          "and ignore unexpected ones.")
    log(f"load_pretrained (strict=False): {msg}\nKeeping the initialised values.")

  out = {}
  for k, v in want.items():
    if k in have and k not in misshaped:
      out[k] = v if have[k] is v else np.asarray(have[k]).astype(v.dtype)
    else:
      out[k] = v
  out = _unflatten(out)
  return flax.core.freeze(out) if isinstance(init_params, flax.core.FrozenDict) else out
