"""`make demo`: train a tiny Ferret on the toy shapes world on a CPU, evaluate it, and draw what it learned.

The demo runs the framework's real entry points, in stages, each announced with its expected duration and an ETA:

1. ``ferret.data.toy``: the world (GRIT-format train/test JSON + PNGs) and a 512-piece tokenizer trained on it;
   reused when ``world/demo_world.json`` records the same settings;
2. stage 0, ``ferret.train.tower_pretraining``: the small CLIP-shaped tower learns to see the world (the stand-in
   for CLIP pretraining; frozen afterwards, as in Ferret). Cached under ``vision_tower/<key>/``, the key a hash of the tower's
   settings and of the world's training split, so a second run skips it;
3. ``ferret.train.train.main``: the HF-Trainer recipe with ``--init_config`` (a JSON of `ferret.model.configuration.small`
   fields written by the demo), on CPU, seeded and deterministic, with tensorboard logs and a checkpoint every
   ``save_steps``: an interrupted demo resumes from the last one when run again with the same settings;
4. ``ferret.eval.toy`` ``infer`` + ``score``: greedy answers to every test question, then the toy metrics;
5. the figures.

Threads: torch runs ``--threads`` threads, 1 unless asked otherwise. On this project's 2-core machines, shared with
other jobs, a second thread made training 6-15x SLOWER whenever another process was busy (the threads wait for
each other), and saved little when the machine was idle; one thread gives run times that do not collapse under load
and the same numbers run after run.

Files written (``out_dir`` defaults to ``runs/demo``, ``runs/demo-quick`` with ``--quick``)::

    out_dir/world/                      the toy world and world/tokenizer/
    out_dir/model_config.json           the --init_config given to the trainer
    out_dir/vision_tower/<key>/         the stage-0 tower (a CLIPVisionModel) + stage0.json (what it measured)
    out_dir/train/                      trainer output: checkpoint-N/ (resumable), trainer_state.json, runs/ (tensorboard)
    out_dir/checkpoint/                 the final model (load_pretrained_model, the serving CLI)
    out_dir/test_answers.jsonl          one answer per test record (+ .metrics.json, the full scorer output)
    out_dir/metrics.json                headline metrics (fractions in [0, 1]) + times, threads, settings
    out_dir/ablation.json               with ``--ablation``: the same run with region features off vs on
    out_dir/curve.json, curve/step-N/   with ``--curve``: every kept checkpoint's metrics (and its answers)
    out_dir/figs/toy_training_curve.png     training loss vs step, in total and per record task (from
                                            trainer_state.json), one panel per run (two with ``--ablation``)
    out_dir/figs/toy_grounding_examples.png 8 test ``ground`` questions: true (dark grey, solid) vs predicted
                                            (magenta, dashed) box, the predicted name, the IoU and the verdict
    out_dir/figs/toy_metric_curve.png       with ``--curve``: each metric vs the step, its target dotted

Command line::

    .venv/bin/ferret demo                 # (= make demo) about 12 minutes of one core
    .venv/bin/ferret demo --quick         # about 2 minutes: smaller world, 150 tower and 150 training steps
    .venv/bin/ferret demo --ablation      # + the run without region features (twice the training time)
    .venv/bin/ferret demo --figs figs     # also refresh the README's figures (figs/ of the repository)
    .venv/bin/ferret demo --tiny          # a smoke test of every stage in seconds
    .venv/bin/ferret demo --seeds 0 1 2   # once per seed (runs/demo-seeds/seed-N/): the metrics' mean ± sd
    .venv/bin/ferret demo --curve --max-steps 2700 --save-steps 300   # the metrics along a longer run
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from ferret.data.toy import WorldConfig
    from ferret.train.tower_pretraining import TowerPretrainingConfig

logger = logging.getLogger(__name__)

# Headline numbers: keys of `ferret.eval.toy.score_toy`'s summary, copied into metrics.json under the same names.
HEADLINE = (
    "refer_point_accuracy",
    "refer_box_accuracy",
    "refer_free_form_accuracy",
    "refer_accuracy",
    "refer_choice_accuracy",
    "ground_acc@0.5",
    "describe_recall@0.5",
    "yesno_accuracy",
    # The name-swap probe: does the model read the object named in the question? (ferret.eval.toy)
    "probe_ground_reads_name",
    "probe_ground_same_box",
    "probe_yesno_consistent",
    "probe_name_token_tv",
)
CHECKPOINT_DIR = "checkpoint"
VISION_TOWER_DIR = "vision_tower"
ANSWERS_FILE = "test_answers.jsonl"
FIGURES = ("toy_training_curve.png", "toy_grounding_examples.png")
CURVE_FIGURE = "toy_metric_curve.png"  # with --curve
RUN_STAMP = "demo_run.json"  # in the trainer's output_dir: the settings its checkpoints belong to
DEFAULT_THREADS = 1


@dataclass
class DemoConfig:
    """Everything the demo's result depends on; the defaults are the `make demo` run.

    Sizes were chosen by measurement (see the report in the README): a ~1.4M-parameter model on 56 px images
    (7 px patches, 64 image tokens).
    """

    # The world.
    num_train: int = 8000
    num_test: int = 500
    image_size: int = 56
    max_objects: int = 2
    # Shape sizes as fractions of the image side (the toy default is 0.2-0.36): 17-28 px shapes on 56 px images.
    min_size_fraction: float = 0.3
    max_size_fraction: float = 0.5
    vocab_size: int = 512
    world_seed: int = 0
    # The model (ferret.model.configuration.small).
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    vision_hidden: int = 64
    # Ferret reads the penultimate layer, so 3 layers give 2 that matter.
    vision_layers: int = 3
    patch_size: int = 7
    num_init_point: int = 32
    num_sub_point: tuple[int, ...] = (8, 4)
    num_neighbor: tuple[int, ...] = (4, 4)
    # Stage 0: the vision tower (see ferret.train.tower_pretraining). 1,000 stage-0 and 900 training steps under bf16
    # autocast keep `make demo` within 12 minutes on one core, also beside another CPU-heavy job.
    tower_steps: int = 1000
    tower_batch_size: int = 64
    tower_learning_rate: float = 5e-3
    tower_box_weight: float = 0.5
    tower_digit_weight: float = 0.5
    # Training.
    max_steps: int = 900
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    # The trainer's --loss_average. "token" (the original's); "sample" weighs a one-word answer as much as a
    # described image, and measured worse here (3 seeds: grounding 33% vs 64%, description recall 24% vs 45%).
    loss_average: str = "token"
    seed: int = 0
    logging_steps: int = 10
    # A resumable checkpoint every this many steps (0: a sixth of max_steps, at least 25).
    save_steps: int = 0
    # Evaluation.
    eval_batch_size: int = 32
    max_new_tokens: int = 64
    # Threads for torch (see the module docstring for why 1).
    threads: int = DEFAULT_THREADS
    # "bf16": stage 0 and training under bf16 autocast (weights stay fp32); "fp32"; "auto": bf16 where the CPU
    # has native bf16 matrix instructions (AVX512-BF16/AMX: ~1.6x faster steps), else fp32.
    precision: str = "auto"

    def __post_init__(self) -> None:
        self.num_sub_point = tuple(int(v) for v in self.num_sub_point)
        self.num_neighbor = tuple(int(v) for v in self.num_neighbor)
        for name in ("num_train", "num_test", "max_steps", "batch_size", "eval_batch_size", "max_new_tokens",
                     "tower_steps", "tower_batch_size", "threads", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"DemoConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.save_steps < 0:
            raise ValueError(f"DemoConfig.save_steps must be >= 0, got {self.save_steps}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"DemoConfig.precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")

    @property
    def bf16(self) -> bool:
        if self.precision == "auto":
            return native_bf16()
        return self.precision == "bf16"

    @property
    def checkpoint_every(self) -> int:
        return self.save_steps or max(25, self.max_steps // 6)


# `--quick`: the same model and recipe, on a smaller world with shorter stages; a look at every stage and output
# in about 2 minutes of one core (its numbers are far below the full run's).
QUICK = {"num_train": 1000, "num_test": 100, "tower_steps": 150, "max_steps": 150, "logging_steps": 5}
# `--tiny`: a smoke test of every stage in seconds (what the tests of the README's commands use); its numbers mean
# nothing.
TINY = {"num_train": 40, "num_test": 20, "vocab_size": 360, "tower_steps": 3, "tower_batch_size": 8, "max_steps": 4,
        "batch_size": 4, "eval_batch_size": 20, "max_new_tokens": 12, "logging_steps": 1}


# ----------------------------------------------------------------------------------------------------------
# Threads, quiet libraries, stage banners


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (oneDNN's check); elsewhere bf16 is emulated and slow."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def use_threads(threads: int) -> None:
    """Fix torch's thread count (intra-op, and inter-op when still possible) and make its algorithms deterministic."""
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # inter-op threads can be set once, before any parallel work
        pass
    torch.use_deterministic_algorithms(True)


