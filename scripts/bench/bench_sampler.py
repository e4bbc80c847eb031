"""Time the spatial-aware visual sampler: the plain reference against the optimised module, same inputs.

    python scripts/bench/bench_sampler.py                       # 4 images x 8 regions, C=1024, CPU, fp32
    python scripts/bench/bench_sampler.py --small               # tiny dims, a few seconds
    python scripts/bench/bench_sampler.py --quick               # --small, forward + backward, 2 repeats (make bench)
    python scripts/bench/bench_sampler.py --device cuda --dtype bf16 --backward

Both run in deterministic mode, so they use the same anchors and neighbours and their outputs can be compared.
The script prints milliseconds per call for each, the speed-up, and the largest difference between the two outputs.
It exits with status 1 when the outputs disagree.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from ferret.model.sampler import SpatialAwareVisualSampler, sample_region_points  # noqa: E402
from tests.sampler_reference import reference_forward  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_inputs(args, device):
    """Random CLIP-like features and random box-shaped blob masks: (feature_map, points, image_index)."""
    g = torch.Generator().manual_seed(args.seed)
    feature_map = torch.randn(args.images, args.side * args.side, args.channels, generator=g)
    masks, image_index = [], []
    for image in range(args.images):
        for _ in range(args.regions):
            x0, y0 = torch.randint(0, args.image_size - 40, (2,), generator=g).tolist()
            w, h = torch.randint(20, args.image_size // 2, (2,), generator=g).tolist()
            w, h = min(w, args.image_size - x0), min(h, args.image_size - y0)
            mask = torch.zeros(args.image_size, args.image_size, dtype=torch.bool)
            mask[y0 : y0 + h, x0 : x0 + w] = torch.rand(h, w, generator=g) < 0.6
            mask[y0, x0] = True
            masks.append(mask)
            image_index.append(image)
    points = sample_region_points(masks, args.points, generator=g)
    return feature_map.to(device), points.to(device), torch.tensor(image_index, device=device)


def time_call(fn, repeats, warmup, device):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        out = fn()
    sync()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = fn()
        sync()
        wall.append((time.perf_counter() - start) * 1000)
        cpu.append((time.process_time() - start_cpu) * 1000)
    return out, wall, cpu


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--small", action="store_true", help="C=32, 64 points, (16, 8) anchors, (6, 6) neighbours")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--regions", type=int, default=8, help="regions per image")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--backward", action="store_true", help="time forward + backward (training) instead")
    parser.add_argument("--pooler", choices=["max", "mean"], default="max")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="--small --backward with 2 repeats (for make bench)")
    args = parser.parse_args(argv)

    if args.quick:
        args.small, args.backward, args.repeats = True, True, 2
    if args.small:
        args.channels, args.output_dim, args.points, args.sub, args.neighbors = 32, 48, 64, (16, 8), (6, 6)
    else:
        args.channels, args.output_dim, args.points, args.sub, args.neighbors = 1024, 4096, 512, (128, 32), (24, 24)
    args.side, args.image_size = 24, 336
    device, dtype = torch.device(args.device), DTYPES[args.dtype]

    torch.manual_seed(args.seed)
    sampler = SpatialAwareVisualSampler(
        args.channels, args.output_dim, args.points, args.sub, args.neighbors, pooler_mode=args.pooler
    ).to(device=device, dtype=dtype)
    feature_map, points, image_index = make_inputs(args, device)
    feature_map = feature_map.to(dtype)
    grad_out = torch.randn(points.shape[0], args.output_dim, device=device, dtype=dtype)

    def run(forward):
        def call():
            if not args.backward:
                with torch.no_grad():
                    return forward(sampler, feature_map, points, image_index, deterministic=True)
            sampler.zero_grad(set_to_none=True)
            out = forward(sampler, feature_map, points, image_index, deterministic=True)
            out.backward(grad_out)
            return out.detach()

        return call

    print(
        f"sampler: {args.images} images x {args.regions} regions, C={args.channels}, {args.points} points, "
        f"anchors {args.sub}, neighbours {args.neighbors}, {args.pooler} pooling, {args.dtype} on {device} "
        f"({torch.get_num_threads()} CPU threads), {'forward+backward' if args.backward else 'forward'}"
    )
    ref_out, ref_ms, ref_cpu = time_call(run(reference_forward), args.repeats, args.warmup, device)
    opt_out, opt_ms, opt_cpu = time_call(run(SpatialAwareVisualSampler.__call__), args.repeats, args.warmup, device)

    # Process CPU time (all threads) is printed too: on a shared machine it is steadier than wall time.
    ref_med, opt_med = statistics.median(ref_ms), statistics.median(opt_ms)
    ref_cpu_med, opt_cpu_med = statistics.median(ref_cpu), statistics.median(opt_cpu)
    for name, med, runs, cpu_med in (
        ("reference", ref_med, ref_ms, ref_cpu_med),
        ("optimised", opt_med, opt_ms, opt_cpu_med),
    ):
        print(f"{name:10s} {med:10.2f} ms/call  (runs: {', '.join(f'{t:.1f}' for t in runs)}; CPU {cpu_med:.1f} ms)")
    print(f"speed-up   {ref_med / opt_med:10.2f}x wall, {ref_cpu_med / opt_cpu_med:.2f}x CPU time")

    diff = (opt_out.float() - ref_out.float()).abs().max().item()
    rel = ((opt_out.float() - ref_out.float()).norm() / ref_out.float().norm()).item()
    tolerance_ok = diff <= 1e-4 if dtype == torch.float32 else rel <= 3e-2
    print(f"outputs    max |diff| {diff:.3g}, relative {rel:.3g}: {'agree' if tolerance_ok else 'DISAGREE'}")
    return 0 if tolerance_ok else 1


if __name__ == "__main__":
    sys.exit(main())
