"""Bad input, round two (docs/errors.md): each failure the adversarial pass found through the three CLIs, as a
table per script -- one sentence naming the file, row, column or flag, UserError (exit 2), nothing written --
plus the inputs that were misread or refused and now read right, the checkpoint checks (a damaged, foreign or
tampered checkpoint is refused before anything is written; a planted pickle is never opened) and the
validation helpers of common/data/validate.py."""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil

import pytest

import train_cls
import train_mlm
import train_ner
from common.data import validate
from common.errors import UserError
from conftest import FILLER, run_script, toy_sentence

STEPS = ["--max_steps", "2", "--per_device_train_batch_size", "8", "--mixed_precision", "no", "--logging_steps", "1"]
ENTITIES = {"alice": "PER", "bob": "PER", "paris": "LOC", "berlin": "LOC", "acme": "ORG"}


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

def cls_rows(n=40, labels=("neg", "pos"), seed=0):
    rng = random.Random(seed)
    return [(toy_sentence(rng, i % 2), labels[i % 2]) for i in range(n)]


def ner_sents(n=30, seed=0, iob1=False):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words, tags = [], []
        for _ in range(rng.randint(3, 7)):
            if rng.random() < 0.35:
                w = rng.choice(list(ENTITIES))
                words.append(w)
                tags.append(("I-" if iob1 else "B-") + ENTITIES[w])
            else:
                words.append(rng.choice(FILLER))
                tags.append("O")
        out.append((words, tags))
    return out


def lines(n=40, seed=0):
    rng = random.Random(seed)
    return [toy_sentence(rng, i % 2) for i in range(n)]


def text(path, body, encoding="utf-8"):
    with open(path, "w", encoding=encoding, newline="") as fh:
        fh.write(body)
    return str(path)


def conll(path, sents, sep=" ", encoding="utf-8"):
    return text(path, "".join("".join(f"{w}{sep}{t}\n" for w, t in zip(ws, ts)) + "\n" for ws, ts in sents), encoding)


def jsonl(path, records):
    return text(path, "".join(json.dumps(r) + "\n" for r in records))


def jsonf(path, obj):
    return text(path, json.dumps(obj))


def parquet(path, columns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), str(path))
    return str(path)


def csv_rows(path, header, rows, delimiter=",", encoding="utf-8", lineterminator="\n"):
    import csv

    with open(path, "w", newline="", encoding=encoding) as fh:
        out = csv.writer(fh, delimiter=delimiter, lineterminator=lineterminator)
        if header is not None:
            out.writerow(header)
        out.writerows(rows)
    return str(path)


def word_rows(sents, fill=True):
    rows = []
    for i, (ws, ts) in enumerate(sents):
        rows += [(f"Sentence: {i + 1}" if (j == 0 or not fill) else "", w, "NN", t)
                 for j, (w, t) in enumerate(zip(ws, ts))]
    return rows


