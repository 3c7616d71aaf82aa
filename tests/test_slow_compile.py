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
