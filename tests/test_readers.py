"""Data as downloaded (issue 23, items 10-12) and the modes of what a run writes (item 15): Windows-1252 text read
as Latin-1 (C1 control characters), a headerless table whose first row repeats a value, tab-separated token
files whose tokens hold spaces, and outputs that honour the umask. Unit tests of the readers on small files,
and one tiny end-to-end run for the file modes."""
from __future__ import annotations

import logging
import os
import stat
import tempfile
from types import SimpleNamespace

import pytest

import train_cls
from common import files
from common.data import ner
from common.data.loading import read_table
from common.data.validate import label_value, text_values
from common.errors import UserError
from common.runs import reporting
from common.task import PredictionWriter

# One word per row, as Kaggle's GMB ner_dataset.csv: its 0x85 is an ellipsis in Windows-1252.
GMB = (b"Sentence #,Word,POS,Tag\nSentence: 1,Thousands,NNS,O\n,of,IN,O\n,Paris,NNP,B-geo\n"
       b"Sentence: 2,Wait,VB,O\n,\x85,:,O\n,caf\xe9,NN,O\n")


def _write(tmp_path, name: str, data) -> str:
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return str(path)


def _gmb(path: str, encoding: str, skip: bool = False):
    a = SimpleNamespace(sentence_id_column=None, encoding=encoding)
    assert ner.is_word_per_row_table(path, "--train_file", a)
    sents = ner.read_table_sentences(path, "--train_file", None, None, True, encoding=encoding)
    return ner.clean(sents, None, None, skip)


# ---------------------------------------------------------------------------------------------
# 10: Windows-1252 read as Latin-1
# ---------------------------------------------------------------------------------------------

def test_latin1_reading_of_windows_1252_names_the_byte_and_cp1252(tmp_path):
    path = _write(tmp_path, "ner_dataset.csv", GMB)
    with pytest.raises(UserError, match=r"ner_dataset.csv', line 6: byte 0x85 is a control character in latin-1, not "
                                        r"text \(1 such byte\(s\) in the file: 0x85\); the file is Windows-1252 text, "
                                        r"where 0x85 is '…': pass --encoding cp1252\.$"):
        _gmb(path, "latin-1")
    sents = _gmb(path, "cp1252")
    assert sents.tokens == [["Thousands", "of", "Paris"], ["Wait", "…", "café"]]
    # another ISO-8859 encoding: its Windows code page is named
    with pytest.raises(UserError, match=r"the file is Windows-1250 text, where 0x85 is '…': pass --encoding cp1250"):
        files.read_text(path, "--train_file", "iso-8859-2")


def test_latin1_bytes_that_are_not_windows_1252_either(tmp_path):
    path = _write(tmp_path, "t.csv", b"sentence,label\nbad\x81film,neg\n")
    with pytest.raises(UserError, match=r"line 2: byte 0x81 is a control character in latin-1, not text .*and byte "
                                        r"0x81 has no character in Windows-1252 either; pass the file's real encoding"):
        files.read_text(path, "--train_file", "latin-1")


def test_a_utf8_failure_says_when_the_file_looks_like_windows_1252(tmp_path):
    path = _write(tmp_path, "t.csv", "sentence,label\ngood caf\u00e9 \u2026,pos\n".encode("cp1252"))
    with pytest.raises(UserError, match=r"line 2: byte 0xe9 \(position 23\) is not valid utf-8 text; the file looks "
                                        r"like Windows-1252 .*0xe9 is 'é' there\): pass --encoding cp1252, or re-save"):
        files.read_text(path, "--train_file")
    path = _write(tmp_path, "u.csv", b"sentence,label\ngood caf\xe9 \x81,pos\n")
    with pytest.raises(UserError, match=r"byte 0xe9 .*is not valid utf-8 text; it is not Windows-1252 either; pass "
                                        r"the file's real encoding with --encoding \(e.g. cp1250"):
        files.read_text(path, "--train_file")


