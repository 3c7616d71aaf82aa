"""Token-classification data: readers for CoNLL columns, JSON/JSONL/parquet token+tag lists, CSV
sentences with a list-literal tag column, and Hub datasets; row validation with clear errors (or
counted skips); the label list; sub-word label alignment; sliding windows over long sentences.

Every reader returns `Sentences`: words and raw tags per sentence plus where each came from, so
that every problem is reported with the file and row (or line) it is in.
"""
from __future__ import annotations

import ast
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from ..errors import UserError, closest, fmt_columns
from ..files import c1_only, check_file, file_extension, first_line, read_text
from ..log import logger
from .loading import is_missing, read_hub_splits, read_table
from .validate import check_variants, is_number, kind_of

# One token per line, whitespace-separated columns, blank line between sentences.
CONLL_EXTENSIONS = (".txt", ".conll", ".iob", ".iob2", ".bio", ".tsv")
TABLE_EXTENSIONS = (".csv", ".json", ".jsonl", ".parquet")
# Column names recognised without flags (exactly one of each must be present).
TOKEN_COLUMNS = ("tokens", "words", "Sentence", "sentence", "text")
TAG_COLUMNS = ("ner_tags", "tags", "labels", "Tag", "tag", "ner")
# One word per row (the Kaggle/GMB `ner_dataset.csv` layout): the column saying which sentence a row
# belongs to (often only on a sentence's first row), and the word column.
SENTENCE_ID_COLUMNS = ("Sentence #", "sentence #", "sentence_id", "Sentence_ID", "sentence_idx", "sent_id")
WORD_COLUMNS = ("Word", "word", "Token", "token", "tokens", "words")
MAX_REASONS = 5  # skipped-row reasons kept for the log and results.json
# Words are separated by ASCII whitespace only: str.split() would also split on characters such as
# U+0085, which is a word of its own in the real GMB data (a mis-decoded ellipsis).
_SPACES = re.compile(r"[ \t\n\r\f\v]+")
_ASCII_SPACE = " \t\n\r\f\v"


def split_words(text: str) -> list[str]:
    text = text.strip(_ASCII_SPACE)
    return _SPACES.split(text) if text else []


@dataclass
class Sentences:
    tokens: list                      # list[list[str]]
    tags: Optional[list]              # list[list[str | int]], or None for an unlabelled split
    rows: list                        # per sentence, where it is: "row 3", "sentence 5 (line 40)"
    where: str                        # "--train_file 'x.txt'"
    class_names: Optional[list] = None  # int tag -> name (a Hub ClassLabel), if any
    skipped: int = 0
    skip_reasons: list = field(default_factory=list)
    columns: str = ""                 # which columns hold the words and tags, for the log

    def __len__(self) -> int:
        return len(self.tokens)


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------

def read_conll(path: str, flag: str, tag_column_index: int = -1, skip_bad_rows: bool = False,
               encoding: str = "utf-8") -> Sentences:
    """CoNLL columns: the token in column 0, the tag in `tag_column_index` (default: the last column).

    Columns are split on tabs when every token line has the same number of tabs (a token may then hold a
    space: 'new york<TAB>B-LOC'), else on any run of spaces and tabs; a line with another number of columns
    than the file's other lines is an error naming it, never a token cut short. `-DOCSTART-` lines are
    skipped; several blank lines count as one separator. A file whose lines have a single column is an
    unlabelled file (allowed for --test_file only; the caller checks)."""
    check_file(path, flag, CONLL_EXTENSIONS)
    where = f"{flag} '{path}'"
    lines = read_text(path, flag, encoding).split("\n")  # not splitlines(): U+0085 and friends may be tokens
    tabs = _tabs_per_line(lines)
    blocks: list[tuple[int, list[tuple[int, list[str]]]]] = []  # (first line, [(line no, columns)])
    current: list[tuple[int, list[str]]] = []
    for number, line in enumerate(lines, start=1):
        words = split_words(line)
        if not words or words[0] == "-DOCSTART-":
            if current:
                blocks.append((current[0][0], current))
                current = []
            continue
        current.append((number, [c.strip(_ASCII_SPACE) for c in line.split("\t")] if tabs else words))
    if current:
        blocks.append((current[0][0], current))
    if not blocks:
        raise UserError(f"{where} holds no sentences (expected one token per line, a blank line between sentences).")
    if tabs:
        spaced = [c for _, block in blocks for _, cols in block for c in cols if " " in c]
        logger.info("%s: columns split on tabs (%d on every line)%s", where, tabs,
                    f"; {len(spaced)} fields hold spaces, e.g. {spaced[0]!r}" if spaced else "")
    widths = Counter(len(cols) for _, block in blocks for _, cols in block)
    usual = max(widths, key=lambda w: (widths[w], w))  # the most common number of columns (a tie: the larger)
    unlabelled = usual == 1
    if not unlabelled:
        _check_conll_layout(blocks, where, tag_column_index)
    out = Sentences([], None if unlabelled else [], [], where, columns="CoNLL columns: the word first, " + (
        "no tags" if unlabelled else f"the tag in column {tag_column_index} (--tag_column_index)"))
    for index, (first, block) in enumerate(blocks, start=1):
        bad = _bad_conll_line(block, where, usual, tag_column_index)
        if bad is not None:
            reason, fix = bad
            if skip_bad_rows:
                _skip(out, reason)
                continue
            raise UserError(f"{reason}; {fix}, or pass --skip_bad_rows.")
        out.tokens.append([cols[0] for _, cols in block])
        if not unlabelled:
            out.tags.append([cols[tag_column_index] for _, cols in block])
        out.rows.append(f"sentence {index} (line {first})")
    return out


