"""FerretTrainer: `transformers.Trainer` with Ferret's checkpoint layout, atomic checkpoints and throughput logs.

What it adds to the HF Trainer, and nothing else:

* **Checkpoint layout** (docs/compatibility.md §1.5): ``checkpoint-N/`` holds the model (safetensors), config.json, the
  tokenizer + preprocessor_config.json (the processor is the Trainer's ``processing_class``) + ``vision_tower/``
  when ``save_vision_tower`` is set, plus HF's optimizer/scheduler/RNG/trainer state. In LoRA mode a checkpoint
  is the adapter + config.json + ``non_lora_trainables.bin`` (the layout ``load_pretrained_model`` reads); in
  projector pre-training mode (``tune_mm_mlp_adapter``) it is ``mm_projector.bin`` + config.json.
* **Atomic, verifiable checkpoints**: everything is written into ``tmp-checkpoint-N/``; once every rank has
  finished, the files are fsync'ed, a ``manifest.json`` (size + sha256 of every file) is written LAST, the folder
  is fsync'ed and renamed to ``checkpoint-N/``. So a run killed mid-save never leaves a ``checkpoint-N``, and a
  checkpoint torn later (a truncated optimizer.pt, a 0-byte model.safetensors) fails its manifest:
  `latest_checkpoint` skips it with a warning naming it and resumes from the newest intact one. Folders without a
  manifest (other tools, older versions) are checked by format (safetensors length, zip archives, JSON).
  HF's Trainer offers no hook to write a checkpoint elsewhere and rename it, hence the ``_save_checkpoint``
  override; everything else goes through ``save_model`` and the public state.
* **Logs** (tensorboard through ``report_to``): besides HF's loss, learning_rate and grad_norm, every logging
  step records ``samples_per_second`` and ``tokens_per_second`` over the interval (all ranks; tokens are the
  non-pad positions, image positions included) and ``skipped_records``: how many DISTINCT records (file, index)
  the dataset has rejected so far, on any rank or DataLoader worker. Each newly rejected record is logged by name,
  and the full list is kept in the trainer state (``stateful_callbacks["skipped_records"]``), so it survives a
  resume and ends up in ``trainer_state.json``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from typing import Any

import torch
import torch.distributed as dist
from transformers import Trainer
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from ferret.model.checkpoint import folder_problems, fsync_path, write_manifest

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
    "adapter_model.safetensors", "adapter_model.bin", "mm_projector.bin",
)
STAGING_PREFIX = "tmp-"
CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
# Key the dataset/collator put in a batch: the bad records, as (file, index, reason), replaced while building it.
SKIPPED_KEY = "skipped_records"
# Where the trainer state keeps every distinct skipped record: [[file, index, reason], ...].
SKIPPED_STATE_KEY = "skipped_records"


def is_complete_checkpoint(path: str) -> bool:
    """A checkpoint folder is usable for resuming when it has the trainer state and model weights."""
    if not os.path.isfile(os.path.join(path, TRAINER_STATE)):
        return False
    return any(os.path.exists(os.path.join(path, name)) for name in WEIGHT_FILES)


def checkpoint_problems(path: str, checksums: bool = True) -> list[str]:
    """Why a checkpoint folder cannot be resumed from ([] when it is intact): missing trainer state or weights,
    or files that fail the folder's manifest (see ``ferret.model.checkpoint.folder_problems``)."""
    if not is_complete_checkpoint(path):
        return [f"incomplete: no {TRAINER_STATE} or no model weights"]
    return folder_problems(path, checksums=checksums)


def latest_checkpoint(output_dir: str) -> str | None:
    """The ``checkpoint-N`` folder with the highest N that is intact; each newer one that is incomplete or torn
    is named in a warning with what is wrong, and skipped."""
    if not os.path.isdir(output_dir):
        return None
    steps = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_RE.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            steps.append((int(match.group(1)), os.path.join(output_dir, name)))
    for _, path in sorted(steps, reverse=True):
        problems = checkpoint_problems(path)
        if not problems:
            return path
        logger.warning("skipping the torn or incomplete checkpoint %s: %s", path, "; ".join(problems))
    return None


