"""FerretTrainer: `transformers.Trainer` with Ferret's checkpoint layout, atomic checkpoints and throughput logs.

What it adds to the HF Trainer, and nothing else:

* **Checkpoint layout** (docs/compatibility.md §1.5): ``checkpoint-N/`` holds the model (safetensors), config.json, the
  tokenizer + preprocessor_config.json (the processor is the Trainer's ``processing_class``) + ``vision_tower/``
  when ``save_vision_tower`` is set, plus HF's optimizer/scheduler/RNG/trainer state. In LoRA mode a checkpoint
  is the adapter + config.json + ``non_lora_trainables.bin`` (the layout ``load_pretrained_model`` reads); in
  projector pre-training mode (``tune_mm_mlp_adapter``) it is ``mm_projector.bin`` + config.json.
* **Atomic, verifiable checkpoints**, through public hooks only: HF writes ``checkpoint-N/`` as usual; then, in
  `SealCheckpointCallback.on_save`, once every rank has finished, the files are fsync'ed and a ``manifest.json``
  (size + sha256 of every file) is written LAST, and the run folder is fsync'ed. A checkpoint without a manifest
  is a save that did not finish (the run was killed mid-save): `latest_checkpoint` skips it, as it skips one torn
  later (a truncated optimizer.pt, a 0-byte model.safetensors fails its manifest), with a warning naming it, and
  resumes from the newest intact one; the next save of that step replaces the folder. A folder given explicitly
  to ``--resume_from_checkpoint`` without a manifest (other tools, older versions) is checked by format
  (safetensors length, zip archives, JSON). ``save_total_limit`` rotation deletes only sealed checkpoints, after
  the new one is sealed.
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
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ferret.model.checkpoint import MANIFEST_NAME, folder_problems, fsync_path, write_manifest

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
# Batch key: each sample's record "task" (None when the record has none); the trainer logs the loss per task.
TASKS_KEY = "record_tasks"
# Where the trainer state keeps every distinct skipped record: [[file, index, reason], ...].
SKIPPED_STATE_KEY = "skipped_records"


def is_complete_checkpoint(path: str) -> bool:
    """A checkpoint folder is usable for resuming when it has the trainer state and model weights."""
    if not os.path.isfile(os.path.join(path, TRAINER_STATE)):
        return False
    return any(os.path.exists(os.path.join(path, name)) for name in WEIGHT_FILES)


def checkpoint_problems(path: str, checksums: bool = True, require_manifest: bool = False) -> list[str]:
    """Why a checkpoint folder cannot be resumed from ([] when it is intact): missing trainer state or weights,
    no manifest when ``require_manifest`` (a save that did not finish), or files that fail the folder's manifest
    (see ``ferret.model.checkpoint.folder_problems``; a folder of other tools, without one, is checked by format)."""
    if not is_complete_checkpoint(path):
        return [f"incomplete: no {TRAINER_STATE} or no model weights"]
    if require_manifest and not os.path.isfile(os.path.join(path, MANIFEST_NAME)):
        return [f"no {MANIFEST_NAME}: the save did not finish"]
    return folder_problems(path, checksums=checksums)


def latest_checkpoint(output_dir: str) -> str | None:
    """The ``checkpoint-N`` folder with the highest N that is intact and sealed (has its manifest: every save of
    this trainer writes one last); each newer one that is incomplete, unsealed or torn is named in a warning with
    what is wrong, and skipped."""
    if not os.path.isdir(output_dir):
        return None
    steps = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_RE.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            steps.append((int(match.group(1)), os.path.join(output_dir, name)))
    for _, path in sorted(steps, reverse=True):
        problems = checkpoint_problems(path, require_manifest=True)
        if not problems:
            return path
        logger.warning("skipping the torn or incomplete checkpoint %s: %s", path, "; ".join(problems))
    return None


def remove_staging_folders(output_dir: str) -> None:
    """Deletes ``tmp-*`` folders (``tmp-final-checkpoint``, or ``tmp-checkpoint-N`` of older versions) left by a
    run that died while saving."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if name.startswith(STAGING_PREFIX) and os.path.isdir(os.path.join(output_dir, name)):
            logger.warning("removing %s: an unfinished save of an interrupted run", os.path.join(output_dir, name))
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


