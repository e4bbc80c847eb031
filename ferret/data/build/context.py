"""The state one build shares across sources: options, evaluation images, output shards, the report.

``emit`` is the one way a reader hands over records: each is checked with ``ferret.data.grit.check_record``
(the loaders' own rule) before it is written, so a record the loaders would skip is never written; such a record
would be a builder bug and is counted under ``dropped: failed_check``.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

from ferret.data.build.common import BuildOptions, Draws, ImageRef, QA, pack
from ferret.data.build.leaks import EvalImages
from ferret.data.build.writer import RECIPE_WEIGHTS, Report, ShardWriter, SourceReport, write_mix

# task kind -> the loader tag its file names start with (ferret.data.grit routes files by these substrings)
TASK_TAGS = {
    "vg_objects": "vg_object", "vg_yesno_objects": "vg_yesno_object", "vg_attributes": "vg_attribute",
    "vg_relations": "vg_relation", "vg_regions": "vg_region", "refexp": "refexp", "flickr": "flickr",
    "objects365": "objects365", "coco_objects": "grit", "lvis_objects": "grit", "git_instruction": "git_instruction",
}


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "source"


@dataclass
class BuildContext:
    out: str
    options: BuildOptions = field(default_factory=BuildOptions)
    eval_images: EvalImages = field(default_factory=EvalImages)
    tasks: set[str] = field(default_factory=lambda: set(TASK_TAGS))
    shard_size: int = 20000
    check_images: bool = True
    show_progress: bool = True
    max_images: int = 0  # per source, 0 = all
    keep_eval_images: bool = False

    def __post_init__(self) -> None:
        self.report = Report()
        self.data_dir = os.path.join(self.out, "data")
        self.tmp_dir = os.path.join(self.out, ".tmp")
        self._writers: dict[tuple[str, str], tuple[ShardWriter, str, str]] = {}
        self._image_exists: dict[str, bool] = {}
        self.extra_outputs: list[dict] = []  # shards of other builds to list in the mix (--merge-mix)
        os.makedirs(self.data_dir, exist_ok=True)
        for name in os.listdir(self.data_dir):  # data/ belongs to the build: no shard of an earlier build stays
            if name.endswith((".json", ".json.partial")):
                os.remove(os.path.join(self.data_dir, name))

    # -- images
    def eval_reason(self, coco_id=None, flickr_id=None) -> str | None:
        if self.keep_eval_images:
            return None
        return self.eval_images.coco_reason(coco_id) or self.eval_images.flickr_reason(flickr_id)

    def image_missing(self, folder: str, path: str) -> bool:
        """Whether the image file is absent (never, when image checks are off); cached per file."""
        if not self.check_images:
            return False
        full = os.path.join(folder, path)
        if full not in self._image_exists:
            self._image_exists[full] = os.path.isfile(full)
        return not self._image_exists[full]

    def accept_image(self, source: SourceReport, folder: str, image: ImageRef, coco_id=None, flickr_id=None,
                     eval_reason: str | None = None) -> bool:
        """Counts the image and says whether records may be built from it (not an evaluation image, file present)."""
        source.images_seen += 1
        reason = eval_reason if not self.keep_eval_images else None
        reason = reason or self.eval_reason(coco_id, flickr_id)
        if reason:
            source.eval_leaks[reason] += 1
            return False
        if self.image_missing(folder, image.path):
            source.dropped["image_file_missing"] += 1
            return False
        return True

    def draws(self, kind: str, key: Any) -> Draws:
        return Draws(self.options, kind, key)

    def done(self, source: SourceReport) -> bool:
        """Whether ``max_images`` images of this source were used."""
        return bool(self.max_images) and source.images_used >= self.max_images

    # -- records
    def emit(self, kind: str, source: SourceReport, image_folder: str, image: ImageRef, key: Any,
             qas: list[QA], draws: Draws) -> int:
        """Packs ``qas`` into records, checks and writes them; returns how many were written."""
        from ferret.data.grit import DATASET_TYPES, check_record

        if not qas:
            return 0
        tag = TASK_TAGS[kind]
        records = pack(qas, image, kind, key, draws, source.counts)
        writer = self._writer(kind, source.label or source.source, image_folder)
        written = 0
        for record in records:
            problems = check_record(record, DATASET_TYPES[tag]).problems
            if problems:
                source.dropped["failed_check"] += 1
                source.dropped[f"failed_check:{problems[0].reason}"] += 1
                continue
            writer.write(record)
            written += 1
        source.records[kind] += written
        return written

    def _writer(self, kind: str, source: str, image_folder: str) -> ShardWriter:
        key = (kind, source)
        if key not in self._writers:
            tag = TASK_TAGS[kind]
            stem = f"{tag}_{slug(source)}"
            self._writers[key] = (ShardWriter(self.data_dir, stem, self.shard_size), tag, image_folder)
        return self._writers[key][0]

    def timed(self, source: SourceReport):
        return _Timer(source)

    def finish(self) -> dict:
        """Closes every shard, writes the training mix and the report; returns the report dict."""
        for (kind, source), (writer, tag, folder) in sorted(self._writers.items()):
            paths = writer.close()
            for path in paths:
                with open(path, "rb") as f:
                    count = sum(1 for line in f if line.startswith(b"{"))
                self.report.outputs.append({"path": path, "kind": kind, "tag": tag, "source": source,
                                            "image_folder": folder, "records": count,
                                            "data_multiple": RECIPE_WEIGHTS.get(tag, 1.0)})
        self.report.outputs.extend(self.extra_outputs)
        write_mix(self.out, self.report.outputs)
        report = self.report.to_dict()
        report["evaluation_images"] = self.eval_images.summary() if not self.keep_eval_images else "kept"
        report["options"] = dict(vars(self.options))
        with open(os.path.join(self.out, "build_report.json"), "w") as f:
            json.dump(report, f, indent=1, default=str)
        with open(os.path.join(self.out, "build_report.txt"), "w") as f:
            f.write(self.report.text() + "\n")
        if os.path.isdir(self.tmp_dir) and not os.listdir(self.tmp_dir):
            os.rmdir(self.tmp_dir)
        return report


class _Timer:
    def __init__(self, source: SourceReport):
        self.source = source

    def __enter__(self):
        self.start = time.time()
        return self.source

    def __exit__(self, *exc):
        self.source.seconds += time.time() - self.start
        return False

