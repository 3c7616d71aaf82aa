"""train_mlm.py: packing, (whole-word) masking, the masked-positions decoder, fixed evaluation masks,
outputs, the MLM -> classification handoff, and 2 processes vs 1."""
from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

from common.data import mlm
from conftest import FAST, FILLER, FIXTURES, SPLIT_WORDS, run_script, write_csv


def corpus(path, n_lines: int, seed: int = 0, blank_every: int = 7) -> str:
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        words = [rng.choice(FILLER + SPLIT_WORDS) for _ in range(rng.randint(3, 25))]
        lines.append(" ".join(words) + " .")
        if blank_every and i % blank_every == 0:
            lines.append("   ")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlm-text")
    return {"train": corpus(d / "train.txt", 300, 0), "valid": corpus(d / "valid.txt", 60, 1)}


def tok_of(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def results(out) -> dict:
    with open(os.path.join(out, "results.json")) as fh:
        return json.load(fh)


def check(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# Units
# ---------------------------------------------------------------------------------------------

def test_word_starts_follow_word_ids(tiny_model):
    tok = tok_of(tiny_model)
    enc = tok(["the unbelievable rewriting , playing"])
    pieces = tok.convert_ids_to_tokens(enc["input_ids"][0])
    starts = mlm.word_starts(enc.word_ids(0))
    assert pieces[:4] == ["[CLS]", "the", "un", "##believ"]
    for piece, s in zip(pieces, starts):
        assert s == (0 if piece.startswith("##") else 1), (piece, s)


def test_word_starts_for_byte_level_bpe_and_whole_words_masked_together():
    """Not only WordPiece: a byte-level BPE tokenizer marks word starts with 'Ġ' (no '##'); word_ids()
    still tells them, and whole-word masking never splits such a word."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["the unbelievable rewriting of playing cards", "a story of players"] * 5,
                            vocab_size=280, min_frequency=1, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tok = RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                               cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")
    enc = tok(["the unbelievably rewritten playbook of stories"])
    pieces = enc.tokens(0)
    starts = mlm.word_starts(enc.word_ids(0))
    assert any(not p.startswith("Ġ") and s == 0 for p, s in zip(pieces, starts)), pieces  # words in pieces
    expected = [1] + [1 if p.startswith("Ġ") else 0 for p in pieces[2:-1]]  # the first word has no 'Ġ'
    assert starts[1:-1] == expected, list(zip(pieces, starts))
    ids = torch.tensor(enc["input_ids"])
    ws = torch.tensor([starts])
    special = torch.isin(ids, torch.tensor(tok.all_special_ids))
    words = torch.tensor([[-1 if w is None else w for w in enc.word_ids(0)]])
    for seed in range(30):
        _, labels = mlm.mask_tokens(ids, special, 0.3, tok.mask_token_id, len(tok), ws,
                                  torch.Generator().manual_seed(seed))
        sel = labels[0] != -100
        for w in words[0].unique().tolist():
            if w >= 0:
                in_word = sel[words[0] == w]
                assert in_word.all() or not in_word.any(), (seed, w)


def _random_words(n_rows=64, length=96, seed=0):
    """Token ids and word starts: rows of words of 1-4 pieces, [CLS] ... [SEP] then padding."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((n_rows, length), dtype=np.int64)
    ws = np.ones((n_rows, length), dtype=np.int64)
    for r in range(n_rows):
        used = rng.integers(length // 2, length)
        ids[r, 0], ws[r, 0] = 2, 1
        pos = 1
        while pos < used - 1:
            k = int(min(rng.integers(1, 5), used - 1 - pos))
            ids[r, pos: pos + k] = rng.integers(10, 100, size=k)
            ws[r, pos], ws[r, pos + 1: pos + k] = 1, 0
            pos += k
        ids[r, pos] = 3
    return torch.from_numpy(ids), torch.from_numpy(ws)


def test_whole_word_mask_never_splits_a_word_and_keeps_the_rate():
    ids, ws = _random_words()
    special = torch.isin(ids, torch.tensor([0, 2, 3]))
    rates = []
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        masked, labels = mlm.mask_tokens(ids, special, 0.15, 4, 100, ws, gen)
        sel = labels != -100
        assert not sel[special].any(), "special/padding tokens were masked"
        # every token of a word has the selection of the word's first token
        pos = torch.arange(ids.shape[1]).expand(ids.shape)
        first = torch.where(ws.bool(), pos, torch.zeros_like(pos)).cummax(1).values
        assert torch.equal(sel, sel.gather(1, first) & ~special)
        assert torch.equal(labels[sel], ids[sel])
        assert torch.equal(masked[~sel], ids[~sel])
        rates.append(sel.sum().item() / (~special).sum().item())
    assert abs(np.mean(rates) - 0.15) < 0.01, np.mean(rates)


def test_token_masking_rate_and_80_10_10():
    ids, _ = _random_words(n_rows=256, seed=1)
    special = torch.isin(ids, torch.tensor([0, 2, 3]))
    masked, labels = mlm.mask_tokens(ids, special, 0.15, 4, 100, None, torch.Generator().manual_seed(0))
    sel = labels != -100
    rate = sel.sum().item() / (~special).sum().item()
    assert abs(rate - 0.15) < 0.01
    frac_mask = (masked[sel] == 4).float().mean().item()
    frac_same = (masked[sel] == ids[sel]).float().mean().item()
    assert abs(frac_mask - 0.8) < 0.03 and abs(frac_same - 0.1) < 0.03 + 0.01  # random may hit the same id


def test_packing_keeps_the_remainder_and_wraps_blocks(tiny_model):
    import datasets

    tok = tok_of(tiny_model)
    texts = ["the movie was good", "unbelievable rewriting", "a b c d e f g h i j k l m n o p"]
    enc = tok(texts, add_special_tokens=False)
    ds = datasets.Dataset.from_dict({"input_ids": enc["input_ids"],
                                     "word_start": [mlm.word_starts(enc.word_ids(i)) for i in range(3)]})
    n_tokens = sum(map(len, enc["input_ids"])) + 2  # + two separators between three texts
    for max_length in (8, 16, 1000):
        packed = mlm.pack(ds, max_length, tok.cls_token_id, tok.sep_token_id, True)
        rows = packed["input_ids"]
        body = [r[1:-1] for r in rows]
        assert sum(map(len, body)) == n_tokens  # nothing dropped
        assert all(len(r) <= max_length for r in rows)
        assert all(r[0] == tok.cls_token_id and r[-1] == tok.sep_token_id for r in rows)
        assert packed["length"] == [len(r) for r in rows]
        assert all(len(r) == max_length for r in rows[:-1])
        for ws in packed["word_start"]:
            assert ws[0] == 1 and ws[1] == 1 and ws[-1] == 1
        stream = [t for b in body for t in b]
        assert stream.count(tok.sep_token_id) == 2
    tiny = mlm.pack(ds.select([0]), 128, tok.cls_token_id, tok.sep_token_id, False)
    assert len(tiny) == 1 and tiny["length"][0] == len(enc["input_ids"][0]) + 2


def test_fixed_eval_masks_are_deterministic(tiny_model):
    import datasets

    tok = tok_of(tiny_model)
    enc = tok(["the movie was good and the plot was great"] * 20)
    ds = datasets.Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                                     "length": [len(x) for x in enc["input_ids"]]})
    a, na = mlm.fixed_eval_masks(ds, tok.all_special_ids, 0.15, tok.mask_token_id, len(tok), 0, False)
    b, nb = mlm.fixed_eval_masks(ds, tok.all_special_ids, 0.15, tok.mask_token_id, len(tok), 0, False)
    c, _ = mlm.fixed_eval_masks(ds, tok.all_special_ids, 0.15, tok.mask_token_id, len(tok), 1, False)
    assert na == nb > 0 and a["labels"] == b["labels"] and a["input_ids"] == b["input_ids"]
    assert a["labels"] != c["labels"]


def test_masked_positions_decoder_gives_the_full_decoder_loss(tiny_model):
    from transformers import AutoModelForMaskedLM

    import train_mlm

    model = AutoModelForMaskedLM.from_pretrained(tiny_model).eval()
    tok = tok_of(tiny_model)
    enc = tok(["the unbelievable movie was good", "a plot"], padding=True, return_tensors="pt")
    special = torch.isin(enc["input_ids"], torch.tensor(tok.all_special_ids))
    masked, labels = mlm.mask_tokens(enc["input_ids"], special, 0.5, tok.mask_token_id, len(tok),
                                   generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": masked, "attention_mask": enc["attention_mask"], "labels": labels}
    args = (tok.all_special_ids, tok.mask_token_id, len(tok), 0.15, False)
    full = train_mlm.MlmObjective(model, *args, full_decoder=True, tied=True)
    fast = train_mlm.MlmObjective(model, *args, full_decoder=False, tied=True)
    reference = model(**batch).loss * (labels != -100).sum()  # the model's own mean loss, as a sum
    with torch.no_grad():
        assert torch.allclose(full.loss_sum(model, batch), reference, atol=1e-4)
        assert torch.allclose(fast.loss_sum(model, batch), reference, atol=1e-4)
        out_full, out_fast = full.eval_outputs(model, batch), fast.eval_outputs(model, batch)
    for key in out_full:
        assert torch.allclose(out_full[key].float(), out_fast[key].float(), atol=1e-4), key
    # gradients too
    model.train()
    torch.manual_seed(0)
    g1 = torch.autograd.grad(full.loss_sum(model, batch), model.cls.predictions.transform.dense.weight)[0]
    torch.manual_seed(0)
    g2 = torch.autograd.grad(fast.loss_sum(model, batch), model.cls.predictions.transform.dense.weight)[0]
    assert torch.allclose(g1, g2, atol=1e-5)
    fast.decoder.remove()


def test_masked_positions_are_bucketed_and_padding_rows_are_ignored():
    labels = torch.full((3, 10), -100)
    labels[0, 2], labels[1, 5], labels[2, 9] = 7, 8, 9
    index, targets = mlm.masked_positions(labels, bucket=4)
    assert index.tolist() == [2, 15, 29, 0] and targets.tolist() == [7, 8, 9, -100]
    assert mlm.masked_positions(labels, bucket=3)[0].tolist() == [2, 15, 29]  # already a multiple
    sizes = {len(mlm.masked_positions(torch.where(torch.rand(32, 128) < 0.15, 1, -100))[0]) for _ in range(50)}
    assert len(sizes) <= 4 and all(s % mlm.POSITION_BUCKET == 0 for s in sizes)  # ~130 sizes unbucketed


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------

MLM_FAST = FAST + ["--learning_rate", "1e-3", "--max_length", "32", "--per_device_eval_batch_size", "16"]


@pytest.fixture(scope="module")
def mlm_run(tiny_model, texts, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mlm-out"))
    proc = run_script("train_mlm.py", ["--model", tiny_model, "--train_file", texts["train"], "--validation_file",
                                       texts["valid"], "--output_dir", out, "--overwrite_output_dir",
                                       "--num_train_epochs", "3", *MLM_FAST[2:]])
    check(proc)
    return out, proc


def test_mlm_trains_reports_perplexity_and_loads_in_fill_mask(mlm_run):
    out, proc = mlm_run
    res = results(out)
    ppl = res["perplexity"]
    assert ppl["before"] > 0 and ppl["after"] > 0 and ppl["after"] < ppl["before"] / 1.5, ppl
    assert res["eval_before_training"]["perplexity"] == ppl["before"]
    assert res["mlm"]["trained_head_in_checkpoint"] is True and res["mlm"]["decoder_tied_to_embeddings"] is True
    assert res["mlm"]["decoder"] == "masked positions only"
    split = res["data"]["splits"]["train"]
    assert res["data"]["mode"] == "packed" and split["texts"] == 300  # blank lines skipped
    assert split["tokens"] == split["text_tokens"] + (split["texts"] - 1) + 2 * split["examples"]
    with open(os.path.join(out, "log_history.jsonl")) as fh:
        log = [json.loads(line) for line in fh]
    evals = [r["eval_perplexity"] for r in log if "eval_perplexity" in r]
    assert log[0]["step"] == 0 and log[0]["initial"] is True and len(evals) == 4
    assert all(r["eval_masked_tokens"] == log[0]["eval_masked_tokens"] for r in log if "eval_masked_tokens" in r)

    from transformers import AutoModelForMaskedLM, pipeline

    model = AutoModelForMaskedLM.from_pretrained(out)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    fill = pipeline("fill-mask", model=out)
    preds = fill("the movie was [MASK] .")
    assert len(preds) == 5 and all("token_str" in p for p in preds)


def test_mlm_to_classification_handoff(mlm_run, sentiment_files, tmp_path):
    out, _ = mlm_run
    cls_out = str(tmp_path / "cls")
    proc = run_script("train_cls.py", ["--model", out, "--train_file", sentiment_files["train"],
                                       "--validation_file", sentiment_files["dev"], "--output_dir", cls_out,
                                       *FAST, "--learning_rate", "1e-3"])
    check(proc)
    res = results(cls_out)
    # the encoder comes from the MLM output; only the head is new (and the pooler: the tiny fixture was
    # saved as a masked LM and never had one; test_model_without_mlm_head... checks a pooler is carried)
    assert sorted(res["model"]["newly_initialised"]) == ["bert.pooler.dense.bias", "bert.pooler.dense.weight",
                                                         "classifier.bias", "classifier.weight"]
    assert "newly initialised weights" in proc.stderr and "classifier.weight" in proc.stderr
    assert res["train"]["global_step"] > 0 and res["eval"]["num_examples"] == 61
    from transformers import pipeline

    pipe = pipeline("text-classification", model=cls_out)
    assert pipe("the movie was good")[0]["label"] in ("pos", "neg")


def test_mlm_to_ner_handoff(mlm_run, tmp_path):
    import train_ner

    out, _ = mlm_run
    conll = os.path.join(FIXTURES, "ner_conll.txt")
    res = train_ner.main(["--model", out, "--train_file", conll, "--validation_file", conll, "--max_steps", "3",
                          "--mixed_precision", "no", "--output_dir", str(tmp_path / "ner")])
    new = res["model"]["newly_initialised"]
    assert new == ["classifier.bias", "classifier.weight"], new  # encoder from the MLM run, only the head new
    assert res["train"]["global_step"] == 3 and res["eval"]["num_examples"] > 0


def test_mlm_line_by_line_whole_word_table_input(tiny_model, tmp_path):
    rng = random.Random(5)
    rows = [(i, " ".join(rng.choice(FILLER + SPLIT_WORDS) for _ in range(rng.randint(2, 40)))) for i in range(150)]
    rows[3] = (3, "")
    train = write_csv(tmp_path / "train.csv", ["id", "content"], rows)
    out = str(tmp_path / "out")
    proc = run_script("train_mlm.py", ["--model", tiny_model, "--train_file", train, "--text_column", "content",
                                       "--line_by_line", "--whole_word_mask", "--validation_split", "0.2",
                                       "--output_dir", out, *MLM_FAST, "--max_length", "24"])
    check(proc)
    res = results(out)
    d = res["data"]
    assert d["mode"] == "line_by_line" and d["whole_word_mask"] is True and d["derived_splits"] == ["validation"]
    assert d["splits"]["train"]["blank_rows_skipped"] == 1
    assert d["splits"]["train"]["examples"] + d["splits"]["validation"]["examples"] == 149
    assert d["splits"]["train"]["truncated_lines"] > 0
    assert res["perplexity"]["after"] < res["perplexity"]["before"]
    # lines of all lengths, grouped: every step is divided by the epoch's expected masked tokens per step
    assert res["setup"]["loss_items_per_step"] > 0


def test_line_by_line_expected_masked_tokens():
    import datasets

    import train_mlm

    ds = datasets.Dataset.from_dict({"input_ids": [[1, 5, 6, 2], [1, 7, 2], [1, 8, 9, 4, 2]]})
    task = train_mlm.MlmObjective(None, [0, 1, 2], 3, 10, 0.15, False, True, False, line_by_line=True)
    assert task.total_items(ds) == pytest.approx(0.15 * 6)  # special ids 0/1/2 are never masked
    assert task.total_items(ds.select([2])) == pytest.approx(0.15 * 3)
    packed = train_mlm.MlmObjective(None, [0, 1, 2], 3, 10, 0.15, False, True, False, line_by_line=False)
    assert packed.total_items(ds) is None  # equal-length blocks: each batch's own count is the mean


def test_model_without_mlm_head_is_reported_and_trains(tiny_model, texts, tmp_path):
    """A checkpoint saved as a bare encoder (with a pooler, like MiniLM-L6): head reported as new,
    decoder tied, and the pooler carried into the output for a later classifier."""
    from transformers import AutoTokenizer, BertModel

    bare = str(tmp_path / "bare")
    BertModel.from_pretrained(tiny_model, add_pooling_layer=True).save_pretrained(bare)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(bare)
    out = str(tmp_path / "out")
    proc = run_script("train_mlm.py", ["--model", bare, "--train_file", texts["train"], "--validation_file",
                                       texts["valid"], "--output_dir", out, *MLM_FAST, "--max_steps", "6"])
    check(proc)
    assert "has no trained MLM head" in proc.stderr
    res = results(out)
    assert res["mlm"]["trained_head_in_checkpoint"] is False
    assert any(k.startswith("cls.predictions.") for k in res["mlm"]["newly_initialised_head"])
    assert res["mlm"]["decoder_tied_to_embeddings"] is True
    assert res["mlm"]["pooler_kept"] == ["bert.pooler.dense.bias", "bert.pooler.dense.weight"]
    from safetensors import safe_open

    with safe_open(os.path.join(out, "model.safetensors"), "pt") as fh, \
            safe_open(os.path.join(bare, "model.safetensors"), "pt") as src:
        assert torch.equal(fh.get_tensor("bert.pooler.dense.weight"), src.get_tensor("pooler.dense.weight"))
    from common.files import umask

    assert os.stat(os.path.join(out, "model.safetensors")).st_mode & 0o777 == 0o666 & ~umask()  # rewritten: not 0600


def test_mlm_resume_replays_the_same_masks(tiny_model, texts, tmp_path):
    """Masks are drawn from the step's seed: resuming from step 4 ends with the uninterrupted weights."""
    from safetensors.torch import load_file

    out = str(tmp_path / "out")
    common = ["--model", tiny_model, "--train_file", texts["train"], "--validation_file", texts["valid"],
              "--output_dir", out, *MLM_FAST, "--max_steps", "8", "--eval_strategy", "no"]
    check(run_script("train_mlm.py", common + ["--checkpointing_steps", "4"]))
    first = load_file(os.path.join(out, "model.safetensors"))
    check(run_script("train_mlm.py", common + ["--resume_from_checkpoint", os.path.join(out, "checkpoints", "step_4"),
                                                "--overwrite_output_dir"]))
    second = load_file(os.path.join(out, "model.safetensors"))
    assert max((first[k] - second[k]).abs().max().item() for k in first) < 1e-6


def test_mlm_two_processes_same_perplexity(tiny_model, texts, tmp_path):
    """The fixed masks make the evaluation independent of the process count: the starting weights
    score the same perplexity on 1 and on 2 processes, with every block counted once."""
    import sys

    outs = {}
    for n in (1, 2):
        out = str(tmp_path / f"p{n}")
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n),
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        if n > 1:
            launcher.insert(3, "--multi_gpu")
        proc = run_script("train_mlm.py", ["--model", tiny_model, "--train_file", texts["train"], "--validation_file",
                                           texts["valid"], "--output_dir", out, *MLM_FAST, "--max_steps", "3",
                                           "--per_device_eval_batch_size", "5"],
                          launcher=launcher, env={"ACCELERATE_USE_CPU": "1"})
        check(proc)
        outs[n] = results(out)
    assert outs[2]["setup"]["num_processes"] == 2
    a, b = outs[1]["eval_before_training"], outs[2]["eval_before_training"]
    assert a["masked_tokens"] == b["masked_tokens"]
    assert abs(a["perplexity"] - b["perplexity"]) / a["perplexity"] < 1e-4
    assert outs[1]["eval"]["num_examples"] == outs[2]["eval"]["num_examples"]


@pytest.mark.parametrize("case", ["blank_file", "missing_column", "column_on_txt", "bad_probability", "bad_utf8"])
def test_mlm_bad_input(case, tiny_model, texts, tmp_path):
    train, extra = texts["train"], []
    if case == "blank_file":
        train = str(tmp_path / "blank.txt")
        open(train, "w").write("\n  \n\n")
        expect = "has no text (every line is blank)"
    elif case == "missing_column":
        train = write_csv(tmp_path / "t.csv", ["id", "body_text"], [(1, "a b c")])
        extra = ["--text_column", "body"]
        expect = "has no column 'body'"
    elif case == "column_on_txt":
        extra = ["--text_column", "text"]
        expect = "is a plain text file"
    elif case == "bad_probability":
        extra = ["--mlm_probability", "1.5"]
        expect = "--mlm_probability must be between 0 and 1"
    else:
        train = str(tmp_path / "bad.txt")
        open(train, "wb").write(b"fine line\nbad \xff byte\n")
        expect = "line 2: byte 0x"
    out = str(tmp_path / "out")
    proc = run_script("train_mlm.py", ["--model", tiny_model, "--train_file", train, "--output_dir", out, *extra])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert expect in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(os.path.join(out, "results.json"))
