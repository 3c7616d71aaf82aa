"""The whole command, not only the steps: results.json's time split adds up to its total (the start-up and the
launch included when the script is the program), what importing a script and scoring NER leave unimported, and
the fast exit of a finished script."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

import train_cls
from common.runs import reporting
from conftest import ROOT, run_script

# Imported only when a run needs them, late or never: plots (matplotlib), scikit-learn (a derived split's
# stratification), scipy (regression metrics), seqeval's metrics (scikit-learn again), ONNX, Optuna.
LAZY = ("matplotlib", "sklearn", "scipy", "seqeval", "onnx", "onnxruntime", "optuna", "accelerate")
STEPS = ["--max_steps", "2", "--per_device_train_batch_size", "16", "--mixed_precision", "no", "--logging_steps", "1"]


def imported_by(code: str) -> list[str]:
    """The LAZY modules a fresh interpreter has imported after running `code` in the repository root."""
    probe = f"{code}\nimport sys\nprint(sorted(m for m in {LAZY!r} if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1].replace("'", '"'))


def test_importing_the_scripts_imports_nothing_a_run_needs_late():
    assert imported_by("import train_cls, train_ner, train_mlm") == []


def test_scoring_ner_imports_neither_scikit_learn_nor_seqeval_metrics():
    code = ("from common.training.metrics import ner_metrics\n"
            "m = ner_metrics([['B-PER', 'I-PER', 'O']], [['B-PER', 'O', 'S-LOC']])\n"
            "assert (m['num_gold_entities'], m['num_predicted_entities']) == (1, 2), m\n"
            "ner_metrics([['B-PER', 'I-PER', 'O']], [['B-PER', 'I-PER', 'O']], 'IOB2')")
    assert imported_by(code) == ["seqeval"]  # seqeval.scheme only, for the strict mode


def test_time_split_laps_and_moves_add_up():
    clock = reporting.TimeSplit({"startup": 1.5}, time.perf_counter() - 2.0, ("load", "train", "eval"))
    assert list(clock.parts) == ["startup", "load", "train", "eval"]
    assert clock.lap("load") >= 2.0
    clock.lap("train")
    clock.move(0.25, "train", "checkpoints")
    assert clock.parts["checkpoints"] == 0.25 and clock.parts["eval"] == 0.0
    assert clock.total == pytest.approx(sum(clock.parts.values())) and clock.total >= 3.5


def test_column_arrays_read_a_selection_as_its_rows_do():
    import datasets

    from common.data.loading import column_arrays

    ds = datasets.Dataset.from_dict({"row_id": [5, 6, 7, 8], "windowed": [True, False, True, False],
                                     "input_ids": [[1], [2, 3], [4], [5, 6, 7]]}).select([3, 0, 2])
    cols = column_arrays(ds, "row_id", "windowed")
    assert cols["row_id"].tolist() == list(ds["row_id"]) == [8, 5, 7]
    assert cols["windowed"].tolist() == [False, True, True] and cols["windowed"].dtype == bool


@pytest.fixture(scope="module")
def script_run(tiny_model, sentiment_files, tmp_path_factory):
    """train_cls.py as a program (the start-up measured), an evaluation and a checkpoint inside the loop: the output
    folder, the process's wall time, its stderr."""
    out = tmp_path_factory.mktemp("startup") / "run"
    started = time.perf_counter()
    proc = run_script("train_cls.py", ["--model", tiny_model, "--train_file", sentiment_files["train"],
                                       "--validation_file", sentiment_files["dev"], "--output_dir", str(out), *STEPS,
                                       "--eval_steps", "1", "--checkpointing_steps", "1", "--progress", "none"])
    wall = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, wall, proc.stderr


def test_time_split_of_a_script_adds_up_to_its_total_from_the_process_start(script_run):
    out, wall, err = script_run
    timing = json.loads((out / "results.json").read_text())["timing"]
    parts = timing["parts"]
    assert list(parts) == ["startup", "launch", "load", "train", "eval", "checkpoints", "save"]
    assert all(seconds >= 0 for seconds in parts.values()), parts
    assert sum(parts.values()) == pytest.approx(timing["total_seconds"], abs=1e-6)
    assert parts["startup"] > 0.1 and parts["startup"] == timing["startup_seconds"]  # the imports, at least
    assert parts["eval"] >= timing["eval_during_training_seconds"] > 0 and parts["checkpoints"] > 0
    # measured from the process start, so within the wall time the test saw (less the interpreter's own start)
    assert timing["total_seconds"] < wall
    closing = next(line for line in err.splitlines() if line.startswith("time   total"))
    assert "= startup " in closing, closing


def test_time_split_of_an_evaluation_in_this_process_adds_up(script_run, sentiment_files, tmp_path):
    out, _, _ = script_run
    res = train_cls.main(["--model", str(out), "--no_do_train", "--validation_file", sentiment_files["dev"],
                          "--output_dir", str(tmp_path / "eval")])
    timing = json.loads((tmp_path / "eval" / "results.json").read_text())["timing"]
    assert timing == json.loads(json.dumps(res["timing"]))  # the file and the returned dict agree
    parts = timing["parts"]
    assert list(parts) == ["launch", "load", "eval", "save"]  # main() called in a running process: no start-up
    assert sum(parts.values()) == pytest.approx(timing["total_seconds"], abs=1e-6)
    assert "startup_seconds" not in timing


def test_a_finished_script_exits_without_tearing_its_modules_down(tmp_path):
    """run_cli's leave(): no module is torn down (an object held by one is never finalised), but the atexit
    handlers run (a temporary folder is removed) and the streams are flushed."""
    script = tmp_path / "prog.py"
    script.write_text(
        "import atexit, os, sys, tempfile\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "from common.errors import run_cli\n"
        "class Held:\n"
        "    def __del__(self):\n"
        "        sys.stderr.write(' torn down')\n"
        "held = Held()\n"
        "folder = tempfile.mkdtemp()\n"
        "atexit.register(os.rmdir, folder)\n"
        "def main(argv):\n"
        "    print(folder, end='')\n"
        "    sys.stderr.write('done')\n"
        "run_cli(main)\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "done", proc.stderr
    assert proc.stdout and not os.path.exists(proc.stdout)
