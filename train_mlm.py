#!/usr/bin/env python
"""Masked-language-model domain adaptation of a BERT-family encoder on raw text; the output folder
is a model that train_cls.py and train_ner.py start from (--model OUTPUT_DIR).

    accelerate launch train_mlm.py --output_dir mlm-out      # no data flag: WikiText-2 from the Hub
    python train_mlm.py --train_file corpus.txt --output_dir mlm-out

Text: .txt files (one document or paragraph per line, blank lines skipped), csv/json/jsonl/parquet
with --text_column, or a Hub dataset. Packed blocks of --max_length tokens by default, or one example
per line with --line_by_line. Perplexity is measured on fixed masks before and after training.
From a notebook: `notebook_launcher(main, (argv,), num_processes=N)`. See README.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import datasets
import numpy as np
import torch
import torch.nn.functional as F

from common.config import DataSourceArguments
from common.data import mlm
from common.data.loading import column_arrays, flat_values, source_name, tokenize_split, tokenizer_fingerprint
from common.data.splits import data_block, plan_rows, split_origins
from common.errors import UserError, run_cli
from common.log import logger
from common.runs.launch import launch
from common.task import BuiltModel, Context, Objective, PreparedData, Task
from common.training.metrics import MLM_METRICS
from common.training.models import load_pretrained

TEXT_COLUMNS = ("text", "sentence", "content", "body", "document")


@dataclass
class MlmDataArguments(DataSourceArguments):
    default_dataset = ("Salesforce/wikitext", "wikitext-2-raw-v1")  # WikiText-2 (raw), when no data flag is given
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
        "help": "Fraction of tokens to predict; of those 80%% become [MASK], 10%% a random token, 10%% stay.",
        "group": "training"})
    whole_word_mask: bool = field(default=False, metadata={
        "help": "Mask all pieces of a word together (words from the fast tokenizer's word_ids).", "group": "training"})
    full_decoder: bool = field(default=False, metadata={
        "help": "Run the vocabulary decoder on every position, not only the masked ones (slower, same loss; "
                "always on with XLA or --torch_compile).", "group": "speed"})
    eval_mask_seed: int = field(default=0, metadata={
        "help": "Seed of the fixed evaluation masks (independent of --seed, so runs compare).", "group": "evaluation"})

    reused_settings = DataSourceArguments.reused_settings + (
        (("text_column",), "table"), (("line_by_line",), "any"), (("mlm_probability",), "any"),
        (("whole_word_mask",), "any"), (("eval_mask_seed",), "any"))

    def file_layout(self, path: str, flag: str) -> str:
        return mlm.file_layout(path, flag)

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.mlm_probability < 1:
            raise UserError(f"--mlm_probability must be between 0 and 1 (exclusive), got {self.mlm_probability}.")
        if not 0 <= self.eval_mask_seed < 2**63:
            raise UserError(f"--eval_mask_seed must be in [0, 2**63), got {self.eval_mask_seed}.")


@dataclass
class MlmModelState:
    head_new: list   # MLM head weights initialised here (the checkpoint had none)
    tied: bool       # decoder tied to the input embeddings


class MlmTask(Task):
    name = pipeline_task = "fill-mask"
    description = __doc__
    head = "ForMaskedLM"
    data_arguments = MlmDataArguments
    eval_before_training = True

    def load_data(self, ctx: Context) -> PreparedData:
        a, args, tok = ctx.data_args, ctx.args, ctx.tokenizer
        if tok.mask_token_id is None:
            raise UserError(f"the tokenizer of '{ctx.model_args.model}' has no mask token, so it cannot be "
                            "trained as a masked language model.")
        texts, where, skipped, columns = mlm.read_splits(a, ctx.model_args.cache_dir, TEXT_COLUMNS)
        rows: dict = {}
        if "train" in texts and "validation" not in texts and a.validation_split > 0:
            if len(texts["train"]) < 2:
                raise UserError(f"{where['train']} has a single text: too little to hold out "
                                f"--validation_split {a.validation_split}; pass --validation_file or "
                                "--validation_split 0.")
            rows = plan_rows(len(texts["train"]), None, ctx.split.seed if ctx.split else args.seed, set(texts),
                             a.validation_split)
            texts.update({split: [texts["train"][i] for i in rows[split]] for split in ("train", "validation")})

        special_ids = sorted(set(tok.all_special_ids))
        packed = not a.line_by_line
        key = [tokenizer_fingerprint(tok), packed, a.max_length if not packed else 0, a.whole_word_mask]
        encode = mlm.encoder(tok, packed, a.max_length, a.whole_word_mask)

        out, stats = {}, {}
        for split in ("train", "validation", "test"):
            if split not in texts:
                continue
            enc = tokenize_split(ctx, split, datasets.Dataset.from_dict({"text": texts[split]}), encode, key, ["text"])
            n_text_tokens = (int(np.sum(column_arrays(enc, "length")["length"])) if not packed
                             else int(len(mlm._flat(enc, "input_ids")[0])))
            if packed:
                enc = mlm.pack(enc, a.max_length, tok.cls_token_id, tok.sep_token_id, a.whole_word_mask)
            mlm.check_maskable(enc, special_ids, where.get(split, "the held-out lines"), tok.mask_token)
            lengths = column_arrays(enc, "length")["length"]
            tokens = int(np.sum(lengths))
            stats[split] = {"texts": len(texts[split]), "examples": len(enc), "tokens": tokens,
                            "text_tokens": n_text_tokens, "blank_rows_skipped": skipped.get(split, 0)}
            if not packed:
                stats[split]["truncated_lines"] = int(np.sum(lengths >= a.max_length))
            if split != "train":  # fixed masks: the same tokens are predicted in every evaluation
                enc, n_masked = mlm.fixed_eval_masks(enc, special_ids, a.mlm_probability, tok.mask_token_id,
                                                     len(tok), a.eval_mask_seed, a.whole_word_mask)
                if n_masked == 0:
                    raise UserError(f"the evaluation text ({where.get(split, 'held-out lines')}) is too short "
                                    f"for any token to be masked at --mlm_probability {a.mlm_probability}; pass "
                                    "more evaluation text.")
                stats[split]["masked_tokens"] = n_masked
            out[split] = enc
        if args.max_train_samples and "train" in out:
            out["train"] = out["train"].select(range(min(args.max_train_samples, len(out["train"]))))
        origins = split_origins(where, rows, ctx.split, ctx.split.seed if ctx.split else args.seed, a.validation_split,
                                max_train_samples=args.max_train_samples)
        logger.info(data_block(f"{source_name(a)}: {columns}", {s: f"{st['texts']} texts -> {len(out[s])} " + (
            f"{'blocks' if packed else 'lines'}, {st['tokens']} tokens" + (
                f" ({st['masked_tokens']} masked for evaluation)" if s != "train" else "")) for s, st in stats.items()},
            origins, ctx.split, args.seed))
        info = {"source": source_name(a), "mode": "packed" if packed else "line_by_line", "max_length": a.max_length,
                "mlm_probability": a.mlm_probability, "whole_word_mask": a.whole_word_mask,
                "eval_mask_seed": a.eval_mask_seed, "splits": stats,
                "derived_splits": ["validation"] if "validation" in rows else [],
                "tokenization_cached": {s: ctx.timings[f"tokenize_{s}_cached"] for s in out}}
        return PreparedData(train=out.get("train"), eval=out.get("validation"), test=out.get("test"), info=info,
                            identity={"mode": info["mode"], "max_length": a.max_length,
                                      "whole_word_mask": a.whole_word_mask})

    def build_model(self, ctx: Context, data: PreparedData) -> BuiltModel:
        from transformers import AutoModelForMaskedLM

        built = load_pretrained(AutoModelForMaskedLM, ctx.model_args)
        rows = built.model.get_input_embeddings().num_embeddings
        if len(ctx.tokenizer) > rows:
            raise UserError(f"the tokenizer has {len(ctx.tokenizer)} tokens but the model's embedding has {rows} rows; "
                            "use the model's own tokenizer.")
        head_new = mlm.head_is_new(built.model, built.new_weights)
        if head_new and not ctx.resume_from:  # resuming: the head comes from the checkpoint
            logger.warning("'%s' has no trained MLM head (%s newly initialised): the initial perplexity is that "
                           "of a random head; training fits it", ctx.model_args.model, ", ".join(head_new))
        built.state = MlmModelState(head_new, bool(getattr(built.model.config, "tie_word_embeddings", False)))
        return built

    def objective(self, ctx, data, built):
        a, args, tok = ctx.data_args, ctx.args, ctx.tokenizer
        static = ctx.accelerator.distributed_type == "XLA" or args.torch_compile
        if static and not a.full_decoder:
            logger.info("decoder on every position (XLA/--torch_compile need static shapes)")
        graph = not isinstance(built.model, torch.nn.Module)  # an ONNX graph (onnx_predict.py): every position's logits
        return MlmObjective(built.model, sorted(set(tok.all_special_ids)), tok.mask_token_id, len(tok),
                            a.mlm_probability, a.whole_word_mask, a.full_decoder or static or graph,
                            built.state is not None and built.state.tied, a.line_by_line)

    def extra_results(self, ctx, data, built, results: dict, trainer) -> dict:
        before = trainer.state.initial_eval.get("perplexity")
        after = results.get("eval", {}).get("perplexity")
        ppl = {"before": before, "after": after, "reduction": before / after if before and after else None}
        head = built.state.head_new
        return {"perplexity": ppl, "mlm": {
            "trained_head_in_checkpoint": not head, "newly_initialised_head": head,
            "decoder_tied_to_embeddings": mlm.decoder_tied(ctx.accelerator.unwrap_model(trainer.model)),
            "decoder": "all positions" if trainer.objective.full_decoder else "masked positions only"}}

    def after_save(self, ctx, data, built, output_dir) -> dict:
        """Copy the checkpoint's pre-trained pooler into the saved model (see mlm.carry_pooler)."""
        carried = mlm.carry_pooler(ctx.model_args, built.unexpected_keys, built.model.base_model_prefix, output_dir)
        if carried:
            logger.info("kept the checkpoint's pre-trained pooler (%s) in %s for classifiers started from it",
                        ", ".join(carried), output_dir)
        return {"mlm": {"pooler_kept": carried}}

    def model_card(self, ctx, data):
        return {"labels": None, "example": f"print(pipe('Paris is the {ctx.tokenizer.mask_token} of France.'))"}