def quiet_libraries() -> None:
    """No weight-loading bars, no advisory warnings repeated per step; the demo's own progress stays."""
    import warnings

    if not os.environ.get("CUDA_VISIBLE_DEVICES") and shutil.which("nvidia-smi") is None:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # deepspeed otherwise warns that it fell back to the CPU
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    for name in ("matplotlib", "PIL", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("once", category=FutureWarning)
    warnings.filterwarnings("once", category=UserWarning)


def _minutes(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min"


# CPU seconds per unit of work with 1 thread, measured on the 2-core AMD EPYC machine (AVX512-BF16), 2026-11-30:
# the process's own CPU time, i.e. what a run takes when it has one core to itself. The banners' expectations are
# these times the amount of work; under heavier load the ETA is rescaled by what the finished stages took.
SECONDS_PER = {
    "world_record": 0.0014,  # one generated record (image + masks + text)
    "tower_image": 0.0021,  # one image through stage 0, forward + backward (bf16 autocast; fp32 ~1.2x)
    "tower_load_record": 0.0012,  # one image's patch targets
    "train_sample": 0.034,  # one training sample, forward + backward, batch 16 (bf16 autocast; fp32 ~1.15x)
    "train_start": 8.0,  # building the model and the dataset
    "eval_record": 0.03,  # one test answer (greedy, batched)
    "figures": 3.0,
}
FP32_SLOWDOWN = {"tower_image": 1.2, "train_sample": 1.15}


class Stages:
    """Prints a banner per stage (what, expected duration, ETA of the stage and of the whole demo) and keeps time.

    ``plan`` maps a stage key to (title, expected seconds). A stage reused from a cache is expected to take ~1 s.
    """

    def __init__(self, plan: dict[str, tuple[str, float]], out=None):
        self.plan = dict(plan)
        self._out = out
        self.done: dict[str, float] = {}
        self.start_time = time.time()
        self._stage: str | None = None
        self._stage_start = 0.0

    @property
    def out(self):
        return self._out if self._out is not None else sys.stdout

    def expect(self, key: str, seconds: float) -> None:
        title, _ = self.plan[key]
        self.plan[key] = (title, seconds)

    def slowdown(self) -> float:
        """How much slower than expected the finished stages ran (1 when none finished or they were faster)."""
        expected = sum(self.plan[k][1] for k in self.done)
        actual = sum(self.done.values())
        if expected < 5 or actual < 5:
            return 1.0
        return max(1.0, min(50.0, actual / expected))

    def begin(self, key: str, detail: str = "") -> None:
        keys = list(self.plan)
        title, expected = self.plan[key]
        factor = self.slowdown()
        remaining = sum(self.plan[k][1] for k in keys[keys.index(key):] if k not in self.done) * factor
        now = time.time()
        finish = datetime.datetime.fromtimestamp(now + expected * factor).strftime("%H:%M:%S")
        demo_end = datetime.datetime.fromtimestamp(now + remaining).strftime("%H:%M:%S")
        slower = f"; running {factor:.1f}x slower than on an idle core" if factor > 1.2 else ""
        print(f"\n=== [{keys.index(key) + 1}/{len(keys)}] {title}{': ' + detail if detail else ''}\n"
              f"    expected ~{_minutes(expected * factor)} (ETA {finish}); the demo ends ~{demo_end}{slower}",
              file=self.out, flush=True)
        self._stage, self._stage_start = key, time.perf_counter()

    def end(self, note: str = "") -> float:
        key = self._stage
        seconds = time.perf_counter() - self._stage_start
        self.done[key] = seconds
        print(f"    done in {_minutes(seconds)}{' (' + note + ')' if note else ''}", file=self.out, flush=True)
        return seconds


# ----------------------------------------------------------------------------------------------------------
# 1. World and tokenizer


def world_config(config: DemoConfig) -> "WorldConfig":
    from ferret.data.toy import WorldConfig

    return WorldConfig(max_objects=config.max_objects, min_size_fraction=config.min_size_fraction,
                       max_size_fraction=config.max_size_fraction)


def _world_stamp(config: DemoConfig) -> dict[str, Any]:
    return {
        "seed": config.world_seed,
        "image_size": config.image_size,
        "sizes": {"train": config.num_train, "val": 0, "test": config.num_test},
        "config": json.loads(json.dumps(dataclasses.asdict(world_config(config)))),
        "vocab_size": config.vocab_size,
    }


def world_is_ready(world_dir: Path, config: DemoConfig) -> bool:
    """Whether ``world_dir`` holds the world and tokenizer of these settings."""
    stamp = world_dir / "demo_world.json"
    return (stamp.is_file() and json.loads(stamp.read_text()) == _world_stamp(config)
            and (world_dir / "tokenizer" / "tokenizer.json").is_file())


def prepare_world(world_dir: Path, config: DemoConfig) -> tuple[Path, Path, bool]:
    """Generates the world and its tokenizer under ``world_dir`` unless they are there with the same settings.

    Returns (world folder, tokenizer folder, whether they were reused).
    """
    from ferret.data.toy import make_world, train_toy_tokenizer, world_corpus

    world = world_config(config)
    tokenizer_dir = world_dir / "tokenizer"
    if world_is_ready(world_dir, config):
        logger.info("reusing the toy world in %s", world_dir)
        return world_dir, tokenizer_dir, True
    if world_dir.exists():
        shutil.rmtree(world_dir)
    start = time.perf_counter()
    splits = make_world(world_dir, num_train=config.num_train, num_val=0, num_test=config.num_test,
                        image_size=config.image_size, seed=config.world_seed, config=world)
    train_toy_tokenizer(tokenizer_dir, world_corpus(splits["train"]), vocab_size=config.vocab_size)
    (world_dir / "demo_world.json").write_text(json.dumps(_world_stamp(config), indent=2) + "\n")
    logger.info("generated the toy world (%d train, %d test) and its tokenizer in %.0f s", config.num_train,
                config.num_test, time.perf_counter() - start)
    return world_dir, tokenizer_dir, False


def tower_recipe(config: DemoConfig) -> "TowerPretrainingConfig":
    """The demo's settings for stage 0 (`ferret.train.tower_pretraining`)."""
    from ferret.train.tower_pretraining import TowerPretrainingConfig

    return TowerPretrainingConfig(steps=config.tower_steps, batch_size=config.tower_batch_size,
                                  learning_rate=config.tower_learning_rate, box_weight=config.tower_box_weight,
                                  digit_weight=config.tower_digit_weight,
                                  seed=config.seed, bf16=config.bf16)


def write_model_config(path: Path, tokenizer_dir: Path, config: DemoConfig) -> tuple[Path, dict]:
    """The ``--init_config`` JSON: the size fields of `ferret.model.configuration.small` for this tokenizer.

    Only sizes go in the file: the trainer's own flags (``--add_region_feature``, ``--vision_tower`` ...) must not
    be overridden. Returns (path, the vision tower's CLIP config).
    """
    from transformers import AutoTokenizer

    from ferret.constants import REGION_TOKEN
    from ferret.model.configuration import small

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    vocab = len(tokenizer) + (0 if REGION_TOKEN in tokenizer.get_vocab() else 1)  # <region_fea> is appended
    model_config = small(vocab, hidden=config.hidden, layers=config.layers, heads=config.heads,
                         vision_hidden=config.vision_hidden, vision_layers=config.vision_layers,
                         image_size=config.image_size, patch_size=config.patch_size,
                         num_init_point=config.num_init_point, num_sub_point=config.num_sub_point,
                         num_neighbor=config.num_neighbor)
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "vision_config",
            "mm_hidden_size", "image_size", "sampler_num_init_point", "sampler_num_sub_point",
            "sampler_num_neighbor", "im_region_fea_token")
    fields = {k: getattr(model_config, k) for k in keys}
    fields["vision_config"] = dict(fields["vision_config"])
    path.write_text(json.dumps(fields, indent=2) + "\n")
    return path, fields["vision_config"]


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tower_key(vision_config: dict, world_dir: Path, config: DemoConfig) -> str:
    """The stage-0 cache key: a hash of the tower's settings, the threads (float sums depend on them) and the
    world's training split (the records, which name every image and its objects)."""
    settings = {
        "vision_config": vision_config,
        "steps": config.tower_steps,
        "batch_size": config.tower_batch_size,
        "learning_rate": config.tower_learning_rate,
        "box_weight": config.tower_box_weight,
        **({"digit_weight": config.tower_digit_weight} if config.tower_digit_weight else {}),
        "seed": config.seed,
        "threads": config.threads,
        "bf16": config.bf16,
        "world_train": _sha256_file(world_dir / "train.json"),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def cached_vision_tower(root: Path, vision_config: dict, world_dir: Path, tokenizer_dir: Path,
                        config: DemoConfig) -> tuple[Path, dict[str, Any], bool]:
    """Stage 0 through its cache: ``root/<key>/`` holds the tower and ``stage0.json`` (its facts).

    Returns (tower folder, facts, whether it came from the cache). A new tower is written into a staging folder
    and renamed when complete, so an interrupted stage 0 never leaves a tower that looks finished.
    """
    key = tower_key(vision_config, world_dir, config)
    path = root / key
    facts_file = path / "stage0.json"
    if facts_file.is_file() and (path / "config.json").is_file():
        return path, json.loads(facts_file.read_text()), True
    staging = root / f"tmp-{key}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    from ferret.train.tower_pretraining import pretrain_vision_tower

    facts = pretrain_vision_tower(staging, vision_config, world_dir, tokenizer_dir, world_config(config).names,
                                  tower_recipe(config))
    facts["key"] = key
    (staging / "stage0.json").write_text(json.dumps(facts, indent=2) + "\n")
    shutil.rmtree(path, ignore_errors=True)
    os.replace(staging, path)
    return path, facts, False


# ----------------------------------------------------------------------------------------------------------
# 2. Training and 3. evaluation, through the real entry points


@dataclass
class Prepared:
    """What training needs besides the settings: the world, its tokenizer, the model config and vision tower."""

    world_dir: Path
    tokenizer_dir: Path
    model_config: Path
    vision_tower: Path
    vision_tower_facts: dict[str, Any]


def prepare(out_dir: Path, config: DemoConfig, stages: Stages | None = None) -> Prepared:
    """World + tokenizer (cached), the --init_config JSON, then the vision tower (stage 0, cached)."""
    stages = stages or Stages(plan_stages(config, out_dir), out=io.StringIO())
    if world_is_ready(out_dir / "world", config):
        stages.expect("world", 1.0)
    stages.begin("world", f"{config.num_train:,} training and {config.num_test:,} test records, "
                          f"{config.image_size} px images")
    world_dir, tokenizer_dir, reused = prepare_world(out_dir / "world", config)
    stages.end("reused" if reused else "")
    model_config, vision_config = write_model_config(out_dir / "model_config.json", tokenizer_dir, config)
    if (out_dir / VISION_TOWER_DIR / tower_key(vision_config, world_dir, config) / "stage0.json").is_file():
        stages.expect("tower", 1.0)
    stages.begin("tower", f"{config.tower_steps:,} steps of batch {config.tower_batch_size}")
    tower, facts, cached = cached_vision_tower(out_dir / VISION_TOWER_DIR, vision_config, world_dir, tokenizer_dir,
                                               config)
    stages.end(f"reused {_display(tower)}" if cached else f"saved {_display(tower)}")
    facts = {**facts, "path": str(tower.resolve()), "cached": cached}
    return Prepared(world_dir.resolve(), tokenizer_dir.resolve(), model_config.resolve(), tower.resolve(), facts)


def train_args(prepared: Prepared, output_dir: Path, config: DemoConfig, region_feature: bool = True,
               keep_checkpoints: bool = False) -> list[str]:
    """The `python -m ferret.train.train` command line of the demo run.

    Checkpoints every `DemoConfig.checkpoint_every` steps (the last one kept, or all with ``keep_checkpoints``) and
    resumes from the latest one in ``output_dir`` (the trainer's default); deterministic algorithms and a seeded
    data order."""
    return [
        "--init_config", str(prepared.model_config),
        "--vision_tower", str(prepared.vision_tower),
        "--tokenizer_path", str(prepared.tokenizer_dir),
        "--data_path", str(prepared.world_dir / "train.json"),
        "--image_folder", str(prepared.world_dir),
        "--dataset_type", "toy",
        "--add_region_feature", str(region_feature),
        "--output_dir", str(output_dir),
        "--max_steps", str(config.max_steps),
        "--per_device_train_batch_size", str(config.batch_size),
        "--learning_rate", str(config.learning_rate),
        "--lr_scheduler_type", "cosine",
        "--warmup_ratio", str(config.warmup_ratio),
        "--weight_decay", str(config.weight_decay),
        "--loss_average", config.loss_average,
        "--max_grad_norm", "1.0",
        "--logging_steps", str(config.logging_steps),
        "--save_strategy", "steps",
        "--save_steps", str(config.checkpoint_every),
        *(() if keep_checkpoints else ("--save_total_limit", "1")),
        "--report_to", "tensorboard",
        "--seed", str(config.seed),
        "--data_seed", str(config.seed),
        "--full_determinism", "True",
        "--model_max_length", "512",
        "--dataloader_num_workers", "0",
        "--use_cpu", "True",
        "--bf16", str(config.bf16),
        "--disable_tqdm", "False",
    ]


def _run_stamp(argv: list[str], config: DemoConfig) -> dict[str, Any]:
    """What a resumable training run depends on: its command line (which names the stage-0 tower by its key, a
    hash that covers the world's training split) and the threads."""
    return {"argv": argv, "threads": config.threads}


def train(prepared: Prepared, run_dir: Path, config: DemoConfig, region_feature: bool = True,
          keep_checkpoints: bool = False) -> dict[str, Any]:
    """Trains through `ferret.train.train.main` and copies the final model to ``run_dir/checkpoint``.

    An earlier run with the same settings is resumed from its latest checkpoint (a finished one only publishes its
    model again); one with other settings is removed first. Returns training facts: steps, seconds, seconds per
    step, final loss, the step it resumed from and the command.
    """
    from ferret.train.trainer import latest_checkpoint
    from ferret.train.train import FINAL_DIR
    from ferret.train.train import main as train_main

    output_dir = run_dir / "train"
    argv = train_args(prepared, output_dir, config, region_feature, keep_checkpoints)
    stamp, stamp_file = _run_stamp(argv, config), output_dir / RUN_STAMP
    if output_dir.exists() and (not stamp_file.is_file() or json.loads(stamp_file.read_text()) != stamp):
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stamp_file.write_text(json.dumps(stamp, indent=2) + "\n")
    resumed = latest_checkpoint(str(output_dir))
    resumed_step = int(Path(resumed).name.rsplit("-", 1)[1]) if resumed else 0
    if resumed:
        print(f"    resuming from {_display(Path(resumed))} (step {resumed_step} of {config.max_steps})", flush=True)
    logger.info("training: python -m ferret.train.train %s", " ".join(argv))
    start, cpu_start = time.perf_counter(), time.process_time()
    code = train_main(argv)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    if code:
        raise RuntimeError(f"ferret.train.train exited with {code}")
    checkpoint = run_dir / CHECKPOINT_DIR
    staging = run_dir / f"tmp-{CHECKPOINT_DIR}"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(output_dir / FINAL_DIR, staging)
    shutil.rmtree(checkpoint, ignore_errors=True)
    os.replace(staging, checkpoint)
    history = training_history(output_dir)
    losses = [loss for _, loss in history.total]
    steps_run = max(1, config.max_steps - resumed_step)
    return {
        "steps": config.max_steps,
        "resumed_from_step": resumed_step,
        "seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / steps_run, 4),
        "cpu_seconds": round(cpu_seconds, 1),  # the process's own CPU time: steadier than wall time under load
        "final_loss": losses[-1] if losses else None,
        "command": "python -m ferret.train.train " + " ".join(argv),
    }


@dataclass
class TrainingHistory:
    """The training losses the trainer logged, as (step, value) pairs in step order.

    ``total`` is the logged ``loss`` (the trainer's own average over the logging interval); ``tasks`` maps each record
    task to its ``loss_<task>``: the mean over that task's samples of their mean answer-token loss, in the toy-world
    task order (``ferret.data.toy.TASKS``) and then by name. A logging interval without a sample of a task has no
    point for it.
    """

    total: list[tuple[int, float]]
    tasks: dict[str, list[tuple[int, float]]]


def training_history(output_dir: Path) -> TrainingHistory:
    """The losses logged in ``output_dir/trainer_state.json`` (empty when the file is not there)."""
    from ferret.data.toy import TASKS

    state_file = output_dir / "trainer_state.json"
    if not state_file.is_file():
        return TrainingHistory([], {})
    entries = json.loads(state_file.read_text()).get("log_history", [])
    total: list[tuple[int, float]] = []
    tasks: dict[str, list[tuple[int, float]]] = {}
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"{state_file}: log_history[{index}] must be an object, got {entry!r:.80}")
        losses = {key: value for key, value in entry.items() if key == "loss" or key.startswith("loss_")}
        if not losses:
            continue
        try:
            step = int(entry["step"])
            values = {key: float(value) for key, value in losses.items()}
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{state_file}: log_history[{index}] needs an integer step and numeric losses, got "
                             f"{ {k: entry.get(k) for k in ('step', *losses)} } ({err!r})") from None
        for key, value in values.items():
            series = total if key == "loss" else tasks.setdefault(key[len("loss_"):], [])
            series.append((step, value))
    order = {task: i for i, task in enumerate(TASKS)}
    ranked = sorted(tasks, key=lambda task: (order.get(task, len(order)), task))
    return TrainingHistory(sorted(total), {task: sorted(tasks[task]) for task in ranked})


