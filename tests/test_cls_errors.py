"""Bad input: one clear sentence naming the file/column/row/flag, a non-zero exit, nothing written."""
from __future__ import annotations

import json
import os
import random

import pytest

import train_cls
from common.errors import UserError
from conftest import FAST, run_script, toy_sentence, write_csv


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    rng = random.Random(5)
    good = [(toy_sentence(rng, y), y) for y in [0, 1] * 20]
    f = {
        "good": write_csv(d / "good.csv", ["sentence", "label"], good),
        "ambiguous": write_csv(d / "amb.csv", ["id", "text", "label"], [(i, s, y) for i, (s, y) in enumerate(good)]),
        "null_text": write_csv(d / "null.csv", ["sentence", "label"], good[:5] + [("", 1)] + good[5:]),
        "nan_label": write_csv(d / "nanl.csv", ["sentence", "label"], good[:3] + [("a b", "")] + good[3:]),
        "inf_label": write_csv(d / "infl.csv", ["sentence", "label"], good[:3] + [("a b", "inf")] + good[3:]),
        "one_class": write_csv(d / "one.csv", ["sentence", "label"], [(s, 1) for s, _ in good]),
        "header_only": write_csv(d / "header.csv", ["sentence", "label"], []),
        "no_label": write_csv(d / "nolabel.csv", ["sentence", "target"], good),
        "labelz": write_csv(d / "labelz.csv", ["sentence", "labl"], good),
        "fractional": write_csv(d / "frac.csv", ["sentence", "label"], good[:4] + [("a b", "0.5")] + good[4:]),
        "unseen_dev": write_csv(d / "unseen.csv", ["sentence", "label"], good[:5] + [("a b", 7)]),
    }
    (d / "ragged.csv").write_text("sentence,label\na good film,1\na,bad,film,0\n")
    f["ragged"] = str(d / "ragged.csv")
    (d / "weightless").mkdir()
    (d / "weightless" / "config.json").write_text('{"model_type": "bert", "vocab_size": 130, "hidden_size": 32, '
                                                  '"num_hidden_layers": 2, "num_attention_heads": 2, '
                                                  '"intermediate_size": 64, "max_position_embeddings": 128}')
    f["weightless"] = str(d / "weightless")
    (d / "a_file").write_text("x")
    f["a_file"] = str(d / "a_file")
    (d / "empty.csv").write_text("")
    f["empty"] = str(d / "empty.csv")
    (d / "data.xlsx").write_text("x")
    f["xlsx"] = str(d / "data.xlsx")
    (d / "latin1.csv").write_bytes("sentence,label\ncaf\xe9 good,1\nbad film,0\n".encode("latin-1"))
    f["latin1"] = str(d / "latin1.csv")
    (d / "broken.json").write_text('[{"sentence": "a", "label": 1}, {"sentence": ')
    f["broken_json"] = str(d / "broken.json")
    (d / "plain.txt").write_text("a good film\nbad film\n")
    f["plain_txt"] = str(d / "plain.txt")
    return f


CASES = [
    # (id, train key or literal, extra args, expected message fragment)
    ("missing file", "/nonexistent/train.csv", [], "--train_file '/nonexistent/train.csv' does not exist"),
    ("unknown extension", "xlsx", [], "unsupported extension '.xlsx'"),
    ("empty file", "empty", [], "is empty"),
    ("txt without tabs", "plain_txt", [], "is a .txt file without tab-separated columns"),
    ("header only", "header_only", [], "has a header but no rows"),
    ("not utf-8", "latin1", [], "is not valid utf-8 text; the file looks like Windows-1252"),
    ("malformed json", "broken_json", [], "could not be parsed as json"),
    ("ambiguous columns", "ambiguous", [], "text columns are ambiguous among 'id', 'text', 'label'"),
    ("misspelled column", "good", ["--text_column", "sentense"],
     "no column 'sentense' (from --text_column) (did you mean 'sentence'?)"),
    ("no label column", "no_label", [], "cannot tell the label column"),
    ("misspelled label flag", "labelz", ["--label_column", "label"], "(did you mean 'labl'?)"),
    ("null text", "null_text", [], "row 6: text column 'sentence' is empty"),
    ("missing label", "nan_label", [], "row 4: label column 'label' is empty"),
    ("infinite label", "inf_label", [], "row 4: label column 'label' is NaN/inf"),
    ("one class", "one_class", [], "has only one value"),
    ("max_length above model", "good", ["--max_length", "4096"], "--max_length 4096 is above the model's limit of 128"),
    ("max_length too small", "good", ["--max_length", "2"], "--max_length must be greater than 2"),
    ("model path missing", "good", ["--model", "/nonexistent/model"], "--model '/nonexistent/model'"),
    ("zero batch size", "good", ["--per_device_train_batch_size", "0"],
     "--per_device_train_batch_size must be a positive"),
    ("negative learning rate", "good", ["--learning_rate", "-1"], "--learning_rate must be positive"),
    ("eval_steps without eval data", "good", ["--eval_steps", "5", "--validation_split", "0"],
     "--eval_steps was given but there is no evaluation data"),
    ("unknown flag", "good", ["--learning_rat", "1e-3"],
     "unknown argument '--learning_rat' (did you mean '--learning_rate'?)"),
    ("bad checkpointing", "good", ["--checkpointing_steps", "often"],
     "--checkpointing_steps must be a positive integer or 'epoch'"),
    ("resume from missing", "good", ["--resume_from_checkpoint", "/nonexistent/ckpt"],
     "--resume_from_checkpoint '/nonexistent/ckpt' does not exist"),
    ("fp16 on cpu", "good", ["--mixed_precision", "fp16"], "fp16 is not supported on CPU"),
    ("ragged csv", "ragged", [], "could not be parsed as csv"),
    ("unknown scheduler", "good", ["--lr_scheduler_type", "cosin"],
     "argument --lr_scheduler_type: invalid choice: 'cosin' (choose from 'linear', 'cosine',"),
    ("fractional class labels", "fractional", ["--task_type", "classification"],
     "row 5: label 0.5 in column 'label' is not a whole number"),
    ("label unseen in training", "good", ["--validation_file", "@unseen_dev"],
     "has labels ['7'] that never occur in --train_file"),
    ("model dir without weights", "good", ["--model", "@weightless"], "could not be loaded"),
    ("output_dir is a file", "good", ["--output_dir", "@a_file"], "is a file; pass a folder"),
    ("warmup ratio out of range", "good", ["--warmup_ratio", "1.5"], "--warmup_ratio must be in [0, 1)"),
    ("non-numeric flag value", "good", ["--num_train_epochs", "three"], "invalid float value: 'three'"),
    ("bad split fraction", "good", ["--validation_split", "1.2"], "--validation_split must be a fraction in [0, 1)"),
]


