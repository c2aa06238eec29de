"""Object detection (DETR): box arithmetic, Hungarian matching, the matched set loss, COCO mAP.

`boxes` (cxcywh <-> xyxy, IoU, generalized IoU), `matching` (per-image Hungarian assignment),
`loss` (DETR's loss: `detr_loss(outputs, targets) -> (loss, metrics)`), `mean_ap` (COCO-style
mAP@[.5:.95] and mAP@0.5). Imports jax, numpy and scipy only.
"""
