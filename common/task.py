"""The task interface: what a script provides, and what the engine calls when.

A script implements two small classes; everything else (processes, precision, data loading
order, the loop, evaluation, checkpoints, outputs, repeated runs) is shared.

`Task` -- the script's side of one run. Stateless: what it learns from the data travels in the
`PreparedData` it returns (`state`), and what it learns from the model in `BuiltModel.state`.

| hook | default | when | ranks |
|---|---|---|---|
| `name`, `pipeline_task`, `description` | "" | results.json, model card, `--help` | - |
| `data_arguments` | required | parsing: the script's data settings dataclass | all |
| `supports_kfold` | False | before anything: `--kfold` refused when False | all |
| `eval_before_training` | False | before the first step: evaluate the starting weights | all |
| `head` | "" | --no_do_train: the model class suffix a trained model must have | all |
| `tokenizer_kwargs(model_args)` | `{}` | loading the tokenizer | all |
| `load_data(ctx)` | required | after tokenizer and config; returns `PreparedData` | all (main first for caches) |
| `build_model(ctx, data)` | required | after data, seeded; returns `BuiltModel` | all |
| `objective(ctx, data, built)` | required | after the model; returns the `Objective` | all |
| `collator(ctx, data, base)` | `base` | after the objective: batch building | all |
| `prediction_writer(ctx, data, split)` | None | predicting a split: a `PredictionWriter` (row order) | main |
| `after_save(ctx, data, built, output_dir)` | `{}` | after the model is saved; returns results.json entries | main |
| `extra_results(ctx, data, built, results, trainer)` | `{}` | before results.json is written | all |
| `model_card(ctx, data)` | no labels, generic example | writing README.md | main |

`Objective` -- what the training loop and evaluation call on every batch.

| hook | default | when | ranks |
|---|---|---|---|
| `default_metric` | "loss" | picks the best model unless `--metric_for_best_model` | all |
| `metric_names` | ("loss",) | start-up: the numbers compute_metrics reports (--metric_for_best_model) | all |
| `eval_pad_values` | `{}` | per-token eval outputs: padded across processes with these | all |
| `after_prepare(model)` | nothing | right after `accelerator.prepare` (unwrapped model) | all |
| `total_items(dataset)` | None | once, with length grouping: the epoch's items (fixed per-step denominator) | all |
| `prepare_batch(batch)` | `batch` | each training micro-batch, under a seed of (seed, step, micro-batch) | all |
| `count_items(batch)` | required | each training micro-batch: what the loss is averaged over | all |
| `loss_sum(model, batch)` | via `loss_from_logits` | each training micro-batch: the summed (not averaged) loss | all |
| `loss_from_logits(logits, batch)` | required, or override `loss_sum` | the summed loss of a batch's logits | all |
| `eval_outputs(model, batch)` | required | each evaluation batch: tensors with the batch as dim 0 | all |
| `compute_metrics(outputs)` | required | after gathering: metrics from key -> np.ndarray | all |
| `supports_distillation` | False | --teacher_model: True if `distill_mask` and `loss_from_logits` are given | all |
| `distill_mask(batch)` | required to distil | distilled logits: bool mask of logits.shape[:-1], one item each | all |
| `without_labels(batch, keep)` | required for a transfer set | the batch, hard labels of rows not kept ignored | all |
| `state_for_saving(model, state_dict)` | `state_dict` | before save_pretrained: drops training-only weights | main |
| `report()` | `{}` | results.json sections of the objective (distillation settings) | all |
| `output_files()` | `{}` | name -> text written into output_dir with the results (augment_samples.txt) | main |
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .files import honour_umask


@dataclass
class Context:
    """Everything one run knows before its data is loaded."""
    model_args: Any
    data_args: Any
    args: Any                     # config.TrainArguments of this run
    runtime: Any                  # runtime.Runtime
    tokenizer: Any = None
    model_config: Any = None
    timings: dict = field(default_factory=dict)
    split: Any = None             # plan.SplitPlan of a multi-run job (split seed, k-fold, held-out fold)
    run_name: str = ""
    hub_repo: Optional[str] = None  # --push_to_hub: the repository checked before training
    resume_from: Optional[str] = None  # the checkpoint folder this run resumes from (set by prepare_run)
    on_evaluate: Any = None       # Trainer.on_evaluate of this run (a study's pruning), or None

    @property
    def accelerator(self):
        return self.runtime.accelerator


@dataclass
class PreparedData:
    train: Any                      # tokenized datasets.Dataset with "length" and "row_id"
    eval: Any = None
    test: Any = None
    raw: dict = field(default_factory=dict)       # split -> raw rows (for predictions files)
    info: dict = field(default_factory=dict)      # goes to results.json["data"]
    identity: dict = field(default_factory=dict)  # checked on resume
    state: Any = None                             # the task's own facts from its data (labels, offsets, ...)
    transfer: Any = None                          # TextSource: what distillation's transfer set is built from


@dataclass
class TextSource:
    """A task's training text as words, for distillation's transfer set (training/transfer.py): TinyBERT's
    augmented variants and unlabelled rows, tokenized like the training set and labelled by the teacher."""
    fields: list          # the text fields of a row: the text columns (a pair: 2) or ["tokens"] (NER)
    pool: Any             # the tokenized training pool (datasets.Dataset with row_id); data.train selects from it
    row_words: Any        # [row_id] -> per row, [words of each field]
    encode: Any           # (rows: [[words of each field]], row_ids: [int, -1 unlabelled]) -> the pool's columns
    read_unlabeled: Any   # path -> [[words of each field]] (one sentence in the text's own units, no labels)
    where: str = ""       # the training data, for messages


@dataclass
class BuiltModel:
    model: Any
    new_weights: list = field(default_factory=list)       # initialised here, not loaded
    unexpected_keys: list = field(default_factory=list)   # in the checkpoint, not used by this model
    state: Any = None                                     # the task's own facts from its model

    @property
    def untrained(self) -> list:
        """The new weights that matter: position_ids is a buffer some checkpoints leave out, not a weight."""
        return [k for k in self.new_weights if not k.endswith("position_ids")]


class Objective:
    """What the loop calls per batch. See the module docstring for when each hook runs."""
    default_metric: str = "loss"
    metric_names: tuple = ("loss",)  # every number compute_metrics returns that may pick the best model
    eval_pad_values: dict = {}

    def after_prepare(self, model) -> None:
        pass

    def total_items(self, dataset) -> Optional[float]:
        return None

    def prepare_batch(self, batch: dict) -> dict:
        return batch

    def count_items(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def loss_sum(self, model, batch: dict) -> torch.Tensor:
        return self.loss_from_logits(model(**model_inputs(batch)).logits, batch)

    def loss_from_logits(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def eval_outputs(self, model, batch: dict) -> dict:
        raise NotImplementedError

    def compute_metrics(self, outputs: dict) -> dict:
        raise NotImplementedError

    # Distillation (common/training/distill.py wraps the objective of a run with a teacher)
    supports_distillation: bool = False

    def distill_mask(self, batch: dict) -> torch.Tensor:
        """Which logits are distilled (one item each): a bool tensor of logits.shape[:-1]."""
        raise NotImplementedError

    def without_labels(self, batch: dict, keep: torch.Tensor) -> dict:
        """The batch with the hard labels of the examples where `keep` (batch,) is False made ignored (no loss,
        still distilled: a transfer set's variants and unlabelled rows)."""
        raise NotImplementedError

    def state_for_saving(self, model, state_dict: dict) -> dict:
        return state_dict

    def report(self) -> dict:
        return {}

    def output_files(self) -> dict:
        """name -> text of files written into output_dir with the results (main process)."""
        return {}


class Task:
    """What a script provides. See the module docstring for when each hook runs; train_cls.py is a
    complete example."""
    name: str = ""
    pipeline_task: str = ""
    description: str = ""
    data_arguments: type = object
    supports_kfold: bool = False
    eval_before_training: bool = False
    head: str = ""  # the model class suffix of a trained model of this task (--no_do_train checks it)

    def tokenizer_kwargs(self, model_args) -> dict:
        return {}

    def load_data(self, ctx: Context) -> PreparedData:
        raise NotImplementedError

    def build_model(self, ctx: Context, data: PreparedData) -> BuiltModel:
        raise NotImplementedError

    def objective(self, ctx: Context, data: PreparedData, built: BuiltModel) -> Objective:
        raise NotImplementedError

    def collator(self, ctx: Context, data: PreparedData, base):
        return base

    def prediction_writer(self, ctx: Context, data: PreparedData, split: str) -> Optional["PredictionWriter"]:
        return None

    def after_save(self, ctx: Context, data: PreparedData, built: BuiltModel, output_dir: str) -> dict:
        return {}

    def extra_results(self, ctx: Context, data: PreparedData, built: BuiltModel, results: dict, trainer) -> dict:
        return {}

    def model_card(self, ctx: Context, data: PreparedData) -> dict:
        return {"labels": None, "example": "print(pipe('...'))"}


class PredictionWriter:
    """Writes a predictions file from gathered evaluation outputs, batch by batch (`add`, rows of a batch in
    any order; for streaming, batches in file order), into a temporary file renamed into place by `close`."""

    def __init__(self, path: str):
        import tempfile

        self.path = path
        fd, self.tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-",
                                        suffix=os.path.basename(path))
        self.fh = os.fdopen(fd, "w", encoding="utf-8", newline="")

    def add(self, outputs: dict) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.fh.close()
        honour_umask(self.tmp)  # mkstemp made it 0600
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.fh.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


def write_predictions(task: Task, ctx: Context, data: PreparedData, split: str, outputs: dict) -> None:
    """All outputs of a split at once (after an evaluation), through the task's writer."""
    writer = task.prediction_writer(ctx, data, split)
    if writer is None:
        return
    try:
        writer.add(outputs)
    except BaseException:
        writer.abort()
        raise
    writer.close()


def model_inputs(batch: dict, keys=("input_ids", "attention_mask", "token_type_ids")) -> dict:
    return {k: batch[k] for k in keys if k in batch}
