"""Classification columns and labels.

Columns: the text (and pair) and label columns from flags or a known layout, and an unused column that
looks like a forgotten second text (refused, or a warning). Labels: parsed from every labelled split (a
label seen only in validation still gets an id), numeric or text, whole numbers -> classes, fractions
-> regression (with --task_type auto, announced in the log), mapped to ids with clear errors for empty,
NaN, single-class or unseen labels, numbers mixed with words, spellings of one label ('pos'/'Pos') and
id-like label columns. The text columns are checked on the way (common/data/validate.py) and returned as
clean datasets. Distillation's transfer set: a text as words (`text_words`) and --distill_unlabeled_file's rows."""
from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass
from typing import Optional, Sequence

from ..errors import UserError, fmt_columns
from ..log import logger
from .loading import read_table, require_columns
from .validate import (
    check_label_count,
    check_label_kinds,
    check_variants,
    is_missing,
    is_number,
    label_value,
    text_values,
)

# Column layouts recognised without flags: the non-label columns must be exactly one of these.
KNOWN_LAYOUTS = [("sentence",), ("text",), ("sentence1", "sentence2"), ("question", "sentence"),
                 ("question1", "question2"), ("premise", "hypothesis"), ("#1 String", "#2 String")]
KNOWN_LABELS = ("label", "labels", "Quality")
IGNORED = ("idx", "index")  # GLUE's row index on the Hub and in its test.tsv files
MRPC_IDS = ("#1 ID", "#2 ID")  # the raw MRPC TSV's id columns
# The two texts of a pair as public data sets name them (either one may be the first text); numbered or lettered
# names (s1/s2, text_a/text_b, "#1 String"/"#2 String") are recognised by pattern as well.
PAIR_NAMES = [("sentence1", "sentence2"), ("sentence", "sentence2"), ("text", "text_pair"), ("question", "context"),
              ("question", "answer"), ("question", "sentence"), ("question", "passage"), ("premise", "hypothesis"),
              ("query", "passage"), ("query", "document"), ("claim", "evidence"), ("anchor", "positive"),
              ("sentence_a", "sentence_b"), ("text_a", "text_b")]
# Columns never taken for a second text: ids, row indices, labels and scores.
NOT_TEXT = re.compile(r"(^|[^a-z])(id|ids|idx|index|key|uid|guid|uuid)([^a-z]|$)|^unnamed: |^(label|labels|target|"
                      r"class|category|score|gold_label|quality)$", re.IGNORECASE)
SAMPLE = 2000  # rows looked at to tell whether an unused column holds texts


def resolve_columns(a, columns: list, where: str, unlabelled_ok: bool = False) -> tuple[list[str], Optional[str], str]:
    """(text columns, pair column or None, label column); explicit flags or an exact known layout (less the
    --ignore_columns). A file to predict (unlabelled_ok) may lack the label column."""
    label = a.label_column
    if unlabelled_ok and not any(c in columns for c in ([label] if label else KNOWN_LABELS)):
        label = label or KNOWN_LABELS[0]
    elif label is not None:
        require_columns(columns, [label], where, {label: "--label_column"})
    else:
        found = [c for c in KNOWN_LABELS if c in columns]
        if len(found) != 1:
            raise UserError(f"{where}: cannot tell the label column among {fmt_columns(columns)}; "
                            "pass --label_column.")
        label = found[0]
    given = list(a.text_columns or [a.text_column] + ([a.text_pair_column] if a.text_pair_column else []))
    ignored = list(getattr(a, "ignore_columns", None) or [])
    used = [c for c in given + [label] if c in ignored]
    if used:
        raise UserError(f"column '{used[0]}' is both used (as a text or the label) and in --ignore_columns; drop it "
                        "from one of them.")
    if a.text_columns or a.text_column:
        twice = next((c for c in given + [label] if (given + [label]).count(c) > 1), None)
        if twice is not None:
            raise UserError(f"column '{twice}' is named twice among the text and label columns (--text_column(s), "
                            "--text_pair_column, --label_column); each needs its own column.")
        return (given, None, label) if a.text_columns else ([a.text_column], a.text_pair_column, label)
    rest = tuple(c for c in columns if c != label and c not in IGNORED + MRPC_IDS and c not in ignored)
    for layout in KNOWN_LAYOUTS:
        if rest == layout or (set(rest) == set(layout) and len(rest) == len(layout)):
            return [layout[0]], (layout[1] if len(layout) > 1 else None), label
    unnamed = [c for c in columns if str(c).startswith("Unnamed: ")]
    note = f" (the column pandas calls '{unnamed[0]}' has no name in the header: a saved row index?)" if unnamed else ""
    raise UserError(f"{where}: the text columns are ambiguous among {fmt_columns(columns)}{note}; pass "
                    "--text_column (and --text_pair_column for pairs) or --text_columns to join several, or "
                    "--ignore_columns for columns that are neither text nor label.")


