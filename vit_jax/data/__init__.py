"""Input pipelines: sources (TFDS, Fashion-MNIST files, image folders), split arithmetic,
preprocessing strings and deterministic, resumable per-host iterators. Never imports models."""
import os

# TensorFlow's oneDNN graph rewrites (on by default on CPUs with AVX-512) break RandAugment's
# batched ops with TF 2.21 (a SelectV2 of mismatched shapes: tests/data/test_preprocess.py fails
# with them on, passes with them off) and print a notice at import. The input pipeline gains
# nothing from them: off, unless the user set the variable. Must precede TensorFlow's import.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

# pylint: disable=g-import-not-at-top,wrong-import-position
from vit_jax.data.pipeline import eval_iterator
from vit_jax.data.pipeline import steps_per_epoch
from vit_jax.data.pipeline import train_iterator
from vit_jax.data.sources import ArraySource
from vit_jax.data.sources import get_source
from vit_jax.data.sources import Source
