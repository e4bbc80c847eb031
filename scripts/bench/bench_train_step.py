"""Time one Ferret training step (forward + backward), part by part: vision tower, splice, sampler, LLM.

    python scripts/bench/bench_train_step.py --quick                      # small shapes on CPU, < 1 minute
    python scripts/bench/bench_train_step.py --config small --batch 8 --text-tokens 256 --regions 8
    python scripts/bench/bench_train_step.py --config 7b --device cuda --batch 16 --regions 8 \\
        --text-tokens 400 --gradient-checkpointing --attn flash_attention_2       # one H100/H200, bf16

The model has random weights (nothing is downloaded); the batch imitates GRIT referring conversations: one image per
sample, log-normal text lengths around ``--text-tokens``, ``--regions`` masks per sample (boxes, points, free-form
polygons on images of 320..640 px). Each step is run twice:

* **parts**: the step cut at the three boundaries (tower output, sampler output, inputs_embeds) into separately
  timed pieces. Forward: tower (no grad, frozen), sampler (``region_features``: mask flattening,
  ``sample_region_points``, sampler forward), splice (``embed_multimodal`` with the tower and the sampler replaced by
  their outputs: token embedding, projector, checks, two ``masked_scatter``), LLM (decoder + loss). Backward in
  reverse: LLM, splice, sampler, each from the gradient the previous piece produced. The pieces add up to the step
  (the sum is printed next to the whole step as a check).
* **whole**: ``model(**batch).loss.backward()`` as the Trainer runs it; tokens/s and MFU use this time.

Timers are CUDA events on a GPU and ``perf_counter`` on CPU, with a synchronisation after each piece. No optimizer
step is timed. MFU counts the LLM's model FLOPs, 6 x (decoder parameters) x tokens + 6 x d x vocab x supervised
tokens (logits are computed only there) + causal attention 6 x layers x d x T^2 per sequence, over real (unpadded)
tokens; the peak is ``--peak-tflops`` (989 = H100/H200 bf16 dense). Recomputation under gradient checkpointing is
not counted (that would be hardware FLOPs). On CPU MFU is printed as n/a.

It also reports padding waste of right-padded batches drawn from the length distribution, against HF's
length-grouped order (``train_sampling_strategy="group_by_length"``) and packing, and with ``--compare-grouping``
runs one pool of samples both in random order and length-grouped, timing the whole steps.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from ferret.constants import IMAGE_TOKEN_INDEX

# The benchmarks' shared helpers, scripts/bench/synthetic.py, loaded by path from beside this file (registered in
# sys.modules before it runs, as its dataclasses need).
_SPEC = importlib.util.spec_from_file_location("bench_synthetic", Path(__file__).with_name("synthetic.py"))
S = sys.modules[_SPEC.name] = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(S)

PARTS = ("vision tower", "splice", "sampler", "LLM")


class Timers:
    """Named accumulating timers: CUDA events on a GPU, perf_counter on CPU, synchronised per section."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pending: list[tuple[str, object, object]] = []
        self.ms: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.pending.append((name, start, end))
        else:
            start, start_cpu = time.perf_counter(), time.process_time()
            yield
            self.ms[name] += (time.perf_counter() - start) * 1000
            # Process CPU time (all threads): steadier than wall time on a shared machine.
            self.ms[f"{name} [cpu]"] += (time.process_time() - start_cpu) * 1000

    def collect(self) -> dict[str, float]:
        S.sync(self.device)
        for name, start, end in self.pending:
            self.ms[name] += start.elapsed_time(end)
        self.pending.clear()
        return dict(self.ms)


