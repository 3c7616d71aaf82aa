"""--torch_compile (slow: the first inductor compile takes a minute on these CPUs; `python -m pytest -q -m slow`).
Batches padded to multiples of 32 keep the number of compiled graphs small however many lengths occur."""
from __future__ import annotations

import pytest

from conftest import FAST


@pytest.mark.slow
def test_torch_compile_trains_with_a_bounded_number_of_graphs(tiny_model, sentiment_files, tmp_path):
    import train_cls

    res = train_cls.main(["--model", tiny_model, "--train_file", sentiment_files["train"], "--validation_file",
                          sentiment_files["dev"], *FAST, "--torch_compile", "--output_dir", str(tmp_path / "out")])
    timing, setup = res["timing"], res["setup"]
    assert setup["torch_compile"] is True and setup["fast_dropout"] is False  # inductor's own RNG instead
    assert res["train"]["global_step"] == 15 and res["eval"]["num_examples"] == 61
    # 15 steps over batches of several padded lengths (and a short last batch): recompiled at most a few times
    assert 1 <= timing["compiled_graphs"] <= 4, timing["compiled_graphs"]
    assert timing["first_step_seconds"] > timing["train_steps_seconds"] / 15  # the first step carries the compile


@pytest.mark.slow
def test_compiling_is_paid_once_per_job_and_once_per_machine(tiny_model, sentiment_files, tmp_path, monkeypatch):
    """--seeds 2 --torch_compile: the second run of the job reuses the compiled code in memory (a new model of the
    same shapes passes dynamo's guards): no compile at all. A later command finds the graphs in PyTorch's on-disk
    caches (inductor's FX graph cache, AOTAutograd's). results.json reports each run's share. A fresh cache folder,
    so the first run misses."""
    import json

    import train_cls
    from conftest import run_script

    cache = str(tmp_path / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", cache)
    argv = ["--model", tiny_model, "--train_file", sentiment_files["train"], "--validation_file",
            sentiment_files["dev"], *FAST, "--torch_compile", "--max_steps", "3"]
    out = tmp_path / "seeds"
    train_cls.main([*argv, "--seeds", "1", "2", "--output_dir", str(out)])
    first, second = (json.loads((out / f"seed_{s}" / "results.json").read_text()) for s in (1, 2))
    assert first["setup"]["compile_cache"]["fx_graph_cache_misses"] >= 1
    assert first["setup"]["compile_cache"]["cache_dir"] == cache and first["timing"]["compile_seconds"] > 5
    assert second["timing"]["compile_seconds"] < 1 and second["timing"]["compiled_graphs"] == 0
    proc = run_script("train_cls.py", [*argv, "--output_dir", str(tmp_path / "later")],
                      env={"TORCHINDUCTOR_CACHE_DIR": cache})
    assert proc.returncode == 0, proc.stderr[-3000:]
    later = json.loads((tmp_path / "later" / "results.json").read_text())
    assert later["setup"]["compile_cache"]["fx_graph_cache_hits"] >= 1
    assert later["setup"]["compile_cache"]["fx_graph_cache_misses"] == 0
    assert later["timing"]["compile_seconds"] < first["timing"]["compile_seconds"] / 2
    print("compile seconds: first run", first["timing"]["compile_seconds"], "second run of the job",
          second["timing"]["compile_seconds"], "later command", later["timing"]["compile_seconds"])
