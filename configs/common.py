"""The keys every config has (the trainer reads each of them), and shared tables.

Durations are given as `X_steps`, `X_epochs` or `X_examples` (set exactly one of each group; the
others stay None) for X in total, lr.warmup, log_every, eval_every and checkpoint_every.
"""
import ml_collections
from ml_collections import config_dict

# TFDS names, splits and class counts of the data sets the configs refer to.
DATASETS = {
    "cifar10": dict(name="tfds:cifar10", train="train", test="test", classes=10),
    "cifar100": dict(name="tfds:cifar100", train="train", test="test", classes=100),
    "pets": dict(name="tfds:oxford_iiit_pet", train="train", test="test", classes=37),
    "flowers": dict(name="tfds:oxford_flowers102", train="train+validation", test="test",
                    classes=102),
    "imagenet1k": dict(name="tfds:imagenet2012", train="train[:99%]", test="validation",
                       classes=1000),
    "imagenet21k": dict(name="tfds:imagenet21k", train="full[51200:]", test="full[:51200]",
                        classes=21843),
}


def _durations(cfg, prefix):
  for unit, kind in (("steps", int), ("epochs", float), ("examples", int)):
    cfg[f"{prefix}_{unit}"] = config_dict.placeholder(kind)


def base_config() -> ml_collections.ConfigDict:
  """Every key the trainer reads, with neutral defaults."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model_name = "ViT-B/16"
  c.model = ml_collections.ConfigDict()  # overrides of the named model's fields

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "fashion_mnist"
  c.dataset.data_dir = config_dict.placeholder(str)
  c.dataset.manual_dir = config_dict.placeholder(str)  # TFDS data sets downloaded by hand
  c.dataset.channels = 3  # image_folder: what images decode to (1 grey, 3 RGB)
  c.dataset.image_key = "image"  # TFDS feature names
  c.dataset.label_key = "label"
  c.dataset.shuffle_buffer = 50_000  # TFDS: records in the per-host shuffle buffer
  c.dataset.tfds_fallback = True  # fashion_mnist: TFDS when Debian's files are missing
  c.dataset.tfds_data_dir = config_dict.placeholder(str)  # ... and its TFDS data_dir
  c.train_split = "train"
  c.eval_split = "test"
  c.pp_train = "decode|value_range(-1,1)"
  c.pp_eval = "decode|value_range(-1,1)"
  c.mixup = 0.0
  c.batch_size = 512
  c.eval_batch_size = 512

  _durations(c, "total")
  _durations(c, "log_every")
  _durations(c, "eval_every")
  _durations(c, "checkpoint_every")
  c.keep_checkpoints = 2
  # Saves are written by a background thread while training goes on (orbax's async
  # checkpointing; still atomic). False: the step waits for each save to be on disk.
  c.checkpoint_async = True

  c.optax = ml_collections.ConfigDict(dict(name="adamw", momentum=0.9, b1=0.9, b2=0.999))
  c.lr = ml_collections.ConfigDict(dict(base=1e-3, decay="cosine", end=0.0))
  _durations(c.lr, "warmup")
  c.wd = 0.0
  c.wd_mask = r".*/kernel"  # decoupled weight decay on kernels only
  c.grad_clip_norm = 1.0
  c.grad_accum_steps = 1
  c.label_smoothing = 0.0
  c.freeze = ""  # regex of frozen parameters

  c.parallel = "jit"  # jit (NamedSharding over the mesh) | pmap
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))  # -1: all that is left
  c.sharding = ml_collections.ConfigDict(dict(min_fsdp_size=2 ** 14, rules=()))
  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator_address = config_dict.placeholder(str)
  c.distributed.num_processes = config_dict.placeholder(int)
  c.distributed.process_id = config_dict.placeholder(int)
  c.distributed.local_device_ids = config_dict.placeholder(str)  # "0,1,2,3" | "all"
  c.distributed.cpu_collectives = "gloo"  # cross-process collectives of CPU devices

  # Few-shot linear evaluation on frozen pre-logits features (the ViT paper's), run every
  # eval_every and at the end; empty `shots` disables it.
  c.fewshot = ml_collections.ConfigDict()
  c.fewshot.shots = ()
  c.fewshot.train_split = "train"
  c.fewshot.test_split = "test"
  # Features are centred and scaled to unit length first, so the ridge is small (2^10, the
  # paper's value for raw features, made a 25-shot ViT probe score 0.49 instead of 0.57 here).
  c.fewshot.l2_reg = 1.0
  c.fewshot.num_trials = 1

  c.pretrained = ml_collections.ConfigDict()
  c.pretrained.path = config_dict.placeholder(str)
  c.pretrained.strict = True
  c.pretrained.required = False  # True: a run without pretrained.path is an error (fine-tuning)
  c.export_npz = True
  return c
