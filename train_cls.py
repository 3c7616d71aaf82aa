#!/usr/bin/env python
"""Fine-tune a BERT-family encoder for sequence classification (single texts, sentence pairs,
several text columns joined; any number of labels; float labels -> regression).

    accelerate launch train_cls.py --output_dir out      # no data flag: GLUE MRPC from the Hub
    python train_cls.py --train_file train.csv --validation_file dev.csv --output_dir out

From a notebook: `notebook_launcher(main, (argv,), num_processes=N)`. See README.md.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from common.config import DataSourceArguments
from common.data import loading
from common.data.labels import (
    describe_columns,
    forgotten_pair,
    labels_from_model,
    read_split_labels,
    read_unlabeled,
    resolve_columns,
    resolve_labels,
    text_words,
)
from common.data.loading import read_hub_splits, read_table, source_name, tokenize_split, tokenizer_fingerprint
from common.data.splits import data_block, plan_rows, says_all, split_origins
from common.errors import UserError, run_cli
from common.log import logger
from common.runs.launch import launch
from common.runs.predictions import CsvPredictions
from common.task import BuiltModel, Context, Objective, PreparedData, Task, TextSource, model_inputs
from common.training.metrics import classification_metrics, classification_names, regression_metrics
from common.training.models import load_pretrained


@dataclass
class ClsDataArguments(DataSourceArguments):
    default_dataset = ("nyu-mll/glue", "mrpc")  # GLUE MRPC, when no data flag is given
    train_file: Optional[str] = field(default=None, metadata={"help": "csv, tsv, json, jsonl or parquet."})
    test_split_name: str = field(default="test", metadata={"help": "Hub split used for testing (if present)."})
    test_file: Optional[str] = field(default=None, metadata={"help": "Test file; labels optional."})
    text_column: Optional[str] = field(default=None, metadata={"help": "The text column."})
    text_pair_column: Optional[str] = field(default=None, metadata={"help": "Second text of a sentence pair."})
    text_columns: Optional[list[str]] = field(default=None, metadata={
        "help": "Several text columns joined into one text (e.g. title text)."})
    text_separator: Optional[str] = field(default=None, metadata={
        "help": "Joins --text_columns (default: the tokenizer's separator token between spaces).", "metavar": "TEXT"})
    label_column: Optional[str] = field(default=None, metadata={"help": "The label column."})
    ignore_columns: Optional[list[str]] = field(default=None, metadata={
        "help": "Columns that are neither text nor label: left out of the known-layout match, and never taken "
                "for a forgotten second text (confirms single-text training beside a pair-like column)."})
    allow_unseen_labels: bool = field(default=False, metadata={
        "help": "Accept validation/test labels unseen in training (never predicted).", "group": "evaluation"})
    task_type: Literal["auto", "classification", "regression"] = field(default="auto", metadata={
        "help": "classification, regression, or auto: float labels with fractions -> regression, anything else "
                "-> classification."})
    validation_split: float = field(default=0.1, metadata={
        "help": "Fraction of the training file held out (stratified, seeded) as validation data when there is "
                "none; with --kfold, the fraction of the training folds used to pick the best model."})
    test_split: float = field(default=0.0, metadata={
        "help": "Fraction of the training file held out as a test set when there is no test data "
                "(--test_split 0.15 --validation_split 0.15: a 70/15/15 split)."})

    reused_settings = DataSourceArguments.reused_settings + (
        (("text_column", "text_pair_column", "text_columns", "text_separator"), "table"), (("label_column",), "table"),
        (("ignore_columns",), "table"))

    def __post_init__(self):
        super().__post_init__()
        if self.text_columns and (self.text_column or self.text_pair_column):
            raise UserError("--text_columns joins several columns; do not combine it with --text_column/"
                            "--text_pair_column.")
        if self.text_pair_column and not self.text_column:
            raise UserError("--text_pair_column needs --text_column for the first text.")
        if self.text_separator is not None and not self.text_columns:
            raise UserError("--text_separator joins the columns of --text_columns; it has no effect without them.")
        if not 0 <= self.test_split < 1:
            raise UserError(f"--test_split must be a fraction in [0, 1), got {self.test_split}.")


def read_splits(a: ClsDataArguments, model_args) -> tuple[dict, dict]:
    """split -> table (a datasets.Dataset from the Hub, a pandas DataFrame from a file), and split -> where it
    came from (for messages)."""
    if a.dataset:
        names = {"train": a.train_split_name, "validation": a.validation_split_name, "test": a.test_split_name}
        return read_hub_splits(a, model_args.cache_dir, names)
    splits, where = {}, {}
    for split, path, flag in (("train", a.train_file, "--train_file"), ("validation", a.validation_file,
                              "--validation_file"), ("test", a.test_file, "--test_file")):
        if path:
            splits[split] = read_table(path, flag, a.encoding, a.column_names, a.delimiter)
            where[split] = f"{flag} '{path}'"
    return splits, where


@dataclass
class ClsState:
    """What the data told us, used by the model, the objective and the predictions file."""
    texts: list
    pair: Optional[str]
    label_col: str
    regression: bool
    class_names: Optional[list]


class ClassificationTask(Task):
    name = "classification"
    pipeline_task = "text-classification"
    description = __doc__
    head = "ForSequenceClassification"
    data_arguments = ClsDataArguments
    supports_kfold = True

    def load_data(self, ctx: Context) -> PreparedData:
        import datasets

        a, args, tok = ctx.data_args, ctx.args, ctx.tokenizer
        splits, where = read_splits(a, ctx.model_args)
        first = "train" if "train" in splits else next(iter(splits))  # --no_do_train: validation/test only
        columns = getattr(splits[first], "column_names", None) or list(splits[first].columns)
        texts, pair, label_col = resolve_columns(a, columns, where[first], first == "test")
        suspect = (forgotten_pair(splits[first], columns, texts[0], label_col, a.ignore_columns or [], where[first])
                   if args.do_train and len(texts) == 1 and not pair else None)
        if suspect and says_all(ctx.split, args.seed):  # once per job, not per fold
            logger.warning(suspect)
        flag_of = {c: "--text_columns" if a.text_columns else "--text_column" for c in texts}
        if pair:
            flag_of[pair] = "--text_pair_column"
        flag_of[label_col] = "--label_column"

        # Labels: from every labelled split, so a label seen only in validation still gets an id.
        feature = getattr(splits.get("train"), "features", {}).get(label_col)  # a Hub ClassLabel names the ids
        labels, numeric, labelled, splits = read_split_labels(splits, where, texts + ([pair] if pair else []),
                                                              label_col, flag_of)
        if args.do_train:
            hub_names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
            found = resolve_labels(labels, numeric, where, label_col, a.task_type, a.allow_unseen_labels, hub_names)
        else:  # the model's own label map
            found = labels_from_model(labels, numeric, where, label_col, ctx.model_config, a.allow_unseen_labels)
        regression, class_names, ids = found.regression, found.class_names, found.ids

        sep = a.text_separator if a.text_separator is not None else f" {tok.sep_token or ''} "

        def encode(batch):
            first = (batch[texts[0]] if len(texts) == 1
                     else [sep.join(str(x) for x in row) for row in zip(*(batch[c] for c in texts))])
            second = batch[pair] if pair else None
            enc = tok([str(t) for t in first], [str(t) for t in second] if second else None,
                      truncation=True, max_length=a.max_length)
            enc["length"] = [len(x) for x in enc["input_ids"]]
            if "__label" in batch:
                enc["labels"] = batch["__label"]
            return enc

        key = [tokenizer_fingerprint(tok), a.max_length, texts, pair, sep, regression, class_names]

        def tokenize(split, ds):
            return tokenize_split(ctx, split, ds, encode, key, [c for c in ds.column_names if c != "row_id"])

        # The whole training file is tokenized once (cached); derived splits and k-fold folds are
        # index selections of it, so seeds and folds never tokenize again.
        prepared, out, idx = {}, {}, {}
        if "train" in splits:
            pool = splits["train"].add_column("__label", ids["train"])
            pool = pool.add_column("row_id", list(range(len(pool))))
            tok_pool = tokenize("train", pool)
            idx = plan_rows(len(pool), ctx.split, ctx.split.seed if ctx.split else args.seed, set(splits),
                            a.validation_split, a.test_split, args.max_train_samples,
                            None if regression else np.asarray(ids["train"]))
            prepared = {split: pool.select(rows) for split, rows in idx.items()}
            out = {split: tok_pool.select(rows) for split, rows in idx.items()}
        derived = sorted(s for s in idx if s != "train")
        seed = ctx.split.seed if ctx.split else args.seed
        how = "given" if a.text_columns or a.text_column else "a recognised layout"
        origins = split_origins(where, idx, ctx.split, seed, a.validation_split, a.test_split, args.max_train_samples,
                                stratified=not regression)
        for split in ("validation", "test"):
            if split in splits:
                ds = splits[split]
                ds = ds.add_column("row_id", list(range(len(ds))))
                ds = ds.add_column("__label", ids[split]) if labelled.get(split) else ds
                prepared[split] = ds
                out[split] = tokenize(split, ds)
        logger.info(data_block(f"{source_name(a)}: {describe_columns(texts, pair, label_col, columns, how)}",
                               {s: f"{len(d)} rows" for s, d in out.items()}, origins, ctx.split, args.seed))
        lengths = loading.column_arrays(out["train"], "length")["length"] if "train" in out else np.zeros(0)
        truncated = int(np.sum(lengths >= a.max_length))
        info = {"source": source_name(a), "text_columns": texts, "text_pair_column": pair, "label_column": label_col,
                "problem_type": "regression" if regression else "single_label_classification",
                "labels": class_names, "sizes": {s: len(d) for s, d in out.items()},
                "derived_splits": derived, "train_truncated_examples": truncated, "split_seed": seed,
                **({"kfold": ctx.split.kfold, "fold": ctx.split.fold + 1, "held_out_rows": len(idx["test"])}
                   if ctx.split and ctx.split.kfold else {}),
                "tokenization_cached": {s: ctx.timings[f"tokenize_{s}_cached"] for s in out if s not in derived}}
        transfer = None
        if "train" in splits and args.teacher_model:  # distillation's transfer set (training/transfer.py)
            fields = texts + ([pair] if pair else [])
            used = np.unique(np.concatenate([np.asarray(r) for r in idx.values()]))  # rows the job's splits use
            transfer = TextSource(
                fields, tok_pool.select(used),
                lambda rows: [[text_words(v) for v in vals]
                              for vals in zip(*(pool.select(rows)[c] for c in fields))],
                lambda rows, row_ids: dict(encode({**{c: [" ".join(r[j]) for r in rows] for j, c in enumerate(fields)},
                                                   "__label": [0] * len(rows)}), row_id=list(row_ids)),
                lambda path: read_unlabeled(path, fields, a), where["train"])
        return PreparedData(train=out.get("train"), eval=out.get("validation"), test=out.get("test"), raw=prepared,
                            info=info, identity={"labels": class_names, "problem_type": info["problem_type"]},
                            state=ClsState(texts, pair, label_col, regression, class_names), transfer=transfer)

    def build_model(self, ctx: Context, data: PreparedData) -> BuiltModel:
        from transformers import AutoModelForSequenceClassification

        st = data.state
        if st.regression:
            kw = dict(num_labels=1, problem_type="regression")
        else:
            kw = dict(num_labels=len(st.class_names), id2label=dict(enumerate(st.class_names)),
                      label2id={c: i for i, c in enumerate(st.class_names)}, problem_type="single_label_classification")
        return load_pretrained(AutoModelForSequenceClassification, ctx.model_args, ignore_mismatched_sizes=True, **kw)

    def objective(self, ctx, data, built):
        return ClassificationObjective(data.state.regression, len(data.state.class_names or [0]))

    def prediction_writer(self, ctx, data, split):
        path = os.path.join(ctx.args.output_dir, f"predictions_{split}.csv")
        st = data.state
        return CsvPredictions(path, data.raw["validation" if split == "eval" else "test"],
                              st.texts + ([st.pair] if st.pair else []), None if st.regression else st.class_names)

    def model_card(self, ctx, data):
        example = ("print(pipe({'text': 'first sentence', 'text_pair': 'second sentence'}))" if data.state.pair
                   else "print(pipe('an example text'))")
        return {"labels": data.state.class_names, "example": example}


class ClassificationObjective(Objective):
    """Cross-entropy (or MSE for regression) summed over the batch; metrics from gathered logits."""

    def __init__(self, regression: bool, num_labels: int):
        self.regression = regression
        self.num_labels = num_labels
        self.default_metric = "pearson" if regression else "accuracy"
        self.metric_names = classification_names(regression, num_labels)
        self.supports_distillation = not regression  # a teacher's class distribution: classification only

    def count_items(self, batch):
        labels = batch["labels"]  # a fill on the device, not a host-to-device copy (no sync per step on GPUs)
        return labels.new_full((), labels.shape[0], dtype=torch.float64)

    def _losses(self, logits, labels):
        if self.regression:
            return F.mse_loss(logits.squeeze(-1).float(), labels.float(), reduction="none")
        # ignore_index: a label the model does not know (--no_do_train --allow_unseen_labels) has no loss
        return F.cross_entropy(logits.float(), labels, reduction="none", ignore_index=self.num_labels)

    def loss_from_logits(self, logits, batch):
        return self._losses(logits, batch["labels"]).sum()

    def without_labels(self, batch, keep):  # ignore_index of _losses
        return {**batch, "labels": batch["labels"].masked_fill(~keep, self.num_labels)}

    def distill_mask(self, batch):  # every example is distilled
        return torch.ones_like(batch["labels"], dtype=torch.bool)

    def eval_outputs(self, model, batch):
        logits = model(**model_inputs(batch)).logits.float()
        out = {"logits": logits, "row_id": batch["row_id"]}
        if "labels" in batch:
            out["labels"] = batch["labels"]
            out["loss"] = self._losses(logits, batch["labels"])
        return out

    def compute_metrics(self, outputs: dict) -> dict:
        if "labels" not in outputs:
            return {}
        labels, logits = outputs["labels"], outputs["logits"]
        if self.regression:
            metrics = regression_metrics(labels.astype(np.float64), logits[:, 0].astype(np.float64))
        else:
            metrics = classification_metrics(labels.astype(int), logits.argmax(-1), self.num_labels)
        return {"loss": float(outputs["loss"].mean())} | metrics


TASK = ClassificationTask()


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Entry point; `argv` as a list of strings (notebooks: notebook_launcher(main, (argv,)))."""
    return launch(TASK, argv)


if __name__ == "__main__":
    run_cli(main)