def _tabs_per_line(lines: Sequence[str]) -> int:
    """The number of tabs every token line has (a tab-separated file), or 0: then columns are split on runs of
    spaces and tabs, as in CoNLL-2003's own files (which mix them)."""
    counts = set()
    for line in lines:
        text = line.strip(_ASCII_SPACE)
        if text and not (text.startswith("-DOCSTART-") and split_words(text)[0] == "-DOCSTART-"):
            counts.add(line.count("\t"))
            if len(counts) > 1:
                return 0
    return counts.pop() if counts else 0


def _bad_conll_line(block: list, where: str, usual: int, tag_column_index: int) -> Optional[tuple[str, str]]:
    """(why a sentence's lines cannot be read: its first bad line, what to do) or None. `usual`: the file's usual
    number of columns (1: an unlabelled file)."""
    for n, cols in block:
        if usual > 1 and (len(cols) < 2 or not -len(cols) <= tag_column_index < len(cols)
                          or tag_column_index % len(cols) == 0):
            odd = next((c for c in " ".join(cols) if c.isspace() and c not in _ASCII_SPACE), None)
            return (f"{where}, line {n}: {len(cols)} column(s) {cols!r}, but the tag is read from column "
                    f"{tag_column_index} (--tag_column_index) and the token from column 0" +
                    (f" (U+{ord(odd):04X} is not a column separator: use spaces or tabs)" if odd else ""),
                    "fix the line, set --tag_column_index")
        if len(cols) != usual:
            spaced = ("" if len(cols) < usual else " (a tag in a file of tokens only, or a token holding a space?)"
                      if usual == 1 else " (a token holding a space? separate the columns with one tab each, on "
                      "every line: then a token may hold spaces)")
            return (f"{where}, line {n}: {len(cols)} columns {cols!r} where the file's other lines have {usual}"
                    f"{spaced}", "fix the line")
    return None


def _check_conll_layout(blocks: list, where: str, tag_column_index: int) -> None:
    """Files that are not CoNLL-2003-style columns, said as such: CoNLL-U (comment lines '# sent_id = 1'), or
    the tag in the first column and the word after it."""
    comment = next((n for _, block in blocks for n, cols in block if cols[0] == "#" and len(cols) > 2
                    and cols[2] == "="), None)
    if comment is not None:
        raise UserError(f"{where}, line {comment}: a CoNLL-U comment line ('# ... = ...'); this reader takes CoNLL "
                        "columns (a word and its tag per line, a blank line between sentences): convert the file.")
    pattern = tag_pattern(None)
    rows = [cols for _, block in blocks for _, cols in block if len(cols) > 1][:2000]
    first = sum(bool(pattern.match(cols[0])) for cols in rows)
    last = sum(bool(pattern.match(cols[tag_column_index])) for cols in rows
               if -len(cols) <= tag_column_index < len(cols))
    if rows and first >= 0.9 * len(rows) and last < 0.5 * len(rows):
        raise UserError(f"{where}: the first column holds tags ({rows[0][0]!r}, ...) and the tag column "
                        f"{tag_column_index} does not; the word must come first on each line (then its tag, in "
                        "the last column or --tag_column_index).")


def is_word_per_row_table(path: str, flag: str, a) -> bool:
    """A .tsv with a header naming a sentence-id column (or any .tsv when --sentence_id_column is given) is
    a one-word-per-row table, not a CoNLL column file (which has no header). `a`: the data arguments."""
    if a.sentence_id_column:
        return True
    line = first_line(path, flag, a.encoding)
    cells = [c.strip() for c in re.split(r"[\t,;|]", line)]  # any delimiter: a wrong one is reported by the reader
    return any(c in SENTENCE_ID_COLUMNS for c in cells)


def file_layout(path: str, flag: str, a) -> str:
    """'lines' for a CoNLL column file, 'table' for a table (a .tsv with a sentence-id column in its header is a
    one-word-per-row table); `a`: the data arguments."""
    ext = file_extension(path, flag)
    if ext not in CONLL_EXTENSIONS or (ext == ".tsv" and is_word_per_row_table(path, flag, a)):
        return "table"
    return "lines"


