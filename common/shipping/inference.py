"""Inference on a labelled file with PyTorch or ONNX Runtime: the evaluation set, batches, the metric,
and the timed measurement of one backend.

export.py uses it for the parity batches, the int8 agreement and `--benchmark`. Each benchmarked
backend runs in a fresh process (`python -m common.shipping.inference SPEC.json`), so its peak RSS is its
own and an ONNX Runtime process never imports torch: the worker reads the tokenized examples from a
file, writes its outputs to another, and prints one JSON line with its timings. Tokenization is done
once, before any backend runs, and is not part of the timed calls. Each worker times the rows one at a
time (batch-1 latency, each row at its own length) and at the batch size in both ORDERS (arrival: file
order; sorted: by length), so every backend is measured on the same batches with the same settings.
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

from .. import progress
from ..errors import UserError

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
    from ..data.labels import parse_labels
    from ..data.loading import require_columns

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
    from ..data import ner
    from ..data.loading import file_extension

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

    from ..data.mlm import mask_tokens, read_text_lines

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


# The two batch orders --benchmark times. arrival: rows in file order, as a server or a user scoring a
# file meets them, each batch padded to its own longest row; sorted: rows sorted by length first, the
# least padding a batcher can reach. Padding costs every backend, but not alike (int8 quantizes the
# activations of padded positions too), so a speed-up measured in one order need not hold in the other.
ORDERS = {"arrival": False, "sorted": True}   # order -> batch_order's by_length
# The speed-ups the summary reports: (backend, over backend).
RATIOS = (("onnxruntime_int8", "onnxruntime_fp32"), ("onnxruntime_int8", "pytorch_fp32"),
          ("onnxruntime_fp32", "pytorch_fp32"), ("pytorch_bf16", "pytorch_fp32"), ("onnxruntime_int8", "pytorch_bf16"))


def padding(data: EvalSet, batches: list) -> dict:
    """Real tokens, tokens after padding each batch to its longest row, and the share of padding."""
    lengths = data.lengths()
    real = int(sum(int(lengths[idx].sum()) for idx in batches))
    padded = int(sum(len(idx) * int(lengths[idx].max()) for idx in batches if len(idx)))
    return {"real_tokens": real, "padded_tokens": padded,
            "padding_fraction": round(1 - real / padded, 4) if padded else 0.0}


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
    from ..training.metrics import classification_metrics, ner_metrics, regression_metrics

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
        from ..data.ner import word_predictions

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
    """(callable batch -> logits, facts) for one backend; the facts say how it was set up (threads, options)."""
    backend, threads = spec["backend"], spec["threads"]
    if backend.startswith("pytorch"):
        import torch

        from .onnx_export import load_model, run_torch

        torch.set_num_threads(threads)
        model = load_model(spec["source"], spec["head"])
        facts = {"torch_threads": {"intra_op": torch.get_num_threads(), "inter_op": torch.get_num_interop_threads()}}
        if backend == "pytorch_bf16":
            def run(batch):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return run_torch(model, batch, spec["names"])
            return run, {**facts, "fast_bf16": fast_bf16()}
        return (lambda batch: run_torch(model, batch, spec["names"])), facts
    from .onnx_export import ort_session, run_ort

    session = ort_session(spec["model"], threads)
    return (lambda batch: run_ort(session, batch)), {"session_options": session_options(session)}


def session_options(session) -> dict:
    """The options an ONNX Runtime session runs with, read back from the session (not from what was asked)."""
    opts = session.get_session_options()
    found = {"intra_op_num_threads": opts.intra_op_num_threads, "inter_op_num_threads": opts.inter_op_num_threads,
             "execution_mode": str(opts.execution_mode).split(".")[-1],
             "graph_optimization_level": str(opts.graph_optimization_level).split(".")[-1],
             "enable_cpu_mem_arena": opts.enable_cpu_mem_arena, "enable_mem_pattern": opts.enable_mem_pattern,
             "providers": session.get_providers()}
    for key in ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning"):
        try:  # set only when asked for; absent means ONNX Runtime's default
            found[key] = opts.get_session_config_entry(key)
        except Exception:
            pass
    return found


def time_latency(run, data: EvalSet, samples: int, budget: float) -> dict:
    """Each of the first `samples` rows alone, in file order, at its own length (a batch of one has no
    padding): p50/p90/p99 and mean in ms, and the lengths timed. Stops after `budget` seconds."""
    times, start = [], time.perf_counter()
    for i in range(min(samples, len(data))):
        batch = pad_batch(data, [i])
        t = time.perf_counter()
        run(batch)
        times.append(time.perf_counter() - t)
        if time.perf_counter() - start > budget:
            break
    ms, lengths = np.array(times) * 1e3, data.lengths()[:len(times)]
    return {**{f"p{q}": round(float(np.percentile(ms, q)), 2) for q in (50, 90, 99)},
            "mean": round(float(ms.mean()), 2), "samples": len(ms),
            "tokens": {"min": int(lengths.min()), "median": float(np.median(lengths)), "max": int(lengths.max())}}


def timed_pass(run, data: EvalSet, batches: list, budget: float, out: Optional[Outputs] = None) -> dict:
    """One pass over `batches` (index arrays), each padded to its longest row outside the timed call (built
    as it goes, so the process's peak memory stays the backend's): seconds inside the calls, rows and real
    tokens done; stops after `budget` seconds. `out` collects what the metric needs."""
    seconds = rows = tokens = 0
    for idx in batches:
        batch = pad_batch(data, idx)
        t = time.perf_counter()
        logits = run(batch)
        seconds += time.perf_counter() - t
        rows, tokens = rows + len(idx), tokens + int(batch["attention_mask"].sum())
        if out is not None:
            out.add(idx, logits, batch)
        if seconds > budget:
            break
    return {"seconds": max(seconds, 1e-9), "examples": rows, "tokens": tokens}


def time_orders(run, data: EvalSet, batch_size: int, passes: int, budget: float) -> tuple[dict, dict]:
    """Both ORDERS at `batch_size`: one untimed warm-up pass of each, then `passes` timed passes, the orders
    alternating (so a change of the machine's load weighs on both); the fastest pass of each is kept.
    Returns (order -> record, order -> Outputs of its first timed pass)."""
    plans = {order: batch_order(data, batch_size, by_length) for order, by_length in ORDERS.items()}
    for plan in plans.values():
        timed_pass(run, data, plan, budget)
    done: dict = {order: [] for order in ORDERS}
    outputs = {order: Outputs(data) for order in ORDERS}
    for _ in range(passes):
        for order, plan in plans.items():
            if done[order] and done[order][0]["examples"] < len(data):
                continue  # the time limit cut the first pass: the next ones would be cut as well
            done[order].append(timed_pass(run, data, plan, budget, None if done[order] else outputs[order]))
    records = {}
    for order, results in done.items():
        best = max(results, key=lambda r: r["examples"] / r["seconds"])
        records[order] = {"batch_size": batch_size, "seconds": round(best["seconds"], 3),
                          "rows_per_second": round(best["examples"] / best["seconds"], 2),
                          "tokens_per_second": round(best["tokens"] / best["seconds"], 1),
                          "examples": best["examples"], **padding(data, plans[order]),
                          "pass_seconds": [round(r["seconds"], 3) for r in results]}
    return records, outputs


def measure(spec: dict) -> dict:
    """Load, warm up, then the batch-1 latency over the rows' own lengths and both batch orders (time_orders);
    each timed part stops after `max_seconds` (the record says how much it covered)."""
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
    latency = time_latency(run, data, spec["latency_samples"], budget)
    orders, outputs = time_orders(run, data, spec["batch_size"], spec.get("passes", 1), budget)
    for order, out in outputs.items():
        out.save(spec["outputs"][order])
    return {"backend": spec["backend"], "threads": spec["threads"], "load_seconds": round(load_seconds, 2),
            "latency_batch1_ms": latency, "orders": orders, "peak_rss_mb": peak_rss_mb(), **facts}


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
            "flags": {f: f in flags for f in wanted} if flags else "unknown", "int8_dot_product": int8_kernels(flags),
            "load_average_1min": round(os.getloadavg()[0], 2), "versions": versions}


def int8_kernels(flags: set) -> str:
    """The instructions int8 matmuls run on: what caps int8's speed-up over fp32 on this CPU."""
    if not flags:
        return "unknown"
    if "amx_int8" in flags:
        return "AMX"
    if flags & {"avx512_vnni", "avx_vnni"}:
        return "VNNI"
    return "AVX2 without VNNI" if "avx2" in flags else "no AVX2"


def run_backend(spec: dict, workdir: str) -> dict:
    """One backend in a fresh `python -m common.shipping.inference` process; its JSON line, or an error record."""
    import subprocess

    path = os.path.join(workdir, f"{spec['backend']}.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(spec, fh)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "common.shipping.inference", path], cwd=root, env=env,
                          capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"backend": spec["backend"], "error": tail}
    return json.loads(lines[-1])


def benchmark(data: EvalSet, files: dict, source: str, threads: int, batch_size: int, latency_samples: int,
              max_seconds: float, workdir: str, repeats: int = 1, passes: int = 1, log=None) -> list[dict]:
    """Every backend of `files` (backend -> model file; PyTorch ones -> the source folder) on `data`: one
    record per backend and order (ORDERS) with its speed, metric and agreement with PyTorch fp32 in that
    order, file size, peak RSS and how the backend was set up; the batch-1 latency in the arrival record;
    then a summary (summarize). With `repeats` > 1 the backends run in turn (A B C D A B C D ...) and each
    keeps its fastest run of each measurement: on a shared machine the other jobs' load then weighs on
    every backend alike."""
    os.makedirs(workdir, exist_ok=True)
    features = os.path.join(workdir, "features.npz")
    save_set(data, features)
    spec = {"head": data.head, "names": data.names, "pad_id": data.pad_id, "features": features,
            "threads": threads, "batch_size": batch_size, "latency_samples": latency_samples, "passes": passes,
            "max_seconds": max_seconds, "source": source}
    if data.head == "fill-mask":
        spec["mlm_labels"] = os.path.join(workdir, "mlm_labels.npz")
        labels = data.extra["mlm_labels"]
        np.savez(spec["mlm_labels"], values=np.concatenate(labels), lengths=np.array([len(x) for x in labels]))
    runs: dict = {b: [] for b in files}
    for r in range(repeats):
        for i, backend in enumerate(files, 1):
            outputs = {order: os.path.join(workdir, f"{backend}.{r}.{order}.npz") for order in ORDERS}
            turn = f"{i}/{len(files)}" + (f", round {r + 1}/{repeats}" if repeats > 1 else "")
            with progress.phase(f"benchmark {backend}", f"{turn}; up to {max_seconds:g} s per timed part"):
                runs[backend].append(run_backend({**spec, "backend": backend, "model": files[backend],
                                                  "outputs": outputs}, workdir))
    records, reference = [], {}
    for backend, model_file in files.items():
        for record, predictions in _order_records(backend, runs[backend], data, workdir, _size_mb(model_file)):
            if predictions is not None and backend == "pytorch_fp32":
                reference[record["order"]] = predictions
            elif predictions is not None and record["order"] in reference:
                record["agreement_with_pytorch_fp32"] = agreement(reference[record["order"]], predictions)
            records.append(record)
            if log:
                log(record)
    records.append(summarize(records, data.metric))
    return records


def _order_records(backend: str, runs: list, data: EvalSet, workdir: str, size_mb: float) -> list[tuple]:
    """(record, predictions) per order for one backend, from its runs (one per round): the round with the
    highest rows/s of each order, the lowest batch-1 p50 and the highest peak RSS; or (its error record,
    None) when no run worked."""
    ok = [(r, run) for r, run in enumerate(runs) if "error" not in run]
    if not ok:
        return [(runs[-1], None)]
    latency = min((run["latency_batch1_ms"] for _, run in ok), key=lambda x: x["p50"])
    records = []
    for order in ORDERS:
        r, best = max(ok, key=lambda x: x[1]["orders"][order]["rows_per_second"])
        out = Outputs.load(data, os.path.join(workdir, f"{backend}.{r}.{order}.npz"))
        record = {"backend": backend, "order": order, **best["orders"][order], "metric": compute_metric(data, out)}
        if order == "arrival":  # rows one at a time, in file order: how a row arrives at a server
            record["latency_batch1_ms"] = latency
        record.update({"file_size_mb": round(size_mb, 2), "peak_rss_mb": max(run["peak_rss_mb"] for _, run in ok),
                       "load_seconds": best["load_seconds"], "threads": best["threads"]})
        record.update({k: best[k] for k in ("session_options", "torch_threads", "fast_bf16") if k in best})
        if len(runs) > 1:
            record["repeats"] = [{"rows_per_second": run["orders"][order]["rows_per_second"],
                                  **({"p50_ms": run["latency_batch1_ms"]["p50"]} if order == "arrival" else {})}
                                 for _, run in ok]
        records.append((record, out.predictions()))
    return records


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
    """Per order: its padding, the speed-ups at the batch size ("a / b": a's rows/s over b's) and each backend's
    metric change from PyTorch fp32 in that order; then the batch-1 p50 speed-ups (b's p50 over a's) and each
    file's size as a fraction of PyTorch fp32's."""
    ok = {(r["backend"], r["order"]): r for r in records if "order" in r}
    summary: dict = {"summary": "speed-ups (a / b: above 1, a is faster) and changes from pytorch_fp32",
                     "metric": metric}
    for order in ORDERS:
        rows = {b: r for (b, o), r in ok.items() if o == order}
        if not rows:
            continue
        first = next(iter(rows.values()))
        part = {"batch_size": first["batch_size"], "padding_fraction": first["padding_fraction"],
                "throughput_x": {f"{a} / {b}": round(rows[a]["rows_per_second"] / rows[b]["rows_per_second"], 2)
                                 for a, b in RATIOS if a in rows and b in rows}}
        base = rows.get("pytorch_fp32")
        if base and base["metric"].get("complete"):
            part[f"{metric}_change"] = {b: round(r["metric"][metric] - base["metric"][metric], 5)
                                        for b, r in rows.items() if b != "pytorch_fp32" and r["metric"].get("complete")}
        summary[order] = part
    p50 = {b: r["latency_batch1_ms"]["p50"] for (b, _), r in ok.items() if "latency_batch1_ms" in r}
    summary["batch1_latency_p50_x"] = {f"{a} / {b}": round(p50[b] / p50[a], 2) for a, b in RATIOS
                                       if a in p50 and b in p50}
    sizes = {b: r["file_size_mb"] for (b, _), r in ok.items()}
    if sizes.get("pytorch_fp32"):
        summary["file_size_fraction"] = {b: round(s / sizes["pytorch_fp32"], 3) for b, s in sizes.items()
                                         if b != "pytorch_fp32"}
    return summary


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0], encoding="utf-8") as fh:
        spec = json.load(fh)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(json.dumps(measure(spec)), flush=True)


if __name__ == "__main__":
    main()