def describe_columns(texts: list, pair: Optional[str], label: str, columns: Sequence[str], how: str) -> str:
    """The columns a run uses, for the log: 'text '#1 String', pair '#2 String', label 'Quality' (from the flags);
    unused: '#1 ID', '#2 ID''."""
    shown = (f"texts {fmt_columns(texts)} joined" if len(texts) > 1 else f"text '{texts[0]}'") + (
        f", pair '{pair}'" if pair else "") + (f", label '{label}'" if label in columns else ", no labels")
    unused = [c for c in columns if c not in texts + [pair, label]]
    return f"{shown} ({how})" + (f"; unused: {fmt_columns(unused)}" if unused else "")


def _sample(table, column: str) -> list:
    """The first rows of a column of a pandas DataFrame or a datasets.Dataset."""
    if hasattr(table, "iloc"):
        return table[column].iloc[:SAMPLE].tolist()
    return list(table.select(range(min(SAMPLE, len(table))))[column])


def _text_lengths(values: list) -> Optional[list]:
    """Lengths of a column's texts, or None when it is not a text column (mostly numbers, lists, or missing)."""
    texts = [v for v in values if isinstance(v, str) and v.strip()]
    if len(texts) < 0.8 * len(values) or not texts or sum(is_number(t) for t in texts) > len(texts) / 2:
        return None
    return [len(t) for t in texts]


def _pair_name(first: str, other: str) -> bool:
    """Whether two column names read as the two texts of a pair (sentence1/sentence2, '#1 String'/'#2 String',
    text_a/text_b, question/context, ...)."""
    a, b = first.lower(), other.lower()
    if any({a, b} == {x, y} for x, y in PAIR_NAMES):
        return True
    numbered = [m.start() for m in re.finditer(r"[12]", a)]
    if len(numbered) == 1:
        i = numbered[0]
        if a[:i] + ("2" if a[i] == "1" else "1") + a[i + 1:] == b:
            return True
    return bool(re.fullmatch(r"(.+[_\- ])[ab]", a)) and a[:-1] == b[:-1] and {a[-1], b[-1]} == {"a", "b"}


def forgotten_pair(table, columns: Sequence[str], text: str, label: str, ignored: Sequence[str], where: str
                   ) -> Optional[str]:
    """A single-text run with an unused column that looks like the second text of a pair: named as its partner
    (sentence2 beside sentence1, '#2 String' beside '#1 String', ...) and holding texts -> a UserError with the
    flag to pass; a text column of similar length (median 0.5x-2x) without such a name -> the warning to log.
    Ids, indices, labels and --ignore_columns are never suspects."""
    candidates = [c for c in columns if c not in (text, label) and c not in ignored and not NOT_TEXT.search(str(c))
                  and c not in IGNORED + MRPC_IDS]
    base = _text_lengths(_sample(table, text)) if candidates and text in columns else None  # missing: said later
    if not base:
        return None
    named, similar = [], []
    for col in candidates:
        values = _sample(table, col)
        lengths = _text_lengths(values)
        if lengths is None:
            continue
        if _pair_name(text, str(col)):
            named.append(col)
            continue
        ratio = statistics.median(lengths) / max(1, statistics.median(base))
        distinct = len({v for v in values if isinstance(v, str)}) / len(lengths)
        if 0.5 <= ratio <= 2 and (len(lengths) < 20 or distinct >= 0.5):
            similar.append((col, statistics.median(lengths)))
    if len(named) == 1:
        col = named[0]
        raise UserError(f"{where}: column '{col}' looks like the second text of a pair with the text column '{text}', "
                        f"but it is not used, so the model would see '{text}' alone; pass --text_pair_column '{col}' "
                        f"to train on the pairs, or --ignore_columns '{col}' to train on '{text}' alone.")
    suspects = [(c, None) for c in named] + similar
    if not suspects:
        return None
    shown = ", ".join(f"'{c}'" + (f" (median {m:.0f} characters)" if m is not None else "") for c, m in suspects)
    return (f"{where}: unused column(s) {shown} hold texts like the text column '{text}' (median "
            f"{statistics.median(base):.0f} characters), but the model sees '{text}' alone; if one is the second "
            f"text of a pair, pass --text_pair_column NAME (--ignore_columns NAME ... silences this warning)")


@dataclass
class Labels:
    regression: bool
    class_names: Optional[list]   # None for regression
    ids: dict                     # split -> list of label ids (floats for regression)