def read_splits(a, cache_dir: Optional[str]) -> dict:
    """split -> Sentences (raw tags), from local files or a Hub dataset; `a`: the data arguments."""
    if a.dataset:
        names = {"train": a.train_split_name, "validation": a.validation_split_name, "test": a.test_split_name}
        tables, where = read_hub_splits(a, cache_dir, names)
        return {k: from_dataset(ds, where[k], a.tokens_column, a.tags_column, labelled_required=k != "test")
                for k, ds in tables.items()}
    splits = {}
    for split, path, flag in (("train", a.train_file, "--train_file"), ("validation", a.validation_file,
                              "--validation_file"), ("test", a.test_file, "--test_file")):
        if not path:
            continue
        conll = file_layout(path, flag, a) == "lines"
        check_format_flags(a, path, flag, conll)
        if conll:
            splits[split] = read_conll(path, flag, a.tag_column_index, a.skip_bad_rows, a.encoding)
        else:
            splits[split] = read_table_sentences(path, flag, a.tokens_column, a.tags_column, split != "test",
                                                 a.sentence_id_column, a.encoding, a.column_names, a.delimiter)
        if split != "test" and splits[split].tags is None:
            raise UserError(f"{flag} '{path}' has no tags (one column per line / no tag column); "
                            "training and validation data must be tagged.")
    return splits


def read_unlabeled(path: str, a) -> list:
    """--distill_unlabeled_file: sentences as word lists. A text file with one sentence per line, a CoNLL column
    file (tags, if any, not read; `unlabeled_layout` tells them apart) or a table with a tokens column (a tag
    column, if any, not read); `a`: the data arguments."""
    flag = "--distill_unlabeled_file"
    check_file(path, flag, CONLL_EXTENSIONS + TABLE_EXTENSIONS)  # exists, not empty, a known extension
    if file_layout(path, flag, a) == "lines":
        lines = read_text(path, flag, a.encoding).split("\n")
        if unlabeled_layout(lines) == "sentences":
            sentences = [split_words(ln) for ln in lines]
        else:
            sentences = read_conll(path, flag, -1, False, a.encoding).tokens
    else:
        sentences = read_table_sentences(path, flag, a.tokens_column, a.tags_column, False, a.sentence_id_column,
                                         a.encoding, a.column_names, a.delimiter).tokens
    sentences = [s for s in sentences if s]
    if not sentences:
        raise UserError(f"{flag} '{path}' holds no sentences.")
    return [[list(map(str, s))] for s in sentences]


def transfer_source(tok, pool: Sentences, windows, label2id: dict, inside: dict, a):
    """The training sentences for distillation's transfer set (training/transfer.py): `windows`, the tokenized
    training pool; a variant keeps its sentence's tags word for word, an unlabelled sentence is tagged 'O' (its
    positions are distilled, with no hard loss); `a`: the data arguments."""
    from ..task import TextSource

    outside = label2id.get("O", 0)

    def encode_rows(rows, row_ids):
        sents = [r[0] for r in rows]
        tags = [[label2id.get(t, -100) for t in pool.tags[i]] if i >= 0 else [outside] * len(w)
                for w, i in zip(sents, row_ids)]
        enc = encode_sentences(tok, sents, tags, row_ids, a.max_length, a.label_all_tokens, inside)
        return {k: v for k, v in enc.items() if k not in ("windowed", "dropped_words")}

    return TextSource(["tokens"], windows.remove_columns(["windowed", "dropped_words"]),
                      lambda rows: [[list(pool.tokens[i])] for i in rows], encode_rows,
                      lambda path: read_unlabeled(path, a), pool.where)


def unlabeled_layout(lines: Sequence[str]) -> str:
    """'conll' (a word per line, any other columns the same on every line, a blank line between sentences) or
    'sentences' (one per line). CoNLL: the same number of tabs on every line, or nine lines in ten or more with the
    same number of columns, which is one, or blank lines separate groups of them, or the last holds tags; anything
    else (sentences of different lengths; one sentence, or a few of the same length) is one sentence per line."""
    if _tabs_per_line(lines):
        return "conll"
    content = [w for w in map(split_words, lines) if w and w[0] != "-DOCSTART-"]
    if not content:
        return "conll"  # read_conll says the file holds no sentences
    usual, count = Counter(len(w) for w in content).most_common(1)[0]
    if count < 0.9 * len(content):
        return "sentences"
    blank_between = any(not ln.strip(_ASCII_SPACE) for ln in "\n".join(lines).strip(_ASCII_SPACE).split("\n"))
    pattern = tag_pattern(None)
    tagged = sum(bool(pattern.match(w[-1])) for w in content if len(w) == usual) >= 0.9 * count
    return "conll" if usual == 1 or blank_between or tagged else "sentences"


