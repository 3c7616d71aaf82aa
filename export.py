#!/usr/bin/env python
"""Export a model trained by train_cls.py, train_ner.py or train_mlm.py to ONNX (fp32, optionally
int8), check it against PyTorch, and optionally measure it against PyTorch on a labelled file.

    python export.py --model out/mrpc --output_dir out/mrpc-onnx --quantize int8
    python export.py --model out/mrpc --output_dir out/mrpc-onnx --quantize int8 --data dev.tsv --benchmark

The folder gets model.onnx (fp32, with ONNX Runtime's transformer fusions), model_int8.onnx with
--quantize int8, the tokenizer, config.json (label maps), export_report.json (parity, agreement,
benchmark) and a model card. The export is refused, and nothing is written, when fp32 ONNX logits
differ from PyTorch by more than --atol. Needs `pip install -r requirements-export.txt`. See
docs/export.md.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Literal, Optional, Sequence

import numpy as np

from common import progress
from common.config import parse_args
from common.errors import UserError, run_cli
from common.files import honour_umask_tree
from common.log import logger, setup_logging
from common.runs.reporting import write_json, write_text_atomic
from common.runs.run_settings import table_reading, training_settings
from common.shipping import inference as inf
from common.shipping import onnx_export as ox

EXPORT_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


@dataclass
class ExportArguments:
    model: str = field(metadata={"help": "A folder saved by train_cls.py, train_ner.py or train_mlm.py.",
                                 "metavar": "DIR"})
    output_dir: str = field(metadata={"help": "Where the exported folder goes (written whole at the end)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a non-empty output_dir."})
    quantize: Literal["none", "int8"] = field(default="none", metadata={
        "help": "int8: also write model_int8.onnx (dynamic quantization: int8 weights per channel, activations "
                "quantized per call) and report its label agreement with fp32."})
    opset: Optional[int] = field(default=None, metadata={"help": "ONNX opset (default: the exporter's, 18+)."})
    atol: float = field(default=1e-4, metadata={
        "help": "Largest absolute difference allowed between fp32 ONNX and PyTorch logits; above it the export "
                "is refused."})
    data: Optional[str] = field(default=None, metadata={
        "help": "A labelled file in the format the training script reads (classification table, tagged CoNLL "
                "file or table, text file for fill-mask): parity batches come from it, and --benchmark runs on "
                "it. Without it, parity uses random word pieces.", "metavar": "FILE"})
    parity_samples: int = field(default=128, metadata={
        "help": "Examples run through PyTorch and ONNX Runtime at export (batches of 1, 2, 4, ... 32)."})
    int8_min_agreement: float = field(default=0.98, metadata={
        "help": "Below this label agreement of int8 with PyTorch fp32 on the parity examples, int8 is reported "
                "as poor and the layers to keep in fp32 are measured."})
    int8_keep_fp32: Optional[list[str]] = field(default=None, metadata={
        "help": "Parts left in fp32 in model_int8.onnx: embeddings, layer.N (encoder layer N), head; or auto "
                "(the measured choice when agreement is poor).", "metavar": "PART"})
    progress: Literal["auto", "bar", "lines", "none"] = field(default="auto", metadata={
        "help": "Progress display of the parity check, the int8 search and the benchmark: auto (a bar on terminals "
                "and in notebooks, log lines in a file; env BERT_FINETUNE_PROGRESS), bar, lines or none."})
    benchmark: bool = field(default=False, metadata={
        "help": "Measure PyTorch fp32, bf16 autocast, ONNX Runtime fp32 and int8 on --data (a fresh process "
                "each): batch-1 latency, rows/s in arrival and sorted order, metric, size, peak RSS."})
    backends: list[str] = field(default_factory=lambda: list(inf.BACKENDS), metadata={
        "help": f"Backends to benchmark (default: all of {', '.join(inf.BACKENDS)}).", "choices": list(inf.BACKENDS)})
    threads: Optional[int] = field(default=None, metadata={
        "help": "Threads of every backend (default: the CPUs this process may use)."})
    batch_size: int = field(default=32, metadata={
        "help": "Batch size of the throughput passes (each batch padded to its own longest row)."})
    passes: int = field(default=1, metadata={
        "help": "Timed passes of each order per process, after a warm-up pass; the fastest is kept."})
    repeats: int = field(default=1, metadata={
        "help": "Run the backends in turn this many times (fresh processes) and keep each one's fastest "
                "measurements (for shared or noisy machines)."})
    latency_samples: int = field(default=200, metadata={
        "help": "Rows timed alone, unpadded (the file's first N)."})
    max_seconds: float = field(default=120.0, metadata={
        "help": "Time limit of each timed part of a backend (batch-1 rows, each pass); a slower backend is "
                "measured on part of the file (its metric is then not reported)."})
    max_length: Optional[int] = field(default=None, metadata={
        "help": "Tokens per example for --data (default: the model's training --max_length, else 128)."})
    text_column: Optional[str] = field(default=None, metadata={"help": "Classification --data: the text column "
                                                                       "(default: as in training)."})
    text_pair_column: Optional[str] = field(default=None, metadata={"help": "Classification --data: the second "
                                                                            "text (default: as in training)."})
    label_column: Optional[str] = field(default=None, metadata={"help": "Classification --data: the label column "
                                                                        "(default: as in training)."})

    def __post_init__(self):
        if not 0 < self.atol < 1:
            raise UserError(f"--atol must be between 0 and 1, got {self.atol}.")
        if not 0 <= self.int8_min_agreement <= 1:
            raise UserError(f"--int8_min_agreement must be a fraction in [0, 1], got {self.int8_min_agreement}.")
        for name in ("parity_samples", "batch_size", "passes", "repeats", "latency_samples", "threads",
                     "max_length"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UserError(f"--{name} must be a positive integer, got {getattr(self, name)}.")
        if self.opset is not None and not 18 <= self.opset <= 23:
            raise UserError(f"--opset must be between 18 and 23 (the dynamo exporter's range), got {self.opset}.")
        if self.benchmark and not self.data:
            raise UserError("--benchmark needs --data FILE (a labelled file to measure the metric on).")
        if self.int8_keep_fp32 and self.quantize != "int8":
            raise UserError("--int8_keep_fp32 applies to --quantize int8; add it or drop --int8_keep_fp32.")


def check_inputs(a: ExportArguments) -> None:
    """Everything that can be refused before any work: packages, the model folder, output_dir, --data."""
    missing = [p for p in EXPORT_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise UserError(f"export needs {', '.join(missing)}, which is not installed; run "
                        "pip install -r requirements-export.txt.")
    if not os.path.isdir(a.model) or not os.path.isfile(os.path.join(a.model, "config.json")):
        what = "does not exist" if not os.path.exists(a.model) else "has no config.json"
        raise UserError(f"--model '{a.model}' {what}; pass the output_dir of train_cls.py, train_ner.py or "
                        "train_mlm.py.")
    out = os.path.abspath(a.output_dir)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--output_dir '{a.output_dir}' is a file; pass a folder.")
    if os.path.isdir(out) and os.listdir(out) and not a.overwrite_output_dir:
        raise UserError(f"--output_dir '{a.output_dir}' is not empty; pass --overwrite_output_dir to replace it "
                        "or choose another folder.")
    if os.path.abspath(a.model) == out:
        raise UserError("--output_dir must differ from --model (the export is written beside the model).")
    if a.data and not os.path.isfile(a.data):
        raise UserError(f"--data '{a.data}' does not exist.")
    parent = os.path.dirname(out)
    while not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK):
        raise UserError(f"--output_dir '{a.output_dir}' is not writable (no write permission on '{parent}').")


def read_data(a: ExportArguments, head: str, tok, names: list, config, settings: dict) -> inf.EvalSet:
    """--data as an evaluation set, read and tokenized the way the model's training script does."""
    max_length = a.max_length or settings.get("max_length") or 128
    if head == "token-classification":
        labels = [config.id2label[i] for i in range(config.num_labels)]
        return inf.token_set(a.data, "--data", tok, names, labels, max_length, settings.get("tag_column_index", -1),
                             settings.get("tokens_column"), settings.get("tags_column"))
    if head == "fill-mask":
        return inf.masked_lm_set(a.data, "--data", tok, names, max_length, settings.get("mlm_probability", 0.15),
                                 settings.get("eval_mask_seed", 0))
    import pandas as pd

    from common.data.labels import resolve_columns
    from common.data.loading import read_table

    # the training run's reading settings (a headerless table's names, a non-UTF-8 encoding) apply to --data too
    df = read_table(a.data, "--data", *table_reading(settings, a.data, "--data"))
    given = a.text_column or a.text_pair_column
    cols = SimpleNamespace(
        text_columns=None if given else settings.get("text_columns"),
        text_column=a.text_column if given else settings.get("text_column"),
        text_pair_column=a.text_pair_column if given else settings.get("text_pair_column"),
        label_column=a.label_column or settings.get("label_column"), ignore_columns=settings.get("ignore_columns"))
    texts, pair, label = resolve_columns(cols, list(df.columns), f"--data '{a.data}'")
    sep = settings.get("text_separator")
    sep = sep if sep is not None else f" {tok.sep_token or ''} "
    regression = config.problem_type == "regression" or config.num_labels == 1
    assert isinstance(df, pd.DataFrame)
    return inf.classification_set(df, f"--data '{a.data}'", tok, names, texts, pair, label, sep, max_length,
                                  config.label2id, regression)