def evaluate(checkpoint: Path, world_dir: Path, run_dir: Path, config: DemoConfig,
             region_feature: bool = True) -> dict[str, Any]:
    """`python -m ferret.eval.toy infer` then `score` on the test split; returns the scorer's metrics."""
    from ferret.eval.common import metrics_path
    from ferret.eval.toy import main as toy_main

    answers = run_dir / ANSWERS_FILE
    infer = ["infer", "--model-path", str(checkpoint), "--annotation-file", str(world_dir / "test.json"),
             "--answers-file", str(answers), "--device", "cpu", "--batch-size", str(config.eval_batch_size),
             "--max-new-tokens", str(config.max_new_tokens), "--overwrite"]
    if not region_feature:
        infer.append("--no-region-feature")
    start = time.perf_counter()
    toy_main(infer)
    toy_main(["score", "--predictions", str(answers), "--annotation-file", str(world_dir / "test.json")])
    metrics = json.loads(metrics_path(answers).read_text())
    metrics["eval_seconds"] = round(time.perf_counter() - start, 1)
    return metrics


def headline(metrics: dict[str, Any]) -> dict[str, float | None]:
    summary = metrics["summary"]
    return {name: summary.get(name) for name in HEADLINE}


def metric_curve(prepared: Prepared, out_dir: Path, config: DemoConfig, final: dict[str, Any]) -> dict[int, dict]:
    """The headline metrics of every checkpoint the training kept (``train/checkpoint-N``), each evaluated on the
    whole test split into ``curve/step-N/``, plus ``final`` (the finished run's, at ``max_steps``); writes and
    returns ``curve.json``: step -> metrics."""
    from ferret.train.trainer import CHECKPOINT_RE

    steps = sorted(int(m.group(1)) for m in (CHECKPOINT_RE.match(p.name) for p in (out_dir / "train").iterdir())
                   if m and int(m.group(1)) < config.max_steps)
    curve = {}
    for step in steps:
        run_dir = out_dir / "curve" / f"step-{step}"
        run_dir.mkdir(parents=True, exist_ok=True)
        curve[step] = headline(evaluate(out_dir / "train" / f"checkpoint-{step}", prepared.world_dir, run_dir,
                                        config))
    curve[config.max_steps] = dict(final)
    (out_dir / "curve.json").write_text(json.dumps({str(k): v for k, v in curve.items()}, indent=2) + "\n")
    return curve


