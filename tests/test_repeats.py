"""Repeated runs: statistics, k-fold plans, seeds/k-fold jobs end to end (summary.json, plots, the
printed table), resuming a killed multi-seed job, and refusals."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from scipy import stats

from common.stats import kfold_indices, summarize
from conftest import FAST, ROOT, run_script

# ---------------------------------------------------------------------------------------------
# Statistics and plans
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("values", [[0.81, 0.79, 0.84, 0.80, 0.83], [1.0, 2.0], [5.5, 5.5, 5.5], list(range(30))])
def test_summary_matches_scipy_t_interval(values):
    s = summarize(values)
    x = np.asarray(values, dtype=float)
    assert s["n"] == len(x) and s["mean"] == pytest.approx(x.mean())
    assert s["std"] == pytest.approx(x.std(ddof=1))
    assert (s["min"], s["max"]) == (x.min(), x.max())
    if x.std() == 0:
        assert s["ci95"] == [pytest.approx(x.mean())] * 2
    else:
        lo, hi = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
        assert s["ci95"] == [pytest.approx(lo), pytest.approx(hi)]


def test_summary_of_one_value_has_no_spread_and_ignores_missing():
    s = summarize([0.8, None, float("nan")])
    assert s["n"] == 1 and s["mean"] == 0.8 and s["std"] is None and s["ci95"] is None
    assert summarize([])["n"] == 0


@pytest.mark.parametrize("n,k", [(240, 5), (61, 3), (10, 10), (37, 4)])
def test_kfold_covers_every_example_once_with_balanced_classes(n, k):
    labels = np.random.default_rng(n).integers(0, 3, n)
    labels[:3] = [0, 1, 2]
    held_all = []
    for fold in range(k):
        train, held = kfold_indices(n, k, fold, seed=7, stratify=labels)
        assert len(np.intersect1d(train, held)) == 0 and len(train) + len(held) == n
        held_all.extend(held.tolist())
        assert abs(len(held) - n / k) < 1
        for c in np.unique(labels):
            expected = np.sum(labels == c) / k
            assert abs(np.sum(labels[held] == c) - expected) < 1, (fold, c)  # within one example
    assert sorted(held_all) == list(range(n))


def test_kfold_is_deterministic_per_seed():
    a = [kfold_indices(50, 5, f, 1)[1].tolist() for f in range(5)]
    b = [kfold_indices(50, 5, f, 1)[1].tolist() for f in range(5)]
    c = [kfold_indices(50, 5, f, 2)[1].tolist() for f in range(5)]
    assert a == b and a != c


def test_plan_names_and_split_seeds():
    from common.config import TrainArguments
    from common.runs.plan import PlannedRun, plan_runs

    assert plan_runs(TrainArguments(seed=7)) == [PlannedRun("", 7, None)]  # a single run: a plan of one
    runs = plan_runs(TrainArguments(seeds=[1, 2], kfold=2, resplit_per_seed=False))
    assert [r.name for r in runs] == ["seed_1_fold_1", "seed_1_fold_2", "seed_2_fold_1", "seed_2_fold_2"]
    assert {r.split.seed for r in runs} == {1}
    runs = plan_runs(TrainArguments(num_runs=3, seed=5, resplit_per_seed=True))
    assert [(r.name, r.seed, r.split.seed) for r in runs] == [("seed_5", 5, 5), ("seed_105", 105, 105),
                                                               ("seed_205", 205, 205)]


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------

ARGS = FAST[2:] + ["--num_train_epochs", "3", "--learning_rate", "3e-3"]
PNG = b"\x89PNG\r\n\x1a\n"


def is_png(path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head != PNG:
        return False
    import matplotlib.image

    img = matplotlib.image.imread(path)
    return img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def load(path):
    with open(path) as fh:
        return json.load(fh)


def test_three_seeds_resplit(tiny_model, sentiment_files, tmp_path):
    out = tmp_path / "seeds"
    proc = run_script("train_cls.py", ["--model", tiny_model, "--train_file", sentiment_files["train"],
                                       "--validation_split", "0.15", "--test_split", "0.15", "--seeds", "1", "2", "3",
                                       "--resplit_per_seed", "--output_dir", str(out), *ARGS])
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = load(out / "summary.json")
    assert s["mode"] == "seeds" and s["num_runs"] == 3 and s["seeds"] == [1, 2, 3] and s["primary_split"] == "test"
    assert [r["name"] for r in s["runs"]] == ["seed_1", "seed_2", "seed_3"]
    acc = s["metrics"]["test_accuracy"]
    values = [r["metrics"]["test_accuracy"] for r in s["runs"]]
    assert acc["n"] == 3 and acc["mean"] == pytest.approx(np.mean(values))
    lo, hi = (stats.t.interval(0.95, 2, loc=np.mean(values), scale=stats.sem(values)) if np.std(values)
              else (acc["mean"],) * 2)
    assert acc["ci95"] == [pytest.approx(lo), pytest.approx(hi)]
    assert all("train_seconds" in r["metrics"] for r in s["runs"])
    # 70/15/15 split drawn per seed: sizes right, and the test rows differ between seeds
    tests = []
    for r in s["runs"]:
        res = load(out / r["name"] / "results.json")
        assert res["data"]["sizes"] == {"train": 168, "validation": 36, "test": 36}
        assert res["data"]["split_seed"] == r["seed"]
        with open(out / r["name"] / "predictions_test.csv") as fh:
            tests.append(sorted(line.split(",")[0] for line in fh.readlines()[1:]))
    assert tests[0] != tests[1]
    for png in ("learning_curves.png", "metrics_summary.png", "confusion_matrix.png", "seed_1/learning_curve.png",
                "seed_1/confusion_matrix.png"):
        assert is_png(out / png), png
    table = (out / "summary.txt").read_text()
    assert "mean" in table and "ci95 low" in table and "seed_3" in table
    assert table.strip() in proc.stdout


def test_three_fold_cv(tiny_model, sentiment_files, tmp_path):
    out = tmp_path / "kfold"
    with open(sentiment_files["train"]) as fh:
        header, *rows = fh.readlines()
    train = tmp_path / "train.csv"  # a file no other test tokenized
    train.write_text(header + "".join(reversed(rows)))
    proc = run_script("train_cls.py", ["--model", tiny_model, "--train_file", str(train), "--kfold", "3",
                                       "--output_dir", str(out), *ARGS])
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = load(out / "summary.json")
    assert s["mode"] == "kfold" and s["kfold"] == 3 and [r["fold"] for r in s["runs"]] == [1, 2, 3]
    assert s["metrics"]["test_accuracy"]["n"] == 3 and "eval_accuracy" in s["metrics"]
    held = []
    for r in s["runs"]:
        res = load(out / r["name"] / "results.json")
        assert res["data"]["kfold"] == 3 and res["test"]["num_examples"] == 80
        assert res["data"]["sizes"]["validation"] + res["data"]["sizes"]["train"] == 160
        with open(out / r["name"] / "predictions_test.csv") as fh:
            held += [int(line.split(",")[0]) for line in fh.readlines()[1:]]
    assert sorted(held) == list(range(240))  # every example held out exactly once
    assert np.sum(s["pooled_test_confusion_matrix"]) == 240
    # tokenized once: the later folds found the training file in the cache
    assert [load(out / r["name"] / "results.json")["data"]["tokenization_cached"]["train"] for r in s["runs"]] == \
        [False, True, True]
    for png in ("learning_curves.png", "metrics_summary.png", "confusion_matrix.png", "fold_2/learning_curve.png"):
        assert is_png(out / png), png


def test_ner_kfold(tmp_path, tiny_model):
    import random

    from test_ner import toy_ner_sentence, write_conll

    out = tmp_path / "ner"
    rng = random.Random(3)
    train = write_conll(tmp_path / "train.txt", [toy_ner_sentence(rng) for _ in range(60)])
    proc = run_script("train_ner.py", ["--model", tiny_model, "--train_file", train, "--kfold", "2",
                                       "--output_dir", str(out), *ARGS])
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = load(out / "summary.json")
    assert s["num_runs"] == 2 and "test_f1" in s["metrics"]
    sentences = sum(load(out / r["name"] / "results.json")["test"]["num_sentences"] for r in s["runs"])
    assert sentences == 60


def test_killed_seed_job_continues_with_the_same_command(tiny_model, sentiment_files, tmp_path):
    common = ["--model", tiny_model, "--train_file", sentiment_files["train"], "--validation_file",
              sentiment_files["dev"], "--seeds", "1", "2", "--checkpointing_steps", "4", "--logging_steps", "1",
              *ARGS]
    ref = tmp_path / "ref"
    assert run_script("train_cls.py", common + ["--output_dir", str(ref)]).returncode == 0
    out = tmp_path / "job"
    marker = tmp_path / "parked"
    env = dict(os.environ, FAULT_POINT="train", FAULT_STEP="10", FAULT_MARKER=str(marker), FAULT_RUN="seed_2")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "fault_runner.py"), *common,
                             "--output_dir", str(out)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert (out / "seed_1" / "results.json").exists() and not (out / "seed_2" / "results.json").exists()
    assert not (out / "summary.json").exists()
    again = run_script("train_cls.py", common + ["--output_dir", str(out)])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "run 1/2 (seed_1): finished earlier, skipped" in again.stderr
    assert "resuming its latest checkpoint" in again.stderr and "resumed from" in again.stderr
    a, b = load(ref / "summary.json"), load(out / "summary.json")
    for ra, rb in zip(a["runs"], b["runs"]):
        for key in ("eval_accuracy", "eval_loss"):
            assert ra["metrics"][key] == pytest.approx(rb["metrics"][key], abs=1e-6), (ra["name"], key)
    # the time figures count the run finished by the killed invocation too
    assert b["runs_finished_earlier"] == 1 and a["runs_finished_earlier"] == 0
    assert b["total_seconds"] == pytest.approx(sum(r["metrics"]["total_seconds"] for r in b["runs"]))
    assert "finished by an earlier invocation" in again.stdout
    # a different job in the same folder is refused
    other = run_script("train_cls.py", common[:-len(ARGS)] + ARGS[:-2] + ["--learning_rate", "1e-3",
                                                                          "--output_dir", str(out)])
    assert other.returncode == 2 and "holds a different multi-run job" in other.stderr


@pytest.mark.parametrize("flags,expect", [
    (["--seeds", "1", "1"], "--seeds has repeated values"),
    (["--seeds", "1", "2", "--num_runs", "3"], "either --seeds or --num_runs"),
    (["--kfold", "1"], "--kfold must be 2 or more"),
    (["--resplit_per_seed"], "--resplit_per_seed needs several seeds"),
    (["--kfold", "3", "--validation_file", "DEV"], "drop --validation_file"),
    (["--seeds", "1", "2", "--resume_from_checkpoint", "latest"], "continues by itself"),
])
def test_repeat_flag_errors(flags, expect, tiny_model, sentiment_files, tmp_path):
    flags = [sentiment_files["dev"] if f == "DEV" else f for f in flags]
    proc = run_script("train_cls.py", ["--model", tiny_model, "--train_file", sentiment_files["train"],
                                       "--output_dir", str(tmp_path / "o"), *flags, *ARGS])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert expect in proc.stderr and "Traceback" not in proc.stderr


def test_seeds_on_two_processes(tiny_model, sentiment_files, tmp_path):
    """Both ranks go through the runs together; one summary, every run evaluated on all 61 rows."""
    out = tmp_path / "two"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    proc = run_script("train_cls.py", ["--model", tiny_model, "--train_file", sentiment_files["train"],
                                       "--validation_file", sentiment_files["dev"], "--num_runs", "2",
                                       "--output_dir", str(out), *ARGS],
                      launcher=launcher, env={"ACCELERATE_USE_CPU": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = load(out / "summary.json")
    assert [r["name"] for r in s["runs"]] == ["seed_42", "seed_142"] and s["primary_split"] == "eval"
    for r in s["runs"]:
        res = load(out / r["name"] / "results.json")
        assert res["setup"]["num_processes"] == 2 and res["eval"]["num_examples"] == 61
    assert proc.stdout.count("ci95 low") == 1  # the table is printed once, by the main process