@pytest.mark.parametrize("name,train,extra,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_error_and_writes_nothing(name, train, extra, message, bad_files, tiny_model, tmp_path):
    out = tmp_path / "out"
    extra = [bad_files[x[1:]] if x.startswith("@") else x for x in extra]
    args = ["--model", tiny_model, "--train_file", bad_files.get(train, train), "--output_dir", str(out), *FAST, *extra]
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(UserError) as err:
        train_cls.main(args)
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert sorted(os.listdir(tmp_path)) == before  # nothing written


def test_too_little_disk_is_refused_before_training(bad_files, tiny_model, tmp_path, monkeypatch):
    import shutil

    from common.runs import reporting

    monkeypatch.setattr(reporting.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 2**20, 2**20))
    with pytest.raises(UserError, match="only 1 MiB free"):
        train_cls.main(["--model", tiny_model, "--train_file", bad_files["good"], "--output_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_resume_into_a_different_label_set_is_refused(bad_files, tiny_model, tmp_path):
    out = tmp_path / "o"
    train_cls.main(["--model", tiny_model, "--train_file", bad_files["good"], "--output_dir", str(out), *FAST,
                    "--checkpointing_steps", "1", "--max_steps", "2"])
    ckpt = str(out / "checkpoints" / "step_2")
    rng = random.Random(3)
    other = write_csv(tmp_path / "other.csv", ["sentence", "label"],
                      [(toy_sentence(rng, y), "ab"[y]) for y in [0, 1] * 10])
    with pytest.raises(UserError, match="belongs to a different run \\(labels is"):
        train_cls.main(["--model", tiny_model, "--train_file", other, "--output_dir", str(out), *FAST,
                        "--resume_from_checkpoint", ckpt])
    assert json.loads((out / "results.json").read_text())["train"]["global_step"] == 2  # untouched


def test_cli_prints_one_line_and_exits_2(bad_files, tiny_model, tmp_path):
    out = tmp_path / "out"
    proc = run_script("train_cls.py", ["--model", tiny_model, "--train_file", bad_files["ambiguous"],
                                       "--output_dir", str(out)])
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and "ambiguous" in lines[-1]
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_config_file_defaults_and_flags_win(bad_files, tiny_model, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model_name_or_path: {tiny_model}\nlearning_rate: 0.5\nmax_steps: 2\nlogging_steps: 1\n")
    out = tmp_path / "out"
    res = train_cls.main(["--config", str(cfg), "--train_file", bad_files["good"], "--output_dir", str(out),
                          "--learning_rate", "1e-3", "--mixed_precision", "no"])
    assert res["train"]["global_step"] == 2
    import yaml

    saved = yaml.safe_load((out / "training_args.yaml").read_text())
    assert saved["learning_rate"] == 1e-3 and saved["model"] == tiny_model and saved["max_steps"] == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rte: 1\n")
    with pytest.raises(UserError, match="unknown setting 'learning_rte' \\(did you mean 'learning_rate'\\?\\)"):
        train_cls.main(["--config", str(bad), "--train_file", bad_files["good"], "--output_dir", str(tmp_path / "o2")])


def test_label_only_in_validation_gets_an_id(tiny_model, tmp_path):
    rng = random.Random(9)
    train = write_csv(tmp_path / "t.csv", ["text", "label"],
                      [(toy_sentence(rng, y), ["neg", "pos"][y]) for y in [0, 1] * 20])
    dev = write_csv(tmp_path / "d.csv", ["text", "label"],
                    [(toy_sentence(rng, 1), "mixed"), (toy_sentence(rng, 0), "neg")])
    res = train_cls.main(["--model", tiny_model, "--train_file", train, "--validation_file", dev,
                          "--output_dir", str(tmp_path / "o"), *FAST, "--allow_unseen_labels"])
    assert res["data"]["labels"] == ["mixed", "neg", "pos"]
    assert len(res["eval"]["confusion_matrix"]) == 3


def test_tab_separated_txt_reads_as_tsv(tmp_path):
    """The MSR paraphrase corpus ships as tab-separated .txt with bare quotes in the text."""
    from common.data import loading

    path = tmp_path / "msr_test.txt"
    path.write_text("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
                    '1\t1089874\t1089925\tPCCW \'s chief said "yes\tHe said "yes" too\n'
                    "0\t3019446\t3019327\tA b c\tD e f\n", encoding="utf-8")
    df = loading.read_table(str(path), "--test_file")
    assert list(df.columns) == ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"] and len(df) == 2
    assert df["#1 String"][0] == 'PCCW \'s chief said "yes'
