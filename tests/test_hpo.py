"""Hyperparameter search (--hpo_trials; common/runs/study.py, common/runs/search_space.py): the space file
and its refusals, the flags a study refuses, a study's outputs and how the same command continues it,
pruning, failed trials, a kill -9 mid-study, two workers and two launches on one storage, a multi-process
trial, the confirmation over seeds and k-fold trials. Trials are ~1 s runs of the tiny model on 96 rows."""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time

import optuna
import pytest
import yaml

import train_cls
from common.config import TrainArguments
from common.errors import UserError
from common.runs import search_space, study
from common.runs.search_space import Param, read_space, resolve_space
from conftest import ROOT, run_script, toy_sentence, write_csv

BASE = ["--num_train_epochs", "1", "--per_device_train_batch_size", "16", "--logging_steps", "2",
        "--mixed_precision", "no"]
LR_SPACE = "learning_rate: {low: 1.0e-4, high: 5.0e-3, log: true}\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """Toy sentiment, train 96 rows (6 steps of 16) / dev 32, and a space file searching the learning rate."""
    d = tmp_path_factory.mktemp("hpo-data")
    rng = random.Random(26)
    out = {}
    for split, n in (("train", 96), ("dev", 32)):
        labels = [rng.randint(0, 1) for _ in range(n)]
        out[split] = write_csv(d / f"{split}.csv", ["sentence", "label"],
                               [(toy_sentence(rng, y), "pos" if y else "neg") for y in labels])
    (d / "lr.yaml").write_text(LR_SPACE)
    out["lr"] = str(d / "lr.yaml")
    return out


@pytest.fixture
def no_plots(monkeypatch):
    """Skip drawing PNGs (~0.5 s a run, ~1.5 s a study report) where a test looks at none: the study's plots are
    checked once, in test_study_outputs_best_yaml_and_continuing, and the runs' in their own tests."""
    from common.runs import repeats, single_run

    monkeypatch.setattr(single_run, "draw_run_plots", lambda *a, **kw: None)
    monkeypatch.setattr(repeats, "draw_summary_plots", lambda *a, **kw: None)
    monkeypatch.setattr(study, "draw_plots", lambda *a, **kw: [])


def command(tiny_model, files, out, trials, *extra, space: str | None = "lr") -> list[str]:
    return ["--model", tiny_model, "--train_file", files["train"], "--validation_file", files["dev"],
            "--output_dir", str(out), "--hpo_trials", str(trials), *(["--hpo_space", files[space]] if space else []),
            *BASE, *extra]


@contextlib.contextmanager
def log_lines():
    """The project logger's messages while inside (a handler of its own: setup_logging replaces the root's)."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler = Keep(logging.INFO)
    logging.getLogger("bert_finetune").addHandler(handler)
    try:
        yield lines
    finally:
        logging.getLogger("bert_finetune").removeHandler(handler)


def load(path):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def rows(out) -> list[dict]:
    with open(os.path.join(out, "trials.csv"), encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def stored(out, storage: str | None = None):
    url = storage or "sqlite:///" + os.path.join(str(out), "study.db")
    return optuna.load_study(study_name="study", storage=url)


def counted_numbers(s) -> list[int]:
    return [t.number for t in s.get_trials(deepcopy=False) if study.counted(t)]


def tree(folder) -> dict:
    """Every file under folder with its size and modification time (to show a refusal wrote nothing)."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            st = os.stat(os.path.join(root, name))
            out[os.path.relpath(os.path.join(root, name), folder)] = (st.st_size, st.st_mtime_ns)
    return out


# ---------------------------------------------------------------------------------------------
# The space file
# ---------------------------------------------------------------------------------------------

