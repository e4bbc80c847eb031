"""Training arguments: the original's flag names (docs/compatibility.md §9.1), the paper recipe's values as defaults.

Three dataclasses, parsed together by `transformers.HfArgumentParser`:

* `ModelArguments`: which model to start from and the Ferret modules' settings;
* `DataArguments`: the GRIT files and how regions are rendered;
* `TrainingArguments`: `transformers.TrainingArguments` plus the original's extras (LoRA, quantisation, length).

Every flag of the original launch scripts is accepted, so ``experiments/ferret_7b_train.sh`` of apple/ml-ferret
runs unchanged. Where the original's default contradicts its own recipe (``version v0``, ``mm_vision_select_layer
-1``, ``mm_use_im_patch_token True``, ``model_max_length 512``, ``sampler_pooler_mode mean``, ...), the recipe's
value is the default here. Flags that transformers 5 removed (``--warmup_ratio``, ``--evaluation_strategy``,
``--fsdp_transformer_layer_cls_to_wrap``) are translated; flags that never did anything (``--mpt_attn_impl``,
``--lazy_preprocess``) are accepted and ignored with a log line.

`parse_args(argv)` also reads YAML or JSON config files: ``ferret train --config recipes/ferret_7b.yaml
--learning_rate 1e-5`` (or ``train.py recipe.yaml ...``) uses the file's keys as flags, and flags given on the command
line win. Every flag also has a kebab spelling (``--learning-rate``), and the region-feature switch its project
spelling ``--region-feature`` / ``--no-region-feature`` (see `ferret.flags`).

transformers is imported only when `TrainingArguments` is first used (it takes seconds), so ``ferret train --help``
(`help_text`) stays fast; ``--help-all`` lists every transformers.TrainingArguments flag too.
"""

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ferret.flags import translate_training_argv

logger = logging.getLogger(__name__)

