"""vit_jax: vision transformers in JAX/Flax."""
import os

# TensorFlow (the input pipelines' only use of it) runs its oneDNN graph rewrites by default on
# CPUs with AVX-512, and with TF 2.21 they break RandAugment's batched ops (a SelectV2 of
# mismatched shapes; tests/data/test_preprocess.py fails with them on and passes with them off)
# and print a notice at import. The pipeline gains nothing from them: off, unless the user set
# the variable. Here, so that it precedes TensorFlow's import wherever vit_jax is entered.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
