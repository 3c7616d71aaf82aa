"""Inference on a labelled file with PyTorch or ONNX Runtime: the evaluation set, batches, the metric,
and the timed measurement of one backend.

export.py uses it for the parity batches, the int8 agreement and `--benchmark`. Each benchmarked
backend runs in a fresh process (`python -m common.inference SPEC.json`), so its peak RSS is its
own and an ONNX Runtime process never imports torch: the worker reads the tokenized examples from a
file, writes its outputs to another, and prints one JSON line with its timings. Tokenization is done
once, before any backend runs, and is not part of the timed calls.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from . import progress
from .errors import UserError

BACKENDS = ("pytorch_fp32", "pytorch_bf16", "onnxruntime_fp32", "onnxruntime_int8")
METRIC = {"text-classification": "accuracy", "token-classification": "f1", "fill-mask": "masked_accuracy"}


@dataclass
class EvalSet:
    """Tokenized examples (unpadded), in file order, and what the metric needs."""
    head: str
    names: list                       # model inputs
    features: dict                    # input name -> list of per-example id lists
    pad_id: int
    metric: str
    gold: Optional[np.ndarray] = None             # classification: label ids (floats for regression)
    regression: bool = False
    num_labels: int = 0
    extra: dict = field(default_factory=dict)     # token heads: word_ids, row_id, offsets, tags / mlm labels

    def __len__(self) -> int:
        return len(self.features["input_ids"])

    def lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.features["input_ids"]])


def classification_set(df, where: str, tokenizer, names: list, texts: list, pair: Optional[str], label: str,
                       sep: str, max_length: int, label2id: dict, regression: bool) -> EvalSet:
    """A labelled table (a DataFrame from data.read_table) tokenized like train_cls.py's validation file."""
    from .data import require_columns
    from .labels import parse_labels

    flags = {c: "--text_column" for c in texts} | {pair: "--text_pair_column", label: "--label_column"}
    require_columns(list(df.columns), texts + ([pair] if pair else []) + [label], where, flags)
    values, _ = parse_labels(df[label].tolist(), where, label)
    if regression:
        gold = np.asarray(values, dtype=np.float64)
    else:
        keys = {str(k): v for k, v in label2id.items()}
        names_of = [str(int(v)) if isinstance(v, float) and v == int(v) else str(v) for v in values]
        unknown = sorted(set(names_of) - set(keys))
        if unknown:
            raise UserError(f"{where}: label(s) {', '.join(unknown[:5])} in column '{label}' are not among "
                            f"the model's labels ({', '.join(keys)}).")
        gold = np.array([keys[n] for n in names_of], dtype=np.int64)
    first = (df[texts[0]].astype(str).tolist() if len(texts) == 1
             else [sep.join(map(str, row)) for row in zip(*(df[c].tolist() for c in texts))])
    second = df[pair].astype(str).tolist() if pair else None
    enc = tokenizer(first, second, truncation=True, max_length=max_length)
    return EvalSet("text-classification", names, {n: enc[n] for n in names}, tokenizer.pad_token_id,
                   "pearson" if regression else "accuracy", gold, regression, len(label2id))


