#!/usr/bin/env python
"""Masked-language-model domain adaptation of a BERT-family encoder on raw text; the output folder
is a model that train_cls.py and train_ner.py start from (--model OUTPUT_DIR).

    accelerate launch train_mlm.py --train_file corpus.txt --output_dir mlm-out
    python train_mlm.py --dataset wikitext --dataset_config wikitext-2-raw-v1 --output_dir mlm-out

Text: .txt files (one document or paragraph per line, blank lines skipped), csv/json/jsonl/parquet
with --text_column, or a Hub dataset. Packed blocks of --max_length tokens by default, or one example
per line with --line_by_line. Perplexity is measured on fixed masks before and after training.
From a notebook: `notebook_launcher(main, (argv,), num_processes=N)`. See README.md.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from common import data as D
from common import mlm as M
from common.config import DataSourceArguments
from common.engine import logger
from common.errors import UserError, fmt_columns, run_cli
from common.runner import Context, PreparedData, TaskSpec, load_pretrained, run

TEXT_COLUMNS = ("text", "sentence", "content", "body", "document")


@dataclass
class MlmDataArguments(DataSourceArguments):
    train_file: Optional[str] = field(default=None, metadata={
        "help": "Plain text (.txt/.tokens/.raw, one document per line) or a table (.csv/.tsv/.json/.jsonl/.parquet)."})
    validation_split_name: str = field(default="validation", metadata={"help": "Hub split used for evaluation."})
    validation_file: Optional[str] = field(default=None, metadata={"help": "Evaluation text (same kinds)."})
    text_column: Optional[str] = field(default=None, metadata={
        "help": f"Table/Hub column with the text (default: the one of {', '.join(TEXT_COLUMNS)} present)."})
    line_by_line: bool = field(default=False, metadata={
        "help": "One example per line (truncated to --max_length) instead of packed blocks."})
    max_length: int = field(default=128, metadata={"help": "Tokens per block (packed) or per line (--line_by_line)."})
    validation_split: float = field(default=0.05, metadata={
        "help": "Fraction of the training lines held out (seeded) when there is no evaluation text."})
    mlm_probability: float = field(default=0.15, metadata={
        "help": "Fraction of tokens to predict; of those 80%% become [MASK], 10%% a random token, 10%% stay."})
    whole_word_mask: bool = field(default=False, metadata={
        "help": "Mask all pieces of a word together (words from the fast tokenizer's word_ids)."})
    full_decoder: bool = field(default=False, metadata={
        "help": "Run the vocabulary decoder on every position, as the official scripts do (slower; same loss). "
                "Default: only on masked positions. Always on with XLA or --torch_compile (static shapes)."})
    eval_mask_seed: int = field(default=0, metadata={
        "help": "Seed of the fixed evaluation masks (independent of --seed, so runs compare)."})

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.mlm_probability < 1:
            raise UserError(f"--mlm_probability must be between 0 and 1 (exclusive), got {self.mlm_probability}.")


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

def read_texts(path: str, flag: str, column: Optional[str]) -> tuple[list[str], int]:
    """(non-blank texts, number of blank/missing rows skipped) from a text file or a table."""
    ext = D.check_file(path, flag, M.TEXT_EXTENSIONS + D.TABLE_EXTENSIONS)
    if ext in M.TEXT_EXTENSIONS:
        if column:
            raise UserError(f"--text_column '{column}' was given but {flag} '{path}' is a plain text file "
                            "(one text per line); drop --text_column or pass a table.")
        return M.read_text_lines(path, flag), 0
    df = D.read_table(path, flag)
    col = text_column_of(list(df.columns), column, f"{flag} '{path}'")
    return texts_from_column(list(df[col]), f"{flag} '{path}'", col)


def text_column_of(columns: list, given: Optional[str], where: str) -> str:
    if given:
        D.require_columns(columns, [given], where, {given: "--text_column"})
        return given
    found = [c for c in TEXT_COLUMNS if c in columns]
    if len(found) == 1:
        return found[0]
    if len(columns) == 1:
        return columns[0]
    raise UserError(f"{where}: cannot tell the text column among {fmt_columns(columns)}; pass --text_column.")


def texts_from_column(values: list, where: str, column: str) -> tuple[list[str], int]:
    texts, skipped = [], 0
    for i, v in enumerate(values):
        if D.is_missing(v):
            skipped += 1
            continue
        if not isinstance(v, str):
            raise UserError(f"{where}, row {i + 1}: column '{column}' holds {type(v).__name__} {str(v)[:40]!r}, "
                            "not text; pick the text column with --text_column.")
        texts.append(v.strip())
    if not texts:
        raise UserError(f"{where}: column '{column}' has no text (every row is empty).")
    return texts, skipped


def read_splits(a: MlmDataArguments, model_args) -> tuple[dict, dict, dict]:
    """split -> texts, split -> where from, split -> blank rows skipped."""
    if a.dataset:
        hub = D.load_hub_splits(a.dataset, a.dataset_config, model_args.cache_dir)
        names = {"train": a.train_split_name, "validation": a.validation_split_name}
        if names["train"] not in hub:
            raise UserError(f"--dataset '{a.dataset}' has no split '{names['train']}'; its splits are "
                            f"{fmt_columns(list(hub))} (set --train_split_name).")
        texts, where, skipped = {}, {}, {}
        for split, name in names.items():
            if name in hub:
                where[split] = f"split '{name}' of --dataset '{a.dataset}'"
                col = text_column_of(hub[name].column_names, a.text_column, where[split])
                texts[split], skipped[split] = texts_from_column(hub[name][col], where[split], col)
        return texts, where, skipped
    texts, where, skipped = {}, {}, {}
    for split, path, flag in (("train", a.train_file, "--train_file"), ("validation", a.validation_file,
                                                                       "--validation_file")):
        if path:
            texts[split], skipped[split] = read_texts(path, flag, a.text_column)
            where[split] = f"{flag} '{path}'"
    return texts, where, skipped


class MlmSpec(TaskSpec):
    description = __doc__
    data_arguments = MlmDataArguments
    pipeline_task = "fill-mask"
    task_name = "fill-mask"
    eval_before_training = True

    def load_data(self, ctx: Context) -> PreparedData:
        import datasets

        a, args, tok = ctx.data_args, ctx.args, ctx.tokenizer
        if tok.mask_token_id is None:
            raise UserError(f"the tokenizer of '{ctx.model_args.model}' has no mask token, so it cannot be "
                            "trained as a masked language model.")
        texts, where, skipped = read_splits(a, ctx.model_args)
        derived = False
        if "validation" not in texts and a.validation_split > 0:
            if len(texts["train"]) < 2:
                raise UserError(f"{where['train']} has a single text: too little to hold out "
                                f"--validation_split {a.validation_split}; pass --validation_file or "
                                "--validation_split 0.")
            keep, take = D.split_indices(len(texts["train"]), a.validation_split,
                                         (ctx.split.seed if ctx.split is not None else args.seed) + 1)
            texts["validation"] = [texts["train"][i] for i in take]
            texts["train"] = [texts["train"][i] for i in keep]
            derived = True

        special_ids = sorted(set(tok.all_special_ids))
        self.special_ids, self.mask_id, self.vocab_size = special_ids, tok.mask_token_id, len(tok)
        packed = not a.line_by_line
        tok_key = D.tokenizer_fingerprint(tok)

        def encode(batch):
            if packed:  # no special tokens, no truncation: the packer adds [CLS]/[SEP] per block
                enc = tok(batch["text"], add_special_tokens=False, verbose=False)
            else:
                enc = tok(batch["text"], truncation=True, max_length=a.max_length)
            out = {"input_ids": enc["input_ids"]}
            if not packed:
                out["attention_mask"] = enc["attention_mask"]
                out["length"] = [len(x) for x in enc["input_ids"]]
            if a.whole_word_mask:
                out["word_start"] = [M.word_starts(enc.word_ids(i)) for i in range(len(enc["input_ids"]))]
            return out

        out, stats = {}, {}
        for split in ("train", "validation"):
            if split not in texts:
                continue
            raw = datasets.Dataset.from_dict({"text": texts[split]})
            res = D.tokenize_cached(raw, encode, [tok_key, packed, a.max_length if not packed else 0,
                                                  a.whole_word_mask], ctx.accelerator, remove_columns=["text"],
                                    num_proc=a.preprocessing_num_workers, overwrite=a.overwrite_cache,
                                    desc=f"Tokenizing {split}")
            enc = res.dataset
            ctx.timings[f"tokenize_{split}_cached"] = res.from_cache
            n_text_tokens = int(sum(enc["length"])) if not packed else int(len(M._flat(enc, "input_ids")[0]))
            if packed:
                enc = M.pack(enc, a.max_length, tok.cls_token_id, tok.sep_token_id, a.whole_word_mask)
            else:
                truncated = int(np.sum(np.asarray(enc["length"]) >= a.max_length))
            tokens = int(np.sum(enc["length"]))
            stats[split] = {"texts": len(texts[split]), "examples": len(enc), "tokens": tokens,
                            "text_tokens": n_text_tokens, "blank_rows_skipped": skipped.get(split, 0)}
            if not packed:
                stats[split]["truncated_lines"] = truncated
            if split == "validation":
                enc, n_masked = M.fixed_eval_masks(enc, special_ids, a.mlm_probability, self.mask_id,
                                                   self.vocab_size, a.eval_mask_seed, a.whole_word_mask)
                if n_masked == 0:
                    raise UserError(f"the evaluation text ({where.get('validation', 'held-out lines')}) is too short "
                                    f"for any token to be masked at --mlm_probability {a.mlm_probability}; pass "
                                    "more evaluation text.")
                stats[split]["masked_tokens"] = n_masked
            out[split] = enc
            logger.info("%s: %d texts -> %d %s, %d tokens%s", split, len(texts[split]), len(enc),
                        "blocks" if packed else "lines", tokens,
                        f" ({stats[split]['masked_tokens']} masked for evaluation)" if split == "validation" else "")
        if args.max_train_samples:
            out["train"] = out["train"].select(range(min(args.max_train_samples, len(out["train"]))))
        source = f"{a.dataset}/{a.dataset_config}" if a.dataset else os.path.basename(a.train_file)
        info = {"source": source, "mode": "packed" if packed else "line_by_line", "max_length": a.max_length,
                "mlm_probability": a.mlm_probability, "whole_word_mask": a.whole_word_mask,
                "eval_mask_seed": a.eval_mask_seed, "splits": stats,
                "derived_splits": ["validation"] if derived else [],
                "tokenization_cached": {s: ctx.timings[f"tokenize_{s}_cached"] for s in out}}
        return PreparedData(train=out["train"], eval=out.get("validation"), info=info,
                            identity={"mode": info["mode"], "max_length": a.max_length,
                                      "whole_word_mask": a.whole_word_mask})

    def build_model(self, ctx: Context, data: PreparedData):
        from transformers import AutoModelForMaskedLM

        model, new = load_pretrained(AutoModelForMaskedLM, ctx.model_args)
        model._new_weights = new
        if len(ctx.tokenizer) > model.get_input_embeddings().num_embeddings:
            raise UserError(f"the tokenizer has {len(ctx.tokenizer)} tokens but the model's embedding has "
                            f"{model.get_input_embeddings().num_embeddings} rows; use the model's own tokenizer.")
        self.head_new = M.head_is_new(model, new)
        self.unexpected, self.prefix = model._unexpected_keys, model.base_model_prefix
        if self.head_new:
            logger.warning("'%s' has no trained MLM head (%s newly initialised): the initial perplexity is that "
                           "of a random head; training fits it", ctx.model_args.model, ", ".join(self.head_new))
        self.tied = bool(getattr(model.config, "tie_word_embeddings", False))
        return model

    def make_task(self, ctx, data, model):
        a, args = ctx.data_args, ctx.args
        static = ctx.accelerator.distributed_type == "XLA" or args.torch_compile
        full = a.full_decoder or static
        if static and not a.full_decoder:
            logger.info("decoder on every position (XLA/--torch_compile need static shapes)")
        self.full_decoder = full
        return MlmTask(model, self.special_ids, self.mask_id, self.vocab_size, a.mlm_probability,
                       a.whole_word_mask, full, self.tied, a.line_by_line)

    def extra_results(self, ctx, data, results: dict, engine) -> dict:
        before = engine.state.initial_eval.get("perplexity")
        after = results.get("eval", {}).get("perplexity")
        ppl = {"before": before, "after": after,
               "reduction": before / after if before and after else None}
        head = {"trained_head_in_checkpoint": not self.head_new, "newly_initialised_head": self.head_new,
                "decoder_tied_to_embeddings": M.decoder_tied(ctx.accelerator.unwrap_model(engine.model))}
        return {"perplexity": ppl, "mlm": head | {"decoder": "all positions" if self.full_decoder
                                                  else "masked positions only",
                                                  "pooler_kept": getattr(self, "carried", [])}}

    def after_save(self, ctx, output_dir):
        model_args = ctx.model_args
        self.carried = M.carry_pooler(model_args, getattr(self, "unexpected", []), self.prefix, output_dir)
        if self.carried:
            logger.info("kept the checkpoint's pre-trained pooler (%s) in %s for classifiers started from it",
                        ", ".join(self.carried), output_dir)

    def model_card(self, ctx, data):
        return {"labels": None, "example": f"print(pipe('Paris is the {ctx.tokenizer.mask_token} of France.'))"}


class MlmTask:
    """Training batches are masked on the device, per micro-batch, from the engine's seeded RNG
    (prepare_batch); evaluation batches carry their fixed masks. The loss is summed over predicted
    tokens and divided by their count across the accumulation window and all processes."""
    default_metric = "perplexity"
    eval_pad_values: dict = {}

    def __init__(self, model, special_ids, mask_id, vocab_size, probability, whole_word, full_decoder, tied,
                 line_by_line=False):
        self.line_by_line = line_by_line
        self.special = torch.tensor(special_ids, dtype=torch.long)
        self.mask_id, self.vocab_size, self.probability = mask_id, vocab_size, probability
        self.whole_word, self.full_decoder, self.tied = whole_word, full_decoder, tied
        self.decoder = None if full_decoder else M.MaskedPositionsOnly(model)

    def after_prepare(self, model) -> None:
        """Prepared models must keep the decoder tied to the input embeddings (moving to XLA unties it)."""
        if self.tied and not M.decoder_tied(model):
            model.tie_weights()
            logger.info("re-tied the decoder to the input embeddings after prepare()")
        if self.tied and not M.decoder_tied(model):
            raise UserError("the model's decoder could not be tied to its input embeddings after prepare().")

    def prepare_batch(self, batch: dict) -> dict:
        if "labels" in batch:
            return batch
        ids = batch["input_ids"]
        special = torch.isin(ids, self.special.to(ids.device))
        masked, labels = M.mask_tokens(ids, special, self.probability, self.mask_id, self.vocab_size,
                                       batch.get("word_start") if self.whole_word else None)
        return {"input_ids": masked, "attention_mask": batch["attention_mask"], "labels": labels}

    def count_items(self, batch):
        return (batch["labels"] != -100).sum().to(torch.float64)

    def total_items(self, dataset) -> Optional[float]:
        """Expected masked tokens per epoch for --line_by_line (lines of all lengths, grouped by the
        sampler); None for packed blocks, whose per-batch count is already the mean."""
        if not self.line_by_line:
            return None
        ids = D.flat_values(dataset, "input_ids")
        maskable = np.isin(ids.to_numpy(zero_copy_only=False), self.special.numpy(), invert=True).sum()
        return float(maskable) * self.probability

    def _logits(self, model, batch):
        """(logits, targets, rows) of the predicted tokens: (n, vocab), (n,) with -100 where a row only
        pads the decoder's bucket, and each one's row in the batch."""
        labels = batch["labels"]
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if self.full_decoder:
            keep = labels != -100
            logits = model(**inputs).logits
            return logits[keep], labels[keep], keep.nonzero()[:, 0]
        index, targets = M.masked_positions(labels)
        self.decoder.index = index
        try:
            logits = model(**inputs).logits
        finally:
            self.decoder.index = None
        return logits.reshape(-1, logits.shape[-1]), targets, torch.div(index, labels.shape[1], rounding_mode="floor")

    def loss_sum(self, model, batch):
        logits, targets, _ = self._logits(model, batch)
        return F.cross_entropy(logits.float(), targets, reduction="sum")  # -100 rows add nothing

    def eval_outputs(self, model, batch):
        logits, targets, rows = self._logits(model, batch)
        losses = F.cross_entropy(logits.float(), targets, reduction="none")
        n = len(batch["input_ids"])
        real = targets != -100
        loss_sum = torch.zeros(n, device=losses.device, dtype=torch.float32).index_add_(0, rows, losses)
        correct = torch.zeros(n, device=losses.device, dtype=torch.long).index_add_(
            0, rows, ((logits.argmax(-1) == targets) & real).long())
        return {"loss_sum": loss_sum, "count": (batch["labels"] != -100).sum(1), "correct": correct}

    def compute_metrics(self, outputs: dict) -> dict:
        count = float(outputs["count"].sum())
        loss = float(outputs["loss_sum"].astype(np.float64).sum() / count) if count else float("nan")
        return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf"),
                "masked_accuracy": float(outputs["correct"].sum() / count) if count else float("nan"),
                "masked_tokens": int(count)}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Entry point; `argv` as a list of strings (notebooks: notebook_launcher(main, (argv,)))."""
    return run(MlmSpec(), argv)


if __name__ == "__main__":
    run_cli(main)