def read_table_sentences(path: str, flag: str, tokens_column: Optional[str], tags_column: Optional[str],
                         labelled_required: bool, sentence_id_column: Optional[str] = None, encoding: str = "utf-8",
                         column_names: Optional[Sequence[str]] = None, delimiter: Optional[str] = None) -> Sentences:
    """A table (csv/tsv/json/jsonl/parquet) with one sentence per row -- a token column (a list, or a string
    split on whitespace) and a tag column (a list, a list literal such as "['O', 'B-geo']", or space-separated
    tags) -- or with one word per row and a sentence-id column (see `group_word_rows`)."""
    check_file(path, flag, TABLE_EXTENSIONS + (".tsv",))
    df = read_table(path, flag, encoding, column_names, delimiter)
    where = f"{flag} '{path}'"
    columns = list(df.columns)
    id_col = resolve_column(columns, sentence_id_column, SENTENCE_ID_COLUMNS, "--sentence_id_column", where,
                            sentence_id_column is not None)
    if id_col is not None and (sentence_id_column or _one_word_per_row(df, tokens_column)):
        return group_word_rows(df, where, id_col, tokens_column, tags_column, labelled_required)
    tok_col = resolve_column(columns, tokens_column, TOKEN_COLUMNS, "--tokens_column", where, True)
    tag_col = resolve_column(columns, tags_column, TAG_COLUMNS, "--tags_column", where, labelled_required)
    values = df[tok_col].tolist()
    if len(values) > 1 and _single_words(values):
        # Never read a one-word-per-row table as one-word sentences.
        tagged = f", tags in '{tag_col}'" if tag_col else ""
        raise UserError(f"{where} has one word per row (words in '{tok_col}'{tagged}) and no column saying which "
                        "sentence each row belongs to, so every row would be a one-word sentence; name the "
                        "sentence-id column with --sentence_id_column (e.g. 'Sentence #'), or give one sentence "
                        "per row.")
    rows = [f"row {i + 1}" for i in range(len(df))]
    check_words_column(values, where, tok_col)
    tokens = [parse_tokens(v, where, r, tok_col) for v, r in zip(values, rows)]
    tags = None
    if tag_col is not None:
        tags = [parse_tags(v, where, r, tag_col) for v, r in zip(df[tag_col].tolist(), rows)]
    return Sentences(tokens, tags, rows, where, columns=f"tokens '{tok_col}', " + (
        f"tags '{tag_col}'" if tag_col else "no tags"))


def _single_words(values) -> bool:
    return all(is_missing(v) or (isinstance(v, str) and len(split_words(v)) == 1) for v in values)


def _one_word_per_row(df, tokens_column: Optional[str]) -> bool:
    """A recognised sentence-id column goes with one word per row only if the word column holds single words
    (a table with one sentence per row may carry a 'Sentence #' column too)."""
    if tokens_column is not None:
        return tokens_column in df.columns and _single_words(df[tokens_column].tolist())
    found = [c for c in WORD_COLUMNS if c in df.columns]
    return len(found) == 1 and _single_words(df[found[0]].tolist())


def group_word_rows(df, where: str, id_col: str, tokens_column: Optional[str], tags_column: Optional[str],
                    labelled_required: bool) -> Sentences:
    """One word per row, rows grouped into sentences by the sentence-id column: the id may be given on every
    row or only on a sentence's first row (blank below, as in the Kaggle/GMB `ner_dataset.csv`). Sentences
    keep file order; a sentence's rows must be contiguous. Other columns (POS, ...) are ignored."""
    columns = [c for c in df.columns if c != id_col]
    word_col = resolve_column(columns, tokens_column, WORD_COLUMNS, "--tokens_column", where, True)
    tag_col = resolve_column([c for c in columns if c != word_col], tags_column, TAG_COLUMNS, "--tags_column",
                             where, labelled_required)
    ids, words = df[id_col].tolist(), df[word_col].tolist()
    tags = df[tag_col].tolist() if tag_col is not None else None
    if is_missing(ids[0]):
        raise UserError(f"{where}, row 1: the sentence-id column '{id_col}' is empty on the first row; each "
                        "sentence's first row must name its sentence.")
    out = Sentences([], [] if tags is not None else None, [], where, columns=f"one word per row: sentence '{id_col}', "
                    f"word '{word_col}', " + (f"tag '{tag_col}'" if tag_col else "no tags"))
    seen: dict = {}
    current, start = None, 0
    for i, raw in enumerate(ids + [None]):  # a sentinel closes the last sentence
        sid = None if i < len(ids) and is_missing(raw) else raw  # blank: the sentence goes on
        if i < len(ids) and (sid is None or sid == current):
            continue
        if current is not None:
            out.tokens.append([_cell_word(w) for w in words[start:i]])
            if tags is not None:
                out.tags.append([str(t).strip() if not is_missing(t) else "" for t in tags[start:i]])
            out.rows.append(f"sentence {str(current)!r} (rows {start + 1}-{i})")
        if i == len(ids):
            break
        if sid in seen:
            raise UserError(f"{where}, row {i + 1}: sentence id {str(sid)!r} (column '{id_col}') already began a "
                            f"sentence at row {seen[sid]}; the rows of a sentence must be contiguous (sort the file "
                            "by sentence, keeping the word order).")
        current, start = sid, i
        seen[sid] = i + 1
    return out


def _cell_word(value) -> str:
    """A word cell of a one-word-per-row table: blank -> '' (reported by `clean` as an empty word), but a cell
    of C1 control characters is kept for `clean` to name."""
    return str(value) if not is_missing(value) or c1_only(value) else ""


