"""Launch and resume bookkeeping (issue 23, items 6, 7, 8, 13): a multi-process request that accelerate launch
turned into one process is refused, and a user error under `accelerate launch -q` is printed once; `latest` without
a checkpoint is refused and `auto` starts fresh; a resumed run carries the checkpoint's log history, says nothing
about new weights and reports its session's time apart."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

import train_cls
from common.errors import UserError
from common.runs import reporting
from common.training import checkpoint, runtime
from conftest import ROOT

# What accelerate's single-process launcher sets for `--cpu --num_processes 2` (read from a child it started).
SIMPLE_2 = {"ACCELERATE_USE_CPU": "True", "ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
LAUNCH_2 = ["/venv/bin/python3", "/venv/bin/accelerate", "launch", "--cpu", "--num_processes", "2", "train_cls.py",
            "--output_dir", "out"]


def launcher(*args):
    return [sys.executable, "-m", "accelerate.commands.launch", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Item 6: `accelerate launch --cpu --num_processes 2` starts one process
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("env,parent_env,parent_argv,expected", [
    (SIMPLE_2, {}, LAUNCH_2, "sure"),
    (SIMPLE_2, {}, ["/usr/bin/python3", "-m", "accelerate.commands.launch", "--num_processes", "2", "t.py"], "sure"),
    (SIMPLE_2, None, [], "likely"),  # no /proc (macOS): a warning, not a refusal
    # one process: the launcher sets no MASTER_ADDR
    ({k: v for k, v in SIMPLE_2.items() if not k.startswith("MASTER")}, {}, LAUNCH_2, None),
    # the user's own exported MASTER_ADDR/MASTER_PORT, inherited by a one-process launch, are not a request
    (SIMPLE_2, {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, LAUNCH_2, None),
    # ranks set: torchrun, accelerate's multi-process launchers, notebook_launcher, mpirun
    (SIMPLE_2 | {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, {}, LAUNCH_2, None),
    (SIMPLE_2 | {"OMPI_COMM_WORLD_SIZE": "2"}, {}, LAUNCH_2, None),
    # not started by accelerate launch (a job script exporting the variables, then `python train_cls.py`)
    (SIMPLE_2, {}, ["/bin/bash", "job.sh"], None),
    ({k: v for k, v in SIMPLE_2.items() if k != "ACCELERATE_USE_CPU"}, {}, LAUNCH_2, None),
])
def test_lone_launch_is_recognised_from_the_environment(env, parent_env, parent_argv, expected):
    assert runtime.lone_launch(env, parent_env, parent_argv) == expected


def test_lone_launch_message_names_the_request_and_the_command():
    cpu = runtime.lone_launch_message(LAUNCH_2, True, "train_ner.py")
    assert cpu.startswith("accelerate launch was asked for 2 processes (--num_processes 2) but started only this one")
    assert "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 train_ner.py ...`" in cpu
    assert "accelerate_configs/multi_gpu.yaml`, without --cpu" in cpu and "drop --num_processes" in cpu
    config = runtime.lone_launch_message(["/b/accelerate", "launch", "--config_file", "c.yaml", "t.py",
                                          "--num_processes", "9"], False, "t.py")  # the script's flags not read
    assert "num_processes in its config" in config and "`accelerate launch --multi_gpu --num_processes N t.py ...`" \
        in config and "set num_processes: 1 in that config" in config
    machines = runtime.lone_launch_message(["/b/accelerate", "launch", "--num-machines=2", "t.py"], True, "t.py")
    assert "2 machines (--num_machines 2)" in machines and "--multi_gpu --num_machines 2 --num_processes N" in machines


def test_cpu_launch_of_two_processes_is_refused_once_without_traceback(tiny_model, sentiment_files, tmp_path):
    """For real: the launcher's one process refuses before writing anything, with the command to use. Item 13 too: a
    user error under `accelerate launch -q` is printed once, with no traceback, and the exit status is the launcher's
    1 (it never passes the script's 2 on). Two ranks printing once: tests/test_engines.py (refused_once)."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("ACCELERATE_USE_CPU", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(launcher("-q", "--cpu", "--num_processes", "2", "--main_process_port", str(free_port()),
                                   os.path.join(ROOT, "train_cls.py"), "--model", tiny_model, "--train_file",
                                   sentiment_files["train"], "--output_dir", str(out)),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.count("error: accelerate launch was asked for 2 processes (--num_processes 2)") == 1, \
        proc.stderr[-3000:]
    assert "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 train_cls.py" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


