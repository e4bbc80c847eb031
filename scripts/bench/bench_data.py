"""Measure the data pipeline: GritDataset + FerretCollator samples per second on ONE CPU core.

    python scripts/bench/bench_data.py              # 300 toy records, batch 16, 336 px model input, region features
    python scripts/bench/bench_data.py --quick      # 64 records, a few seconds

It writes a toy world (ferret/data/toy.py, 112 px PNGs with RLE masks) and a toy tokenizer into a temporary
folder, builds the dataset with the recipe's options (segment_mask|center points, region features on) and a
processor with the real model input (336 px, 576 image tokens), then times full passes of
``collator([dataset[i] for i in batch])`` with ``torch.set_num_threads(1)``. It prints samples/s (the number a
DataLoader worker delivers), and where the time goes: reading + checking records and drawing regions
(``GritDataset.example``), ``FerretProcessor.encode`` (image preprocessing, tokenization, masks), and collation.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from ferret.data.grit import DataOptions, FerretCollator, GritDataset  # noqa: E402
from ferret.data.toy import make_world, train_toy_tokenizer, world_corpus  # noqa: E402
from ferret.processing import FerretProcessor  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=300, help="toy records (default 300)")
    parser.add_argument("--quick", action="store_true", help="64 records, one timed pass")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=336, help="model input side (default 336)")
    parser.add_argument("--world-image-size", type=int, default=112, help="toy image side (default 112)")
    parser.add_argument("--point-input-sample", default="segment_mask|center")
    parser.add_argument("--no-region-feature", action="store_true")
    parser.add_argument("--passes", type=int, default=2, help="timed passes over the data (default 2)")
    args = parser.parse_args()
    if args.quick:
        args.num, args.passes = 64, 1
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        records = make_world(tmp / "world", num_train=args.num, num_val=0, num_test=0,
                             image_size=args.world_image_size, seed=0)["train"]
        train_toy_tokenizer(tmp / "tokenizer", world_corpus(records), vocab_size=512)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tmp / "tokenizer"))
        processor = FerretProcessor(tokenizer, image_size=args.image_size,
                                    num_image_tokens=(args.image_size // 14) ** 2)
        options = DataOptions(point_input_sample=args.point_input_sample,
                              add_region_feature=not args.no_region_feature)
        dataset = GritDataset([str(tmp / "world" / "train.json")], [None], processor, options, dataset_types=["toy"])
        collator = FerretCollator(processor)
        print(f"setup (world + tokenizer): {time.perf_counter() - start:.1f} s; {len(dataset)} records, "
              f"batch {args.batch_size}, model input {args.image_size} px, region features "
              f"{'off' if args.no_region_feature else 'on'}, {torch.get_num_threads()} thread")

        batches = [list(range(b, min(b + args.batch_size, len(dataset))))
                   for b in range(0, len(dataset), args.batch_size)]
        collator([dataset[i] for i in batches[0]])  # warm-up
        start, cpu_start = time.perf_counter(), time.process_time()
        regions = 0
        for _ in range(args.passes):
            for batch in batches:
                out = collator([dataset[i] for i in batch])
                regions += sum(len(m) for m in out["region_masks"])
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        samples = args.passes * len(dataset)
        # CPU time is what one core spends; on a shared machine wall time also counts waiting for the core.
        print(f"dataset + collator: {samples / cpu:.1f} samples/s per core of CPU time "
              f"({1000 * cpu / samples:.2f} ms/sample; wall clock {samples / elapsed:.1f} samples/s), "
              f"{regions / samples:.2f} region masks/sample")

        # Where the CPU time goes (one pass).
        t_example = t_encode = t_collate = 0.0
        for batch in batches:
            features = []
            for i in batch:
                t0 = time.process_time()
                example = dataset.example(i)
                t1 = time.process_time()
                features.append(dataset.encode(example))
                t2 = time.process_time()
                t_example, t_encode = t_example + t1 - t0, t_encode + t2 - t1
            t0 = time.process_time()
            collator(features)
            t_collate += time.process_time() - t0
        n = len(dataset)
        print(f"  read + check + regions: {1000 * t_example / n:.2f} ms/sample; processor.encode: "
              f"{1000 * t_encode / n:.2f} ms/sample; collate: {1000 * t_collate / n:.2f} ms/sample")
        if dataset.bad_records:
            print(f"bad records: {dataset.bad_records} {dataset.bad_by_reason}")
            sys.exit(1)


if __name__ == "__main__":
    main()
