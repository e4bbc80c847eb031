"""The Ferret training recipe: ``python -m ferret.train.train ARGS`` (or ``ferret train ARGS``).

One readable script, in the order it runs:

1. ``setup``: config files, distributed start-up (CPU + gloo under torchrun), logging, seed.
2. ``build_model``: a Vicuna/LLaMA base gets the Ferret modules (``<region_fea>`` added, embeddings resized to
   32001 with the new row = the mean row, LLaVA's stage-1 ``mm_projector.bin`` loaded if given); an existing
   Ferret checkpoint loads as is; ``--init_config`` builds a random model (tiny CPU runs). The CLIP tower is
   frozen and not a registered module, so ZeRO-3/FSDP never partition it (it is loaded outside ZeRO-3's
   ``zero.Init``) and it follows the LLM's device and dtype on every forward.
3. ``configure_trainable``: docs/compatibility.md §9.3 (freeze_backbone, tune_mm_mlp_adapter, freeze_mm_mlp_adapter),
   LoRA / QLoRA through peft, gradient checkpointing.
4. the data: `ferret.data.grit.GritDataset` + `FerretCollator`.
5. ``train``: `FerretTrainer` (atomic checkpoints in the original layout, throughput logs), resuming from the
   latest COMPLETE ``checkpoint-N`` in ``--output_dir`` (or ``--resume_from_checkpoint PATH``; ``no`` starts
   afresh).
6. the final save: ``<output_dir>/final-checkpoint/`` (the original's name, kept so its scripts find it): model,
   config, tokenizer, preprocessor_config.json, ``vision_tower/``; ``trainer_state.json`` in ``output_dir``.

Distributed runs use what HF provides: ``deepspeed --num_gpus 8 --module ferret.train.train --deepspeed
scripts/zero3.json ...`` or ``torchrun`` (DDP, DeepSpeed, or FSDP via ``--fsdp "full_shard auto_wrap"
--fsdp_transformer_layer_cls_to_wrap LlamaDecoderLayer``). Nothing hard-codes CUDA: on a machine without GPUs,
torchrun processes talk over gloo (docs/compatibility.md §9.4: there accelerate runs ``--fsdp`` as plain DDP).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Sequence

import torch
import torch.distributed as dist
import transformers

from ferret.train.arguments import (
    DataArguments,
    ModelArguments,
    TrainingArguments,
    as_dict,
    expand_config_files,
    parse_args,
)
from ferret.model.checkpoint import MANIFEST_NAME, file_problem, fsync_path, write_manifest
from ferret.train.trainer import (
    FerretTrainer,
    SkipCountingCollator,
    SkipCountingDataset,
    WEIGHT_FILES,
    checkpoint_problems,
    latest_checkpoint,
    remove_staging_folders,
)

logger = logging.getLogger("ferret.train")

FINAL_DIR = "final-checkpoint"
BASE_MODEL_DIR = "base_model"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NAMED_CONFIGS = ("small", "ferret_7b", "ferret_13b")


# ---------------------------------------------------------------------------------------------------- 1. setup
def setup_distributed(argv: Sequence[str]) -> list[str]:
    """On a machine without CUDA, a torchrun/deepspeed-launched process group must use gloo, and HF's Trainer must
    reuse that state instead of building its own (which would count one process): create it before the
    TrainingArguments and tell them to use it. GPU machines need nothing here."""
    argv = list(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.cuda.is_available():
        return argv
    from accelerate import PartialState

    if any(w == "--deepspeed" or w.startswith("--deepspeed=") for w in argv):
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
    else:  # DDP / FSDP: accelerate's multi-CPU mode
        PartialState(cpu=True, backend="gloo")
    config: dict = {}
    if "--accelerator_config" in argv:
        at = argv.index("--accelerator_config")
        value = argv[at + 1]
        if value.lstrip().startswith("{"):
            config = json.loads(value)
        else:
            with open(value) as f:
                config = json.load(f)
        del argv[at:at + 2]
    config["use_configured_state"] = True
    return argv + ["--accelerator_config", json.dumps(config)]


def setup_logging(training_args: TrainingArguments) -> None:
    """INFO on the main process, warnings elsewhere (HF's --log_level / --log_level_replica)."""
    level = training_args.get_process_log_level()
    transformers.utils.logging.set_verbosity(level)
    # never quieter than WARNING: skipped records and torn checkpoints must always be reported
    logging.getLogger("ferret").setLevel(min(level, logging.WARNING))


@contextlib.contextmanager
def not_partitioned():
    """Models built inside this block are not wrapped in ZeRO-3's ``zero.Init``: the frozen, unregistered vision
    tower is never handed to DeepSpeed, so its parameters must stay whole."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def gathered(params, modifier_rank: int | None = 0):
    """Context in which ZeRO-3-partitioned parameters are whole (and edits on ``modifier_rank`` are kept)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=modifier_rank)


