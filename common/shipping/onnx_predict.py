"""Scoring files with a folder export.py wrote: `--model out/x-onnx --no_do_train` runs ONNX Runtime
where a PyTorch folder runs PyTorch, with everything else of the script unchanged.

The folder holds model.onnx (maybe model_int8.onnx), config.json, the tokenizer and the source run's
training_args.yaml, so the tokenizer, the readers, `task.load_data` (columns, label maps checked
against config.json, max_length) and the objective are the PyTorch path's own. Only the model differs:
`load` returns an `OnnxModel`, an ONNX Runtime session called like a transformers model
(`model(input_ids=..., attention_mask=...).logits`, a torch tensor), so each task's `eval_outputs`,
`compute_metrics` and predictions writer run unchanged and a predictions file has the same columns
and row order as the PyTorch one.

Batches are sorted by length (least padding: what makes ONNX Runtime pay, int8 most): a labelled
split as a whole, as `single_run.evaluate_only` sorts it for PyTorch; an unlabelled split window by
window (`WINDOW_BATCHES` batches each), each window handed to the predictions writer in file order,
so a large file streams. One process, on the CPU: several processes are refused (nothing to shard
the file for; run it with python). onnxruntime is imported only here, and only for an ONNX folder.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Optional

import numpy as np
import torch

from .. import progress
from ..errors import UserError
from ..log import logger
from ..task import BuiltModel, Context, Task
from ..training.build import eval_loader
from ..training.build import lengths as column_lengths
from ..training.evaluation import EvalResult, concat
from .onnx_export import FP32_FILE, HEADS, INT8_FILE, ort_session, run_ort

FILES = {"fp32": FP32_FILE, "int8": INT8_FILE}
SCRIPTS = {"text-classification": "train_cls.py", "token-classification": "train_ner.py", "fill-mask": "train_mlm.py"}
REPORT = "export_report.json"
WINDOW_BATCHES = 64  # an unlabelled split is length-sorted within windows of this many batches


def is_onnx_folder(path: Optional[str]) -> bool:
    """A local folder with an exported graph and no PyTorch weights (what export.py writes)."""
    if not path or not os.path.isdir(path):
        return False
    names = os.listdir(path)
    return (FP32_FILE in names or INT8_FILE in names) and not any(n.endswith((".safetensors", ".bin")) for n in names)


def export_report(folder: str) -> dict:
    """The folder's export_report.json (source folder, parity, int8 agreement); {} when absent or unreadable."""
    try:
        with open(os.path.join(folder, REPORT), encoding="utf-8") as fh:
            report = json.load(fh)
    except (OSError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}


def _exported_from(report: dict) -> str:
    return f" ({report['source']})" if isinstance(report.get("source"), str) else ""


def _architectures(folder: str) -> Optional[list]:
    """config.json's architectures ([] when it names none); None when there is no readable config.json."""
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, ValueError):
        return None
    archs = config.get("architectures") if isinstance(config, dict) else None
    return [str(a) for a in archs] if isinstance(archs, list) else []


@dataclass
class OnnxChoice:
    """The graph a run scores with."""
    folder: str
    file: str                                   # model.onnx or model_int8.onnx
    precision: str                              # fp32 or int8
    report: dict = field(default_factory=dict)  # export_report.json

    @property
    def path(self) -> str:
        return os.path.join(self.folder, self.file)


