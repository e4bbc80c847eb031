"""The sampler in training: forward + backward of the optimised module against the reference, and where time goes.

    python scripts/bench/bench_sampler_train.py --quick                    # 4 images x 4 regions, small dims, CPU
    python scripts/bench/bench_sampler_train.py                            # 16 images x 8 regions, 7B sizes, CPU fp32
    python scripts/bench/bench_sampler_train.py --device cuda --dtype bf16 # the same batch on a GPU

A training batch of the released shapes (``--config 7b``): 16 images of 24 x 24 CLIP patches (C = 1024), 8 regions
per image, 512 points per region, anchors (128, 32), neighbours (24, 24), output 4096. Masks are random boxes, points
and polygons on 320..640 px images (scripts/bench/synthetic.py). Everything runs in training mode (random point
subsets, random farthest-point starts), as ``FerretLlamaForCausalLM.region_features`` does under ``model.train()``.

It prints:

1. forward + backward ms of the optimised ``SpatialAwareVisualSampler`` and of the plain reference
   (tests/sampler_reference.py) on the same points (``--skip-reference`` to leave the reference out: at the full
   batch it holds ~[128, 128, 24, 2052] fp32 pairs, several GB on CPU);
2. a breakdown of one optimised training call, each piece timed on its own with the same inputs: masks -> points
   (``sample_region_points``), bilinear read (``sample_features``), farthest-point sampling and kNN per stage,
   and the rest (projections, neighbour gather, LayerNorm, pooling, final projections) forward and backward;
3. the number of operator calls that farthest-point sampling and kNN issue (each is at least one kernel launch on
   a GPU), which is what a fused FPS + kNN kernel would save.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import synthetic as S  # noqa: E402
from ferret.model.sampler import (  # noqa: E402
    SpatialAwareVisualSampler,
    farthest_point_sample,
    fps_start_index,
    gather_points,
    group_points,
    knn_indices,
    sample_features,
    sample_region_points,
)
from tests.sampler_reference import reference_forward  # noqa: E402

SHAPES = {
    # channels, output, points, anchors, neighbours, patches per side
    "7b": (1024, 4096, 512, (128, 32), (24, 24), 24),
    "13b": (1024, 5120, 512, (128, 32), (24, 24), 24),
    "quick": (128, 256, 128, (32, 8), (8, 8), 24),
}


def timed(fn, device: torch.device, repeats: int, warmup: int = 1) -> tuple[float, float, object]:
    """Median wall ms and median process CPU ms of ``fn()`` (synchronised), and its last result."""
    out = None
    for _ in range(warmup):
        out = fn()
    wall, cpu = [], []
    for _ in range(repeats):
        S.sync(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        out = fn()
        S.sync(device)
        wall.append((time.perf_counter() - start) * 1000)
        cpu.append((time.process_time() - start_cpu) * 1000)
    return statistics.median(wall), statistics.median(cpu), out


def count_ops(fn) -> int:
    """aten operator calls that reach a kernel while ``fn()`` runs (each is >= 1 kernel launch on a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counter.calls += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        fn()
    return Counter.calls


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", choices=["7b", "13b"], default="7b", help="sampler sizes of this model")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--regions", type=int, default=8, help="regions per image")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(S.DTYPES), default="fp32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-reference", action="store_true", help="time the optimised module only")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="4 images x 4 regions, C=128, 128 points, (32, 8) anchors: seconds on CPU")
    args = parser.parse_args(argv)

    shape = "quick" if args.quick else args.config
    if args.quick:
        args.images, args.regions, args.repeats = 4, 4, 2
        args.threads = args.threads or 1
    if args.threads:
        torch.set_num_threads(args.threads)
    channels, output_dim, num_points, anchors, neighbors, side = SHAPES[shape]
    device, dtype = torch.device(args.device), S.DTYPES[args.dtype]
    rng = np.random.default_rng(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    torch.manual_seed(args.seed)
    sampler = SpatialAwareVisualSampler(channels, output_dim, num_points, anchors, neighbors).to(device, dtype).train()
    feature_map = torch.randn(args.images, side * side, channels, generator=generator).to(device, dtype)
    masks, image_index = [], []
    for image in range(args.images):
        width, height = (int(v) for v in rng.integers(320, 641, size=2))
        masks += [m.to(device) for m in S.random_region_masks(args.regions, width, height, rng)]
        image_index += [image] * args.regions
    image_index = torch.tensor(image_index, device=device)
    num_regions = len(masks)
    points = sample_region_points(masks, num_points, generator=generator).to(device)
    grad_out = torch.randn(num_regions, output_dim, generator=generator).to(device, dtype)

    def train_call(forward):
        def call():
            sampler.zero_grad(set_to_none=True)
            out = forward(sampler, feature_map, points, image_index, deterministic=False)
            out.backward(grad_out)
            return out.detach()
        return call

    where = f"{device}" + (f" ({torch.get_num_threads()} CPU threads)" if device.type == "cpu" else "")
    print(f"sampler training batch: {args.images} images x {args.regions} regions = {num_regions} regions, "
          f"C={channels}, output {output_dim}, {num_points} points, anchors {anchors}, neighbours {neighbors}; "
          f"{args.dtype} on {where}; median of {args.repeats} after 1 warm-up")
    print()
    print("| implementation | forward+backward ms (wall) | process CPU ms |")
    print("|---|---:|---:|")
    opt_wall, opt_cpu, _ = timed(train_call(SpatialAwareVisualSampler.__call__), device, args.repeats)
    if not args.skip_reference:
        ref_wall, ref_cpu, _ = timed(train_call(reference_forward), device, args.repeats)
        print(f"| reference (tests/sampler_reference.py) | {ref_wall:.1f} | {ref_cpu:.1f} |")
    print(f"| optimised (SpatialAwareVisualSampler) | {opt_wall:.1f} | {opt_cpu:.1f} |")
    if not args.skip_reference:
        print(f"| speed-up | {ref_wall / opt_wall:.2f}x | {ref_cpu / opt_cpu:.2f}x |")

    # ---- where one optimised training call spends its time
    pieces: dict[str, tuple[float, float]] = {}
    pieces["masks -> points (sample_region_points)"] = timed(
        lambda: sample_region_points(masks, num_points, generator=generator), device, args.repeats)[:2]
    pieces["bilinear read (sample_features)"] = timed(
        lambda: sample_features(feature_map, points, image_index, dtype=dtype), device, args.repeats)[:2]
    pos = points.float()
    fps_ms = knn_ms = (0.0, 0.0)
    fps_ops = knn_ops = 0
    for num_anchors, k in zip(anchors, neighbors, strict=True):
        start = fps_start_index(pos, False, generator)

        def fps_call(pos=pos, num_anchors=num_anchors, start=start):
            return farthest_point_sample(pos, num_anchors, start)

        fps = timed(fps_call, device, args.repeats)
        anchor_pos = gather_points(pos, fps[2])

        def knn_call(anchor_pos=anchor_pos, pos=pos, k=k):
            return knn_indices(anchor_pos, pos, k)

        knn = timed(knn_call, device, args.repeats)
        fps_ms = (fps_ms[0] + fps[0], fps_ms[1] + fps[1])
        knn_ms = (knn_ms[0] + knn[0], knn_ms[1] + knn[1])
        fps_ops += count_ops(fps_call)
        knn_ops += count_ops(knn_call)
        pos = anchor_pos
    pieces[f"farthest-point sampling ({' + '.join(map(str, anchors))} steps)"] = fps_ms
    pieces["kNN (all stages)"] = knn_ms

    forward_wall, forward_cpu, _ = timed(
        lambda: sampler(feature_map, points, image_index, deterministic=False), device, args.repeats)
    total_wall, total_cpu = opt_wall, opt_cpu
    rest_fwd = (forward_wall - sum(v[0] for k, v in pieces.items() if not k.startswith("masks")),
                forward_cpu - sum(v[1] for k, v in pieces.items() if not k.startswith("masks")))
    pieces["projections, gather, LayerNorm, pooling: forward (rest)"] = rest_fwd
    pieces["backward (all of it: projections, gather, LayerNorm, read)"] = (total_wall - forward_wall,
                                                                          total_cpu - forward_cpu)
    whole = sum(v[0] for v in pieces.values())
    print()
    print("| piece of one training call | wall ms | process CPU ms | share |")
    print("|---|---:|---:|---:|")
    for name, (wall, cpu) in pieces.items():
        print(f"| {name} | {wall:.1f} | {cpu:.1f} | {wall / whole:.1%} |")
    print(f"| total (points + forward + backward) | {whole:.1f} | {sum(v[1] for v in pieces.values()):.1f} | |")
    plan_ops = count_ops(lambda: group_points(points, anchors, neighbors, False, generator))
    print()
    print(f"operator calls: farthest-point sampling {fps_ops}, kNN {knn_ops}, whole group_points {plan_ops} "
          f"(each is >= 1 kernel launch on a GPU; at ~5-10 us per launch that is "
          f"{plan_ops * 5e-3:.1f}-{plan_ops * 1e-2:.1f} ms of launch latency per sampler forward, independent of "
          "the batch size)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