# ---------------------------------------------------------------------------------------------------- 2. the model
def _dtype(training_args: TrainingArguments) -> torch.dtype:
    """Weights load in fp32 (HF autocast / DeepSpeed keep fp32 masters); quantised loading computes in bf16/fp16."""
    if training_args.bits in (4, 8):
        return torch.bfloat16 if training_args.bf16 else torch.float16
    return torch.float32


def _quantization_config(training_args: TrainingArguments):
    if training_args.bits not in (4, 8):
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ImportError(f"--bits {training_args.bits} needs bitsandbytes and a CUDA GPU: pip install bitsandbytes "
                          "(or train with --bits 16)") from err
    from transformers import BitsAndBytesConfig

    # The Ferret modules and lm_head stay in full precision (docs/compatibility.md §9.3).
    skip = ["mm_projector", "region_geo_sampler", "lm_head"]
    if training_args.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=_dtype(training_args),
                              bnb_4bit_use_double_quant=training_args.double_quant,
                              bnb_4bit_quant_type=training_args.quant_type, llm_int8_skip_modules=skip)


def _load_tokenizer(path: str, training_args: TrainingArguments):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, use_fast=True, cache_dir=training_args.cache_dir,
                                         model_max_length=training_args.model_max_length, padding_side="right")


def _image_size_check(data_args: DataArguments, image_size: int) -> None:
    if data_args.resized_image_h is not None and data_args.resized_image_h != image_size:
        raise ValueError(f"--resized_image_h/w {data_args.resized_image_h} but the vision tower reads "
                         f"{image_size}x{image_size} images")


def _ferret_fields(model_args: ModelArguments, data_args: DataArguments) -> dict:
    return {
        "mm_vision_select_layer": model_args.mm_vision_select_layer,
        "mm_vision_select_feature": model_args.mm_vision_select_feature,
        "region_geo_sampler": model_args.region_geo_sampler,
        "sampler_pooler_mode": model_args.sampler_pooler_mode,
        "add_region_feature": model_args.add_region_feature,
        "region_feature_axes": model_args.region_feature_axes or "xy",
        "image_aspect_ratio": data_args.image_aspect_ratio,
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
    }


def is_ferret_checkpoint(path: str | None, cache_dir: str | None = None) -> bool:
    if path is None:
        return False
    from transformers import PretrainedConfig

    config, _ = PretrainedConfig.get_config_dict(path, cache_dir=cache_dir)
    return config.get("model_type") == "ferret"


def build_model(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments):
    """Returns (model, processor, starts_from_ferret_checkpoint)."""
    from ferret.processing import FerretProcessor

    path = model_args.model_name_or_path
    if model_args.init_config is not None:
        model, processor = _build_new(model_args, data_args, training_args)
        return model, processor, False
    if is_ferret_checkpoint(path, training_args.cache_dir):
        from ferret.model.configuration import FerretConfig
        from ferret.model.modeling import FerretLlamaForCausalLM

        overrides = {"region_feature_axes": model_args.region_feature_axes} if model_args.region_feature_axes else {}
        config = FerretConfig.from_pretrained(path, cache_dir=training_args.cache_dir, **overrides)
        logger.info("continuing from the Ferret checkpoint %s (region_feature_axes=%s)", path,
                    config.region_feature_axes)
        model = FerretLlamaForCausalLM.from_pretrained(
            path, config=config, load_vision_tower=False, dtype=_dtype(training_args),
            attn_implementation=model_args.attn_implementation, cache_dir=training_args.cache_dir,
            quantization_config=_quantization_config(training_args),
        )
        with not_partitioned():
            model.load_vision_tower(path if os.path.isdir(path) else None, source=model_args.vision_tower)
        processor = FerretProcessor.from_pretrained(path, image_aspect_ratio=data_args.image_aspect_ratio,
                                                    model_max_length=training_args.model_max_length)
        _image_size_check(data_args, config.image_size)
        return model, processor, True
    model, processor = _build_from_llama(model_args, data_args, training_args)
    return model, processor, False