def check(task: Task, ctx: Context) -> Optional[OnnxChoice]:
    """None for a PyTorch model. For an ONNX folder: the graph that runs (--onnx_model), once everything it cannot
    do is refused in one sentence: training, several processes, another task's head, a missing onnxruntime."""
    model_args, args = ctx.model_args, ctx.args
    teacher = args.teacher_model
    if is_onnx_folder(teacher):
        raise UserError(f"--teacher_model '{teacher}' is an ONNX folder made by export.py; a teacher runs in PyTorch: "
                        f"pass the folder it was exported from{_exported_from(export_report(teacher))}.")
    folder = model_args.model
    if not is_onnx_folder(folder):
        if model_args.onnx_model != "auto":
            raise UserError(f"--onnx_model {model_args.onnx_model} picks the graph of an ONNX folder made by "
                            f"export.py, but --model '{folder}' is not one (it has PyTorch weights or no {FP32_FILE}); "
                            "drop --onnx_model.")
        return None
    report = export_report(folder)
    if args.do_train:
        raise UserError(f"--model '{folder}' is an ONNX folder made by export.py, which cannot be trained: pass "
                        f"--no_do_train to score files with it, or train from the PyTorch folder it was exported "
                        f"from{_exported_from(report)}.")
    processes = ctx.accelerator.num_processes
    if processes > 1:
        raise UserError(f"--model '{folder}' is an ONNX folder, scored by ONNX Runtime in one process; run the script "
                        f"with python (not {processes} processes).")
    archs = _architectures(folder)
    if archs is None:
        raise UserError(f"--model '{folder}' is an ONNX folder without a readable config.json (its label map); export "
                        "the PyTorch folder again with export.py.")
    if task.head and not any(a.endswith(task.head) for a in archs):
        heads = [HEADS[s] for a in archs for s in HEADS if a.endswith(s)]
        hint = f"score it with {SCRIPTS[heads[0]]}" if heads else "export a model this script trained"
        what = f"{', '.join(archs)} model" if archs else "model whose config.json names no architecture"
        raise UserError(f"--model '{folder}' is an ONNX export of a {what}, not of a *{task.head} model: {hint}.")
    if importlib.util.find_spec("onnxruntime") is None:
        raise UserError(f"--model '{folder}' is an ONNX folder; scoring it needs onnxruntime, which is not installed: "
                        "pip install -r requirements-export.txt.")
    wanted = model_args.onnx_model
    if wanted == "auto":
        wanted = "int8" if os.path.isfile(os.path.join(folder, INT8_FILE)) else "fp32"
    if not os.path.isfile(os.path.join(folder, FILES[wanted])):
        other = "fp32" if wanted == "int8" else "int8"
        how = " (export.py --quantize int8 writes it)" if wanted == "int8" else ""
        raise UserError(f"--onnx_model {wanted}: --model '{folder}' has no {FILES[wanted]}{how}; pass --onnx_model "
                        f"{other} or auto.")
    if args.torch_compile:
        logger.warning("--torch_compile does not apply to an ONNX graph: ignored")
    return OnnxChoice(folder, FILES[wanted], wanted, report)


class OnnxModel:
    """An ONNX Runtime session called like a transformers model: keyword inputs (torch tensors) -> an object whose
    `logits` is a torch tensor. `info` is what results.json records of it."""

    def __init__(self, session, info: dict):
        self.session, self.info = session, info
        self.names = [i.name for i in session.get_inputs()]

    def __call__(self, **inputs):
        ids = inputs["input_ids"]
        # a graph with segment embeddings takes token_type_ids; a batch without them (MLM) is one segment
        feed = {n: inputs[n].numpy() if n in inputs else np.zeros(tuple(ids.shape), dtype=np.int64)
                for n in self.names}
        return SimpleNamespace(logits=torch.from_numpy(run_ort(self.session, feed)))


def load(ctx: Context, choice: OnnxChoice) -> BuiltModel:
    """The session of the chosen graph, checked against config.json's label map and the tokenizer."""
    import onnxruntime

    threads = torch.get_num_threads()
    try:
        session = ort_session(choice.path, threads, spinning=False)  # torch's loss and metrics run in between
    except Exception as err:  # a truncated or foreign file
        first = " ".join(str(err).split())[:200]
        raise UserError(f"--model '{choice.folder}': {choice.file} could not be loaded by ONNX Runtime ({first}); "
                        "export the PyTorch folder again with export.py.") from None
    outputs = {o.name: o.shape for o in session.get_outputs()}
    if "logits" not in outputs:
        raise UserError(f"--model '{choice.folder}': {choice.file} has no 'logits' output (it has "
                        f"{', '.join(outputs)}); export the PyTorch folder again with export.py.")
    width = outputs["logits"][-1] if outputs["logits"] else None
    config = ctx.model_config
    masked_lm = any(a.endswith("ForMaskedLM") for a in getattr(config, "architectures", None) or [])
    if isinstance(width, int) and masked_lm and len(ctx.tokenizer) > width:
        raise UserError(f"the tokenizer has {len(ctx.tokenizer)} tokens but {choice.file} of --model "
                        f"'{choice.folder}' scores {width}; use the folder's own tokenizer (drop --tokenizer_name).")
    if isinstance(width, int) and not masked_lm and width != config.num_labels:
        labels = ", ".join(str(config.id2label[i]) for i in range(config.num_labels))
        raise UserError(f"--model '{choice.folder}': {choice.file} gives {width} logits per item but its config.json "
                        f"has {config.num_labels} labels ({labels}); they do not belong together: export the PyTorch "
                        "folder again with export.py.")
    info = {"file": choice.file, "precision": choice.precision, "runtime": f"onnxruntime {onnxruntime.__version__}",
            "provider": "CPUExecutionProvider", "threads": threads, "spinning": False, **exported(choice)}
    logger.info("ONNX Runtime %s runs %s (%s; %s), on the CPU with %d thread%s, batches sorted by length",
                onnxruntime.__version__, choice.file, choice.precision, export_figures(info), threads,
                "" if threads == 1 else "s")
    return BuiltModel(OnnxModel(session, info))


