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

Streaming and unparseable predictions
-------------------------------------
Scorers read predictions with ``PredictionStream``: one line at a time (a file of millions of answers is never
held in memory), and a line that cannot be used is counted by kind instead of stopping the run:
``invalid_json`` (not JSON, e.g. the half-written line a killed writer leaves), ``not_an_object``, ``no_key``
(the field that matches it to the ground truth is missing or unusable), ``no_text`` (no answer field),
``bad_regions`` (a stored ``regions`` list that is malformed). Each scorer's metrics carry
``predictions: {"read": n, "unparseable": {kind: count}}``. ``StreamAlignment`` matches such a stream to the
ground truth by key, keeping only the keys seen.

Answers to boxes
----------------
This project's inference stores, beside the answer ``text``, what ``FerretProcessor.post_process`` returns:
``regions``, a list of ``{"phrase": str, "box": [x1, y1, x2, y2]}`` or ``{"phrase": str, "point": [x, y]}``
in pixels of the user's image, already in the right frame whatever the checkpoint's ``image_aspect_ratio``.
``answer_boxes`` reads those; for a record without ``regions`` (the original's prediction files) it parses
``text`` with ``ferret.regions.parse_regions`` on the image size, the original's ``square_nocrop`` frame. Every
region is returned as an ``[x1, y1, x2, y2]`` pixel box: a point ``[x, y]`` becomes the zero-size box
``[x, y, x, y]`` (IoU 0 with anything, see ``metrics``). Nothing is dropped: an answer without any region
yields an empty list, which the benchmarks score with the zero box and keep in the denominator.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ferret.regions import Box, Point, parse_regions

logger = logging.getLogger(__name__)

__all__ = [
    "CHUNK_FILE",
    "METRICS_SUFFIX",
    "Alignment",
    "AnswerBox",
    "PredictionStream",
    "StreamAlignment",
    "align",
    "answer_boxes",
    "answer_text",
    "decode_segmentation",
    "regions_record",
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


class PredictionStream:
    """The prediction records under ``path`` (a file or a folder of chunk files), read one line at a time.

    Iterating yields the JSON objects in reading order; lines that are not JSON objects are counted in
    ``problems`` by kind (see the module docstring) and skipped. Scorers add their own kinds with ``reject``.
    The first few problems of each kind are logged with file and line.
    """

    LOGGED_PER_KIND = 3

    def __init__(self, source: str | os.PathLike | Iterable[Any]):
        self.records: Iterable[Any] | None = None
        if isinstance(source, (str, os.PathLike)):
            self.files = prediction_files(source)
        else:  # records already in memory (a list of dicts)
            self.files = []
            self.records = source
        self.read = 0
        self.problems: Counter[str] = Counter()

    @classmethod
    def of(cls, predictions: PredictionStream | str | os.PathLike | Iterable[Any]) -> PredictionStream:
        """``predictions`` as a stream: a stream is returned as it is, a path or a list is wrapped."""
        return predictions if isinstance(predictions, PredictionStream) else cls(predictions)

    def reject(self, kind: str, where: str = "", detail: str = "") -> None:
        """Count one unusable prediction of this ``kind`` (logged for the first few of each kind)."""
        self.problems[kind] += 1
        if self.problems[kind] <= self.LOGGED_PER_KIND:
            logger.warning("unusable prediction (%s) %s%s", kind, where, f": {detail}" if detail else "")

    def boxes(self, prediction: Mapping[str, Any], width: int, height: int, where: str) -> list[AnswerBox] | None:
        """``answer_boxes`` of a grounding prediction, or None after counting it as ``no_text`` (no answer) or
        ``bad_regions`` (a malformed stored ``regions`` list)."""
        if "text" not in prediction and "regions" not in prediction:
            self.reject("no_text", where)
            return None
        try:
            return answer_boxes(prediction, width, height)
        except ValueError as exc:
            self.reject("bad_regions", where, str(exc))
            return None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.records is not None:
            for number, record in enumerate(self.records):
                if not isinstance(record, dict):
                    self.reject("not_an_object", f"record #{number}", type(record).__name__)
                    continue
                self.read += 1
                yield record
            return
        for file in self.files:
            with open(file, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        self.reject("invalid_json", f"{file}:{number}", str(exc))
                        continue
                    if not isinstance(record, dict):
                        self.reject("not_an_object", f"{file}:{number}", type(record).__name__)
                        continue
                    self.read += 1
                    yield record

    def report(self) -> dict[str, Any]:
        """``{"read": n, "unparseable": {kind: count}, "unparseable_total": n}`` for a metrics file."""
        return {"read": self.read, "unparseable": dict(sorted(self.problems.items())),
                "unparseable_total": sum(self.problems.values())}


class StreamAlignment:
    """Predictions streamed against ground-truth items by key (the first prediction of a key wins).

    ``pairs(stream, pred_key)`` yields (item, prediction) in prediction order; a prediction whose key cannot be
    read is rejected as ``no_key``. Afterwards ``report()`` gives the counts of ``Alignment.report`` and
    ``missing`` lists the items without a prediction, in ground-truth order.
    """

    def __init__(self, ground_truth: Iterable[Any], gt_key: Callable[[Any], Hashable], what: str = "item"):
        self.items: dict[Hashable, Any] = {}
        for item in ground_truth:
            self.items.setdefault(gt_key(item), item)
        self.what = what
        self.seen: set[Hashable] = set()
        self.unexpected: list[Hashable] = []
        self.duplicates = 0

    def pairs(self, stream: PredictionStream | Iterable[dict[str, Any]],
              pred_key: Callable[[dict[str, Any]], Hashable],
              counter: PredictionStream | None = None) -> Iterator[tuple[Any, dict[str, Any]]]:
        """(item, prediction) pairs; unusable keys are counted in ``counter`` (default: ``stream`` itself when
        it is a PredictionStream), or raise ValueError when there is nothing to count them in."""
        if counter is None and isinstance(stream, PredictionStream):
            counter = stream
        for index, record in enumerate(stream):
            try:
                key = pred_key(record)
                hash(key)
            except (KeyError, TypeError, ValueError) as exc:
                if counter is not None:
                    counter.reject("no_key", f"prediction #{index}", f"{exc!r} in {_short(record)}")
                    continue
                raise ValueError(f"prediction #{index} has no usable key for {self.what} ({exc!r}): "
                                 f"{_short(record)}") from exc
            if key in self.seen:
                self.duplicates += 1
                if self.duplicates == 1:
                    logger.warning("duplicated predictions are ignored (the first of each key is kept)")
                continue
            if key not in self.items:
                self.unexpected.append(key)
                continue
            self.seen.add(key)
            yield self.items[key], record

    @property
    def missing(self) -> list[Hashable]:
        return [key for key in self.items if key not in self.seen]

    def report(self) -> dict[str, Any]:
        missing = self.missing
        if missing:
            logger.warning("%d of %d %ss have no prediction (first: %s)", len(missing), len(self.items), self.what,
                           missing[:5])
        if self.unexpected:
            logger.warning("%d predictions match no %s (first: %s)", len(self.unexpected), self.what,
                           self.unexpected[:5])
        return {"evaluated": len(self.seen), "missing": len(missing), "unexpected": len(self.unexpected),
                "duplicates": self.duplicates, "complete": not missing}


def decode_segmentation(segmentation: Any, width: int, height: int, where: str = "") -> np.ndarray:
    """A COCO segmentation (an RLE dict, or a list of flat polygons) as bool [H, W]
    (``ferret.regions.FreeForm.from_coco_segmentation``: an RLE's declared size is checked against the image before
    it is decoded); ValueError naming ``where``."""
    from ferret.regions import FreeForm

    try:
        return FreeForm.from_coco_segmentation(segmentation, width, height).mask
    except ValueError as err:
        raise ValueError(f"{where}: {err}" if where else str(err)) from None


def answer_text(record: Mapping[str, Any], fields: Sequence[str] = ("text",)) -> str:
    """The answer of a prediction record: the first of ``fields`` present, as a string (KeyError if none)."""
    for name in fields:
        if name in record and record[name] is not None:
            return str(record[name])
    raise KeyError(f"none of the answer fields {list(fields)}")


@dataclass(frozen=True)
class AnswerBox:
    """One region of a model answer as a pixel box (a point is the zero-size box on it)."""

    phrase: str
    box: tuple[float, float, float, float]
    is_point: bool
    mention: int = 0  # which mention of a phrase in the answer it grounds (0, 1, ... in answer order)


def _mention_indices(text: str, phrases: Sequence[str], spans: Sequence[tuple[int, int] | None]) -> list[int]:
    """Per region, the index of the phrase mention it grounds: regions written after one mention ("two dogs
    [..] [..]") share it; a phrase written again ("a girl [..] hands a girl [..]") starts a new mention."""
    indices: list[int] = []
    for k, (phrase, span) in enumerate(zip(phrases, spans)):
        if k == 0:
            indices.append(0)
            continue
        new = normalize_phrase(phrase) != normalize_phrase(phrases[k - 1])
        previous = spans[k - 1]
        if not new and span is not None and previous is not None:
            between = normalize_phrase(text[previous[1]:span[0]])
            new = bool(normalize_phrase(phrase)) and f" {normalize_phrase(phrase)} " in f" {between} "
        indices.append(indices[-1] + 1 if new else indices[-1])
    return indices


def regions_record(grounded: Iterable[Any]) -> list[dict[str, Any]]:
    """``post_process``'s grounded regions (pixels of the user's image) as the answers file stores them."""
    stored = []
    for g in grounded:
        region = g.region
        if isinstance(region, Point):
            stored.append({"phrase": g.phrase, "point": [region.x, region.y], "span": list(g.span)})
        elif isinstance(region, Box):
            stored.append({"phrase": g.phrase, "box": [region.x1, region.y1, region.x2, region.y2],
                           "span": list(g.span)})
        else:
            raise TypeError(f"unexpected region {region!r} from post_process")
    return stored


def _stored_boxes(stored: Any, text: str) -> list[AnswerBox]:
    if not isinstance(stored, list):
        raise ValueError(f"'regions' must be a list, got {type(stored).__name__}")
    found = []
    spans: list[tuple[int, int] | None] = []
    for k, entry in enumerate(stored):
        if not isinstance(entry, dict):
            raise ValueError(f"region {k} is not an object: {_short(entry)}")
        phrase = str(entry.get("phrase", ""))
        if "box" in entry:
            values, is_point = entry["box"], False
        elif "point" in entry:
            values, is_point = entry["point"], True
        else:
            raise ValueError(f"region {k} has neither 'box' nor 'point': {_short(entry)}")
        wanted = 2 if is_point else 4
        if (not isinstance(values, list) or len(values) != wanted
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
            raise ValueError(f"region {k} must hold {wanted} numbers, got {_short(values)}")
        box = tuple(float(v) for v in (values * 2 if is_point else values))
        found.append(AnswerBox(phrase, box, is_point))  # type: ignore[arg-type]
        span = entry.get("span")
        ok = isinstance(span, list) and len(span) == 2 and all(isinstance(v, int) for v in span)
        spans.append(tuple(span) if ok else None)  # type: ignore[arg-type]
    mentions = _mention_indices(text, [b.phrase for b in found], spans)
    return [AnswerBox(b.phrase, b.box, b.is_point, m) for b, m in zip(found, mentions)]


def answer_boxes(text: str | Mapping[str, Any], width: int, height: int) -> list[AnswerBox]:
    """Every point and box of an answer, in order, as ``[x1, y1, x2, y2]`` pixel boxes (see module doc).

    ``text`` is a prediction record (its stored ``regions`` are used when present, else its ``text`` is
    parsed) or the answer text itself. A malformed ``regions`` list raises ValueError.
    """
    if isinstance(text, Mapping):
        if text.get("regions") is not None:
            return _stored_boxes(text["regions"], str(text.get("text") or ""))
        text = answer_text(text)
    found = []
    grounded_all = parse_regions(text, int(width), int(height))
    mentions = _mention_indices(text, [g.phrase for g in grounded_all], [g.span for g in grounded_all])
    for grounded, mention in zip(grounded_all, mentions):
        region = grounded.region
        if isinstance(region, Point):
            found.append(AnswerBox(grounded.phrase, (region.x, region.y, region.x, region.y), True, mention))
        elif isinstance(region, Box):
            found.append(AnswerBox(grounded.phrase, (region.x1, region.y1, region.x2, region.y2), False, mention))
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