def from_dataset(ds, where: str, tokens_column: Optional[str], tags_column: Optional[str],
                 labelled_required: bool) -> Sentences:
    """A Hub `datasets.Dataset` with list columns; `ClassLabel` names are kept for integer tags."""
    columns = list(ds.column_names)
    tok_col = resolve_column(columns, tokens_column, TOKEN_COLUMNS, "--tokens_column", where, True)
    tag_col = resolve_column(columns, tags_column, TAG_COLUMNS, "--tags_column", where, labelled_required)
    rows = [f"row {i + 1}" for i in range(len(ds))]
    check_words_column(ds[tok_col], where, tok_col)
    tokens = [parse_tokens(v, where, r, tok_col) for v, r in zip(ds[tok_col], rows)]
    tags, names = None, None
    if tag_col is not None:
        tags = [parse_tags(v, where, r, tag_col) for v, r in zip(ds[tag_col], rows)]
        inner = getattr(ds.features[tag_col], "feature", None)
        names = list(inner.names) if hasattr(inner, "names") else None
    return Sentences(tokens, tags, rows, where, class_names=names, columns=f"tokens '{tok_col}', " + (
        f"tags '{tag_col}'" if tag_col else "no tags"))


def resolve_column(columns: Sequence[str], given: Optional[str], candidates: Sequence[str], flag: str,
                   where: str, required: bool) -> Optional[str]:
    if given is not None:
        if given not in columns:
            if not required:
                return None  # e.g. an unlabelled test file
            raise UserError(f"{where} has no column '{given}' (from {flag}){closest(given, columns)}; "
                            f"its columns are {fmt_columns(columns)}.")
        return given
    found = [c for c in candidates if c in columns]
    if len(found) == 1:
        return found[0]
    if not found and not required:
        return None
    what = "several candidate" if found else "no recognised"
    raise UserError(f"{where} has {what} columns for {flag} among {fmt_columns(columns)}; pass {flag} NAME.")


def _literal_list(value: str):
    """A Python/JSON list literal parsed without evaluating code (ast.literal_eval), else None."""
    text = value.strip()
    if not (text.startswith("[") and text.endswith("]")):
        return None
    try:
        parsed = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    return list(parsed) if isinstance(parsed, (list, tuple)) else None


def _as_list(value) -> Optional[list]:
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return None


def parse_tokens(value, where: str, row: str, column: str) -> list:
    items = _as_list(value)
    if items is None:
        if is_missing(value) and not c1_only(value):
            return []
        if not isinstance(value, str):
            raise UserError(f"{where}, {row}: token column '{column}' holds {type(value).__name__} {value!r}; "
                            "expected a list of words or a text.")
        literal = _literal_list(value)
        items = literal if literal is not None and all(isinstance(t, str) for t in literal) else split_words(value)
    return [_word(t, where, row, column, j) for j, t in enumerate(items)]


def _word(value, where: str, row: str, column: str, j: int) -> str:
    """One word of a token list: a string; a null becomes '' (reported by `clean` as an empty word, never the
    word 'None'); a JSON number its digits; a list, object or boolean is refused."""
    if isinstance(value, str):
        return value
    if is_missing(value):
        return ""
    if is_number(value):
        return str(int(value)) if float(value).is_integer() else str(value)
    raise UserError(f"{where}, {row}: word {j + 1} of token column '{column}' is {kind_of(value)}, not a word; write "
                    "each word as a string.")


def check_words_column(values: Sequence, where: str, column: str) -> None:
    """A token column of lists holding only numbers holds token ids (or tag ids), not words."""
    flat = [t for v in values for t in (_as_list(v) or [])]
    if flat and all(not isinstance(t, str) and is_number(t) for t in flat):
        raise UserError(f"{where}: token column '{column}' holds only numbers ({', '.join(map(str, flat[:3]))}, ...), "
                        "not words (token ids?); give the words themselves, or pick their column with "
                        "--tokens_column.")


def parse_tags(value, where: str, row: str, column: str) -> list:
    items = _as_list(value)
    if items is not None:
        return items
    if is_missing(value):
        return []
    if not isinstance(value, str):
        raise UserError(f"{where}, {row}: tag column '{column}' holds {type(value).__name__} {value!r}; "
                        "expected a list of tags.")
    text = value.strip()
    if text.startswith("["):
        literal = _literal_list(text)
        if literal is None:
            raise UserError(f"{where}, {row}: tag column '{column}' is not a valid list literal "
                            f"({text[:60]!r}); write it like ['O', 'B-PER'].")
        return literal
    return split_words(text)


# ---------------------------------------------------------------------------------------------
# Validation and the label list
# ---------------------------------------------------------------------------------------------

def tag_pattern(scheme: Optional[str]) -> re.Pattern:
    """Accepted tags: O or PREFIX-TYPE; IOB2 strict mode allows only B/I prefixes."""
    prefixes = "BI" if scheme == "IOB2" else "BIES"
    return re.compile(rf"^(O|[{prefixes}]-\S+)$")


def _skip(out: Sentences, reason: str) -> None:
    out.skipped += 1
    if len(out.skip_reasons) < MAX_REASONS:
        out.skip_reasons.append(reason)