def nothing_written_by(main, argv, tmp_path):
    """Run main(argv); returns the UserError message after checking that nothing under tmp_path changed."""
    def snapshot():
        return sorted((os.path.relpath(os.path.join(r, f), tmp_path), os.path.getsize(os.path.join(r, f)),
                       os.stat(os.path.join(r, f)).st_mtime_ns) for r, _, fs in os.walk(tmp_path) for f in fs) + \
            sorted(os.path.relpath(os.path.join(r, d), tmp_path) for r, ds, _ in os.walk(tmp_path) for d in ds)

    before = snapshot()
    with pytest.raises(UserError) as err:
        main(argv)
    assert snapshot() == before  # nothing written, nothing removed
    message = str(err.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------

def _numbered():
    return [(i, s, y) for i, (s, y) in enumerate(cls_rows())]


def _csv(d, rows=None, header=("sentence", "label"), name="t.csv", **kw):
    return csv_rows(d / name, list(header), rows if rows is not None else cls_rows(), **kw)


CLS = [
    # (id, build(d) -> argv, fragment of the one-sentence error)
    ("mixed number and word labels", lambda d: ["--train_file", jsonf(d / "t.json", [
        {"sentence": s, "label": [1, "pos", 0, "neg"][i % 4]} for i, (s, _) in enumerate(cls_rows())])],
     "mixes numbers and words (1, 0 and 'pos', 'neg'"),
    ("numbers and words across files", lambda d: ["--train_file", _csv(d), "--validation_file",
                                                  _csv(d, cls_rows(8, (0, 1)), name="v.csv")],
     "mixes numbers and words (0, 1 in --validation_file"),
    ("numeric text column", lambda d: ["--train_file", _csv(d, [(i, s, y) for i, (s, y) in enumerate(cls_rows())],
                                                            ("id", "sentence", "label")),
                                       "--text_column", "id", "--label_column", "label"],
     "text column 'id' holds only numbers (e.g. '0'), not text; pick the column with the text with --text_column"),
    ("int text column in parquet", lambda d: ["--train_file", parquet(d / "t.parquet", {
        "id": list(range(40)), "sentence": [s for s, _ in cls_rows()], "label": [y for _, y in cls_rows()]}),
        "--text_column", "id", "--label_column", "label"], "row 1: text column 'id' holds the number 0, not a text"),
    ("list texts in json", lambda d: ["--train_file", jsonf(d / "t.json", [{"sentence": s.split(), "label": y}
                                                                           for s, y in cls_rows()])],
     "row 1: text column 'sentence' holds a list ["),
    ("object texts in json", lambda d: ["--train_file", jsonf(d / "t.json", [{"sentence": {"en": s}, "label": y}
                                                                             for s, y in cls_rows()])],
     "row 1: text column 'sentence' holds an object"),
    ("list texts in parquet", lambda d: ["--train_file", parquet(d / "t.parquet", {
        "sentence": [s.split() for s, _ in cls_rows()], "label": [y for _, y in cls_rows()]})],
     "text column 'sentence' holds a list"),
    ("multi-label lists", lambda d: ["--train_file", jsonf(d / "t.json", [
        {"sentence": s, "label": [0, 1] if i % 3 else [1]} for i, (s, _) in enumerate(cls_rows())])],
     "row 1: label column 'label' holds a list [1]; one label per row is expected (multi-label"),
    ("case variants", lambda d: ["--train_file", _csv(d, [(s, ["pos", "Pos", "neg", "neg"][i % 4])
                                                          for i, (s, _) in enumerate(cls_rows())])],
     "label column 'label': 'Pos' and 'pos' differ only in case, spacing or quotes"),
    ("separator variants", lambda d: ["--train_file", _csv(d, [
        (s, ["not_entailment", "not entailment", "entailment", "entailment"][i % 4])
        for i, (s, _) in enumerate(cls_rows())])], "'not entailment' and 'not_entailment' differ only"),
    ("quoted tsv labels", lambda d: ["--train_file", text(d / "t.tsv", "sentence\tlabel\n" + "".join(
        f"{s}\t{['pos', chr(34) + 'pos' + chr(34), 'neg', 'neg'][i % 4]}\n" for i, (s, _) in enumerate(cls_rows())))],
     "'\"pos\"' and 'pos' differ only"),
    ("label column of free text", lambda d: ["--train_file", _csv(d, [(s, s + " again", y) for s, y in cls_rows()],
                                                                  ("text", "other", "label")),
                                             "--text_column", "text", "--label_column", "other"],
     "label column 'other' has 40 different values in 40 rows"),
    ("label column of row numbers", lambda d: ["--train_file", _csv(d, _numbered(), ("id", "sentence", "label")),
                                               "--text_column", "sentence", "--label_column", "id"],
     "looks like an id or a text column, not labels"),
    ("text column is the label column", lambda d: ["--train_file", _csv(d), "--text_column", "label",
                                                   "--label_column", "label"], "column 'label' is named twice"),
    ("pair column is the text column", lambda d: ["--train_file", _csv(d), "--text_column", "sentence",
                                                  "--text_pair_column", "sentence"],
     "column 'sentence' is named twice"),
    ("text column repeated", lambda d: ["--train_file", _csv(d), "--text_columns", "sentence", "sentence",
                                        "--label_column", "label"], "column 'sentence' is named twice"),
    ("separator without text_columns", lambda d: ["--train_file", _csv(d), "--text_column", "sentence",
                                                  "--text_separator", " | "], "--text_separator joins the columns"),
    ("semicolon csv", lambda d: ["--train_file", _csv(d, delimiter=";")],
     "reads as one column 'sentence;label': its header is separated by ';', not ','; pass --delimiter ';'"),
    ("comma tsv", lambda d: ["--train_file", _csv(d, name="t.tsv")],
     "its header is separated by ',', not tab; pass --delimiter ',' (or name the file .csv)"),
    ("duplicate header", lambda d: ["--train_file", _csv(d, [(s, s, y) for s, y in cls_rows()],
                                                         ("sentence", "sentence", "label"))],
     "column 'sentence' appears twice in the header row"),
    ("unnamed index column", lambda d: ["--train_file", _csv(d, [(i, s, y) for i, (s, y) in enumerate(cls_rows())],
                                                             ("", "sentence", "label"))],
     "(the column pandas calls 'Unnamed: 0' has no name in the header: a saved row index?)"),
    ("nul byte", lambda d: ["--train_file", text(d / "t.csv", "sentence,label\na go\x00od film,pos\nbad,neg\n")],
     "line 2: a NUL character (byte 0x00)"),
    ("utf-8 read as utf-16", lambda d: ["--train_file", text(d / "t.csv", "sentence,label\na good film,pos\nbad,ne\n"),
                                        "--encoding", "utf-16"], "has line breaks, but none once decoded as utf-16"),
    ("jsonl bad line", lambda d: ["--train_file", text(d / "t.jsonl", "".join(
        json.dumps({"sentence": s, "label": y})[:(-3 if i == 2 else None)] + "\n"
        for i, (s, y) in enumerate(cls_rows())))],
     "could not be parsed as jsonl: line 3, column"),
    ("json object of scalars", lambda d: ["--train_file", jsonf(d / "t.json", {"sentence": "a film", "label": 1})],
     "holds one object of single values"),
    ("json empty list", lambda d: ["--train_file", jsonf(d / "t.json", [])], "holds no records"),
    ("json columns of unequal length", lambda d: ["--train_file", jsonf(d / "t.json", {
        "sentence": [s for s, _ in cls_rows()], "label": [1, 0]})], "is a dict of columns of different lengths"),
    ("output below a file", lambda d: ["--train_file", _csv(d), "--output_dir", text(d / "afile", "x") + "/out"],
     "cannot be created: "),
    ("output is the model folder", lambda d: ["--train_file", _csv(d), "--model", _copy_model(d), "--output_dir",
                                              str(d / "model"), "--overwrite_output_dir"],
     "is the --model folder: the run would overwrite the model it starts from"),
    ("output holds the data", lambda d: ["--train_file", _csv(_mkdir(d / "out")), "--output_dir", str(d / "out"),
                                         "--overwrite_output_dir"], "--overwrite_output_dir would delete --train_file"),
    ("output_dir empty string", lambda d: ["--train_file", _csv(d), "--output_dir", ""], "--output_dir is empty"),
    ("output in /proc", lambda d: ["--train_file", _csv(d), "--output_dir", "/proc/x"],
     "--output_dir '/proc/x' cannot be written: no file can be created in '/proc'"),
    ("config value", lambda d: ["--train_file", _csv(d), "--config", text(d / "c.yaml", "learning_rate: abc\n")],
     "c.yaml': learning_rate: 'abc' is not a number"),
    ("config list value", lambda d: ["--train_file", _csv(d), "--config", text(d / "c.yaml", "learning_rate: [1]\n")],
     "learning_rate: [1] is not a number"),
    ("config bool word", lambda d: ["--train_file", _csv(d), "--config", text(d / "c.yaml", "do_train: maybe\n")],
     "do_train: 'maybe' is not true or false"),
    ("config null", lambda d: ["--train_file", _csv(d), "--config", text(d / "c.yaml", "seed: null\n")],
     "c.yaml': seed is empty (null), but it needs a value"),
    ("config choice", lambda d: ["--train_file", _csv(d), "--config", text(d / "c.yaml", "lr_scheduler_type: cosin\n")],
     "lr_scheduler_type: 'cosin' is not one of linear, cosine,"),
    ("config value refused by its check", lambda d: ["--train_file", _csv(d), "--config",
                                                     text(d / "c.yaml", "learning_rate: -1\n")],
     "--learning_rate must be positive, got -1.0 (set by learning_rate in --config file"),
    ("config unquoted no", lambda d: ["--train_file", _csv(d), "--config", text(d / "c.yaml", "report_to: no\n")],
     "YAML reads an unquoted no/true/false as a boolean; quote it"),
    ("config is a folder", lambda d: ["--train_file", _csv(d), "--config", str(d)], "is a folder; pass a YAML file"),
    ("negative scientific learning rate", lambda d: ["--train_file", _csv(d), "--learning_rate", "-1e-3"],
     "--learning_rate must be positive, got -0.001"),
    ("infinite learning rate", lambda d: ["--train_file", _csv(d), "--learning_rate", "inf"],
     "--learning_rate must be a finite number"),
    ("nan weight decay", lambda d: ["--train_file", _csv(d), "--weight_decay", "nan"],
     "--weight_decay must be a finite"),
    ("beta above 1", lambda d: ["--train_file", _csv(d), "--adam_beta1", "1.5"], "--adam_beta1 must be in [0, 1)"),
    ("negative epsilon", lambda d: ["--train_file", _csv(d), "--adam_epsilon", "-1"], "--adam_epsilon must not be"),
    ("negative seed", lambda d: ["--train_file", _csv(d), "--seed", "-1"], "--seed/--seeds must be in [0, 2**32)"),
    ("huge seed", lambda d: ["--train_file", _csv(d), "--seed", "99999999999"], "--seed/--seeds must be in"),
    ("negative loader workers", lambda d: ["--train_file", _csv(d), "--dataloader_num_workers", "-1"],
     "--dataloader_num_workers must be 0 or more"),
    ("zero tokenizing workers", lambda d: ["--train_file", _csv(d), "--preprocessing_num_workers", "0"],
     "--preprocessing_num_workers must be 1 or more"),
    ("zero ddp timeout", lambda d: ["--train_file", _csv(d), "--ddp_timeout", "0"], "--ddp_timeout must be a positive"),
    ("patience without evaluation", lambda d: ["--train_file", _csv(d), "--early_stopping_patience", "2",
                                               "--eval_strategy", "no"],
     "--early_stopping_patience counts evaluations"),
    ("patience without eval data", lambda d: ["--train_file", _csv(d), "--early_stopping_patience", "2",
                                              "--validation_split", "0"], "there is no evaluation data"),
    ("misspelled metric", lambda d: ["--train_file", _csv(d), "--metric_for_best_model", "acuracy"],
     "--metric_for_best_model 'acuracy' is not a metric of classification (did you mean 'accuracy'?)"),
    ("misspelled metric, no evaluation", lambda d: ["--train_file", _csv(d), "--metric_for_best_model", "acuracy",
                                                    "--validation_split", "0"], "'acuracy' is not a metric"),
    ("metric of another task", lambda d: ["--train_file", _csv(d), "--metric_for_best_model", "perplexity"],
     "'perplexity' is not a metric of classification"),
    ("regression metric on classes", lambda d: ["--train_file", _csv(d), "--metric_for_best_model", "pearson"],
     "'pearson' is not a metric"),
    ("metric that is not a number", lambda d: ["--train_file", _csv(d), "--metric_for_best_model", "confusion_matrix"],
     "'confusion_matrix' is not a metric"),
    ("kfold with more folds than rows", lambda d: ["--train_file", _csv(d), "--kfold", "50"],
     "--kfold 50 is more folds than the 40 training rows"),
    ("resume without training", lambda d: ["--train_file", _csv(d), "--no_do_train", "--resume_from_checkpoint",
                                           str(d)], "--resume_from_checkpoint continues a training run"),
    ("polynomial decay below its end", lambda d: ["--train_file", _csv(d), "--lr_scheduler_type", "polynomial",
                                                  "--learning_rate", "1e-8"], "--lr_scheduler_type polynomial decays"),
]


_MODEL: dict = {}


@pytest.fixture(autouse=True)
def _model_path(tiny_model):
    _MODEL["path"] = tiny_model


def _copy_model(d):
    return str(shutil.copytree(_MODEL["path"], d / "model"))


def _mkdir(p):
    p.mkdir()
    return p


def refuses(main, build, message: str, tiny_model: str, tmp_path) -> None:
    """The case's argv (an output_dir added if it names none) exits 2 with `message`, writing nothing."""
    argv = build(tmp_path)
    if "--output_dir" not in argv:
        argv += ["--output_dir", str(tmp_path / "out")]
    got = nothing_written_by(main, ["--model", tiny_model, *STEPS, *argv], tmp_path)
    assert message in got, got


@pytest.mark.parametrize("build,message", [c[1:] for c in CLS], ids=[c[0] for c in CLS])
def test_classification_refuses(build, message, tiny_model, tmp_path):
    refuses(train_cls.main, build, message, tiny_model, tmp_path)


# ---------------------------------------------------------------------------------------------
# NER
# ---------------------------------------------------------------------------------------------

def _conll(d, sents=None, name="t.txt", **kw):
    return conll(d / name, sents if sents is not None else ner_sents(), **kw)


def _records(sents=None):
    return [{"tokens": list(w), "ner_tags": list(t)} for w, t in (sents or ner_sents())]


def _edit(records, row, key, index, value):
    records[row][key][index] = value
    return records


NER = [
    ("IOB1 data under --iob_scheme IOB2", lambda d: ["--train_file", _conll(d, ner_sents(iob1=True)), "--iob_scheme",
                                                      "IOB2"], "but in IOB2 an entity begins with B-"),
    ("type switch under IOB2", lambda d: ["--train_file", _conll(d, ner_sents()[:3] + [(["alice", "paris"],
                                                                                         ["B-PER", "I-LOC"])]),
                                          "--iob_scheme", "IOB2"], ": tag 2 'I-LOC' follows 'B-PER'"),
    ("IOB2 data under IOBES", lambda d: ["--train_file", _conll(d), "--iob_scheme", "IOBES"],
     "in IOBES an entity ends with E-"),
    ("null word in parquet", lambda d: ["--train_file", parquet(d / "t.parquet", {
        "tokens": [w if i != 1 else [w[0], None] + w[2:] for i, (w, _) in enumerate(ner_sents())],
        "ner_tags": [t for _, t in ner_sents()]})], "row 2: word 2 is empty"),
    ("null word in json", lambda d: ["--train_file", jsonl(d / "t.jsonl", _edit(_records(), 1, "tokens", 1, None))],
     "row 2: word 2 is empty"),
    ("list as a word", lambda d: ["--train_file", jsonl(d / "t.jsonl", _edit(_records(), 2, "tokens", 0, ["a"]))],
     "row 3: word 1 of token column 'tokens' is a list ['a'], not a word"),
    ("boolean as a word", lambda d: ["--train_file", jsonl(d / "t.jsonl", _edit(_records(), 2, "tokens", 0, True))],
     "row 3: word 1 of token column 'tokens' is true, not a word"),
    ("token ids instead of words", lambda d: ["--train_file", parquet(d / "t.parquet", {
        "tokens": [[1000 + len(x) for x in w] for w, _ in ner_sents()], "ner_tags": [t for _, t in ner_sents()]})],
     "token column 'tokens' holds only numbers ("),
    ("entity types differing in case", lambda d: ["--train_file", _conll(d, ner_sents() + [(["alice"], ["B-per"])])],
     "the entity types of the tags: 'PER' and 'per' differ only in case"),
    ("the digit 0 for O", lambda d: ["--train_file", _conll(d, [(w, ["0" if t == "O" else t for t in ts])
                                                               for w, ts in ner_sents()])],
     "(the digit 0: the outside tag is the letter O)"),
    ("lower-case prefix", lambda d: ["--train_file", _conll(d, [(["alice", "went"], ["b-PER", "O"])] * 5)],
     "tag 'b-PER' is not in IOB/IOBES (O, B-TYPE, I-TYPE, E-TYPE, S-TYPE) form (did you mean 'B-PER'?)"),
    ("underscore prefix", lambda d: ["--train_file", _conll(d, [(["alice", "went"], ["B_PER", "O"])] * 5)],
     "(did you mean 'B-PER'?)"),
    ("no entities", lambda d: ["--train_file", _conll(d, [(w, ["O"] * len(w)) for w, _ in ner_sents()])],
     "has no entities: every tag is 'O'"),
    ("NBSP between word and tag", lambda d: ["--train_file", _conll(d, [(["alice", "went"], ["B-PER", "O"])]) and
                                             text(d / "t.txt", "alice\u00a0B-PER\nwent O\n\n" * 5)],
     "line 1: 1 column(s) ['alice\\xa0B-PER'], but the tag is read from column -1"),
    ("--tokens_column with CoNLL", lambda d: ["--train_file", _conll(d), "--tokens_column", "tokens"],
     "--tokens_column is for tables, but --train_file"),
    ("--sentence_id_column with CoNLL .txt", lambda d: ["--train_file", _conll(d), "--sentence_id_column", "id"],
     "--sentence_id_column is for tables"),
    ("--delimiter with CoNLL", lambda d: ["--train_file", _conll(d), "--delimiter", ";"], "--delimiter is for tables"),
    ("--tag_column_index with a table", lambda d: ["--train_file", jsonl(d / "t.jsonl", _records()),
                                                   "--tag_column_index", "2"],
     "--tag_column_index is for CoNLL column"),
    ("repeated --label_names", lambda d: ["--train_file", _conll(d), "--label_names", "O", "B-PER", "B-PER"],
     "--label_names names 'B-PER' twice"),
    ("--label_names without prefixes", lambda d: ["--train_file", _conll(d), "--label_names", "O", "PER"],
     "--label_names 'PER' is not a tag in IOB/IOBES form"),
    ("semicolon word rows", lambda d: ["--train_file", csv_rows(d / "t.csv", ["Sentence #", "Word", "POS", "Tag"],
                                                                word_rows(ner_sents()), delimiter=";")],
     "its header is separated by ';', not ','"),
    ("comma word rows named .tsv", lambda d: ["--train_file", csv_rows(d / "t.tsv", ["Sentence #", "Word", "POS",
                                                                                     "Tag"], word_rows(ner_sents()))],
     "its header is separated by ',', not tab"),
    ("utf-16 without BOM", lambda d: ["--train_file", text(d / "t.txt", "alice B-PER\nwent O\n\n", "utf-16-le")],
     "a NUL character (byte 0x00)"),
    ("misspelled metric", lambda d: ["--train_file", _conll(d), "--metric_for_best_model", "f_1"],
     "'f_1' is not a metric of token-classification (did you mean 'f1'?)"),
    ("metric that is a table", lambda d: ["--train_file", _conll(d), "--metric_for_best_model", "per_type"],
     "'per_type' is not a metric"),
    ("metric of classification", lambda d: ["--train_file", _conll(d), "--metric_for_best_model", "mcc"],
     "'mcc' is not a metric"),
    ("config choice", lambda d: ["--train_file", _conll(d), "--config", text(d / "c.yaml", "iob_scheme: iob2\n")],
     "iob_scheme: 'iob2' is not one of IOB2, IOBES"),
    ("config integer", lambda d: ["--train_file", _conll(d), "--config", text(d / "c.yaml", "max_length: long\n")],
     "max_length: 'long' is not a whole number"),
    ("negative scientific learning rate", lambda d: ["--train_file", _conll(d), "--learning_rate", "-2E-5"],
     "--learning_rate must be positive"),
    ("output below a file", lambda d: ["--train_file", _conll(d), "--output_dir", text(d / "f", "x") + "/a/b"],
     "is a file, not a folder"),
    ("output holds the validation file", lambda d: ["--train_file", _conll(d), "--validation_file",
                                                    _conll(_mkdir(d / "out"), ner_sents(6, 1), "v.txt"),
                                                    "--output_dir", str(d / "out"), "--overwrite_output_dir"],
     "--overwrite_output_dir would delete --validation_file"),
    ("negative seed", lambda d: ["--train_file", _conll(d), "--seed", "-5"], "--seed/--seeds must be in"),
    ("negative beta", lambda d: ["--train_file", _conll(d), "--adam_beta2", "-0.1"], "--adam_beta2 must be in"),
    ("kfold with more folds than sentences", lambda d: ["--train_file", _conll(d), "--kfold", "40"],
     "--kfold 40 is more folds than the 30 training sentences"),
    ("negative loader workers", lambda d: ["--train_file", _conll(d), "--dataloader_num_workers", "-2"],
     "--dataloader_num_workers must be 0 or more"),
    ("CoNLL-U comment lines", lambda d: ["--train_file", text(d / "t.txt", "# sent_id = 1\nalice B-PER\nwent O\n\n")],
     "line 1: a CoNLL-U comment line"),
    ("tag first, word second", lambda d: ["--train_file", text(d / "t.txt", "".join(
        "".join(f"{t} {w}\n" for w, t in zip(ws, ts)) + "\n" for ws, ts in ner_sents()))],
     "the first column holds tags ("),
    ("empty tag cell", lambda d: ["--train_file", csv_rows(d / "t.csv", ["Sentence #", "Word", "POS", "Tag"], [
        ("Sentence: 1", "alice", "NN", "B-PER"), ("", "went", "NN", "")] * 1 + word_rows(ner_sents()[1:]))],
     "tag 2 is empty"),
    ("one sentence to split", lambda d: ["--train_file", _conll(d, ner_sents(1))],
     "--validation_split 0.1 of 1 training sentences leaves the held-out part empty"),
]


@pytest.mark.parametrize("build,message", [c[1:] for c in NER], ids=[c[0] for c in NER])
def test_ner_refuses(build, message, tiny_model, tmp_path):
    refuses(train_ner.main, build, message, tiny_model, tmp_path)


# ---------------------------------------------------------------------------------------------
# Masked LM
# ---------------------------------------------------------------------------------------------

def _txt(d, body=None, name="t.txt"):
    return text(d / name, body if body is not None else "\n".join(lines()) + "\n")


MLM = [
    ("binary file named .txt", lambda d: ["--train_file", _txt(d, "abc\x00\x01def\nmore\n" * 20)],
     "line 1: a NUL character (byte 0x00), so this is not a text file"),
    ("numeric text column", lambda d: ["--train_file", csv_rows(d / "t.csv", ["id", "body"], list(enumerate(lines()))),
                                       "--text_column", "id"], "text column 'id' holds only numbers"),
    ("a one-column table of numbers", lambda d: ["--train_file", csv_rows(d / "t.csv", ["year"],
                                                                          [(1990 + i,) for i in range(40)])],
     "text column 'year' holds only numbers"),
    ("list texts", lambda d: ["--train_file", jsonf(d / "t.json", [{"text": s.split()} for s in lines()])],
     "row 1: text column 'text' holds a list"),
    ("a number among texts", lambda d: ["--train_file", jsonl(d / "t.jsonl", [{"text": 42 if i == 2 else s}
                                                                              for i, s in enumerate(lines())])],
     "row 3: text column 'text' holds the number 42, not a text"),
    ("semicolon csv read as one column", lambda d: ["--train_file", csv_rows(d / "t.csv", ["text", "id"],
                                                                             [(s, i) for i, s in enumerate(lines())],
                                                                             delimiter=";")],
     "its header is separated by ';'"),
    ("comma tsv read as one column", lambda d: ["--train_file", csv_rows(d / "t.tsv", ["text", "id"],
                                                                         [(s, i) for i, s in enumerate(lines())])],
     "its header is separated by ','"),
    ("--column_names with .txt", lambda d: ["--train_file", _txt(d), "--column_names", "text"],
     "--column_names was given but --train_file"),
    ("--delimiter with .txt", lambda d: ["--train_file", _txt(d), "--delimiter", ";"], "--delimiter was given but"),
    ("json columns of unequal length", lambda d: ["--train_file", jsonf(d / "t.json", {"text": lines(), "id": [1, 2]})],
     "is a dict of columns of different lengths ('text': 40, 'id': 2)"),
    ("utf-8 read as utf-16", lambda d: ["--train_file", _txt(d, "a good film\nbad\n"), "--encoding", "utf-16"],
     "none once decoded as utf-16"),
    ("misspelled metric", lambda d: ["--train_file", _txt(d), "--metric_for_best_model", "perplexty"],
     "'perplexty' is not a metric of fill-mask (did you mean 'perplexity'?)"),
    ("misspelled metric, no evaluation", lambda d: ["--train_file", _txt(d), "--metric_for_best_model", "perplexty",
                                                    "--validation_split", "0"], "'perplexty' is not a metric"),
    ("metric of NER", lambda d: ["--train_file", _txt(d), "--metric_for_best_model", "f1"], "'f1' is not a metric"),
    ("patience without evaluation", lambda d: ["--train_file", _txt(d), "--early_stopping_patience", "1",
                                               "--validation_split", "0"], "there is no evaluation data"),
    ("config value", lambda d: ["--train_file", _txt(d), "--config", text(d / "c.yaml", "mlm_probability: high\n")],
     "mlm_probability: 'high' is not a number"),
    ("config fraction for an integer", lambda d: ["--train_file", _txt(d), "--config",
                                                  text(d / "c.yaml", "max_steps: 2.5\n")],
     "max_steps: 2.5 is not a whole number"),
    ("config is a folder", lambda d: ["--train_file", _txt(d), "--config", str(d)], "is a folder"),
    ("negative scientific learning rate", lambda d: ["--train_file", _txt(d), "--learning_rate", "-1e-4"],
     "--learning_rate must be positive, got -0.0001"),
    ("negative seed", lambda d: ["--train_file", _txt(d), "--seed", "-1"], "--seed/--seeds must be in"),
    ("beta of 1", lambda d: ["--train_file", _txt(d), "--adam_beta1", "1"], "--adam_beta1 must be in [0, 1)"),
    ("negative loader workers", lambda d: ["--train_file", _txt(d), "--dataloader_num_workers", "-1"],
     "--dataloader_num_workers must be 0 or more"),
    ("zero tokenizing workers", lambda d: ["--train_file", _txt(d), "--preprocessing_num_workers", "0"],
     "--preprocessing_num_workers must be 1 or more"),
    ("output below a file", lambda d: ["--train_file", _txt(d), "--output_dir", text(d / "f", "x") + "/out"],
     "is a file, not a folder"),
    ("output in /proc", lambda d: ["--train_file", _txt(d), "--output_dir", "/proc/x"], "cannot be written"),
    ("output holds the corpus", lambda d: ["--train_file", _txt(_mkdir(d / "out")), "--output_dir", str(d / "out"),
                                           "--overwrite_output_dir"],
     "--overwrite_output_dir would delete --train_file"),
    ("output is the model folder", lambda d: ["--train_file", _txt(d), "--model", _copy_model(d), "--output_dir",
                                              str(d / "model"), "--overwrite_output_dir"], "is the --model folder"),
    ("resume without training", lambda d: ["--validation_file", _txt(d), "--no_do_train", "--resume_from_checkpoint",
                                           str(d)], "--resume_from_checkpoint continues a training run"),
    ("only special tokens", lambda d: ["--train_file", _txt(d, "[MASK] [SEP] [CLS]\n" * 40)],
     "has no token that can be masked: its text is only special tokens such as [MASK]"),
    ("nothing left to train on", lambda d: ["--train_file", _txt(d), "--validation_split", "0.99"],
     "--validation_split 0.99 of 40 training rows leaves the training part empty"),
    ("negative mask seed", lambda d: ["--train_file", _txt(d), "--eval_mask_seed", "-1"],
     "--eval_mask_seed must be in"),
    ("mask seed past 64 bits", lambda d: ["--train_file", _txt(d), "--eval_mask_seed", str(2**64)],
     "--eval_mask_seed must be in [0, 2**63)"),
]


@pytest.mark.parametrize("build,message", [c[1:] for c in MLM], ids=[c[0] for c in MLM])
def test_mlm_refuses(build, message, tiny_model, tmp_path):
    refuses(train_mlm.main, build, message, tiny_model, tmp_path)


# ---------------------------------------------------------------------------------------------
# Inputs that were misread or refused, and now read right
# ---------------------------------------------------------------------------------------------

def test_unused_column_of_mixed_types_is_ignored_and_utf16_with_bom_reads(tiny_model, tmp_path):
    """JSON with an unused id column holding 1 and "a2" used to crash classification in Dataset.from_pandas."""
    mixed = jsonf(tmp_path / "t.json", [{"id": i if i % 2 else f"a{i}", "sentence": s, "label": y}
                                        for i, (s, y) in enumerate(cls_rows())])
    utf16 = csv_rows(tmp_path / "v.csv", ["sentence", "label"], cls_rows(10, seed=1), encoding="utf-16")
    res = train_cls.main(["--model", tiny_model, *STEPS, "--train_file", mixed, "--validation_file", utf16,
                          "--text_column", "sentence", "--label_column", "label", "--output_dir", str(tmp_path / "o")])
    assert res["data"]["labels"] == ["neg", "pos"] and res["eval"]["num_examples"] == 10


def test_same_spelling_kept_and_numbers_merged(tiny_model, tmp_path):
    """Stray spaces are stripped (one class), 1 and "1.0" are the same number; CRLF files read the same."""
    data = csv_rows(tmp_path / "t.csv", ["sentence", "label"],
                    [(s, ["pos ", "pos", "neg", " neg"][i % 4]) for i, (s, _) in enumerate(cls_rows())],
                    lineterminator="\r\n")
    assert train_cls.main(["--model", tiny_model, *STEPS, "--train_file", data, "--output_dir",
                           str(tmp_path / "a")])["data"]["labels"] == ["neg", "pos"]
    numbers = jsonf(tmp_path / "n.json", [{"sentence": s, "label": [1, "1.0", 0, 0][i % 4]}
                                          for i, (s, _) in enumerate(cls_rows())])
    assert train_cls.main(["--model", tiny_model, *STEPS, "--train_file", numbers, "--output_dir",
                           str(tmp_path / "b")])["data"]["labels"] == ["0", "1"]


def test_regression_from_one_fraction_is_said_in_the_log_and_reused_files_warned(tiny_model, tmp_path):
    rows = [(s, i % 2) for i, (s, _) in enumerate(cls_rows())]
    rows[4] = (rows[4][0], 0.5)
    data = csv_rows(tmp_path / "t.csv", ["sentence", "label"], rows)
    proc = run_script("train_cls.py", ["--model", tiny_model, *STEPS, "--train_file", data, "--validation_file", data,
                                       "--output_dir", str(tmp_path / "o")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "label column 'label' has 2 fractional value(s) of 80 (first: 0.5 at --train_file" in proc.stderr
    assert "so this is regression" in proc.stderr
    assert "--validation_file is the same file as --train_file" in proc.stderr


def test_ner_lenient_iob1_strict_skips_and_words_as_numbers(tiny_model, tmp_path):
    iob1 = _conll(tmp_path, ner_sents(iob1=True), name="iob1.txt")
    train_ner.main(["--model", tiny_model, *STEPS, "--train_file", iob1, "--output_dir", str(tmp_path / "a")])
    mixed = _conll(tmp_path, ner_sents(40) + ner_sents(8, seed=3, iob1=True), name="mixed.txt")
    res = train_ner.main(["--model", tiny_model, *STEPS, "--train_file", mixed, "--iob_scheme", "IOB2",
                          "--skip_bad_rows", "--output_dir", str(tmp_path / "b")])
    assert res["data"]["splits"]["train"]["skipped_rows"] > 0
    numbers = jsonl(tmp_path / "n.jsonl", _edit(_records(), 2, "tokens", 0, 1984))
    res = train_ner.main(["--model", tiny_model, *STEPS, "--train_file", numbers, "--output_dir", str(tmp_path / "c")])
    assert res["train"]["global_step"] == 2


def test_mlm_old_mac_line_endings_are_lines(tiny_model, tmp_path):
    data = _txt(tmp_path, "\r".join(lines()) + "\r")
    res = train_mlm.main(["--model", tiny_model, *STEPS, "--train_file", data, "--output_dir", str(tmp_path / "o")])
    assert res["data"]["splits"]["train"]["texts"] + res["data"]["splits"]["validation"]["texts"] == 40


def test_multi_run_checks_the_first_run_before_writing(tiny_model, tmp_path):
    data = csv_rows(tmp_path / "t.csv", ["sentence", "label"], cls_rows())
    nothing_written_by(train_cls.main, ["--model", tiny_model, *STEPS, "--train_file", data, "--seeds", "1", "2",
                                        "--metric_for_best_model", "acuracy", "--output_dir", str(tmp_path / "o")],
                       tmp_path)


# ---------------------------------------------------------------------------------------------
# Checkpoints: refused before anything is written; nothing pickled, nothing unpickled
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    """One finished 2-step run with checkpoints per script."""
    d = tmp_path_factory.mktemp("ckpt-runs")
    data = {"cls": csv_rows(d / "t.csv", ["sentence", "label"], cls_rows()), "ner": _conll(d),
            "mlm": _txt(d, name="m.txt")}
    mains = {"cls": train_cls.main, "ner": train_ner.main, "mlm": train_mlm.main}
    for name, main in mains.items():
        main(["--model", tiny_model, *STEPS, "--checkpointing_steps", "1", "--train_file", data[name],
              "--output_dir", str(d / name)])
    return {"dir": d, "data": data, "main": mains}


def _copy_run(runs, script, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(runs["dir"] / script, out)
    return out


class Evil:
    """A pickle that runs a shell command when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("script", ["cls", "ner", "mlm"])
def test_planted_pickles_are_never_opened(runs, script, tiny_model, tmp_path):
    out = _copy_run(runs, script, tmp_path)
    marker = tmp_path / "PWNED"
    ckpt = out / "checkpoints" / "step_2"
    assert not [n for n in os.listdir(ckpt) if n.endswith((".pkl", ".bin", ".pt"))]  # nothing pickled is written
    for name in ("random_states_0.pkl", "optimizer.bin", "pytorch_model.bin", "scaler.pt"):
        with open(ckpt / name, "wb") as fh:
            pickle.dump(Evil(marker), fh)
    argv = ["--model", tiny_model, *STEPS, "--max_steps", "3", "--train_file", runs["data"][script],
            "--output_dir", str(out), "--resume_from_checkpoint", "latest"]
    got = nothing_written_by(runs["main"][script], argv, tmp_path)
    assert "holds files these scripts never write (optimizer.bin, pytorch_model.bin, random_states_0.pkl" in got
    assert not marker.exists()
    # a pickle in the place of the optimizer state is not a safetensors file: refused, never unpickled
    for name in ("random_states_0.pkl", "optimizer.bin", "pytorch_model.bin", "scaler.pt"):
        os.unlink(ckpt / name)
    with open(ckpt / "optimizer.safetensors", "wb") as fh:
        pickle.dump(Evil(marker), fh)
    got = nothing_written_by(runs["main"][script], argv, tmp_path)
    assert "its weights or optimizer state cannot be read" in got and not marker.exists()


DAMAGE = [
    ("truncated weights", lambda c: open(c / "model.safetensors", "r+b").truncate(100), "cannot be read"),
    ("missing optimizer state", lambda c: os.unlink(c / "optimizer.safetensors"), "has no optimizer.safetensors"),
    ("state cut short", lambda c: text(c / "trainer_state.json", '{"global_step": 2, "epo'),
     "trainer_state.json is unreadable"),
    ("state of the wrong type", lambda c: text(c / "trainer_state.json", '{"global_step": "two"}'),
     "trainer_state.json is unreadable ('global_step' is 'two')"),
    ("written by something else", lambda c: text(c / "trainer_state.json", '{"global_step": 2}'),
     "was not written by this version of these scripts"),
]


@pytest.mark.parametrize("damage,message", [d[1:] for d in DAMAGE], ids=[d[0] for d in DAMAGE])
def test_damaged_checkpoint_is_refused_before_anything_is_written(runs, damage, message, tiny_model, tmp_path):
    out = _copy_run(runs, "cls", tmp_path)
    damage(out / "checkpoints" / "step_2")
    got = nothing_written_by(train_cls.main, ["--model", tiny_model, *STEPS, "--max_steps", "3", "--train_file",
                                              runs["data"]["cls"], "--output_dir", str(tmp_path / "new"),
                                              "--resume_from_checkpoint", str(out / "checkpoints" / "step_2")],
                             tmp_path)
    assert message in got, got


def test_latest_skips_a_damaged_checkpoint_and_refuses_when_none_reads(runs, tiny_model, tmp_path):
    from common.training.checkpoint import resolve_resume

    out = _copy_run(runs, "mlm", tmp_path)
    text(out / "checkpoints" / "step_2" / "trainer_state.json", "{")
    assert resolve_resume("latest", str(out / "checkpoints")) == str(out / "checkpoints" / "step_1")
    argv = ["--model", tiny_model, *STEPS, "--max_steps", "3", "--train_file", runs["data"]["mlm"],
            "--output_dir", str(out), "--resume_from_checkpoint", "latest"]
    os.unlink(out / "checkpoints" / "step_1" / "trainer_state.json")  # incomplete: not a checkpoint at all
    got = nothing_written_by(train_mlm.main, argv, tmp_path)
    assert "--resume_from_checkpoint latest: no checkpoint in" in got and "step_2: trainer_state.json" in got


@pytest.mark.parametrize("script,other,extra,message", [
    ("cls", "ner", [], "belongs to a different run (task is 'token-classification' there, 'classification' now)"),
    ("ner", "cls", [], "belongs to a different run (task is 'classification' there"),
    ("mlm", "ner", [], "belongs to a different run"),
    ("mlm", "mlm", ["--line_by_line"], "belongs to a different run (mode is 'packed' there, 'line_by_line' now)"),
    ("cls", "cls", ["--model", "@copy"], "belongs to a different run (model is"),
])
def test_checkpoint_of_another_run_is_refused_before_anything_is_written(runs, script, other, extra, message,
                                                                         tiny_model, tmp_path):
    extra = [_copy_model(tmp_path) if x == "@copy" else x for x in extra]
    argv = ["--model", tiny_model, *STEPS, "--max_steps", "3", "--train_file", runs["data"][script], "--output_dir",
            str(tmp_path / "new"), "--resume_from_checkpoint", str(runs["dir"] / other / "checkpoints" / "step_2"),
            *extra]
    got = nothing_written_by(runs["main"][script], argv, tmp_path)
    assert message in got, got


def test_other_labels_refused_for_ner(runs, tiny_model, tmp_path):
    other = _conll(tmp_path, [(w, [t.replace("PER", "PERSON") for t in ts]) for w, ts in ner_sents()], name="o.txt")
    got = nothing_written_by(train_ner.main, ["--model", tiny_model, *STEPS, "--max_steps", "3", "--train_file", other,
                                              "--output_dir", str(tmp_path / "new"), "--resume_from_checkpoint",
                                              str(runs["dir"] / "ner" / "checkpoints" / "step_2")], tmp_path)
    assert "belongs to a different run (labels is" in got


# ---------------------------------------------------------------------------------------------
# The validation layer's pieces
# ---------------------------------------------------------------------------------------------

def test_declared_metric_names_are_what_evaluation_reports(runs):
    """--metric_for_best_model is checked at start-up against Objective.metric_names: keep them true."""
    from common.training.metrics import MLM_METRICS, NER_METRICS, classification_names

    for script, names in (("cls", classification_names(False, 2)), ("ner", NER_METRICS), ("mlm", MLM_METRICS)):
        with open(runs["dir"] / script / "results.json") as fh:
            reported = {k for k, v in json.load(fh)["eval"].items() if isinstance(v, float)}
        assert set(names) <= reported, (script, set(names) - reported)
    import numpy as np

    from common.training.metrics import classification_metrics, regression_metrics
    assert set(classification_names(False, 3)) - {"loss"} == {
        k for k, v in classification_metrics(np.array([0, 1, 2]), np.array([0, 1, 1]), 3).items()
        if isinstance(v, float)}
    assert set(classification_names(True, 1)) - {"loss"} == set(regression_metrics(np.ones(3), np.arange(3.0)))


def test_label_sanity_helpers():
    assert validate.variant_groups(["pos", "Pos", "neg", "NEG ", "not_ok", '"not ok"']) == [
        ['"not ok"', "not_ok"], ["NEG ", "neg"], ["Pos", "pos"]]
    assert validate.variant_groups(["pos", "neg", "positive"]) == []
    with pytest.raises(UserError, match="mixes numbers and words"):
        validate.check_label_kinds({"train": [1, "pos"]}, {"train": "--train_file 'x'"}, "label")
    validate.check_label_kinds({"train": [1, 0.0], "test": ["a"] * 0}, {"train": "x", "test": "y"}, "label")
    assert [validate.label_value(v, "w", 0, "c") for v in (True, " pos ", "1", 2, 0.5)] == [1, "pos", 1.0, 2, 0.5]
    assert validate.text_values(["a", None, "b"], "w", "c", "--text_column", skip_missing=True) == (["a", "b"], 1)
    with pytest.raises(UserError, match="holds only numbers"):
        validate.text_values(["1", " 2.5", "3e3"], "w", "c", "--text_column")


@pytest.mark.parametrize("tags,scheme,bad", [
    (["B-PER", "I-PER", "O", "B-LOC"], "IOB2", None),
    (["I-PER", "O"], "IOB2", "tag 1 'I-PER' follows 'O'"),
    (["B-PER", "I-LOC"], "IOB2", "tag 2 'I-LOC' follows 'B-PER'"),
    (["S-PER", "O", "B-LOC", "I-LOC", "E-LOC"], "IOBES", None),
    (["B-PER", "O"], "IOBES", "an entity ends with E-PER"),
    (["B-PER"], "IOBES", "the sentence ends inside an entity"),
    (["O", "E-PER"], "IOBES", "I-/E-PER continue an entity begun with B-PER"),
])
def test_tag_sequences_checked_against_the_scheme(tags, scheme, bad):
    from common.data.ner import scheme_error

    got = scheme_error(tags, scheme)
    assert (got is None) if bad is None else (bad in got), got


def test_negative_numbers_in_scientific_notation_reach_the_setting_check():
    from common.config import ModelArguments, TrainArguments, parse_args

    def parse(argv):
        return parse_args([ModelArguments, train_cls.ClsDataArguments, TrainArguments], argv, "")[2]

    assert parse(["--seeds", "1", "2", "--early_stopping_threshold", "-1e-3"]).early_stopping_threshold == -1e-3
    with pytest.raises(UserError, match="--warmup_steps, --max_grad_norm and --weight_decay must not be negative"):
        parse(["--weight_decay", "-1E-2"])
    with pytest.raises(UserError, match="--learning_rate must be a finite number, got -inf"):
        parse(["--learning_rate", "-inf"])


def test_config_values_take_their_settings_types(tmp_path):
    """A YAML scalar for a list setting is a one-item list (not its characters), no_X: true sets X false, and an
    unquoted `no` for a setting whose choices include 'no' is that choice."""
    from common.config import ModelArguments, TrainArguments, parse_args

    cfg = text(tmp_path / "c.yaml", "text_columns: title\nno_group_by_length: true\nmixed_precision: no\n"
                                    "seeds: 7\nlearning_rate: 1e-4\nmax_steps: 3.0\n")
    _, data, args = parse_args([ModelArguments, train_cls.ClsDataArguments, TrainArguments], ["--config", cfg], "")
    assert data.text_columns == ["title"] and args.group_by_length is False and args.mixed_precision == "no"
    assert args.seeds == [7] and args.learning_rate == 1e-4 and args.max_steps == 3
