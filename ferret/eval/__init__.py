"""Benchmarks for Ferret: one module per benchmark, shared metrics, file handling and inference.

* ``metrics``      box IoU (DETR-style, continuous), the mean box, Acc@IoU, Recall@k.
* ``common``       prediction files and folders (chunk files merged in numeric order), alignment of predictions
                   to ground truth by key, where metric files go, and turning a model answer into boxes.
* ``inference``    loading, the batched generation loop, resumable answers files, chunks and torchrun.
* ``refexp``       RefCOCO / RefCOCO+ / RefCOCOg referring expression comprehension (Acc@0.5).
* ``flickr``       Flickr30k Entities phrase grounding (Recall@1/5/10 and upper bound at IoU 0.5).
* ``lvis``         LVIS referring object classification (two-way choice, accuracy per region type).
* ``pope``         POPE object hallucination (accuracy, precision, recall, F1, yes-ratio).
* ``ferret_bench`` Ferret-Bench, judged by a GPT-style model through any OpenAI-compatible endpoint.
* ``toy``          the toy world's test split (referring per region type, grounding, description, yes/no).
* ``caption``      COCO captions (Karpathy test) and region captions (RefCOCOg, Visual Genome): CIDEr, METEOR.
* ``osprey``       Osprey's referring object classification on LVIS / PACO (Semantic Similarity, Semantic IoU).
* ``report``       one table of every benchmark's metrics of one or more runs beside the papers' numbers.
* ``vqa``          VQAv2 and TextVQA (official 10-annotator accuracy) and GQA (accuracy).

Each benchmark module has a ``main(argv)`` command line with an ``infer`` subcommand (the model answers the
benchmark's questions) and a ``score`` subcommand (pure: answers in, metrics out); Ferret-Bench also has
``review`` (the judge) and calls its summary ``summarize`` or ``score``. For example::

    python -m ferret.eval refexp infer --model-path M --annotation-file F --image-folder D --answers-file OUT
    python -m ferret.eval refexp score --predictions OUT --annotation-file F

(``python -m ferret.eval.refexp ...`` is the same.) Importing this package loads neither torch nor the model;
``inference`` imports torch only when it generates.
"""

from __future__ import annotations

import importlib

# benchmark name on the command line -> module
BENCHMARKS = {
    "refexp": "ferret.eval.refexp",
    "flickr": "ferret.eval.flickr",
    "lvis": "ferret.eval.lvis",
    "pope": "ferret.eval.pope",
    "ferret_bench": "ferret.eval.ferret_bench",
    "toy": "ferret.eval.toy",
    "vqa": "ferret.eval.vqa",
    "caption": "ferret.eval.caption",
    "osprey": "ferret.eval.osprey",
    "report": "ferret.eval.report",
}
# other spellings accepted on the command line
ALIASES = {"refcoco": "refexp", "flickr30k": "flickr", "ferret-bench": "ferret_bench", "bench": "ferret_bench"}


def benchmark_main(name: str):
    """The ``main(argv)`` of benchmark ``name`` (or one of its aliases)."""
    key = ALIASES.get(name, name)
    if key not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {sorted(BENCHMARKS)}")
    return importlib.import_module(BENCHMARKS[key]).main


def main(argv: list[str] | None = None) -> int:
    """``<benchmark> <subcommand> [options]``: dispatch to the benchmark module's command line."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m ferret.eval {" + ",".join(BENCHMARKS) + "} {infer,score,...} [options]")
        return 0 if argv else 2
    try:
        run = benchmark_main(argv[0])
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run(argv[1:])