class MlmObjective(Objective):
    """Training batches are masked on the device, per micro-batch, from the loop's seeded RNG
    (prepare_batch); evaluation batches carry their fixed masks. The loss is summed over predicted
    tokens and divided by their count across the accumulation window and all processes."""
    default_metric, metric_names = "perplexity", MLM_METRICS
    eval_pad_values: dict = {}

    def __init__(self, model, special_ids, mask_id, vocab_size, probability, whole_word, full_decoder, tied,
                 line_by_line=False):
        self.line_by_line = line_by_line
        self.special = torch.tensor(special_ids, dtype=torch.long)
        self.mask_id, self.vocab_size, self.probability = mask_id, vocab_size, probability
        self.whole_word, self.full_decoder, self.tied = whole_word, full_decoder, tied
        self.decoder = None if full_decoder else mlm.MaskedPositionsOnly(model)

    def after_prepare(self, model) -> None:
        """Prepared models must keep the decoder tied to the input embeddings (moving to XLA unties it)."""
        if self.tied and not mlm.decoder_tied(model):
            model.tie_weights()
            logger.info("re-tied the decoder to the input embeddings after prepare()")
        if self.tied and not mlm.decoder_tied(model):
            raise UserError("the model's decoder could not be tied to its input embeddings after prepare().")

    def prepare_batch(self, batch: dict) -> dict:
        if "labels" in batch:
            return batch
        ids = batch["input_ids"]
        special = torch.isin(ids, self.special.to(ids.device))
        masked, labels = mlm.mask_tokens(ids, special, self.probability, self.mask_id, self.vocab_size,
                                       batch.get("word_start") if self.whole_word else None)
        return {"input_ids": masked, "attention_mask": batch["attention_mask"], "labels": labels}

    def count_items(self, batch):
        return (batch["labels"] != -100).sum().to(torch.float64)

    def total_items(self, dataset) -> Optional[float]:
        """Expected masked tokens per epoch for --line_by_line (lines of all lengths, grouped by the
        sampler); None for packed blocks, whose per-batch count is already the mean."""
        if not self.line_by_line:
            return None
        ids = flat_values(dataset, "input_ids")
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
        index, targets = mlm.masked_positions(labels)
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


TASK = MlmTask()


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Entry point; `argv` as a list of strings (notebooks: notebook_launcher(main, (argv,)))."""
    return launch(TASK, argv)


if __name__ == "__main__":
    run_cli(main)