def parity_batches(data: inf.EvalSet, samples: int) -> list[dict]:
    """Batches of 1, 2, 4, ... 32 examples (the dynamic axes exercised), `samples` examples in all; for fill-mask
    on --data, `positions` marks the masked tokens (where a fill-mask prediction is read)."""
    batches, start, size = [], 0, 1
    labels = data.extra.get("mlm_labels")
    while start < min(samples, len(data)):
        idx = list(range(start, min(start + size, samples, len(data))))
        batch = inf.pad_batch(data, idx)
        if labels is not None:  # fill-mask: compare the predictions at the masked positions
            width = batch["input_ids"].shape[1]
            batch["positions"] = np.array([np.pad(labels[i] != -100, (0, width - len(labels[i]))) for i in idx])
        batches.append(batch)
        start, size = idx[-1] + 1, min(size * 2, 32)
    return batches


def check_parity(model, names, fp32_path, batches, atol, regression, threads) -> tuple[list, ox.Comparison]:
    reference = [ox.run_torch(model, b, names) for b in progress.track(batches, "parity: PyTorch")]
    session = ox.ort_session(fp32_path, threads)
    result = ox.compare(reference, [ox.run_ort(session, b) for b in progress.track(batches, "parity: ONNX Runtime")],
                        batches, regression)
    if not result.max_abs_diff <= atol:  # also refuses NaN
        raise UserError(f"fp32 ONNX logits differ from PyTorch by up to {result.max_abs_diff:.3g} (logits up to "
                        f"{result.logit_scale:.3g}) on {len(batches)} batches, above --atol {atol:g}; the export "
                        "was refused and nothing was written.")
    return reference, result


