"""Published weights in and out: one loader for `.npz` files, Hugging Face directories and the zoo.

  model, params = pretrained.load("path/ViT-B_16.npz", model="ViT-B/16")
  model, params = pretrained.load("dir/written/by/save_pretrained")       # ViT, DeiT, Swin, BiT
  model, params = pretrained.load("augreg/S_16-i21k-300ep-...-res_384")    # a name from ZOO
  model, params = pretrained.load(source, num_classes=10, img_size=384)    # new head, new size
  pretrained.save_hf(model, params, "out_dir")  # ViT, Swin, BiT -> transformers' from_pretrained

Sources:
- a published `.npz` (local or gs://, read through `tf.io.gfile`): ViT, AugReg and hybrid files in
  the ViT release's layout (`npz.load_npz`), BiT-S/M ResNet files in the BiT release's
  layout (`resnet/block1/unit01/a/standardized_conv2d/kernel`, ...), or files that
  `npz.save_npz` wrote for any of our models. The model name is needed
  (`model="ViT-B/16"`) unless the file name is a zoo entry's.
- a Hugging Face model directory (`config.json` + `model.safetensors` or `pytorch_model.bin`, as
  `save_pretrained` writes it); the architecture comes from `config.json`. Needs the `hf` extra
  (`pip install -e '.[hf]'`: transformers, safetensors, huggingface_hub).
- a name of `ZOO` (`python -m vit_jax.pretrained --list`): gs:// files are copied once into
  `$VIT_JAX_PRETRAINED_DIR` (default ~/.cache/vit_jax/pretrained), Hub ids go through
  `huggingface_hub.snapshot_download` (its cache; HF_HUB_OFFLINE=1 honoured). With no network
  (or HF_HUB_OFFLINE / VIT_JAX_OFFLINE set) the error says where to put the file.

Then the converted tree goes through `npz.load_pretrained` against the model built for
(`num_classes`, `img_size`): a head of another class count is re-initialised, ViT position
embeddings are resized (bilinear, as the JAX release), Swin relative position bias tables are
resized (bicubic, `swin.resize_bias_tables`), and every remaining mismatch is reported by
parameter name with both shapes.

Numerics worth knowing (docs/reference.md, "PyTorch parity pitfalls"): HF ViT/DeiT use
LayerNorm eps 1e-12 where our ViT uses 1e-6 (relative effect ~1e-6, left as is) and exact GELU,
which the loader switches on (`approximate_gelu=False`); HF BiT pads the root max-pool with zeros
(`zero_pad_pool=True` here), big_vision with -inf.
"""
import argparse
import dataclasses
import json
import os
import re
import sys
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple, Union

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import errors
from vit_jax import models
from vit_jax import npz
from vit_jax.models import deit
from vit_jax.models import layers
from vit_jax.models import resnet
from vit_jax.models import swin
from vit_jax.models import vit

Params = Any
HF_EXTRA = "pip install -e '.[hf]'  (transformers, safetensors, huggingface_hub)"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)  # mean = std = 0.5: pixels in [-1, 1], the ViT release's input range


# ------------------------------------------------------------------------------ the model zoo.
@dataclasses.dataclass(frozen=True)
class ZooEntry:
  model: str  # our registry name
  location: str  # gs://... .npz, or hf:<hub id>
  labels: str  # imagenet1k | imagenet21k
  image_size: int
  top1: Optional[float]  # upstream ImageNet-1k top-1 (%), as published; None: not published / n/a
  source: str  # where the number comes from


_AUGREG = "gs://vit_models/augreg/"
_AUGREG_SRC = "vision_transformer README, AugReg table"
# (model, upstream file stem, fine-tuning suffix, ImageNet top-1 at 384 px)
_AUGREG_ROWS = (
    ("ViT-L/16", "L_16-i21k-300ep-lr_0.001-aug_strong1-wd_0.1-do_0.0-sd_0.0", "lr_0.01", 85.59),
    ("ViT-B/16", "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0", "lr_0.03", 85.49),
    ("ViT-S/16", "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0", "lr_0.03", 83.73),
    ("R50+ViT-L/32", "R50_L_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1", "lr_0.01",
     85.99),
    ("R26+ViT-S/32", "R26_S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0", "lr_0.01",
     83.85),
    ("ViT-Ti/16", "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0", "lr_0.03", 78.22),
    ("ViT-B/32", "B_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0", "lr_0.01", 83.59),
    ("ViT-S/32", "S_32-i21k-300ep-lr_0.001-aug_none-wd_0.1-do_0.0-sd_0.0", "lr_0.01", 79.58),
    ("R+ViT-Ti/16", "R_Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0", "lr_0.03",
     75.40),
)


