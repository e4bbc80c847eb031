"""Box metrics shared by the grounding benchmarks: IoU, the mean box, Acc@IoU and Recall@k.

Coordinate convention
---------------------
Boxes are ``[x1, y1, x2, y2]`` in pixels of the image. IoU is computed in the *continuous* (DETR / torchvision)
convention that the original evaluation uses: a box covers the real interval ``[x1, x2) x [y1, y2)``, so its
area is ``(x2 - x1) * (y2 - y1)`` and two boxes that only touch along an edge overlap by 0. Ground-truth
``[x, y, w, h]`` boxes become ``[x, y, x + w, y + h]`` (``xywh_to_xyxy``).

Model answers, by contrast, are decoded to *inclusive* pixel corners (``ferret.regions.Box``: x2 is the last
pixel column). Scoring them in the continuous convention, as the original does, leaves them up to one pixel
short on the right and bottom; we keep that so the numbers stay comparable with published ones.

A box with zero or negative width or height has area 0. IoU with such a box is 0 (never NaN), including
the degenerate case of two zero-area boxes, whose union is 0. This is how answers without any box (scored as
the zero box ``[0, 0, 0, 0]``) and point answers (scored as the zero-size box ``[x, y, x, y]``) get IoU 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "ZERO_BOX",
    "accuracy",
    "box_area",
    "box_iou",
    "box_iou_matrix",
    "hit_at_k",
    "mean_box",
    "merge_boxes",
    "recall_at_k",
    "xywh_to_xyxy",
]

# The box an answer without any box is scored with (the original's "0-area box").
ZERO_BOX = (0.0, 0.0, 0.0, 0.0)


def xywh_to_xyxy(box: Sequence[float]) -> tuple[float, float, float, float]:
    """``[x, y, w, h]`` -> ``[x, y, x + w, y + h]`` (COCO/MDETR ground truth to corners)."""
    if len(box) != 4:
        raise ValueError(f"expected an [x, y, w, h] box with 4 numbers, got {list(box)!r}")
    x, y, w, h = (float(v) for v in box)
    return (x, y, x + w, y + h)


def _as_boxes(boxes: Sequence[Sequence[float]] | np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(boxes, dtype=np.float64)
    if array.ndim == 1 and array.size == 4:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"{name} must be boxes shaped [N, 4] (x1, y1, x2, y2), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds a non-finite coordinate: {array.tolist()!r}")
    return array


def box_area(boxes: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """Areas of boxes ``[N, 4]`` -> ``[N]``; boxes with x2 <= x1 or y2 <= y1 have area 0."""
    array = _as_boxes(boxes, "boxes")
    return np.clip(array[:, 2] - array[:, 0], 0, None) * np.clip(array[:, 3] - array[:, 1], 0, None)


def box_iou_matrix(
    boxes1: Sequence[Sequence[float]] | np.ndarray, boxes2: Sequence[Sequence[float]] | np.ndarray
) -> np.ndarray:
    """Pairwise IoU of boxes1 ``[N, 4]`` and boxes2 ``[M, 4]`` -> ``[N, M]``, in the continuous convention.

    Pairs whose union is 0 (both boxes of zero area) get IoU 0.
    """
    a = _as_boxes(boxes1, "boxes1")
    b = _as_boxes(boxes2, "boxes2")
    area_a = box_area(a)
    area_b = box_area(b)
    left_top = np.maximum(a[:, None, :2], b[None, :, :2])  # [N, M, 2]
    right_bottom = np.minimum(a[:, None, 2:], b[None, :, 2:])  # [N, M, 2]
    wh = np.clip(right_bottom - left_top, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    iou = np.zeros_like(inter)
    np.divide(inter, union, out=iou, where=union > 0)
    return iou


def box_iou(box1: Sequence[float], box2: Sequence[float]) -> float:
    """IoU of two ``[x1, y1, x2, y2]`` boxes (continuous convention; 0 when either has zero area)."""
    return float(box_iou_matrix([box1], [box2])[0, 0])


def mean_box(boxes: Sequence[Sequence[float]] | np.ndarray) -> tuple[float, float, float, float]:
    """The coordinate-wise mean of boxes ``[N, 4]`` (N >= 1), as the original's "mean" score uses."""
    array = _as_boxes(boxes, "boxes")
    if array.shape[0] == 0:
        raise ValueError("mean_box needs at least one box")
    return tuple(float(v) for v in array.mean(axis=0))  # type: ignore[return-value]


def merge_boxes(boxes: Sequence[Sequence[float]] | np.ndarray) -> tuple[float, float, float, float]:
    """The smallest box enclosing all boxes ``[N, 4]`` (N >= 1): Flickr30k's "merged" ground truth."""
    array = _as_boxes(boxes, "boxes")
    if array.shape[0] == 0:
        raise ValueError("merge_boxes needs at least one box")
    return (
        float(array[:, 0].min()),
        float(array[:, 1].min()),
        float(array[:, 2].max()),
        float(array[:, 3].max()),
    )


def hit_at_k(ious: Sequence[float] | np.ndarray, k: int | None, threshold: float = 0.5) -> bool:
    """Whether any of the first ``k`` ranked IoUs reaches ``threshold`` (``k=None``: any of them, the upper bound).

    ``ious`` are the IoUs of a query's predicted boxes, in the model's order, each already reduced over the
    ground-truth boxes (max). An empty list is a miss.
    """
    values = np.asarray(ious, dtype=np.float64).reshape(-1)
    if k is not None:
        if k < 1:
            raise ValueError(f"k must be >= 1 (or None for the upper bound), got {k}")
        values = values[:k]
    return bool(values.size > 0 and values.max() >= threshold)


def accuracy(ious: Sequence[float] | np.ndarray, threshold: float = 0.5) -> float:
    """Acc@threshold: the fraction of queries whose (single) IoU reaches ``threshold``. 0.0 for no queries."""
    values = np.asarray(ious, dtype=np.float64).reshape(-1)
    if values.size == 0:
        return 0.0
    return float((values >= threshold).mean())


def recall_at_k(
    ranked_ious: Sequence[Sequence[float]], k: int | None, threshold: float = 0.5
) -> float:
    """Recall@k over queries: the fraction whose first ``k`` boxes hold one with IoU >= threshold.

    ``ranked_ious[q]`` lists query q's IoUs in the model's order; ``k=None`` gives the upper bound (any box).
    0.0 for no queries.
    """
    if len(ranked_ious) == 0:
        return 0.0
    return sum(hit_at_k(ious, k, threshold) for ious in ranked_ious) / len(ranked_ious)