def remove_staging_folders(output_dir: str) -> None:
    """Deletes ``tmp-checkpoint-*`` folders left by a run that died while saving."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if name.startswith(STAGING_PREFIX) and os.path.isdir(os.path.join(output_dir, name)):
            logger.warning("removing %s: an unfinished save of an interrupted run", os.path.join(output_dir, name))
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


class SkipCountingDataset(torch.utils.data.Dataset):
    """Wraps a GritDataset so each item carries how many bad records were skipped to produce it; the count then
    travels through DataLoader worker processes with the batch (workers' own counters are invisible here)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.dataset[i])
        item[SKIPPED_KEY] = [tuple(s) for s in getattr(self.dataset, "last_skipped", ())]
        return item

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    @property
    def lengths(self) -> list[int]:
        return self.dataset.lengths


class SkipCountingCollator:
    """Collates with ``collator`` and adds the batch's skipped-record count under ``SKIPPED_KEY``."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        skipped = [s for f in features for s in f.pop(SKIPPED_KEY, ())]
        batch = self.collator(features)
        batch[SKIPPED_KEY] = skipped
        return batch


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class FerretTrainer(Trainer):
    """HF Trainer for Ferret (see the module docstring).

    Args:
        save_vision_tower: write ``vision_tower/`` into every checkpoint even when the tower has a hub id.
        adapter_only: projector pre-training mode; checkpoints hold ``mm_projector.bin`` and config.json only.
        *args, **kwargs: as `transformers.Trainer` (pass the FerretProcessor as ``processing_class``).
    """

    def __init__(self, *args: Any, save_vision_tower: bool = True, adapter_only: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.save_vision_tower = save_vision_tower
        self.adapter_only = adapter_only
        self._interval = {"samples": 0, "tokens": 0}
        self._interval_start: float | None = None
        self._pending_skipped: dict[tuple[str, int], str] = {}  # seen on this rank since the last flush

    # ------------------------------------------------------------------ throughput and data-quality logs
    def _get_train_sampler(self, train_dataset=None):
        # Length grouping reads the dataset's cheap length estimates instead of building every item.
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "lengths"):
            from transformers.trainer_pt_utils import LengthGroupedSampler

            return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        lengths=dataset.lengths)
        return super()._get_train_sampler(train_dataset)

    def training_step(self, model, inputs, num_items_in_batch=None):
        skipped = inputs.pop(SKIPPED_KEY, 0)
        if self._interval_start is None:
            self._interval_start = time.perf_counter()
        self._interval["samples"] += int(inputs["input_ids"].shape[0])
        mask = inputs.get("attention_mask")
        self._interval["tokens"] += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
        for path, index, reason in skipped or ():
            self._pending_skipped.setdefault((str(path), int(index)), str(reason))
        return super().training_step(model, inputs, num_items_in_batch)

    @property
    def skipped_records(self) -> dict[tuple[str, int], str]:
        """Every distinct record skipped so far in this run (resumes included): (file, index) -> reason. Complete
        after ``flush_skipped_records``."""
        saved = self.state.stateful_callbacks.get(SKIPPED_STATE_KEY) or []
        return {(str(path), int(index)): str(reason) for path, index, reason in saved}

    def flush_skipped_records(self) -> int:
        """Merges the records every rank skipped since the last flush into the trainer state and logs the new
        ones by name; returns the number of distinct skipped records. Collective: call it on every rank."""
        pending = [[p, k, r] for (p, k), r in self._pending_skipped.items()]
        self._pending_skipped = {}
        if dist.is_available() and dist.is_initialized():
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, pending)
            pending = [entry for part in gathered for entry in part]
        known = self.skipped_records
        new = {}
        for path, index, reason in pending:
            if (path, index) not in known and (path, index) not in new:
                new[(path, index)] = reason
        if new:
            known.update(new)
            self.state.stateful_callbacks[SKIPPED_STATE_KEY] = [[p, k, r] for (p, k), r in sorted(known.items())]
            if self.args.should_log:
                named = ", ".join(f"{p}:{k} [{r}]" for (p, k), r in sorted(new.items()))
                logger.warning("skipped %d new bad record(s) (%d in all): %s", len(new), len(known), named)
        return len(known)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._interval_start is not None:
            counts = torch.tensor([self._interval["samples"], self._interval["tokens"]], dtype=torch.float64,
                                  device=self.args.device)
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(counts)  # every rank logs (HF calls log() on all of them), so this is collective
            samples, tokens = counts.tolist()
            elapsed = max(time.perf_counter() - self._interval_start, 1e-9)
            logs["samples_per_second"] = round(samples / elapsed, 3)
            logs["tokens_per_second"] = round(tokens / elapsed, 1)
            logs["skipped_records"] = self.flush_skipped_records()
            self._interval = {"samples": 0, "tokens": 0}
            self._interval_start = time.perf_counter()
        super().log(logs, start_time)

    # ------------------------------------------------------------------ saving
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if self.adapter_only:
            if self.args.should_save:
                state = state_dict if state_dict is not None else model.state_dict()
                projector = {k: v.detach().cpu() for k, v in state.items() if "mm_projector" in k}
                os.makedirs(output_dir, exist_ok=True)
                torch.save(projector, os.path.join(output_dir, "mm_projector.bin"))
                model.config.save_pretrained(output_dir)
                if self.processing_class is not None:
                    self.processing_class.save_pretrained(output_dir)
            return
        super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return
        ferret = model
        if hasattr(model, "peft_config"):
            ferret = model.get_base_model()
            ferret.config.save_pretrained(output_dir)
            state = state_dict if state_dict is not None else model.state_dict()
            torch.save(non_lora_trainables(state), os.path.join(output_dir, "non_lora_trainables.bin"))
        tower = getattr(ferret, "vision_tower", None)
        tower_dir = os.path.join(output_dir, "vision_tower")
        if self.save_vision_tower and tower is not None and not os.path.isdir(tower_dir):
            tower.save_pretrained(tower_dir)

    def _save_checkpoint(self, model, trial) -> None:
        """HF's checkpoint, written into ``tmp-checkpoint-N`` and renamed to ``checkpoint-N`` when complete."""
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = os.path.join(run_dir, STAGING_PREFIX + name)
        final = os.path.join(run_dir, name)
        if self.args.should_save and os.path.isdir(staging):
            shutil.rmtree(staging)
        _barrier()

        self.store_flos()
        self.flush_skipped_records()  # the checkpoint's state names every record skipped up to this step
        self.save_model(staging, _internal_call=True)
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(staging)
            self._save_scaler(staging)
            self._save_rng_state(staging)
        if self.args.should_save:
            for callback in self.callback_handler.callbacks + [self.control]:
                if isinstance(callback, ExportableState):
                    key = callback.__class__.__name__
                    if isinstance(self.state.stateful_callbacks.get(key), list):
                        self.state.stateful_callbacks[key].append(callback.state())
                    else:
                        self.state.stateful_callbacks[key] = callback.state()
            self.state.save_to_json(os.path.join(staging, TRAINER_STATE))

        # Every rank has written its shards (DeepSpeed/FSDP optimizer states) before the folder is published.
        _barrier()
        if self.args.should_save:
            self._publish(staging, final)
        _barrier()
        # Nodes without a shared file system publish their own ranks' files.
        if self.is_local_process_zero() and os.path.isdir(staging):
            self._publish(staging, final)
        if self.args.push_to_hub:
            self._push_from_checkpoint(final)
        if self.args.should_save:
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=False)

    @staticmethod
    def _publish(staging: str, final: str) -> None:
        """Seal ``staging`` (fsync, manifest last) and rename it to ``final``, durably."""
        write_manifest(staging)
        if os.path.isdir(final):
            # The same step saved again (e.g. the final step after a resume): the new save replaces it.
            shutil.rmtree(final)
        os.replace(staging, final)
        fsync_path(os.path.dirname(os.path.abspath(final)))
        logger.info("saved checkpoint %s", final)


def non_lora_trainables(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trained non-LoRA weights of a PEFT model's state dict under the plain model's names.

    ``base_model.model.model.mm_projector.modules_to_save.default.weight`` -> ``model.mm_projector.weight``.
    """
    out = {}
    for key, value in state.items():
        if ".modules_to_save." not in key:
            continue
        clean = re.sub(r"\.modules_to_save\.[^.]+\.", ".", key)
        clean = clean.removeprefix("base_model.model.")
        out[clean] = value.detach().cpu()
    return out
