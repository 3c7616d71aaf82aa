"""Settings: typed dataclasses, parsed from defaults < `--config file.yaml` < command-line flags.

Flag names follow `transformers.TrainingArguments` where one exists. Each script adds its own
data dataclass; the model and training settings below are shared by all three scripts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional, Sequence

import yaml
from transformers import HfArgumentParser

from .errors import UserError, closest
from .files import check_encoding

DEFAULT_MODEL = "huawei-noah/TinyBERT_General_4L_312D"
# Schedules that need nothing beyond warm-up and total steps (plateau/min-lr/WSD need extra arguments).
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt")


def _help(text: str, **kw: Any) -> dict:
    return {"help": text, **kw}


@dataclass
class ModelArguments:
    _argument_group_name = "model"
    model: str = field(default=DEFAULT_MODEL, metadata=_help(
        "Hub id or local directory of the pretrained encoder (an MLM output_dir works too).",
        aliases=["--model_name_or_path"]))
    tokenizer_name: Optional[str] = field(default=None, metadata=_help("Tokenizer, if not the model's own."))
    revision: str = field(default="main", metadata=_help("Hub revision (branch, tag or commit)."))
    trust_remote_code: bool = field(default=False, metadata=_help(
        "Allow custom modelling code from the Hub. Off by default: it runs code from the model repository."))
    cache_dir: Optional[str] = field(default=None, metadata=_help("Where Hub downloads are cached."))
    attn_implementation: Optional[str] = field(default=None, metadata=_help(
        "Attention kernel: sdpa (PyTorch scaled_dot_product_attention, the transformers default for BERT), "
        "eager, or flash_attention_2 where installed. Unset: the model's default.",
        choices=["sdpa", "eager", "flash_attention_2", "flex_attention"]))


@dataclass
class DataSourceArguments:
    """Where the text comes from, shared by the three scripts' data settings (each subclass adds its own
    columns and may restate a field to change its default or help)."""
    _argument_group_name = "data"
    dataset: Optional[str] = field(default=None, metadata=_help("Hub dataset name (e.g. glue, conll2003, wikitext)."))
    dataset_config: Optional[str] = field(default=None, metadata=_help("Hub dataset config (e.g. mrpc)."))
    train_split_name: str = field(default="train", metadata=_help("Hub split used for training."))
    validation_split_name: str = field(default="validation", metadata=_help("Hub split used for validation."))
    train_file: Optional[str] = field(default=None, metadata=_help("Training file."))
    validation_file: Optional[str] = field(default=None, metadata=_help("Validation file (same kinds as train)."))
    test_file: Optional[str] = field(default=None, metadata=_help("Test file (same kinds as train)."))
    validation_split: float = field(default=0.1, metadata=_help(
        "Fraction of the training data held out (seeded) as validation data when there is none."))
    max_length: int = field(default=128, metadata=_help("Tokens per example after truncation."))
    encoding: str = field(default="utf-8", metadata=_help(
        "Text encoding of the data files (a UTF-8 byte-order mark is accepted); e.g. latin-1 or cp1252."))
    column_names: Optional[list[str]] = field(default=None, metadata=_help(
        "Names of the columns of csv/tsv files that have no header row (one per column, in order)."))
    delimiter: Optional[str] = field(default=None, metadata=_help(
        "Field separator of csv/tsv files: one character, or 'tab' (default: ',' for .csv, tab for .tsv); e.g. ';' "
        "for files saved by a European-locale Excel."))
    preprocessing_num_workers: Optional[int] = field(default=None, metadata=_help("Processes for tokenizing."))
    overwrite_cache: bool = field(default=False, metadata=_help("Tokenize again even if cached."))

    # The canonical public task of the script, trained when no data flag at all is given: (Hub id, config).
    default_dataset: ClassVar[Optional[tuple[str, Optional[str]]]] = None

    def __post_init__(self) -> None:
        if self.dataset and (self.train_file or self.validation_file or self.test_file):
            raise UserError("pass either --dataset or --train_file/--validation_file/--test_file, not both.")
        if not 0 <= self.validation_split < 1:
            raise UserError(f"--validation_split must be a fraction in [0, 1), got {self.validation_split}.")
        check_encoding(self.encoding)
        if self.column_names is not None and (not self.column_names or len(set(self.column_names)) != len(
                self.column_names)):
            raise UserError(f"--column_names needs one distinct name per column, got {self.column_names}.")
        if self.delimiter is not None:
            self.delimiter = {"tab": "\t", "\\t": "\t"}.get(self.delimiter, self.delimiter)
            if len(self.delimiter) != 1 or self.delimiter in "\"\n\r":
                raise UserError(f"--delimiter must be one character (or 'tab'), got {self.delimiter!r}.")
        if self.preprocessing_num_workers is not None and self.preprocessing_num_workers < 1:
            raise UserError(f"--preprocessing_num_workers must be 1 or more (unset: tokenize in this process), got "
                            f"{self.preprocessing_num_workers}.")

    def source_flags_given(self) -> list[str]:
        """The data flags given: where the data comes from and its columns (not processing settings)."""
        given = []
        for f in dataclasses.fields(self):
            if f.init and any(k in f.name for k in ("dataset", "file", "column", "split_name")):
                default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                if getattr(self, f.name) != default:
                    given.append(f.name)
        return given

    def resolve_source(self, training: bool) -> Optional[str]:
        """With no data flag at all, train on the script's canonical public task (returns the line that
        announces it); otherwise check that the data needed is there."""
        if self.dataset or self.train_file:
            return None
        if not training:
            if self.validation_file or self.test_file:
                return None
            raise UserError("--no_do_train evaluates or predicts files: pass --validation_file and/or --test_file "
                            "(or --dataset NAME).")
        if self.default_dataset and not self.source_flags_given():
            self.dataset, self.dataset_config = self.default_dataset
            config = f" (config {self.dataset_config})" if self.dataset_config else ""
            return (f"no data flags given: training on the canonical task, Hub dataset '{self.dataset}'{config}; "
                    "pass --train_file/--validation_file or --dataset to train on your own data.")
        raise UserError("no training data: pass --train_file FILE or --dataset NAME [--dataset_config CONFIG].")


@dataclass
class TrainArguments:
    _argument_group_name = "training"
    output_dir: str = field(default="output", metadata=_help("Where the model, results and checkpoints go."))
    overwrite_output_dir: bool = field(default=False, metadata=_help("Allow writing into a non-empty output_dir."))
    seed: int = field(default=42, metadata=_help("Seed for sampling, dropout, splits and initialisation."))
    per_device_train_batch_size: int = field(default=32, metadata=_help("Training batch size per process."))
    per_device_eval_batch_size: Optional[int] = field(default=None, metadata=_help(
        "Evaluation batch size per process. Unset: 4x the training batch on GPUs/TPUs; on CPU the training batch "
        "(larger ones were no faster there and used more memory)."))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("Micro-batches per optimizer step."))
    learning_rate: float = field(default=5e-5, metadata=_help("Peak learning rate of AdamW."))
    weight_decay: float = field(default=0.01, metadata=_help("AdamW weight decay (not on biases or LayerNorm)."))
    adam_beta1: float = field(default=0.9, metadata=_help("AdamW beta1."))
    adam_beta2: float = field(default=0.999, metadata=_help("AdamW beta2."))
    adam_epsilon: float = field(default=1e-8, metadata=_help("AdamW epsilon."))
    max_grad_norm: float = field(default=1.0, metadata=_help("Gradient clipping norm (0 disables clipping)."))
    num_train_epochs: float = field(default=3.0, metadata=_help("Training epochs (ignored when max_steps > 0)."))
    max_steps: int = field(default=-1, metadata=_help("Total optimizer steps; overrides num_train_epochs."))
    lr_scheduler_type: str = field(default="linear", metadata=_help(
        "Learning-rate schedule (transformers.get_scheduler).", choices=SCHEDULERS))
    warmup_ratio: float = field(default=0.1, metadata=_help(
        "Warm-up as a fraction of all optimizer steps (0.1: +1 point MRPC accuracy over 0 across 3 seeds)."))
    warmup_steps: int = field(default=0, metadata=_help("Warm-up optimizer steps (wins over warmup_ratio)."))
    eval_strategy: Literal["epoch", "steps", "no"] = field(default="epoch", metadata=_help(
        "When to evaluate: after every epoch, every eval_steps optimizer steps, or never."))
    eval_steps: Optional[int] = field(default=None, metadata=_help(
        "Evaluate every N optimizer steps (implies eval_strategy=steps)."))
    logging_steps: Optional[int] = field(default=None, metadata=_help(
        "Log loss, lr, grad norm and speed every N steps (default: about 40 points per run, at most every 50 "
        "steps, so short runs still draw a learning curve)."))
    metric_for_best_model: Optional[str] = field(default=None, metadata=_help(
        "Validation metric that picks the best model and drives early stopping (task default if unset)."))
    greater_is_better: Optional[bool] = field(default=None, metadata=_help(
        "Whether a larger metric_for_best_model is better (inferred from its name if unset)."))
    load_best_model_at_end: bool = field(default=True, metadata=_help(
        "Save (and test) the best evaluated weights rather than the last."))
    early_stopping_patience: Optional[int] = field(default=None, metadata=_help(
        "Stop after this many evaluations without improvement."))
    early_stopping_threshold: float = field(default=0.0, metadata=_help(
        "Minimum improvement of the metric that counts as better."))
    checkpointing_steps: Optional[str] = field(default=None, metadata=_help(
        "Save a resumable checkpoint every N optimizer steps, or 'epoch'."))
    save_total_limit: Optional[int] = field(default=None, metadata=_help("Keep only the newest N checkpoints."))
    resume_from_checkpoint: Optional[str] = field(default=None, metadata=_help(
        "A checkpoint folder; 'latest': the newest complete one in output_dir (refused if there is none); 'auto': "
        "the same, or a fresh start if there is none (one command for a first run and its restarts)."))
    do_train: bool = field(default=True, metadata=_help(
        "Train. --no_do_train evaluates/predicts with --model as it is (a trained output folder of this script, or any "
        "model with this task's head): its label maps come from its config."))
    do_eval: bool = field(default=True, metadata=_help(
        "Evaluate on the validation data, if any (during training as --eval_strategy says, and at the end)."))
    do_predict: bool = field(default=True, metadata=_help(
        "Evaluate (when labelled) and write predictions for the test data, if any."))
    push_to_hub: bool = field(default=False, metadata=_help(
        "Upload the output folder to the Hub when training ends (checked before training starts)."))
    hub_model_id: Optional[str] = field(default=None, metadata=_help("Hub repository for --push_to_hub: org/name."))
    hub_token: Optional[str] = field(default=None, metadata=_help(
        "Hub token for --push_to_hub (default: the one stored by `hf auth login` or HF_TOKEN)."))
    hub_private_repo: bool = field(default=False, metadata=_help("Create the --hub_model_id repository as private."))
    report_to: str = field(default="none", metadata=_help(
        "Trackers through accelerate: none, all, or a comma list (tensorboard, wandb, mlflow, ...)."))
    mixed_precision: Optional[str] = field(default=None, metadata=_help(
        "no, fp16, bf16 or auto. Unset: the accelerate launch setting if any, else auto (bf16 where the "
        "hardware runs it fast, else fp32).", choices=["no", "fp16", "bf16", "auto"]))
    group_by_length: bool = field(default=True, metadata=_help(
        "Batch training examples of similar length (shuffled buckets) to cut padding."))
    pad_to_multiple_of: Optional[int] = field(default=None, metadata=_help(
        "Round each batch's padded length up to a multiple of N. Unset: 32 with --torch_compile (few shapes to "
        "compile), 8 under mixed precision (tensor-core friendly), else none."))
    pad_to_max_length: bool = field(default=False, metadata=_help(
        "Pad every batch to --max_length (static shapes; always on for TPU). Slower: for comparisons."))
    optim: Literal["auto", "adamw_torch_fused", "adamw_torch_foreach", "adamw_torch"] = field(
        default="auto", metadata=_help(
        "AdamW implementation: fused (one kernel for all parameters), foreach (batched per parameter group) or "
        "adamw_torch (PyTorch's default). auto: fused where PyTorch has it for the device, else foreach."))
    fast_dropout: bool = field(default=True, metadata=_help(
        "On CPU, draw dropout masks from 16-bit random integers instead of torch's bernoulli (same dropout "
        "statistically; MiniLM training steps 1.3-1.5x faster here). Ignored on GPU/TPU and with --torch_compile."))
    dataloader_num_workers: int = field(default=0, metadata=_help("DataLoader worker processes."))
    torch_compile: bool = field(default=False, metadata=_help("Compile the model with torch.compile."))
    ddp_timeout: int = field(default=1800, metadata=_help(
        "Seconds before a collective gives up (a dead rank then ends the job instead of hanging)."))
    skip_nonfinite: bool = field(default=False, metadata=_help(
        "Skip optimizer steps whose loss is NaN/inf (counted) instead of stopping."))
    max_train_samples: Optional[int] = field(default=None, metadata=_help("Truncate the training set (debugging)."))
    max_eval_samples: Optional[int] = field(default=None, metadata=_help("Truncate eval/test sets (debugging)."))
    seeds: Optional[list[int]] = field(default=None, metadata=_help(
        "One run per seed (e.g. --seeds 42 142 242), each in output_dir/seed_<s>; summary.json has mean, std "
        "and 95%% t-intervals of every metric."))
    num_runs: int = field(default=1, metadata=_help("Runs with seeds --seed, --seed+100, ... (like --seeds)."))
    resplit_per_seed: bool = field(default=False, metadata=_help(
        "Each seed also draws its own derived validation/test split (default: the split of --seed for all)."))
    kfold: int = field(default=0, metadata=_help(
        "K-fold cross-validation on the training file (stratified for classification): each fold is held out "
        "once as the test set; --validation_split of the other folds picks the best model."))
    # Distillation (common/distill.py, docs/distillation.md)
    teacher_model: Optional[str] = field(default=None, metadata=_help(
        "Distillation: a fine-tuned teacher (an output folder of this script, or a Hub id) with the student's labels "
        "and vocabulary; the model learns from its predictions (and, with --distill_hidden/--distill_attention/"
        "--distill_embeddings, from its intermediate layers)."))
    distill_alpha: float = field(default=0.5, metadata=_help(
        "Weight of the hard-label loss; 1 - alpha weighs T^2 * KL(teacher || student) at temperature T."))
    distill_temperature: float = field(default=2.0, metadata=_help("Softmax temperature T of the distillation loss."))
    distill_prediction: bool = field(default=True, metadata=_help(
        "Train on the prediction layer (hard labels and the teacher's logits). --no_distill_prediction: the "
        "intermediate-layer losses alone (TinyBERT's first stage)."))
    distill_hidden: bool = field(default=False, metadata=_help(
        "MSE between each student layer's output and its teacher layer's (--layer_map); projected when widths differ."))
    distill_attention: bool = field(default=False, metadata=_help(
        "MSE between the attention scores (before softmax) of each student layer and its teacher layer's; needs "
        "equal head counts."))
    distill_embeddings: bool = field(default=False, metadata=_help(
        "MSE between the embedding-layer outputs of student and teacher (projected when widths differ)."))
    distill_intermediate_weight: float = field(default=1.0, metadata=_help(
        "Weight of the intermediate-layer losses against the prediction-layer loss."))
    layer_map: Optional[str] = field(default=None, metadata=_help(
        "Student:teacher pairs of 0-based encoder layers for the intermediate losses, e.g. 0:1,1:3,2:5. Unset: "
        "uniform (student layer m of M -> teacher layer round((m+1)*N/M)-1 of N)."))
    distill_cache_logits: bool = field(default=True, metadata=_help(
        "With prediction-layer distillation only: compute the teacher's logits once over the training set (cached "
        "on disk, keyed by teacher and data) instead of running the teacher at every step."))
    init_student_layers: Optional[str] = field(default=None, metadata=_help(
        "Build the model from these 0-based encoder layers of --model (e.g. 0,2,4): embeddings, these layers and "
        "the rest copied, num_hidden_layers updated; saved as an ordinary model of the same family."))

    def run_seeds(self) -> list[int]:
        return list(self.seeds) if self.seeds else [self.seed + 100 * i for i in range(self.num_runs)]

    def is_repeated(self) -> bool:
        return self.kfold >= 2 or len(self.run_seeds()) > 1

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value) and f.name != "max_grad_norm":
                raise UserError(f"--{f.name} must be a finite number, got {value}.")
        positive = ["per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                    "logging_steps"]
        for name in positive:
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UserError(f"--{name} must be a positive integer, got {getattr(self, name)}.")
        if not self.learning_rate > 0:
            raise UserError(f"--learning_rate must be positive, got {self.learning_rate}.")
        if self.lr_scheduler_type == "polynomial" and self.learning_rate <= 1e-7:
            raise UserError(f"--lr_scheduler_type polynomial decays to 1e-07, so --learning_rate must be above it, got "
                            f"{self.learning_rate}.")
        if self.max_steps <= 0 and not self.num_train_epochs > 0:
            raise UserError("Set --num_train_epochs > 0 or --max_steps > 0.")
        if not 0 <= self.warmup_ratio < 1:
            raise UserError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}.")
        if self.warmup_steps < 0 or self.max_grad_norm < 0 or self.weight_decay < 0:
            raise UserError("--warmup_steps, --max_grad_norm and --weight_decay must not be negative.")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"--{name} must be in [0, 1), got {getattr(self, name)}.")
        if not self.adam_epsilon >= 0:
            raise UserError(f"--adam_epsilon must not be negative, got {self.adam_epsilon}.")
        for seed in [self.seed, *(self.seeds or [])]:
            if not 0 <= seed < 2**32:
                raise UserError(f"--seed/--seeds must be in [0, 2**32), got {seed}.")
        if self.dataloader_num_workers < 0:
            raise UserError(f"--dataloader_num_workers must be 0 or more, got {self.dataloader_num_workers}.")
        if self.ddp_timeout <= 0:
            raise UserError(f"--ddp_timeout must be a positive number of seconds, got {self.ddp_timeout}.")
        if self.early_stopping_patience is not None and self.eval_strategy == "no":
            raise UserError("--early_stopping_patience counts evaluations, but --eval_strategy is no; evaluate "
                            "(--eval_strategy epoch or steps) or drop --early_stopping_patience.")
        if self.resume_from_checkpoint and not self.do_train:
            raise UserError("--resume_from_checkpoint continues a training run, but --no_do_train does not train; to "
                            "evaluate a finished run pass its output folder as --model.")
        if self.eval_steps is not None:
            if self.eval_steps <= 0:
                raise UserError(f"--eval_steps must be a positive integer, got {self.eval_steps}.")
            if self.eval_strategy == "epoch":
                self.eval_strategy = "steps"
        elif self.eval_strategy == "steps":
            raise UserError("--eval_strategy steps needs --eval_steps N.")
        if self.checkpointing_steps is not None and self.checkpointing_steps != "epoch":
            if not self.checkpointing_steps.isdigit() or int(self.checkpointing_steps) <= 0:
                raise UserError(
                    f"--checkpointing_steps must be a positive integer or 'epoch', got '{self.checkpointing_steps}'.")
        if self.seeds is not None:
            if self.num_runs != 1:
                raise UserError("pass either --seeds or --num_runs, not both.")
            if not self.seeds:
                raise UserError("--seeds needs at least one seed.")
            if len(set(self.seeds)) != len(self.seeds):
                raise UserError(f"--seeds has repeated values ({' '.join(map(str, self.seeds))}); repeated seeds "
                                "give identical runs and a falsely narrow interval.")
        if self.num_runs < 1:
            raise UserError(f"--num_runs must be 1 or more, got {self.num_runs}.")
        if max(self.run_seeds()) >= 2**32:
            raise UserError(f"--num_runs {self.num_runs} from --seed {self.seed} gives seeds of 2**32 or more; lower "
                            "--seed.")
        if self.kfold == 1 or self.kfold < 0:
            raise UserError(f"--kfold must be 2 or more (or 0 for no cross-validation), got {self.kfold}.")
        if self.resplit_per_seed and len(self.run_seeds()) < 2:
            raise UserError("--resplit_per_seed needs several seeds (--seeds S1 S2 ... or --num_runs N).")
        if self.save_total_limit is not None and self.save_total_limit <= 0:
            raise UserError("--save_total_limit must be a positive integer.")
        if self.early_stopping_patience is not None and self.early_stopping_patience <= 0:
            raise UserError("--early_stopping_patience must be a positive integer.")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of <= 0:
            raise UserError(f"--pad_to_multiple_of must be a positive integer, got {self.pad_to_multiple_of}.")
        for name in ("max_train_samples", "max_eval_samples"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UserError(f"--{name} must be a positive integer.")
        self._check_distillation()

    def intermediate_losses(self) -> list[str]:
        """The intermediate-layer distillation losses asked for: hidden, attention, embeddings."""
        return [k for k in ("hidden", "attention", "embeddings") if getattr(self, f"distill_{k}")]

    def _check_distillation(self) -> None:
        if not 0 <= self.distill_alpha <= 1:
            raise UserError(f"--distill_alpha must be in [0, 1], got {self.distill_alpha}.")
        if not self.distill_temperature > 0 or self.distill_intermediate_weight < 0:
            raise UserError("--distill_temperature must be positive and --distill_intermediate_weight not negative.")
        if self.layer_map is not None:
            parse_layer_map(self.layer_map)
        if self.init_student_layers is not None:
            parse_layers(self.init_student_layers, "--init_student_layers")
        needs_teacher = [f"--distill_{k}" for k in self.intermediate_losses()] + (
            ["--layer_map"] if self.layer_map else []) + (
            [] if self.distill_prediction else ["--no_distill_prediction"])
        if needs_teacher and not self.teacher_model:
            raise UserError(f"{', '.join(needs_teacher)} distill from a teacher: pass --teacher_model PATH.")
        if not self.distill_prediction and not self.intermediate_losses():
            raise UserError("--no_distill_prediction leaves no loss: add --distill_hidden, --distill_attention and/or "
                            "--distill_embeddings (TinyBERT's first stage), or drop it.")
        if self.layer_map and not (self.distill_hidden or self.distill_attention):
            raise UserError("--layer_map pairs layers for --distill_hidden/--distill_attention; add one or drop it.")
        if self.torch_compile and self.intermediate_losses():
            raise UserError("--torch_compile with intermediate-layer distillation (--distill_hidden/"
                            "--distill_attention/--distill_embeddings) has not been tested (the losses tap the "
                            "compiled layers); drop one of them.")
        if (self.teacher_model or self.init_student_layers) and not self.do_train:
            raise UserError("--teacher_model and --init_student_layers build and train a student; drop them with "
                            "--no_do_train.")


def parse_layers(text: str, flag: str) -> list[int]:
    """'0,2,4' -> [0, 2, 4]: distinct 0-based layer numbers in increasing order."""
    try:
        layers = [int(x) for x in text.split(",")]
    except ValueError:
        layers = []
    if not layers or min(layers) < 0 or layers != sorted(set(layers)):
        raise UserError(f"{flag} takes 0-based layer numbers in increasing order, comma-separated (e.g. 0,2,4); "
                        f"got '{text}'.")
    return layers


def parse_layer_map(text: str) -> list[tuple[int, int]]:
    """'0:1,1:3' -> [(0, 1), (1, 3)]: student layer -> teacher layer, each student layer once."""
    try:
        pairs = [tuple(int(x) for x in item.split(":")) for item in text.split(",")]
    except ValueError:
        pairs = [()]
    students = [p[0] for p in pairs if len(p) == 2]
    if (not pairs or any(len(p) != 2 or min(p) < 0 for p in pairs) or len(set(students)) != len(students)):
        raise UserError(f"--layer_map takes student:teacher pairs of 0-based layers, each student layer once "
                        f"(e.g. 0:1,1:3,2:5); got '{text}'.")
    return sorted(pairs)


class _Parser(HfArgumentParser):
    """argparse reports bad flag values by printing usage and exiting; we raise one clear UserError."""

    def error(self, message: str):
        raise UserError(f"{message}; see --help.")


def _flag_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Every option string (without dashes) -> its dest."""
    names = {}
    for action in parser._actions:
        for opt in action.option_strings:
            names[opt.lstrip("-")] = action.dest
    return names