# ---------------------------------------------------------------------------------------------
# Item 7: `latest` needs a checkpoint, `auto` resumes if there is one
# ---------------------------------------------------------------------------------------------

def _fake_checkpoint(root, name, step, history=None):
    path = root / name
    path.mkdir(parents=True)
    (path / checkpoint.STATE_FILE).write_text(checkpoint.TrainerState(global_step=step, format=checkpoint.FORMAT)
                                              .to_json())
    (path / checkpoint.COMPLETE).write_text("ok\n")
    if history is not None:
        (path / checkpoint.HISTORY_FILE).write_text(history)
    return str(path)


def test_resolve_resume_latest_auto_and_paths(tmp_path):
    root = tmp_path / "out" / "checkpoints"
    for missing in (root, tmp_path):  # no checkpoints folder, or an empty one
        with pytest.raises(UserError) as err:
            checkpoint.resolve_resume("latest", str(missing))
        assert str(err.value) == (f"--resume_from_checkpoint latest: there is no complete checkpoint in '{missing}' "
                                  "to resume; pass --resume_from_checkpoint auto to resume when there is one and start "
                                  "from scratch otherwise, a checkpoint folder, or drop the flag.")
        assert checkpoint.resolve_resume("auto", str(missing)) is None
    (root / ".tmp-step_6").mkdir(parents=True)  # a checkpoint being written is not one
    with pytest.raises(UserError, match="no complete checkpoint"):
        checkpoint.resolve_resume("latest", str(root))
    _fake_checkpoint(root, "step_2", 2)
    newest = _fake_checkpoint(root, "step_10", 10)  # by its step, not by its name
    assert checkpoint.resolve_resume("latest", str(root)) == checkpoint.resolve_resume("auto", str(root)) == newest
    assert checkpoint.resolve_resume(newest, str(root)) == newest
    with pytest.raises(UserError, match=r"'lastest' does not exist \(did you mean 'latest'\?\); pass a checkpoint"):
        checkpoint.resolve_resume("lastest", str(root))


def test_latest_without_a_checkpoint_is_refused_before_anything_is_written(tiny_model, sentiment_files, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match="no complete checkpoint in .* pass --resume_from_checkpoint auto"):
        train_cls.main(["--model", tiny_model, "--train_file", sentiment_files["train"], "--output_dir", str(out),
                        "--resume_from_checkpoint", "latest"])
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Item 8: resume bookkeeping
# ---------------------------------------------------------------------------------------------

def test_read_history_from_the_checkpoint_or_its_output_folder(tmp_path, caplog):
    rows = [{"step": 0, "eval_loss": 0.7, "initial": True}, {"step": 1, "loss": 0.69}, {"step": 2, "loss": 0.6},
            {"step": 2, "eval_loss": 0.65}, {"step": 3, "loss": 0.5}]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    own = _fake_checkpoint(tmp_path / "a" / "checkpoints", "step_2", 2, history=text)
    assert checkpoint.read_history(own, 2) == rows[:4]
    # a checkpoint without its own history (written before it kept one): the rows of its output folder's log
    older = _fake_checkpoint(tmp_path / "b" / "checkpoints", "step_2", 2)
    assert checkpoint.read_history(older, 2) == []
    (tmp_path / "b" / reporting.LOG_HISTORY).write_text(text)
    assert checkpoint.read_history(older, 2) == rows[:4]
    (tmp_path / "b" / reporting.LOG_HISTORY).write_text(text + "{broken\n")  # not the checkpoint's: a warning
    assert checkpoint.read_history(older, 2) == [] and "the resumed log starts at step 2" in caplog.text
    (tmp_path / "a" / "checkpoints" / "step_2" / checkpoint.HISTORY_FILE).write_text('{"loss": 1}\n')
    with pytest.raises(UserError, match="its log_history.jsonl is unreadable \\(line 1 is not a log record with a "
                                        "step\\); delete that file to resume without the earlier log records"):
        checkpoint.read_history(own, 2)


