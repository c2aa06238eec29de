"""Data sources by name: `get_source(cfg)` builds the source `cfg.name` names (the names and the
fields each reads: vit_jax/data/sources.py's docstring).

Its own module so that the imports go one way: vit_jax/data/canvases.py builds on sources.py (its
`CanvasSource` is a `sources.Source` reading Fashion-MNIST through it), and this module imports
both.
"""
from vit_jax import errors
from vit_jax.data import canvases
from vit_jax.data import sources


def get_source(cfg) -> sources.Source:
  """The source named by `cfg.name` (sources.py's docstring lists the fields each reads). When the
  data are missing or cannot be prepared, the error ends with `cfg.prepare` (a config's own
  instructions for getting its data set), if given."""
  sources.hide_accelerators()
  try:
    return _get_source(cfg)
  except FileNotFoundError as e:
    if cfg.get("prepare"):
      raise errors.MissingFileError(f"{e} {cfg.get('prepare')}") from None
    raise
  except ValueError as e:
    if cfg.get("prepare") and ("data_dir" in str(e) or "TFDS has no" in str(e)):
      raise errors.DataError(f"{e} {cfg.get('prepare')}") from None
    raise


def _get_source(cfg) -> sources.Source:
  name = cfg.get("name")
  if name == "fashion_mnist":
    return sources.fashion_mnist(cfg.get("data_dir"),
                                 tfds_fallback=cfg.get("tfds_fallback", True),
                                 tfds_data_dir=cfg.get("tfds_data_dir"))
  if isinstance(name, str) and name.startswith("tfds:") and len(name) > len("tfds:"):
    return sources.TfdsSource(name[len("tfds:"):], data_dir=cfg.get("data_dir"),
                              manual_dir=cfg.get("manual_dir"),
                              image_key=cfg.get("image_key", "image"),
                              label_key=cfg.get("label_key", "label"),
                              shuffle_buffer=cfg.get("shuffle_buffer", 50_000),
                              shuffle_files=cfg.get("shuffle_files", True),
                              file_interleave=cfg.get("file_interleave", 16))
  if name == "image_folder":
    return sources.image_folder(cfg.get("data_dir"), channels=cfg.get("channels", 3))
  if name == "fashion_mnist_canvases":
    return canvases.CanvasSource(data_dir=cfg.get("data_dir"))
  raise errors.DataError(f"Unknown data source {name!r}; known: {', '.join(sources.KNOWN_NAMES)} "
                         "(e.g. 'tfds:cifar10').")
