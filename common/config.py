"""Settings: typed dataclasses, parsed from defaults < `--config file.yaml` < command-line flags.

Flag names follow `transformers.TrainingArguments` where one exists. Each script adds its own
data dataclass; the model and training settings below are shared by all three scripts.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import math
import os
import re
import shutil
import textwrap
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional, Sequence

import yaml
from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

from .errors import UserError, closest
from .files import check_encoding

DEFAULT_MODEL = "huawei-noah/TinyBERT_General_4L_312D"
# Schedules that need nothing beyond warm-up and total steps (plateau/min-lr/WSD need extra arguments).
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt")


def _help(text: str, **kw: Any) -> dict:
    """Field metadata: the --help text, and e.g. group= (a HELP_GROUPS key), metavar=, aliases=, choices=."""
    return {"help": text, **kw}


@dataclass
class ModelArguments:
    _argument_group_name = "model"
    model: str = field(default=DEFAULT_MODEL, metadata=_help(
        "Hub id or local folder of the pretrained encoder (an MLM output_dir works too); alias "
        "--model_name_or_path.", aliases=["--model_name_or_path"], metavar="ID|DIR"))
    tokenizer_name: Optional[str] = field(default=None, metadata=_help("Tokenizer, if not the model's own."))
    revision: str = field(default="main", metadata=_help("Hub revision (branch, tag or commit)."))
    trust_remote_code: bool = field(default=False, metadata=_help(
        "Run custom modelling code from the model's Hub repository."))
    cache_dir: Optional[str] = field(default=None, metadata=_help("Where Hub downloads are cached."))
    attn_implementation: Optional[str] = field(default=None, metadata=_help(
        "Attention kernel: sdpa, eager, flash_attention_2 (where installed) or flex_attention (default: the "
        "model's, sdpa for BERT).", choices=["sdpa", "eager", "flash_attention_2", "flex_attention"],
        group="speed"))
    onnx_model: Literal["auto", "int8", "fp32"] = field(default="auto", metadata=_help(
        "When --model is a folder export.py wrote (scored by ONNX Runtime): the graph that runs; auto: "
        "model_int8.onnx if there, else model.onnx."))


@dataclass
class DataSourceArguments:
    """Where the text comes from, shared by the three scripts' data settings (each subclass adds its own
    columns and may restate a field to change its default or help)."""
    _argument_group_name = "data"
    dataset: Optional[str] = field(default=None, metadata=_help("Hub dataset (e.g. glue, conll2003, wikitext)."))
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
        "Text encoding of the data files (a UTF-8 byte-order mark is accepted); e.g. cp1252 for Windows files."))
    column_names: Optional[list[str]] = field(default=None, metadata=_help(
        "Column names of csv/tsv files without a header row, one per column."))
    delimiter: Optional[str] = field(default=None, metadata=_help(
        "Field separator of csv/tsv files: one character or 'tab' (default: ',' for .csv, tab for .tsv).",
        metavar="CHAR"))
    preprocessing_num_workers: Optional[int] = field(default=None, metadata=_help(
        "Processes for tokenizing (default: this one).", group="speed"))
    overwrite_cache: bool = field(default=False, metadata=_help("Tokenize again even if cached."))

    # The canonical public task of the script, trained when no data flag at all is given: (Hub id, config).
    default_dataset: ClassVar[Optional[tuple[str, Optional[str]]]] = None
    # What describes the data files' shape, taken from a trained model's training_args.yaml when a run does not
    # train (common/runs/run_settings.py): (settings reused together, the files they apply to). Scripts add theirs.
    reused_settings: ClassVar[tuple] = ((("encoding",), "encoding"), (("max_length",), "any"),
                                        (("delimiter",), "same extension"), (("column_names",), "headerless"))

    def file_layout(self, path: str, flag: str) -> str:
        """How a data file is read: 'table' (named columns) or 'lines' (a script's line formats: CoNLL, text)."""
        return "table"

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
    # Each field's metadata names its --help group (HELP_GROUPS); a new flag needs one (tests/test_help.py).
    output_dir: str = field(default="output", metadata=_help(
        "Where the model, results and checkpoints go.", group="training"))
    overwrite_output_dir: bool = field(default=False, metadata=_help(
        "Allow writing into a non-empty output_dir.", group="training"))
    seed: int = field(default=42, metadata=_help(
        "Seed for sampling, dropout, splits and init.", group="training"))
    per_device_train_batch_size: int = field(default=32, metadata=_help(
        "Training batch size per process.", group="training"))
    per_device_eval_batch_size: Optional[int] = field(default=None, metadata=_help(
        "Evaluation batch size per process (default: the training batch on CPU, 4x it on GPUs/TPUs).",
        group="evaluation"))
    gradient_accumulation_steps: int = field(default=1, metadata=_help(
        "Micro-batches per optimizer step.", group="training"))
    learning_rate: float = field(default=5e-5, metadata=_help("Peak learning rate of AdamW.", group="training"))
    weight_decay: float = field(default=0.01, metadata=_help(
        "Weight decay (not on biases or LayerNorm).", group="training"))
    adam_beta1: float = field(default=0.9, metadata=_help("AdamW beta1.", group="training"))
    adam_beta2: float = field(default=0.999, metadata=_help("AdamW beta2.", group="training"))
    adam_epsilon: float = field(default=1e-8, metadata=_help("AdamW epsilon.", group="training"))
    max_grad_norm: float = field(default=1.0, metadata=_help(
        "Gradient clipping norm (0 disables clipping).", group="training"))
    num_train_epochs: float = field(default=3.0, metadata=_help(
        "Training epochs (ignored when --max_steps > 0).", group="training"))
    max_steps: int = field(default=-1, metadata=_help(
        "Total optimizer steps if > 0 (wins over epochs).", group="training"))
    lr_scheduler_type: str = field(default="linear", metadata=_help(
        "Learning-rate schedule (transformers.get_scheduler)", choices=SCHEDULERS, group="training"))
    warmup_ratio: float = field(default=0.1, metadata=_help(
        "Warm-up as a fraction of all optimizer steps.", group="training"))
    warmup_steps: int = field(default=0, metadata=_help(
        "Warm-up steps (wins over --warmup_ratio).", group="training"))
    eval_strategy: Literal["epoch", "steps", "no"] = field(default="epoch", metadata=_help(
        "Evaluate after every epoch, every --eval_steps, or never.", group="evaluation"))
    eval_steps: Optional[int] = field(default=None, metadata=_help(
        "Evaluate every N steps (sets --eval_strategy steps).", group="evaluation"))
    logging_steps: Optional[int] = field(default=None, metadata=_help(
        "Log loss, lr, grad norm and speed every N steps (default: about 40 points per run, at most every 50 "
        "steps).", group="sharing"))
    progress: Literal["auto", "bar", "lines", "none"] = field(default="auto", metadata=_help(
        "Progress: auto (a bar on terminals and in notebooks, sparse log lines in a file; env "
        "BERT_FINETUNE_PROGRESS), bar, lines or none.", group="sharing"))
    metric_for_best_model: Optional[str] = field(default=None, metadata=_help(
        "Validation metric that picks the best model and drives early stopping (default: the task's).",
        group="evaluation"))
    greater_is_better: Optional[bool] = field(default=None, metadata=_help(
        "Whether a larger metric is better (default: from its name).", group="evaluation"))
    load_best_model_at_end: bool = field(default=True, metadata=_help(
        "Save and test the best evaluated weights, not the last.", group="evaluation"))
    early_stopping_patience: Optional[int] = field(default=None, metadata=_help(
        "Stop after this many evaluations without improvement.", group="evaluation"))
    early_stopping_threshold: float = field(default=0.0, metadata=_help(
        "Smallest metric gain that counts as better.", group="evaluation"))
    checkpointing_steps: Optional[str] = field(default=None, metadata=_help(
        "Save a resumable checkpoint every N steps or every epoch.", group="checkpoints",
        metavar="N|epoch"))
    save_total_limit: Optional[int] = field(default=None, metadata=_help(
        "Keep only the newest N checkpoints.", group="checkpoints"))
    resume_from_checkpoint: Optional[str] = field(default=None, metadata=_help(
        "A checkpoint folder; latest: the newest complete one in output_dir (refused if none); auto: the same, "
        "or a fresh start if none.", group="checkpoints", metavar="DIR|latest|auto"))
    do_train: bool = field(default=True, metadata=_help(
        "Train (--no_do_train: evaluate/predict with --model as it is, e.g. a trained output folder).",
        group="training"))
    do_eval: bool = field(default=True, metadata=_help(
        "Evaluate on the validation data, if any (during training and at the end).", group="evaluation"))
    do_predict: bool = field(default=True, metadata=_help(
        "Evaluate (when labelled) and write predictions for the test data, if any.", group="evaluation"))
    push_to_hub: bool = field(default=False, metadata=_help(
        "Upload output_dir to the Hub at the end (checked at start).", group="sharing"))
    hub_model_id: Optional[str] = field(default=None, metadata=_help(
        "Hub repository (default: <you>/<output folder name>).", group="sharing", metavar="ORG/NAME"))
    hub_token: Optional[str] = field(default=None, metadata=_help(
        "Hub token (default: the one of `hf auth login`, or HF_TOKEN).", group="sharing", metavar="TOKEN"))
    hub_private_repo: bool = field(default=False, metadata=_help(
        "Create the --hub_model_id repository as private.", group="sharing"))
    report_to: str = field(default="none", metadata=_help(
        "Trackers through accelerate: none, all, or a comma list (tensorboard, wandb, mlflow, ...).",
        group="sharing", metavar="LIST"))
    mixed_precision: Optional[str] = field(default=None, metadata=_help(
        "Precision (default: the accelerate launch setting, else auto: bf16 where the hardware runs it fast, "
        "else fp32).", choices=["no", "fp16", "bf16", "auto"], group="speed"))
    group_by_length: bool = field(default=True, metadata=_help(
        "Batch examples of similar length: less padding.", group="speed"))
    pad_to_multiple_of: Optional[int] = field(default=None, metadata=_help(
        "Round each batch's padded length up to a multiple of N (default: 32 with --torch_compile, 8 under mixed "
        "precision, else none).", group="speed"))
    pad_to_max_length: bool = field(default=False, metadata=_help(
        "Pad every batch to --max_length (slower; always on TPU).", group="speed"))
    optim: Literal["auto", "adamw_torch_fused", "adamw_torch_foreach", "adamw_torch"] = field(
        default="auto", metadata=_help(
        "AdamW kernel: adamw_torch_fused, adamw_torch_foreach or adamw_torch; auto: fused where the device has "
        "it, else foreach.", group="speed"))
    fast_dropout: bool = field(default=True, metadata=_help(
        "On CPU, dropout masks from 16-bit random integers (training steps 1.3-1.5x faster; ignored on GPU/TPU "
        "and with --torch_compile).", group="speed"))
    dataloader_num_workers: int = field(default=0, metadata=_help("DataLoader worker processes.", group="speed"))
    torch_compile: bool = field(default=False, metadata=_help(
        "Compile the model with torch.compile.", group="speed"))
    cuda_graphs: Literal["auto", "on", "off"] = field(default="auto", metadata=_help(
        "Steps as CUDA graphs, one per padded length: auto (on a GPU, kept if measured faster), on, off.",
        group="speed"))
    ddp_timeout: int = field(default=1800, metadata=_help(
        "Seconds before a collective gives up (a dead rank then ends the job instead of hanging).",
        group="checkpoints"))
    skip_nonfinite: bool = field(default=False, metadata=_help(
        "Skip steps with a NaN/inf loss (counted) instead of stopping.", group="checkpoints"))
    max_train_samples: Optional[int] = field(default=None, metadata=_help(
        "Truncate the training set (debugging).", group="training"))
    max_eval_samples: Optional[int] = field(default=None, metadata=_help(
        "Truncate evaluation/test sets (debugging).", group="evaluation"))
    seeds: Optional[list[int]] = field(default=None, metadata=_help(
        "One run per seed, each in output_dir/seed_<s>; summary.json has mean, std and 95%% t-intervals.",
        group="repeats"))
    num_runs: int = field(default=1, metadata=_help(
        "Runs with seeds --seed, --seed+100, ...", group="repeats"))
    resplit_per_seed: bool = field(default=False, metadata=_help(
        "Each seed draws its own derived validation/test split.", group="repeats"))
    kfold: int = field(default=0, metadata=_help(
        "Cross-validation folds on the training file (default: 0, none).", group="repeats", metavar="K"))
    # Distillation (common/training/distill.py, docs/distillation.md)
    teacher_model: Optional[str] = field(default=None, metadata=_help(
        "Fine-tuned teacher (folder or Hub id), the student's labels.",
        group="distillation", metavar="ID|DIR"))
    distill_alpha: float = field(default=0.5, metadata=_help(
        "Weight of the hard-label loss; 1 - alpha weighs T^2 * KL(teacher || student).", group="distillation"))
    distill_temperature: float = field(default=2.0, metadata=_help(
        "Softmax temperature T of the distillation loss.", group="distillation"))
    distill_prediction: bool = field(default=True, metadata=_help(
        "Learn from the teacher's logits (--no_distill_prediction: the intermediate losses alone).",
        group="distillation"))
    distill_hidden: bool = field(default=False, metadata=_help(
        "MSE between paired student and teacher layer outputs.", group="distillation"))
    distill_attention: bool = field(default=False, metadata=_help(
        "MSE between paired layers' attention scores (same heads).", group="distillation"))
    distill_embeddings: bool = field(default=False, metadata=_help(
        "MSE between student and teacher embedding outputs.", group="distillation"))
    distill_intermediate_weight: float = field(default=1.0, metadata=_help(
        "Weight of the intermediate-layer losses.", group="distillation"))
    layer_map: Optional[str] = field(default=None, metadata=_help(
        "Student:teacher layer pairs, 0-based (default: uniform).", group="distillation", metavar="S:T,..."))
    distill_cache_logits: bool = field(default=True, metadata=_help(
        "Prediction layer only: the teacher's logits once, cached on disk.",
        group="distillation"))
    init_student_layers: Optional[str] = field(default=None, metadata=_help(
        "Build the model from these 0-based layers of --model.", group="distillation", metavar="L,L,..."))
    # The transfer set (common/training/transfer.py, common/data/augment.py, docs/distillation.md)
    distill_augment: int = field(default=0, metadata=_help(
        "N augmented variants per example (TinyBERT).", group="distillation", metavar="N"))
    augment_model: Optional[str] = field(default=None, metadata=_help(
        "Masked LM proposing replacements (default: the teacher).", group="distillation",
        metavar="ID|DIR"))
    augment_top_k: int = field(default=15, metadata=_help(
        "Replacement candidates per word (top K).", group="distillation", metavar="K"))
    augment_prob: float = field(default=0.4, metadata=_help(
        "Probability of replacing each word.", group="distillation", metavar="P"))
    augment_passes: int = field(default=0, metadata=_help(
        "Masked copies per sentence (0: one per word).", group="distillation", metavar="P"))
    augment_seed: int = field(default=0, metadata=_help(
        "Seed of the variants (shared by every --seed).", group="distillation", metavar="S"))
    distill_unlabeled_file: Optional[str] = field(default=None, metadata=_help(
        "Unlabelled text for the teacher (training file's layout).", group="distillation",
        metavar="FILE"))
    # Hyperparameter search (common/runs/study.py, common/runs/search_space.py, docs/hpo.md)
    hpo_trials: int = field(default=0, metadata=_help(
        "A study of N trials (Optuna), each a run in output_dir/trials/.", group="search", metavar="N"))
    hpo_space: Optional[str] = field(default=None, metadata=_help(
        "YAML: the settings to search (default: the task's space).", group="search", metavar="FILE"))
    hpo_sampler: Literal["tpe", "random"] = field(default="tpe", metadata=_help(
        "Optuna's TPE, or random draws.", group="search"))
    hpo_pruner: Literal["halving", "median", "none"] = field(default="halving", metadata=_help(
        "Stop weak trials early: successive halving, median, never.", group="search"))
    hpo_storage: Optional[str] = field(default=None, metadata=_help(
        "Optuna storage URL, for several machines (default: sqlite).", group="search", metavar="URL"))
    hpo_study_name: str = field(default="study", metadata=_help(
        "The study's name in --hpo_storage.", group="search", metavar="NAME"))
    hpo_workers: int = field(default=1, metadata=_help(
        "Trials at once here, each with its share of cores or a GPU.", group="search", metavar="K"))
    hpo_confirm_seeds: int = field(default=0, metadata=_help(
        "Re-run the best and the default settings over N seeds.", group="search", metavar="N"))

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
        self._check_search()

    def _check_search(self) -> None:
        """--hpo_*: values, and the settings a study cannot go with (checked before anything runs)."""
        if self.hpo_trials < 0:
            raise UserError(f"--hpo_trials must be 0 (no search) or more, got {self.hpo_trials}.")
        if not self.hpo_trials:
            defaults = {f.name: f.default for f in dataclasses.fields(self) if f.name.startswith("hpo_")}
            given = [n for n in ("hpo_space", "hpo_storage", "hpo_confirm_seeds", "hpo_workers", "hpo_sampler",
                                 "hpo_pruner", "hpo_study_name") if getattr(self, n) != defaults[n]]
            if given:
                raise UserError(f"--{given[0]} is a setting of a hyperparameter search; add --hpo_trials N or drop it.")
            return
        if self.hpo_workers < 1 or self.hpo_workers > self.hpo_trials:
            raise UserError(f"--hpo_workers must be between 1 and --hpo_trials ({self.hpo_trials}), got "
                            f"{self.hpo_workers}.")
        if self.hpo_confirm_seeds == 1 or self.hpo_confirm_seeds < 0:
            raise UserError(f"--hpo_confirm_seeds must be 2 or more (an interval needs 2 runs), or 0, got "
                            f"{self.hpo_confirm_seeds}.")
        if not self.hpo_study_name.strip():
            raise UserError("--hpo_study_name must not be empty.")
        if not self.do_train:
            raise UserError("--hpo_trials searches training settings, but --no_do_train does not train; drop one.")
        if not self.do_eval:
            raise UserError("--hpo_trials scores every trial on the validation data, but --no_do_eval evaluates none; "
                            "drop --no_do_eval.")
        if self.resume_from_checkpoint:
            raise UserError("--resume_from_checkpoint is for single runs; a study (--hpo_trials) continues by itself "
                            "when the same command runs again.")
        if self.push_to_hub:
            raise UserError("--push_to_hub uploads one model; a study (--hpo_trials) trains many: train the settings "
                            "of its best.yaml once with --push_to_hub.")
        if self.seeds is not None or self.num_runs != 1:
            raise UserError("--seeds/--num_runs with --hpo_trials: a trial is one run (or one --kfold "
                            "cross-validation); use --hpo_confirm_seeds N to re-run the best settings over N seeds.")
        metric = self.metric_for_best_model or ""
        if metric.startswith("test_") or metric.startswith("test/"):
            raise UserError(f"--metric_for_best_model {metric}: a study is scored on the validation split, never "
                            "on a test split (that would tune to the test set); name a validation metric.")

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
        if self.augment_passes < 0:
            raise UserError(f"--augment_passes must be >= 0 (0: one masked copy per word), got {self.augment_passes}.")
        if self.distill_augment < 0 or self.augment_top_k < 1 or not 0 < self.augment_prob <= 1:
            raise UserError(f"--distill_augment must be >= 0 (got {self.distill_augment}), --augment_top_k >= 1 (got "
                            f"{self.augment_top_k}) and --augment_prob in (0, 1] (got {self.augment_prob}).")
        augment_flags = [f for f, given in (("--augment_model", self.augment_model is not None),
                                             ("--augment_top_k", self.augment_top_k != 15),
                                             ("--augment_prob", self.augment_prob != 0.4),
                                             ("--augment_passes", self.augment_passes != 0),
                                             ("--augment_seed", self.augment_seed != 0)) if given]
        if augment_flags and not self.distill_augment:
            raise UserError(f"{', '.join(augment_flags)} only appl{'y' if len(augment_flags) > 1 else 'ies'} with "
                            "--distill_augment N, which is not given; add "
                            "--distill_augment N (e.g. 20) or drop them.")
        transfer = [f for f, given in (("--distill_augment", self.distill_augment > 0),
                                       ("--distill_unlabeled_file", self.distill_unlabeled_file)) if given]
        if transfer and not self.teacher_model:
            raise UserError(f"{', '.join(transfer)} only add{'' if len(transfer) > 1 else 's'} rows for a teacher to "
                            "label: pass --teacher_model PATH.")
        if transfer and self.distill_alpha == 1 and not self.intermediate_losses():
            raise UserError(f"{', '.join(transfer)} with --distill_alpha 1 and no intermediate loss: the added rows "
                            "have no labels and nothing would learn from them; lower --distill_alpha (e.g. 0.5).")
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


# The groups of --help, in the order shown: key -> heading. Every setting names its group in its field metadata
# ("group"); a data dataclass's fields default to "data" and ModelArguments' to "model" (_argument_group_name).
# tests/test_help.py fails for a setting without one. docs/training-options.md has the details of each.
HELP_GROUPS = {
    "data": "data (files or a Hub dataset, columns, splits)",
    "model": "model",
    "training": "training (steps, batches, optimizer, schedule)",
    "evaluation": "evaluation, the best model and prediction",
    "checkpoints": "checkpoints, resume and faults",
    "speed": "precision and speed",
    "distillation": "distillation (docs/distillation.md)",
    "repeats": "repeated runs: seeds and k-fold (docs/repeated-runs.md)",
    "search": "hyperparameter search (docs/hpo.md)",
    "sharing": "logging, trackers and the Hub",
}
HELP_COLUMNS = (100, 120)  # --help width when not on a terminal, and the widest it gets on one
_CHOICES_INLINE = 24  # choices longer than this, as {a,b,c}, are listed in the help text instead
_SWITCHES = "--[no_]x: --x turns a setting on, --no_x off. "
_EPILOG = "Every flag can also be a key of a --config YAML file; README.md and docs/ explain them in depth."


class _HelpFormatter(argparse.HelpFormatter):
    """--help a person can scan: one spelling per flag (the --x-y aliases and --model_name_or_path still parse),
    switches as --x or --[no_]x, short metavars, '(default: X)' once and only where it tells something, every line
    within the terminal width (fallback 100 columns, at most 120), and the description's example commands kept as
    lines."""

    def __init__(self, prog: str, negatable: frozenset = frozenset()):
        columns = min(shutil.get_terminal_size((HELP_COLUMNS[0], 24)).columns, HELP_COLUMNS[1])
        width = max(columns, 40) - 2
        super().__init__(prog, max_help_position=min(36, max(24, width * 2 // 5)), width=width)
        self._negatable = negatable  # dests whose --no_x HfArgumentParser added (hidden; shown as --[no_]x)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings:
            return super()._format_action_invocation(action)
        longs = [s for s in action.option_strings if s.startswith("--")]
        shown = [s for s in action.option_strings if not s.startswith("--")] + longs[:1]
        if _is_switch(action):
            if action.dest in self._negatable:
                shown[-1] = "--[no_]" + shown[-1][2:]
            return ", ".join(shown)
        if action.nargs == 0:
            return ", ".join(shown)
        return f"{', '.join(shown)} {self._format_args(action, self._get_default_metavar_for_optional(action))}"

    def _get_default_metavar_for_optional(self, action: argparse.Action) -> str:
        if action.type is int:
            return "N"
        if action.type is float:
            return "X"
        if action.type is string_to_bool:  # Optional[bool]: a value is required
            return "true|false"
        if action.dest == "config" or action.dest.endswith("_file"):
            return "FILE"
        if action.dest.endswith("_dir"):
            return "DIR"
        return "NAME"

    def _metavar_formatter(self, action: argparse.Action, default_metavar: str):
        """argparse's, but long choices give way to the default metavar (they are listed in the help text)."""
        if action.metavar is None and action.choices is not None and len(_braced(action.choices)) > _CHOICES_INLINE:
            action = copy.copy(action)
            action.choices = None
        return super()._metavar_formatter(action, default_metavar)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        choices = [str(c) for c in action.choices or ()]
        if (choices and action.metavar is None and len(_braced(choices)) > _CHOICES_INLINE
                and not all(c in text for c in choices)):
            text = f"{text.rstrip('.')}: {', '.join(choices)}."
        default = action.default
        if (not action.option_strings or default is None or default is False or default == [] or
                default is argparse.SUPPRESS or "default" in text.lower()):
            return text
        shown = "on" if default is True else " ".join(map(str, default)) if isinstance(default, list) else default
        return f"{text} (default: {str(shown).replace('%', '%%')})"

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)  # keeps ids and flags whole

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        """The description and epilog: prose is re-wrapped to the width; indented lines (example commands) are
        kept as lines."""
        out: list[str] = []
        for paragraph in re.split(r"\n\s*\n", text.strip("\n")):
            prose: list[str] = []
            for line in paragraph.splitlines() + [""]:
                if line.startswith(" ") or not line:
                    if prose:
                        out.append(textwrap.fill(" ".join(prose), width, initial_indent=indent,
                                                 subsequent_indent=indent, break_on_hyphens=False))
                        prose = []
                    if line:
                        out.extend(indent + part for part in _command_lines(line.rstrip(), width - len(indent)))
                else:
                    prose.append(line.strip())
            out.append("")
        return "\n".join(out[:-1])


def _is_switch(action: argparse.Action) -> bool:
    """A boolean setting that --x alone turns on (HfArgumentParser: nargs '?', const True)."""
    return action.nargs == "?" and action.const is True


def _braced(choices) -> str:
    return "{" + ",".join(map(str, choices)) + "}"


def _command_lines(line: str, width: int) -> list[str]:
    """An example command within `width`: a trailing '# comment' goes on its own line above it, and a command
    still too wide is continued with ' \\' (as a shell reads it)."""
    if len(line) <= width:
        return [line]
    lead = line[:len(line) - len(line.lstrip())]
    command, _, comment = line.strip().partition("  # ")
    lines = [lead + textwrap.shorten(f"# {comment}", width - len(lead), placeholder=" ...")] if comment else []
    current = lead
    for word in command.split():
        if current.strip() and len(current) + 1 + len(word) + 2 > width:
            lines.append(current + " \\")
            current = lead + "    "
        current += ("" if not current.strip() else " ") + word
    return lines + [current]


class _Parser(HfArgumentParser):
    """HfArgumentParser with every setting in its help group (HELP_GROUPS) and a readable --help
    (_HelpFormatter). argparse reports bad flag values by printing usage and exiting; we raise one clear
    UserError."""

    def __init__(self, dataclass_types: Sequence[type], **kwargs: Any):
        self._help_groups: dict[str, Any] = {}
        self._negatable: set[str] = set()
        super().__init__(dataclass_types, **kwargs)
        self.formatter_class = functools.partial(_HelpFormatter, negatable=frozenset(self._negatable))
        self.epilog = (_SWITCHES if self._negatable else "") + _EPILOG
        required = [self.formatter_class(self.prog)._format_action_invocation(a) for a in self._actions if a.required]
        self.usage = " ".join(["%(prog)s", *required, "[--flag VALUE ...]"])

    def _add_dataclass_arguments(self, dtype: type) -> None:
        """HfArgumentParser's, but each field goes into the group its metadata names (else the dataclass's
        _argument_group_name), and the --no_x it adds beside a switch that defaults to on is hidden from --help
        (the switch is shown as --[no_]x)."""
        hints = typing.get_type_hints(dtype)
        for f in dataclasses.fields(dtype):
            if not f.init:
                continue
            target = self._help_group(f.metadata.get("group", getattr(dtype, "_argument_group_name", None)))
            spec = copy.copy(f)  # HfArgumentParser sets .type and passes the metadata to add_argument
            spec.type = hints[f.name]
            spec.metadata = types.MappingProxyType({k: v for k, v in f.metadata.items() if k != "group"})
            before = len(self._actions)
            self._parse_dataclass_field(target, spec)
            for action in self._actions[before:]:
                if f"--no_{f.name}" in action.option_strings:
                    action.help = argparse.SUPPRESS
                    self._negatable.add(f.name)

    def _help_group(self, key: Optional[str]):
        if key is None:
            return self
        if not self._help_groups:  # all at once, so that --help shows them in HELP_GROUPS order
            self._help_groups = {k: self.add_argument_group(title) for k, title in HELP_GROUPS.items()}
        if key not in self._help_groups:
            raise ValueError(f"help group '{key}' is not one of HELP_GROUPS ({', '.join(HELP_GROUPS)})")
        return self._help_groups[key]

    def error(self, message: str):
        for action in self._actions:  # argparse names a flag by all its spellings: keep the one --help shows
            if len(action.option_strings) > 1:
                first = next(s for s in action.option_strings if s.startswith("--"))
                message = message.replace("/".join(action.option_strings), first)
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


def parse_args(dataclass_types: Sequence[type], argv: Sequence[str] | None, description: str,
               return_given: bool = False):
    """Parse `argv` into the given dataclasses: defaults < --config YAML < flags. Unknown keys are errors.
    With `return_given`: (the dataclasses, the names of the settings given by a flag or the --config file), so
    that defaults can be replaced (run_settings.reuse_training_settings) but the user's values not."""
    import sys

    parser = _Parser(list(dataclass_types), description=description, allow_abbrev=False)
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
    if return_given:
        return outputs, {name for name in on_command_line | set(from_config) if name}
    return outputs


def to_jsonable(*configs: Any) -> dict:
    """The resolved settings of several dataclasses as one flat JSON-able dict."""
    merged: dict[str, Any] = {}
    for cfg in configs:
        merged.update(json.loads(json.dumps(dataclasses.asdict(cfg), default=str)))
    return merged
