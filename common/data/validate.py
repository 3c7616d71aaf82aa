"""The checks every script's input goes through before anything is written, in one place.

Each returns what it checked (texts as strings, labels as python values) or raises a `UserError`
whose one sentence names the file, row, column or flag and what to do. The scripts declare what
they need (which columns hold text, which hold labels, which metrics their objective reports); the
engine runs the path, metric and checkpoint checks before `reporting.start_output_dir`.

    column values   text_values (text, never numbers/lists/objects, never only C1 control characters),
                    is_number, is_missing
    labels          label_value (one label per row), check_label_kinds (numbers and words not mixed),
                    variant_groups / check_variants (no 'pos' and 'Pos' as two classes),
                    check_label_count (an id or a text column is not a label column)
    paths           check_output_path (creatable, writable, on a real disk with room),
                    check_inputs_outside (clearing output_dir never deletes an input)
    metrics         check_metric (a name the task's objective reports, as a number)
"""
from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
import unicodedata
from typing import Callable, Iterable, Optional, Sequence

from ..errors import UserError, closest
from ..files import c1_only

MIN_FREE_MB = 50


# ---------------------------------------------------------------------------------------------
# Column values
# ---------------------------------------------------------------------------------------------

def is_missing(v: object) -> bool:
    """None, NaN (pandas' NA and NaT too), or a blank string (U+0085, a C1 control character, is blank to
    str.strip(): the checks that report a blank cell first say when it is made of such characters,
    `files.c1_only`)."""
    if v is None or type(v).__name__ in ("NAType", "NaTType"):
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    try:  # numpy floating NaN
        if not isinstance(v, (str, bytes, list, tuple, dict)) and v != v:
            return True
    except (TypeError, ValueError):
        pass
    return isinstance(v, str) and not v.strip()


def is_number(v: object) -> bool:
    """An int or float (not a bool), or a string that reads as one ('17', ' 3.5', '1e3')."""
    if isinstance(v, bool) or type(v).__name__ == "bool_":
        return False
    if isinstance(v, str):
        try:
            float(v.strip())
            return True
        except ValueError:
            return False
    return _numeric_scalar(v)


def _numeric_scalar(v: object) -> bool:
    try:
        import numpy as np

        return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
    except ImportError:  # pragma: no cover
        return isinstance(v, (int, float)) and not isinstance(v, bool)


def kind_of(v: object) -> Optional[str]:
    """What a non-text cell holds, for messages: 'a list', 'an object', 'the number 42', 'true'; None for a string."""
    if isinstance(v, str):
        return None
    if isinstance(v, (list, tuple)) or type(v).__name__ == "ndarray":
        items = list(v)
        shown = repr(items[:3])[:-1] + (", ...]" if len(items) > 3 else "]")
        return f"a list {shown}"
    if isinstance(v, dict):
        return f"an object {str(v)[:40]!r}"
    if isinstance(v, bool) or type(v).__name__ == "bool_":
        return "true" if v else "false"
    if _numeric_scalar(v):
        return f"the number {v}"
    return f"{type(v).__name__} {str(v)[:40]!r}"


def text_values(values: Sequence, where: str, column: str, flag: str, skip_missing: bool = False
                ) -> tuple[list[str], int]:
    """The cells of a text column as strings, and how many blank ones were skipped (`skip_missing`; else a
    blank cell is an error naming its row; a cell of C1 control characters only counts as blank, and the
    error says what it holds). A cell holding a list, an object, a number or a boolean (JSON,
    parquet) is refused with its row, and so is a column holding nothing but numbers (an id or a label
    column picked by mistake): a model would train on digits."""
    texts, skipped = [], 0
    for i, v in enumerate(values):
        control = c1_only(v)
        if control and not skip_missing:
            raise UserError(f"{where}, row {i + 1}: text column '{column}' is {control}.")
        if is_missing(v) or control:
            if skip_missing:
                skipped += 1
                continue
            raise UserError(f"{where}, row {i + 1}: text column '{column}' is empty; fill it or drop the row.")
        what = kind_of(v)
        if what is not None:
            raise UserError(f"{where}, row {i + 1}: text column '{column}' holds {what}, not a text; write the "
                            f"text as a string, or pick the text column with {flag}.")
        texts.append(v)
    if not texts and skip_missing:
        raise UserError(f"{where}: column '{column}' has no text (every row is empty).")
    if texts and all(is_number(t) for t in texts):
        raise UserError(f"{where}: text column '{column}' holds only numbers (e.g. '{texts[0].strip()}'), not text; "
                        f"pick the column with the text with {flag}.")
    return texts, skipped