def int8_export(a, fp32_path, int8_path, reference, batches, regression, threads) -> dict:
    """model_int8.onnx, its agreement with PyTorch fp32, and when poor the measured fp32 layers that fix it."""
    groups = ox.quantizable_groups(fp32_path)

    def attempt(keep):
        info = ox.quantize_int8(fp32_path, int8_path, keep, groups)
        session = ox.ort_session(int8_path, threads)
        result = ox.compare(reference, [ox.run_ort(session, b) for b in batches], batches, regression)
        return {**info, "agreement": result.agreement, "max_abs_diff": result.max_abs_diff,
                "items": result.items, "size_mb": round(ox.file_mb(int8_path), 2)}

    auto = a.int8_keep_fp32 == ["auto"]
    unknown = sorted(set(a.int8_keep_fp32 or []) - set(groups) - {"auto"})
    if unknown:
        raise UserError(f"--int8_keep_fp32: unknown part(s) {', '.join(unknown)}; this model has "
                        f"{', '.join(groups)} (or auto).")
    requested = [] if auto else list(a.int8_keep_fp32 or [])
    report = attempt(requested)
    if regression or report["agreement"] >= a.int8_min_agreement:
        return report
    logger.warning("int8 is poor for this model: its labels agree with PyTorch fp32 on only %.1f%% of %d %s "
                   "(--int8_min_agreement %.0f%%); measuring which parts to keep in fp32", 100 * report["agreement"],
                   report["items"], "tokens" if reference[0].ndim == 3 else "examples", 100 * a.int8_min_agreement)
    fix = search_fp32_parts(attempt, groups, requested, a.int8_min_agreement)
    report["measured_fix"] = fix
    flags = " ".join(fix["keep_fp32"])
    if auto and fix["agreement"] > report["agreement"]:
        report = {**attempt(fix["keep_fp32"]), "measured_fix": fix}
        logger.warning("--int8_keep_fp32 auto: kept %s in fp32: agreement %.1f%%, %.1f MB", flags,
                       100 * report["agreement"], report["size_mb"])
    else:
        attempt(requested)  # the requested file again
        logger.warning("measured fix: keeping %s in fp32 gives %.1f%% agreement at %.1f MB; rerun with "
                       "--int8_keep_fp32 %s (or auto)", flags, 100 * fix["agreement"], fix["size_mb"], flags)
    return report


