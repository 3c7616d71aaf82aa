#!/usr/bin/env python
"""Run an official example script (run_glue_no_trainer.py, run_ner_no_trainer.py) unchanged, timing its training loop.

    python bench/gpu/official_timer.py TIMER.json SCRIPT [script arguments...]

The scripts print no timings of their own (their tqdm bar's rate is smoothed and its elapsed time spans the
evaluations between epochs). Their loop calls `model.train()` at the start of every epoch and `model.eval()` before
that epoch's evaluation, so this wrapper times each epoch's training from the first call to the second, with a CUDA
synchronize before the clock is read at the second so the queued steps are counted. Nothing else in the script is
touched (the synchronize comes right before their evaluation, which synchronizes anyway), except that a
transformers without `send_example_telemetry` (5.18 and later) gets a no-op in its place, with one line saying so.

TIMER.json gets: the seconds of every epoch's training loop and their sum, the seconds from this wrapper's start to
the first epoch (imports, reading, tokenizing, model loading) and to the end, and whether the script finished.
"""
from __future__ import annotations

import json
import os
import runpy
import sys
import time

START = time.perf_counter()


def main() -> int:
    if len(sys.argv) < 3:
        sys.exit("usage: official_timer.py TIMER.json SCRIPT [arguments...]")
    timer_path, script = sys.argv[1], sys.argv[2]
    import torch

    epochs: list[list[float]] = []  # [start, end] per epoch, end = 0.0 until model.eval()
    original_train = torch.nn.Module.train
    depth = 0

    def timed_train(self, mode: bool = True):
        # Module.train recurses into the children: only the outermost call is the script's.
        nonlocal depth
        if depth == 0:
            if mode:
                epochs.append([time.perf_counter(), 0.0])
            elif epochs and epochs[-1][1] == 0.0:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                epochs[-1][1] = time.perf_counter()
        depth += 1
        try:
            return original_train(self, mode)
        finally:
            depth -= 1

    torch.nn.Module.train = timed_train
    # Newer transformers dropped the examples' usage ping; it sends nothing offline anyway.
    import transformers.utils

    if not hasattr(transformers.utils, "send_example_telemetry"):
        transformers.utils.send_example_telemetry = lambda *args, **kwargs: None
        print(f"official_timer.py: transformers {transformers.__version__} has no send_example_telemetry; "
              "a no-op stands in (the scripts call it to send usage telemetry)", flush=True)
    sys.argv = [script, *sys.argv[3:]]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    finished = False
    try:
        runpy.run_path(script, run_name="__main__")
        finished = True
    finally:
        end = time.perf_counter()
        loops = [e - s for s, e in epochs if e]
        with open(timer_path, "w") as fh:
            json.dump({"epoch_train_seconds": loops, "train_loop_seconds": sum(loops),
                       "before_first_epoch_seconds": (epochs[0][0] - START) if epochs else None,
                       "wrapper_seconds": end - START, "finished": finished,
                       "cuda": torch.cuda.is_available()}, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
