"""Benchmark the spatial-aware sampler against the original's algorithm (tests/sampler_reference.py), side by side.

    python scripts/bench/bench_sampler.py                  # 7B sizes, 1 thread, CPU fp32 (several minutes)
    python scripts/bench/bench_sampler.py --quick          # small sizes, the same tables, < 1 minute (make bench)
    python scripts/bench/bench_sampler.py --device cuda --dtype bf16 --threads 0

What it prints (all per region, medians of --repeats runs):

1. **Speed-up** at --ratio-batch (default 4 images x 4 regions): forward and forward + backward of
   ``SpatialAwareVisualSampler`` and of ``ReferenceGeoRegionSampler`` (the original algorithm step by step: per-pair
   projections on the 1026-d concatenations, its distance formula and top-k, max pooling), same weights, same points.
   The runs alternate (reference, ours, reference, ours, ...) so that load from other processes hits both alike.
   Both run in compat mode (``transposed``, the released checkpoints' convention) with deterministic sampling, so
   their outputs must agree: the script exits with status 1 if they differ by more than 1e-5 (fp32).
2. **Ours alone** at --batch (default 16 images x 8 regions; the reference would need several GB there).
3. **Where the time goes** in one training call at --batch: masks -> points, planning (farthest points + kNN),
   the fused pair kernel forward and backward, matrix products, the rest.
4. **Memory**: peak resident memory added by one training call (forward + backward) at --batch, measured in a fresh
   process (peak CUDA memory on a GPU); and the reference's at --ratio-batch (not with --quick).

Wall time and process CPU time are both reported: on a machine shared with other jobs CPU time is the steadier.
Masks are boxes, ellipses and polygons on 320..640 px images; points come from ``sample_region_points``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REFERENCE_PATH = Path(__file__).resolve().parents[2] / "tests" / "sampler_reference.py"
DTYPES = ("fp32", "bf16", "fp16")
SIZES = {
    # channels, output, points, anchors, neighbours, patches per side
    "7b": (1024, 4096, 512, (128, 32), (24, 24), 24),
    "13b": (1024, 5120, 512, (128, 32), (24, 24), 24),
    "quick": (64, 128, 128, (32, 8), (8, 8), 24),
}


def load_reference():
    """tests/sampler_reference.py, imported by path (it is not part of the package)."""
    spec = importlib.util.spec_from_file_location("sampler_reference", REFERENCE_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_masks(count: int, rng: np.random.Generator):
    """count bool masks [H, W] on one random 320..640 px image: boxes, ellipses and polygons of random sizes."""
    import torch
    from PIL import Image, ImageDraw

    width, height = (int(v) for v in rng.integers(320, 641, size=2))
    masks = []
    for i in range(count):
        w, h = (int(v) for v in rng.integers(16, [width // 2, height // 2]))
        x0, y0 = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        canvas = Image.new("1", (width, height))
        draw = ImageDraw.Draw(canvas)
        kind = i % 3
        if kind == 0:
            draw.rectangle([x0, y0, x0 + w - 1, y0 + h - 1], fill=1)
        elif kind == 1:
            draw.ellipse([x0, y0, x0 + w - 1, y0 + h - 1], fill=1)
        else:
            corners = rng.integers([x0, y0], [x0 + w, y0 + h], size=(int(rng.integers(4, 9)), 2))
            draw.polygon([tuple(int(v) for v in c) for c in corners], fill=1)
            draw.point((int(corners[0, 0]), int(corners[0, 1])), fill=1)
        masks.append(torch.from_numpy(np.array(canvas, dtype=bool)))
    return masks


class Setup:
    """A sampler, a batch of masks and points, and (optionally) the reference with the same weights."""

    def __init__(self, args, images: int, regions: int, with_reference: bool):
        import torch

        from ferret.model.sampler import SpatialAwareVisualSampler, sample_region_points

        channels, output, num_points, anchors, neighbors, side = SIZES[args.sizes]
        self.device = torch.device(args.device)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        torch.manual_seed(args.seed)
        rng = np.random.default_rng(args.seed)
        generator = torch.Generator().manual_seed(args.seed)
        self.sampler = SpatialAwareVisualSampler(channels, output, num_points, anchors, neighbors,
                                                 transposed=True).to(self.device, dtype)
        self.reference = None
        if with_reference:
            self.reference = load_reference().ReferenceGeoRegionSampler.like(self.sampler).to(self.device)
        self.feature_map = torch.randn(images, side * side, channels, generator=generator).to(self.device, dtype)
        self.masks = [m for _ in range(images) for m in random_masks(regions, rng)]
        self.num_points, self.anchors, self.neighbors = num_points, anchors, neighbors
        self.image_index = torch.arange(images, device=self.device).repeat_interleave(regions)
        self.points = sample_region_points(self.masks, num_points, seed=args.seed).to(self.device)
        self.grad = torch.randn(len(self.masks), output, generator=generator).to(self.device, dtype)
        self.regions = len(self.masks)

    def ours(self, train: bool):
        return self._call(self.sampler, train, lambda m: m(self.feature_map, self.points, self.image_index,
                                                           deterministic=True))

    def theirs(self, train: bool):
        return self._call(self.reference, train, lambda m: m(self.feature_map, self.points, self.image_index))

    def _call(self, module, train: bool, forward):
        import torch

        def run():
            if not train:
                module.eval()
                with torch.no_grad():
                    return forward(module)
            module.train()
            module.zero_grad(set_to_none=True)
            out = forward(module)
            out.backward(self.grad)
            return out.detach()

        return run

    def sync(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def timed(setup: Setup, fn) -> tuple[float, float, object]:
    """(wall ms, process CPU ms, result) of one call."""
    setup.sync()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    setup.sync()
    return (time.perf_counter() - wall) * 1000, (time.process_time() - cpu) * 1000, out


def interleaved(setup: Setup, calls: dict, repeats: int) -> dict:
    """name -> (wall ms list, cpu ms list, last result); one warm-up each, then round-robin repeats."""
    results = {name: ([], [], None) for name in calls}
    for fn in calls.values():
        fn()
    for _ in range(repeats):
        for name, fn in calls.items():
            wall, cpu, out = timed(setup, fn)
            results[name][0].append(wall)
            results[name][1].append(cpu)
            results[name] = (results[name][0], results[name][1], out)
    return results


def per_region(values: list[float], regions: int) -> float:
    return statistics.median(values) / regions


def speedup_table(args) -> bool:
    setup = Setup(args, *args.ratio_batch, with_reference=True)
    calls = {
        "reference forward": setup.theirs(False), "ours forward": setup.ours(False),
        "reference forward+backward": setup.theirs(True), "ours forward+backward": setup.ours(True),
    }
    results = interleaved(setup, calls, args.repeats)
    images, regions = args.ratio_batch
    print(f"\n### Speed-up at {images} images x {regions} regions ({setup.regions} regions), "
          f"median of {args.repeats} interleaved runs, ms per region\n")
    print("| pass | reference wall | ours wall | speed-up (wall) | reference CPU | ours CPU | speed-up (CPU) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kind in ("forward", "forward+backward"):
        ref, ours = results[f"reference {kind}"], results[f"ours {kind}"]
        rw, ow = per_region(ref[0], setup.regions), per_region(ours[0], setup.regions)
        rc, oc = per_region(ref[1], setup.regions), per_region(ours[1], setup.regions)
        print(f"| {kind} | {rw:,.1f} | {ow:,.1f} | **{rw / ow:.1f}x** | {rc:,.1f} | {oc:,.1f} | **{rc / oc:.1f}x** |")
    ref_out, our_out = results["reference forward"][2].float(), results["ours forward"][2].float()
    diff = (ref_out - our_out).abs().max().item()
    rel = ((ref_out - our_out).norm() / ref_out.norm()).item()
    ok = diff <= 1e-5 if args.dtype == "fp32" else rel <= 3e-2
    print(f"\noutputs: max |ours - reference| = {diff:.2g} (relative {rel:.2g}): {'agree' if ok else 'DISAGREE'}")
    return ok


def ours_table(args) -> None:
    setup = Setup(args, *args.batch, with_reference=False)
    results = interleaved(setup, {"forward": setup.ours(False), "forward+backward": setup.ours(True)}, args.repeats)
    images, regions = args.batch
    print(f"\n### Ours alone at {images} images x {regions} regions ({setup.regions} regions), "
          f"median of {args.repeats} runs\n")
    print("| pass | wall ms per region | CPU ms per region | wall ms per call |")
    print("|---|---:|---:|---:|")
    for name, (wall, cpu, _) in results.items():
        print(f"| {name} | {per_region(wall, setup.regions):,.2f} | {per_region(cpu, setup.regions):,.2f} | "
              f"{statistics.median(wall):,.0f} |")
    breakdown(args, setup)


def breakdown(args, setup: Setup) -> None:
    """Where one training call's time goes: separately timed planning and points, profiled kernels and GEMMs."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from ferret.model.sampler import group_points, sample_region_points

    def median_ms(fn):
        return statistics.median(timed(setup, fn)[1] for _ in range(args.repeats))

    points_ms = median_ms(lambda: sample_region_points(setup.masks, setup.num_points, seed=args.seed))
    plan_ms = median_ms(lambda: group_points(setup.points, setup.anchors, setup.neighbors, True,
                                             distance=setup.sampler.distance))
    train = setup.ours(True)
    train()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if setup.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        total_ms = timed(setup, train)[1]
    gemm = {"aten::mm", "aten::addmm", "aten::bmm", "aten::addmv", "aten::mv"}
    kernel_fwd = kernel_bwd = gemm_ms = 0.0
    for event in prof.key_averages():
        ms = event.self_cpu_time_total / 1000
        if "PairPool" in event.key:
            if "Backward" in event.key:
                kernel_bwd += ms
            else:
                kernel_fwd += ms
        elif event.key in gemm:
            gemm_ms += ms
    profiled = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1000
    scale = total_ms / profiled if profiled else 1.0  # express the profiled shares in unprofiled CPU time
    pieces = {
        "planning: farthest-point sampling + kNN, both stages": plan_ms,
        "pair kernel forward (gather, add, ReLU, LayerNorm, max)": kernel_fwd * scale,
        "pair kernel backward (recompute, LayerNorm/ReLU backward, scatter)": kernel_bwd * scale,
        "matrix products, forward and backward (projections, tables, final projectors)": gemm_ms * scale,
    }
    pieces["everything else (bilinear corners, gathers, weight folding, allocation, autograd)"] = max(
        0.0, total_ms - sum(pieces.values()))
    print(f"\nWhere one training call's CPU time goes ({setup.regions} regions; masks -> points is done before "
          f"the sampler, by the model):\n")
    print("| piece | CPU ms per call | ms per region | share of the sampler call |")
    print("|---|---:|---:|---:|")
    for name, ms in pieces.items():
        print(f"| {name} | {ms:,.0f} | {ms / setup.regions:.2f} | {ms / total_ms:.0%} |")
    print(f"| **sampler forward + backward** | {total_ms:,.0f} | {total_ms / setup.regions:.2f} | |")
    print(f"| masks -> points (sample_region_points) | {points_ms:,.0f} | {points_ms / setup.regions:.2f} | |")