def token_set(path: str, flag: str, tokenizer, names: list, labels: list, max_length: int,
              tag_column_index: int = -1, tokens_column: Optional[str] = None,
              tags_column: Optional[str] = None) -> EvalSet:
    """A tagged CoNLL file or table, split into windows like train_ner.py's evaluation."""
    from . import ner
    from .data import file_extension

    if file_extension(path) in ner.CONLL_EXTENSIONS:
        sents = ner.read_conll(path, flag, tag_column_index)
    else:
        sents = ner.read_table_sentences(path, flag, tokens_column, tags_column, labelled_required=True)
    if sents.tags is None:
        raise UserError(f"{flag} '{path}' has no tags; the benchmark needs a tagged file.")
    unknown = sorted({t for tags in sents.tags for t in tags if isinstance(t, str)} - set(labels))
    if unknown:
        raise UserError(f"{flag} '{path}' has tag(s) {', '.join(unknown[:5])} that the model does not know (its "
                        f"labels: {', '.join(labels)}).")
    sents = ner.clean(sents, list(labels), None, False)
    enc = ner.encode_sentences(tokenizer, sents.tokens, None, range(len(sents)), max_length, False, {})
    offsets = np.zeros(len(sents) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(w) for w in sents.tokens])
    extra = {"word_ids": enc["word_ids"], "row_id": np.asarray(enc["row_id"]), "offsets": offsets,
             "tags": sents.tags, "labels": list(labels)}
    return EvalSet("token-classification", names, {n: enc[n] for n in names}, tokenizer.pad_token_id, "f1",
                   extra=extra)


def masked_lm_set(path: str, flag: str, tokenizer, names: list, max_length: int, probability: float = 0.15,
                  seed: int = 0) -> EvalSet:
    """A text file, one example per line (truncated to max_length), with masks drawn once from `seed`
    (80% [MASK], 10% random, 10% kept, as in training)."""
    import torch

    from .mlm import mask_tokens, read_text_lines

    lines = read_text_lines(path, flag)
    enc = tokenizer(lines, truncation=True, max_length=max_length, return_special_tokens_mask=True)
    gen = torch.Generator().manual_seed(seed)
    ids, labels = [], []
    for row, special in zip(enc["input_ids"], enc["special_tokens_mask"]):
        masked, lab = mask_tokens(torch.tensor([row]), torch.tensor([special], dtype=torch.bool), probability,
                                  tokenizer.mask_token_id, len(tokenizer), generator=gen)
        ids.append(masked[0].tolist())
        labels.append(lab[0].numpy())
    features = {n: enc[n] for n in names}
    features["input_ids"] = ids
    return EvalSet("fill-mask", names, features, tokenizer.pad_token_id, "masked_accuracy",
                   extra={"mlm_labels": labels})


def synthetic_set(tokenizer, names: list, head: str, count: int, max_length: int, seed: int = 0) -> EvalSet:
    """Random word pieces of random lengths (for parity checks when no --data is given)."""
    rng = np.random.default_rng(seed)
    special = set(tokenizer.all_special_ids)
    vocab = np.array([i for i in range(len(tokenizer)) if i not in special])
    ids, types = [], []
    for _ in range(count):
        n = int(rng.integers(3, max(4, max_length - 1)))
        first = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
        last = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        ids.append([t for t in (first,) if t is not None] + rng.choice(vocab, n).tolist()
                   + [t for t in (last,) if t is not None])
        types.append([0] * len(ids[-1]))
    features = {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids], "token_type_ids": types}
    return EvalSet(head, names, {n: features[n] for n in names}, tokenizer.pad_token_id, METRIC[head])


def pad_batch(data: EvalSet, idx) -> dict:
    """Inputs of the examples `idx`, padded to the longest, as int64 arrays."""
    width = max(len(data.features["input_ids"][i]) for i in idx)
    out = {}
    for name in data.names:
        fill = data.pad_id if name == "input_ids" else 0
        out[name] = np.array([data.features[name][i] + [fill] * (width - len(data.features[name][i])) for i in idx],
                             dtype=np.int64)
    return out


def batch_order(data: EvalSet, size: int, by_length: bool = True) -> list[np.ndarray]:
    """Indices of each batch: sorted by length (least padding), or in file order."""
    order = np.argsort(data.lengths(), kind="stable") if by_length else np.arange(len(data))
    return [order[i:i + size] for i in range(0, len(order), size)]