def _zoo() -> dict:
  zoo = {}
  for name in ("ViT-B/16", "ViT-B/32", "ViT-L/16", "ViT-L/32", "R50+ViT-B/16"):
    stem = name.replace("/", "_")
    zoo[f"imagenet21k/{stem}"] = ZooEntry(name, f"gs://vit_models/imagenet21k/{stem}.npz",
                                          "imagenet21k", 224, None, "upstream, no ImageNet-1k head")
    zoo[f"imagenet21k+imagenet2012/{stem}"] = ZooEntry(
        name, f"gs://vit_models/imagenet21k+imagenet2012/{stem}.npz", "imagenet1k", 384,
        83.97 if name == "ViT-B/16" else None, "ViT paper Table 5" if name == "ViT-B/16" else "")
  for name, stem, lr, top1 in _AUGREG_ROWS:
    zoo[f"augreg/{stem}"] = ZooEntry(name, f"{_AUGREG}{stem}.npz", "imagenet21k", 224, None,
                                     "upstream, no ImageNet-1k head")
    tuned = f"{stem}--imagenet2012-steps_20k-{lr}-res_384"
    zoo[f"augreg/{tuned}"] = ZooEntry(name, f"{_AUGREG}{tuned}.npz", "imagenet1k", 384, top1,
                                      _AUGREG_SRC)
  for up, labels in (("M", "imagenet21k"), ("S", "imagenet1k")):
    zoo[f"bit/BiT-{up}-R50x1"] = ZooEntry("BiT-R50x1", f"gs://bit_models/BiT-{up}-R50x1.npz",
                                          labels, 224, None, "upstream (BiT paper)")
  zoo["bit/BiT-M-R50x1-ILSVRC2012"] = ZooEntry(
      "BiT-R50x1", "gs://bit_models/BiT-M-R50x1-ILSVRC2012.npz", "imagenet1k", 480, None,
      "BiT-HyperRule: fine-tuned at 480 px")
  hub = (
      ("google/vit-base-patch16-224", "ViT-B/16", None, "ViT release, converted"),
      ("facebook/deit-tiny-patch16-224", "ViT-Ti/16", 72.2, "DeiT paper"),
      ("facebook/deit-small-patch16-224", "ViT-S/16", 79.8, "DeiT paper"),
      ("facebook/deit-base-patch16-224", "ViT-B/16", 81.8, "DeiT paper"),
      ("facebook/deit-tiny-distilled-patch16-224", "DeiT-Ti/16-distilled", 74.5, "DeiT paper"),
      ("facebook/deit-small-distilled-patch16-224", "DeiT-S/16-distilled", 81.2, "DeiT paper"),
      ("facebook/deit-base-distilled-patch16-224", "DeiT-B/16-distilled", 83.4, "DeiT paper"),
      ("microsoft/swin-tiny-patch4-window7-224", "Swin-T", 81.2, "Swin paper Table 1"),
      ("microsoft/swin-small-patch4-window7-224", "Swin-S", 83.2, "Swin paper Table 1"),
      ("google/bit-50", "BiT-R50x1", None, "BiT-M R50x1, ImageNet-1k head"),
  )
  for hub_id, name, top1, src in hub:
    zoo[hub_id] = ZooEntry(name, f"hf:{hub_id}", "imagenet1k", 224, top1, src)
  return zoo


ZOO = _zoo()


def format_zoo() -> str:
  """The zoo as a text table (what `--list` prints): model, labels, resolution, published top-1,
  then the name to pass to `load` and where it is downloaded from."""
  rows = [("model", "labels", "px", "top-1", "name (source)")]
  for name, e in ZOO.items():
    where = "" if e.location == f"hf:{name}" else f"  ({e.location})"
    rows.append((e.model, e.labels, str(e.image_size),
                 f"{e.top1:.2f}" if e.top1 is not None else "-", name + where))
  widths = [max(len(r[i]) for r in rows) for i in range(4)]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4]
                   for r in rows)


# ------------------------------------------------------------------------------ what load returns.
@dataclasses.dataclass
class Loaded:
  """A loaded model, its params, and what a caller needs to feed it images."""
  model: nn.Module
  params: Params
  image_size: Tuple[int, int]
  channels: int
  mean: Tuple[float, ...]  # inputs are (pixel / 255 - mean) / std
  std: Tuple[float, ...]
  class_names: Optional[Tuple[str, ...]]  # None: unknown (class numbers are shown)
  source: str


@dataclasses.dataclass
class _Converted:
  """A checkpoint in our parameter names, and how to build the model it came from."""
  tree: Params
  model_name: str
  kwargs: dict  # registry overrides the checkpoint decides
  image_size: Tuple[int, int]
  channels: int
  mean: Tuple[float, ...]
  std: Tuple[float, ...]
  class_names: Optional[Tuple[str, ...]]  # for the checkpoint's own head


def load(source: Union[str, os.PathLike], model: Optional[str] = None,
         num_classes: Optional[int] = None, img_size: Optional[Union[int, Sequence[int]]] = None,
         *, strict: bool = True, log: Callable[[str], None] = logging.info):
  """Returns `(model, params)` for `source` (see the module docstring).

  model: our registry name (required for an `.npz` that is not in the zoo; ignored otherwise).
  num_classes: None keeps the checkpoint's head; another count replaces it (zero-initialised, as
    the ViT paper fine-tunes).
  img_size: None keeps the checkpoint's resolution; another one resizes ViT position embeddings
    and Swin relative position bias tables.
  strict: False keeps initialised values for missing/mis-shaped parameters instead of raising.
  """
  out = load_with_info(source, model, num_classes, img_size, strict=strict, log=log)
  return out.model, out.params


def load_with_info(source, model=None, num_classes=None, img_size=None, *, strict=True,
                   log=logging.info) -> Loaded:
  """`load`, plus the input size, normalisation and class names (`Loaded`)."""
  conv = _convert(os.fspath(source), model, log)
  ckpt_classes = _head_classes(conv.tree)
  if num_classes is None:
    if ckpt_classes is None:
      raise errors.CheckpointError(
          f"{source} has no classification head; pass num_classes=... (0 for the "
          "pre-head features).")
    num_classes = ckpt_classes
  size = _pair(img_size or conv.image_size)
  kwargs = dict(conv.kwargs)
  family = family_of(models.get_model(conv.model_name, num_classes=1))
  if family is not None and family.img_size_option:
    kwargs["img_size"] = size  # Swin's stage windows (and table shapes) follow img_size
  module = models.get_model(conv.model_name, num_classes=num_classes, **kwargs)
  init = _init(module, size, conv.channels, real=not strict)
  params = _fit(conv.tree, init, strict=strict, log=log)
  names = conv.class_names if num_classes == ckpt_classes else None
  return Loaded(module, params, size, conv.channels, conv.mean, conv.std, names, os.fspath(source))


def load_into(source, init_params: Params, *, model: Optional[str] = None, strict: bool = True,
              log: Callable[[str], None] = logging.info) -> Params:
  """`source`'s weights fitted to `init_params` (a freshly initialised model's params): what
  `config.pretrained.path` goes through. An `.npz` path goes straight to
  `npz.load_pretrained`; other sources are converted first. `model` names the model for
  an `.npz` of ours whose tree alone does not say it (the training config's `model_name`)."""
  source = os.fspath(source)
  if source.endswith(".npz") and source not in ZOO:
    tree = npz.load_npz(source)
    tree = _bit_release_to_ours(tree) if "resnet" in tree else tree
  else:
    tree = _convert(source, model, log).tree
  return _fit(tree, jax.device_get(flax.core.unfreeze(init_params)), strict=strict, log=log)