# The targets the toy recipe is measured against (fractions), drawn on the metric curve.
TARGETS = {"refer_point_accuracy": 0.92, "refer_box_accuracy": 0.92, "refer_free_form_accuracy": 0.92,
           "ground_acc@0.5": 0.85, "describe_recall@0.5": 0.75, "yesno_accuracy": 0.90}


def plot_metric_curve(curve: dict[int, dict[str, float | None]], path: Path) -> Path:
    """Each headline metric (%) against the training step (`metric_curve`), its target as a dotted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(curve)
    fig, ax = plt.subplots(figsize=(8, 4.4), dpi=110, layout="constrained")
    plotted = [m for m in HEADLINE if m not in ("refer_accuracy", "probe_ground_same_box", "probe_name_token_tv")]
    for i, metric in enumerate(plotted):
        points = [(step, 100 * curve[step][metric]) for step in steps if curve[step].get(metric) is not None]
        if not points:
            continue
        color = f"C{i}"
        ax.plot(*zip(*points), marker="o", markersize=3, color=color, label=metric)
        if metric in TARGETS:
            ax.axhline(100 * TARGETS[metric], color=color, linestyle=":", linewidth=1)
    ax.set_xlabel("training step")
    ax.set_ylabel("toy test split (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title("Metrics of the checkpoints along one run (dotted: the targets)", fontsize=10)
    fig.legend(fontsize=7, loc="outside right upper")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------
# Figures


# Box colours of the grounding figure: a neutral dark grey (solid) for the truth and magenta (dashed) for the
# prediction, each at least 100 apart in RGB from every fill colour of the toy world (ferret.data.toy.COLOR_RGB),
# from its light-grey backgrounds and from the other: further than any two fills are from each other.
TRUTH_BOX_RGB = (80, 80, 80)
PREDICTED_BOX_RGB = (255, 0, 255)
PREDICTED_BOX_DASHES = (0, (3, 2))  # matplotlib's (offset, (on, off)) in line widths
# A prediction is right when its box overlaps the true one this much (the toy scorer's ground_acc@0.5).
IOU_RIGHT = 0.5
# The training curve's smoothing: a trailing mean over this fraction of the logged points (none below 50 points).
SMOOTHING_FRACTION = 1 / 25


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average: value i becomes the mean of ``values[max(0, i - window + 1) : i + 1]``."""
    if window < 1:
        raise ValueError(f"the smoothing window must be >= 1, got {window}")
    out, running = [], 0.0
    for i, value in enumerate(values):
        running += value
        if i >= window:
            running -= values[i - window]
        out.append(running / min(i + 1, window))
    return out