# Flags kept only so that old launch scripts run; their values are logged and dropped.
IGNORED_FLAGS = ("mpt_attn_impl", "lazy_preprocess", "is_multimodal")
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass
class ModelArguments:
    """Where the weights come from and how the Ferret modules are configured."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A Vicuna/LLaMA base (the Ferret modules are added) or an existing Ferret checkpoint "
                          "(loaded as is); a local folder or a hub id. Not needed with --init_config."},
    )
    version: str = field(default="v1", metadata={"help": "Conversation template; only v1 (ferret_v1) is coherent."})
    freeze_backbone: bool = field(default=False, metadata={"help": "Freeze the LLM (train only the Ferret modules)."})
    tune_mm_mlp_adapter: bool = field(
        default=False, metadata={"help": "Projector pre-training mode: train mm_projector only."}
    )
    vision_tower: str | None = field(
        default=None,
        metadata={"help": "CLIP vision tower: a hub id (openai/clip-vit-large-patch14-336) or a local folder. "
                          "Required for a LLaMA base; overrides the checkpoint's tower otherwise."},
    )
    mm_vision_select_layer: int = field(default=-2, metadata={"help": "CLIP hidden state to read (-2 = penultimate)."})
    pretrain_mm_mlp_adapter: str | None = field(
        default=None, metadata={"help": "mm_projector.bin of a projector pre-training run (LLaVA stage 1)."}
    )
    mm_use_im_start_end: bool = field(default=False, metadata={"help": "Unsupported (the recipe uses False)."})
    mm_use_im_patch_token: bool = field(default=False, metadata={"help": "Unsupported (the recipe uses False)."})
    mm_vision_select_feature: str = field(default="patch", metadata={"help": "'patch' (drop CLS) or 'cls_patch'."})
    add_region_feature: bool = field(default=True, metadata={"help": "Put <region_fea> after referred regions."})
    region_geo_sampler: bool = field(default=True, metadata={"help": "Region features from the visual sampler."})
    sampler_pooler_mode: str = field(default="max", metadata={"help": "Sampler pooling: 'max' (recipe) or 'mean'."})
    no_coor: bool = field(default=False, metadata={"help": "Refer with <region_fea> only, no coordinates."})
    save_vision_tower: bool = field(
        default=True, metadata={"help": "Write vision_tower/ into every checkpoint (the recipe does)."}
    )
    # New in this implementation.
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "'sdpa' (default), 'flash_attention_2' (needs flash-attn) or 'eager'."}
    )
    region_feature_axes: str | None = field(
        default=None,
        metadata={"help": "'xy' reads region features where the region is (default for a new model); "
                          "'transposed' is the original's read, which released weights expect. Default: the "
                          "checkpoint's own setting (an original checkpoint reads 'transposed'), 'xy' otherwise."},
    )
    init_config: str | None = field(
        default=None,
        metadata={"help": "Build a randomly initialised model instead of loading one: a named config of "
                          "ferret.model.configs (small, ferret_7b, ferret_13b) or a JSON file of FerretConfig "
                          "fields. Needs --tokenizer_path."},
    )
    tokenizer_path: str | None = field(
        default=None, metadata={"help": "Tokenizer folder (default: the model's)."}
    )


@dataclass
class DataArguments:
    """The GRIT-format training files (docs/compatibility.md §6) and how their regions become text and masks."""

    data_path: list[str] | None = field(default=None, metadata={"help": "GRIT-format JSON files."})
    data_multiple: list[float] | None = field(
        default=None, metadata={"help": "Per-file sampling weight (copies; fractions pick a random subset)."}
    )
    image_folder: list[str] | None = field(
        default=None, metadata={"help": "Image folder per data_path (one folder is reused for all files)."}
    )
    dataset_type: list[str] | None = field(
        default=None,
        metadata={"help": "Dataset tag per data_path (vg_object, refexp, ...); default: guessed from the file "
                          "name as the original does."},
    )
    lazy_preprocess: bool = field(default=True, metadata={"help": "Ignored (the dataset is always lazy)."})
    is_multimodal: bool = field(default=True, metadata={"help": "Ignored (always multimodal)."})
    image_aspect_ratio: str = field(default="square_nocrop", metadata={"help": "'square_nocrop' or 'pad'."})
    resized_image_h: int | None = field(
        default=None, metadata={"help": "Model input height; must equal the vision tower's (default: the tower's)."}
    )
    resized_image_w: int | None = field(
        default=None, metadata={"help": "Model input width; must equal the vision tower's (default: the tower's)."}
    )
    point_input_sample: str = field(
        default="segment_mask|center",
        metadata={"help": "How a point is drawn from a region: segment_mask|center (recipe), segment_mask|uniform, "
                          "segment_mask|gaussian, gaussian, center."},
    )
    refer_previous_point: bool = field(
        default=False, metadata={"help": "Reuse a turn's sampled point for the same box (the recipe: False)."}
    )
    image_grid_pinpoints: str | None = field(default=None, metadata={"help": "Stored in the config only."})


@dataclass
class TrainingExtras:
    """The original's training extras, and the paper recipe's values where they differ from transformers'
    defaults (docs/compatibility.md §9.2). `TrainingArguments` is `transformers.TrainingArguments` with these fields
    added."""

    cache_dir: str | None = field(default=None, metadata={"help": "Hub download cache."})
    optim: str = field(default="adamw_torch")
    remove_unused_columns: bool = field(default=False)
    report_to: None | str | list[str] = field(default="tensorboard")
    logging_steps: float = field(default=1)
    freeze_mm_mlp_adapter: bool = field(default=False, metadata={"help": "Keep mm_projector frozen."})
    mpt_attn_impl: str | None = field(default=None, metadata={"help": "Ignored (MPT models are not supported)."})
    model_max_length: int = field(
        default=2048, metadata={"help": "Longest sequence, image positions included (recipe: 2048)."}
    )
    double_quant: bool = field(default=True, metadata={"help": "QLoRA: double quantisation of the statistics."})
    quant_type: str = field(default="nf4", metadata={"help": "QLoRA: 'nf4' or 'fp4'."})
    bits: int = field(default=16, metadata={"help": "16 (no quantisation), 8 or 4 (QLoRA; needs bitsandbytes)."})
    lora_enable: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of the whole LLM."})
    lora_r: int = field(default=64)
    lora_alpha: int = field(default=16)
    lora_dropout: float = field(default=0.05)
    lora_weight_path: str = field(default="", metadata={"help": "Initial LoRA weights (a PEFT adapter folder)."})
    lora_bias: str = field(default="none", metadata={"help": "'none', 'all' or 'lora_only'."})
    # Flags that transformers 5 removed; translated in __post_init__ so the original's launch lines still work.
    warmup_ratio: float | None = field(default=None, metadata={"help": "Same as --warmup_steps RATIO (< 1)."})
    evaluation_strategy: str | None = field(default=None, metadata={"help": "Same as --eval_strategy."})
    fsdp_transformer_layer_cls_to_wrap: str | None = field(
        default=None, metadata={"help": "Same as fsdp_config transformer_layer_cls_to_wrap (LlamaDecoderLayer)."}
    )
    group_by_length: bool = field(
        default=False, metadata={"help": "Same as --train_sampling_strategy group_by_length: batches of similar "
                                         "length (GritDataset's estimates), far less padding."}
    )
    loss_average: str = field(
        default="token", metadata={"help": "'token' (the original): the mean over every answer token of the batch; "
                                           "'sample': each sample's mean over its answer tokens, then the mean over "
                                           "samples, so a one-word answer weighs as much as a long one."}
    )

    def __post_init__(self):
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise ValueError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
            self.warmup_steps = self.warmup_ratio
        if self.evaluation_strategy is not None:
            self.eval_strategy = self.evaluation_strategy
        if self.group_by_length:
            self.train_sampling_strategy = "group_by_length"
        if self.fsdp_transformer_layer_cls_to_wrap:
            config = self.fsdp_config
            if isinstance(config, str):
                config = json.loads(config) if config.startswith("{") else _read_json(config)
            config = dict(config or {})
            config["transformer_layer_cls_to_wrap"] = self.fsdp_transformer_layer_cls_to_wrap.split(",")
            self.fsdp_config = config
        if self.bits not in (4, 8, 16):
            raise ValueError(f"--bits must be 4, 8 or 16, got {self.bits}")
        if self.loss_average not in ("token", "sample"):
            raise ValueError(f"--loss_average must be 'token' or 'sample', got {self.loss_average!r}")
        if self.lora_bias not in ("none", "all", "lora_only"):
            raise ValueError(f"--lora_bias must be 'none', 'all' or 'lora_only', got {self.lora_bias!r}")
        super().__post_init__()


def _make_training_arguments() -> type:
    import transformers

    @dataclass
    class TrainingArguments(TrainingExtras, transformers.TrainingArguments):
        """`transformers.TrainingArguments` plus the original's training extras (`TrainingExtras`)."""

    TrainingArguments.__module__ = __name__
    TrainingArguments.__qualname__ = "TrainingArguments"  # picklable as ferret.train.arguments.TrainingArguments
    return TrainingArguments