def test_log_writer_starts_a_resumed_log_with_the_carried_records(tmp_path):
    (tmp_path / reporting.LOG_HISTORY).write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4}\n')
    writer = reporting.LogWriter(str(tmp_path), [{"step": 1, "loss": 0.5}, {"step": 2, "loss": float("nan")}])
    writer({"step": 3, "loss": 0.25})
    got = [json.loads(line) for line in (tmp_path / reporting.LOG_HISTORY).read_text().splitlines()]
    assert got == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": None}, {"step": 3, "loss": 0.25}]
    (tmp_path / "new").mkdir()
    reporting.LogWriter(str(tmp_path / "new"))
    assert not (tmp_path / "new" / reporting.LOG_HISTORY).exists()  # a fresh run's log starts with its first record


RESUME_ARGS = ["--max_steps", "4", "--checkpointing_steps", "2", "--logging_steps", "1", "--eval_steps", "2",
               "--per_device_train_batch_size", "8", "--learning_rate", "3e-3", "--mixed_precision", "no",
               "--no_load_best_model_at_end"]


def _log(out):
    return [json.loads(line) for line in (out / reporting.LOG_HISTORY).read_text().splitlines()]


def test_resume_into_another_folder_carries_the_log_and_reports_its_session(tiny_model, sentiment_files, tmp_path,
                                                                            capfd):
    data = ["--model", tiny_model, "--train_file", sentiment_files["train"], "--validation_file",
            sentiment_files["dev"]]
    first = tmp_path / "first"
    ref = train_cls.main([*data, "--output_dir", str(first), *RESUME_ARGS, "--resume_from_checkpoint", "auto"])
    err = capfd.readouterr().err
    assert f"--resume_from_checkpoint auto: no checkpoint in {first / 'checkpoints'} yet, starting from scratch" in err
    assert "newly initialised weights (trained from scratch here): bert.pooler.dense.bias" in err
    assert ref["train"]["resumed_from"] is None
    assert ref["timing"]["session_train_seconds"] == ref["timing"]["train_seconds"]
    ckpt = first / "checkpoints" / "step_2"
    kept = [json.loads(line) for line in (ckpt / checkpoint.HISTORY_FILE).read_text().splitlines()]
    assert kept == [r for r in _log(first) if r["step"] <= 2] and {r["step"] for r in kept} == {1, 2}

    # Resumed into a new folder, from a checkpoint that lives under the first run's folder.
    shutil.rmtree(first / "checkpoints" / "step_4")
    second = tmp_path / "second"
    res = train_cls.main([*data, "--output_dir", str(second), *RESUME_ARGS, "--resume_from_checkpoint", str(ckpt)])
    err = capfd.readouterr().err
    assert "newly initialised" not in err and f"resumed from {ckpt} at step 2" in err
    log, ref_log = _log(second), _log(first)
    assert [(r["step"], sorted(r)) for r in log] == [(r["step"], sorted(r)) for r in ref_log]  # each row once
    assert log[:len(kept)] == kept  # the checkpoint's rows, as they were
    for a, b in zip(log, ref_log):  # exact resume: the rows after it match the uninterrupted run
        assert a.get("loss", 0) == pytest.approx(b.get("loss", 0), abs=1e-6)
        assert a.get("eval_loss", 0) == pytest.approx(b.get("eval_loss", 0), abs=1e-6)
    assert res["train"]["final_train_loss"] == pytest.approx(ref["train"]["final_train_loss"], abs=1e-6)
    # the numbers a summary needs: where this session started, and its own training time
    state = json.loads((ckpt / checkpoint.STATE_FILE).read_text())
    assert res["train"]["resumed_from"] == {"checkpoint": str(ckpt), "step": 2, "train_seconds": state["train_seconds"]}
    timing = res["timing"]
    assert timing["train_seconds"] == pytest.approx(state["train_seconds"] + timing["session_train_seconds"])
    assert 0 < timing["session_train_seconds"] < timing["total_seconds"]
    assert res["train"]["train_runtime"] == timing["train_seconds"]  # all sessions, like the speeds
