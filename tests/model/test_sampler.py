"""Tests for ferret.model.sampler: the optimised sampler against the original's algorithm, geometry, contracts."""

import copy
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ferret.model.kernels.pair_pool import Bag, kernel_available, pair_pool
from ferret.model.sampler import (
    SpatialAwareVisualSampler,
    canonical_point_order,
    farthest_point_sample,
    fps_start_index,
    gather_points,
    group_points,
    knn_indices,
    sample_features,
    sample_region_points,
)
from sampler_reference import ReferenceGeoRegionSampler, knn_point, square_distance

SMALL = dict(input_dim=32, output_dim=48, num_init_point=64, num_sub_point=(16, 8), num_neighbor=(6, 6))
# The released hierarchy (512 points, anchors (128, 32), neighbours (24, 24)) on narrow features: fast to run.
RELEASE_HIERARCHY = dict(input_dim=24, output_dim=40, num_init_point=512, num_sub_point=(128, 32),
                         num_neighbor=(24, 24))


def make_sampler(seed=0, **overrides):
    torch.manual_seed(seed)
    return SpatialAwareVisualSampler(**{**SMALL, **overrides}).eval()


def make_masks(seed, shapes_and_boxes):
    """Random blobs inside boxes: [(H, W, (y0, y1, x0, x1), density), ...] -> list of bool [H, W]."""
    g = torch.Generator().manual_seed(seed)
    masks = []
    for height, width, (y0, y1, x0, x1), density in shapes_and_boxes:
        mask = torch.zeros(height, width, dtype=torch.bool)
        mask[y0:y1, x0:x1] = torch.rand(y1 - y0, x1 - x0, generator=g) < density
        mask[y0, x0] = True
        masks.append(mask)
    return masks


def small_batch(seed=0, channels=32, num_points=64):
    """Two images (6x6 patch maps), four regions of mixed shapes: (feature_map, points, image_index)."""
    g = torch.Generator().manual_seed(seed)
    feature_map = torch.randn(2, 36, channels, generator=g)
    masks = make_masks(
        seed,
        [
            (40, 50, (5, 30, 10, 45), 0.5),  # more pixels than points: random subset
            (40, 50, (20, 24, 0, 5), 1.0),  # 20 pixels: repeats, exact ties everywhere
            (30, 30, (0, 30, 0, 30), 0.2),
            (40, 50, (0, 40, 0, 50), 0.05),
        ],
    )
    points = sample_region_points(masks, num_points, generator=g)
    image_index = torch.tensor([0, 0, 1, 1])
    return feature_map, points, image_index


# ------------------------------------------------------------------------------------------------------------
# Region shapes for the parity tests (masks are [H, W], row = y)
# ------------------------------------------------------------------------------------------------------------


def box(h, w, y0, y1, x0, x1):
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


def disc(h, w, cy, cx, radius):
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return (ys - cy) ** 2 + (xs - cx) ** 2 <= radius**2