def _build_new(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments):
    """``--init_config``: a randomly initialised model (named config or a JSON file of FerretConfig fields)."""
    from ferret.model import configs
    from ferret.model.configuration import FerretConfig
    from ferret.processing import FerretProcessor

    tokenizer = _load_tokenizer(model_args.tokenizer_path or model_args.model_name_or_path, training_args)
    processor = FerretProcessor(tokenizer, model_max_length=training_args.model_max_length,
                                image_aspect_ratio=data_args.image_aspect_ratio)
    fields = _ferret_fields(model_args, data_args)
    if model_args.vision_tower:
        fields["mm_vision_tower"] = model_args.vision_tower
    name = model_args.init_config
    if name == "small":
        config = configs.small(len(tokenizer), region_token=processor.region_token_id, **fields)
    elif name in ("ferret_7b", "ferret_13b"):
        config = getattr(configs, name)(vocab_size=len(tokenizer), im_region_fea_token=processor.region_token_id,
                                        **fields)
    elif os.path.isfile(name):
        with open(name) as f:
            config = FerretConfig(**{**fields, **json.load(f)})
    else:
        raise ValueError(f"--init_config {name!r} is neither a named config {NAMED_CONFIGS} nor a JSON file")
    if config.vocab_size != len(tokenizer) or config.im_region_fea_token != processor.region_token_id:
        raise ValueError(f"--init_config {name}: vocab_size {config.vocab_size} / region token "
                         f"{config.im_region_fea_token} do not match the tokenizer ({len(tokenizer)} tokens, "
                         f"<region_fea> = {processor.region_token_id})")
    config._attn_implementation = model_args.attn_implementation
    logger.info("building a new %s model (%s)", name, config.region_feature_axes)
    from ferret.model.configs import build_model as build_random

    model = build_random(config, seed=training_args.seed)
    processor = FerretProcessor(tokenizer, image_size=config.image_size, num_image_tokens=config.num_image_tokens,
                                image_aspect_ratio=data_args.image_aspect_ratio,
                                model_max_length=training_args.model_max_length)
    _image_size_check(data_args, config.image_size)
    return model, processor


def _build_from_llama(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments):
    """A LLaMA/Vicuna base + the Ferret modules (the paper's starting point)."""
    from transformers import AutoConfig

    from ferret.model.configuration import FerretConfig
    from ferret.model.modeling import FerretLlamaForCausalLM
    from ferret.model.vision import CLIPVisionTower
    from ferret.processing import FerretProcessor

    path = model_args.model_name_or_path
    base = AutoConfig.from_pretrained(path, cache_dir=training_args.cache_dir)
    if base.model_type != "llama":
        raise ValueError(f"{path} is a {base.model_type!r} model; Ferret builds on LLaMA/Vicuna bases "
                         "(or pass a Ferret checkpoint)")
    if not model_args.vision_tower:
        raise ValueError(f"{path} has no vision tower: pass --vision_tower (openai/clip-vit-large-patch14-336 or "
                         "a local CLIP folder)")
    with not_partitioned():
        tower = CLIPVisionTower.from_pretrained(model_args.vision_tower, model_args.mm_vision_select_layer,
                                                model_args.mm_vision_select_feature)
    tokenizer = _load_tokenizer(model_args.tokenizer_path or path, training_args)
    processor = FerretProcessor(tokenizer, model_max_length=training_args.model_max_length,
                                image_aspect_ratio=data_args.image_aspect_ratio)
    fields = {k: v for k, v in base.to_dict().items()
              if k not in ("model_type", "architectures", "transformers_version", "_name_or_path", "auto_map")}
    fields.update(_ferret_fields(model_args, data_args))
    # The base vocabulary first (so its weights load); <region_fea> is added below.
    fields.update(mm_vision_tower=model_args.vision_tower, mm_hidden_size=tower.hidden_size,
                  vision_config=tower.config.to_dict(), image_size=tower.config.image_size,
                  vocab_size=base.vocab_size, im_region_fea_token=None)
    config = FerretConfig(**fields)
    logger.info("building Ferret on the LLaMA base %s with the vision tower %s", path, model_args.vision_tower)
    model = FerretLlamaForCausalLM.from_pretrained(
        path, config=config, load_vision_tower=False, dtype=_dtype(training_args),
        attn_implementation=model_args.attn_implementation, cache_dir=training_args.cache_dir,
        quantization_config=_quantization_config(training_args),
    )
    add_region_token(model, len(tokenizer), processor.region_token_id)
    model.set_vision_tower(tower)
    if model_args.pretrain_mm_mlp_adapter:
        load_projector(model, model_args.pretrain_mm_mlp_adapter)
    processor = FerretProcessor(tokenizer, image_size=config.image_size, num_image_tokens=config.num_image_tokens,
                                image_aspect_ratio=data_args.image_aspect_ratio,
                                model_max_length=training_args.model_max_length)
    _image_size_check(data_args, config.image_size)
    return model, processor