def clean(sents: Sentences, label_names: Optional[list], scheme: Optional[str], skip_bad_rows: bool) -> Sentences:
    """Tags as strings; every row checked (empty sentence, token/tag count mismatch, unknown or
    malformed tag). A bad row raises a UserError naming the file and row, or with `skip_bad_rows` is
    dropped and counted. Words made only of C1 control characters (Windows-1252 text decoded as Latin-1
    before it came here) are kept, said in one warning: the tokenizer drops them, so each is scored as a
    predicted 'O' and counted in `dropped_words`."""
    names = sents.class_names or label_names
    allowed = set(label_names) if label_names else None
    pattern = tag_pattern(scheme)
    out = Sentences([], [] if sents.tags is not None else None, [], sents.where, sents.class_names,
                    sents.skipped, list(sents.skip_reasons), sents.columns)
    controls = []  # (row, word number, message) of each word made only of C1 control characters
    for i, (words, row) in enumerate(zip(sents.tokens, sents.rows)):
        reason, tags = None, None
        controls += [(row, j + 1, c1_only(w)) for j, w in enumerate(words) if c1_only(w)]
        if not words:
            reason = f"{sents.where}, {row}: the sentence is empty"
        elif any(not w.strip(_ASCII_SPACE) for w in words):
            j = next(j for j, w in enumerate(words) if not w.strip(_ASCII_SPACE))
            reason = f"{sents.where}, {row}: word {j + 1} is empty"
        elif sents.tags is not None:
            raw = sents.tags[i]
            if len(raw) != len(words):
                reason = f"{sents.where}, {row}: {len(words)} tokens but {len(raw)} tags"
            else:
                tags, reason = _tag_names(raw, names, allowed, pattern, sents.where, row, scheme)
                why = scheme_error(tags, scheme) if tags is not None and scheme else None
                reason = reason or (f"{sents.where}, {row}: {why}" if why else None)
        if reason is not None:
            if skip_bad_rows:
                _skip(out, reason)
                continue
            raise UserError(reason + "; fix the row or pass --skip_bad_rows to skip such rows.")
        out.tokens.append(list(words))
        out.rows.append(row)
        if out.tags is not None:
            out.tags.append(tags)
    if controls:
        row, j, what = controls[0]
        logger.warning("%s, %s: word %d is %s. Kept: the tokenizer drops it, so it is scored as a predicted 'O' "
                       "(%d such word(s) in all; results.json: dropped_words)", sents.where, row, j, what,
                       len(controls))
    return out


def _tag_names(raw: list, names: Optional[list], allowed: Optional[set], pattern: re.Pattern, where: str,
               row: str, scheme: Optional[str]) -> tuple[Optional[list], Optional[str]]:
    tags = []
    for j, tag in enumerate(raw):
        if isinstance(tag, (bool, np.bool_)) or not isinstance(tag, (str, int, np.integer)):
            return None, f"{where}, {row}: tag {j + 1} is {tag!r}, not a tag name or an integer id"
        if isinstance(tag, str) and names and tag not in names and tag.strip().isdigit():
            tag = int(tag)  # integer ids written as text (e.g. "3 0 0" in a csv)
        if not isinstance(tag, str):
            if not names:
                return None, (f"{where}, {row}: tag {j + 1} is the integer {tag}, but there is no label list to "
                              "name it (pass --label_names O B-PER I-PER ... in id order)")
            if not 0 <= int(tag) < len(names):
                return None, f"{where}, {row}: tag id {tag} is outside the {len(names)} labels {names}"
            tag = names[int(tag)]
        tag = tag.strip()
        if not tag:
            return None, f"{where}, {row}: tag {j + 1} is empty"
        if allowed is not None and tag not in allowed:
            return None, f"{where}, {row}: tag '{tag}' is not one of --label_names{closest(tag, allowed)}"
        if not pattern.match(tag):
            kind = "IOB2 (O, B-TYPE, I-TYPE)" if scheme == "IOB2" else "IOB/IOBES (O, B-TYPE, I-TYPE, E-TYPE, S-TYPE)"
            hint = (" (the digit 0: the outside tag is the letter O)" if tag == "0" else
                    f" (did you mean '{tag[0].upper()}-{tag[2:]}'?)" if re.match(r"^[bieos][-_]\S+$", tag) or
                    re.match(r"^[BIEOS]_\S+$", tag) else "")
            return None, f"{where}, {row}: tag '{tag}' is not in {kind} form{hint}"
        tags.append(tag)
    return tags, None