# ---------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------

def label_value(v: object, where: str, row: int, column: str):
    """One cell of a label column as a python value: a number (int or float; booleans count as 0/1) or a
    stripped word. Empty cells, lists (multi-label) and objects are refused with their row."""
    control = c1_only(v)
    if control:
        raise UserError(f"{where}, row {row + 1}: label column '{column}' is {control}.")
    if is_missing(v):
        raise UserError(f"{where}, row {row + 1}: label column '{column}' is empty; fill it or drop the row.")
    if isinstance(v, bool) or type(v).__name__ == "bool_":
        return int(v)
    if isinstance(v, str):
        s = v.strip()
        try:
            return float(s)
        except ValueError:
            return s
    if _numeric_scalar(v):
        return float(v) if "float" in type(v).__name__ else int(v)
    what = kind_of(v)
    hint = ("one label per row is expected (multi-label classification is not supported)"
            if what.startswith("a list") else "give one label per row as a number or a word")
    raise UserError(f"{where}, row {row + 1}: label column '{column}' holds {what}; {hint}.")


def _examples(values: Iterable, n: int = 3) -> str:
    seen = []
    for v in values:
        shown = repr(v) if isinstance(v, str) else (str(int(v)) if float(v).is_integer() else str(v))
        if shown not in seen:
            seen.append(shown)
        if len(seen) == n:
            break
    return ", ".join(seen)


def check_label_kinds(labels: dict, where: dict, column: str) -> None:
    """labels: split -> label_value() results. Numbers and words in one label column are refused: 1 and 'pos'
    would silently be two different classes."""
    numbers = {s: [v for v in vs if not isinstance(v, str)] for s, vs in labels.items()}
    words = {s: [v for v in vs if isinstance(v, str)] for s, vs in labels.items()}
    if not (any(numbers.values()) and any(words.values())):
        return
    num_split = next(s for s in labels if numbers[s])
    word_split = next(s for s in labels if words[s])
    nums, names = _examples(numbers[num_split]), _examples(words[word_split])
    detail = (f"{nums} and {names} in {where[num_split]}" if num_split == word_split
              else f"{nums} in {where[num_split]}, {names} in {where[word_split]}")
    raise UserError(f"label column '{column}' mixes numbers and words ({detail}), which would become separate "
                    "classes; use one labelling throughout (all words, or all numbers).")


def variant_key(name: str) -> str:
    """What two spellings of one label share: Unicode-normalised, case-folded, with quotes stripped and
    runs of spaces, '_' and '-' made one space ('Not_Entailment' ~ 'not entailment' ~ '"not-entailment"')."""
    text = unicodedata.normalize("NFKC", str(name)).casefold()
    return re.sub(r"[\s_\-]+", " ", text).strip(" \"'`")


def variant_groups(names: Iterable[str], key: Callable[[str], str] = variant_key) -> list[list[str]]:
    """Groups of distinct names that are evidently spellings of one name."""
    groups: dict[str, list[str]] = {}
    for n in sorted(set(names)):
        groups.setdefault(key(n), []).append(n)
    return [g for g in groups.values() if len(g) > 1]


def check_variants(names: Iterable[str], what: str, key: Callable[[str], str] = variant_key) -> None:
    """Refuse label names that differ only in case, spacing, '_'/'-' or quotes ('pos' and 'Pos')."""
    groups = variant_groups(names, key)
    if groups:
        shown = " and ".join(repr(n) for n in groups[0])
        plain = min(groups[0], key=lambda n: (n != n.lower() or not n.isidentifier(), n))
        raise UserError(f"{what}: {shown} differ only in case, spacing or quotes, and would be trained as different "
                        f"classes; write them one way (e.g. {plain!r} everywhere).")


