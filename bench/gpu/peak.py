#!/usr/bin/env python
"""The bf16 matmul peak the GPU section's fractions divide by, appended to results.jsonl as one line.

    python bench/gpu/peak.py OUT/results.jsonl [--n 8192] [--warmup 3] [--repeats 10]

An n x n by n x n bf16 product of random normal matrices (zeros run faster and flatter the peak), `--warmup` products
first, then `--repeats` products timed one by one with CUDA events; the line gives the mean and the best TFLOP/s
(2 n^3 FLOPs each). On a machine without CUDA (run.sh --dry) it times the same on the CPU with a wall clock.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time


def measure(n: int, warmup: int, repeats: int) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(warmup):
        a @ b
    seconds = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1000)
        else:
            t = time.perf_counter()
            a @ b
            seconds.append(time.perf_counter() - t)
    flops = 2 * n ** 3
    return {"device": torch.cuda.get_device_name() if cuda else "cpu", "n": n, "dtype": "bfloat16",
            "warmup": warmup, "repeats": repeats, "timer": "CUDA events" if cuda else "wall clock",
            "mean_tflops": flops / statistics.mean(seconds) / 1e12, "best_tflops": flops / min(seconds) / 1e12}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("jsonl")
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    record = {"id": "a", "kind": "peak", **measure(args.n, args.warmup, args.repeats)}
    print(json.dumps(record))
    with open(args.jsonl, "a") as fh:
        fh.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
