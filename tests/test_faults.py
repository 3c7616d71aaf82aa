"""Faults injected for real: SIGKILL during training, during evaluation and while a checkpoint is
being written; then the same command with --resume_from_checkpoint auto must end exactly where an
uninterrupted run ends (CPU fp32, same seed)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import train_cls
from conftest import ROOT

ARGS = ["--num_train_epochs", "2", "--learning_rate", "3e-3", "--per_device_train_batch_size", "16",
        "--logging_steps", "1", "--checkpointing_steps", "4", "--eval_steps", "7", "--mixed_precision", "no",
        "--resume_from_checkpoint", "auto"]


def argv(tiny_model, files, out):
    return ["--model", tiny_model, "--train_file", files["train"], "--validation_file", files["dev"],
            "--output_dir", str(out), *ARGS]


@pytest.fixture(scope="module")
def reference(tiny_model, sentiment_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    res = train_cls.main(argv(tiny_model, sentiment_files, out))  # 'auto' with no checkpoint: fresh start
    return res, load_file(out / "model.safetensors")


def kill_at(point, step, tiny_model, files, out, tmp_path):
    marker = tmp_path / f"parked-{point}"
    env = dict(os.environ, FAULT_POINT=point, FAULT_STEP=str(step), FAULT_MARKER=str(marker))
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "fault_runner.py"),
                             *argv(tiny_model, files, out)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() < deadline, "the run never reached the fault point"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "results.json").exists()


def latest_step(out):
    from common.training.checkpoint import list_checkpoints

    return list_checkpoints(str(out / "checkpoints"))[-1][0]


def resume_and_compare(reference, tiny_model, files, out):
    ref_res, ref_weights = reference
    res = train_cls.main(argv(tiny_model, files, out))
    weights = load_file(out / "model.safetensors")
    for key in ref_weights:
        torch.testing.assert_close(weights[key], ref_weights[key], rtol=0, atol=1e-6, msg=key)
    assert res["eval"] == ref_res["eval"]
    assert res["train"]["best_step"] == ref_res["train"]["best_step"]


@pytest.mark.parametrize("point,step,expected_latest", [("train", 18, 16), ("eval", 21, 20)])
def test_sigkill_then_resume_matches_uninterrupted(point, step, expected_latest, reference, tiny_model,
                                                   sentiment_files, tmp_path):
    out = tmp_path / "out"
    kill_at(point, step, tiny_model, sentiment_files, out, tmp_path)
    assert latest_step(out) == expected_latest
    resume_and_compare(reference, tiny_model, sentiment_files, out)


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(reference, tiny_model, sentiment_files, tmp_path):
    out = tmp_path / "out"
    kill_at("checkpoint", 12, tiny_model, sentiment_files, out, tmp_path)
    ckpts = sorted(os.listdir(out / "checkpoints"))
    assert ".tmp-step_12" in ckpts and "step_12" not in ckpts
    assert latest_step(out) == 8  # `latest` never points at the partial checkpoint
    state = json.loads((out / "checkpoints" / "step_8" / "trainer_state.json").read_text())
    assert state["global_step"] == 8
    resume_and_compare(reference, tiny_model, sentiment_files, out)
    assert ".tmp-step_12" not in os.listdir(out / "checkpoints")  # rewritten cleanly on resume


def test_nonfinite_loss_stops_with_the_step_and_saves_nothing(tiny_model, sentiment_files, tmp_path, monkeypatch):
    monkeypatch.setattr(train_cls.ClassificationObjective, "loss_sum", nan_at_step(5))
    out = tmp_path / "nan"
    with pytest.raises(train_cls.UserError, match="became NaN/inf at optimizer step 5"):
        train_cls.main(argv(tiny_model, sentiment_files, out))
    assert not (out / "model.safetensors").exists() and not (out / "results.json").exists()
    assert latest_step(out) == 4  # the last checkpoint before the bad step is intact


def test_skip_nonfinite_counts_skipped_steps(tiny_model, sentiment_files, tmp_path, monkeypatch):
    monkeypatch.setattr(train_cls.ClassificationObjective, "loss_sum", nan_at_step(5))
    res = train_cls.main(argv(tiny_model, sentiment_files, tmp_path / "skip") + ["--skip_nonfinite"])
    assert res["train"]["nonfinite_skipped"] == 1 and res["train"]["global_step"] == 30
    weights = load_file(tmp_path / "skip" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def nan_at_step(bad_step):
    original = train_cls.ClassificationObjective.loss_sum
    calls = {"n": 0}

    def loss_sum(self, model, batch):
        calls["n"] += 1
        loss = original(self, model, batch)
        return loss * float("nan") if calls["n"] == bad_step else loss  # accumulation 1: call n is step n

    return loss_sum


def test_one_rank_dying_ends_the_whole_job(tiny_model, sentiment_files, tmp_path):
    """Rank 1 of 2 exits abruptly at step 3: the job ends non-zero within a bounded time, no hang."""
    out = tmp_path / "die"
    env = dict(os.environ, FAULT_POINT="die", FAULT_STEP="3", FAULT_MARKER=str(tmp_path / "died"),
               ACCELERATE_USE_CPU="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29571",
           os.path.join(ROOT, "tests", "fault_runner.py"), *argv(tiny_model, sentiment_files, out),
           "--ddp_timeout", "30"]
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert (tmp_path / "died").exists()
    assert proc.returncode != 0
    assert time.time() - start < 120
    assert not (out / "results.json").exists()


def test_disk_full_while_checkpointing_is_a_clear_error_and_keeps_the_last_checkpoint(
        tiny_model, sentiment_files, tmp_path, monkeypatch):
    import errno

    from common.training import checkpoint

    original = checkpoint.write_state

    def write_state(accelerator, model, optimizer, folder):
        if folder.endswith(".tmp-step_8"):
            open(os.path.join(folder, "model.safetensors"), "w").write("partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(accelerator, model, optimizer, folder)

    monkeypatch.setattr(checkpoint, "write_state", write_state)
    out = tmp_path / "full"
    with pytest.raises(train_cls.UserError, match="No space left on device.*step_4, is intact"):
        train_cls.main(argv(tiny_model, sentiment_files, out))
    assert sorted(os.listdir(out / "checkpoints")) == ["best", "step_4"]  # no partial checkpoint left
    monkeypatch.setattr(checkpoint, "write_state", original)
    assert latest_step(out) == 4



def test_the_best_weights_are_saved_without_optimizer_state(tiny_model, sentiment_files, tmp_path, monkeypatch):
    """The best checkpoint is only ever read back as weights: no optimizer file (a third of the bytes). Named as a
    resume point, such a folder is refused with what to do instead."""
    import shutil

    import train_cls
    from common.errors import UserError
    from common.training import checkpoint as ckpt
    from common.training import loop

    seen = {}
    original = loop.Trainer.save_checkpoint

    def listing(self, kind="periodic"):
        path = original(self, kind)
        seen[kind] = sorted(os.listdir(path))
        return path

    monkeypatch.setattr(loop.Trainer, "save_checkpoint", listing)
    out = tmp_path / "out"
    train_cls.main(["--model", tiny_model, "--train_file", sentiment_files["train"], "--validation_file",
                    sentiment_files["dev"], "--max_steps", "4", "--eval_steps", "2", "--checkpointing_steps", "2",
                    "--mixed_precision", "no", "--output_dir", str(out)])
    assert seen["best"] == ["COMPLETE", "log_history.jsonl", "model.safetensors", "trainer_state.json"], seen
    assert "optimizer.safetensors" in seen["periodic"]
    best = tmp_path / "best"
    shutil.copytree(out / "checkpoints" / "step_4", best)
    os.remove(best / "optimizer.safetensors")
    with pytest.raises(UserError, match="holds the best weights only, without the optimizer state a resume needs"):
        ckpt._check_files(str(best), f"--resume_from_checkpoint '{best}'", None, None, None)
