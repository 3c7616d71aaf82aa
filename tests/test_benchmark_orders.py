"""export.py --benchmark's measurements, unit by unit: the arrival-order batches (file order, each padded to its
own longest row) and the sorted ones, batch-1 latency on unpadded rows, the time limit, the summary's ratios per
order, the model card's table, and identical ONNX Runtime session options for the fp32 and int8 files."""
from __future__ import annotations

import numpy as np
import pytest

from common.shipping import inference as inf

LENGTHS = [5, 9, 3, 7, 4, 12, 6, 3, 8, 10, 4]
PAD = 0


def toy_set(lengths=LENGTHS) -> inf.EvalSet:
    """Row i is [101, 1000 + i, 7, 7, ..., 102] of lengths[i] tokens, so a batch's rows can be told apart."""
    ids = [[101, 1000 + i] + [7] * (n - 3) + [102] for i, n in enumerate(lengths)]
    features = {"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]}
    return inf.EvalSet("text-classification", ["input_ids", "attention_mask"], features, PAD, "accuracy",
                       gold=np.zeros(len(ids), dtype=np.int64), num_labels=2)


class Recorder:
    """A backend that records the batches it is given and answers zero logits."""

    def __init__(self):
        self.batches = []

    def __call__(self, batch):
        self.batches.append({k: v.copy() for k, v in batch.items()})
        return np.zeros((len(batch["input_ids"]), 2), dtype=np.float32)


def rows_of(batch) -> list[int]:
    return [int(r) - 1000 for r in batch["input_ids"][:, 1]]


def check_padded_to_own_longest(batch):
    rows = rows_of(batch)
    assert batch["input_ids"].shape == (len(rows), max(LENGTHS[i] for i in rows))
    width = batch["input_ids"].shape[1]
    for k, i in enumerate(rows):
        assert batch["attention_mask"][k].tolist() == [1] * LENGTHS[i] + [0] * (width - LENGTHS[i])
        assert (batch["input_ids"][k, LENGTHS[i]:] == PAD).all() and batch["input_ids"][k, LENGTHS[i] - 1] == 102


def test_arrival_batches_are_file_order_and_sorted_ones_by_length():
    data, run = toy_set(), Recorder()
    records, outputs = inf.time_orders(run, data, batch_size=4, passes=2, budget=60.0)
    batches = 3  # 11 rows in batches of 4
    assert len(run.batches) == 2 * batches + 2 * 2 * batches  # a warm-up pass of each order, then 2 passes each
    arrival, ordered = run.batches[:batches], run.batches[batches:2 * batches]
    assert [rows_of(b) for b in arrival] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    sorted_rows = [i for b in ordered for i in rows_of(b)]
    assert [LENGTHS[i] for i in sorted_rows] == sorted(LENGTHS) and sorted(sorted_rows) == list(range(11))
    for b in arrival + ordered:
        check_padded_to_own_longest(b)
    # the timed passes alternate the orders and run the same batches as the warm-up
    timed = run.batches[2 * batches:]
    assert [rows_of(b) for b in timed[:batches]] == [rows_of(b) for b in arrival]
    assert [rows_of(b) for b in timed[batches:2 * batches]] == [rows_of(b) for b in ordered]
    for order, padded_width in (("arrival", [9, 12, 10]), ("sorted", [4, 8, 12])):
        r = records[order]
        assert r["examples"] == 11 and r["batch_size"] == 4 and len(r["pass_seconds"]) == 2
        assert r["seconds"] == min(r["pass_seconds"]) and r["rows_per_second"] > 0
        assert r["real_tokens"] == sum(LENGTHS)
        assert r["padded_tokens"] == sum(w * n for w, n in zip(padded_width, (4, 4, 3)))
        assert r["padding_fraction"] == round(1 - sum(LENGTHS) / r["padded_tokens"], 4)
        assert outputs[order].done.all()  # the metric is computed in each order
    assert records["arrival"]["padding_fraction"] > records["sorted"]["padding_fraction"]


def test_batch1_latency_runs_each_row_alone_at_its_own_length():
    data, run = toy_set(), Recorder()
    latency = inf.time_latency(run, data, samples=6, budget=60.0)
    assert [rows_of(b) for b in run.batches] == [[i] for i in range(6)]  # file order, one row each
    for i, b in enumerate(run.batches):
        assert b["input_ids"].shape == (1, LENGTHS[i]) and b["attention_mask"].all()  # no pad token
    assert latency["samples"] == 6 and latency["p50"] <= latency["p90"] <= latency["p99"]
    assert set(latency) == {"p50", "p90", "p99", "mean", "samples", "tokens"}
    assert latency["tokens"] == {"min": 3, "median": 6.0, "max": 12}


def test_a_pass_cut_by_the_time_limit_is_not_repeated():
    data, run = toy_set(), Recorder()
    records, outputs = inf.time_orders(run, data, batch_size=4, passes=3, budget=0.0)
    for r in records.values():
        assert r["examples"] == 4 and len(r["pass_seconds"]) == 1  # one batch, then the limit; no 2nd pass
    assert not outputs["arrival"].done.all()
    assert inf.compute_metric(data, outputs["arrival"]) == {"complete": False, "examples": 4}
    assert inf.time_latency(Recorder(), data, samples=6, budget=0.0)["samples"] == 1


def order_record(backend, order, rows_per_second, accuracy, p50=None, size=10.0):
    record = {"backend": backend, "order": order, "batch_size": 32, "rows_per_second": rows_per_second,
              "padding_fraction": 0.4 if order == "arrival" else 0.05, "file_size_mb": size, "peak_rss_mb": 200,
              "metric": {"complete": True, "examples": 408, "accuracy": accuracy}}
    if order == "arrival":
        record["latency_batch1_ms"] = {"p50": p50, "p90": p50 * 1.5, "p99": p50 * 2, "mean": p50 * 1.1}
    return record


def bench_records():
    return [order_record("pytorch_fp32", "arrival", 50.0, 0.80, p50=40.0, size=86.7),
            order_record("pytorch_fp32", "sorted", 65.0, 0.80, size=86.7),
            order_record("onnxruntime_fp32", "arrival", 70.0, 0.80, p50=20.0, size=86.8),
            order_record("onnxruntime_fp32", "sorted", 86.0, 0.80, size=86.8),
            order_record("onnxruntime_int8", "arrival", 71.4, 0.79, p50=10.0, size=22.0),
            order_record("onnxruntime_int8", "sorted", 120.4, 0.795, size=22.0)]


def test_summary_gives_each_orders_speed_ups_and_metric_changes():
    summary = inf.summarize(bench_records() + [{"backend": "pytorch_bf16", "error": "killed"}], "accuracy")
    assert summary["metric"] == "accuracy"
    assert summary["arrival"]["throughput_x"] == {"onnxruntime_int8 / onnxruntime_fp32": 1.02,
                                                  "onnxruntime_int8 / pytorch_fp32": 1.43,
                                                  "onnxruntime_fp32 / pytorch_fp32": 1.4}
    assert summary["sorted"]["throughput_x"]["onnxruntime_int8 / onnxruntime_fp32"] == 1.4
    assert summary["sorted"]["throughput_x"]["onnxruntime_int8 / pytorch_fp32"] == 1.85
    assert summary["arrival"]["padding_fraction"] == 0.4 and summary["sorted"]["padding_fraction"] == 0.05
    assert summary["arrival"]["accuracy_change"] == {"onnxruntime_fp32": 0.0, "onnxruntime_int8": -0.01}
    assert summary["sorted"]["accuracy_change"]["onnxruntime_int8"] == -0.005
    assert summary["batch1_latency_p50_x"] == {"onnxruntime_int8 / onnxruntime_fp32": 2.0,
                                               "onnxruntime_int8 / pytorch_fp32": 4.0,
                                               "onnxruntime_fp32 / pytorch_fp32": 2.0}
    assert summary["file_size_fraction"]["onnxruntime_int8"] == round(22.0 / 86.7, 3)


def test_model_card_shows_both_orders():
    from common.shipping import onnx_export as ox

    records = bench_records()
    report = {"export": {"exporter": "torch.onnx.export(dynamo=True)", "opset": 20}, "inputs": ["input_ids"],
              "files": {ox.FP32_FILE: 86.8}, "max_length": 128,
              "parity": {"batches": [1, 2], "from": "dev.tsv", "max_abs_diff": 1e-6, "atol": 1e-4,
                         "label_agreement": 1.0},
              "benchmark": [{"machine": {"cpu": "AMD EPYC", "threads": 2, "int8_dot_product": "AVX2 without VNNI"},
                             "data": "/data/dev.tsv", "examples": 408}, *records,
                            inf.summarize(records, "accuracy")]}
    card = ox.model_card("out/mrpc", "text-classification", report)
    assert "int8 dot products: AVX2 without VNNI" in card
    assert ("| backend | accuracy | p50 / p90 / p99 ms, batch 1 | rows/s, batch 32, arrival | rows/s, batch 32, "
            "sorted |") in card
    assert "| onnxruntime_int8 | 0.7900 (sorted: 0.7950) | 10.0 / 15.0 / 20.0 | 71.4 | 120.4 | 22.0 | 200 |" in card
    assert "- Padding (share of the batches' tokens): arrival 40.0%, sorted 5.0%." in card
    assert "- onnxruntime_int8 over onnxruntime_fp32: arrival 1.02x, sorted 1.40x, batch-1 p50 2.00x." in card


def test_int8_kernels_name_what_caps_int8():
    assert inf.int8_kernels({"avx2", "fma"}) == "AVX2 without VNNI"
    assert inf.int8_kernels({"avx2", "avx512f", "avx512_vnni"}) == "VNNI"
    assert inf.int8_kernels({"avx2", "avx_vnni", "amx_int8"}) == "AMX"
    assert inf.int8_kernels(set()) == "unknown"


def test_onnxruntime_fp32_and_int8_run_with_the_same_session_options(tmp_path):
    """Both graphs go through the benchmark's own loader; the options are read back from the sessions."""
    pytest.importorskip("onnxruntime", reason="pip install -r requirements-export.txt")
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    weight = numpy_helper.from_array(np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["logits"])], "toy",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])], [weight])
    fp32, int8 = str(tmp_path / "fp32.onnx"), str(tmp_path / "int8.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), fp32)
    quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8)
    assert "MatMulInteger" in {n.op_type for n in onnx.load(int8).graph.node}
    facts = {}
    for backend, path in (("onnxruntime_fp32", fp32), ("onnxruntime_int8", int8)):
        run, facts[backend] = inf.load_backend({"backend": backend, "threads": 2, "model": path})
        assert run({"x": np.ones((3, 8), dtype=np.float32)}).shape == (3, 4)
    options = facts["onnxruntime_fp32"]["session_options"]
    assert facts["onnxruntime_int8"]["session_options"] == options
    assert options["intra_op_num_threads"] == 2 and options["inter_op_num_threads"] == 1
    assert options["execution_mode"] == "ORT_SEQUENTIAL" and options["providers"] == ["CPUExecutionProvider"]


def test_passes_must_be_positive():
    import export
    from common.errors import UserError

    with pytest.raises(UserError, match="--passes must be a positive integer, got 0"):
        export.ExportArguments(model="m", output_dir="o", passes=0)