def plot_training_curve(histories: dict[str, TrainingHistory], path: Path) -> Path:
    """Training loss vs step: one panel per run (``histories``' keys are the panel titles), each with the total loss
    (black) and one line per record task (one colour per task in every panel), lightly smoothed (the title says how),
    on a log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    runs = dict(histories) or {"no run": TrainingHistory([], {})}
    tasks = list(dict.fromkeys(task for history in runs.values() for task in history.tasks))
    task_colors = {task: plt.get_cmap("tab10")(i % 10) for i, task in enumerate(tasks)}
    window = max(1, int(max(len(h.total) for h in runs.values()) * SMOOTHING_FRACTION))
    fig, axes = plt.subplots(1, len(runs), figsize=(2.0 + 5.0 * len(runs), 4.0), dpi=120, sharey=True,
                             squeeze=False, layout="constrained")
    positive = True
    for ax, (label, history) in zip(axes[0], runs.items()):
        series = [(task, history.tasks[task], task_colors[task], 1.1) for task in tasks if history.tasks.get(task)]
        if history.total:
            series.append(("total", history.total, "black", 2.0))
        for name, points, color, width in series:
            steps, values = zip(*points)
            positive = positive and min(values) > 0
            marker = "o" if len(points) <= 30 else None  # a task seen in one logging interval is still visible
            ax.plot(steps, smooth(values, window), color=color, linewidth=width, marker=marker, markersize=3,
                    label=name)
        if not history.total:
            ax.text(0.5, 0.5, "no training log", transform=ax.transAxes, ha="center", va="center")
        elif not history.tasks:
            ax.text(0.98, 0.98, "no per-task losses in this log", transform=ax.transAxes, ha="right", va="top",
                    fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("training loss (per answer token)")
    if positive and any(h.total for h in runs.values()):
        axes[0][0].set_yscale("log")
        axes[0][0].yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))  # 0.5, 1, 2, 5 rather than 5x10^-1
        axes[0][0].yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.3g}"))
        axes[0][0].yaxis.set_minor_formatter(NullFormatter())
    how = f"smoothed: trailing mean of {window} logged points" if window > 1 else "as logged, not smoothed"
    fig.suptitle(f"Toy-world Ferret on CPU: training loss per task and in total\n({how})", fontsize=10)
    handles = {}  # label -> line, one entry per task across the panels
    for ax in axes[0]:
        for line, name in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(name, line)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize=8, title="loss")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _short(text: str, limit: int = 30) -> str:
    """``text`` on one line, cut to ``limit`` characters (a caption stays inside its panel)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def grounding_verdict(record: dict[str, Any], prediction: dict[str, Any] | None
                      ) -> tuple[tuple[float, float, float, float] | None, str, bool]:
    """(the predicted inclusive pixel box or None, a caption, whether it is right) for a toy ``ground`` record,
    judged as the toy scorer judges it: the answer's first region, a box with IoU >= 0.5 with the true box."""
    from ferret.eval.common import answer_boxes
    from ferret.eval.toy import pixel_iou

    if prediction is None or not isinstance(prediction.get("text"), str):
        return None, "no answer", False
    try:
        found = answer_boxes(prediction, int(record["image_w"]), int(record["image_h"]))
    except ValueError:
        return None, f"unreadable regions: “{_short(prediction['text'])}”", False
    if not found:
        text = _short(prediction["text"])
        return None, f"no box: “{text}”" if text else "no box: an empty answer", False
    first = found[0]
    named = f"“{_short(first.phrase)}”" if first.phrase else "(no name)"
    if first.is_point:
        return None, f"predicted: {named}\na point, not a box: wrong", False
    iou = pixel_iou(first.box, record["box_x1y1x2y2"][1][0])
    right = iou >= IOU_RIGHT
    verdict = f">= {IOU_RIGHT}: right" if right else f"< {IOU_RIGHT}: wrong"
    return first.box, f"predicted: {named}\nIoU {iou:.2f} {verdict}", right


