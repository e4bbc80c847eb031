"""Samples per second of batched benchmark inference against one query at a time, same queries, same model.

    python scripts/bench/bench_eval.py                    # 64 queries, 16 new tokens, batch 8 vs 1, CPU, 1 thread
    python scripts/bench/bench_eval.py --quick            # 16 queries, 8 new tokens
    python scripts/bench/bench_eval.py --hidden 256 --layers 4 --batch-size 16 --device cuda

Both runs go through ``ferret.eval.inference.generate_batches`` (the loop every ``infer`` command uses) on a
tiny random Ferret built here (no download), with the same queries: a mix of referring questions (box, point
and free-form regions with ``<region_fea>``) and grounding questions on small random images. Decoding is greedy
and the model is in eval mode, so the two runs must give the same answers; the script checks that and exits
with status 1 when they differ. It prints samples/s for each batch size and their ratio. A warm-up batch runs
before each timing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from ferret.conversation import FERRET_SYSTEM  # noqa: E402
from ferret.data.toy import train_toy_tokenizer  # noqa: E402
from ferret.eval.inference import GenerationConfig, Query, generate_batches  # noqa: E402
from ferret.model.builder import resolve_device  # noqa: E402
from ferret.model.configs import build_model, small  # noqa: E402
from ferret.processing import FerretProcessor  # noqa: E402
from ferret.regions import Box, FreeForm, Point  # noqa: E402

CORPUS = [
    FERRET_SYSTEM,
    "What is the object in the region? What is the location of the red circle in the image?",
    "a red circle [12, 450, 300, 999] and a blue square [1, 2] in the image</s>",
    "0 1 2 3 4 5 6 7 8 9 [ ] , . ? !",
]


def make_queries(count: int, seed: int) -> list[Query]:
    """Referring (box / point / free-form) and grounding questions on random images of varied sizes."""
    rng = np.random.default_rng(seed)
    queries = []
    for i in range(count):
        width, height = int(rng.integers(40, 120)), int(rng.integers(40, 120))
        image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
        kind = i % 4
        if kind == 3:
            queries.append(Query(image, "What is the location of the red circle in the image?", {"i": i}))
            continue
        x1, y1 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
        x2, y2 = int(rng.integers(x1 + 4, width)), int(rng.integers(y1 + 4, height))
        if kind == 0:
            region = Box(x1, y1, x2, y2)
        elif kind == 1:
            region = Point((x1 + x2) / 2, (y1 + y2) / 2)
        else:
            mask = np.zeros((height, width), dtype=bool)
            mask[y1:y2 + 1, x1:x2 + 1] = rng.random((y2 - y1 + 1, x2 - x1 + 1)) < 0.7
            mask[y1, x1] = True
            region = FreeForm(mask)
        queries.append(Query(image, "What is the object <region0> in the image?", {"i": i}, regions=[region]))
    return queries


def run(model, processor, queries, batch_size, generation, device) -> tuple[float, list[str]]:
    """(seconds, answers) for one pass over the queries, after a warm-up batch."""
    list(generate_batches(model, processor, queries[:batch_size], batch_size, generation))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    answers = [a.text for batch in generate_batches(model, processor, queries, batch_size, generation) for a in batch]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, answers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 queries, 8 new tokens")
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8, help="the batched run's batch size (default 8)")
    parser.add_argument("--hidden", type=int, default=64, help="LLM hidden size of the random model")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=56, help="model input side (patch 14)")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default 1 on CPU: a tiny model gains nothing from more, and on a "
                             "shared machine OpenMP contention swamps the measurement)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.queries, args.max_new_tokens = 16, 8
    device = resolve_device(args.device)
    threads = args.threads or (1 if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)

    with tempfile.TemporaryDirectory() as tmp:
        from transformers import AutoTokenizer

        train_toy_tokenizer(tmp, CORPUS * 20, vocab_size=320)
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    tokens = (args.image_size // 14) ** 2
    processor = FerretProcessor(tokenizer, image_size=args.image_size, num_image_tokens=tokens, model_max_length=512)
    config = small(len(processor.tokenizer), hidden=args.hidden, layers=args.layers, image_size=args.image_size,
                   region_token=processor.region_token_id)
    model = build_model(config, seed=args.seed).to(device).eval()
    queries = make_queries(args.queries, args.seed)
    generation = GenerationConfig(max_new_tokens=args.max_new_tokens)

    print(f"{args.queries} queries, {args.max_new_tokens} new tokens, hidden {args.hidden}, {args.layers} layers, "
          f"{tokens} image tokens, device {device}, {torch.get_num_threads()} CPU thread(s)")
    seconds_1, answers_1 = run(model, processor, queries, 1, generation, device)
    seconds_n, answers_n = run(model, processor, queries, args.batch_size, generation, device)
    rate_1, rate_n = args.queries / seconds_1, args.queries / seconds_n
    print(f"batch size 1:  {rate_1:8.2f} samples/s  ({seconds_1:.2f} s)")
    print(f"batch size {args.batch_size}:  {rate_n:8.2f} samples/s  ({seconds_n:.2f} s)")
    print(f"speed-up: {rate_n / rate_1:.2f}x")
    same = answers_1 == answers_n
    print(f"identical answers: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