def training_arguments_class() -> type:
    """`TrainingArguments` (built on first use: it imports transformers)."""
    if "TrainingArguments" not in globals():
        globals()["TrainingArguments"] = _make_training_arguments()
    return globals()["TrainingArguments"]


def __getattr__(name: str) -> Any:
    if name == "TrainingArguments":
        return training_arguments_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _config_to_argv(path: str) -> list[str]:
    """A YAML/JSON mapping of flag -> value as command-line words (lists as several values, dicts as JSON)."""
    with open(path) as f:
        if path.endswith(".json"):
            values = json.load(f)
        else:
            import yaml

            values = yaml.safe_load(f)
    if not isinstance(values, dict):
        raise TypeError(f"{path}: a config file must hold a mapping of argument names to values")
    words: list[str] = []
    for key, value in values.items():
        if value is None:
            continue
        words.append(f"--{key}")
        if isinstance(value, (list, tuple)):
            words.extend(str(v) for v in value)
        elif isinstance(value, dict):
            words.append(json.dumps(value))
        else:
            words.append(str(value))
    return words


def expand_config_files(argv: Sequence[str]) -> list[str]:
    """Replaces a leading config file (or ``--config FILE``) by its flags; later command-line flags override.
    The project's spellings of training's switches (``--region-feature``) become the dataclass fields'."""
    argv = list(argv)
    files: list[str] = []
    if argv and argv[0].endswith(CONFIG_SUFFIXES) and not argv[0].startswith("-"):
        files.append(argv.pop(0))
    while "--config" in argv:
        at = argv.index("--config")
        if at + 1 >= len(argv):
            raise ValueError("--config needs a file name")
        files.append(argv[at + 1])
        del argv[at:at + 2]
    prefix: list[str] = []
    for path in files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file {path!r} does not exist")
        prefix += _config_to_argv(path)
    return translate_training_argv(prefix + argv)


def hf_parser():
    """The `transformers.HfArgumentParser` of the three dataclasses (imports transformers)."""
    import transformers

    return transformers.HfArgumentParser((ModelArguments, DataArguments, training_arguments_class()))


def parse_args(argv: Sequence[str] | None = None) -> tuple[ModelArguments, DataArguments, Any]:
    """Parses command-line words (config files expanded) into the three dataclasses and checks them together."""
    argv = expand_config_files(sys.argv[1:] if argv is None else argv)
    parser = hf_parser()
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    check_args(model_args, data_args, training_args, argv)
    return model_args, data_args, training_args


