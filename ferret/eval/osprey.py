"""Referring object classification as Osprey evaluates it (LVIS and PACO): Semantic Similarity and Semantic IoU.

Data: Osprey's ``lvis_val_1k_category.json`` and ``paco_val_1k_category.json`` (1,000 COCO images each), a JSON
list of images ``{file_name, height, width, categories: [name, ...], annotations: [{segmentation, bbox?}, ...]}``
where ``annotations[i]`` is the region of ``categories[i]``; a segmentation is COCO polygons or an RLE. PACO
names parts as ``"object:part"`` (``"dog:ear"``).

Inference asks, for every region (given as its mask, ``--region-format mask``, the default and Osprey's setting,
or as its box, ``box``): "What is the category of <region0>? Using only one word or phrase." Answers carry
``id`` (``"{image index}_{region index}"``), ``file_name``, ``category`` and the usual ``prompt``/``text``/``regions``.

Scoring, as Osprey defines it:

* the answer: coordinates removed (``regions.strip_regions``); if it holds a ``:``, only the text after the first
  one (up to the next); ``.``, ``:`` and ``,`` become spaces. The class: ``_`` and ``:`` become spaces.
* **Semantic IoU**: the word sets of the lower-cased answer and class, |intersection| / |union|
  ("a stop sign" vs "stop sign": 2 / 3).
* **Semantic Similarity**: the cosine similarity of the two texts' sentence embeddings, from a sentence encoder
  given by hub id or local folder (``--encoder``, Osprey uses ``sentence-transformers/all-MiniLM-L6-v2``). The
  encoder is loaded with transformers (a sentence-transformers folder: the transformer at its root or in the
  folder named by ``modules.json``, the pooling of ``1_Pooling/config.json``, mean by default).

Both are averaged over regions and reported x100.

Command lines::

    python -m ferret.eval osprey infer --model-path checkpoints/ferret-7b \\
        --annotation-file data/osprey/lvis_val_1k_category.json --image-folder data/coco/all2017 \\
        --answers-file runs/osprey_lvis.jsonl
    python -m ferret.eval osprey score --predictions runs/osprey_lvis.jsonl \\
        --encoder sentence-transformers/all-MiniLM-L6-v2 --dataset lvis
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from ferret.eval.common import PredictionStream, decode_segmentation, format_table, metrics_path, write_json
from ferret.eval.inference import Query, add_inference_arguments, infer_from_args
from ferret.eval.metrics import xywh_to_xyxy
from ferret.flags import program_name

logger = logging.getLogger(__name__)

__all__ = ["KEY_FIELDS", "QUESTION", "SentenceEncoder", "clean_answer", "clean_category", "main", "osprey_queries",
           "score_osprey", "semantic_iou"]

KEY_FIELDS = ("id",)
QUESTION = "What is the category of <region0>? Using only one word or phrase."


# ----------------------------------------------------------------------------------------------------------
# Metrics


def clean_answer(text: str) -> str:
    """The answer as Osprey compares it (see the module docstring)."""
    from ferret.regions import strip_regions

    text = strip_regions(text).strip()
    if ":" in text:
        text = text.split(":")[1]
    return text.replace(".", " ").replace(":", " ").replace(",", " ")


def clean_category(name: str) -> str:
    return name.replace("_", " ").replace(":", " ")


def semantic_iou(answer: str, category: str) -> float:
    """|words in both| / |words in either| of the lower-cased texts (0.0 when both are empty)."""
    a, b = set(answer.lower().split()), set(category.lower().split())
    union = a | b
    return len(a & b) / len(union) if union else 0.0


class SentenceEncoder:
    """A sentence-transformers style encoder loaded with transformers: texts -> embeddings [N, D]."""

    def __init__(self, name_or_path: str, device: str = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        root = Path(name_or_path)
        model_dir = name_or_path
        pooling = "mean"
        self.max_length = 256
        if root.is_dir():
            modules = root / "modules.json"
            if modules.is_file():
                for module in json.loads(modules.read_text()):
                    kind = str(module.get("type", ""))
                    if kind.endswith("Transformer"):
                        model_dir = str(root / module.get("path", ""))
                    elif kind.endswith("Pooling"):
                        config_file = root / module.get("path", "") / "config.json"
                        if config_file.is_file():
                            config = json.loads(config_file.read_text())
                            modes = [m for m in ("cls_token", "mean_tokens", "max_tokens")
                                     if config.get(f"pooling_mode_{m}")]
                            if len(modes) != 1:
                                raise ValueError(f"{config_file}: expected one pooling mode, got {modes}")
                            pooling = modes[0].split("_")[0]
            for config_name in ("sentence_bert_config.json",):
                config_file = Path(model_dir) / config_name
                if config_file.is_file():
                    self.max_length = int(json.loads(config_file.read_text()).get("max_seq_length", 256))
        self.pooling = pooling
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
            self.model = AutoModel.from_pretrained(model_dir).to(device).eval()
        except OSError as exc:
            raise ValueError(f"cannot load the sentence encoder {name_or_path!r} (a hub id or a local folder "
                             f"holding a transformer and its tokenizer): {exc}") from exc
        self.device = device

    def encode(self, texts: Sequence[str], batch_size: int = 64):
        """Embeddings [N, D] (float32, CPU) of ``texts``, pooled as the encoder's configuration says."""
        import torch

        chunks = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                hidden = self.model(**batch).last_hidden_state.float()  # [B, T, D]
            mask = batch["attention_mask"].unsqueeze(-1).float()  # [B, T, 1]
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            elif self.pooling == "max":
                pooled = hidden.masked_fill(mask == 0, float("-inf")).max(dim=1).values
            else:
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            chunks.append(pooled.cpu())
        return torch.cat(chunks) if chunks else torch.zeros(0, 0)

    def similarity(self, texts_a: Sequence[str], texts_b: Sequence[str]) -> list[float]:
        """Cosine similarity of each pair (a_i, b_i)."""
        import torch

        a, b = self.encode(texts_a), self.encode(texts_b)
        return torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-8).tolist()


