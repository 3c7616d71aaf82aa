"""Loading splits from local files or the Hub, validating them, splitting, and tokenizing once (cached).

Local files are read with pandas (csv, tsv, json, jsonl, parquet) so that every problem can be
reported with the file, column and row; task-specific readers (CoNLL, plain text) live with
their task and return the same `datasets.Dataset` shape.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import datasets
import numpy as np
import pandas as pd

from .errors import UserError, closest, fmt_columns

TABLE_EXTENSIONS = (".csv", ".tsv", ".json", ".jsonl", ".parquet")
CACHE_VERSION = "1"  # bump when tokenization code changes what it writes


def file_extension(path: str) -> str:
    lower = path.lower()
    for ext in (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt", ".conll", ".tokens"):
        if lower.endswith(ext):
            return ext
    return os.path.splitext(lower)[1]


def check_file(path: str, flag: str, allowed: Sequence[str]) -> str:
    if not os.path.exists(path):
        raise UserError(f"{flag} '{path}' does not exist.")
    if os.path.isdir(path):
        raise UserError(f"{flag} '{path}' is a directory; pass a file.")
    ext = file_extension(path)
    if ext not in allowed:
        raise UserError(f"{flag} '{path}' has an unsupported extension '{ext or '(none)'}'; "
                        f"use one of {', '.join(allowed)}.")
    if os.path.getsize(path) == 0:
        raise UserError(f"{flag} '{path}' is empty.")
    return ext


def flat_values(dataset, column: str):
    """All values of a list-valued column as one pyarrow array (respects a select()/shard() mapping)."""
    import pyarrow.compute as pc

    return pc.list_flatten(dataset.select_columns([column]).with_format("arrow")[:][column])


def read_table(path: str, flag: str) -> pd.DataFrame:
    """Read a csv/tsv/json/jsonl/parquet file (or a tab-separated .txt, like the MSR paraphrase corpus)
    into a DataFrame, with one clear error per failure."""
    ext = check_file(path, flag, TABLE_EXTENSIONS + (".txt",))
    if ext == ".txt":
        with open(path, "rb") as fh:
            header = fh.readline()
        if b"\t" not in header:
            raise UserError(f"{flag} '{path}' is a .txt file without tab-separated columns in its first line; "
                            "give the table as .csv, .tsv, .json, .jsonl or .parquet.")
        ext = ".tsv"
    try:
        if ext in (".csv", ".tsv"):
            # TSVs in the GLUE style contain bare quotes inside text: read them without quoting.
            kw = dict(sep="\t", quoting=csv.QUOTE_NONE) if ext == ".tsv" else dict(sep=",")
            df = pd.read_csv(path, encoding="utf-8-sig", keep_default_na=False, na_values=[""],
                             dtype=str, **kw)
        elif ext == ".jsonl":
            df = pd.read_json(path, lines=True, encoding="utf-8", dtype=False)
        elif ext == ".json":
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
            try:
                obj = json.loads(text)
            except json.JSONDecodeError:
                df = pd.read_json(path, lines=True, encoding="utf-8", dtype=False)  # JSON lines named .json
            else:
                if isinstance(obj, dict) and "data" in obj and isinstance(obj["data"], list):
                    obj = obj["data"]
                if isinstance(obj, dict):
                    obj = pd.DataFrame(obj).to_dict("records")
                if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
                    raise UserError(f"{flag} '{path}' must hold a list of records (objects), "
                                    "a dict of columns, or one JSON object per line.")
                df = pd.DataFrame.from_records(obj)
        else:
            df = pd.read_parquet(path)
    except UserError:
        raise
    except UnicodeDecodeError as err:
        raise UserError(f"{flag} '{path}' is not UTF-8 text (bad byte at position {err.start}); "
                        "re-save it as UTF-8.") from None
    except (pd.errors.ParserError, ValueError) as err:
        msg = " ".join(str(err).split())
        raise UserError(f"{flag} '{path}' could not be parsed as {ext[1:]}: {msg[:300]}.") from None
    except pd.errors.EmptyDataError:
        raise UserError(f"{flag} '{path}' has no columns (is it empty?).") from None
    except Exception as err:  # e.g. pyarrow errors for parquet
        raise UserError(f"{flag} '{path}' could not be read as {ext[1:]}: {type(err).__name__}: {err}.") from None
    df.columns = [str(c).strip() for c in df.columns]
    if len(df) == 0:
        raise UserError(f"{flag} '{path}' has a header but no rows.")
    return df


def load_hub_splits(name: str, config: Optional[str], cache_dir: Optional[str], revision: str = "main",
                    trust_remote_code: bool = False) -> dict[str, datasets.Dataset]:
    try:
        kwargs = {"cache_dir": cache_dir, "revision": revision}
        ds = datasets.load_dataset(name, config, **kwargs)
    except Exception as err:  # offline, unknown name, missing config: the library's message says which
        first = " ".join(str(err).split())[:300]
        raise UserError(f"--dataset '{name}'{f' (config {config!r})' if config else ''} could not be loaded: "
                        f"{first}. Check the name, or pass local files with --train_file.") from None
    return dict(ds)


def read_hub_splits(a, cache_dir: Optional[str], names: dict[str, str]) -> tuple[dict, dict]:
    """Splits of the Hub dataset `a.dataset` by our split name (train/validation/test -> the Hub's name
    in `names`), and where each came from (for messages). The training split must exist."""
    hub = load_hub_splits(a.dataset, a.dataset_config, cache_dir)
    if names["train"] not in hub:
        raise UserError(f"--dataset '{a.dataset}' has no split '{names['train']}'; its splits are "
                        f"{fmt_columns(list(hub))} (set --train_split_name).")
    splits = {k: hub[v] for k, v in names.items() if v in hub}
    return splits, {k: f"split '{names[k]}' of --dataset '{a.dataset}'" for k in splits}


def source_name(a) -> str:
    """The data's name in results.json and the model card: the Hub dataset/config or the training file."""
    return f"{a.dataset}/{a.dataset_config}" if a.dataset else os.path.basename(a.train_file)


