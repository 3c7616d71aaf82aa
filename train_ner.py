#!/usr/bin/env python
"""Fine-tune a BERT-family encoder for token classification (NER with IOB2/IOBES tags; entity-level
seqeval metrics on words).

    accelerate launch train_ner.py --train_file train.txt --validation_file valid.txt --output_dir out
    python train_ner.py --dataset conll2003 --output_dir out

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

from common import data as D
from common import ner as N
from common.config import DataSourceArguments
from common.engine import logger, model_inputs
from common.errors import UserError, fmt_columns, run_cli
from common.metrics import ner_metrics
from common.runner import Context, PreparedData, TaskSpec, load_pretrained, load_tokenizer, run


@dataclass
class NerDataArguments(DataSourceArguments):
    train_file: Optional[str] = field(default=None, metadata={
        "help": "CoNLL columns (.txt/.conll/.iob/.bio/.tsv) or a table (.csv/.json/.jsonl/.parquet)."})
    test_split_name: str = field(default="test", metadata={"help": "Hub split used for testing (if present)."})
    test_file: Optional[str] = field(default=None, metadata={"help": "Test file; tags optional."})
    tokens_column: Optional[str] = field(default=None, metadata={
        "help": "Table/Hub column with the words: a list, or a text split on whitespace "
                f"(default: the one of {', '.join(N.TOKEN_COLUMNS)} present)."})
    tags_column: Optional[str] = field(default=None, metadata={
        "help": "Table/Hub column with the tags: a list, a list literal, or space-separated "
                f"(default: the one of {', '.join(N.TAG_COLUMNS)} present)."})
    tag_column_index: int = field(default=-1, metadata={"help": "CoNLL files: the column holding the tag."})
    label_names: Optional[list[str]] = field(default=None, metadata={
        "help": "Tag names in id order, for integer tags (a Hub ClassLabel provides them); also restricts "
                "string tags to this set."})
    label_all_tokens: bool = field(default=False, metadata={
        "help": "Train on every sub-token (continuation pieces get the word's I- tag) instead of only the "
                "first piece of each word. Evaluation always reads the first piece."})
    iob_scheme: Optional[Literal["IOB2", "IOBES"]] = field(default=None, metadata={
        "help": "Score in seqeval strict mode with this scheme (malformed entities do not count). Unset: "
                "conlleval's lenient rules, the figures papers report."})
    skip_bad_rows: bool = field(default=False, metadata={
        "help": "Skip (and count in results.json) rows with mismatched token/tag counts, unknown tags or "
                "empty sentences instead of stopping with an error."})
    max_length: int = field(default=128, metadata={
        "help": "Sub-tokens per window; longer sentences are split into overlapping windows."})
    freeze_embeddings: bool = field(default=False, metadata={"help": "Do not train the embedding layer."})
    freeze_layers: int = field(default=0, metadata={
        "help": "Do not train the embeddings and the first N encoder layers."})

    def __post_init__(self):
        super().__post_init__()
        if self.freeze_layers < 0:
            raise UserError(f"--freeze_layers must be 0 or more, got {self.freeze_layers}.")


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

def read_splits(a: NerDataArguments, model_args) -> dict:
    """split -> Sentences (raw tags), from local files or a Hub dataset."""
    if a.dataset:
        hub = D.load_hub_splits(a.dataset, a.dataset_config, model_args.cache_dir)
        names = {"train": a.train_split_name, "validation": a.validation_split_name, "test": a.test_split_name}
        if names["train"] not in hub:
            raise UserError(f"--dataset '{a.dataset}' has no split '{names['train']}'; its splits are "
                            f"{fmt_columns(list(hub))} (set --train_split_name).")
        return {k: N.from_dataset(hub[v], f"split '{v}' of --dataset '{a.dataset}'", a.tokens_column,
                                  a.tags_column, labelled_required=k != "test")
                for k, v in names.items() if v in hub}
    splits = {}
    for split, path, flag in (("train", a.train_file, "--train_file"), ("validation", a.validation_file,
                              "--validation_file"), ("test", a.test_file, "--test_file")):
        if not path:
            continue
        if D.file_extension(path) in N.CONLL_EXTENSIONS:
            splits[split] = N.read_conll(path, flag, a.tag_column_index, a.skip_bad_rows)
        else:
            splits[split] = N.read_table_sentences(path, flag, a.tokens_column, a.tags_column,
                                                   labelled_required=split != "test")
        if split != "test" and splits[split].tags is None:
            raise UserError(f"{flag} '{path}' has no tags (one column per line / no tag column); "
                            "training and validation data must be tagged.")
    return splits


def byte_level(tokenizer) -> bool:
    """RoBERTa/GPT-2 style byte-level BPE: pre-split words need add_prefix_space=True."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and '"ByteLevel"' in backend.to_str()


