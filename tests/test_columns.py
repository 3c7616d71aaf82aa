"""Columns and splits said in the log, a forgotten pair column caught, and prediction reading new files with the
columns of the model's training run (issue 23, items 3, 5 and 9)."""
from __future__ import annotations

import os
import random
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

from common.config import ModelArguments, TrainArguments, parse_args
from common.data.labels import forgotten_pair, resolve_columns
from common.data.splits import data_block, split_origins
from common.errors import UserError
from common.runs.plan import SplitPlan
from common.runs.run_settings import reuse_training_settings, table_reading
from conftest import FAST, toy_sentence, write_csv

MRPC = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]


def cols(**kw):
    base = dict(text_column=None, text_pair_column=None, text_columns=None, label_column=None, ignore_columns=None)
    return SimpleNamespace(**{**base, **kw})


def mrpc_table(n=40):
    rng = random.Random(0)
    return pd.DataFrame({"Quality": [str(i % 2) for i in range(n)], "#1 ID": [str(1000 + i) for i in range(n)],
                         "#2 ID": [str(2000 + i) for i in range(n)],
                         "#1 String": [toy_sentence(rng, i % 2) for i in range(n)],
                         "#2 String": [toy_sentence(rng, i % 2) for i in range(n)]})


# ---- item 5: a forgotten --text_pair_column ------------------------------------------------------------------------

def test_mrpc_second_string_forgotten_is_refused_with_the_flag_to_pass():
    table = mrpc_table()
    texts, pair, label = resolve_columns(cols(text_column="#1 String"), MRPC, "--train_file 'msr_train.txt'")
    assert (texts, pair, label) == (["#1 String"], None, "Quality")
    with pytest.raises(UserError) as err:
        forgotten_pair(table, MRPC, texts[0], label, [], "--train_file 'msr_train.txt'")
    msg = str(err.value)
    assert "'#2 String'" in msg and "--text_pair_column '#2 String'" in msg and "--ignore_columns '#2 String'" in msg
    assert "msr_train.txt" in msg and "#1 ID" not in msg  # ids are never suspects
    # confirmed single-text training: no refusal, no warning
    assert forgotten_pair(table, MRPC, texts[0], label, ["#2 String"], "x") is None


@pytest.mark.parametrize("text,other", [("sentence1", "sentence2"), ("text_a", "text_b"), ("question", "context"),
                                        ("premise", "hypothesis"), ("question1", "question2"), ("s1", "s2"),
                                        ("hypothesis", "premise"), ("text", "text_pair"), ("query", "passage")])
def test_pair_partner_names_are_refused_hub_tables_too(text, other):
    import datasets

    rng = random.Random(1)
    ds = datasets.Dataset.from_dict({text: [toy_sentence(rng, 1) for _ in range(30)], "label": [0, 1] * 15,
                                     other: [toy_sentence(rng, 0, 30) for _ in range(30)], "idx": list(range(30))})
    with pytest.raises(UserError, match=f"--text_pair_column '{other}'"):
        forgotten_pair(ds, ds.column_names, text, "label", [], "split 'train' of --dataset 'x'")


