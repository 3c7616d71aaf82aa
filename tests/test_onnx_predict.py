"""--no_do_train on a folder export.py wrote: ONNX Runtime scores a file as the PyTorch folder does (the same metrics
within the export's tolerance, the same predictions files in file order), int8 or fp32 by --onnx_model, and
everything it cannot do refused in one sentence. Each model is trained a few steps and exported once."""
from __future__ import annotations

import csv
import json
import os
import random
import shutil
from types import SimpleNamespace

import pytest

from conftest import ENTITY, FAST, FILLER, toy_sentence, write_csv

pytest.importorskip("onnxruntime", reason="pip install -r requirements-export.txt")
pytest.importorskip("onnxscript", reason="pip install -r requirements-export.txt")

import export  # noqa: E402
import train_cls  # noqa: E402
import train_mlm  # noqa: E402
import train_ner  # noqa: E402
from common.errors import UserError  # noqa: E402
from common.shipping import onnx_predict  # noqa: E402

KIND = {w: k for k, words in (("LOC", ENTITY[:3]), ("PER", ENTITY[3:6]), ("ORG", ENTITY[6:])) for w in words}
NO_TRAIN = ["--no_do_train", "--per_device_eval_batch_size", "4", "--mixed_precision", "no"]


def ner_sentences(n: int, seed: int, long_every: int = 5) -> list:
    """Toy tagged sentences; every `long_every`-th one is longer than a 16-token window."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [rng.choice(FILLER + ENTITY) for _ in range(rng.randint(20, 26) if i % long_every == 0 else
                                                             rng.randint(2, 7))]
        out.append((words, [f"B-{KIND[w]}" if w in KIND else "O" for w in words]))
    return out


def write_conll(path, sentences, tagged: bool = True) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        for words, tags in sentences:
            fh.write("".join(f"{w} {t}\n" if tagged else f"{w}\n" for w, t in zip(words, tags)) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def cls(tiny_model, sentiment_files, tmp_path_factory):
    """A classifier that learnt the toy rule (8 short epochs), exported with int8 (parity and agreement on dev)."""
    root = tmp_path_factory.mktemp("onnx-cls")
    train_cls.main(["--model", tiny_model, "--train_file", sentiment_files["train"], "--output_dir", str(root / "pt"),
                    *FAST, "--num_train_epochs", "8", "--learning_rate", "3e-3", "--validation_split", "0"])
    report = export.main(["--model", str(root / "pt"), "--output_dir", str(root / "onnx"), "--quantize", "int8",
                          "--data", sentiment_files["dev"]])
    return SimpleNamespace(pt=str(root / "pt"), onnx=str(root / "onnx"), report=report)


@pytest.fixture(scope="module")
def ner(tiny_model, tmp_path_factory):
    """A tagger trained a few steps with 16-token windows (training_args.yaml carries max_length 16 into the
    export), exported in fp32 only."""
    root = tmp_path_factory.mktemp("onnx-ner")
    train = write_conll(root / "train.txt", ner_sentences(48, seed=0))
    train_ner.main(["--model", tiny_model, "--train_file", train, "--output_dir", str(root / "pt"), *FAST,
                    "--max_steps", "24", "--learning_rate", "5e-3", "--max_length", "16", "--validation_split", "0"])
    export.main(["--model", str(root / "pt"), "--output_dir", str(root / "onnx")])
    return SimpleNamespace(pt=str(root / "pt"), onnx=str(root / "onnx"), root=root)


def read_csv(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def results(folder) -> dict:
    with open(os.path.join(folder, "results.json"), encoding="utf-8") as fh:
        return json.load(fh)


def test_classifier_folder_scores_like_pytorch_fp32_and_int8(cls, sentiment_files, tmp_path, monkeypatch):
    rng = random.Random(7)
    texts = [toy_sentence(rng, i % 2, n=rng.randint(1, 30)) for i in range(37)]
    new = write_csv(tmp_path / "new.csv", ["sentence"], [(t,) for t in texts])
    monkeypatch.setattr(onnx_predict, "WINDOW_BATCHES", 2)  # unlabelled rows sorted in windows of 8: 5 windows
    files = ["--validation_file", sentiment_files["dev"], "--test_file", new]
    pt = train_cls.main(["--model", cls.pt, *NO_TRAIN, *files, "--output_dir", str(tmp_path / "pt")])
    fp32 = train_cls.main(["--model", cls.onnx, *NO_TRAIN, *files, "--output_dir", str(tmp_path / "fp32"),
                           "--onnx_model", "fp32"])
    int8 = train_cls.main(["--model", cls.onnx, *NO_TRAIN, *files, "--output_dir", str(tmp_path / "int8")])

    assert fp32["model"]["onnx"]["file"] == "model.onnx" and int8["model"]["onnx"]["file"] == "model_int8.onnx"
    assert int8["model"]["onnx"]["export_int8"]["agreement"] == cls.report["int8"]["agreement"]
    assert fp32["model"]["onnx"]["exported_from"] == os.path.abspath(cls.pt) and "onnx" not in pt["model"]
    assert results(tmp_path / "int8")["model"]["onnx"]["precision"] == "int8"
    # fp32: the same metrics (logits within the export's tolerance), the same predictions files
    assert {k: v for k, v in fp32["eval"].items() if k not in ("loss", "predictions_per_second")} == \
        {k: v for k, v in pt["eval"].items() if k not in ("loss", "predictions_per_second")}
    assert fp32["eval"]["loss"] == pytest.approx(pt["eval"]["loss"], abs=1e-4)
    for split in ("eval", "test"):
        a, b = (read_csv(tmp_path / run / f"predictions_{split}.csv") for run in ("pt", "fp32"))
        assert list(a[0]) == list(b[0]) and [r["row_id"] for r in a] == [r["row_id"] for r in b]
        assert [r["predicted"] for r in a] == [r["predicted"] for r in b]
        assert all(abs(float(x["prob_pos"]) - float(y["prob_pos"])) < 1e-4 for x, y in zip(a, b))
    assert {r["predicted"] for r in a} == {"neg", "pos"} and pt["eval"]["accuracy"] > 0.6  # a model that learnt
    rows = read_csv(tmp_path / "fp32" / "predictions_test.csv")
    assert [r["sentence"] for r in rows] == texts and fp32["test"]["num_examples"] == 37  # file order, all rows
    # int8: a metric moves by at most the share of labels that changed
    a, b = read_csv(tmp_path / "pt" / "predictions_eval.csv"), read_csv(tmp_path / "int8" / "predictions_eval.csv")
    changed = sum(x["predicted"] != y["predicted"] for x, y in zip(a, b)) / len(a)
    assert changed <= 0.1 and abs(int8["eval"]["accuracy"] - pt["eval"]["accuracy"]) <= changed + 1e-9


def test_tagger_folder_scores_like_pytorch_with_windows(ner, tmp_path, monkeypatch):
    dev = write_conll(tmp_path / "dev.txt", ner_sentences(13, seed=1, long_every=3))
    words = write_conll(tmp_path / "words.txt", ner_sentences(7, seed=2, long_every=2), tagged=False)
    monkeypatch.setattr(onnx_predict, "WINDOW_BATCHES", 1)  # sorted in windows of 4 rows: a sentence's windows split
    files = ["--validation_file", dev, "--test_file", words]
    pt = train_ner.main(["--model", ner.pt, *NO_TRAIN, *files, "--output_dir", str(tmp_path / "pt")])
    ort = train_ner.main(["--model", ner.onnx, *NO_TRAIN, *files, "--output_dir", str(tmp_path / "ort")])
    assert ort["model"]["onnx"]["file"] == "model.onnx"  # auto: no int8 in this folder
    assert ort["data"]["max_length"] == pt["data"]["max_length"] == 16  # reused from the copied training_args.yaml
    assert ort["data"]["splits"]["validation"]["windowed_sentences"] == 5
    assert pt["eval"]["f1"] > 0.3  # it found entities: the files compared below are not all 'O'
    for key in ("f1", "precision", "recall", "accuracy", "num_words", "unpredicted_words"):
        assert ort["eval"][key] == pt["eval"][key], key
    assert ort["eval"]["loss"] == pytest.approx(pt["eval"]["loss"], abs=1e-4)
    assert ort["test"]["num_examples"] == pt["test"]["num_examples"] > 7  # windows
    for split in ("eval", "test"):
        name = f"predictions_{split}.conll"
        assert (tmp_path / "ort" / name).read_text() == (tmp_path / "pt" / name).read_text(), split


def test_fill_mask_folder_gives_the_pytorch_perplexity(tiny_model, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("\n".join(toy_sentence(random.Random(i), i % 2) for i in range(30)), encoding="utf-8")
    export.main(["--model", tiny_model, "--output_dir", str(tmp_path / "onnx"), "--parity_samples", "8"])
    args = [*NO_TRAIN, "--validation_file", str(text), "--max_length", "32"]
    pt = train_mlm.main(["--model", tiny_model, *args, "--output_dir", str(tmp_path / "pt")])
    ort = train_mlm.main(["--model", str(tmp_path / "onnx"), *args, "--output_dir", str(tmp_path / "ort")])
    assert ort["eval"]["masked_tokens"] == pt["eval"]["masked_tokens"] > 0
    assert ort["eval"]["perplexity"] == pytest.approx(pt["eval"]["perplexity"], rel=1e-4)
    assert ort["eval"]["masked_accuracy"] == pt["eval"]["masked_accuracy"]


def test_what_an_onnx_folder_cannot_do_is_refused_in_one_sentence(cls, ner, sentiment_files, tmp_path, monkeypatch):
    dev, out = sentiment_files["dev"], str(tmp_path / "out")
    exported_from = f"\\({os.path.abspath(cls.pt)}\\)"
    with pytest.raises(UserError, match=f"is an ONNX folder made by export.py, which cannot be trained: pass "
                                        f"--no_do_train .* exported from {exported_from}"):
        train_cls.main(["--model", cls.onnx, "--train_file", sentiment_files["train"], "--output_dir", out])
    with pytest.raises(UserError, match=r"an ONNX export of a BertForTokenClassification model, not of a "
                                        r"\*ForSequenceClassification model: score it with train_ner.py"):
        train_cls.main(["--model", ner.onnx, *NO_TRAIN, "--validation_file", dev, "--output_dir", out])
    with pytest.raises(UserError, match=f"--teacher_model .* is an ONNX folder .* exported from {exported_from}"):
        train_cls.main(["--model", cls.pt, "--teacher_model", cls.onnx, "--train_file", sentiment_files["train"],
                        "--output_dir", out])
    with pytest.raises(UserError, match="--onnx_model int8: --model .* has no model_int8.onnx .*--quantize int8"):
        train_ner.main(["--model", ner.onnx, *NO_TRAIN, "--validation_file",
                        write_conll(tmp_path / "dev.txt", ner_sentences(3, seed=1)), "--output_dir", out,
                        "--onnx_model", "int8"])
    with pytest.raises(UserError, match="--onnx_model fp32 picks the graph of an ONNX folder .* is not one"):
        train_cls.main(["--model", cls.pt, *NO_TRAIN, "--validation_file", dev, "--output_dir", out,
                        "--onnx_model", "fp32"])
    # the label map: labels of the file the model does not know (the PyTorch path's check), and a config.json
    # that does not belong to the graph
    odd = write_csv(tmp_path / "odd.csv", ["sentence", "label"], [("good film", "pos"), ("bad", "meh")])
    with pytest.raises(UserError, match=r"labels \['meh'\] .* that the model does not know"):
        train_cls.main(["--model", cls.onnx, *NO_TRAIN, "--validation_file", odd, "--output_dir", out])
    edited = tmp_path / "edited"
    shutil.copytree(cls.onnx, edited)
    config = json.loads((edited / "config.json").read_text())
    config["id2label"] = {"0": "neg", "1": "pos", "2": "mixed"}
    config["label2id"] = {"neg": 0, "pos": 1, "mixed": 2}
    (edited / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"model_int8.onnx gives 2 logits per item but its config.json has 3 labels "
                                        r"\(neg, pos, mixed\); they do not belong together"):
        train_cls.main(["--model", str(edited), *NO_TRAIN, "--validation_file", dev, "--output_dir", out])
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(UserError, match="needs onnxruntime, which is not installed: pip install -r "
                                        "requirements-export.txt"):
        train_cls.main(["--model", cls.onnx, *NO_TRAIN, "--validation_file", dev, "--output_dir", out])
    monkeypatch.undo()
    ctx = SimpleNamespace(model_args=SimpleNamespace(model=cls.onnx, onnx_model="auto"),
                          args=SimpleNamespace(teacher_model=None, do_train=False, torch_compile=False),
                          accelerator=SimpleNamespace(num_processes=2))
    with pytest.raises(UserError, match="scored by ONNX Runtime in one process; run the script with python"):
        onnx_predict.check(train_cls.TASK, ctx)
    assert not os.path.exists(out)  # every refusal came before anything was written


def test_an_onnx_folder_and_the_figures_its_log_line_gives(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"")
    assert onnx_predict.is_onnx_folder(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert not onnx_predict.is_onnx_folder(str(tmp_path))
    assert not onnx_predict.is_onnx_folder(str(tmp_path / "missing")) and not onnx_predict.is_onnx_folder(None)
    # the log's export figures: int8 agreement, or for a regression model (no labels: agreement NaN) its difference
    int8 = {"precision": "int8", "export_int8": {"agreement": 0.984, "items": 408}}
    assert onnx_predict.export_figures(int8) == "at export its labels agreed with PyTorch fp32 on 98.40% of 408 items"
    regression = {"precision": "int8", "export_int8": {"agreement": float("nan"), "max_abs_diff": 0.012}}
    assert onnx_predict.export_figures(regression) == "at export its outputs were within 0.012 of PyTorch fp32's"
    assert onnx_predict.export_figures({"precision": "fp32"}) == "no export_report.json figures for it"