def test_c1_characters_in_a_utf8_file_are_named_and_a_word_of_them_is_kept_and_said(tmp_path, caplog):
    # the GMB file read as Latin-1 and saved again as UTF-8 (a notebook's pd.read_csv(encoding='latin1').to_csv):
    # the word is kept, as in the other readers (the tokenizer drops it: a dropped word), never "word 2 is empty"
    path = _write(tmp_path, "resaved.csv", GMB.decode("latin-1"))
    with caplog.at_level(logging.WARNING, logger="bert_finetune"):
        sents = _gmb(path, "utf-8")
    assert sents.tokens == [["Thousands", "of", "Paris"], ["Wait", "\x85", "caf\u00e9"]]
    assert "resaved.csv', line 6: 1 C1 control character(s) (U+0085 ('…' in Windows-1252))" in caplog.text
    assert ("resaved.csv', sentence 'Sentence: 2' (rows 4-6): word 2 is only the control character U+0085 ('…' in "
            "Windows-1252), not text: Windows-1252 text was decoded as Latin-1 on its way here; decode the original "
            "with cp1252 (--encoding cp1252), or repair the data. Kept: the tokenizer drops it, so it is scored as a "
            "predicted 'O' (1 such word(s) in all; results.json: dropped_words)") in caplog.text
    # a CoNLL token made of C1 characters that are not whitespace (U+0092 is a curly apostrophe)
    conll = _write(tmp_path, "t.txt", "alice B-PER\n\u0092 O\n\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bert_finetune"):
        assert ner.clean(ner.read_conll(conll, "--train_file"), None, None, False).tokens == [["alice", "\x92"]]
    assert "sentence 1 (line 1): word 2 is only the control character U+0092 ('’' in Windows-1252)" in caplog.text


def test_c1_only_texts_and_labels_are_named_not_called_empty():
    with pytest.raises(UserError, match=r"t.csv', row 2: text column 'text' is only the control character U\+0085 "
                                        r"\('…' in Windows-1252\), not text"):
        text_values(["good", "\x85"], "t.csv'", "text", "--text_column")
    assert text_values(["good", "\x92"], "t.csv'", "text", "--text_column", skip_missing=True) == (["good"], 1)
    with pytest.raises(UserError, match=r"row 1: label column 'label' is only the control characters U\+0093 "
                                        r".*U\+0094"):
        label_value("\x93 \x94", "t.csv", 0, "label")
    assert text_values(["caf\u00e9 \u2026"], "t.csv", "text", "--text_column") == (["caf\u00e9 \u2026"], 0)


# ---------------------------------------------------------------------------------------------
# 11: a headerless table whose first row repeats a value
# ---------------------------------------------------------------------------------------------

def test_a_headerless_tsv_with_repeated_first_row_values_gets_the_column_names_advice(tmp_path):
    path = _write(tmp_path, "claims.tsv", "claim text\t0\t0\ttrue\nanother claim\t1\t0\tfalse\n")
    with pytest.raises(UserError, match=r"claims.tsv' seems to have no header row: its first row looks like data, "
                                        r"not column names \('0' is a number\); name the columns with --column_names "
                                        r"NAME1 NAME2 ... \(4 names\)\.$"):
        read_table(path, "--train_file")
    df = read_table(path, "--train_file", column_names=["claim", "a", "b", "label"])
    assert list(df["label"]) == ["true", "false"] and len(df) == 2


def test_a_repeated_header_name_names_both_fixes(tmp_path):
    path = _write(tmp_path, "t.tsv", "yes\tgood film\tyes\nno\tbad film\tno\n")
    with pytest.raises(UserError, match=r"column 'yes' appears twice in the header row; if that row is the header, "
                                        r"rename one of them .*; if it is data \(the file has no header row\), name "
                                        r"the columns with --column_names NAME1 NAME2 ... \(3 names\)\.$"):
        read_table(path, "--train_file")


# ---------------------------------------------------------------------------------------------
# 12: token files whose tokens hold spaces
# ---------------------------------------------------------------------------------------------