def test_similar_unnamed_text_column_warns_and_ids_labels_numbers_do_not():
    rng = random.Random(2)
    n = 50
    table = pd.DataFrame({"review": [toy_sentence(rng, 1) for _ in range(n)],
                          "summary": [toy_sentence(rng, 0) for _ in range(n)],   # similar texts, no pair name
                          "label": ["pos", "neg"] * (n // 2), "doc_id": [f"doc-{i}" for i in range(n)],
                          "stars": [str(i % 5) for i in range(n)], "genre": ["drama", "comedy"] * (n // 2)})
    warning = forgotten_pair(table, list(table.columns), "review", "label", [], "--train_file 'r.csv'")
    assert warning and "'summary'" in warning and "--text_pair_column" in warning and "--ignore_columns" in warning
    for quiet in ("doc_id", "stars", "genre", "label"):
        assert f"'{quiet}'" not in warning
    assert forgotten_pair(table, list(table.columns), "review", "label", ["summary"], "x") is None
    much_longer = table.assign(summary=[" ".join([toy_sentence(rng, 1)] * 6) for _ in range(n)])
    assert forgotten_pair(much_longer, list(table.columns), "review", "label", [], "x") is None


def test_ignore_columns_completes_a_known_layout_and_never_names_a_used_column():
    columns = ["id", "sentence", "label"]
    with pytest.raises(UserError, match="ambiguous.*--ignore_columns"):
        resolve_columns(cols(), columns, "f")
    assert resolve_columns(cols(ignore_columns=["id"]), columns, "f") == (["sentence"], None, "label")
    # GLUE's test.tsv files lead with an 'index' column
    glue_test = ["index", "#1 ID", "#2 ID", "#1 String", "#2 String"]
    assert resolve_columns(cols(), glue_test, "f", unlabelled_ok=True) == (["#1 String"], "#2 String", "label")
    with pytest.raises(UserError, match="both used .* and in --ignore_columns"):
        resolve_columns(cols(text_column="sentence", ignore_columns=["sentence"]), columns, "f")


# ---- item 3: which splits, where from, how big ---------------------------------------------------------------------

def test_derived_splits_are_announced_with_fraction_stratification_seed_and_size():
    where = {"train": "--train_file 'train.tsv'", "test": "--test_file 'test.tsv'"}
    idx = {"train": range(330), "validation": range(37)}
    origins = split_origins(where, idx, None, 42, 0.1, stratified=True)
    block = data_block("train.tsv: text 'sentence', label 'label' (a recognised layout)",
                       {"train": "330 rows", "validation": "37 rows", "test": "1725 rows"}, origins)
    lines = block.split("\n")
    assert lines[0] == "data: train.tsv: text 'sentence', label 'label' (a recognised layout)"
    assert lines[1].split() == ["train", "330", "rows:", "the", "rest", "of", "--train_file", "'train.tsv'"]
    assert "validation   37 rows: 10% held out of --train_file 'train.tsv', stratified, seed 42" in lines[2]
    assert lines[3].endswith("1725 rows: --test_file 'test.tsv'")
    # k-fold: the first fold says it all, the others one line of sizes
    fold = {"train": range(9), "validation": range(1), "test": range(3)}
    first = split_origins({"train": "--train_file 't.csv'"}, fold, SplitPlan(42, 5, 0), 42, 0.1, stratified=True)
    assert first["test"] == "held-out fold 1 of 5 of --train_file 't.csv', stratified, seed 42"
    assert first["validation"] == "10% of the other folds, stratified, seed 42"
    sizes = {"train": "9 rows", "validation": "1 rows", "test": "3 rows"}
    assert "\n" in data_block("h", sizes, first, SplitPlan(42, 5, 0), 42)
    assert data_block("h", sizes, first, SplitPlan(42, 5, 1), 42) == (
        "data: train 9 rows, validation 1 rows, test 3 rows (held-out fold 2 of 5)")
    assert "\n" not in data_block("h", sizes, first, SplitPlan(42), 142)  # a second seed of the same split


def test_ner_and_mlm_readers_say_which_columns(tmp_path):
    from common.data import mlm, ner

    conll = tmp_path / "train.txt"
    conll.write_text("alice B-PER\nflew O\n\nbob B-PER\n", encoding="utf-8")
    a = SimpleNamespace(dataset=None, train_file=str(conll), validation_file=None, test_file=None, tag_column_index=-1,
                        skip_bad_rows=False, encoding="utf-8", tokens_column=None, tags_column=None,
                        sentence_id_column=None, column_names=None, delimiter=None)
    assert ner.read_splits(a, None)["train"].columns == ("CoNLL columns: the word first, the tag in column -1 "
                                                         "(--tag_column_index)")
    table = write_csv(tmp_path / "t.csv", ["id", "body"], [["1", "some text"], ["2", "more text"]])
    a = SimpleNamespace(dataset=None, train_file=table, validation_file=None, test_file=None, text_column=None,
                        encoding="utf-8", column_names=None, delimiter=None)
    assert mlm.read_splits(a, None, ("text", "body"))[3] == "text column 'body'"


# ---- item 9: prediction reuses the training run's data settings ----------------------------------------------------

def test_parse_args_tells_which_settings_were_given(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("encoding: latin-1\n")
    import train_cls

    (_, data, args), given = parse_args([ModelArguments, train_cls.ClsDataArguments, TrainArguments],
                                        ["--config", str(cfg), "--text-column", "t", "--no_do_train"], "",
                                        return_given=True)
    assert {"encoding", "text_column", "do_train"} <= given and "label_column" not in given
    assert data.text_column == "t" and not args.do_train


def saved_run(tmp_path, **settings):
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "training_args.yaml").write_text(yaml.safe_dump(settings))
    return str(model)


def test_reuse_fills_defaults_not_given_settings_and_fits_the_files(tmp_path):
    import train_cls

    model = saved_run(tmp_path, train_file="train.tsv", text_column="review", text_pair_column=None,
                      label_column="verdict", max_length=64, encoding="latin-1", column_names=["review", "verdict"])
    headerless = tmp_path / "new.tsv"
    headerless.write_text("a film that was very good indeed and the actor was fine\tpos\n", encoding="utf-8")
    a = train_cls.ClsDataArguments(test_file=str(headerless))
    out, reused = reuse_training_settings(a, model, set())
    assert (out.text_column, out.label_column, out.max_length, out.encoding) == ("review", "verdict", 64, "latin-1")
    assert out.column_names == ["review", "verdict"]
    assert "text_column 'review'" in reused.describe() and "model/training_args.yaml" in reused.describe()
    # flags win, for their whole group: --text_columns given, so neither text_column nor text_pair_column is taken
    out, _ = reuse_training_settings(train_cls.ClsDataArguments(test_file=str(headerless), text_columns=["a", "b"]),
                                     model, {"text_columns"})
    assert out.text_columns == ["a", "b"] and out.text_column is None and out.label_column == "verdict"
    # a file with a header row keeps its own names; a UTF-8 file is not read as Latin-1
    header = tmp_path / "header.tsv"
    header.write_text("review\tverdict\ncafé crème was good\tpos\n", encoding="utf-8")
    out, reused = reuse_training_settings(train_cls.ClsDataArguments(test_file=str(header)), model, set())
    assert out.column_names is None and out.encoding == "utf-8" and out.text_column == "review"
    assert "column_names (--test_file" in reused.describe() and "has a header row" in reused.describe()
    assert "is UTF-8 text" in reused.describe()
    assert table_reading({"column_names": ["review", "verdict"], "encoding": "latin-1"}, str(header), "--data") == (
        "utf-8", None, None)
    # no training settings (a Hub id, a plain checkpoint): nothing changes
    assert reuse_training_settings(a, str(tmp_path), set()) == (a, None)


def test_reused_delimiter_reads_the_first_row_of_a_headerless_file(tmp_path):
    import train_cls

    model = saved_run(tmp_path, train_file="train.csv", delimiter=";", column_names=["n", "text", "label"])
    new = tmp_path / "new.csv"
    new.write_text("0;a film that was good;pos\n", encoding="utf-8")
    out, reused = reuse_training_settings(train_cls.ClsDataArguments(test_file=str(new)), model, set())
    assert (out.delimiter, out.column_names) == (";", ["n", "text", "label"]) and not reused.skipped
    tsv = tmp_path / "new.tsv"
    tsv.write_text("0\ta film that was good\tpos\n", encoding="utf-8")
    out, reused = reuse_training_settings(train_cls.ClsDataArguments(test_file=str(tsv)), model, set())
    assert out.delimiter is None and out.column_names == ["n", "text", "label"]
    assert "delimiter (--test_file" in reused.describe() and "is not a .csv file like the training data" in (
        reused.describe())


def test_ner_reuse_applies_column_names_to_tables_only(tmp_path):
    import train_ner

    model = saved_run(tmp_path, train_file="train.csv", tokens_column="words", tags_column="labels",
                      label_all_tokens=True, tag_column_index=-1)
    conll = tmp_path / "new.txt"
    conll.write_text("alice\nflew\n", encoding="utf-8")
    out, reused = reuse_training_settings(train_ner.NerDataArguments(test_file=str(conll)), model, set())
    assert out.tokens_column is None and out.label_all_tokens is True
    assert "--test_file" in reused.describe() and "is not a table" in reused.describe()


def test_prediction_reads_new_files_with_the_training_columns(tiny_model, tmp_path, capfd):
    import train_cls

    rng = random.Random(3)
    rows = [(str(i), toy_sentence(rng, i % 2), "yes" if i % 2 else "no") for i in range(60)]
    train = write_csv(tmp_path / "train.tsv", ["rid", "review", "verdict"], rows, delimiter="\t")
    new = write_csv(tmp_path / "new.tsv", ["rid", "review"], [(r[0], r[1]) for r in rows[:7]], delimiter="\t")
    out = str(tmp_path / "out")
    train_cls.main(["--model", tiny_model, "--train_file", train, "--text_column", "review", "--label_column",
                    "verdict", "--max_length", "32", "--output_dir", out, *FAST, "--max_steps", "2"])
    log = capfd.readouterr().err
    assert "data: train.tsv: text 'review', label 'verdict' (given); unused: 'rid'" in log
    assert f"validation  6 rows: 10% held out of --train_file '{train}', stratified, seed 42" in log
    pred = str(tmp_path / "pred")
    res = train_cls.main(["--model", out, "--no_do_train", "--test_file", new, "--output_dir", pred])
    log = capfd.readouterr().err
    assert res["test"]["num_examples"] == 7
    assert pd.read_csv(os.path.join(pred, "predictions_test.csv"))["review"].tolist() == [r[1] for r in rows[:7]]
    assert "reused from" in log and "max_length 32, text_column 'review', label_column 'verdict'" in log
    assert "data: new.tsv: text 'review', no labels (given); unused: 'rid'" in log
    assert f"test 7 rows: --test_file '{new}'" in " ".join(log.split())
    assert yaml.safe_load(open(os.path.join(pred, "training_args.yaml")))["text_column"] == "review"
    # a flag still wins over the reused setting
    with pytest.raises(UserError, match="no column 'rid_text'"):
        train_cls.main(["--model", out, "--no_do_train", "--test_file", new, "--output_dir", str(tmp_path / "p2"),
                        "--text_column", "rid_text"])