def step_in_parts(model, batch: dict, timers: Timers) -> float:
    """One forward + backward cut into the parts of the module docstring; returns the loss."""
    input_ids, masks = batch["input_ids"], batch["region_masks"]
    projector = model.model.mm_projector
    with timers("vision tower fwd"):
        features = model.vision_tower(batch["images"])  # frozen: no grad, no backward
    has_image = (input_ids == IMAGE_TOKEN_INDEX).any(1)
    with timers("sampler fwd"):
        regions = model.region_features(features, has_image, masks)
    region_leaf = regions.detach().requires_grad_()

    # The real embed_multimodal, with the tower and the sampler replaced by their (already computed) outputs.
    model.encode_images = lambda images: (features, projector(features.to(projector.weight.dtype)))
    model.region_features = lambda *args: region_leaf
    try:
        with timers("splice fwd"):
            embeds = model.embed_multimodal(input_ids, batch["images"], masks)
    finally:
        del model.encode_images, model.region_features
    embeds_leaf = embeds.detach().requires_grad_()

    with timers("LLM fwd"):
        loss = model(inputs_embeds=embeds_leaf, attention_mask=batch["attention_mask"], labels=batch["labels"],
                     use_cache=False).loss
    with timers("LLM bwd"):
        loss.backward()
    with timers("splice bwd"):
        embeds.backward(embeds_leaf.grad)
    with timers("sampler bwd"):
        regions.backward(region_leaf.grad)
    return float(loss.detach())


def step_whole(model, batch: dict, timers: Timers) -> float:
    with timers("whole step"):
        loss = model(**batch, use_cache=False).loss
        loss.backward()
    return float(loss.detach())


def run_steps(model, batch: dict, device: torch.device, steps: int, warmup: int, parts: bool = True):
    """Median milliseconds per timer name over ``steps`` measured steps."""
    runs: dict[str, list[float]] = defaultdict(list)
    for step in range(warmup + steps):
        measured = step >= warmup
        for fn in ((step_in_parts, step_whole) if parts else (step_whole,)):
            model.zero_grad(set_to_none=True)
            timers = Timers(device)
            S.sync(device)
            fn(model, batch, timers)
            if measured:
                for name, ms in timers.collect().items():
                    runs[name].append(ms)
    model.zero_grad(set_to_none=True)
    return {name: statistics.median(v) for name, v in runs.items()}, runs


def llm_flops(model, lengths: list[int], supervised: int) -> float:
    """Model FLOPs of one LLM forward + backward over sequences of the given real lengths."""
    cfg = model.config
    decoder = sum(p.numel() for p in model.model.layers.parameters())
    tokens = sum(lengths)
    attention = 6 * cfg.num_hidden_layers * cfg.hidden_size * sum(t * t for t in lengths)  # causal: half of 12
    return 6 * decoder * tokens + 6 * cfg.hidden_size * cfg.vocab_size * supervised + attention


def build_batch(config, specs, rng, device, dtype) -> tuple[dict, list[int], int]:
    samples = [S.make_sample(spec, config, rng) for spec in specs]
    cpu = S.collate(samples, padding_side="right")
    lengths = [len(s["input_ids"]) for s in samples]
    supervised = int((cpu["labels"][:, 1:] != -100).sum())
    return S.to_device(cpu, device, dtype), lengths, supervised


def padding_report(config, args, rng) -> list[str]:
    """Expected padding waste of right-padded batches for this length distribution (no model needed)."""
    from transformers.trainer_pt_utils import get_length_grouped_indices

    pool = S.sample_specs(args.batch * 400, config, args.text_tokens, args.length_spread, args.regions,
                          args.max_length, rng)
    lengths = np.array([s.text_tokens + config.num_image_tokens for s in pool])
    random_waste = S.padding_waste(lengths, args.batch)
    order = get_length_grouped_indices(lengths.tolist(), args.batch, generator=torch.Generator().manual_seed(0))
    grouped_waste = S.padding_waste(lengths[np.array(order)], args.batch)
    packed_waste = S.packing_waste(lengths[: args.batch * 50], int(lengths.max()))
    return [
        (f"lengths (image + text): median {int(np.median(lengths))}, p10 {int(np.percentile(lengths, 10))}, "
         f"p90 {int(np.percentile(lengths, 90))}, max {int(lengths.max())} tokens "
         f"(text log-normal, median {args.text_tokens}, sigma {args.length_spread}; synthetic, not GRIT)"),
        (f"padding waste, batch {args.batch}: random right-padded {random_waste:.1%}, "
         f"length-grouped (HF group_by_length, megabatch 50x) {grouped_waste:.1%}, "
         f"packed into {int(lengths.max())}-token rows {packed_waste:.1%}"),
    ]