# A negative number in scientific or special notation ('-1e-3', '-2E-5', '-inf'): argparse takes it for a flag.
_NEGATIVE = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan)$", re.IGNORECASE)


def _join_negative_values(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """'--learning_rate -1e-3' -> '--learning_rate=-1e-3', so that the value reaches the setting's own check
    instead of argparse's 'expected one argument'."""
    takes_value = {opt for a in parser._actions if a.nargs is None and a.option_strings for opt in a.option_strings}
    out, i = [], 0
    while i < len(argv):
        if argv[i] in takes_value and i + 1 < len(argv) and _NEGATIVE.match(argv[i + 1]):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def _field_types(dataclass_types: Sequence[type]) -> dict[str, Any]:
    types = {}
    for dtype in dataclass_types:
        hints = typing.get_type_hints(dtype)
        types.update({f.name: hints[f.name] for f in dataclasses.fields(dtype) if f.init})
    return types


def _config_value(key: str, value: Any, hint: Any, choices, path: str) -> Any:
    """A --config YAML value checked and converted to its setting's type, or a UserError naming the file."""
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) is typing.Union and type(None) in args
    inner = next((a for a in args if a is not type(None)), hint) if optional else hint

    def bad(expected: str) -> UserError:
        return UserError(f"--config file '{path}': {key}: {value!r} is not {expected}; fix the value (or remove the "
                         "line to use the default).")

    if value is None:
        if optional:
            return None
        raise UserError(f"--config file '{path}': {key} is empty (null), but it needs a value; give one, or remove "
                        "the line to use the default.")
    if typing.get_origin(inner) is list:
        items = value if isinstance(value, list) else [value]
        return [_config_value(key, v, typing.get_args(inner)[0], choices, path) for v in items]
    if typing.get_origin(inner) is Literal:
        choices, inner = list(typing.get_args(inner)), str
    if inner is bool:
        if isinstance(value, bool):
            return value
        raise bad("true or false")
    if isinstance(value, bool) and inner is not str:
        raise bad(f"a {'whole number' if inner is int else 'number'}")
    if inner is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int):
            return value
        try:
            return int(str(value).strip())
        except ValueError:
            raise bad("a whole number") from None
    if inner is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad("a number") from None
    if isinstance(value, bool):  # YAML reads an unquoted no/yes/off/on as a boolean
        word = {False: "no", True: "yes"}[value]
        if choices and word in choices:
            return word
        raise bad(f"text (YAML reads an unquoted {word}/true/false as a boolean; quote it)")
    if isinstance(value, (list, dict)):
        raise bad("a single value")
    value = str(value)
    if choices and value not in choices:
        raise bad(f"one of {', '.join(map(str, choices))}{closest(value, map(str, choices))}")
    return value


