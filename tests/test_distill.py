"""Distillation (common/training/distill.py) on tiny local models: the loss against a hand computation, the teacher's
checks, the projection, students from a subset of layers, cached teacher logits, exact resume, seeds and two
processes. The teachers are random (untrained) BERTs with the student's tokenizer: these tests check the
mechanics, not that a teacher helps."""
from __future__ import annotations

import json
import os
import random
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_ner import toy_ner_sentence, write_conll

import train_cls
import train_ner
from common.config import TrainArguments
from common.data import ner
from common.errors import UserError, run_cli
from common.training import distill
from conftest import preempted, run_script

NER_LABELS = ["O", "B-LOC", "B-ORG", "B-PER", "I-PER"]  # what train_ner.py finds in the toy NER data
SHORT = ["--per_device_train_batch_size", "16", "--mixed_precision", "no", "--logging_steps", "2"]


def save_teacher(path, tokenizer_dir, kind="cls", labels=("neg", "pos"), hidden=48, layers=4, heads=2, seed=1,
                 swap_tokens=None, dropout=0.1):
    """A random BERT teacher with a classification (or token-classification) head and the given label map."""
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
        BertForTokenClassification,
        BertTokenizerFast,
    )

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if swap_tokens:  # another vocabulary: two tokens trade ids
        vocab, (x, y) = tok.get_vocab(), swap_tokens
        tok = BertTokenizerFast(vocab={**vocab, x: vocab[y], y: vocab[x]}, do_lower_case=True)
    config = BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=2 * hidden, max_position_embeddings=128, type_vocab_size=2,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                        id2label=dict(enumerate(labels)), label2id={x: i for i, x in enumerate(labels)})
    torch.manual_seed(seed)
    (BertForSequenceClassification if kind == "cls" else BertForTokenClassification)(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def teachers(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("teachers")
    return {"cls": save_teacher(d / "cls", tiny_model),
            "ner": save_teacher(d / "ner", tiny_model, kind="ner", labels=NER_LABELS)}


@pytest.fixture(scope="module")
def ner_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("ner-kd")
    rng = random.Random(3)
    return {"train": write_conll(d / "train.txt", [toy_ner_sentence(rng) for _ in range(120)]),
            "dev": write_conll(d / "dev.txt", [toy_ner_sentence(rng) for _ in range(31)])}


def cls_argv(model, files, out, *extra):
    return ["--model", model, "--train_file", files["train"], "--validation_file", files["dev"],
            "--output_dir", str(out), *SHORT, *extra]


def ner_argv(model, files, out, *extra):
    return ["--model", model, "--train_file", files["train"], "--validation_file", files["dev"],
            "--output_dir", str(out), *SHORT, *extra]


def kd_args(**kw) -> TrainArguments:
    return TrainArguments(teacher_model="t", distill_alpha=0.3, distill_temperature=2.5, **kw)


def test_loss_is_the_hand_computed_formula_over_the_task_items(tiny_model):
    """alpha*CE + (1-alpha)*T^2*KL summed over the items (examples; NER: labelled positions only), plus the
    item-weighted per-example MSE of projected hidden states over real tokens."""
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    torch.manual_seed(0)
    a, t = 0.3, 2.5
    ids = torch.randint(5, 60, (3, 6))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0

    # classification: one item per example, cached teacher logits looked up by example_index
    student = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=3).eval()
    store = distill.LogitStore(torch.randn(5, 3), torch.arange(6))
    base = train_cls.ClassificationObjective(False, 3)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 2, 1]),
             "example_index": torch.tensor([4, 0, 2])}
    got = distill.DistillObjective(base, kd_args(), [], store=store).loss_sum(student, batch)
    logits = student(input_ids=ids, attention_mask=mask).logits
    want = 0
    for i, row in enumerate([4, 0, 2]):
        p = torch.softmax(store.values[row] / t, -1)
        kl = (p * (p.log() - torch.log_softmax(logits[i] / t, -1))).sum()
        want = want + a * torch.nn.functional.cross_entropy(logits[i], batch["labels"][i]) + (1 - a) * t * t * kl
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    # tokens: only labelled positions are items; the store holds one row per labelled position, in order
    tagger = AutoModelForTokenClassification.from_pretrained(tiny_model, num_labels=4).eval()
    labels = torch.tensor([[-100, 1, -100, 3, 0, -100], [-100, 2, 2, -100, -100, -100], [-100] * 6])
    counts = (labels != -100).sum(1)
    store = distill.LogitStore(torch.randn(int(counts.sum()) + 2, 4),  # 2 rows of another example first
                               torch.tensor([0, 2, 2 + 3, 2 + 3 + 2, 2 + 3 + 2]))
    ner_base = train_ner.NerObjective(train_ner.NerState(NER_LABELS, [], [], np.zeros(1)), None)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "example_index": torch.tensor([1, 2, 3])}
    got = distill.DistillObjective(ner_base, kd_args(), [], store=store).loss_sum(tagger, batch)
    logits = tagger(input_ids=ids, attention_mask=mask).logits
    want, k = 0, 0
    rows = {0: 2, 1: 5, 2: 7}  # first store row of each batch example
    for i in range(3):
        k = rows[i]
        for j in range(6):
            if labels[i, j] == -100:
                continue
            p = torch.softmax(store.values[k] / t, -1)
            kl = (p * (p.log() - torch.log_softmax(logits[i, j] / t, -1))).sum()
            want = want + a * torch.nn.functional.cross_entropy(logits[i, j], labels[i, j]) + (1 - a) * t * t * kl
            k += 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    # hidden states through a projection: per example, mean over its real tokens and units, times its items
    teacher = AutoModelForTokenClassification.from_pretrained(tiny_model, num_labels=4).eval()
    proj = torch.nn.Linear(32, 32)
    obj = distill.DistillObjective(ner_base, kd_args(distill_hidden=True, distill_prediction=False), [[1, 0]],
                                   teacher=teacher, projection=proj)
    got = obj.loss_sum(tagger, batch)
    hs = tagger(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[2]
    ht = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1]
    want = 0
    for i in range(3):
        real = mask[i].bool()
        want = want + counts[i] * ((proj(hs[i][real]) - ht[i][real]) ** 2).mean()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    # attention scores q.k/sqrt(d) per head before softmax, over real query-key pairs only
    obj = distill.DistillObjective(ner_base, kd_args(distill_attention=True, distill_prediction=False), [[1, 0]],
                                   teacher=teacher, taps=(distill.AttentionTaps(tagger, [1], "student"),
                                                          distill.AttentionTaps(teacher, [0], "teacher")))
    got = obj.loss_sum(tagger, batch)
    scores = {}
    for who, model, layer in (("s", tagger, 1), ("t", teacher, 0)):  # a layer's input: the previous one's output
        h = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[layer]
        attn = model.bert.encoder.layer[layer].attention.self
        q, k = attn.query(h).view(3, 6, 2, 16), attn.key(h).view(3, 6, 2, 16)
        scores[who] = torch.einsum("bihd,bjhd->bhij", q, k) / 4.0
    want = 0
    for i in range(3):
        real = mask[i].bool()
        diff = (scores["s"][i][:, real][:, :, real] - scores["t"][i][:, real][:, :, real]) ** 2
        want = want + counts[i] * diff.mean()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