def space_file(tmp_path, text: str, name: str = "space.yaml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_read_space_reads_every_kind_and_trials_draw_valid_settings(tmp_path):
    path = space_file(tmp_path, "\n".join([
        "learning_rate: {low: 1e-5, high: 3.0e-4, log: true}    # '1e-5' is a string in YAML: read as a number",
        "warmup_ratio: {low: 0.0, high: 0.2, step: 0.05}",
        "gradient_accumulation_steps: {low: 1, high: 4}",
        "num_train_epochs: {low: 2, high: 5}",
        "per_device_train_batch_size: [16, 32, 64]",
        "lr_scheduler_type: {choices: [linear, cosine]}",
        "optim: [adamw_torch, adamw_torch_foreach]",
        "weight_decay: 0.01",
        "--adam_beta2: [0.98, 0.999]                              # a flag's dashes are dropped"]))
    space = {p.name: p for p in read_space(path)}
    assert space["learning_rate"] == Param("learning_rate", "float", 1e-5, 3e-4, log=True)
    assert space["warmup_ratio"] == Param("warmup_ratio", "float", 0.0, 0.2, step=0.05)
    assert space["gradient_accumulation_steps"] == Param("gradient_accumulation_steps", "int", 1, 4)
    # epochs are a float setting, but whole bounds mean whole epochs (as in the default space)
    assert space["num_train_epochs"] == Param("num_train_epochs", "int", 2, 5)
    assert space["per_device_train_batch_size"] == Param("per_device_train_batch_size", "choice",
                                                         choices=(16, 32, 64))
    assert space["lr_scheduler_type"] == Param("lr_scheduler_type", "choice", choices=("linear", "cosine"))
    assert space["optim"].choices == ("adamw_torch", "adamw_torch_foreach")
    assert space["weight_decay"] == Param("weight_decay", "fixed", choices=(0.01,))
    assert space["adam_beta2"].choices == (0.98, 0.999)
    assert "learning_rate 1e-05 to 0.0003 (log scale)" in space["learning_rate"].describe()

    s = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = s.ask()
        values = {p.name: p.suggest(trial) for p in space.values()}
        args = search_space.apply(TrainArguments(), values)  # the settings' own checks pass
        assert 1e-5 <= args.learning_rate <= 3e-4 and isinstance(args.learning_rate, float)
        assert round(args.warmup_ratio / 0.05, 6).is_integer() and 0 <= args.warmup_ratio <= 0.2
        assert args.gradient_accumulation_steps in (1, 2, 3, 4)
        assert args.num_train_epochs in (2.0, 3.0, 4.0, 5.0)
        assert args.per_device_train_batch_size in (16, 32, 64) and args.weight_decay == 0.01
        assert args.lr_scheduler_type in ("linear", "cosine")


@pytest.mark.parametrize("text,expect", [
    ("learning_rat: {low: 1.0e-5, high: 1.0e-4}",
     "learning_rat: not a training setting (did you mean 'learning_rate'?)"),
    ("output_dir: [a, b]", "output_dir: this setting cannot vary between trials"),
    ("seed: [1, 2]", "seed: this setting cannot vary between trials"),
    ("hpo_trials: [2, 3]", "hpo_trials: this setting cannot vary between trials"),
    ("learning_rate: {low: 1.0e-3, high: 1.0e-4}", "learning_rate: low (0.001) must be below high (0.0001)"),
    ("learning_rate: {low: 1.0e-4, high: 1.0e-4}", "learning_rate: low (0.0001) must be below high"),
    ("learning_rate: {low: 0.0, high: 1.0e-3, log: true}", "learning_rate: a log scale needs low > 0"),
    ("learning_rate: {low: 1.0e-5, high: 1.0e-3, log: true, step: 1.0e-5}", "learning_rate: step and log cannot"),
    ("learning_rate: {low: small, high: 1.0e-3}", "learning_rate: 'small' is not a number"),
    ("learning_rate: {low: 1.0e-5, high: 1.0e-3, log: yes please}", "learning_rate: log must be true or false"),
    ("learning_rate: {low: 1.0e-5}", "learning_rate: a range needs both low and high"),
    ("learning_rate: {low: 1.0e-5, high: 1.0e-3, scale: log}", "learning_rate: unknown key 'scale'"),
    ("per_device_train_batch_size: {low: 8.5, high: 32}", "per_device_train_batch_size: low must be a whole number"),
    ("per_device_train_batch_size: [16, 16]", "per_device_train_batch_size: repeated choices"),
    ("per_device_train_batch_size: [16, big]", "per_device_train_batch_size: 'big' is not a number"),
    ("warmup_ratio: {low: 0.0, high: 0.2, step: 0.5}", "warmup_ratio: step must be above 0 and at most high - low"),
    ("optim: [adamw_torch, sgd]", "optim: 'sgd' is not one of auto, adamw_torch_fused"),
    ("lr_scheduler_type: [linear, cosine_warm]", "lr_scheduler_type: 'cosine_warm' is not one of linear, cosine"),
    ("lr_scheduler_type: {low: 1, high: 2}", "lr_scheduler_type: a range needs a numeric setting"),
    ("group_by_length: [true, maybe]", "group_by_length: 'maybe' is not true or false"),
    ("learning_rate: {choices: 1.0e-4}", "learning_rate: 'choices' takes a list"),
    ("learning_rate: {low: 1", "is not valid YAML at line"),
    ("", "must map settings to ranges or choices"),
    ("- learning_rate", "must map settings to ranges or choices"),
    ("learning_rate: 1.0e-4\nweight_decay: 0.0", "fixes every setting it names"),
])
def test_bad_space_file_is_refused_naming_the_file_and_the_key(text, expect, tmp_path):
    path = space_file(tmp_path, text)
    with pytest.raises(UserError) as err:
        read_space(path)
    message = str(err.value)
    assert f"--hpo_space file '{path}'" in message and expect in message, message
    assert "\n" not in message


@pytest.mark.parametrize("text,expect", [
    # values each setting's own checks refuse, whatever the command: refused before the first trial
    ("warmup_ratio: {low: 0.0, high: 1.0}", "warmup_ratio: high 1 cannot be used: --warmup_ratio must be in [0, 1)"),
    ("per_device_train_batch_size: [0, 16]", "per_device_train_batch_size: 0 cannot be used: "
                                             "--per_device_train_batch_size must be a positive integer"),
    ("checkpointing_steps: [every, epoch]", "checkpointing_steps: 'every' cannot be used: --checkpointing_steps"),
    ("learning_rate: {low: 0.0, high: 1.0e-3}", "learning_rate: low 0 cannot be used: --learning_rate must be"),
])
def test_space_values_the_settings_refuse_are_refused_before_the_study(text, expect, tmp_path):
    path = space_file(tmp_path, text)
    with pytest.raises(UserError) as err:
        resolve_space("classification", TrainArguments(hpo_trials=2, hpo_space=path), set())
    assert f"--hpo_space file '{path}', {expect}" in str(err.value), str(err.value)


def test_missing_space_file(tmp_path):
    with pytest.raises(UserError, match=r"--hpo_space file '.*nope.yaml' does not exist"):
        read_space(str(tmp_path / "nope.yaml"))


def test_resolve_space_default_per_task_less_what_the_command_sets(tmp_path):
    def names(task, given=(), **kw):
        space, notes = resolve_space(task, TrainArguments(hpo_trials=4, **kw), set(given))
        return [p.name for p in space], notes

    full = ["learning_rate", "per_device_train_batch_size", "num_train_epochs", "warmup_ratio", "weight_decay"]
    assert names("classification")[0] == full
    space, _ = resolve_space("classification", TrainArguments(hpo_trials=4), set())
    assert space[0].high == 3e-4 and space[0].log
    assert resolve_space("fill-mask", TrainArguments(hpo_trials=4), set())[0][0].high == 5e-4
    got, notes = names("classification", {"learning_rate", "per_device_train_batch_size"})
    assert got == full[2:] and "learning_rate fixed by the command" in notes
    got, notes = names("classification", {"max_steps"}, max_steps=10)
    assert "num_train_epochs" not in got and any("--max_steps sets the length" in n for n in notes)
    got, notes = names("classification", {"warmup_steps"}, warmup_steps=3)
    assert "warmup_ratio" not in got
    assert names("classification", teacher_model="teacher")[0] == full + ["distill_alpha", "distill_temperature"]
    with pytest.raises(UserError, match="sets every setting of the default search space"):
        names("classification", set(full))


@pytest.mark.parametrize("text,kw,given,expect", [
    ("weight_decay: 0.0\n" + LR_SPACE, {"weight_decay": 0.05}, {"weight_decay"},
     "fixes weight_decay to 0.0, but the command sets --weight_decay 0.05"),
    ("num_train_epochs: [1, 2]", {"max_steps": 5}, {"max_steps"}, "searches num_train_epochs, but --max_steps 5"),
    ("distill_alpha: {low: 0.1, high: 0.9}", {}, set(), "searches distill_alpha, a distillation setting"),
])
def test_space_file_against_the_command(text, kw, given, expect, tmp_path):
    path = space_file(tmp_path, text)
    with pytest.raises(UserError, match=expect.replace("(", r"\(").replace(")", r"\)")):
        resolve_space("classification", TrainArguments(hpo_trials=2, hpo_space=path, **kw), given)
    # searched and given: searched, the command's value the confirmation's baseline (said in the log notes)
    space, notes = resolve_space("classification", TrainArguments(hpo_trials=2, hpo_space=space_file(
        tmp_path, LR_SPACE, "lr.yaml"), learning_rate=1e-4), {"learning_rate"})
    assert [p.name for p in space] == ["learning_rate"] and "the command's 0.0001 is the baseline" in notes[0]
    # a fixed value equal to the command's is no conflict
    fixed = space_file(tmp_path, LR_SPACE + "weight_decay: 0.05\n", "fixed.yaml")
    space, _ = resolve_space("classification", TrainArguments(hpo_trials=2, hpo_space=fixed, weight_decay=0.05),
                             {"weight_decay"})
    assert [p.kind for p in space] == ["float", "fixed"]


# ---------------------------------------------------------------------------------------------
# Flags a study refuses
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,expect", [
    ({"hpo_trials": 4, "resume_from_checkpoint": "latest"}, "--resume_from_checkpoint is for single runs"),
    ({"hpo_trials": 4, "push_to_hub": True}, "--push_to_hub uploads one model"),
    ({"hpo_trials": 4, "seeds": [1, 2]}, "--seeds/--num_runs with --hpo_trials"),
    ({"hpo_trials": 4, "num_runs": 3}, "--seeds/--num_runs with --hpo_trials"),
    ({"hpo_trials": 4, "do_train": False}, "--no_do_train does not train"),
    ({"hpo_trials": 4, "do_eval": False}, "--no_do_eval evaluates none"),
    ({"hpo_trials": 4, "metric_for_best_model": "test_accuracy"}, "never on a test split"),
    ({"hpo_space": "space.yaml"}, "--hpo_space is a setting of a hyperparameter search; add --hpo_trials N"),
    ({"hpo_storage": "sqlite:///s.db"}, "--hpo_storage is a setting of a hyperparameter search"),
    ({"hpo_workers": 2}, "--hpo_workers is a setting of a hyperparameter search"),
    ({"hpo_confirm_seeds": 3}, "--hpo_confirm_seeds is a setting of a hyperparameter search"),
    ({"hpo_pruner": "median"}, "--hpo_pruner is a setting of a hyperparameter search"),
    ({"hpo_sampler": "random"}, "--hpo_sampler is a setting of a hyperparameter search"),
    ({"hpo_study_name": "other"}, "--hpo_study_name is a setting of a hyperparameter search"),
    ({"hpo_trials": 2, "hpo_workers": 3}, "--hpo_workers must be between 1 and --hpo_trials (2), got 3"),
    ({"hpo_trials": 2, "hpo_workers": 0}, "--hpo_workers must be between 1 and --hpo_trials (2), got 0"),
    ({"hpo_trials": 4, "hpo_confirm_seeds": 1}, "--hpo_confirm_seeds must be 2 or more"),
    ({"hpo_trials": -1}, "--hpo_trials must be 0 (no search) or more"),
    ({"hpo_trials": 2, "hpo_study_name": " "}, "--hpo_study_name must not be empty"),
])
def test_study_flag_refusals(kw, expect):
    with pytest.raises(UserError) as err:
        TrainArguments(**kw)
    assert expect in str(err.value)


