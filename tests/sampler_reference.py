"""The original GeoRegionSampler's algorithm, step by step, for the tests and the benchmark only.

It shares no code with ``ferret.model.sampler``: it has its own modules (with the same parameter names, so a state
dict loads into both) and follows the original forward pass literally:

1. per image, the [C, side, side] patch map is repeated once per region and read with ``F.grid_sample(...,
   align_corners=True)`` at ``2 * pos.flip(-1) - 1`` (the original's transposed read) or at ``2 * pos - 1``;
2. per stage, farthest-point sampling from a start point (a Python loop over steps; distances from exact
   coordinate differences, ``torch.max`` picks the next point), then k nearest neighbours with the original's
   ``-2 a.b + |a|^2 + |b|^2`` distances and ``topk(largest=False, sorted=False)``;
3. every (anchor, neighbour) pair: ``diff_proj(cat(f_nb, pos_nb) - cat(f_anc, pos_anc))``, concatenated with the
   anchor's 1026-d vector, the kernel-1 convolution, ReLU, LayerNorm, then ``AdaptiveMaxPool1d(1)`` (or
   ``AvgPool1d(k)``) over the k neighbours;
4. flatten, ``flatten_projector``, ``dim_projector``.

What the original left random is a parameter here: the start points of farthest-point sampling (``starts``), or,
with ``deterministic=True``, this project's deterministic rule: the points put in (x, then y) order and each stage
started at the point nearest the centroid.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class ReferenceConvReLULN1D(nn.Module):
    """Conv1d(kernel 1) + ReLU, then LayerNorm over channels: [B, C_in, L] -> [B, C_out, L]."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(in_channels, out_channels, kernel_size=1), nn.ReLU(inplace=True))
        self.norm = nn.LayerNorm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.net(x).permute(0, 2, 1)
        return self.norm(x).permute(0, 2, 1)


