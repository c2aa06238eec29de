r"""The Image Transformer (Parmar et al., 2018) on Fashion-MNIST: generation, in bits per dimension.

  python -m vit_jax.main --config=configs/image_transformer.py:2d --workdir=workdirs/imt_2d
  python -m vit_jax.sample --workdir=workdirs/imt_2d --num=16 --out=samples.png

Args: `2d` (the default: local 2D attention, query blocks of 7x7 intensities, each seeing 7 rows
above and 7 columns to either side: 294 keys), `1d` (local 1D attention: blocks of 49 in raster
order, each seeing itself and the 245 positions before it: 294 keys too), `full` (a causal
transformer over all 784 intensities: the baseline). Same width, depth and schedule for the three,
so they differ only in what each position may attend to. The same trainer as classification
(`loss="generation"`, vit_jax/tasks/generation.py): checkpoints, resume and preemption included;
the 10,000 test images are evaluated once, at the end (`final_test_bits_per_dim`).
"""
from configs import common

ATTENTION = {
    "2d": ("ImageTransformer-2D", dict(query_shape=(7, 7), memory_flange=(7, 7))),
    "1d": ("ImageTransformer-1D", dict(block_length=49, memory_length=245)),
    "full": ("ImageTransformer-Full", {}),
}
# Small enough for a CPU: a step of 32 images of the 2D model took 16.8 s (1D 10.0 s, full 31.5 s)
# at width 64 / 3 layers on the 2-core machine loaded with 6 other jobs.
SIZE = dict(hidden_size=32, mlp_dim=128, num_heads=2, num_layers=2)


def get_config(arg: str = "2d"):
  arg = arg or "2d"
  if arg not in ATTENTION:
    raise ValueError(f"Unknown image_transformer config arg {arg!r}; known: "
                     f"{', '.join(ATTENTION)}")
  name, overrides = ATTENTION[arg]
  c = common.base_config()
  c.model_name = name
  c.model.update(dict(SIZE, **overrides))
  c.loss = "generation"
  data = common.DATASETS["fashion_mnist"]
  c.dataset.name = data["name"]
  c.train_split, c.eval_split, c.test_split = data["train"], data["val"], data["test"]
  c.evals = ("task",)
  c.pp_train = c.pp_eval = "decode"  # the intensities 0..255 are what is modelled
  c.batch_size = 32
  c.eval_batch_size = 100  # full attention at 500: 2.4 GB of logits per layer, killed (OOM)
  c.total_epochs = 0.15  # 8,100 images: experiments/image_transformer.py
  c.log_every_steps = 50
  c.checkpoint_every_steps = 250
  c.optax.name = "adamw"
  c.lr.base = 1e-3
  c.lr.warmup_steps = 100
  c.lr.decay = "cosine"
  c.wd = 0.0
  return c