def _convert(source: str, model: Optional[str], log) -> _Converted:
  entry = ZOO.get(source)
  if entry is not None:
    path = fetch(source)
    if entry.location.endswith(".npz"):
      return _convert_npz(path, entry.model, entry.image_size, entry.labels)
    return _convert_hf(path, log)
  if os.path.isdir(source) and os.path.exists(os.path.join(source, "config.json")):
    with open(os.path.join(source, "config.json")) as f:
      cfg = json.load(f)
    if "model_type" not in cfg:
      raise errors.CheckpointError(
          f"{source}/config.json has no 'model_type': not a Hugging Face model "
          "directory. (A training workdir of ours loads through "
          "`python -m vit_jax.predict --weights=WORKDIR`.)")
    return _convert_hf(source, log)
  if source.endswith(".npz"):
    if model is None:
      base = os.path.basename(source)[:-len(".npz")]
      hits = {e.model for k, e in ZOO.items() if k.split("/")[-1] == base}
      if len(hits) != 1:
        raise errors.CheckpointError(
            f"Which model is {source}? Pass model=... (e.g. model='ViT-B/16'); "
            f"known names: {', '.join(models.known_names())}.")
      model = hits.pop()
    return _convert_npz(source, model, 224, None)
  if os.path.isdir(source):
    raise errors.CheckpointError(
        f"{source} is a directory without config.json: expected a Hugging Face model "
        "directory (save_pretrained) or, for predict, a training workdir.")
  raise errors.CheckpointError(
      f"Unknown weights source {source!r}: expected an .npz path (local or gs://), a "
      "Hugging Face model directory, or a zoo name (python -m vit_jax.pretrained "
      "--list).")


def _fit(tree: Params, init: Params, *, strict, log) -> Params:
  """A converted tree fitted to `init` (npz.load_pretrained, which also resizes position
  embeddings, DeiT's [cls, dist, grid] included), after the resizing it cannot do itself: Swin
  bias tables."""
  if any(k[-1] == "relative_position_bias_table"
         for k in flax.traverse_util.flatten_dict(dict(tree))):
    tree = swin.resize_bias_tables(tree, init)
  tree = resize_relative_tables(tree, init)
  return npz.load_pretrained(tree, init, strict=strict, log=log)


# Relative-position tables whose shape follows the image size: leaf name -> its offset axes.
# ViT's `posemb="relbias"` `grid_bias` (2h-1, 2w-1, heads) and the attention-augmented ResNet's
# `rel_height` (2H-1, d) and `rel_width` (2W-1, d).
RELATIVE_TABLES = {"grid_bias": (-3, -2), "rel_height": (-2,), "rel_width": (-2,)}


def resize_relative_tables(tree: Params, init: Params) -> Params:
  """Every `RELATIVE_TABLES` leaf of `tree` whose offset axes differ from `init`'s resized to
  them, bicubically along each offset axis with Swin's resizing (`swin._torch_bicubic_matrix`:
  torch's bicubic, align_corners=False, as Swin and BEiT resize their tables); a leading layer
  axis (a scanned ViT) is kept. The class-token terms (`cls_bias`) do not depend on the size."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(dict(tree)))
  target = flax.traverse_util.flatten_dict(flax.core.unfreeze(dict(init)))
  for key, value in flat.items():
    have = np.shape(value)
    want = _layout_shape(key, have, target) if key[-1] in RELATIVE_TABLES else None
    if want is None or have == want or len(have) != len(want):
      continue
    out = np.asarray(value, np.float64)
    for axis in RELATIVE_TABLES[key[-1]]:
      m = swin._torch_bicubic_matrix(have[axis], want[axis])  # pylint: disable=protected-access
      out = np.moveaxis(np.tensordot(m, np.moveaxis(out, axis, 0), axes=1), 0, axis)
    flat[key] = out.astype(np.asarray(value).dtype)
  return flax.traverse_util.unflatten_dict(flat)


def _layout_shape(key, have, target):
  """The shape `key` must take for `target`, whichever of the unrolled (`encoderblock_{i}`) and
  scanned (`encoderblock/block`, leading layer axis) ViT layouts each side has; None if absent."""
  if key in target:
    return tuple(np.shape(target[key]))
  for i, part in enumerate(key):
    if re.fullmatch(r"encoderblock_\d+", part):  # an unrolled tree for a scanned model
      alt = key[:i] + ("encoderblock", "block") + key[i + 1:]
      return tuple(np.shape(target[alt]))[1:] if alt in target else None
    if part == "encoderblock" and key[i + 1:i + 2] == ("block",):  # scanned for unrolled
      alt = key[:i] + ("encoderblock_0",) + key[i + 2:]
      return (have[0],) + tuple(np.shape(target[alt])) if alt in target else None
  return None


# ------------------------------------------------------------------------------ fetching.
def _offline() -> bool:
  return any(os.environ.get(k, "").lower() not in ("", "0", "false", "no")
             for k in ("HF_HUB_OFFLINE", "VIT_JAX_OFFLINE"))


def cache_dir() -> str:
  return os.environ.get("VIT_JAX_PRETRAINED_DIR",
                        os.path.join(os.path.expanduser("~"), ".cache", "vit_jax", "pretrained"))


def fetch(name: str) -> str:
  """A zoo entry's local path (an `.npz` file or a Hub snapshot directory), downloading it once.

  Raises FileNotFoundError saying where to put the file when it cannot be downloaded.
  """
  entry = ZOO[name]
  if entry.location.startswith("hf:"):
    hub_id = entry.location[3:]
    try:
      import huggingface_hub  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ImportError(f"Zoo entry {name!r} is on the Hugging Face Hub; install the hf extra: "
                        f"{HF_EXTRA}.") from None
    try:
      return huggingface_hub.snapshot_download(
          hub_id, allow_patterns=["config.json", "preprocessor_config.json", "*.safetensors",
                                  "pytorch_model.bin"])
    except Exception as e:  # pylint: disable=broad-except
      raise errors.MissingFileError(
          f"Could not get {hub_id} from the Hugging Face Hub ({type(e).__name__}: {e}). On a "
          f"machine with network: `huggingface-cli download {hub_id} --local-dir DIR` (or "
          "from_pretrained(...).save_pretrained(DIR)), copy DIR here and pass DIR as the "
          "source.") from None
  local = os.path.join(cache_dir(), os.path.basename(entry.location))
  if os.path.exists(local):
    return local
  hint = (f"Download it where there is network (`gsutil cp {entry.location} .` or "
          f"https://storage.googleapis.com/{entry.location[len('gs://'):]}) and put it at {local} "
          "(or set VIT_JAX_PRETRAINED_DIR), or pass the file's path as the source with "
          f"model={entry.model!r}.")
  if _offline():
    raise errors.MissingFileError(
        f"{local} does not exist and downloads are off (offline mode). {hint}")
  from tensorflow.io import gfile  # pylint: disable=g-import-not-at-top
  try:
    os.makedirs(os.path.dirname(local), exist_ok=True)
    tmp = local + ".part"
    gfile.copy(entry.location, tmp, overwrite=True)
    os.replace(tmp, local)
  except Exception as e:  # pylint: disable=broad-except
    raise errors.MissingFileError(f"Could not download {entry.location} ({type(e).__name__}: {e}). "
                                  f"{hint}") from None
  return local


# ------------------------------------------------------------------------------ building models.
def _pair(size) -> Tuple[int, int]:
  return (int(size), int(size)) if np.ndim(size) == 0 else tuple(int(s) for s in size)


@dataclasses.dataclass(frozen=True)
class Family:
  """What one model family converts, and how (a row of `FAMILIES`)."""
  name: str
  hf_model_type: str  # the `model_type` of the Hugging Face config.json that `from_hf` reads
  # (state dict of numpy arrays, config.json as a dict, log) -> (our params tree, (name, kwargs)).
  from_hf: Callable[[dict, dict, Callable[[str], None]], Tuple[Params, Tuple[str, dict]]]
  # (module, params) -> (transformers config class name, its kwargs, state dict); None: no export.
  to_hf: Optional[Callable[[nn.Module, Params], Tuple[str, dict, dict]]]
  hf_input: Tuple[tuple, tuple]  # (mean, std) when the directory has no preprocessor_config.json
  npz_input: Tuple[tuple, tuple]  # (mean, std) of the family's published .npz files
  npz_overrides: Optional[Callable[[Params], dict]] = None  # model options an .npz tree decides
  img_size_option: bool = False  # whether the image size is a model option (Swin's windows)


def family_of(model: Union[nn.Module, type]) -> Optional[Family]:
  """The `FAMILIES` row of a model (or model class): its class's, else its nearest base's."""
  cls = model if isinstance(model, type) else type(model)
  return next((FAMILIES[c] for c in cls.__mro__ if c in FAMILIES), None)


def _init(model: nn.Module, size: Tuple[int, int], channels: int, *, real: bool) -> Params:
  """The model's params tree: zeros (shapes only, no compilation), or a real initialisation.

  Zeros are all a loader needs when every parameter comes from the checkpoint but a replaced head:
  that head then starts at zero, as the ViT paper's fine-tuning starts it."""
  x = jnp.zeros((1, *size, channels), jnp.float32)
  if real:
    return jax.device_get(model.init(jax.random.PRNGKey(0), x)["params"])
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def _head_classes(tree: Params) -> Optional[int]:
  head = tree.get("head")
  return int(np.shape(head["kernel"])[-1]) if isinstance(head, Mapping) else None