def check_label_count(n_classes: int, n_rows: int, where: str, column: str) -> None:
    """A label column with nearly one value per row (20 or more values, on 90% of the rows or more) is an id or a
    text column picked by mistake."""
    if n_classes >= 20 and n_classes >= 0.9 * n_rows:
        raise UserError(f"label column '{column}' has {n_classes} different values in {n_rows} rows of {where}: it "
                        "looks like an id or a text column, not labels; pass the right --label_column (or "
                        "--task_type regression for a numeric target).")


# ---------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------

def check_output_path(path: str, flag: str = "--output_dir") -> None:
    """The folder exists or can be created (no file on the way), a file can be created in it (or in its nearest
    existing parent, removed again at once), and its disk is a real one with room. Nothing is left behind."""
    if not str(path).strip():
        raise UserError(f"{flag} is empty; pass the folder to write to.")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} '{path}' is a file; pass a folder.")
    probe = os.path.abspath(path)
    while not os.path.isdir(probe):
        if os.path.exists(probe):
            raise UserError(f"{flag} '{path}' cannot be created: '{probe}' is a file, not a folder; choose another "
                            "path.")
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise UserError(f"{flag} '{path}' cannot be written: no file can be created in '{probe}' "
                        f"({err.strerror or err}); choose a folder on a writable disk.") from None
    usage = shutil.disk_usage(probe)
    if usage.total == 0:
        raise UserError(f"{flag} '{path}' is on a virtual file system ('{probe}'), not a disk; choose another folder.")
    if usage.free < MIN_FREE_MB * 2**20:
        raise UserError(f"{flag} '{path}' is on a disk with only {usage.free // 2**20} MiB free; "
                        "free some space or choose another folder.")


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_inputs_outside(output_dir: str, inputs: dict, clearing: bool) -> None:
    """inputs: flag -> path of every file or folder the run reads. The model must not be written over the folder
    it is read from; and when output_dir is to be cleared (--overwrite_output_dir), no input may be in it."""
    for flag, path in inputs.items():
        if not path or not os.path.exists(path):
            continue
        if flag in ("--model", "--tokenizer_name") and os.path.isdir(path) and os.path.isdir(output_dir) and \
                os.path.samefile(output_dir, path):
            raise UserError(f"--output_dir '{output_dir}' is the {flag} folder: the run would overwrite the model it "
                            "starts from; choose another output folder.")
        if clearing and os.path.isdir(output_dir) and _inside(path, output_dir):
            raise UserError(f"--overwrite_output_dir would delete {flag} '{path}', which is inside --output_dir "
                            f"'{output_dir}'; choose another output folder or move the input.")


def same_file(a: Optional[str], b: Optional[str]) -> bool:
    return bool(a and b and os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b))


def input_paths(model_args, data_args, args=None) -> dict:
    """flag -> path of what a run reads from disk (files and local model folders; with the training settings
    `args`, distillation's teacher, masked LM and unlabelled file too)."""
    paths = {"--train_file": data_args.train_file, "--validation_file": data_args.validation_file,
             "--test_file": data_args.test_file, "--model": model_args.model,
             "--tokenizer_name": model_args.tokenizer_name}
    for flag in ("teacher_model", "augment_model", "distill_unlabeled_file"):
        paths[f"--{flag}"] = getattr(args, flag, None)
    return paths


def reused_files(data_args) -> list[str]:
    """Warnings for an evaluation file that is the training file (its metrics would measure memorisation)."""
    return [f"{flag} is the same file as --train_file: its metrics measure how well the training data was fitted, "
            "not how well the model generalises" for flag, path in (("--validation_file", data_args.validation_file),
                                                                     ("--test_file", data_args.test_file))
            if same_file(path, data_args.train_file)]


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------

def check_metric(metric: str, names: Sequence[str], task: str) -> None:
    """--metric_for_best_model must be one of the numbers the task's evaluation reports."""
    if metric not in names:
        raise UserError(f"--metric_for_best_model '{metric}' is not a metric of {task}{closest(metric, names)}; "
                        f"choose one of {', '.join(names)}.")