def free_form(h, w, seed):
    """A ring with a random bite and a detached blob: no box describes it."""
    g = torch.Generator().manual_seed(seed)
    mask = disc(h, w, h // 2, w // 2, min(h, w) // 3) & ~disc(h, w, h // 2, w // 2, min(h, w) // 6)
    mask[: h // 2, : w // 3] = False
    blob = torch.rand(h, w, generator=g) < 0.3
    mask |= blob & disc(h, w, h // 5, 4 * w // 5, min(h, w) // 10)
    return mask


def exactly_512(h, w, seed):
    """A free-form mask with exactly 512 True pixels."""
    g = torch.Generator().manual_seed(seed)
    inside = disc(h, w, h // 2, w // 3, 30).flatten().nonzero()[:, 0]
    mask = torch.zeros(h * w, dtype=torch.bool)
    mask[inside[torch.randperm(len(inside), generator=g)[:512]]] = True
    return mask.view(h, w)


CASES = {
    # name: (masks, image index of each region)
    "boxes": ([box(336, 336, 40, 200, 60, 300), box(336, 336, 250, 300, 0, 40), box(336, 336, 10, 30, 10, 60),
               box(480, 320, 100, 400, 50, 200)], [0, 0, 1, 2]),
    "free_form": ([free_form(336, 336, 0), free_form(200, 300, 1), free_form(336, 336, 2)], [0, 1, 1]),
    "borders": ([box(336, 336, 0, 336, 0, 12), box(336, 336, 320, 336, 0, 336), box(336, 336, 300, 336, 300, 336),
                 box(336, 336, 0, 2, 334, 336), box(336, 336, 0, 1, 0, 1)], [0, 0, 1, 1, 2]),
    "exactly_512": ([exactly_512(336, 336, 0), box(336, 336, 100, 116, 200, 232), exactly_512(240, 320, 1)],
                    [0, 1, 1]),
}


def original_points(mask):
    """The original's points for a mask with at most 512 pixels: nonzero() of its [W, H] mask over (W, H)."""
    height, width = mask.shape
    return mask.T.nonzero() / torch.tensor([width, height])


def parity_inputs(case, seed=0, channels=24):
    masks, image_index = CASES[case]
    g = torch.Generator().manual_seed(seed)
    feature_map = torch.randn(3, 576, channels, generator=g)
    points = sample_region_points(masks, 512, seed=seed)
    return feature_map, points, torch.tensor(image_index), masks


def grads_of(module, feature_map, run, weights):
    feature_map = feature_map.clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    out = run(module, feature_map)
    (out * weights.to(out.dtype)).sum().backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters()}
    grads["feature_map"] = feature_map.grad
    return out.detach(), grads


def assert_grads_close(ours, ref):
    """Gradients agree to 1e-5 of each tensor's largest entry.

    ``ref`` comes from the reference run in float64 after its fp32 feature read: the original algorithm without
    rounding. The fp32 reference itself is further from it than that for some gradients (its LayerNorm-parameter
    gradients are sequential fp32 sums over thousands of pairs: up to 3e-5 of the largest entry, measured).
    """
    assert ours.keys() == ref.keys()
    for name in ref:
        scale = max(1.0, ref[name].abs().max().item())
        torch.testing.assert_close(ours[name].double(), ref[name], rtol=0, atol=1e-5 * scale, msg=name)
        assert ref[name].abs().max() > 0, name


def reference_grads(sampler, feature_map, run, weights):
    """(fp32 output, float64 gradients) of the reference with ``sampler``'s weights."""
    out, _ = grads_of(ReferenceGeoRegionSampler.like(sampler), feature_map, run, weights)
    _, grads = grads_of(ReferenceGeoRegionSampler.like(sampler).double(), feature_map.double(), run, weights)
    return out, grads


# ------------------------------------------------------------------------------------------------------------
# Structure
# ------------------------------------------------------------------------------------------------------------


def test_state_dict_matches_released_checkpoint_keys_and_shapes():
    with torch.device("meta"):
        sampler = SpatialAwareVisualSampler(input_dim=1024, output_dim=4096)
    expected = {
        "diff_projector_list.0.weight": (1026, 1026),
        "diff_projector_list.0.bias": (1026,),
        "diff_projector_list.1.weight": (1026, 1026),
        "diff_projector_list.1.bias": (1026,),
        "agg_projector_list.0.net.0.weight": (1024, 2052, 1),
        "agg_projector_list.0.net.0.bias": (1024,),
        "agg_projector_list.0.norm.weight": (1024,),
        "agg_projector_list.0.norm.bias": (1024,),
        "agg_projector_list.1.net.0.weight": (1024, 2052, 1),
        "agg_projector_list.1.net.0.bias": (1024,),
        "agg_projector_list.1.norm.weight": (1024,),
        "agg_projector_list.1.norm.bias": (1024,),
        "flatten_projector.weight": (1024, 32768),
        "flatten_projector.bias": (1024,),
        "dim_projector.weight": (4096, 1024),
        "dim_projector.bias": (4096,),
    }
    assert {k: tuple(v.shape) for k, v in sampler.state_dict().items()} == expected
    assert (sampler.num_init_point, sampler.num_sub_point, sampler.num_neighbor, sampler.pooler_mode) == (
        512,
        (128, 32),
        (24, 24),
        "max",
    )


def test_invalid_pooler_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="pooler_mode must be one of .*'median'"):
        SpatialAwareVisualSampler(**SMALL, pooler_mode="median")


@pytest.mark.skipif(shutil.which("g++") is None and not os.environ.get("CXX"), reason="no C++ compiler")
def test_cpu_kernel_builds_where_a_compiler_exists():
    if os.environ.get("FERRET_SAMPLER_KERNEL") == "0":
        pytest.skip("kernel disabled by FERRET_SAMPLER_KERNEL=0")
    assert kernel_available()


# ------------------------------------------------------------------------------------------------------------
# The optimised sampler == the original's algorithm (tests/sampler_reference.py), compat mode
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_kernel", [True, False], ids=["kernel", "pytorch"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_compat_mode_equals_the_original_forward_and_backward(case, use_kernel):
    torch.manual_seed(0)
    sampler = SpatialAwareVisualSampler(**RELEASE_HIERARCHY, transposed=True).train()
    sampler.use_kernel = use_kernel
    feature_map, points, image_index, masks = parity_inputs(case)
    ref_points = points
    if case == "exactly_512":  # no sub-sampling: the reference lists the pixels the original's way
        ref_points = torch.stack([original_points(m) for m in masks])
        assert all(int(m.sum()) == 512 for m in masks)
    weights = torch.randn(len(masks), 40, generator=torch.Generator().manual_seed(1))

    out, ours = grads_of(sampler, feature_map, lambda m, f: m(f, points, image_index, deterministic=True), weights)
    ref_out, ref = reference_grads(sampler, feature_map, lambda m, f: m(f, ref_points, image_index), weights)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-5)
    assert ref_out.abs().max() > 0.1
    assert_grads_close(ours, ref)


@pytest.mark.parametrize("case", sorted(CASES))
def test_compat_mode_selects_the_original_anchors_and_neighbour_sets(case):
    feature_map, points, image_index, _ = parity_inputs(case)
    sampler = SpatialAwareVisualSampler(**RELEASE_HIERARCHY, transposed=True)
    _, ref_groups = ReferenceGeoRegionSampler.like(sampler)(feature_map, points, image_index, return_groups=True)
    plan = group_points(points, (128, 32), (24, 24), deterministic=True, distance="original")
    for stage, (groups, (anchors, neighbours)) in enumerate(zip(plan, ref_groups)):
        assert torch.equal(groups.anchor_index, anchors), f"stage {stage} anchors"
        assert torch.equal(groups.neighbor_index.sort(-1).values, neighbours.sort(-1).values), f"stage {stage}"


def test_exact_distances_cut_ties_differently_so_compat_mode_needs_the_original_formula():
    # Pixel grids make many neighbours exactly equidistant; the original's formula decides by its rounding.
    _, points, _, _ = parity_inputs("boxes")
    anchors = gather_points(points, group_points(points, (128,), (24,), deterministic=True)[0].anchor_index)
    original = knn_indices(anchors, points, 24, distance="original").sort(-1).values
    exact = knn_indices(anchors, points, 24, distance="exact").sort(-1).values
    assert torch.equal(original, knn_point(24, points, anchors, "original").sort(-1).values)
    differs = (original != exact).any(-1)
    assert differs.sum() > 0, "expected some neighbourhoods where the two formulas pick different points"
    # Where they differ, the swapped points are equidistant in exact arithmetic: the k-th distance is the same.
    exact_dist = ((anchors[:, :, None] - points[:, None]) ** 2).sum(-1)
    kth = lambda idx: exact_dist.gather(2, idx).max(-1).values  # noqa: E731
    torch.testing.assert_close(kth(original)[differs], kth(exact)[differs], rtol=0, atol=1e-6)
    # and the reference's formula is the original's: it agrees with the module's "original" distances
    by_formula = torch.topk(square_distance(anchors, points), 24, -1, largest=False, sorted=False).indices
    assert torch.equal(knn_point(24, points, anchors, "original"), by_formula)


def test_random_mode_equals_the_original_with_the_same_start_points():
    torch.manual_seed(0)
    sampler = SpatialAwareVisualSampler(**RELEASE_HIERARCHY, transposed=True).eval()
    feature_map, points, image_index, masks = parity_inputs("free_form")
    with torch.no_grad():
        out = sampler(feature_map, points, image_index, generator=torch.Generator().manual_seed(9))
        # The module draws one start per region for each stage, in that order, from the generator.
        g = torch.Generator().manual_seed(9)
        starts = [torch.randint(0, 512, (3,), generator=g), torch.randint(0, 128, (3,), generator=g)]
        ref = ReferenceGeoRegionSampler.like(sampler)(feature_map, points, image_index, deterministic=False,
                                                      starts=starts)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("pooler_mode", ["max", "mean"])
def test_xy_mode_equals_the_reference_read_at_the_region_with_exact_distances(pooler_mode):
    torch.manual_seed(0)
    sampler = SpatialAwareVisualSampler(**RELEASE_HIERARCHY, pooler_mode=pooler_mode, transposed=False).train()
    feature_map, points, image_index, masks = parity_inputs("borders")
    weights = torch.randn(len(masks), 40, generator=torch.Generator().manual_seed(1))
    out, ours = grads_of(sampler, feature_map, lambda m, f: m(f, points, image_index, deterministic=True), weights)
    ref_out, ref = reference_grads(sampler, feature_map,
                                   lambda m, f: m(f, points, image_index, transposed=False, knn="exact"), weights)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-5)
    assert_grads_close(ours, ref)