def test_a_tab_separated_token_file_keeps_spaces_in_tokens(tmp_path, caplog):
    path = _write(tmp_path, "t.tsv", "-DOCSTART- -X- -X- O\n\nnew york\tB-LOC\nis\tO\n\n"
                                     "alice smith\tB-PER\nwent\tO\n")
    with caplog.at_level(logging.INFO, logger="bert_finetune"):
        sents = ner.clean(ner.read_conll(path, "--train_file"), None, None, False)
    assert sents.tokens == [["new york", "is"], ["alice smith", "went"]]
    assert sents.tags == [["B-LOC", "O"], ["B-PER", "O"]]
    assert "t.tsv': columns split on tabs (1 on every line); 2 fields hold spaces, e.g. 'new york'" in caplog.text


def test_a_line_with_another_number_of_columns_is_named_never_cut(tmp_path):
    # tabs on some lines only: columns are split on whitespace, and the token with a space stands out
    path = _write(tmp_path, "t.txt", "alice B-PER\nwent O\n\nnew york\tB-LOC\nis O\n\n")
    with pytest.raises(UserError, match=r"t.txt', line 4: 3 columns \['new', 'york', 'B-LOC'\] where the file's other "
                                        r"lines have 2 \(a token holding a space\? separate the columns with one tab "
                                        r"each, on every line: then a token may hold spaces\); fix the line, or pass "
                                        r"--skip_bad_rows\.$"):
        ner.read_conll(path, "--train_file")
    skipped = ner.read_conll(path, "--train_file", skip_bad_rows=True)
    assert skipped.tokens == [["alice", "went"]] and skipped.skipped == 1
    unlabelled = _write(tmp_path, "u.txt", "alice\nwent\n\nnew york\nis\n\nbob\n")
    with pytest.raises(UserError, match=r"line 4: 2 columns \['new', 'york'\] where the file's other lines have 1 "
                                        r"\(a tag in a file of tokens only, or a token holding a space\?\)"):
        ner.read_conll(unlabelled, "--test_file")


# ---------------------------------------------------------------------------------------------
# 15: file modes
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_writers_honour_the_umask(tmp_path, umask_027):
    assert files.umask() == 0o027
    reporting.write_json(str(tmp_path / "r.json"), {"a": 1})
    reporting.save_resolved_config(str(tmp_path), {"seed": 1})
    writer = PredictionWriter(str(tmp_path / "predictions_test.tsv"))
    writer.close()
    folder = tempfile.mkdtemp(dir=tmp_path)  # 0700, as export.py's temporary folder
    open(os.path.join(folder, "f"), "w").close()
    os.chmod(os.path.join(folder, "f"), 0o600)
    files.honour_umask_tree(folder)
    assert {name: oct(_mode(tmp_path / name)) for name in ("r.json", "training_args.yaml", "predictions_test.tsv")} \
        == dict.fromkeys(("r.json", "training_args.yaml", "predictions_test.tsv"), oct(0o640))
    assert (_mode(folder), _mode(os.path.join(folder, "f"))) == (0o750, 0o640)


def test_a_run_writes_its_outputs_with_the_umask_modes(tiny_model, sentiment_files, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "out"
        train_cls.main(["--model", tiny_model, "--train_file", sentiment_files["train"], "--validation_file",
                        sentiment_files["dev"], "--test_file", sentiment_files["test"], "--output_dir", str(out),
                        "--max_steps", "2", "--per_device_train_batch_size", "8", "--mixed_precision", "no",
                        "--checkpointing_steps", "2"])
    finally:
        os.umask(old)
    modes = {os.path.relpath(os.path.join(root, n), out): _mode(os.path.join(root, n))
             for root, dirs, names in os.walk(out) for n in dirs + names}
    expected = {"model.safetensors", "results.json", "README.md", "training_args.yaml", "config.json",
                "predictions_test.csv", "checkpoints/step_2/model.safetensors",
                "checkpoints/step_2/optimizer.safetensors"}
    assert expected <= set(modes), sorted(modes)
    wrong = {p: oct(m) for p, m in modes.items() if m != (0o755 if os.path.isdir(out / p) else 0o644)}
    assert not wrong, wrong