def add_region_token(model, vocab_size: int, region_token_id: int) -> None:
    """Resizes the embeddings to the tokenizer (32000 -> 32001 for Vicuna); new rows (input and output) are the mean
    of the old ones, as the original's ``initialize_vision_tokenizer``."""
    old = model.get_input_embeddings().weight.shape[0]
    if vocab_size != old:
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
        weights = [model.get_input_embeddings().weight, model.get_output_embeddings().weight]
        with gathered(weights), torch.no_grad():
            for weight in weights:
                if weight.shape[0] == vocab_size:  # partitioned (empty) on other ranks under ZeRO-3
                    weight[old:] = weight[:old].mean(0, keepdim=True)
        logger.info("resized the embeddings %d -> %d (new rows = mean row)", old, vocab_size)
    model.config.im_region_fea_token = region_token_id


def load_projector(model, path: str) -> None:
    """Loads a stage-1 ``mm_projector.bin`` (keys ``model.mm_projector.weight/bias``) into the model."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    projector = {k.split("mm_projector.")[-1]: v for k, v in state.items() if "mm_projector." in k}
    if set(projector) != {"weight", "bias"}:
        raise ValueError(f"{path}: expected mm_projector weight and bias (a linear projector), got {sorted(state)}")
    target = model.model.mm_projector
    with gathered(target.parameters()), torch.no_grad():
        if target.weight.numel():
            if projector["weight"].shape != target.weight.shape:
                raise ValueError(f"{path}: projector weight {tuple(projector['weight'].shape)} does not fit "
                                 f"{tuple(target.weight.shape)} (vision width x LLM width)")
            target.weight.copy_(projector["weight"])
            target.bias.copy_(projector["bias"])
    logger.info("loaded the pre-trained projector %s", path)


# ---------------------------------------------------------------------------------------------------- 3. what trains
def configure_trainable(model, model_args: ModelArguments, training_args: TrainingArguments) -> None:
    """docs/compatibility.md §9.3: the whole LLM + projector + sampler by default; the CLIP tower never trains."""
    model.config.use_cache = False
    model.requires_grad_(True)
    if model_args.freeze_backbone:
        # The LLM (decoder, embeddings and lm_head); the Ferret modules are switched back on below.
        model.requires_grad_(False)
    inner = model.model
    if getattr(inner, "region_geo_sampler", None) is not None:
        inner.region_geo_sampler.requires_grad_(not model_args.tune_mm_mlp_adapter)
    if model_args.tune_mm_mlp_adapter:
        model.requires_grad_(False)
    inner.mm_projector.requires_grad_(not training_args.freeze_mm_mlp_adapter)
    model.config.tune_mm_mlp_adapter = model_args.tune_mm_mlp_adapter
    model.config.freeze_mm_mlp_adapter = training_args.freeze_mm_mlp_adapter


def apply_lora(model, training_args: TrainingArguments):
    """Wraps the model in a peft LoRA model (q/k/v/o/gate/up/down_proj); the projector and sampler are trained
    in full through ``modules_to_save``."""
    from peft import LoraConfig, get_peft_model

    if training_args.bits in (4, 8):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=training_args.gradient_checkpointing)
    to_save = [name for name in ("mm_projector", "region_geo_sampler")
               if getattr(model.model, name, None) is not None
               and any(p.requires_grad for p in getattr(model.model, name).parameters())]
    config = LoraConfig(r=training_args.lora_r, lora_alpha=training_args.lora_alpha, target_modules=LORA_TARGETS,
                        lora_dropout=training_args.lora_dropout, bias=training_args.lora_bias,
                        task_type="CAUSAL_LM", modules_to_save=to_save or None)
    model = get_peft_model(model, config)
    if training_args.lora_weight_path:
        from peft import load_peft_weights, set_peft_model_state_dict

        set_peft_model_state_dict(model, load_peft_weights(training_args.lora_weight_path))
        logger.info("loaded LoRA weights from %s", training_args.lora_weight_path)
    if training_args.bits in (4, 8):
        compute = _dtype(training_args)
        for name, module in model.named_modules():
            if "lora_" in name:
                module.to(compute)
            elif "norm" in name:
                module.to(torch.float32)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("LoRA r=%d alpha=%d on %s; %d trainable parameters (modules_to_save: %s)", training_args.lora_r,
                training_args.lora_alpha, LORA_TARGETS, trainable, to_save)
    return model


def save_lora_base(model, processor, output_dir: str, training_args: TrainingArguments) -> str:
    """A LoRA adapter is merged into the model it was trained on; when that model is not a Ferret checkpoint on
    disk (a Vicuna base got new modules and a resized vocabulary, or ``--init_config``), it is written once to
    ``<output_dir>/base_model`` and the adapter records it as its base."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    base_dir = os.path.join(output_dir, BASE_MODEL_DIR)
    if is_deepspeed_zero3_enabled():
        raise ValueError("LoRA from a base without Ferret modules under ZeRO-3: run LoRA with scripts/zero2.json, or "
                         "first turn the base into a Ferret checkpoint")
    if training_args.should_save and not os.path.isdir(base_dir):
        staging = base_dir + ".tmp"
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging, save_vision_tower=True)
        processor.save_pretrained(staging)
        os.replace(staging, base_dir)
        logger.info("wrote the LoRA base model to %s", base_dir)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    model.config._name_or_path = base_dir
    model.name_or_path = base_dir  # peft records it as the adapter's base_model_name_or_path
    return base_dir


