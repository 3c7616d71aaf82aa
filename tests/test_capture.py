"""Captured steps (--cuda_graphs, common/training/capture.py) without a GPU: BERT_FINETUNE_CAPTURE=simulate runs the
very programs a GPU records and replays, "recording" meaning "keeping the function". What a CPU can check: the
same training as eager steps (1 and 2 processes, accumulation, token tasks), bucketed shapes, no host
synchronisation per step, the fallbacks and their reasons, auto's rule, the precision rule and exact resume.
tests/test_gpu.py checks the recording itself where a GPU is present."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import free_port, launch
from test_ner import toy_ner_sentence, write_conll

import train_cls
import train_ner
from common.data.collate import PadCollator, bucket_of, graph_buckets
from common.errors import UserError
from common.training import capture, loop
from conftest import FAST, ROOT, preempted

SAME_PADDING = ["--pad_to_multiple_of", "32", "--cuda_graphs", "off"]  # eager steps padded like the buckets here


@pytest.fixture()
def simulate(monkeypatch):
    monkeypatch.setenv(capture.SIMULATE_ENV, "simulate")
    return monkeypatch


def cls(model, files, out, *extra):
    return ["--model", model, "--train_file", files["train"], "--validation_file", files["dev"], *FAST,
            "--output_dir", str(out), *extra]


def history(out, key):
    with open(out / "log_history.jsonl") as fh:
        return [r[key] for r in map(json.loads, fh) if key in r]


def largest_difference(a_dir, b_dir) -> float:
    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def eager_then_simulated(monkeypatch, main, argv_for, tmp_path, extra):
    """(eager results, simulated results): the same run with eager steps padded like the buckets, then captured
    (`extra` says --cuda_graphs on: auto could measure simulated replays as no faster and stop recording)."""
    monkeypatch.delenv(capture.SIMULATE_ENV, raising=False)
    eager = main(argv_for(tmp_path / "eager", *extra, *SAME_PADDING))
    monkeypatch.setenv(capture.SIMULATE_ENV, "simulate")
    sim = main(argv_for(tmp_path / "sim", *extra))
    return eager, sim


def check_same_training(tmp_path, eager, sim, steps):
    graphs = sim["setup"]["cuda_graphs"]
    assert eager["setup"]["cuda_graphs"] | {"buckets": []} == {
        "mode": "off", "used": False, "reason": "--cuda_graphs off", "buckets": [], "train_graphs": 0,
        "eval_graphs": 0, "replayed_steps": 0, "eager_steps": 0, "replayed_eval_batches": 0, "eager_eval_batches": 0,
        "capture_seconds": 0.0, "calibration": None}
    assert graphs["used"] and graphs["train_graphs"] >= 1 and graphs["replayed_steps"] >= 1, graphs
    assert graphs["replayed_steps"] + graphs["eager_steps"] == steps and graphs["reason"] == ""
    # The gradients are the eager loop's: the logged losses and gradient norms (before clipping) agree. The weights
    # agree but for the fused AdamW rounding a tensor learning rate to float32 (eager passes a double): ~1e-9.
    for key in ("loss", "grad_norm"):
        assert history(tmp_path / "sim", key) == pytest.approx(history(tmp_path / "eager", key), rel=1e-5), key
    assert largest_difference(tmp_path / "eager", tmp_path / "sim") < 1e-6
    assert sim["eval"]["loss"] == pytest.approx(eager["eval"]["loss"], abs=1e-5)


def test_captured_classification_trains_like_eager_steps(tiny_model, sentiment_files, tmp_path, monkeypatch):
    """Also: evaluation batches replayed from their second occurrence, and the step's first run eager (warm-up)."""
    eager, sim = eager_then_simulated(monkeypatch, train_cls.main, lambda out, *e: cls(tiny_model, sentiment_files,
                                                                                        out, *e), tmp_path,
                                      ["--max_steps", "9", "--eval_strategy", "steps", "--eval_steps", "3",
                                       "--logging_steps", "1", "--cuda_graphs", "on"])
    check_same_training(tmp_path, eager, sim, 9)
    graphs = sim["setup"]["cuda_graphs"]
    assert graphs["mode"] == "on" and graphs["eval_graphs"] >= 1 and graphs["replayed_eval_batches"] >= 1, graphs
    assert graphs["buckets"] == graph_buckets() and sim["timing"]["capture_seconds"] >= 0
    assert eager["eval"]["accuracy"] == sim["eval"]["accuracy"]


