"""Tests for vit_jax/data/catalog.py: sources by name, and imports that go one way.

(Each source's own behaviour is tests/data/test_sources.py's and test_canvases.py's.)
"""
import ast

import pytest

from vit_jax import data
from vit_jax import errors
from vit_jax.data import canvases
from vit_jax.data import catalog


def _imported_modules(module) -> set:
  tree = ast.parse(open(module.__file__).read())
  names = set()
  for node in ast.walk(tree):  # lazy imports inside functions count too
    if isinstance(node, ast.ImportFrom) and node.module:
      names.update(f"{node.module}.{a.name}" for a in node.names)
    elif isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
  return names


def test_sources_does_not_import_canvases():
  """canvases.py builds on sources.py; the name -> source table that needs both is here."""
  from vit_jax.data import sources  # pylint: disable=g-import-not-at-top
  assert "vit_jax.data.sources" in _imported_modules(canvases)
  assert not any("canvases" in m for m in _imported_modules(sources))
  assert data.get_source is catalog.get_source


def test_canvases_by_name():
  try:
    source = catalog.get_source({"name": "fashion_mnist_canvases"})
  except errors.MissingFileError:
    pytest.skip("Debian's Fashion-MNIST files are not installed")
  assert isinstance(source, canvases.CanvasSource)
  assert source.detection and source.num_classes == 10
  assert source.batch("val", [0, 1])["image"].shape == (2, 128, 128, 1)


def test_an_unknown_name_lists_the_known_ones():
  with pytest.raises(errors.DataError,
                     match=r"Unknown data source 'cifar'.*fashion_mnist_canvases"):
    catalog.get_source({"name": "cifar"})
