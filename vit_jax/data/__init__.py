"""Input pipelines: sources (TFDS, Fashion-MNIST files, image folders), split arithmetic,
preprocessing strings and deterministic, resumable per-host iterators. Never imports models."""
from vit_jax.data.catalog import get_source
from vit_jax.data.pipeline import eval_iterator
from vit_jax.data.pipeline import steps_per_epoch
from vit_jax.data.pipeline import train_iterator
from vit_jax.data.sources import ArraySource
from vit_jax.data.sources import Source