def scheme_error(tags: Sequence[str], scheme: str) -> Optional[str]:
    """Why a sentence's tags are not a valid IOB2/IOBES sequence (None if they are). seqeval's strict mode drops
    such entities, so scoring them strictly would count gold entities that can never be matched."""
    prev = "O"
    for j, tag in enumerate(tags):
        p, kind = (tag[0], tag[2:]) if tag != "O" else ("O", "")
        open_kind = prev[2:] if prev != "O" and prev[0] in "BI" else None  # an entity still open before this tag
        if scheme == "IOB2" and p == "I" and (prev == "O" or prev[2:] != kind):
            return (f"tag {j + 1} '{tag}' follows '{prev}', but in IOB2 an entity begins with B-{kind} (IOB1 data? "
                    "drop --iob_scheme to score with conlleval's rules, or convert the tags to IOB2)")
        if scheme == "IOBES" and p in "IE" and open_kind != kind:
            return (f"tag {j + 1} '{tag}' follows '{prev}', but in IOBES I-/E-{kind} continue an entity begun with "
                    f"B-{kind}")
        if scheme == "IOBES" and p in "BSO" and open_kind is not None:
            return (f"tag {j + 1} '{tag}' follows '{prev}', but in IOBES an entity ends with E-{open_kind} (S- for a "
                    "one-word entity); IOB2 data? pass --iob_scheme IOB2")
        prev = tag
    if scheme == "IOBES" and prev != "O" and prev[0] in "BI":
        return f"the sentence ends inside an entity ('{prev}'), but in IOBES an entity ends with E-{prev[2:]}"
    return None


def check_training_tags(files: dict) -> None:
    """Training data whose every tag is 'O' teaches nothing (F1 stays 0); entity types that occur only in evaluation
    files are scored as misses: said in the log. files: split -> cleaned Sentences."""
    train = files.get("train")
    kinds = {split: {t[2:] for tags in s.tags for t in tags if t != "O"} for split, s in files.items() if s.tags}
    if train is not None and not kinds.get("train"):
        raise UserError(f"{train.where} has no entities: every tag is 'O', so a model would learn to predict 'O' "
                        "everywhere; check the tag column (--tags_column / --tag_column_index).")
    for split, found in kinds.items():
        if train is not None and split != "train" and found - kinds["train"]:
            logger.warning("%s has entity types %s that the training data never has; they are scored as missed "
                           "entities", files[split].where, sorted(found - kinds["train"]))


def check_label_names(names: Optional[Sequence[str]]) -> None:
    """--label_names: distinct tags in IOB/IOBES form."""
    if names is None:
        return
    repeated = sorted({n for n in names if list(names).count(n) > 1})
    if repeated:
        raise UserError(f"--label_names names '{repeated[0]}' twice; give each tag once, in id order.")
    bad = next((n for n in names if not tag_pattern(None).match(n)), None)
    if bad is not None:
        raise UserError(f"--label_names '{bad}' is not a tag in IOB/IOBES form (O, B-TYPE, I-TYPE, E-TYPE, S-TYPE); "
                        "give the tag names in id order, e.g. O B-PER I-PER.")


def check_format_flags(a, path: str, flag: str, conll: bool) -> None:
    """Flags that only mean something for tables (or for CoNLL columns) are refused for the other kind of file."""
    if conll:
        given = [f"--{n}" for n in ("tokens_column", "tags_column", "sentence_id_column", "column_names", "delimiter")
                 if getattr(a, n) is not None]
        if given:
            raise UserError(f"{given[0]} is for tables, but {flag} '{path}' is read as CoNLL columns (one word per "
                            "line, the tag in --tag_column_index); drop it, or give the data as a table.")
    elif a.tag_column_index != -1:
        raise UserError(f"--tag_column_index is for CoNLL column files, but {flag} '{path}' is a table; name its tag "
                        "column with --tags_column instead.")


def model_labels(config, tags: list, allow_unseen: bool) -> list:
    """--no_do_train: the model's tags in id order; tags of the data it does not know are an error (or, with
    --allow_unseen_labels, scored as gold entities it cannot find)."""
    labels = [str(config.id2label[i]) for i in range(config.num_labels)]
    unknown = sorted({t for sentence in tags for t in sentence} - set(labels))
    if unknown and not allow_unseen:
        raise UserError(f"the data has tags {unknown[:10]} that the model does not know (its tags: {labels}); fix the "
                        "tags or pass --allow_unseen_labels to score them as missed entities.")
    return labels


def inside_tag(tag: str) -> str:
    """The tag a word's continuation pieces get with --label_all_tokens: I- of the same type."""
    return tag if tag == "O" else "I-" + tag[2:]


def label_list(tag_lists: Sequence[Sequence[str]], extra: Sequence[str] = (), label_all_tokens: bool = False) -> list:
    """'O' first, then every other tag sorted; with label_all_tokens the I- tag of every type is included."""
    seen = {t for tags in tag_lists for t in tags} | set(extra)
    check_variants({t[2:] for t in seen if t != "O"}, "the entity types of the tags",
                   key=lambda k: re.sub(r"[\s_\-]+", " ", k.casefold()).strip())
    if label_all_tokens:
        seen |= {inside_tag(t) for t in seen}
    seen.add("O")
    return ["O"] + sorted(seen - {"O"})


# ---------------------------------------------------------------------------------------------
# Sub-word alignment and sliding windows
# ---------------------------------------------------------------------------------------------