def _labels_for(labels: Optional[str], num_classes: int) -> Optional[Tuple[str, ...]]:
  if labels is None:
    labels = {1000: "imagenet1k", 21843: "imagenet21k"}.get(num_classes)
  if labels is None:
    return None
  names = class_names(labels)
  return names if len(names) == num_classes else None


def class_names(which: str) -> Tuple[str, ...]:
  """'imagenet1k' / 'imagenet' / 'imagenet21k' (shipped with the package) or a text file with one
  name per line (lines starting with '#' are comments; 'id<TAB>name' keeps the name)."""
  which = {"imagenet": "imagenet1k"}.get(which, which)
  path = which
  if which in ("imagenet1k", "imagenet21k"):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{which}_classes.txt")
  if not os.path.exists(path):
    raise errors.MissingFileError(
        f"Labels {which!r}: no such file; use imagenet, imagenet21k or a text "
        "file with one class name per line.")
  with open(path) as f:
    lines = [l.rstrip("\n") for l in f if l.strip() and not l.startswith("#")]
  return tuple(l.split("\t", 1)[-1] for l in lines)


# ------------------------------------------------------------------------------ .npz files.
def _bit_release_to_ours(tree: Params) -> Params:
  """A BiT release `.npz` tree (`resnet/...`) -> our pre-activation ResNet's names."""
  flat = flax.traverse_util.flatten_dict(tree)
  out = {}
  used = set()

  def take(*key):
    key = ("resnet",) + key
    if key not in flat:
      raise errors.CheckpointError(f"BiT .npz lacks {'/'.join(key)!r}.")
    used.add(key)
    return np.asarray(flat[key])

  def gn(prefix):
    return {"scale": take(*prefix, "group_norm", "gamma").reshape(-1),
            "bias": take(*prefix, "group_norm", "beta").reshape(-1)}

  out["conv_root"] = {"kernel": take("root_block", "standardized_conv2d", "kernel")}
  blocks = sorted({k[1] for k in flat if len(k) > 1 and re.fullmatch(r"block\d+", k[1])})
  for block in blocks:
    units = sorted({k[2] for k in flat if k[1] == block}, key=lambda u: int(u[4:]))
    out[block] = {}
    for unit in units:
      u = {}
      for i, part in enumerate("abc", 1):
        u[f"conv{i}"] = {"kernel": take(block, unit, part, "standardized_conv2d", "kernel")}
        u[f"gn{i}"] = gn((block, unit, part))
      if (("resnet", block, unit, "a", "proj", "standardized_conv2d", "kernel") in flat):
        u["conv_proj"] = {"kernel": take(block, unit, "a", "proj", "standardized_conv2d",
                                         "kernel")}
      out[block][f"unit{int(unit[4:])}"] = u
  out["norm-pre-head"] = gn(())
  if ("resnet", "head", "conv2d", "kernel") in flat:
    out["head"] = {"kernel": take("head", "conv2d", "kernel")[0, 0],
                   "bias": take("head", "conv2d", "bias")}
  leftover = sorted("/".join(k) for k in set(flat) - used)
  if leftover:
    raise errors.CheckpointError(f"Unconverted keys in the BiT .npz: {leftover[:10]}")
  return out