def search_fp32_parts(attempt, groups: dict, start: list, target: float, max_parts: int = 4) -> dict:
    """Each part kept in fp32 alone first (its gain), then the best parts together, most helpful first,
    until `target` or `max_parts` parts: at most len(groups) + max_parts quantizations (one bar tick each)."""
    alone = []
    candidates = [g for g in groups if g not in start]
    with progress.bar(len(candidates) + max(0, min(max_parts, len(candidates)) - 1), "int8: parts kept in fp32",
                      unit="quantization") as searched:
        for g in candidates:
            result = attempt(start + [g])
            alone.append({"keep_fp32": start + [g], "agreement": result["agreement"], "size_mb": result["size_mb"]})
            searched.update(1)
        tried = list(alone)
        ranked = sorted(alone, key=lambda r: (-r["agreement"], r["size_mb"]))
        best = ranked[0]
        for n in range(2, min(max_parts, len(ranked)) + 1):
            if best["agreement"] >= target:
                break
            keep = start + [r["keep_fp32"][-1] for r in ranked[:n]]
            result = attempt(keep)
            tried.append({"keep_fp32": keep, "agreement": result["agreement"], "size_mb": result["size_mb"]})
            searched.update(1)
            if result["agreement"] > best["agreement"]:
                best = tried[-1]
    return {**best, "tried": tried}