class Outputs:
    """What the metric needs from each batch's logits, per example (so any batch order gives the same result)."""

    def __init__(self, data: EvalSet):
        self.data, self.done = data, np.zeros(len(data), dtype=bool)
        self.logits, self.tokens, self.top, self.logprob = {}, {}, {}, {}

    def add(self, idx, logits: np.ndarray, batch: dict) -> None:
        for k, i in enumerate(idx):
            i = int(i)
            n = len(self.data.features["input_ids"][i])
            if self.data.head == "text-classification":
                self.logits[i] = logits[k].astype(np.float32)
            elif self.data.head == "token-classification":
                self.tokens[i] = logits[k, :n].argmax(-1).astype(np.int64)
            else:
                labels = self.data.extra.get("mlm_labels")
                where = np.flatnonzero(labels[i] != -100) if labels is not None else np.arange(n)
                rows = logits[k, where].astype(np.float64)
                self.top[i] = rows.argmax(-1)
                if labels is not None:
                    peak = rows.max(-1, keepdims=True)
                    norm = peak[:, 0] + np.log(np.exp(rows - peak).sum(-1))
                    self.logprob[i] = rows[np.arange(len(where)), labels[i][where]] - norm
            self.done[i] = True

    def save(self, path: str) -> None:
        items = {"text-classification": self.logits, "token-classification": self.tokens, "fill-mask": self.top}
        arrays = {"done": self.done}
        for key, store in (("main", items[self.data.head]), ("logprob", self.logprob)):
            keys = sorted(store)
            arrays[f"{key}_index"] = np.array(keys, dtype=np.int64)
            arrays[f"{key}_lengths"] = np.array([len(np.atleast_1d(store[i])) for i in keys], dtype=np.int64)
            arrays[f"{key}_values"] = (np.concatenate([np.atleast_1d(store[i]) for i in keys]) if keys
                                       else np.zeros(0))
        np.savez(path, **arrays)

    @classmethod
    def load(cls, data: EvalSet, path: str) -> "Outputs":
        out = cls(data)
        with np.load(path) as z:
            out.done = z["done"]
            items = {"text-classification": out.logits, "token-classification": out.tokens, "fill-mask": out.top}
            for key, store in (("main", items[data.head]), ("logprob", out.logprob)):
                values = np.split(z[f"{key}_values"], np.cumsum(z[f"{key}_lengths"])[:-1])
                store.update(zip(z[f"{key}_index"].tolist(), values))
        return out

    def predictions(self) -> dict:
        """Predicted label per example (classification) or per real token (token heads), in file order."""
        if self.data.head == "text-classification":
            return {i: int(v.argmax()) for i, v in self.logits.items()}
        return self.tokens if self.data.head == "token-classification" else self.top


def compute_metric(data: EvalSet, out: Outputs) -> dict:
    """The head's metrics on the examples done; `complete` says whether that is the whole file."""
    from .metrics import classification_metrics, ner_metrics, regression_metrics

    complete = bool(out.done.all())
    if not complete:
        return {"complete": False, "examples": int(out.done.sum())}
    if data.head == "text-classification":
        logits = np.stack([out.logits[i] for i in range(len(data))])
        if data.regression:
            m = regression_metrics(data.gold, logits[:, 0].astype(np.float64))
        else:
            m = classification_metrics(data.gold, logits.argmax(-1), data.num_labels)
            m = {k: m[k] for k in ("accuracy", "f1", "mcc")}
    elif data.head == "token-classification":
        from .ner import word_predictions

        width = max(len(w) for w in data.extra["word_ids"])
        preds = np.full((len(data), width), -100, dtype=np.int64)
        words = np.full((len(data), width), -1, dtype=np.int64)
        for i in range(len(data)):
            preds[i, :len(out.tokens[i])] = out.tokens[i]
            words[i, :len(data.extra["word_ids"][i])] = data.extra["word_ids"][i]
        offsets, labels = data.extra["offsets"], data.extra["labels"]
        flat, _ = word_predictions(preds, words, data.extra["row_id"], offsets)
        pred = [[labels[p] if p >= 0 else "O" for p in flat[offsets[r]:offsets[r + 1]]]
                for r in range(len(offsets) - 1)]
        full = ner_metrics(data.extra["tags"], pred)
        m = {k: full[k] for k in ("f1", "precision", "recall", "accuracy")}
    else:
        labels = data.extra["mlm_labels"]
        gold = np.concatenate([labels[i][labels[i] != -100] for i in range(len(data))])
        top = np.concatenate([out.top[i] for i in range(len(data))])
        nll = -np.concatenate([out.logprob[i] for i in range(len(data))])
        m = {"masked_accuracy": float((top == gold).mean()) if len(gold) else 0.0,
             "perplexity": float(np.exp(nll.mean())) if len(nll) else float("nan"), "masked_tokens": int(len(gold))}
    return {"complete": True, "examples": len(data), **{k: float(v) for k, v in m.items()}}