def test_forward_equals_the_original_at_release_sizes():
    torch.manual_seed(0)
    sampler = SpatialAwareVisualSampler(input_dim=1024, output_dim=64, transposed=True).eval()
    g = torch.Generator().manual_seed(3)
    feature_map = torch.randn(1, 576, 1024, generator=g)
    masks = make_masks(3, [(336, 336, (40, 200, 60, 300), 0.3), (336, 336, (250, 300, 0, 40), 0.2)])
    points = sample_region_points(masks, 512, generator=g)
    index = torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        out = sampler(feature_map, points, index, deterministic=True)
        ref = ReferenceGeoRegionSampler.like(sampler)(feature_map, points, index)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_gradients_at_release_sizes_agree_with_a_float64_run_of_the_original():
    # At C = 1024 gradient sums run over tens of thousands of pair terms, so two fp32 implementations differ by
    # their rounding; an fp64 run of the reference is the yardstick (mean pooling: no max-pool winners to flip).
    # The factored form must not lose accuracy where the diff projection's gradient is a small difference of
    # large per-point and per-anchor sums.
    torch.manual_seed(0)
    sampler = SpatialAwareVisualSampler(input_dim=1024, output_dim=16, pooler_mode="mean", transposed=True).train()
    g = torch.Generator().manual_seed(4)
    feature_map = torch.randn(1, 576, 1024, generator=g)
    masks = [free_form(336, 336, 3), box(336, 336, 300, 336, 0, 30)]
    points = sample_region_points(masks, 512, seed=0)
    index = torch.zeros(2, dtype=torch.long)
    weights = torch.randn(2, 16, generator=g)
    _, ours = grads_of(sampler, feature_map, lambda m, f: m(f, points, index, deterministic=True), weights)
    exact = ReferenceGeoRegionSampler.like(sampler).double()
    _, truth = grads_of(exact, feature_map.double(), lambda m, f: m(f, points.double(), index), weights.double())
    for name, value in truth.items():
        error = ((ours[name].double() - value).norm() / value.norm()).item()
        assert error < 1e-5, f"{name}: relative error {error:.2e} against float64"


