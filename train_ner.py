#!/usr/bin/env python
"""Fine-tune a BERT-family encoder for token classification (NER: IOB2/IOBES tags, seqeval entity metrics).

    accelerate launch train_ner.py --output_dir out      # no data flag: CoNLL-2003 from the Hub
    python train_ner.py --train_file train.txt --validation_file valid.txt --output_dir out

Data: CoNLL column files (.txt/.conll/.tsv), csv/json/jsonl/parquet with a token and a tag column,
or a Hub dataset. Sentences longer than --max_length are split into overlapping windows, so every
word is scored. From a notebook: `notebook_launcher(main, (argv,), num_processes=N)`. See README.md.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from common.config import DataSourceArguments
from common.data import ner
from common.data.loading import column_arrays, flat_values, source_name, tokenize_split, tokenizer_fingerprint
from common.data.splits import data_block, plan_rows, split_origins
from common.errors import UserError, run_cli
from common.log import logger
from common.runs.launch import launch
from common.runs.predictions import ConllPredictions
from common.task import BuiltModel, Context, Objective, PreparedData, Task, model_inputs
from common.training.metrics import NER_METRICS, ner_metrics
from common.training.models import byte_level, freeze, load_pretrained, load_tokenizer


@dataclass
class NerDataArguments(DataSourceArguments):
    default_dataset = ("lhoestq/conll2003", None)  # CoNLL-2003 (parquet), when no data flag is given
    train_file: Optional[str] = field(default=None, metadata={
        "help": "CoNLL columns (.txt/.conll/.iob/.bio/.tsv) or a table (.csv/.json/.jsonl/.parquet)."})
    test_split_name: str = field(default="test", metadata={"help": "Hub split used for testing (if present)."})
    test_file: Optional[str] = field(default=None, metadata={"help": "Test file; tags optional."})
    tokens_column: Optional[str] = field(default=None, metadata={
        "help": "Table/Hub column with the words: a list, or a text split on whitespace "
                f"(default: the one of {', '.join(ner.TOKEN_COLUMNS)} present)."})
    tags_column: Optional[str] = field(default=None, metadata={
        "help": "Table/Hub column with the tags: a list, a list literal, or space-separated "
                f"(default: the one of {', '.join(ner.TAG_COLUMNS)} present)."})
    sentence_id_column: Optional[str] = field(default=None, metadata={
        "help": "Word-per-row tables: the column naming each row's sentence (on every row or a sentence's first) "
                f"(default: the one of {', '.join(ner.SENTENCE_ID_COLUMNS)} present)."})
    tag_column_index: int = field(default=-1, metadata={"help": "CoNLL files: the column holding the tag."})
    label_names: Optional[list[str]] = field(default=None, metadata={
        "help": "Tag names in id order, for integer tags (a Hub ClassLabel provides them); also restricts "
                "string tags to this set."})
    label_all_tokens: bool = field(default=False, metadata={
        "help": "Train on every sub-token (later pieces get the word's I- tag), not only each word's first. "
                "Evaluation always reads the first.", "group": "training"})
    iob_scheme: Optional[Literal["IOB2", "IOBES"]] = field(default=None, metadata={
        "help": "Score in seqeval's strict mode with this scheme (default: conlleval's lenient rules, as papers "
                "report).", "group": "evaluation"})
    skip_bad_rows: bool = field(default=False, metadata={
        "help": "Skip rows with mismatched token/tag counts, unknown tags or empty sentences (counted in "
                "results.json) instead of stopping."})
    max_length: int = field(default=128, metadata={
        "help": "Sub-tokens per window; longer sentences are split into overlapping windows."})
    allow_unseen_labels: bool = field(default=False, metadata={
        "help": "--no_do_train: score tags unknown to the model as misses instead of stopping.", "group": "evaluation"})
    freeze_embeddings: bool = field(default=False, metadata={"help": "Freeze the embeddings.", "group": "training"})
    freeze_layers: int = field(default=0, metadata={
        "help": "Freeze the embeddings and first N layers.", "group": "training"})

    reused_settings = DataSourceArguments.reused_settings + (
        (("tokens_column",), "table"), (("tags_column",), "table"), (("sentence_id_column",), "table"),
        (("tag_column_index",), "lines"), (("label_names",), "any"), (("label_all_tokens",), "any"),
        (("iob_scheme",), "any"))

    def file_layout(self, path: str, flag: str) -> str:
        return ner.file_layout(path, flag, self)

    def __post_init__(self):
        super().__post_init__()
        if self.freeze_layers < 0:
            raise UserError(f"--freeze_layers must be 0 or more, got {self.freeze_layers}.")
        ner.check_label_names(self.label_names)


@dataclass
class NerState:
    """Labels, and every evaluated sentence's words and gold tags by row id (training file first,
    then the validation and test files), so one objective scores any evaluation split."""
    labels: list
    words: list
    gold: list
    offsets: np.ndarray  # word index of each row's first word in the flat prediction array


class NerTask(Task):
    name = "token-classification"
    pipeline_task = "token-classification"
    description = __doc__
    head = "ForTokenClassification"
    data_arguments = NerDataArguments
    supports_kfold = True

    def tokenizer_kwargs(self, model_args) -> dict:
        return {"add_prefix_space": True} if byte_level(load_tokenizer(model_args)) else {}

    def load_data(self, ctx: Context) -> PreparedData:
        import datasets

        a, args, tok = ctx.data_args, ctx.args, ctx.tokenizer
        files = {}
        for split, sents in ner.read_splits(a, ctx.model_args.cache_dir).items():
            files[split] = ner.clean(sents, a.label_names, a.iob_scheme, a.skip_bad_rows)
            if len(files[split]) == 0:
                raise UserError(f"{sents.where} has no usable sentences"
                                f"{f' ({files[split].skipped} skipped as bad rows)' if files[split].skipped else ''}.")
            if files[split].skipped:
                logger.warning("%s: skipped %d bad rows, e.g. %s", sents.where, files[split].skipped,
                               files[split].skip_reasons[0])
        ner.check_training_tags(files)
        # Which sentences of the training file go where (derived validation, k-fold folds), by index.
        pool, kfold = files.get("train"), ctx.split is not None and ctx.split.kfold  # no pool: --no_do_train
        seed = ctx.split.seed if ctx.split is not None else args.seed
        idx = {} if pool is None else plan_rows(len(pool), ctx.split, seed, set(files), a.validation_split, 0.0,
                                                 args.max_train_samples, what="training sentences")
        used = np.unique(np.concatenate(list(idx.values()))) if idx else np.zeros(0, dtype=np.int64)

        # Labels: 'O', then sorted, from every labelled sentence used (k-fold: the whole training file),
        # the labelled evaluation files and the ClassLabel / --label_names list; --no_do_train: the model's.
        tags = [t for k, s in files.items() if k != "train" and s.tags for t in s.tags]
        if args.do_train:
            tags += [pool.tags[i] for i in (range(len(pool)) if kfold else used)]
            labels = ner.label_list(tags, (pool.class_names or []) + list(a.label_names or []), a.label_all_tokens)
        else:
            labels = ner.model_labels(ctx.model_config, tags, a.allow_unseen_labels)
        label2id = {t: i for i, t in enumerate(labels)}
        inside = {i: label2id[ner.inside_tag(t)] if ner.inside_tag(t) in label2id else i for i, t in enumerate(labels)}
        inside[-100] = -100  # a tag the model does not know (--allow_unseen_labels): no loss
        key = [tokenizer_fingerprint(tok), a.max_length, a.label_all_tokens, labels]

        def encode(batch):
            return ner.encode_sentences(tok, batch["tokens"], batch.get("tag_ids"), batch["row_id"], a.max_length,
                                        a.label_all_tokens, inside)

        # Tokenize each file once: row ids number the training file's sentences, then each evaluation file's.
        words, gold, windows, base = [], [], {}, {}
        for split in ("train", "validation", "test"):
            if split not in files:
                continue
            s, rows = files[split], (used if split == "train" else range(len(files[split])))
            base[split] = len(words)
            words.extend(s.tokens)
            gold.extend(s.tags if s.tags is not None else [None] * len(s))
            columns = {"tokens": [s.tokens[i] for i in rows], "row_id": [base[split] + i for i in rows]}
            if s.tags is not None:
                columns["tag_ids"] = [[label2id.get(t, -100) for t in s.tags[i]] for i in rows]
            ds = datasets.Dataset.from_dict(columns)
            windows[split] = tokenize_split(ctx, split, ds, encode, key, ds.column_names)
        selections = {split: (windows["train"], rows) for split, rows in idx.items()}
        selections.update({split: (windows[split], None) for split in files if split != "train"})
        out, stats = {}, {}
        for split, (enc, rows) in selections.items():
            if rows is not None:  # a selection of the training file's windows, by sentence
                enc = enc.select(np.flatnonzero(np.isin(column_arrays(enc, "row_id")["row_id"], rows)))
            source = files["train" if rows is not None else split]
            col = column_arrays(enc, "row_id", "windowed", "dropped_words")
            stats[split] = {"sentences": len(source) if rows is None else len(rows), "windows": len(enc),
                            "windowed_sentences": len(np.unique(col["row_id"][col["windowed"].astype(bool)])),
                            "dropped_words": int(np.sum(col["dropped_words"])), "skipped_rows": source.skipped}
            if source.skip_reasons:
                stats[split]["skip_examples"] = source.skip_reasons
            out[split] = enc.remove_columns(["windowed", "dropped_words"])
        for split, st in stats.items():
            if st["windowed_sentences"] or st["dropped_words"]:
                logger.info("%s: %d sentences longer than --max_length %d were split into windows; %d words could "
                            "not be placed (scored as 'O')", split, st["windowed_sentences"], a.max_length,
                            st["dropped_words"])
        transfer = (ner.transfer_source(tok, pool, windows["train"], label2id, inside, a)  # training/transfer.py
                    if "train" in windows and args.teacher_model else None)
        offsets = np.zeros(len(words) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(w) for w in words])
        derived = sorted(s for s in idx if s != "train")
        origins = split_origins({s: f.where for s, f in files.items()}, idx, ctx.split, seed, a.validation_split,
                                max_train_samples=args.max_train_samples)
        logger.info(data_block(f"{source_name(a)}: {'; '.join(dict.fromkeys(f.columns for f in files.values()))}",
                               {s: f"{st['sentences']} sentences" for s, st in stats.items()}, origins, ctx.split,
                               args.seed))
        info = {"source": source_name(a), "labels": labels, "label_all_tokens": a.label_all_tokens,
                "iob_scheme": a.iob_scheme or "conlleval (lenient)", "max_length": a.max_length,
                "sizes": {s: st["sentences"] for s, st in stats.items()}, "splits": stats, "derived_splits": derived,
                **({"kfold": ctx.split.kfold, "fold": ctx.split.fold + 1, "split_seed": seed} if kfold else {}),
                "tokenization_cached": {s: ctx.timings[f"tokenize_{'train' if s in derived else s}_cached"]
                                        for s in out}}
        return PreparedData(train=out.get("train"), eval=out.get("validation"), test=out.get("test"), info=info,
                            identity={"labels": labels}, state=NerState(labels, words, gold, offsets),
                            transfer=transfer)

    def build_model(self, ctx: Context, data: PreparedData) -> BuiltModel:
        from transformers import AutoModelForTokenClassification

        a, labels = ctx.data_args, data.state.labels
        built = load_pretrained(AutoModelForTokenClassification, ctx.model_args, ignore_mismatched_sizes=True,
                                num_labels=len(labels), id2label=dict(enumerate(labels)),
                                label2id={t: i for i, t in enumerate(labels)})
        frozen = freeze(built.model, a.freeze_embeddings, a.freeze_layers)
        if frozen:
            trainable = sum(p.numel() for p in built.model.parameters() if p.requires_grad)
            logger.info("frozen: %s (%d trainable parameters left)", ", ".join(frozen), trainable)
        return built

    def objective(self, ctx, data, built):
        return NerObjective(data.state, ctx.data_args.iob_scheme)

    def prediction_writer(self, ctx, data, split):
        st = data.state
        return ConllPredictions(os.path.join(ctx.args.output_dir, f"predictions_{split}.conll"), st.labels, st.words,
                                st.gold)

    def model_card(self, ctx, data):  # 'first', not 'simple': a word's later pieces may be left 'O'
        piece = "the piece evaluation scores" if ctx.data_args.label_all_tokens else "the only piece training labels"
        return {"labels": data.state.labels, "example": f"# 'first': each word takes the tag of its first sub-token, "
                f"{piece}\nprint(pipe('Alice Smith flew from Paris to Berlin.', aggregation_strategy='first'))"}


class NerObjective(Objective):
    """Loss summed over labelled tokens (the loop divides by their count across the accumulation
    window and all processes); evaluation scores one prediction per word, sentence by sentence."""
    default_metric, metric_names, supports_distillation = "f1", NER_METRICS, True
    # per-token outputs: padded with these across processes before gather_for_metrics
    eval_pad_values = {"predictions": -100, "word_ids": -1}

    def __init__(self, state: NerState, scheme: Optional[str]):
        self.labels, self.gold, self.offsets, self.scheme = state.labels, state.gold, state.offsets, scheme

    def count_items(self, batch):
        return (batch["labels"] != -100).sum().to(torch.float64)

    @staticmethod
    def total_items(dataset) -> float:
        """Labelled tokens in the training set (the loop's per-step denominator under length grouping)."""
        import pyarrow.compute as pc

        return float(pc.sum(pc.not_equal(flat_values(dataset, "labels"), -100)).as_py() or 0)
    def _token_losses(self, logits, labels):
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                               reduction="none").view(labels.shape)

    def loss_from_logits(self, logits, batch):
        return self._token_losses(logits, batch["labels"]).sum()

    def without_labels(self, batch, keep):
        return {**batch, "labels": batch["labels"].masked_fill(~keep.unsqueeze(1), -100)}

    def distill_mask(self, batch):  # labelled positions (first sub-tokens; every piece with --label_all_tokens)
        return batch["labels"] != -100

    def eval_outputs(self, model, batch):
        logits = model(**model_inputs(batch)).logits
        out = {"predictions": logits.argmax(-1), "word_ids": batch["word_ids"], "row_id": batch["row_id"]}
        if "labels" in batch:
            losses = self._token_losses(logits, batch["labels"])
            out["loss_sum"] = losses.sum(1)
            out["loss_count"] = (batch["labels"] != -100).sum(1)
        return out

    def compute_metrics(self, outputs: dict) -> dict:
        rows = np.unique(outputs["row_id"]).astype(int)
        if not len(rows) or any(self.gold[r] is None for r in rows):
            return {"num_sentences": int(len(rows))}
        flat, seen = ner.word_predictions(outputs["predictions"], outputs["word_ids"], outputs["row_id"], self.offsets)
        gold, pred, missing = [], [], 0
        for r in rows:
            lo, hi = self.offsets[r], self.offsets[r + 1]
            missing += int((~seen[lo:hi]).sum())
            gold.append(self.gold[r])
            # a word without a prediction (see dropped_words) is scored as 'O': its gold entity still counts
            pred.append([self.labels[p] if p >= 0 else "O" for p in flat[lo:hi]])
        metrics = ner_metrics(gold, pred, self.scheme)
        loss = float(outputs["loss_sum"].sum() / max(1, outputs["loss_count"].sum()))
        return {"loss": loss, **metrics, "num_sentences": int(len(rows)), "num_words": int(sum(map(len, gold))),
                "unpredicted_words": missing}


TASK = NerTask()


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Entry point; `argv` as a list of strings (notebooks: notebook_launcher(main, (argv,)))."""
    return launch(TASK, argv)


if __name__ == "__main__":
    run_cli(main)