class SkipCountingDataset(torch.utils.data.Dataset):
    """Wraps a GritDataset so each item carries the bad records skipped to produce it and its record's "task"; they
    travel through DataLoader worker processes with the batch (workers' own counters are invisible here)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.dataset[i])
        item[SKIPPED_KEY] = [tuple(s) for s in getattr(self.dataset, "last_skipped", ())]
        item[TASKS_KEY] = getattr(self.dataset, "last_task", None)
        return item

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    @property
    def lengths(self) -> list[int]:
        return self.dataset.lengths


class SkipCountingCollator:
    """Collates with ``collator`` and adds the batch's skipped records (``SKIPPED_KEY``) and tasks (``TASKS_KEY``)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        skipped = [s for f in features for s in f.pop(SKIPPED_KEY, ())]
        tasks = [f.pop(TASKS_KEY, None) for f in features]
        batch = self.collator(features)
        batch[SKIPPED_KEY] = skipped
        batch[TASKS_KEY] = tasks
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
        # Rotation moves to the sealing callback (it must only ever delete sealed checkpoints, after the new one is
        # sealed); HF's own rotation, which runs before on_save, is switched off by clearing the limit here.
        self.add_callback(SealCheckpointCallback(self.args.save_total_limit))
        self.args.save_total_limit = None
        self.save_vision_tower = save_vision_tower
        self.adapter_only = adapter_only
        self._interval = {"samples": 0, "tokens": 0}
        self._interval_start: float | None = None
        self._pending_skipped: dict[tuple[str, int], str] = {}  # seen on this rank since the last flush
        self._batch_tasks: list[str | None] | None = None
        self._task_loss: dict[str, list[float]] = {}  # task -> [sum of sample losses, samples] since the last log
        if self.args.loss_average == "sample":
            self.loss_is_scaled_for_ga = False  # the per-sample mean is divided by the accumulation steps

    # ------------------------------------------------------------------ throughput and data-quality logs
    def _get_train_sampler(self, train_dataset=None):
        # Length grouping reads the dataset's cheap length estimates instead of building every item. The one
        # private Trainer method overridden here: HF takes lengths only from a `datasets` column (or by building
        # every item) and has no public way to pass them or a sampler.
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "lengths"):
            from transformers.trainer_pt_utils import LengthGroupedSampler

            return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        lengths=dataset.lengths)
        return super()._get_train_sampler(train_dataset)

    def training_step(self, model, inputs, num_items_in_batch=None):
        skipped = inputs.pop(SKIPPED_KEY, 0)
        self._batch_tasks = inputs.pop(TASKS_KEY, None)
        if self._interval_start is None:
            self._interval_start = time.perf_counter()
        self._interval["samples"] += int(inputs["input_ids"].shape[0])
        mask = inputs.get("attention_mask")
        self._interval["tokens"] += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
        for path, index, reason in skipped or ():
            self._pending_skipped.setdefault((str(path), int(index)), str(reason))
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """HF's loss (``--loss_average token``) or the mean of per-sample means (``sample``); either way, when the
        records name their task, each sample's mean loss is added to its task's running log."""
        tasks, self._batch_tasks = self._batch_tasks, None
        per_sample = self.args.loss_average == "sample"
        if not per_sample and not any(tasks or ()):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if per_sample:
            outputs = model(**inputs)
        else:
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        sums, counts = outputs.sample_loss_sums, outputs.sample_token_counts
        means = sums / counts.clamp(min=1)
        if per_sample:
            has = counts > 0
            loss = means[has].mean() if bool(has.any()) else outputs.loss
        if not any(tasks or ()):
            return (loss, outputs) if return_outputs else loss
        for task, value, count in zip(tasks, means.detach().tolist(), counts.tolist()):  # one device sync
            if task is not None and count > 0:
                entry = self._task_loss.setdefault(task, [0.0, 0])
                entry[0] += value
                entry[1] += 1
        return (loss, outputs) if return_outputs else loss

    def _task_losses(self) -> dict[str, float]:
        """Mean sample loss per task since the last log, over every rank (collective when distributed)."""
        parts = [self._task_loss]
        if dist.is_available() and dist.is_initialized():
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, self._task_loss)
        self._task_loss = {}
        merged: dict[str, list[float]] = {}
        for part in parts:
            for task, (total, count) in part.items():
                entry = merged.setdefault(task, [0.0, 0])
                entry[0] += total
                entry[1] += count
        return {f"loss_{task}": round(total / count, 4) for task, (total, count) in sorted(merged.items())}

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
            logs.update(self._task_losses())
            self._interval = {"samples": 0, "tokens": 0}
            self._interval_start = time.perf_counter()
        super().log(logs, start_time)

    # ------------------------------------------------------------------ saving
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """HF's `save_model` in Ferret's layout (see the module docstring). Collective: call it on every rank.

        A checkpoint save (``_internal_call`` into a ``checkpoint-N`` folder) first merges every rank's skipped
        records into the state it writes, and clears what an earlier, interrupted save of the same step left in the
        folder (HF writes into it).
        """
        output_dir = output_dir or self.args.output_dir
        if _internal_call and CHECKPOINT_RE.match(os.path.basename(os.path.normpath(output_dir))):
            self.flush_skipped_records()  # the checkpoint's state names every record skipped up to this step
            if self.args.should_save and os.path.isdir(output_dir):
                logger.warning("replacing %s: an earlier (torn or superseded) save of this step", output_dir)
                shutil.rmtree(output_dir)
            _barrier()
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if self.adapter_only:
            self._save_projector(model, output_dir)
            return
        super().save_model(output_dir, _internal_call=_internal_call)
        ferret = model
        if hasattr(model, "peft_config"):
            ferret = model.get_base_model()
            # Gathered on every rank (ZeRO-3 shards the trained modules); written by the saving one.
            state = self.accelerator.get_state_dict(self.deepspeed if self.is_deepspeed_enabled else self.model)
            if self.args.should_save:
                ferret.config.save_pretrained(output_dir)
                torch.save(non_lora_trainables(state), os.path.join(output_dir, "non_lora_trainables.bin"))
        if not self.args.should_save:
            return
        tower = getattr(ferret, "vision_tower", None)
        tower_dir = os.path.join(output_dir, "vision_tower")
        if self.save_vision_tower and tower is not None and not os.path.isdir(tower_dir):
            tower.save_pretrained(tower_dir)

    def _save_projector(self, model, output_dir: str) -> None:
        """Projector pre-training: ``mm_projector.bin`` + config.json (+ the processor), nothing else."""
        state = self.accelerator.get_state_dict(self.deepspeed if self.is_deepspeed_enabled else self.model)
        if not self.args.should_save:
            return
        projector = {k: v.detach().cpu() for k, v in state.items() if "mm_projector" in k}
        os.makedirs(output_dir, exist_ok=True)
        torch.save(projector, os.path.join(output_dir, "mm_projector.bin"))
        model.config.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)


