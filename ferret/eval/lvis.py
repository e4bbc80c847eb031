"""LVIS referring object classification: a two-way choice about one region, scored by accuracy per region type.

The question is "Is the object {region} <region_fea> of the image a {A} or a {B}?", where one of A and B is
the region's LVIS class and the other a negative class. Records (the LVIS-referring jsonl, REFERENCE §5) carry
``id, image_path, width, height, name, synonyms, neg_class, sample_point, bbox, bbox_norm,
free_shape_bbox_raw, free_shape_segment_mask``; predictions carry at least ``id, text, name, synonyms`` and,
when written by this project's inference, ``region_format`` ("point", "box" or "free_shape").

An answer is correct when, after negated clauses are removed, it mentions the class name or one of its
synonyms as whole words:

* Names are normalised as the original does: ``_`` becomes a space and ``"a (b)"`` gives the two names "a" and
  "b"; comparison is case-insensitive; a plural "s"/"es" is accepted ("dogs" mentions "dog").
* Whole words: "cat" is not found in "category", "book" not in "notebook", "bus" not in "busy".
* Negation: a clause starting at a negation word (``not``, ``no``, ``never``, ``cannot``, ``neither``, ``nor``
  or an ``n't`` contraction) is removed up to the next ``, . ; : ! ?``, newline, "but", "instead" or "rather",
  so "It is not a cat, it is a dog" keeps "It is  it is a dog" and "No, it is not a dog" keeps nothing about
  a dog. Negation words are matched on word boundaries, so "north", "notebook" or "nothing" are left alone
  (the original's ``\\s+no[^,.]*[,.]`` deleted them up to the next comma, REFERENCE §8 item 29).

Also reported: ``both_mentioned``, answers that (after negation removal) mention both the class and the negative
class, which the rule above counts as correct, as the original does.

Command line::

    python -m ferret.eval.lvis score --predictions runs/lvis_box [--annotation-file lvis_referring.jsonl]
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from ferret.eval.common import align, format_table, load_predictions, metrics_path, read_jsonl, write_json

logger = logging.getLogger(__name__)

__all__ = ["class_names", "is_correct", "main", "mentions", "remove_negations", "score_lvis"]

_NEGATION = r"(?:\b(?:not|no|never|cannot|neither|nor)\b|\b\w+n['’]t\b)"
_CLAUSE_END = r"(?=[,.;:!?\n]|\bbut\b|\binstead\b|\brather\b|$)"
_NEGATED_CLAUSE = re.compile(_NEGATION + r"[^,.;:!?\n]*?" + _CLAUSE_END, re.IGNORECASE)


def class_names(name: str, synonyms: Iterable[str] = ()) -> list[str]:
    """The lower-cased names a class may be called by (see the module docstring), without duplicates."""
    names: list[str] = []
    for raw in [name, *synonyms]:
        if not isinstance(raw, str):
            raise ValueError(f"class name or synonym must be a string, got {raw!r}")
        for part in re.split(r"[()]", raw):
            cleaned = " ".join(part.replace("_", " ").split()).lower()
            if cleaned and cleaned not in names:
                names.append(cleaned)
    return names


def remove_negations(text: str) -> str:
    """``text`` without its negated clauses (see the module docstring)."""
    return _NEGATED_CLAUSE.sub(" ", text)


def _name_pattern(name: str) -> re.Pattern[str]:
    words = [re.escape(word) for word in re.split(r"[\s\-]+", name) if word]
    return re.compile(r"(?<!\w)" + r"[\s\-]+".join(words) + r"(?:e?s)?(?!\w)", re.IGNORECASE)


def mentions(text: str, names: Iterable[str]) -> bool:
    """Whether ``text`` contains one of ``names`` as whole words (a plural s/es allowed), case-insensitively."""
    return any(_name_pattern(name).search(text) for name in names if name.strip())


def is_correct(text: str, name: str, synonyms: Iterable[str] = ()) -> bool:
    """The LVIS rule: the answer, without negated clauses, mentions the class name or a synonym."""
    return mentions(remove_negations(text), class_names(name, synonyms))


def score_lvis(
    predictions: list[dict[str, Any]],
    annotations: list[dict[str, Any]] | None = None,
    region_format: str | None = None,
) -> dict[str, Any]:
    """Accuracy overall ("all") and per region type.

    With ``annotations`` (the LVIS-referring records), predictions are matched to them by ``id`` and the class
    names are taken from the annotation; missing predictions are reported. The region type of a prediction is
    its ``region_format`` field, else ``region_format``, else "unknown".
    """
    if annotations is not None:
        alignment = align(annotations, predictions, lambda r: str(r["id"]), lambda p: str(p["id"]), "LVIS record")
        pairs = alignment.pairs
        report: dict[str, Any] | None = alignment.report()
    else:
        pairs = [(prediction, prediction) for prediction in predictions]
        report = None

    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for record, prediction in pairs:
        for field_name in ("name", "synonyms"):
            if field_name not in record:
                raise ValueError(f"LVIS record id={record.get('id')} has no '{field_name}'")
        if "text" not in prediction:
            raise ValueError(f"LVIS prediction id={prediction.get('id')} has no 'text' field")
        kept = remove_negations(prediction["text"])
        correct = mentions(kept, class_names(record["name"], record["synonyms"]))
        negative = record.get("neg_class") or prediction.get("neg_class")
        both = bool(correct and negative and mentions(kept, class_names(negative)))
        kind = prediction.get("region_format") or record.get("region_format") or region_format or "unknown"
        for bucket_name in ("all", kind):
            bucket = counts[bucket_name]
            bucket["n"] += 1
            bucket["correct"] += correct
            bucket["both_mentioned"] += both

    results = {}
    for kind in sorted(counts, key=lambda k: (k != "all", k)):
        bucket = counts[kind]
        results[kind] = {
            "n": bucket["n"],
            "accuracy": bucket["correct"] / bucket["n"],
            "correct": bucket["correct"],
            "both_mentioned": bucket["both_mentioned"],
        }
    metrics: dict[str, Any] = {"benchmark": "lvis_referring", "results": results}
    if report is not None:
        metrics["alignment"] = report
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ferret.eval.lvis", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    score = sub.add_parser("score", help="compute accuracy from a prediction file or folder")
    score.add_argument("--predictions", required=True, help="a .jsonl file or a folder of {k}_of_{n}.jsonl chunks")
    score.add_argument("--annotation-file", default=None, help="LVIS-referring jsonl, to match by id (optional)")
    score.add_argument("--region-format", default=None,
                       help="region type for predictions without a region_format field (point, box, free_shape)")
    score.add_argument("--output", default=None, help="metrics JSON (default: <predictions>.metrics.json beside it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    annotations = read_jsonl(args.annotation_file) if args.annotation_file else None
    metrics = score_lvis(load_predictions(args.predictions), annotations, args.region_format)
    metrics["predictions"] = str(args.predictions)
    out = write_json(metrics, args.output or metrics_path(args.predictions))
    rows = [[k, r["n"], 100 * r["accuracy"], r["both_mentioned"]] for k, r in metrics["results"].items()]
    print(format_table(["region type", "n", "accuracy (%)", "both mentioned"], rows))
    print(f"metrics written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
