"""Files and bookkeeping shared by the benchmarks: predictions in, metrics out, answers to boxes.

Prediction files
----------------
Inference writes one JSON object per line. A run split over ``n`` workers writes the chunk files
``{k}_of_{n}.jsonl`` (k = 0..n-1) into one prediction folder. ``load_predictions`` accepts either a single
``.jsonl`` file or such a folder; chunk files are merged in *numeric* chunk order (``2_of_16`` before
``10_of_16``, unlike a lexicographic sort). A folder without chunk files contributes all its ``*.jsonl`` files
in natural order. Other files in the folder are ignored.

Metric files
------------
Metrics are written NEXT TO the predictions, never inside the prediction folder, so a second run cannot read
them back as predictions (the original's metric.json inside the folder broke exactly that way). The rule:

    <predictions>            -> <predictions>.metrics.json      (a folder: runs/refcoco_val/ -> runs/refcoco_val.metrics.json)
    <predictions>.jsonl      -> <predictions>.metrics.json      (a file:   runs/pope.jsonl   -> runs/pope.metrics.json)

The name ends in ``.json``, not ``.jsonl``, so it is never a prediction file either way.

Alignment
---------
Predictions are matched to ground truth by a key (image id, question id, ...), never by position. Missing
predictions are reported (a warning and ``missing`` in the metrics, ``complete: false``); metrics are computed
over the ground-truth items that have a prediction. Duplicated keys (for example from a resumed run) keep the
first prediction and are counted.

Answers to boxes
----------------
``answer_boxes`` parses a model answer through ``ferret.regions.parse_regions`` (the only parser of the
coordinate format) and returns every region as an ``[x1, y1, x2, y2]`` pixel box: a point ``[x, y]`` becomes
the zero-size box ``[x, y, x, y]`` (IoU 0 with anything, see ``metrics``). Nothing is dropped: an answer
without any region yields an empty list, which the benchmarks score with the zero box and keep in the
denominator.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferret.regions import Box, Point, parse_regions

logger = logging.getLogger(__name__)

__all__ = [
    "CHUNK_FILE",
    "METRICS_SUFFIX",
    "Alignment",
    "AnswerBox",
    "align",
    "answer_boxes",
    "chunk_file_name",
    "format_table",
    "load_predictions",
    "metrics_path",
    "normalize_phrase",
    "prediction_files",
    "read_jsonl",
    "write_json",
]

CHUNK_FILE = re.compile(r"^(\d+)_of_(\d+)\.jsonl$")
METRICS_SUFFIX = ".metrics.json"


def chunk_file_name(chunk_index: int, num_chunks: int) -> str:
    """The file name of chunk ``chunk_index`` (0-based) of ``num_chunks``: ``"{k}_of_{n}.jsonl"``."""
    if not 0 <= chunk_index < num_chunks:
        raise ValueError(f"chunk index {chunk_index} is outside 0..{num_chunks - 1}")
    return f"{chunk_index}_of_{num_chunks}.jsonl"


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a JSON-lines file (blank lines skipped).

    A malformed *last* line is what a killed writer leaves behind: it is skipped with a warning. A malformed
    line anywhere else raises ValueError naming the file and line.
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == last:
                logger.warning("%s:%d: skipping an incomplete last line (%s)", path, i + 1, exc)
                continue
            raise ValueError(f"{path}:{i + 1}: not valid JSON ({exc}): {line[:80]!r}") from exc
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{i + 1}: expected a JSON object per line, got {type(record).__name__}")
        records.append(record)
    return records


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def prediction_files(path: str | os.PathLike) -> list[Path]:
    """The prediction files under ``path`` in reading order (see the module docstring).

    Raises FileNotFoundError when ``path`` does not exist or holds no prediction file, and ValueError when
    chunk files of different totals (``_of_8`` and ``_of_16``) are mixed in one folder. Missing chunk indices
    are logged as a warning (a run may still be going).
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"predictions not found: {path} is neither a file nor a folder")
    chunks = []
    others = []
    for child in path.iterdir():
        if not child.is_file() or not child.name.endswith(".jsonl"):
            continue
        match = CHUNK_FILE.match(child.name)
        if match:
            chunks.append((int(match.group(1)), int(match.group(2)), child))
        else:
            others.append(child)
    if chunks:
        totals = sorted({n for _, n, _ in chunks})
        if len(totals) > 1:
            raise ValueError(f"{path} mixes chunk files of different totals {totals}; keep one run per folder")
        total = totals[0]
        present = {k for k, _, _ in chunks}
        absent = sorted(set(range(total)) - present)
        if absent:
            logger.warning("%s: chunk(s) %s of %d are missing", path, absent, total)
        if others:
            logger.warning("%s: ignoring non-chunk files %s", path, sorted(p.name for p in others))
        return [child for _, _, child in sorted(chunks, key=lambda item: item[0])]
    if not others:
        raise FileNotFoundError(f"{path} holds no *.jsonl prediction file")
    return sorted(others, key=lambda p: _natural_key(p.name))


