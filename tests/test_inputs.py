"""Data as people have it (one word per row, compressed files, other encodings, headerless tables), the
canonical task when no data flag is given, evaluation/prediction without training, trackers and the Hub
upload pre-flight. Small files written here; the tiny local model of conftest."""
from __future__ import annotations

import bz2
import csv
import gzip
import json
import lzma
import os
import random
import sys
import time
import zipfile

import pytest

import train_cls
import train_mlm
import train_ner
from common.errors import UserError
from conftest import FAST, ROOT, run_script, toy_sentence, write_csv

WORDS = {"alice": "PER", "bob": "PER", "paris": "LOC", "berlin": "LOC", "acme": "ORG", "globex": "ORG"}
STEPS = ["--max_steps", "3", "--per_device_train_batch_size", "8", "--mixed_precision", "no", "--logging_steps", "1"]


def ner_sentences(n: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words, tags = [], []
        for _ in range(rng.randint(3, 8)):
            if rng.random() < 0.3:
                w = rng.choice(list(WORDS))
                words.append(w)
                tags.append("B-" + WORDS[w])
            else:
                words.append(rng.choice(["the", "went", "to", "movie", "was", "caf\u00e9"]))
                tags.append("O")
        out.append((words, tags))
    return out


def write_word_rows(path, sentences, delimiter=",", encoding="utf-8", fill=True, id_col="Sentence #"):
    """The Kaggle/GMB ner_dataset.csv layout: Sentence #, Word, POS, Tag; the id on a sentence's first row."""
    with open(path, "w", newline="", encoding=encoding) as fh:
        w = csv.writer(fh, delimiter=delimiter)
        w.writerow([id_col, "Word", "POS", "Tag"])
        for i, (words, tags) in enumerate(sentences, 1):
            for j, (word, tag) in enumerate(zip(words, tags)):
                w.writerow([f"Sentence: {i}" if (j == 0 or not fill) else "", word, "NN", tag])
    return str(path)


def compress(path: str, kind: str) -> str:
    target = f"{path}.{kind}"
    with open(path, "rb") as src:
        data = src.read()
    if kind == "zip":
        with zipfile.ZipFile(target, "w") as zf:
            zf.writestr(os.path.basename(path), data)
    else:
        with {"gz": gzip.open, "bz2": bz2.open, "xz": lzma.open}[kind](target, "wb") as out:
            out.write(data)
    os.unlink(path)
    return target


def ner(tiny_model, out, *extra):
    return train_ner.main(["--model", tiny_model, "--output_dir", str(out), *STEPS, *extra])


# ---------------------------------------------------------------------------------------------
# One word per row (NER)
# ---------------------------------------------------------------------------------------------

def test_one_word_per_row_latin1_zip_trains_with_sentences_kept(tiny_model, tmp_path):
    train, dev = ner_sentences(40), ner_sentences(9, seed=1)
    tr = compress(write_word_rows(tmp_path / "ner_dataset.csv", train, encoding="latin-1"), "zip")
    dv = write_word_rows(tmp_path / "dev.csv", dev, encoding="latin-1")
    res = ner(tiny_model, tmp_path / "o", "--train_file", tr, "--validation_file", dv, "--encoding", "latin-1")
    assert res["data"]["sizes"] == {"train": 40, "validation": 9}  # sentences, not rows
    assert res["eval"]["num_words"] == sum(len(w) for w, _ in dev)
    lines = (tmp_path / "o" / "predictions_eval.conll").read_text(encoding="utf-8").split("\n\n")
    assert [ln.split()[0] for ln in lines[0].splitlines()] == dev[0][0]  # file order, words decoded
    assert "caf\u00e9" in (tmp_path / "o" / "predictions_eval.conll").read_text(encoding="utf-8")


@pytest.mark.parametrize("delimiter,ext", [(",", "csv"), ("\t", "tsv")])
def test_one_word_per_row_ids_on_every_row_and_tsv(tiny_model, tmp_path, delimiter, ext):
    train = ner_sentences(30)
    tr = write_word_rows(tmp_path / f"train.{ext}", train, delimiter=delimiter, fill=False, id_col="sentence_id")
    res = ner(tiny_model, tmp_path / "o", "--train_file", tr, "--validation_split", "0.2")
    assert res["data"]["sizes"] == {"train": 24, "validation": 6}


def test_one_word_per_row_kfold_by_sentence(tiny_model, tmp_path):
    tr = write_word_rows(tmp_path / "train.csv", ner_sentences(30))
    summary = ner(tiny_model, tmp_path / "k", "--train_file", tr, "--kfold", "2", "--validation_split", "0")
    assert summary["num_runs"] == 2
    held = [json.loads((tmp_path / "k" / f"fold_{k}" / "results.json").read_text())["data"]["sizes"]["test"]
            for k in (1, 2)]
    assert sum(held) == 30


def test_word_rows_without_sentence_id_are_refused_not_misread(tiny_model, tmp_path):
    path = tmp_path / "words.csv"
    write_csv(path, ["Word", "POS", "Tag"], [(w, "NN", t) for words, tags in ner_sentences(5) for w, t in
                                            zip(words, tags)])
    with pytest.raises(UserError, match="one word per row.*--sentence_id_column"):
        ner(tiny_model, tmp_path / "o", "--train_file", str(path), "--tokens_column", "Word", "--tags_column", "Tag")
    assert not (tmp_path / "o").exists()


def test_sentence_rows_must_be_contiguous(tiny_model, tmp_path):
    path = tmp_path / "t.csv"
    write_csv(path, ["Sentence #", "Word", "Tag"], [("s1", "alice", "B-PER"), ("s2", "went", "O"),
                                                    ("s1", "paris", "B-LOC")])
    with pytest.raises(UserError, match="row 3: sentence id 's1'.*row 1.*contiguous"):
        ner(tiny_model, tmp_path / "o", "--train_file", str(path))


def test_sentence_per_row_table_with_a_sentence_column_is_unchanged(tiny_model, tmp_path):
    """GMB's sentence-per-row CSV also has 'Sentence #': its words are space-joined, so not word rows."""
    res = ner(tiny_model, tmp_path / "o", "--train_file", os.path.join(ROOT, "tests", "fixtures", "ner_gmb.csv"),
              "--validation_split", "0")
    assert res["data"]["sizes"]["train"] == 3


# ---------------------------------------------------------------------------------------------
# Compressed files, encodings, headerless tables
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gz", "bz2", "xz", "zip"])
def test_compressed_csv_trains(tiny_model, sentiment_files, tmp_path, kind):
    import shutil

    shutil.copy(sentiment_files["train"], tmp_path / "train.csv")
    train = compress(str(tmp_path / "train.csv"), kind)
    res = train_cls.main(["--model", tiny_model, "--train_file", train, "--validation_file", sentiment_files["dev"],
                          "--output_dir", str(tmp_path / "o"), *STEPS])
    assert res["data"]["sizes"]["train"] == 240 and res["eval"]["num_examples"] == 61


def test_compressed_conll_and_text(tiny_model, tmp_path):
    from test_ner import write_conll

    conll = compress(write_conll(tmp_path / "train.txt", ner_sentences(20)), "gz")
    assert ner(tiny_model, tmp_path / "n", "--train_file", conll)["data"]["sizes"]["train"] == 18
    text = tmp_path / "wiki.train.tokens"
    text.write_text("\n".join(toy_sentence(random.Random(i), i % 2) for i in range(40)), encoding="utf-8")
    res = train_mlm.main(["--model", tiny_model, "--train_file", compress(str(text), "xz"), "--output_dir",
                          str(tmp_path / "m"), *STEPS, "--max_length", "32"])
    assert res["data"]["splits"]["train"]["texts"] == 38


def test_zip_with_several_files_names_them(tiny_model, tmp_path):
    path = tmp_path / "data.csv.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("train.csv", "sentence,label\na,1\n")
        zf.writestr("test.csv", "sentence,label\nb,0\n")
    with pytest.raises(UserError, match="zip archive with 2 files .*'train.csv', 'test.csv'"):
        train_cls.main(["--model", tiny_model, "--train_file", str(path), "--output_dir", str(tmp_path / "o")])


def test_latin1_file_error_names_the_byte_and_the_flag(tiny_model, tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("sentence,label\ngood caf\u00e9,pos\nbad film,neg\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"line 2: byte 0xe9 .*looks like Windows-1252 .*--encoding cp1252"):
        train_cls.main(["--model", tiny_model, "--train_file", str(path), "--output_dir", str(tmp_path / "o")])
    with pytest.raises(UserError, match="--encoding 'klingon' is not a text encoding"):
        train_cls.main(["--model", tiny_model, "--train_file", str(path), "--encoding", "klingon"])


def test_headerless_tsv_is_detected_and_read_with_column_names(tiny_model, sentiment_files, tmp_path):
    with open(sentiment_files["train"], encoding="utf-8") as fh:
        rows = list(csv.reader(fh))[1:]
    path = tmp_path / "train.tsv"
    path.write_text("".join(f"{i}\t{label}\t{text}\n" for i, (text, label) in enumerate(rows)), encoding="utf-8")
    with pytest.raises(UserError, match="seems to have no header row.*'0' is a number.*--column_names"):
        train_cls.main(["--model", tiny_model, "--train_file", str(path), "--output_dir", str(tmp_path / "o")])
    with pytest.raises(UserError, match="has 3 columns but --column_names gives 2"):
        train_cls.main(["--model", tiny_model, "--train_file", str(path), "--column_names", "id", "sentence",
                        "--output_dir", str(tmp_path / "o")])
    res = train_cls.main(["--model", tiny_model, "--train_file", str(path), "--column_names", "id", "label",
                          "sentence", "--text_column", "sentence", "--output_dir", str(tmp_path / "o"), *STEPS])
    assert res["data"]["sizes"]["train"] + res["data"]["sizes"]["validation"] == 240


@pytest.mark.parametrize("header,why", [(["a", "a.1"], "repeats"), (["img001.jpg", "x"], "file name"),
                                        (["this movie was a very good one indeed", "x"], "sentence")])
def test_header_heuristics(header, why):
    from common.data.loading import header_looks_like_data

    assert why in header_looks_like_data(header)
    assert header_looks_like_data(["#1 String", "Quality", "Unnamed: 0", "title"]) is None


# ---------------------------------------------------------------------------------------------
# The headline command and the Hub offline
# ---------------------------------------------------------------------------------------------

def test_no_data_flags_announces_the_canonical_task_and_fails_fast_offline(tiny_model, tmp_path):
    start = time.perf_counter()
    proc = run_script("train_cls.py", ["--model", tiny_model, "--output_dir", str(tmp_path / "o")],
                      env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert "no data flags given: training on the canonical task, Hub dataset 'nyu-mll/glue' (config mrpc)" \
        in proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: --dataset 'nyu-mll/glue'") and "--train_file" in error and "Traceback" \
        not in proc.stderr
    assert time.perf_counter() - start < 120  # imports only: no retries
    # any data flag turns the default off
    with pytest.raises(UserError, match="no training data"):
        train_cls.main(["--model", tiny_model, "--text_column", "x"])


def test_hub_model_offline_fails_in_one_sentence(tmp_path, monkeypatch):
    from common import hub

    monkeypatch.setattr(hub, "_probe", (False, "https://huggingface.co cannot be reached: test"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with pytest.raises(UserError, match="Hub is not reachable .*not in the local cache; pass a local folder"):
        train_cls.main(["--model", "nobody/not-a-cached-model", "--train_file", "x.csv", "--output_dir",
                        str(tmp_path / "o")])


def test_unreachable_probe_is_quick(monkeypatch):
    from huggingface_hub import constants

    from common import hub

    monkeypatch.setattr(hub, "_probe", None)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    start = time.perf_counter()
    assert "cannot be reached" in hub.unreachable()
    assert time.perf_counter() - start < 10


# ---------------------------------------------------------------------------------------------
# Evaluate and predict without training
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cls_trained(tiny_model, sentiment_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("cls") / "trained"
    res = train_cls.main(["--model", tiny_model, "--train_file", sentiment_files["train"], "--validation_file",
                          sentiment_files["dev"], "--test_file", sentiment_files["test"], "--output_dir", str(out),
                          *FAST, "--learning_rate", "3e-3"])
    return out, res


def test_cls_no_train_eval_equals_end_of_training(cls_trained, sentiment_files, tmp_path):
    out, res = cls_trained
    again = train_cls.main(["--model", str(out), "--no_do_train", "--validation_file", sentiment_files["dev"],
                            "--test_file", sentiment_files["test"], "--output_dir", str(tmp_path / "e"),
                            "--per_device_train_batch_size", "16", "--mixed_precision", "no"])
    for split in ("eval", "test"):
        for k, v in res[split].items():
            if isinstance(v, float):
                assert again[split][k] == pytest.approx(v, abs=1e-6), (split, k)
    with open(tmp_path / "e" / "predictions_eval.csv") as a, open(out / "predictions_eval.csv") as b:
        new, old = list(csv.DictReader(a)), list(csv.DictReader(b))
    assert [r["predicted"] for r in new] == [r["predicted"] for r in old] and len(new) == 61
    assert all(abs(float(x["prob_pos"]) - float(y["prob_pos"])) < 1e-5 for x, y in zip(new, old))
    assert "train" not in again and json.loads((tmp_path / "e" / "results.json").read_text())["eval"]
    assert not (tmp_path / "e" / "model.safetensors").exists()


def test_cls_predict_unlabelled_file_streams_in_file_order(cls_trained, tmp_path):
    out, _ = cls_trained
    rng = random.Random(5)
    texts = [toy_sentence(rng, i % 2, n=rng.randint(2, 30)) for i in range(53)]
    path = write_csv(tmp_path / "new.csv", ["sentence"], [(t,) for t in texts])
    res = train_cls.main(["--model", str(out), "--no_do_train", "--test_file", path, "--output_dir",
                          str(tmp_path / "p"), "--per_device_eval_batch_size", "4"])
    assert res["test"]["num_examples"] == 53 and res["test"]["predictions_per_second"] > 0
    with open(tmp_path / "p" / "predictions_test.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["sentence"] for r in rows] == texts and all(r["gold"] == "" for r in rows)
    assert {r["predicted"] for r in rows} <= {"neg", "pos"}


def test_cls_no_train_unknown_labels(cls_trained, tmp_path):
    out, _ = cls_trained
    path = write_csv(tmp_path / "dev.csv", ["sentence", "label"], [("good film", "pos"), ("bad", "meh")])
    with pytest.raises(UserError, match=r"labels \['meh'\].*does not know.*--allow_unseen_labels"):
        train_cls.main(["--model", str(out), "--no_do_train", "--validation_file", path, "--output_dir",
                        str(tmp_path / "a")])
    res = train_cls.main(["--model", str(out), "--no_do_train", "--validation_file", path, "--output_dir",
                          str(tmp_path / "b"), "--allow_unseen_labels"])
    assert res["eval"]["num_examples"] == 2 and res["eval"]["accuracy"] <= 0.5  # the unseen one counts as wrong


def test_no_train_needs_a_trained_head(tiny_model, sentiment_files, tmp_path):
    with pytest.raises(UserError, match="BertForMaskedLM checkpoint, not a trained .*--no_do_train needs a model"):
        train_cls.main(["--model", tiny_model, "--no_do_train", "--validation_file", sentiment_files["dev"],
                        "--output_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
    with pytest.raises(UserError, match="--no_do_train evaluates or predicts files"):
        train_cls.main(["--model", tiny_model, "--no_do_train"])


def test_ner_and_mlm_no_train_equal_end_of_training(tiny_model, tmp_path):
    from test_ner import write_conll

    train = write_conll(tmp_path / "train.txt", ner_sentences(40))
    dev = write_conll(tmp_path / "dev.txt", ner_sentences(11, seed=3))
    res = ner(tiny_model, tmp_path / "n", "--train_file", train, "--validation_file", dev)
    again = train_ner.main(["--model", str(tmp_path / "n"), "--no_do_train", "--validation_file", dev,
                            "--output_dir", str(tmp_path / "n2"), "--per_device_train_batch_size", "8",
                            "--mixed_precision", "no"])
    assert again["eval"]["f1"] == pytest.approx(res["eval"]["f1"], abs=1e-6)
    assert again["eval"]["loss"] == pytest.approx(res["eval"]["loss"], abs=1e-6)
    unlabelled = tmp_path / "words.txt"
    unlabelled.write_text("alice\nwent\n\nbob\nparis\n", encoding="utf-8")
    pred = train_ner.main(["--model", str(tmp_path / "n"), "--no_do_train", "--test_file", str(unlabelled),
                           "--output_dir", str(tmp_path / "n3")])
    assert pred["test"]["num_examples"] == 2
    blocks = (tmp_path / "n3" / "predictions_test.conll").read_text().strip().split("\n\n")
    assert [[ln.split()[0] for ln in b.splitlines()] for b in blocks] == [["alice", "went"], ["bob", "paris"]]

    text = tmp_path / "t.txt"
    text.write_text("\n".join(toy_sentence(random.Random(i), i % 2) for i in range(60)), encoding="utf-8")
    mlm = train_mlm.main(["--model", tiny_model, "--train_file", str(text), "--output_dir", str(tmp_path / "m"),
                          *STEPS, "--max_length", "32"])
    again = train_mlm.main(["--model", str(tmp_path / "m"), "--no_do_train", "--train_file", str(text),
                            "--output_dir", str(tmp_path / "m2"), "--per_device_train_batch_size", "8",
                            "--mixed_precision", "no", "--max_length", "32"])
    assert again["eval"]["perplexity"] == pytest.approx(mlm["eval"]["perplexity"], rel=1e-6)
    assert again["eval"]["masked_tokens"] == mlm["eval"]["masked_tokens"]


def test_no_train_two_processes_equal_one(cls_trained, sentiment_files, tmp_path):
    out, res = cls_trained
    proc = run_script("train_cls.py", ["--model", str(out), "--no_do_train", "--validation_file",
                                       sentiment_files["dev"], "--output_dir", str(tmp_path / "two"),
                                       "--per_device_eval_batch_size", "7"],
                      launcher=[sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                                "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["setup"]["num_processes"] == 2 and two["eval"]["num_examples"] == 61
    assert two["eval"]["accuracy"] == pytest.approx(res["eval"]["accuracy"], abs=1e-6)
    assert two["eval"]["loss"] == pytest.approx(res["eval"]["loss"], abs=1e-5)


# ---------------------------------------------------------------------------------------------
# Trackers and the Hub upload
# ---------------------------------------------------------------------------------------------

def test_tensorboard_writes_events_and_a_missing_tracker_stops_before_training(tiny_model, sentiment_files, tmp_path,
                                                                               monkeypatch):
    pytest.importorskip("tensorboard")
    argv = ["--model", tiny_model, "--train_file", sentiment_files["train"], *STEPS]
    train_cls.main([*argv, "--output_dir", str(tmp_path / "tb"), "--report_to", "tensorboard"])
    events = [f for _, _, files in os.walk(tmp_path / "tb") for f in files if f.startswith("events.out.tfevents")]
    assert events
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: False)
    with pytest.raises(UserError, match="tensorboard package is not installed.*pip install tensorboard"):
        train_cls.main([*argv, "--output_dir", str(tmp_path / "no"), "--report_to", "tensorboard"])
    with pytest.raises(UserError, match="'tensorbored' is not a tracker"):
        train_cls.main([*argv, "--output_dir", str(tmp_path / "no"), "--report_to", "tensorbored"])
    assert not (tmp_path / "no").exists()


def test_push_to_hub_preflight_and_upload(tiny_model, sentiment_files, tmp_path, monkeypatch):
    import huggingface_hub

    from common import hub

    argv = ["--model", tiny_model, "--train_file", sentiment_files["train"], *STEPS, "--push_to_hub"]
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(UserError, match="needs a Hugging Face token.*hf auth login"):
        train_cls.main([*argv, "--output_dir", str(tmp_path / "a")])
    assert not (tmp_path / "a").exists()
    monkeypatch.setattr(hub, "_probe", (False, "https://huggingface.co cannot be reached: test"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(UserError, match="Hub is not reachable"):
        train_cls.main([*argv, "--output_dir", str(tmp_path / "a"), "--hub_token", "hf_x"])
    calls = []
    monkeypatch.setattr(hub, "_probe", (True, ""))
    monkeypatch.setattr(huggingface_hub.HfApi, "whoami", lambda self: {"name": "someone"})
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create",
                                                                                                         repo_id)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, **kw: calls.append(("upload", kw["repo_id"], kw["folder_path"])))
    res = train_cls.main([*argv, "--output_dir", str(tmp_path / "mymodel"), "--hub_token", "hf_x"])
    assert res["train"]["global_step"] == 3
    assert calls == [("create", "someone/mymodel"), ("upload", "someone/mymodel", str(tmp_path / "mymodel"))]


def test_ner_and_mlm_no_train_two_processes_equal_one(tiny_model, tmp_path):
    """Streaming predictions stay in file order across processes; evaluation is exact (every row once)."""
    from test_ner import write_conll

    train = write_conll(tmp_path / "train.txt", ner_sentences(30))
    ner(tiny_model, tmp_path / "n", "--train_file", train, "--validation_split", "0")
    unlabelled = tmp_path / "words.txt"
    sentences = ner_sentences(23, seed=7)
    unlabelled.write_text("\n\n".join("\n".join(words) for words, _ in sentences) + "\n", encoding="utf-8")
    text = tmp_path / "t.txt"
    text.write_text("\n".join(toy_sentence(random.Random(i), i % 2) for i in range(50)), encoding="utf-8")
    runs = {}
    for n in (1, 2):
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"] if n == 2 else None
        for script, args in (("train_ner.py", ["--model", str(tmp_path / "n"), "--test_file", str(unlabelled),
                                               "--per_device_eval_batch_size", "3"]),
                             ("train_mlm.py", ["--model", str(tmp_path / "n"), "--validation_file", str(text),
                                               "--max_length", "32", "--per_device_eval_batch_size", "3"])):
            if script == "train_mlm.py":  # an MLM model to evaluate: a few steps of MLM from the tiny model
                if n == 1:
                    train_mlm.main(["--model", tiny_model, "--train_file", str(text), "--output_dir",
                                    str(tmp_path / "m"), *STEPS, "--max_length", "32"])
                args[1] = str(tmp_path / "m")
            out = tmp_path / f"{script[:-3]}_{n}"
            proc = run_script(script, [*args, "--no_do_train", "--output_dir", str(out)], launcher=launcher)
            assert proc.returncode == 0, proc.stderr[-3000:]
            runs[script, n] = out
    one, two = (runs["train_ner.py", n] / "predictions_test.conll" for n in (1, 2))
    assert two.read_text() == one.read_text()
    assert [b.split()[0] for b in one.read_text().strip().split("\n\n")] == [w[0] for w, _ in sentences]
    ppl = [json.loads((runs["train_mlm.py", n] / "results.json").read_text())["eval"] for n in (1, 2)]
    assert ppl[1]["masked_tokens"] == ppl[0]["masked_tokens"]
    # the same rows and masks; fp32 sums over other padded batch shapes differ in the last digits (2e-5 seen on AVX-512)
    assert ppl[1]["perplexity"] == pytest.approx(ppl[0]["perplexity"], rel=1e-4)
