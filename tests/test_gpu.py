"""--cuda_graphs on a real GPU (skipped without CUDA; `python -m pytest -q -m gpu tests/test_gpu.py`, which
bench/gpu/run.sh runs on the device machine). tests/test_capture.py checks the same programs on CPU, simulated;
here the graphs are recorded and replayed by the driver."""
from __future__ import annotations

import pytest
import torch
from test_capture import SAME_PADDING, cls, count_syncs, history, largest_difference

import train_cls
from common.training import capture
from conftest import preempted

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(autouse=True)
def real_graphs(monkeypatch):
    monkeypatch.delenv(capture.SIMULATE_ENV, raising=False)


def test_recorded_graphs_train_like_eager_steps(tiny_model, sentiment_files, tmp_path):
    extra = ["--max_steps", "12", "--eval_strategy", "steps", "--eval_steps", "4", "--logging_steps", "1"]
    eager = train_cls.main(cls(tiny_model, sentiment_files, tmp_path / "eager", *extra, *SAME_PADDING))
    graphs = train_cls.main(cls(tiny_model, sentiment_files, tmp_path / "graphs", *extra, "--cuda_graphs", "on"))
    stats = graphs["setup"]["cuda_graphs"]
    assert stats["used"] and stats["reason"] == "" and stats["replayed_steps"] >= 6, stats
    assert stats["eval_graphs"] >= 1 and stats["replayed_eval_batches"] >= 1, stats
    for key in ("loss", "grad_norm"):
        assert history(tmp_path / "graphs", key) == pytest.approx(history(tmp_path / "eager", key), rel=1e-4), key
    assert largest_difference(tmp_path / "eager", tmp_path / "graphs") < 1e-5
    assert graphs["eval"]["loss"] == pytest.approx(eager["eval"]["loss"], abs=1e-4)


def test_auto_measures_and_keeps_graphs_for_a_launch_bound_model(tiny_model, sentiment_files, tmp_path):
    res = train_cls.main(cls(tiny_model, sentiment_files, tmp_path / "auto", "--max_steps", "40",
                             "--group_by_length", "false", "--mixed_precision", "auto"))
    stats = res["setup"]["cuda_graphs"]
    assert (res["setup"]["mixed_precision"], res["setup"]["precision_reason"]) == ("bf16", "auto: CUDA, captured steps")
    assert stats["calibration"]["kept"] is True, stats
    assert stats["calibration"]["replayed_step_ms"] < stats["calibration"]["eager_step_ms"]


def test_no_host_synchronisation_per_recorded_step(tiny_model, sentiment_files, tmp_path, monkeypatch):
    once = ["--logging_steps", "100", "--eval_strategy", "no", "--cuda_graphs", "on", "--max_steps"]
    short = count_syncs(monkeypatch, cls(tiny_model, sentiment_files, tmp_path / "a", *once, "6"))
    long = count_syncs(monkeypatch, cls(tiny_model, sentiment_files, tmp_path / "b", *once, "14"))
    assert short == long, (short, long)


def test_recorded_run_resumes_exactly(tiny_model, sentiment_files, tmp_path, monkeypatch):
    common = ["--max_steps", "8", "--checkpointing_steps", "3", "--eval_strategy", "no", "--cuda_graphs", "on"]
    train_cls.main(cls(tiny_model, sentiment_files, tmp_path / "full", *common))
    part = tmp_path / "part"
    preempted(monkeypatch, 5, train_cls.main, cls(tiny_model, sentiment_files, part, *common, "--logging_steps", "1"))
    train_cls.main(cls(tiny_model, sentiment_files, part, *common, "--resume_from_checkpoint", "latest"))
    assert largest_difference(tmp_path / "full", part) == 0.0