def write_folder(tmp: str, a, tok, head: str, report: dict) -> None:
    """Tokenizer, config, the training settings and a model card next to the ONNX files."""
    tok.save_pretrained(tmp)
    shutil.copy(os.path.join(a.model, "config.json"), os.path.join(tmp, "config.json"))
    if os.path.isfile(os.path.join(a.model, "training_args.yaml")):
        shutil.copy(os.path.join(a.model, "training_args.yaml"), os.path.join(tmp, "training_args.yaml"))
    write_json(os.path.join(tmp, "export_report.json"), report)
    write_text_atomic(os.path.join(tmp, "README.md"), ox.model_card(a.model, head, report))


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Entry point; `argv` as a list of strings."""
    (a,) = parse_args([ExportArguments], argv, __doc__)
    check_inputs(a)
    setup_logging(True, bars=progress.configure(a.progress, True) in ("bar", "widget"))
    for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "onnxruntime"):  # pass-by-pass chatter
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers import AutoConfig, AutoTokenizer

    from common.training.models import byte_level

    config = AutoConfig.from_pretrained(a.model)
    head = ox.head_of(config, a.model)
    tok = AutoTokenizer.from_pretrained(a.model)
    if head == "token-classification" and byte_level(tok):
        tok = AutoTokenizer.from_pretrained(a.model, add_prefix_space=True)
    names = ox.input_names(tok, config)
    threads = a.threads or len(os.sched_getaffinity(0))
    settings = training_settings(a.model)
    data = (read_data(a, head, tok, names, config, settings) if a.data else
            inf.synthetic_set(tok, names, head, a.parity_samples, min(a.max_length or 128, 128)))
    regression = head == "text-classification" and (config.problem_type == "regression" or config.num_labels == 1)
    model = ox.load_model(a.model, head)

    out = os.path.abspath(a.output_dir)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:  # a kill (SIGTERM) cleans up like Ctrl-C
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    tmp = tempfile.mkdtemp(dir=os.path.dirname(out), prefix=f".{os.path.basename(out)}.tmp-")
    try:
        t0 = time.perf_counter()
        raw = os.path.join(tmp, "exported.onnx")
        with progress.phase("exporting to ONNX (fp32), then fusing for ONNX Runtime"):
            report = {"source": os.path.abspath(a.model), "head": head, "inputs": names, "outputs": ["logits"],
                      "labels": [config.id2label[i] for i in range(config.num_labels)] if head != "fill-mask" else None,
                      "max_length": a.max_length or settings.get("max_length") or 128, "export": ox.export_fp32(
                          model, names, raw, a.opset)}
            fp32 = os.path.join(tmp, ox.FP32_FILE)
            report["export"].update(ox.fuse_for_ort(raw, fp32))
        os.unlink(raw)
        batches = parity_batches(data, a.parity_samples)
        with progress.phase("parity check, PyTorch against ONNX Runtime",
                            f"{sum(len(b['input_ids']) for b in batches)} examples in {len(batches)} batches"):
            reference, parity = check_parity(model, names, fp32, batches, a.atol, regression, threads)
        report["parity"] = {"batches": [int(b["input_ids"].shape[0]) for b in batches], "from": a.data or "random",
                            "max_abs_diff": parity.max_abs_diff, "mean_abs_diff": parity.mean_abs_diff,
                            "logit_scale": parity.logit_scale, "atol": a.atol, "label_agreement": parity.agreement}
        report["files"] = {ox.FP32_FILE: round(ox.file_mb(fp32), 2)}
        logger.info("fp32 ONNX parity: max |ONNX - PyTorch| = %.2g over %d examples (atol %g), labels agree %.2f%%",
                    parity.max_abs_diff, sum(report["parity"]["batches"]), a.atol, 100 * parity.agreement)
        if a.quantize == "int8":
            int8 = os.path.join(tmp, ox.INT8_FILE)
            with progress.phase("int8 quantization and its agreement with PyTorch"):
                report["int8"] = int8_export(a, fp32, int8, reference, batches, regression, threads)
            report["files"][ox.INT8_FILE] = report["int8"]["size_mb"]
            logger.info("int8: %.1f MB (fp32 %.1f MB); labels agree with PyTorch fp32 on %.2f%% of %d items",
                        report["int8"]["size_mb"], report["files"][ox.FP32_FILE], 100 * report["int8"]["agreement"],
                        report["int8"]["items"])
        report["export_seconds"] = round(time.perf_counter() - t0, 1)
        if a.benchmark:
            files = {"pytorch_fp32": a.model, "pytorch_bf16": a.model, "onnxruntime_fp32": fp32,
                     "onnxruntime_int8": os.path.join(tmp, ox.INT8_FILE)}
            files = {k: v for k, v in files.items() if k in a.backends and os.path.exists(v)}
            del model
            report["benchmark"] = [{"machine": inf.machine_info(threads), "data": os.path.abspath(a.data),
                                    "examples": len(data)}]
            print(json.dumps(report["benchmark"][0]), flush=True)
            report["benchmark"] += inf.benchmark(data, files, a.model, threads, a.batch_size, a.latency_samples,
                                                 a.max_seconds, os.path.join(tmp, ".bench"), a.repeats, a.passes,
                                                 log=lambda r: print(json.dumps(r), flush=True))
            print(json.dumps(report["benchmark"][-1]), flush=True)
            shutil.rmtree(os.path.join(tmp, ".bench"))
            with open(os.path.join(tmp, "benchmark.jsonl"), "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in report["benchmark"])
        write_folder(tmp, a, tok, head, report)
        honour_umask_tree(tmp)  # mkdtemp made it 0700: the permissions a plain mkdir/open would give
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    logger.info("exported to %s (%s)", a.output_dir, ", ".join(f"{k} {v:.1f} MB" for k, v in report["files"].items()))
    return report


if __name__ == "__main__":
    run_cli(main)