def score_osprey(predictions: PredictionStream | Iterable[dict[str, Any]], encoder: SentenceEncoder | None,
                 benchmark: str = "osprey_referring") -> dict[str, Any]:
    """Semantic Similarity (when an encoder is given) and Semantic IoU, x100, over the predictions."""
    stream = PredictionStream.of(predictions)
    answers, categories = [], []
    seen = set()
    duplicates = 0
    for record in stream:
        if not isinstance(record.get("category"), str):
            stream.reject("no_category", f"id={record.get('id')}")
            continue
        if not isinstance(record.get("text"), str):
            stream.reject("no_text", f"id={record.get('id')}")
            continue
        key = record.get("id")
        if key is not None:
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
        answers.append(clean_answer(record["text"]))
        categories.append(clean_category(record["category"]))
    n = len(answers)
    results: dict[str, Any] = {"n": n}
    results["semantic_iou"] = 100.0 * sum(semantic_iou(a, c) for a, c in zip(answers, categories)) / n if n else 0.0
    if encoder is not None:
        sims = encoder.similarity(answers, categories) if n else []
        results["semantic_similarity"] = 100.0 * sum(sims) / n if n else 0.0
    return {"benchmark": benchmark, "results": results, "duplicates": duplicates,
            "predictions_read": stream.report()}


# ----------------------------------------------------------------------------------------------------------
# Inference


def _region(entry: dict[str, Any], index: int, region_format: str, where: str, image):
    from ferret.regions import Box, FreeForm

    width, height = image.size
    if (int(entry["width"]), int(entry["height"])) != (width, height):
        raise ValueError(f"{where}: the image is {width}x{height} but the record says "
                         f"{entry['width']}x{entry['height']}")
    annotation = entry["annotations"][index]
    segmentation = annotation.get("segmentation")
    mask = decode_segmentation(segmentation, width, height, where) if segmentation else None
    if region_format == "mask":
        if mask is None:
            raise ValueError(f"{where}: no segmentation for --region-format mask")
        return [FreeForm(mask)], None
    if annotation.get("bbox") is not None:
        return [Box(*xywh_to_xyxy(annotation["bbox"]))], None
    if mask is None:
        raise ValueError(f"{where}: neither a bbox nor a segmentation")
    return [FreeForm(mask).bbox], None


def osprey_queries(entries: list[dict[str, Any]], image_folder: str | os.PathLike,
                   region_format: str = "mask") -> list[Query]:
    queries = []
    for k, entry in enumerate(entries):
        for field_name in ("file_name", "height", "width", "categories", "annotations"):
            if field_name not in entry:
                raise ValueError(f"Osprey record #{k} has no '{field_name}'")
        if len(entry["categories"]) != len(entry["annotations"]):
            raise ValueError(f"Osprey record #{k} ({entry['file_name']}) has {len(entry['categories'])} categories "
                             f"but {len(entry['annotations'])} annotations")
        for i, category in enumerate(entry["categories"]):
            where = f"Osprey record #{k} ({entry['file_name']}) region {i}"
            queries.append(Query(
                image=Path(image_folder) / entry["file_name"], prompt=QUESTION,
                output={"id": f"{k}_{i}", "file_name": entry["file_name"], "category": category, "prompt": None,
                        "text": None},
                regions=partial(_region, entry, i, region_format, where), where=where))
    return queries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=program_name("ferret.eval.osprey"), description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    infer = sub.add_parser("infer", help="classify every region with a model")
    infer.add_argument("--annotation-file", required=True,
                       help="lvis_val_1k_category.json or paco_val_1k_category.json")
    infer.add_argument("--region-format", default="mask", choices=["mask", "box"])
    add_inference_arguments(infer)
    score = sub.add_parser("score", help="Semantic Similarity and Semantic IoU of a prediction file or folder")
    score.add_argument("--predictions", required=True, help="a .jsonl file or a folder of {k}_of_{n}.jsonl chunks")
    score.add_argument("--encoder", default=None,
                       help="sentence encoder (hub id or folder), e.g. sentence-transformers/all-MiniLM-L6-v2; "
                            "without it only Semantic IoU is computed")
    score.add_argument("--dataset", default=None, choices=["lvis", "paco"], help="names the benchmark in the report")
    score.add_argument("--output", default=None, help="metrics JSON (default: <predictions>.metrics.json beside it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.command == "infer":
        with open(args.annotation_file, encoding="utf-8") as f:
            entries = json.load(f)
        if not isinstance(entries, list):
            raise SystemExit(f"{args.annotation_file}: expected a JSON list of images "
                             "(Osprey's *_val_1k_category.json)")
        infer_from_args(args, osprey_queries(entries, args.image_folder, args.region_format), KEY_FIELDS)
        return 0
    encoder = SentenceEncoder(args.encoder) if args.encoder else None
    benchmark = f"osprey_{args.dataset}" if args.dataset else "osprey_referring"
    metrics = score_osprey(PredictionStream(args.predictions), encoder, benchmark)
    metrics["predictions"] = str(args.predictions)
    metrics["encoder"] = args.encoder
    out = write_json(metrics, args.output or metrics_path(args.predictions))
    r = metrics["results"]
    print(format_table(["n", "Semantic Similarity", "Semantic IoU"],
                       [[r["n"], r.get("semantic_similarity", "-"), r["semantic_iou"]]]))
    print(f"unparseable: {metrics['predictions_read']['unparseable']}; metrics written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