def _read_config(path: str, parser: argparse.ArgumentParser, names: dict[str, str],
                 dataclass_types: Sequence[type]) -> dict[str, Any]:
    """dest -> value of every setting in the --config YAML file, each checked against its type."""
    if os.path.isdir(path):
        raise UserError(f"--config '{path}' is a folder; pass a YAML file (e.g. the training_args.yaml of a run).")
    if not os.path.isfile(path):
        raise UserError(f"--config file '{path}' does not exist.")
    try:
        with open(path, encoding="utf-8") as fh:
            values = yaml.safe_load(fh) or {}
    except UnicodeDecodeError:
        raise UserError(f"--config file '{path}' is not UTF-8 text; save it as UTF-8 YAML.") from None
    except yaml.YAMLError as err:
        raise UserError(f"--config file '{path}' is not valid YAML: {str(err).splitlines()[0]}.") from None
    if not isinstance(values, dict):
        raise UserError(f"--config file '{path}' must hold a mapping of setting: value.")
    types = _field_types(dataclass_types)
    choices = {a.dest: a.choices for a in parser._actions if a.choices}
    negated = {opt.lstrip("-").replace("-", "_") for a in parser._actions if isinstance(a, argparse._StoreFalseAction)
               for opt in a.option_strings}
    defaults = {}
    for key, value in values.items():
        key = str(key).replace("-", "_")
        if key not in names or key == "config":
            raise UserError(f"--config file '{path}' has an unknown setting '{key}'"
                            f"{closest(key, [n for n in names if n != 'config'])}.")
        dest = names[key]
        value = _config_value(key, value, bool if key in negated else types[dest], choices.get(dest), path)
        defaults[dest] = (not value) if key in negated else value  # no_do_train: true -> do_train false
    return defaults


