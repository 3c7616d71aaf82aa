"""ONNX export of the three heads the scripts train: torch.onnx's dynamo exporter, ONNX Runtime's
transformer fusions, int8 dynamic quantization, and the parity checks that decide whether an export
is kept. Used by export.py; onnx, onnxscript and onnxruntime are imported inside the functions, so
nothing else in the project needs them (requirements-export.txt).

The graph work, in order (what each step buys is measured in BENCHMARKS.md):

1. `export_fp32`: `torch.onnx.export(dynamo=True)` with dynamic batch and sequence axes; the
   exporter's own optimizer folds constants.
2. `fuse_for_ort`: onnxscript's ONNX Runtime fusions turn each layer's attention into one
   `com.microsoft.Attention` node (packed Q/K/V), residual + LayerNorm into `SkipLayerNormalization`,
   bias + GELU into `BiasGelu`. Then two rewrites the fusions leave undone:
   - the packed Q/K/V weight is a `Concat` of three initializers at run time: folded into one
     initializer (the quantizer only quantizes initializers, and it saves a copy per call);
   - the mask reaches each Attention as a (batch, 1, seq, seq) float bias that transformers builds
     with index arithmetic (GatherND, Expand, Where) on every call: replaced by the raw 2-D
     attention_mask as the Attention's `mask_index`, which the kernel applies itself.
3. `quantize_int8`: `quantize_dynamic` (per-channel int8 weights, uint8 activations quantized per
   call) of MatMul, Attention (-> QAttention) and Gather (the embedding tables, most of the file).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np

from ..errors import UserError

# architectures[0] suffix -> head name (the pipeline task of the model)
HEADS = {"ForSequenceClassification": "text-classification", "ForTokenClassification": "token-classification",
         "ForMaskedLM": "fill-mask"}
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
FP32_FILE, INT8_FILE = "model.onnx", "model_int8.onnx"
# Nodes kept in fp32 whatever is excluded: the classifier heads are Gemm (no int8 kernel in dynamic mode).
INT8_OPS = ["MatMul", "Attention", "Gather"]


def head_of(config, model_dir: str) -> str:
    """The head a saved model was trained for, from config.architectures."""
    archs = getattr(config, "architectures", None) or []
    for arch in archs:
        for suffix, head in HEADS.items():
            if arch.endswith(suffix):
                return head
    found = ", ".join(archs) or "none"
    raise UserError(f"--model '{model_dir}' has an unknown head (config.json architectures: {found}); export.py "
                    "exports sequence classification, token classification and masked-LM models, as the three "
                    "scripts save them.")


def auto_class(head: str):
    import transformers

    return {"text-classification": transformers.AutoModelForSequenceClassification,
            "token-classification": transformers.AutoModelForTokenClassification,
            "fill-mask": transformers.AutoModelForMaskedLM}[head]


def load_model(model_dir: str, head: str):
    """The PyTorch model in fp32, in eval mode."""
    import torch

    try:
        model = auto_class(head).from_pretrained(model_dir, dtype=torch.float32)
    except Exception as err:
        first = " ".join(str(err).split())[:250]
        raise UserError(f"--model '{model_dir}' could not be loaded as a {head} model: {first}.") from None
    return model.eval()


def input_names(tokenizer, config) -> list[str]:
    """The model inputs the tokenizer produces (token_type_ids only where the model has segment embeddings)."""
    names = [n for n in INPUTS if n in tokenizer.model_input_names]
    if "token_type_ids" in names and getattr(config, "type_vocab_size", 2) < 2:
        names.remove("token_type_ids")
    if names[:2] != ["input_ids", "attention_mask"]:
        raise UserError(f"the tokenizer's inputs {tokenizer.model_input_names} lack input_ids/attention_mask; "
                        "export.py exports BERT-family encoders.")
    return names


def _logits_module(model):
    """The model with positional inputs and the logits as its only output (what the ONNX graph computes)."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits

    return Logits().eval()