def freeze(model, embeddings: bool, layers: int) -> list[str]:
    """Stop training the embeddings (and the first `layers` encoder layers); returns frozen module names."""
    base = model.base_model
    frozen = []
    if embeddings or layers:
        emb = getattr(base, "embeddings", None) or model.get_input_embeddings()
        emb.requires_grad_(False)
        frozen.append("embeddings")
    if layers:
        stacks = [(name, m) for name, m in base.named_modules()
                  if isinstance(m, torch.nn.ModuleList) and name.split(".")[-1] in ("layer", "layers")]
        if not stacks:
            raise UserError(f"--freeze_layers: cannot find the encoder layers of {type(base).__name__}.")
        name, stack = stacks[0]
        if layers > len(stack):
            raise UserError(f"--freeze_layers {layers} is more than the model's {len(stack)} layers.")
        for i in range(layers):
            stack[i].requires_grad_(False)
            frozen.append(f"{name}.{i}")
    return frozen


class NerSpec(TaskSpec):
    description = __doc__
    supports_kfold = True
    data_arguments = NerDataArguments
    pipeline_task = "token-classification"
    task_name = "token-classification"

    def tokenizer_kwargs(self, ctx: Context) -> dict:
        return {"add_prefix_space": True} if byte_level(load_tokenizer(ctx.model_args)) else {}

    def load_data(self, ctx: Context) -> PreparedData:
        import datasets

        a, args, tok = ctx.data_args, ctx.args, ctx.tokenizer
        raw = read_splits(a, ctx.model_args)
        cleaned = {}
        for split, sents in raw.items():
            cleaned[split] = N.clean(sents, a.label_names, a.iob_scheme, a.skip_bad_rows)
            if len(cleaned[split]) == 0:
                raise UserError(f"{sents.where} has no usable sentences"
                                f"{f' ({cleaned[split].skipped} skipped as bad rows)' if cleaned[split].skipped else ''}.")
            if cleaned[split].skipped:
                logger.warning("%s: skipped %d bad rows, e.g. %s", sents.where, cleaned[split].skipped,
                               cleaned[split].skip_reasons[0])

        split_seed = ctx.split.seed if ctx.split is not None else args.seed
        if ctx.split is not None and ctx.split.kfold:
            return self._load_kfold(ctx, cleaned, raw, split_seed)
        # Derived validation split (seeded) before anything else touches the training rows.
        if "validation" not in cleaned and a.validation_split > 0:
            train = cleaned["train"]
            keep, take = D.split_indices(len(train), a.validation_split, split_seed + 1)
            cleaned["validation"] = _subset(train, take, f"{train.where} (held-out validation)")
            cleaned["train"] = _subset(train, keep, train.where)
        if args.max_train_samples:
            cleaned["train"] = _subset(cleaned["train"], range(min(args.max_train_samples, len(cleaned["train"]))),
                                       cleaned["train"].where)

        # Labels from every labelled split (and the ClassLabel / --label_names list): 'O', then sorted.
        labelled = [s for s in cleaned.values() if s.tags is not None]
        extra = (raw["train"].class_names or []) + list(a.label_names or [])
        self.labels = N.label_list([t for s in labelled for t in s.tags], extra, a.label_all_tokens)
        label2id = {t: i for i, t in enumerate(self.labels)}
        inside = {i: label2id[N.inside_tag(t)] if N.inside_tag(t) in label2id else i for i, t in enumerate(self.labels)}

        # Evaluation sentences get ids unique across validation and test, so one task scores both.
        self.words, self.gold, self.where = [], [], {}
        self.row_base = {}
        tok_key = D.tokenizer_fingerprint(tok)
        out, stats = {}, {}
        for split in ("train", "validation", "test"):
            if split not in cleaned:
                continue
            s = cleaned[split]
            base = 0 if split == "train" else len(self.words)
            if split != "train":
                self.row_base[split] = base
                self.words.extend(s.tokens)
                self.gold.extend(s.tags if s.tags is not None else [None] * len(s))
            columns = {"tokens": s.tokens, "row_id": list(range(base, base + len(s)))}
            if s.tags is not None:
                columns["tag_ids"] = [[label2id[t] for t in tags] for tags in s.tags]
            ds = datasets.Dataset.from_dict(columns)

            def encode(batch):
                return N.encode_sentences(tok, batch["tokens"], batch.get("tag_ids"), batch["row_id"], a.max_length,
                                          a.label_all_tokens, inside)

            res = D.tokenize_cached(ds, encode, [tok_key, a.max_length, a.label_all_tokens, self.labels],
                                    ctx.accelerator, remove_columns=ds.column_names,
                                    num_proc=a.preprocessing_num_workers, overwrite=a.overwrite_cache,
                                    desc=f"Tokenizing {split}")
            enc = res.dataset
            ctx.timings[f"tokenize_{split}_cached"] = res.from_cache
            stats[split] = {"sentences": len(s), "windows": len(enc), "windowed_sentences":
                            len(set(np.asarray(enc["row_id"])[np.asarray(enc["windowed"], dtype=bool)].tolist())),
                            "dropped_words": int(np.sum(enc["dropped_words"])), "skipped_rows": s.skipped}
            if s.skip_reasons:
                stats[split]["skip_examples"] = s.skip_reasons
            out[split] = enc.remove_columns(["windowed", "dropped_words"])
        offsets = np.zeros(len(self.words) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(w) for w in self.words])
        self.offsets = offsets
        for split, st in stats.items():
            if st["windowed_sentences"] or st["dropped_words"]:
                logger.info("%s: %d sentences longer than --max_length %d were split into windows; %d words could "
                            "not be placed (scored as 'O')", split, st["windowed_sentences"], a.max_length,
                            st["dropped_words"])
        source = f"{a.dataset}/{a.dataset_config}" if a.dataset else os.path.basename(a.train_file)
        info = {"source": source, "labels": self.labels, "label_all_tokens": a.label_all_tokens,
                "iob_scheme": a.iob_scheme or "conlleval (lenient)", "max_length": a.max_length,
                "sizes": {s: st["sentences"] for s, st in stats.items()}, "splits": stats,
                "derived_splits": ["validation"] if "validation" not in raw and "validation" in cleaned else [],
                "tokenization_cached": {s: ctx.timings[f"tokenize_{s}_cached"] for s in out}}
        return PreparedData(train=out["train"], eval=out.get("validation"), test=out.get("test"), raw=cleaned,
                            info=info, identity={"labels": self.labels})

    def _load_kfold(self, ctx: Context, cleaned: dict, raw: dict, seed: int) -> PreparedData:
        """K-fold by sentence: the training file is tokenized once with row ids = sentence index, and every
        split of a fold is a selection of its windows (held-out fold = test, inner validation from the rest)."""
        import datasets

        from common.stats import kfold_indices

        a, args, tok, plan = ctx.data_args, ctx.args, ctx.tokenizer, ctx.split
        for split, flag in (("validation", "--validation_file"), ("test", "--test_file")):
            if split in cleaned:
                raise UserError(f"--kfold holds out folds of --train_file as test sets and draws validation from the "
                                f"other folds; drop {flag} (or run without --kfold).")
        pool = cleaned["train"]
        if plan.kfold > len(pool):
            raise UserError(f"--kfold {plan.kfold} is more folds than the {len(pool)} training sentences.")
        self.labels = N.label_list(pool.tags, (raw["train"].class_names or []) + list(a.label_names or []),
                                   a.label_all_tokens)
        label2id = {t: i for i, t in enumerate(self.labels)}
        inside = {i: label2id[N.inside_tag(t)] if N.inside_tag(t) in label2id else i for i, t in enumerate(self.labels)}
        self.words, self.gold = pool.tokens, pool.tags
        offsets = np.zeros(len(self.words) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(w) for w in self.words])
        self.offsets = offsets
        ds = datasets.Dataset.from_dict({"tokens": pool.tokens, "row_id": list(range(len(pool))),
                                         "tag_ids": [[label2id[t] for t in tags] for tags in pool.tags]})

        def encode(batch):
            return N.encode_sentences(tok, batch["tokens"], batch["tag_ids"], batch["row_id"], a.max_length,
                                      a.label_all_tokens, inside)

        res = D.tokenize_cached(ds, encode, [D.tokenizer_fingerprint(tok), a.max_length, a.label_all_tokens, self.labels],
                                ctx.accelerator, remove_columns=ds.column_names, num_proc=a.preprocessing_num_workers,
                                overwrite=a.overwrite_cache, desc="Tokenizing train")
        ctx.timings["tokenize_train_cached"] = res.from_cache
        enc = res.dataset.remove_columns(["windowed", "dropped_words"])
        train, held = kfold_indices(len(pool), plan.kfold, plan.fold, seed)
        rows = {"test": held}
        if a.validation_split > 0:
            keep, take = D.split_indices(len(train), a.validation_split, seed + 1)
            rows["validation"], train = train[take], train[keep]
        if args.max_train_samples:
            train = train[: args.max_train_samples]
        rows["train"] = train
        window_rows = np.asarray(enc["row_id"])
        out = {split: enc.select(np.flatnonzero(np.isin(window_rows, r))) for split, r in rows.items()}
        self.row_base = {}
        source = f"{a.dataset}/{a.dataset_config}" if a.dataset else os.path.basename(a.train_file)
        info = {"source": source, "labels": self.labels, "label_all_tokens": a.label_all_tokens,
                "iob_scheme": a.iob_scheme or "conlleval (lenient)", "max_length": a.max_length,
                "sizes": {s: int(len(r)) for s, r in rows.items()}, "kfold": plan.kfold, "fold": plan.fold + 1,
                "split_seed": seed, "derived_splits": sorted(s for s in rows if s != "train"),
                "tokenization_cached": {"train": res.from_cache}}
        return PreparedData(train=out["train"], eval=out.get("validation"), test=out["test"],
                            raw={"train": pool}, info=info, identity={"labels": self.labels})

    def build_model(self, ctx: Context, data: PreparedData):
        from transformers import AutoModelForTokenClassification

        a = ctx.data_args
        kw = dict(num_labels=len(self.labels), id2label=dict(enumerate(self.labels)),
                  label2id={t: i for i, t in enumerate(self.labels)})
        model, new = load_pretrained(AutoModelForTokenClassification, ctx.model_args, ignore_mismatched_sizes=True,
                                     **kw)
        model._new_weights = new
        frozen = freeze(model, a.freeze_embeddings, a.freeze_layers)
        if frozen:
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            logger.info("frozen: %s (%d trainable parameters left)", ", ".join(frozen), trainable)
        return model

    def make_task(self, ctx, data, model):
        return NerTask(self.labels, self.gold, self.offsets, ctx.data_args.iob_scheme)

    def write_predictions(self, ctx: Context, data: PreparedData, split: str, outputs: dict) -> None:
        """predictions_<split>.conll: 'word gold predicted' per line (no gold column for unlabelled data),
        a blank line between sentences, in file order."""
        rows = np.unique(outputs["row_id"]).astype(int)
        flat, _ = N.word_predictions(outputs["predictions"], outputs["word_ids"], outputs["row_id"], self.offsets)
        lines = []
        for r in rows:
            gold = self.gold[r]
            for j, word in enumerate(self.words[r]):
                p = flat[self.offsets[r] + j]
                pred = self.labels[p] if p >= 0 else "O"
                lines.append(f"{word} {pred}" if gold is None else f"{word} {gold[j]} {pred}")
            lines.append("")
        from common.reporting import write_text_atomic

        write_text_atomic(os.path.join(ctx.args.output_dir, f"predictions_{split}.conll"), "\n".join(lines))

    def model_card(self, ctx, data):
        return {"labels": self.labels,
                "example": "print(pipe('Alice Smith flew from Paris to Berlin with Acme Corp.', "
                           "aggregation_strategy='simple'))"}


