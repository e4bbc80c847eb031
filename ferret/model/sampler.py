"""The spatial-aware visual sampler: one feature vector per referred region (REFERENCE §1.4, §1.5).

This module owns everything between a region's mask and its ``<region_fea>`` embedding:

* ``sample_region_points`` turns masks into a fixed number of normalised point coordinates;
* ``sample_features`` reads the CLIP patch-feature map at those points (bilinear, ``grid_sample`` semantics);
* ``group_points`` plans the point-cloud hierarchy: farthest-point anchors and k-nearest neighbours per stage;
* ``SpatialAwareVisualSampler`` aggregates each neighbourhood and projects the region to the LLM width.

Parameter names and shapes equal those of the original ``GeoRegionSampler``, so released
``model.region_geo_sampler.*`` weights load unchanged.

The forward pass is algebraically the original's but cheaper. In the original, every (anchor, neighbour) pair
goes through ``diff_proj(local - anchor)`` (a (C+2)x(C+2) Linear) and then a 2(C+2)->C convolution. Everything
before the ReLU is affine. So each point is projected once (with the two matrices folded into one when there are
enough points to pay for it), and a pair only costs an addition:

    conv(cat(diff_proj(p_nb - p_anc), p_anc))
        = (Wd @ WD) p_nb + [Wa p_anc - (Wd @ WD) p_anc + Wd @ bD + b]
        =      u[nb]     +              v[anc]

Here ``WD, bD`` are diff_proj's weight and bias, and ``Wd, Wa`` are the conv weight's columns for the diff half and
the anchor half. The straightforward version lives in ``tests/sampler_reference.py``; the tests check that both agree
to 1e-5 in fp32, and ``scripts/bench/bench_sampler.py`` measures the speed-up.

The folded path reads the weights of the child layers directly. DeepSpeed ZeRO-3 detects and gathers such
"external" parameters on its own, and FSDP keeps the sampler in the root unit. Quantising the sampler's Linear layers
(bitsandbytes) is not supported: keep ``region_geo_sampler`` out of quantisation, as is done for ``mm_projector``.

Coordinate convention: a point is ``(x / W, y / H)`` with x the column and y the row of the mask. The original read
the feature map at the location mirrored across the diagonal (row = x, col = y). ``transposed=True`` reproduces that
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

logger = logging.getLogger(__name__)

__all__ = [
    "POOLER_MODES",
    "PointGroups",
    "ConvReLULayerNorm1d",
    "SpatialAwareVisualSampler",
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

# Upper bound on the random sort keys that sample_region_points holds at once (elements, i.e. 64 MiB of fp32).
_MAX_KEYS_PER_CHUNK = 1 << 24
# Elements of the [regions, S, k, C] activations the sampler processes at once on CPU (16 MiB of fp32).
_CPU_CHUNK_ELEMENTS = 1 << 22


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


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) numbers drawn on the generator's device (so a CPU generator works for CUDA inputs)."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def _hash_uniform(index: torch.Tensor, seed: int) -> torch.Tensor:
    """Uniform [0, 1) numbers that depend only on (index, seed): a 32-bit integer mix (int64 arithmetic that
    cannot overflow). Used by the deterministic mode, so a region's points do not depend on its batch."""
    mask = 0xFFFFFFFF
    x = (index.long() * 0x27D4EB2D + (seed * 0x165667B1 + 0x3C6EF372)) & mask
    for multiplier in (0x7FEB352D, 0x446CA68B):
        x = x ^ (x >> 16)
        x = (x * multiplier) & mask
    x = x ^ (x >> 15)
    return x.double().div_(2.0**32).float()


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

    Masks of one shape are stacked and sampled together, so the only Python loop is over distinct shapes.
    Raises ValueError naming the index of an empty, non-bool or non-2-D mask.
    """
    if num_points <= 0:
        raise ValueError(f"num_points must be positive, got {num_points}")
    checked = [_as_bool_mask(m, i) for i, m in enumerate(masks)]
    if not checked:
        return torch.empty(0, num_points, 2)
    device = checked[0].device
    out = torch.empty(len(checked), num_points, 2, device=device)

    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, m in enumerate(checked):
        by_shape.setdefault(tuple(m.shape), []).append(i)

    for (height, width), indices in by_shape.items():
        chunk = max(1, _MAX_KEYS_PER_CHUNK // max(1, height * width))
        for start in range(0, len(indices), chunk):
            idx = indices[start : start + chunk]
            flat = torch.stack([checked[i].to(device) for i in idx]).reshape(len(idx), height * width)
            counts = flat.sum(dim=1)
            empty = (counts == 0).nonzero()
            if len(empty):
                raise ValueError(f"region mask {idx[int(empty[0])]} is empty: at least one True pixel is needed")
            # Random keys with False pixels pushed past every True one: the k smallest keys are the True pixels
            # in random order (a random permutation of them when count <= k).
            if seed is not None:
                pixel_ids = torch.arange(height * width, device=device)
                keys = _hash_uniform(pixel_ids, seed).expand(len(idx), -1).clone()
            else:
                keys = _rand(tuple(flat.shape), generator, device)
            keys.masked_fill_(~flat, 2.0)
            k = min(num_points, height * width)
            order = keys.topk(k, dim=1, largest=False, sorted=True).indices  # [M, k]
            # Slot j takes the j-th permuted pixel while there are any left, then a uniformly random repeat.
            slot = torch.arange(num_points, device=device).expand(len(idx), num_points)
            if seed is not None:
                draws = _hash_uniform(torch.arange(num_points, device=device), seed + 1).expand(len(idx), -1)
            else:
                draws = _rand((len(idx), num_points), generator, device)
            repeat = (draws * counts[:, None]).long()
            repeat = torch.minimum(repeat, counts[:, None] - 1)
            slot = torch.where(slot < counts[:, None], slot, repeat)
            pixel = order.gather(1, slot)  # flat pixel index, [M, num_points]
            x = (pixel % width).float() / width
            y = torch.div(pixel, width, rounding_mode="floor").float() / height
            out[torch.tensor(idx, device=device)] = torch.stack([x, y], dim=-1)
    return out


# --------------------------------------------------------------------------------------------------------------
# Points -> initial features
# --------------------------------------------------------------------------------------------------------------


def sample_features(
    feature_map: torch.Tensor,
    points: torch.Tensor,
    image_index: torch.Tensor,
    transposed: bool = False,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Bilinearly read each region's points from its image's patch-feature map.

    This is ``grid_sample(map, grid, mode="bilinear", padding_mode="zeros", align_corners=True)``. Here map is the
    [C, side, side] view of ``feature_map[image_index[r]]``. Corner rows are gathered from the flat [B*N, C] map,
    so the map is never copied per region. Interpolation weights are computed and applied in fp32.

    Args:
        feature_map: [B, N, C] patch features, N = side * side in row-major order.
        points: [R, P, 2] normalised ``(x / W, y / H)``.
        image_index: [R] integer index into the B images.
        transposed: False reads at row = y, col = x (grid = 2 * pos - 1). True reproduces the original, which
            read at row = x, col = y (grid = 2 * pos.flip(-1) - 1).
        dtype: output dtype (default: feature_map's).

    Returns:
        [R, P, C] features.
    """
    if feature_map.dim() != 3:
        raise ValueError(f"feature_map must be [B, N, C], got shape {tuple(feature_map.shape)}")
    num_images, num_patches, channels = feature_map.shape
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"feature_map has {num_patches} patches per image, expected a square number (side * side)")
    if points.dim() != 3 or points.shape[-1] != 2:
        raise ValueError(f"points must be [R, P, 2], got shape {tuple(points.shape)}")
    if image_index.shape != points.shape[:1]:
        raise ValueError(f"image_index must be [R] = [{points.shape[0]}], got shape {tuple(image_index.shape)}")
    dtype = dtype or feature_map.dtype
    num_regions, num_points, _ = points.shape
    if num_regions == 0:
        return feature_map.new_empty(0, num_points, channels, dtype=dtype)

    pos = points.to(device=feature_map.device, dtype=torch.float32)
    col, row = (pos[..., 1], pos[..., 0]) if transposed else (pos[..., 0], pos[..., 1])
    # align_corners=True: normalised 0 and 1 land on the centres of the first and last patch.
    col = col * (side - 1)
    row = row * (side - 1)
    col0, row0 = col.floor(), row.floor()
    fc, fr = col - col0, row - row0
    col0, row0 = col0.long(), row0.long()

    corner_rows, corner_cols, corner_weights = [], [], []
    for dr, wr in ((0, 1 - fr), (1, fr)):
        for dc, wc in ((0, 1 - fc), (1, fc)):
            r, c = row0 + dr, col0 + dc
            inside = (r >= 0) & (r < side) & (c >= 0) & (c < side)  # zeros padding outside the map
            corner_rows.append(r.clamp(0, side - 1))
            corner_cols.append(c.clamp(0, side - 1))
            corner_weights.append(wr * wc * inside)
    rows = torch.stack(corner_rows, dim=-1)  # [R, P, 4]
    cols = torch.stack(corner_cols, dim=-1)
    weights = torch.stack(corner_weights, dim=-1)
    base = image_index.to(device=feature_map.device, dtype=torch.long)[:, None, None] * num_patches
    flat_index = (base + rows * side + cols).reshape(-1, 4)

    table = feature_map.reshape(num_images * num_patches, channels).float()
    out = F.embedding_bag(flat_index, table, per_sample_weights=weights.reshape(-1, 4), mode="sum")
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

    Each step takes the point farthest (squared Euclidean distance) from all anchors chosen so far; ties go to the
    lowest index (``argmax`` returns the first maximum). The loop over steps is inherently sequential, but each step
    is vectorised over regions and points.
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


