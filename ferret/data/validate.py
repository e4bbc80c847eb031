"""Check GRIT-format data files before training: every record, every problem, and a summary.

    python -m ferret.data.validate FILE... [--image-folder DIR ...] [--dataset-type T ...] [--no-region-feature] [--json]
    ferret data validate ...              (the same, through the `ferret` command)

Each record goes through ``ferret.data.grit.check_record`` — the function ``GritDataset`` uses to decide that a
record is bad and skip it — after its image is read with ``grit.read_image`` (missing or undecodable images).
Errors (the record would be skipped in training) and warnings (it trains, but look at it) are printed one per line
as ``FILE:INDEX id=ID error|warning [reason] message``; INDEX is the record's position in the file (JSON lines
count non-blank lines) and ``-`` for problems with the whole file. The summary counts records, ok records, and
bad records (files, for file-level problems) per reason. The exit code is 1 when anything is an error.

``--image-folder`` and ``--dataset-type`` take one value per FILE, or one for all; without them images are
relative to each file's folder and the type comes from the file name (grit.infer_dataset_type).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ferret.flags import add_region_feature_argument, program_name

if TYPE_CHECKING:  # the grit module loads torch; it is imported where it is used, so --help stays fast
    from ferret.data.grit import Problem


@dataclass
class Finding:
    """One problem: where (file, record index or None for the file, record id) and what."""

    file: str
    index: int | None
    record_id: Any
    reason: str
    severity: str
    message: str
    turn: int | None = None

    def line(self) -> str:
        index = "-" if self.index is None else str(self.index)
        rid = "" if self.record_id is None else f" id={self.record_id}"
        return f"{self.file}:{index}{rid} {self.severity} [{self.reason}] {self.message}"


@dataclass
class Report:
    """Findings and counts over all files checked."""

    files: int = 0
    records: int = 0
    ok: int = 0
    bad: int = 0
    errors_by_reason: Counter = field(default_factory=Counter)  # bad records (or files) per reason
    warnings_by_reason: Counter = field(default_factory=Counter)  # records with that warning
    findings: list[Finding] = field(default_factory=list)

    @property
    def has_errors(self) -> bool:
        return any(f.severity == "error" for f in self.findings)

    @property
    def exit_code(self) -> int:
        return 1 if self.has_errors else 0

    def summary(self) -> str:
        lines = [f"{self.files} file(s), {self.records} record(s): {self.ok} ok, {self.bad} bad"]
        for title, counts in (("errors", self.errors_by_reason), ("warnings", self.warnings_by_reason)):
            if counts:
                lines.append(f"{title} by reason: " + ", ".join(f"{r}={n}" for r, n in sorted(counts.items())))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "records": self.records,
            "ok": self.ok,
            "bad": self.bad,
            "errors_by_reason": dict(sorted(self.errors_by_reason.items())),
            "warnings_by_reason": dict(sorted(self.warnings_by_reason.items())),
            "findings": [asdict(f) for f in self.findings],
        }


def _read_file(path: str) -> tuple[list[tuple[Any, Problem | None]], Problem | None]:
    """The records of a file as (record, parse problem) pairs, or a file-level problem. Reads them exactly as
    ``GritDataset`` does (``grit.read_record_blobs`` + ``grit.parse_record``)."""
    from ferret.data.grit import Problem, RecordError, parse_record, read_record_blobs

    if not os.path.isfile(path):
        return [], Problem("missing_file", f"data file {path} does not exist")
    try:
        blobs = read_record_blobs(path)
    except RecordError as err:
        return [], Problem(err.reason, str(err))
    out: list[tuple[Any, Problem | None]] = []
    for blob in blobs:
        try:
            out.append((parse_record(blob), None))
        except RecordError as err:
            out.append((None, Problem(err.reason, str(err))))
    return out, None


def validate_file(path: str, image_folder: str | None = None, dataset_type: str | None = None,
                  report: Report | None = None, image_cache: dict | None = None,
                  region_feature: bool = True) -> Report:
    """Check every record of one data file; findings and counts are added to ``report`` (a new one by default).

    ``region_feature``: human regions are read as ``<region_fea>`` features (training's --add_region_feature).
    """
    from ferret.data.grit import DATASET_TYPES, Problem, check_record, image_path, resolve_dataset_type

    report = report if report is not None else Report()
    image_cache = image_cache if image_cache is not None else {}
    path = os.fspath(path)
    folder = image_folder or os.path.dirname(os.path.abspath(path))
    report.files += 1

    def file_problem(problem: Problem) -> None:
        report.findings.append(Finding(path, None, None, problem.reason, problem.severity, problem.message))
        report.errors_by_reason[problem.reason] += 1

    try:
        dtype = resolve_dataset_type(path, dataset_type)
    except ValueError as err:
        file_problem(Problem("unknown_dataset_type", f"{err} (checked as 'grit')"))
        dtype = DATASET_TYPES["grit"]
    records, problem = _read_file(path)
    if problem is not None:
        file_problem(problem)
        return report

    for index, (record, parse_problem) in enumerate(records):
        problems = [parse_problem] if parse_problem is not None else []
        image_size = None
        if parse_problem is None:
            if isinstance(record, dict) and isinstance(record.get("image"), str) and record["image"]:
                image_size = _image_size(image_path(folder, record["image"]), image_cache, problems)
            try:
                problems.extend(check_record(record, dtype, image_size, region_feature).problems)
            except (TypeError, KeyError, IndexError, AttributeError, RecursionError) as err:
                problems.append(Problem("malformed_record", f"{type(err).__name__}: {err}"))
        record_id = record.get("id") if isinstance(record, dict) else None
        report.records += 1
        errors = {p.reason for p in problems if p.severity == "error"}
        warnings = {p.reason for p in problems if p.severity == "warning"}
        report.bad += bool(errors)
        report.ok += not errors
        report.errors_by_reason.update(errors)
        report.warnings_by_reason.update(warnings)
        for p in problems:
            report.findings.append(Finding(path, index, record_id, p.reason, p.severity, p.message, p.turn))
    return report


def _image_size(path: str, cache: dict, problems: list[Problem]) -> tuple[int, int] | None:
    """(W, H) of the image (read once per path), or None with the problem added."""
    from ferret.data.grit import Problem, RecordError, read_image

    if path not in cache:
        try:
            cache[path] = read_image(path).size
        except RecordError as err:
            cache[path] = err
    found = cache[path]
    if isinstance(found, RecordError):
        problems.append(Problem(found.reason, str(found)))
        return None
    return found


def validate(paths: Sequence[str], image_folders: Sequence[str] | None = None,
             dataset_types: Sequence[str] | None = None, region_feature: bool = True) -> Report:
    """Check several files (image folders and types: one per file, one for all, or None)."""
    folders = _per_file(image_folders, len(paths), "--image-folder")
    types = _per_file(dataset_types, len(paths), "--dataset-type")
    report = Report()
    cache: dict = {}
    for path, folder, dtype in zip(paths, folders, types):
        validate_file(path, folder, dtype, report, cache, region_feature)
    return report


def _per_file(values: Sequence[str] | None, n: int, flag: str) -> list[str | None]:
    if not values:
        return [None] * n
    if len(values) == 1:
        return list(values) * n
    if len(values) != n:
        raise ValueError(f"{flag} was given {len(values)} times for {n} file(s); give it once or once per file")
    return list(values)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=program_name("ferret.data.validate"),
        description="Check GRIT-format data files: every record, every problem, then a summary. "
        "Exit code 1 when anything is an error.",
    )
    parser.add_argument("files", nargs="+", help="JSON list (or .jsonl) data files")
    parser.add_argument("--image-folder", action="append", default=None,
                        help="folder the images of a file are relative to (once per file, or once for all; "
                        "default: the file's folder)")
    parser.add_argument("--dataset-type", action="append", default=None,
                        help="dataset type: grit, vg_object, refexp, ... or auto (once per file, or once for all; "
                        "default: from the file name)")
    add_region_feature_argument(parser)
    parser.epilog = ("--no-region-feature: check for training with region features off (regions as coordinates "
                     "only; a record without an image may then refer to regions)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (summary and findings)")
    args = parser.parse_args(argv)
    from ferret.data.grit import DATASET_TYPES

    unknown = sorted(set(args.dataset_type or ()) - set(DATASET_TYPES) - {"auto"})
    if unknown:
        parser.error(f"--dataset-type: unknown {', '.join(map(repr, unknown))} (known: "
                     f"{', '.join(list(DATASET_TYPES) + ['auto'])})")
    try:
        report = validate(args.files, args.image_folder, args.dataset_type, args.region_feature)
    except ValueError as err:
        parser.error(str(err))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        for finding in report.findings:
            print(finding.line())
        print(report.summary())
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