def _vit_npz_overrides(tree: Params) -> dict:
  """ViT options an .npz tree decides: classifier, representation layer."""
  over = {}
  if "MAPHead_0" in tree:
    over["classifier"] = "map"
  elif "cls" not in tree:
    over["classifier"] = "gap"
  if "pre_logits" in tree:
    over["representation_size"] = int(np.shape(tree["pre_logits"]["kernel"])[-1])
  return over


def _convert_npz(path, model_name, image_size, labels) -> _Converted:
  tree = npz.load_npz(path)
  if "resnet" in tree:
    tree = _bit_release_to_ours(tree)
  family = family_of(models.get_model(model_name, num_classes=1))
  mean, std = family.npz_input if family else ((0.,) * 3, (1.,) * 3)
  overrides = family.npz_overrides(tree) if family and family.npz_overrides else {}
  classes = _head_classes(tree)
  return _Converted(tree, model_name, overrides, _pair(image_size), _channels(tree), mean, std,
                    _labels_for(labels, classes) if classes else None)


def _channels(tree: Params) -> int:
  for path in (("embedding", "kernel"), ("conv_root", "kernel"), ("patch_embed", "proj", "kernel")):
    node = tree
    for p in path:
      node = node.get(p) if isinstance(node, Mapping) else None
    if node is not None:
      return int(np.shape(node)[2])
  return 3


# ------------------------------------------------------------------------------ Hugging Face.
def _hf_state_dict(directory: str) -> dict:
  """The directory's weights as numpy arrays (safetensors without torch; .bin needs torch)."""
  st = os.path.join(directory, "model.safetensors")
  if os.path.exists(st):
    try:
      from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ImportError(f"Reading {st} needs safetensors: {HF_EXTRA}.") from None
    return dict(load_file(st))
  binary = os.path.join(directory, "pytorch_model.bin")
  if os.path.exists(binary):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ImportError(f"Reading {binary} needs torch (pip install -e '.[torch,hf]').") from None
    sd = torch.load(binary, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in sd.items()}
  raise errors.MissingFileError(f"{directory} has config.json but neither model.safetensors nor "
                                "pytorch_model.bin (sharded checkpoints are not supported).")


def _hf_preprocessing(directory, family: "Family") -> Tuple[tuple, tuple]:
  path = os.path.join(directory, "preprocessor_config.json")
  if os.path.exists(path):
    with open(path) as f:
      pp = json.load(f)
    if "image_mean" in pp and "image_std" in pp:
      return tuple(pp["image_mean"]), tuple(pp["image_std"])
  return family.hf_input


def _convert_hf(directory, log) -> _Converted:
  with open(os.path.join(directory, "config.json")) as f:
    cfg = json.load(f)
  model_type = cfg.get("model_type")
  by_type = {f.hf_model_type: f for f in FAMILIES.values()}
  if model_type not in by_type:
    raise errors.UnsupportedError(f"{directory}: Hugging Face model_type {model_type!r} is not "
                                  f"supported; supported: {', '.join(by_type)}.")
  family = by_type[model_type]
  tree, (name, kwargs) = family.from_hf(_hf_state_dict(directory), cfg, log)
  classes = _head_classes(tree)
  names = None
  id2label = cfg.get("id2label") or {}
  if classes and len(id2label) == classes:
    names = tuple(id2label[str(i)] for i in range(classes))
    if all(re.fullmatch(r"LABEL_\d+", n) for n in names):  # transformers' placeholders
      names = _labels_for(None, classes)
  mean, std = _hf_preprocessing(directory, family)
  return _Converted(tree, name, kwargs, _pair(cfg.get("image_size", 224)),
                    int(cfg.get("num_channels", 3)), mean, std, names)


_GELU = {"gelu": False, "gelu_pytorch_tanh": True, "gelu_new": True, "gelu_fast": True}


def _gelu_option(cfg) -> bool:
  act = cfg.get("hidden_act", "gelu")
  if act not in _GELU:
    raise errors.UnsupportedError(
        f"hidden_act={act!r} is not supported; known: {', '.join(_GELU)}.")
  return _GELU[act]


def _vit_name(d, mlp, heads, depth, patch) -> str:
  for v, dims in vit.VARIANTS.items():
    if dims == (d, mlp, heads, depth):
      return f"ViT-{v}/{patch}"
  return f"ViT-B/{patch}"  # any; the fields are overridden


def _vit_kwargs(cfg) -> Tuple[str, dict]:
  if not cfg.get("qkv_bias", True):
    raise errors.UnsupportedError("ViT configs with qkv_bias=False are not supported.")
  d, mlp = int(cfg.get("hidden_size", 768)), int(cfg.get("intermediate_size", 3072))
  heads, depth = int(cfg.get("num_attention_heads", 12)), int(cfg.get("num_hidden_layers", 12))
  p = int(cfg.get("patch_size", 16))
  kwargs = dict(hidden_size=d, mlp_dim=mlp, num_heads=heads, num_layers=depth, patch_size=(p, p),
                approximate_gelu=_gelu_option(cfg))
  return _vit_name(d, mlp, heads, depth, p), kwargs


def _vit_from_hf(sd, cfg, log=None) -> Tuple[dict, Tuple[str, dict]]:
  """HF ViTForImageClassification / ViTModel state dict -> our ViT tree (published names)."""
  name, kwargs = _vit_kwargs(cfg)
  pre = "vit." if any(k.startswith("vit.") for k in sd) else ""
  # ViTModel's pooler (dense + tanh on the class token) is not used by the classifier.
  sd = layers.TorchStateDict(sd, what="ViT", renames=vit.HF_LEGACY_NAMES,
                             ignore=re.compile(re.escape(pre) + r"pooler\..*"))
  vit.read_hf_backbone(sd, pre, kwargs["num_layers"], kwargs["num_heads"])
  if sd.has("classifier.weight"):
    sd.linear("classifier", ("head",))
  return sd.variables()["params"], (name, kwargs)


