"""export.py on tiny models: each head exported with parity checked and int8, the refusal path, the exported
folder used with onnxruntime alone (as the README shows), the benchmark's JSON lines (its parts are unit-tested
in test_benchmark_orders.py), and bad input."""
from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from conftest import FAST, FIXTURES, run_script

pytest.importorskip("onnxruntime", reason="pip install -r requirements-export.txt")
pytest.importorskip("onnxscript", reason="pip install -r requirements-export.txt")

import export  # noqa: E402  (after the skip: it needs nothing optional at import, but the tests do)
from common import files  # noqa: E402
from common.errors import UserError  # noqa: E402
from common.shipping import onnx_export as ox  # noqa: E402

CONLL = os.path.join(FIXTURES, "ner_conll.txt")


@pytest.fixture(scope="module", autouse=True)
def export_once_per_model(tmp_path_factory):
    """The dynamo exporter traces a model in 10-50 s even when tiny: each model is traced once here and the
    graph reused, so the other tests exercise what follows the trace (fusions, parity, int8, folder, benchmark)."""
    import shutil

    cache, real = tmp_path_factory.mktemp("traced"), ox.export_fp32
    done = {}

    def export_fp32(model, names, path, opset):
        key = (model.name_or_path, tuple(names), opset)
        if key not in done:
            done[key] = (real(model, names, path, opset), str(cache / f"{len(done)}.onnx"))
            shutil.copy(path, done[key][1])
        shutil.copy(done[key][1], path)
        return dict(done[key][0])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ox, "export_fp32", export_fp32)
        yield


@pytest.fixture(scope="module")
def cls_model(tiny_model, sentiment_files, tmp_path_factory):
    """A classifier saved by train_cls.py (a few steps: the export does not need a good model)."""
    import train_cls

    out = tmp_path_factory.mktemp("cls") / "model"
    train_cls.main(["--model", tiny_model, "--train_file", sentiment_files["train"], "--validation_file",
                    sentiment_files["dev"], "--output_dir", str(out), *FAST, "--max_steps", "4"])
    return str(out)


@pytest.fixture(scope="module")
def ner_model(tiny_model, tmp_path_factory):
    """A token classifier with the fixture's CoNLL tags, saved as train_ner.py saves one."""
    from transformers import AutoTokenizer, BertForTokenClassification

    labels = ["O", "B-LOC", "B-ORG", "B-PER", "I-LOC", "I-ORG", "I-PER"]
    out = tmp_path_factory.mktemp("ner") / "model"
    model = BertForTokenClassification.from_pretrained(tiny_model, num_labels=len(labels),
                                                       id2label=dict(enumerate(labels)),
                                                       label2id={t: i for i, t in enumerate(labels)})
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def exported(cls_model, ner_model, tiny_model, sentiment_files, tmp_path_factory):
    """Each head exported once with --quantize int8 (the tiny fill-mask model is conftest's BertForMaskedLM)."""
    root = tmp_path_factory.mktemp("onnx")
    runs = {"text-classification": (cls_model, sentiment_files["dev"]), "token-classification": (ner_model, CONLL),
            "fill-mask": (tiny_model, None)}
    out = {}
    for head, (model, data) in runs.items():
        folder = str(root / head)
        report = export.main(["--model", model, "--output_dir", folder, "--quantize", "int8",
                              *(["--data", data] if data else [])])
        out[head] = (model, folder, report)
    return out


