"""Time Ferret generation: time to first token and decode tokens/s, at batch 1 and batched.

    python scripts/bench/bench_generate.py --quick                         # small shapes on CPU, < 1 minute
    python scripts/bench/bench_generate.py --config small --batch-sizes 1,8 --new-tokens 64
    python scripts/bench/bench_generate.py --config 7b --device cuda --batch-sizes 1,8,32 --new-tokens 128

Random weights, nothing downloaded. Each prompt is a single user turn as FerretProcessor writes it (system prompt,
one image, a question with ``--regions`` "[x1, y1, x2, y2] <region_fea>" references, "ASSISTANT:"), left-padded.
Generation is greedy with the KV cache through ``model.generate`` and exactly ``--new-tokens`` new tokens
(min_new_tokens = max_new_tokens, so EOS never ends it early).

A logits processor stamps the time of every decoding step (after a device synchronisation), so one call gives:

* TTFT: from calling ``generate`` to the first token's logits: vision tower, splice, sampler and the prefill;
* decode tokens/s: (new tokens - 1) / (last step - first step), per sequence and for the whole batch.

The prefill's multimodal parts are also timed on their own (tower, sampler, the whole ``embed_multimodal``), so
their share of TTFT is visible. Medians over ``--repeats`` calls after one warm-up call.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from ferret.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

# The benchmarks' shared helpers, scripts/bench/synthetic.py, loaded by path from beside this file (registered in
# sys.modules before it runs, as its dataclasses need).
_SPEC = importlib.util.spec_from_file_location("bench_synthetic", Path(__file__).with_name("synthetic.py"))
S = sys.modules[_SPEC.name] = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(S)


class StepClock(LogitsProcessor):
    """Records a timestamp each time generate asks for the next token's scores (after a synchronisation)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        S.sync(self.device)
        self.stamps.append(time.perf_counter())
        return scores


def make_prompts(config, batch: int, text_tokens: int, regions: int, rng: np.random.Generator) -> dict:
    """A left-padded batch of single-turn prompts (the sample minus its answer), with images and region masks."""
    specs = S.sample_specs(batch, config, text_tokens, 0.2, regions, 2048, rng)
    samples = []
    for spec in specs:
        sample = S.make_sample(spec, config, rng)
        prompt_length = int((sample["labels"] == IGNORE_INDEX).sum())  # the answer is the supervised tail
        sample["input_ids"] = sample["input_ids"][:prompt_length]
        sample["labels"] = sample["labels"][:prompt_length]
        samples.append(sample)
    return S.collate(samples, padding_side="left")


def time_generate(model, batch: dict, new_tokens: int, device: torch.device, cache: str | None):
    clock = StepClock(device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1,
                  use_cache=True, pad_token_id=0, eos_token_id=2, logits_processor=LogitsProcessorList([clock]))
    if cache:
        kwargs["cache_implementation"] = cache
    S.sync(device)
    start = time.perf_counter()
    out = model.generate(batch["input_ids"], batch["attention_mask"], images=batch["images"],
                         region_masks=batch["region_masks"], **kwargs)
    S.sync(device)
    end = time.perf_counter()
    if out.shape[1] != new_tokens:
        raise RuntimeError(f"asked for {new_tokens} new tokens, generate returned {out.shape[1]}")
    ttft = (clock.stamps[0] - start) * 1000
    decode_s = clock.stamps[-1] - clock.stamps[0]
    return ttft, decode_s, (end - start) * 1000


def time_prefill_parts(model, batch: dict, device: torch.device) -> dict[str, float]:
    """Milliseconds of the tower, the sampler and the whole embed_multimodal, each on its own (no grad)."""
    out = {}
    with torch.no_grad():
        S.sync(device)
        start = time.perf_counter()
        features = model.vision_tower(batch["images"])
        S.sync(device)
        out["vision tower"] = (time.perf_counter() - start) * 1000
        has_image = (batch["input_ids"] == IMAGE_TOKEN_INDEX).any(1)
        start = time.perf_counter()
        model.region_features(features, has_image, batch["region_masks"])
        S.sync(device)
        out["sampler"] = (time.perf_counter() - start) * 1000
        start = time.perf_counter()
        model.embed_multimodal(batch["input_ids"], batch["images"], batch["region_masks"])
        S.sync(device)
        out["embed_multimodal"] = (time.perf_counter() - start) * 1000
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    S.add_model_arguments(parser)
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--prompt-tokens", type=int, default=128,
                        help="median text tokens of a prompt besides the image")
    parser.add_argument("--regions", type=int, default=2, help="regions referred to in each prompt")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", choices=["dynamic", "static"], default=None,
                        help="KV cache implementation (default: generate's default, dynamic)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="small config, batch 1 and 4, 16 tokens, 1 repeat")
    args = parser.parse_args(argv)

    if args.quick:
        args.config, args.batch_sizes, args.new_tokens, args.repeats, args.prompt_tokens = "small", "1,4", 16, 1, 96
    device, dtype, config = S.setup(args, "bench_generate")
    model = S.build_bench_model(config, device, dtype, args.attn, args.seed).eval()
    rng = np.random.default_rng(args.seed)

    where = f"{device}" + (f" ({torch.get_num_threads()} CPU threads)" if device.type == "cpu" else
                           f" ({torch.cuda.get_device_name(device)})")
    print(f"config {args.config}: LLaMA h{config.hidden_size} x {config.num_hidden_layers} layers, "
          f"{config.num_image_tokens} image tokens, {args.regions} regions per prompt; greedy, "
          f"{args.new_tokens} new tokens, KV cache {args.cache or 'dynamic'}; "
          f"{next(k for k, v in S.DTYPES.items() if v == dtype)} on {where}, attn {args.attn}; "
          f"median of {args.repeats} after 1 warm-up")
    print()
    print("| batch | prompt tokens (max) | TTFT ms | tower ms | sampler ms | embed_multimodal ms | "
          "decode tok/s per sequence | decode tok/s total | total ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        cpu_batch = make_prompts(config, batch_size, args.prompt_tokens, args.regions, rng)
        batch = S.to_device(cpu_batch, device, dtype)
        runs = [time_generate(model, batch, args.new_tokens, device, args.cache) for _ in range(args.repeats + 1)][1:]
        parts = [time_prefill_parts(model, batch, device) for _ in range(args.repeats)]
        ttft = statistics.median(r[0] for r in runs)
        decode_s = statistics.median(r[1] for r in runs)
        total = statistics.median(r[2] for r in runs)
        per_seq = (args.new_tokens - 1) / decode_s if decode_s > 0 else float("nan")
        part = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
        print(f"| {batch_size} | {batch['input_ids'].shape[1]} | {ttft:.1f} | {part['vision tower']:.1f} | "
              f"{part['sampler']:.1f} | {part['embed_multimodal']:.1f} | {per_seq:.1f} | "
              f"{per_seq * batch_size:.1f} | {total:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
