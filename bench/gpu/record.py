#!/usr/bin/env python
"""Run one measured command and append one JSON line about it to results.jsonl (bench/gpu/run.sh calls this).

    python bench/gpu/record.py --jsonl OUT/results.jsonl --id c3 --task mrpc --impl ours --label "defaults" \\
        --timeout 120 --results DIR [--timer FILE] [--env K=V ...] [--note K=V ...] -- COMMAND ...

The wall time is measured here around the command (process start to exit: imports, reading, training, evaluation,
saving). The command's output goes to this process's output line by line (run.sh keeps it in log.txt) and is kept
to read the official scripts' printed metrics. A command still running after --timeout seconds is killed with its
process group and recorded as timed out. This file imports nothing heavy: it must not slow what it measures.

What a line holds, by --impl:
- ours: from DIR/results.json, or for --seeds DIR/seed_*/results.json and DIR/summary.json: the precision and why,
  setup.cuda_graphs, timing (training steps, whole run, first step, reading and tokenizing), the trained tokens and
  samples, and the metrics (per seed, with the mean and 95% t-interval our summary.json gives);
- official: the training-loop seconds from official_timer.py's FILE, the steps, examples and epochs their log
  prints, and every epoch's printed metrics ("epoch N: {...}").
"""
from __future__ import annotations

import argparse
import ast
import glob
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone

METRICS = ("accuracy", "f1", "precision", "recall", "loss")