def memory_probe(args) -> None:
    """Run in a fresh process: peak memory added by one training call."""
    import torch

    setup = Setup(args, *args.probe_batch, with_reference=args.probe_reference)
    run = setup.theirs(True) if args.probe_reference else setup.ours(True)
    if setup.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        base = int(status["VmRSS"].split()[0]) * 1024
        run()
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        peak = int(status["VmHWM"].split()[0]) * 1024 - base
    print(json.dumps({"peak_bytes": peak, "regions": setup.regions}))


def memory_table(args) -> None:
    rows = [("ours", args.batch, False)]
    if not args.skip_reference and not args.quick:
        rows.append(("reference", args.ratio_batch, True))
    print("\n### Memory of one training call (forward + backward), fresh process\n")
    print("| implementation | batch | peak memory added | per region |")
    print("|---|---|---:|---:|")
    for name, batch, reference in rows:
        cmd = [sys.executable, __file__, "--memory-probe", "--sizes", args.sizes, "--device", args.device,
               "--dtype", args.dtype, "--threads", str(args.threads), "--seed", str(args.seed),
               "--probe-batch", str(batch[0]), str(batch[1])] + (["--probe-reference"] if reference else [])
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            print(f"| {name} | {batch[0]} x {batch[1]} | failed: {result.stderr.strip()[-200:]} | |")
            continue
        probe = json.loads(result.stdout.strip().splitlines()[-1])
        mib = probe["peak_bytes"] / 2**20
        per = mib / probe["regions"]
        print(f"| {name} | {batch[0]} images x {batch[1]} regions | {mib:,.0f} MiB | {per:.1f} MiB |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--sizes", choices=sorted(SIZES), default="7b", help="sampler sizes (default: 7B)")
    parser.add_argument("--ratio-batch", type=int, nargs=2, default=(4, 4), metavar=("IMAGES", "REGIONS"),
                        help="batch of the side-by-side comparison")
    parser.add_argument("--batch", type=int, nargs=2, default=(16, 8), metavar=("IMAGES", "REGIONS"),
                        help="batch for ours alone, the breakdown and the memory")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-reference", action="store_true", help="only our sampler (no speed-up table)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes (C=64, 128 points, anchors (32, 8)), 2 x 2 and 4 x 4 batches: < 1 minute")
    parser.add_argument("--memory-probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--probe-batch", type=int, nargs=2, default=(1, 1), help=argparse.SUPPRESS)
    parser.add_argument("--probe-reference", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.ratio_batch, args.batch = "quick", (2, 2), (4, 4)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        memory_probe(args)
        return 0

    from ferret.model.kernels import kernel_available

    channels, output, num_points, anchors, neighbors, _ = SIZES[args.sizes]
    kernel = "C++ pair kernel" if args.device == "cpu" and kernel_available() else "PyTorch pair path"
    print(f"sampler benchmark: C={channels} -> {output}, {num_points} points, anchors {anchors}, neighbours "
          f"{neighbors}, max pooling, compat mode (transposed), deterministic sampling; {args.dtype} on "
          f"{args.device} ({torch.get_num_threads()} CPU threads, {kernel}); torch {torch.__version__}")
    ok = True
    if not args.skip_reference:
        ok = speedup_table(args)
    ours_table(args)
    if not args.skip_memory:
        memory_table(args)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
