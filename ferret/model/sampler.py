"""The spatial-aware visual sampler: one feature vector per referred region.

This module owns everything between a region's mask and its ``<region_fea>`` embedding:

* ``sample_region_points`` turns masks into a fixed number of normalised point coordinates;
* ``sample_features`` reads the CLIP patch-feature map at those points (bilinear, ``grid_sample`` semantics);
* ``group_points`` plans the point-cloud hierarchy: farthest-point anchors and k-nearest neighbours per stage;
* ``SpatialAwareVisualSampler`` aggregates each neighbourhood and projects the region to the LLM width.

Parameter names and shapes equal those of the original ``GeoRegionSampler``, so released
``model.region_geo_sampler.*`` weights load unchanged.

**The algorithm** (the original's). A region's P points ``p = [f; x, y]`` (C features read bilinearly from the
patch map, plus the two normalised coordinates) go through stages i = 0, 1: farthest-point sampling picks S_i anchors,
each anchor takes its k_i nearest points, and every (anchor, neighbour) pair is encoded as

    h = conv(cat(diff_proj(p_nb - p_anc), p_anc)),   y = LayerNorm(ReLU(h)),   anchor feature = max_j y_j

(a (C+2)x(C+2) Linear, then a 2(C+2) -> C kernel-1 convolution). The anchors and their features are the next
stage's points. The last stage's S features are flattened and projected to the LLM width.

**Why the fast path is exact.** Everything before the ReLU is affine, so with ``WD, bD`` diff_proj's weight and
bias and ``Wd, Wa`` the convolution's columns for the diff half and the anchor half:

    h = (Wd WD) (p_nb - p_anc) + [Wa p_anc + Wd bD + b]  =  u[nb] - u[anc] + a[anc]

A pair costs two additions instead of two matrix products. In stage 0 the features are themselves bilinear
interpolations of patch features, and interpolation is linear too: ``u`` and ``a`` are interpolated from the
projected *patches* (each touched patch of an image is projected once, however many regions and points read it),
plus the coordinate columns. The product ``Wd WD`` is formed when enough rows share it (always in inference, where
the folded weights are cached until the parameters change). The per-pair subtraction, ReLU, LayerNorm and pooling
run fused (``ferret.model.kernels.pair_pool``): no [R, S, k, C] tensor is kept for the backward pass.

Precision: ``u`` enters only through differences, so its gradient is a small difference of what a point receives as
a neighbour and as an anchor. The kernel nets the two per point as they arrive, and stage 1 computes ``u`` from
points centred per region, so on features without a large common component the gradients stay within 1e-5 of a
float64 run at the released sizes (closer than the fp32 original's). Known limit: when every patch shares a large
component (measured with a 4-sigma offset added to all patches), stage 0's projection and feature-map gradients
drift to ~3e-4 of a float64 run, against ~1e-5 for the fp32 original; the forward pass is unaffected (2.5e-6).
``tests/sampler_reference.py`` implements the original step by step, and the tests check the two agree to 1e-5,
forward and backward. ``scripts/bench/bench_sampler.py`` measures the speed-up.

**Neighbour ties.** On pixel grids many points are exactly equidistant from an anchor, so which of them make the
k-th cut is decided by rounding. With ``transposed=True`` (the original's convention, used by checkpoints that do
not set ``region_feature_axes``) distances are computed as the original did, ``-2 a.b + |a|^2 + |b|^2`` with a
batched matrix product, and cut with ``topk(sorted=False)``, so the released weights see the neighbourhoods they were
trained with. Otherwise distances are exact coordinate differences, cut with ``topk(sorted=True)``: exact ties then
stay ties, decided by ``topk`` alone.

The folded path reads the weights of the child layers directly. DeepSpeed ZeRO-3 detects and gathers such
"external" parameters on its own, and FSDP keeps the sampler in the root unit. Quantising the sampler's Linear layers
(bitsandbytes) is not supported: keep ``region_geo_sampler`` out of quantisation, as is done for ``mm_projector``.

**Coordinates.** A point is ``(x / W, y / H)`` with x the column and y the row of the mask. The original read the
feature map at the location mirrored across the diagonal (row = x, col = y). ``transposed=True`` reproduces that
read, which the released weights were trained with; ``transposed=False`` reads at the region itself.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ferret.model.kernels.pair_pool import Bag, pair_pool

logger = logging.getLogger(__name__)

__all__ = [
    "DISTANCES",
    "POOLER_MODES",
    "PointGroups",
    "ConvReLULayerNorm1d",
    "SpatialAwareVisualSampler",
    "bilinear_corners",
    "canonical_point_order",
    "farthest_point_sample",
    "fps_start_index",
    "gather_points",
    "group_points",
    "knn_indices",
    "sample_features",
    "sample_region_points",
]

POOLER_MODES = ("max", "mean")
# "exact": (a - b)^2 summed; "original": -2 a.b + |a|^2 + |b|^2 as the original computed it (its rounding picks
# among equidistant neighbours).
DISTANCES = ("exact", "original")


# --------------------------------------------------------------------------------------------------------------
# Masks -> points
# --------------------------------------------------------------------------------------------------------------


def _as_bool_mask(mask, index: int) -> torch.Tensor:
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(mask)
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"region mask {index}: expected a 2-D bool tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError(
            f"region mask {index}: expected a 2-D bool tensor [H, W], got dtype {mask.dtype} "
            f"and shape {tuple(mask.shape)}"
        )
    return mask


def _hash32(index: torch.Tensor, seed: int) -> torch.Tensor:
    """Integers in [0, 2^32) that depend only on (index, seed): a 32-bit integer mix in int64 arithmetic (which
    cannot overflow). Used by the deterministic mode, so a region's points do not depend on its batch."""
    mask = 0xFFFFFFFF
    x = (index.long() * 0x27D4EB2D + (seed * 0x165667B1 + 0x3C6EF372)) & mask
    for multiplier in (0x7FEB352D, 0x446CA68B):
        x = x ^ (x >> 16)
        x = (x * multiplier) & mask
    return x ^ (x >> 15)


