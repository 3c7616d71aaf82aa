"""Progress you can see (issue 23, items 1, 2, 4 and the time split of item 8): the bar mode chosen for a
terminal, a notebook or a log file; phase lines and sparse progress lines in a log; the block a run ends
with; the learning curve of a run evaluated only at the end, with the restored best step marked."""
from __future__ import annotations

import io
import logging
import re

import pytest

import train_cls
from common import progress
from common.runs import plots
from common.runs.repeats import job_last_lines
from common.runs.single_run import key_files, last_lines
from conftest import FAST


class Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


KERNEL = {"ipykernel": object(), "ipykernel.zmqshell": object()}


@pytest.mark.parametrize("requested, main, tty, environ, modules, widgets, expected", [
    ("auto", True, True, {}, {}, False, "bar"),  # a terminal
    ("auto", True, False, {}, {}, False, "lines"),  # a log file, CI
    ("auto", False, True, {}, {}, False, "none"),  # not the local main process: nothing, ever
    ("auto", True, False, {}, KERNEL, True, "widget"),  # a notebook kernel with ipywidgets
    ("auto", True, False, {}, KERNEL, False, "bar"),  # ... without (or forked by notebook_launcher): a text bar
    ("auto", True, False, {"COLAB_RELEASE_TAG": "release"}, {}, False, "bar"),  # `!python train_cls.py` in Colab
    ("auto", True, False, {"JPY_PARENT_PID": "12"}, {}, False, "bar"),  # a command a Jupyter cell started
    ("auto", True, False, {"KAGGLE_KERNEL_RUN_TYPE": "Interactive"}, {}, False, "bar"),
    ("auto", True, False, {"KAGGLE_KERNEL_RUN_TYPE": "Batch"}, {}, False, "lines"),  # a saved run: a log
    ("bar", True, False, {}, {}, False, "bar"),  # forced
    ("lines", True, True, {}, KERNEL, True, "lines"),
    ("none", True, True, {}, {}, False, "none"),
    ("auto", True, True, {progress.ENV: "lines"}, {}, False, "lines"),  # the environment variable
    ("lines", True, True, {progress.ENV: "bar"}, {}, False, "lines"),  # ... which a flag beats
    ("auto", True, False, {progress.ENV: "loud"}, {}, False, "lines"),  # ... ignored (with a warning) if unknown
])
def test_the_mode_follows_where_the_output_goes(requested, main, tty, environ, modules, widgets, expected):
    assert progress.choose_mode(requested, main, Stream(tty), environ, modules, widgets) == expected


@pytest.fixture
def lines_mode(monkeypatch):
    monkeypatch.setattr(progress, "_mode", "lines")
    monkeypatch.setattr(progress, "LINES_DELAY_SECONDS", 0.0)


def test_progress_lines_are_sparse_with_rate_and_eta(lines_mode, caplog):
    with caplog.at_level(logging.INFO, logger="bert_finetune"):
        with progress.bar(200, "train") as bar:
            for _ in range(200):
                bar.set_postfix(loss="0.5000")
                bar.update(1)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 9, lines  # every 10% up to 90%; the end is the phase's line
    assert re.fullmatch(r"train: 20/200 steps \(10%\), [\d.e+]+ steps/s, ETA [\d.]+ s, loss=0\.5000",
                        lines[0]), lines[0]
    assert lines[-1].startswith("train: 180/200 steps (90%)")


def test_short_tasks_and_bars_leave_no_progress_lines(monkeypatch, caplog):
    monkeypatch.setattr(progress, "_mode", "lines")  # the real delay: a task this short says nothing
    with caplog.at_level(logging.INFO, logger="bert_finetune"):
        assert list(progress.track(range(50), "eval")) == list(range(50))
    monkeypatch.setattr(progress, "_mode", "none")
    monkeypatch.setattr(progress, "LINES_DELAY_SECONDS", 0.0)
    with caplog.at_level(logging.INFO, logger="bert_finetune"):
        list(progress.track(range(50), "eval"))
    assert not caplog.records