# ---------------------------------------------------------------------------------------------
# One backend in its own process
# ---------------------------------------------------------------------------------------------

def save_set(data: EvalSet, path: str) -> None:
    arrays = {}
    for name in data.names:
        rows = data.features[name]
        arrays[f"{name}_lengths"] = np.array([len(r) for r in rows], dtype=np.int64)
        arrays[f"{name}_values"] = np.concatenate([np.asarray(r, dtype=np.int64) for r in rows])
    np.savez(path, **arrays)


def load_set(path: str, head: str, names: list, pad_id: int) -> EvalSet:
    with np.load(path) as z:
        features = {n: [r.tolist() for r in np.split(z[f"{n}_values"], np.cumsum(z[f"{n}_lengths"])[:-1])]
                    for n in names}
    return EvalSet(head, names, features, pad_id, METRIC[head])


def fast_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (AVX512-BF16 / AMX); without, autocast is emulated and slow."""
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def load_backend(spec: dict):
    """(callable batch -> logits, facts) for one backend."""
    backend, threads = spec["backend"], spec["threads"]
    if backend.startswith("pytorch"):
        import torch

        from .onnx_export import load_model, run_torch

        torch.set_num_threads(threads)
        model = load_model(spec["source"], spec["head"])
        facts = {"fast_bf16": fast_bf16()} if backend == "pytorch_bf16" else {}
        if backend == "pytorch_bf16":
            def run(batch):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return run_torch(model, batch, spec["names"])
            return run, facts
        return (lambda batch: run_torch(model, batch, spec["names"])), facts
    from .onnx_export import ort_session, run_ort

    session = ort_session(spec["model"], threads)
    return (lambda batch: run_ort(session, batch)), {}


def measure(spec: dict) -> dict:
    """Load, warm up, then latency at batch 1 (file order) and one pass at the throughput batch size
    (length-sorted); each phase stops after `max_seconds` (the record says how much it covered)."""
    t0 = time.perf_counter()
    run, facts = load_backend(spec)
    load_seconds = time.perf_counter() - t0
    data = load_set(spec["features"], spec["head"], spec["names"], spec["pad_id"])
    if spec["head"] == "fill-mask" or spec.get("mlm_labels"):
        with np.load(spec["mlm_labels"]) as z:
            data.extra["mlm_labels"] = np.split(z["values"], np.cumsum(z["lengths"])[:-1])
    budget = spec["max_seconds"]
    for i in range(min(3, len(data))):  # warm-up: first calls allocate and pick kernels
        run(pad_batch(data, [i]))
    latencies, start = [], time.perf_counter()
    for i in range(min(spec["latency_samples"], len(data))):
        batch = pad_batch(data, [i])
        t = time.perf_counter()
        run(batch)
        latencies.append(time.perf_counter() - t)
        if time.perf_counter() - start > budget:
            break
    out, batches = Outputs(data), batch_order(data, spec["batch_size"], spec.get("sort_by_length", True))
    run(pad_batch(data, batches[len(batches) // 2]))  # warm-up at the batch size
    seconds = tokens = padded = 0
    for idx in batches:
        batch = pad_batch(data, idx)
        t = time.perf_counter()
        logits = run(batch)
        seconds += time.perf_counter() - t
        out.add(idx, logits, batch)
        tokens += int(batch["attention_mask"].sum())
        padded += batch["attention_mask"].size
        if seconds > budget:
            break
    out.save(spec["outputs"])
    done = int(out.done.sum())
    lat = np.array(latencies) * 1e3
    return {"backend": spec["backend"], "threads": spec["threads"], "load_seconds": round(load_seconds, 2),
            "latency_batch1_ms": {"p50": round(float(np.percentile(lat, 50)), 2),
                                  "p95": round(float(np.percentile(lat, 95)), 2),
                                  "mean": round(float(lat.mean()), 2), "samples": len(lat)},
            f"throughput_batch{spec['batch_size']}": {
                "samples_per_second": round(done / seconds, 2), "tokens_per_second": round(tokens / seconds, 1),
                "seconds": round(seconds, 3), "examples": done, "padding_fraction": round(1 - tokens / padded, 4)},
            "peak_rss_mb": peak_rss_mb(), **facts}


def peak_rss_mb() -> int:
    """This process's peak resident memory. VmHWM starts afresh at exec; ru_maxrss would carry the
    parent's peak over into a child started by fork + exec."""
    try:
        with open("/proc/self/status", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024)
    except OSError:
        pass
    scale = 2**20 if sys.platform == "darwin" else 1024
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale)


