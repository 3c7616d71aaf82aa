#!/usr/bin/env python
"""The GPU section's tables from bench/gpu/run.sh's results.jsonl, in Markdown, and issue 24's goals checked.

    python bench/gpu/summarize.py results.jsonl

Tables: the issue's MRPC and CoNLL-2003 runs side by side (training steps, whole command, steps/s, samples/s, dev
metric, fraction of the bf16 peak), batch 256, the 3-seed comparisons, then each goal: met, NOT met, or not measured.

What is counted:
- **training steps s**: ours, results.json's timing.train_steps_seconds; the official scripts, official_timer.py's
  sum over epochs of model.train() to model.eval() with a CUDA synchronize (their evaluations between epochs left
  out). **whole command s**: the wall time record.py measured around the process, start to exit.
- **steps/s, samples/s**: optimizer steps and training samples over the training-steps seconds (ours: results.json's
  global_step and train_samples_seen; the official scripts: the steps and examples x epochs they log).
- **FLOPs** (ours only: the official scripts report no padded tokens): forward + backward = 3 x forward, over every
  padded token the GPU computes (P tokens in S sequences, L layers, hidden d, feed-forward f, C labels):
  6 x N x P, N = the encoder's non-embedding parameters (per layer 4(d^2 + d) attention, 2df + f + d feed-forward,
  4d LayerNorm: biases and norms counted as the usual 6N convention does, though they are no matmuls),
  + 12 x L x d x P x T for the attention scores and their weighted sum (QK^T and AV: 2 x T x d each per token
  forward), T = P / S, the mean padded length (a batch's real T varies around it, so this slightly undercounts),
  + the head: 6 x (d^2 + d + dC + C) x S for sequence classification (pooler and classifier, once per sequence),
  6 x (dC + C) x P for token classification. Embedding lookups, softmax, GELU and the optimizer are not counted.
- **fraction of peak**: achieved FLOP/s over the training-steps seconds divided by stage a's mean bf16 matmul rate.
- **seed noise**: the 95% Welch t-interval of the difference between the two configurations' means over seeds;
  "same within seed noise" when it contains 0.
"""
from __future__ import annotations

import json
import math
import sys

# Two-sided 95% Student t quantiles by degrees of freedom (a fractional df is rounded down: a wider interval).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}
METRIC = {"mrpc": "accuracy", "conll": "f1"}
TASK_NAME = {"mrpc": "MRPC, 3 epochs", "conll": "CoNLL-2003, 1 epoch"}


def t95(df: float) -> float:
    df = max(1, int(math.floor(df)))
    return T95[max(k for k in T95 if k <= df)] if df <= 30 else 1.96


def load(path: str) -> dict:
    """id -> record; a later line with the same id wins (a stage rerun with --stages)."""
    records = {}
    with open(path) as fh:
        for line in fh:
            if line.strip():
                record = json.loads(line)
                records[record["id"]] = record
    return records


def encoder_parameters(model: dict) -> int:
    d, f, layers = model["hidden_size"], model["intermediate_size"], model["num_hidden_layers"]
    return layers * (4 * (d * d + d) + 2 * d * f + f + d + 4 * d)


def training_flops(model: dict, task: str, padded: float, samples: float, labels: int) -> float:
    """Forward + backward FLOPs of `padded` tokens in `samples` sequences (the module docstring's count)."""
    d, layers = model["hidden_size"], model["num_hidden_layers"]
    mean_len = padded / max(1.0, samples)
    flops = 6 * encoder_parameters(model) * padded + 12 * layers * d * padded * mean_len
    if task == "mrpc":
        flops += 6 * (d * d + d + d * labels + labels) * samples
    else:
        flops += 6 * (d * labels + labels) * padded
    return flops


def speed(record: dict, model: dict | None, peak: float | None) -> dict:
    """steps/s, samples/s and (ours, with a model and a peak) FLOPs per step, TFLOP/s and the fraction of peak."""
    seconds, steps, samples = record.get("train_steps_seconds"), record.get("steps"), record.get("samples")
    out = {}
    if not seconds:
        return out
    if steps:
        out["steps_per_second"] = steps / seconds
    if samples:
        out["samples_per_second"] = samples / seconds
    padded = record.get("padded_tokens")
    if model and padded and samples and steps:
        labels = record.get("num_labels") or (2 if record["task"] == "mrpc" else 9)
        total = training_flops(model, record["task"], padded, samples, labels)
        out.update(tflop_per_step=total / steps / 1e12, achieved_tflops=total / seconds / 1e12,
                   padded_tokens_per_step=padded / steps)
        if peak:
            out["fraction_of_peak"] = total / seconds / 1e12 / peak
    return out


