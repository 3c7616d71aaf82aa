#!/usr/bin/env python
"""Fine-tune a BERT-family encoder for sequence classification (single texts, sentence pairs,
several text columns joined; any number of labels; float labels -> regression).

    accelerate launch train_cls.py --dataset glue --dataset_config mrpc --output_dir out
    python train_cls.py --train_file train.csv --validation_file dev.csv --output_dir out

From a notebook: `notebook_launcher(main, (argv,), num_processes=N)`. See README.md.
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from common import data as D
from common.config import DataSourceArguments
from common.engine import model_inputs
from common.errors import UserError, fmt_columns, run_cli
from common.metrics import classification_metrics, regression_metrics
from common.runner import Context, PreparedData, TaskSpec, load_pretrained, run

# Column layouts recognised without flags: the non-label columns must be exactly one of these.
KNOWN_LAYOUTS = [("sentence",), ("text",), ("sentence1", "sentence2"), ("question", "sentence"),
                 ("question1", "question2"), ("premise", "hypothesis"), ("#1 String", "#2 String")]
KNOWN_LABELS = ("label", "labels", "Quality")
IGNORED = ("idx",)  # GLUE's row index on the Hub
MRPC_IDS = ("#1 ID", "#2 ID")  # the raw MRPC TSV's id columns


@dataclass
class ClsDataArguments(DataSourceArguments):
    train_file: Optional[str] = field(default=None, metadata={"help": "csv, tsv, json, jsonl or parquet."})
    test_split_name: str = field(default="test", metadata={"help": "Hub split used for testing (if present)."})
    test_file: Optional[str] = field(default=None, metadata={"help": "Test file; labels optional."})
    text_column: Optional[str] = field(default=None, metadata={"help": "The text column."})
    text_pair_column: Optional[str] = field(default=None, metadata={"help": "Second text of a sentence pair."})
    text_columns: Optional[list[str]] = field(default=None, metadata={
        "help": "Several text columns joined into one text (e.g. title text)."})
    text_separator: Optional[str] = field(default=None, metadata={
        "help": "Joins --text_columns (default: the tokenizer's separator token between spaces)."})
    label_column: Optional[str] = field(default=None, metadata={"help": "The label column."})
    allow_unseen_labels: bool = field(default=False, metadata={
        "help": "Accept validation/test labels that never occur in training (the model cannot predict them)."})
    task_type: Literal["auto", "classification", "regression"] = field(default="auto", metadata={
        "help": "auto: float labels with fractions -> regression, anything else -> classification."})
    validation_split: float = field(default=0.1, metadata={
        "help": "Fraction of the training file held out (stratified, seeded) as validation data when there is "
                "none; with --kfold, the fraction of the training folds used to pick the best model."})
    test_split: float = field(default=0.0, metadata={
        "help": "Fraction of the training file held out as a test set when there is no test data "
                "(--test_split 0.15 --validation_split 0.15: a 70/15/15 split)."})

    def __post_init__(self):
        super().__post_init__()
        if self.text_columns and (self.text_column or self.text_pair_column):
            raise UserError("--text_columns joins several columns; do not combine it with --text_column/--text_pair_column.")
        if self.text_pair_column and not self.text_column:
            raise UserError("--text_pair_column needs --text_column for the first text.")
        if not 0 <= self.test_split < 1:
            raise UserError(f"--test_split must be a fraction in [0, 1), got {self.test_split}.")


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

def read_splits(a: ClsDataArguments, model_args) -> tuple[dict, dict]:
    """split -> datasets.Dataset, and split -> where it came from (for messages)."""
    import datasets

    if a.dataset:
        hub = D.load_hub_splits(a.dataset, a.dataset_config, model_args.cache_dir)
        names = {"train": a.train_split_name, "validation": a.validation_split_name, "test": a.test_split_name}
        if names["train"] not in hub:
            raise UserError(f"--dataset '{a.dataset}' has no split '{names['train']}'; its splits are "
                            f"{fmt_columns(list(hub))} (set --train_split_name).")
        splits = {k: hub[v] for k, v in names.items() if v in hub}
        return splits, {k: f"split '{names[k]}' of --dataset '{a.dataset}'" for k in splits}
    files = {"train": (a.train_file, "--train_file"), "validation": (a.validation_file, "--validation_file"),
             "test": (a.test_file, "--test_file")}
    splits, where = {}, {}
    for split, (path, flag) in files.items():
        if path:
            df = D.read_table(path, flag)
            splits[split] = datasets.Dataset.from_pandas(df, preserve_index=False)
            where[split] = f"{flag} '{path}'"
    return splits, where


def resolve_columns(a: ClsDataArguments, splits: dict, where: dict) -> tuple[list[str], Optional[str], str]:
    """(text columns, pair column or None, label column); explicit flags or an exact known layout."""
    columns = list(splits["train"].column_names)
    label = a.label_column
    if label is not None:
        D.require_columns(columns, [label], where["train"], {label: "--label_column"})
    else:
        found = [c for c in KNOWN_LABELS if c in columns]
        if len(found) != 1:
            raise UserError(f"{where['train']}: cannot tell the label column among {fmt_columns(columns)}; "
                            "pass --label_column.")
        label = found[0]
    if a.text_columns:
        return list(a.text_columns), None, label
    if a.text_column:
        return [a.text_column], a.text_pair_column, label
    rest = tuple(c for c in columns if c != label and c not in IGNORED and c not in MRPC_IDS)
    for layout in KNOWN_LAYOUTS:
        if rest == layout or (set(rest) == set(layout) and len(rest) == len(layout)):
            return [layout[0]], (layout[1] if len(layout) > 1 else None), label
    raise UserError(f"{where['train']}: the text columns are ambiguous among {fmt_columns(columns)}; pass "
                    "--text_column (and --text_pair_column for pairs) or --text_columns to join several.")


def parse_labels(values: list, where: str, column: str) -> tuple[list, bool]:
    """Labels as python values, and whether they are all numeric. Missing labels are errors."""
    out, numeric = [], True
    for i, v in enumerate(values):
        if D.is_missing(v):
            raise UserError(f"{where}, row {i + 1}: label column '{column}' is empty; fill it or drop the row.")
        if isinstance(v, str):
            s = v.strip()
            try:
                v = float(s)
            except ValueError:
                numeric, v = False, s
        elif isinstance(v, (bool, np.bool_)):
            v = int(v)
        out.append(v)
    if not numeric:
        out = [str(v if not isinstance(v, float) else (int(v) if v == int(v) else v)) for v in out]
    return out, numeric


def split_plan(a, ctx: Context, n: int, labels: Optional[np.ndarray], given: dict) -> dict:
    """Row indices of the training file for train and each derived split (seeded, stratified by label).

    Single runs and seeds: --test_split then --validation_split, both fractions of the training file.
    K-fold (ctx.split.kfold): the held-out fold is the test split; --validation_split of the other folds
    is the inner validation split that picks the best model; the held-out fold never does."""
    from common.stats import kfold_indices

    plan, args = ctx.split, ctx.args
    seed = plan.seed if plan is not None else args.seed
    rows = np.arange(n)
    out = {}
    if plan is not None and plan.kfold:
        for split, flag in (("validation", "--validation_file"), ("test", "--test_file")):
            if split in given:
                raise UserError(f"--kfold holds out folds of --train_file as test sets and draws validation from the "
                                f"other folds; drop {flag} (or run without --kfold).")
        if plan.kfold > n:
            raise UserError(f"--kfold {plan.kfold} is more folds than the {n} training rows.")
        train, held = kfold_indices(n, plan.kfold, plan.fold, seed, labels)
        out["test"] = held
        rows = train
        if a.validation_split > 0:
            keep, take = D.split_indices(len(rows), a.validation_split, seed + 1,
                                         None if labels is None else labels[rows])
            out["validation"], rows = rows[take], rows[keep]
    else:
        if "test" not in given and a.test_split > 0:
            keep, take = D.split_indices(n, a.test_split, seed, labels)
            out["test"], rows = take, keep
        if "validation" not in given and a.validation_split > 0:
            fraction = a.validation_split / (1 - (a.test_split if "test" in out else 0))
            if fraction >= 1:
                raise UserError(f"--validation_split {a.validation_split} and --test_split {a.test_split} leave no "
                                "training data; their sum must be below 1.")
            keep, take = D.split_indices(len(rows), fraction, seed + 1, None if labels is None else labels[rows])
            out["validation"], rows = rows[take], rows[keep]
    if args.max_train_samples:
        rows = rows[: args.max_train_samples]
    out["train"] = rows
    return {k: np.asarray(v) for k, v in out.items()}


class ClassificationSpec(TaskSpec):
    description = __doc__
    supports_kfold = True
    data_arguments = ClsDataArguments
    pipeline_task = "text-classification"
    task_name = "classification"

    def load_data(self, ctx: Context) -> PreparedData:
        a, args, tok = ctx.data_args, ctx.args, ctx.tokenizer
        splits, where = read_splits(a, ctx.model_args)
        texts, pair, label_col = resolve_columns(a, splits, where)
        flag_of = {c: "--text_columns" if a.text_columns else "--text_column" for c in texts}
        flag_of.update({pair: "--text_pair_column", label_col: "--label_column"} if pair else {label_col: "--label_column"})
        needed = texts + ([pair] if pair else [])

        # Labels: from every labelled split, so a label seen only in validation still gets an id.
        labels, numeric, labelled = {}, {}, {}
        for split, ds in splits.items():
            D.require_columns(ds.column_names, needed, where[split], flag_of)
            has = label_col in ds.column_names
            if split != "test" or has:
                D.require_columns(ds.column_names, [label_col], where[split], flag_of)
            if len(ds) == 0:
                raise UserError(f"{where[split]} has no rows.")
            for col in needed:
                bad = D.first_bad_row(ds[col], D.is_missing)
                if bad is not None:
                    raise UserError(f"{where[split]}, row {bad + 1}: text column '{col}' is empty; fill it or drop the row.")
            raw = ds[label_col] if has else None
            if split == "test" and (raw is None or all(D.is_missing(v) or v in (-1, "-1") for v in raw)):
                labelled[split] = False  # e.g. GLUE test: labels hidden (-1)
                continue
            labelled[split] = True
            labels[split], numeric[split] = parse_labels(raw, where[split], label_col)

        all_numeric = all(numeric.values())
        values = [v for split in labels for v in labels[split]]
        fractional = all_numeric and any(float(v) != int(float(v)) for v in values if math.isfinite(float(v)))
        if all_numeric and any(not math.isfinite(float(v)) for v in values):
            split = next(s for s in labels if any(not math.isfinite(float(v)) for v in labels[s]))
            row = next(i for i, v in enumerate(labels[split]) if not math.isfinite(float(v)))
            raise UserError(f"{where[split]}, row {row + 1}: label column '{label_col}' is NaN/inf; fix or drop the row.")
        regression = a.task_type == "regression" or (a.task_type == "auto" and fractional)
        if a.task_type == "classification" and fractional:
            split = next(s for s in labels if any(float(v) != int(float(v)) for v in labels[s]))
            row = next(i for i, v in enumerate(labels[split]) if float(v) != int(float(v)))
            raise UserError(f"{where[split]}, row {row + 1}: label {labels[split][row]} in column '{label_col}' is not a "
                            "whole number, but --task_type is classification; fix the labels or use --task_type regression.")
        if regression and not all_numeric:
            raise UserError(f"--task_type regression needs numeric labels, but column '{label_col}' has text labels.")
        class_names = None
        hub_feature = splits["train"].features.get(label_col)
        if not regression:
            if all_numeric:
                uniq = sorted({int(float(v)) for v in values})
                if hub_feature is not None and hasattr(hub_feature, "names"):
                    class_names = list(hub_feature.names)
                    uniq = list(range(len(class_names)))
                else:
                    class_names = [str(u) for u in uniq]
                to_id = {u: i for i, u in enumerate(uniq)}
                ids = {s: [to_id[int(float(v))] for v in vs] for s, vs in labels.items()}
            else:
                class_names = sorted({str(v) for v in values})
                to_id = {n: i for i, n in enumerate(class_names)}
                ids = {s: [to_id[str(v)] for v in vs] for s, vs in labels.items()}
            if len(class_names) < 2:
                raise UserError(f"label column '{label_col}' has only one value ({class_names[0]!r}) across all splits; "
                                "classification needs at least two classes.")
            train_classes = set(ids["train"])
            missing = [class_names[i] for i in range(len(class_names)) if i not in train_classes]
            if missing and not a.allow_unseen_labels:
                split = next(s for s in ids if s != "train" and any(class_names[i] in missing for i in ids[s]))
                raise UserError(f"{where[split]} has labels {missing} that never occur in {where['train']} (column "
                                f"'{label_col}'); the model cannot learn them: fix the split, or pass --allow_unseen_labels.")
            if missing:
                print_warning(f"labels {missing} never occur in the training data; the model cannot learn them.")
        else:
            ids = {s: [float(v) for v in vs] for s, vs in labels.items()}

        # The whole training file is tokenized once (cached); derived splits and k-fold folds are
        # index selections of it, so seeds and folds never tokenize again.
        pool = splits["train"].add_column("__label", ids["train"]).add_column("row_id", list(range(len(splits["train"]))))
        sep = a.text_separator if a.text_separator is not None else f" {tok.sep_token or ''} "

        def encode(batch):
            first = batch[texts[0]] if len(texts) == 1 else [sep.join(str(x) for x in row) for row in zip(*(batch[c] for c in texts))]
            second = batch[pair] if pair else None
            enc = tok([str(t) for t in first], [str(t) for t in second] if second else None,
                      truncation=True, max_length=a.max_length)
            enc["length"] = [len(x) for x in enc["input_ids"]]
            if "__label" in batch:
                enc["labels"] = batch["__label"]
            return enc

        tok_key = D.tokenizer_fingerprint(tok)

        def tokenize(split, ds):
            res = D.tokenize_cached(ds, encode, [tok_key, a.max_length, texts, pair, sep, regression, class_names],
                                    ctx.accelerator, remove_columns=[c for c in ds.column_names if c != "row_id"],
                                    num_proc=a.preprocessing_num_workers, overwrite=a.overwrite_cache,
                                    desc=f"Tokenizing {split}")
            ctx.timings[f"tokenize_{split}_cached"] = res.from_cache
            return res.dataset

        tok_pool = tokenize("train", pool)
        idx = split_plan(a, ctx, len(pool), None if regression else np.asarray(ids["train"]), splits)
        prepared = {split: pool.select(rows) for split, rows in idx.items()}
        out = {split: tok_pool.select(rows) for split, rows in idx.items()}
        derived = sorted(s for s in idx if s != "train")
        for split in ("validation", "test"):
            if split in splits:
                ds = splits[split]
                ds = ds.add_column("row_id", list(range(len(ds))))
                ds = ds.add_column("__label", ids[split]) if labelled.get(split) else ds
                prepared[split] = ds
                out[split] = tokenize(split, ds)
        truncated = int(sum(1 for n in out["train"]["length"] if n >= a.max_length))
        self.texts, self.pair, self.label_col = texts, pair, label_col
        self.regression, self.class_names = regression, class_names
        source = f"{a.dataset}/{a.dataset_config}" if a.dataset else os.path.basename(a.train_file)
        info = {"source": source, "text_columns": texts, "text_pair_column": pair, "label_column": label_col,
                "problem_type": "regression" if regression else "single_label_classification",
                "labels": class_names, "sizes": {s: len(d) for s, d in out.items()},
                "derived_splits": derived, "train_truncated_examples": truncated,
                "split_seed": ctx.split.seed if ctx.split else args.seed,
                **({"kfold": ctx.split.kfold, "fold": ctx.split.fold + 1, "held_out_rows": len(idx["test"])}
                   if ctx.split and ctx.split.kfold else {}),
                "tokenization_cached": {s: ctx.timings[f"tokenize_{s}_cached"] for s in out if s not in derived}}
        return PreparedData(train=out["train"], eval=out.get("validation"),
                            test=out.get("test"),
                            raw=prepared, info=info,
                            identity={"labels": class_names, "problem_type": info["problem_type"]})

    def build_model(self, ctx: Context, data: PreparedData):
        from transformers import AutoModelForSequenceClassification

        m = ctx.model_args
        if self.regression:
            kw = dict(num_labels=1, problem_type="regression")
        else:
            n = len(self.class_names)
            kw = dict(num_labels=n, id2label=dict(enumerate(self.class_names)),
                      label2id={c: i for i, c in enumerate(self.class_names)}, problem_type="single_label_classification")
        model, new = load_pretrained(AutoModelForSequenceClassification, m, ignore_mismatched_sizes=True, **kw)
        model._new_weights = new
        return model

    def make_task(self, ctx, data, model):
        return ClassificationTask(self.regression, len(self.class_names or [0]))

    def write_predictions(self, ctx: Context, data: PreparedData, split: str, outputs: dict) -> None:
        raw = data.raw["validation" if split == "eval" else "test"]
        order = np.argsort(outputs["row_id"], kind="stable")
        rows = outputs["row_id"][order].astype(int)
        by_row = {r: i for i, r in enumerate(raw["row_id"])}
        logits = outputs["logits"][order]
        gold = outputs.get("labels")
        gold = gold[order] if gold is not None else None
        cols = self.texts + ([self.pair] if self.pair else [])
        values = {c: raw[c] for c in cols}
        path = os.path.join(ctx.args.output_dir, f"predictions_{split}.csv")
        with open(path, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            if self.regression:
                w.writerow(["row_id", *cols, "gold", "predicted"])
                for i, r in enumerate(rows):
                    g = "" if gold is None else f"{gold[i]:.6g}"
                    w.writerow([r, *(values[c][by_row[r]] for c in cols), g, f"{logits[i, 0]:.6g}"])
            else:
                probs = torch.softmax(torch.from_numpy(logits).float(), -1).numpy()
                w.writerow(["row_id", *cols, "gold", "predicted", *(f"prob_{c}" for c in self.class_names)])
                for i, r in enumerate(rows):
                    g = "" if gold is None else self.class_names[int(gold[i])]
                    w.writerow([r, *(values[c][by_row[r]] for c in cols), g, self.class_names[int(probs[i].argmax())],
                                *(f"{p:.6f}" for p in probs[i])])

    def model_card(self, ctx, data):
        example = ("print(pipe({'text': 'first sentence', 'text_pair': 'second sentence'}))" if self.pair
                   else "print(pipe('an example text'))")
        return {"labels": self.class_names, "example": example}


def print_warning(msg: str) -> None:
    from common.engine import logger
    logger.warning(msg)


class ClassificationTask:
    eval_pad_values: dict = {}

    def __init__(self, regression: bool, num_labels: int):
        self.regression = regression
        self.num_labels = num_labels
        self.default_metric = "pearson" if regression else "accuracy"

    def count_items(self, batch):
        labels = batch["labels"]  # a fill on the device, not a host-to-device copy (no sync per step on GPUs)
        return labels.new_full((), labels.shape[0], dtype=torch.float64)

    def _losses(self, logits, labels):
        if self.regression:
            return F.mse_loss(logits.squeeze(-1).float(), labels.float(), reduction="none")
        return F.cross_entropy(logits.float(), labels, reduction="none")

    def loss_sum(self, model, batch):
        logits = model(**model_inputs(batch)).logits
        return self._losses(logits, batch["labels"]).sum()

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


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Entry point; `argv` as a list of strings (notebooks: notebook_launcher(main, (argv,)))."""
    return run(ClassificationSpec(), argv)


if __name__ == "__main__":
    run_cli(main)