def check_args(model_args: ModelArguments, data_args: DataArguments, training_args: Any,
               argv: Sequence[str] = ()) -> None:
    """Cross-argument checks; normalises what the original accepted loosely (version, image folders)."""
    for name in IGNORED_FLAGS:
        if any(word == f"--{name}" or word.startswith(f"--{name}=") for word in argv):
            logger.info("--%s is accepted for compatibility with the original launch scripts and ignored", name)
    if model_args.version != "v1":
        logger.warning("--version %s: only the v1 (ferret_v1) template is coherent with Ferret's data; using v1",
                       model_args.version)
        model_args.version = "v1"
    if model_args.mm_use_im_start_end or model_args.mm_use_im_patch_token:
        raise ValueError("--mm_use_im_start_end / --mm_use_im_patch_token True are not supported (Ferret's recipe "
                         "and released checkpoints use False)")
    if model_args.model_name_or_path is None and model_args.init_config is None:
        raise ValueError("pass --model_name_or_path (a base or Ferret checkpoint) or --init_config (a new model)")
    if model_args.init_config is not None and model_args.tokenizer_path is None and model_args.model_name_or_path is None:
        raise ValueError("--init_config needs --tokenizer_path (a LLaMA-style tokenizer folder)")
    if model_args.no_coor and not model_args.add_region_feature:
        raise ValueError("--no_coor True needs --add_region_feature True (otherwise regions vanish from the text)")
    if model_args.region_feature_axes not in (None, "xy", "transposed"):
        raise ValueError(f"--region_feature_axes must be 'xy' or 'transposed', got {model_args.region_feature_axes!r}")
    if not data_args.data_path:
        raise ValueError("pass at least one --data_path")
    folders = data_args.image_folder or []
    if len(folders) == 1 and len(data_args.data_path) > 1:
        data_args.image_folder = folders * len(data_args.data_path)
    elif len(folders) != len(data_args.data_path):
        raise ValueError(f"--image_folder needs one folder per --data_path ({len(data_args.data_path)}), "
                         f"got {len(folders)}")
    for name in ("data_multiple", "dataset_type"):
        values = getattr(data_args, name)
        if values is not None and len(values) != len(data_args.data_path):
            raise ValueError(f"--{name} needs one value per --data_path ({len(data_args.data_path)}), "
                             f"got {len(values)}")
    if (data_args.resized_image_h is None) != (data_args.resized_image_w is None) or (
        data_args.resized_image_h is not None and data_args.resized_image_h != data_args.resized_image_w
    ):
        raise ValueError("--resized_image_h and --resized_image_w must be equal (the vision tower reads squares)")
    if training_args.lora_enable and model_args.tune_mm_mlp_adapter:
        raise ValueError("--lora_enable and --tune_mm_mlp_adapter are exclusive")
    if training_args.bits in (4, 8) and not training_args.lora_enable:
        raise ValueError(f"--bits {training_args.bits} trains quantised weights only through LoRA: add "
                         "--lora_enable True")


def as_dict(*dataclasses_: Any) -> dict[str, Any]:
    """All fields of the given argument objects in one flat dict (for logging)."""
    out: dict[str, Any] = {}
    for obj in dataclasses_:
        out.update({k: v for k, v in vars(obj).items() if not k.startswith("_")})
    return out


# ---------------------------------------------------------------------------------------------- command line
HELP_EPILOG = """\
Every flag of transformers.TrainingArguments is accepted as well (--output_dir, --learning_rate, --num_train_epochs,
--per_device_train_batch_size, --gradient_accumulation_steps, --bf16, --deepspeed, --fsdp, --save_steps, ...);
`--help-all` lists them all (slower: it loads transformers). Each flag also takes its kebab spelling
(--learning-rate). A recipe file holds flags as YAML keys: `ferret train --config recipes/ferret_7b.yaml`."""


def _type_name(f: dataclasses.Field) -> str:
    text = str(f.type).replace("typing.", "").replace("<class '", "").replace("'>", "")
    return text.replace(" | None", "").replace("None | ", "")


def help_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """A transformers-free parser whose help lists the Ferret flags (the dataclasses' fields); for ``--help`` only."""
    parser = argparse.ArgumentParser(
        prog=prog, usage="%(prog)s [--config RECIPE.yaml] [--FLAG VALUE ...]", description="Fine-tune Ferret (the paper's recipe by default; flags as the original's).",
        epilog=HELP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False)
    parser.add_argument("-h", "--help", action="store_true", help="this help; --help-all: every flag")
    parser.add_argument("--config", metavar="FILE", help="a YAML/JSON recipe; flags after it override its keys")
    parser.add_argument("--region-feature", nargs="?", metavar="BOOL",
                        help="the project's spelling of --add_region_feature (--no-region-feature: off)")
    for title, cls in (("model", ModelArguments), ("data", DataArguments), ("training (Ferret's additions)",
                                                                             TrainingExtras)):
        group = parser.add_argument_group(title)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            group.add_argument(f"--{f.name}", metavar=_type_name(f).upper().replace(" ", ""),
                               help=f"{f.metadata.get('help', '')} (default: {default})".strip())
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`ferret train`: prints the help without loading transformers, otherwise runs `ferret.train.train.main`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help-all" in argv:
        hf_parser().print_help()
        return 0
    if "-h" in argv or "--help" in argv:
        help_parser().print_help()
        return 0
    from ferret.train.train import main as train_main

    return train_main(argv)