def _subset(s: N.Sentences, idx, where: str) -> N.Sentences:
    idx = list(idx)
    return N.Sentences([s.tokens[i] for i in idx], None if s.tags is None else [s.tags[i] for i in idx],
                       [s.rows[i] for i in idx], where, s.class_names, s.skipped, s.skip_reasons)


class NerTask:
    """Loss summed over labelled tokens (the engine divides by their count across the accumulation
    window and all processes); evaluation scores one prediction per word, sentence by sentence."""
    default_metric = "f1"
    # per-token outputs: padded with these across processes before gather_for_metrics
    eval_pad_values = {"predictions": -100, "word_ids": -1}

    def __init__(self, labels: list, gold: list, offsets: np.ndarray, scheme: Optional[str]):
        self.labels, self.gold, self.offsets, self.scheme = labels, gold, offsets, scheme

    def count_items(self, batch):
        return (batch["labels"] != -100).sum().to(torch.float64)

    @staticmethod
    def total_items(dataset) -> float:
        """Labelled tokens in the training set (the engine's per-step denominator under length grouping)."""
        import pyarrow.compute as pc

        return float(pc.sum(pc.not_equal(D.flat_values(dataset, "labels"), -100)).as_py() or 0)

    def _token_losses(self, logits, labels):
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                               reduction="none").view(labels.shape)

    def loss_sum(self, model, batch):
        logits = model(**model_inputs(batch)).logits
        return self._token_losses(logits, batch["labels"]).sum()

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
        flat, seen = N.word_predictions(outputs["predictions"], outputs["word_ids"], outputs["row_id"], self.offsets)
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


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Entry point; `argv` as a list of strings (notebooks: notebook_launcher(main, (argv,)))."""
    return run(NerSpec(), argv)


if __name__ == "__main__":
    run_cli(main)