def machine_info(threads: int) -> dict:
    """CPU model and the instruction sets that decide int8/bf16 speed, versions, and the load (shared machines)."""
    import platform

    model, flags = platform.processor() or "unknown", set()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    versions = {}
    for name in ("torch", "onnxruntime", "onnx", "transformers"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return {"cpu": model, "cpus": os.cpu_count(), "threads": threads,
            "flags": {f: f in flags for f in wanted} if flags else "unknown",
            "load_average_1min": round(os.getloadavg()[0], 2), "versions": versions}


def run_backend(spec: dict, workdir: str) -> dict:
    """One backend in a fresh `python -m common.inference` process; its JSON line, or an error record."""
    import subprocess

    path = os.path.join(workdir, f"{spec['backend']}.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(spec, fh)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "common.inference", path], cwd=root, env=env, capture_output=True,
                          text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"backend": spec["backend"], "error": tail}
    return json.loads(lines[-1])


def benchmark(data: EvalSet, files: dict, source: str, threads: int, batch_size: int, latency_samples: int,
              max_seconds: float, workdir: str, repeats: int = 1, log=None) -> list[dict]:
    """Every backend of `files` (backend -> model file; PyTorch ones -> the source folder) on `data`: its
    metric, latency, throughput, file size and peak RSS, plus agreement with PyTorch fp32; then a summary.
    With `repeats` > 1 the backends run in turn (A B C D A B C D ...) and each keeps its fastest run of
    each measurement: on a shared machine the other jobs' load then weighs on every backend alike."""
    os.makedirs(workdir, exist_ok=True)
    features = os.path.join(workdir, "features.npz")
    save_set(data, features)
    spec = {"head": data.head, "names": data.names, "pad_id": data.pad_id, "features": features,
            "threads": threads, "batch_size": batch_size, "latency_samples": latency_samples,
            "max_seconds": max_seconds, "source": source}
    if data.head == "fill-mask":
        spec["mlm_labels"] = os.path.join(workdir, "mlm_labels.npz")
        labels = data.extra["mlm_labels"]
        np.savez(spec["mlm_labels"], values=np.concatenate(labels), lengths=np.array([len(x) for x in labels]))
    runs: dict = {b: [] for b in files}
    for r in range(repeats):
        for i, backend in enumerate(files, 1):
            outputs = os.path.join(workdir, f"{backend}.npz")
            turn = f"{i}/{len(files)}" + (f", round {r + 1}/{repeats}" if repeats > 1 else "")
            with progress.phase(f"benchmark {backend}", f"{turn}; up to {max_seconds:g} s per timed part"):
                runs[backend].append(run_backend({**spec, "backend": backend, "model": files[backend],
                                                  "outputs": outputs}, workdir))
    records, reference = [], None
    for backend, model_file in files.items():
        record = _fastest(runs[backend])
        if "error" not in record:
            out = Outputs.load(data, os.path.join(workdir, f"{backend}.npz"))
            record["metric"] = compute_metric(data, out)
            preds = out.predictions()
            if backend == "pytorch_fp32":
                reference = preds
            elif reference is not None:
                record["agreement_with_pytorch_fp32"] = agreement(reference, preds)
            record["file_size_mb"] = round(_size_mb(model_file), 1)
        records.append(record)
        if log:
            log(record)
    records.append(summarize(records, data.metric))
    return records


def _fastest(runs: list) -> dict:
    """One record from repeated runs: the lowest p50 latency (with its p95) and the highest throughput."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    key = next(k for k in ok[0] if k.startswith("throughput_batch"))
    record = dict(max(ok, key=lambda r: r[key]["samples_per_second"]))
    record["latency_batch1_ms"] = min(ok, key=lambda r: r["latency_batch1_ms"]["p50"])["latency_batch1_ms"]
    record["peak_rss_mb"] = max(r["peak_rss_mb"] for r in ok)
    if len(runs) > 1:
        record["repeats"] = [{"p50_ms": r["latency_batch1_ms"]["p50"], "samples_per_second":
                              r[key]["samples_per_second"]} for r in ok]
    return record


def agreement(reference: dict, other: dict) -> float:
    """Fraction of predicted labels (per example, or per token for token heads) equal on the examples both did."""
    same = total = 0
    for i in set(reference) & set(other):
        a, b = np.atleast_1d(reference[i]), np.atleast_1d(other[i])
        same += int((a == b).sum())
        total += a.size
    return round(same / total, 5) if total else float("nan")


def _size_mb(path: str) -> float:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
                   if f.endswith((".safetensors", ".bin"))) / 2**20
    return os.path.getsize(path) / 2**20 if os.path.isfile(path) else 0.0


def summarize(records: list, metric: str) -> dict:
    """Ratios of each backend to PyTorch fp32: throughput, p50 latency (fp32 / this), file size, metric change."""
    ok = {r["backend"]: r for r in records if "error" not in r}
    base = ok.get("pytorch_fp32")
    summary = {"summary": "ratios to pytorch_fp32", "metric": metric}
    if not base:
        return summary
    key = next(k for k in base if k.startswith("throughput_batch"))
    for name, r in ok.items():
        if name == "pytorch_fp32":
            continue
        row = {"throughput_x": round(r[key]["samples_per_second"] / base[key]["samples_per_second"], 2),
               "latency_p50_x": round(base["latency_batch1_ms"]["p50"] / r["latency_batch1_ms"]["p50"], 2),
               "file_size_fraction": (round(r["file_size_mb"] / base["file_size_mb"], 3)
                                      if base.get("file_size_mb") else None)}
        if r["metric"].get("complete") and base["metric"].get("complete"):
            row[f"{metric}_change"] = round(r["metric"][metric] - base["metric"][metric], 5)
        summary[name] = row
    if "onnxruntime_int8" in ok and "pytorch_bf16" in ok:
        summary["onnxruntime_int8_over_pytorch_bf16_throughput"] = round(
            ok["onnxruntime_int8"][key]["samples_per_second"] / ok["pytorch_bf16"][key]["samples_per_second"], 2)
    return summary


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0], encoding="utf-8") as fh:
        spec = json.load(fh)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(json.dumps(measure(spec)), flush=True)


if __name__ == "__main__":
    main()