def index_points(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values [B, N, D], index [B, ...] -> [B, ..., D] by advanced indexing with a batch index."""
    batch = torch.arange(values.shape[0]).view(-1, *([1] * (index.dim() - 1))).expand_as(index)
    return values[batch, index, :]


def farthest_point_sample(xyz: torch.Tensor, npoint: int, start: torch.Tensor) -> torch.Tensor:
    """xyz [B, N, 2], start [B] -> [B, npoint], one step at a time."""
    batch, num, _ = xyz.shape
    centroids = torch.zeros(batch, npoint, dtype=torch.long)
    distance = torch.ones(batch, num) * 1e10
    farthest = start.long().clone()
    rows = torch.arange(batch)
    for i in range(npoint):
        centroids[:, i] = farthest
        centroid = xyz[rows, farthest, :].view(batch, 1, 2)
        dist = torch.sum((xyz - centroid) ** 2, -1)
        distance = torch.min(distance, dist)
        farthest = torch.max(distance, -1)[1]
    return centroids


def square_distance(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """src [B, N, 2], dst [B, M, 2] -> [B, N, M] as -2 src.dst + |src|^2 + |dst|^2."""
    batch, n, _ = src.shape
    m = dst.shape[1]
    dist = -2 * torch.matmul(src, dst.permute(0, 2, 1))
    dist += torch.sum(src**2, -1).view(batch, n, 1)
    dist += torch.sum(dst**2, -1).view(batch, 1, m)
    return dist


def knn_point(nsample: int, xyz: torch.Tensor, new_xyz: torch.Tensor, knn: str) -> torch.Tensor:
    """The nsample nearest points of xyz [B, N, 2] for each new_xyz [B, S, 2] -> [B, S, nsample]."""
    if knn == "original":
        return torch.topk(square_distance(new_xyz, xyz), nsample, dim=-1, largest=False, sorted=False)[1]
    exact = ((new_xyz[:, :, None, :] - xyz[:, None, :, :]) ** 2).sum(-1)
    return torch.topk(exact, nsample, dim=-1, largest=False, sorted=True)[1]


def xy_order(points: torch.Tensor) -> torch.Tensor:
    """[R, P, 2] -> [R, P]: per region, the stable order by x then y (numpy's lexsort)."""
    orders = [np.lexsort((p[:, 1].numpy(), p[:, 0].numpy()), axis=0) for p in points]
    return torch.from_numpy(np.stack(orders)).long()


def nearest_to_centroid(xyz: torch.Tensor) -> torch.Tensor:
    """[B, N, 2] -> [B]: the first point nearest the mean of the points."""
    return torch.sum((xyz - xyz.mean(dim=1, keepdim=True)) ** 2, -1).argmin(dim=1)


class ReferenceGeoRegionSampler(nn.Module):
    """The original module's parameters (same names as a released ``region_geo_sampler``) and forward pass."""

    def __init__(self, input_dim, output_dim, num_sub_point=(128, 32), num_neighbor=(24, 24), pooler_mode="max"):
        super().__init__()
        self.num_sub_point = list(num_sub_point)
        self.num_neighbor = list(num_neighbor)
        self.diff_projector_list = nn.ModuleList()
        self.agg_projector_list = nn.ModuleList()
        self.pooler_list = nn.ModuleList()
        for k in self.num_neighbor:
            self.diff_projector_list.append(nn.Linear(input_dim + 2, input_dim + 2))
            self.agg_projector_list.append(ReferenceConvReLULN1D(2 * (input_dim + 2), input_dim))
            self.pooler_list.append(nn.AdaptiveMaxPool1d(1) if pooler_mode == "max" else nn.AvgPool1d(k))
        self.flatten_projector = nn.Linear(input_dim * self.num_sub_point[-1], input_dim)
        self.dim_projector = nn.Linear(input_dim, output_dim)

    @classmethod
    def like(cls, sampler: nn.Module) -> ReferenceGeoRegionSampler:
        """A reference with the sizes and a copy of the weights of ``sampler`` (read through its attributes)."""
        ref = cls(sampler.input_dim, sampler.output_dim, sampler.num_sub_point, sampler.num_neighbor,
                  sampler.pooler_mode)
        ref.load_state_dict(sampler.state_dict())
        return ref.to(sampler.dim_projector.weight.dtype)

    def initial_features(self, feature_map, points, image_index, transposed):
        """[B, N, C], [R, P, 2], [R] -> [R, P, C]: the map repeated per region, then grid_sample."""
        num_images, num_patches, channels = feature_map.shape
        side = int(round(num_patches**0.5))
        out = feature_map.new_zeros(points.shape[0], points.shape[1], channels)
        for img in range(num_images):
            regions = (image_index == img).nonzero()[:, 0]
            if len(regions) == 0:
                continue
            fmap = feature_map[img].reshape(side, side, channels).permute(2, 0, 1)
            dup = fmap.unsqueeze(0).repeat(len(regions), 1, 1, 1)
            pos = points[regions]
            grid = pos.flip(dims=(2,)) if transposed else pos
            sampled = F.grid_sample(dup.float(), (2.0 * grid - 1.0).float().unsqueeze(2), align_corners=True)
            out = out.index_put((regions,), sampled.squeeze(3).transpose(-2, -1).to(out.dtype))
        return out

    def forward(self, feature_map, points, image_index, transposed=True, knn="original", deterministic=True,
                starts=None, return_groups=False):
        """feature_map [B, N, C], points [R, P, 2], image_index [R] -> [R, output_dim].

        starts: one [R] tensor per stage (random mode); ignored with ``deterministic``.
        return_groups: also return, per stage, (anchor indices [R, S], neighbour indices [R, S, k]); stage 0 in the
        order of ``points``, later stages into the previous stage's anchors.
        """
        all_points = points.float()
        all_fea = self.initial_features(feature_map, all_points, image_index, transposed)
        order = None
        if deterministic:
            order = xy_order(all_points)
            all_points = index_points(all_points, order)
            all_fea = index_points(all_fea, order)
        groups = []
        for stage, (npoint, k) in enumerate(zip(self.num_sub_point, self.num_neighbor)):
            start = nearest_to_centroid(all_points) if deterministic else starts[stage]
            fps_idx = farthest_point_sample(all_points, npoint, start)
            new_points = index_points(all_points, fps_idx)
            new_fea = index_points(all_fea, fps_idx)
            idx = knn_point(k, all_points, new_points, knn)
            grouped_points = index_points(all_points, idx)
            grouped_fea = index_points(all_fea, idx)
            if order is not None and stage == 0:
                original = order[..., None]  # position in the caller's order of each sorted point
                groups.append((index_points(original, fps_idx)[..., 0], index_points(original, idx)[..., 0]))
            else:
                groups.append((fps_idx, idx))

            local = torch.cat([grouped_fea, grouped_points.to(grouped_fea.dtype)], dim=-1)  # [R, S, k, C+2]
            anchor = torch.cat([new_fea, new_points.to(new_fea.dtype)], dim=-1).unsqueeze(-2)  # [R, S, 1, C+2]
            diff = self.diff_projector_list[stage](local - anchor)
            pairs = torch.cat([diff, anchor.repeat(1, 1, k, 1)], dim=-1)  # [R, S, k, 2(C+2)]
            b, n, s, d = pairs.shape
            pairs = pairs.permute(0, 1, 3, 2).reshape(-1, d, s)
            pairs = self.agg_projector_list[stage](pairs)  # [R*S, C, k]
            rows, width, _ = pairs.shape
            all_fea = self.pooler_list[stage](pairs).view(rows, width).reshape(b, n, -1)
            all_points = new_points
        out = self.dim_projector(self.flatten_projector(all_fea.flatten(1, -1)))
        return (out, groups) if return_groups else out