def test_optimised_path_is_deterministic_forward_and_backward():
    torch.manual_seed(0)
    sampler = SpatialAwareVisualSampler(**RELEASE_HIERARCHY, transposed=True).train()
    feature_map, points, image_index, masks = parity_inputs("free_form")
    weights = torch.randn(len(masks), 40)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (2, 2):
            torch.set_num_threads(n)
            runs.append(grads_of(sampler, feature_map,
                                 lambda m, f: m(f, points, image_index, deterministic=True), weights))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(runs[0][0], runs[1][0])
    for name in runs[0][1]:
        assert torch.equal(runs[0][1][name], runs[1][1][name]), name


def test_inference_caches_folded_weights_until_they_change():
    torch.manual_seed(0)
    sampler = SpatialAwareVisualSampler(**RELEASE_HIERARCHY, transposed=True).eval()
    feature_map, points, image_index, _ = parity_inputs("boxes")
    with torch.no_grad():
        first = sampler(feature_map, points, image_index, deterministic=True)
        cached = {stage: entry[1] for stage, entry in sampler._folded_cache.items()}
        assert sorted(cached) == [0, 1] and all(w.u_feat is not None for w in cached.values())
        again = sampler(feature_map, points, image_index, deterministic=True)
        assert all(sampler._folded_cache[s][1] is cached[s] for s in cached)  # reused, not recomputed
        sampler.diff_projector_list[0].weight.mul_(1.5)  # an in-place update (optimizer step, load_state_dict)
        changed = sampler(feature_map, points, image_index, deterministic=True)
        ref = ReferenceGeoRegionSampler.like(sampler)(feature_map, points, image_index)
    assert torch.equal(first, again)
    assert not torch.allclose(changed, first)
    torch.testing.assert_close(changed, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["max", "mean"])