def test_log_lines_go_above_a_text_bar_not_into_its_line(monkeypatch, capsys):
    import sys

    monkeypatch.setattr(progress, "_mode", "bar")
    handler = logging.StreamHandler(sys.stderr)  # what setup_logging installs
    # only this handler: an earlier test's run may have left one on a stream that pytest has closed since
    monkeypatch.setattr(logging.getLogger(), "handlers", [handler])
    with progress.bar(2, "train") as bar:
        bar.update(1)
        progress.logger.warning("a log line")
        bar.update(1)
    err = capsys.readouterr().err
    line = next(line for line in err.split("\n") if "a log line" in line)
    assert line.split("\r")[-1] == "a log line", repr(line)
    assert "2/2" in err and progress._text_bars == 0


def test_a_notebook_without_widgets_gets_a_text_bar(monkeypatch):
    monkeypatch.setattr(progress, "_mode", "widget")
    monkeypatch.setitem(__import__("sys").modules, "ipywidgets", None)  # not installed
    with progress.bar(3, "train") as bar:
        assert type(bar.tqdm).__module__ == "tqdm.std"


def test_a_phase_logs_its_start_and_its_end_with_the_duration(caplog):
    with caplog.at_level(logging.INFO, logger="bert_finetune"):
        with progress.phase("tokenizing train", "3,668 rows") as step:
            step.note = "from the cache"
    start, end = [r.getMessage() for r in caplog.records]
    assert start == "tokenizing train (3,668 rows) ..."
    assert re.fullmatch(r"tokenizing train: done in \d\.\d s \(from the cache\)", end)
    assert step.seconds >= 0


def test_libraries_bars_follow_ours():
    import datasets

    from common.log import setup_logging

    try:
        setup_logging(True, bars=True)
        assert datasets.utils.logging.is_progress_bar_enabled()
        setup_logging(True, bars=False)
        assert not datasets.utils.logging.is_progress_bar_enabled()
    finally:
        setup_logging(True, bars=False)


def test_durations_read_as_a_person_would_say_them():
    assert [progress.duration(s) for s in (0.04, 8.24, 47.4, 185, 7440)] == \
        ["0.0 s", "8.2 s", "47 s", "3 min 05 s", "2 h 04 min"]


