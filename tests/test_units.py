"""Unit tests of the engine's building blocks, and the remaining input formats end to end."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch

import train_cls
from common.config import TrainArguments
from common.data import loading
from common.data.collate import LengthGroupedSampler, PadCollator, SeededRandomSampler
from common.training.build import build_optimizer
from conftest import FAST, ROOT, toy_sentence


def test_pad_collator_dynamic_multiple_and_fixed():
    feats = [{"input_ids": [2, 5, 3], "attention_mask": [1, 1, 1], "labels": 1, "row_id": 0},
             {"input_ids": [2, 5, 6, 7, 3], "attention_mask": [1] * 5, "labels": 0, "row_id": 1}]
    batch = PadCollator(pad_token_id=0)(feats)
    assert batch["input_ids"].tolist() == [[2, 5, 3, 0, 0], [2, 5, 6, 7, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert batch["labels"].tolist() == [1, 0] and batch["row_id"].tolist() == [0, 1]
    assert PadCollator(0, multiple=8)(feats)["input_ids"].shape == (2, 8)
    assert PadCollator(0, fixed_length=16)(feats)["input_ids"].shape == (2, 16)  # XLA: static shapes
    tokens = [{"input_ids": [2, 3], "labels": [-100, 4]}, {"input_ids": [2, 9, 3], "labels": [-100, 1, -100]}]
    assert PadCollator(0)(tokens)["labels"].tolist() == [[-100, 4, -100], [-100, 1, -100]]


def test_length_grouped_sampler_is_a_seeded_permutation_of_similar_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 120, size=1000)
    s = LengthGroupedSampler(lengths, batch_size=16, seed=3, group=8)
    first = list(s)
    assert sorted(first) == list(range(1000))
    assert list(s) == first  # same seed and epoch: same order (every process agrees)
    s.set_epoch(1)
    assert list(s) != first
    batches = [lengths[first[i:i + 16]] for i in range(0, 992, 16)]
    grouped_pad = np.mean([b.max() - b.mean() for b in batches])
    shuffled = rng.permutation(1000)
    random_pad = np.mean([lengths[shuffled[i:i + 16]].max() - lengths[shuffled[i:i + 16]].mean()
                          for i in range(0, 992, 16)])
    assert grouped_pad < random_pad / 4
    plain = SeededRandomSampler(50, seed=3)
    assert sorted(plain) == list(range(50)) and list(plain) == list(plain)


def test_no_weight_decay_on_biases_and_layernorm(tiny_model):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    opt, _ = build_optimizer(model, TrainArguments(weight_decay=0.1), torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = ([names[id(p)] for p in g["params"]] for g in opt.param_groups)
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    assert all(n.endswith(".bias") or "LayerNorm" in n for n in no_decay)
    assert not any(n.endswith(".bias") or "LayerNorm" in n for n in decay)
    assert len(decay) + len(no_decay) == len(names)


def test_stratified_split_is_seeded_and_keeps_proportions():
    labels = [0] * 70 + [1] * 20 + [2] * 10
    keep, take = loading.split_indices(100, 0.2, seed=5, stratify=labels)
    assert len(take) == 20 and sorted(np.concatenate([keep, take]).tolist()) == list(range(100))
    assert Counter(labels[i] for i in take) == {0: 14, 1: 4, 2: 2}
    again, _ = loading.split_indices(100, 0.2, seed=5, stratify=labels)
    assert keep.tolist() == again.tolist()
    assert loading.split_indices(100, 0.2, seed=6, stratify=labels)[1].tolist() != take.tolist()


@pytest.mark.parametrize("fmt", ["json", "jsonl", "parquet"])
def test_json_jsonl_parquet_inputs(fmt, tiny_model, tmp_path):
    rng = random.Random(4)
    df = pd.DataFrame([{"text": toy_sentence(rng, y), "label": ["neg", "pos"][y]} for y in [0, 1] * 30])
    path = tmp_path / f"train.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(df.to_dict("records")))
    elif fmt == "jsonl":
        df.to_json(path, orient="records", lines=True)
    else:
        df.to_parquet(path)
    res = train_cls.main(["--model", tiny_model, "--train_file", str(path), "--output_dir", str(tmp_path / "o"), *FAST])
    assert res["data"]["labels"] == ["neg", "pos"] and res["eval"]["num_examples"] == 6


def test_checkpoint_rotation_keeps_the_newest(tiny_model, sentiment_files, tmp_path):
    out = tmp_path / "o"
    train_cls.main(["--model", tiny_model, "--train_file", sentiment_files["train"], "--validation_file",
                    sentiment_files["dev"], "--output_dir", str(out), *FAST, "--checkpointing_steps", "3",
                    "--save_total_limit", "2"])
    assert sorted(os.listdir(out / "checkpoints")) == ["step_12", "step_15"]
    state = json.loads((out / "checkpoints" / "step_15" / "trainer_state.json").read_text())
    assert state["scheduler"]["last_epoch"] == 15  # the schedule's position, as JSON
    assert not any(name.startswith("custom_checkpoint") for name in os.listdir(out / "checkpoints" / "step_15"))


def test_bf16_autocast_runs_on_cpu(tiny_model, sentiment_files, tmp_path):
    res = train_cls.main(["--model", tiny_model, "--train_file", sentiment_files["train"], "--validation_file",
                          sentiment_files["dev"], "--output_dir", str(tmp_path / "o"), "--max_steps", "3",
                          "--mixed_precision", "bf16", "--logging_steps", "1"])
    assert res["setup"]["mixed_precision"] == "bf16"
    assert res["train"]["train_padded_tokens"] % 8 == 0  # padded to multiples of 8 under mixed precision
    assert res["eval"]["num_examples"] == 61


def test_importing_the_scripts_does_not_initialise_cuda():
    """notebook_launcher needs a CUDA-free parent process. A fresh interpreter: earlier tests in this one
    may have trained on a GPU."""
    code = ("import torch, train_cls, train_ner, train_mlm, common.runs.launch; "
            "print(torch.cuda.is_initialized())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize("script", ["train_cls", "train_ner", "train_mlm"])
def test_help_lists_every_setting(script, capsys):
    """--help must render (argparse formats help texts with %, so a bare % in one breaks it)."""
    import importlib

    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as stop:
        module.main(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--learning_rate", "--train_file", "--validation_split", "--optim", "--[no_]fast_dropout", "--seeds"):
        assert flag in text, flag


@pytest.mark.filterwarnings("ignore:A single label was found")  # scikit-learn's, on a one-class draw
@pytest.mark.parametrize("num_labels", [2, 3, 5])
def test_classification_metrics_equal_scikit_learns(num_labels):
    """The NumPy metrics give scikit-learn's numbers, unseen gold labels and absent classes included."""
    from sklearn.metrics import accuracy_score, confusion_matrix, matthews_corrcoef, precision_recall_fscore_support

    from common.training.metrics import classification_metrics

    rng = np.random.default_rng(num_labels)
    for trial in range(20):
        n = int(rng.integers(1, 60))
        labels = rng.integers(0, num_labels + (trial % 3 == 0), n)  # sometimes a label the model cannot predict
        preds = rng.integers(0, max(1, num_labels - (trial % 4 == 1)), n)  # sometimes a class never predicted
        got = classification_metrics(labels, preds, num_labels)
        ids = list(range(num_labels))
        want = {"accuracy": accuracy_score(labels, preds), "mcc": matthews_corrcoef(labels, preds),
                "confusion_matrix": confusion_matrix(labels, preds, labels=ids).tolist()}
        for avg in ("macro", "weighted"):
            p, r, f, _ = precision_recall_fscore_support(labels, preds, labels=ids, average=avg, zero_division=0)
            want |= {f"precision_{avg}": p, f"recall_{avg}": r, f"f1_{avg}": f}
        if num_labels == 2:
            p, r, f, _ = precision_recall_fscore_support(labels, preds, labels=[1], average="micro", zero_division=0)
            want |= {"precision": p, "recall": r, "f1": f}
        for key, value in want.items():
            assert got[key] == (value if key == "confusion_matrix" else pytest.approx(value, abs=1e-12)), (key, trial)
