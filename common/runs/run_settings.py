"""A trained model's data settings, reused where a run does not train.

`--model out/mrpc --no_do_train --test_file new.tsv` reads new.tsv the way the training run read its
files: the settings that describe the files' shape (columns, text pair, encoding, the names of a
headerless table's columns, delimiter, max length, ...: each script's `reused_settings`) come from
the model folder's training_args.yaml (written by reporting.save_resolved_config), unless a flag or
--config gives them. A setting is reused only where it fits the new files: a headerless table's
names only for files without a header row, a delimiter only for files of the training file's
extension, a non-UTF-8 encoding not for files that are UTF-8 text. export.py reads the same file.
"""
from __future__ import annotations

import csv
import dataclasses
import os
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Optional

import yaml

from ..data.loading import header_looks_like_data
from ..errors import UserError
from ..files import file_extension, first_line, local_file
from .reporting import RESOLVED

DATA_FILES = (("train_file", "--train_file"), ("validation_file", "--validation_file"), ("test_file", "--test_file"))
DELIMITED = (".csv", ".tsv", ".txt")  # tables whose first row may or may not be a header


def training_settings(model_dir: str) -> dict:
    """The resolved settings of the run that trained `model_dir` (its training_args.yaml); {} when the folder has
    none (a Hub id, a model saved by other code)."""
    path = os.path.join(model_dir, RESOLVED)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as fh:
            values = yaml.safe_load(fh) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UserError(f"--model '{model_dir}': its {RESOLVED} (the settings of the training run) is not readable "
                        f"YAML ({str(err).splitlines()[0]}); restore it, or delete it and give the data flags."
                        ) from None
    if not isinstance(values, dict):
        raise UserError(f"--model '{model_dir}': its {RESOLVED} does not hold a mapping of setting: value; restore "
                        "it, or delete it and give the data flags.")
    return values


@dataclass
class Reused:
    """What a run took from its model's training settings, for the log."""
    path: str                                     # the training_args.yaml read
    values: dict = field(default_factory=dict)    # setting -> value taken from it
    skipped: list = field(default_factory=list)   # "setting (why it does not fit these files)"

    def describe(self) -> str:
        taken = ", ".join(f"{k} {_show(v)}" for k, v in self.values.items()) or "nothing"
        line = f"settings of the training run reused from {self.path} (flags override them): {taken}"
        return line + (f"; not reused: {'; '.join(self.skipped)}" if self.skipped else "")


def _show(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(repr(v) for v in value)
    return repr(value) if isinstance(value, str) else str(value)


def reuse_training_settings(data_args, model_dir: str, given: set) -> tuple[Any, Optional[Reused]]:
    """`data_args` with the training run's values for the settings not `given` (by a flag or --config) where they
    fit the files of this run; and what was reused (None when --model has no training settings)."""
    saved = training_settings(model_dir)
    if not saved:
        return data_args, None
    reused = Reused(os.path.join(model_dir, RESOLVED))
    files = [(flag, getattr(data_args, name)) for name, flag in DATA_FILES if getattr(data_args, name, None)]
    for names, kind in type(data_args).reused_settings:
        if any(n in given for n in names):  # the user chose this part (e.g. --text_column): none of its group
            continue
        wanted = {n: saved[n] for n in names if n in saved and saved[n] != getattr(data_args, n)}
        if not wanted:
            continue
        why = _does_not_fit(kind, {**reused.values, **wanted}, data_args, files, saved)
        if why:
            reused.skipped.append(f"{', '.join(wanted)} ({why})")
        else:
            reused.values.update(wanted)
    if reused.values:
        try:
            data_args = dataclasses.replace(data_args, **reused.values)
        except UserError as err:
            raise UserError(f"{str(err).rstrip('.')} (with settings reused from {reused.path}; give the flags "
                            "yourself).") from None
    return data_args, reused


def _does_not_fit(kind: str, wanted: dict, a, files: list, saved: dict) -> Optional[str]:
    """Why settings of this kind do not apply to these files (None: they do); `wanted`: the values taken so far."""
    present = [(flag, path) for flag, path in files if os.path.isfile(path)]  # a missing file: its reader says so
    if kind == "encoding":
        utf8 = next((f"{flag} '{path}'" for flag, path in present if _is_utf8_text(path, flag)), None)
        return f"{utf8} is UTF-8 text" if utf8 else None
    if kind in ("table", "lines"):
        other = next((f"{flag} '{path}'" for flag, path in present if a.file_layout(path, flag) != kind), None)
        return f"{other} is {'not a table' if kind == 'table' else 'a table'}" if other else None
    if not files:
        return "--dataset is not a csv/tsv file"
    if kind == "same extension":
        trained = next((file_extension(saved[n]) for n, _ in DATA_FILES if saved.get(n)), None)
        other = next((f"{flag} '{path}'" for flag, path in files if file_extension(path, flag) != trained), None)
        return f"{other} is not a {trained} file like the training data" if other else None
    if kind == "headerless":
        names = wanted["column_names"]
        delimiter, encoding = wanted.get("delimiter", a.delimiter), wanted.get("encoding", a.encoding)
        header = next((f"{flag} '{path}'" for flag, path in present
                       if not _headerless(path, flag, encoding, names, delimiter)), None)
        return f"{header} has a header row" if header else None
    return None


def table_reading(saved: dict, path: str, flag: str) -> tuple[str, Optional[list], Optional[str]]:
    """(encoding, column_names, delimiter) to read one table the way the training run read its files
    (export.py --data), with the same fit rules as reuse_training_settings."""
    a = SimpleNamespace(encoding=saved.get("encoding") or "utf-8", delimiter=None)
    files = [(flag, path)]
    if a.encoding != "utf-8" and _does_not_fit("encoding", {}, a, files, saved):
        a.encoding = "utf-8"
    if saved.get("delimiter") and not _does_not_fit("same extension", {}, a, files, saved):
        a.delimiter = saved["delimiter"]
    names = saved.get("column_names")
    if names and _does_not_fit("headerless", {"column_names": names, "delimiter": a.delimiter}, a, files, saved):
        names = None
    return a.encoding, names, a.delimiter


def _is_utf8_text(path: str, flag: str) -> bool:
    """Valid UTF-8 with non-ASCII characters: not Latin-1/Windows-1252 text (whose accents are invalid UTF-8)."""
    with open(local_file(path, flag), "rb") as fh:
        data = fh.read(1 << 22)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(data) - 3:  # not only a character cut at the end of the sample
            return False
    return any(b >= 0x80 for b in data)


def _headerless(path: str, flag: str, encoding: str, names: list, delimiter: Optional[str]) -> bool:
    """Whether a csv/tsv file's first row is data (not column names), so that the training run's --column_names
    apply: the row is not those names, has one field per name, and looks like data (data.header_looks_like_data)."""
    ext = file_extension(path, flag)
    if ext not in DELIMITED:
        return False
    line = first_line(path, flag, encoding)
    sep = delimiter or ("," if ext == ".csv" else "\t")
    fields = [f.strip() for f in (next(csv.reader([line], delimiter=sep), []) if ext == ".csv" else line.split(sep))]
    if fields == [str(n) for n in names] or any(f in names for f in fields):
        return False
    return len(fields) == len(names) and header_looks_like_data(fields) is not None
