"""One results table: every benchmark's metrics of one or more runs, beside the numbers the papers publish.

``python -m ferret.eval report RUN_DIR [RUN_DIR ...]`` reads every ``*.metrics.json`` under each run folder
(what each benchmark's ``score`` writes beside its predictions), takes each benchmark's headline numbers, and
prints one table: a row per benchmark / split / metric, a column per run (named after its folder), then the
published numbers of Ferret, Ferret-v2, Osprey and Prismer where the papers report that row. ``--format csv``
writes CSV instead of Markdown; ``--output FILE`` writes to a file; ``--no-papers`` leaves the papers out.

All numbers are percentages (CIDEr and METEOR x100, as published). Where a paper's setting differs from what
``score`` can compute locally, the row says so: VQAv2 and GQA papers report test-dev (the evaluation server;
``python -m ferret.eval vqa export`` writes the file to submit), while local scoring needs the val annotations.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ferret.flags import program_name

logger = logging.getLogger(__name__)

__all__ = ["PAPERS", "PUBLISHED", "collect", "headline_rows", "main", "render"]

# Published numbers, by (benchmark row, metric) -> {model: value}. Sources: the Ferret paper ("Ferret: Refer and
# Ground Anything Anywhere at Any Granularity"), the Ferret-v2 paper ("Ferret-v2: An Improved Baseline for
# Referring and Grounding with Large Language Models", which also lists Ferret's and Osprey's Ferret-Bench
# numbers), the Osprey paper ("Osprey: Pixel Understanding with Visual Instruction Tuning") and the Prismer paper
# ("Prismer: A Vision-Language Model with An Ensemble of Experts"; fine-tuned models).
PAPERS = ("Ferret-7B", "Ferret-13B", "Ferret-v2-7B", "Ferret-v2-13B", "Osprey-7B", "Prismer-Base", "Prismer-Large")


def _refexp(values: dict[str, tuple[float, float, float, float]]) -> dict[tuple[str, str], dict[str, float]]:
    names = ("Ferret-7B", "Ferret-13B", "Ferret-v2-7B", "Ferret-v2-13B")
    return {(row, "Acc@0.5"): dict(zip(names, v)) for row, v in values.items()}


PUBLISHED: dict[tuple[str, str], dict[str, float]] = {
    **_refexp({
        "RefCOCO val": (87.49, 89.48, 92.79, 92.64), "RefCOCO testA": (91.35, 92.41, 94.68, 94.95),
        "RefCOCO testB": (82.45, 84.36, 88.69, 88.86), "RefCOCO+ val": (80.78, 82.81, 87.35, 87.39),
        "RefCOCO+ testA": (87.38, 88.14, 92.75, 92.05), "RefCOCO+ testB": (73.14, 75.17, 79.3, 81.36),
        "RefCOCOg val": (83.93, 85.83, 89.42, 89.43), "RefCOCOg test": (84.76, 86.34, 89.27, 89.99),
    }),
    ("Flickr30k Entities val", "R@1"): {"Ferret-7B": 80.39, "Ferret-13B": 81.13, "Ferret-v2-7B": 85.52,
                                        "Ferret-v2-13B": 85.33},
    ("Flickr30k Entities test", "R@1"): {"Ferret-7B": 82.21, "Ferret-13B": 84.76, "Ferret-v2-7B": 85.83,
                                         "Ferret-v2-13B": 86.25},
    ("LVIS referring point", "accuracy"): {"Ferret-7B": 67.94, "Ferret-13B": 68.35, "Ferret-v2-7B": 74.55,
                                           "Ferret-v2-13B": 75.09},
    ("LVIS referring box", "accuracy"): {"Ferret-7B": 79.42, "Ferret-13B": 80.46, "Ferret-v2-7B": 86.59,
                                         "Ferret-v2-13B": 87.74},
    ("LVIS referring free-form", "accuracy"): {"Ferret-7B": 69.77, "Ferret-13B": 70.98, "Ferret-v2-7B": 76.13,
                                               "Ferret-v2-13B": 76.35},
    ("Ferret-Bench refer_desc", "score"): {"Ferret-7B": 68.7, "Ferret-13B": 70.6, "Ferret-v2-7B": 79.9,
                                           "Ferret-v2-13B": 79.6, "Osprey-7B": 72.2},
    ("Ferret-Bench refer_reason", "score"): {"Ferret-7B": 67.3, "Ferret-13B": 68.7, "Ferret-v2-7B": 81.7,
                                             "Ferret-v2-13B": 79.4, "Osprey-7B": 67.8},
    ("Ferret-Bench ground_conv", "score"): {"Ferret-7B": 57.5, "Ferret-13B": 59.7, "Ferret-v2-7B": 65.2,
                                            "Ferret-v2-13B": 65.7},
    ("Ferret-Bench all", "score"): {"Ferret-7B": 64.5, "Ferret-13B": 66.3, "Ferret-v2-7B": 75.6,
                                    "Ferret-v2-13B": 74.9},
    ("POPE adversarial", "accuracy"): {"Osprey-7B": 85.33},
    ("POPE random", "F1"): {"Osprey-7B": 88.97},
    ("POPE popular", "F1"): {"Osprey-7B": 87.5},
    ("POPE mean of 3 splits", "F1"): {"Ferret-v2-7B": 87.8, "Ferret-v2-13B": 88.1},
    ("VQAv2 (papers: test-dev)", "accuracy"): {"Ferret-v2-7B": 81.5, "Ferret-v2-13B": 81.8, "Prismer-Base": 76.84,
                                               "Prismer-Large": 78.42},
    ("GQA (papers: test-dev)", "accuracy"): {"Ferret-v2-7B": 64.7, "Ferret-v2-13B": 64.8},
    ("TextVQA val", "accuracy"): {"Ferret-v2-7B": 61.7, "Ferret-v2-13B": 62.2},
    ("COCO caption Karpathy test", "CIDEr"): {"Prismer-Base": 135.1, "Prismer-Large": 136.5},
    ("RefCOCOg region caption", "METEOR"): {"Osprey-7B": 16.6},
    ("RefCOCOg region caption", "CIDEr"): {"Osprey-7B": 108.3},
    ("Osprey LVIS", "Semantic Similarity"): {"Osprey-7B": 65.2},
    ("Osprey LVIS", "Semantic IoU"): {"Osprey-7B": 38.2},
    ("Osprey PACO", "Semantic Similarity"): {"Osprey-7B": 73.1},
    ("Osprey PACO", "Semantic IoU"): {"Osprey-7B": 52.7},
}

_REFEXP_NAMES = {"refcoco": "RefCOCO", "refcoco+": "RefCOCO+", "refcocog": "RefCOCOg"}
_POPE_SPLIT = re.compile(r"(random|popular|adversarial)")
_FLICKR_SPLIT = re.compile(r"_(val|test)\b|_(val|test)\.json")


def _pct(value: Any) -> float | None:
    return None if value is None else 100.0 * float(value)


def _source_name(metrics: dict[str, Any], path: Path) -> str:
    return " ".join(str(metrics.get(k, "")) for k in ("annotation_file", "predictions")) + " " + path.name


def headline_rows(metrics: dict[str, Any], path: Path = Path("")) -> list[tuple[tuple[str, str], float | None]]:
    """The headline ((row, metric), value) pairs of one metrics file; [] for an unknown benchmark."""
    benchmark = metrics.get("benchmark")
    results = metrics.get("results", {})
    rows: list[tuple[tuple[str, str], float | None]] = []
    if benchmark == "refexp":
        threshold = f"{metrics.get('threshold', 0.5):g}"
        for r in results.values():
            name = _REFEXP_NAMES.get(r.get("dataset"), r.get("dataset"))
            rows.append(((f"{name} {r.get('split') or ''}".strip(), f"Acc@{threshold}"), _pct(r[f"acc@{threshold}"])))
    elif benchmark == "flickr30k_entities":
        match = _FLICKR_SPLIT.search(_source_name(metrics, path))
        split = (match.group(1) or match.group(2)) if match else ""
        rows.append(((f"Flickr30k Entities {split}".strip(), "R@1"), _pct(results.get("all", {}).get("recall@1"))))
    elif benchmark == "lvis_referring":
        for kind, label in (("point", "point"), ("box", "box"), ("free_shape", "free-form")):
            if kind in results:
                rows.append(((f"LVIS referring {label}", "accuracy"), _pct(results[kind]["accuracy"])))
    elif benchmark == "pope":
        match = _POPE_SPLIT.search(_source_name(metrics, path))
        split = match.group(1) if match else "?"
        rows.append(((f"POPE {split}", "accuracy"), _pct(results.get("accuracy"))))
        rows.append(((f"POPE {split}", "F1"), _pct(results.get("f1"))))
    elif benchmark == "ferret_bench":
        summary = metrics.get("combined") or next(iter(metrics.get("files", {}).values()), {})
        for category, score in (summary.get("scores") or {}).items():
            rows.append(((f"Ferret-Bench {category}", "score"), score))
    elif benchmark in ("vqav2", "gqa", "textvqa"):
        name = {"vqav2": "VQAv2 (papers: test-dev)", "gqa": "GQA (papers: test-dev)", "textvqa": "TextVQA val"}
        rows.append(((name[benchmark], "accuracy"), results.get("overall", {}).get("accuracy")))
    elif benchmark in ("coco_caption", "refcocog_region_caption", "vg_region_caption"):
        name = {"coco_caption": "COCO caption Karpathy test", "refcocog_region_caption": "RefCOCOg region caption",
                "vg_region_caption": "Visual Genome region caption"}[benchmark]
        for metric in ("CIDEr", "METEOR"):
            rows.append(((name, metric), results.get(metric)))
    elif benchmark in ("osprey_lvis", "osprey_paco", "osprey_referring"):
        name = {"osprey_lvis": "Osprey LVIS", "osprey_paco": "Osprey PACO", "osprey_referring": "Osprey referring"}
        rows.append(((name[benchmark], "Semantic Similarity"), results.get("semantic_similarity")))
        rows.append(((name[benchmark], "Semantic IoU"), results.get("semantic_iou")))
    elif benchmark == "toy":
        for key, value in (metrics.get("summary") or {}).items():
            rows.append((("toy world", key), _pct(value)))
    return rows


def collect(run_dir: str | Path) -> dict[tuple[str, str], float | None]:
    """Every headline number under ``run_dir`` (a folder of metrics files, searched recursively, or one file)."""
    root = Path(run_dir)
    files = [root] if root.is_file() else sorted(root.rglob("*.metrics.json"))
    if not files:
        logger.warning("%s holds no *.metrics.json file", root)
    found: dict[tuple[str, str], float | None] = {}
    for file in files:
        try:
            metrics = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            logger.warning("skipping %s: %s", file, exc)
            continue
        if not isinstance(metrics, dict):
            continue
        rows = headline_rows(metrics, file)
        if not rows:
            logger.info("%s: benchmark %r has no headline rows", file, metrics.get("benchmark"))
        for key, value in rows:
            if key in found and found[key] != value:
                logger.warning("%s: %s %s appears twice in %s; keeping the first", file, *key, root)
                continue
            found[key] = value
    pope_f1 = [found.get((f"POPE {s}", "F1")) for s in ("random", "popular", "adversarial")]
    if all(v is not None for v in pope_f1):
        found[("POPE mean of 3 splits", "F1")] = sum(pope_f1) / 3  # type: ignore[arg-type]
    return found


def _order(key: tuple[str, str]) -> tuple[int, str, str]:
    keys = list(PUBLISHED)
    if key in keys:
        return (keys.index(key), "", "")
    return (len(keys), key[0], key[1])


def render(runs: dict[str, dict[tuple[str, str], float | None]], papers: bool = True, fmt: str = "md") -> str:
    """The table as Markdown (``fmt="md"``) or CSV."""
    keys = sorted({key for found in runs.values() for key in found}, key=_order)
    paper_columns = [p for p in PAPERS if papers and any(p in PUBLISHED.get(key, {}) for key in keys)]
    header = ["benchmark", "metric", *runs, *(f"{p} (paper)" for p in paper_columns)]

    def cell(value: float | None) -> str:
        return "" if value is None else f"{value:.2f}"

    rows = [[row, metric, *(cell(found.get((row, metric))) for found in runs.values()),
             *(cell(PUBLISHED.get((row, metric), {}).get(p)) for p in paper_columns)] for row, metric in keys]
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        return out.getvalue()
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c if c else "–" for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _run_names(dirs: Sequence[str]) -> list[str]:
    names: list[str] = []
    for d in dirs:
        name = Path(d).resolve().name or str(d)
        base, k = name, 2
        while name in names:
            name, k = f"{base} ({k})", k + 1
        names.append(name)
    return names


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=program_name("ferret.eval.report"), description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="folders holding *.metrics.json files")
    parser.add_argument("--format", dest="fmt", default="md", choices=["md", "csv"])
    parser.add_argument("--output", default=None, help="write the table to this file (default: print it)")
    parser.add_argument("--no-papers", dest="papers", action="store_false", help="leave out the papers' numbers")
    args = parser.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    missing = [d for d in args.runs if not Path(d).exists()]
    if missing:
        parser.error(f"no such run folder: {', '.join(missing)}")
    runs = {name: collect(d) for name, d in zip(_run_names(args.runs), args.runs)}
    table = render(runs, args.papers, args.fmt)
    if args.output:
        Path(args.output).write_text(table, encoding="utf-8")
        print(f"table written to {args.output}")
    else:
        print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