def status(record: dict | None) -> str | None:
    """Why a record has no figures ("not run", "skipped: ...", "failed ..."), or None when it has them."""
    if record is None:
        return "not run"
    if record.get("skipped"):
        return f"skipped: {record.get('reason', '')}"
    if record.get("timed_out"):
        return f"killed at its limit after {record.get('wall_seconds', 0):.0f} s"
    if record.get("rc", 0) != 0:
        return f"failed (rc {record['rc']})"
    if record.get("error"):
        return f"no results: {record['error']}"
    return None


def fmt(value, digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:,.{digits}f}{suffix}"


def graphs_cell(record: dict) -> str:
    graphs = record.get("cuda_graphs")
    if not isinstance(graphs, dict):
        if record["impl"] == "official":
            return "n/a"
        asked = record.get("cuda_graphs_asked", "absent")
        return f"asked {asked}, flag absent" if asked != "absent" else "not in results.json"
    if not graphs.get("used"):
        return "eager"
    return f"{graphs.get('graphs', '?')} graphs, capture {fmt(graphs.get('capture_seconds'), 2)} s"


def metric_cell(record: dict) -> str:
    metrics = record.get("metrics") or {}
    main = METRIC[record["task"]]
    text = f"{main[:3] if main == 'accuracy' else main} {fmt(metrics.get(main), 4)}"
    if record["task"] == "mrpc" and "f1" in metrics:
        text += f", F1 {fmt(metrics['f1'], 4)}"
    return text


def precision_cell(record: dict) -> str:
    if record["impl"] == "official":
        return "fp32" if record.get("mixed_precision") == "no" else record.get("mixed_precision", "?")
    precision = record.get("mixed_precision")
    return "fp32" if precision == "no" else (precision or "?")


def run_table(records: dict, ids: list[str], model, peak) -> list[str]:
    lines = ["| stage | run | precision | CUDA graphs | training steps s | whole command s | steps/s | samples/s "
             "| dev metric | fraction of bf16 peak |", "|---|---|---|---|---|---|---|---|---|---|"]
    for rid in ids:
        record = records.get(rid)
        why = status(record)
        label = (record or {}).get("label", "")
        if why:
            lines.append(f"| {rid} | {label} | | | {why} | | | | | |")
            continue
        s = speed(record, model, peak)
        lines.append(
            f"| {rid} | {label} | {precision_cell(record)} | {graphs_cell(record)} "
            f"| {fmt(record.get('train_steps_seconds'), 2)} | {fmt(record.get('wall_seconds'), 1)} "
            f"| {fmt(s.get('steps_per_second'), 1)} | {fmt(s.get('samples_per_second'), 0)} | {metric_cell(record)} "
            f"| {fmt(100 * s['fraction_of_peak'], 2, '%') if 'fraction_of_peak' in s else 'n/a'} |")
    return lines


def big_batch_table(records: dict, model, peak) -> list[str]:
    lines = ["| stage | task | steps | padded tokens/step | TFLOP/step | training steps s | steps/s | samples/s "
             "| achieved TFLOP/s | fraction of bf16 peak | CUDA graphs |", "|---" * 11 + "|"]
    for rid in ("e1", "e2"):
        record = records.get(rid)
        why = status(record)
        if why:
            lines.append(f"| {rid} | {(record or {}).get('task', '')} | {why} | | | | | | | | |")
            continue
        s = speed(record, model, peak)
        lines.append(
            f"| {rid} | {TASK_NAME[record['task']]} | {record.get('steps')} "
            f"| {fmt(s.get('padded_tokens_per_step'), 0)} "
            f"| {fmt(s.get('tflop_per_step'), 3)} | {fmt(record.get('train_steps_seconds'), 2)} "
            f"| {fmt(s.get('steps_per_second'), 1)} | {fmt(s.get('samples_per_second'), 0)} "
            f"| {fmt(s.get('achieved_tflops'), 1)} "
            f"| {fmt(100 * s['fraction_of_peak'], 1, '%') if 'fraction_of_peak' in s else 'n/a'} "
            f"| {graphs_cell(record)} |")
    return lines


def seed_values(record: dict) -> list[float]:
    main = METRIC[record["task"]]
    return [run["metrics"][main] for run in record.get("per_seed", []) if main in run.get("metrics", {})]