def export_fp32(model, names: list[str], path: str, opset: int | None) -> dict:
    """torch.onnx.export(dynamo=True) with dynamic batch and sequence axes; returns what was used."""
    import torch

    # A sample with batch != sequence and both > 1, so neither axis is specialised or tied to the other.
    sample = tuple(torch.ones(2, 9, dtype=torch.long) if n != "token_type_ids" else torch.zeros(2, 9, dtype=torch.long)
                   for n in names)
    sample[0][:, 1:-1] = 1000 % model.config.vocab_size
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    shapes = {n: {0: batch, 1: seq} for n in names}
    kwargs = {"opset_version": opset} if opset else {}
    import logging
    import warnings

    # "torchvision is not installed. Skipping torchvision::nms": four lines about ops a BERT never uses
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "axis name batch will not be used": the names are set below
        try:
            program = torch.onnx.export(_logits_module(model), sample, dynamo=True, input_names=names,
                                        output_names=["logits"], dynamic_shapes=shapes, optimize=True,
                                        verbose=False, **kwargs)
        except Exception as err:
            first = " ".join(str(err).split())[:300]
            raise UserError(f"torch.onnx.export(dynamo=True) failed for this model ({type(err).__name__}: {first}); "
                            "try another --opset or report the model type.") from None
        finally:
            registration.setLevel(level)
    program.save(path)
    _name_axes(path, names)
    return {"exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
            "opset": _opset(path)}