def test_refused_flag_through_the_script_exits_2_in_one_line(tiny_model, files, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = tree(out)
    proc = run_script("train_cls.py", command(tiny_model, files, out, 3, "--push_to_hub"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["error: --push_to_hub uploads one model; a study (--hpo_trials) trains many: train the settings "
                     "of its best.yaml once with --push_to_hub."], proc.stderr[-2000:]
    assert tree(out) == before


def test_bad_column_stops_the_study_before_the_first_trial(tiny_model, files, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError) as err:
        train_cls.main(command(tiny_model, files, out, 3, "--text_column", "sentense"))
    assert "sentense" in str(err.value) and "\n" not in str(err.value)
    assert not out.exists()  # no folder, no study.db
    out.mkdir()
    with pytest.raises(UserError, match="sentense"):
        train_cls.main(command(tiny_model, files, out, 3, "--text_column", "sentense"))
    assert os.listdir(out) == []


# ---------------------------------------------------------------------------------------------
# A study end to end, continued, extended, refused, replaced
# ---------------------------------------------------------------------------------------------

def test_study_outputs_best_yaml_and_continuing(tiny_model, files, tmp_path, request):
    out = tmp_path / "study"
    space = space_file(tmp_path, LR_SPACE + "per_device_train_batch_size: [8, 16]\nwarmup_ratio: 0.0\n")
    base = ["--model", tiny_model, "--train_file", files["train"], "--validation_file", files["dev"],
            "--output_dir", str(out), "--hpo_space", space, "--num_train_epochs", "1", "--logging_steps", "2",
            "--mixed_precision", "no", "--hpo_pruner", "median"]
    summary = train_cls.main(base + ["--hpo_trials", "3"])  # median pruning: trials 0 and 1 run to the end

    table = rows(out)
    assert [int(r["number"]) for r in table] == [0, 1, 2]
    assert {r["state"] for r in table} <= {"complete", "pruned"} and "complete" in {r["state"] for r in table}
    assert list(table[0]) == ["number", "state", "value", "learning_rate", "per_device_train_batch_size", "seconds",
                              "pruned_at", "folder", "host", "note"]
    for r in table:
        assert 1e-4 <= float(r["learning_rate"]) <= 5e-3 and r["per_device_train_batch_size"] in ("8", "16")
        assert float(r["seconds"]) > 0 and r["folder"] == f"trials/trial_{int(r['number']):03d}"
        trial = load(out / r["folder"] / "trial.json")
        assert trial["state"] == r["state"] and trial["params"]["learning_rate"] == float(r["learning_rate"])
        assert trial["intermediate"] and all(0 < i["epoch"] <= 1 for i in trial["intermediate"])
        assert (out / r["folder"] / "training_args.yaml").exists()
        if r["state"] == "complete":
            result = load(out / r["folder"] / "results.json")
            assert result["eval"]["accuracy"] == pytest.approx(float(r["value"]))
            # three evaluations per epoch unless the command sets --eval_steps: the pruner's points
            assert [(i["evaluation"], round(i["epoch"], 2)) for i in trial["intermediate"]] == [(1, 0.33), (2, 0.67),
                                                                                              (3, 1.0)]
    on_disk = load(out / "summary.json")
    assert on_disk == json.loads(json.dumps(summary))
    best = max((r for r in table if r["state"] == "complete"), key=lambda r: float(r["value"]))
    assert summary["best_trial"]["number"] == int(best["number"]) and summary["split"] == "validation"
    assert summary["best_trial"]["value"] == pytest.approx(float(best["value"])) and summary["metric"] == "accuracy"
    assert sum(summary["states"].values()) == 3 and summary["trials"] == 3
    assert summary["trials_seconds"] == pytest.approx(sum(float(r["seconds"]) for r in table), abs=0.5)
    assert set(summary["space"]) == {"learning_rate", "per_device_train_batch_size", "warmup_ratio"}
    for png in ("hpo_history.png", "hpo_slice.png", "hpo_importances.png", "hpo_intermediate.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert load(out / "study.json") == {"storage": "sqlite:///" + str(out / "study.db"), "study_name": "study"}
    request.getfixturevalue("no_plots")  # from here on: the plots were checked

    # best.yaml as it is: --config trains the best trial's settings
    text = (out / "best.yaml").read_text()
    assert f"# Train them: python train_cls.py --config {out / 'best.yaml'} --output_dir OUT" in text
    settings = yaml.safe_load(text)
    assert settings["learning_rate"] == pytest.approx(summary["best_trial"]["params"]["learning_rate"])
    assert not any(k.startswith("hpo_") for k in settings) and "output_dir" not in settings
    assert settings["eval_strategy"] == "epoch"  # a trial's extra evaluations are the study's, not the settings'
    again = tmp_path / "best"
    result = train_cls.main(["--config", str(out / "best.yaml"), "--output_dir", str(again)])
    used = yaml.safe_load((again / "training_args.yaml").read_text())
    for name, value in summary["best_trial"]["params"].items():
        assert used[name] == pytest.approx(value), name
    # the file's fixed value too (Optuna's params have only the sampled ones)
    assert summary["best_trial"]["params"]["warmup_ratio"] == 0.0 and used["warmup_ratio"] == 0.0
    assert result["eval"]["num_examples"] == 32

    # the same command again: nothing to add
    folders = sorted(os.listdir(out / "trials"))
    with log_lines() as log:
        train_cls.main(base + ["--hpo_trials", "3"])
    assert any("(continuing: 3 trials in it)" in line for line in log), log
    assert not any(line.startswith("trial ") for line in log) and sorted(os.listdir(out / "trials")) == folders
    assert len(rows(out)) == 3

    # a larger --hpo_trials adds exactly the difference
    with log_lines() as log:
        summary = train_cls.main(base + ["--hpo_trials", "4"])
    assert [int(r["number"]) for r in rows(out)] == [0, 1, 2, 3] and sum(summary["states"].values()) == 4
    assert sum(line.startswith("trial 3: lr ") for line in log) == 1

    # another setting: refused in one sentence, nothing written
    before = tree(out)
    with pytest.raises(UserError) as err:
        train_cls.main(base + ["--hpo_trials", "4", "--weight_decay", "0.05"])
    assert "was started with other settings (weight_decay differ)" in str(err.value)
    assert "\n" not in str(err.value) and tree(out) == before

    # a non-empty folder that holds no study: refused
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not empty and holds no study"):
        train_cls.main([str(other) if a == str(out) else a for a in base] + ["--hpo_trials", "2"])
    assert os.listdir(other) == ["notes.txt"]

    # --overwrite_output_dir starts over
    summary = train_cls.main(base + ["--hpo_trials", "1", "--overwrite_output_dir"])
    assert [r["number"] for r in rows(out)] == ["0"] and sorted(os.listdir(out / "trials")) == ["trial_000"]
    assert sum(summary["states"].values()) == 1 and len(stored(out).trials) == 1


# ---------------------------------------------------------------------------------------------
# Pruning and failed trials
# ---------------------------------------------------------------------------------------------

class PruneTrials(optuna.pruners.BasePruner):
    """Stops the given trial numbers at their first report, and no other."""

    def __init__(self, numbers):
        self.numbers = set(numbers)

    def prune(self, s, trial) -> bool:
        return trial.number in self.numbers


def test_pruned_diverged_and_out_of_memory_trials_and_the_study_goes_on(tiny_model, files, tmp_path, monkeypatch,
                                                                       no_plots):
    import torch

    from common.training import loop

    out = tmp_path / "study"
    monkeypatch.setattr(study, "make_pruner", lambda args, plan: PruneTrials({1, 3}))
    original_step = loop.Trainer._optimizer_step

    def nan_in_trial_2(self, window_loss):  # trial 2's loss becomes NaN at its third step
        if os.path.basename(self.output_dir) == "trial_002" and self.state.global_step == 2:
            window_loss = window_loss * float("nan")
        return original_step(self, window_loss)

    monkeypatch.setattr(loop.Trainer, "_optimizer_step", nan_in_trial_2)
    original_run = study.run_single

    def oom_in_trial_4(task, ctx, *a, **kw):
        if os.path.basename(ctx.args.output_dir) == "trial_004":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original_run(task, ctx, *a, **kw)

    monkeypatch.setattr(study, "run_single", oom_in_trial_4)
    beats = []
    original_beat = optuna.storages.RDBStorage.record_heartbeat

    def beat(self, trial_id):
        beats.append(trial_id)
        return original_beat(self, trial_id)

    monkeypatch.setattr(optuna.storages.RDBStorage, "record_heartbeat", beat)
    summary = train_cls.main(command(tiny_model, files, out, 6))

    table = {int(r["number"]): r for r in rows(out)}
    assert [table[n]["state"] for n in range(6)] == ["complete", "pruned", "fail", "pruned", "fail", "complete"]
    assert summary["states"] == {"complete": 2, "pruned": 2, "fail": 2}
    assert table[2]["note"].startswith("diverged: the training loss became NaN/inf at optimizer step 3")
    assert table[4]["note"] == "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB"
    for n in (1, 3):  # stopped at their first evaluation (epoch 1/3), partial results kept, checkpoints gone
        assert table[n]["pruned_at"] == "0.33" and float(table[n]["value"]) >= 0
        folder = out / table[n]["folder"]
        trial = load(folder / "trial.json")
        assert trial["state"] == "pruned" and trial["pruned_at_epoch"] == pytest.approx(1 / 3, abs=0.01)
        assert [(i["evaluation"], round(i["epoch"], 2)) for i in trial["intermediate"]] == [(1, 0.33)]
        assert trial["intermediate"][0]["value"] == pytest.approx(float(table[n]["value"]))
        assert not (folder / "checkpoints").exists() and (folder / "log_history.jsonl").exists()
        assert not (folder / "results.json").exists()
    assert load(out / "trials" / "trial_002" / "trial.json")["error"].startswith("diverged")
    assert load(out / "trials" / "trial_004" / "trial.json")["state"] == "fail"
    s = stored(out)
    assert [t.state for t in s.trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                                           optuna.trial.TrialState.FAIL, optuna.trial.TrialState.PRUNED,
                                           optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]
    assert summary["best_trial"]["number"] in (0, 5)
    assert len(set(beats)) == 6  # every trial's heartbeat, for launches on other machines (recover)


def test_no_finished_trial_is_one_sentence_and_the_last_evaluation_never_prunes(tiny_model, files, tmp_path,
                                                                               monkeypatch, no_plots):
    monkeypatch.setattr(study, "make_pruner", lambda args, plan: optuna.pruners.ThresholdPruner(lower=2.0))
    out = tmp_path / "pruned"
    with pytest.raises(UserError) as err:
        train_cls.main(command(tiny_model, files, out, 2))
    assert str(err.value) == "no trial of the study finished (2 pruned)."
    assert [r["state"] for r in rows(out)] == ["pruned", "pruned"] and not (out / "best.yaml").exists()
    # one evaluation, at the last step: a pruner that prunes everything lets it complete
    last = tmp_path / "last"
    summary = train_cls.main(command(tiny_model, files, last, 1, "--max_steps", "2", "--eval_steps", "2"))
    assert summary["states"] == {"complete": 1}
    assert [round(i["epoch"], 2) for i in load(last / "trials" / "trial_000" / "trial.json")["intermediate"]] == [0.33]


def test_surplus_trial_of_a_concurrent_claim_is_dropped(tmp_path, monkeypatch):
    """Two machines without a shared lock claim the study's last trial at once: the later one is dropped, not
    counted, not in trials.csv."""
    args = TrainArguments(hpo_trials=2, output_dir=str(tmp_path / "out"), hpo_space="x")
    plan = study.StudyPlan("accuracy", True, 96, [Param("learning_rate", "float", 1e-4, 1e-3, log=True)], 33)
    storage = study.make_storage(study.storage_url(args))
    s = optuna.create_study(storage=storage, study_name="study", direction="maximize")
    first = study.claim(s, storage, args, plan)
    assert first["number"] == 0 and first["folder"].endswith("trial_000") and first["resume"] is None
    assert first["trial"].user_attrs["hpo_owner"]["pid"] == os.getpid()
    ask = s.ask

    def another_machine_asks_first(*a, **kw):
        ask()  # claimed elsewhere between our count and our ask
        return ask(*a, **kw)

    monkeypatch.setattr(s, "ask", another_machine_asks_first)
    assert study.claim(s, storage, args, plan) is None
    trials = s.get_trials(deepcopy=False)
    assert [t.number for t in trials] == [0, 1, 2] and trials[2].user_attrs.get("hpo_surplus")
    assert counted_numbers(s) == [0, 1] and [r["number"] for r in study.trial_rows(s, plan)] == [0, 1]
    assert study.counts(trials) == {"running": 2}


def test_running_trial_of_a_dead_process_or_machine_is_queued_again(tmp_path):
    """A running trial whose process is gone (this machine: its pid) or whose heartbeat stopped (another
    machine) is marked interrupted and queued again, with its settings and its folder."""
    args = TrainArguments(hpo_trials=3, output_dir=str(tmp_path / "out"), hpo_space="x")
    plan = study.StudyPlan("accuracy", True, 96, [Param("learning_rate", "float", 1e-4, 1e-3, log=True)], 33)
    os.makedirs(args.output_dir)
    storage = optuna.storages.RDBStorage(study.storage_url(args), heartbeat_interval=1, grace_period=1)
    s = optuna.create_study(storage=storage, study_name="study", direction="maximize")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here, gone, far = (study.claim(s, storage, args, plan) for _ in range(3))
    # trial 0 runs here; trial 1's process is gone; trial 2 runs on another machine that stopped beating
    gone["trial"].set_user_attr("hpo_owner", {"host": study.socket.gethostname(), "pid": dead.pid, "started": "1"})
    far["trial"].set_user_attr("hpo_owner", {"host": "elsewhere", "pid": 1})
    storage.record_heartbeat(far["trial"]._trial_id)
    time.sleep(2.2)
    storage.record_heartbeat(here["trial"]._trial_id)
    retry = study.claim(s, storage, args, plan)
    assert retry["retry_of"] == 1 and retry["number"] == 3 and retry["folder"].endswith("trial_001")
    assert study.interrupted(s.trials[1]) and study.interrupted(s.trials[2]) and not study.interrupted(s.trials[0])
    assert {t.user_attrs["hpo_retry_of"]: t.user_attrs["hpo_folder"] for t in s.trials[3:]} == \
        {1: "trial_001", 2: "trial_002"}
    assert retry["params"] == s.trials[retry["retry_of"]].params
    assert counted_numbers(s) == [0, 3, 4]


# ---------------------------------------------------------------------------------------------
# Processes: kill -9, workers, two launches, a multi-process trial
# ---------------------------------------------------------------------------------------------

def test_kill_9_mid_study_then_the_same_command_finishes_it(tiny_model, files, tmp_path, no_plots):
    out = tmp_path / "study"
    argv = command(tiny_model, files, out, 3, "--hpo_pruner", "none", "--logging_steps", "1",
                   "--checkpointing_steps", "2")
    marker = tmp_path / "parked"
    env = dict(os.environ, FAULT_POINT="train", FAULT_STEP="5", FAULT_MARKER=str(marker), FAULT_RUN="trial_002",
               PYTHONUNBUFFERED="1")
    log = tmp_path / "killed.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "fault_runner.py"), *argv], cwd=ROOT,
                                env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while not marker.exists():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "trial 2 never reached step 5"
            time.sleep(0.05)
        states = [t.state for t in stored(out).trials]
        assert states == [optuna.trial.TrialState.COMPLETE] * 2 + [optuna.trial.TrialState.RUNNING]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert not (out / "trials.csv").exists()

    with log_lines() as log:
        summary = train_cls.main(argv)
    assert "trial 2 was interrupted (its process is gone): queued to run again" in log
    assert any(line.startswith("trial 3 (re-run of 2): ") and "resuming its latest checkpoint" in line
               for line in log), log
    table = rows(out)
    assert [(r["number"], r["state"], r["note"]) for r in table] == [
        ("0", "complete", ""), ("1", "complete", ""), ("2", "interrupted", ""),
        ("3", "complete", "re-run of trial 2")]
    assert summary["states"] == {"complete": 3}
    assert table[3]["folder"] == table[2]["folder"] == "trials/trial_002"
    assert sorted(os.listdir(out / "trials")) == ["trial_000", "trial_001", "trial_002"]
    result = load(out / "trials" / "trial_002" / "results.json")
    assert result["train"]["resumed_from"]["step"] == 4 and result["train"]["global_step"] == 6
    assert table[3]["learning_rate"] == table[2]["learning_rate"]
    assert load(out / "trials" / "trial_002" / "trial.json")["number"] == 3
    numbers = [t.number for t in stored(out).trials]
    assert len(numbers) == len(set(numbers)) == 4


def test_two_workers_and_a_second_launch_share_one_study(tiny_model, files, tmp_path, no_plots):
    """Two launches with their own output_dir on one SQLite storage, started together: one a command, the other
    (main() in this process, as in a notebook) with --hpo_workers 2. 8 trials in all, each run once, none
    surplus; the workers are processes of train_cls.py with their logs in output_dir/workers/."""
    storage = "sqlite:///" + str(tmp_path / "shared" / "study.db")
    a, b = tmp_path / "a", tmp_path / "b"
    with open(tmp_path / "b.log", "w") as fh:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_cls.py"),
                                 *command(tiny_model, files, b, 8, "--hpo_storage", storage)], cwd=ROOT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=fh, stderr=subprocess.STDOUT)
    try:
        here = train_cls.main(command(tiny_model, files, a, 8, "--hpo_storage", storage, "--hpo_workers", "2"))
    finally:
        proc.wait(timeout=240)
    assert proc.returncode == 0, (tmp_path / "b.log").read_text()[-3000:]

    s = stored(None, storage)
    trials = [t for t in s.get_trials(deepcopy=False) if study.counted(t)]
    assert len(trials) == 8 and all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    assert not any(t.user_attrs.get("hpo_surplus") or study.interrupted(t) for t in s.trials)
    owners = {t.user_attrs["hpo_owner"]["pid"] for t in trials}
    assert len(owners) >= 2 and os.getpid() not in owners  # the launch with workers runs no trial itself
    folders = [f for out in (a, b) for f in os.listdir(out / "trials")]
    assert sorted(folders) == [f"trial_{t.number:03d}" for t in trials]  # each trial in one folder, once
    logs = [a / "workers" / f"worker_{i}.log" for i in (1, 2)]
    assert sorted(os.listdir(a / "workers")) == ["worker_1.log", "worker_2.log"]
    assert any(re.search(r"INFO trial \d+: lr ", log.read_text()) for log in logs)
    assert sum(here["states"].values()) == 8 and len(rows(a)) == 8 and here["storage"] == storage
    assert sum(load(b / "summary.json")["states"].values()) == 8 and len(rows(b)) == 8


PRUNE_TRIAL_1 = """import sys
sys.path.insert(0, {root!r})
import optuna
from common.errors import run_cli
from common.runs import study


class PruneTrial1(optuna.pruners.BasePruner):
    def prune(self, s, trial):
        return trial.number == 1


study.make_pruner = lambda args, plan: PruneTrial1()
import train_cls

run_cli(train_cls.main)
"""


def test_multi_process_trials(tiny_model, files, tmp_path):
    """Trials of a 2-process launch: both processes run every trial; the main process's pruning decision (trial
    1, at its first evaluation) stops both."""
    out = tmp_path / "two"
    runner = tmp_path / "prune_trial_1.py"
    runner.write_text(PRUNE_TRIAL_1.format(root=ROOT))
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(runner)]
    proc = subprocess.run([*launcher, *command(tiny_model, files, out, 3)], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, ACCELERATE_USE_CPU="1", PYTHONUNBUFFERED="1"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = load(out / "summary.json")
    table = rows(out)
    assert [r["state"] for r in table] == ["complete", "pruned", "complete"]
    assert summary["states"] == {"complete": 2, "pruned": 1} and table[1]["pruned_at"] == "0.33"
    for r in (table[0], table[2]):
        result = load(out / r["folder"] / "results.json")
        assert result["setup"]["num_processes"] == 2 and result["eval"]["num_examples"] == 32
        assert result["eval"]["accuracy"] == pytest.approx(float(r["value"]))
    assert load(out / table[1]["folder"] / "trial.json")["state"] == "pruned"
    assert proc.stderr.count("── study done") == 1  # the closing block once, from the main process
    assert len(stored(out).trials) == 3


# ---------------------------------------------------------------------------------------------
# Confirmation over seeds, k-fold trials
# ---------------------------------------------------------------------------------------------

def test_confirm_seeds_compares_best_and_default(tiny_model, files, tmp_path, no_plots):
    out = tmp_path / "study"
    argv = command(tiny_model, files, out, 2, "--hpo_confirm_seeds", "2", "--hpo_pruner", "none")
    summary = train_cls.main(argv)
    conf = summary["confirm"]
    assert conf["seeds"] == [42, 142] and conf["metric"] == "eval_accuracy"
    for label in ("best", "default"):
        assert conf[label]["n"] == 2 and len(conf[label]["values"]) == 2 and conf[label]["folder"] == \
            f"confirm/{label}"
        job = load(out / "confirm" / label / "summary.json")
        assert [r["name"] for r in job["runs"]] == ["seed_42", "seed_142"]
        assert [r["metrics"]["eval_accuracy"] for r in job["runs"]] == conf[label]["values"]
    assert conf["best"]["params"] == summary["best_trial"]["params"] and conf["default"]["params"] == {}
    used = yaml.safe_load((out / "confirm" / "best" / "seed_42" / "training_args.yaml").read_text())
    assert used["learning_rate"] == pytest.approx(summary["best_trial"]["params"]["learning_rate"])
    assert used["eval_strategy"] == "epoch"
    default = yaml.safe_load((out / "confirm" / "default" / "seed_42" / "training_args.yaml").read_text())
    assert default["learning_rate"] == 5e-5
    diff = conf["difference"]
    assert diff["mean"] == pytest.approx(conf["best"]["mean"] - conf["default"]["mean"])
    assert diff["ci95"] is not None and diff["ci95"][0] <= diff["mean"] <= diff["ci95"][1]
    assert load(out / "summary.json")["confirm"] == json.loads(json.dumps(conf))

    # a better trial joins the study (another machine, say), then the command runs again: the default settings'
    # runs are found finished, the best settings' are replaced by the new best's
    s = stored(out)
    dist = optuna.distributions.FloatDistribution(1e-4, 5e-3, log=True)
    s.add_trial(optuna.trial.create_trial(params={"learning_rate": 1e-3}, distributions={"learning_rate": dist},
                                          value=1.5, user_attrs={"hpo_folder": "trial_002"}))
    with log_lines() as log:
        third = train_cls.main(argv[:argv.index("--hpo_trials") + 1] + ["3"] + argv[argv.index("--hpo_trials") + 2:])
    assert third["best_trial"]["number"] == 2 and third["confirm"]["best"]["params"] == {"learning_rate": 1e-3}
    assert any(line.startswith("the best settings changed since") for line in log), log
    assert sum("finished earlier, skipped" in line for line in log) == 2, log
    used = yaml.safe_load((out / "confirm" / "best" / "seed_42" / "training_args.yaml").read_text())
    assert used["learning_rate"] == pytest.approx(1e-3)
    assert third["confirm"]["default"]["values"] == conf["default"]["values"]


def test_kfold_trials_prune_between_folds_and_continue_their_folds(tiny_model, files, tmp_path, monkeypatch, no_plots):
    """A k-fold trial scores the mean of its folds; the pruner sees it after each fold (halving's first rung:
    one fold); a trial killed between its folds continues them when the command runs again."""
    from common.runs import repeats

    out = tmp_path / "kfold"
    argv = ["--model", tiny_model, "--train_file", files["train"], "--output_dir", str(out), "--hpo_trials", "2",
            "--hpo_space", files["lr"], "--kfold", "2", *BASE]
    first_rungs = []
    halving = study.make_pruner

    def prune_trial_2(args, plan):
        first_rungs.append((halving(args, plan).inner._min_resource, plan.min_resource))
        return PruneTrials({2})

    monkeypatch.setattr(study, "make_pruner", prune_trial_2)
    original_run = repeats.run_single
    killed = []

    def killed_before_fold_2(task, ctx, *a, **kw):
        if ctx.args.output_dir.endswith(os.path.join("trial_000", "fold_2")) and not killed:
            killed.append(True)
            raise KeyboardInterrupt
        return original_run(task, ctx, *a, **kw)

    monkeypatch.setattr(repeats, "run_single", killed_before_fold_2)
    with pytest.raises(KeyboardInterrupt):
        train_cls.main(argv)
    assert (out / "trials" / "trial_000" / "fold_1" / "results.json").exists()
    with log_lines() as log:
        summary = train_cls.main(argv)
    assert first_rungs == [(1, 1), (1, 1)]
    assert "run 1/2 (fold_1): finished earlier, skipped" in log
    assert summary["states"] == {"complete": 1, "pruned": 1}
    table = rows(out)
    assert [(r["number"], r["state"], r["note"], r["folder"]) for r in table] == [
        ("0", "interrupted", "", "trials/trial_000"), ("1", "complete", "re-run of trial 0", "trials/trial_000"),
        ("2", "pruned", "", "trials/trial_002")]
    done = out / "trials" / "trial_000"
    folds = [load(done / f"fold_{i}" / "results.json")["eval"]["accuracy"] for i in (1, 2)]
    assert float(table[1]["value"]) == pytest.approx(sum(folds) / 2)
    assert load(done / "summary.json")["metrics"]["eval_accuracy"]["mean"] == pytest.approx(sum(folds) / 2)
    trial = load(done / "trial.json")
    assert [(i["after_fold"], i["value"]) for i in trial["intermediate"]] == [(1, folds[0]), (2, folds[1])]
    pruned = out / "trials" / "trial_002"
    assert sorted(p for p in os.listdir(pruned) if p.startswith("fold_")) == ["fold_1"]
    trial = load(pruned / "trial.json")
    assert trial["state"] == "pruned" and trial["pruned_after_fold"] == 1 and len(trial["intermediate"]) == 1
    assert float(table[2]["value"]) == pytest.approx(trial["intermediate"][0]["value"])
    assert table[2]["pruned_at"] == "1"  # the fold after which it stopped