def run(cmd: list[str], env: dict, timeout: float) -> tuple[int, bool, float, list[str]]:
    """(exit code, timed out, wall seconds, output lines), the output echoed as it comes."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", bufsize=1, start_new_session=True)
    lines: list[str] = []
    timed_out = False

    def kill(*_):
        nonlocal timed_out
        timed_out = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGALRM, kill)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, timeout))
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
            lines.append(line.rstrip("\n"))
        rc = proc.wait()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return rc, timed_out, time.perf_counter() - start, lines


def ours(results_dir: str) -> dict:
    """The fields of one run's results.json, or of every seed's and the summary for a --seeds run."""
    single = os.path.join(results_dir, "results.json")
    paths = [single] if os.path.isfile(single) else sorted(glob.glob(os.path.join(results_dir, "seed_*",
                                                                                  "results.json")))
    if not paths:
        return {"error": f"no results.json under {results_dir}"}
    runs = []
    for path in paths:
        with open(path) as fh:
            res = json.load(fh)
        tr, timing, setup = res.get("train", {}), res.get("timing", {}), res.get("setup", {})
        runs.append({
            "seed": res.get("seed", _seed_of(path)),
            "metrics": {k: v for k, v in res.get("eval", {}).items() if k in METRICS},
            "train_steps_seconds": timing.get("train_steps_seconds"),
            "total_seconds": timing.get("total_seconds"),
            "first_step_seconds": timing.get("first_step_seconds"),
            "load_and_tokenize_seconds": timing.get("load_and_tokenize_seconds"),
            "prepare_seconds": timing.get("prepare_seconds"),
            "eval_seconds": (timing.get("eval_during_training_seconds") or 0) + (timing.get("final_eval_seconds") or 0),
            "tokenization_cached": all(res.get("data", {}).get("tokenization_cached", {}).values() or [False]),
            "peak_gpu_memory_mb": timing.get("peak_gpu_memory_mb"),
            "steps": tr.get("global_step"),
            "samples": tr.get("train_samples_seen"),
            "tokens": tr.get("train_tokens"),
            "padded_tokens": tr.get("train_padded_tokens"),
            "mixed_precision": setup.get("mixed_precision"),
            "precision_reason": setup.get("precision_reason"),
            "cuda_graphs": setup.get("cuda_graphs"),
            "device": setup.get("device"),
            "num_labels": len(res.get("data", {}).get("labels") or []) or None,
        })
    record = dict(runs[0]) if len(runs) == 1 else {"per_seed": runs}
    if len(runs) > 1:
        for key in ("mixed_precision", "precision_reason", "cuda_graphs", "device", "num_labels"):
            record[key] = runs[0][key]
        summary_path = os.path.join(results_dir, "summary.json")
        if os.path.isfile(summary_path):
            with open(summary_path) as fh:
                metrics = json.load(fh).get("metrics", {})
            record["summary"] = {k[len("eval_"):]: {"mean": v["mean"], "ci95": v["ci95"], "n": v["n"]}
                                 for k, v in metrics.items() if k[len("eval_"):] in METRICS}
    return record


def _seed_of(path: str):
    match = re.search(r"seed_(\d+)", path)
    return int(match.group(1)) if match else None


EPOCH = re.compile(r"epoch (\d+):? (\{.*\})")
NUMBER = {"examples": re.compile(r"Num examples = (\d+)"), "epochs": re.compile(r"Num Epochs = (\d+)"),
          "steps": re.compile(r"Total optimization steps = (\d+)"),
          "batch": re.compile(r"Instantaneous batch size per device = (\d+)")}


CHECK_SUMMARY = re.compile(r"\b(passed|failed|skipped|deselected|errors?|no tests ran)\b")


def official(lines: list[str], timer_path: str | None) -> dict:
    """What the official script printed (its epochs' metrics, its sizes) and what official_timer.py measured."""
    record: dict = {"epoch_metrics": []}
    for line in lines:
        for key, pattern in NUMBER.items():
            match = pattern.search(line)
            if match and key not in record:
                record[key] = int(match.group(1))
        match = EPOCH.search(line)
        if match:
            try:
                metrics = ast.literal_eval(match.group(2).replace("np.float64(", "(").replace("np.int64(", "("))
            except (SyntaxError, ValueError):
                continue
            record["epoch_metrics"].append({"epoch": int(match.group(1)),
                                            **{k: float(v) for k, v in metrics.items() if k in METRICS}})
    if record["epoch_metrics"]:
        last = record["epoch_metrics"][-1]
        record["metrics"] = {k: v for k, v in last.items() if k != "epoch"}
    if "examples" in record and "epochs" in record:
        record["samples"] = record["examples"] * record["epochs"]
    if timer_path and os.path.isfile(timer_path):
        with open(timer_path) as fh:
            timer = json.load(fh)
        record.update(train_steps_seconds=timer["train_loop_seconds"], epoch_train_seconds=timer["epoch_train_seconds"],
                      before_first_epoch_seconds=timer["before_first_epoch_seconds"],
                      timer="official_timer.py: each epoch from model.train() to model.eval(), CUDA synchronized")
    return record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jsonl", required=True)
    parser.add_argument("--id", required=True)
    parser.add_argument("--task", required=True, choices=["mrpc", "conll", "-"])
    parser.add_argument("--impl", required=True, choices=["ours", "official", "check"],
                        help="check: a test command; its last pytest summary line is kept")
    parser.add_argument("--label", required=True)
    parser.add_argument("--timeout", type=float, required=True)
    parser.add_argument("--results", help="our run's --output_dir")
    parser.add_argument("--timer", help="official_timer.py's JSON file")
    parser.add_argument("--env", action="append", default=[], help="K=V for the command's environment")
    parser.add_argument("--note", action="append", default=[], help="K=V copied into the record")
    parser.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    extra = dict(item.split("=", 1) for item in args.env)
    notes = [item.split("=", 1) for item in args.note]
    print(f"=== {args.id} {args.task} {args.impl}: {args.label} (limit {args.timeout:.0f} s)", flush=True)
    print("$ " + " ".join(f"{k}={shlex.quote(v)}" for k, v in extra.items()) + (" " if extra else "")
          + shlex.join(cmd), flush=True)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    rc, timed_out, wall, lines = run(cmd, dict(os.environ, **extra), args.timeout)
    record = {"id": args.id, "task": args.task, "impl": args.impl, "label": args.label, "started": started,
              "command": shlex.join(cmd), "env": extra, "rc": rc, "timed_out": timed_out,
              "wall_seconds": round(wall, 3), **{k: int(v) if v.isdigit() else v for k, v in notes}}
    if args.impl == "check":
        record["summary_line"] = next((line for line in reversed(lines) if CHECK_SUMMARY.search(line)), None)
    elif rc == 0 and args.impl == "ours":
        record.update(ours(args.results))
    elif rc == 0:
        record.update(official(lines, args.timer))
    if rc != 0:
        record["error"] = "timed out" if timed_out else "\n".join(lines[-5:])
    with open(args.jsonl, "a") as fh:
        fh.write(json.dumps(record) + "\n")
    print(f"=== {args.id}: rc {rc}{' (timed out)' if timed_out else ''}, {wall:.1f} s wall", flush=True)


if __name__ == "__main__":
    main()