def align_labels(word_ids: Sequence[Optional[int]], word_labels: Optional[Sequence[int]], first: int,
                 scored: tuple[int, int], label_all_tokens: bool, inside: dict) -> tuple[list, list]:
    """Per-token labels and word indices for one window.

    `word_ids` come from the fast tokenizer (None for special tokens) and are relative to the window,
    whose first word is sentence word `first`. Only words in the `scored` range [start, end) of the
    sentence carry labels (the others are context). The first piece of a word gets the word's label
    and its sentence word index; continuation pieces get -100 (or, with label_all_tokens, the I- tag
    of the word's type) and word index -1, so evaluation reads exactly one prediction per word.
    """
    labels, words = [], []
    previous = None
    for w in word_ids:
        if w is None:
            labels.append(-100)
            words.append(-1)
            continue
        g = first + w
        in_scope = scored[0] <= g < scored[1]
        if w != previous and in_scope:
            labels.append(word_labels[g] if word_labels is not None else -100)
            words.append(g)
        elif in_scope and label_all_tokens and word_labels is not None:
            labels.append(inside[word_labels[g]])
            words.append(-1)
        else:
            labels.append(-100)
            words.append(-1)
        previous = w
    return labels, words


def plan_windows(pieces: Sequence[int], budget: int) -> list[tuple[int, int, int, int]]:
    """Windows (start, end, score_start, score_end) over a sentence whose words have `pieces`
    sub-tokens each, with at most `budget` sub-tokens per window.

    A sentence that fits is one window. A longer one is cut into consecutive scored blocks of about
    half the budget; each block is widened with whole context words on both sides up to the budget,
    so every word is scored exactly once and never at a window edge without context. A single word
    longer than the budget is a block of its own and keeps its first `budget` pieces.
    """
    n = len(pieces)
    if sum(pieces) <= budget:
        return [(0, n, 0, n)]
    half = max(1, budget // 2)
    windows = []
    a = 0
    while a < n:
        b, used = a, 0
        while b < n and (b == a or used + pieces[b] <= half):
            used += pieces[b]
            b += 1
        room = budget - used
        left, right = a, b
        share = room // 2
        while left > 0 and pieces[left - 1] <= share:  # left context: up to half of the room
            share -= pieces[left - 1]
            room -= pieces[left - 1]
            left -= 1
        while right < n and pieces[right] <= room:     # right context: the rest
            room -= pieces[right]
            right += 1
        while left > 0 and pieces[left - 1] <= room:   # anything still free goes left again
            room -= pieces[left - 1]
            left -= 1
        windows.append((left, right, a, b))
        a = b
    return windows


def encode_sentences(tokenizer, sentences: Sequence[Sequence[str]], tag_ids: Optional[Sequence[Sequence[int]]],
                     row_ids: Sequence[int], max_length: int, label_all_tokens: bool, inside: dict) -> dict:
    """Tokenize pre-split sentences into (possibly several) windows each; columns for the PadCollator
    plus row_id (the sentence), length, and counts of windowed sentences and dropped words."""
    budget = max_length - tokenizer.num_special_tokens_to_add(pair=False)
    plain = tokenizer(list(map(list, sentences)), is_split_into_words=True, add_special_tokens=False)
    plans, window_words = [], []
    for i, words in enumerate(sentences):
        counts = np.bincount([w for w in plain.word_ids(i) if w is not None], minlength=len(words))
        plan = plan_windows(counts.tolist(), budget)
        plans.append(plan)
        window_words.extend(list(words[s:e]) for s, e, _, _ in plan)
    enc = tokenizer(window_words, is_split_into_words=True, truncation=True, max_length=max_length)
    out = {k: [] for k in enc.keys()}
    out.update(labels=[], word_ids=[], row_id=[], length=[], windowed=[], dropped_words=[])
    k = 0
    for i, plan in enumerate(plans):
        labels_i = tag_ids[i] if tag_ids is not None else None
        for start, _end, s0, s1 in plan:
            labels, words = align_labels(enc.word_ids(k), labels_i, start, (s0, s1), label_all_tokens, inside)
            for key in enc.keys():
                out[key].append(enc[key][k])
            out["labels"].append(labels)
            out["word_ids"].append(words)
            out["row_id"].append(int(row_ids[i]))
            out["length"].append(len(enc["input_ids"][k]))
            out["windowed"].append(len(plan) > 1)
            # words of the scored block whose first piece did not fit (a word of only unknown
            # characters, or pieces cut by truncation): scored as predicted 'O' in evaluation
            out["dropped_words"].append((s1 - s0) - sum(1 for w in words if w >= 0))
            k += 1
    if tag_ids is None:
        del out["labels"]
    return out


# ---------------------------------------------------------------------------------------------
# Evaluation: one prediction per word, back in sentence order
# ---------------------------------------------------------------------------------------------

def word_predictions(predictions: np.ndarray, word_ids: np.ndarray, row_ids: np.ndarray,
                     offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scatter per-token predictions of gathered windows into one flat per-word array.

    `offsets[r]` is the position of sentence r's first word in the flat array (offsets[-1] = total).
    Returns (predicted label id per word, -1 where no prediction exists; whether each word was seen).
    """
    flat = np.full(int(offsets[-1]), -1, dtype=np.int64)
    if len(row_ids):
        mask = word_ids >= 0
        rows = np.broadcast_to(row_ids.reshape(-1, 1), word_ids.shape)[mask]
        flat[offsets[rows] + word_ids[mask]] = predictions[mask]
    return flat, flat >= 0