class SealCheckpointCallback(TrainerCallback):
    """Seals each ``checkpoint-N`` once HF has written all of it, then rotates old checkpoints.

    HF's Trainer writes ``checkpoint-N`` in place and calls ``on_save`` afterwards, on every rank. Here every rank
    first waits for the others (DeepSpeed/FSDP write per-rank optimizer shards), then the saving process fsyncs the
    files and writes ``manifest.json`` LAST (see ``ferret.model.checkpoint.write_manifest``), and fsyncs the run
    folder. A ``checkpoint-N`` without a manifest is therefore a save that did not finish: `latest_checkpoint`
    skips it, and the next save of step N replaces it.

    Rotation (``save_total_limit``) happens here, after sealing, over sealed checkpoints only: HF rotates before
    ``on_save``, which could delete the last sealed checkpoint while the new one is still unsealed, so the trainer
    keeps the limit to itself (see `FerretTrainer.__init__`).
    """

    def __init__(self, save_total_limit: int | None):
        self.save_total_limit = save_total_limit

    def on_save(self, args, state, control, **kwargs):
        run_dir = args.output_dir
        folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        _barrier()  # every rank has written its files
        if args.should_save:
            self._seal(folder)
        _barrier()
        # Nodes without a shared file system seal their own ranks' files.
        if state.is_local_process_zero and os.path.isdir(folder) and not os.path.isfile(
                os.path.join(folder, MANIFEST_NAME)):
            self._seal(folder)
        if args.should_save:
            self._rotate(run_dir, state)
        return control

    @staticmethod
    def _seal(folder: str) -> None:
        write_manifest(folder)
        fsync_path(os.path.dirname(os.path.abspath(folder)))
        logger.info("saved checkpoint %s", folder)

    def _rotate(self, run_dir: str, state) -> None:
        limit = self.save_total_limit
        if not limit or limit <= 0:
            return
        sealed = sorted(
            (int(m.group(1)), os.path.join(run_dir, name))
            for name in os.listdir(run_dir)
            if (m := CHECKPOINT_RE.match(name)) and os.path.isfile(os.path.join(run_dir, name, MANIFEST_NAME))
        )
        keep = {path for _, path in sealed[-limit:]}
        if state.best_model_checkpoint:
            keep.add(os.path.join(run_dir, os.path.basename(state.best_model_checkpoint)))
        for _, path in sealed:
            if path not in keep:
                logger.info("deleting %s (save_total_limit=%d)", path, limit)
                shutil.rmtree(path, ignore_errors=True)


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