MISMATCHES = {  # teacher (from the tiny model's folder and a path), extra flags, the message
    "labels": (lambda m, p: save_teacher(p, m, labels=("neg", "neutral", "pos")), [],
               "only the teacher has ['neutral']"),
    "order": (lambda m, p: save_teacher(p, m, labels=("pos", "neg")), [],
              "the same labels in another order (teacher ['pos', 'neg'], student ['neg', 'pos'])"),
    "vocabulary": (lambda m, p: save_teacher(p, m, swap_tokens=("bad", "good")), [],
                   "2 tokens differ (e.g. 'bad': id 21 in the teacher, 11 in the student)"),
    "head": (lambda m, p: m, [],  # a masked-LM checkpoint, not a classifier
             "is a BertForMaskedLM checkpoint, not a fine-tuned *ForSequenceClassification model"),
    "heads": (lambda m, p: save_teacher(p, m, heads=4), ["--distill_attention"],
              "the student has 2 heads and --teacher_model"),
    "layer map": (lambda m, p: save_teacher(p, m), ["--distill_hidden", "--layer_map", "0:1,1:4"],
                  "1:4 is outside the student's 2 layers (0-1) or the teacher's 4 (0-3)"),
}


@pytest.mark.parametrize("case", sorted(MISMATCHES))
def test_teacher_mismatches_exit_2_before_anything_is_written(case, tiny_model, sentiment_files, tmp_path, capsys):
    """Each mismatch: one sentence naming it, exit 2 (run_cli), and no output folder."""
    make, flags, expected = MISMATCHES[case]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        run_cli(train_cls.main, cls_argv(tiny_model, sentiment_files, out, "--teacher_model",
                                         make(tiny_model, tmp_path / "teacher"), *flags))
    assert stop.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last, last
    assert not out.exists()


