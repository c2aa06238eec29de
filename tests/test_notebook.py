"""notebooks/vit_jax.ipynb, executed top to bottom by nbclient with tiny parameters injected after
its "parameters" cell (as papermill does), on this virtualenv's Python; each section's outputs and
files are checked against what it claims."""
import gzip
import importlib.util
import json
import os
import re
import sys

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebook extra: pip install -e '.[notebook]'")
nbclient = pytest.importorskip("nbclient", reason="the notebook extra: pip install -e '.[notebook]'")
pytest.importorskip("ipykernel", reason="the notebook extra: pip install -e '.[notebook]'")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "vit_jax.ipynb")
FMNIST = "/usr/share/datasets/fashion-mnist"
FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                  "Sneaker", "Bag", "Ankle boot")
TINY = dict(
    MODEL_OVERRIDES={"hidden_size": 16, "mlp_dim": 32, "num_heads": 2, "num_layers": 2},
    TRAIN_IMAGES=256, VAL_IMAGES=64, TRAIN_STEPS=4, BATCH_SIZE=32,
    CLASSIFY_IMAGES=3, ATTENTION_IMAGES=1,
    FOLDER_TRAIN_PER_CLASS=4, FOLDER_TEST_PER_CLASS=2, FINETUNE_STEPS=3, FINETUNE_BATCH=8)
KERNEL = "vit_jax_notebook_test"


def inject(nb, params):
  """A code cell setting `params`, tagged "injected-parameters", after the "parameters" cell."""
  tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1, "the notebook needs exactly one cell tagged 'parameters'"
  cell = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items()))
  cell.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(tagged[0] + 1, cell)
  return nb


def text(cell) -> str:
  return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def pngs(cell) -> list:
  return [o for o in cell.outputs if "image/png" in o.get("data", {})]


def cell_with(nb, snippet):
  found = [c for c in nb.cells if c.cell_type == "code" and snippet in c.source]
  assert len(found) == 1, snippet
  return found[0]


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  """The notebook run once with TINY in a temporary directory, on this interpreter's kernel."""
  if not os.path.exists(os.path.join(FMNIST, "t10k-labels-idx1-ubyte.gz")):
    pytest.skip(f"{FMNIST} missing (make data)")
  tmp = tmp_path_factory.mktemp("notebook")
  # A kernelspec for this interpreter, so that the kernel is this virtualenv's Python whatever
  # "python3" means to Jupyter here.
  spec = tmp / "jupyter" / "kernels" / KERNEL
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "vit_jax test", "language": "python"}))
  env = dict(JUPYTER_PATH=str(tmp / "jupyter"), JAX_PLATFORMS="cpu",
             VIT_JAX_PRETRAINED_DIR=str(tmp / "zoo_cache"),
             # One CPU device, as a user's kernel has (conftest.py asks for 8 fake ones).
             XLA_FLAGS=re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                              os.environ.get("XLA_FLAGS", "")).strip())
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)  # the kernel starts with this process's environment
  try:
    nb = inject(nbformat.read(NOTEBOOK, as_version=4), dict(TINY, WORK_DIR=str(tmp / "work")))
    nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=300, startup_timeout=120,
                            resources={"metadata": {"path": str(tmp)}}).execute()
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  return nb, tmp / "work"


