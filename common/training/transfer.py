"""Distillation's transfer set: the training examples, TinyBERT's augmented variants of them (--distill_augment N)
and unlabelled text (--distill_unlabeled_file), tokenized like the training set, for the teacher to label
(docs/distillation.md).

The set is built at the level of the task's training *pool* (the tokenized training file: data.train is a
selection of it), once per pool, teacher and settings, so every seed and k-fold fold of a job reuses it:

    pool rows (gold = 1)  +  variants of every pool row (gold = 0)  +  unlabelled rows (gold = 0, row_id -1)

A run trains on its own originals, their variants and all the unlabelled rows (a fold never sees the variants of
its held-out rows); `Transfer.index` maps each of its rows to the pool-level row whose teacher logits it uses.
Variants are drawn by `data.augment.Augmenter` and written to the cache in chunks as they are made (each chunk
of 256 examples is built by one process, round-robin, and gathered in order, so any number of processes writes
the same file); the tokenized rows are a datasets Arrow file next to it. Nothing here writes into output_dir.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .. import progress
from ..errors import UserError
from ..files import honour_umask
from ..log import logger
from .models import byte_level, file_sha256, load_pretrained, load_tokenizer, model_fingerprint
from .runtime import on_every_process

VERSION = "1"  # bump when what the cached variants hold changes
CHUNK = 256    # examples per augmentation chunk (one process, one gather)
SAMPLES = "augment_samples.txt"
HEAD_PREFIXES = ("cls.", "lm_head.", "vocab_", "generator_", "predictions.")


@dataclass
class Transfer:
    pool: object                 # the pool-level set (datasets.Dataset with "gold"): what the teacher labels
    train: object                # this run's rows of it
    index: np.ndarray            # this run's row i is pool-level row index[i]
    info: dict = field(default_factory=dict)
    samples: str = ""            # variants for a person to read (augment_samples.txt)


def wanted(args) -> bool:
    return bool(args.distill_augment or args.distill_unlabeled_file)


def cache_folder() -> str:
    import datasets

    return os.path.join(datasets.config.HF_DATASETS_CACHE, "bert_finetune_transfer")


def _sha(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:24]


def file_fingerprint(path: str) -> str:
    h = hashlib.sha256()
    file_sha256(path, h)
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# The masked LM
# ---------------------------------------------------------------------------------------------

def augment_model(args) -> tuple[str, str]:
    """(name, flag) of the masked LM: --augment_model, by default the teacher."""
    return (args.augment_model, "--augment_model") if args.augment_model else (args.teacher_model, "--teacher_model")


def load_augmenter(ctx):
    """The masked LM of --augment_model (default: the teacher), checked to have a trained MLM head."""
    import transformers

    from ..data.augment import Augmenter

    args = ctx.args
    name, flag = augment_model(args)
    built = load_pretrained(transformers.AutoModelForMaskedLM, ctx.model_args, name=name, flag=flag)
    head = [k for k in built.untrained if k.startswith(HEAD_PREFIXES)]
    if head:
        what = "the teacher " if not args.augment_model else ""
        raise UserError(f"--distill_augment needs a masked LM to propose replacements, but {what}{flag} '{name}' has "
                        f"no trained MLM head ({head[0]} is missing); pass --augment_model with one: a train_mlm.py "
                        "output folder, or a pretrained masked LM such as bert-base-uncased.")
    tokenizer = load_tokenizer(ctx.model_args, name, flag)
    if byte_level(tokenizer):  # words are encoded one by one: each with its leading space, as inside a text
        tokenizer = load_tokenizer(ctx.model_args, name, flag, add_prefix_space=True)
    if tokenizer.mask_token_id is None:
        raise UserError(f"{flag} '{name}' has no mask token; --augment_model must be a masked LM (BERT, RoBERTa, ...).")
    model = built.model.eval().requires_grad_(False).to(ctx.accelerator.device)
    return Augmenter(model, tokenizer, args.augment_top_k, ctx.accelerator.autocast,
                     max_length=min(512, getattr(model.config, "max_position_embeddings", 512)),
                     passes=args.augment_passes)


# ---------------------------------------------------------------------------------------------
# Variants, written as they are made
# ---------------------------------------------------------------------------------------------

def _mark(words: list, original: list) -> str:
    return " ".join(f"[{w}]" if w != o else w for w, o in zip(words, original))


def build_variants(ctx, source, row_ids: np.ndarray, path: str, augmenter, seed: int) -> dict:
    """Variants of every pool row into the parquet file `path` (columns source, variant, field_<i>), chunk by
    chunk; collective (every process builds its chunks, all gather them, each machine's main process writes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from accelerate.utils import gather_object

    acc, args = ctx.accelerator, ctx.args
    nf = len(source.fields)
    chunks = [row_ids[i:i + CHUNK] for i in range(0, len(row_ids), CHUNK)]
    world, rank = acc.num_processes, acc.process_index
    rounds = (len(chunks) + world - 1) // world
    schema = pa.schema([("source", pa.int64()), ("variant", pa.int64())] +
                       [(f"field_{j}", pa.list_(pa.string())) for j in range(nf)])
    tmp = f"{path}.tmp-{os.getpid()}"
    writer = pq.ParquetWriter(tmp, schema) if acc.is_local_main_process else None
    made = 0
    try:
        for r in progress.track(range(rounds), "augmenting", unit="chunk"):
            c = r * world + rank
            mine = []
            if c < len(chunks):
                ids = chunks[c].tolist()
                rows = source.row_words(ids)
                for rid, variants in zip(ids, augmenter.augment(rows, args.distill_augment, args.augment_prob, seed)):
                    mine.extend((rid, v, fields) for v, fields in enumerate(variants))
            got = gather_object([mine]) if world > 1 else [mine]
            for part in got:
                made += len(part)
                if writer is not None and part:
                    cols = {"source": [p[0] for p in part], "variant": [p[1] for p in part]}
                    for j in range(nf):
                        cols[f"field_{j}"] = [p[2][j] for p in part]
                    writer.write_table(pa.table(cols, schema=schema))
        if writer is not None:
            writer.close()
            writer = None
            honour_umask(tmp)
            os.replace(tmp, path)
    finally:
        if writer is not None:
            writer.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
    stats = dict(augmenter.stats)
    if world > 1:  # every process counted its own sentences
        stats = {k: int(sum(s[k] for s in gather_object([stats]))) for k in stats}
    acc.wait_for_everyone()
    return {"variants": made, "sentences": stats["sentences"], "words": stats["words"],
            "words_from_masked_lm": stats["masked_lm"], "masked_copies": stats["masked_copies"],
            "words_from_embeddings": stats["embedding"],
            "words_never_replaced": stats["none"]}


def samples_text(source, pool_rows: list, variants, n_rows: int = 12, per_row: int = 4) -> str:
    """The first rows' variants, replaced words in [brackets], for a person to judge."""
    lines = ["# TinyBERT-style variants (replaced words in [brackets]); the teacher labels every one.", ""]
    by_source: dict = {}
    for s, fields in zip(variants["source"], zip(*(variants[f"field_{j}"] for j in range(len(source.fields))))):
        if len(by_source) >= n_rows and s not in by_source:
            break
        by_source.setdefault(s, []).append(fields)
    originals = source.row_words(list(by_source))
    for (s, vs), orig in zip(by_source.items(), originals):
        lines.append(f"row {s}:")
        for j, name in enumerate(source.fields):
            lines.append(f"  original {name}: {' '.join(orig[j])}")
        for k, fields in enumerate(vs[:per_row]):
            for j, name in enumerate(source.fields):
                lines.append(f"  variant {k + 1} {name}: {_mark(list(fields[j]), orig[j])}")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The transfer set
# ---------------------------------------------------------------------------------------------

def build(task, ctx, data) -> Transfer:
    """The pool-level transfer set (cached) and this run's selection of it. Collective; before any file is
    written to output_dir; bad input (an unlabelled file, an augment model without an MLM head) is refused."""
    import datasets

    args, acc = ctx.args, ctx.accelerator
    source = data.transfer
    if source is None:
        raise UserError(f"--distill_augment/--distill_unlabeled_file are not available for {task.name or 'this task'}.")
    started = time.perf_counter()
    # --augment_seed and each example's words seed the draw, never --seed: every seed and fold of a job, and single
    # runs with other seeds, train on the same transfer set and reuse its cache (its teacher logits too)
    seed = args.augment_seed
    pool = source.pool
    pool_rows = np.asarray(pool["row_id"])
    row_ids = pool_rows[np.sort(np.unique(pool_rows, return_index=True)[1])]  # each example once, pool order
    unlabeled = source.read_unlabeled(args.distill_unlabeled_file) if args.distill_unlabeled_file else []
    info: dict = {"pool_examples": int(len(row_ids)), "seed": seed}
    os.makedirs(cache_folder(), exist_ok=True)
    parts, cache_hits = [], {}
    samples = ""
    if args.distill_augment:
        t0 = time.perf_counter()
        aug_name, aug_flag = augment_model(args)
        aug_fp = model_fingerprint(aug_name, ctx.model_args)
        words_fp = hashlib.sha256(json.dumps(source.row_words(row_ids.tolist())).encode()).hexdigest()[:16]
        key = _sha(VERSION, aug_fp, words_fp, args.distill_augment, args.augment_top_k, args.augment_prob, seed,
                   acc.mixed_precision, acc.device.type, args.augment_passes)
        path = os.path.join(cache_folder(), f"variants-{key}.parquet")
        if ctx.data_args.overwrite_cache and acc.is_local_main_process and os.path.isfile(path):
            os.unlink(path)
        acc.wait_for_everyone()
        hit = on_every_process(acc, os.path.isfile(path))
        stats = {}
        if not hit:  # the masked LM is loaded only to build them
            with progress.phase("loading the masked LM for augmentation", aug_name):
                augmenter = load_augmenter(ctx)
            with progress.phase("augmenting the training examples",
                                f"{len(row_ids):,} examples x {args.distill_augment} variants"):
                stats = build_variants(ctx, source, row_ids, path, augmenter, seed)
            del augmenter
        variants = datasets.Dataset.from_parquet(path, cache_dir=os.path.join(cache_folder(), "arrow"))
        info["augment"] = {"model": aug_name, "model_fingerprint": aug_fp, "n": args.distill_augment,
                           "top_k": args.augment_top_k, "prob": args.augment_prob, "passes": args.augment_passes,
                           "key": key, "cache_hit": hit,
                           "variants": len(variants), "seconds": round(time.perf_counter() - t0, 2),
                           "file_mb": round(os.path.getsize(path) / 2**20, 2), **stats}
        cache_hits["variants"] = hit
        parts.append(variants)
        samples = samples_text(source, row_ids.tolist(), variants[: min(len(variants), 400)])
    if unlabeled:
        cols = {"source": [-1] * len(unlabeled), "variant": [0] * len(unlabeled)}
        for j in range(len(source.fields)):
            cols[f"field_{j}"] = [r[j] for r in unlabeled]
        parts.append(datasets.Dataset.from_dict(cols))
        info["unlabeled"] = {"file": args.distill_unlabeled_file, "rows": len(unlabeled),
                             "sha256": file_fingerprint(args.distill_unlabeled_file)}

    # tokenized like the training set (the task's own encoding), an Arrow file keyed by what goes in
    t0 = time.perf_counter()
    extra = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    nf = len(source.fields)
    tok_key = _sha(VERSION, pool._fingerprint, info.get("augment", {}).get("key"),
                   info.get("unlabeled", {}).get("sha256"))
    tok_path = os.path.join(cache_folder(), f"tokenized-{tok_key}.arrow")

    def encode(batch):
        rows = [list(r) for r in zip(*(batch[f"field_{j}"] for j in range(nf)))]
        return source.encode(rows, list(batch["source"]))

    with acc.local_main_process_first():
        hit = os.path.isfile(tok_path) and not ctx.data_args.overwrite_cache
        extra = extra.map(encode, batched=True, batch_size=1000, remove_columns=extra.column_names,
                          cache_file_name=tok_path, load_from_cache_file=not ctx.data_args.overwrite_cache,
                          desc="tokenizing the transfer set")
    cache_hits["tokenized"] = hit
    extra = extra.select_columns(pool.column_names).cast(pool.features)
    transfer_pool = datasets.concatenate_datasets([
        pool.add_column("gold", np.ones(len(pool), dtype=np.int64).tolist()),
        extra.add_column("gold", np.zeros(len(extra), dtype=np.int64).tolist())])
    info["tokenize_seconds"] = round(time.perf_counter() - t0, 2)

    # this run's rows: its originals, their variants, every unlabelled row
    train_rows = np.unique(np.asarray(data.train["row_id"]))
    all_rows = np.asarray(transfer_pool["row_id"])
    index = np.flatnonzero(np.isin(all_rows, train_rows) | (all_rows == -1))
    train = transfer_pool.select(index)
    gold = np.asarray(train["gold"], dtype=bool)
    info.update(pool_rows=len(transfer_pool), originals=int(gold.sum()),
                variants=int(((~gold) & (np.asarray(train["row_id"]) >= 0)).sum()),
                unlabeled_rows=int((np.asarray(train["row_id"]) == -1).sum()), rows_per_epoch=len(train),
                cache_hits=cache_hits, build_seconds=round(time.perf_counter() - started, 2))
    info["tokenized_mb"] = round(sum(os.path.getsize(f["filename"]) for f in extra.cache_files
                                     if os.path.isfile(f["filename"])) / 2**20, 2)
    logger.info("transfer set: %d original rows + %d variants + %d unlabelled rows = %d rows per epoch "
                "(%.1fx the training set); built in %.1f s", info["originals"], info["variants"],
                info["unlabeled_rows"], len(train), len(train) / max(1, info["originals"]), info["build_seconds"])
    return Transfer(transfer_pool, train, index, info, samples)


def identity(info: dict) -> Optional[dict]:
    """What a resume must match: the variants' key and the unlabelled file's hash."""
    return {"augment": (info.get("augment") or {}).get("key"), "unlabeled": (info.get("unlabeled") or {}).get("sha256")}