def _deit_from_hf(sd, cfg, log=None):
  """HF DeiT (`deit.*`: always with a distillation token next to the class token), from
  DeiTForImageClassificationWithTeacher (two heads) or DeiTForImageClassification (cls head only,
  `distill_head=False`). Non-distilled DeiT weights on the Hub (facebook/deit-*-patch16-224) are
  ViT checkpoints (model_type 'vit') and load as ViT."""
  tree = deit.from_hf_state_dict(sd, cfg)["params"]
  # config.json keeps the class count in id2label (transformers' num_labels is a property).
  kwargs = deit.model_kwargs_from_hf({"num_labels": len(cfg.get("id2label") or {}), **cfg})
  kwargs.pop("num_classes", None)
  kwargs.update(distill_head="head_dist" in tree, droppath_rate=0.0)
  d, mlp, heads, depth = (kwargs[k] for k in ("hidden_size", "mlp_dim", "num_heads",
                                               "num_layers"))
  name = _vit_name(d, mlp, heads, depth, kwargs["patch_size"][0]).replace("ViT-", "DeiT-")
  return tree, (name + "-distilled", kwargs)


def _swin_kwargs(cfg) -> Tuple[str, dict]:
  if cfg.get("use_absolute_embeddings"):
    raise errors.UnsupportedError("Swin with absolute position embeddings is not supported.")
  if cfg.get("hidden_act", "gelu") != "gelu":
    raise errors.UnsupportedError(f"Swin hidden_act={cfg['hidden_act']!r}: only 'gelu' (exact).")
  if not cfg.get("qkv_bias", True):
    raise errors.UnsupportedError("Swin configs with qkv_bias=False are not supported.")
  kwargs = dict(embed_dim=int(cfg.get("embed_dim", 96)), depths=tuple(cfg.get("depths")),
                num_heads=tuple(cfg.get("num_heads")), window_size=int(cfg.get("window_size", 7)),
                patch_size=int(cfg.get("patch_size", 4)),
                mlp_ratio=float(cfg.get("mlp_ratio", 4.0)),
                droppath_rate=0.0)
  return "Swin-T", kwargs


def _swin_from_hf(sd, cfg, log=None):
  """HF SwinForImageClassification / SwinModel state dict -> our Swin tree."""
  return swin.from_hf_state_dict(sd), _swin_kwargs(cfg)


def _bit_kwargs(cfg, log) -> Tuple[str, dict]:
  if cfg.get("layer_type", "preactivation") != "preactivation":
    raise errors.UnsupportedError(
        f"BiT layer_type={cfg['layer_type']!r}: only 'preactivation' (the "
        "BiT paper's ResNet-v2) is supported.")
  width = int(cfg.get("embedding_size", 64))
  depths = tuple(int(d) for d in cfg["depths"])
  want = [4 * width * 2**i for i in range(len(depths))]
  if list(cfg["hidden_sizes"]) != want:
    raise errors.UnsupportedError(
        f"BiT hidden_sizes {cfg['hidden_sizes']} are not 4 x embedding_size "
        f"x 2**stage ({want}), the layout our ResNet builds.")
  if cfg.get("global_padding") is not None:
    log(f"BiT global_padding={cfg['global_padding']!r}: Hugging Face pads stride-2 convolutions "
        "TF-style (SAME, asymmetric); ours pads symmetrically, so logits differ slightly at the "
        "image borders.")
  return "BiT-R50x1", dict(num_layers=depths, width_factor=1, base_width=width,
                           gn_groups=int(cfg.get("num_groups", 32)), preact=True, root="imagenet",
                           zero_pad_pool=True)


def _bit_from_hf(sd, cfg, log):
  """HF BitForImageClassification (pre-activation) state dict -> our ResNet tree."""
  kw = _bit_kwargs(cfg, log)
  sd = layers.TorchStateDict(sd, what="BiT")
  sd.conv("bit.embedder.convolution", ("conv_root",))
  for s, depth in enumerate(kw[1]["num_layers"]):
    for u in range(depth):
      src, dst = f"bit.encoder.stages.{s}.layers.{u}.", (f"block{s + 1}", f"unit{u + 1}")
      for i in (1, 2, 3):
        sd.conv(f"{src}conv{i}", dst + (f"conv{i}",))
        sd.layer_norm(f"{src}norm{i}", dst + (f"gn{i}",))  # GroupNorm: LayerNorm's names
      if sd.has(src + "downsample.conv.weight"):
        sd.conv(src + "downsample.conv", dst + ("conv_proj",))
  sd.layer_norm("bit.norm", ("norm-pre-head",))
  if sd.has("classifier.1.weight"):
    sd.linear("classifier.1", ("head",))
  return sd.variables()["params"], kw


# ------------------------------------------------------------------------------ DETR (detection).
def load_detr_hf(directory: str) -> Tuple[nn.Module, dict]:
  """(model, variables) of transformers' `DetrForObjectDetection` saved in `directory`
  (config.json + model.safetensors or pytorch_model.bin), ResNet backbone (timm's, as the Hub's
  facebook/detr-resnet-50, or transformers' ResNetBackbone). The variables hold `params` and
  `batch_stats` (the frozen BatchNorms). Apart from `load`: a detector has no classification head
  to refit, its outputs are a dict, and its input is ImageNet-normalised pixels (plus a mask)."""
  from vit_jax.models import detr  # pylint: disable=g-import-not-at-top
  path = os.path.join(directory, "config.json")
  if not os.path.exists(path):
    raise errors.MissingFileError(f"{directory} has no config.json; load_detr_hf reads a directory "
                                  "written by DetrForObjectDetection.save_pretrained.")
  with open(path) as f:
    cfg = json.load(f)
  if cfg.get("model_type") != "detr":
    raise errors.CheckpointError(
        f"{directory}: model_type {cfg.get('model_type')!r}; load_detr_hf reads "
        "'detr' directories (use load() for classifiers).")
  variables = detr.from_hf_state_dict(_hf_state_dict(directory), cfg)
  return detr.DETR(**detr.model_kwargs_from_hf(cfg)), variables


# ------------------------------------------------------------------------------ export to HF.
def _require_transformers():
  try:
    import transformers  # pylint: disable=g-import-not-at-top
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(f"save_hf needs transformers and safetensors: {HF_EXTRA}.") from None
  return transformers, save_file