def test_a_run_logged_to_a_file_shows_its_phases_progress_and_last_lines(tiny_model, sentiment_files, tmp_path,
                                                                         monkeypatch, capsys):
    """stderr is not a terminal here (captured), as in `python train_cls.py ... > log 2>&1`: no bar, one line at
    the start and end of each phase, sparse progress lines, and the closing block. Evaluated only at the end
    (--eval_strategy no): the learning curve still shows that evaluation."""
    for name in (progress.ENV, *progress.NOTEBOOK_ENV, "KAGGLE_KERNEL_RUN_TYPE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(progress, "LINES_DELAY_SECONDS", 0.0)
    out = tmp_path / "out"
    res = train_cls.main(["--model", tiny_model, "--train_file", sentiment_files["train"], "--validation_file",
                          sentiment_files["dev"], "--test_file", sentiment_files["test"], "--output_dir", str(out),
                          *FAST, "--max_steps", "20", "--eval_strategy", "no"])
    err = capsys.readouterr().err
    assert progress.mode() == "lines" and "\r" not in err  # no bar drawn into the log
    for phase in ("tokenizing train (240 rows)", "tokenizing validation (61 rows)", "final evaluation on eval (61 "
                  "examples)", "final evaluation on test (37 examples)"):
        assert f"{phase} ..." in err, phase
        assert re.search(re.escape(phase.split(" (")[0]) + r": done in [\d.]+ s", err), phase
    assert re.search(r"training: done in [\d.]+ s \(20 steps\)", err)
    progress_lines = re.findall(r"train: (\d+)/20 steps \(\d+%\), [\d.e+]+ steps/s, ETA", err)
    assert 5 <= len(progress_lines) <= 10, err  # about one per 10%, never one per step
    block = err[err.index("── done"):].splitlines()
    assert len(block) <= 6, block
    accuracy = res["eval"]["accuracy"]
    assert block[0].endswith(f"── done: eval accuracy {accuracy:.4f} on 61 examples (the last step's weights, "
                             "step 20) ──")
    assert block[1].strip() == f"test accuracy {res['test']['accuracy']:.4f} on 37 examples"
    time_line = next(line for line in block if line.startswith("time "))
    total, parts = re.fullmatch(r"time   total ([\d.]+) s = (.*) \(this session\)", time_line).groups()
    names = [p.split()[0] for p in parts.split(" + ")]  # parts under 0.05 s are left out (a fast machine's eval)
    assert names == [n for n in ("load", "train", "eval", "checkpoints", "save") if n in names]
    assert {"load", "train", "save"} <= set(names)
    assert sum(float(p.split()[1]) for p in parts.split(" + ")) == pytest.approx(float(total), abs=0.25)
    assert f"output {out}: model.safetensors, results.json, predictions_eval.csv, predictions_test.csv, " \
           "learning_curve.png, confusion_matrix.png, README.md" in block
    assert "results.json" in block[-1]
    timing = res["timing"]
    assert timing["session_train_seconds"] == pytest.approx(timing["train_seconds"], rel=0.2)
    assert "resumed_at_step" not in timing
    assert (out / "learning_curve.png").is_file()


def test_the_last_lines_of_a_resumed_run_keep_the_time_split_honest():
    """After a resume the run's training (all sessions) may exceed this session's total: the block says which
    is which, and the parts of this session add up to its total."""
    results = {"train": {"global_step": 115, "best_step": 60, "restored_best": True},
               "eval": {"accuracy": 0.8333333, "f1": 0.9, "num_examples": 408},
               "timing": {"train_seconds": 55.0, "total_seconds": 19.8, "resumed_at_step": 57}}
    parts = {"load": 5.2, "train": 10.1, "eval": 2.0, "save": 2.5, "upload": 0.0}
    lines = last_lines(results, "accuracy", "out/mrpc", ["model.safetensors", "results.json"], parts)
    assert lines[0] == "── done: eval accuracy 0.8333 on 408 examples (best at step 60 of 115, restored) ──"
    assert lines[1] == ("time   total 20 s = load 5.2 s + train 10 s + eval 2.0 s + save 2.5 s (this session, "
                        "resumed at step 57; 55 s of training over all sessions)")
    assert lines[2] == "output out/mrpc: model.safetensors, results.json"
    assert "f1" not in "\n".join(lines)  # the rest of the metrics stay in results.json, which the block names
    assert "results.json" in lines[-1] and len(lines) <= 6


def test_the_last_lines_without_training_and_of_a_repeated_job():
    results = {"test": {"num_examples": 37}, "timing": {"total_seconds": 3.0}}
    lines = last_lines(results, "accuracy", "out/pred", ["predictions_test.csv", "results.json"],
                       {"load": 2.0, "eval": 0.5, "save": 0.5})
    assert lines[0] == "── done: test: 37 rows predicted (no labels) (the model as it is, not trained) ──"
    assert lines[1].startswith("time   total 3.0 s = load 2.0 s + eval 0.5 s + save 0.5 s")
    assert "log_history" not in lines[-1] and "session" not in lines[1]
    lines = last_lines({"train": {"global_step": 30, "best_step": None, "final_train_loss": 0.25}}, "accuracy", "o",
                       [], {"load": 1.0, "train": 2.0, "save": 0.5})
    assert lines[0] == "── done: final training loss 0.2500, no evaluation data (the last step's weights, step 30) ──"
    summary = {"num_runs": 3, "mode": "seeds", "kfold": None, "primary_split": "eval", "primary_metric": "f1",
               "metrics": {"eval_f1": {"mean": 0.81234, "ci95": [0.8, 0.82468], "ci95_halfwidth": 0.01234},
                           "eval_accuracy": {"mean": 0.7, "ci95": None}},
               "runs": [{"name": f"seed_{s}"} for s in (42, 142, 242)], "total_seconds": 212.0, "job_seconds": 80.0,
               "runs_finished_earlier": 2}
    job = job_last_lines(summary, "out/seeds")
    assert job[0] == "── done: 3 seeds, eval f1 0.8123 ± 0.0123 (95% CI 0.8000 to 0.8247), mean of 3 runs ──"
    assert job[1] == "time   3 min 32 s of runs in all; this invocation 1 min 20 s (2 runs finished earlier)"
    assert job[2].startswith("output out/seeds: ") and job[2].endswith("seed_42/, seed_142/, seed_242/")


def test_key_files_are_those_written(tmp_path):
    for name in ("config.json", "vocab.txt", "model.safetensors", "results.json", "predictions_test.conll",
                 "predictions_eval.conll", "README.md"):
        (tmp_path / name).write_text("x")
    (tmp_path / "checkpoints").mkdir()
    assert key_files(str(tmp_path)) == ["model.safetensors", "results.json", "predictions_eval.conll",
                                        "predictions_test.conll", "README.md", "checkpoints/"]


def _eval_panel(fig):
    panel = fig.axes[1]
    return {line.get_label(): list(zip(line.get_xdata(), line.get_ydata())) for line in panel.get_lines()}, \
        [t.get_text() for t in panel.texts]


def test_the_learning_curve_of_a_run_evaluated_only_at_the_end(tmp_path):
    history = [{"step": s, "loss": 1 / s} for s in (5, 10, 15, 20)]
    fig = plots.learning_curve_figure(history, "accuracy", "t", final=(20, 0.75))
    lines, texts = _eval_panel(fig)
    assert lines == {"final evaluation (step 20)": [(20, 0.75)]} and texts == []
    assert fig.axes[1].get_legend() is not None
    assert plots.learning_curve(history, "accuracy", str(tmp_path / "lc.png"), "t", final=(20, 0.75))
    # no evaluation data at all: said so
    _, texts = _eval_panel(plots.learning_curve_figure(history, "accuracy", "t"))
    assert texts == ["no evaluation data"]


def test_the_learning_curve_marks_the_restored_best_step():
    history = [{"step": s, "loss": 1 / s} for s in (5, 10, 15, 20)] + \
        [{"step": 10, "eval_accuracy": 0.8}, {"step": 20, "eval_accuracy": 0.7}]
    fig = plots.learning_curve_figure(history, "accuracy", "t", final=(20, 0.8), restored_step=10)
    lines, _ = _eval_panel(fig)
    assert lines["during training"] == [(10, 0.8), (20, 0.7)]
    assert "best, restored (step 10)" in lines  # on both panels
    assert any(line.get_label() == "best, restored (step 10)" for line in fig.axes[0].get_lines())
    assert not any(label.startswith("final") for label in lines)  # the final evaluation is the best step's point
    # not restored, the last step evaluated during training: no second point
    lines, _ = _eval_panel(plots.learning_curve_figure(history, "accuracy", "t", final=(20, 0.7)))
    assert list(lines) == ["during training"]


def test_the_overlay_of_runs_evaluated_only_at_the_end_shows_their_final_points(monkeypatch):
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path, layout=True: drawn.append(fig))
    histories = {f"seed_{s}": [{"step": i, "loss": 1 / i} for i in (5, 10)] for s in (1, 2)}
    assert plots.learning_curves_overlay(histories, "f1", "unused.png", "t", finals={"seed_1": (10, 0.7),
                                                                                     "seed_2": (10, 0.8)})
    lines, texts = _eval_panel(drawn[0])
    assert lines == {"seed_1 (final)": [(10, 0.7)], "seed_2 (final)": [(10, 0.8)]}