def parse_labels(values: list, where: str, column: str) -> tuple[list, bool]:
    """Labels as python values (numbers, or stripped words), and whether they are all numbers. Missing labels,
    lists (multi-label) and objects are errors naming the row."""
    out = [label_value(v, where, i, column) for i, v in enumerate(values)]
    return out, all(not isinstance(v, str) for v in out)


def column_values(table, column: str) -> list:
    """A column of a pandas DataFrame (local files) or a datasets.Dataset (the Hub) as a python list."""
    values = table[column]
    return values.tolist() if hasattr(values, "tolist") else list(values)


def read_split_labels(splits: dict, where: dict, texts: list, label_col: str, flag_of: dict) -> tuple:
    """Check every split's text and label columns (present; texts are strings, never empty, never only numbers)
    and parse its labels (numbers and words never mixed across the splits).

    Returns (labels, numeric, labelled, tables): split -> parse_labels() values and whether all are numeric
    for the labelled splits, split -> whether it is labelled (a test split may have its labels missing or
    hidden as -1, like GLUE's), and split -> a datasets.Dataset of the text columns (local tables keep nothing
    else, so an unused column of mixed types never matters)."""
    import datasets

    labels, numeric, labelled, tables = {}, {}, {}, {}
    for split, table in splits.items():
        columns = list(table.columns if hasattr(table, "columns") else table.column_names)
        require_columns(columns, texts, where[split], flag_of)
        has = label_col in columns
        if split != "test" or has:
            require_columns(columns, [label_col], where[split], flag_of)
        if len(table) == 0:
            raise UserError(f"{where[split]} has no rows.")
        clean = {col: text_values(column_values(table, col), where[split], col, flag_of.get(col, "--text_column"))[0]
                 for col in texts}
        tables[split] = (datasets.Dataset.from_dict(clean) if hasattr(table, "columns")
                         else table.select_columns(list(texts)))
        raw = column_values(table, label_col) if has else None
        if split == "test" and (raw is None or all(is_missing(v) or v in (-1, "-1") for v in raw)):
            labelled[split] = False  # e.g. GLUE test: labels hidden (-1)
            continue
        labelled[split] = True
        labels[split], numeric[split] = parse_labels(raw, where[split], label_col)
    check_label_kinds(labels, where, label_col)
    return labels, numeric, labelled, tables


def _first(labels: dict, bad) -> tuple[str, int]:
    split = next(s for s in labels if any(bad(v) for v in labels[s]))
    return split, next(i for i, v in enumerate(labels[split]) if bad(v))


def resolve_labels(labels: dict, numeric: dict, where: dict, column: str, task_type: str, allow_unseen: bool,
                   hub_names: Optional[list] = None) -> Labels:
    """labels, numeric: split -> parse_labels() of each labelled split ("train" first).
    hub_names: the names of a Hub ClassLabel label column, if any."""
    all_numeric = all(numeric.values())
    values = [v for split in labels for v in labels[split]]
    if all_numeric and any(not math.isfinite(float(v)) for v in values):
        split, row = _first(labels, lambda v: not math.isfinite(float(v)))
        raise UserError(f"{where[split]}, row {row + 1}: label column '{column}' is NaN/inf; fix or drop the row.")
    fractional = all_numeric and any(float(v) != int(float(v)) for v in values if math.isfinite(float(v)))
    regression = task_type == "regression" or (task_type == "auto" and fractional)
    if regression and task_type == "auto":
        split, row = _first(labels, lambda v: float(v) != int(float(v)))
        n = sum(float(v) != int(float(v)) for v in values)
        say = logger.warning if n < len(values) / 2 else logger.info  # a few stray fractions: probably a mistake
        say("label column '%s' has %d fractional value(s) of %d (first: %s at %s, row %d), so this is regression "
            "(one output, MSE; Pearson/Spearman); if the labels are classes, fix those rows or pass --task_type "
            "classification", column, n, len(values), labels[split][row], where[split], row + 1)
    if task_type == "classification" and fractional:
        split, row = _first(labels, lambda v: float(v) != int(float(v)))
        raise UserError(f"{where[split]}, row {row + 1}: label {labels[split][row]} in column '{column}' is not a "
                        "whole number, but --task_type is classification; fix the labels or use --task_type "
                        "regression.")
    if regression and not all_numeric:
        raise UserError(f"--task_type regression needs numeric labels, but column '{column}' has text labels.")
    if regression:
        return Labels(True, None, {s: [float(v) for v in vs] for s, vs in labels.items()})
    if all_numeric:
        uniq = sorted({int(float(v)) for v in values})
        if hub_names is not None:
            class_names, uniq = list(hub_names), list(range(len(hub_names)))
        else:
            class_names = [str(u) for u in uniq]
        to_id = {u: i for i, u in enumerate(uniq)}
        ids = {s: [to_id[int(float(v))] for v in vs] for s, vs in labels.items()}
    else:
        class_names = sorted({str(v) for v in values})
        check_variants(class_names, f"label column '{column}'")
        to_id = {n: i for i, n in enumerate(class_names)}
        ids = {s: [to_id[str(v)] for v in vs] for s, vs in labels.items()}
    if hub_names is None:
        check_label_count(len(set(ids["train"])), len(ids["train"]), where["train"], column)
    if len(class_names) < 2:
        raise UserError(f"label column '{column}' has only one value ({class_names[0]!r}) across all splits; "
                        "classification needs at least two classes.")
    train_classes = set(ids["train"])
    missing = [class_names[i] for i in range(len(class_names)) if i not in train_classes]
    if missing and not allow_unseen:
        split = next(s for s in ids if s != "train" and any(class_names[i] in missing for i in ids[s]))
        raise UserError(f"{where[split]} has labels {missing} that never occur in {where['train']} (column "
                        f"'{column}'); the model cannot learn them: fix the split, or pass --allow_unseen_labels.")
    if missing:
        logger.warning(f"labels {missing} never occur in the training data; the model cannot learn them.")
    return Labels(False, class_names, ids)