def parse_args(dataclass_types: Sequence[type], argv: Sequence[str] | None, description: str):
    """Parse `argv` into the given dataclasses: defaults < --config YAML < flags. Unknown keys are errors."""
    import sys

    parser = _Parser(list(dataclass_types), description=description,
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    parser.add_argument("--config", default=None,
                        help="YAML file of settings (flag names as keys); flags given on the command line win.")
    argv = [str(a) for a in (argv if argv is not None else sys.argv[1:])]  # Paths and numbers from notebooks
    argv = _join_negative_values(argv, parser)
    pre_parser = argparse.ArgumentParser(add_help=False)
    pre_parser.add_argument("--config", default=None)
    pre, _ = pre_parser.parse_known_args(argv)
    names = _flag_names(parser)
    from_config: dict[str, Any] = {}
    if pre.config:
        from_config = _read_config(pre.config, parser, names, dataclass_types)
        parser.set_defaults(**from_config)
    namespace, remaining = parser.parse_known_args(argv)
    if remaining:
        unknown = remaining[0]
        hint = closest(unknown.lstrip("-"), names).replace("'", "'--", 1)
        raise UserError(f"unknown argument '{unknown}'{hint}; see --help.")
    on_command_line = {names.get(a.lstrip("-").split("=")[0]) for a in argv if a.startswith("--")}
    outputs = []
    for dtype in dataclass_types:
        keys = {f.name for f in dataclasses.fields(dtype) if f.init}
        try:
            outputs.append(dtype(**{k: v for k, v in vars(namespace).items() if k in keys}))
        except UserError as err:  # a value from the YAML file: say so
            named = [k for k in from_config if k not in on_command_line and f"--{k}" in str(err)]
            if named:
                raise UserError(f"{str(err).rstrip('.')} (set by {named[0]} in --config file "
                                f"'{pre.config}').") from None
            raise
    return outputs


def to_jsonable(*configs: Any) -> dict:
    """The resolved settings of several dataclasses as one flat JSON-able dict."""
    merged: dict[str, Any] = {}
    for cfg in configs:
        merged.update(json.loads(json.dumps(dataclasses.asdict(cfg), default=str)))
    return merged
