#!/usr/bin/env python
"""Where ONNX Runtime spends its time: per-operator totals of fp32 and int8 graphs of an export folder,
with batches in arrival (file) order or sorted by length, from ONNX Runtime's own profiler.

    python bench/ort_profile.py --model out/mrpc-onnx --data dev.tsv --threads 2 --batch_size 32

Each graph runs in this process with the session options export.py --benchmark uses
(onnx_export.ort_session), one warm-up pass, then one profiled pass per order. Prints one JSON line per
(graph, order) with the wall time, the profiled operator time, and each operator type's milliseconds and
share, largest first; the int8/fp32 ratio per operator type follows. Graphs are alternated, so a machine
that slows down mid-run shows in both.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def read_set(folder: str, data: str, max_length: int | None):
    from transformers import AutoConfig, AutoTokenizer

    import export
    from common.runs.run_settings import training_settings
    from common.shipping import onnx_export as ox

    config = AutoConfig.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    head = ox.head_of(config, folder)
    names = ox.input_names(tok, config)
    a = SimpleNamespace(data=data, max_length=max_length, text_column=None, text_pair_column=None, label_column=None)
    return export.read_data(a, head, tok, names, config, training_settings(folder) or {}), names


def profile(path: str, threads: int, data, batches: list, names: list) -> dict:
    """Wall seconds of one pass and operator-type totals from ONNX Runtime's profiler."""
    import onnxruntime as ort

    from common.shipping import inference as inf

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    feeds = [{n: b[n] for n in names} for b in (inf.pad_batch(data, idx) for idx in batches)]
    plain = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    for feed in feeds:  # warm-up
        plain.run(["logits"], feed)
    started = time.perf_counter()
    for feed in feeds:
        plain.run(["logits"], feed)
    wall = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "ort")
        session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        for feed in feeds:
            session.run(["logits"], feed)
        with open(session.end_profiling()) as fh:
            events = json.load(fh)
    ops: dict[str, float] = collections.defaultdict(float)
    nodes = collections.Counter()
    for ev in events:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            op = ev.get("args", {}).get("op_name", "?")
            ops[op] += ev["dur"] / 1000.0  # microseconds -> ms
            nodes[op] += 1
    total = sum(ops.values())
    table = sorted(ops.items(), key=lambda kv: -kv[1])
    return {"wall_seconds": round(wall, 4), "operator_ms": round(total, 1),
            "ops": {k: {"ms": round(v, 1), "share": round(v / total, 3), "calls": nodes[k]} for k, v in table}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="An export.py output folder (model.onnx, model_int8.onnx).")
    p.add_argument("--data", required=True, help="A labelled file, read as export.py --data reads it.")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--max_length", type=int, default=None)
    p.add_argument("--graphs", nargs="+", default=["model.onnx", "model_int8.onnx"])
    a = p.parse_args(argv)
    from common.shipping import inference as inf

    data, names = read_set(a.model, a.data, a.max_length)
    results = {}
    for order, by_length in inf.ORDERS.items():
        batches = inf.batch_order(data, a.batch_size, by_length)
        for graph in a.graphs:
            rec = profile(os.path.join(a.model, graph), a.threads, data, batches, names)
            rec.update(graph=graph, order=order, **inf.padding(data, batches))
            results[graph, order] = rec
            print(json.dumps(rec), flush=True)
    if len(a.graphs) == 2:
        base, other = a.graphs
        for order in inf.ORDERS:
            x, y = results[base, order], results[other, order]
            print(json.dumps({"order": order, f"wall {other} / {base}": round(y["wall_seconds"] / x["wall_seconds"], 3),
                              "ops_ms": {base: {k: v["ms"] for k, v in x["ops"].items()},
                                         other: {k: v["ms"] for k, v in y["ops"].items()}}}))


if __name__ == "__main__":
    main()