def mean_ci(values: list[float]) -> tuple[float, float] | None:
    """Mean and 95% t half-width, or None for fewer than two values."""
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return mean, t95(len(values) - 1) * sd / math.sqrt(len(values))


def welch(a: list[float], b: list[float]) -> tuple[float, float] | None:
    """Difference of means a - b and its 95% Welch t half-width."""
    if len(a) < 2 or len(b) < 2:
        return None
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va = sum((v - ma) ** 2 for v in a) / (len(a) - 1) / len(a)
    vb = sum((v - mb) ** 2 for v in b) / (len(b) - 1) / len(b)
    if va + vb == 0:
        return ma - mb, 0.0
    df = (va + vb) ** 2 / ((va ** 2 / (len(a) - 1) if va else 0) + (vb ** 2 / (len(b) - 1) if vb else 0))
    return ma - mb, t95(df) * math.sqrt(va + vb)


def seeds_table(records: dict) -> list[str]:
    lines = ["| stage | run | per seed (42, 142, 242) | mean ± 95% t half-width | mean training steps s per seed "
             "| whole command s |", "|---|---|---|---|---|---|"]
    for rid in ("s1", "s2", "s3", "s4"):
        record = records.get(rid)
        why = status(record)
        if why:
            lines.append(f"| {rid} | {(record or {}).get('label', '')} | {why} | | | |")
            continue
        values = seed_values(record)
        ci = mean_ci(values)
        steps = [r["train_steps_seconds"] for r in record.get("per_seed", []) if r.get("train_steps_seconds")]
        lines.append(
            f"| {rid} | {TASK_NAME[record['task']]}: {record['label']} | {', '.join(f'{v:.4f}' for v in values)} "
            f"| {METRIC[record['task']]} {f'{ci[0]:.4f} ± {ci[1]:.4f}' if ci else 'n/a'} "
            f"| {fmt(sum(steps) / len(steps) if steps else None, 2)} | {fmt(record.get('wall_seconds'), 1)} |")
    return lines


def ratio(records: dict, slow: str, fast: str, key: str) -> tuple[float | None, str | None]:
    """records[slow][key] / records[fast][key], or (None, why one is missing)."""
    for rid in (slow, fast):
        why = status(records.get(rid))
        if why or not records[rid].get(key):
            return None, f"{rid}: {why or key + ' missing'}"
    return records[slow][key] / records[fast][key], None


def goals(records: dict, model, peak) -> list[str]:
    out = ["| goal | measured | verdict |", "|---|---|---|"]
    dry = records.get("machine", {}).get("dry")

    def verdict(ok: bool | None) -> str:
        text = "not measured" if ok is None else ("met" if ok else "NOT met")
        return f"({text}: dry run, meaningless)" if dry and ok is not None else text

    for slow, fast, what in (("c1", "c6", "MRPC training steps >= 4x faster than official fp32 (warm caches: c6)"),
                             ("c1", "c3", "MRPC training steps >= 4x faster than official fp32, cold caches (c3)"),
                             ("d1", "d2", "CoNLL-2003 training steps >= 4x faster than official fp32 (d2)")):
        value, why = ratio(records, slow, fast, "train_steps_seconds")
        out.append(f"| {what} | {why or f'{value:.2f}x'} | {verdict(None if why else value >= 4)} |")
    value, why = ratio(records, "c1", "c6", "wall_seconds")
    out.append(f"| MRPC whole command <= half the official fp32 one, warm caches (c6 vs c1) "
               f"| {why or f'{1 / value:.2f} of it'} | {verdict(None if why else value >= 2)} |")
    for slow, fast, task in (("c1", "c3", "MRPC"), ("d1", "d2", "CoNLL-2003")):
        value, why = ratio(records, slow, fast, "wall_seconds")
        out.append(f"| {task} whole command <= the official fp32 one, cold caches ({fast} vs {slow}) "
                   f"| {why or f'{1 / value:.2f} of it'} | {verdict(None if why else value >= 1)} |")
    for rid in ("e1", "e2"):
        record = records.get(rid)
        why = status(record) or (None if peak else "a: no peak measured")
        fraction = None if why else speed(record, model, peak).get("fraction_of_peak")
        shown = why or (f"{100 * fraction:.1f}% of {peak:.3g} TFLOP/s" if fraction is not None else "no padded tokens")
        out.append(f"| batch 256 >= 25% of the bf16 matmul peak in training steps ({rid}, "
                   f"{TASK_NAME.get((record or {}).get('task'), '?')}) | {shown} "
                   f"| {verdict(None if fraction is None else fraction >= 0.25)} |")
    for on, off, task in (("s1", "s2", "mrpc"), ("s3", "s4", "conll")):
        why = status(records.get(on)) or status(records.get(off))
        diff = None if why else welch(seed_values(records[on]), seed_values(records[off]))
        if diff is None:
            shown, ok = why or "fewer than 2 seeds", None
        else:
            shown = f"{METRIC[task]} on - off = {diff[0]:+.4f} ± {diff[1]:.4f}"
            ok = abs(diff[0]) <= diff[1]
        said = verdict(ok).replace("NOT met", "differ beyond seed noise").replace("met", "same within seed noise")
        out.append(f"| {TASK_NAME[task]}: graphs on = off within seed noise ({on} vs {off}) | {shown} | {said} |")
    return out