def knn_indices(queries: torch.Tensor, points: torch.Tensor, k: int) -> torch.Tensor:
    """The k nearest points of each query: queries [R, S, 2], points [R, P, 2] -> [R, S, k] long, nearest first.

    Squared distances are computed from exact coordinate differences. The original's ``|a|^2 + |b|^2 - 2ab`` form
    can reorder near-ties by rounding error.
    """
    num_points = points.shape[1]
    if not 0 < k <= num_points:
        raise ValueError(f"cannot take {k} neighbours among {num_points} points (need 0 < k <= P)")
    q, p = queries.float(), points.float()
    dist = (q[:, :, None, 0] - p[:, None, :, 0]) ** 2 + (q[:, :, None, 1] - p[:, None, :, 1]) ** 2
    return dist.topk(k, dim=-1, largest=False, sorted=True).indices


def group_points(
    points: torch.Tensor,
    num_sub_point: Sequence[int],
    num_neighbor: Sequence[int],
    deterministic: bool = False,
    generator: torch.Generator | None = None,
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
        neighbors = knn_indices(anchor_pos, pos, k)
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
        transposed: read features at the original's mirrored location (see ``sample_features``).
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
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.num_init_point = num_init_point
        self.num_sub_point = tuple(int(s) for s in num_sub_point)
        self.num_neighbor = tuple(int(k) for k in num_neighbor)
        self.pooler_mode = pooler_mode
        self.transposed = transposed

        point_dim = input_dim + 2
        self.diff_projector_list = nn.ModuleList(nn.Linear(point_dim, point_dim) for _ in self.num_sub_point)
        self.agg_projector_list = nn.ModuleList(
            ConvReLULayerNorm1d(2 * point_dim, input_dim) for _ in self.num_sub_point
        )
        self.flatten_projector = nn.Linear(input_dim * self.num_sub_point[-1], input_dim)
        self.dim_projector = nn.Linear(input_dim, output_dim)

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
        num_regions = points.shape[0]
        image_index = image_index.to(device=feature_map.device, dtype=torch.long)
        if num_regions and (int(image_index.min()) < 0 or int(image_index.max()) >= feature_map.shape[0]):
            raise ValueError(
                f"image_index values must lie in [0, {feature_map.shape[0]}) (one per image), "
                f"got {image_index.tolist()}"
            )
        if num_regions == 0:
            return feature_map.new_zeros(0, self.output_dim, dtype=dtype)

        points = points.to(device=feature_map.device, dtype=torch.float32)
        features = sample_features(feature_map, points, image_index, transposed=self.transposed, dtype=dtype)
        plan = group_points(points, self.num_sub_point, self.num_neighbor, deterministic, generator)
        pos = points
        for stage, groups in enumerate(plan):
            features = self._aggregate(stage, features, pos, groups)
            pos = gather_points(pos, groups.anchor_index)
        return self.dim_projector(self.flatten_projector(features.flatten(1)))

    def _aggregate(
        self, stage: int, features: torch.Tensor, pos: torch.Tensor, groups: PointGroups
    ) -> torch.Tensor:
        """One stage: features [R, P, C], pos [R, P, 2] -> [R, S, C] (the folded form of the module docstring)."""
        dtype = features.dtype
        diff_proj = self.diff_projector_list[stage]
        agg = self.agg_projector_list[stage]
        conv, norm = agg.net[0], agg.norm
        point_dim = self.input_dim + 2

        # Per-point and per-anchor terms in fp32: u[nb] and v[anc] nearly cancel for nearby points, so they are
        # added before rounding to the module's dtype. Only the [R, S, k, C] activations are held in that dtype.
        conv_weight = conv.weight[..., 0].float()  # [C, 2(C+2)]
        w_diff, w_anchor = conv_weight[:, :point_dim], conv_weight[:, point_dim:]
        point = torch.cat([features.float(), pos.float()], dim=-1)  # [R, P, C+2]
        num_rows = point.shape[0] * point.shape[1]
        if num_rows > point_dim:
            # Folding costs C(C+2)^2 once and saves (C+2)^2 per point: worth it beyond C+2 points in all.
            per_point = point @ (w_diff @ diff_proj.weight.float()).T  # u = (Wd WD) p, [R, P, C]
        else:
            per_point = (point @ diff_proj.weight.float().T) @ w_diff.T
        anchor_bias = w_diff @ diff_proj.bias.float() + conv.bias.float()  # Wd bD + b
        anchor_point = gather_points(point, groups.anchor_index)  # [R, S, C+2]
        per_anchor = torch.addmm(anchor_bias, anchor_point.flatten(0, 1), w_anchor.T).view(*anchor_point.shape[:2], -1)
        per_anchor = per_anchor - gather_points(per_point, groups.anchor_index)  # v = Wa p + Wd bD + b - u, [R, S, C]
        # The [R, S, k, C] part runs in region chunks on CPU: intermediates small enough to stay in cache and to be
        # reused by the allocator instead of being page-faulted in afresh. One chunk elsewhere.
        num_regions, num_anchors, k = groups.neighbor_index.shape
        chunk = num_regions
        if point.device.type == "cpu":
            chunk = max(1, _CPU_CHUNK_ELEMENTS // (num_anchors * k * per_point.shape[-1]))
        pooled = []
        for start in range(0, num_regions, chunk):
            part = slice(start, start + chunk)
            hidden = gather_points(per_point[part], groups.neighbor_index[part])  # [r, S, k, C]
            hidden = hidden.add_(per_anchor[part, :, None, :]).to(dtype).relu_()
            hidden = F.layer_norm(hidden, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
            pooled.append(hidden.amax(dim=2) if self.pooler_mode == "max" else hidden.mean(dim=2))
        return torch.cat(pooled) if len(pooled) > 1 else pooled[0]