def test_pair_kernel_equals_the_pytorch_path_dense_and_bag(mode):
    g = torch.Generator().manual_seed(0)
    regions, points, anchors, k, channels, rows = 3, 20, 6, 5, 16, 30
    table = torch.randn(rows, channels, generator=g)
    bag = Bag(table, torch.randint(0, rows, (regions, points, 3), generator=g), torch.rand(regions, points, 3,
                                                                                            generator=g))
    dense_v = torch.randn(regions, anchors, channels, generator=g)
    nb = torch.randint(0, points, (regions, anchors, k), generator=g)
    nb[0, 0, 1] = nb[0, 0, 0]  # a repeated neighbour: exact ties in every channel
    weight, bias = torch.randn(channels, generator=g), torch.randn(channels, generator=g)
    grad = torch.randn(regions, anchors, channels, generator=g)
    results = []
    for use_kernel in (True, False):
        leaves = [t.clone().requires_grad_() for t in (table, dense_v, weight, bias)]
        out = pair_pool(Bag(leaves[0], bag.index, bag.weight), leaves[1], nb, leaves[2], leaves[3], 1e-5, mode,
                        use_kernel)
        results.append([out, *torch.autograd.grad(out, leaves, grad)])
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, rtol=0, atol=2e-5)
    # and both equal the autograd of the plain formula
    h = gather_points(bag.materialise(), nb) + dense_v[:, :, None]
    y = F.layer_norm(h.relu(), (channels,), weight, bias, 1e-5)
    expected = y.max(dim=2).values if mode == "max" else y.mean(dim=2)
    torch.testing.assert_close(results[0][0], expected, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# Reading the feature map
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transposed", [False, True])
def test_sample_features_is_grid_sample_with_zero_padding(transposed):
    g = torch.Generator().manual_seed(0)
    feature_map = torch.randn(3, 49, 5, generator=g)
    points = torch.rand(4, 30, 2, generator=g) * 1.2 - 0.1  # some outside [0, 1]: zeros padding
    points[0, :4] = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 0.0], [0.0, 1.0]])  # exact corners
    image_index = torch.tensor([2, 0, 0, 1])
    ours = sample_features(feature_map, points, image_index, transposed=transposed)
    maps = feature_map.reshape(3, 7, 7, 5).permute(0, 3, 1, 2)[image_index]
    grid = 2 * (points.flip(-1) if transposed else points) - 1
    ref = F.grid_sample(maps, grid[:, :, None], align_corners=True)[..., 0].transpose(1, 2)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    # The corners read exactly the corner patches (align_corners=True).
    assert torch.equal(ours[0, 0], feature_map[2, 0])
    assert torch.equal(ours[0, 1], feature_map[2, 48])


@pytest.mark.parametrize("transposed", [False, True])
def test_read_location_correct_versus_transposed(transposed):
    # A 24x24 map whose feature is its own (row, col); bilinear reading of a linear function is exact.
    side = 24
    grid = torch.arange(side, dtype=torch.float32)
    rows, cols = torch.meshgrid(grid, grid, indexing="ij")
    feature_map = torch.stack([rows, cols], dim=-1).reshape(1, side * side, 2)
    mask = torch.zeros(336, 336, dtype=torch.bool)
    mask[250:300, 0:40] = True  # x in [0, 40), y in [250, 300) of a 336x336 image
    points = sample_region_points([mask], 512, generator=torch.Generator().manual_seed(0))
    x_norm, y_norm = points[0, :, 0], points[0, :, 1]
    assert x_norm.max() < 40 / 336 and y_norm.min() >= 250 / 336

    feats = sample_features(feature_map, points, torch.zeros(1, dtype=torch.long), transposed=transposed)[0]
    row, col = feats[:, 0], feats[:, 1]
    if transposed:  # the original: row = x, col = y (a region at x < 40, y ~ 275 read at column ~18.8, row ~1.3)
        torch.testing.assert_close(row, x_norm * (side - 1))
        torch.testing.assert_close(col, y_norm * (side - 1))
        assert abs(col.mean() - 18.8) < 0.15 and abs(row.mean() - 1.3) < 0.15
    else:  # at the region: row ~ y / 14, col ~ x / 14
        torch.testing.assert_close(row, y_norm * (side - 1))
        torch.testing.assert_close(col, x_norm * (side - 1))
        assert abs(row.mean() - 18.8) < 0.15 and abs(col.mean() - 1.3) < 0.15
        assert row.min() >= 250 / 14 - 1 and row.max() <= 300 / 14 and col.max() <= 40 / 14