def load_predictions(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All prediction records under ``path`` (a file or a folder of chunk files), in reading order."""
    records: list[dict[str, Any]] = []
    for file in prediction_files(path):
        records.extend(read_jsonl(file))
    logger.info("read %d predictions from %s", len(records), path)
    return records


def metrics_path(predictions: str | os.PathLike) -> Path:
    """Where the metrics of ``predictions`` (a file or a folder) go: beside it, as ``<name>.metrics.json``."""
    path = Path(os.path.normpath(os.fspath(predictions)))
    name = path.name
    if name in ("", ".", ".."):
        path = path.resolve()
        name = path.name
    name = name.removesuffix(".jsonl")
    return path.with_name(name + METRICS_SUFFIX)


def write_json(data: Any, path: str | os.PathLike) -> Path:
    """Write ``data`` as indented JSON atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


@dataclass
class Alignment:
    """Predictions matched to ground-truth items by key."""

    pairs: list[tuple[Any, dict[str, Any]]] = field(default_factory=list)  # (ground-truth item, prediction)
    missing: list[Hashable] = field(default_factory=list)  # ground-truth keys without a prediction
    unexpected: list[Hashable] = field(default_factory=list)  # prediction keys not in the ground truth
    duplicates: int = 0  # predictions whose key was already seen (the first one is kept)

    def report(self) -> dict[str, Any]:
        """Counts for a metrics file."""
        return {
            "evaluated": len(self.pairs),
            "missing": len(self.missing),
            "unexpected": len(self.unexpected),
            "duplicates": self.duplicates,
            "complete": not self.missing,
        }


def align(
    ground_truth: Sequence[Any],
    predictions: Iterable[dict[str, Any]],
    gt_key: Callable[[Any], Hashable],
    pred_key: Callable[[dict[str, Any]], Hashable],
    what: str = "item",
) -> Alignment:
    """Match predictions to ground-truth items by key, in ground-truth order.

    ``pred_key`` may raise KeyError for a record without the key field; that is reported as a ValueError naming
    the record. Missing, unexpected and duplicated keys are logged.
    """
    by_key: dict[Hashable, dict[str, Any]] = {}
    duplicates = 0
    for index, record in enumerate(predictions):
        try:
            key = pred_key(record)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"prediction #{index} has no usable key for {what} ({exc!r}): {_short(record)}") from exc
        if key in by_key:
            duplicates += 1
            continue
        by_key[key] = record
    result = Alignment(duplicates=duplicates)
    seen = set()
    for item in ground_truth:
        key = gt_key(item)
        seen.add(key)
        if key in by_key:
            result.pairs.append((item, by_key[key]))
        else:
            result.missing.append(key)
    result.unexpected = [key for key in by_key if key not in seen]
    if result.missing:
        logger.warning(
            "%d of %d %ss have no prediction (first: %s)",
            len(result.missing),
            len(ground_truth),
            what,
            result.missing[:5],
        )
    if result.unexpected:
        logger.warning("%d predictions match no %s (first: %s)", len(result.unexpected), what, result.unexpected[:5])
    if duplicates:
        logger.warning("%d duplicated predictions ignored (the first of each key is kept)", duplicates)
    return result


@dataclass(frozen=True)
class AnswerBox:
    """One region of a model answer as a pixel box (a point is the zero-size box on it)."""

    phrase: str
    box: tuple[float, float, float, float]
    is_point: bool


def answer_boxes(text: str, width: int, height: int) -> list[AnswerBox]:
    """Every point and box in a model answer, in order, as ``[x1, y1, x2, y2]`` pixel boxes (see module doc)."""
    found = []
    for grounded in parse_regions(text, int(width), int(height)):
        region = grounded.region
        if isinstance(region, Point):
            found.append(AnswerBox(grounded.phrase, (region.x, region.y, region.x, region.y), True))
        elif isinstance(region, Box):
            found.append(AnswerBox(grounded.phrase, (region.x1, region.y1, region.x2, region.y2), False))
        else:  # parse_regions only returns points and boxes
            raise TypeError(f"unexpected region {region!r} parsed from {text!r}")
    return found


_PUNCT_SPACING = re.compile(r"\s*(['\",.;!?|:])\s*")
_NON_WORD = re.compile(r"[^\w\s]")


def normalize_phrase(text: str) -> str:
    """Lower-case, punctuation removed, whitespace collapsed: the original's phrase comparison
    (``"A Man's  hat."`` -> ``"a man s hat"``)."""
    text = _PUNCT_SPACING.sub(r"\1 ", text.lower()).strip()
    text = _NON_WORD.sub("", text)
    return " ".join(text.split())


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain fixed-width text table for command-line output (floats printed with 2 decimals)."""

    def cell(value: Any) -> str:
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells)
    return "\n".join(lines)


def _short(obj: object, limit: int = 120) -> str:
    text = json.dumps(obj, ensure_ascii=False) if isinstance(obj, (dict, list)) else repr(obj)
    return text if len(text) <= limit else text[: limit - 3] + "..."