def exported(choice: OnnxChoice) -> dict:
    """What export.py measured of this graph (export_report.json): its source, fp32 parity, int8 agreement."""
    report, out = choice.report, {}
    if isinstance(report.get("source"), str):
        out["exported_from"] = report["source"]
    parity = report.get("parity")
    if isinstance(parity, dict) and "max_abs_diff" in parity:
        out["export_parity"] = {k: parity[k] for k in ("max_abs_diff", "atol", "label_agreement", "from")
                                if k in parity}
    int8 = report.get("int8")
    if choice.precision == "int8" and isinstance(int8, dict):
        out["export_int8"] = {k: int8[k] for k in ("agreement", "items", "max_abs_diff", "kept_fp32") if k in int8}
    return out


def export_figures(info: dict) -> str:
    """The log's words for the export's figures of the graph that runs."""
    int8 = info.get("export_int8", {})
    if isinstance(int8.get("agreement"), float) and math.isfinite(int8["agreement"]):
        return (f"at export its labels agreed with PyTorch fp32 on {100 * int8['agreement']:.2f}% of "
                f"{int8.get('items', '?')} items")
    if isinstance(int8.get("max_abs_diff"), float):  # regression: no labels to agree on
        return f"at export its outputs were within {int8['max_abs_diff']:.2g} of PyTorch fp32's"
    if "export_parity" in info and info["precision"] == "fp32":
        p = info["export_parity"]
        return f"at export its logits were within {p['max_abs_diff']:.2g} of PyTorch's, tolerance {p.get('atol', '?')}"
    return f"no {REPORT} figures for it"


def _numpy(outs: dict) -> dict:
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in outs.items()}


def _windows(model: OnnxModel, objective, dataset, batch_size: int, collator, args, rows: int, desc: str):
    """The objective's eval outputs of `dataset`, window by window of `rows` rows (a multiple of batch_size) in file
    order, each window's rows sorted by length, longest first, as collate.length_sorted sorts a split; yields each
    window's outputs (its rows in that order: the predictions writers put them back in row order)."""
    lengths = column_lengths(dataset)
    order = np.concatenate([start + np.argsort(-lengths[start:start + rows], kind="stable")
                            for start in range(0, len(dataset), rows)]) if len(dataset) else np.zeros(0, np.int64)
    loader = eval_loader(dataset.select(order), batch_size, collator, args)
    per_window, chunks = max(1, rows // batch_size), {}
    with torch.inference_mode():
        for i, batch in enumerate(progress.track(loader, desc)):
            for key, value in _numpy(objective.eval_outputs(model, batch)).items():
                chunks.setdefault(key, []).append(value)
            if (i + 1) % per_window == 0 or i + 1 == len(loader):
                yield {k: concat(v, objective.eval_pad_values.get(k, 0)) for k, v in chunks.items()}
                chunks = {}


def evaluate(model: OnnxModel, objective, dataset, batch_size: int, collator, args, desc: str) -> EvalResult:
    """A labelled split as single_run.evaluate_only evaluates it in PyTorch: sorted by length as a whole, every
    output kept, the objective's metrics."""
    rows = batch_size * -(-max(1, len(dataset)) // batch_size)  # one window: the whole split
    outputs = next(_windows(model, objective, dataset, batch_size, collator, args, rows, desc), {})
    return EvalResult(objective.compute_metrics(outputs), outputs)


def stream_predictions(model: OnnxModel, objective, dataset, batch_size: int, collator, args, writer) -> int:
    """An unlabelled split: each window of rows length-sorted, run, and handed to the writer (which writes rows in
    row order); returns the number of rows. Nothing but one window's outputs is held."""
    rows = 0
    for outputs in _windows(model, objective, dataset, batch_size, collator, args, batch_size * WINDOW_BATCHES,
                            "predict"):
        rows += len(next(iter(outputs.values())))
        if writer is not None:
            writer.add(outputs)
    return rows