def test_captured_ner_with_accumulation_trains_like_eager_steps(tiny_model, tmp_path, monkeypatch):
    """A token task (the fixed per-step denominator of length-grouped batches) with 2 micro-batches per step."""
    rng = random.Random(3)
    train = write_conll(tmp_path / "train.txt", [toy_ner_sentence(rng) for _ in range(160)])
    dev = write_conll(tmp_path / "dev.txt", [toy_ner_sentence(rng) for _ in range(30)])

    def argv(out, *extra):
        return ["--model", tiny_model, "--train_file", train, "--validation_file", dev, *FAST, "--output_dir",
                str(out), "--gradient_accumulation_steps", "2", "--per_device_train_batch_size", "8",
                "--logging_steps", "1", "--learning_rate", "1e-3", *extra]

    eager, sim = eager_then_simulated(monkeypatch, train_ner.main, argv, tmp_path, ["--cuda_graphs", "on"])
    check_same_training(tmp_path, eager, sim, 10)
    assert sim["setup"]["loss_items_per_step"] and eager["eval"]["f1"] == pytest.approx(sim["eval"]["f1"], abs=0.02)


def test_two_processes_captured_train_like_eager_steps(tiny_model, sentiment_files, tmp_path):
    """2 gloo ranks: the gradients all-reduced as one flat buffer between the programs (no DDP hooks) give the
    weights DDP's eager steps give."""
    def run(out, *extra, env=None):
        cmd = launch("--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port()),
                     os.path.join(ROOT, "train_cls.py"), *cls(tiny_model, sentiment_files, out, "--max_steps", "6",
                                                              "--logging_steps", "1", "--eval_strategy", "no",
                                                              *extra))
        full = dict(os.environ, ACCELERATE_USE_CPU="1", **(env or {}))
        proc = subprocess.run(cmd, cwd=ROOT, env=full, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads((out / "results.json").read_text())

    run(tmp_path / "eager", *SAME_PADDING)
    sim = run(tmp_path / "sim", "--cuda_graphs", "on", env={capture.SIMULATE_ENV: "simulate"})
    assert sim["setup"]["num_processes"] == 2 and sim["setup"]["cuda_graphs"]["replayed_steps"] >= 1
    for key in ("loss", "grad_norm"):
        assert history(tmp_path / "sim", key) == pytest.approx(history(tmp_path / "eager", key), rel=1e-5), key
    assert largest_difference(tmp_path / "eager", tmp_path / "sim") < 1e-6


def test_captured_run_resumes_exactly(tiny_model, sentiment_files, tmp_path, simulate):
    """SIGTERM at step 5, resumed from the step-3 checkpoint (its learning rates saved as numbers, made device
    tensors again): the weights of the uninterrupted captured run, bit for bit."""
    common = ["--max_steps", "8", "--checkpointing_steps", "3", "--eval_strategy", "no", "--cuda_graphs", "on"]
    full = train_cls.main(cls(tiny_model, sentiment_files, tmp_path / "full", *common))
    part = tmp_path / "part"
    preempted(simulate, 5, train_cls.main, cls(tiny_model, sentiment_files, part, *common, "--logging_steps", "1"))
    resumed = train_cls.main(cls(tiny_model, sentiment_files, part, *common, "--resume_from_checkpoint", "latest"))
    assert largest_difference(tmp_path / "full", part) == 0.0
    assert resumed["eval"] == full["eval"] and resumed["setup"]["cuda_graphs"]["replayed_steps"] >= 1


def count_syncs(monkeypatch, argv) -> int:
    """Host synchronisations (as a GPU would see them) inside Trainer.train."""
    seen = []
    original = loop.Trainer.train

    def counted(self, resume_from=None):
        _, found = capture.find_syncs(lambda: original(self, resume_from))
        seen.append(found)

    monkeypatch.setattr(loop.Trainer, "train", counted)
    train_cls.main(argv)
    monkeypatch.setattr(loop.Trainer, "train", original)
    return len(seen[0])


def test_no_host_synchronisation_per_captured_step(tiny_model, sentiment_files, tmp_path, simulate):
    """6 steps or 14: the same number of host reads (the log line, the finite check at the end, the first eager
    runs), so none per step. Eager steps on CPU read the finite flag every step: the count grows there."""
    once = ["--logging_steps", "100", "--eval_strategy", "no", "--cuda_graphs", "on", "--max_steps"]
    short = count_syncs(simulate, cls(tiny_model, sentiment_files, tmp_path / "a", *once, "6"))
    long = count_syncs(simulate, cls(tiny_model, sentiment_files, tmp_path / "b", *once, "14"))
    assert short == long, (short, long)
    simulate.delenv(capture.SIMULATE_ENV)
    eager = ["--logging_steps", "100", "--eval_strategy", "no", "--cuda_graphs", "off", "--max_steps"]
    assert (count_syncs(simulate, cls(tiny_model, sentiment_files, tmp_path / "c", *eager, "14"))
            > count_syncs(simulate, cls(tiny_model, sentiment_files, tmp_path / "d", *eager, "6")))


def test_an_objective_that_reads_the_device_trains_eagerly_and_says_why(tiny_model, sentiment_files, tmp_path,
                                                                        simulate, capfd):
    objective = train_cls.ClassificationObjective
    original = objective.loss_from_logits

    def reads_the_device(self, logits, batch):
        loss = original(self, logits, batch)
        if float(loss.detach()) < 0:  # a host read: cannot be recorded
            raise AssertionError
        return loss

    simulate.setattr(objective, "loss_from_logits", reads_the_device)
    res = train_cls.main(cls(tiny_model, sentiment_files, tmp_path / "out", "--max_steps", "6"))
    graphs = res["setup"]["cuda_graphs"]
    assert graphs["eager_steps"] == 6 and graphs["train_graphs"] == graphs["replayed_steps"] == 0
    assert "training micro-batch reads the device on the host (_local_scalar_dense in" in graphs["reason"]
    assert "test_capture.py" in graphs["reason"]  # where the read is
    assert "so training runs without CUDA graphs" in capfd.readouterr().err


@pytest.mark.parametrize("flags, reason", [
    (["--skip_nonfinite"], "--skip_nonfinite decides on the host"),
    (["--optim", "adamw_torch_foreach"], "graphs need the fused AdamW"),
    (["--cuda_graphs", "off"], "--cuda_graphs off")])
def test_settings_a_graph_cannot_hold_run_eagerly_with_the_reason(tiny_model, sentiment_files, tmp_path, simulate,
                                                                  flags, reason):
    res = train_cls.main(cls(tiny_model, sentiment_files, tmp_path / "out", "--max_steps", "2", *flags))
    assert reason in res["setup"]["cuda_graphs"]["reason"] and not res["setup"]["cuda_graphs"]["used"]
    assert res["setup"]["pad_to_multiple_of"] is None or "--cuda_graphs" not in flags  # no buckets: eager padding


def test_cuda_graphs_on_without_a_gpu_is_refused(tiny_model, sentiment_files, tmp_path, monkeypatch):
    monkeypatch.delenv(capture.SIMULATE_ENV, raising=False)
    with pytest.raises(UserError, match="--cuda_graphs on needs a CUDA GPU, and this process runs on cpu"):
        train_cls.main(cls(tiny_model, sentiment_files, tmp_path / "out", "--cuda_graphs", "on"))
    assert not (tmp_path / "out").exists()
    res = train_cls.main(cls(tiny_model, sentiment_files, tmp_path / "auto", "--max_steps", "2"))
    assert res["setup"]["cuda_graphs"]["reason"] == "the run is on cpu: CUDA graphs need a CUDA GPU"


def test_auto_keeps_graphs_only_where_measured_to_pay():
    assert capture.keep_graphs(eager_ms=25, replay_ms=3, capture_s=0.2, steps_left=300, shapes_left=3)
    assert not capture.keep_graphs(eager_ms=25, replay_ms=24.5, capture_s=0.0, steps_left=10**6, shapes_left=0)
    # saves 22 ms a step, but 20 steps cannot pay for 5 graphs of 0.2 s
    assert not capture.keep_graphs(eager_ms=25, replay_ms=3, capture_s=0.2, steps_left=20, shapes_left=5)


def test_auto_turns_graphs_off_mid_run_when_they_do_not_pay(tiny_model, sentiment_files, tmp_path, simulate):
    """The decision comes after one eager window and three replayed ones are timed; the rest of the run is eager
    (the same programs, not recorded) and trains on."""
    calls = []

    def never(*args, **kwargs):
        calls.append(kwargs or args)
        return False

    simulate.setattr(capture, "keep_graphs", never)
    res = train_cls.main(cls(tiny_model, sentiment_files, tmp_path / "out", "--max_steps", "14",
                             "--per_device_train_batch_size", "8", "--group_by_length", "false"))
    graphs = res["setup"]["cuda_graphs"]
    assert len(calls) == 1 and graphs["calibration"]["kept"] is False
    assert graphs["reason"].startswith("auto measured a replayed step at")
    assert graphs["replayed_steps"] >= 3 and graphs["replayed_steps"] + graphs["eager_steps"] == 14
    assert res["train"]["global_step"] == 14


def test_buckets_bound_the_number_of_shapes():
    buckets = graph_buckets()
    assert buckets == [32, 64, 96, 128, 192, 256, 320, 384, 448, 512]
    assert [bucket_of(n, buckets) for n in (1, 32, 33, 129, 512, 513, 1000)] == [32, 32, 64, 192, 512, 768, 1024]
    collate = PadCollator(0, multiple=8, buckets=buckets)
    batch = collate([{"input_ids": [5] * 40, "attention_mask": [1] * 40}, {"input_ids": [5] * 3,
                                                                            "attention_mask": [1] * 3}])
    assert batch["input_ids"].shape == (2, 64) and int(batch["attention_mask"].sum()) == 43


def test_precision_rule_on_gpus(monkeypatch):
    """auto on a GPU with native bf16: bf16 for captured steps; eager: fp32 below the launch-bound threshold."""
    from transformers import BertConfig

    from common.training import runtime

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    cuda = torch.device("cuda")
    minilm = runtime.non_embedding_parameters(BertConfig(hidden_size=384, num_hidden_layers=6, intermediate_size=1536))
    base = runtime.non_embedding_parameters(BertConfig())
    assert minilm == 10_616_832 and base == 84_934_656
    assert runtime.resolve_precision(None, cuda, captured=True) == ("bf16", "auto: CUDA, captured steps")
    assert runtime.resolve_precision(None, cuda, work=lambda: minilm * 32)[0] == "no"  # measured: bf16 1.4x slower
    assert runtime.resolve_precision(None, cuda, work=lambda: minilm * 256)[0] == "bf16"
    assert runtime.resolve_precision(None, cuda, work=lambda: base * 32)[0] == "bf16"
    assert runtime.resolve_precision("no", cuda, captured=True) == ("no", "--mixed_precision")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    assert runtime.resolve_precision(None, cuda, captured=True)[0] == "fp16"


def test_find_syncs_names_host_reads():
    x = torch.arange(6.0)
    _, found = capture.find_syncs(lambda: (x * 2).sum())
    assert found == []
    _, found = capture.find_syncs(lambda: (float(x.sum()), x[x > 2], x.nonzero(), x.to("cpu")))
    assert [f.split(" in ")[0] for f in found] == ["_local_scalar_dense", "index", "nonzero"]
    assert all(f.endswith(f"test_capture.py:{sys._getframe().f_lineno - 2}") for f in found), found


def test_a_nan_loss_in_a_captured_step_stops_the_run_at_its_step(tiny_model, sentiment_files, tmp_path, simulate):
    """The finite check lives in the step program (the first bad step kept on the device, read at the next log):
    the run stops with the step that went bad, as eager steps do. Simulated replays call the objective once per
    step, so its 5th call is step 5's loss."""
    from common.errors import Diverged

    objective = train_cls.ClassificationObjective
    original = objective.loss_from_logits
    calls = []

    def nan_at_the_fifth(self, logits, batch):
        calls.append(1)
        loss = original(self, logits, batch)
        return loss * float("nan") if len(calls) == 5 else loss

    simulate.setattr(objective, "loss_from_logits", nan_at_the_fifth)
    with pytest.raises(Diverged, match="NaN/inf at optimizer step 5;"):
        train_cls.main(cls(tiny_model, sentiment_files, tmp_path / "out", "--max_steps", "9", "--logging_steps", "3",
                           "--eval_strategy", "no", "--cuda_graphs", "on", "--group_by_length", "false"))
    assert not (tmp_path / "out" / "model.safetensors").exists()