def reasons(records: dict) -> list[str]:
    """One line per run with CUDA graphs or precision reasons: why `auto` chose what it chose."""
    out = []
    for rid, record in records.items():
        if record.get("impl") != "ours" or status(record):
            continue
        graphs = record.get("cuda_graphs")
        graph_reason = graphs.get("reason") if isinstance(graphs, dict) else None
        out.append(f"- {rid}: precision {precision_cell(record)} ({record.get('precision_reason') or 'no reason'})"
                   + (f"; graphs: {graph_reason}" if graph_reason else ""))
    return out


def summarize(records: dict) -> list[str]:
    machine = records.get("machine", {})
    model = machine.get("model")
    peak_record = records.get("a")
    peak = None if status(peak_record) or not peak_record else peak_record.get("mean_tflops")
    lines = []
    if machine.get("dry"):
        lines += ["**DRY RUN** (run.sh --dry, on a CPU, 3 steps on 96 examples): it checks the plumbing; "
                  "no figure below means anything.", ""]
    versions = ", ".join(f"{k} {v}" for k, v in machine.get("versions", {}).items()
                         if k in ("python", "torch", "transformers", "accelerate", "datasets"))
    flag = "present" if machine.get("cuda_graphs_flag") else "ABSENT (runs went without it)"
    lines += [f"Machine: {machine.get('gpu') or 'no GPU'}; {versions}; commit {machine.get('commit', 'unknown')}; "
              f"--cuda_graphs flag {flag}.", ""]
    if peak_record and not status(peak_record):
        lines += [f"bf16 matmul peak (stage a): {peak_record['mean_tflops']:.4g} TFLOP/s mean, "
                  f"{peak_record['best_tflops']:.4g} best ({peak_record['n']}^3, {peak_record['repeats']} timed after "
                  f"{peak_record['warmup']} warm-ups, {peak_record['timer']}, {peak_record['device']}).", ""]
    else:
        lines += [f"bf16 matmul peak (stage a): {status(peak_record)}; fractions of the peak are n/a.", ""]
    check = records.get("b")
    lines += [f"GPU tests (stage b, pytest -m gpu tests/test_gpu.py -x): "
              f"{status(check) if status(check) and not (check or {}).get('summary_line') else ''}"
              f"{(check or {}).get('summary_line') or ''}", ""]
    for task, ids in (("mrpc", ["c1", "c2", "c3", "c6", "c4", "c5"]), ("conll", ["d1", "d2", "d3", "d4"])):
        lines += [f"### {TASK_NAME[task]}, batch 32", ""] + run_table(records, ids, model, peak) + [""]
    lines += ["### Batch 256, --cuda_graphs on, bf16", ""] + big_batch_table(records, model, peak) + [""]
    lines += ["### Same results: 3 seeds, graphs on vs off", ""] + seeds_table(records) + [""]
    lines += ["### Goals (issue 24)", ""] + goals(records, model, peak) + [""]
    failed = [f"- {rid}: {status(r)}: {((r.get('error') or '').strip().splitlines() or [''])[-1]}"
              for rid, r in records.items() if r.get("rc") and not r.get("timed_out")]
    if failed:
        lines += ["### Failures (last line of each; the whole output is in log.txt)", ""] + failed + [""]
    why = reasons(records)
    if why:
        lines += ["### Why each run ran as it did (results.json)", ""] + why + [""]
    return lines


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit("usage: summarize.py results.jsonl")
    print("\n".join(summarize(load(argv[0]))))


if __name__ == "__main__":
    main()