def tokenize_split(ctx, split: str, raw: datasets.Dataset, fn: Callable[[dict], dict], key_parts: Sequence,
                   remove_columns: Sequence[str]) -> datasets.Dataset:
    """tokenize_cached with the run's settings; records whether `split` came from the cache in ctx.timings."""
    a = ctx.data_args
    res = tokenize_cached(raw, fn, key_parts, ctx.accelerator, remove_columns=remove_columns,
                          num_proc=a.preprocessing_num_workers, overwrite=a.overwrite_cache, desc=f"Tokenizing {split}")
    ctx.timings[f"tokenize_{split}_cached"] = res.from_cache
    return res.dataset


def require_columns(columns: Sequence[str], wanted: Sequence[str], where: str, flag_of: dict[str, str]) -> None:
    for col in wanted:
        if col not in columns:
            raise UserError(f"{where} has no column '{col}' (from {flag_of.get(col, 'the column flags')})"
                            f"{closest(col, columns)}; its columns are {fmt_columns(columns)}.")


def first_bad_row(values: Sequence, bad: Callable[[object], bool]) -> Optional[int]:
    for i, v in enumerate(values):
        if bad(v):
            return i
    return None


def is_missing(v: object) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and np.isnan(v):
        return True
    return isinstance(v, str) and not v.strip()


def split_indices(n: int, fraction: float, seed: int,
                  stratify: Optional[Sequence] = None) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (stratified when labels are given and every class has ≥ 2 members) split of range(n)."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(n)
    n_take = int(round(n * fraction))
    if n_take < 1 or n_take >= n:
        raise UserError(f"a split fraction of {fraction} of {n} examples leaves one side empty; "
                        "use a different fraction or pass the file explicitly.")
    strat = None
    if stratify is not None:
        _, counts = np.unique(np.asarray(stratify), return_counts=True)
        if counts.min() >= 2 and n_take >= len(counts) and n - n_take >= len(counts):
            strat = np.asarray(stratify)
    keep, take = train_test_split(idx, test_size=n_take, random_state=seed, shuffle=True, stratify=strat)
    return np.sort(keep), np.sort(take)


# ---------------------------------------------------------------------------------------------
# Tokenization, once, cached on disk and memory-mapped
# ---------------------------------------------------------------------------------------------

def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode())
    h.update(repr((type(tokenizer).__name__, tokenizer.model_max_length, tokenizer.padding_side,
                   getattr(tokenizer, "add_prefix_space", None))).encode())
    return h.hexdigest()[:16]


def cache_root() -> str:
    return os.path.join(datasets.config.HF_DATASETS_CACHE, "bert_finetune_tokenized")


@dataclass
class TokenizeResult:
    dataset: datasets.Dataset
    from_cache: bool


def tokenize_cached(raw: datasets.Dataset, fn: Callable[[dict], dict], key_parts: Sequence, accelerator,
                    remove_columns: Sequence[str], num_proc: Optional[int] = None,
                    overwrite: bool = False, desc: str = "Tokenizing") -> TokenizeResult:
    """Tokenize `raw` with the batched `fn` once, cached on disk under a key of the data's and the
    tokenizer's fingerprints; every process then memory-maps the same Arrow files.

    The main process goes first (`main_process_first`); others find the cache ready. Writes go to a
    temporary folder renamed into place, so a killed run never leaves a half-written cache.
    """
    key = hashlib.sha256(json.dumps([CACHE_VERSION, raw._fingerprint, *map(str, key_parts)]).encode()).hexdigest()[:24]
    path = os.path.join(cache_root(), key)
    with accelerator.main_process_first():
        if overwrite and accelerator.is_main_process and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        if os.path.isfile(os.path.join(path, "COMPLETE")):
            return TokenizeResult(datasets.load_from_disk(path), True)
        out = raw.map(fn, batched=True, remove_columns=list(remove_columns), num_proc=num_proc,
                      desc=desc, load_from_cache_file=False, keep_in_memory=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            os.makedirs(cache_root(), exist_ok=True)
            out.save_to_disk(tmp)
            open(os.path.join(tmp, "COMPLETE"), "w").close()
            try:
                os.rename(tmp, path)
            except OSError:  # another process finished first
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            return TokenizeResult(out, False)  # cache not writable: keep going in memory
        return TokenizeResult(datasets.load_from_disk(path), False)

