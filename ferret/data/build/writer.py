"""Writing the built set: sharded GRIT files, the training mix beside them, and the report.

Layout of ``OUT``::

    OUT/data/{tag}_{source}_{nnnnn}.json   JSON lists of GRIT records; the name starts with the loader tag
                                            (vg_object, vg_relation, refexp, flickr, objects365, ...) that routes it
    OUT/train_mix.json                      {"data_path": [...], "image_folder": [...], "data_multiple": [...]}:
                                            `python -m ferret.train.train --config OUT/train_mix.json ...`
    OUT/train_mix.args                      the same as launch-script flags (--data_path ... --data_multiple ...)
    OUT/validate.args                       files and --image-folder flags for `ferret data validate`
    OUT/build_report.json, build_report.txt records per task kind and source, dropped records and why, speed

Each shard is written to ``*.partial`` and renamed when complete; earlier shards of the same stem are removed
first, so a rebuild never leaves stale shards in the mix.
"""

from __future__ import annotations

import glob
import json
import os
import resource
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

# The recipe's mixing weights per loader tag (Ferret-7B/13B launch scripts); tags the recipe does not use get 1.
RECIPE_WEIGHTS = {"git_instruction": 3.0, "vg_object": 1.0, "vg_relation": 0.2, "vg_region": 0.2,
                  "grounded_llava_boxes": 1.0, "refexp": 1.0, "flickr": 1.0, "objects365": 1.0}


class ShardWriter:
    """Writes records to ``{folder}/{stem}_{n:05d}.json``, ``shard_size`` records per file, streaming."""

    def __init__(self, folder: str, stem: str, shard_size: int):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        os.makedirs(folder, exist_ok=True)
        self.folder, self.stem, self.shard_size = folder, stem, int(shard_size)
        for old in glob.glob(os.path.join(glob.escape(folder), f"{glob.escape(stem)}_[0-9][0-9][0-9][0-9][0-9].json")):
            os.remove(old)
        self.paths: list[str] = []
        self.records = 0
        self._file = None
        self._in_shard = 0

    def write(self, record: dict) -> None:
        if self._file is None or self._in_shard >= self.shard_size:
            self._finish()
            path = os.path.join(self.folder, f"{self.stem}_{len(self.paths):05d}.json")
            self.paths.append(path)
            self._file = open(path + ".partial", "w", encoding="utf-8")
            self._file.write("[\n")
            self._in_shard = 0
        if self._in_shard:
            self._file.write(",\n")
        self._file.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")))
        self._in_shard += 1
        self.records += 1

    def _finish(self) -> None:
        if self._file is not None:
            self._file.write("\n]\n")
            self._file.close()
            os.replace(self.paths[-1] + ".partial", self.paths[-1])
            self._file = None

    def close(self) -> list[str]:
        self._finish()
        return self.paths


@dataclass
class SourceReport:
    """What one source contributed."""

    source: str
    label: str = ""  # the output file names' part after the loader tag (default: the source name)
    images_seen: int = 0
    images_used: int = 0
    records: Counter = field(default_factory=Counter)  # per task kind
    dropped: Counter = field(default_factory=Counter)  # reason -> annotations / images / records left out
    eval_leaks: Counter = field(default_factory=Counter)  # reason -> images left out as evaluation images
    counts: Counter = field(default_factory=Counter)  # qa, negative_qa, form:* ...
    seconds: float = 0.0
    units: int = 0  # annotations read (regions, objects, ...), for the speed figure


class Report:
    def __init__(self) -> None:
        self.sources: dict[str, SourceReport] = {}
        self.outputs: list[dict[str, Any]] = []
        self.started = time.time()

    def source(self, name: str, label: str = "") -> SourceReport:
        return self.sources.setdefault(name, SourceReport(name, label or name))

    def to_dict(self) -> dict[str, Any]:
        per_kind: Counter = Counter()
        for s in self.sources.values():
            per_kind.update(s.records)
        elapsed = time.time() - self.started
        total = sum(per_kind.values())
        return {
            "records": total,
            "records_per_task_kind": dict(sorted(per_kind.items())),
            "sources": {
                name: {"images_seen": s.images_seen, "images_used": s.images_used,
                       "records_per_task_kind": dict(sorted(s.records.items())),
                       "dropped": dict(sorted(s.dropped.items())),
                       "evaluation_images_left_out": dict(sorted(s.eval_leaks.items())),
                       "counts": dict(sorted(s.counts.items())),
                       "seconds": round(s.seconds, 2), "annotations_read": s.units,
                       "records_per_second": round(sum(s.records.values()) / s.seconds, 1) if s.seconds else None}
                for name, s in self.sources.items()
            },
            "outputs": self.outputs,
            "seconds": round(elapsed, 2),
            "records_per_second": round(total / elapsed, 1) if elapsed else None,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }

    def text(self) -> str:
        d = self.to_dict()
        lines = [f"{d['records']} records in {d['seconds']} s ({d['records_per_second']} records/s), "
                 f"peak RSS {d['peak_rss_mb']} MB"]
        lines.append("records per task kind: " + ", ".join(f"{k}={v}" for k, v in d["records_per_task_kind"].items()))
        for name, s in d["sources"].items():
            lines.append(f"[{name}] images: {s['images_seen']} seen, {s['images_used']} used; records: "
                         + (", ".join(f"{k}={v}" for k, v in s["records_per_task_kind"].items()) or "none"))
            if s["evaluation_images_left_out"]:
                lines.append(f"[{name}] evaluation images left out: "
                             + ", ".join(f"{k}={v}" for k, v in s["evaluation_images_left_out"].items()))
            if s["dropped"]:
                lines.append(f"[{name}] dropped: " + ", ".join(f"{k}={v}" for k, v in s["dropped"].items()))
        for o in self.outputs:
            records = "?" if o["records"] is None else o["records"]
            lines.append(f"  {o['tag']:<16} x{o['data_multiple']:<4} {records:>9} records  {o['path']}")
        return "\n".join(lines)


def write_mix(out: str, outputs: list[dict[str, Any]]) -> None:
    """train_mix.json / train_mix.args / validate.args for the shards in ``outputs``
    (dicts with path, image_folder, data_multiple)."""
    paths = [os.path.abspath(o["path"]) for o in outputs]
    folders = [os.path.abspath(o["image_folder"]) for o in outputs]
    weights = [o["data_multiple"] for o in outputs]
    with open(os.path.join(out, "train_mix.json"), "w") as f:
        json.dump({"data_path": paths, "image_folder": folders, "data_multiple": weights}, f, indent=1)
    with open(os.path.join(out, "train_mix.args"), "w") as f:
        f.write(" ".join(["--data_path", *paths, "--image_folder", *folders,
                          "--data_multiple", *(f"{w:g}" for w in weights)]) + "\n")
    with open(os.path.join(out, "validate.args"), "w") as f:
        f.write(" ".join([*paths, *(w for p in folders for w in ("--image-folder", p))]) + "\n")
