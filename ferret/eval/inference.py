"""Inference for the benchmarks: one loading path, one batched generation loop, one answers-file discipline.

Every benchmark's ``infer`` command turns its annotation file into a list of ``Query`` (an image, a question
whose regions are ``<region{k}>`` placeholders, the regions in pixels of the image, and the fields to write
beside the answer) and hands it to ``run_inference``. This module owns what they share:

Loading
    ``load_model`` goes through ``ferret.model.builder.load_pretrained_model`` (full, LoRA or projector-only
    checkpoints; ``--device auto|cpu|cuda|mps``, ``--dtype``). The model is in ``eval()`` mode, so the region
    sampler is deterministic and batch-invariant.

Generation
    ``generate_batches`` batches queries (``--batch-size``), encodes each once with the processor
    (``encode_query``), pads them on the left and calls ``model.generate`` with the run's
    ``ferret.decoding.DecodingSettings`` (the type the servers use). Greedy decoding is the default
    (``--temperature 0``; any temperature <= 1e-4 is greedy); above that it samples (with ``--top-p``, no top-k,
    seeded by ``--seed``). The
    original sampled with temperature 0.001 and a random region sampler, so its answers varied from run to
    run; ours are reproducible, and batch size 1 and batch size N give the same answers in fp32.

Answers files
    One JSON object per line: the query's fields, then ``prompt`` (the question as the model read it, with
    coordinates and ``<region_fea>``, without ``<image>``), ``text`` (the answer) and ``regions`` (what
    ``FerretProcessor.post_process`` reads in the answer: points and boxes in pixels of the user's image, in
    the checkpoint's frame, which the scorers use). Placeholders
    ``width``/``height`` set to None are filled with the size of the loaded image. Lines are appended and
    flushed after every batch, so a killed run loses at most one batch; a rerun skips the queries whose key
    (``key_fields``) is already in the file and repairs a half-written last line (``--overwrite`` starts
    afresh).

Sharding
    ``--num-chunks N --chunk-idx K`` runs the K-th of N contiguous chunks of ceil(len / N) queries, as the
    original, and writes ``{answers-file}/{K}_of_{N}.jsonl``; with N = 1 the answers file is the given path
    itself (or ``{path}/0_of_1.jsonl`` when the path is an existing folder). Under ``torchrun`` (WORLD_SIZE > 1)
    the chunk is the process's RANK, the chunk count its WORLD_SIZE, and the device ``cuda:LOCAL_RANK`` (CPU
    without CUDA); no process group is needed. The scorers read the folder and merge chunks in numeric order.

Torch is imported lazily, so importing this module (and the benchmark modules that import it) stays cheap.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from ferret.decoding import DecodingSettings
from ferret.eval.common import chunk_file_name, read_jsonl, regions_record
from ferret.flags import add_region_feature_argument

if TYPE_CHECKING:
    from ferret.model.modeling import FerretLlamaForCausalLM
    from ferret.processing import FerretProcessor
    from ferret.regions import Region

logger = logging.getLogger(__name__)

__all__ = [
    "Answer",
    "DecodingSettings",
    "GenerationConfig",
    "InferenceReport",
    "Query",
    "Shard",
    "add_inference_arguments",
    "answers_path",
    "chunk_range",
    "completed_keys",
    "default_record",
    "encode_query",
    "generate_batches",
    "infer_from_args",
    "load_model",
    "record_key",
    "resolve_shard",
    "run_inference",
]

STOP_STRING = "</s>"

# A query's regions: a list of Regions, or a function of the loaded image returning (regions, within) —
# for regions that need the image size or are too big to hold for every query (dense LVIS masks).
RegionSource = Sequence["Region"] | Callable[[Image.Image], tuple[Sequence["Region"], Sequence[Any] | None]]


@dataclass
class Query:
    """One question to answer.

    Attributes:
        image: path of the image file (opened when its batch comes), or a PIL image.
        prompt: the user's question; ``<region{k}>`` (or ``<bbox_location{k}>``) stands for ``regions[k]``.
        output: the fields written before ``prompt``/``text`` (key fields included). A ``prompt`` or ``text``
            key fixes where those go in the line; ``width``/``height`` set to None are filled in.
        regions: Regions in pixels of the image, or a callable ``image -> (regions, within)``.
        within: per region, an optional mask [H, W] or Box limiting its feature mask (see FerretProcessor).
        where: how error messages name the query ("refcoco image 123").
        build: optional ``(image, processor, region_feature) -> (prompt, regions, within, no_coor)``, for a
            question whose wording depends on the image or the processor; it replaces ``prompt``, ``regions``
            and ``within`` (``no_coor`` True: the question already holds the coordinates).
    """

    image: str | os.PathLike | Image.Image
    prompt: str
    output: dict[str, Any]
    regions: RegionSource = ()
    within: Sequence[Any] | None = None
    where: str = ""
    build: Callable[[Image.Image, Any, bool], tuple[str, Sequence[Any], Sequence[Any] | None, bool]] | None = None

    def load_image(self) -> Image.Image:
        if isinstance(self.image, Image.Image):
            return self.image.convert("RGB")
        try:
            with Image.open(self.image) as image:
                return image.convert("RGB")
        except (OSError, ValueError) as exc:
            raise ValueError(f"{self.where or self.image}: cannot read image {self.image}: {exc}") from exc

    def resolve_regions(self, image: Image.Image) -> tuple[list[Region], list[Any] | None]:
        if callable(self.regions):
            regions, within = self.regions(image)
        else:
            regions, within = self.regions, self.within
        return list(regions), (list(within) if within is not None else None)


@dataclass(frozen=True)
class Answer:
    """A generated answer: the query, the question as the model read it, the answer text, the image size and
    the regions ``post_process`` found in the answer (pixels of the user's image)."""

    query: Query
    prompt: str
    text: str
    image_size: tuple[int, int]
    regions: Sequence[Any] = ()


@dataclass(frozen=True)
class GenerationConfig(DecodingSettings):
    """``DecodingSettings`` with the benchmarks' defaults (greedy, 1024 new tokens, seed 0); the name this module
    used before the settings type was shared (not ``transformers.GenerationConfig``: ``to_generation_config()``
    gives that)."""

    max_new_tokens: int = 1024
    seed: int | None = 0


# ----------------------------------------------------------------------------------------------------------
# Sharding and answers files


def chunk_range(total: int, num_chunks: int, chunk_idx: int) -> range:
    """Indices of chunk ``chunk_idx`` of ``num_chunks`` contiguous chunks of ceil(total / num_chunks) items.

    As the original's ``split_list``/``get_chunk``, except that a chunk past the end is empty instead of an
    IndexError (10 items in 4 chunks: 0-2, 3-5, 6-8, 9; 5 items in 4 chunks: 0-1, 2-3, 4, empty).
    """
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
    if not 0 <= chunk_idx < num_chunks:
        raise ValueError(f"chunk_idx {chunk_idx} is outside 0..{num_chunks - 1}")
    size = math.ceil(total / num_chunks) if total else 0
    start = min(chunk_idx * size, total)
    return range(start, min(start + size, total))


@dataclass(frozen=True)
class Shard:
    """Which chunk this process runs; ``local_rank`` is set under torchrun."""

    num_chunks: int = 1
    chunk_idx: int = 0
    local_rank: int | None = None


def resolve_shard(num_chunks: int = 1, chunk_idx: int = 0, environ: Mapping[str, str] | None = None) -> Shard:
    """The chunk from ``--num-chunks/--chunk-idx``, or from torchrun's WORLD_SIZE/RANK/LOCAL_RANK when set."""
    environ = os.environ if environ is None else environ
    world = int(environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        chunk_range(0, num_chunks, chunk_idx)  # validates
        return Shard(num_chunks, chunk_idx)
    rank = int(environ.get("RANK", "0"))
    local_rank = int(environ.get("LOCAL_RANK", str(rank)))
    if (num_chunks, chunk_idx) not in ((1, 0), (world, rank)):
        raise ValueError(
            f"under torchrun (WORLD_SIZE={world}) each rank runs one chunk; leave --num-chunks/--chunk-idx unset "
            f"(got --num-chunks {num_chunks} --chunk-idx {chunk_idx})"
        )
    return Shard(world, rank, local_rank)


def answers_path(answers_file: str | os.PathLike, shard: Shard) -> Path:
    """Where this shard writes (see the module docstring)."""
    path = Path(answers_file)
    if shard.num_chunks == 1 and not path.is_dir():
        return path
    return path / chunk_file_name(shard.chunk_idx, shard.num_chunks)


def record_key(record: Mapping[str, Any], key_fields: Sequence[str]) -> str:
    """The resume key of an answers-file line or a query's output: its key fields' values, as text."""
    try:
        return "\x1f".join(str(record[name]) for name in key_fields)
    except KeyError as exc:
        raise ValueError(f"record has no key field {exc.args[0]!r} (key fields {list(key_fields)}): "
                         f"{json.dumps(record)[:120]}") from exc


def _repair_tail(path: Path) -> None:
    """Drop a half-written last line (what a killed writer leaves), so appending starts on a fresh line."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        logger.warning("%s: dropping an incomplete last line (%d bytes) before resuming", path, len(data) - cut)
        with open(path, "r+b") as f:
            f.truncate(cut)


def completed_keys(path: str | os.PathLike, key_fields: Sequence[str]) -> set[str]:
    """Keys already answered in ``path`` (empty when it does not exist); repairs a half-written last line."""
    path = Path(path)
    if not path.exists():
        return set()
    _repair_tail(path)
    return {record_key(record, key_fields) for record in read_jsonl(path)}


# ----------------------------------------------------------------------------------------------------------
# Model and generation


def _device_for(device: str, shard: Shard) -> str:
    if shard.local_rank is None:
        return device
    import torch

    if device in ("auto", "cuda"):
        return f"cuda:{shard.local_rank}" if torch.cuda.is_available() else "cpu"
    return device


def load_model(model_path: str, model_base: str | None = None, device: str = "auto", dtype: str | None = None,
               load_8bit: bool = False, load_4bit: bool = False, shard: Shard | None = None,
               conv_template: str | None = None):
    """(model in eval mode, processor) through the one loading path; under torchrun on ``cuda:LOCAL_RANK``.
    ``conv_template`` overrides the checkpoint's chat template."""
    from ferret.model.builder import load_pretrained_model

    device = _device_for(device, shard or Shard())
    dtype = None if dtype in (None, "auto") else dtype
    model, processor = load_pretrained_model(model_path, model_base, load_8bit=load_8bit, load_4bit=load_4bit,
                                             device=device, dtype=dtype, conv_template=conv_template)
    model.eval()
    return model, processor


def _clean(text: str) -> str:
    text = text.strip()
    if text.endswith(STOP_STRING):
        text = text[: -len(STOP_STRING)].strip()
    return text


def _question(query: Query, image: Image.Image, processor: FerretProcessor, region_feature: bool,
              no_coor: bool) -> tuple[str, list[Region], list[Any] | None, bool]:
    if query.build is not None:
        prompt, regions, within, query_no_coor = query.build(image, processor, region_feature)
        return prompt, list(regions), (list(within) if within is not None else None), no_coor or query_no_coor
    regions, within = query.resolve_regions(image)
    return query.prompt, regions, within, no_coor


def encode_query(processor: FerretProcessor, query: Query, image: Image.Image, region_feature: bool = True,
                 no_coor: bool = False) -> tuple[str, dict[str, Any]]:
    """(the question as the model reads it, the encoded sample) for one query: ``processor.encode`` of the
    one-turn conversation, formatted and encoded once (masks on the model-input canvas)."""
    from ferret.constants import IMAGE_TOKEN

    prompt, regions, within, query_no_coor = _question(query, image, processor, region_feature, no_coor)
    if query_no_coor and not region_feature:
        raise ValueError(f"{query.where}: no_coor needs region features: without both the question would not "
                         "locate the region")
    where = f"{query.where}: " if query.where else ""
    sample = processor.encode([{"from": "human", "value": prompt}], image, regions=[regions],
                              within=[within] if within is not None else None, add_generation_prompt=True,
                              region_feature=region_feature, no_coor=query_no_coor, where=where)
    return sample["turn_texts"][0].replace(IMAGE_TOKEN, "").strip(), sample


def generate_batches(
    model: FerretLlamaForCausalLM,
    processor: FerretProcessor,
    queries: Sequence[Query],
    batch_size: int = 8,
    generation: DecodingSettings | None = None,
    region_feature: bool = True,
    no_coor: bool = False,
) -> Iterator[list[Answer]]:
    """Answers to ``queries``, one list per batch of ``batch_size``, in query order.

    Each query is encoded once (``encode_query``); the answer is decoded and passed through
    ``processor.post_process``, whose regions (pixels of the user's image) come with the answer.
    """
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if no_coor and not region_feature:
        raise ValueError("no_coor needs region features: without both the question would not locate the region")
    generation = generation or GenerationConfig()
    if not generation.greedy and generation.seed is not None:
        torch.manual_seed(generation.seed)
    tokenizer = processor.tokenizer
    kwargs = generation.generate_kwargs(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if generation.stop:
        kwargs["tokenizer"] = tokenizer  # generate finds stop_strings in the tokens through it
    for start in range(0, len(queries), batch_size):
        batch = queries[start:start + batch_size]
        images, prompts, features = [], [], []
        for query in batch:
            image = query.load_image()
            prompt, encoded = encode_query(processor, query, image, region_feature, no_coor)
            images.append(image)
            prompts.append(prompt)
            features.append(encoded)
        inputs = processor.pad(features, padding_side="left")
        inputs.pop("labels", None)
        with torch.inference_mode():
            output = model.generate(**processor.model_inputs(inputs, model), **kwargs)
        texts = [_clean(text) for text in processor.batch_decode(output.cpu())]
        yield [
            Answer(query, prompt, text, image.size, processor.post_process(text, image.size)[1])
            for query, prompt, text, image in zip(batch, prompts, texts, images)
        ]


def default_record(answer: Answer) -> dict[str, Any]:
    """The answers-file line: the query's fields, ``prompt``, ``text`` and ``regions`` (what
    ``post_process`` found in the answer, pixels of the user's image); None width/height filled in."""
    record = dict(answer.query.output)
    record["prompt"] = answer.prompt
    record["text"] = answer.text
    record["regions"] = regions_record(answer.regions)
    for name, value in zip(("width", "height"), answer.image_size):
        if name in record and record[name] is None:
            record[name] = value
    return record


@dataclass
class InferenceReport:
    path: Path
    total: int = 0  # queries in this shard
    skipped: int = 0  # already answered in the file
    written: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        rate = self.written / self.seconds if self.seconds > 0 else 0.0
        return (f"{self.path}: {self.written} answered, {self.skipped} already there, {self.total} in this chunk "
                f"({self.seconds:.1f} s, {rate:.2f} samples/s)")


def run_inference(
    model: FerretLlamaForCausalLM | None,
    processor: FerretProcessor | None,
    queries: Sequence[Query],
    path: str | os.PathLike,
    key_fields: Sequence[str],
    batch_size: int = 8,
    generation: DecodingSettings | None = None,
    region_feature: bool = True,
    no_coor: bool = False,
    make_record: Callable[[Answer], dict[str, Any]] = default_record,
    overwrite: bool = False,
    progress: bool = True,
    load: Callable[[], tuple[Any, Any]] | None = None,
) -> InferenceReport:
    """Answer the queries not yet in ``path`` and append their lines (flushed per batch).

    ``model``/``processor`` may be None with ``load`` given: the model is then loaded only when something is
    left to answer.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if overwrite and path.exists():
        path.unlink()
    keys = [record_key(q.output, key_fields) for q in queries]
    if len(set(keys)) != len(keys):
        raise ValueError(f"queries repeat a key of {list(key_fields)}; resuming could not tell them apart")
    done = completed_keys(path, key_fields)
    todo = [q for q, key in zip(queries, keys) if key not in done]
    report = InferenceReport(path=path, total=len(queries), skipped=len(queries) - len(todo))
    if report.skipped:
        logger.info("%s: %d of %d already answered; resuming", path, report.skipped, len(queries))
    path.touch()
    if not todo:
        return report
    if model is None or processor is None:
        if load is None:
            raise ValueError("pass model and processor, or load")
        model, processor = load()

    from tqdm.auto import tqdm

    start = time.perf_counter()
    with open(path, "a", encoding="utf-8") as f, tqdm(total=len(todo), unit="sample", desc=path.name,
                                                        disable=not progress) as bar:
        for answers in generate_batches(model, processor, todo, batch_size, generation, region_feature, no_coor):
            f.write("".join(json.dumps(make_record(a), ensure_ascii=False) + "\n" for a in answers))
            f.flush()
            report.written += len(answers)
            bar.update(len(answers))
    report.seconds = time.perf_counter() - start
    return report


# ----------------------------------------------------------------------------------------------------------
# Command line


def add_inference_arguments(parser: argparse.ArgumentParser, images: bool = True) -> None:
    """The options every ``infer`` command shares (model, decoding, batching, sharding, device)."""
    parser.add_argument("--model-path", required=True, help="checkpoint folder or hub id (full, LoRA or projector)")
    parser.add_argument("--model-base", default=None, help="base model of a LoRA or projector-only --model-path")
    parser.add_argument("--answers-file", required=True,
                        help="output .jsonl (one chunk) or folder of {k}_of_{n}.jsonl (several chunks)")
    if images:
        parser.add_argument("--image-folder", "--image_path", dest="image_folder", required=True,
                            help="folder holding the benchmark's images")
    parser.add_argument("--batch-size", type=int, default=8, help="queries per generate() call (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=1024, help="default 1024, as the original")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 = greedy (default; so is any value <= 1e-4); above that it samples (the original "
                             "sampled at 0.001)")
    parser.add_argument("--top-p", "--top_p", dest="top_p", type=float, default=None, help="nucleus sampling")
    parser.add_argument("--seed", type=int, default=0, help="seed for sampling (unused when greedy)")
    parser.add_argument("--num-chunks", type=int, default=1, help="split the queries into this many chunks")
    parser.add_argument("--chunk-idx", type=int, default=0, help="which chunk this process runs (0-based)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="auto: CUDA, then MPS, then CPU (under torchrun: cuda:LOCAL_RANK)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: bf16/fp16 on accelerators, fp32 on CPU")
    parser.add_argument("--load-8bit", action="store_true", help="8-bit LLM weights (bitsandbytes, CUDA)")
    parser.add_argument("--load-4bit", action="store_true", help="4-bit NF4 LLM weights (bitsandbytes, CUDA)")
    add_region_feature_argument(parser)  # on by default; --add_region_feature (the original's opt-in) is an alias
    parser.add_argument("--conv-mode", default=None, help="chat template (default: the processor's, ferret_v1)")
    parser.add_argument("--overwrite", action="store_true", help="start the answers file afresh instead of resuming")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def generation_from_args(args: argparse.Namespace) -> DecodingSettings:
    return DecodingSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)


def infer_from_args(
    args: argparse.Namespace,
    queries: Sequence[Query],
    key_fields: Sequence[str],
    make_record: Callable[[Answer], dict[str, Any]] = default_record,
    no_coor: bool = False,
    loaded: tuple[Any, Any] | None = None,
) -> InferenceReport:
    """The body of every ``infer`` command: pick this process's chunk, load the model if there is work (unless
    ``loaded`` gives the (model, processor) already loaded from these arguments), run."""
    shard = resolve_shard(args.num_chunks, args.chunk_idx)
    chunk = [queries[i] for i in chunk_range(len(queries), shard.num_chunks, shard.chunk_idx)]
    path = answers_path(args.answers_file, shard)
    logger.info("chunk %d of %d: %d of %d queries -> %s", shard.chunk_idx, shard.num_chunks, len(chunk),
                len(queries), path)

    def load():
        if loaded is not None:
            return loaded
        return load_model(args.model_path, args.model_base, args.device, args.dtype, args.load_8bit,
                          args.load_4bit, shard, conv_template=args.conv_mode)

    report = run_inference(None, None, chunk, path, key_fields, batch_size=args.batch_size,
                           generation=generation_from_args(args), region_feature=args.region_feature,
                           no_coor=no_coor, make_record=make_record, overwrite=args.overwrite,
                           progress=args.progress, load=load)
    print(report.summary())
    return report