# ---------------------------------------------------------------------------------------------------- 4-6
def build_dataset(processor, model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments):
    from ferret.data.grit import DataOptions, FerretCollator, GritDataset

    options = DataOptions(
        point_input_sample=data_args.point_input_sample,
        refer_previous_point=data_args.refer_previous_point,
        add_region_feature=model_args.add_region_feature,
        no_coor=model_args.no_coor,
        seed=training_args.data_seed if training_args.data_seed is not None else training_args.seed,
    )
    dataset = GritDataset(data_args.data_path, data_args.image_folder, processor, options,
                          data_multiple=data_args.data_multiple, dataset_types=data_args.dataset_type)
    return SkipCountingDataset(dataset), SkipCountingCollator(FerretCollator(processor))


def resolve_resume(training_args: TrainingArguments) -> str | None:
    """``--resume_from_checkpoint PATH`` as given (ValueError naming what is wrong when it is torn); ``no``/``false``
    starts afresh; otherwise (the default, as the original) the newest intact checkpoint-N of output_dir, if any
    (torn or incomplete newer ones are named in a warning)."""
    choice = training_args.resume_from_checkpoint
    if choice is not None and str(choice).lower() in ("no", "false", "none"):
        return None
    if choice is not None and str(choice).lower() not in ("true", "latest", "auto"):
        problems = checkpoint_problems(choice)
        if problems:
            raise ValueError(f"--resume_from_checkpoint {choice} cannot be resumed from: {'; '.join(problems)}")
        return choice
    found = latest_checkpoint(training_args.output_dir)
    if found:
        logger.info("resuming from %s", found)
    return found


def publish_model_folder(staging: str, final: str) -> None:
    """Checks that every file in ``staging`` loads (weights present, safetensors lengths, archives, JSON), seals
    it (fsync, ``manifest.json`` last) and renames it to ``final``. A folder that fails the check is never
    published: RuntimeError naming the files, and ``final`` stays as it was."""
    problems = [p for p in (file_problem(os.path.join(staging, rel)) for rel in _model_files(staging)) if p]
    if not any(os.path.exists(os.path.join(staging, name)) for name in WEIGHT_FILES + ("adapter_config.json",)):
        problems.append(f"no model weights ({', '.join(WEIGHT_FILES)})")
    if problems:
        raise RuntimeError(f"refusing to publish {final}: what was written in {staging} does not load: "
                           + "; ".join(problems))
    write_manifest(staging)
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.replace(staging, final)
    fsync_path(os.path.dirname(os.path.abspath(final)))