def save_hf(model: Union[str, nn.Module], params: Params, directory: str) -> str:
  """Writes `params` as a Hugging Face directory (config.json + model.safetensors) that
  ViTForImageClassification / SwinForImageClassification / BitForImageClassification load with
  `from_pretrained` and run to the same logits.

  model: the Module `load` returned (its options decide the config), or a registry name (then
  the registry's defaults, e.g. ViT's tanh-approximated GELU). Returns `directory`.
  """
  transformers, save_file = _require_transformers()
  module = models.get_model(model, num_classes=1) if isinstance(model, str) else model
  params = jax.device_get(flax.core.unfreeze(params))
  family = family_of(module)
  if family is None or family.to_hf is None:
    raise errors.UnsupportedError(
        f"save_hf writes {', '.join(f.name for f in FAMILIES.values() if f.to_hf)} models, not "
        f"{type(module).__name__}.")
  config_class, config, sd = family.to_hf(module, params)
  os.makedirs(directory, exist_ok=True)
  getattr(transformers, config_class)(**config).save_pretrained(directory)
  save_file({k: np.ascontiguousarray(v) for k, v in sd.items()},
            os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
  return directory


def _linear(sd, name, dense):
  sd[name + ".weight"] = np.asarray(dense["kernel"], np.float32).T
  if "bias" in dense:
    sd[name + ".bias"] = np.asarray(dense["bias"], np.float32)


def _block_to_hf(sd, dst, norm_before, attention, norm_after, mlp):
  """One pre-LN block (its LayerNorms, `Attention` and `MlpBlock` params) -> the current Hugging
  Face ViT/DeiT/Swin names under `dst`: layernorm_before/after, attention.{q,k,v,o}_proj,
  mlp.fc1/fc2."""
  for norm, theirs in ((norm_before, "layernorm_before"), (norm_after, "layernorm_after")):
    sd[dst + theirs + ".weight"] = np.asarray(norm["scale"])
    sd[dst + theirs + ".bias"] = np.asarray(norm["bias"])
  for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
    k = np.asarray(attention[ours]["kernel"])
    sd[f"{dst}attention.{theirs}.weight"] = k.reshape(k.shape[0], -1).T
    sd[f"{dst}attention.{theirs}.bias"] = np.asarray(attention[ours]["bias"]).reshape(-1)
  k = np.asarray(attention["out"]["kernel"])
  sd[f"{dst}attention.o_proj.weight"] = k.reshape(-1, k.shape[-1]).T
  sd[f"{dst}attention.o_proj.bias"] = np.asarray(attention["out"]["bias"])
  _linear(sd, dst + "mlp.fc1", mlp["Dense_0"])
  _linear(sd, dst + "mlp.fc2", mlp["Dense_1"])


def _vit_to_hf(m, params, deit=False):
  """ViT -> ViTForImageClassification; distilled DeiT -> DeiTForImageClassificationWithTeacher
  (DeiTForImageClassification without `head_dist`)."""
  if "encoderblock" in params.get("Transformer", {}):
    params = vit.scan_to_unrolled(params)
  if (m.classifier != "token" or m.representation_size or m.resnet is not None
      or m.posemb != "learn"):
    raise errors.UnsupportedError(
        "save_hf writes plain ViTs with a class token, learned position "
        "embeddings and no representation layer (ViTForImageClassification).")
  emb = np.asarray(params["embedding"]["kernel"])  # (P, P, C, D)
  pos = np.asarray(params["Transformer"]["posembed_input"]["pos_embedding"])
  grid = int(round(np.sqrt(pos.shape[1] - 1 - deit)))
  num_classes = int(np.shape(params["head"]["kernel"])[-1]) if "head" in params else 0
  cfg = dict(
      hidden_size=m.hidden_size, num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
      intermediate_size=m.mlp_dim, hidden_act="gelu_pytorch_tanh" if m.approximate_gelu else "gelu",
      image_size=grid * emb.shape[0], patch_size=emb.shape[0], num_channels=emb.shape[2],
      layer_norm_eps=1e-6, qkv_bias=True, num_labels=max(num_classes, 1))
  pre = "deit." if deit else "vit."
  sd = {pre + "embeddings.cls_token": np.asarray(params["cls"]),
        pre + "embeddings.position_embeddings": pos,
        pre + "embeddings.patch_embeddings.projection.weight": emb.transpose(3, 2, 0, 1),
        pre + "embeddings.patch_embeddings.projection.bias":
            np.asarray(params["embedding"]["bias"])}
  if deit:
    sd[pre + "embeddings.distillation_token"] = np.asarray(params["dist"])
  enc = params["Transformer"]
  for i in range(m.num_layers):
    blk = enc[f"encoderblock_{i}"]
    _block_to_hf(sd, f"{pre}layers.{i}.", blk["LayerNorm_0"], blk["MultiHeadDotProductAttention_1"],
                 blk["LayerNorm_2"], blk["MlpBlock_3"])
  sd[pre + "layernorm.weight"] = np.asarray(enc["encoder_norm"]["scale"])
  sd[pre + "layernorm.bias"] = np.asarray(enc["encoder_norm"]["bias"])
  if num_classes and "head_dist" in params:
    _linear(sd, "cls_classifier", params["head"])
    _linear(sd, "distillation_classifier", params["head_dist"])
  elif num_classes:
    _linear(sd, "classifier", params["head"])
  return ("DeiTConfig" if deit else "ViTConfig"), cfg, {
      k: np.asarray(v, np.float32) for k, v in sd.items()}


def _deit_to_hf(m, params):
  """A distilled DeiT -> DeiTForImageClassificationWithTeacher; a plain one is a ViT."""
  return _vit_to_hf(m, params, deit=m.distilled)


def _swin_to_hf(m, params):
  depths, heads = tuple(m.depths), tuple(m.num_heads)
  img = _pair(m.img_size)
  windows = swin.stage_windows(img, m.patch_size, len(depths), m.window_size)
  if any(w != m.window_size for w in windows):
    raise errors.UnsupportedError(f"save_hf: at img_size {img} the stage windows are {windows}; "
                                  "Hugging Face Swin clamps them only at run time, so write models "
                                  "whose every stage is larger than the window.")
  num_classes = int(np.shape(params["head"]["kernel"])[-1]) if "head" in params else 0
  proj = np.asarray(params["patch_embed"]["proj"]["kernel"])
  cfg = dict(
      image_size=img[0], patch_size=m.patch_size, num_channels=proj.shape[2],
      embed_dim=m.embed_dim, depths=list(depths), num_heads=list(heads),
      window_size=m.window_size, mlp_ratio=m.mlp_ratio, layer_norm_eps=1e-5,
      num_labels=max(num_classes, 1))
  sd = {"swin.embeddings.patch_embeddings.projection.weight": proj.transpose(3, 2, 0, 1),
        "swin.embeddings.patch_embeddings.projection.bias":
            np.asarray(params["patch_embed"]["proj"]["bias"]),
        "swin.embeddings.norm.weight": np.asarray(params["patch_embed"]["norm"]["scale"]),
        "swin.embeddings.norm.bias": np.asarray(params["patch_embed"]["norm"]["bias"])}
  for i, depth in enumerate(depths):
    stage = params[f"layers_{i}"]
    for j in range(depth):
      blk, dst = stage[f"blocks_{j}"], f"swin.encoder.layers.{i}.blocks.{j}."
      _block_to_hf(sd, dst, blk["norm1"], blk["attn"], blk["norm2"], blk["mlp"])
      table = np.asarray(blk["attn"]["relative_position_bias_table"])
      sd[dst + "attention.relative_position_bias.relative_position_bias_table"] = table
      win = (int(np.sqrt(table.shape[0])) + 1) // 2
      sd[dst + "attention.relative_position_bias.relative_position_index"] = (
          swin.relative_position_index(win).reshape(-1).astype(np.int64))
    if "downsample" in stage:
      dst = f"swin.encoder.layers.{i}.downsample."
      _linear(sd, dst + "reduction", stage["downsample"]["reduction"])
      sd[dst + "norm.weight"] = np.asarray(stage["downsample"]["norm"]["scale"])
      sd[dst + "norm.bias"] = np.asarray(stage["downsample"]["norm"]["bias"])
  sd["swin.layernorm.weight"] = np.asarray(params["norm"]["scale"])
  sd["swin.layernorm.bias"] = np.asarray(params["norm"]["bias"])
  if num_classes:
    _linear(sd, "classifier", params["head"])
  return "SwinConfig", cfg, {k: v if v.dtype == np.int64 else np.asarray(v, np.float32)
                             for k, v in sd.items()}


def _bit_to_hf(m, params):
  if not m.preact or m.root != "imagenet":
    raise errors.UnsupportedError("save_hf writes BiT ResNet-v2 models (preact=True) with the "
                                  "imagenet root (BitForImageClassification).")
  if not m.zero_pad_pool:
    logging.warning("save_hf: Hugging Face BiT pads the root max-pool with zeros, this model with "
                    "-inf: logits will differ slightly near the image borders.")
  width = int(m.base_width * m.width_factor)
  depths = [int(n) for n in m.num_layers]
  num_classes = int(np.shape(params["head"]["kernel"])[-1]) if "head" in params else 0
  root = np.asarray(params["conv_root"]["kernel"])
  cfg = dict(
      num_channels=root.shape[2], embedding_size=width, depths=depths,
      hidden_sizes=[4 * width * 2**i for i in range(len(depths))], num_groups=m.gn_groups,
      layer_type="preactivation", global_padding=None, num_labels=max(num_classes, 1))
  conv = lambda k: np.asarray(k).transpose(3, 2, 0, 1)
  sd = {"bit.embedder.convolution.weight": conv(root)}
  for s, depth in enumerate(depths):
    for u in range(depth):
      unit, dst = params[f"block{s + 1}"][f"unit{u + 1}"], f"bit.encoder.stages.{s}.layers.{u}."
      for i in (1, 2, 3):
        sd[f"{dst}conv{i}.weight"] = conv(unit[f"conv{i}"]["kernel"])
        sd[f"{dst}norm{i}.weight"] = np.asarray(unit[f"gn{i}"]["scale"])
        sd[f"{dst}norm{i}.bias"] = np.asarray(unit[f"gn{i}"]["bias"])
      if "conv_proj" in unit:
        sd[dst + "downsample.conv.weight"] = conv(unit["conv_proj"]["kernel"])
  sd["bit.norm.weight"] = np.asarray(params["norm-pre-head"]["scale"])
  sd["bit.norm.bias"] = np.asarray(params["norm-pre-head"]["bias"])
  if num_classes:
    _linear(sd, "classifier.1", params["head"])
  return "BitConfig", cfg, {k: np.asarray(v, np.float32) for k, v in sd.items()}


# ------------------------------------------------------------------------------ the families.
# One row per family class; a subclass without its own row (a hybrid is a VisionTransformer)
# takes its nearest base's. Input ranges: the ViT release [-1, 1] (HALF); BiT's release [0, 1];
# Swin, DeiT and BiT on the Hub: ImageNet's mean and std.
FAMILIES = {
    vit.VisionTransformer: Family(
        "ViT", "vit", _vit_from_hf, _vit_to_hf, hf_input=(HALF, HALF), npz_input=(HALF, HALF),
        npz_overrides=_vit_npz_overrides),
    deit.DeiT: Family(
        "DeiT", "deit", _deit_from_hf, _deit_to_hf, hf_input=(IMAGENET_MEAN, IMAGENET_STD),
        npz_input=(HALF, HALF), npz_overrides=_vit_npz_overrides),
    swin.SwinTransformer: Family(
        "Swin", "swin", _swin_from_hf, _swin_to_hf, hf_input=(IMAGENET_MEAN, IMAGENET_STD),
        npz_input=(IMAGENET_MEAN, IMAGENET_STD), img_size_option=True),
    resnet.ResNet: Family(
        "BiT", "bit", _bit_from_hf, _bit_to_hf, hf_input=(IMAGENET_MEAN, IMAGENET_STD),
        npz_input=((0.,) * 3, (1.,) * 3)),
}


# ------------------------------------------------------------------------------ command line.
def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m vit_jax.pretrained",
                                   description="Published checkpoints that load by name.")
  parser.add_argument("--list", action="store_true", help="print the model zoo")
  args = parser.parse_args(argv)
  if args.list:
    print(format_zoo())
    return 0
  parser.print_help()
  return 0


if __name__ == "__main__":
  sys.exit(main())