def model_class_names(config) -> Optional[list]:
    """The class names of a trained classifier's config in id order (None for a regression head)."""
    if getattr(config, "problem_type", None) == "regression" or config.num_labels == 1:
        return None
    return [str(config.id2label[i]) for i in range(config.num_labels)]


def labels_from_model(labels: dict, numeric: dict, where: dict, column: str, config, allow_unseen: bool) -> Labels:
    """--no_do_train: label ids from the model's own label map. A label the model does not know is an error
    naming it, or with `allow_unseen` gets the id past the model's classes (never predicted: an error)."""
    names = model_class_names(config)
    if names is None:
        if not all(numeric.values()):
            raise UserError(f"the model is a regression model but column '{column}' has text labels.")
        return Labels(True, None, {s: [float(v) for v in vs] for s, vs in labels.items()})
    to_id = {n: i for i, n in enumerate(names)}
    default_names = all(n == f"LABEL_{i}" for i, n in enumerate(names))  # a head saved without label names

    def key(v):
        if isinstance(v, float) and v == int(v):
            v = int(v)
        if default_names and isinstance(v, int) and 0 <= v < len(names):
            return names[v]
        return str(v)

    ids, unseen = {}, {}
    for split, values in labels.items():
        ids[split] = [to_id.get(key(v), len(names)) for v in values]
        unknown = sorted({key(v) for v in values if key(v) not in to_id})
        if unknown:
            unseen[split] = unknown
    if unseen and not allow_unseen:
        split, unknown = next(iter(unseen.items()))
        raise UserError(f"{where[split]} has labels {unknown} (column '{column}') that the model does not know; its "
                        f"labels are {names}. Fix the labels, or pass --allow_unseen_labels to count them as errors.")
    for split, unknown in unseen.items():
        logger.warning("%s: labels %s are not the model's; they are counted as errors", where[split], unknown)
    return Labels(False, names, ids)


# Distillation's transfer set (training/transfer.py): the training texts as words, and unlabelled rows

_WORD = re.compile(r"\w+(?:['’-]\w+)*|[^\w\s]", re.UNICODE)


def text_words(value) -> list:
    """A text as words for augmentation: letter/digit runs (inner apostrophes and hyphens kept) and single
    punctuation marks; a variant is its words joined by spaces."""
    return _WORD.findall(str(value)) if value is not None else []


def read_unlabeled(path: str, fields: list, a) -> list:
    """--distill_unlabeled_file: rows of the training text columns (a label column, if any, is not read)."""
    flag = "--distill_unlabeled_file"
    df = read_table(path, flag, a.encoding, a.column_names, a.delimiter)
    missing = [c for c in fields if c not in df.columns]
    if missing:
        raise UserError(f"{flag} '{path}' has no column {', '.join(repr(c) for c in missing)}; it needs the training "
                        f"text column(s) {', '.join(repr(c) for c in fields)} (columns found: "
                        f"{', '.join(map(str, df.columns))}).")
    rows = []
    for i, values in enumerate(zip(*(df[c].tolist() for c in fields))):
        words = [[] if is_missing(v) else text_words(v) for v in values]  # a number is text too (json)
        if not all(words):
            col = fields[[bool(w) for w in words].index(False)]
            raise UserError(f"{flag} '{path}' row {i + 1}: column '{col}' is empty; every unlabelled row needs its "
                            "text (remove the row or fill it in).")
        rows.append(words)
    if not rows:
        raise UserError(f"{flag} '{path}' has no rows.")
    return rows