def _model_files(folder: str) -> list[str]:
    names = []
    for root, _, files in os.walk(folder):
        names += [os.path.relpath(os.path.join(root, f), folder) for f in files if f != MANIFEST_NAME]
    return sorted(names)


def save_final(trainer: FerretTrainer, output_dir: str) -> str:
    """Writes ``<output_dir>/final-checkpoint`` atomically (staging folder, checked, sealed, then renamed) and the
    trainer state (naming every skipped record)."""
    final = os.path.join(output_dir, FINAL_DIR)
    staging = os.path.join(output_dir, "tmp-" + FINAL_DIR)
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.config.use_cache = True
    if trainer.args.should_save:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.save_model(staging)
    trainer.flush_skipped_records()
    trainer.save_state()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if trainer.args.should_save:
        publish_model_folder(staging, final)
        logger.info("saved the final model to %s", final)
    return final


# Training-state files of a checkpoint that a model folder does not need.
_STATE_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state*.pth", "global_step*", "latest",
                "zero_to_*.py", "trainer_state.json", MANIFEST_NAME)


def finished_at(checkpoint: str, training_args: TrainingArguments) -> bool:
    """Whether ``checkpoint`` is the last step of this run (the run died after its last checkpoint-N but before
    final-checkpoint). HF's Trainer would train one step too many when resumed from it."""
    with open(os.path.join(checkpoint, "trainer_state.json")) as f:
        state = json.load(f)
    max_steps = training_args.max_steps if training_args.max_steps > 0 else state.get("max_steps", 0)
    return max_steps > 0 and state.get("global_step", 0) >= max_steps


def final_from_checkpoint(checkpoint: str, output_dir: str) -> str:
    """Publishes a finished run's last checkpoint as ``final-checkpoint`` (model files only)."""
    final = os.path.join(output_dir, FINAL_DIR)
    staging = os.path.join(output_dir, "tmp-" + FINAL_DIR)
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(checkpoint, staging, ignore=shutil.ignore_patterns(*_STATE_FILES))
    shutil.copy(os.path.join(checkpoint, "trainer_state.json"), os.path.join(output_dir, "trainer_state.json"))
    publish_model_folder(staging, final)
    logger.info("%s is the last step of this run: published it as %s", checkpoint, final)
    return final


def train(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> str:
    """Runs the recipe; returns the final checkpoint folder."""
    transformers.set_seed(training_args.seed)
    if training_args.should_save:
        os.makedirs(training_args.output_dir, exist_ok=True)
        remove_staging_folders(training_args.output_dir)
    resume = resolve_resume(training_args)
    if resume is not None and finished_at(resume, training_args):
        final = os.path.join(training_args.output_dir, FINAL_DIR)
        if training_args.should_save:
            final_from_checkpoint(resume, training_args.output_dir)
        return final
    model, processor, from_ferret = build_model(model_args, data_args, training_args)
    configure_trainable(model, model_args, training_args)
    if training_args.gradient_checkpointing and not training_args.fsdp:
        # Frozen embeddings (LoRA, freeze_backbone) would give the checkpointed blocks inputs without grad.
        model.enable_input_require_grads()
    if training_args.lora_enable:
        if not from_ferret:
            save_lora_base(model, processor, training_args.output_dir, training_args)
        model = apply_lora(model, training_args)
    dataset, collator = build_dataset(processor, model_args, data_args, training_args)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("%d of %d parameters train; %d training items", trainable, total, len(dataset))

    trainer = FerretTrainer(
        model=model, args=training_args, train_dataset=dataset, data_collator=collator, processing_class=processor,
        save_vision_tower=model_args.save_vision_tower, adapter_only=model_args.tune_mm_mlp_adapter,
    )
    trainer.train(resume_from_checkpoint=resume)
    return save_final(trainer, training_args.output_dir)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING)
    argv = expand_config_files(sys.argv[1:] if argv is None else argv)
    argv = setup_distributed(argv)
    model_args, data_args, training_args = parse_args(argv)
    setup_logging(training_args)
    logger.info("arguments: %s", as_dict(model_args, data_args))
    final = train(model_args, data_args, training_args)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if training_args.should_save:
        logger.info("done: %s", final)
    return 0


if __name__ == "__main__":
    sys.exit(main())
