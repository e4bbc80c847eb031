"""Reading large JSON inputs in bounded memory.

* ``iter_items``: the items under one JSON path (e.g. ``"item"`` of a top-level list, ``"annotations.item"`` of a
  COCO file), parsed incrementally with ijson's C backend; a progress bar follows the bytes read.
* ``Buckets``: group items by image id when a file is not ordered by image (COCO-style ``annotations``): items
  are appended as JSON lines to one of N temporary files chosen by image id, then each file is read back alone and
  grouped. Memory holds one bucket, i.e. about (input size / N); ``bucket_count`` picks N from the input size.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from ferret.data.build.common import BuildError

BUCKET_BYTES = 48 << 20  # aim for ~48 MB of compacted JSON per bucket


def progress(total: int | None, desc: str, enabled: bool, unit: str = "B"):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=not enabled, leave=False,
                mininterval=1.0, dynamic_ncols=True)


def iter_items(path: str, prefix: str, desc: str = "", show: bool = True) -> Iterator[dict]:
    """The JSON objects under ``prefix`` in ``path``, one at a time (numbers as int/float).

    ``prefix`` ``"item"`` reads a top-level list, ``"images.item"`` the list under a top-level key. BuildError
    names the file when it is not valid JSON, its top level is not what the prefix needs (a list, or an object),
    or an item is not a JSON object.
    """
    import ijson

    if not os.path.isfile(path):
        raise BuildError(f"{path}: file not found")
    with open(path, "rb") as f, progress(os.path.getsize(path), desc or os.path.basename(path), show) as bar:
        start = f.read(64).lstrip()[:1]
        expected = b"[" if prefix.split(".")[0] == "item" else b"{"
        if start != expected:
            what = "a JSON list" if expected == b"[" else "a JSON object"
            raise BuildError(f"{path}: expected {what} at the top level (to read '{prefix}'), "
                             f"found {start.decode('latin-1') or 'nothing'!r}")
        f.seek(0)
        seen = 0
        try:
            for index, item in enumerate(ijson.items(f, prefix, use_float=True)):
                position = f.tell()
                if position != seen:
                    bar.update(position - seen)
                    seen = position
                if not isinstance(item, dict):
                    raise BuildError(f"{path}: item {index} of '{prefix}' is a {type(item).__name__}, "
                                     "expected a JSON object")
                yield item
        except ijson.JSONError as err:
            raise BuildError(f"{path}: not valid JSON near byte {f.tell()} ({err})") from err


MAX_BUCKETS = 900  # all bucket files stay open while they fill; keep under the usual 1024 descriptors


def bucket_count(total_bytes: int, bucket_bytes: int = BUCKET_BYTES) -> int:
    """Buckets for an input of ``total_bytes`` so that each holds about ``bucket_bytes`` (at most MAX_BUCKETS:
    beyond ~43 GB of input a bucket grows past ``bucket_bytes``)."""
    return min(MAX_BUCKETS, max(1, -(-int(total_bytes) // int(bucket_bytes))))


class Buckets:
    """Items keyed by an integer image id, spread over ``count`` JSON-lines files in ``folder``."""

    def __init__(self, folder: str, count: int):
        os.makedirs(folder, exist_ok=True)
        self.folder, self.count = folder, int(count)
        self._files: dict[int, Any] = {}

    def _path(self, i: int) -> str:
        return os.path.join(self.folder, f"bucket_{i:05d}.jsonl")

    def add(self, key: int, tag: str, item: Any) -> None:
        i = hash(int(key)) % self.count
        f = self._files.get(i)
        if f is None:
            f = self._files[i] = open(self._path(i), "a", encoding="utf-8")
        f.write(json.dumps([int(key), tag, item], separators=(",", ":")))
        f.write("\n")

    def groups(self) -> Iterator[tuple[int, dict[str, list]]]:
        """(key, {tag: [items in the order added]}) for every key, bucket by bucket; deletes each bucket read."""
        for f in self._files.values():
            f.close()
        self._files.clear()
        for i in range(self.count):
            path = self._path(i)
            if not os.path.exists(path):
                continue
            grouped: dict[int, dict[str, list]] = {}
            with open(path, encoding="utf-8") as f:
                for line in f:
                    key, tag, item = json.loads(line)
                    grouped.setdefault(key, {}).setdefault(tag, []).append(item)
            os.remove(path)
            yield from grouped.items()

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        for i in range(self.count):
            if os.path.exists(self._path(i)):
                os.remove(self._path(i))