def _opset(path: str) -> int:
    import onnx

    model = onnx.load(path, load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _name_axes(path: str, names: list[str]) -> None:
    """Inputs (batch, sequence), logits (batch, [sequence,] labels): readable in Netron and onnxruntime."""
    import onnx

    model = onnx.load(path)
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        for dim, name in zip(dims, ("batch", "sequence")):
            if not dim.HasField("dim_value"):
                dim.dim_param = name
    onnx.save(model, path)


def fuse_for_ort(src: str, dst: str) -> dict:
    """ONNX Runtime's transformer fusions plus the two rewrites of the module docstring; returns counts."""
    import onnx
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model, counts = optimize_for_ort(ir.load(src))
    ir.save(model, dst)
    proto = onnx.load(dst)
    folded = _fold_initializer_concats(proto)
    masked = _raw_mask_index(proto)
    removed = _drop_dead_nodes(proto)
    onnx.save(proto, dst)
    fused = {k: v for k, v in counts.items() if v}
    return {"fusions": fused, "qkv_weights_folded": folded, "attention_mask_as_mask_index": masked,
            "dead_nodes_removed": removed}


def _fold_initializer_concats(model) -> int:
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    folded = 0
    for node in list(model.graph.node):
        if node.op_type != "Concat" or not all(i in inits for i in node.input):
            continue
        axis = next(a.i for a in node.attribute if a.name == "axis")
        value = np.concatenate([numpy_helper.to_array(inits[i]) for i in node.input], axis=axis)
        model.graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        model.graph.node.remove(node)
        folded += 1
    return folded


def _raw_mask_index(model) -> int:
    """Every Attention node takes the 2-D 0/1 attention_mask (int32) as mask_index instead of a 4-D bias."""
    from onnx import TensorProto, helper

    attention = [n for n in model.graph.node if n.op_type == "Attention" and n.domain == "com.microsoft"]
    if not attention or "attention_mask" not in [i.name for i in model.graph.input]:
        return 0
    cast = helper.make_node("Cast", ["attention_mask"], ["attention_mask_int32"], to=TensorProto.INT32,
                            name="attention_mask_to_int32")
    model.graph.node.insert(0, cast)
    for node in attention:
        inputs = list(node.input) + [""] * (6 - len(node.input))
        inputs[3], inputs[5] = "attention_mask_int32", ""  # mask_index; no attention_bias
        while inputs and inputs[-1] == "":
            inputs.pop()
        del node.input[:]
        node.input.extend(inputs)
        # Equal Q/K/V sizes are the default; the attribute stops the quantizer from making a QAttention.
        sizes = [a for a in node.attribute if a.name == "qkv_hidden_sizes"]
        if sizes and len(set(sizes[0].ints)) == 1:
            node.attribute.remove(sizes[0])
    return len(attention)


def _drop_dead_nodes(model) -> int:
    """Remove nodes (and initializers) nothing reads, walking back from the graph outputs."""
    needed = {o.name for o in model.graph.output}
    keep = []
    for node in reversed(list(model.graph.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    removed = len(model.graph.node) - len(keep)
    keep.reverse()
    del model.graph.node[:]
    model.graph.node.extend(keep)
    unused = [i for i in model.graph.initializer if i.name not in needed]
    for init in unused:
        model.graph.initializer.remove(init)
    return removed


def quantizable_groups(path: str) -> dict[str, list[str]]:
    """Names of the nodes int8 would quantize, grouped: 'embeddings', 'layer.N' (encoder layers), 'head'."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    groups: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type not in INT8_OPS:
            continue
        scope = _scope(node)
        match = re.search(r"encoder\.layer\.(\d+)\b", scope)
        group = f"layer.{match.group(1)}" if match else ("embeddings" if "embeddings" in scope else "head")
        groups.setdefault(group, []).append(node.name)
    return groups


def _scope(node) -> str:
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            return prop.value
    return node.name


def quantize_int8(src: str, dst: str, keep_fp32: list[str] | None = None, groups: dict | None = None) -> dict:
    """Dynamic int8 quantization (per-channel weights); `keep_fp32` names groups of quantizable_groups()."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    excluded = [n for g in (keep_fp32 or []) for n in (groups or {}).get(g, [])]
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # "please consider pre-processing": shape inference, not needed
    try:
        quantize_dynamic(src, dst, per_channel=True, reduce_range=False, weight_type=QuantType.QInt8,
                         op_types_to_quantize=INT8_OPS, nodes_to_exclude=excluded)
    finally:
        logging.getLogger().setLevel(quiet)
    return {"weights": "int8, per channel", "activations": "uint8, dynamic (per call)", "ops": INT8_OPS,
            "kept_fp32": list(keep_fp32 or []), "nodes_kept_fp32": len(excluded)}


def ort_session(path: str, threads: int, spinning: bool = True):
    """An ONNX Runtime CPU session with `threads` intra-op threads and sequential execution. `spinning`: idle
    worker threads spin for the next call (ONNX Runtime's default, fastest when calls come back to back); off
    where other work (PyTorch's metrics, the predictions writer) runs between calls and would compete with them:
    1 s of 8.5 on MRPC's 1,725 test pairs, 2 cores."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def run_ort(session, batch: dict) -> np.ndarray:
    names = [i.name for i in session.get_inputs()]
    return session.run(["logits"], {n: batch[n] for n in names})[0]


def run_torch(model, batch: dict, names: list[str]) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return model(**{n: torch.from_numpy(batch[n]) for n in names}).logits.float().numpy()


@dataclass
class Comparison:
    max_abs_diff: float          # over real (not padded) positions
    logit_scale: float           # max |logit| of the reference
    agreement: float             # predicted labels equal, per sequence (classification) or per real token
    items: int                   # sequences or real tokens compared
    mean_abs_diff: float = 0.0


def compare(reference: list[np.ndarray], other: list[np.ndarray], batches: list[dict], regression: bool) -> Comparison:
    """Logits of two backends on the same batches: token heads compare real (or `positions`) tokens only."""
    diffs, scale, same, items, total_abs, count = [], 0.0, 0, 0, 0.0, 0
    for ref, out, batch in zip(reference, other, batches):
        if ref.ndim == 3:  # (batch, sequence, labels): real tokens only (fill-mask on data: the masked ones)
            real = batch.get("positions", batch["attention_mask"]).astype(bool)
            ref, out = ref[real], out[real]
        diff = np.abs(ref.astype(np.float64) - out.astype(np.float64))
        diffs.append(float(diff.max()))
        total_abs, count = total_abs + float(diff.sum()), count + diff.size
        scale = max(scale, float(np.abs(ref).max()))
        if not regression:
            same += int((ref.argmax(-1) == out.argmax(-1)).sum())
        items += ref.shape[0]
    agreement = same / items if items and not regression else float("nan")
    return Comparison(max(diffs), scale, agreement, items, total_abs / max(1, count))


def file_mb(path: str) -> float:
    total = os.path.getsize(path)
    data = path + ".data"
    if os.path.exists(data):
        total += os.path.getsize(data)
    return total / 2**20


USAGE = {
    "text-classification": ('enc = tok(["The cat sat."], ["A cat was sitting."], padding=True, truncation=True, '
                            'max_length={max_length}, return_tensors="np")',
                            'print([id2label[str(i)] for i in logits.argmax(-1)])'),
    "token-classification": ('enc = tok(["Alice flew to Paris ."], padding=True, truncation=True, '
                             'max_length={max_length}, return_tensors="np")',
                             'print([id2label[str(i)] for i in logits[0].argmax(-1)])  # per word piece'),
    "fill-mask": ('enc = tok([f"Paris is the {{tok.mask_token}} of France."], return_tensors="np")',
                  'print(tok.decode(logits[0, enc["input_ids"][0] == tok.mask_token_id].argmax(-1)))'),
}


def model_card(source: str, head: str, report: dict) -> str:
    """README.md of the exported folder: files, parity, int8 agreement, benchmark, and how to run it."""
    parity = report["parity"]
    lines = [f"# {os.path.basename(os.path.abspath(source))} (ONNX)", "",
             f"Exported from `{source}` ({head}) with export.py: {report['export']['exporter']}, opset "
             f"{report['export']['opset']}, dynamic batch and sequence axes; inputs {', '.join(report['inputs'])}, "
             "output `logits`.", ""]
    if report.get("labels"):
        lines += [f"Labels: {', '.join(map(str, report['labels']))} (`config.json` id2label).", ""]
    lines += ["| file | what | MB |", "|---|---|---|",
              f"| `{FP32_FILE}` | fp32 with ONNX Runtime's transformer fusions (com.microsoft Attention, "
              f"SkipLayerNormalization, BiasGelu: runs on ONNX Runtime) | {report['files'][FP32_FILE]:.1f} |"]
    if INT8_FILE in report["files"]:
        kept = report["int8"]["kept_fp32"]
        kept = f"; kept in fp32: {', '.join(kept)}" if kept else ""
        lines.append(f"| `{INT8_FILE}` | dynamic int8 (weights per channel){kept} | {report['files'][INT8_FILE]:.1f} |")
    lines += ["", f"**Parity** (checked at export, {sum(parity['batches'])} examples from {parity['from']}): max "
              f"|ONNX fp32 - PyTorch| logit difference {parity['max_abs_diff']:.2g} (tolerance {parity['atol']:g}); "
              f"predicted labels agree {100 * parity['label_agreement']:.2f}%."]
    if "int8" in report:
        i8 = report["int8"]
        lines.append(f"**int8**: labels agree with PyTorch fp32 on {100 * i8['agreement']:.2f}% of {i8['items']} "
                     f"{'tokens' if head != 'text-classification' else 'examples'} (max logit difference "
                     f"{i8['max_abs_diff']:.2g}).")
        if "measured_fix" in i8:
            fix = i8["measured_fix"]
            lines.append(f"Agreement was poor; keeping {', '.join(fix['keep_fp32'])} in fp32 measured "
                         f"{100 * fix['agreement']:.2f}% at {fix['size_mb']:.1f} MB (`--int8_keep_fp32`).")
    lines += _benchmark_table(report.get("benchmark", []))
    first, last = USAGE[head]
    model_file = INT8_FILE if INT8_FILE in report["files"] else FP32_FILE
    lines += ["", "## Use", "", "```python", "import json", "import onnxruntime as ort",
              "from transformers import AutoTokenizer  # or tokenizers.Tokenizer.from_file('tokenizer.json')", "",
              "folder = '.'  # this folder", "tok = AutoTokenizer.from_pretrained(folder)",
              "id2label = json.load(open(f'{folder}/config.json'))['id2label']",
              f"session = ort.InferenceSession(f'{{folder}}/{model_file}', providers=['CPUExecutionProvider'])",
              first.format(max_length=report["max_length"]),
              "logits = session.run(['logits'], {i.name: enc[i.name] for i in session.get_inputs()})[0]",
              last, "```", ""]
    return "\n".join(lines)


def _benchmark_table(records: list) -> list[str]:
    """The card's benchmark section: per backend, batch-1 latency and rows/s in both batch orders, then the
    padding of each order and int8's speed-ups (the records and summary of inference.benchmark)."""
    ok = [r for r in records if "order" in r]
    if not ok:
        return []
    machine, summary = records[0], next((r for r in records if "summary" in r), {})
    rows = {(r["backend"], r["order"]): r for r in ok}
    size = ok[0]["batch_size"]
    lines = ["", f"## Benchmark (`{machine['data']}`, {machine['machine']['cpu']}, int8 dot products: "
             f"{machine['machine'].get('int8_dot_product', 'unknown')}, {machine['machine']['threads']} threads)", "",
             "Arrival: rows in file order, each batch padded to its own longest row (what a server or a scored file "
             "meets); sorted: rows sorted by length first (least padding).", "",
             f"| backend | {summary.get('metric', 'metric')} | p50 / p90 / p99 ms, batch 1 | rows/s, batch {size}, "
             f"arrival | rows/s, batch {size}, sorted | MB | peak RSS MB |", "|---|---|---|---|---|---|---|"]

    def metric(r):
        m, name = r["metric"], summary.get("metric")
        if not m.get("complete"):
            return f"not measured ({m['examples']} examples in the time limit)"
        return f"{m[name if name in m else next(k for k in m if k not in ('complete', 'examples'))]:.4f}"

    for backend in dict.fromkeys(b for b, _ in rows):
        arrival, ordered = rows.get((backend, "arrival")), rows.get((backend, "sorted"))
        shown = metric(arrival) if arrival else "-"
        if arrival and ordered and metric(ordered) != shown:
            shown += f" (sorted: {metric(ordered)})"
        lat = arrival["latency_batch1_ms"] if arrival else None
        first = arrival or ordered
        lines.append(f"| {backend} | {shown} | "
                     + (f"{lat['p50']:.1f} / {lat['p90']:.1f} / {lat['p99']:.1f}" if lat else "-") + " | "
                     + " | ".join(f"{rows[backend, o]['rows_per_second']:.1f}" if (backend, o) in rows else "-"
                                  for o in ("arrival", "sorted"))
                     + f" | {first['file_size_mb']:.1f} | {first['peak_rss_mb']} |")
    padding = [f"{o} {100 * summary[o]['padding_fraction']:.1f}%" for o in ("arrival", "sorted") if o in summary]
    lines.append("")
    if padding:
        lines.append(f"- Padding (share of the batches' tokens): {', '.join(padding)}.")
    for pair in ("onnxruntime_int8 / onnxruntime_fp32", "onnxruntime_int8 / pytorch_fp32"):
        found = [f"{o} {summary[o]['throughput_x'][pair]:.2f}x" for o in ("arrival", "sorted")
                 if pair in summary.get(o, {}).get("throughput_x", {})]
        if found:
            latency = summary.get("batch1_latency_p50_x", {}).get(pair)
            lines.append(f"- {pair.replace(' / ', ' over ')}: {', '.join(found)}"
                         + (f", batch-1 p50 {latency:.2f}x." if latency else "."))
    return lines
