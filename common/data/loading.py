"""Loading splits from local files or the Hub, validating them, splitting, and tokenizing once (cached).

Local files are read with pandas (csv, tsv, json, jsonl, parquet) so that every problem can be
reported with the file, column and row; task-specific readers (CoNLL, plain text) live with
their task and return the same `datasets.Dataset` shape.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import datasets
import numpy as np
import pandas as pd

from .. import hub, progress
from ..errors import UserError, closest, fmt_columns
from ..files import check_file, file_extension, first_line, local_file, read_text  # noqa: F401 (re-exported)
from .validate import is_missing  # noqa: F401 (re-exported)

TABLE_EXTENSIONS = (".csv", ".tsv", ".json", ".jsonl", ".parquet")
CACHE_VERSION = "1"  # bump when tokenization code changes what it writes


def flat_values(dataset, column: str):
    """All values of a list-valued column as one pyarrow array (respects a select()/shard() mapping)."""
    import pyarrow.compute as pc

    return pc.list_flatten(dataset.select_columns([column]).with_format("arrow")[:][column])


def column_arrays(dataset, *columns: str) -> dict[str, np.ndarray]:
    """Columns of single values as NumPy arrays, read in one Arrow pass (respects a select()/shard() mapping):
    `dataset[column]` makes one Python object per row, ~40x slower (0.15 s a column of CoNLL-2003's training
    windows)."""
    table = dataset.select_columns(list(columns)).with_format("numpy")[:]
    return {c: table[c] for c in columns}


DELIMITER_NAMES = {",": "','", ";": "';'", "\t": "tab", "|": "'|'"}


def read_table(path: str, flag: str, encoding: str = "utf-8", column_names: Optional[Sequence[str]] = None,
               delimiter: Optional[str] = None) -> pd.DataFrame:
    """Read a csv/tsv/json/jsonl/parquet file (or a tab-separated .txt, like the MSR paraphrase corpus),
    possibly compressed, into a DataFrame, with one clear error per failure. csv/tsv files without a
    header row take their names from `column_names`; one whose first row looks like data is refused, and so
    is a header whose names repeat or that reads as one column split by another delimiter than `delimiter`
    (default: ',' for .csv, tab for .tsv)."""
    ext = check_file(path, flag, TABLE_EXTENSIONS + (".txt",))
    if ext == ".txt":
        if "\t" not in first_line(path, flag, encoding):
            raise UserError(f"{flag} '{path}' is a .txt file without tab-separated columns in its first line; "
                            "give the table as .csv, .tsv, .json, .jsonl or .parquet.")
        ext = ".tsv"
    if column_names and ext not in (".csv", ".tsv"):
        raise UserError(f"--column_names is for csv/tsv files without a header row; {flag} '{path}' is {ext[1:]}, "
                        "whose field names are in the file.")
    local = local_file(path, flag)
    sep = delimiter or ("\t" if ext == ".tsv" else ",")
    try:
        if ext in (".csv", ".tsv"):
            text = read_text(path, flag, encoding)
            if not column_names:
                _check_header(text, sep, ext, flag, path, delimiter is not None)
            # TSVs in the GLUE style contain bare quotes inside text: read them without quoting.
            kw = dict(sep=sep, quoting=csv.QUOTE_NONE) if ext == ".tsv" else dict(sep=sep)
            header = dict(header=None) if column_names else {}
            df = pd.read_csv(io.StringIO(text), keep_default_na=False, na_values=[""], dtype=str, **header, **kw)
        elif ext in (".jsonl", ".json"):
            df = _read_json(read_text(path, flag, encoding), ext, flag, path)
        else:
            df = pd.read_parquet(local)
    except UserError:
        raise
    except (pd.errors.ParserError, ValueError) as err:
        msg = " ".join(str(err).split())
        raise UserError(f"{flag} '{path}' could not be parsed as {ext[1:]}: {msg[:300]}.") from None
    except pd.errors.EmptyDataError:
        raise UserError(f"{flag} '{path}' has no columns (is it empty?).") from None
    except Exception as err:  # e.g. pyarrow errors for parquet
        raise UserError(f"{flag} '{path}' could not be read as {ext[1:]}: {type(err).__name__}: {err}.") from None
    if column_names:
        if df.shape[1] != len(column_names):
            raise UserError(f"{flag} '{path}' has {df.shape[1]} columns but --column_names gives "
                            f"{len(column_names)} names ({' '.join(column_names)}); give one name per column.")
        df.columns = list(column_names)
    else:
        df.columns = [str(c).strip() for c in df.columns]
    if len(df) == 0:
        raise UserError(f"{flag} '{path}' has a header but no rows." if ext in (".csv", ".tsv") else
                        f"{flag} '{path}' holds no records.")
    return df


def _check_header(text: str, sep: str, ext: str, flag: str, path: str, explicit: bool) -> None:
    """The header row of a csv/tsv, in this order: a header that is one field with another delimiter in it
    means the file was saved with that delimiter (a ;-separated 'csv' from Excel); a first row that looks like
    data means there is no header (--column_names, with the count); names must not repeat (and a repeat may
    also mean the row is data, so both fixes are named)."""
    line = text.lstrip("\r\n").split("\n", 1)[0].rstrip("\r")  # pandas skips blank lines before the header
    if ext == ".tsv":
        names = line.split(sep)
    else:
        names = next(csv.reader([line], delimiter=sep), [])
    names = [n.strip() for n in names]
    _check_delimiter(line, names, sep, ext, flag, path, explicit)
    why = header_looks_like_data(names)
    if why:
        raise UserError(f"{flag} '{path}' seems to have no header row: its first row looks like data, not column "
                        f"names ({why}); name the columns with --column_names NAME1 NAME2 ... ({len(names)} names).")
    repeated = sorted({n for n in names if n and names.count(n) > 1})
    if repeated:
        raise UserError(f"{flag} '{path}': column '{repeated[0]}' appears twice in the header row; if that row is the "
                        "header, rename one of them so that every column has its own name; if it is data (the file "
                        f"has no header row), name the columns with --column_names NAME1 NAME2 ... ({len(names)} "
                        "names).")


def _check_delimiter(line: str, names: list, sep: str, ext: str, flag: str, path: str, explicit: bool) -> None:
    """A header read as one column that holds another delimiter: the file was saved with that one."""
    if len(names) == 1 and not explicit:
        found = [d for d in DELIMITER_NAMES if d != sep and d in line]
        if found:
            d = found[0]
            suggestion = "--delimiter tab (or name the file .tsv)" if d == "\t" else (
                "--delimiter ','" + (" (or name the file .csv)" if ext == ".tsv" else "") if d == "," else
                f"--delimiter '{d}'")
            raise UserError(f"{flag} '{path}' reads as one column '{line[:50]}': its header is separated by "
                            f"{DELIMITER_NAMES[d]}, not {DELIMITER_NAMES.get(sep, repr(sep))}; pass {suggestion}.")


def _read_json(text: str, ext: str, flag: str, path: str) -> pd.DataFrame:
    """A list of records, a dict of columns (or {"data": [...]}), or JSON lines (one object per line; a bad
    line is reported with its number)."""
    obj, whole_error = None, None
    if ext == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            whole_error = err  # maybe JSON lines named .json
    if obj is None:
        records = []
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as line_error:
                # a .json file that is neither JSON nor JSON lines: report the error of the whole document
                bad = whole_error or line_error
                number = whole_error.lineno if whole_error else number
                raise UserError(f"{flag} '{path}' could not be parsed as {ext[1:]}: line {number}, column {bad.colno}: "
                                f"{bad.msg}; fix that line.") from None
            if not isinstance(record, dict):
                raise UserError(f"{flag} '{path}', line {number}: a JSON {type(record).__name__}, not an object; "
                                "JSON lines files hold one object per line.")
            records.append(record)
        return pd.DataFrame.from_records(records)
    if isinstance(obj, dict) and "data" in obj and isinstance(obj["data"], list):
        obj = obj["data"]
    if isinstance(obj, dict):
        lengths = {k: len(v) if isinstance(v, list) else None for k, v in obj.items()}
        if not obj or any(n is None for n in lengths.values()):
            raise UserError(f"{flag} '{path}' holds one object of single values; expected a list of records "
                            '([{"text": ..., "label": ...}, ...]), a dict of columns (lists), or one object per line.')
        if len(set(lengths.values())) > 1:
            shown = ", ".join(f"'{k}': {n}" for k, n in list(lengths.items())[:5])
            raise UserError(f"{flag} '{path}' is a dict of columns of different lengths ({shown}); every column "
                            "needs one value per row.")
        obj = pd.DataFrame(obj).to_dict("records")
    if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
        raise UserError(f"{flag} '{path}' must hold a list of records (objects), "
                        "a dict of columns, or one JSON object per line.")
    return pd.DataFrame.from_records(obj)


_FILE_NAME = re.compile(r"^[\w.\-/\\]+\.(txt|jpe?g|png|gif|wav|mp3|flac|csv|tsv|json|html?|pdf|xml)$", re.I)


def header_looks_like_data(columns: Sequence[str]) -> Optional[str]:
    """Why a csv/tsv header row looks like a data row (None if it looks like column names)."""
    names = [str(c) for c in columns]
    for name in names:
        try:
            float(name.replace(",", ""))
            return f"'{name}' is a number"
        except ValueError:
            pass
    renamed = [n for n in names if re.fullmatch(r"(.+)\.\d+", n) and re.fullmatch(r"(.+)\.\d+", n).group(1) in names]
    if renamed:
        return f"'{renamed[0]}' repeats an earlier name"
    for name in names:
        if _FILE_NAME.match(name):
            return f"'{name}' is a file name"
        if len(name) > 60 or len(name.split()) > 6:
            return f"'{name[:40]}...' is a sentence" if len(name) > 40 else f"'{name}' is a sentence"
    return None


def load_hub_splits(name: str, config: Optional[str], cache_dir: Optional[str], revision: str = "main",
                    trust_remote_code: bool = False) -> dict[str, datasets.Dataset]:
    what = f"--dataset '{name}'{f' (config {config!r})' if config else ''}"
    offline = hub.unreachable() if hub.is_hub_id(name) else None
    saved = datasets.config.HF_HUB_OFFLINE
    try:
        datasets.config.HF_HUB_OFFLINE = saved or offline is not None  # the local cache only: no retries
        ds = datasets.load_dataset(name, config, cache_dir=cache_dir, revision=revision)
    except Exception as err:  # offline, unknown name, missing config: the library's message says which
        if offline is not None:
            raise UserError(f"{what} could not be loaded: the Hugging Face Hub is not reachable ({offline}) and the "
                            "data set is not in the local cache; pass local files with --train_file/--validation_file "
                            "(see docs/data-formats.md).") from None
        first = " ".join(str(err).split())[:300]
        raise UserError(f"{what} could not be loaded: {first}. Check the name, or pass local files with "
                        "--train_file.") from None
    finally:
        datasets.config.HF_HUB_OFFLINE = saved
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
    if a.dataset:
        return f"{a.dataset}/{a.dataset_config}" if a.dataset_config else a.dataset
    return os.path.basename(a.train_file or a.validation_file or a.test_file)


def tokenize_split(ctx, split: str, raw: datasets.Dataset, fn: Callable[[dict], dict], key_parts: Sequence,
                   remove_columns: Sequence[str]) -> datasets.Dataset:
    """tokenize_cached with the run's settings, announced (start and end lines; datasets' bar for a large
    file where bars show); records whether `split` came from the cache in ctx.timings."""
    a = ctx.data_args
    with progress.phase(f"tokenizing {split}", f"{len(raw):,} rows") as step, progress.library_bars(len(raw)):
        res = tokenize_cached(raw, fn, key_parts, ctx.accelerator, remove_columns=remove_columns,
                              num_proc=a.preprocessing_num_workers, overwrite=a.overwrite_cache,
                              desc=f"Tokenizing {split}")
        step.note = "from the cache" if res.from_cache else ""
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


def split_indices(n: int, fraction: float, seed: int, stratify: Optional[Sequence] = None,
                  flag: str = "a split fraction", what: str = "examples") -> tuple[np.ndarray, np.ndarray]:
    """Seeded (stratified when labels are given and every class has ≥ 2 members) split of range(n)."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(n)
    n_take = int(round(n * fraction))
    if n_take < 1 or n_take >= n:
        side = "the held-out part" if n_take < 1 else "the training part"
        raise UserError(f"{flag} {fraction} of {n} {what} leaves {side} empty; use a fraction that leaves at least one "
                        f"on each side, or pass the file (e.g. --validation_file) instead.")
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
        # new_fingerprint: the cache key already names the data and the encoding; left to datasets, it would hash
        # `fn` by pickling what it holds (the tokenizer), a tenth of a second for every tokenized split
        out = raw.map(fn, batched=True, remove_columns=list(remove_columns), num_proc=num_proc,
                      desc=desc, load_from_cache_file=False, keep_in_memory=True, new_fingerprint=key)
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