# ------------------------------------------------------------------------------------------------------------
# Point-cloud hierarchy
# ------------------------------------------------------------------------------------------------------------


def plain_fps(points, num_samples, start):
    """One region, Python loop: points [P, 2] -> list of indices."""
    chosen = [int(start)]
    nearest = ((points - points[start]) ** 2).sum(-1)
    for _ in range(num_samples - 1):
        nxt = int(torch.argmax(nearest))
        chosen.append(nxt)
        nearest = torch.minimum(nearest, ((points - points[nxt]) ** 2).sum(-1))
    return chosen


def test_farthest_point_sample_matches_a_plain_loop():
    points = torch.rand(3, 50, 2, generator=torch.Generator().manual_seed(0))
    start = torch.tensor([0, 17, 49])
    got = farthest_point_sample(points, 12, start)
    for r in range(3):
        assert got[r].tolist() == plain_fps(points[r], 12, start[r])
    assert all(len(set(row)) == 12 for row in got.tolist())


@pytest.mark.parametrize("distance", ["exact", "original"])
def test_knn_matches_brute_force(distance):
    g = torch.Generator().manual_seed(1)
    points = torch.rand(2, 40, 2, generator=g)
    queries = torch.rand(2, 7, 2, generator=g)
    got = knn_indices(queries, points, 5, distance)
    dist = ((queries[:, :, None] - points[:, None]) ** 2).sum(-1)
    expected = dist.argsort(dim=-1)[..., :5]
    if distance == "original":  # unordered, and equal as sets away from ties
        got, expected = got.sort(-1).values, expected.sort(-1).values
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="distance must be one of"):
        knn_indices(queries, points, 5, "manhattan")


def test_group_points_indexes_each_stage_and_starts_near_the_centroid():
    points = torch.rand(2, 64, 2, generator=torch.Generator().manual_seed(2))
    plan = group_points(points, (16, 8), (6, 4), deterministic=True)
    assert [tuple(p.anchor_index.shape) for p in plan] == [(2, 16), (2, 8)]
    assert [tuple(p.neighbor_index.shape) for p in plan] == [(2, 16, 6), (2, 8, 4)]
    assert int(plan[1].neighbor_index.max()) < 16 and int(plan[1].anchor_index.max()) < 16
    centroid = points.mean(1, keepdim=True)
    assert torch.equal(plan[0].anchor_index[:, 0], ((points - centroid) ** 2).sum(-1).argmin(1))
    # each anchor is its own nearest neighbour
    assert torch.equal(plan[0].neighbor_index[..., 0], plan[0].anchor_index)
    with pytest.raises(ValueError, match="stage 1: 20 anchors"):
        group_points(points, (16, 20), (6, 4))


def test_deterministic_mode_ignores_point_order():
    sampler = make_sampler()
    feature_map, points, image_index = small_batch(seed=4)
    perm = torch.stack([torch.randperm(64, generator=torch.Generator().manual_seed(r)) for r in range(4)])
    shuffled = gather_points(points, perm)
    assert not torch.equal(shuffled, points)

    plan_a = group_points(points, (16, 8), (6, 6), deterministic=True)
    plan_b = group_points(shuffled, (16, 8), (6, 6), deterministic=True)
    assert torch.equal(gather_points(points, plan_a[0].anchor_index), gather_points(shuffled, plan_b[0].anchor_index))
    canonical = gather_points(points, canonical_point_order(points))
    assert torch.equal(canonical, gather_points(shuffled, canonical_point_order(shuffled)))
    x, y = canonical[..., 0], canonical[..., 1]
    assert (x[:, 1:] >= x[:, :-1]).all() and ((x[:, 1:] > x[:, :-1]) | (y[:, 1:] >= y[:, :-1])).all()
    with torch.no_grad():
        out_a = sampler(feature_map, points, image_index, deterministic=True)
        out_b = sampler(feature_map, shuffled, image_index, deterministic=True)
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=1e-6)