def test_the_notebook_runs_with_tiny_parameters(executed):
  nb, work = executed
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]
  assert not errors  # nbclient raises on a failing cell; this is the record of it

  # 1. The zoo name offline: the MissingFileError naming where to put the file.
  zoo = text(cell_with(nb, "pretrained.load(ZOO_NAME)"))
  assert "MissingFileError:" in zoo and "downloads are off" in zoo
  assert os.path.join(os.path.dirname(work), "zoo_cache", "ViT-B_16.npz") in zoo
  # ... and a Hugging Face directory written by save_hf, read back with the same logits.
  hf = text(cell_with(nb, "pretrained.load_with_info(hf_dir)"))
  assert sorted(os.listdir(work / "hf_vit_mu")) == ["config.json", "model.safetensors"]
  assert "input (28, 28, 1)" in hf
  assert float(re.search(r"difference after the round trip: (\S+)", hf).group(1)) < 1e-4

  # 2. Training through the CLI's config system: the overrides took (steps, model width).
  train = text(cell_with(nb, "train.train_and_evaluate(fmnist_config"))
  assert "python -m vit_jax.main \\\n    --config=configs/fashion_mnist.py:vit" in train
  assert re.search(r"trained 4 steps \(128 images\).*val accuracy: [\d.]+% on 64 images", train)
  config = json.loads((work / "fmnist" / "config.json").read_text())
  assert config["total_steps"] == 4 and config["model"]["hidden_size"] == 16
  assert (work / "fmnist" / "params.npz").exists()

  # The first test images, with their true classes read here from Debian's file.
  with gzip.open(os.path.join(FMNIST, "t10k-labels-idx1-ubyte.gz")) as f:
    truth = np.frombuffer(f.read(), np.uint8, offset=8)[:3]
  classified = text(cell_with(nb, "predict.load(fmnist_dir)"))
  lines = re.findall(r"test image (\d): (.+?) +predicted (.+)", classified)
  assert [(int(i), name) for i, name, _ in lines] == [
      (i, FMNIST_CLASSES[k]) for i, k in enumerate(truth)]
  for _, _, guesses in lines:  # top 3, probabilities in descending order
    p = [int(x) for x in re.findall(r" (\d+)%", guesses)]
    assert len(p) == 3 and p == sorted(p, reverse=True)
  assert re.search(r"\n[0-3]/3 correct", classified)

  # The attention rollout: PNG files on the 4x4 token grid of 7-pixel patches, one shown.
  attention = cell_with(nb, "predict.attention_maps(predictor, x)")
  assert "rollout grid (4, 4) | heads 2" in text(attention)
  assert sorted(os.listdir(work / "attention")) == [
      "test0_grid.png", "test0_head0.png", "test0_head1.png", "test0_rollout.png"]
  assert len(pngs(attention)) == 1

  # 3. The image folder: 4 classes, the counts asked for, real PNGs.
  for split, n in (("train", 4), ("test", 2)):
    assert sorted(os.listdir(work / "image_folder" / split)) == [
        "bags", "footwear", "tops", "trousers_dresses"]
    for group in os.listdir(work / "image_folder" / split):
      files = os.listdir(work / "image_folder" / split / group)
      assert len(files) == n and all(f.endswith(".png") for f in files)
  finetune = text(cell_with(nb, "train.train_and_evaluate(finetune_config"))
  assert re.search(r"fine-tuned 3 steps \(24 images\).*test accuracy: [\d.]+% on 8 images",
                   finetune)
  ft_config = json.loads((work / "finetune" / "config.json").read_text())
  assert ft_config["pretrained"]["path"] == str(work / "fmnist" / "params.npz")
  assert ft_config["dataset"]["name"] == "image_folder"

  # 4. The plot of both metrics.jsonl files.
  plot = cell_with(nb, "metrics_lib.read_jsonl")
  rows = [json.loads(l) for l in (work / "finetune" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "train_loss" in r] == [1, 2, 3]  # log_every_steps=1
  assert re.search(r"finetune/metrics.jsonl: \d+ rows \(3 training, \d+ with test accuracy\)",
                   text(plot))
  assert len(pngs(plot)) == 1

  # 5. The plan for a TPU slice, or the planner's error naming libtpu.
  planned = text(cell_with(nb, "plan_lib.plan(finetune_config"))
  if importlib.util.find_spec("libtpu"):
    assert "Plan: ViT-Mu/7, batch 8 on v5e:2x2: 4 x TPU v5 lite" in planned
    assert "train step" in planned and "per chip" in planned and "fits: yes" in planned
  else:
    assert "error: TPU plans need libtpu" in planned