def test_flag_and_engine_refusals():
    for kw, msg in (({"distill_hidden": True}, "--distill_hidden distill from a teacher: pass --teacher_model"),
                    ({"teacher_model": "t", "distill_prediction": False}, "--no_distill_prediction leaves no loss"),
                    ({"teacher_model": "t", "layer_map": "0:1,0:2"}, "each student layer once"),
                    ({"teacher_model": "t", "layer_map": "0:1"}, "--layer_map pairs layers for --distill_hidden"),
                    ({"teacher_model": "t", "distill_hidden": True, "torch_compile": True}, "has not been tested"),
                    ({"init_student_layers": "2,0"}, "in increasing order"),
                    ({"teacher_model": "t", "distill_alpha": 1.5}, "--distill_alpha must be in [0, 1]")):
        with pytest.raises(UserError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            TrainArguments(**kw)
    with pytest.raises(UserError, match="not available under DeepSpeed"):
        distill.check_engine(kd_args(), SimpleNamespace(distributed_type="DistributedType.DEEPSPEED"))
    with pytest.raises(UserError, match="under FSDP only prediction-layer distillation from cached teacher logits"):
        distill.check_engine(kd_args(distill_attention=True), SimpleNamespace(distributed_type="FSDP"))
    distill.check_engine(kd_args(), SimpleNamespace(distributed_type="FSDP"))  # cached logits: allowed
    assert distill.uniform_map(3, 6) == [[0, 1], [1, 3], [2, 5]] and distill.uniform_map(4, 12)[-1] == [3, 11]


def test_student_from_chosen_layers_distils_and_loads_with_pipeline(teachers, sentiment_files, tmp_path):
    """--init_student_layers 0,2 of the 4-layer teacher: embeddings, layers 0 and 2 and the head copied (a near-zero
    learning rate leaves them in place); an ordinary 2-layer BERT that pipeline() loads; the card names the teacher."""
    from transformers import AutoModelForSequenceClassification, pipeline

    out = tmp_path / "student"
    res = train_cls.main(cls_argv(teachers["cls"], sentiment_files, out, "--init_student_layers", "0,2",
                                  "--teacher_model", teachers["cls"], "--max_steps", "2", "--learning_rate", "1e-12"))
    assert res["model"]["student_from_layers"] == [0, 2] and res["distillation"]["student_layers"] == 2
    source, saved = load_file(os.path.join(teachers["cls"], "model.safetensors")), load_file(out / "model.safetensors")
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    assert not any(k.startswith("bert.encoder.layer.2") for k in saved)
    for key, value in saved.items():
        src = key.replace("layer.1.", "layer.2.") if key.startswith("bert.encoder.layer.1.") else key
        torch.testing.assert_close(value, source[src], rtol=0, atol=1e-6, msg=key)
    assert not torch.allclose(saved["bert.encoder.layer.1.output.dense.weight"],
                              source["bert.encoder.layer.1.output.dense.weight"])  # layer 2, not layer 1
    model, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert pipeline("text-classification", model=str(out))("a good film")[0]["label"] in ("neg", "pos")
    card = (out / "README.md").read_text()
    assert f"Distilled from the teacher `{teachers['cls']}`" in card and "layers 0, 2 of" in card
    with pytest.raises(UserError, match="has 4 layers"):
        train_cls.main(cls_argv(teachers["cls"], sentiment_files, tmp_path / "x", "--init_student_layers", "0,4"))


def test_cached_logits_equal_the_teachers_and_are_reused_until_teacher_or_data_change(
        tiny_model, teachers, sentiment_files, ner_data, tmp_path):
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    kd = ["--teacher_model", teachers["cls"], "--max_steps", "4", "--eval_strategy", "no", "--distill_alpha", "0",
          "--learning_rate", "1e-3"]  # the teacher's logits alone drive the updates
    first = train_cls.main(cls_argv(tiny_model, sentiment_files, tmp_path / "a", *kd, "--overwrite_cache"))
    again = train_cls.main(cls_argv(tiny_model, sentiment_files, tmp_path / "b", *kd))
    per_step = train_cls.main(cls_argv(tiny_model, sentiment_files, tmp_path / "c", *kd, "--no_distill_cache_logits"))
    assert (first["distillation"]["cache"]["hit"], again["distillation"]["cache"]["hit"]) == (False, True)
    assert per_step["distillation"]["teacher_logits"] == "per step" and "cache" not in per_step["distillation"]
    assert again["eval"] == first["eval"]
    a, c = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "c" / "model.safetensors")
    assert max((a[k] - c[k]).abs().max().item() for k in a) < 1e-6  # per-step teacher: the same training
    fewer = train_cls.main(cls_argv(tiny_model, sentiment_files, tmp_path / "d", *kd, "--max_train_samples", "100"))
    assert fewer["distillation"]["cache"]["hit"] is False  # other data: another key
    changed = save_teacher(tmp_path / "t2", tiny_model, seed=2)
    other = train_cls.main(cls_argv(tiny_model, sentiment_files, tmp_path / "e", "--teacher_model", changed,
                                    *kd[2:]))
    save_teacher(changed, tiny_model, seed=3)  # the same folder, retrained
    retrained = train_cls.main(cls_argv(tiny_model, sentiment_files, tmp_path / "f", "--teacher_model", changed,
                                        *kd[2:]))
    keys = {r["distillation"]["cache"]["key"] for r in (first, fewer, other, retrained)}
    assert len(keys) == 4 and retrained["distillation"]["cache"]["hit"] is False

    # NER: the cache holds the teacher's logits at the labelled positions of every training window, in order
    res = train_ner.main(ner_argv(tiny_model, ner_data, tmp_path / "ner", "--teacher_model", teachers["ner"],
                                  "--max_steps", "2", "--eval_strategy", "no"))
    info = res["distillation"]["cache"]
    saved = load_file(os.path.join(distill.cache_folder(), info["key"] + ".safetensors"))
    teacher = AutoModelForTokenClassification.from_pretrained(teachers["ner"]).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    words = ner.read_conll(ner_data["train"], "--train_file").tokens
    assert len(words) == 120 and len(saved["offsets"]) == 121 == res["train"]["train_samples"] + 1
    for i in (0, 7, 119):
        enc = tok(words[i], is_split_into_words=True, return_tensors="pt")
        with torch.no_grad():
            logits = teacher(**enc).logits[0]
        first_pieces = [j for j, w in enumerate(enc.word_ids()) if w is not None and w != enc.word_ids()[j - 1]]
        lo, hi = saved["offsets"][i], saved["offsets"][i + 1]
        torch.testing.assert_close(saved["values"][lo:hi], logits[first_pieces], rtol=1e-4, atol=1e-5)
    assert info["items"] == int(saved["offsets"][-1]) == sum(len(w) for w in words)


