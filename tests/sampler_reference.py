"""A plain, unoptimised implementation of the spatial-aware visual sampler, for tests and the benchmark only.

It follows the original ``GeoRegionSampler`` step by step. The feature map is copied once per region and read with
``F.grid_sample``. Every (anchor, neighbour) pair goes through ``diff_proj(local - anchor)``, is concatenated with
its anchor and passed through the conv module, then pooled with the original's pooler layers. It reuses the
optimised module's parameters and (through ``group_points``) the same anchors and neighbours, so both can be
compared number by number.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ferret.model.sampler import PointGroups, SpatialAwareVisualSampler, gather_points, group_points


def reference_initial_features(
    feature_map: torch.Tensor, points: torch.Tensor, image_index: torch.Tensor, transposed: bool
) -> torch.Tensor:
    """feature_map [B, N, C], points [R, P, 2], image_index [R] -> [R, P, C] (fp32) via a per-region map copy."""
    num_images, num_patches, channels = feature_map.shape
    side = int(round(num_patches**0.5))
    maps = feature_map.reshape(num_images, side, side, channels).permute(0, 3, 1, 2)  # [B, C, side, side]
    per_region = maps[image_index.long()].float()  # [R, C, side, side]: the copy the optimised path avoids
    pos = points.float().flip(-1) if transposed else points.float()
    grid = (2.0 * pos - 1.0)[:, :, None, :]  # [R, P, 1, 2]
    sampled = F.grid_sample(per_region, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return sampled[..., 0].transpose(1, 2)  # [R, P, C]


def reference_stage(
    sampler: SpatialAwareVisualSampler, stage: int, features: torch.Tensor, pos: torch.Tensor, groups: PointGroups
) -> torch.Tensor:
    """features [R, P, C], pos [R, P, 2] -> [R, S, C], one (anchor, neighbour) pair at a time in the math."""
    k = groups.neighbor_index.shape[-1]
    point = torch.cat([features, pos.to(features.dtype)], dim=-1)  # [R, P, C+2]
    local = gather_points(point, groups.neighbor_index)  # [R, S, k, C+2]
    anchor = gather_points(point, groups.anchor_index)[:, :, None, :]  # [R, S, 1, C+2]
    diff = sampler.diff_projector_list[stage](local - anchor)
    pairs = torch.cat([diff, anchor.expand(-1, -1, k, -1)], dim=-1)  # [R, S, k, 2(C+2)]
    num_regions, num_anchors = pairs.shape[:2]
    pairs = pairs.flatten(0, 1).transpose(1, 2)  # [R*S, 2(C+2), k]
    aggregated = sampler.agg_projector_list[stage](pairs)  # [R*S, C, k]
    if sampler.pooler_mode == "max":
        pooled = F.adaptive_max_pool1d(aggregated, 1)
    else:
        pooled = F.avg_pool1d(aggregated, kernel_size=k)
    return pooled[..., 0].reshape(num_regions, num_anchors, -1)


def reference_forward(
    sampler: SpatialAwareVisualSampler,
    feature_map: torch.Tensor,
    points: torch.Tensor,
    image_index: torch.Tensor,
    deterministic: bool = True,
    generator: torch.Generator | None = None,
    groups: list[PointGroups] | None = None,
) -> torch.Tensor:
    """Same contract as ``SpatialAwareVisualSampler.forward``: -> [R, output_dim].

    ``groups`` (from ``group_points``) fixes the anchors and neighbours; by default they are planned here with the
    same arguments the module would use.
    """
    dtype = sampler.dim_projector.weight.dtype
    points = points.float()
    if groups is None:
        groups = group_points(points, sampler.num_sub_point, sampler.num_neighbor, deterministic, generator)
    features = reference_initial_features(feature_map, points, image_index, sampler.transposed).to(dtype)
    pos = points
    for stage, stage_groups in enumerate(groups):
        features = reference_stage(sampler, stage, features, pos, stage_groups)
        pos = gather_points(pos, stage_groups.anchor_index)
    return sampler.dim_projector(sampler.flatten_projector(features.flatten(1)))