def test_seeded_generator_makes_sampling_and_forward_reproducible():
    masks = make_masks(0, [(40, 50, (5, 30, 10, 45), 0.5), (30, 30, (0, 30, 0, 30), 0.02)])

    def points(seed):
        return sample_region_points(masks, 64, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(points(7), points(7))
    assert not torch.equal(points(7), points(8))

    sampler = make_sampler()
    feature_map = torch.randn(1, 36, 32, generator=torch.Generator().manual_seed(0))
    index = torch.zeros(2, dtype=torch.long)

    def forward(seed):
        with torch.no_grad():
            return sampler(feature_map, points(7), index, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(forward(1), forward(1))
    starts = {int(fps_start_index(points(7), generator=torch.Generator().manual_seed(s))[0]) for s in range(5)}
    assert len(starts) > 1  # random starts really are random across seeds


# ------------------------------------------------------------------------------------------------------------
# Dtypes and batching
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_and_stays_close_to_fp32(dtype):
    sampler = make_sampler()
    feature_map, points, image_index = small_batch(seed=5)
    half = copy.deepcopy(sampler).to(dtype)
    with torch.no_grad():
        full = sampler(feature_map, points, image_index, deterministic=True)
        low = half(feature_map.to(dtype), points, image_index, deterministic=True)
    assert low.dtype == dtype
    assert torch.isfinite(low).all()
    rel = (low.float() - full).norm() / full.norm()
    assert rel < 2e-2, f"{dtype}: relative error {rel:.4f}"


def test_batch_with_uneven_region_counts_equals_each_region_alone():
    sampler = make_sampler()
    g = torch.Generator().manual_seed(6)
    feature_map = torch.randn(2, 36, 32, generator=g)
    masks = make_masks(6, [(20, 20, (0, 10, 0, 10), 0.8), (20, 20, (5, 20, 5, 20), 0.3), (20, 20, (0, 20, 0, 5), 0.9)])
    points = sample_region_points(masks, 64, generator=g)
    image_index = torch.tensor([1, 0, 1])  # image 0 has one region, image 1 two
    with torch.no_grad():
        together = sampler(feature_map, points, image_index, deterministic=True)
        alone = torch.cat(
            [
                sampler(feature_map[i : i + 1], points[r : r + 1], torch.zeros(1, dtype=torch.long), deterministic=True)
                for r, i in enumerate(image_index.tolist())
            ]
        )
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)


def test_forward_validates_inputs_and_handles_no_regions():
    sampler = make_sampler()
    feature_map, points, image_index = small_batch()
    assert sampler(feature_map, points[:0], image_index[:0]).shape == (0, 48)
    with pytest.raises(ValueError, match=r"feature_map must be \[B, N, 32\]"):
        sampler(feature_map[..., :16], points, image_index)
    with pytest.raises(ValueError, match="square number"):
        sampler(feature_map[:, :35], points, image_index)
    with pytest.raises(ValueError, match=r"image_index values must lie in \[0, 2\)"):
        sampler(feature_map, points, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match=r"image_index must be \[R\] = \[4\]"):
        sampler(feature_map, points, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="stage 0: 16 anchors"):
        sampler(feature_map, points[:, :10], image_index)


# ------------------------------------------------------------------------------------------------------------
# Masks -> points
# ------------------------------------------------------------------------------------------------------------


def pixels_of(points, height, width):
    """points [P, 2] normalised -> (rows, cols) long, checking they are exact pixel indices."""
    cols = points[:, 0] * width
    rows = points[:, 1] * height
    torch.testing.assert_close(cols, cols.round(), rtol=0, atol=1e-4)
    torch.testing.assert_close(rows, rows.round(), rtol=0, atol=1e-4)
    return rows.round().long(), cols.round().long()


def test_sample_region_points_subsets_repeats_and_keeps_order_across_shapes():
    big = torch.zeros(30, 40, dtype=torch.bool)
    big[2:30, 3:40] = True  # 1036 pixels > 64
    small = torch.zeros(20, 10, dtype=torch.bool)
    small[4, 2:7] = True  # 5 pixels < 64
    exact = torch.zeros(30, 40, dtype=torch.bool)
    exact[0:8, 0:8] = True  # exactly 64
    masks = [big, small, exact.numpy(), small.clone()]
    points = sample_region_points(masks, 64, generator=torch.Generator().manual_seed(0))
    assert points.shape == (4, 64, 2) and points.dtype == torch.float32
    assert (points >= 0).all() and (points < 1).all()

    for r, mask in enumerate([big, small, exact, small]):
        rows, cols = pixels_of(points[r], *mask.shape)
        assert mask[rows, cols].all(), f"region {r} has points outside its mask"
        pixel_ids = set((rows * mask.shape[1] + cols).tolist())
        if r == 0:
            assert len(pixel_ids) == 64  # a subset without repeats
        else:
            assert pixel_ids == set(mask.flatten().nonzero()[:, 0].tolist())  # every pixel is present
    # x is the column divided by the width, y the row divided by the height
    assert set(points[1, :, 1].tolist()) == {torch.tensor(4 / 20).item()}
    assert set(points[1, :, 0].tolist()) == set(torch.arange(2, 7).div(10).tolist())


def test_sample_region_points_draws_uniformly_and_repeats_uniformly():
    # 3 pixels, 3000 points: every pixel once, then repeats with frequencies near 1/3 each.
    mask = torch.zeros(5, 5, dtype=torch.bool)
    mask[1, 1] = mask[2, 3] = mask[4, 0] = True
    points = sample_region_points([mask], 3000, generator=torch.Generator().manual_seed(0))[0]
    rows, cols = pixels_of(points, 5, 5)
    counts = torch.bincount(rows * 5 + cols, minlength=25)[[6, 13, 20]]
    assert counts.sum() == 3000 and (counts - 1000).abs().max() < 100
    # 400 pixels, 100 points: each pixel is chosen with probability 1/4 (over 200 draws: ~50 times).
    many = torch.ones(20, 20, dtype=torch.bool)
    hits = torch.zeros(400)
    for seed in range(200):
        rows, cols = pixels_of(sample_region_points([many], 100, generator=torch.Generator().manual_seed(seed))[0],
                               20, 20)
        hits[rows * 20 + cols] += 1
    assert hits.min() > 20 and hits.max() < 85 and hits.sum() == 20000


def test_sample_region_points_seed_mode_depends_only_on_the_mask():
    masks = make_masks(9, [(30, 40, (0, 30, 0, 40), 0.5), (30, 40, (10, 12, 5, 9), 1.0), (20, 20, (0, 20, 0, 20), 0.5)])
    together = sample_region_points(masks, 64, seed=3)
    alone = sample_region_points([masks[1]], 64, seed=3)
    assert torch.equal(together[1], alone[0])  # the batch around a region does not change its points
    assert torch.equal(together, sample_region_points(masks, 64, seed=3))
    assert not torch.equal(together[0], sample_region_points(masks, 64, seed=4)[0])
    rows, cols = pixels_of(together[0], 30, 40)
    assert masks[0][rows, cols].all() and len(set((rows * 40 + cols).tolist())) == 64


def test_sample_region_points_rejects_bad_masks_by_index():
    ok = torch.ones(4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="region mask 1 is empty"):
        sample_region_points([ok, torch.zeros(4, 4, dtype=torch.bool)])
    with pytest.raises(ValueError, match="region mask 2 is empty"):
        sample_region_points([ok, torch.ones(3, 5, dtype=torch.bool), torch.zeros(4, 4, dtype=torch.bool)])
    with pytest.raises(ValueError, match="region mask 0: expected a 2-D bool tensor"):
        sample_region_points([ok.float()])
    with pytest.raises(ValueError, match="region mask 1: expected a 2-D bool tensor"):
        sample_region_points([ok, ok[None]])
    assert sample_region_points([], 8).shape == (0, 8, 2)
    assert np.isclose(sample_region_points([np.ones((2, 2), dtype=bool)], 4).sum().item(), 2.0)
