"""Checkpoint folders on disk, read and written one tensor at a time.

This module owns the on-disk layout of a model checkpoint and the machinery the weight tools
(`apply_delta`, `make_delta`, `consolidate`, `extract`, `verify`) share:

* `CheckpointReader`: a lazy view of a checkpoint folder (safetensors single or sharded with
  `model.safetensors.index.json`, or `pytorch_model.bin` single or sharded with `pytorch_model.bin.index.json`,
  or one bare `.safetensors` / `.bin` file). Names, shapes and dtypes are known up front; tensor data is read one
  tensor at a time and file mappings are dropped soon after, so the resident memory of a pass over a whole model
  stays at a few tensors (a mapping kept open for a whole shard would keep every page it touched resident).
* `ShardedSafetensorsWriter`: streams tensors into safetensors shards whose layout is planned up front from the
  tensor specs, so a shard is never held in memory; writes `model.safetensors.index.json` when there is more
  than one shard (the Hugging Face convention: a single shard is just `model.safetensors`).
* `atomic_output_dir` / `atomic_output_file`: write into a temporary sibling and rename into place at the end;
  a failed or interrupted run leaves neither the target nor partial files.
* `copy_side_files` / `copy_vision_tower`: config, tokenizer and processor files, and an optional CLIP folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import struct
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
VISION_TOWER_DIR = "vision_tower"
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # "5GB", as transformers' save_pretrained

# Everything a model folder needs besides the weights.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
)

_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_SAFETENSORS_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}

_DTYPE_ALIASES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float64": torch.float64,
    "fp64": torch.float64,
}

_SIZE_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}


# .bin shards stay memory-mapped until this much has been read through the mappings (see CheckpointReader.get).
_REMAP_AFTER_BYTES = 256 * 2**20


class CheckpointError(ValueError):
    """A checkpoint folder is missing, malformed, or not what an operation expects."""


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one stored tensor (its data is not loaded)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def __str__(self) -> str:
        return f"{self.name} {list(self.shape)} {str(self.dtype).removeprefix('torch.')}"


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000, '500MiB' -> 524_288_000, 1024 -> 1024 (decimal units as transformers)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", text.upper())
    if not match:
        raise ValueError(f"cannot read the size {text!r}; expected e.g. 5GB, 500MB, 2GiB or a number of bytes")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2) or ""])


def parse_dtype(text: str | torch.dtype | None) -> torch.dtype | None:
    """'fp16' / 'float16' / 'bf16' / 'float32' ... -> torch dtype; None stays None."""
    if text is None or isinstance(text, torch.dtype):
        return text
    key = text.lower().removeprefix("torch.")
    if key not in _DTYPE_ALIASES:
        raise ValueError(f"unknown dtype {text!r}; expected one of {sorted(_DTYPE_ALIASES)}")
    return _DTYPE_ALIASES[key]


# --------------------------------------------------------------------------------------------------------------
# Reading


def _load_bin_mapped(file: Path) -> dict[str, torch.Tensor]:
    """A .bin state dict whose tensors are views of a memory mapping of `file` (no data read yet)."""
    try:
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
        raise CheckpointError(
            f"{file} was written in torch's legacy (pre-1.6, non-zip) format, which cannot be read lazily; "
            "re-save it with a recent torch first"
        ) from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} holds a {type(state).__name__}, expected a state dict of tensors")
    return state


class CheckpointReader:
    """Lazy, read-only view of the tensors of one checkpoint.

    `path` is a folder holding (first found wins) `model.safetensors.index.json`, `model.safetensors`,
    `pytorch_model.bin.index.json` or `pytorch_model.bin`; or a single `.safetensors` / `.bin` / `.pt` file.
    `names` lists tensors in file order; `spec(name)` gives shape and dtype without reading data;
    `get(name)` returns one tensor that the caller owns (and may modify). No safetensors mapping outlives the
    tensor read through it; .bin shards stay mapped for up to 256 MiB of reads (re-reading a pickle is slow),
    so at most about that much of them is resident besides the tensors returned. `close()` drops those mappings.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._mapped: dict[Path, dict[str, torch.Tensor]] = {}
        self._mapped_bytes = 0
        self.format, files = self._locate()
        self._file_of: dict[str, Path] = {}
        self._specs: dict[str, TensorSpec] = {}
        for file, expected in files.items():
            for spec in self._read_specs(file):
                if spec.name in self._specs:
                    raise CheckpointError(
                        f"tensor {spec.name} is stored twice in {self.path}: in {self._file_of[spec.name].name} "
                        f"and in {file.name}"
                    )
                self._specs[spec.name] = spec
                self._file_of[spec.name] = file
            if expected is not None:
                missing = sorted(expected - {n for n, f in self._file_of.items() if f == file})
                if missing:
                    raise CheckpointError(
                        f"the index of {self.path} puts tensor {missing[0]} in {file.name}, which does not hold it"
                        + (f" ({len(missing) - 1} more missing)" if len(missing) > 1 else "")
                    )

    def _locate(self) -> tuple[str, dict[Path, set[str] | None]]:
        """(format, {file: names the index expects there, or None without an index})."""
        path = self.path
        if path.is_file():
            fmt = "safetensors" if path.suffix == ".safetensors" else "bin"
            return fmt, {path: None}
        if not path.is_dir():
            raise CheckpointError(f"checkpoint {path} does not exist")
        for index_name, single_name, fmt in (
            (SAFETENSORS_INDEX_NAME, SAFETENSORS_NAME, "safetensors"),
            (BIN_INDEX_NAME, BIN_NAME, "bin"),
        ):
            index_file = path / index_name
            if index_file.is_file():
                try:
                    weight_map = json.loads(index_file.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise CheckpointError(f"{index_file} is not a valid index (needs a 'weight_map'): {err}") from err
                files: dict[Path, set[str] | None] = {}
                for name, file_name in weight_map.items():
                    files.setdefault(path / file_name, set()).add(name)  # type: ignore[union-attr]
                for file in files:
                    if not file.is_file():
                        raise CheckpointError(f"the index of {path} names the shard {file.name}, which is missing")
                return fmt, dict(sorted(files.items()))
            if (path / single_name).is_file():
                return fmt, {path / single_name: None}
        raise CheckpointError(
            f"no weights in {path}: expected {SAFETENSORS_INDEX_NAME}, {SAFETENSORS_NAME}, {BIN_INDEX_NAME} "
            f"or {BIN_NAME}"
        )

    def _read_specs(self, file: Path) -> list[TensorSpec]:
        if self.format == "safetensors":
            specs = []
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    view = f.get_slice(name)
                    dtype_name = view.get_dtype()
                    if dtype_name not in _SAFETENSORS_DTYPES:
                        raise CheckpointError(f"tensor {name} in {file} has the unsupported dtype {dtype_name}")
                    specs.append(TensorSpec(name, tuple(view.get_shape()), _SAFETENSORS_DTYPES[dtype_name]))
            return specs
        state = self._mapped[file] = _load_bin_mapped(file)  # kept for the first reads; nothing is resident yet
        specs = [
            TensorSpec(name, tuple(t.shape), t.dtype) for name, t in state.items() if isinstance(t, torch.Tensor)
        ]
        skipped = [name for name, t in state.items() if not isinstance(t, torch.Tensor)]
        if skipped:
            logger.warning("%s: ignoring %d entries that are not tensors (e.g. %s)", file, len(skipped), skipped[0])
        return specs

    @property
    def names(self) -> list[str]:
        return list(self._specs)

    @property
    def specs(self) -> list[TensorSpec]:
        return list(self._specs.values())

    @property
    def total_bytes(self) -> int:
        return sum(spec.nbytes for spec in self._specs.values())

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __len__(self) -> int:
        return len(self._specs)

    def spec(self, name: str) -> TensorSpec:
        if name not in self._specs:
            raise KeyError(f"tensor {name} is not in {self.path}")
        return self._specs[name]

    def get(self, name: str) -> torch.Tensor:
        """Tensor `name` as stored (contiguous); the caller may modify it in place without affecting the file."""
        file = self._file_of[self.spec(name).name]
        if self.format == "safetensors":
            # Depending on the safetensors version the tensor is a copy or sits on a private copy-on-write mapping
            # of the file that lives exactly as long as the tensor; either way writing to it never touches the file.
            with safe_open(file, framework="pt", device="cpu") as f:
                return f.get_tensor(name)
        # Re-reading a .bin's pickle costs ~0.1 s, so a mapping serves several reads; the mappings are dropped
        # (and with them the pages those reads made resident) once _REMAP_AFTER_BYTES have been read through them.
        if self._mapped_bytes >= _REMAP_AFTER_BYTES:
            self.close()
        if file not in self._mapped:
            self._mapped[file] = _load_bin_mapped(file)
        tensor = self._mapped[file][name].clone(memory_format=torch.contiguous_format)
        self._mapped_bytes += tensor.nbytes
        return tensor

    def close(self) -> None:
        """Drop the open file mappings (later reads reopen them)."""
        self._mapped.clear()
        self._mapped_bytes = 0

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def iter_tensors(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) one at a time, in file order unless `names` is given."""
        for name in self.names if names is None else names:
            yield name, self.get(name)


# --------------------------------------------------------------------------------------------------------------
# Writing


def shard_file_names(num_shards: int) -> list[str]:
    if num_shards == 1:
        return [SAFETENSORS_NAME]
    return [f"model-{i:05d}-of-{num_shards:05d}.safetensors" for i in range(1, num_shards + 1)]


def plan_shards(specs: Sequence[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """Split `specs` (kept in order) into shards of at most `max_shard_size` bytes of tensor data.

    A tensor larger than the limit gets a shard of its own, as in transformers.
    """
    if max_shard_size <= 0:
        raise ValueError(f"max_shard_size must be positive, got {max_shard_size}")
    shards: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    size = 0
    for spec in specs:
        if current and size + spec.nbytes > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += spec.nbytes
    if current or not shards:
        shards.append(current)
    return shards


def _safetensors_header(specs: Sequence[TensorSpec], metadata: dict[str, str]) -> bytes:
    """The length-prefixed JSON header of a safetensors file holding `specs` back to back in this order."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for spec in specs:
        if spec.dtype not in _SAFETENSORS_NAMES:
            raise CheckpointError(f"tensor {spec} has a dtype safetensors cannot store")
        header[spec.name] = {
            "dtype": _SAFETENSORS_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned, as safetensors itself writes it
    return struct.pack("<Q", len(text)) + text


class ShardedSafetensorsWriter:
    """Stream tensors into `folder` as safetensors shards, holding no more than the tensor being written.

    The shard layout is planned from `specs` up front; `write` must then receive exactly those tensors in that
    order. `close()` checks that every tensor was written and writes `model.safetensors.index.json` (metadata
    `total_size`, `weight_map`) when there are several shards. Each shard carries metadata {"format": "pt"}.
    Files are fsynced; `folder` is meant to be the temporary folder of `atomic_output_dir`.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        specs: Sequence[TensorSpec],
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
        metadata: dict[str, str] | None = None,
    ):
        if sys.byteorder != "little":
            raise NotImplementedError("safetensors is little-endian; writing it on a big-endian host is not supported")
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            duplicate = next(n for n in names if names.count(n) > 1)
            raise CheckpointError(f"tensor {duplicate} is listed twice")
        self.folder = Path(folder)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shards = plan_shards(specs, parse_size(max_shard_size))
        self.file_names = shard_file_names(len(self.shards))
        self._queue = [(shard_index, spec) for shard_index, shard in enumerate(self.shards) for spec in shard]
        self._position = 0
        self._file = None
        self._file_shard = -1

    def __enter__(self) -> ShardedSafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._file is not None:
            self._file.close()
            self._file = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append tensor `name` (the next one in the planned order) to its shard."""
        if self._position >= len(self._queue):
            raise CheckpointError(f"tensor {name} was not in the planned list of tensors (all have been written)")
        shard_index, spec = self._queue[self._position]
        if name != spec.name:
            raise CheckpointError(f"expected tensor {spec.name} next, got {name}")
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise CheckpointError(
                f"tensor {name} is {list(tensor.shape)} {tensor.dtype}, but the plan says {list(spec.shape)} "
                f"{spec.dtype}"
            )
        if self._file_shard != shard_index:
            self._finish_shard()
            self._file = open(self.folder / self.file_names[shard_index], "wb")
            self._file.write(_safetensors_header(self.shards[shard_index], self.metadata))
            self._file_shard = shard_index
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._position += 1
        if self._position == len(self._queue) or self._queue[self._position][0] != shard_index:
            self._finish_shard()

    def _finish_shard(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def close(self) -> None:
        """Check that every planned tensor was written; write the index for a sharded checkpoint."""
        self._finish_shard()
        if self._position != len(self._queue):
            raise CheckpointError(
                f"{len(self._queue) - self._position} planned tensors were never written, "
                f"starting with {self._queue[self._position][1].name}"
            )
        if not self._queue:  # an empty checkpoint still gets a valid (empty) file
            (self.folder / self.file_names[0]).write_bytes(_safetensors_header([], self.metadata))
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(spec.nbytes for _, spec in self._queue)},
                "weight_map": {
                    spec.name: self.file_names[shard_index] for shard_index, spec in self._queue
                },
            }
            (self.folder / SAFETENSORS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------------------------
# Atomic output


def _partial_sibling(target: Path) -> Path:
    return target.parent / f".{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def check_output_path(target: str | os.PathLike, *, overwrite: bool, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse an existing `target` (unless `overwrite`) and a target that is one of the `inputs`."""
    target = Path(target)
    for source in inputs:
        if Path(source).exists() and target.exists() and target.resolve() == Path(source).resolve():
            raise FileExistsError(f"the output {target} is also an input; choose another output path")
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass --overwrite to replace it")
    for message in leftover_messages(target):
        logger.warning("%s", message)
    return target


def leftover_messages(target: str | os.PathLike) -> list[str]:
    """What earlier killed runs left next to ``target``, one sentence per folder, saying what it is and what to do.

    ``.NAME.partial-*``: an unfinished output, safe to delete. ``.NAME.old-*``: the previous ``target``, moved aside
    while a new one replaced it; safe to delete when ``target`` exists, else ``mv`` restores it.
    """
    target = Path(target)
    if not target.parent.is_dir():
        return []
    messages = [f"{p} is the unfinished output of an earlier killed run; safe to delete"
                for p in sorted(target.parent.glob(f".{target.name}.partial-*"))]
    for old in sorted(target.parent.glob(f".{target.name}.old-*")):
        if target.exists():
            messages.append(f"{old} is a previous {target} kept aside by an earlier killed run; {target} is "
                            "complete, so it is safe to delete")
        else:
            messages.append(f"{old} is the previous {target}, moved aside by a run killed while replacing it: "
                            f"`mv {old} {target}` restores it")
    return messages


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _commit(partial: Path, target: Path) -> None:
    """Move `partial` to `target`, replacing an existing target only once the new one is complete."""
    fsync_tree(partial)
    if target.exists() or target.is_symlink():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
        os.rename(partial, target)
        fsync_path(target.parent)
        _remove(old)
    else:
        os.rename(partial, target)
        fsync_path(target.parent)


@contextlib.contextmanager
def atomic_output_dir(
    target: str | os.PathLike, *, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = ()
) -> Iterator[Path]:
    """Yield a temporary sibling folder of `target`; rename it to `target` when the block succeeds.

    On any exception (including KeyboardInterrupt, and SIGTERM once `exit_cleanly_on_sigterm` is installed)
    the temporary folder is deleted and `target` is left untouched: absent, or as it was.
    """
    target = check_output_path(target, overwrite=overwrite, inputs=inputs)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial_sibling(target)
    partial.mkdir()
    try:
        yield partial
        _commit(partial, target)
    except BaseException:
        _remove(partial)
        raise


@contextlib.contextmanager
def atomic_output_file(
    target: str | os.PathLike, *, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = ()
) -> Iterator[Path]:
    """Like `atomic_output_dir` for one file: yield a temporary path next to `target` to write."""
    target = check_output_path(target, overwrite=overwrite, inputs=inputs)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial_sibling(target)
    try:
        yield partial
        if not partial.exists():
            raise CheckpointError(f"nothing was written for {target}")
        os.replace(partial, target)
    except BaseException:
        _remove(partial)
        raise


def exit_cleanly_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so that `atomic_output_*` clean up (for CLIs; SIGKILL cannot be caught)."""

    def _raise(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _raise)


# --------------------------------------------------------------------------------------------------------------
# Side files


def copy_side_files(src: str | os.PathLike, dst: str | os.PathLike, dtype: torch.dtype | None = None) -> list[str]:
    """Copy config, generation config, tokenizer and processor files found in `src` into `dst`.

    With `dtype`, the copied config.json records it (`torch_dtype` and/or `dtype`, whichever it has).
    Returns the names copied.
    """
    src, dst = Path(src), Path(dst)
    if src.is_file():
        src = src.parent
    copied = []
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    if dtype is not None and "config.json" in copied:
        config = json.loads((dst / "config.json").read_text())
        dtype_name = str(dtype).removeprefix("torch.")
        keys = [key for key in ("torch_dtype", "dtype") if key in config] or ["torch_dtype"]
        for key in keys:
            config[key] = dtype_name
        (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if "config.json" not in copied:
        logger.warning("%s has no config.json; the output will need one before it can be loaded as a model", src)
    return copied


def copy_vision_tower(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy a CLIP vision-tower folder (HF CLIPVisionModel layout) to `dst`/vision_tower."""
    src = Path(src)
    if not src.is_dir():
        raise CheckpointError(f"vision tower folder {src} does not exist")
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{src} has no config.json; expected a CLIP vision model folder")
    out = Path(dst) / VISION_TOWER_DIR
    shutil.copytree(src, out)
    return out


def progress_bar(total_bytes: int, desc: str) -> tqdm:
    """A byte-counting progress bar (hidden when stderr is not a terminal)."""
    return tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=None)


def setup_cli_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def run_weight_tool(work: Callable[[], object]) -> int:
    """Runs a weight tool's work as a command: logging on, SIGTERM cleans up partial output, and a refused input
    (CheckpointError, an existing output, a bad value) is one logged line and exit status 1."""
    setup_cli_logging()
    exit_cleanly_on_sigterm()
    try:
        work()
    except (CheckpointError, FileExistsError, ValueError) as err:
        logger.error("%s", err)
        return 1
    return 0


# --------------------------------------------------------------------------------------------------------------
# Durable, verifiable folders: fsync, a manifest written last, and integrity checks on resume

MANIFEST_NAME = "manifest.json"
_HASH_CHUNK = 8 * 2**20


def _files_under(folder: Path) -> list[Path]:
    """Every regular file below ``folder`` (relative paths, sorted), the manifest excluded."""
    return sorted(
        p.relative_to(folder) for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix()
        != MANIFEST_NAME
    )


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_all(paths: Sequence[Path]) -> list[str]:
    """sha256 of several files, a few at a time (hashlib releases the GIL on large reads: ZeRO checkpoints hold
    one optimizer shard per rank, and a 7B run's shards add up to ~80 GB)."""
    from concurrent.futures import ThreadPoolExecutor

    if len(paths) <= 1:
        return [_sha256(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(8, len(paths), os.cpu_count() or 1)) as pool:
        return list(pool.map(_sha256, paths))


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's data and metadata to disk (folders: their entries, e.g. after a rename)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if os.path.isdir(path) else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file below ``folder``, then every folder from the deepest up to ``folder`` itself."""
    folder = Path(folder)
    dirs = [folder]
    for path in sorted(folder.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            dirs.append(path)
        elif path.is_file():
            fsync_path(path)
    for path in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        fsync_path(path)


def write_manifest(folder: str | os.PathLike) -> dict:
    """Write ``manifest.json`` (every file's size and sha256) into ``folder``, LAST and durably.

    The files are fsync'ed first, then the manifest is written to a temporary name, fsync'ed, renamed into place
    and the folder fsync'ed: a manifest on disk always describes files that are on disk. Returns the manifest.
    """
    folder = Path(folder)
    fsync_tree(folder)
    relative = _files_under(folder)
    digests = _sha256_all([folder / p for p in relative])
    files = {p.as_posix(): {"size": (folder / p).stat().st_size, "sha256": digest}
             for p, digest in zip(relative, digests)}
    manifest = {"format": 1, "files": files}
    partial = folder / f".{MANIFEST_NAME}.partial"
    with open(partial, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, folder / MANIFEST_NAME)
    fsync_path(folder)
    return manifest


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file cannot load (truncated, empty, corrupt header), or None."""
    size = path.stat().st_size
    if size < 8:
        return f"{path.name} is {size} bytes, shorter than a safetensors header"
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8:
            return f"{path.name} declares a {header_len}-byte header but has {size} bytes"
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return f"{path.name} has an unreadable header"
    ends = [entry["data_offsets"][1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry]
    expected = 8 + header_len + max(ends, default=0)
    if size != expected:
        return f"{path.name} is {size} bytes, its header says {expected}"
    return None


def _zip_problem(path: Path) -> str | None:
    """Why a torch.save zip archive (optimizer.pt, *.bin, *.pth) is truncated or corrupt, or None."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        return f"{path.name} is not a complete archive ({err})"
    return f"{path.name} has a corrupt member {bad}" if bad is not None else None


def file_problem(path: str | os.PathLike) -> str | None:
    """Why one checkpoint file cannot be loaded, from its format alone (no manifest), or None."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return _safetensors_problem(path)
    if path.suffix in (".pt", ".bin", ".pth"):
        if path.stat().st_size == 0:
            return f"{path.name} is empty"
        with open(path, "rb") as f:
            legacy = f.read(2) != b"PK"  # torch.save's old (non-zip) format: nothing cheap to check
        return None if legacy else _zip_problem(path)
    if path.suffix == ".json":
        try:
            json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return f"{path.name} is not valid JSON ({err})"
    return None


def folder_problems(folder: str | os.PathLike, checksums: bool = True) -> list[str]:
    """What is wrong with a checkpoint folder, [] when it is intact.

    With a ``manifest.json``: every file it lists must exist with its size (and sha256 when ``checksums``).
    Without one (a folder written by other tools or older versions): every file must pass ``file_problem``.
    """
    folder = Path(folder)
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        return [p for p in (file_problem(folder / rel) for rel in _files_under(folder)) if p]
    try:
        files = json.loads(manifest_path.read_bytes())["files"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        return [f"{MANIFEST_NAME} is unreadable ({err})"]
    problems = []
    to_hash = []
    for rel, entry in sorted(files.items()):
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{rel} is {path.stat().st_size} bytes, the manifest says {entry['size']}")
        elif checksums:
            to_hash.append((rel, entry["sha256"]))
    if problems:  # sizes already tell; no need to read everything
        return problems
    digests = _sha256_all([folder / rel for rel, _ in to_hash])
    return [f"{rel} does not match its sha256 in the manifest"
            for (rel, expected), digest in zip(to_hash, digests) if digest != expected]