def plot_grounding_examples(world_dir: Path, answers: Path, path: Path, count: int = 8) -> Path:
    """A grid of the first ``count`` test ``ground`` questions: each image enlarged (nearest pixels), the true box
    (dark grey, solid) and the predicted one (magenta, dashed), the object asked for above it and the predicted
    name, the IoU and the verdict below it, outside the image; a legend says which box is which."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle
    from PIL import Image

    from ferret.eval.common import read_jsonl
    from ferret.eval.toy import load_records, object_names

    records = [r for r in load_records(world_dir / "test.json") if r["task"] == "ground"][:count]
    predictions = {str(p["id"]): p for p in read_jsonl(answers)}
    columns = min(4, max(1, len(records)))
    rows = max(1, -(-len(records) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.5 * columns, 3.3 * rows + 0.5), dpi=110, squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    truth_color = tuple(c / 255 for c in TRUTH_BOX_RGB)
    predicted_color = tuple(c / 255 for c in PREDICTED_BOX_RGB)
    right = 0
    for ax, record in zip(axes.flat, records):
        with Image.open(world_dir / record["image"]) as image:
            pixels = image.convert("RGB")
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.imshow(pixels, interpolation="nearest")

        def outline(box: Sequence[float], color: tuple[float, ...], style: str | tuple) -> None:
            x1, y1, x2, y2 = box  # inclusive pixel corners: the outline runs along the pixels' outer edges
            ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1 + 1, y2 - y1 + 1, fill=False, edgecolor=color,
                                   linewidth=2.2, linestyle=style))

        outline(record["box_x1y1x2y2"][1][0], truth_color, "-")
        box, caption, correct = grounding_verdict(record, predictions.get(str(record["id"])))
        if box is not None:
            outline(box, predicted_color, PREDICTED_BOX_DASHES)
        ax.set_xlim(-0.5, pixels.width - 0.5)  # a predicted box reaching past the image is cut at its edge
        ax.set_ylim(pixels.height - 0.5, -0.5)
        right += correct
        names = object_names(record["conversations"][0]["value"])
        ax.set_title(f"true: the {names[0]}" if names else f"true: {record['id']}", fontsize=9)
        ax.set_xlabel(caption, fontsize=8)
    if not records:
        axes[0][0].text(0.5, 0.5, "no ground questions in the test split", ha="center", va="center")
    fig.suptitle(f"Grounding on the toy test split: {right} of {len(records)} shown right (IoU >= {IOU_RIGHT})",
                 fontsize=10)
    fig.legend([Line2D([], [], color=truth_color, linewidth=2.2),
                Line2D([], [], color=predicted_color, linewidth=2.2, linestyle=PREDICTED_BOX_DASHES)],
               ["true box", "predicted box"], loc="outside lower center", ncols=2, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------
# The demo


def _display(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it (shorter commands to copy)."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


def _chat_command(checkpoint: Path, world_dir: Path) -> str:
    """A `ferret serve cli` command (the venv's console script) asking about a box of a test image."""
    from ferret.eval.toy import load_records

    records = load_records(world_dir / "test.json")
    pick = next((r for r in records if r["task"] == "refer" and r["region_type"][0] == ["box"]), records[0])
    boxes = pick["box_x1y1x2y2"][0] or [pick["objects"][0]["box"]]
    region = ",".join(str(v) for v in boxes[0])
    return (f'.venv/bin/ferret serve cli --model-path {_display(checkpoint)} '
            f'--image-file {_display(world_dir / pick["image"])} '
            f'--query "What is <region0>?" --region box:{region}')


def _format(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:5.1f}"


def summary_table(runs: dict[str, dict[str, float | None]]) -> str:
    """Headline metrics (%) with one column per run."""
    names = list(runs)
    lines = ["metric".ljust(28) + "".join(n.rjust(14) for n in names)]
    for metric in HEADLINE:
        lines.append(metric.ljust(28) + "".join(_format(runs[n].get(metric)).rjust(14) for n in names))
    return "\n".join(lines)


def plan_stages(config: DemoConfig, out_dir: Path, ablation: bool = False,
                curve: bool = False) -> dict[str, tuple[str, float]]:
    """Each stage's title and expected seconds on an idle core (`SECONDS_PER`), before looking at any cache."""
    s = {k: v * (1.0 if config.bf16 else FP32_SLOWDOWN.get(k, 1.0)) for k, v in SECONDS_PER.items()}
    world = config.num_train * s["world_record"] + config.num_test * s["world_record"]
    tower = (config.tower_steps * config.tower_batch_size * s["tower_image"]
             + (config.num_train + config.num_test) * s["tower_load_record"])
    train = s["train_start"] + config.max_steps * config.batch_size * s["train_sample"]
    evaluate = config.num_test * s["eval_record"]
    plan = {
        "world": ("the toy world and its tokenizer", world),
        "tower": ("stage 0: pretrain the vision tower", tower),
        "train": ("train Ferret (ferret.train.train)", train),
        "eval": ("evaluate on the test split (ferret.eval.toy)", evaluate),
    }
    if curve:
        checkpoints = max(0, -(-config.max_steps // config.checkpoint_every) - 1)
        plan["curve"] = ("evaluate every checkpoint (the metric curve)", checkpoints * evaluate)
    if ablation:
        plan["train_off"] = ("train again without region features", train)
        plan["eval_off"] = ("evaluate that run", evaluate)
    plan["figures"] = ("figures", s["figures"])
    return plan


def normal_modes(folder: Path) -> int:
    """Gives files that were created private (0600: safetensors and atomic writes go through temporary files)
    the modes of any other file the umask allows; returns how many were changed."""
    umask = os.umask(0)
    os.umask(umask)
    wanted = 0o666 & ~umask
    changed = 0
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink() and (path.stat().st_mode & 0o777) == 0o600 and wanted != 0o600:
            path.chmod(wanted)
            changed += 1
    return changed


def run_demo(out_dir: str | os.PathLike = "runs/demo", config: DemoConfig | None = None, *,
             figs_dir: str | os.PathLike | None = None, ablation: bool = False, curve: bool = False, out=None,
             **overrides: Any) -> dict[str, Any]:
    """Builds the world, trains, evaluates, draws; returns what ``metrics.json`` holds (plus ``ablation``).

    ``overrides`` replace fields of ``config`` (e.g. ``max_steps=5``); ``figs_dir`` defaults to ``out_dir/figs``.
    torch's thread count and deterministic mode are restored afterwards (the demo may run inside another program).
    """
    import torch

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        return _run_demo(out_dir, config, figs_dir=figs_dir, ablation=ablation, curve=curve, out=out, **overrides)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _run_demo(out_dir, config, *, figs_dir, ablation, curve, out, **overrides) -> dict[str, Any]:
    config = dataclasses.replace(config or DemoConfig(), **overrides)
    out = out if out is not None else sys.stdout
    out_dir = Path(out_dir)
    figs_dir = Path(figs_dir) if figs_dir is not None else out_dir / "figs"
    out_dir.mkdir(parents=True, exist_ok=True)
    quiet_libraries()
    use_threads(config.threads)
    import transformers

    transformers.set_seed(config.seed)
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    print(f"torch threads: {config.threads} of {cores} cores (--threads to change: on shared cores a second thread "
          f"slows everything down when another job is busy); load average {load:.1f}"
          + (" - other jobs are running, expect longer times" if load > 0.5 else ""), file=out, flush=True)
    print(f"precision: {'bf16 autocast (the CPU has native bf16)' if config.bf16 else 'fp32'} "
          f"(--precision to change)", file=out, flush=True)
    stages = Stages(plan_stages(config, out_dir, ablation, curve), out=out)
    total_start = time.perf_counter()

    prepared = prepare(out_dir, config, stages)
    world_dir = prepared.world_dir
    stages.begin("train", f"{config.max_steps:,} steps of batch {config.batch_size}, a checkpoint every "
                          f"{config.checkpoint_every}; tensorboard --logdir {_display(out_dir / 'train' / 'runs')}")
    training = train(prepared, out_dir, config, region_feature=True, keep_checkpoints=curve)
    stages.end(f"{training['seconds_per_step']:.3f} s/step")
    checkpoint = out_dir / CHECKPOINT_DIR
    stages.begin("eval", f"{config.num_test:,} test questions, greedy")
    scores = evaluate(checkpoint, world_dir, out_dir, config, region_feature=True)
    stages.end()
    result: dict[str, Any] = {
        **headline(scores),
        "vision_tower": prepared.vision_tower_facts,
        "training": training,
        "eval_seconds": scores["eval_seconds"],
        "test_records": scores["alignment"]["evaluated"],
        "checkpoint": str(checkpoint),
        "threads": config.threads,
        "bf16": config.bf16,
        "config": dataclasses.asdict(config),
    }
    histories = {"region features on": training_history(out_dir / "train")}
    if curve:
        stages.begin("curve", f"every {config.checkpoint_every} steps")
        result["curve"] = metric_curve(prepared, out_dir, config, headline(scores))
        stages.end()

    if ablation:
        off_dir = out_dir / "ablation_no_region_feature"
        stages.begin("train_off", "coordinates only (--add_region_feature False)")
        off_training = train(prepared, off_dir, config, region_feature=False)
        stages.end()
        stages.begin("eval_off", "--no-region-feature")
        off_scores = evaluate(off_dir / CHECKPOINT_DIR, world_dir, off_dir, config, region_feature=False)
        stages.end()
        histories["region features off"] = training_history(off_dir / "train")
        comparison = {
            "region_feature_on": headline(scores),
            "region_feature_off": headline(off_scores),
            "training_on": training,
            "training_off": off_training,
            "note": "off = coordinates only (--add_region_feature False at training, --no-region-feature at eval)",
        }
        (out_dir / "ablation.json").write_text(json.dumps(comparison, indent=2) + "\n")
        result["ablation"] = {"on": comparison["region_feature_on"], "off": comparison["region_feature_off"]}

    stages.begin("figures", _display(figs_dir))
    plot_training_curve(histories, figs_dir / FIGURES[0])
    plot_grounding_examples(world_dir, out_dir / ANSWERS_FILE, figs_dir / FIGURES[1])
    if curve:
        plot_metric_curve(result["curve"], figs_dir / CURVE_FIGURE)
    stages.end()
    result["total_seconds"] = round(time.perf_counter() - total_start, 1)
    result["stage_seconds"] = {k: round(v, 1) for k, v in stages.done.items()}
    result["chat_command"] = _chat_command(checkpoint, world_dir)
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    normal_modes(out_dir)
    if figs_dir.exists():
        normal_modes(figs_dir)

    runs = {"demo": headline(scores)}
    if ablation:
        runs = {"region fea ON": result["ablation"]["on"], "region fea OFF": result["ablation"]["off"]}
    print("\n" + summary_table(runs), file=out)
    if "probe" in scores["results"]:
        from ferret.eval.toy import probe_legend

        print(probe_legend(scores["results"]["probe"]), file=out)
    tower = prepared.vision_tower_facts
    how = "cached" if tower["cached"] else f"{tower['seconds']:.0f} s"
    print(f"\nvision tower: {tower['steps']} steps ({how}), "
          f"names {100 * tower['test_object_patch_accuracy']:.1f}% of object patches, box corners off by "
          f"{tower['test_box_error_px']:.1f} px on average", file=out)
    resumed = f", resumed at step {training['resumed_from_step']}" if training["resumed_from_step"] else ""
    print(f"trained {training['steps']} steps in {training['seconds']:.0f} s{resumed}; "
          f"total {_minutes(result['total_seconds'])} with {config.threads} thread(s)", file=out)
    print(f"metrics: {_display(out_dir / 'metrics.json')}   figures: "
          + ", ".join(_display(figs_dir / name) for name in FIGURES), file=out)
    print(f"training logs: tensorboard --logdir {_display(out_dir / 'train' / 'runs')}", file=out)
    print(f"chat with it:\n  {result['chat_command']}", file=out, flush=True)
    return result


def seed_summary(results: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per variant (``on``; ``off`` when the runs had the ablation), each headline metric's per-seed values, mean
    and sample standard deviation (over the seeds that have it)."""
    variants = {"on": {seed: {m: result.get(m) for m in HEADLINE} for seed, result in results.items()}}
    if all("ablation" in result for result in results.values()):
        variants["off"] = {seed: result["ablation"]["off"] for seed, result in results.items()}
    summary: dict[str, Any] = {"seeds": sorted(results)}
    for variant, by_seed in variants.items():
        summary[variant] = {}
        for metric in HEADLINE:
            values = [by_seed[seed][metric] for seed in sorted(by_seed) if by_seed[seed].get(metric) is not None]
            mean = sum(values) / len(values) if values else None
            sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else None
            summary[variant][metric] = {"values": values, "mean": mean, "sd": sd}
    return summary


def seed_table(summary: dict[str, Any]) -> str:
    """The seeds' headline metrics (%), mean ± sd, one column per variant."""
    columns = [v for v in ("on", "off") if v in summary]
    titles = {"on": "region fea ON", "off": "region fea OFF"}
    lines = ["metric".ljust(28) + "".join(titles[c].rjust(18) for c in columns)]
    for metric in HEADLINE:
        cells = []
        for column in columns:
            entry = summary[column][metric]
            text = "-" if entry["mean"] is None else f"{100 * entry['mean']:.1f}"
            if entry["sd"] is not None:
                text += f" ± {100 * entry['sd']:.1f}"
            cells.append(text.rjust(18))
        lines.append(metric.ljust(28) + "".join(cells))
    return "\n".join(lines)


def run_seeds(out_dir: str | os.PathLike, seeds: Sequence[int], config: DemoConfig, *, ablation: bool = False,
              out=None) -> dict[str, Any]:
    """The demo once per seed, into ``out_dir/seed-<seed>/`` (a finished seed is only evaluated again; seeds can
    run in parallel in separate processes, then once more together for the table); writes and returns
    ``out_dir/seeds.json`` (`seed_summary`) and prints the table."""
    out = out if out is not None else sys.stdout
    out_dir = Path(out_dir)
    results = {}
    for seed in seeds:
        print(f"\n##### seed {seed}", file=out, flush=True)
        results[seed] = run_demo(out_dir / f"seed-{seed}", dataclasses.replace(config, seed=seed),
                                 ablation=ablation, out=out)
    summary = seed_summary(results)
    (out_dir / "seeds.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n{len(seeds)} seed(s) {', '.join(map(str, seeds))}: mean ± sd (%)\n" + seed_table(summary), file=out,
          flush=True)
    print(f"per seed: {_display(out_dir / 'seeds.json')}", file=out)
    return summary


def build_arg_parser() -> argparse.ArgumentParser:
    defaults = DemoConfig()
    parser = argparse.ArgumentParser(prog="ferret demo", description=__doc__.split("\n\n")[0],
                                     epilog="Run again with the same settings to resume an interrupted demo; the "
                                            "world and the stage-0 tower are reused.")
    parser.add_argument("--out", default=None, help="output folder (default runs/demo, runs/demo-quick with --quick)")
    parser.add_argument("--figs", default=None,
                        help="folder of the figures (default OUT/figs; `--figs figs` refreshes the README's)")
    parser.add_argument("--quick", action="store_true",
                        help="about 2 minutes: " + ", ".join(f"{k}={v}" for k, v in QUICK.items())
                             + " (options given explicitly win)")
    parser.add_argument("--tiny", action="store_true",
                        help="a smoke test in seconds (40 records, a few steps; overrides --quick): "
                             + ", ".join(f"{k}={v}" for k, v in TINY.items()))
    parser.add_argument("--ablation", action="store_true",
                        help="also train without region features (coordinates only) and compare")
    parser.add_argument("--curve", action="store_true",
                        help="keep every checkpoint, evaluate each on the test split and draw the metrics against "
                             "the step (OUT/curve.json, figs/toy_metric_curve.png)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                        help="run once per seed into OUT/seed-SEED/ and print the mean ± sd of the metrics "
                             "(OUT/seeds.json); finished seeds are reused")
    parser.add_argument("--threads", type=int, default=None,
                        help=f"torch CPU threads (default {DEFAULT_THREADS}: steady under load, reproducible)")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default=None,
                        help="auto (default): bf16 autocast where the CPU has native bf16, else fp32")
    parser.add_argument("--seed", type=int, default=None, help=f"default {defaults.seed}")
    for name in ("max_steps", "batch_size", "num_train", "num_test", "tower_steps", "save_steps"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                            help=f"default {getattr(defaults, name)}")
    parser.add_argument("--learning-rate", type=float, default=None, help=f"default {defaults.learning_rate}")
    parser.add_argument("--tower-digit-weight", type=float, default=None,
                        help=f"stage 0's box-digit loss weight (default {defaults.tower_digit_weight})")
    parser.add_argument("--loss-average", choices=("token", "sample"), default=None,
                        help=f"the trainer's --loss_average (default {defaults.loss_average})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = dict(QUICK) if args.quick else {}
    if args.tiny:
        overrides.update(TINY)
    for name in ("threads", "precision", "seed", "max_steps", "batch_size", "num_train", "num_test", "tower_steps", "save_steps",
                 "learning_rate", "loss_average", "tower_digit_weight"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    out = args.out or ("runs/demo-quick" if args.quick else "runs/demo")
    try:
        config = DemoConfig(**{**dataclasses.asdict(DemoConfig()), **overrides})
    except ValueError as err:
        print(f"ferret demo: error: {err}", file=sys.stderr)
        return 2
    if args.seeds:
        if args.figs:
            print("ferret demo: error: --figs draws one run's figures; leave it out with --seeds", file=sys.stderr)
            return 2
        run_seeds(args.out or out + "-seeds", args.seeds, config, ablation=args.ablation)
        return 0
    run_demo(out, config, figs_dir=args.figs, ablation=args.ablation, curve=args.curve)
    return 0


if __name__ == "__main__":
    sys.exit(main())