def test_intermediate_distillation_resumes_exactly_and_keeps_the_projection_out_of_the_model(
        tiny_model, teachers, sentiment_files, tmp_path, monkeypatch):
    """Hidden + attention + embeddings through a 32->48 projection: SIGTERM at step 5 and a resume end bit for bit
    where the uninterrupted run ends; checkpoints hold the (trained) projection, the saved model does not."""
    from transformers import pipeline

    common = ["--teacher_model", teachers["cls"], "--distill_hidden", "--distill_attention", "--distill_embeddings",
              "--max_steps", "8", "--checkpointing_steps", "3", "--eval_strategy", "no", "--learning_rate", "1e-3"]
    full = train_cls.main(cls_argv(tiny_model, sentiment_files, tmp_path / "full", *common))
    part = tmp_path / "part"
    preempted(monkeypatch, 5, train_cls.main, cls_argv(tiny_model, sentiment_files, part, *common, "--logging_steps",
                                                       "1"))
    resumed = train_cls.main(cls_argv(tiny_model, sentiment_files, part, *common, "--resume_from_checkpoint",
                                      "latest"))
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(part / "model.safetensors")
    assert a.keys() == b.keys() and not any("distill" in k for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
    assert resumed["eval"] == full["eval"]
    d = full["distillation"]
    assert d["projection"] == [32, 48] and d["layer_map"] == [[0, 1], [1, 3]] and d["teacher_logits"] == "per step"
    step3 = load_file(part / "checkpoints" / "step_3" / "model.safetensors")
    step5 = load_file(part / "checkpoints" / "step_5" / "model.safetensors")
    assert step3["distill_projection.weight"].shape == (48, 32)
    assert not torch.equal(step3["distill_projection.weight"], step5["distill_projection.weight"])  # trained
    assert pipeline("text-classification", model=str(part))("a good film")[0]["label"] in ("neg", "pos")
    assert "intermediate layers (hidden, attention, embeddings" in (part / "README.md").read_text()


def test_seeds_summary_with_a_teacher_reuses_the_cached_logits(tiny_model, sentiment_files, tmp_path):
    teacher = save_teacher(tmp_path / "teacher", tiny_model, seed=4)  # its own: no other test cached its logits
    out = tmp_path / "seeds"
    summary = train_cls.main(cls_argv(tiny_model, sentiment_files, out, "--teacher_model", teacher,
                                      "--seeds", "1", "2", "--max_steps", "3"))
    assert summary["num_runs"] == 2 and summary["metrics"]["eval_accuracy"]["n"] == 2
    runs = [json.loads((out / f"seed_{s}" / "results.json").read_text()) for s in (1, 2)]
    assert [r["distillation"]["cache"]["hit"] for r in runs] == [False, True]  # the same split: the same logits
    assert all(r["distillation"]["teacher"] == teacher for r in runs)
    assert "Distilled from the teacher" in (out / "seed_2" / "README.md").read_text()


def test_two_processes_match_one_process(quiet_student, teachers, ner_data, tmp_path):
    """NER with cached logits (gathered from 2 ranks) and hidden + attention distillation through a projection
    (per-step teacher, DDP): 2 processes x batch 4 end where 1 process x batch 8 ends, within 1e-4."""
    from test_distributed import free_port

    args = ["--teacher_model", teachers["ner"], "--distill_hidden", "--distill_attention", "--max_steps", "5",
            "--learning_rate", "1e-3", "--no_group_by_length", "--eval_strategy", "no", "--logging_steps", "1"]
    one = train_ner.main(ner_argv(quiet_student, ner_data, tmp_path / "one", *args,
                                  "--per_device_train_batch_size", "8"))
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port())]
    proc = run_script("train_ner.py", ner_argv(quiet_student, ner_data, tmp_path / "two", *args,
                                               "--per_device_train_batch_size", "4"),
                      launcher=launcher, env={"ACCELERATE_USE_CPU": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["setup"]["num_processes"] == 2 and two["distillation"]["projection"] == [32, 48]
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    start = load_file(os.path.join(quiet_student, "model.safetensors"))
    assert max((a[k] - start[k]).abs().max().item() for k in a if k in start) > 1e-3  # it did learn
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    assert two["eval"]["f1"] == pytest.approx(one["eval"]["f1"], abs=1e-4)
    losses = [[r["loss"] for r in map(json.loads, open(tmp_path / n / "log_history.jsonl")) if "loss" in r]
              for n in ("one", "two")]
    assert losses[0] == pytest.approx(losses[1], abs=1e-4)


def test_fsdp_ranks_gather_the_cached_logits_and_match_one_process(quiet_student, sentiment_files, tmp_path):
    """Prediction-layer distillation under FSDP on 2 CPU ranks: each rank scores half of the training set, the
    gathered cache equals the one a single process computes, and training ends where 1 process ends (1e-4)."""
    from test_distributed import launch_2

    teacher = save_teacher(tmp_path / "teacher", quiet_student, seed=5)  # its own: nothing cached yet
    args = ["--teacher_model", teacher, "--max_steps", "5", "--learning_rate", "1e-3", "--no_group_by_length",
            "--eval_strategy", "no", "--mixed_precision", "no", "--logging_steps", "1", "--max_length", "32"]
    two = launch_2(quiet_student, sentiment_files, tmp_path / "two", args + ["--per_device_train_batch_size", "8"])
    assert two["setup"]["distributed_type"] == "FSDP" and two["distillation"]["cache"]["hit"] is False
    path = os.path.join(distill.cache_folder(), two["distillation"]["cache"]["key"] + ".safetensors")
    gathered = load_file(path)
    one = train_cls.main(cls_argv(quiet_student, sentiment_files, tmp_path / "one", *args, "--overwrite_cache",
                                  "--per_device_train_batch_size", "16"))
    assert one["distillation"]["cache"] == two["distillation"]["cache"] | {"hit": False}
    alone = load_file(path)
    assert torch.equal(gathered["offsets"], alone["offsets"]) and len(alone["offsets"]) == 241
    torch.testing.assert_close(gathered["values"], alone["values"], rtol=0, atol=1e-5)
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    assert two["eval"]["loss"] == pytest.approx(one["eval"]["loss"], abs=1e-4)