def compare_grouping(model, config, args, rng, device, dtype) -> list[str]:
    """Runs the same pool of ``batch x grouping_batches`` samples twice, in random order and in HF's length-grouped
    order (one megabatch = the pool), and compares padding and time (whole steps)."""
    from transformers.trainer_pt_utils import get_length_grouped_indices

    pool = S.sample_specs(args.batch * args.grouping_batches, config, args.text_tokens, args.length_spread,
                          args.regions, args.max_length, rng)
    samples = [S.make_sample(spec, config, rng) for spec in pool]
    lengths = [len(s["input_ids"]) for s in samples]
    grouped = get_length_grouped_indices(lengths, args.batch, mega_batch_mult=args.grouping_batches,
                                         generator=torch.Generator().manual_seed(1))
    lines = [(f"same {len(pool)} samples ({sum(lengths)} real tokens) in {args.grouping_batches} batches of "
              f"{args.batch}, whole steps:")]
    for name, order in (("random order", list(range(len(pool)))), ("length-grouped", grouped)):
        padded, ms = 0, 0.0
        for b in range(args.grouping_batches):
            chunk = [samples[i] for i in order[b * args.batch : (b + 1) * args.batch]]
            batch = S.to_device(S.collate(chunk, padding_side="right"), device, dtype)
            medians, _ = run_steps(model, batch, device, steps=1, warmup=0, parts=False)
            ms += medians["whole step"]
            padded += batch["input_ids"].numel()
        lines.append(f"  {name:15s} {1 - sum(lengths) / padded:6.1%} padding, {ms:9.1f} ms in all, "
                     f"{sum(lengths) / ms * 1000:9.0f} real tokens/s")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    S.add_model_arguments(parser)
    parser.add_argument("--batch", type=int, default=4, help="samples (= images) per step")
    parser.add_argument("--text-tokens", type=int, default=256, help="median text tokens per sample (besides image)")
    parser.add_argument("--length-spread", type=float, default=0.6,
                        help="sigma of the log-normal text length (0: every sample the same length)")
    parser.add_argument("--max-length", type=int, default=2048, help="model_max_length: longest sample")
    parser.add_argument("--regions", type=int, default=8, help="region masks (<region_fea> tokens) per sample")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="activation checkpointing of the decoder")
    parser.add_argument("--checkpoint-every", type=int, default=1,
                        help="with --gradient-checkpointing: checkpoint every n-th decoder layer only")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="peak FLOP/s of the device (TFLOP/s)")
    parser.add_argument("--compare-grouping", action="store_true",
                        help="also time random vs length-grouped batches (whole steps)")
    parser.add_argument("--grouping-batches", type=int, default=4, help="batches in the grouping comparison")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true",
                        help="small config, batch 2 x 4 regions, 1 step, 1 thread: under a minute on CPU")
    args = parser.parse_args(argv)

    if args.quick:
        args.config, args.batch, args.regions, args.text_tokens, args.steps, args.warmup = "small", 2, 4, 128, 1, 1
        args.compare_grouping = False
    device, dtype, config = S.setup(args, "bench_train_step")
    rng = np.random.default_rng(args.seed)

    model = S.build_bench_model(config, device, dtype, args.attn, args.seed)
    model.train()
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False},
                                              every_n_layers=args.checkpoint_every)
    specs = S.sample_specs(args.batch, config, args.text_tokens, args.length_spread, args.regions,
                           args.max_length, rng)
    batch, lengths, supervised = build_batch(config, specs, rng, device, dtype)
    padded = batch["input_ids"].numel()
    llm_params = sum(p.numel() for p in model.parameters()) - sum(
        p.numel() for p in model.model.region_geo_sampler.parameters())

    medians, runs = run_steps(model, batch, device, args.steps, args.warmup)
    whole = medians["whole step"]
    parts = {part: medians.get(f"{part} fwd", 0.0) + medians.get(f"{part} bwd", 0.0) for part in PARTS}
    parts_sum = sum(parts.values())
    flops = llm_flops(model, lengths, supervised)

    where = f"{device}" + (f" ({torch.get_num_threads()} CPU threads)" if device.type == "cpu" else
                           f" ({torch.cuda.get_device_name(device)})")
    print(f"config {args.config}: LLaMA h{config.hidden_size} x {config.num_hidden_layers} layers "
          f"(LLM + projector {llm_params / 1e6:.1f}M params), CLIP h{config.mm_hidden_size} x "
          f"{config.vision_config['num_hidden_layers']} layers on {config.image_size} px "
          f"({config.num_image_tokens} image tokens), sampler {config.sampler_num_init_point} points "
          f"{tuple(config.sampler_num_sub_point)} anchors")
    print(f"batch {args.batch} samples x {args.regions} regions; {sum(lengths)} real tokens, padded to "
          f"{args.batch} x {batch['input_ids'].shape[1]} = {padded} ({1 - sum(lengths) / padded:.1%} padding), "
          f"{supervised} supervised; {dtype_name(dtype)} on {where}, attn {args.attn}, gradient checkpointing "
          f"{f'every {args.checkpoint_every} layer(s)' if args.gradient_checkpointing else 'off'}; "
          f"median of {args.steps} steps after {args.warmup} warm-up")
    print()
    on_cpu = device.type == "cpu"
    cpu_head, cpu_rule = (" process CPU ms |", "---:|") if on_cpu else ("", "")
    print(f"| part | forward ms | backward ms | total ms | share of parts |{cpu_head}")
    print(f"|---|---:|---:|---:|---:|{cpu_rule}")

    def cpu_cell(*names: str) -> str:
        return f" {sum(medians.get(f'{n} [cpu]', 0.0) for n in names):.1f} |" if on_cpu else ""

    for part in PARTS:
        fwd, bwd = medians.get(f"{part} fwd", 0.0), medians.get(f"{part} bwd", 0.0)
        bwd_text = f"{bwd:.1f}" if f"{part} bwd" in medians else "-"
        print(f"| {part} | {fwd:.1f} | {bwd_text} | {fwd + bwd:.1f} | {(fwd + bwd) / parts_sum:.1%} |"
              + cpu_cell(f"{part} fwd", f"{part} bwd"))
    every_piece = [f"{p} {d}" for p in PARTS for d in ("fwd", "bwd")]
    print(f"| sum of parts | | | {parts_sum:.1f} | |" + cpu_cell(*every_piece))
    print(f"| whole step (model(**batch).loss.backward()) | | | {whole:.1f} | |" + cpu_cell("whole step"))
    print()
    print(f"whole-step runs (ms): {', '.join(f'{t:.1f}' for t in runs['whole step'])}")
    print(f"tokens/s: {sum(lengths) / whole * 1000:,.0f} real, {padded / whole * 1000:,.0f} padded")
    print(f"splice + sampler: {(parts['splice'] + parts['sampler']) / parts_sum:.1%} of the step")
    if device.type == "cuda":
        peak = args.peak_tflops * 1e12
        step_mfu, llm_mfu = flops / (whole / 1000) / peak, flops / (parts["LLM"] / 1000) / peak
        print(f"LLM model FLOPs {flops / 1e12:.1f} TFLOP/step; MFU over the whole step {step_mfu:.1%}, "
              f"over the LLM part alone {llm_mfu:.1%} (peak {args.peak_tflops:g} TFLOP/s)")
    else:
        print(f"LLM model FLOPs {flops / 1e9:.1f} GFLOP/step ({flops / (whole / 1000) / 1e9:.1f} GFLOP/s achieved); "
              "MFU n/a on CPU")
    print()
    for line in padding_report(config, args, np.random.default_rng(args.seed + 1)):
        print(line)
    if args.compare_grouping:
        for line in compare_grouping(model, config, args, np.random.default_rng(args.seed + 2), device, dtype):
            print(line)
    return 0


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in S.DTYPES.items()}[dtype]


if __name__ == "__main__":
    sys.exit(main())
