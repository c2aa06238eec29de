r"""A picture of a trained DETR's detections on Fashion-MNIST canvases (the README's picture).

  python -m experiments.detr_picture --workdir=workdirs/detr_fmnist --out=docs/detr_canvases.png

Loads the run's latest checkpoint (vit_jax.predict.load: model from its config.json, pp_eval),
draws the first `--num` canvases of its test split (the canvases the run's final mAP counted) with
the ground-truth boxes (dashed, white) and every query whose best real class has probability >=
`--threshold` (solid, with class name and probability). Prints one line per canvas: objects,
detections, and how many ground-truth boxes a detection of the right class overlaps at IoU >= 0.5.
"""
import argparse
import json
import os
import sys
from typing import Dict, List, Sequence

import numpy as np

from vit_jax import predict
from vit_jax.data import canvases
from vit_jax.data import splits as splits_lib
from vit_jax.detection import boxes as boxes_lib
from vit_jax.evaluators import detection as detection_eval


def detections(predictor: predict.Predictor, batch: Dict[str, np.ndarray],
               threshold: float) -> List[Dict[str, np.ndarray]]:
  """Per canvas: `boxes` (n, 4) xyxy relative, `labels` (n,), `scores` (n,) of the queries whose
  best real class (not "no object") has softmax probability >= threshold."""
  x = predictor.preprocess(batch["image"])
  out = predictor.model.apply(predictor.variables, x, batch["image_mask"], train=False)
  # The mAP evaluator's post-processing (DETR's), then the threshold.
  return [{k: v[d["scores"] >= threshold] for k, v in d.items()}
          for d in detection_eval.postprocess(out["logits"], out["boxes"])]


def found(det: Dict[str, np.ndarray], gt_boxes: np.ndarray, gt_labels: np.ndarray) -> int:
  """Ground-truth boxes that some detection of their class overlaps with IoU >= 0.5."""
  if not len(det["boxes"]) or not len(gt_boxes):
    return 0
  iou = np.asarray(boxes_lib.pairwise_iou(gt_boxes, det["boxes"])[0])  # (gt, det)
  same = gt_labels[:, None] == det["labels"][None, :]
  return int(np.sum(np.any((iou >= 0.5) & same, axis=1)))


def draw(path: str, images: np.ndarray, gts: Sequence[tuple], dets: Sequence[dict],
         class_names: Sequence[str], columns: int = 4):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib import patches  # pylint: disable=g-import-not-at-top
  n = len(images)
  rows = -(-n // columns)
  fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3 * rows), squeeze=False)
  colours = plt.get_cmap("tab10")
  for ax in axes.ravel():
    ax.axis("off")
  for ax, image, (gt_boxes, gt_labels), det in zip(axes.ravel(), images, gts, dets):
    size = image.shape[0]
    ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255)
    for (x0, y0, x1, y1) in gt_boxes * size:
      ax.add_patch(patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="white",
                                     ls="--", lw=1))
    for (x0, y0, x1, y1), label, score in zip(det["boxes"] * size, det["labels"], det["scores"]):
      colour = colours(int(label) % 10)
      ax.add_patch(patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=colour, lw=1.5))
      ax.text(x0, y0 - 1, f"{class_names[label]} {score:.2f}", color=colour, fontsize=7,
              va="bottom")
  fig.suptitle("DETR on Fashion-MNIST canvases: ground truth dashed, detections solid", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="a DETR run's workdir")
  parser.add_argument("--out", required=True, help="the PNG to write")
  parser.add_argument("--num", type=int, default=8, help="canvases to draw")
  parser.add_argument("--threshold", type=float, default=0.5,
                      help="minimum class probability of a drawn detection")
  args = parser.parse_args(argv)
  with open(os.path.join(args.workdir, "config.json")) as f:
    config = json.load(f)
  if config.get("loss") != "detr":  # before the checkpoint is read
    print(f"{args.workdir} is not a DETR run (its config's loss is {config.get('loss')!r}).",
          file=sys.stderr)
    return 2
  predictor = predict.load(args.workdir)
  base, indices = splits_lib.resolve(config["test_split"], canvases.SPLIT_SIZES)[0]
  source = canvases.CanvasSource()
  batch = source.batch(base, indices[:args.num])
  dets = detections(predictor, batch, args.threshold)
  gts = [(g["boxes"], g["labels"]) for g in detection_eval.ground_truth(batch)]
  for i, (det, gt) in enumerate(zip(dets, gts)):
    print(f"canvas {int(indices[i])}: {len(gt[0])} objects, {len(det['boxes'])} detections, "
          f"{found(det, *gt)} found (right class, IoU >= 0.5)")
  draw(args.out, batch["image"], gts, dets, source.class_names)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