@pytest.mark.parametrize("head", ["text-classification", "token-classification", "fill-mask"])
def test_each_head_exports_with_parity_and_int8(exported, head):
    model, folder, report = exported[head]
    assert report["head"] == head
    for name in ("model.onnx", "model_int8.onnx", "config.json", "tokenizer.json", "tokenizer_config.json",
                 "README.md", "export_report.json"):
        assert os.path.isfile(os.path.join(folder, name)), name
    assert not [f for f in os.listdir(os.path.dirname(folder)) if f.startswith(".")]  # no temporary folder left
    assert report["parity"]["max_abs_diff"] <= 1e-4 and report["parity"]["label_agreement"] == 1.0
    assert report["parity"]["batches"][:2] == [1, 2]  # dynamic batch axis exercised
    assert report["export"]["exporter"].startswith("torch.onnx.export(dynamo=True)")
    assert report["export"]["attention_mask_as_mask_index"] == 2  # two fused attention layers
    assert report["int8"]["items"] > 0 and 0 <= report["int8"]["agreement"] <= 1
    assert report["files"]["model_int8.onnx"] < report["files"]["model.onnx"]
    with open(os.path.join(folder, "export_report.json")) as fh:
        assert json.load(fh)["parity"] == report["parity"]
    with open(os.path.join(folder, "config.json")) as fh, open(os.path.join(model, "config.json")) as src:
        assert json.load(fh) == json.load(src)  # the label maps travel with the model
    import onnx

    graph = onnx.load(os.path.join(folder, "model.onnx"))
    dims = [[d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.graph.input]
    assert all(d == ["batch", "sequence"] for d in dims)
    int8_ops = {n.op_type for n in onnx.load(os.path.join(folder, "model_int8.onnx")).graph.node}
    assert {"QAttention", "MatMulInteger"} <= int8_ops


def readme_predict(folder: str, model_file: str, texts, pairs=None) -> np.ndarray:
    """The README's few lines: tokenizer and onnxruntime, nothing from this project."""
    import onnxruntime as ort
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    session = ort.InferenceSession(os.path.join(folder, model_file), providers=["CPUExecutionProvider"])
    enc = tok(texts, pairs, padding=True, truncation=True, max_length=128, return_tensors="np")
    return session.run(["logits"], {i.name: enc[i.name] for i in session.get_inputs()})[0]


def test_exported_classifier_predicts_the_pytorch_labels(exported, sentiment_files):
    import pandas as pd
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir, folder, _ = exported["text-classification"]
    texts = pd.read_csv(sentiment_files["dev"])["sentence"].tolist()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        expected = model(**tok(texts, padding=True, return_tensors="pt")).logits.numpy()
    logits = readme_predict(folder, "model.onnx", texts)
    assert np.abs(logits - expected).max() < 1e-4
    assert (logits.argmax(-1) == expected.argmax(-1)).all()
    int8 = readme_predict(folder, "model_int8.onnx", texts)
    assert (int8.argmax(-1) == expected.argmax(-1)).mean() >= 0.9
    with open(os.path.join(folder, "README.md")) as fh:
        card = fh.read()
    assert "ort.InferenceSession" in card and "Parity" in card and "int8" in card


def test_exported_token_and_fill_mask_models_match_pytorch(exported):
    import torch

    from common.shipping.onnx_export import auto_class

    for head in ("token-classification", "fill-mask"):
        model_dir, folder, _ = exported[head]
        texts = ["alice flew to paris .", "the acme film was unbelievable"]
        from transformers import AutoTokenizer

        enc = AutoTokenizer.from_pretrained(model_dir)(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            expected = auto_class(head).from_pretrained(model_dir).eval()(**enc).logits.numpy()
        logits = readme_predict(folder, "model.onnx", texts)
        real = enc["attention_mask"].numpy().astype(bool)
        assert np.abs(logits[real] - expected[real]).max() < 1e-4, head
        assert (logits[real].argmax(-1) == expected[real].argmax(-1)).all(), head


def test_parity_mismatch_refuses_and_writes_nothing(cls_model, tmp_path, monkeypatch):
    real_run = ox.run_ort
    monkeypatch.setattr(ox, "run_ort", lambda session, batch: real_run(session, batch) + 1e-3)
    out = tmp_path / "refused"
    with pytest.raises(UserError, match=r"differ from PyTorch by up to 0\.001.*above --atol 0\.0001.*nothing was"):
        export.main(["--model", cls_model, "--output_dir", str(out)])
    assert os.listdir(tmp_path) == []  # neither the folder nor its temporary copy


def test_overwrite_replaces_and_tolerance_is_a_flag(cls_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(UserError, match="is not empty; pass --overwrite_output_dir"):
        export.main(["--model", cls_model, "--output_dir", str(out)])
    with pytest.raises(UserError, match="above --atol 1e-12"):
        export.main(["--model", cls_model, "--output_dir", str(out), "--overwrite_output_dir", "--atol", "1e-12"])
    assert os.listdir(out) == ["old.txt"]  # a refused export leaves the old folder as it was
    report = export.main(["--model", cls_model, "--output_dir", str(out), "--overwrite_output_dir",
                          "--quantize", "int8", "--int8_keep_fp32", "layer.0", "head"])
    assert sorted(os.listdir(tmp_path)) == ["out"] and not (out / "old.txt").exists()
    mask = files.umask()  # the folder was a private temporary one: it and its files get the umask's modes
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in [out, *out.iterdir()]} == {
        p.name: (0o777 if p.is_dir() else 0o666) & ~mask for p in [out, *out.iterdir()]}
    assert report["parity"]["from"] == "random" and report["int8"]["kept_fp32"] == ["layer.0", "head"]
    assert report["int8"]["nodes_kept_fp32"] >= 2


def test_fp32_parts_search_keeps_the_most_helpful_parts_until_the_target():
    gains = {"layer.0": 0.01, "layer.1": 0.06, "head": 0.03, "embeddings": 0.0}

    def attempt(keep):
        return {"agreement": 0.9 + sum(gains[g] for g in keep), "size_mb": 1.0 + len(keep)}

    fix = export.search_fp32_parts(attempt, dict.fromkeys(gains, ["n"]), [], 0.985)
    assert fix["keep_fp32"] == ["layer.1", "head"] and fix["agreement"] == pytest.approx(0.99)
    assert len(fix["tried"]) == 4 + 1  # each part alone, then the best two together
    fix = export.search_fp32_parts(attempt, dict.fromkeys(gains, ["n"]), [], 0.999)
    assert fix["keep_fp32"] == ["layer.1", "head", "layer.0"] and len(fix["tried"]) == 4 + 2
    fix = export.search_fp32_parts(attempt, dict.fromkeys(gains, ["n"]), [], 1.5, max_parts=2)
    assert fix["keep_fp32"] == ["layer.1", "head"]  # the best it found within 2 parts


def test_poor_int8_agreement_is_reported_with_a_measured_fix(cls_model, tmp_path, monkeypatch):
    """Forced: int8 'disagrees' unless encoder layer 1 stays in fp32; auto finds that and applies it."""
    calls, real_quantize, real_compare = [], ox.quantize_int8, ox.compare

    def quantize(src, dst, keep=None, groups=None):
        calls.append(list(keep or []))
        return real_quantize(src, dst, keep, groups)

    def compare(reference, other, batches, regression):
        result = real_compare(reference, other, batches, regression)
        if calls and "layer.1" not in calls[-1]:  # an int8 attempt (the fp32 parity check comes first)
            result.agreement = 0.5
        return result

    warnings = []
    monkeypatch.setattr(ox, "quantize_int8", quantize)
    monkeypatch.setattr(ox, "compare", compare)
    monkeypatch.setattr(export.logger, "warning", lambda msg, *args: warnings.append(msg % args))
    report = export.main(["--model", cls_model, "--output_dir", str(tmp_path / "auto"), "--quantize", "int8",
                          "--int8_keep_fp32", "auto"])
    fix = report["int8"]["measured_fix"]
    assert fix["keep_fp32"] == ["layer.1"] and report["int8"]["kept_fp32"] == ["layer.1"]
    assert report["int8"]["agreement"] > 0.5 and len(fix["tried"]) == 4  # embeddings, layer.0, layer.1, head
    assert warnings[0].startswith("int8 is poor for this model: its labels agree with PyTorch fp32 on only 50.0%")
    assert "--int8_keep_fp32 auto: kept layer.1 in fp32" in warnings[-1]
    assert "Agreement was poor; keeping layer.1 in fp32 measured" in (tmp_path / "auto" / "README.md").read_text()
    with pytest.raises(UserError, match="unknown part"):
        export.main(["--model", cls_model, "--output_dir", str(tmp_path / "x"), "--quantize", "int8",
                     "--int8_keep_fp32", "layer.9"])


def test_benchmark_prints_json_lines_for_every_backend_and_order(exported, sentiment_files, tmp_path, capsys):
    model_dir = exported["text-classification"][0]
    out = tmp_path / "bench"
    report = export.main(["--model", model_dir, "--output_dir", str(out), "--quantize", "int8", "--benchmark",
                          "--data", sentiment_files["dev"], "--latency_samples", "5", "--batch_size", "8",
                          "--threads", "1", "--passes", "2"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert lines[0]["machine"]["threads"] == 1 and "avx2" in json.dumps(lines[0]["machine"])
    assert lines[0]["machine"]["int8_dot_product"] in ("AVX2 without VNNI", "VNNI", "AMX")
    records = {(r["backend"], r["order"]): r for r in lines if "backend" in r}
    backends = ("pytorch_fp32", "pytorch_bf16", "onnxruntime_fp32", "onnxruntime_int8")
    assert set(records) == {(b, o) for b in backends for o in ("arrival", "sorted")}
    for (backend, order), r in records.items():
        assert "error" not in r, r
        assert r["threads"] == 1 and r["metric"]["complete"] and r["metric"]["examples"] == 61
        assert r["examples"] == 61 and r["batch_size"] == 8 and len(r["pass_seconds"]) == 2
        assert r["peak_rss_mb"] > 0 and r["file_size_mb"] > 0
        assert ("latency_batch1_ms" in r) == (order == "arrival")
    for backend in backends:
        lat = records[backend, "arrival"]["latency_batch1_ms"]
        assert lat["samples"] == 5 and lat["p50"] <= lat["p90"] <= lat["p99"]
        # the same batches for every backend; arrival pads more than sorted
        assert records[backend, "arrival"]["padded_tokens"] == records["pytorch_fp32", "arrival"]["padded_tokens"]
        assert records[backend, "arrival"]["padding_fraction"] > records[backend, "sorted"]["padding_fraction"]
    for order in ("arrival", "sorted"):
        fp32 = records["pytorch_fp32", order]["metric"]["accuracy"]
        assert records["onnxruntime_fp32", order]["metric"]["accuracy"] == fp32
        assert records["onnxruntime_fp32", order]["agreement_with_pytorch_fp32"] == 1.0
    # the fp32 and int8 graphs run with the same session options, recorded
    options = records["onnxruntime_fp32", "arrival"]["session_options"]
    assert records["onnxruntime_int8", "sorted"]["session_options"] == options and options["intra_op_num_threads"] == 1
    assert records["pytorch_fp32", "arrival"]["torch_threads"]["intra_op"] == 1
    assert "fast_bf16" in records["pytorch_bf16", "sorted"]
    # each backend's own peak memory (an onnxruntime process never imports torch)
    assert records["onnxruntime_int8", "arrival"]["peak_rss_mb"] < records["pytorch_fp32", "arrival"]["peak_rss_mb"]
    summary = lines[-1]
    for order in ("arrival", "sorted"):
        assert set(summary[order]["throughput_x"]) >= {"onnxruntime_int8 / onnxruntime_fp32",
                                                       "onnxruntime_int8 / pytorch_fp32"}
        assert "onnxruntime_int8" in summary[order]["accuracy_change"]
    assert "onnxruntime_int8 / pytorch_fp32" in summary["batch1_latency_p50_x"]
    assert summary["file_size_fraction"]["onnxruntime_int8"] < 1
    with open(out / "benchmark.jsonl") as fh:
        assert len(fh.readlines()) == len(lines)
    assert report["benchmark"][-1] == summary
    card = (out / "README.md").read_text()
    assert "## Benchmark" in card and "rows/s, batch 8, arrival | rows/s, batch 8, sorted" in card


def test_benchmark_measures_ner_f1_like_training(tmp_path, exported):
    """The exported NER model's F1 on the fixture equals the PyTorch one (same windows, same word scoring)."""
    model_dir = exported["token-classification"][0]
    report = export.main(["--model", model_dir, "--output_dir", str(tmp_path / "o"), "--benchmark", "--data", CONLL,
                          "--backends", "pytorch_fp32", "onnxruntime_fp32", "--latency_samples", "3", "--repeats", "2"])
    records = {(r["backend"], r["order"]): r for r in report["benchmark"] if "backend" in r}
    for order in ("arrival", "sorted"):
        assert records["pytorch_fp32", order]["metric"]["f1"] == records["onnxruntime_fp32", order]["metric"]["f1"]
        assert "f1_change" in report["benchmark"][-1][order]
    assert all(len(r["repeats"]) == 2 for r in records.values())  # run in turn, the fastest of each kept
    ort = records["onnxruntime_fp32", "arrival"]
    assert ort["latency_batch1_ms"]["p50"] == min(x["p50_ms"] for x in ort["repeats"])
    assert ort["rows_per_second"] == max(x["rows_per_second"] for x in ort["repeats"])


def test_bad_input_is_one_sentence(tiny_model, cls_model, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="--model '.*nowhere' does not exist"):
        export.main(["--model", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "o")])
    from transformers import BertModel

    base = tmp_path / "base"
    BertModel.from_pretrained(tiny_model).save_pretrained(base)
    with pytest.raises(UserError, match="unknown head .*BertModel"):
        export.main(["--model", str(base), "--output_dir", str(tmp_path / "o")])
    with pytest.raises(UserError, match="--benchmark needs --data"):
        export.main(["--model", cls_model, "--output_dir", str(tmp_path / "o"), "--benchmark"])
    with pytest.raises(UserError, match="--data '.*missing.csv' does not exist"):
        export.main(["--model", cls_model, "--output_dir", str(tmp_path / "o"), "--data",
                     str(tmp_path / "missing.csv")])
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(UserError, match="needs onnxruntime.*pip install -r requirements-export.txt"):
        export.main(["--model", cls_model, "--output_dir", str(tmp_path / "o")])
    assert sorted(os.listdir(tmp_path)) == ["base"]


def test_cli_exit_code_2_without_traceback(tmp_path):
    proc = run_script("export.py", ["--model", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "o")])
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: --model") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