def sample_region_points(
    masks: Sequence[torch.Tensor],
    num_points: int = 512,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """Sample a fixed number of pixel coordinates inside each mask.

    Args:
        masks: R bool masks, mask i shaped [H_i, W_i] (row = y). Numpy bool arrays are accepted too.
        num_points: points per region. A mask with more True pixels gives a uniformly random subset without repeats.
            A mask with fewer gives every True pixel once, plus uniformly random repeats (the original's
            ``rand_sample_repeat``).
        generator: source of randomness; with a seeded generator the result is reproducible.
        seed: deterministic mode (evaluation): the subset and the repeats are a fixed hash of (pixel, seed), so a
            region's points depend only on its own mask, never on the other regions of the batch.

    Returns:
        [R, num_points, 2] float32 tensor of ``(x / W, y / H)`` in [0, 1), on the device of the first mask.
        The points are in random order.

    All masks are handled at once and only their True pixels are drawn from: every True pixel gets a random key
    (or a hash of its position), one stable sort by (region, key) puts each region's pixels in random order, and
    each region takes its first ``num_points``. Raises ValueError naming the index of an empty, non-bool or
    non-2-D mask.
    """
    if num_points <= 0:
        raise ValueError(f"num_points must be positive, got {num_points}")
    checked = [_as_bool_mask(m, i) for i, m in enumerate(masks)]
    if not checked:
        return torch.empty(0, num_points, 2)
    device = checked[0].device
    num_regions = len(checked)
    heights = torch.tensor([m.shape[0] for m in checked], device=device)
    widths = torch.tensor([m.shape[1] for m in checked], device=device)
    ends = torch.cumsum(heights * widths, 0)
    starts = ends - heights * widths

    true_pixels = torch.cat([m.to(device).reshape(-1) for m in checked]).nonzero()[:, 0]  # [T], global positions
    region = torch.searchsorted(ends, true_pixels, right=True)
    counts = torch.bincount(region, minlength=num_regions)
    empty = (counts == 0).nonzero()
    if len(empty):
        raise ValueError(f"region mask {int(empty[0])} is empty: at least one True pixel is needed")
    local = true_pixels - starts[region]  # pixel index inside its own mask, row-major

    if seed is not None:
        keys = _hash32(local, seed)
        draws = _hash32(torch.arange(num_points, device=device), seed + 1).double().div_(2.0**32)
        draws = draws.expand(num_regions, -1)
    else:
        gen_device = generator.device if generator is not None else device
        keys = torch.randint(0, 1 << 32, local.shape, generator=generator, device=gen_device).to(device)
        draws = torch.rand((num_regions, num_points), generator=generator, device=gen_device).to(device).double()
    order = torch.sort(region * (1 << 32) + keys, stable=True).indices  # regions stay contiguous, pixels shuffled
    shuffled = local[order]

    # Slot j takes the j-th shuffled pixel while there are any left, then a uniformly random repeat.
    slot = torch.arange(num_points, device=device).expand(num_regions, -1)
    repeat = torch.minimum((draws * counts[:, None]).long(), counts[:, None] - 1)
    slot = torch.where(slot < counts[:, None], slot, repeat)
    first = torch.cumsum(counts, 0) - counts
    pixel = shuffled[first[:, None] + slot]  # [R, num_points]
    width = widths[:, None]
    x = (pixel % width).float() / width.float()
    y = torch.div(pixel, width, rounding_mode="floor").float() / heights[:, None].float()
    return torch.stack([x, y], dim=-1)


# --------------------------------------------------------------------------------------------------------------
# Points -> initial features
# --------------------------------------------------------------------------------------------------------------


def bilinear_corners(points: torch.Tensor, side: int, transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The four patches and weights of a bilinear read at each point of a [side, side] map.

    This is ``grid_sample(mode="bilinear", padding_mode="zeros", align_corners=True)`` at ``2 * pos - 1`` (or at
    ``2 * pos.flip(-1) - 1`` when ``transposed``, the original's read at row = x, col = y).

    Args:
        points: [R, P, 2] normalised ``(x / W, y / H)``.

    Returns:
        (index [R, P, 4] long, row * side + col within the map; weights [R, P, 4] float32). A corner outside the
        map has weight 0 (zeros padding) and a clamped index.
    """
    pos = points.float()
    col, row = (pos[..., 1], pos[..., 0]) if transposed else (pos[..., 0], pos[..., 1])
    # align_corners=True: normalised 0 and 1 land on the centres of the first and last patch.
    col = col * (side - 1)
    row = row * (side - 1)
    col0, row0 = col.floor(), row.floor()
    fc, fr = col - col0, row - row0
    col0, row0 = col0.long(), row0.long()
    indices, weights = [], []
    for dr, wr in ((0, 1 - fr), (1, fr)):
        for dc, wc in ((0, 1 - fc), (1, fc)):
            r, c = row0 + dr, col0 + dc
            inside = (r >= 0) & (r < side) & (c >= 0) & (c < side)
            indices.append(r.clamp(0, side - 1) * side + c.clamp(0, side - 1))
            weights.append(wr * wc * inside)
    return torch.stack(indices, dim=-1), torch.stack(weights, dim=-1)


def _map_side(feature_map: torch.Tensor) -> int:
    if feature_map.dim() != 3:
        raise ValueError(f"feature_map must be [B, N, C], got shape {tuple(feature_map.shape)}")
    num_patches = feature_map.shape[1]
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"feature_map has {num_patches} patches per image, expected a square number (side * side)")
    return side


def sample_features(
    feature_map: torch.Tensor,
    points: torch.Tensor,
    image_index: torch.Tensor,
    transposed: bool = False,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Bilinearly read each region's points from its image's patch-feature map (see ``bilinear_corners``).

    Corner rows are gathered from the flat [B*N, C] map, so the map is never copied per region. Interpolation
    weights are computed and applied in fp32.

    Args:
        feature_map: [B, N, C] patch features, N = side * side in row-major order.
        points: [R, P, 2] normalised ``(x / W, y / H)``.
        image_index: [R] integer index into the B images.
        transposed: read at row = x, col = y, as the original did.
        dtype: output dtype (default: feature_map's).

    Returns:
        [R, P, C] features.
    """
    side = _map_side(feature_map)
    num_images, num_patches, channels = feature_map.shape
    if points.dim() != 3 or points.shape[-1] != 2:
        raise ValueError(f"points must be [R, P, 2], got shape {tuple(points.shape)}")
    if image_index.shape != points.shape[:1]:
        raise ValueError(f"image_index must be [R] = [{points.shape[0]}], got shape {tuple(image_index.shape)}")
    dtype = dtype or feature_map.dtype
    num_regions, num_points, _ = points.shape
    if num_regions == 0:
        return feature_map.new_empty(0, num_points, channels, dtype=dtype)
    index, weights = bilinear_corners(points.to(feature_map.device), side, transposed)
    index = index + image_index.to(device=feature_map.device, dtype=torch.long)[:, None, None] * num_patches
    table = feature_map.reshape(num_images * num_patches, channels).float()
    out = F.embedding_bag(index.reshape(-1, 4), table, per_sample_weights=weights.reshape(-1, 4), mode="sum")
    return out.reshape(num_regions, num_points, channels).to(dtype)


# --------------------------------------------------------------------------------------------------------------
# Point-cloud hierarchy: farthest-point sampling and k nearest neighbours
# --------------------------------------------------------------------------------------------------------------


class PointGroups(NamedTuple):
    """One stage of the hierarchy, indices into that stage's current points.

    anchor_index: [R, S] the farthest-point anchors, in sampling order; they become the next stage's points.
    neighbor_index: [R, S, k] the k nearest current points of each anchor (the anchor itself included).
    """

    anchor_index: torch.Tensor
    neighbor_index: torch.Tensor


def gather_points(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Per-region gather: values [R, P, D], index [R, *I] (long, into P) -> [R, *I, D]."""
    num_regions, num_points, dim = values.shape
    offsets = torch.arange(num_regions, device=index.device) * num_points
    flat = (index + offsets.view(-1, *([1] * (index.dim() - 1)))).reshape(-1)
    return values.reshape(num_regions * num_points, dim).index_select(0, flat).reshape(*index.shape, dim)


def canonical_point_order(points: torch.Tensor) -> torch.Tensor:
    """Permutation sorting each region's points by (x, then y): points [R, P, 2] -> [R, P] long.

    Points with the same coordinates also have the same features, so the sorted point set does not depend on the
    order the points came in. That makes deterministic grouping independent of the input order, ties included.
    For a mask with at most P pixels this is also the order in which the original listed them (``nonzero()`` of
    its [W, H] masks).
    """
    order = torch.sort(points[..., 1], dim=1, stable=True).indices
    x_by_y = points[..., 0].gather(1, order)
    return order.gather(1, torch.sort(x_by_y, dim=1, stable=True).indices)


def fps_start_index(
    points: torch.Tensor, deterministic: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    """First farthest-point anchor of each region: points [R, P, 2] -> [R] long.

    deterministic: the point nearest the centroid of the region's points (first such point on ties).
    Otherwise a uniformly random point (the original), drawn from ``generator`` when given.
    """
    num_regions, num_points, _ = points.shape
    if deterministic:
        centroid = points.mean(dim=1, keepdim=True)
        offset = points - centroid
        return (offset[..., 0].square() + offset[..., 1].square()).argmin(dim=1)
    gen_device = generator.device if generator is not None else points.device
    start = torch.randint(0, num_points, (num_regions,), generator=generator, device=gen_device)
    return start.to(points.device)


def farthest_point_sample(points: torch.Tensor, num_samples: int, start_index: torch.Tensor) -> torch.Tensor:
    """Farthest-point sampling of every region at once: points [R, P, 2], start_index [R] -> [R, num_samples] long.

    Each step takes the point farthest (squared Euclidean distance, from exact coordinate differences as in the
    original) from all anchors chosen so far; ties go to the lowest index. The loop over steps is inherently
    sequential, but each step is vectorised over regions and points.
    """
    num_regions, num_points, _ = points.shape
    if not 0 < num_samples <= num_points:
        raise ValueError(f"cannot sample {num_samples} anchors from {num_points} points (need 0 < S <= P)")
    x, y = points[..., 0].float().contiguous(), points[..., 1].float().contiguous()
    chosen = torch.empty(num_regions, num_samples, dtype=torch.long, device=points.device)
    nearest = torch.full((num_regions, num_points), float("inf"), device=points.device)
    current = start_index.to(device=points.device, dtype=torch.long)[:, None]
    for step in range(num_samples):
        chosen[:, step : step + 1] = current
        dist = (x - x.gather(1, current)).square_().add_((y - y.gather(1, current)).square_())
        torch.minimum(nearest, dist, out=nearest)
        current = nearest.argmax(dim=1, keepdim=True)
    return chosen


def knn_indices(queries: torch.Tensor, points: torch.Tensor, k: int, distance: str = "exact") -> torch.Tensor:
    """The k nearest points of each query: queries [R, S, 2], points [R, P, 2] -> [R, S, k] long.

    distance="exact": squared distances from exact coordinate differences, neighbours nearest first.
    distance="original": ``-2 a.b + |a|^2 + |b|^2`` with a batched matrix product and ``topk(sorted=False)``,
    operation for operation as the original, so equidistant candidates are cut the same way (order unspecified).
    """
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    num_points = points.shape[1]
    if not 0 < k <= num_points:
        raise ValueError(f"cannot take {k} neighbours among {num_points} points (need 0 < k <= P)")
    q, p = queries.float(), points.float()
    if distance == "original":
        dist = -2 * torch.matmul(q, p.permute(0, 2, 1))
        dist += torch.sum(q**2, -1)[:, :, None]
        dist += torch.sum(p**2, -1)[:, None, :]
        return dist.topk(k, dim=-1, largest=False, sorted=False).indices
    dist = (q[:, :, None, 0] - p[:, None, :, 0]) ** 2 + (q[:, :, None, 1] - p[:, None, :, 1]) ** 2
    return dist.topk(k, dim=-1, largest=False, sorted=True).indices


def group_points(
    points: torch.Tensor,
    num_sub_point: Sequence[int],
    num_neighbor: Sequence[int],
    deterministic: bool = False,
    generator: torch.Generator | None = None,
    distance: str = "exact",
) -> list[PointGroups]:
    """Plan every stage's anchors and neighbourhoods from the point positions alone.

    Args:
        points: [R, P, 2] normalised coordinates.
        num_sub_point: anchors per stage (S_i); stage i + 1's points are stage i's anchors.
        num_neighbor: neighbours per stage (k_i).
        deterministic: start farthest-point sampling at the point nearest the centroid, after putting the points in
            canonical order, so the plan (in terms of positions) does not depend on the order of the input points.
            Otherwise the start is random, as in the original.
        generator: randomness for the random starts.
        distance: the kNN distance formula (see ``knn_indices``).

    Returns:
        One ``PointGroups`` per stage. Stage 0 indexes ``points``; stage i > 0 indexes stage i-1's anchors.
    """
    if len(num_sub_point) != len(num_neighbor):
        raise ValueError(f"num_sub_point {list(num_sub_point)} and num_neighbor {list(num_neighbor)} differ in length")
    pos = points.float()
    order = canonical_point_order(pos) if deterministic else None
    if order is not None:
        pos = pos.gather(1, order[..., None].expand_as(pos))
    plan = []
    for stage, (num_anchors, k) in enumerate(zip(num_sub_point, num_neighbor)):
        current = pos.shape[1]
        if not (0 < num_anchors <= current and 0 < k <= current):
            raise ValueError(
                f"stage {stage}: {num_anchors} anchors with {k} neighbours need at least that many points, "
                f"but the stage has {current}"
            )
        start = fps_start_index(pos, deterministic, generator)
        anchors = farthest_point_sample(pos, num_anchors, start)
        anchor_pos = gather_points(pos, anchors)
        neighbors = knn_indices(anchor_pos, pos, k, distance)
        if order is not None:
            # Express stage 0 in the caller's point order; later stages index anchors, which are already canonical.
            anchors, neighbors = order.gather(1, anchors), gather_points(order[..., None], neighbors)[..., 0]
            order = None
        plan.append(PointGroups(anchors, neighbors))
        pos = anchor_pos
    return plan


# --------------------------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------------------------


class ConvReLULayerNorm1d(nn.Module):
    """Conv1d(kernel 1) -> ReLU -> LayerNorm over channels: [B, C_in, L] -> [B, C_out, L].

    Names ``net.0`` and ``norm`` match the original ``ConvReLULN1D``.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(in_channels, out_channels, kernel_size=1, bias=True), nn.ReLU())
        self.norm = nn.LayerNorm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.net(x).transpose(1, 2)).transpose(1, 2)


class _StageWeights(NamedTuple):
    """One stage's affine maps in fp32, split into the feature columns (acting on f) and the coordinate columns
    (acting on x, y) of p = [f; x, y] (see the module docstring).

    u_pos / a_pos: the coordinate columns of Wd WD and of Wa, [C, 2]; bias: Wd bD + b, [C]; anchor_feat: Wa's
    feature columns, [C, C]. u_feat: the feature columns of Wd WD, [C, C], when folded; otherwise None and
    ``diff_feat`` (WD's feature columns, [C+2, C]) and ``w_diff`` (Wd, [C, C+2]) are applied one after the other.
    """

    u_pos: torch.Tensor
    a_pos: torch.Tensor
    bias: torch.Tensor
    anchor_feat: torch.Tensor
    u_feat: torch.Tensor | None
    diff_feat: torch.Tensor
    w_diff: torch.Tensor


class SpatialAwareVisualSampler(nn.Module):
    """Ferret's spatial-aware visual sampler (the original ``GeoRegionSampler``): regions -> [R, output_dim].

    Args:
        input_dim: C, the width of the patch features (1024 for CLIP ViT-L/14).
        output_dim: the LLM hidden size.
        num_init_point: points sampled per region by ``sample_region_points`` (kept for callers; ``forward``
            accepts any P large enough for the first stage).
        num_sub_point: anchors per stage.
        num_neighbor: neighbours per stage.
        pooler_mode: "max" or "mean" over each anchor's neighbours.
        transposed: the original's convention: read features at its mirrored location (see ``sample_features``)
            and cut neighbourhoods with its distance formula (see ``knn_indices``).
    """

    def __init__(
        self,
        input_dim: int = 1024,
        output_dim: int = 4096,
        num_init_point: int = 512,
        num_sub_point: Sequence[int] = (128, 32),
        num_neighbor: Sequence[int] = (24, 24),
        pooler_mode: str = "max",
        transposed: bool = False,
    ):
        super().__init__()
        if pooler_mode not in POOLER_MODES:
            raise ValueError(f"pooler_mode must be one of {POOLER_MODES}, got {pooler_mode!r}")
        if len(num_sub_point) != len(num_neighbor) or not num_sub_point:
            raise ValueError(
                f"num_sub_point {list(num_sub_point)} and num_neighbor {list(num_neighbor)} must be non-empty "
                "and of equal length (one entry per stage)"
            )
        if not all(0 < k <= 255 for k in num_neighbor):
            raise ValueError(f"num_neighbor entries must lie in 1..255, got {list(num_neighbor)}")
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.num_init_point = num_init_point
        self.num_sub_point = tuple(int(s) for s in num_sub_point)
        self.num_neighbor = tuple(int(k) for k in num_neighbor)
        self.pooler_mode = pooler_mode
        self.transposed = transposed
        # Use the C++ pair kernel for CPU tensors when it builds (False: always the PyTorch path).
        self.use_kernel = True

        point_dim = input_dim + 2
        self.diff_projector_list = nn.ModuleList(nn.Linear(point_dim, point_dim) for _ in self.num_sub_point)
        self.agg_projector_list = nn.ModuleList(
            ConvReLULayerNorm1d(2 * point_dim, input_dim) for _ in self.num_sub_point
        )
        self.flatten_projector = nn.Linear(input_dim * self.num_sub_point[-1], input_dim)
        self.dim_projector = nn.Linear(input_dim, output_dim)
        # Folded weights for inference, keyed by the identity and version of the parameters they came from.
        self._folded_cache: dict[int, tuple[tuple, _StageWeights]] = {}

    @property
    def distance(self) -> str:
        """The kNN distance formula: the original's in the original's (transposed) convention."""
        return "original" if self.transposed else "exact"

    def extra_repr(self) -> str:
        return (
            f"num_sub_point={self.num_sub_point}, num_neighbor={self.num_neighbor}, "
            f"pooler_mode={self.pooler_mode!r}, transposed={self.transposed}"
        )

    def forward(
        self,
        feature_map: torch.Tensor,
        points: torch.Tensor,
        image_index: torch.Tensor,
        deterministic: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Encode every region of a batch at once.

        Args:
            feature_map: [B, N, C] raw CLIP patch features (N = side * side, row-major).
            points: [R, P, 2] from ``sample_region_points``.
            image_index: [R] which image each region belongs to.
            deterministic: deterministic farthest-point starts (see ``group_points``).
            generator: randomness for the random starts otherwise.

        Returns:
            [R, output_dim] in the module's dtype.
        """
        dtype = self.dim_projector.weight.dtype
        if feature_map.dim() != 3 or feature_map.shape[-1] != self.input_dim:
            raise ValueError(f"feature_map must be [B, N, {self.input_dim}], got shape {tuple(feature_map.shape)}")
        side = _map_side(feature_map)
        if points.dim() != 3 or points.shape[-1] != 2:
            raise ValueError(f"points must be [R, P, 2], got shape {tuple(points.shape)}")
        num_regions = points.shape[0]
        if image_index.shape != (num_regions,):
            raise ValueError(f"image_index must be [R] = [{num_regions}], got shape {tuple(image_index.shape)}")
        image_index = image_index.to(device=feature_map.device, dtype=torch.long)
        if num_regions and (int(image_index.min()) < 0 or int(image_index.max()) >= feature_map.shape[0]):
            raise ValueError(
                f"image_index values must lie in [0, {feature_map.shape[0]}) (one per image), "
                f"got {image_index.tolist()}"
            )
        if num_regions == 0:
            return feature_map.new_zeros(0, self.output_dim, dtype=dtype)

        points = points.to(device=feature_map.device, dtype=torch.float32)
        plan = group_points(points, self.num_sub_point, self.num_neighbor, deterministic, generator, self.distance)
        features = self._first_stage(feature_map, side, points, image_index, plan[0])
        pos = gather_points(points, plan[0].anchor_index)
        for stage in range(1, len(plan)):
            features = self._later_stage(stage, features, pos, plan[stage])
            pos = gather_points(pos, plan[stage].anchor_index)
        return self.dim_projector(self.flatten_projector(features.to(dtype).flatten(1)))

    # ---------------------------------------------------------------------------------------------------------
    def _stage_weights(self, stage: int, fold: bool) -> _StageWeights:
        """The stage's maps in fp32; folded when ``fold``, and always (cached) when no gradient is needed."""
        diff_proj = self.diff_projector_list[stage]
        conv = self.agg_projector_list[stage].net[0]
        params = (diff_proj.weight, diff_proj.bias, conv.weight, conv.bias)
        inference = not (torch.is_grad_enabled() and any(p.requires_grad for p in params))
        if inference:
            key = tuple((id(p), p.data_ptr(), p._version, p.dtype, p.device) for p in params)
            cached = self._folded_cache.get(stage)
            if cached is not None and cached[0] == key:
                return cached[1]
            fold = True
        channels = self.input_dim
        point_dim = channels + 2
        # Views and splits rather than slices: their backward writes each weight's gradient once, instead of
        # zero-filling a full-size buffer per slice.
        diff = diff_proj.weight.float()  # WD [C+2, C+2]
        conv_weight = conv.weight.float().view(channels, 2 * point_dim)
        w_diff, w_anchor = conv_weight.split(point_dim, dim=1)  # [C, C+2] each
        diff_feat, diff_pos = diff.split(channels, dim=1)  # [C+2, C], [C+2, 2]
        anchor_feat, anchor_pos = w_anchor.split(channels, dim=1)
        u_pos = w_diff @ diff_pos  # [C, 2]
        bias = torch.addmv(conv.bias.float(), w_diff, diff_proj.bias.float())
        u_feat = w_diff @ diff_feat if fold else None  # [C, C]
        weights = _StageWeights(u_pos, anchor_pos, bias, anchor_feat, u_feat, diff_feat, w_diff)
        if inference:
            self._folded_cache[stage] = (key, weights)
        return weights

    def _pool(self, stage: int, u: torch.Tensor | Bag, a: torch.Tensor | Bag, groups: PointGroups) -> torch.Tensor:
        """Pooled LayerNorm(ReLU(u[neighbour] - u[anchor] + a[anchor])) of every anchor: [R, S, C] float32."""
        norm = self.agg_projector_list[stage].norm
        return pair_pool(u, a, groups.neighbor_index, norm.weight, norm.bias, norm.eps, self.pooler_mode,
                         self.use_kernel, anchor_index=groups.anchor_index)

    def _first_stage(
        self, feature_map: torch.Tensor, side: int, points: torch.Tensor, image_index: torch.Tensor, groups: PointGroups
    ) -> torch.Tensor:
        """Stage 0 from the patch map: [B, N, C], points [R, P, 2] -> [R, S, C] float32.

        The projections are applied to the patches the regions touch, then interpolated; the coordinate columns
        and the constant enter the interpolation as three extra table rows with weights x, y and 1.
        """
        num_images, num_patches, channels = feature_map.shape
        num_regions, num_points, _ = points.shape
        corner, corner_weight = bilinear_corners(points, side, self.transposed)  # [R, P, 4]
        corner = corner + image_index[:, None, None] * num_patches
        touched, corner = torch.unique(corner, return_inverse=True)  # one host sync per call
        patches = feature_map.reshape(num_images * num_patches, channels).index_select(0, touched).float()
        w = self._stage_weights(0, fold=patches.shape[0] > channels + 2)
        num_touched = patches.shape[0]
        if w.u_feat is not None:
            u_table = patches @ w.u_feat.T  # (Wd WD) f per patch
        else:
            u_table = (patches @ w.diff_feat.T) @ w.w_diff.T
        a_table = patches @ w.anchor_feat.T  # Wa f per patch
        # One table for both operands, so the kernel sums their gradients in one double-precision accumulator.
        table = torch.cat([u_table, a_table, w.u_pos.T, w.a_pos.T, w.bias[None]])  # [2T + 5, C]
        u_pos_rows = torch.arange(2 * num_touched, 2 * num_touched + 2, device=corner.device)
        a_extra = torch.arange(2 * num_touched + 2, 2 * num_touched + 5, device=corner.device)  # x, y, constant

        u = Bag(table, torch.cat([corner, u_pos_rows.expand(num_regions, num_points, 2)], dim=-1),
                torch.cat([corner_weight, points], dim=-1))  # [R, P, 6] terms: 4 corners of u, x, y
        anchors = groups.anchor_index
        num_anchors = anchors.shape[1]
        a = Bag(
            table,
            torch.cat([gather_points(corner, anchors) + num_touched, a_extra.expand(num_regions, num_anchors, 3)], -1),
            torch.cat([gather_points(corner_weight, anchors), gather_points(points, anchors),
                       corner_weight.new_ones(num_regions, num_anchors, 1)], dim=-1),
        )  # [R, S, 7] terms: 4 corners of Wa f, x, y, constant
        return self._pool(0, u, a, groups)

    def _later_stage(self, stage: int, features: torch.Tensor, pos: torch.Tensor, groups: PointGroups) -> torch.Tensor:
        """Stage i > 0: features [R, P, C] (the previous anchors'), pos [R, P, 2] -> [R, S, C] float32."""
        num_regions, num_points, channels = features.shape
        point = torch.cat([features.float(), pos], dim=-1)  # [R, P, C+2]
        # u is only ever used as u[neighbour] - u[anchor], so it may be computed from points centred per region:
        # its gradient then multiplies small centred values instead of cancelling between large sums.
        centred = (point - point.mean(dim=1, keepdim=True)).reshape(num_regions * num_points, channels + 2)
        w = self._stage_weights(stage, fold=centred.shape[0] > channels + 2)
        u_pos_feat = torch.cat([w.u_feat, w.u_pos], dim=1) if w.u_feat is not None else None
        if u_pos_feat is not None:
            u = centred @ u_pos_feat.T
        else:
            u = torch.addmm(centred[:, channels:] @ w.u_pos.T, centred[:, :channels] @ w.diff_feat.T, w.w_diff.T)
        u = u.view(num_regions, num_points, channels)
        anchor_point = gather_points(point, groups.anchor_index).flatten(0, 1)
        a = torch.addmm(torch.addmm(w.bias, anchor_point[:, channels:], w.a_pos.T), anchor_point[:, :channels],
                        w.anchor_feat.T).view(num_regions, -1, channels)
        return self._pool(stage, u, a, groups)
