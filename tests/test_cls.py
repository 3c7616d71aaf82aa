"""End-to-end tests of train_cls.py on a tiny local BERT: learning, outputs, pipeline, resume, schedule."""
from __future__ import annotations

import csv
import json
import os
import random

import pytest
import torch
from safetensors.torch import load_file

import train_cls
from conftest import FAST, preempted, toy_sentence, write_csv

LEARN = ["--num_train_epochs", "8", "--learning_rate", "3e-3", "--per_device_train_batch_size", "16",
         "--logging_steps", "5", "--mixed_precision", "no"]


def run_cls(tiny_model, files, out, *extra):
    argv = ["--model", tiny_model, "--train_file", files["train"], "--validation_file", files["dev"],
            "--output_dir", str(out), *extra]
    return train_cls.main(argv)


def read_log(out):
    with open(os.path.join(out, "log_history.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def test_learns_toy_rule_and_writes_every_output(tiny_model, sentiment_files, tmp_path):
    out = tmp_path / "out"
    res = run_cls(tiny_model, sentiment_files, out, *LEARN, "--test_file", sentiment_files["test"])
    assert res["eval"]["accuracy"] >= 0.9, res["eval"]
    assert res["eval"]["num_examples"] == 61 and res["test"]["num_examples"] == 37
    for name in ("model.safetensors", "config.json", "tokenizer.json", "results.json", "training_args.yaml",
                 "log_history.jsonl", "predictions_eval.csv", "predictions_test.csv", "README.md"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoints").exists()  # the temporary best checkpoint is cleaned up
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "pos"} and config["label2id"] == {"neg": 0, "pos": 1}
    results = json.loads((out / "results.json").read_text())
    assert results["setup"]["num_processes"] == 1 and results["setup"]["distributed_type"] == "NO"
    assert results["train"]["restored_best"] is True
    # the tiny checkpoint is a BertForMaskedLM: no pooler, no classifier
    assert results["model"]["newly_initialised"] == ["bert.pooler.dense.bias", "bert.pooler.dense.weight",
                                                     "classifier.bias", "classifier.weight"]
    with open(out / "predictions_eval.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["row_id"]) for r in rows] == list(range(61))
    assert set(rows[0]) == {"row_id", "sentence", "gold", "predicted", "prob_neg", "prob_pos"}
    assert abs(float(rows[0]["prob_neg"]) + float(rows[0]["prob_pos"]) - 1) < 1e-4
    records = read_log(out)
    train_records = [r for r in records if "loss" in r]
    assert {"loss", "learning_rate", "grad_norm", "samples_per_second", "tokens_per_second"} <= set(train_records[0])
    assert any("eval_accuracy" in r for r in records)

    from transformers import pipeline

    pipe = pipeline("text-classification", model=str(out))
    assert pipe("the movie was good and nice")[0]["label"] == "pos"
    assert pipe("the film was awful and bad")[0]["label"] == "neg"


def test_sentence_pairs_from_glue_style_tsv(tiny_model, tmp_path):
    """GLUE TSVs hold bare quotes inside text; MRPC's layout is recognised without column flags."""
    rng = random.Random(1)
    files = {}
    for split, n in (("train", 160), ("dev", 30)):
        lines = ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
        for i in range(n):
            y = rng.randint(0, 1)
            a = toy_sentence(rng, 1)
            b = a if y else toy_sentence(rng, 0)
            lines.append(f'{y}\t{i}\t{i + 1000}\the said "{a}\t{b} "quoted')
        files[split] = str(tmp_path / f"{split}.tsv")
        with open(files[split], "w", encoding="utf-8-sig") as fh:  # the real files start with a BOM
            fh.write("\n".join(lines) + "\n")
    out = tmp_path / "out"
    res = run_cls(tiny_model, files, out, *FAST, "--num_train_epochs", "1")
    assert res["eval"]["num_examples"] == 30
    assert res["data"]["text_columns"] == ["#1 String"] and res["data"]["text_pair_column"] == "#2 String"
    with open(out / "predictions_eval.csv", encoding="utf-8") as fh:
        row = next(csv.DictReader(fh))
    assert row["#1 String"].startswith('he said "')
    from transformers import pipeline

    pipe = pipeline("text-classification", model=str(out))
    pred = pipe({"text": "the movie was good", "text_pair": "the movie was good"})
    assert pred["label"] in ("0", "1") if isinstance(pred, dict) else pred[0]["label"] in ("0", "1")


def test_joined_text_columns_and_hidden_test_labels(tiny_model, tmp_path):
    rng = random.Random(2)
    rows = []
    for i in range(120):
        y = rng.randint(0, 1)
        rows.append((i, "title " + toy_sentence(rng, y, 3), toy_sentence(rng, y), y))
    train = write_csv(tmp_path / "train.csv", ["id", "title", "text", "label"], rows)
    test = write_csv(tmp_path / "test.csv", ["id", "title", "text", "label"],
                     [(i, "title a", "b c", -1) for i in range(9)])
    out = tmp_path / "out"
    res = train_cls.main(["--model", tiny_model, "--train_file", train, "--test_file", test, "--text_columns", "title",
                          "text", "--output_dir", str(out), *FAST])
    assert res["data"]["derived_splits"] == ["validation"] and res["data"]["sizes"]["validation"] == 12
    assert res["test"] == {"num_examples": 9}  # unlabelled test: predictions only
    with open(out / "predictions_test.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 9 and rows[0]["gold"] == ""


def test_regression_from_float_labels(tiny_model, tmp_path):
    rng = random.Random(3)
    rows = [(toy_sentence(rng, y), f"{y * 4 + rng.random():.3f}") for y in (rng.randint(0, 1) for _ in range(100))]
    train = write_csv(tmp_path / "train.csv", ["sentence", "score"], rows)
    out = tmp_path / "out"
    res = train_cls.main(["--model", tiny_model, "--train_file", train, "--label_column", "score",
                          "--output_dir", str(out), *FAST, "--num_train_epochs", "4", "--learning_rate", "3e-3"])
    assert res["data"]["problem_type"] == "regression"
    assert {"mse", "pearson", "spearman"} <= set(res["eval"])
    assert json.loads((out / "config.json").read_text())["problem_type"] == "regression"


def test_preempt_mid_epoch_then_resume_gives_identical_weights(tiny_model, sentiment_files, tmp_path, monkeypatch):
    """SIGTERM at step 20 (mid-epoch 2) saves a checkpoint and exits 75; resuming ends equal to an
    uninterrupted run: same weights (the restored best ones), same metrics, each step logged once."""


    common = [*LEARN, "--num_train_epochs", "2", "--checkpointing_steps", "6", "--eval_steps", "7"]
    full = tmp_path / "full"
    ref = run_cls(tiny_model, sentiment_files, full, *common)
    part = tmp_path / "part"
    preempted(monkeypatch, 20, lambda argv: run_cls(tiny_model, sentiment_files, part, *argv), common)
    state = json.loads((part / "checkpoints" / "step_20" / "trainer_state.json").read_text())
    assert state["kind"] == "preempted" and state["epoch"] == 1 and state["batches_in_epoch"] == 5
    assert not (part / "results.json").exists()
    res = run_cls(tiny_model, sentiment_files, part, *common, "--resume_from_checkpoint", "latest")
    a, b = load_file(full / "model.safetensors"), load_file(part / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert res["eval"] == ref["eval"]
    assert res["train"]["best_step"] == ref["train"]["best_step"]
    timing = res["timing"]  # this session's time apart from the training of all sessions (issue 23)
    assert timing["resumed_at_step"] == 20 and timing["session_train_seconds"] < timing["train_seconds"]
    steps = [r["step"] for r in read_log(part) if "loss" in r]
    assert steps == sorted(set(steps)) == [r["step"] for r in read_log(full) if "loss" in r]


def test_schedule_is_counted_in_optimizer_steps_for_any_accumulation(tiny_model, sentiment_files, tmp_path):
    """Batch 16 x accumulation 1 and batch 4 x accumulation 4 see the same LR curve, ending at 0 after warmup."""
    curves = []
    for bs, acc in ((16, 1), (4, 4)):
        out = tmp_path / f"bs{bs}"
        res = run_cls(tiny_model, sentiment_files, out, *FAST, "--num_train_epochs", "2", "--logging_steps", "1",
                      "--per_device_train_batch_size", str(bs), "--gradient_accumulation_steps", str(acc),
                      "--warmup_ratio", "0.2", "--eval_strategy", "no", "--group_by_length", "false")
        assert res["train"]["global_step"] == 30
        curves.append([r["learning_rate"] for r in read_log(out) if "learning_rate" in r])
    assert curves[0] == pytest.approx(curves[1])
    lr = curves[0]
    assert len(lr) == 30 and lr[-1] == 0.0
    assert max(lr) == pytest.approx(5e-5) and lr.index(max(lr)) == 5  # warm-up: ceil(0.2 * 30) = 6 steps


def test_accumulation_matches_one_big_batch(tiny_model, sentiment_files, tmp_path):
    """4 micro-batches of 4 give the same update as one batch of 16 (dropout off, no length grouping)."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    model = AutoModelForMaskedLM.from_pretrained(tiny_model, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    no_dropout = tmp_path / "no-dropout"
    model.save_pretrained(no_dropout)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(no_dropout)
    config = tmp_path / "cfg.yaml"  # settings from a --config file; flags given on the command line win
    config.write_text("weight_decay: 0.0\nlearning_rate: 1.0e-3\nseed: 7\nmax_steps: 99\n")
    weights = []
    for bs, acc in ((16, 1), (4, 4)):
        out = tmp_path / f"w{bs}"
        run_cls(str(no_dropout), sentiment_files, out, *FAST, "--max_steps", "3", "--per_device_train_batch_size",
                str(bs), "--gradient_accumulation_steps", str(acc), "--eval_strategy", "no", "--group_by_length",
                "false", "--config", str(config))
        weights.append(load_file(out / "model.safetensors"))
        assert json.loads((out / "results.json").read_text())["train"]["global_step"] == 3
    initial = load_file(no_dropout / "model.safetensors")
    for k in weights[0]:
        torch.testing.assert_close(weights[0][k], weights[1][k], rtol=1e-4, atol=1e-6, msg=k)
    assert not torch.equal(weights[0]["bert.embeddings.word_embeddings.weight"],
                           initial["bert.embeddings.word_embeddings.weight"])  # the runs did train


def test_same_seed_same_result(tiny_model, sentiment_files, tmp_path):
    a = run_cls(tiny_model, sentiment_files, tmp_path / "a", *FAST)
    b = run_cls(tiny_model, sentiment_files, tmp_path / "b", *FAST)
    assert a["eval"] == b["eval"]
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_early_stopping_restores_best(tiny_model, sentiment_files, tmp_path):
    res = run_cls(tiny_model, sentiment_files, tmp_path / "es", *LEARN, "--num_train_epochs", "30",
                  "--eval_steps", "5", "--early_stopping_patience", "2", "--metric_for_best_model", "loss")
    assert res["train"]["global_step"] < res["train"]["total_steps"]
    assert res["train"]["best_metric"] == pytest.approx(res["eval"]["loss"], rel=1e-5)


def test_second_identical_run_skips_tokenization(tiny_model, sentiment_files, tmp_path):
    first = run_cls(tiny_model, sentiment_files, tmp_path / "a", *FAST, "--max_length", "33", "--overwrite_cache")
    second = run_cls(tiny_model, sentiment_files, tmp_path / "b", *FAST, "--max_length", "33")
    assert first["data"]["tokenization_cached"] == {"train": False, "validation": False}
    assert second["data"]["tokenization_cached"] == {"train": True, "validation": True}
    assert first["eval"] == second["eval"]


def test_refuses_non_empty_output_dir(tiny_model, sentiment_files, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(train_cls.UserError, match="not empty"):
        run_cls(tiny_model, sentiment_files, out, *FAST)
    assert (out / "keep.txt").read_text() == "precious"


def test_speed_settings_are_recorded_and_timings_exclude_evaluation(tiny_model, sentiment_files, tmp_path):
    """--optim / --attn_implementation reach the optimizer and the model; train speeds exclude the
    evaluations and checkpoints made inside the loop, which are timed on their own."""
    out = tmp_path / "out"
    res = run_cls(tiny_model, sentiment_files, out, *FAST, "--optim", "adamw_torch", "--attn_implementation",
                  "eager", "--eval_steps", "3", "--checkpointing_steps", "4")
    setup, timing, train = res["setup"], res["timing"], res["train"]
    assert setup["optimizer"] == "adamw_torch" and setup["attn_implementation"] == "eager"
    assert timing["eval_during_training_seconds"] > 0 and timing["checkpoint_seconds"] > 0
    assert abs(timing["train_steps_seconds"] + timing["eval_during_training_seconds"] + timing["checkpoint_seconds"]
               - timing["train_seconds"]) < 1e-6
    assert 0 < timing["first_step_seconds"] < timing["train_seconds"]
    assert train["train_samples_per_second"] == pytest.approx(
        train["train_samples_seen"] / timing["train_steps_seconds"])
    default = run_cls(tiny_model, sentiment_files, tmp_path / "default", *FAST)
    assert default["setup"]["optimizer"] == "adamw_torch_fused"  # auto on CPU: fused (4.5x faster step than foreach)
    assert default["setup"]["attn_implementation"] == "sdpa"


def test_sdpa_and_eager_attention_agree(tiny_model):
    from transformers import AutoModelForSequenceClassification

    from common.config import ModelArguments
    from common.training.models import load_pretrained

    torch.manual_seed(0)
    ids = torch.randint(5, 60, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    logits = []
    for impl in ("sdpa", "eager"):
        torch.manual_seed(1)
        model = load_pretrained(AutoModelForSequenceClassification, ModelArguments(model=tiny_model,
                                                                                   attn_implementation=impl)).model
        assert model.config._attn_implementation == impl
        with torch.no_grad():
            logits.append(model.eval()(input_ids=ids, attention_mask=mask).logits)
    assert torch.allclose(logits[0], logits[1], atol=1e-5)
